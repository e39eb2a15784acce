"""BaseDataScheduler and the built-in schedules, on one process (DESIGN.md, Scheduler)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

from distsparse import (
    BaseDataScheduler,
    CubicScheduler,
    DataNormSparsifier,
    GammaScheduler,
    LambdaScheduler,
    LinearScheduler,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def sparsifier(**groups):
    """A DataNormSparsifier with groups name -> sparsity_level (data (4, 8))."""
    sp = DataNormSparsifier(sparsity_level=0.5)
    for name, level in groups.items():
        sp.add_data(name, torch.randn(4, 8), sparsity_level=level)
    return sp


def levels(sp):
    return {n: c["sparsity_level"] for n, c in sp.data_groups.items()}


class Recording(BaseDataScheduler):
    """Returns 0.1 * last_epoch for every group and records the epochs it was asked for."""

    def __init__(self, sp, schedule_param="sparsity_level", **kwargs):
        self.seen = []
        super().__init__(sp, schedule_param, **kwargs)

    def get_schedule_param(self):
        self.seen.append(self.last_epoch)
        return {n: min(1.0, 0.1 * self.last_epoch) for n in self.data_sparsifier.data_groups}


# -- base class -----------------------------------------------------------------------------


def test_a_subclass_without_get_schedule_param_fails_at_construction_with_type_error():
    class NoSchedule(BaseDataScheduler):
        pass

    with pytest.raises(TypeError):
        NoSchedule(sparsifier(a=0.5), "sparsity_level")


def test_the_constructor_performs_the_initial_step():
    sp = sparsifier(a=0.5, b=0.7)
    sch = Recording(sp)
    assert sch.last_epoch == 0
    assert sch.seen == [0]
    assert levels(sp) == {"a": 0.0, "b": 0.0}
    assert sch.get_last_param() == {"a": 0.0, "b": 0.0}


def test_step_advances_last_epoch_and_applies_the_returned_values():
    sp = sparsifier(a=0.5)
    sch = Recording(sp)
    for epoch in range(1, 5):
        sp.step()
        sch.step()
        assert sch.last_epoch == epoch
        assert levels(sp) == {"a": pytest.approx(0.1 * epoch)}
        assert sch.get_last_param() == {"a": pytest.approx(0.1 * epoch)}
    assert sch.seen == [0, 1, 2, 3, 4]


def test_scheduled_levels_drive_the_next_sparsifier_step():
    sp = DataNormSparsifier(sparsity_level=0.0)
    sp.add_data("x", torch.randn(8, 8))  # 16 blocks of (1, 4)
    sch = LinearScheduler(sp, final_value=1.0, ramp_steps=4)
    pruned = []
    for _ in range(5):
        sp.step()
        pruned.append(int((~sp.get_mask("x")).sum()) // 4)
        sch.step()
    assert pruned == [0, 4, 8, 12, 16]


def test_base_param_holds_each_groups_value_when_first_scheduled():
    sp = sparsifier(a=0.3)
    sch = Recording(sp)
    assert sch.base_param == {"a": 0.3}


def test_groups_added_after_construction_are_scheduled_and_get_a_base_param():
    sp = DataNormSparsifier(sparsity_level=0.2)
    sch = Recording(sp)
    assert sch.base_param == {}
    sp.add_data("late", torch.randn(4, 8), sparsity_level=0.4)
    sp.step()
    sch.step()
    assert sch.base_param == {"late": 0.4}
    assert levels(sp) == {"late": pytest.approx(0.1)}
    assert sch.get_last_param() == {"late": pytest.approx(0.1)}


def test_a_later_group_base_param_does_not_overwrite_earlier_ones():
    sp = sparsifier(a=0.3)
    sch = Recording(sp)
    sp.add_data("b", torch.randn(4, 8), sparsity_level=0.6)
    sp.step()
    sch.step()
    assert sch.base_param == {"a": 0.3, "b": 0.6}


def test_an_unknown_schedule_param_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="sparsity_levle"):
        Recording(sparsifier(a=0.5), "sparsity_levle")


def test_a_returned_name_that_is_not_a_group_is_a_value_error_and_nothing_is_applied():
    class Typo(BaseDataScheduler):
        def get_schedule_param(self):
            if self.last_epoch == 0:
                return {"a": 0.5}
            return {"a": 0.9, "a_typo": 0.9}

    sp = sparsifier(a=0.5)
    sch = Typo(sp, "sparsity_level")
    sp.step()
    with pytest.raises(ValueError, match="a_typo"):
        sch.step()
    assert set(sp.data_groups) == {"a"}
    assert levels(sp) == {"a": 0.5}
    assert sch.last_epoch == 0
    assert sch.get_last_param() == {"a": 0.5}
    sp.step()  # no phantom group broke the sparsifier


def test_an_invalid_value_is_a_value_error_applying_nothing_and_keeping_last_epoch():
    class Over(BaseDataScheduler):
        def get_schedule_param(self):
            return {"a": 0.2, "b": 0.2 + 0.5 * self.last_epoch}

    sp = sparsifier(a=0.5, b=0.5)
    sch = Over(sp, "sparsity_level")
    sp.step()
    sch.step()
    assert levels(sp) == pytest.approx({"a": 0.2, "b": 0.7})
    sp.step()
    with pytest.raises(ValueError) as info:
        sch.step()  # b -> 1.2
    assert "b" in str(info.value) and "1.2" in str(info.value)
    assert levels(sp) == pytest.approx({"a": 0.2, "b": 0.7})
    assert sch.last_epoch == 1
    assert sch.get_last_param() == pytest.approx({"a": 0.2, "b": 0.7})


def test_a_failing_get_schedule_param_leaves_last_epoch_unchanged():
    class Flaky(BaseDataScheduler):
        fail = False

        def get_schedule_param(self):
            if self.fail:
                raise RuntimeError("boom")
            return {n: 0.5 for n in self.data_sparsifier.data_groups}

    sp = sparsifier(a=0.5)
    sch = Flaky(sp, "sparsity_level")
    sp.step()
    sch.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        sch.step()
    assert sch.last_epoch == 0


def test_a_non_dict_result_is_refused():
    class ReturnsList(BaseDataScheduler):
        def get_schedule_param(self):
            return [0.5]

    with pytest.raises((TypeError, ValueError)):
        ReturnsList(sparsifier(a=0.5), "sparsity_level")


def test_scheduler_step_before_any_sparsifier_step_warns():
    sp = sparsifier(a=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sch = Recording(sp)  # the constructor's own step does not warn
    with pytest.warns(UserWarning, match="sparsifier"):
        sch.step()


def test_scheduler_step_after_sparsifier_step_does_not_warn():
    sp = sparsifier(a=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sch = Recording(sp)
        for _ in range(3):
            sp.step()
            sch.step()


def test_scheduling_another_config_key_works():
    sp = DataNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=4)
    sp.add_data("x", torch.randn(2, 8))

    class Zeros(BaseDataScheduler):
        def get_schedule_param(self):
            return {n: min(4, self.last_epoch) for n in self.data_sparsifier.data_groups}

    sch = Zeros(sp, "zeros_per_block")
    for epoch in range(5):
        assert sp.data_groups["x"]["zeros_per_block"] == epoch
        sp.step()
        assert int((~sp.get_mask("x")).sum()) == 4 * epoch
        sch.step()


# -- state ----------------------------------------------------------------------------------


def test_state_dict_is_explicit_and_json_able():
    sp = sparsifier(a=0.5)
    sch = LambdaScheduler(sp, lambda epoch: 0.5 ** epoch)
    sp.step()
    sch.step()
    sd = sch.state_dict()
    text = json.dumps(sd)
    assert "last_epoch" in sd and sd["last_epoch"] == 1
    assert "base_param" in sd and sd["base_param"] == {"a": 0.5}
    assert not any(callable(v) for v in sd.values())
    assert "data_sparsifier" not in sd and "lambdas" not in sd and "<function" not in text


def test_load_state_dict_round_trips_and_the_schedule_continues_identically():
    sp = sparsifier(a=0.1)
    sch = GammaScheduler(sp, gamma=2.0, threshold=0.8)
    for _ in range(2):
        sp.step()
        sch.step()
    sd = json.loads(json.dumps(sch.state_dict()))
    sp.step()
    sch.step()
    expected = levels(sp)

    sp2 = sparsifier(a=0.5)
    sch2 = GammaScheduler(sp2, gamma=2.0, threshold=0.8)
    sch2.load_state_dict(sd)
    assert sch2.last_epoch == 2
    assert sch2.base_param == {"a": 0.1}
    assert sch2.get_last_param() == pytest.approx({"a": 0.4})
    sp2.step()
    sch2.step()
    assert levels(sp2) == pytest.approx(expected)


@pytest.mark.parametrize("edit", [
    lambda sd: sd.update(last_epoch=-5),
    lambda sd: sd.update(last_epoch="3"),
    lambda sd: sd.update(base_param=[0.1]),
    lambda sd: sd.update(scheduler="SomethingElse"),
    lambda sd: sd.update(schedule_param="zeros_per_block"),
    lambda sd: sd.pop("last_epoch"),
], ids=["negative_epoch", "string_epoch", "list_base", "other_class", "other_param", "missing_key"])
def test_load_state_dict_validates_and_changes_nothing(edit):
    sp = sparsifier(a=0.1)
    sch = GammaScheduler(sp, gamma=2.0, threshold=0.8)
    sp.step()
    sch.step()
    sd = sch.state_dict()
    edit(sd)
    before = json.dumps(sch.state_dict(), sort_keys=True)
    with pytest.raises((ValueError, TypeError)):
        sch.load_state_dict(sd)
    assert json.dumps(sch.state_dict(), sort_keys=True) == before


# -- built-in schedules ---------------------------------------------------------------------


def test_gamma_scheduler_ramps_base_times_gamma_to_the_t_up_to_threshold():
    sp = sparsifier(a=0.1, b=0.05)
    sch = GammaScheduler(sp, gamma=2.0, threshold=0.8)
    seen = [levels(sp)]
    for _ in range(5):
        sp.step()
        sch.step()
        seen.append(levels(sp))
    assert [s["a"] for s in seen] == pytest.approx([0.1, 0.2, 0.4, 0.8, 0.8, 0.8])
    assert [s["b"] for s in seen] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 0.8])


def test_gamma_scheduler_ramps_a_group_added_after_construction_from_its_own_base():
    sp = DataNormSparsifier(sparsity_level=0.1)
    sch = GammaScheduler(sp, gamma=1.5, threshold=0.9)
    sp.add_data("late", torch.randn(4, 8))
    got = []
    for _ in range(4):
        sp.step()
        sch.step()
        got.append(levels(sp)["late"])
    # first seen at epoch 1 with base 0.1: base * gamma ** t
    assert got == pytest.approx([0.1 * 1.5 ** t for t in range(1, 5)])
    assert got[-1] > got[0]


def test_lambda_scheduler_is_base_times_fn_of_t():
    sp = sparsifier(a=0.8, b=0.4)
    sch = LambdaScheduler(sp, lambda t: 1.0 / (t + 1))
    got = [levels(sp)]
    for _ in range(3):
        sp.step()
        sch.step()
        got.append(levels(sp))
    assert [g["a"] for g in got] == pytest.approx([0.8 / (t + 1) for t in range(4)])
    assert [g["b"] for g in got] == pytest.approx([0.4 / (t + 1) for t in range(4)])


def test_lambda_scheduler_with_a_dict_schedules_only_the_named_groups():
    sp = sparsifier(a=0.8, b=0.4)
    sch = LambdaScheduler(sp, {"a": lambda t: 0.5 ** t})
    sp.step()
    sch.step()
    sp.step()
    sch.step()
    assert levels(sp) == pytest.approx({"a": 0.2, "b": 0.4})


def test_linear_scheduler_ramps_linearly_between_start_and_end():
    sp = sparsifier(a=0.5)
    sch = LinearScheduler(sp, final_value=0.9, initial_value=0.1, start_step=3, ramp_steps=8)
    got = [levels(sp)["a"]]
    for _ in range(15):
        sp.step()
        sch.step()
        got.append(levels(sp)["a"])
    expected = [0.1 if t <= 3 else 0.9 if t >= 11 else 0.1 + 0.8 * (t - 3) / 8 for t in range(16)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert got[-1] == 0.9


def zhu_gupta(t, s_i, s_f, t0, n_dt, dt=1):
    """s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3, evaluated at the last update point."""
    if t < t0:
        return s_i
    if t >= t0 + n_dt:
        return s_f
    t_upd = t0 + ((t - t0) // dt) * dt
    return s_f + (s_i - s_f) * (1 - (t_upd - t0) / n_dt) ** 3


def run_schedule(sch, sp, steps):
    got = [levels(sp)["a"]]
    for _ in range(steps):
        sp.step()
        sch.step()
        got.append(levels(sp)["a"])
    return got


def test_cubic_scheduler_follows_the_zhu_and_gupta_formula():
    sp = sparsifier(a=0.5)
    sch = CubicScheduler(sp, final_value=0.9, initial_value=0.1, start_step=5, ramp_steps=20)
    got = run_schedule(sch, sp, 30)
    expected = [zhu_gupta(t, 0.1, 0.9, 5, 20) for t in range(31)]
    assert got == pytest.approx(expected, abs=1e-12)
    # spot checks against hand values: t=10 -> 0.9 - 0.8 * 0.75**3 ; t=15 -> 0.9 - 0.8 * 0.125
    assert got[10] == pytest.approx(0.9 - 0.8 * 0.421875)
    assert got[15] == pytest.approx(0.8)


def test_cubic_scheduler_is_constant_before_start_and_after_the_end():
    sp = sparsifier(a=0.5)
    sch = CubicScheduler(sp, final_value=0.75, initial_value=0.25, start_step=4, ramp_steps=6)
    got = run_schedule(sch, sp, 15)
    assert got[:5] == [0.25] * 5
    assert got[10:] == [0.75] * 6
    assert all(a <= b for a, b in zip(got, got[1:]))  # monotone


def test_cubic_scheduler_changes_only_every_update_every_steps():
    sp = sparsifier(a=0.5)
    sch = CubicScheduler(sp, final_value=0.8, initial_value=0.0, start_step=2, ramp_steps=12, update_every=4)
    got = run_schedule(sch, sp, 18)
    expected = [zhu_gupta(t, 0.0, 0.8, 2, 12, dt=4) for t in range(19)]
    assert got == pytest.approx(expected, abs=1e-12)
    changes = [t for t in range(1, 19) if got[t] != got[t - 1]]
    assert changes == [6, 10, 14]


def test_cubic_scheduler_defaults_start_at_each_groups_current_level():
    # It used to start at 0.0, silently resetting a level of 0.5 (issue 20 item 5).
    sp = sparsifier(a=0.5, b=0.2)
    sch = CubicScheduler(sp, final_value=0.8, ramp_steps=10)
    assert levels(sp) == {"a": 0.5, "b": 0.2}
    got = run_schedule(sch, sp, 10)
    assert got == pytest.approx([zhu_gupta(t, 0.5, 0.8, 0, 10) for t in range(11)], abs=1e-12)
    assert got[-1] == 0.8 and levels(sp)["b"] == 0.8


@pytest.mark.parametrize("make", [lambda sp: LinearScheduler(sp, 0.8), lambda sp: CubicScheduler(sp, 0.8)],
                         ids=["linear", "cubic"])
def test_building_a_ramp_keeps_the_level_and_an_explicit_initial_value_sets_it(make):
    sp = DataNormSparsifier(sparsity_level=0.5)
    sp.add_data("x", torch.randn(4, 8))
    sch = make(sp)
    assert levels(sp) == {"x": 0.5} and sch.base_param == {"x": 0.5}
    del sch
    assert LinearScheduler(sp, final_value=0.8, initial_value=0.0, ramp_steps=4) is not None
    assert levels(sp) == {"x": 0.0}


def test_a_second_scheduler_driving_the_same_parameter_is_refused_naming_the_first():
    sp = sparsifier(a=0.5)
    first = LinearScheduler(sp, final_value=0.8, ramp_steps=4)
    for make in (lambda: CubicScheduler(sp, final_value=0.9), lambda: GammaScheduler(sp, gamma=2.0, threshold=0.9),
                 lambda: Recording(sp)):
        with pytest.raises(ValueError, match=r"'sparsity_level' of this sparsifier is already driven by "
                                             r"LinearScheduler\(schedule_param='sparsity_level'"):
            make()
        assert levels(sp) == {"a": 0.5} and first.last_epoch == 0
    other = sparsifier(a=0.5)
    assert LinearScheduler(other, final_value=0.8) is not None  # another sparsifier: its own parameter
    del first  # gone: the parameter is free again
    second = CubicScheduler(sp, final_value=0.9, ramp_steps=2)
    assert second.base_param == {"a": 0.5}


def test_a_scheduler_that_fails_to_build_does_not_hold_the_parameter():
    sp = sparsifier(a=0.5)
    with pytest.raises(ValueError):
        LambdaScheduler(sp, lambda epoch: 3.0)  # 1.5 at epoch 0: refused by the first step
    assert LinearScheduler(sp, final_value=0.8) is not None


def test_cubic_scheduler_can_decrease():
    sp = sparsifier(a=0.5)
    sch = CubicScheduler(sp, final_value=0.1, initial_value=0.9, ramp_steps=4)
    got = run_schedule(sch, sp, 5)
    assert got == pytest.approx([zhu_gupta(t, 0.9, 0.1, 0, 4) for t in range(6)], abs=1e-12)
    assert got[0] > got[2] > got[4]


@pytest.mark.parametrize("make", [
    lambda sp: GammaScheduler(sp, gamma=0.0, threshold=0.5),
    lambda sp: GammaScheduler(sp, gamma=math.nan, threshold=0.5),
    lambda sp: LinearScheduler(sp, final_value=0.5, ramp_steps=0),
    lambda sp: CubicScheduler(sp, final_value=0.5, update_every=0),
    lambda sp: CubicScheduler(sp, final_value=math.inf),
    lambda sp: LambdaScheduler(sp, 0.5),
], ids=["gamma_zero", "gamma_nan", "linear_no_ramp", "cubic_update_zero", "cubic_inf", "lambda_not_callable"])
def test_built_in_schedulers_refuse_bad_arguments(make):
    sp = sparsifier(a=0.5)
    with pytest.raises((ValueError, TypeError)):
        make(sp)
    assert levels(sp) == {"a": 0.5}


def test_a_built_in_schedule_that_leaves_zero_one_is_refused_at_construction():
    sp = sparsifier(a=0.5)
    with pytest.raises(ValueError, match=r"LinearScheduler: initial_value=1\.2 .*sparsity_level must be in \[0, 1\]"):
        LinearScheduler(sp, final_value=1.5, initial_value=1.2, ramp_steps=2)
    assert levels(sp) == {"a": 0.5}


def test_a_lambda_schedule_that_leaves_zero_one_is_refused_at_the_step_naming_the_group():
    sp = sparsifier(a=0.5)
    sch = LambdaScheduler(sp, lambda epoch: 1.0 + epoch)  # 0.5, then 1.0, then 1.5
    sp.step()
    sch.step()
    with pytest.raises(ValueError, match="'a'.*1.5"):
        sch.step()
    assert levels(sp) == {"a": 1.0}


def test_embedding_groups_are_scheduled_like_tensors():
    sp = DataNormSparsifier(sparsity_level=0.1)
    sp.add_data("emb", nn.Embedding(8, 8))
    sch = LinearScheduler(sp, final_value=0.5, initial_value=0.0, ramp_steps=2)
    sp.step()
    sch.step()
    sp.step()
    assert levels(sp) == {"emb": pytest.approx(0.25)}
    assert int((~sp.get_mask("emb")).sum()) == 4 * round(0.25 * 16)
