"""Safetensors checkpoints of a sparsifier and its scheduler: the file format, atomic
writes and all-or-nothing, fully verified loads. The only module that touches safetensors.

Both functions are *collectives* when ``torch.distributed`` is initialized: every rank of
the sparsifier's group calls them, in the same order as its other collectives.

File format ``distsparse.checkpoint``, version 2
-----------------------------------------------
One safetensors file. Nothing in it is pickled; loading never runs code. The user's data
(tables, parameters, batches) is *not* saved: it belongs to the model's checkpoint.

Tensors (all 1-D ``uint8``, masks bit-packed by :func:`distsparse.masks.pack_bits`: one
bit per element in row-major order, most significant bit first, last byte zero-padded;
1 keeps, 0 prunes):

* ``mask/<group name>`` — every *replicated* group, pending ones included (identical on
  all ranks; written from the writer's own copy).
* ``piece/<row>,<col>/<group name>`` — a *sharded* group (FSDP2/HSDP ``Shard(0)`` rows, or
  TorchRec rectangles) is stored as the pieces its ranks hold, as they are: each piece is
  the rectangle at ``(row, col)`` of the mask viewed 2-D (dim 0 by the product of the
  others), packed row-major. No rank ever assembles the table. On load each rank reads the
  pieces that overlap its own rows or rectangles and unpacks their overlap into its mask,
  so a file loads on any sharding, world size, DDP or a single process.
* ``local/<rank>/<group name>`` — every *local* group's mask on rank ``<rank>`` (absent
  when that rank holds the group without a mask yet).

Group names are used verbatim after the prefix (they may contain ``.`` and ``/``); the
authoritative list of groups and pieces is the JSON below, never a parse of the keys.

``__metadata__`` (str → str, as safetensors requires):

* ``format`` = ``"distsparse.checkpoint"``, ``format_version`` = ``"2"``;
* ``state`` — JSON text (sorted keys, no spaces)::

      {"sparsifier": {"class": "DataNormSparsifier", "format_version": 1,
                      "args": {"norm": "L1"}, "defaults": {...}, "step_count": 12},
       "world_size": 2,
       "groups": {"emb.weight": {"scope": "replicated", "config": {...}, "shape": [1000, 64]},
                  "big.weight": {"scope": "sharded", "config": {...}, "shape": [4000000, 64],
                                 "pieces": [[0, 0, 2000000, 64, 63999872], ...]},
                  "batch":      {"scope": "local", "config": {...}, "shapes": [[32, 16], [32, 16]]}},
       "scheduler": {...BaseDataScheduler.state_dict()...} or null,
       "checksums": {"mask/emb.weight": "<sha256 hex of the tensor's bytes>", ...}}

  ``pieces`` lists ``[row, col, rows, cols, zeros]`` (they tile the table exactly; ``zeros``
  counts the piece's pruned elements, for ``sparsity()`` without reading every piece).
  ``shapes`` of a local group lists each saved rank's shape (per-rank data may differ).
* ``json_sha256`` — sha256 hex of the ``state`` text (UTF-8), guarding it and, through
  ``checksums``, every tensor.

Version 1 (still read) stored sharded groups whole, as ``mask/<name>`` with scope
``replicated``. The bytes are deterministic: identical runs write identical files.

Writing
-------
Rank 0 writes. Every rank's facts (groups, configs, shapes, which pieces it holds; a few
bytes per group) travel in one all-gather, so every rank agrees on the file's layout (or
raises the same error). The other ranks then send rank 0 their pieces and local masks one
after the other, point to point; rank 0 streams them into the file
(:class:`~distsparse.safetensors_stream.StreamingSafetensorsWriter`, checksums computed on
the way, header written last), holding one piece at a time. It writes a temporary file
``.<name>.tmp-<pid>-<8 hex>`` beside the target (the *real* file when the target is a
symlink, which stays a link; a shortened ``.<start>~<hash>`` prefix for names near
``NAME_MAX``), holding an exclusive ``flock`` on it, fsyncs it, ``os.replace``\\ s it onto the
target and fsyncs the folder. A crash or kill at any moment leaves the previous checkpoint
whole. The next save removes temporary files of the same target that it can lock (their
writer is gone): a live save of another thread, process or host is never touched. Every
rank returns only after the file is complete, and an error on the writer is raised on every
rank (it still receives every piece, so no sender hangs).

A save refuses (:class:`CheckpointError`) to replace a file another process group of the
same job wrote: the first group of a job to save to a path claims it in the job's store
(the default process group's), under a lock on the folder. Files of earlier jobs are
replaced. Nothing of this is written into the file. Headers over safetensors'
100,000,000-byte limit are refused before writing, in distsparse's words.

Loading
-------
Every rank reads the file's header and compares (sha256 of header and file size, one small
all-gather) with the others. When all see the same file, each rank memory-maps it
(``safetensors.safe_open``) and reads only the tensors it needs: the pieces overlapping its
rows or rectangles, the replicated masks, its own local masks. Otherwise rank 0 reads the
file and sends each rank only the tensors it asked for (no shared filesystem needed). Every
rank then verifies before changing anything: the safetensors layout (header length, JSON,
dtypes, offsets covering the file exactly), ``format``/``format_version``, the JSON
checksum, every JSON field (types and ranges; configs by the sparsifier, the scheduler's
values by the scheduler), the checksum and padding of every tensor it read, each mask's size
against its group's shape, the sparsifier's own validation (``strict`` semantics, class,
shapes, scopes, configs, *geometry*: see ``config`` in :func:`load_checkpoint`) and the
scheduler state. If any rank finds a problem, every rank raises :class:`CheckpointError`
naming the file (and the group) and no rank changes any state. Then every rank unpacks its
parts straight into its existing masks.

Limitations:
    A checkpoint loads on any world size, but *local* groups' masks are per rank: on
    another world size they start fresh, with a warning. A rank verifies the tensors it
    reads (so a damaged piece is found by the rank that reads it, and then every rank
    refuses the file); a piece no rank reads (a local mask of another world size) is not
    verified. Loading a whole (replicated) mask into a sharded group reads the whole mask.
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

from .distributed.comm import RankDisagreementError, RemoteError, describe_differences, mark_raised_everywhere
from .masks import pack_bits, packed_size, unpack_bits

if TYPE_CHECKING:  # pragma: no cover
    from .scheduler import BaseDataScheduler
    from .sparsifier import BaseDataSparsifier

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
    "CheckpointNotFoundError",
    "verify_checkpoint",
    "FORMAT",
    "FORMAT_VERSION",
]

#: ``__metadata__["format"]`` of every distsparse checkpoint.
FORMAT = "distsparse.checkpoint"
#: ``__metadata__["format_version"]`` written by this version (it also reads version 1).
FORMAT_VERSION = "2"
_READABLE_VERSIONS = ("1", "2")

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

# Bytes per point-to-point message of a mask (bounds the writer's receive buffer).
_CHUNK = 32 << 20


def _view2d(shape: Any) -> tuple[int, int]:
    """A mask's shape as the 2-D (rows, row length) its pieces cut: dim 0 by the rest."""
    shape = [int(s) for s in shape]
    return (shape[0] if shape else 1), math.prod(shape[1:])


def _piece_key(name: str, row: int, col: int) -> str:
    return f"piece/{row},{col}/{name}"


def _zeros(mask: torch.Tensor) -> int:
    return int(mask.numel() - int(mask.count_nonzero()))


@dataclass
class _Contribution:
    """What one rank brings to a save: JSON facts (every rank's are all-gathered: small)
    and the packed masks only it can send (its pieces of sharded groups, its local masks)."""

    facts: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def _rank_payload(sparsifier: BaseDataSparsifier) -> _Contribution:
    """This rank's facts and packed masks."""
    sd = sparsifier._state(clone=False)  # the live masks: only packed (copied bit-packed) here
    shared_groups: dict[str, Any] = {}
    local: dict[str, Any] = {}
    pieces: dict[str, list[list[int]]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(sd["groups"]):
        entry = sd["groups"][name]
        mask = sd["masks"].get(name)
        shape = [int(s) for s in entry["shape"]]
        sharded, rects = entry.get("sharded"), entry.get("rects")
        if rects is not None or sharded is not None:
            # Rows or rectangles of a table that lives on several ranks: each rank sends its
            # own pieces, the file keeps them as they are (no rank assembles the table).
            shared_groups[name] = {"scope": "sharded", "config": entry["config"], "shape": shape}
            mine: list[list[int]] = []
            if rects is not None:
                group = sparsifier._groups[name]
                views = group.shard_masks(mask)
                for (r, c, rows, cols), view in zip(rects["shards"], views):
                    if rows and cols:
                        mine.append([r, c, rows, cols, _zeros(view)])
                        tensors[_piece_key(name, r, c)] = _pack(view)
            elif sharded["contributes"] and mask.numel():
                rows, cols = _view2d(mask.shape)
                offset = int(sharded["dim0_offset"])
                mine.append([offset, 0, rows, cols, _zeros(mask)])
                tensors[_piece_key(name, offset, 0)] = _pack(mask)
            pieces[name] = mine
            continue
        if entry["replicated"]:
            shared_groups[name] = {"scope": "replicated", "config": entry["config"], "shape": shape}
            if mask is None:  # the sparsifier never holds a replicated group without a mask
                raise ValueError(f"group {name!r}: replicated group has no mask to save")
        else:
            shared_groups[name] = {"scope": "local", "config": entry["config"]}
            local[name] = {"shape": shape, "saved": mask is not None}
            if mask is not None:
                tensors[_local_key(sparsifier.rank, name)] = _pack(mask)
    facts = {
        "shared": {
            "sparsifier": {"class": sd["sparsifier"], "format_version": sd["format_version"],
                           "args": sd["sparsifier_args"], "defaults": sd["defaults"],
                           "step_count": int(sd["step_count"])},
            "groups": shared_groups,
        },
        "local": local,
        "pieces": pieces,
    }
    return _Contribution(facts=facts, tensors=tensors)


def _disagreement(shared: list[dict[str, Any]]) -> str | None:
    """Describe how ranks' shared facts differ, or None when they agree."""
    if all(s == shared[0] for s in shared):
        return None
    problems = describe_differences([{"sparsifier": s["sparsifier"]} for s in shared], noun="state of")
    problems += describe_differences([s["groups"] for s in shared])
    return "\n  ".join(problems) or "the ranks' sparsifier states differ"


@dataclass
class _FilePlan:
    """The file every rank agrees on before the writer writes a byte: the JSON state (its
    checksums still placeholders) and the tensors in file order, each with the rank that
    sends it (``None``: the writer's own replicated mask)."""

    state: dict[str, Any]
    tensors: list[tuple[str, int | None, str, int]]  # (key, source rank, group name, bytes)


def _file_plan(all_facts: list[dict[str, Any]], scheduler_state: dict[str, Any] | None) -> _FilePlan:
    """Raises ``ValueError`` naming the group when sharded pieces do not tile their table."""
    from .distributed.rects import layout_from_gathered

    world_size = len(all_facts)
    shared = all_facts[0]["shared"]
    groups: dict[str, Any] = {}
    order: list[tuple[str, int | None, str, int]] = []
    for name in sorted(shared["groups"]):
        entry = shared["groups"][name]
        if entry["scope"] == "replicated":
            groups[name] = dict(entry)
            order.append((_mask_key(name), None, name, packed_size(math.prod(entry["shape"]))))
        elif entry["scope"] == "sharded":
            per_rank = [facts["pieces"][name] for facts in all_facts]
            layout_from_gathered(name, _view2d(entry["shape"]), [[p[:4] for p in mine] for mine in per_rank], 0)
            found = sorted((p, rank) for rank, mine in enumerate(per_rank) for p in mine)
            groups[name] = {**entry, "pieces": [p for p, _ in found]}
            for (r, c, rows, cols, _), rank in found:
                order.append((_piece_key(name, r, c), rank, name, packed_size(rows * cols)))
        else:
            shapes = [facts["local"][name]["shape"] for facts in all_facts]
            groups[name] = {**entry, "shapes": shapes}
            for rank, facts in enumerate(all_facts):
                if facts["local"][name]["saved"]:
                    order.append((_local_key(rank, name), rank, name, packed_size(math.prod(shapes[rank]))))
    state = {
        "sparsifier": shared["sparsifier"],
        "world_size": world_size,
        "groups": groups,
        "scheduler": scheduler_state,
        "checksums": {key: "0" * 64 for key, _, _, _ in order},
    }
    return _FilePlan(state=state, tensors=order)


def _metadata(state: dict[str, Any]) -> dict[str, str]:
    text = json.dumps(state, sort_keys=True, allow_nan=False, separators=(",", ":"))
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "state": text,
            "json_sha256": _sha256(text.encode("utf-8"))}


class _FdFile:
    """The few file methods the streaming writer needs, on a raw descriptor (``os.write``
    in a loop: short writes are resumed)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        total = len(view)
        while view:
            written = os.write(self._fd, view[: 1 << 30])
            view = view[written:]
        return total

    def seek(self, offset: int, whence: int = 0) -> int:
        return os.lseek(self._fd, offset, whence)


def _stream_file(fileobj: Any, plan: _FilePlan, next_tensor: Callable[[str, int | None, int], Iterator[torch.Tensor]],
                 where: str) -> None:
    """Write the checkpoint described by ``plan`` to ``fileobj``: every tensor's chunks come
    from ``next_tensor(key, source, nbytes)`` in file order; checksums land in the header."""
    from .safetensors_stream import StreamingSafetensorsWriter

    specs = [(key, torch.uint8, (nbytes,)) for key, _, _, nbytes in plan.tensors]
    placeholder = _metadata(plan.state)
    header = len(json.dumps(placeholder, separators=(",", ":"))) + 200 * (len(specs) + 1)
    if header > _MAX_HEADER:
        raise ValueError(f"the {where} needs a safetensors header of about {header:,} bytes (names, configs and "
                         f"checksums of {len(specs):,} tensors), over safetensors' limit of {_MAX_HEADER:,} bytes; "
                         "split the groups over several sparsifiers, each saved to its own file")
    writer = StreamingSafetensorsWriter(fileobj, specs, placeholder)
    for key, source, _, nbytes in plan.tensors:
        for chunk in next_tensor(key, source, nbytes):
            writer.write(key, chunk)
    state = dict(plan.state)
    state["checksums"] = {key: writer.sha256(key) for key, _, _, _ in plan.tensors}
    writer.close(_metadata(state))


def _replicated_mask(sparsifier: BaseDataSparsifier, name: str) -> torch.Tensor:
    """The writer's own copy of a replicated group's mask (a pending group's too)."""
    group = sparsifier._groups.get(name)
    if group is not None:
        return group.mask
    mask = sparsifier._pending[name].mask
    assert mask is not None  # replicated groups always hold a mask (checked by _rank_payload)
    return mask


class _Draining:
    """Hands the writer each tensor of the plan in order and, whatever happens while it
    writes, receives the rest afterwards (:meth:`drain`): the senders never hang on a
    writer that failed (a full disk, a refused collision)."""

    def __init__(self, plan: _FilePlan, tensor: Callable[[str, int | None, int], Iterator[torch.Tensor]],
                 comm: Any) -> None:
        self._left = list(plan.tensors)
        self._tensor = tensor
        self._comm = comm
        self._current: Iterator[torch.Tensor] | None = None

    def next_tensor(self, key: str, source: int | None, nbytes: int) -> Iterator[torch.Tensor]:
        expected = self._left.pop(0)
        assert expected[0] == key, (expected, key)
        self._current = self._tensor(key, source, nbytes)
        for chunk in self._current:  # not ``yield from``: closing this must not close the transfer
            yield chunk
        self._current = None

    def drain(self) -> None:
        if self._comm.broken is not None:
            return  # a transfer failed: the other ranks already know
        if self._current is not None:
            for _ in self._current:
                pass
            self._current = None
        while self._left:
            key, source, _, nbytes = self._left.pop(0)
            for _ in self._tensor(key, source, nbytes):
                pass


def _build_file(contributions: list[_Contribution], sparsifier: BaseDataSparsifier,
                scheduler_state: dict[str, Any] | None) -> bytes:
    """The whole checkpoint as bytes, from every rank's contribution (one process: tests)."""
    import io

    plan = _file_plan([c.facts for c in contributions], scheduler_state)
    buffer = io.BytesIO()

    def tensor(key: str, source: int | None, nbytes: int) -> Iterator[torch.Tensor]:
        yield _pack(_replicated_mask(sparsifier, key[len("mask/"):])) if source is None \
            else contributions[source].tensors[key]

    _stream_file(buffer, plan, tensor, "checkpoint")
    return buffer.getvalue()


# -- point-to-point transfers (the save's gather, the load's scatter) ----------------------


def _send(comm: Any, tensor: torch.Tensor, dst: int, what: str) -> None:
    """Send ``tensor`` (1-D uint8) to group rank ``dst`` in chunks of at most ``_CHUNK``."""
    import torch.distributed as dist

    flat = tensor.reshape(-1).to(comm.device)
    for start in range(0, flat.numel(), _CHUNK):
        piece = flat[start : start + _CHUNK].contiguous()
        comm._wait(lambda: dist.isend(piece, group=comm.group, group_dst=dst), what)


def _recv(comm: Any, nbytes: int, src: int, what: str) -> Iterator[torch.Tensor]:
    """Receive ``nbytes`` sent by :func:`_send` from group rank ``src``, chunk by chunk."""
    import torch.distributed as dist

    buffer = torch.empty(min(nbytes, _CHUNK), dtype=torch.uint8, device=comm.device)
    for start in range(0, nbytes, _CHUNK):
        piece = buffer[: min(_CHUNK, nbytes - start)]
        comm._wait(lambda: dist.irecv(piece, group=comm.group, group_src=src), what)
        yield piece.cpu()


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


def _job_store() -> Any | None:
    """The default process group's store (shared by every process of this job), or None."""
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no default group / store: the job cannot be asked
        return None


def _check_not_another_group(real: Path, target: Path, group_ranks: list[int], store: Any | None) -> None:
    """Refuse to replace a checkpoint that another process group of this job wrote.

    The first group of a job to save to a path claims it in the job's store (the key is the
    real path); a later save by another group of the same job is refused. Files of earlier
    jobs are simply replaced. Nothing of this lives in the file: identical runs write
    identical bytes. Without a store (one process) nothing can collide."""
    if store is None:
        return
    mine = json.dumps(group_ranks)
    key = "distsparse/checkpoint_writer/" + hashlib.sha256(os.fsencode(str(real))).hexdigest()
    try:
        holder = store.compare_set(key, "", mine).decode()
    except Exception:  # noqa: BLE001 - a store that cannot compare: nothing to judge
        return
    if holder != mine:
        raise CheckpointError(
            f"cannot save checkpoint {str(target)!r}: the file there was written in this job by the "
            f"process group of global ranks {json.loads(holder)}, and this save comes from "
            f"global ranks {group_ranks}; sparsifiers on different process groups must save "
            "to different files (register_for_checkpointing's default filename names the ranks)")


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
    """Write ``data`` to ``target`` atomically (see :func:`_atomic_write_stream`)."""
    _atomic_write_stream(target, lambda f: f.write(data), check)


def _atomic_write_stream(target: Path, produce: Callable[[_FdFile], Any],
                         check: Callable[[Path], None] | None = None) -> None:
    """Write what ``produce(file)`` writes to ``target`` atomically: a locked temporary file
    beside the *real* file (a symlink at ``target`` is resolved and stays a link), fsync,
    rename, fsync the folder. ``check(real_path)`` runs under a folder lock just before the
    rename and may refuse it by raising. A crash at any moment leaves the previous file whole."""
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
        produce(_FdFile(fd))
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

    Rank 0 writes. The other ranks send it, one after the other, their pieces of sharded
    tables and their local masks, which it streams into the file: it never holds more than
    one piece (no rank assembles a sharded table). An error on any rank (or the writer's
    I/O error) is raised on every rank; the previous file at ``path`` then stays as it was.
    The format is described in this module's docstring. Ranks that disagree on groups,
    configs or step counts raise :class:`~distsparse.distributed.comm.RankDisagreementError`
    naming the group.
    """
    _check_scheduler(sparsifier, scheduler)
    comm = sparsifier.comm
    target = Path(os.fspath(path))
    with comm.operation("save_checkpoint"):
        _save_in_operation(comm, target, sparsifier, scheduler)
        comm.finish("save_checkpoint")


def _save_in_operation(comm: Any, target: Path, sparsifier: BaseDataSparsifier,
                       scheduler: BaseDataScheduler | None) -> None:
    mine: _Contribution | None = None
    scheduler_state = None
    error: Exception | None = None
    try:
        mine = _rank_payload(sparsifier)
        if scheduler is not None:
            scheduler_state = json.loads(json.dumps(scheduler.state_dict(), allow_nan=False))
    except Exception as exc:  # noqa: BLE001 - raised on every rank just below
        error = exc
    what = f"save_checkpoint({str(target)!r})"
    comm.raise_if_any_failed([f"{type(error).__name__}: {error}"] if error else [], what, local_error=error)
    assert mine is not None
    all_facts = [json.loads(p) for p in comm.all_gather_bytes(json.dumps(mine.facts, sort_keys=True).encode())]
    problems = _disagreement([f["shared"] for f in all_facts])
    if problems:
        raise RankDisagreementError(
            f"{what}: ranks disagree (rank {comm.rank} of {comm.world_size}):\n  "
            f"{problems}\nEvery rank must hold the same groups with the same configs.")
    try:  # every rank computes the same plan (or the same error) from the same facts
        plan = _file_plan(all_facts, scheduler_state)
    except ValueError as exc:
        raise mark_raised_everywhere(exc) from None
    del all_facts
    if comm.rank != 0:
        for key, source, _, _ in plan.tensors:
            if source == comm.rank:
                _send(comm, mine.tensors.pop(key), 0, f"send of {key!r} to the writer")
    else:
        # The writer's own status also travels in run_on_coordinator below, after it
        # received every piece (even when writing failed: the senders must not hang).
        def tensor(key: str, source: int | None, nbytes: int) -> Iterator[torch.Tensor]:
            if source is None:
                yield _pack(_replicated_mask(sparsifier, key[len("mask/"):]))
            elif source == 0:
                yield mine.tensors.pop(key)
            else:
                yield from _recv(comm, nbytes, source, f"receive of {key!r} from rank {source}")

    def write() -> None:
        received = _Draining(plan, tensor, comm)
        try:
            ranks, store = comm.global_ranks(), _job_store() if comm.is_distributed else None
            _atomic_write_stream(target, lambda f: _stream_file(f, plan, received.next_tensor, "checkpoint"),
                                 check=lambda real: _check_not_another_group(real, target, ranks, store))
        finally:
            received.drain()

    # The broadcast of the writer's status is also the barrier: nobody leaves before the
    # file is complete, and a writer error is raised everywhere.
    comm.run_on_coordinator(write, encode=lambda _: b"", decode=lambda _: None)


# ----------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------

# Mask elements unpacked at a time while a load writes into the existing masks.
_UNPACK_ELEMENTS = 1 << 22


@dataclass
class _Parsed:
    """A verified header: the tensors' specs and the JSON state (checked against its checksum
    and schema); no tensor was read yet."""

    specs: dict[str, dict[str, Any]]
    state: dict[str, Any]
    header_size: int  # n: bytes of JSON after the 8-byte length


def _probe(target: Path) -> tuple[bytes, bytes, int]:
    """(status, the file's head: length field + header, file size). Status: b"\\x00" + sha256
    of head and size (ranks compare it: do they see the same file?), or b"\\x01"/b"\\x02" +
    message (not found / other I/O error)."""
    try:
        with open(target, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) == 8:
                n = int.from_bytes(head, "little")
                if n <= min(_MAX_HEADER, size - 8):
                    head += f.read(n)
    except FileNotFoundError:
        return b"\x01" + f"checkpoint file {str(target)!r} does not exist".encode(), b"", 0
    except OSError as exc:
        return b"\x02" + f"cannot read checkpoint file {str(target)!r}: {exc}".encode(), b"", 0
    return b"\x00" + hashlib.sha256(head + size.to_bytes(8, "little")).digest(), head, size


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _header_size(blob: bytes) -> int:
    return int.from_bytes(blob[:8], "little")


def _check_layout(blob: bytes, where: str) -> dict[str, Any]:
    """Parse the safetensors framing of a whole file; return the header (with ``__metadata__``)."""
    return _check_head(blob[: 8 + _header_size(blob)] if len(blob) >= 8 else blob, len(blob), where)


def _check_head(head: bytes, size: int, where: str) -> dict[str, Any]:
    """Parse the safetensors framing from the file's ``head`` (length field + header) and
    its ``size``; return the header (with ``__metadata__``)."""
    if size == 0:
        raise CheckpointError(f"{where}: the file is empty")
    if size < 8:
        raise CheckpointError(f"{where}: the file is {size} bytes, too short for a safetensors header (truncated?)")
    n = int.from_bytes(head[:8], "little")
    if n > _MAX_HEADER or n > size - 8 or len(head) < 8 + n:
        raise CheckpointError(f"{where}: the header length field says {n} bytes but the file has {size - 8} after it "
                              "(truncated, damaged, or not a safetensors file)")
    try:
        header = json.loads(head[8 : 8 + n].decode("utf-8"))
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




def _parse_head(head: bytes, size: int, where: str) -> _Parsed:
    """Verify everything the header alone can tell: framing, format and version, the JSON
    state's checksum and schema, every tensor's spec and that the tensors are the groups'."""
    header = _check_head(head, size, where)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a distsparse checkpoint (its safetensors metadata lacks "
                              f"format={FORMAT!r}); write checkpoints with distsparse.save_checkpoint")
    version = meta.get("format_version")
    if version not in _READABLE_VERSIONS:
        raise CheckpointError(f"{where}: checkpoint format_version {version!r} is not supported; this "
                              f"distsparse reads versions {', '.join(map(repr, _READABLE_VERSIONS))} "
                              "(upgrade distsparse?)")
    from .file_state import checked_json  # file_state builds on this module

    state = checked_json(meta, where)
    n = _header_size(head)
    _check_tensor_specs(header, size - 8 - n, where)
    _check_state_schema(state, where, version)
    specs = {k: v for k, v in header.items() if k != "__metadata__"}
    checksums = state["checksums"]
    if set(specs) != set(checksums):
        extra = sorted(set(specs) - set(checksums))
        lacking = sorted(set(checksums) - set(specs))
        raise CheckpointError(f"{where}: tensors do not match the checksum list (unexpected: {extra}, "
                              f"missing: {lacking}; damaged file)")
    _check_tensor_keys(state, specs, where)
    return _Parsed(specs=specs, state=state, header_size=n)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_state_schema(state: Any, where: str, version: str = FORMAT_VERSION) -> None:
    """Every JSON field a load trusts has the type and range it must have (the values of
    configs are the sparsifier's to check, the scheduler's state the scheduler's)."""
    from .distributed.rects import layout_from_gathered

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
            or not isinstance(sp["args"], dict)):
        raise bad("'sparsifier' must hold class, format_version, args, defaults and step_count")
    if not _is_count(sp["step_count"]):
        raise bad(f"sparsifier step_count must be an int >= 0, got {sp['step_count']!r}")
    if not _is_count(sp["format_version"]):
        raise bad(f"sparsifier format_version must be an int, got {sp['format_version']!r}")
    ws = state["world_size"]
    if not isinstance(ws, int) or isinstance(ws, bool) or ws < 1:
        raise bad(f"world_size must be a positive int, got {ws!r}")
    if not isinstance(state["groups"], dict):
        raise bad("'groups' must be an object")
    scopes = ("replicated", "local") if version == "1" else ("replicated", "local", "sharded")
    for name, entry in state["groups"].items():
        if not isinstance(entry, dict) or entry.get("scope") not in scopes \
                or not isinstance(entry.get("config"), dict):
            raise bad(f"group {name!r} needs a scope ({' or '.join(map(repr, scopes))}) and a config")
        if entry["scope"] in ("replicated", "sharded") and not _is_shape(entry.get("shape")):
            raise bad(f"group {name!r} needs a shape (a list of ints >= 0), got {entry.get('shape')!r}")
        if entry["scope"] == "sharded":
            pieces = entry.get("pieces")
            if not isinstance(pieces, list) or not all(_is_shape(p) and len(p) == 5 for p in pieces):
                raise bad(f"group {name!r} of scope 'sharded' needs its pieces as [row, col, rows, cols, zeros] "
                          "lists of ints >= 0")
            if any(p[4] > p[2] * p[3] for p in pieces):
                raise bad(f"group {name!r}: a piece counts more zeros than it has elements")
            try:
                layout_from_gathered(name, _view2d(entry["shape"]), [[p[:4] for p in pieces]], 0)
            except ValueError as exc:
                raise bad(str(exc)) from None
        if entry["scope"] == "local":
            shapes = entry.get("shapes")
            if not isinstance(shapes, list) or len(shapes) != ws or not all(_is_shape(s) for s in shapes):
                raise bad(f"group {name!r} needs one shape per saved rank ({ws})")
    if state["scheduler"] is not None and not isinstance(state["scheduler"], dict):
        raise bad("'scheduler' must be an object or null")
    checksums = state["checksums"]
    if not isinstance(checksums, dict) or not all(isinstance(v, str) and _HEX64.match(v) for v in checksums.values()):
        raise bad("'checksums' must map tensor keys to sha256 hex digests")


def _pieces(state: dict[str, Any], name: str) -> list[tuple[str, int, int, int, int, int | None]]:
    """A shared group's stored pieces: (key, row, col, rows, cols, zeros or None) over the
    mask viewed 2-D (:func:`_view2d`). A replicated group is one piece, the whole mask."""
    entry = state["groups"][name]
    if entry["scope"] == "replicated":
        rows, cols = _view2d(entry["shape"])
        return [(_mask_key(name), 0, 0, rows, cols, None)]
    return [(_piece_key(name, r, c), r, c, rows, cols, zeros) for r, c, rows, cols, zeros in entry["pieces"]
            if rows and cols]


def _check_tensor_keys(state: dict[str, Any], specs: dict[str, dict[str, Any]], where: str) -> None:
    """Every group has its masks; every tensor belongs to a group; sizes fit."""
    expected: dict[str, tuple[str, int]] = {}
    for name, entry in state["groups"].items():
        if entry["scope"] == "local":
            for rank, shape in enumerate(entry["shapes"]):
                expected[_local_key(rank, name)] = (name, math.prod(shape))
            continue
        for key, _, _, rows, cols, _ in _pieces(state, name):
            if key not in specs:
                raise CheckpointError(f"{where}: group {name!r}: the mask tensor {key!r} is missing")
            expected[key] = (name, rows * cols)
    unknown = sorted(set(specs) - set(expected))
    if unknown:
        raise CheckpointError(f"{where}: tensors {unknown} belong to no group of the checkpoint (damaged file)")
    for key in sorted(specs):
        name, numel = expected[key]
        size = specs[key]["shape"][0]
        if size != packed_size(numel):
            raise CheckpointError(f"{where}: group {name!r}: packed mask {key!r} has {size} uint8 bytes; "
                                  f"{numel} elements needs {packed_size(numel)} uint8 bytes")


# -- what this rank reads, and where it goes ------------------------------------------------


@dataclass
class _Target:
    """Where a group's mask goes on this rank: regions ``(row, col, rows, cols)`` of the
    mask viewed 2-D, each with the tensor (2-D) it is written into."""

    regions: list[tuple[int, int, int, int, torch.Tensor]]
    distributed: bool  # the group lives on several ranks: record its global zero count


def _target(sparsifier: BaseDataSparsifier, name: str, mask: torch.Tensor | None = None) -> _Target | None:
    """This rank's part of group ``name`` (None when it does not hold it); ``mask``: the
    tensor to write into (default: the group's own mask, when its shape fits the saved one)."""
    group = sparsifier._groups.get(name)
    if mask is not None or group is None:
        if mask is None:
            return None
        rows, cols = _view2d(mask.shape)
        return _Target([(0, 0, rows, cols, mask.view(rows, cols))], distributed=False)
    own = group.mask
    if group.rects is not None:
        views = group.shard_masks()
        return _Target([(r, c, int(t.shape[0]), int(t.shape[1]), view)
                        for ((r, c), t), view in zip(group.rects.local_shards(), views)], distributed=True)
    rows, cols = _view2d(own.shape)
    if group.sharded:
        return _Target([(group.layout.dim0_offset, 0, rows, cols, own.view(rows, cols))], distributed=True)
    return _Target([(0, 0, rows, cols, own.view(rows, cols))], distributed=False)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
    r0, r1 = max(a[0], b[0]), min(a[0] + a[2], b[0] + b[2])
    c0, c1 = max(a[1], b[1]), min(a[1] + a[3], b[1] + b[3])
    return (r0, r1, c0, c1) if r0 < r1 and c0 < c1 else None


def _copy_piece(packed: torch.Tensor, piece: tuple[int, int, int, int], region: tuple[int, int, int, int],
                out: torch.Tensor) -> None:
    """Unpack the part of ``piece`` (its bits: ``packed``) that lies in ``region`` straight
    into ``out`` (the region's 2-D tensor), a few million elements at a time."""
    import numpy as np

    hit = _overlap(piece, region)
    if hit is None:
        return
    r0, r1, c0, c1 = hit
    pr, pc, _, pcs = piece
    tr, tc = region[0], region[1]
    data = packed.numpy()
    if (c0, c1) == (pc, pc + pcs) and (c0, c1) == (tc, tc + region[3]) and out.is_contiguous() \
            and out.device.type == "cpu" and ((r0 - pr) * pcs) % 8 == 0:
        # Whole rows into a contiguous region from a byte boundary: every packed byte becomes
        # 8 mask bytes in one table lookup written straight into the mask (no temporary).
        flat = out.view(-1)[(r0 - tr) * pcs : (r1 - tr) * pcs].numpy().view(np.uint8)
        whole = flat.size // 8
        byte0 = (r0 - pr) * pcs // 8
        words = flat[: 8 * whole].view(np.uint64)
        step = _UNPACK_ELEMENTS // 8  # bounds the index array numpy converts the bytes into
        for at in range(0, whole, step):
            # mode="clip": numpy writes into ``out`` directly ("raise" buffers a whole copy).
            np.take(_BYTE_TO_BOOLS, data[byte0 + at : byte0 + min(whole, at + step)], out=words[at : at + step],
                    mode="clip")
        if flat.size > 8 * whole:  # the last bits of the piece
            flat[8 * whole :] = np.unpackbits(data[byte0 + whole : byte0 + whole + 1])[: flat.size - 8 * whole]
        return
    step = max(1, _UNPACK_ELEMENTS // max(pcs, 1))
    for a in range(r0, r1, step):
        b = min(r1, a + step)
        bit0, bit1 = (a - pr) * pcs, (b - pr) * pcs
        byte0 = bit0 // 8
        bits = np.unpackbits(data[byte0 : (bit1 + 7) // 8])[bit0 - 8 * byte0 : bit1 - 8 * byte0]
        rows = torch.from_numpy(bits).view(torch.bool).view(b - a, pcs)
        out[a - tr : b - tr, c0 - tc : c1 - tc].copy_(rows[:, c0 - pc : c1 - pc])


def _byte_to_bools() -> Any:
    """For each byte value, its 8 bits (most significant first) as 8 bytes 0/1, read as one
    ``uint64`` in memory order: ``take`` of packed bytes then writes unpacked masks."""
    import numpy as np

    return np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).copy().view(np.uint64).reshape(256)


_BYTE_TO_BOOLS = _byte_to_bools()


def _popcount_zeros(packed: torch.Tensor, numel: int) -> int:
    import numpy as np

    ones = int(np.unpackbits(packed.numpy(), count=numel).sum(dtype=np.int64)) if numel else 0
    return numel - ones


def _needed_keys(parsed: _Parsed, sparsifier: BaseDataSparsifier) -> list[str]:
    """The tensors this rank reads: the pieces that overlap its part of each group (every
    piece for a group it does not hold yet), its own local masks."""
    state = parsed.state
    same_world = state["world_size"] == sparsifier.world_size
    needed: list[str] = []
    for name in sorted(state["groups"]):
        entry = state["groups"][name]
        if entry["scope"] == "local":
            key = _local_key(sparsifier.rank, name)
            if same_world and key in parsed.specs:
                needed.append(key)
            continue
        try:
            target = _target(sparsifier, name)
        except (RuntimeError, ValueError):
            target = None
        for key, r, c, rows, cols, zeros in _pieces(state, name):
            # A whole mask loaded into a sharded group is read whole: its zero count (the
            # group's sparsity) is not recorded in the file.
            if target is None or (target.distributed and zeros is None) or \
                    any(_overlap((r, c, rows, cols), reg[:4]) for reg in target.regions):
                needed.append(key)
    return needed


def _check_tensors(parsed: _Parsed, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor read matches its checksum; packed masks have zero padding bits."""
    numel_of: dict[str, tuple[str, int]] = {}
    for name, entry in parsed.state["groups"].items():
        if entry["scope"] == "local":
            for rank, shape in enumerate(entry["shapes"]):
                numel_of[_local_key(rank, name)] = (name, math.prod(shape))
        else:
            for key, _, _, rows, cols, _ in _pieces(parsed.state, name):
                numel_of[key] = (name, rows * cols)
    for key in sorted(tensors):
        t = tensors[key]
        if _sha256(memoryview(t.numpy())) != parsed.state["checksums"][key]:
            raise CheckpointError(f"{where}: tensor {key!r} does not match its sha256 checksum (damaged file)")
        name, numel = numel_of[key]
        pad = (-numel) % 8
        if pad and t.numel() and int(t[-1]) & ((1 << pad) - 1):
            raise CheckpointError(f"{where}: group {name!r}: packed mask {key!r} has nonzero padding bits")


def _sparsifier_state(parsed: _Parsed, tensors: dict[str, torch.Tensor], sparsifier: BaseDataSparsifier
                      ) -> tuple[dict[str, Any], dict[str, Callable[[Any], int | None]]]:
    """The ``state_dict`` this rank loads, and how each held group's mask is written in place.

    Groups this rank holds get a zero-memory stand-in mask (validation looks at shapes only)
    and a *fill*: at commit it unpacks the pieces straight into the existing mask. Groups not
    added yet (pending) get a real mask. Local masks of another world size start fresh."""
    state = parsed.state
    saved_ws = state["world_size"]
    rank, world_size = sparsifier.rank, sparsifier.world_size
    same_world = saved_ws == world_size
    groups: dict[str, Any] = {}
    masks: dict[str, torch.Tensor] = {}
    fill: dict[str, Callable[[Any], int | None]] = {}
    for name in sorted(state["groups"]):
        entry = state["groups"][name]
        held = sparsifier._groups.get(name)
        if entry["scope"] == "local":
            key = _local_key(rank, name)
            if same_world:
                shape = tuple(entry["shapes"][rank])
                if key in tensors:
                    pieces = [(key, 0, 0, *_view2d(shape), None)]
                    masks[name] = _stand_in(name, shape, pieces, tensors, held, fill, sparsifier)
            else:
                # Fresh start: the mask does not depend on the saved shape, and per-rank data
                # (batches) may well have another shape on another world size.
                if held is not None and not held.replicated:
                    shape = tuple(held.data.shape)
                elif name in sparsifier._pending and not sparsifier._pending[name].replicated:
                    shape = tuple(sparsifier._pending[name].shape)
                else:
                    shape = tuple(entry["shapes"][0])
            groups[name] = {"config": entry["config"], "shape": list(shape), "replicated": False}
            continue
        shape = tuple(entry["shape"])
        groups[name] = {"config": entry["config"], "shape": list(shape), "replicated": True}
        masks[name] = _stand_in(name, shape, _pieces(state, name), tensors, held, fill, sparsifier)
    sp = state["sparsifier"]
    sd = {
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
    return sd, fill


def _stand_in(name: str, shape: tuple[int, ...], pieces: list[tuple[str, int, int, int, int, int | None]],
              tensors: dict[str, torch.Tensor], held: Any, fill: dict[str, Callable[[Any], int | None]],
              sparsifier: BaseDataSparsifier) -> torch.Tensor:
    """The mask entry of a state to validate: a stand-in plus a fill when the group is held
    with the saved shape, else the real mask (pending group, or a mismatch to report)."""
    if held is None or tuple(held.data.shape) != shape:
        mask = torch.empty(shape, dtype=torch.bool)
        target = _target(sparsifier, name, mask)
        assert target is not None
        for key, r, c, rows, cols, _ in pieces:
            for region in target.regions:
                _copy_piece(tensors[key], (r, c, rows, cols), region[:4], region[4])
        return mask

    def write(group: Any) -> int | None:
        target = _target(sparsifier, name)
        assert target is not None
        for key, r, c, rows, cols, _ in pieces:
            if key in tensors:
                for region in target.regions:
                    _copy_piece(tensors[key], (r, c, rows, cols), region[:4], region[4])
        if not target.distributed:
            return None
        if all(z is not None for *_, z in pieces):
            return sum(z for *_, z in pieces)  # type: ignore[misc]
        return sum(_popcount_zeros(tensors[key], rows * cols) for key, _, _, rows, cols, _ in pieces)

    fill[name] = write
    return torch.zeros((), dtype=torch.bool).expand(shape)


def _read_local(target: Path, parsed: _Parsed, keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors ``keys``, memory-mapped from the file (safetensors), each read once."""
    from safetensors import SafetensorError, safe_open

    if not keys:
        return {}
    try:
        with safe_open(str(target), framework="pt") as f:
            return {key: f.get_slice(key)[:].contiguous() for key in keys}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {str(target)!r}: safetensors cannot read the file ({exc})") from None


def _read_span(f: Any, parsed: _Parsed, key: str) -> torch.Tensor:
    start, end = parsed.specs[key]["data_offsets"]
    f.seek(8 + parsed.header_size + start)
    data = bytearray(end - start)
    view, at = memoryview(data), 0
    while at < len(data):
        n = f.readinto(view[at:])
        if not n:
            raise OSError(f"the file ended while reading tensor {key!r}")
        at += n
    return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def _scatter_from_writer(comm: Any, target: Path, parsed: _Parsed | None, needed: list[str]
                         ) -> tuple[dict[str, torch.Tensor], Exception | None]:
    """Ranks that do not see the file rank 0 sees: rank 0 reads it and sends each rank only
    the tensors that rank needs (every rank's list first travels in one small all-gather).
    A read error on rank 0 is returned there (the others get zeros and fail their checksums)."""
    requests = [json.loads(p) for p in comm.all_gather_bytes(json.dumps(needed).encode())]
    error: Exception | None = None
    if comm.rank != 0:
        assert parsed is not None or not needed
        out = {}
        for key in needed:
            nbytes = parsed.specs[key]["shape"][0]  # type: ignore[union-attr]
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            at = 0
            for chunk in _recv(comm, nbytes, 0, f"receive of {key!r} from rank 0"):
                buffer[at : at + chunk.numel()] = chunk
                at += chunk.numel()
            out[key] = buffer
        return out, None
    out = {}
    f = None
    try:
        f = open(target, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        error = CheckpointError(f"cannot read checkpoint file {str(target)!r}: {exc}")
    try:
        for rank, keys in enumerate(requests):
            for key in keys:
                nbytes = parsed.specs[key]["shape"][0] if parsed is not None and key in parsed.specs else 0
                data = None
                if f is not None and error is None:
                    try:
                        data = _read_span(f, parsed, key)  # type: ignore[arg-type]
                    except OSError as exc:
                        error = CheckpointError(f"cannot read checkpoint file {str(target)!r}: {exc}")
                if data is None:
                    data = torch.zeros(nbytes, dtype=torch.uint8)
                if rank == 0:
                    out[key] = data
                else:
                    _send(comm, data, rank, f"send of {key!r} to rank {rank}")
    finally:
        if f is not None:
            f.close()
    return out, error


def _scheduler_probe(scheduler: BaseDataScheduler, scheduler_state: dict[str, Any], where: str) -> None:
    """Load ``scheduler_state`` into a copy of ``scheduler``: raises what loading would."""
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


def load_checkpoint(path: str | os.PathLike[str], sparsifier: BaseDataSparsifier,
                    scheduler: BaseDataScheduler | None = None, strict: bool = True, *,
                    config: str = "sparsifier") -> None:
    """Restore masks, configs and step count (and the scheduler's state) from ``path``.
    *Collective*: every rank calls it.

    Everything is verified first (see this module's docstring); on any problem, on any
    rank, every rank raises :class:`CheckpointError` (a ``ValueError``;
    :class:`CheckpointNotFoundError` for a missing file) naming the file, and neither the
    sparsifier nor the scheduler changes on any rank. ``strict`` is the sparsifier's:
    ``True`` refuses a checkpoint that lacks a group the sparsifier has. Groups in the file
    that were not added yet wait for ``add_data`` (see ``BaseDataSparsifier.load_state_dict``).
    With ``scheduler=None`` a saved scheduler state is ignored.

    ``config`` says whose *geometry* wins when the file's differs from the sparsifier's
    (``sparse_block_shape``, ``zeros_per_block`` and any other config key but the
    scheduled ``sparsity_level``): ``"sparsifier"`` (default) refuses the checkpoint,
    naming the group, the field and both values; ``"checkpoint"`` takes the file's. Values
    the schedule drives (``sparsity_level``) always come from the checkpoint.
    """
    _check_scheduler(sparsifier, scheduler)
    from .sparsifier import check_config_source

    check_config_source(config)
    comm = sparsifier.comm
    target = Path(os.fspath(path))
    where = f"checkpoint {str(target)!r}"
    with comm.operation("load_checkpoint"):
        sd, fill, scheduler_state = _load_in_operation(comm, target, where, sparsifier, scheduler, strict, config)
        comm.finish("load_checkpoint")
    # Commit: both states were validated on every rank.
    snapshot = scheduler.state_dict() if scheduler is not None else None
    if scheduler is not None:
        scheduler.load_state_dict(scheduler_state)  # type: ignore[arg-type]
    try:
        sparsifier._load_state_dict(sd, strict, config=config, fill=fill)
    except BaseException:
        if scheduler is not None:
            scheduler.load_state_dict(snapshot)  # type: ignore[arg-type]
        raise


def _load_in_operation(comm: Any, target: Path, where: str, sparsifier: BaseDataSparsifier,
                       scheduler: BaseDataScheduler | None, strict: bool, config: str):
    """Every rank reads what it needs (from the file, or from rank 0 when it does not see the
    file rank 0 sees), verifies it and validates both states; nothing changes here."""
    status, head, size = _probe(target)
    statuses = comm.all_gather_bytes(status)
    first = statuses[0]
    if first[:1] == b"\x01":
        raise mark_raised_everywhere(CheckpointNotFoundError(first[1:].decode(errors="replace")))
    if first[:1] == b"\x02":
        raise mark_raised_everywhere(CheckpointError(first[1:].decode(errors="replace")))
    shared_file = all(s == first for s in statuses)
    if not shared_file:  # rank 0's view of the file is the truth: its header travels
        received = comm.broadcast_bytes(size.to_bytes(8, "little") + head if comm.rank == 0 else None)
        size, head = int.from_bytes(received[:8], "little"), received[8:]
    error: Exception | None = None
    parsed: _Parsed | None = None
    needed: list[str] = []
    result = None
    try:
        parsed = _parse_head(head, size, where)
        needed = _needed_keys(parsed, sparsifier)
    except Exception as exc:  # noqa: BLE001 - raised on every rank below
        error = exc
    tensors: dict[str, torch.Tensor] = {}
    if shared_file:
        if error is None:
            try:
                tensors = _read_local(target, parsed, needed)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001
                error = exc
    else:
        tensors, read_error = _scatter_from_writer(comm, target, parsed, needed if error is None else [])
        error = error or read_error
    if error is None:
        try:
            assert parsed is not None
            _check_tensors(parsed, tensors, where)
            sd, fill = _sparsifier_state(parsed, tensors, sparsifier)
            try:
                sparsifier._validate_state(sd, strict, config=config, count_zeros=False)
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"{where}: {exc}") from None
            scheduler_state = parsed.state["scheduler"]
            if scheduler is not None:
                if scheduler_state is None:
                    raise CheckpointError(f"{where}: the checkpoint holds no scheduler state "
                                          f"(it was saved without one); load it with scheduler=None")
                unknown = sorted(set(scheduler_state.get("base_param") or ()) - set(parsed.state["groups"]))
                if unknown:
                    raise CheckpointError(f"{where}: the scheduler state schedules groups {unknown} that the "
                                          "checkpoint does not hold (damaged file)")
                _scheduler_probe(scheduler, scheduler_state, where)
            result = (sd, fill, scheduler_state if scheduler is not None else None)
        except Exception as exc:  # noqa: BLE001 - raised on every rank just below
            error = exc
    try:
        comm.raise_if_any_failed([str(error)] if error else [], f"load_checkpoint({str(target)!r})",
                                 local_error=error)
    except RemoteError as exc:
        raise mark_raised_everywhere(
            CheckpointError(f"{where}: another rank refused it, nothing was loaded:\n{exc}")) from None
    assert result is not None
    return result


# ----------------------------------------------------------------------------------------
# verify (no sparsifier needed: `distsparse verify`)
# ----------------------------------------------------------------------------------------

# Bytes of a packed mask popcounted at a time while verifying.
_COUNT_CHUNK = 16 << 20


def _zeros_of(packed: torch.Tensor, numel: int) -> int:
    """Pruned elements of a packed mask (its padding bits are zero: checked before), a chunk
    of bytes at a time (no unpacked copy)."""
    import numpy as np

    data, ones = packed.numpy(), 0
    for at in range(0, data.size, _COUNT_CHUNK):
        ones += int(_BYTE_ONES[data[at : at + _COUNT_CHUNK]].sum(dtype=np.int64))
    return numel - ones


_BYTE_ONES = _byte_to_bools().view("uint8").reshape(256, 8).sum(axis=1).astype("uint8")


def verify_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a checkpoint file (format version 1 or 2) as :func:`load_checkpoint` would,
    short of a sparsifier to load into, and summarize it. Not a collective.

    Verified: the safetensors layout, ``format``/``format_version``, the JSON checksum and
    schema (the pieces of every sharded group tile its mask), that the tensors are the
    groups', every tensor's checksum and zero padding bits, and each piece's recorded zero
    count against its bits. Tensors are memory-mapped and read one at a time. Raises
    :class:`CheckpointError` naming the file and the damage (:class:`CheckpointNotFoundError`
    for a missing file).

    Returns ``{"format", "format_version", "bytes", "sparsifier", "world_size", "writer",
    "scheduler", "groups"}``; each group: ``scope``, ``shape`` (a local group: one shape per
    saved rank), ``config``, ``numel`` and measured ``zeros`` over the masks stored (summed
    over pieces and ranks), ``tensors`` (how many) and ``bytes`` (packed bytes stored).
    ``writer`` is recorded by version 1 only (else ``None``)."""
    from safetensors import SafetensorError, safe_open

    target = Path(os.fspath(path))
    where = f"checkpoint {str(target)!r}"
    status, head, size = _probe(target)
    if status[:1] == b"\x01":
        raise CheckpointNotFoundError(status[1:].decode(errors="replace"))
    if status[:1] == b"\x02":
        raise CheckpointError(status[1:].decode(errors="replace"))
    parsed = _parse_head(head, size, where)
    state = parsed.state
    groups: dict[str, Any] = {}
    try:
        with safe_open(str(target), framework="pt") as f:
            for name in sorted(state["groups"]):
                entry = state["groups"][name]
                if entry["scope"] == "local":
                    stored = [(_local_key(rank, name), math.prod(shape), None)
                              for rank, shape in enumerate(entry["shapes"])]
                    stored = [s for s in stored if s[0] in parsed.specs]
                else:
                    stored = [(key, rows * cols, zeros) for key, _, _, rows, cols, zeros in _pieces(state, name)]
                numel = zeros = nbytes = 0
                for key, count, recorded in stored:
                    packed = f.get_slice(key)[:].contiguous()
                    _check_tensors(parsed, {key: packed}, where)
                    measured = _zeros_of(packed, count)
                    if recorded is not None and recorded != measured:
                        raise CheckpointError(f"{where}: group {name!r}: piece {key!r} records {recorded} pruned "
                                              f"elements but its mask has {measured} (damaged file)")
                    numel, zeros, nbytes = numel + count, zeros + measured, nbytes + packed.numel()
                    del packed
                groups[name] = {"scope": entry["scope"],
                                "shape": entry["shapes"] if entry["scope"] == "local" else entry["shape"],
                                "config": entry["config"], "numel": numel, "zeros": zeros,
                                "tensors": len(stored), "bytes": nbytes}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{where}: safetensors cannot read the file ({exc})") from None
    version = _check_head(head, size, where)["__metadata__"]["format_version"]  # checked by _parse_head
    return {"format": FORMAT, "format_version": version, "bytes": size, "sparsifier": state["sparsifier"],
            "world_size": state["world_size"], "writer": state.get("writer"), "scheduler": state["scheduler"],
            "groups": groups}
