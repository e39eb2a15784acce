"""Damaged, foreign and mismatching files are refused with a clear error and change nothing;
a save killed with SIGKILL at any moment leaves the previous checkpoint whole."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import selectors
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from _checkpoint_util import BATCH, EMB, ODD, build, snapshot
from distsparse import CheckpointError, DataNormSparsifier, load_checkpoint, save_checkpoint
from distsparse.masks import norm_block_mask

REPO = Path(__file__).resolve().parents[1]


def _header_size(blob: bytes) -> int:
    return int.from_bytes(blob[:8], "little")


def _rewrite(blob: bytes, edit_state=None, edit_tensors=None, edit_meta=None, fix_checksums=True) -> bytes:
    """A *well-formed* file with edited content (checksums recomputed), to reach the checks
    behind the checksums."""
    n = _header_size(blob)
    meta = json.loads(blob[8 : 8 + n])["__metadata__"]
    tensors = dict(st_load(blob))
    state = json.loads(meta["state"])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_state:
        edit_state(state)
    if fix_checksums:
        state["checksums"] = {k: hashlib.sha256(t.numpy().tobytes()).hexdigest() for k, t in tensors.items()}
    meta["state"] = json.dumps(state, sort_keys=True)
    meta["json_sha256"] = hashlib.sha256(meta["state"].encode()).hexdigest()
    if edit_meta:
        edit_meta(meta)
    return st_save(tensors, metadata=meta)


def _variants(blob: bytes) -> list[tuple[str, bytes, str]]:
    """(description, file bytes, regex the error must match)."""
    n = _header_size(blob)
    size = len(blob)
    out: list[tuple[str, bytes, str]] = [("empty file", b"", "empty")]
    for cut in sorted({1, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, (8 + n + size) // 2, size - 1}):
        out.append((f"truncated to {cut} bytes", blob[:cut], "truncated|too short|header"))
    for claimed in (2**63, 2**40, size, size - 7, n + 1, n - 1, 0):
        out.append((f"header length {claimed}", claimed.to_bytes(8, "little") + blob[8:], "header|JSON|data bytes"))
    out.append(("garbage header JSON", blob[:8] + b"x" * n + blob[8 + n :], "not valid JSON"))
    out.append(("header is a JSON list", blob[:8] + b"[" + b" " * (n - 2) + b"]" + blob[8 + n :], "JSON object"))
    # Every byte of the length field and the header, with three different bit flips each.
    for pos in range(8 + n):
        for bit in (0, 5, 7):
            damaged = bytearray(blob)
            damaged[pos] ^= 1 << bit
            out.append((f"header byte {pos} bit {bit} flipped", bytes(damaged), ""))
    # Every byte of the data (masks): only the checksums can notice.
    for pos in range(8 + n, size):
        damaged = bytearray(blob)
        damaged[pos] ^= 1 << (pos % 8)
        out.append((f"data byte {pos} flipped", bytes(damaged), "checksum"))
    for tail in (b"\x00", b"junk", blob[8 + n :]):
        out.append((f"{len(tail)} trailing bytes", blob + tail, "trailing"))
    out.append(("format_version 3", _rewrite(blob, edit_meta=lambda m: m.update(format_version="3")),
                "format_version '3' is not supported"))
    out.append(("no format_version", _rewrite(blob, edit_meta=lambda m: m.pop("format_version")),
                "format_version None"))
    out.append(("JSON state edited, stale json_sha256",
                _rewrite(blob, edit_meta=lambda m: m.update(state=m["state"].replace("0.", "1.", 1))),
                "does not match its checksum"))
    out.append(("checksum list edited", _rewrite(blob, fix_checksums=False,
                                                  edit_state=lambda s: s["checksums"].update(
                                                      {k: "0" * 64 for k in s["checksums"]})),
                "sha256 checksum"))

    def shrink(tensors):
        tensors[f"mask/{EMB}"] = tensors[f"mask/{EMB}"][:-1].clone()

    out.append(("packed mask one byte short", _rewrite(blob, edit_tensors=shrink), "model.emb.weight.*needs 60"))

    def as_float(tensors):
        tensors[f"mask/{EMB}"] = tensors[f"mask/{EMB}"].float()

    out.append(("packed mask stored as float32", _rewrite(blob, edit_tensors=as_float), "F32"))

    def as_2d(tensors):
        tensors[f"mask/{EMB}"] = tensors[f"mask/{EMB}"].reshape(6, 10)

    out.append(("packed mask stored 2-D", _rewrite(blob, edit_tensors=as_2d), "1-D uint8"))

    def drop(tensors):
        del tensors[f"mask/{EMB}"]

    out.append(("replicated mask missing", _rewrite(blob, edit_tensors=drop), "mask tensor .* is missing"))

    def extra(tensors):
        tensors["mask/stowaway"] = torch.zeros(3, dtype=torch.uint8)

    out.append(("tensor of no group", _rewrite(blob, edit_tensors=extra), "belong to no group"))

    def padding(tensors):
        t = tensors[f"mask/{ODD}"].clone()
        t[-1] |= 1
        tensors[f"mask/{ODD}"] = t

    out.append(("nonzero padding bits", _rewrite(blob, edit_tensors=padding), "padding bits"))

    def other_shape(state):
        state["groups"][EMB]["shape"] = [60, 8]  # same number of elements, another shape

    out.append(("group saved with another shape", _rewrite(blob, edit_state=other_shape),
                r"model\.emb\.weight.*shape"))

    def unknown_group(state):
        state["groups"]["layers/0.weight"]["shape"] = [8, 16]

    out.append(("same name, transposed shape", _rewrite(blob, edit_state=unknown_group), "layers/0.weight"))

    def bad_level(state):
        state["groups"][EMB]["config"]["sparsity_level"] = 2.0

    out.append(("config out of range", _rewrite(blob, edit_state=bad_level), "sparsity_level must be in"))

    def bad_scope(state):
        state["groups"][EMB]["scope"] = "sharded"

    out.append(("unknown scope", _rewrite(blob, edit_state=bad_scope), "scope"))

    def replicated_as_local(state):
        entry = state["groups"][BATCH]
        entry["scope"], entry["shape"] = "replicated", entry.pop("shapes")[0]

    out.append(("local group saved as replicated", _rewrite(blob, edit_state=replicated_as_local),
                "mask tensor .* is missing|belong to no group"))

    def bad_world(state):
        state["world_size"] = 0

    out.append(("world size 0", _rewrite(blob, edit_state=bad_world), "world_size"))

    def other_class(state):
        state["sparsifier"]["class"] = "WeightNormSparsifier"

    out.append(("another sparsifier class", _rewrite(blob, edit_state=other_class), "WeightNormSparsifier"))

    def bad_epoch(state):
        state["scheduler"]["last_epoch"] = -5

    out.append(("scheduler state invalid", _rewrite(blob, edit_state=bad_epoch), "last_epoch"))

    def no_scheduler_keys(state):
        state["scheduler"] = {"last_epoch": 3}

    out.append(("scheduler state incomplete", _rewrite(blob, edit_state=no_scheduler_keys), "missing"))

    def state_not_object(meta):
        meta["state"] = "[1, 2]"
        meta["json_sha256"] = hashlib.sha256(b"[1, 2]").hexdigest()

    out.append(("state JSON is a list", _rewrite(blob, edit_meta=state_not_object), "not a JSON object"))
    out.append(("plain safetensors from another program",
                st_save({f"mask/{EMB}": torch.zeros(60, dtype=torch.uint8)}), "not a distsparse checkpoint"))
    out.append(("safetensors with foreign metadata",
                st_save({"weight": torch.zeros(4)}, metadata={"format": "pt"}), "not a distsparse checkpoint"))
    out.append(("a text file", b"hello, I am not a checkpoint\n", "header"))
    return out


def _fingerprint(sp, sch) -> tuple:
    """Cheap: which mask objects the groups hold, configs, counters, scheduler state."""
    return (tuple((n, id(g.mask)) for n, g in sorted(sp._groups.items())),
            tuple((n, id(p)) for n, p in sorted(sp._pending.items())),
            repr(sp.data_groups), repr(sp.defaults), sp.step_count, repr(sch.state_dict()))


def test_every_damaged_or_foreign_file_is_refused_with_a_clear_error_and_changes_nothing(tmp_path):
    sp, sch, _ = build(steps=3)
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, sp, sch)
    blob = good.read_bytes()
    target, target_sch, _ = build(seed=9, steps=2)
    before = snapshot(target, target_sch)
    variants = _variants(blob)
    accepted, unclear = [], []
    cheap_before = _fingerprint(target, target_sch)
    for i, (description, data, pattern) in enumerate(variants):
        bad = tmp_path / f"bad-{i}.safetensors"  # a new file each time: truncating is slow on ext4
        bad.write_bytes(data)
        try:
            load_checkpoint(bad, target, target_sch)
        except CheckpointError as exc:
            message = str(exc)
            if str(bad) not in message or (pattern and not re.search(pattern, message)):
                unclear.append(f"{description}: {message}")
        else:
            accepted.append(description)
        bad.unlink()
        # Nothing changed, whatever happened (object identity catches any replacement;
        # every 50th variant and the named ones also compare every bit).
        assert _fingerprint(target, target_sch) == cheap_before, description
        if i % 50 == 0 or not description.startswith(("header byte", "data byte")):
            assert snapshot(target, target_sch) == before, description
    assert not accepted, f"accepted damaged files: {accepted[:10]}"
    assert not unclear, "unclear errors:\n" + "\n".join(unclear[:10])
    # The matrix is large: every header byte x 3 bits, every data byte, and the named cases.
    assert len(variants) > 3 * _header_size(blob) + 40
    print(f"{len(variants)} damaged/foreign variants rejected")
    # And the good file still loads into the very same objects.
    load_checkpoint(good, target, target_sch)
    assert snapshot(target, target_sch) == snapshot(sp, sch)


def test_a_missing_file_and_a_folder_are_refused(tmp_path):
    sp, sch, _ = build(steps=1)
    before = snapshot(sp, sch)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.safetensors", sp, sch)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path, sp, sch)
    assert snapshot(sp, sch) == before


def test_plain_safetensors_save_file_output_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"weight": torch.randn(3, 4)}, str(path))
    sp, sch, _ = build()
    with pytest.raises(CheckpointError, match="not a distsparse checkpoint"):
        load_checkpoint(path, sp, sch)


# ----------------------------------------------------------------------------------------
# SIGKILL during saves
# ----------------------------------------------------------------------------------------

_ROWS, _COLS = 1024, 256


def _level(version: int) -> float:
    return ((version * 37) % 100) / 100


def _table() -> torch.Tensor:
    return torch.randn(_ROWS, _COLS, generator=torch.Generator().manual_seed(1234))


# A fork server: imports torch once, then forks a writer on demand that saves versions
# start, start+1, ... forever (until the test SIGKILLs it), and reaps it when asked.
#
# The protocol is built so that no line can be lost and no wait can last forever (issue 9):
# * commands are read with os.read on fd 0 (no buffered reader whose state a fork copies),
#   and every reply is one os.write of one whole line (atomic on a pipe), never print();
# * the writer child gets /dev/null as stdin (it can never take a command meant for the
#   zygote) and reports *every* way it ends: "saved <version>" lines, then "error <pid> ..."
#   with the traceback on stderr if anything raises — before, an exception in the child was
#   swallowed by os._exit(1), no "saved" line ever came and the test blocked in readline
#   while the zygote blocked reading its next command;
# * the zygote dumps its stack (and the child's) to stderr on SIGUSR1, and the test reads
#   every line with a deadline, sending SIGUSR1 and quoting stderr when one passes.
_ZYGOTE = textwrap.dedent(
    """
    import faulthandler, os, signal, sys, traceback
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[2])
    from test_checkpoint_faults import _level, _table
    from distsparse import DataNormSparsifier, save_checkpoint
    path = sys.argv[1]
    table = torch.nn.Parameter(_table())

    def say(*words):
        os.write(1, (" ".join(str(w) for w in words) + "\\n").encode())

    def writer(version):
        try:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            sp = DataNormSparsifier(sparse_block_shape=(1, 4))
            sp.add_data("table.weight", table)
            while True:
                sp.data_groups["table.weight"]["sparsity_level"] = _level(version)
                sp.step()
                sp.step_count = version
                save_checkpoint(path, sp)
                say("saved", version)
                version += 1
        except BaseException as exc:
            traceback.print_exc()
            sys.stderr.flush()
            say("error", os.getpid(), repr(exc).replace("\\n", " "))
        finally:
            os._exit(1)

    pending = b""
    while True:
        chunk = os.read(0, 4096)
        if not chunk:
            break
        pending += chunk
        while b"\\n" in pending:
            line, pending = pending.split(b"\\n", 1)
            cmd, arg = line.decode().split()
            if cmd == "go":
                pid = os.fork()
                if pid == 0:
                    writer(int(arg))
                say("pid", pid)
            elif cmd == "reap":
                _, status = os.waitpid(int(arg), 0)
                say("status", status)
    """
)

_LINE_DEADLINE = 60.0  # seconds for any one reply; a save takes ~50 ms, even loaded < 5 s


class _Zygote:
    """The fork server, read line by line with a deadline on every read."""

    def __init__(self, path: Path, stderr_path: Path) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE, str(path), str(Path(__file__).parent)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env,
                                         start_new_session=True)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        self.buffer = b""
        self.child: int | None = None

    def send(self, line: str) -> None:
        os.write(self.proc.stdin.fileno(), f"{line}\n".encode())

    def _fail(self, why: str) -> None:
        for pid in (self.proc.pid, self.child):
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR1)  # faulthandler: stacks to the stderr file
        time.sleep(1.0)
        stderr = self.stderr_path.read_text(errors="replace")[-6000:]
        raise AssertionError(f"{why}\n--- zygote/writer stderr ---\n{stderr}")

    def expect(self, tag: str, timeout: float = _LINE_DEADLINE) -> str:
        """The value of the next line ``<tag> <value>`` (skipping stale progress lines);
        fails with both processes' stacks when none comes within ``timeout`` seconds or
        the writer reports an error."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\n", 1)
                key, _, value = raw.decode().strip().partition(" ")
                if key == "error":
                    self._fail(f"the writer process raised while the test waited for {tag!r}: {value}")
                if key == tag:
                    return value
            left = deadline - time.monotonic()
            if left <= 0 or not self.selector.select(timeout=left):
                self._fail(f"no {tag!r} line within {timeout:g} s (writer pid {self.child})")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                self._fail(f"the zygote process ended (exit code {self.proc.poll()}) while waiting for {tag!r}")
            self.buffer += chunk

    def close(self) -> None:
        self.selector.close()
        self.proc.kill()
        self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()


@pytest.mark.timeout(1200)  # above the loop's own 900 s hang deadline
def test_a_save_killed_at_random_moments_always_leaves_a_whole_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    path = folder / "ckpt.safetensors"
    table = torch.nn.Parameter(_table())
    expected: dict[int, torch.Tensor] = {}

    def expected_mask(version: int) -> torch.Tensor:
        if version not in expected:
            expected[version] = norm_block_mask(table.detach(), _level(version), (1, 4), 4, "L1")
        return expected[version]

    zygote = _Zygote(path, tmp_path / "zygote.stderr")
    rng = random.Random(20261125)
    kills, interrupted, versions_seen = 0, 0, []
    # Run until the counts are reached, however loaded the machine: the deadline only
    # catches a hang (it used to be 40 s for >= 30 kills, which a machine at load 5 missed).
    deadline = time.monotonic() + 900
    next_version = 0
    last_version = -1
    per_save = 0.05  # seconds; refined from the writer's progress lines
    try:
        while kills < 36 or ((not interrupted or len(set(versions_seen)) < 10) and kills < 300):
            assert time.monotonic() < deadline, (f"hang? {kills} kills ({interrupted} mid-save, "
                                                 f"{len(set(versions_seen))} versions) in 900 s")
            zygote.send(f"go {next_version}")
            pid = zygote.child = int(zygote.expect("pid"))
            # Let 0-2 saves complete, then kill at a random moment of the next one(s):
            # the delay is drawn from the measured time per save, so kills land inside
            # save_checkpoint (packing, writing, fsync, rename) as well as between saves.
            started = time.monotonic()
            for _ in range(rng.randint(0, 2)):
                zygote.expect("saved")
                per_save = 0.7 * per_save + 0.3 * (time.monotonic() - started)
                started = time.monotonic()
            time.sleep(rng.uniform(0.0, 1.5 * per_save))
            os.kill(pid, signal.SIGKILL)
            zygote.send(f"reap {pid}")
            status = int(zygote.expect("status"))
            zygote.child = None
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
                f"the writer ended by itself (wait status {status}) instead of being killed"
            kills += 1
            temps = [p for p in os.listdir(folder) if p != path.name]
            assert len(temps) <= 1, f"temporary files pile up: {temps}"
            interrupted += len(temps)
            if not path.exists():  # killed before its first save completed
                assert last_version == -1
                continue
            sp = DataNormSparsifier(sparse_block_shape=(1, 4))
            sp.add_data("table.weight", table)
            load_checkpoint(path, sp)  # whole and verified, or this raises
            version = sp.step_count
            assert version >= last_version
            assert sp.data_groups["table.weight"]["sparsity_level"] == _level(version)
            assert torch.equal(sp.get_mask("table.weight"), expected_mask(version)), version
            versions_seen.append(version)
            last_version = version
            next_version = version + 1
    finally:
        zygote.close()
    assert interrupted >= 1, "no kill landed inside a save: the test would prove nothing"
    assert len(set(versions_seen)) >= 10, versions_seen  # saves really happened between kills
    # A last save removes the killed writers' leftovers.
    sp = DataNormSparsifier(sparse_block_shape=(1, 4))
    sp.add_data("table.weight", table)
    save_checkpoint(path, sp)
    assert os.listdir(folder) == [path.name]
    print(f"{kills} SIGKILLs survived ({interrupted} mid-save), {len(set(versions_seen))} versions verified")


def test_the_kill_test_fails_fast_and_clearly_when_the_writer_dies_instead_of_hanging(tmp_path):
    """The cause of issue 9's hang: a writer that raised was invisible to the test, which
    then waited for a "saved" line forever. Now the error line (or the deadline) ends it."""
    bad = tmp_path / "missing-folder" / "ckpt.safetensors"  # every save raises FileNotFoundError
    zygote = _Zygote(bad, tmp_path / "zygote.stderr")
    try:
        zygote.send("go 0")
        zygote.child = int(zygote.expect("pid"))
        started = time.monotonic()
        with pytest.raises(AssertionError, match="writer process raised.*FileNotFoundError") as info:
            zygote.expect("saved")
        assert time.monotonic() - started < 30
        assert "Traceback" in str(info.value)  # the writer's own traceback is quoted
        zygote.send(f"reap {zygote.child}")
        assert os.WEXITSTATUS(int(zygote.expect("status"))) == 1
        with pytest.raises(AssertionError, match="no 'saved' line within 0.5 s"):
            zygote.expect("saved", timeout=0.5)
    finally:
        zygote.close()


# ----------------------------------------------------------------------------------------
# Distributed: failures are raised on every rank, never a hang, never half a change
# ----------------------------------------------------------------------------------------


def test_distributed_save_and_load_failures_raise_on_every_rank_and_change_nothing(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))
    from launcher import run_ranks

    import _checkpoint_rank_fns

    results = run_ranks(_checkpoint_rank_fns.faults, 2, str(tmp_path), timeout=90)
    for r in results:
        rank = r["rank"]
        assert r["disagree"]["type"] == "RankDisagreementError", r["disagree"]
        assert "only.on.rank1" in r["disagree"]["message"]
        assert not r["disagree_file"]
        assert r["good_size_on_return"] > 0
        # The writer's own error on rank 0, a RemoteError carrying it on rank 1.
        assert r["write_error"]["type"] == ("PermissionError" if rank == 0 else "RemoteError"), r["write_error"]
        assert "injected" in r["write_error"]["message"]
        assert r["good_unchanged"] and r["leftovers"] == []
        # Rank 1's own reason, and on rank 0 a CheckpointError saying another rank refused.
        assert r["load_error"]["type"] == "CheckpointError" and r["load_error"]["value_error"]
        assert "extra.weight" in r["load_error"]["message"]
        if rank == 0:
            assert "another rank refused" in r["load_error"]["message"]
        assert r["load_unchanged"]
        assert r["missing"]["type"] == "CheckpointNotFoundError"
        assert r["loaded_equal"]
