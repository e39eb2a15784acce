"""BaseDataSparsifier behaviour through DataNormSparsifier, on one process (DESIGN.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from distsparse import BaseDataSparsifier, DataNormSparsifier
from distsparse.distributed.rects import RectShards

pytestmark = pytest.mark.usefixtures("one_thread")

DEFAULTS = {"sparsity_level": 0.5, "sparse_block_shape": (1, 4), "zeros_per_block": None}


def stepped(sp, name, data, **config):
    sp.add_data(name, data, **config)
    sp.step()
    return sp.get_mask(name)


def snapshot(sp):
    """Everything observable about a sparsifier's groups (to check that nothing changed)."""
    sd = sp.state_dict()
    return {
        "groups": json.dumps({k: v for k, v in sd.items() if k != "masks"}, sort_keys=True, default=str),
        "masks": {n: m.clone() for n, m in sd["masks"].items()},
        "data_groups": {n: dict(c) for n, c in sp.data_groups.items()},
        "data": {n: (sp.get_data(n).data_ptr(), sp.get_data(n).detach().clone()) for n in sp.data_groups},
    }


def assert_unchanged(before, after):
    assert before["groups"] == after["groups"]
    assert before["data_groups"] == after["data_groups"]
    assert before["masks"].keys() == after["masks"].keys()
    for name in before["masks"]:
        assert torch.equal(before["masks"][name], after["masks"][name]), name
    assert before["data"].keys() == after["data"].keys()
    for name, (ptr, value) in before["data"].items():
        assert after["data"][name][0] == ptr, name
        assert torch.equal(after["data"][name][1], value), name


# -- add_data / get_data / get_mask ---------------------------------------------------------


def test_add_data_returns_the_data_with_the_current_mask_applied():
    sp = DataNormSparsifier(sparsity_level=0.5)
    data = torch.randn(4, 8)
    first = sp.add_data("x", data)
    assert torch.equal(first, data)  # fresh group: nothing pruned yet
    sp.step()
    again = sp.add_data("x", data)
    assert torch.equal(again, data * sp.get_mask("x"))
    assert int((again == 0).sum()) == 16


def test_add_data_of_a_parameter_returns_a_masked_view_that_carries_grad():
    p = nn.Parameter(torch.randn(4, 8))
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("p", p)
    sp.step()
    out = sp.add_data("p", p)
    assert out.requires_grad
    out.sum().backward()
    assert torch.equal(p.grad, sp.get_mask("p").to(p.dtype))


@pytest.mark.parametrize("kind", ["tensor", "parameter", "embedding", "embedding_bag"])
def test_get_data_is_the_users_own_tensor(kind):
    if kind == "tensor":
        obj = torch.randn(10, 8)
        tensor = obj
    elif kind == "parameter":
        obj = nn.Parameter(torch.randn(10, 8))
        tensor = obj
    elif kind == "embedding":
        obj = nn.Embedding(10, 8)
        tensor = obj.weight
    else:
        obj = nn.EmbeddingBag(10, 8)
        tensor = obj.weight
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("g", obj)
    sp.step()
    got = sp.get_data("g")
    assert got.data_ptr() == tensor.data_ptr()
    assert got.shape == tensor.shape
    assert sp.get_mask("g").shape == tensor.shape
    assert int((~sp.get_mask("g")).sum()) == 40


def test_get_data_with_return_original_false_is_masked():
    sp = DataNormSparsifier(sparsity_level=0.5)
    data = torch.randn(4, 8)
    sp.add_data("x", data)
    sp.step()
    masked = sp.get_data("x", return_original=False)
    assert torch.equal(masked, data * sp.get_mask("x"))
    assert torch.count_nonzero(masked) == 16
    assert torch.count_nonzero(data) == 32  # the user's tensor is not changed by the view


def test_data_list_in_the_constructor_adds_groups_with_the_defaults():
    a, b = torch.randn(4, 4), nn.Parameter(torch.randn(2, 8))
    sp = DataNormSparsifier([("a", a), ("b", b)], sparsity_level=0.25)
    assert sorted(sp.data_groups) == ["a", "b"]
    assert sp.get_data("a") is a or sp.get_data("a").data_ptr() == a.data_ptr()
    assert sp.data_groups["b"]["sparsity_level"] == 0.25


def test_readding_the_same_name_every_batch_keeps_mask_and_config_and_warns_nothing():
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("x", torch.randn(4, 8), sparsity_level=0.25, sparse_block_shape=(2, 2))
    sp.step()
    mask = sp.get_mask("x").clone()
    config = dict(sp.data_groups["x"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):
            batch = torch.randn(4, 8)
            out = sp.add_data("x", batch)
            assert torch.equal(sp.get_mask("x"), mask)
            assert sp.data_groups["x"] == config
            assert torch.equal(out, batch * mask)
            assert sp.get_data("x").data_ptr() == batch.data_ptr()


def test_readding_with_another_shape_and_reuse_mask_raises_naming_the_group_and_leaves_it_untouched():
    sp = DataNormSparsifier(sparsity_level=0.5)
    data = torch.randn(4, 8)
    sp.add_data("batch", data, sparsity_level=0.25)
    sp.step()
    before = snapshot(sp)
    with pytest.raises(ValueError, match="batch") as info:
        sp.add_data("batch", torch.randn(3, 8), sparsity_level=0.75)
    assert "(3, 8)" in str(info.value) and "(4, 8)" in str(info.value)
    assert_unchanged(before, snapshot(sp))
    assert sp.get_data("batch").data_ptr() == data.data_ptr()


def _aliases():
    p = nn.Parameter(torch.randn(6, 8))
    emb = nn.Embedding(6, 8)
    base = torch.randn(10, 8)
    return {
        "the same Parameter": (p, p),
        "the same module": (emb, emb),
        "a module and its weight": (emb, emb.weight),
        "a view": (p, p.detach()[2:4]),
        "a transposed view": (p, p.detach().t()),
        "overlapping slices": (base[0:5], base[4:10]),
        "a tensor and a rectangle shard of it": (base, RectShards((10, 8), [((0, 0), base[:5].clone()),
                                                                            ((5, 0), base[5:])])),
        "a rectangle shard and a tensor over it": (RectShards((10, 8), [((0, 0), base[:5]), ((5, 0), base[5:])]),
                                                   base[7:]),
    }


@pytest.mark.parametrize("case", list(_aliases()))
def test_the_same_memory_under_a_second_name_is_refused_naming_the_first_group(case):
    first, second = _aliases()[case]
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("emb.first", first, sparsity_level=0.5)
    sp.step()
    before = None if isinstance(first, RectShards) else snapshot(sp)
    with pytest.raises(ValueError, match=r"group 'second': its data overlaps the memory of group 'emb\.first'"):
        sp.add_data("second", second, sparsity_level=0.9)
    if before is not None:
        assert_unchanged(before, snapshot(sp))
    assert "second" not in sp.data_groups and "second" not in sp.state


def test_readding_the_same_memory_under_its_own_name_and_disjoint_slices_are_accepted():
    base = torch.randn(10, 8)
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("top", base[:5])
    sp.add_data("bottom", base[5:])  # one storage, disjoint memory
    sp.add_data("top", base[:5])     # replacing a group's data with itself (the seed README loop)
    sp.add_data("top", base[:5].view(40), reuse_mask=False)  # or with a view of it
    sp.add_data("top", base[:5], reuse_mask=False)
    sp.add_data("a", torch.empty(4, 8, device="meta"))  # no memory: nothing to overlap
    sp.add_data("b", torch.empty(4, 8, device="meta"))
    sp.add_data("none", torch.empty(0, 8))
    sp.add_data("none2", base[:0])
    assert sorted(sp.data_groups) == ["a", "b", "bottom", "none", "none2", "top"]


def test_readding_with_another_shape_and_reuse_mask_false_starts_a_fresh_mask():
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("batch", torch.randn(4, 8))
    sp.step()
    small = torch.randn(3, 8)
    out = sp.add_data("batch", small, reuse_mask=False)
    assert sp.get_mask("batch").shape == (3, 8)
    assert bool(sp.get_mask("batch").all())
    assert torch.equal(out, small)
    sp.step()
    assert int((~sp.get_mask("batch")).sum()) == 12


def test_readding_with_a_config_override_updates_only_that_key():
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("x", torch.randn(4, 8), sparse_block_shape=(2, 2))
    sp.add_data("x", torch.randn(4, 8), sparsity_level=0.25)
    assert sp.data_groups["x"] == {"sparsity_level": 0.25, "sparse_block_shape": (2, 2), "zeros_per_block": None}


def test_data_groups_hold_exactly_the_defaults_plus_overrides():
    sp = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    sp.add_data("plain", torch.randn(4, 8))
    sp.add_data("over", nn.Parameter(torch.randn(4, 8)), sparsity_level=0.3, zeros_per_block=2)
    assert sp.data_groups["plain"] == DEFAULTS
    assert sp.data_groups["over"] == {"sparsity_level": 0.3, "sparse_block_shape": (1, 4), "zeros_per_block": 2}
    assert set(sp.data_groups) == {"plain", "over"}


def test_scope_keyword_does_not_leak_into_data_groups():
    sp = DataNormSparsifier()
    sp.add_data("x", torch.randn(4, 8), replicated=True)
    assert sp.data_groups["x"] == DEFAULTS


def test_group_overrides_of_block_shape_are_used_by_step():
    sp = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    mask = stepped(sp, "x", torch.randn(4, 4), sparse_block_shape=(2, 2), zeros_per_block=None)
    blocks = mask.view(2, 2, 2, 2).permute(0, 2, 1, 3).reshape(4, 4)
    assert sorted(blocks.sum(dim=1).tolist()) == [0, 0, 4, 4]  # whole 2x2 blocks, zeros_per_block=None -> all 4


def test_names_with_dots_work():
    sp = DataNormSparsifier(sparsity_level=0.5)
    emb = nn.Embedding(6, 8)
    sp.add_data("layer.0.weight", emb)
    sp.add_data("a.b_c", torch.randn(2, 8))
    sp.add_data("a_b.c", torch.randn(2, 8))
    sp.step()
    assert set(sp.data_groups) == {"layer.0.weight", "a.b_c", "a_b.c"}
    assert sp.get_data("layer.0.weight").data_ptr() == emb.weight.data_ptr()
    sp.squash_mask(names=["layer.0.weight"])
    assert int((emb.weight == 0).sum()) == 24


def test_owner_of_is_rank_zero_when_not_distributed():
    sp = DataNormSparsifier()
    sp.add_data("p", nn.Parameter(torch.randn(4, 4)))
    sp.add_data("x", torch.randn(4, 4))
    sp.add_data("e", nn.Embedding(3, 4))
    assert [sp.owner_of(n) for n in ("p", "x", "e")] == [0, 0, 0]


def test_owner_of_an_unknown_name_is_a_value_error():
    sp = DataNormSparsifier()
    with pytest.raises(ValueError, match="nope"):
        sp.owner_of("nope")


def test_repr_names_the_class_and_every_group_without_dumping_tensors():
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("emb.weight", nn.Embedding(1000, 64))
    sp.add_data("batch", torch.randn(4, 8))
    text = repr(sp)
    assert "DataNormSparsifier" in text
    assert "emb.weight" in text and "batch" in text
    assert "(1000, 64)" in text
    assert "tensor(" not in text and len(text) < 2000


_FRESH_PROCESS = (
    "import warnings, torch\n"
    "before = list(warnings.filters)\n"
    "import distsparse\n"
    "from distsparse import DataNormSparsifier, BaseDataScheduler\n"
    "print('filters', 'same' if list(warnings.filters) == before else 'changed')\n"
    "data = torch.arange(64, dtype=torch.float32).reshape(8, 8).remainder(3)\n"
    "sp = DataNormSparsifier(sparsity_level=0.45, sparse_block_shape=(2, 2), zeros_per_block=3)\n"
    "sp.add_data('x', data); sp.step()\n"
    "print('mask', ''.join('1' if v else '0' for v in sp.get_mask('x').reshape(-1).tolist()))\n"
)


@pytest.fixture(scope="module")
def fresh_process():
    """Output of a fresh interpreter that imports distsparse and computes one tie-heavy mask."""
    result = subprocess.run([sys.executable, "-c", _FRESH_PROCESS], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())


def test_importing_distsparse_does_not_change_warning_filters(fresh_process):
    assert fresh_process["filters"] == "same"


def test_a_tie_heavy_mask_is_the_same_in_another_process(fresh_process):
    data = torch.arange(64, dtype=torch.float32).reshape(8, 8).remainder(3)
    sp = DataNormSparsifier(sparsity_level=0.45, sparse_block_shape=(2, 2), zeros_per_block=3)
    sp.add_data("x", data)
    sp.step()
    here = "".join("1" if v else "0" for v in sp.get_mask("x").reshape(-1).tolist())
    assert here.count("0") == 3 * round(0.45 * 16)
    assert fresh_process["mask"] == here


def test_a_subclass_without_update_mask_cannot_be_built():
    class Incomplete(BaseDataSparsifier):
        pass

    with pytest.raises(TypeError):
        Incomplete()


def test_a_minimal_subclass_gets_its_update_mask_result_as_a_bool_mask():
    class KeepPositive(BaseDataSparsifier):
        def update_mask(self, name, data, **config):
            return data > 0

    sp = KeepPositive(threshold=0)
    data = torch.tensor([[1.0, -1.0], [-2.0, 3.0]])
    sp.add_data("x", data)
    sp.step()
    assert sp.get_mask("x").dtype == torch.bool
    assert sp.get_mask("x").tolist() == [[True, False], [False, True]]
    assert sp.data_groups["x"] == {"threshold": 0}


# -- squash_mask ----------------------------------------------------------------------------


def test_squash_mask_writes_the_mask_into_an_embedding_weight_in_place():
    emb = nn.Embedding(50, 16)
    ptr = emb.weight.data_ptr()
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("emb", emb)
    sp.step()
    mask = sp.get_mask("emb").clone()
    sp.squash_mask()
    assert emb.weight.data_ptr() == ptr
    assert torch.equal(emb.weight == 0, ~mask)


def test_squash_mask_with_names_changes_only_those_groups():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    a0, b0 = a.clone(), b.clone()
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("a", a)
    sp.add_data("b", b)
    sp.step()
    sp.squash_mask(names=["b"])
    assert torch.equal(a, a0)
    assert torch.equal(b, b0 * sp.get_mask("b"))


def test_squash_mask_with_leave_parametrized_false_leaves_the_data_alone():
    a = torch.randn(4, 8)
    a0 = a.clone()
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("a", a)
    sp.step()
    sp.squash_mask(leave_parametrized=False)
    assert torch.equal(a, a0)


def test_step_still_works_after_squash_mask():
    p = nn.Parameter(torch.randn(8, 8))
    sp = DataNormSparsifier(sparsity_level=0.25)
    sp.add_data("p", p)
    sp.step()
    sp.squash_mask()
    sp.add_data("p", p, sparsity_level=0.75)
    sp.step()
    assert int((~sp.get_mask("p")).sum()) == 48
    sp.squash_mask()
    assert int((p == 0).sum()) == 48


def test_squash_mask_on_a_parameter_does_not_break_autograd():
    p = nn.Parameter(torch.randn(4, 8))
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("p", p)
    sp.step()
    sp.squash_mask()
    (p * 2).sum().backward()
    assert p.grad is not None


# -- state_dict / load_state_dict -----------------------------------------------------------


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _without_tensors(obj):
    if isinstance(obj, torch.Tensor):
        return None
    if isinstance(obj, dict):
        return {k: _without_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_without_tensors(v) for v in obj]
    return obj


def _trained():
    emb = nn.Embedding(20, 8)
    p = nn.Parameter(torch.randn(6, 6))
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("emb.weight", emb)
    sp.add_data("p", p, sparsity_level=0.25, sparse_block_shape=(2, 3))
    sp.step()
    return sp, emb, p


def test_state_dict_holds_masks_and_configs_but_no_user_data():
    sp, emb, p = _trained()
    sd = sp.state_dict()
    tensors = list(_tensors(sd))
    assert tensors, "state_dict holds no masks"
    for t in tensors:
        assert not t.is_floating_point(), f"a {t.dtype} tensor of shape {tuple(t.shape)} in the state"
        assert not t.is_sparse
    text = json.dumps(_without_tensors(sd))
    assert "emb.weight" in text and "p" in text
    masks = {tuple(t.shape) for t in tensors}
    assert (20, 8) in masks and (6, 6) in masks
    assert "0.25" in text


def test_state_dict_non_tensor_values_are_json_able():
    sp, _, _ = _trained()
    json.dumps(_without_tensors(sp.state_dict()))


def test_state_dict_round_trip_restores_masks_into_groups_already_added():
    sp, emb, p = _trained()
    sd = sp.state_dict()
    masks = {n: sp.get_mask(n).clone() for n in ("emb.weight", "p")}
    emb2, p2 = nn.Embedding(20, 8), nn.Parameter(torch.randn(6, 6))
    sp2 = DataNormSparsifier(sparsity_level=0.9)
    sp2.add_data("emb.weight", emb2)
    sp2.add_data("p", p2)
    sp2.load_state_dict(sd, config="checkpoint")  # sp2 was built without the saved geometry
    for n in masks:
        assert torch.equal(sp2.get_mask(n), masks[n])
        assert sp2.data_groups[n] == sp.data_groups[n]
    assert sp2.get_data("emb.weight").data_ptr() == emb2.weight.data_ptr()
    assert sp2.get_data("p").data_ptr() == p2.data_ptr()


def test_squash_mask_after_load_changes_the_live_model():
    sp, _, _ = _trained()
    sd = sp.state_dict()
    emb2 = nn.Embedding(20, 8)
    p2 = nn.Parameter(torch.randn(6, 6))
    sp2 = DataNormSparsifier()
    sp2.add_data("emb.weight", emb2)
    sp2.add_data("p", p2)
    sp2.load_state_dict(sd, config="checkpoint")
    sp2.squash_mask()
    assert torch.equal(emb2.weight == 0, ~sd["masks"]["emb.weight"].bool())
    assert int((emb2.weight == 0).sum()) == 80
    assert int((p2 == 0).sum()) == 12  # (6, 6) in (2, 3) blocks: round(0.25 * 6) = 2 blocks of 6


def test_state_dict_is_a_snapshot_not_a_live_view():
    sp, emb, _ = _trained()
    sd = sp.state_dict()
    saved = {n: m.clone() for n, m in sd["masks"].items()}
    sp.add_data("emb.weight", emb, sparsity_level=0.1)
    sp.step()
    for n, m in sd["masks"].items():
        assert torch.equal(m, saved[n])


def test_a_loaded_group_not_yet_added_waits_and_applies_when_added_with_the_same_shape():
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("batch", torch.randn(4, 8), sparsity_level=0.75)
    sp.step()
    sd = sp.state_dict()
    mask = sp.get_mask("batch").clone()
    sp2 = DataNormSparsifier(sparsity_level=0.5)
    sp2.load_state_dict(sd)
    assert "batch" not in sp2.data_groups or torch.equal(sp2.get_mask("batch"), mask)
    batch = torch.randn(4, 8)
    out = sp2.add_data("batch", batch)
    assert torch.equal(sp2.get_mask("batch"), mask)
    assert sp2.data_groups["batch"]["sparsity_level"] == 0.75
    assert torch.equal(out, batch * mask)


def test_a_pending_group_added_with_another_shape_is_a_value_error_naming_it():
    sp = DataNormSparsifier()
    sp.add_data("batch", torch.randn(4, 8))
    sp.step()
    sp2 = DataNormSparsifier()
    sp2.load_state_dict(sp.state_dict())
    with pytest.raises(ValueError, match="batch"):
        sp2.add_data("batch", torch.randn(3, 8))


def test_strict_load_refuses_a_state_lacking_a_group_we_have_and_changes_nothing():
    sp = DataNormSparsifier()
    sp.add_data("a", torch.randn(4, 8))
    sp.step()
    sd = sp.state_dict()
    sp2 = DataNormSparsifier()
    sp2.add_data("a", torch.randn(4, 8), sparsity_level=0.25)
    sp2.add_data("extra", torch.randn(4, 8))
    sp2.step()
    before = snapshot(sp2)
    with pytest.raises(ValueError, match="extra"):
        sp2.load_state_dict(sd, strict=True)
    assert_unchanged(before, snapshot(sp2))


def test_non_strict_load_keeps_groups_the_state_lacks():
    sp = DataNormSparsifier()
    sp.add_data("a", torch.randn(4, 8))
    sp.step()
    sd = sp.state_dict()
    sp2 = DataNormSparsifier()
    sp2.add_data("a", torch.randn(4, 8))
    sp2.add_data("extra", torch.randn(4, 8))
    sp2.step()
    extra_mask = sp2.get_mask("extra").clone()
    sp2.load_state_dict(sd, strict=False)
    assert torch.equal(sp2.get_mask("a"), sd["masks"]["a"].bool())
    assert torch.equal(sp2.get_mask("extra"), extra_mask)


@pytest.mark.parametrize("strict", [True, False])
def test_loading_a_group_with_another_shape_is_a_value_error_and_changes_nothing(strict):
    sp = DataNormSparsifier()
    sp.add_data("a", torch.randn(4, 8))
    sp.step()
    sd = sp.state_dict()
    sp2 = DataNormSparsifier()
    sp2.add_data("a", torch.randn(4, 12))
    sp2.step()
    before = snapshot(sp2)
    with pytest.raises(ValueError, match="a"):
        sp2.load_state_dict(sd, strict=strict)
    assert_unchanged(before, snapshot(sp2))


def _corruptions():
    def drop_key(sd):
        del sd["masks"]

    def bad_level(sd):
        sd["groups"]["b"]["config"]["sparsity_level"] = 1.5

    def bad_mask_shape(sd):
        sd["masks"]["b"] = torch.ones(3, 3, dtype=torch.bool)

    def bad_mask_type(sd):
        sd["masks"]["b"] = [[True]]

    def float_mask(sd):
        sd["masks"]["b"] = torch.ones(4, 8)

    def unknown_key(sd):
        sd["groups"]["b"]["config"]["bogus"] = 1

    def bad_version(sd):
        sd["format_version"] = 999

    def bad_defaults(sd):
        sd["defaults"]["sparse_block_shape"] = [0, 4]

    def not_a_mapping(sd):
        sd.clear()
        sd["groups"] = "nope"

    return [drop_key, bad_level, bad_mask_shape, bad_mask_type, float_mask, unknown_key, bad_version,
            bad_defaults, not_a_mapping]


@pytest.mark.parametrize("corrupt", _corruptions(), ids=lambda f: f.__name__)
def test_an_invalid_state_raises_and_changes_nothing(corrupt):
    src = DataNormSparsifier()
    src.add_data("a", torch.randn(4, 8), sparsity_level=0.25)
    src.add_data("b", torch.randn(4, 8), sparsity_level=0.75)
    src.step()
    sd = src.state_dict()
    corrupt(sd)
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("a", torch.randn(4, 8))
    sp.add_data("b", torch.randn(4, 8))
    sp.step()
    before = snapshot(sp)
    defaults = dict(sp.defaults) if hasattr(sp, "defaults") else None
    with pytest.raises((ValueError, TypeError, KeyError)):
        sp.load_state_dict(sd)
    assert_unchanged(before, snapshot(sp))
    if defaults is not None:
        assert dict(sp.defaults) == defaults


def test_an_invalid_pending_group_in_a_state_changes_nothing():
    src = DataNormSparsifier()
    src.add_data("a", torch.randn(4, 8))
    src.add_data("later", torch.randn(2, 8))
    src.step()
    sd = src.state_dict()
    sd["groups"]["later"]["config"]["sparsity_level"] = -0.5
    sp = DataNormSparsifier()
    sp.add_data("a", torch.randn(4, 8), sparsity_level=0.1)
    sp.step()
    before = snapshot(sp)
    with pytest.raises(ValueError):
        sp.load_state_dict(sd)
    assert_unchanged(before, snapshot(sp))
    later = torch.randn(2, 8)
    sp.add_data("later", later)  # nothing pending: a fresh group with the defaults
    assert bool(sp.get_mask("later").all())
    assert sp.data_groups["later"] == DEFAULTS


def test_load_state_dict_does_not_mutate_the_callers_dict():
    sp, _, _ = _trained()
    sd = sp.state_dict()
    keys = {k: (set(v) if isinstance(v, dict) else v) for k, v in sd.items() if k != "step_count"}
    sp2, _, _ = _trained()
    sp2.load_state_dict(sd)
    assert {k: (set(v) if isinstance(v, dict) else v) for k, v in sd.items() if k != "step_count"} == keys


def test_step_never_changes_the_users_data():
    data = torch.randn(6, 8)
    emb = nn.Embedding(6, 8)
    data0, w0 = data.clone(), emb.weight.detach().clone()
    sp = DataNormSparsifier(sparsity_level=0.75)
    sp.add_data("x", data)
    sp.add_data("emb", emb)
    for _ in range(2):
        sp.step()
    assert torch.equal(data, data0)
    assert torch.equal(emb.weight, w0)


def test_a_pending_group_survives_a_second_state_dict_before_it_is_added():
    sp = DataNormSparsifier()
    sp.add_data("batch", torch.randn(4, 8), sparsity_level=0.75)
    sp.step()
    mask = sp.get_mask("batch").clone()
    sp2 = DataNormSparsifier()
    sp2.load_state_dict(sp.state_dict())
    sp3 = DataNormSparsifier()
    sp3.load_state_dict(sp2.state_dict())  # saved again before the batch was re-added
    sp3.add_data("batch", torch.randn(4, 8))
    assert torch.equal(sp3.get_mask("batch"), mask)
    assert sp3.data_groups["batch"]["sparsity_level"] == 0.75


def test_a_loaded_state_survives_a_torch_save_with_weights_only():
    import io

    sp, _, _ = _trained()
    buffer = io.BytesIO()
    torch.save(sp.state_dict(), buffer)
    buffer.seek(0)
    sd = torch.load(buffer, weights_only=True)
    sp2, _, _ = _trained()
    sp2.add_data("p", sp2.get_data("p"), sparsity_level=0.9)
    sp2.load_state_dict(sd)
    assert torch.equal(sp2.get_mask("emb.weight"), sp.get_mask("emb.weight"))
    assert sp2.data_groups["p"] == sp.data_groups["p"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_add_data_returns_the_masked_data_in_the_datas_dtype_and_shape(dtype):
    data = torch.randn(2, 3, 8).to(dtype)
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("x", data)
    sp.step()
    out = sp.add_data("x", data)
    assert out.dtype == dtype and out.shape == data.shape
    assert torch.equal(out, data * sp.get_mask("x").to(dtype))
    assert int((out == 0).sum()) == 24


def test_a_state_saved_with_l2_norm_is_refused_by_an_l1_sparsifier_and_nothing_changes():
    data = torch.randn(8, 8)
    l2 = DataNormSparsifier(norm="L2")
    l2.add_data("t", data)
    l2.step()
    l1 = DataNormSparsifier(norm="L1")
    l1.add_data("t", data)
    before = l1.get_mask("t").clone()
    with pytest.raises(ValueError, match="norm"):
        l1.load_state_dict(l2.state_dict())
    assert torch.equal(l1.get_mask("t"), before)


def test_a_local_group_restored_from_another_world_size_accepts_data_of_any_shape():
    saved = DataNormSparsifier()
    saved.add_data("batch", torch.randn(4, 8))
    saved.step()
    state = saved.state_dict()
    state["world_size"] = 3  # as if saved on three ranks: this rank's local mask starts fresh
    resumed = DataNormSparsifier()
    with pytest.warns(UserWarning, match="start fresh"):
        resumed.load_state_dict(state)
    out = resumed.add_data("batch", torch.randn(6, 8))
    assert out.shape == (6, 8)
    assert bool(resumed.get_mask("batch").all())
    assert resumed.data_groups["batch"] == saved.data_groups["batch"]


def test_get_mask_is_one_tensor_that_step_and_load_update_in_place():
    weight = nn.Parameter(torch.randn(16, 8))
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("w", weight)
    held = sp.get_mask("w")
    sp.step()
    assert sp.get_mask("w") is held
    assert int(held.sum()) == 64  # the held tensor shows the new mask
    state = sp.state_dict()
    saved = state["masks"]["w"].clone()
    sp.load_state_dict(state)
    assert sp.get_mask("w") is held
    with torch.no_grad():
        weight.mul_(-1).add_(torch.randn(16, 8))
    sp.step()
    assert torch.equal(state["masks"]["w"], saved)  # the caller's state was not aliased


def test_a_pending_group_does_not_alias_the_loaded_state():
    source = DataNormSparsifier()
    source.add_data("batch", torch.randn(4, 8))
    source.step()
    state = source.state_dict()
    saved = state["masks"]["batch"].clone()
    sp = DataNormSparsifier()
    sp.load_state_dict(state)
    sp.add_data("batch", torch.randn(4, 8))
    sp.step()
    assert torch.equal(state["masks"]["batch"], saved)


def test_squash_mask_takes_a_single_name_and_refuses_unknown_keywords():
    a, b = nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(4, 8))
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("a", a)
    sp.add_data("b", b)
    sp.step()
    b_before = b.detach().clone()
    sp.squash_mask(names="a")
    assert int((a == 0).sum()) == 16 and torch.equal(b.detach(), b_before)
    with pytest.raises(TypeError):
        sp.squash_mask(name=["a"])  # a typo must not squash every group
