"""Atomic checkpoint writes (issue 10 items 5 and 8): symlinks are resolved, live saves of
other threads are never deleted, names near NAME_MAX fail clearly, and a header over
safetensors' limit is refused in distsparse's words."""

from __future__ import annotations

import fcntl
import os
import threading

import pytest
import torch

from _checkpoint_util import build, snapshot
from distsparse import DataNormSparsifier, load_checkpoint, save_checkpoint
from distsparse.checkpoint import (
    _MAX_HEADER,
    _atomic_write,
    _build_file,
    _check_header_limit,
    _create_temp,
    _header_estimate,
    _name_max,
    _rank_payload,
    _temp_pattern,
    _temp_prefix,
)


def test_saving_onto_a_symlink_writes_the_real_file_and_keeps_the_link(tmp_path):
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    real = real_dir / "ckpt.safetensors"
    link = tmp_path / "latest.safetensors"
    link.symlink_to(real)  # dangling until the first save
    sp, sch, _ = build(steps=2)
    save_checkpoint(link, sp, sch)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.is_file() and not real.is_symlink()
    sp.step()
    sch.step()
    save_checkpoint(link, sp, sch)  # an overwrite through the link updates the real file
    assert link.is_symlink()
    fresh, fresh_sch, _ = build(seed=3)
    load_checkpoint(real, fresh, fresh_sch)
    assert snapshot(fresh, fresh_sch) == snapshot(sp, sch)
    assert sorted(os.listdir(real_dir)) == ["ckpt.safetensors"]  # the temp file was beside the real one
    assert sorted(os.listdir(tmp_path)) == ["latest.safetensors", "real"]


def test_a_live_save_of_another_thread_is_never_removed_by_a_concurrent_save(tmp_path):
    target = tmp_path / "c.safetensors"
    # A live save, mid-write: its temp file exists and is locked (same process, same pid).
    fd, temp = _create_temp(tmp_path, _temp_prefix(target.name, _name_max(tmp_path)))
    try:
        os.write(fd, b"partial")
        _atomic_write(target, b"from the other thread")  # cleans up stale temps first
        assert temp.exists(), "a live save's temp file was deleted"
        os.write(fd, b" and the rest")
        os.fsync(fd)
        os.replace(temp, target)  # the live save completes normally
    finally:
        os.close(fd)
    assert target.read_bytes() == b"partial and the rest"


def test_two_threads_saving_one_path_in_a_loop_never_fail(tmp_path):
    path = tmp_path / "shared.safetensors"
    errors: list[BaseException] = []
    sps = [build(seed=s)[0] for s in (0, 1)]

    def loop(sp: DataNormSparsifier) -> None:
        try:
            for _ in range(40):
                save_checkpoint(path, sp)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(sp,)) for sp in sps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a saving thread hung"
    assert not errors, errors
    assert os.listdir(tmp_path) == [path.name]
    load_checkpoint(path, build(seed=5)[0])  # whole


def test_a_temp_file_locked_by_another_open_file_is_kept_and_an_unlocked_one_removed(tmp_path):
    target = tmp_path / "c.safetensors"
    pattern = _temp_pattern(target)
    locked = tmp_path / f".{target.name}.tmp-{os.getpid()}-0000aaaa"
    stale = tmp_path / f".{target.name}.tmp-999999999-0000bbbb"  # another host's pid: judged by its lock
    for p in (locked, stale):
        p.write_bytes(b"x")
        assert pattern.match(p.name)
    fd = os.open(locked, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _atomic_write(target, b"data")
        assert locked.exists() and not stale.exists()
    finally:
        os.close(fd)


def test_target_names_near_name_max_use_a_short_temp_name_and_too_long_names_fail_clearly(tmp_path):
    name_max = _name_max(tmp_path)
    longest = "c" * (name_max - len(".safetensors")) + ".safetensors"
    assert len(longest) == name_max
    sp, sch, _ = build(steps=1)
    save_checkpoint(tmp_path / longest, sp, sch)  # the temp name must not be what fails
    assert os.listdir(tmp_path) == [longest]
    fresh, fresh_sch, _ = build(seed=2)
    load_checkpoint(tmp_path / longest, fresh, fresh_sch)
    assert snapshot(fresh, fresh_sch) == snapshot(sp, sch)
    # Non-ASCII names count in bytes.
    accented = "é" * ((name_max - 3) // 2) + ".st"
    assert len(os.fsencode(accented)) <= name_max
    save_checkpoint(tmp_path / accented, sp, sch)
    assert len(_temp_prefix(accented, name_max).encode()) + 24 <= name_max
    too_long = "d" * (name_max + 1)
    with pytest.raises(OSError, match=f"file name '{too_long}' is {name_max + 1} bytes, longer than this "
                                      f"file system's limit of {name_max} bytes") as info:
        save_checkpoint(tmp_path / too_long, sp, sch)
    assert info.value.errno == 36  # ENAMETOOLONG
    assert sorted(os.listdir(tmp_path)) == sorted([longest, accented])


def test_a_header_over_the_safetensors_limit_is_refused_in_distsparse_words():
    sp, sch, _ = build(steps=1)
    contribution = _rank_payload(sp)
    # A scheduler state holding a huge string stands in for 200,000 groups' JSON entries.
    huge = {"note": "x" * (_MAX_HEADER + 10)}
    with pytest.raises(ValueError, match=r"safetensors header of about [\d,]+ bytes .* over safetensors' limit of "
                                         r"100,000,000 bytes; split the groups over several sparsifiers"):
        _build_file([contribution], sp, huge)


def test_the_header_estimate_matches_what_safetensors_writes_and_the_limit_is_safetensors_own():
    from safetensors import SafetensorError
    from safetensors.torch import save as st_save

    tensors = {f"mask/group.{i}/é": torch.zeros(i % 7 + 1, dtype=torch.uint8) for i in range(300)}
    metadata = {"format": "x", "state": '{"a": "ü"}' * 50}
    blob = st_save(tensors, metadata=metadata)
    written = int.from_bytes(blob[:8], "little")
    estimate = _header_estimate(tensors, metadata)
    assert estimate <= written <= estimate + 8  # safetensors pads the header to 8 bytes
    # Just over the limit: safetensors itself refuses, and so does our check — first.
    over = {"state": "y" * (_MAX_HEADER - 40)}
    with pytest.raises(SafetensorError, match="header too large"):
        st_save({"t": torch.zeros(1, dtype=torch.uint8)}, metadata=over)
    with pytest.raises(ValueError, match="over safetensors' limit"):
        _check_header_limit({"t": torch.zeros(1, dtype=torch.uint8)}, over, what="test file")
