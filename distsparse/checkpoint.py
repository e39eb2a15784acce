"""Safetensors checkpoints of a sparsifier and its scheduler: the file format, atomic
writes and all-or-nothing, fully verified loads. The only module that touches safetensors.

Both functions are *collectives* when ``torch.distributed`` is initialized: every rank of
the sparsifier's group calls them, in the same order as its other collectives.

File format ``distsparse.checkpoint``, version 1
-----------------------------------------------
One safetensors file. Nothing in it is pickled; loading never runs code. The user's data
(tables, parameters, batches) is *not* saved: it belongs to the model's checkpoint.

Tensors (all 1-D ``uint8``, masks bit-packed by :func:`distsparse.masks.pack_bits`: one
bit per element in row-major order, most significant bit first, last byte zero-padded;
1 keeps, 0 prunes):

* ``mask/<group name>`` — every *replicated* group, pending ones included (identical on
  all ranks; written from rank 0). A *sharded* DTensor group (FSDP2, HSDP) is stored the
  same way, as its whole mask: the contributing ranks send their bit-packed rows with the
  save's all-gather and the writer assembles them; on load every rank takes its own rows.
  A table sharded in rectangles (TorchRec) likewise: every rank sends its shards' masks
  with their offsets, the writer checks that they tile the table and assembles it; on load
  every rank takes its shards' parts. So a file loads on any sharding, world size, DDP or
  a single process.
* ``local/<rank>/<group name>`` — every *local* group's mask on rank ``<rank>``, gathered
  from all ranks (absent when that rank holds the group without a mask yet).

Group names are used verbatim after the prefix (they may contain ``.`` and ``/``); the
authoritative list of groups is the JSON below, never a parse of the keys.

``__metadata__`` (str → str, as safetensors requires):

* ``format`` = ``"distsparse.checkpoint"``, ``format_version`` = ``"1"``;
* ``state`` — JSON text::

      {"sparsifier": {"class": "DataNormSparsifier", "format_version": 1,
                      "args": {"norm": "L1"}, "defaults": {...}, "step_count": 12},
       "world_size": 2,
       "groups": {"emb.weight": {"scope": "replicated", "config": {...}, "shape": [1000, 64]},
                  "batch":      {"scope": "local", "config": {...}, "shapes": [[32, 16], [32, 16]]}},
       "scheduler": {...BaseDataScheduler.state_dict()...} or null,
       "checksums": {"mask/emb.weight": "<sha256 hex of the tensor's bytes>", ...}}

  ``shapes`` of a local group lists each saved rank's shape (per-rank data may differ).
* ``json_sha256`` — sha256 hex of the ``state`` text (UTF-8), guarding it and, through
  ``checksums``, every tensor.

Writing
-------
Rank 0 alone writes: every rank's local masks reach it in one ``all_gather`` of bytes; it
writes a temporary file ``.<name>.tmp-<pid>-<8 hex>`` beside the target (the *real* file
when the target is a symlink, which stays a link; a shortened ``.<start>~<hash>`` prefix
for names near ``NAME_MAX``), holding an exclusive ``flock`` on it, flushes and fsyncs it,
``os.replace``\\ s it onto the target and fsyncs the folder. A crash or kill at any moment
leaves the previous checkpoint whole. The next save removes temporary files of the same
target that it can lock (their writer is gone): a live save of another thread, process or
host is never touched. Every rank returns only after the file is complete, and an error on
the writer is raised on every rank.

The state also records ``"writer"``: the writing process group's global ranks, the world
size and a token of the job (from the default process group's store). A save refuses
(:class:`CheckpointError`) to replace a file another process group of the same job wrote
(the check and the rename run under a lock on the folder); files of earlier jobs, of the
same group, or without a writer are replaced. Headers over safetensors' 100,000,000-byte
limit are refused before writing, in distsparse's words.

Loading
-------
Rank 0 reads the file and broadcasts its bytes, so the file need only be visible to rank 0
(no shared filesystem needed). Every rank then verifies everything before changing
anything: the safetensors layout (header length, JSON, dtypes, offsets covering the file
exactly), ``format``/``format_version``, the JSON checksum, every tensor's checksum, each
packed mask's size against its group's shape, the sparsifier's own validation
(``strict`` semantics, class, shapes, scopes, configs) and the scheduler state. If any rank
finds a problem, every rank raises :class:`CheckpointError` naming the file (and the
group) and no rank changes any state.

Limitations:
    A checkpoint loads on any world size (replicated masks are whole), but *local* groups'
    masks are per rank: on another world size they start fresh, with a warning.
    Constructor arguments that change masks (``DataNormSparsifier(norm=...)``) are saved
    as ``args`` and must match on load.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import math
import os
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

try:  # POSIX: temporary files are locked while written (see _remove_stale_temps)
    import fcntl
except ImportError:  # pragma: no cover - Windows: no locks, stale temporary files are kept
    fcntl = None  # type: ignore[assignment]

from .distributed import RankDisagreementError, RemoteError, describe_differences, mark_raised_everywhere
from .masks import pack_bits, packed_size, unpack_bits

if TYPE_CHECKING:  # pragma: no cover
    from .scheduler import BaseDataScheduler
    from .sparsifier import BaseDataSparsifier

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
    "CheckpointNotFoundError",
    "FORMAT",
    "FORMAT_VERSION",
]

#: ``__metadata__["format"]`` of every distsparse checkpoint.
FORMAT = "distsparse.checkpoint"
#: ``__metadata__["format_version"]`` written (and the only one read) by this version.
FORMAT_VERSION = "1"

# safetensors' MAX_HEADER_SIZE: it refuses bigger headers when writing ("header too large")
# and when reading.
_MAX_HEADER = 100_000_000
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged, of another format or does not fit the
    sparsifier/scheduler it is loaded into. Nothing was changed."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (also a :class:`FileNotFoundError`)."""


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu").contiguous().numpy().tobytes()


def _pack(mask: torch.Tensor) -> torch.Tensor:
    return pack_bits(mask).cpu()


def _unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return unpack_bits(packed, shape)


def _mask_key(name: str) -> str:
    return f"mask/{name}"


def _local_key(rank: int, name: str) -> str:
    return f"local/{rank}/{name}"


def _check_scheduler(sparsifier: BaseDataSparsifier, scheduler: BaseDataScheduler | None) -> None:
    from .scheduler import BaseDataScheduler
    from .sparsifier import BaseDataSparsifier

    if not isinstance(sparsifier, BaseDataSparsifier):
        raise TypeError(f"sparsifier must be a distsparse BaseDataSparsifier, got {type(sparsifier).__name__}")
    if scheduler is None:
        return
    if not isinstance(scheduler, BaseDataScheduler):
        raise TypeError(f"scheduler must be a distsparse BaseDataScheduler or None, got {type(scheduler).__name__}")
    if scheduler.data_sparsifier is not sparsifier:
        raise ValueError("scheduler schedules another sparsifier than the one passed "
                         "(pass the scheduler built on this sparsifier)")


# ----------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------


def _rank_payload(sparsifier: BaseDataSparsifier, writer: bool) -> tuple[bytes, dict[str, torch.Tensor]]:
    """This rank's contribution: JSON facts (shared + local shapes) and packed local masks.

    Returns the payload sent to the writer and (on the writer) the packed replicated masks."""
    sd = sparsifier.state_dict()
    shared_groups: dict[str, Any] = {}
    local: dict[str, Any] = {}
    rows: dict[str, Any] = {}
    chunks: list[bytes] = []
    row_chunks: list[bytes] = []
    replicated_masks: dict[str, torch.Tensor] = {}
    for name in sorted(sd["groups"]):
        entry = sd["groups"][name]
        mask = sd["masks"].get(name)
        sharded = entry.get("sharded")
        rects = entry.get("rects")
        if rects is not None:
            # A table sharded in rectangles (TorchRec): whole in the file too; this rank's
            # shards' masks (flat, one after the other) go to the writer.
            shared_groups[name] = {"scope": "replicated", "config": entry["config"],
                                   "shape": [int(s) for s in entry["shape"]]}
            packed = _tensor_bytes(_pack(mask))
            rows[name] = {"rects": rects["shards"], "nbytes": len(packed)}
            row_chunks.append(packed)
            continue
        if sharded is not None:
            # A sharded DTensor group: the file holds its whole mask, assembled on the writer
            # from the contributing ranks' rows (see _assemble_sharded).
            shared_groups[name] = {"scope": "replicated", "config": entry["config"],
                                   "shape": [int(s) for s in entry["shape"]]}
            packed = _tensor_bytes(_pack(mask)) if sharded["contributes"] else None
            rows[name] = {"dim0_offset": sharded["dim0_offset"], "local_shape": sharded["local_shape"],
                          "nbytes": None if packed is None else len(packed)}
            if packed is not None:
                row_chunks.append(packed)
            continue
        if entry["replicated"]:
            shared_groups[name] = {"scope": "replicated", "config": entry["config"],
                                   "shape": [int(s) for s in entry["shape"]]}
            if mask is None:  # the sparsifier never holds a replicated group without a mask
                raise ValueError(f"group {name!r}: replicated group has no mask to save")
            if writer:
                replicated_masks[name] = _pack(mask)
        else:
            shared_groups[name] = {"scope": "local", "config": entry["config"]}
            packed = None if mask is None else _tensor_bytes(_pack(mask))
            local[name] = {"shape": [int(s) for s in entry["shape"]],
                           "nbytes": None if packed is None else len(packed)}
            if packed is not None:
                chunks.append(packed)
    facts = {
        "shared": {
            "sparsifier": {"class": sd["sparsifier"], "format_version": sd["format_version"],
                           "args": sd["sparsifier_args"], "defaults": sd["defaults"],
                           "step_count": int(sd["step_count"])},
            "groups": shared_groups,
        },
        "local": local,
        "rows": rows,
    }
    text = json.dumps(facts, sort_keys=True).encode()
    return len(text).to_bytes(8, "little") + text + b"".join(chunks) + b"".join(row_chunks), replicated_masks


def _split_payload(payload: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(facts, packed masks): local groups' masks by name, sharded groups' rows under
    ``("rows", name)``."""
    n = int.from_bytes(payload[:8], "little")
    facts = json.loads(payload[8 : 8 + n])
    masks: dict[Any, bytes] = {}
    offset = 8 + n
    for section in ("local", "rows"):
        for name in sorted(facts.get(section, {})):
            nbytes = facts[section][name]["nbytes"]
            if nbytes is not None:
                masks[name if section == "local" else ("rows", name)] = payload[offset : offset + nbytes]
                offset += nbytes
    return facts, masks


def _assemble_sharded(payloads: list[bytes], replicated_masks: dict[str, torch.Tensor]) -> None:
    """On the writer: the whole bit-packed mask of every sharded group, from the rows its
    contributing ranks sent (unpacked, concatenated along dim 0 in offset order, packed).
    The writer holds one whole mask at a time, transiently."""
    gathered = [_split_payload(p) for p in payloads]
    names = sorted({n for facts, _ in gathered for n in facts.get("rows", {})})
    for name in names:
        shape = tuple(gathered[0][0]["shared"]["groups"][name]["shape"])
        if "rects" in gathered[0][0]["rows"][name]:
            replicated_masks[name] = _pack(_assemble_rects(name, shape, gathered))
            continue
        pieces = []
        for facts, masks in gathered:
            info = facts["rows"][name]
            if info["nbytes"] is not None:
                pieces.append((int(info["dim0_offset"]), _unpack(
                    torch.frombuffer(bytearray(masks[("rows", name)]), dtype=torch.uint8)
                    if info["nbytes"] else torch.empty(0, dtype=torch.uint8), tuple(info["local_shape"]))))
        pieces.sort(key=lambda p: p[0])
        at = 0
        for offset, piece in pieces:
            if offset != at:
                raise ValueError(f"group {name!r}: the ranks' rows do not tile dimension 0 "
                                 f"(rows from {offset} where {at} was expected)")
            at += piece.shape[0]
        if at != shape[0]:
            raise ValueError(f"group {name!r}: the ranks' rows cover {at} of {shape[0]} rows along dimension 0")
        whole = torch.cat([p for _, p in pieces]) if pieces else torch.ones(shape, dtype=torch.bool)
        replicated_masks[name] = _pack(whole.reshape(shape))


def _assemble_rects(name: str, shape: tuple[int, ...], gathered: list[tuple[dict[str, Any], dict[Any, bytes]]]
                    ) -> torch.Tensor:
    """The whole mask of a table sharded in rectangles, from every rank's shards (checked
    to tile the table exactly)."""
    from .rects import layout_from_gathered

    per_rank = [facts["rows"][name]["rects"] for facts, _ in gathered]
    layout_from_gathered(name, shape, per_rank, 0)  # ValueError naming the group unless they tile it
    whole = torch.empty(shape, dtype=torch.bool)
    for (facts, masks), rects in zip(gathered, per_rank):
        numel = sum(rows * cols for _, _, rows, cols in rects)
        raw = masks[("rows", name)]
        flat = _unpack(torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else
                       torch.empty(0, dtype=torch.uint8), (numel,))
        at = 0
        for r, c, rows, cols in rects:
            whole[r : r + rows, c : c + cols] = flat[at : at + rows * cols].view(rows, cols)
            at += rows * cols
    return whole


def _disagreement(shared: list[dict[str, Any]]) -> str | None:
    """Describe how ranks' shared facts differ, or None when they agree."""
    if all(s == shared[0] for s in shared):
        return None
    problems = describe_differences([{"sparsifier": s["sparsifier"]} for s in shared], noun="state of")
    problems += describe_differences([s["groups"] for s in shared])
    return "\n  ".join(problems) or "the ranks' sparsifier states differ"


def _build_file(payloads: list[bytes], replicated_masks: dict[str, torch.Tensor],
                scheduler_state: dict[str, Any] | None, writer: dict[str, Any] | None = None) -> bytes:
    """The whole checkpoint file as bytes (runs on the writer). ``writer`` (who writes, see
    :func:`_writer_identity`) is recorded in the state for the collision check."""
    from safetensors.torch import save as st_save

    gathered = [_split_payload(p) for p in payloads]
    world_size = len(gathered)
    shared = gathered[0][0]["shared"]
    groups: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, entry in shared["groups"].items():
        if entry["scope"] == "replicated":
            groups[name] = dict(entry)
            tensors[_mask_key(name)] = replicated_masks[name].contiguous()
        else:
            groups[name] = {**entry, "shapes": [facts["local"][name]["shape"] for facts, _ in gathered]}
            for rank, (_, masks) in enumerate(gathered):
                if name in masks:
                    tensors[_local_key(rank, name)] = torch.frombuffer(bytearray(masks[name]), dtype=torch.uint8) \
                        if masks[name] else torch.empty(0, dtype=torch.uint8)
    checksums = {key: _sha256(_tensor_bytes(t)) for key, t in sorted(tensors.items())}
    state = {
        "sparsifier": shared["sparsifier"],
        "world_size": world_size,
        "groups": {n: groups[n] for n in sorted(groups)},
        "scheduler": scheduler_state,
        "checksums": checksums,
    }
    if writer is not None:
        state["writer"] = writer
    text = json.dumps(state, sort_keys=True, allow_nan=False)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "state": text,
                "json_sha256": _sha256(text.encode("utf-8"))}
    _check_header_limit(tensors, metadata, what=f"checkpoint of {len(groups):,} groups",
                        advice="split the groups over several sparsifiers, each saved to its own file")
    return st_save(tensors, metadata=metadata)


# -- the safetensors header limit -------------------------------------------------------


def _header_estimate(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Bytes of the JSON header safetensors will write (its compact JSON; offsets counted
    with their real digits), without building it."""
    size = len(json.dumps({"__metadata__": metadata}, separators=(",", ":"), ensure_ascii=False).encode())
    offset = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        tag = _ST_TAGS.get(t.dtype, "BF16")
        entry = {"dtype": tag, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        # ',"key":{...}' — the braces json.dumps adds around one item become that comma.
        size += len(json.dumps({key: entry}, separators=(",", ":"), ensure_ascii=False).encode()) - 1
        offset += nbytes
    return size


_ST_TAGS = {torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
            torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
            torch.bool: "BOOL"}


def _check_header_limit(tensors: dict[str, torch.Tensor], metadata: dict[str, str], what: str,
                        advice: str = "write fewer groups per file") -> None:
    """Refuse, in distsparse's words, a file whose header safetensors would refuse
    ("header too large": it caps headers at ``_MAX_HEADER`` bytes when writing and reading)."""
    size = _header_estimate(tensors, metadata)
    if size > _MAX_HEADER:
        raise ValueError(
            f"the {what} needs a safetensors header of about {size:,} bytes (names, configs and "
            f"checksums of {len(tensors):,} tensors), over safetensors' limit of {_MAX_HEADER:,} bytes; "
            f"{advice}")


# -- who writes: the collision check ----------------------------------------------------


def _writer_identity(comm: Any) -> dict[str, Any]:
    """The writing process group's global ranks, the job's world size and job token."""
    return {"group_ranks": comm.global_ranks(), "world_size": comm.job_world_size(), "job": comm.job_token()}


def _existing_writer(real: Path) -> dict[str, Any] | None:
    """The ``writer`` recorded in the checkpoint at ``real`` (header only), or None when
    there is no readable distsparse checkpoint with one (absent, damaged, older)."""
    try:
        with open(real, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > _MAX_HEADER:
                return None
            header = json.loads(f.read(n))
        writer = json.loads(header["__metadata__"]["state"]).get("writer")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return writer if isinstance(writer, dict) else None


def _check_not_another_group(real: Path, target: Path, writer: dict[str, Any]) -> None:
    """Refuse to replace a checkpoint that another process group of this job wrote."""
    existing = _existing_writer(real)
    if existing is None or writer.get("job") is None or existing.get("job") != writer["job"]:
        return  # no file, an older file, or another job (a resume, another world size)
    if existing.get("group_ranks") != writer["group_ranks"]:
        raise CheckpointError(
            f"cannot save checkpoint {str(target)!r}: the file there was written in this job by the "
            f"process group of global ranks {existing.get('group_ranks')}, and this save comes from "
            f"global ranks {writer['group_ranks']}; sparsifiers on different process groups must save "
            "to different files (register_for_checkpointing's default filename names the ranks)")


def _write_checkpoint(comm: Any, target: Path, payloads: list[bytes], replicated: dict[str, torch.Tensor],
                      scheduler_state: dict[str, Any] | None) -> None:
    """Build and atomically write the checkpoint on the writer, refusing a collision."""
    writer = _writer_identity(comm)
    _atomic_write(target, _build_file(payloads, replicated, scheduler_state, writer=writer),
                  check=lambda real: _check_not_another_group(real, target, writer))


# -- atomic writes, temporary files and their locks --------------------------------------

# Longest temp-file suffix: ".tmp-" + pid (up to 10 digits) + "-" + 8 hex digits.
_TEMP_SUFFIX = 24
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.EBADF}


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _temp_prefix(name: str, name_max: int) -> str:
    """``.<name>``, or for names near NAME_MAX a shortened ``.<start of name>~<hash>``, so
    the temporary file's name always fits where the target's does."""
    prefix = f".{name}"
    if len(os.fsencode(prefix)) + _TEMP_SUFFIX <= name_max:
        return prefix
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    keep = name
    while keep and len(os.fsencode(f".{keep}~{digest}")) + _TEMP_SUFFIX > name_max:
        keep = keep[:-1]
    return f".{keep}~{digest}"


def _temp_pattern(target: Path) -> re.Pattern[str]:
    """Names of ``target``'s temporary files (any process, any host)."""
    prefix = _temp_prefix(target.name, _name_max(target.parent))
    return re.compile(rf"^{re.escape(prefix)}\.tmp-(\d+)-[0-9a-f]{{8}}$")


def _lock(fd: int, blocking: bool) -> bool:
    """flock ``fd`` exclusively: True when locked, False when the file system has no locks.
    Raises BlockingIOError when ``blocking`` is False and another open file holds it."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        raise
    except OSError as exc:
        if exc.errno in _NO_LOCKS:
            return False
        raise
    return True


def _remove_stale_temps(target: Path) -> None:
    """Delete temporary files of earlier, aborted saves of ``target``.

    A live save holds an exclusive ``flock`` on its temporary file from creation until
    its rename, and a killed process's locks vanish with it. So a temporary file is stale
    exactly when this process can lock it: that judges other threads, processes, pid
    namespaces and hosts (locks through NFS) alike. A file system without locks keeps
    every temporary file (never a live save deleted).
    """
    pattern = _temp_pattern(target)
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return
    for entry in entries:
        if not pattern.match(entry.name):
            continue
        try:  # O_RDWR: NFS emulates flock with write locks; O_NOFOLLOW: a link is not a temp
            fd = os.open(entry.path, os.O_RDWR | os.O_NOFOLLOW | _O_CLOEXEC)
        except OSError:
            continue  # removed meanwhile, or not ours to touch
        try:
            if not _lock(fd, blocking=False):
                continue
            if os.path.samestat(os.stat(entry.path, follow_symlinks=False), os.fstat(fd)):
                os.unlink(entry.path)
        except OSError:
            pass  # locked by a live save (BlockingIOError), or removed by another save
        finally:
            os.close(fd)


def _create_temp(folder: Path, prefix: str) -> tuple[int, Path]:
    """A new temporary file beside the target, exclusively locked (when the file system
    has locks) and still at its name: a cleanup that won the race to the new file's lock
    has unlinked it, and then another name is taken."""
    for _ in range(100):
        temp = folder / f"{prefix}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
        try:
            if not _lock(fd, blocking=True):
                return fd, temp
            if os.path.samestat(os.stat(temp, follow_symlinks=False), os.fstat(fd)):
                return fd, temp
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        os.close(fd)
    raise RuntimeError(f"cannot create a temporary file in {str(folder)!r}: each one vanished at once")


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Serialise check-and-rename in ``folder`` (a flock on the folder, where supported)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_CLOEXEC)
    except OSError:
        fd = -1
    try:
        if fd >= 0:
            with contextlib.suppress(OSError):
                _lock(fd, blocking=True)
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every platform / filesystem
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(target: Path, data: bytes, check: Callable[[Path], None] | None = None) -> None:
    """Write ``data`` to ``target`` atomically: a locked temporary file beside the *real*
    file (a symlink at ``target`` is resolved and stays a link), fsync, rename, fsync the
    folder. ``check(real_path)`` runs under a folder lock just before the rename and may
    refuse it by raising. A crash at any moment leaves the previous file whole."""
    real = Path(os.path.realpath(target))
    folder = real.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot save {str(target)!r}: folder {str(folder)!r} does not exist")
    name_max = _name_max(folder)
    length = len(os.fsencode(real.name))
    if length > name_max:
        raise OSError(errno.ENAMETOOLONG,
                      f"cannot save {str(target)!r}: the file name {real.name!r} is {length} bytes, longer than "
                      f"this file system's limit of {name_max} bytes; choose a shorter name")
    _remove_stale_temps(real)
    fd, temp = _create_temp(folder, _temp_prefix(real.name, name_max))
    try:
        view = memoryview(data).cast("B")
        while view:
            written = os.write(fd, view[: 1 << 30])
            view = view[written:]
        os.fsync(fd)
        if check is None:
            os.replace(temp, real)
        else:
            with _folder_lock(folder):
                check(real)
                os.replace(temp, real)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    finally:
        os.close(fd)  # releases the temp file's lock only now, after the rename
    _fsync_folder(folder)


def save_checkpoint(path: str | os.PathLike[str], sparsifier: BaseDataSparsifier,
                    scheduler: BaseDataScheduler | None = None) -> None:
    """Write the sparsifier's masks and configs (and the scheduler's state) to one
    safetensors file at ``path``, atomically. *Collective*: every rank calls it.

    Rank 0 writes; the others send it their local groups' masks and return once the file
    is complete. An error on any rank (or the writer's I/O error) is raised on every rank;
    the previous file at ``path`` then stays as it was. The format is described in this
    module's docstring. Ranks that disagree on groups, configs or step counts raise
    :class:`~distsparse.distributed.RankDisagreementError` naming the group.
    """
    _check_scheduler(sparsifier, scheduler)
    comm = sparsifier.comm
    target = Path(os.fspath(path))
    with comm.operation("save_checkpoint"):
        _save_in_operation(comm, target, sparsifier, scheduler)
        comm.finish("save_checkpoint")


def _save_in_operation(comm: Any, target: Path, sparsifier: BaseDataSparsifier,
                       scheduler: BaseDataScheduler | None) -> None:
    payload = b""
    replicated: dict[str, torch.Tensor] = {}
    scheduler_state = None
    error: Exception | None = None
    try:
        payload, replicated = _rank_payload(sparsifier, writer=comm.rank == 0)
        if scheduler is not None:
            scheduler_state = json.loads(json.dumps(scheduler.state_dict(), allow_nan=False))
    except Exception as exc:  # noqa: BLE001 - raised on every rank just below
        error = exc
    comm.raise_if_any_failed([f"{type(error).__name__}: {error}"] if error else [],
                             f"save_checkpoint({str(target)!r})", local_error=error)
    payloads = comm.all_gather_bytes(payload)
    problems = _disagreement([_split_payload(p)[0]["shared"] for p in payloads])
    if problems:
        raise RankDisagreementError(
            f"save_checkpoint({str(target)!r}): ranks disagree (rank {comm.rank} of {comm.world_size}):\n  "
            f"{problems}\nEvery rank must hold the same groups with the same configs.")

    def write() -> None:
        _assemble_sharded(payloads, replicated)
        _write_checkpoint(comm, target, payloads, replicated, scheduler_state)

    # The broadcast of the writer's status is also the barrier: nobody leaves before the
    # file is complete, and a writer error is raised everywhere.
    comm.run_on_coordinator(write, encode=lambda _: b"", decode=lambda _: None)


# ----------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------


@dataclass
class _Checkpoint:
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def _read(target: Path) -> bytes:
    """b"\\x00" + file bytes, or b"\\x01"/b"\\x02" + message (not found / other I/O error)."""
    try:
        return b"\x00" + target.read_bytes()
    except FileNotFoundError:
        return b"\x01" + f"checkpoint file {str(target)!r} does not exist".encode()
    except OSError as exc:
        return b"\x02" + f"cannot read checkpoint file {str(target)!r}: {exc}".encode()


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)


def _header_size(blob: bytes) -> int:
    return int.from_bytes(blob[:8], "little")


def _check_layout(blob: bytes, where: str) -> dict[str, Any]:
    """Parse the safetensors framing; return the header (with ``__metadata__``)."""
    size = len(blob)
    if size == 0:
        raise CheckpointError(f"{where}: the file is empty")
    if size < 8:
        raise CheckpointError(f"{where}: the file is {size} bytes, too short for a safetensors header (truncated?)")
    n = int.from_bytes(blob[:8], "little")
    if n > _MAX_HEADER or n > size - 8:
        raise CheckpointError(f"{where}: the header length field says {n} bytes but the file has {size - 8} after it "
                              "(truncated, damaged, or not a safetensors file)")
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{where}: the safetensors header is not valid JSON ({exc}); "
                              "the file is damaged or not a safetensors file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: the safetensors header is not a JSON object (damaged file)")
    return header


def _check_tensor_specs(header: dict[str, Any], data_size: int, where: str) -> None:
    """Every tensor is a 1-D uint8 span; the spans tile the data exactly."""
    spans = []
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        if (not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}
                or not _is_shape(spec["shape"]) or not _is_shape(spec["data_offsets"])
                or len(spec["data_offsets"]) != 2):
            raise CheckpointError(f"{where}: tensor {key!r} has a malformed header entry (damaged file)")
        if spec["dtype"] != "U8" or len(spec["shape"]) != 1:
            raise CheckpointError(f"{where}: tensor {key!r} is {spec['dtype']} of shape {spec['shape']}; "
                                  "distsparse checkpoints hold only 1-D uint8 packed masks")
        start, end = spec["data_offsets"]
        if end - start != spec["shape"][0]:
            raise CheckpointError(f"{where}: tensor {key!r}: data offsets {spec['data_offsets']} do not match "
                                  f"its shape {spec['shape']} (damaged file)")
        spans.append((start, end, key))
    check_spans_tile(spans, data_size, where)


def check_spans_tile(spans: list[tuple[int, int, str]], data_size: int, where: str) -> None:
    """The tensors' ``(start, end, key)`` byte spans cover the data section exactly, in
    order, with no gap, overlap or trailing byte (safetensors itself allows gaps)."""
    position = 0
    for start, end, key in sorted(spans):
        if start != position:
            raise CheckpointError(f"{where}: tensor {key!r} starts at byte {start} of the data, expected {position} "
                                  "(damaged file)")
        position = end
    if position != data_size:
        what = "truncated" if position > data_size else "has trailing bytes"
        raise CheckpointError(f"{where}: the header describes {position} data bytes but the file holds {data_size} "
                              f"(the file is {what})")


def _parse(blob: bytes, where: str) -> _Checkpoint:
    """Verify everything that does not depend on the sparsifier; return state and tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    header = _check_layout(blob, where)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a distsparse checkpoint (its safetensors metadata lacks "
                              f"format={FORMAT!r}); write checkpoints with distsparse.save_checkpoint")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{where}: checkpoint format_version {version!r} is not supported; this "
                              f"distsparse reads version {FORMAT_VERSION!r} (upgrade distsparse?)")
    text, digest = meta.get("state"), meta.get("json_sha256")
    if not isinstance(text, str) or not isinstance(digest, str):
        raise CheckpointError(f"{where}: metadata lacks 'state' or 'json_sha256' (damaged file)")
    if _sha256(text.encode("utf-8")) != digest:
        raise CheckpointError(f"{where}: the checkpoint's JSON state does not match its checksum (damaged file)")
    try:
        state = json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"{where}: the JSON state is not valid JSON ({exc})") from None
    _check_tensor_specs(header, len(blob) - 8 - _header_size(blob), where)
    try:
        tensors = st_load(blob)
    except SafetensorError as exc:
        raise CheckpointError(f"{where}: safetensors cannot read the file ({exc})") from None
    _check_state_schema(state, where)
    checksums = state["checksums"]
    if set(tensors) != set(checksums):
        extra = sorted(set(tensors) - set(checksums))
        lacking = sorted(set(checksums) - set(tensors))
        raise CheckpointError(f"{where}: tensors do not match the checksum list (unexpected: {extra}, "
                              f"missing: {lacking}; damaged file)")
    for key in sorted(tensors):
        if _sha256(_tensor_bytes(tensors[key])) != checksums[key]:
            raise CheckpointError(f"{where}: tensor {key!r} does not match its sha256 checksum (damaged file)")
    _check_tensor_keys(state, tensors, where)
    return _Checkpoint(state=state, tensors=tensors)


def _check_state_schema(state: Any, where: str) -> None:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: malformed checkpoint state: {what}")

    if not isinstance(state, dict):
        raise bad("not a JSON object")
    missing = sorted({"sparsifier", "world_size", "groups", "scheduler", "checksums"} - set(state))
    if missing:
        raise bad(f"missing keys {missing}")
    sp = state["sparsifier"]
    if (not isinstance(sp, dict) or not {"class", "format_version", "args", "defaults", "step_count"} <= set(sp)
            or not isinstance(sp["class"], str) or not isinstance(sp["defaults"], dict)
            or not isinstance(sp["args"], dict)
            or not isinstance(sp["step_count"], int)):
        raise bad("'sparsifier' must hold class, format_version, args, defaults and step_count")
    ws = state["world_size"]
    if not isinstance(ws, int) or isinstance(ws, bool) or ws < 1:
        raise bad(f"world_size must be a positive int, got {ws!r}")
    if not isinstance(state["groups"], dict):
        raise bad("'groups' must be an object")
    for name, entry in state["groups"].items():
        if not isinstance(entry, dict) or entry.get("scope") not in ("replicated", "local") \
                or not isinstance(entry.get("config"), dict):
            raise bad(f"group {name!r} needs a scope ('replicated' or 'local') and a config")
        if entry["scope"] == "replicated" and not _is_shape(entry.get("shape")):
            raise bad(f"group {name!r} needs a shape")
        if entry["scope"] == "local":
            shapes = entry.get("shapes")
            if not isinstance(shapes, list) or len(shapes) != ws or not all(_is_shape(s) for s in shapes):
                raise bad(f"group {name!r} needs one shape per saved rank ({ws})")
    if state["scheduler"] is not None and not isinstance(state["scheduler"], dict):
        raise bad("'scheduler' must be an object or null")
    checksums = state["checksums"]
    if not isinstance(checksums, dict) or not all(isinstance(v, str) and _HEX64.match(v) for v in checksums.values()):
        raise bad("'checksums' must map tensor keys to sha256 hex digests")


def _check_tensor_keys(state: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every replicated group has its mask; every tensor belongs to a group; sizes fit."""
    expected: dict[str, tuple[str, list[int]]] = {}
    for name, entry in state["groups"].items():
        if entry["scope"] == "replicated":
            key = _mask_key(name)
            if key not in tensors:
                raise CheckpointError(f"{where}: group {name!r}: the mask tensor {key!r} is missing")
            expected[key] = (name, entry["shape"])
        else:
            for rank, shape in enumerate(entry["shapes"]):
                expected[_local_key(rank, name)] = (name, shape)
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise CheckpointError(f"{where}: tensors {unknown} belong to no group of the checkpoint (damaged file)")
    for key in sorted(tensors):
        name, shape = expected[key]
        numel = math.prod(shape)
        t = tensors[key]
        if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() != packed_size(numel):
            raise CheckpointError(f"{where}: group {name!r}: packed mask {key!r} has {t.numel()} {t.dtype} bytes, "
                                  f"shape {list(shape)} needs {packed_size(numel)} uint8 bytes")
        pad = (-numel) % 8
        if pad and t.numel() and int(t[-1]) & ((1 << pad) - 1):
            raise CheckpointError(f"{where}: group {name!r}: packed mask {key!r} has nonzero padding bits")


def _sparsifier_state(ckpt: _Checkpoint, sparsifier: BaseDataSparsifier) -> dict[str, Any]:
    """The ``state_dict()`` this rank loads: replicated masks, and local masks of this
    rank when the world size matches (else they start fresh; the sparsifier warns)."""
    state = ckpt.state
    saved_ws = state["world_size"]
    rank, world_size = sparsifier.rank, sparsifier.world_size
    same_world = saved_ws == world_size
    current: dict[str, Any] | None = None
    groups: dict[str, Any] = {}
    masks: dict[str, torch.Tensor] = {}
    for name in sorted(state["groups"]):
        entry = state["groups"][name]
        if entry["scope"] == "replicated":
            shape = tuple(entry["shape"])
            groups[name] = {"config": entry["config"], "shape": list(shape), "replicated": True}
            masks[name] = _unpack(ckpt.tensors[_mask_key(name)], shape)
            continue
        if same_world:
            shape = tuple(entry["shapes"][rank])
            key = _local_key(rank, name)
            if key in ckpt.tensors:
                masks[name] = _unpack(ckpt.tensors[key], shape)
        else:
            # Fresh start: the mask does not depend on the saved shape, and per-rank data
            # (batches) may well have another shape on another world size.
            if current is None:  # shapes of the groups held now (pending ones too)
                current = sparsifier.state_dict()["groups"]
            held = current.get(name)
            shape = tuple(held["shape"]) if held is not None and not held["replicated"] else tuple(entry["shapes"][0])
        groups[name] = {"config": entry["config"], "shape": list(shape), "replicated": False}
    sp = state["sparsifier"]
    return {
        "format_version": sp["format_version"],
        "sparsifier": sp["class"],
        "sparsifier_args": sp["args"],
        "defaults": sp["defaults"],
        "groups": groups,
        "masks": masks,
        "world_size": saved_ws,
        "rank": rank,
        "step_count": sp["step_count"],
    }


def _prepare(blob: bytes, where: str, sparsifier: BaseDataSparsifier,
             scheduler: BaseDataScheduler | None, strict: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Verify the file and validate both states against this rank's objects. Changes nothing."""
    ckpt = _parse(blob, where)
    try:
        sd = _sparsifier_state(ckpt, sparsifier)
        sparsifier._validate_state(sd, strict)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    scheduler_state = ckpt.state["scheduler"]
    if scheduler is None:
        return sd, None
    if scheduler_state is None:
        raise CheckpointError(f"{where}: the checkpoint holds no scheduler state "
                              f"(it was saved without one); load it with scheduler=None")
    # A copy whose containers are copies too: even a subclass that updates its dicts in
    # place while loading cannot touch the real scheduler before every rank agreed.
    probe = copy.copy(scheduler)
    for attr, value in vars(scheduler).items():
        if isinstance(value, (dict, list, set)):
            setattr(probe, attr, copy.copy(value))
    try:
        probe.load_state_dict(copy.deepcopy(scheduler_state))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: scheduler state does not fit {type(scheduler).__name__}: {exc}") from None
    return sd, scheduler_state


def load_checkpoint(path: str | os.PathLike[str], sparsifier: BaseDataSparsifier,
                    scheduler: BaseDataScheduler | None = None, strict: bool = True) -> None:
    """Restore masks, configs and step count (and the scheduler's state) from ``path``.
    *Collective*: every rank calls it.

    Everything is verified first (see this module's docstring); on any problem, on any
    rank, every rank raises :class:`CheckpointError` (a ``ValueError``;
    :class:`CheckpointNotFoundError` for a missing file) naming the file, and neither the
    sparsifier nor the scheduler changes on any rank. ``strict`` is the sparsifier's:
    ``True`` refuses a checkpoint that lacks a group the sparsifier has. Groups in the file
    that were not added yet wait for ``add_data`` (see ``BaseDataSparsifier.load_state_dict``).
    With ``scheduler=None`` a saved scheduler state is ignored.
    """
    _check_scheduler(sparsifier, scheduler)
    comm = sparsifier.comm
    target = Path(os.fspath(path))
    where = f"checkpoint {str(target)!r}"
    with comm.operation("load_checkpoint"):
        plan = _load_in_operation(comm, target, where, sparsifier, scheduler, strict)
        comm.finish("load_checkpoint")
    sd, scheduler_state = plan
    # Commit: both states were validated on every rank.
    snapshot = scheduler.state_dict() if scheduler is not None else None
    if scheduler is not None:
        scheduler.load_state_dict(scheduler_state)  # type: ignore[arg-type]
    try:
        sparsifier.load_state_dict(sd, strict)
    except BaseException:
        if scheduler is not None:
            scheduler.load_state_dict(snapshot)  # type: ignore[arg-type]
        raise


def _load_in_operation(comm: Any, target: Path, where: str, sparsifier: BaseDataSparsifier,
                       scheduler: BaseDataScheduler | None, strict: bool):
    """Read on rank 0, share the bytes, verify and validate on every rank (no change)."""
    received = comm.run_on_coordinator(lambda: _read(target), encode=lambda b: b, decode=lambda b: b)
    if received[:1] == b"\x01":
        raise mark_raised_everywhere(CheckpointNotFoundError(received[1:].decode(errors="replace")))
    if received[:1] == b"\x02":
        raise mark_raised_everywhere(CheckpointError(received[1:].decode(errors="replace")))
    blob = received[1:]
    del received
    error: Exception | None = None
    plan = None
    try:
        plan = _prepare(blob, where, sparsifier, scheduler, strict)
    except Exception as exc:  # noqa: BLE001 - raised on every rank just below
        error = exc
    try:
        comm.raise_if_any_failed([str(error)] if error else [], f"load_checkpoint({str(target)!r})",
                                 local_error=error)
    except RemoteError as exc:
        raise mark_raised_everywhere(
            CheckpointError(f"{where}: another rank refused it, nothing was loaded:\n{exc}")) from None
    assert plan is not None
    return plan
