"""Single-process regressions of the hardening audit: tensor subclasses, exceptions of any
type in update_mask, masks under inference_mode, float16 overflow with partial blocks,
configs passed for pending groups, and schedulers that validate at construction."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.ao.pruning._experimental.data_sparsifier import DataNormSparsifier as AoSparsifier

import distsparse
from distsparse import DataNormSparsifier
from distsparse.masks import norm_block_mask


def _ao_mask(data, **config):
    ao = AoSparsifier(**config)
    ao.add_data("t", data.clone())
    ao.step()
    return ao.get_mask("t").to(torch.bool)


# -- add_data: tensor subclasses, atomicity ------------------------------------------------

class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("make", [
    lambda: torch.Tensor._make_subclass(_Sub, torch.randn(4, 8)),
    lambda: nn.parameter.UninitializedParameter(),
], ids=["subclass", "uninitialized-parameter"])
def test_a_tensor_subclass_is_a_type_error_naming_the_group_and_nothing_is_registered(make):
    sp = DataNormSparsifier()
    sp.add_data("ok", torch.randn(4, 8))
    with pytest.raises(TypeError, match=r"group 'emb\.weight'.*subclass"):
        sp.add_data("emb.weight", make())
    assert list(sp.data_groups) == ["ok"]
    sp.step()  # still usable


# -- any exception in update_mask ------------------------------------------------------------

class _Raising(DataNormSparsifier):
    def __init__(self, make_error, **kw):
        self.make_error = make_error
        super().__init__(**kw)

    def update_mask(self, name, data, **config):
        if name == "b":
            raise self.make_error()
        return super().update_mask(name, data, **config)


def _json_error():
    try:
        json.loads("{")
    except json.JSONDecodeError as exc:
        return exc


@pytest.mark.parametrize("make_error, kind", [
    (lambda: RuntimeError("out of memory"), RuntimeError),
    (_json_error, ValueError),  # JSONDecodeError's constructor takes (msg, doc, pos)
    (lambda: KeyError("x"), RuntimeError),
    (lambda: ZeroDivisionError("division by zero"), RuntimeError),
])
def test_any_exception_in_update_mask_names_the_group_keeps_the_cause_and_changes_nothing(make_error, kind):
    sp = _Raising(make_error, sparsity_level=0.5)
    for name in ("a", "b", "c"):
        sp.add_data(name, torch.randn(8, 8))
    before = {n: sp.get_mask(n).clone() for n in "abc"}
    with pytest.raises(kind, match="group 'b'") as info:
        sp.step()
    assert info.value.__cause__ is not None
    assert all(torch.equal(before[n], sp.get_mask(n)) for n in "abc")
    assert sp.step_count == 0


# -- inference mode ---------------------------------------------------------------------------

def test_a_batch_added_under_inference_mode_steps_normally_afterwards():
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("emb", nn.Parameter(torch.randn(16, 8)))
    with torch.inference_mode():
        batch = torch.randn(8, 8)
        masked = sp.add_data("val_batch", batch)
        assert masked.shape == batch.shape
    assert not sp.get_mask("val_batch").is_inference()
    sp.step()  # torch's in-place error before the fix, after committing "emb" alone
    assert sp.step_count == 1
    assert torch.equal(sp.get_mask("val_batch"), norm_block_mask(batch, 0.5, (1, 4), 4, "L1"))
    sp.add_data("val_batch", torch.randn(8, 8))  # re-added outside: reuses the mask
    sp.step()


def test_step_under_inference_mode_leaves_masks_usable_outside_it():
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("emb", nn.Parameter(torch.randn(16, 8)))
    with torch.inference_mode():
        sp.step()
    assert not sp.get_mask("emb").is_inference()
    sp.step()
    sp.squash_mask()
    assert sp.step_count == 2


# -- float16 overflow with partial blocks -----------------------------------------------------

@pytest.mark.parametrize("zeros", [1, 2, 3, 4])
def test_float16_squares_that_overflow_are_zeroed_before_the_padding_of_a_partial_block(zeros):
    x = torch.tensor([[300.0, 600.0], [400.0, 500.0]], dtype=torch.float16)
    config = dict(sparsity_level=1.0, sparse_block_shape=(2, 4), zeros_per_block=zeros, norm="L2")
    expected = _ao_mask(x, **config)
    assert torch.equal(norm_block_mask(x, 1.0, (2, 4), zeros, "L2"), expected)
    sp = DataNormSparsifier(**config)
    sp.add_data("t", x)
    sp.step()
    assert torch.equal(sp.get_mask("t"), expected)


def test_float16_overflow_in_a_big_partial_block_takes_the_sort_path_and_matches_torch_ao():
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(7, 11, generator=gen) * 600 + 1).to(torch.float16)  # many squares overflow
    x[x < 250] = torch.arange(1, int((x < 250).sum()) + 1, dtype=torch.float16) / 7  # distinct small ones
    for zeros in (3, 9, 12):
        config = dict(sparsity_level=0.5, sparse_block_shape=(3, 4), zeros_per_block=zeros, norm="L2")
        got = norm_block_mask(x, 0.5, (3, 4), zeros, "L2")
        expected = _ao_mask(x, **config)
        # Among overflowed (tied, inf) elements torch.ao's sort order is unspecified: compare
        # how many real elements each pruned block zeroes, which the padding bug changed.
        assert int((~got).sum()) == int((~expected).sum()), zeros


# -- pending groups ---------------------------------------------------------------------------

def test_a_config_passed_to_add_data_for_a_pending_group_is_applied():
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("batch", torch.randn(4, 8), sparsity_level=0.25)
    state = sp.state_dict()
    fresh = DataNormSparsifier(sparsity_level=0.5)
    fresh.load_state_dict(state)
    fresh.add_data("batch", torch.randn(4, 8), sparsity_level=0.75)
    assert fresh.data_groups["batch"]["sparsity_level"] == 0.75
    other = DataNormSparsifier(sparsity_level=0.5)
    other.load_state_dict(state)
    other.add_data("batch", torch.randn(4, 8))  # no explicit config: the loaded one
    assert other.data_groups["batch"]["sparsity_level"] == 0.25


# -- schedulers validate their values at construction -----------------------------------------

@pytest.mark.parametrize("build, shown", [
    (lambda sp: distsparse.LinearScheduler(sp, final_value=1.5), "final_value=1.5"),
    (lambda sp: distsparse.LinearScheduler(sp, final_value=0.5, initial_value=-0.2), "initial_value=-0.2"),
    (lambda sp: distsparse.CubicScheduler(sp, final_value=2.0), "final_value=2.0"),
    (lambda sp: distsparse.GammaScheduler(sp, gamma=2.0, threshold=1.1), "threshold=1.1"),
])
def test_a_schedule_value_the_sparsifier_would_refuse_is_refused_at_construction(build, shown):
    sp = DataNormSparsifier(sparsity_level=0.0)
    sp.add_data("w", nn.Parameter(torch.randn(8, 8)))
    with pytest.raises(ValueError, match=shown.replace(".", r"\.") + r".*sparsity_level"):
        build(sp)
    assert sp.data_groups["w"]["sparsity_level"] == 0.0


def test_the_error_types_the_readme_names_are_exported():
    assert issubclass(distsparse.RankDisagreementError, RuntimeError)
    assert issubclass(distsparse.RemoteError, RuntimeError)
    assert issubclass(distsparse.CollectiveTimeoutError, RuntimeError)
    assert issubclass(distsparse.CheckpointError, ValueError)


# -- drop-in gaps for torch.ao code -----------------------------------------------------------

class _ScratchSparsifier(distsparse.BaseDataSparsifier):
    """A torch.ao-style subclass: keeps a per-group counter in self.state[name] and reads
    the mask from there, as torch.ao subclasses do."""

    def update_mask(self, name, data, **config):
        self.state[name]["calls"] = self.state[name].get("calls", 0) + 1
        mask = self.state[name]["mask"]
        mask.data = data.abs() > config["threshold"]


def test_a_torch_ao_style_subclass_keeps_scratch_in_state_and_finds_the_mask_there():
    sp = _ScratchSparsifier(threshold=0.5)
    data = torch.tensor([[0.1, 0.9], [0.7, 0.2]])
    sp.add_data("w", data)
    assert sp.state["w"]["mask"] is sp.get_mask("w")
    sp.step()
    sp.step()
    assert sp.state["w"]["calls"] == 2
    assert torch.equal(sp.get_mask("w"), data.abs() > 0.5)


def test_sparsity_reports_the_pruned_fraction_of_each_group():
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("a", torch.randn(8, 8))
    sp.add_data("b", torch.randn(4, 4), sparsity_level=0.25)
    sp.step()
    assert sp.sparsity() == {"a": 0.5, "b": 0.25}
    assert sp.sparsity("b") == {"b": 0.25}
    mask = sp.get_mask("a")
    assert float(1 - mask.float().mean()) == 0.5  # the idiom for torch.ao's `1 - mask.mean()`
    with pytest.raises(ValueError, match="'nope'"):
        sp.sparsity(["nope"])
