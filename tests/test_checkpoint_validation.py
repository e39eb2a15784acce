"""Every JSON field a load trusts is validated before anything commits (issue 20 item 1), and
a checkpoint whose geometry differs from the sparsifier's is refused unless the caller opts in
with ``config="checkpoint"`` (issue 20 item 3). The files here are *well-formed*: their JSON
checksum was recomputed after the edit, so only validation can catch them."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from _checkpoint_util import EMB, LAYER, ODD, build, snapshot
from distsparse import CheckpointError, DataNormSparsifier, load_checkpoint, save_checkpoint


def _tampered(blob: bytes, edit) -> bytes:
    n = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8 : 8 + n])["__metadata__"]
    state = json.loads(meta["state"])
    edit(state)
    meta["state"] = json.dumps(state, sort_keys=True)  # NaN and Infinity pass, as json.loads accepts them
    meta["json_sha256"] = hashlib.sha256(meta["state"].encode()).hexdigest()
    return st_save(dict(st_load(blob)), metadata=meta)


@pytest.fixture
def saved(tmp_path):
    sp, sch, _ = build(steps=3)
    path = tmp_path / "good.safetensors"
    save_checkpoint(path, sp, sch)
    return path.read_bytes()


def _assert_refused_and_unchanged(tmp_path, blob: bytes, pattern: str) -> None:
    sp, sch, _ = build(seed=1, steps=1)
    before = snapshot(sp, sch)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(blob)
    with pytest.raises(CheckpointError, match=pattern) as info:
        load_checkpoint(bad, sp, sch)
    assert str(bad) in str(info.value)
    assert snapshot(sp, sch) == before


def _set(path: list, value):
    def edit(state):
        node = state
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize("field", ["base_param", "last_param"])
@pytest.mark.parametrize("value", ["x", math.nan, math.inf, -math.inf, None, True, [0.5], 1.5])
def test_a_scheduler_value_that_is_not_a_finite_valid_number_is_refused_naming_it(tmp_path, saved, field, value):
    pattern = rf"{field}\['{EMB}'\]"
    _assert_refused_and_unchanged(tmp_path, _tampered(saved, _set(["scheduler", field, EMB], value)), pattern)


def test_scheduler_values_for_groups_the_checkpoint_does_not_hold_are_refused(tmp_path, saved):
    def edit(state):
        state["scheduler"]["base_param"]["ghost"] = 0.5
        state["scheduler"]["last_param"]["ghost"] = 0.5

    _assert_refused_and_unchanged(tmp_path, _tampered(saved, edit), r"\['ghost'\].*does not hold")


def test_a_last_param_group_without_a_base_value_is_refused(tmp_path, saved):
    def edit(state):
        del state["scheduler"]["base_param"][EMB]

    _assert_refused_and_unchanged(tmp_path, _tampered(saved, edit), rf"last_param has groups \['{EMB}'\]")


@pytest.mark.parametrize("value", [-1, "3", True, 2.5, None])
def test_a_step_count_that_is_not_a_count_is_refused(tmp_path, saved, value):
    _assert_refused_and_unchanged(tmp_path, _tampered(saved, _set(["sparsifier", "step_count"], value)),
                                  "step_count")


@pytest.mark.parametrize("key, value, pattern", [
    ("sparsity_level", math.nan, "sparsity_level"),
    ("sparsity_level", "0.5", "sparsity_level"),
    ("sparse_block_shape", [0, 4], "sparse_block_shape"),
    ("sparse_block_shape", "14", "sparse_block_shape"),
    ("zeros_per_block", 99, "zeros_per_block"),
])
def test_a_group_config_value_out_of_range_is_refused_naming_group_and_field(tmp_path, saved, key, value, pattern):
    _assert_refused_and_unchanged(tmp_path, _tampered(saved, _set(["groups", EMB, "config", key], value)),
                                  rf"{EMB}.*{pattern}|{pattern}.*{EMB}")


@pytest.mark.parametrize("value", [[40.0, 12], [40, True], "40x12", [-40, 12]])
def test_a_group_shape_that_is_not_a_list_of_counts_is_refused(tmp_path, saved, value):
    _assert_refused_and_unchanged(tmp_path, _tampered(saved, _set(["groups", EMB, "shape"], value)), "shape")


@pytest.mark.parametrize("value", [{"sparsity_level": "high"}, [], None])
def test_malformed_defaults_are_refused(tmp_path, saved, value):
    _assert_refused_and_unchanged(tmp_path, _tampered(saved, _set(["sparsifier", "defaults"], value)),
                                  "defaults|sparsity_level")


# -- geometry: the sparsifier's unless the caller opts in ------------------------------------


def _two_geometries(tmp_path):
    sp, sch, data = build(steps=2)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, sp, sch)
    other = DataNormSparsifier(sparsity_level=0.1, sparse_block_shape=(1, 4))
    other.add_data(EMB, data[EMB], sparse_block_shape=(2, 2))
    other.add_data(LAYER, data[LAYER])
    other.add_data(ODD, data[ODD], sparse_block_shape=(2, 2), zeros_per_block=3)
    return path, sp, other


def test_a_checkpoint_with_another_block_shape_is_refused_naming_group_field_and_both_values(tmp_path):
    path, _, other = _two_geometries(tmp_path)
    before = snapshot(other)
    with pytest.raises(CheckpointError, match=rf"group '{EMB}': the state has sparse_block_shape=\[1, 4\] but this "
                                              r"sparsifier has sparse_block_shape=\[2, 2\].*config=\"checkpoint\""):
        load_checkpoint(path, other, strict=False)
    assert snapshot(other) == before


def test_config_checkpoint_adopts_the_saved_geometry_and_levels(tmp_path):
    path, sp, other = _two_geometries(tmp_path)
    load_checkpoint(path, other, strict=False, config="checkpoint")
    assert other.data_groups[EMB] == sp.data_groups[EMB]
    assert tuple(other.data_groups[EMB]["sparse_block_shape"]) == (1, 4)
    assert snapshot(other)["masks"][EMB] == snapshot(sp)["masks"][EMB]


def test_the_scheduled_level_always_comes_from_the_checkpoint(tmp_path):
    sp, sch, data = build(steps=2)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, sp)
    fresh, _, _ = build(seed=4, steps=0, scheduler=False)
    fresh.data_groups[EMB]["sparsity_level"] = 0.77
    load_checkpoint(path, fresh)
    assert fresh.data_groups[EMB]["sparsity_level"] == sp.data_groups[EMB]["sparsity_level"] != 0.77


def test_zeros_per_block_and_default_geometry_differences_are_refused_too(tmp_path):
    sp, _, data = build(steps=1)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, sp)
    other = DataNormSparsifier(sparsity_level=0.2, sparse_block_shape=(1, 4))
    other.add_data(ODD, data[ODD], sparse_block_shape=(2, 2), zeros_per_block=2)
    with pytest.raises(CheckpointError, match=rf"'{ODD}'.*zeros_per_block=3.*zeros_per_block=2"):
        load_checkpoint(path, other, strict=False)
    empty = DataNormSparsifier(sparsity_level=0.2, sparse_block_shape=(4, 1))
    with pytest.raises(CheckpointError, match=r"the defaults: the state has sparse_block_shape=\[1, 4\]"):
        load_checkpoint(path, empty, strict=False)
    load_checkpoint(path, empty, strict=False, config="checkpoint")
    assert tuple(empty.defaults["sparse_block_shape"]) == (1, 4)


def test_load_state_dict_takes_the_same_keyword_and_refuses_unknown_values(tmp_path):
    path, sp, other = _two_geometries(tmp_path)
    state = sp.state_dict()
    with pytest.raises(ValueError, match="sparse_block_shape"):
        other.load_state_dict(state, strict=False)
    other.load_state_dict(state, strict=False, config="checkpoint")
    assert tuple(other.data_groups[EMB]["sparse_block_shape"]) == (1, 4)
    with pytest.raises(ValueError, match=r"config must be one of \('sparsifier', 'checkpoint'\)"):
        other.load_state_dict(state, config="file")
    with pytest.raises(ValueError, match="config must be one of"):
        load_checkpoint(path, other, config="mine")


def test_a_scheduler_state_dict_with_a_nan_is_refused_by_the_scheduler_itself():
    sp, sch, _ = build(steps=1)
    state = sch.state_dict()
    state["base_param"][EMB] = math.nan
    with pytest.raises(ValueError, match=rf"base_param\['{EMB}'\] must be a finite real number, got nan"):
        sch.load_state_dict(state)
