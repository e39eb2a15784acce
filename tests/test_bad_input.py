"""Bad input gets a clear exception naming the group and the value, and changes nothing
(DESIGN.md, "Bad input")."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distsparse import BaseDataScheduler, DataNormSparsifier

pytestmark = pytest.mark.usefixtures("one_thread")


def state_of(sp):
    """Masks, configs and data of every group, copied (to check that nothing changed)."""
    return {
        name: (sp.get_mask(name).clone(), dict(sp.data_groups[name]), sp.get_data(name).data_ptr(),
               sp.get_data(name).detach().clone())
        for name in sp.data_groups
    }


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    for name in before:
        m0, c0, p0, d0 = before[name]
        m1, c1, p1, d1 = after[name]
        assert torch.equal(m0, m1), f"mask of {name!r} changed"
        assert c0 == c1, f"config of {name!r} changed: {c0} -> {c1}"
        assert p0 == p1, f"data of {name!r} replaced"
        assert torch.equal(d0, d1), f"data of {name!r} changed"


def ready():
    """A sparsifier with one stepped group 'keep' (its mask prunes half)."""
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("keep", torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))
    sp.step()
    assert not bool(sp.get_mask("keep").all())
    return sp


# -- data types -----------------------------------------------------------------------------


@pytest.mark.parametrize("data,shown", [
    (torch.arange(12).reshape(3, 4), "int64"),
    (torch.ones(3, 4, dtype=torch.int32), "int32"),
    (torch.ones(3, 4, dtype=torch.bool), "bool"),
    (torch.ones(3, 4, dtype=torch.complex64), "complex64"),
    (torch.ones(3, 4, dtype=torch.uint8), "uint8"),
])
def test_non_floating_tensors_are_a_type_error_naming_group_and_dtype(data, shown):
    sp = ready()
    before = state_of(sp)
    with pytest.raises(TypeError) as info:
        sp.add_data("bad_dtype", data)
    assert "bad_dtype" in str(info.value) and shown in str(info.value)
    assert_same_state(before, state_of(sp))


@pytest.mark.parametrize("data,shown", [
    ([[1.0, 2.0]], "list"),
    (None, "NoneType"),
    (nn.Linear(4, 4), "Linear"),
    ("text", "str"),
])
def test_unsupported_objects_are_a_type_error_naming_group_and_type(data, shown):
    sp = ready()
    before = state_of(sp)
    with pytest.raises(TypeError) as info:
        sp.add_data("bad_obj", data)
    assert "bad_obj" in str(info.value) and shown in str(info.value)
    assert_same_state(before, state_of(sp))


def test_zero_dimensional_data_is_a_value_error_naming_the_group():
    sp = ready()
    before = state_of(sp)
    with pytest.raises(ValueError, match="scalar_group"):
        sp.add_data("scalar_group", torch.tensor(3.0))
    assert_same_state(before, state_of(sp))


def test_a_bad_dtype_readded_under_an_existing_name_leaves_that_group_untouched():
    sp = ready()
    before = state_of(sp)
    with pytest.raises(TypeError, match="keep"):
        sp.add_data("keep", torch.ones(4, 8, dtype=torch.int64))
    assert_same_state(before, state_of(sp))


# -- sparsity_level -------------------------------------------------------------------------

BAD_LEVELS = [(-0.1, "-0.1"), (1.5, "1.5"), (float("nan"), "nan"), (float("inf"), "inf"), (-1.0, "-1.0")]


@pytest.mark.parametrize("level,shown", BAD_LEVELS)
def test_sparsity_level_outside_zero_one_at_construction_is_a_value_error_naming_the_value(level, shown):
    with pytest.raises(ValueError) as info:
        DataNormSparsifier(sparsity_level=level)
    assert shown in str(info.value)


@pytest.mark.parametrize("level,shown", BAD_LEVELS)
def test_sparsity_level_outside_zero_one_at_add_data_is_a_value_error_naming_group_and_value(level, shown):
    sp = ready()
    before = state_of(sp)
    with pytest.raises(ValueError) as info:
        sp.add_data("new_group", torch.randn(4, 8), sparsity_level=level)
    assert "new_group" in str(info.value) and shown in str(info.value)
    assert_same_state(before, state_of(sp))
    with pytest.raises(ValueError) as info:
        sp.add_data("keep", torch.randn(4, 8), sparsity_level=level)
    assert "keep" in str(info.value) and shown in str(info.value)
    assert_same_state(before, state_of(sp))


@pytest.mark.parametrize("level,shown", BAD_LEVELS)
def test_sparsity_level_outside_zero_one_from_a_scheduler_is_a_value_error_and_applies_nothing(level, shown):
    class Bad(BaseDataScheduler):
        def get_schedule_param(self):
            if self.last_epoch == 0:
                return {n: 0.25 for n in self.data_sparsifier.data_groups}
            return {n: (level if n == "victim" else 0.75) for n in self.data_sparsifier.data_groups}

    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("other", torch.randn(4, 8))
    sp.add_data("victim", torch.randn(4, 8))
    sch = Bad(sp, "sparsity_level")
    sp.step()
    before = state_of(sp)
    with pytest.raises(ValueError) as info:
        sch.step()
    assert "victim" in str(info.value) and shown in str(info.value)
    assert_same_state(before, state_of(sp))  # "other" did not get 0.75 either
    assert sch.last_epoch == 0
    assert sch.get_last_param() == {"other": 0.25, "victim": 0.25}


def test_sparsity_level_of_the_wrong_type_is_refused():
    with pytest.raises((TypeError, ValueError)) as info:
        DataNormSparsifier(sparsity_level="0.5")
    assert "0.5" in str(info.value)


# -- block shape / zeros_per_block / norm / config keys -------------------------------------


@pytest.mark.parametrize("block", [(0, 4), (1, 0), (-1, 4), (2, -3)])
def test_non_positive_block_sizes_are_a_value_error_naming_group_and_value(block):
    with pytest.raises(ValueError) as info:
        DataNormSparsifier(sparse_block_shape=block)
    assert str(block) in str(info.value).replace("[", "(").replace("]", ")")
    sp = ready()
    before = state_of(sp)
    with pytest.raises(ValueError) as info:
        sp.add_data("blocky", torch.randn(4, 8), sparse_block_shape=block)
    assert "blocky" in str(info.value) and str(block) in str(info.value).replace("[", "(").replace("]", ")")
    assert_same_state(before, state_of(sp))


@pytest.mark.parametrize("block,zeros", [((1, 4), 5), ((2, 2), 9), ((1, 1), 2)])
def test_zeros_per_block_larger_than_the_block_is_a_value_error_naming_group_and_value(block, zeros):
    with pytest.raises(ValueError) as info:
        DataNormSparsifier(sparse_block_shape=block, zeros_per_block=zeros)
    assert str(zeros) in str(info.value)
    sp = ready()
    before = state_of(sp)
    with pytest.raises(ValueError) as info:
        sp.add_data("zeroes", torch.randn(4, 8), sparse_block_shape=block, zeros_per_block=zeros)
    assert "zeroes" in str(info.value) and str(zeros) in str(info.value)
    assert_same_state(before, state_of(sp))


def test_negative_zeros_per_block_is_a_value_error():
    with pytest.raises(ValueError, match="-1"):
        DataNormSparsifier(zeros_per_block=-1)


def test_zeros_per_block_checked_against_the_groups_own_block_shape():
    sp = DataNormSparsifier(sparse_block_shape=(4, 4), zeros_per_block=10)
    with pytest.raises(ValueError, match="small_block"):
        sp.add_data("small_block", torch.randn(4, 8), sparse_block_shape=(1, 4))


def test_an_unknown_config_key_is_a_value_error_naming_group_and_key():
    sp = ready()
    before = state_of(sp)
    with pytest.raises(ValueError) as info:
        sp.add_data("typo", torch.randn(4, 8), sparsity_levle=0.3)
    assert "typo" in str(info.value) and "sparsity_levle" in str(info.value)
    assert_same_state(before, state_of(sp))


def test_an_unknown_config_key_at_construction_is_refused():
    with pytest.raises(TypeError):
        DataNormSparsifier(sparsity_levle=0.3)


@pytest.mark.parametrize("norm", ["L3", "l1", "Linf", None])
def test_a_norm_other_than_l1_or_l2_is_a_value_error_naming_the_value(norm):
    with pytest.raises(ValueError) as info:
        DataNormSparsifier(norm=norm)
    assert repr(norm) in str(info.value) or str(norm) in str(info.value)


# -- NaN / Inf at step() --------------------------------------------------------------------


@pytest.mark.parametrize("value,shown", [(float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf")])
def test_non_finite_data_at_step_is_a_value_error_naming_group_and_value_and_no_mask_changes(value, shown):
    sp = DataNormSparsifier(sparsity_level=0.5)
    good = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    bad = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    sp.add_data("a_good", good)
    sp.add_data("bad_batch", bad)
    sp.add_data("z_good", good.clone())
    sp.step()
    before = state_of(sp)
    assert not bool(before["a_good"][0].all())
    # new data for every group, then one gets a non-finite value: no mask may move
    sp.add_data("a_good", torch.randn(4, 8))
    sp.add_data("z_good", torch.randn(4, 8))
    sp.add_data("bad_batch", bad, sparsity_level=0.25)
    bad[1, 2] = value
    masks = {n: sp.get_mask(n).clone() for n in sp.data_groups}
    with pytest.raises(ValueError) as info:
        sp.step()
    for n in sp.data_groups:
        assert torch.equal(sp.get_mask(n), masks[n]), f"mask of {n!r} changed by a failed step"
        assert torch.equal(sp.get_mask(n), before[n][0])
    message = str(info.value)
    assert shown in message.lower(), message
    assert "bad_batch" in message, message


def test_non_finite_data_is_an_error_even_at_level_zero():
    sp = DataNormSparsifier(sparsity_level=0.0)
    sp.add_data("zero_level", torch.tensor([[1.0, float("nan"), 2.0, 3.0]]))
    with pytest.raises(ValueError, match="zero_level"):
        sp.step()


def test_step_works_again_once_the_data_is_finite():
    sp = DataNormSparsifier(sparsity_level=0.5)
    data = torch.randn(4, 8)
    data[0, 0] = float("nan")
    sp.add_data("x", data)
    with pytest.raises(ValueError):
        sp.step()
    data[0, 0] = 1.0
    sp.step()
    assert int((~sp.get_mask("x")).sum()) == 16


# -- unknown names --------------------------------------------------------------------------


@pytest.mark.parametrize("call", [
    lambda sp: sp.get_mask("missing"),
    lambda sp: sp.get_data("missing"),
    lambda sp: sp.get_data("missing", return_original=False),
    lambda sp: sp.squash_mask(names=["missing"]),
    lambda sp: sp.squash_mask(names=["keep", "missing"]),
], ids=["get_mask", "get_data", "get_data_masked", "squash_mask", "squash_mask_partly_known"])
def test_unknown_names_are_a_value_error_naming_the_name_and_change_nothing(call):
    sp = ready()
    before = state_of(sp)
    with pytest.raises(ValueError, match="missing"):
        call(sp)
    assert_same_state(before, state_of(sp))


def test_an_empty_group_name_is_refused():
    sp = DataNormSparsifier()
    with pytest.raises((ValueError, TypeError)):
        sp.add_data("", torch.randn(4, 4))


# -- hand-edited configs --------------------------------------------------------------------


def test_a_hand_edited_invalid_config_is_caught_at_step_naming_the_group():
    sp = ready()
    masks = sp.get_mask("keep").clone()
    sp.data_groups["keep"]["sparsity_level"] = 2.0
    with pytest.raises(ValueError) as info:
        sp.step()
    assert "keep" in str(info.value) and "2.0" in str(info.value)
    assert torch.equal(sp.get_mask("keep"), masks)


def test_level_nan_message_is_readable():
    with pytest.raises(ValueError) as info:
        DataNormSparsifier(sparsity_level=math.nan)
    assert "sparsity_level" in str(info.value)
