"""The ``distsparse`` command line: look inside a distsparse file, or verify it.

::

    distsparse inspect FILE [--json]     format, writer, groups, measured sparsity, schedule
    distsparse verify FILE               every checksum and the layout; exit 1 naming the damage
    python -m distsparse inspect FILE    the same without the console script

Every distsparse file is one safetensors file whose ``__metadata__["format"]`` names its
format. A format is one small :class:`Handler` in :data:`HANDLERS` (a summary of its JSON
state, the tensors that summary needs, and a full verification); anything else is
reported as an unknown format. ``inspect`` reads the header and only the small tensors it
needs through ``safe_open`` (memory-mapped), so it is instant on a multi-GB file;
``verify`` must read every byte, since it checks every checksum.

Exit status: 0 when all is well, 1 for a damaged file (the message names the damage),
2 for a file that is not a distsparse file (missing, not safetensors, unknown format).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from . import checkpoint as _checkpoint
from . import export as _export
from .checkpoint import CheckpointError
from .masks import unpack_bits

__all__ = ["main", "inspect_file", "verify_file", "Handler", "HANDLERS", "NotDistsparseFile"]


class NotDistsparseFile(ValueError):
    """The file is missing, is not safetensors, or has a format this version does not know."""


@dataclass(frozen=True)
class Handler:
    """How the CLI reads one format: ``summarize(state, f)`` returns the groups' summary from
    the JSON state and the open ``safe_open`` file ``f`` (``f.get_tensor(key)`` reads one
    tensor, ``f.get_slice(key)`` only its shape and dtype); ``verify(path)`` checks the whole
    file with the library's own loader and raises ``CheckpointError`` naming the damage."""

    summarize: Callable[[dict[str, Any], Any], dict[str, Any]]
    verify: Callable[[Path], None]


def _block_config(config: dict[str, Any]) -> tuple[list[int] | None, Any, Any]:
    return config.get("sparse_block_shape"), config.get("sparsity_level"), config.get("zeros_per_block")


# -- distsparse.checkpoint ---------------------------------------------------------------


def _checkpoint_summary(state: dict[str, Any], f: Any) -> dict[str, Any]:
    """Measured sparsity per group: a sharded group's pieces (format 2) record their zero
    counts in the JSON state (``verify`` checks them against the bits), so only replicated
    and local masks are read and counted."""
    groups = {}
    checksums = state.get("checksums", {})
    for name, entry in state.get("groups", {}).items():
        block, level, zeros_per_block = _block_config(entry.get("config", {}))
        scope = entry.get("scope")
        numel = zeros = stored = pieces = 0
        if scope == "sharded":
            for r, c, rows, cols, z in entry.get("pieces", []):
                key = _checkpoint._piece_key(name, r, c)
                if rows and cols and key in checksums:
                    numel, zeros, pieces = numel + rows * cols, zeros + z, pieces + 1
                    stored += math.prod(f.get_slice(key).get_shape())
        else:
            if scope == "replicated":
                keys, shapes = [_checkpoint._mask_key(name)], [entry["shape"]]
            else:  # local: one mask per saved rank, where that rank had one
                shapes = entry.get("shapes", [])
                keys = [_checkpoint._local_key(r, name) for r in range(len(shapes))]
            for key, shape in zip(keys, shapes):
                if key in checksums:
                    packed, count = f.get_tensor(key), math.prod(shape)
                    numel, zeros, pieces = numel + count, zeros + _checkpoint._zeros_of(packed, count), pieces + 1
                    stored += packed.numel()
        groups[name] = {"scope": scope, "shape": entry.get("shape", entry.get("shapes")), "dtype": None,
                        "block_shape": block, "level": level, "zeros_per_block": zeros_per_block,
                        "sparsity": None if numel == 0 else 1.0 - (numel - zeros) / numel, "bytes": stored,
                        "tensors": pieces}
    return {"sparsifier": state.get("sparsifier"), "world_size": state.get("world_size"),
            "writer": state.get("writer"), "scheduler": state.get("scheduler"), "groups": groups}


def _checkpoint_verify(path: Path) -> None:
    _checkpoint.verify_checkpoint(path)  # the loader's own checks, short of a sparsifier to load into


# -- distsparse.sparse_data ----------------------------------------------------------------


def _sparse_data_summary(state: dict[str, Any], f: Any) -> dict[str, Any]:
    groups = {}
    for name, entry in state.get("groups", {}).items():
        shape, (bh, bw), grid = entry["shape"], entry["block_shape"], entry["grid"]
        rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
        cols = shape[-1] if shape else 1
        stored = unpack_bits(f.get_tensor(_export._blocks_key(name)), tuple(grid)).to(torch.int64)
        row_h = torch.tensor([min(bh, rows - i * bh) for i in range(grid[0])], dtype=torch.int64)
        col_w = torch.tensor([min(bw, cols - j * bw) for j in range(grid[1])], dtype=torch.int64)
        covered = int((stored * row_h[:, None] * col_w[None, :]).sum())
        numel = rows * cols
        itemsize = torch.empty(0, dtype=getattr(torch, entry["dtype"])).element_size()
        groups[name] = {"scope": "replicated", "shape": shape, "dtype": entry["dtype"], "block_shape": [bh, bw],
                        "level": None, "zeros_per_block": None,
                        "sparsity": None if numel == 0 else 1.0 - covered / numel,
                        "bytes": entry["stored_blocks"] * bh * bw * itemsize + math.ceil(grid[0] * grid[1] / 8),
                        "dense_bytes": numel * itemsize}
    return {"sparsifier": state.get("sparsifier"), "world_size": None, "writer": None, "scheduler": None,
            "groups": groups}


def _sparse_data_verify(path: Path) -> None:
    _export.load_sparse_data(path)  # verifies layout, checksums, bitmaps and padding before returning


# -- distsparse.pruned_tables (written by distsparse.pruned.save_pruned_tables) ----------------

_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _pruned_summary(state: dict[str, Any], f: Any) -> dict[str, Any]:
    """Per table: the rows kept (row sparsity = pruned rows / rows) and the bytes of its remap
    and kept rows, from the header alone (no tensor is read)."""
    keys = set(f.keys())
    groups = {}
    for name, entry in state.get("tables", {}).items():
        size = 0
        for key in (f"remap/{name}", f"weight/{name}"):
            if key in keys:
                piece = f.get_slice(key)
                size += math.prod(piece.get_shape()) * _ST_ITEMSIZE.get(piece.get_dtype(), 0)
        rows, kept = entry.get("rows"), entry.get("kept")
        encoding, source = entry.get("encoding"), entry.get("source_dtype")
        groups[name] = {"scope": "replicated", "shape": entry.get("shape"),
                        "dtype": source if encoding in (None, source) else f"{source}->{encoding}",
                        "block_shape": [1, entry.get("dim")], "level": None, "zeros_per_block": None,
                        "sparsity": None if not rows else 1.0 - kept / rows, "kept_rows": kept, "bytes": size}
    return {"sparsifier": state.get("sparsifier"), "world_size": None, "writer": None, "scheduler": None,
            "groups": groups}


def _pruned_verify(path: Path) -> None:
    try:
        from .pruned import load_pruned_tables  # type: ignore[import-not-found]
    except ImportError:  # a distsparse without the serving module: the checks every format shares
        _generic_verify(path)
    else:
        load_pruned_tables(path)


def _generic_verify(path: Path) -> None:
    """The house rules every distsparse format follows: ``json_sha256`` guards the JSON
    ``state``, whose ``checksums`` hold each tensor's sha256; safetensors checks the layout."""
    from safetensors import safe_open

    where = f"{str(path)!r}"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        text = meta.get("state")
        if not isinstance(text, str) or _checkpoint._sha256(text.encode()) != meta.get("json_sha256"):
            raise CheckpointError(f"{where}: the JSON state does not match its checksum (damaged file)")
        checksums = json.loads(text).get("checksums", {})
        if set(checksums) != set(f.keys()):
            raise CheckpointError(f"{where}: tensors do not match the checksum list (damaged file)")
        for key in sorted(checksums):
            if _export._tensor_digest(f.get_tensor(key)) != checksums[key]:
                raise CheckpointError(f"{where}: tensor {key!r} does not match its sha256 checksum (damaged file)")


#: ``__metadata__["format"]`` -> how to read it. A new format is one entry.
HANDLERS: dict[str, Handler] = {
    _checkpoint.FORMAT: Handler(_checkpoint_summary, _checkpoint_verify),
    _export.FORMAT: Handler(_sparse_data_summary, _sparse_data_verify),
    "distsparse.pruned_tables": Handler(_pruned_summary, _pruned_verify),
}


def _raw_format(path: Path) -> str | None:
    """``__metadata__["format"]`` read from the raw header, or None when there is none to
    read (tells a damaged distsparse file from a foreign one when safetensors refuses it)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > _checkpoint._MAX_HEADER:
                return None
            fmt = json.loads(f.read(n))["__metadata__"]["format"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return fmt if isinstance(fmt, str) else None


def _known_format(path: Path) -> str:
    if not path.is_file():
        raise NotDistsparseFile(f"{str(path)!r}: no such file")
    fmt = _raw_format(path)
    if fmt is None:
        raise NotDistsparseFile(f"{str(path)!r}: not a safetensors file with distsparse metadata "
                                "(no readable header with a 'format')")
    if fmt not in HANDLERS:
        known = ", ".join(sorted(HANDLERS))
        raise NotDistsparseFile(f"{str(path)!r}: unknown format {fmt!r} (a safetensors file, but not one of: {known})")
    return fmt


def _open(path: Path) -> tuple[str, str | None, dict[str, Any], Any]:
    """(format, version, JSON state, open safe_open handle); NotDistsparseFile or CheckpointError."""
    from safetensors import SafetensorError, safe_open

    fmt = _known_format(path)
    try:
        f = safe_open(str(path), "pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r}: safetensors cannot open this {fmt} file ({exc}; damaged or "
                              "truncated); run `distsparse verify` for details") from None
    meta = f.metadata() or {}
    try:
        state = json.loads(meta.get("state", ""))
    except ValueError as exc:
        raise CheckpointError(f"{str(path)!r}: the JSON state is not valid JSON ({exc}; damaged file)") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r}: the JSON state is not an object (damaged file)")
    return fmt, meta.get("format_version"), state, f


def inspect_file(path: str | Path) -> dict[str, Any]:
    """A JSON-able summary of a distsparse file, reading only its header and the small
    tensors the summary needs (packed masks, block bitmaps)."""
    target = Path(path)
    fmt, version, state, f = _open(target)
    try:
        summary = HANDLERS[fmt].summarize(state, f)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{str(target)!r}: malformed {fmt} state ({type(exc).__name__}: {exc}); "
                              "run `distsparse verify` to locate the damage") from None
    return {"file": str(target), "bytes": target.stat().st_size, "format": fmt, "format_version": version,
            **summary}


def verify_file(path: str | Path) -> dict[str, Any]:
    """Check every checksum and the layout with the format's loader; raise
    ``CheckpointError`` naming the damage. Returns the file's format and version."""
    from safetensors import SafetensorError

    target = Path(path)
    fmt = _known_format(target)
    try:
        HANDLERS[fmt].verify(target)
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{str(target)!r}: {type(exc).__name__}: {exc} (damaged file)") from None
    return {"file": str(target), "format": fmt}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return "x".join(str(v) for v in value) if all(isinstance(v, int) for v in value) else json.dumps(value)
    return str(value)


def _render(info: dict[str, Any]) -> str:
    sp = info.get("sparsifier") or {}
    lines = [f"{info['file']}: {info['format']} version {info['format_version']}, {info['bytes']} bytes",
             f"  sparsifier {sp.get('class', '-')}, step_count {sp.get('step_count', '-')}, "
             f"world size {_fmt(info.get('world_size'))}"]
    writer = info.get("writer")
    if writer:
        lines.append(f"  writer: group ranks {writer.get('group_ranks')}, job world size {writer.get('world_size')}")
    cols = ["group", "scope", "shape", "dtype", "block", "level", "sparsity", "bytes"]
    rows = [[name, _fmt(g.get("scope")), _fmt(g.get("shape")), _fmt(g.get("dtype")), _fmt(g.get("block_shape")),
             _fmt(g.get("level")), _fmt(g.get("sparsity")), _fmt(g.get("bytes"))]
            for name, g in sorted(info["groups"].items())]
    widths = [max(len(r[i]) for r in [cols, *rows]) for i in range(len(cols))]
    lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    lines += [("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths))).rstrip() for r in rows]
    sch = info.get("scheduler")
    if sch:
        lines.append(f"  scheduler {sch.get('scheduler')}: last_epoch {sch.get('last_epoch')}, "
                     f"{sch.get('schedule_param')} {json.dumps(sch.get('last_param'))}")
    elif info["format"] == _checkpoint.FORMAT:
        lines.append("  scheduler: none saved")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distsparse", description="Inspect or verify distsparse files.")
    parser.add_argument("--version", action="version", version=f"distsparse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_inspect = sub.add_parser("inspect", help="print format, writer, groups, measured sparsity and schedule")
    p_inspect.add_argument("file")
    p_inspect.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p_verify = sub.add_parser("verify", help="check every checksum and the layout")
    p_verify.add_argument("file")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            info = inspect_file(args.file)
            print(json.dumps(info, indent=2) if args.json else _render(info))
        else:
            ok = verify_file(args.file)
            print(f"{ok['file']}: OK ({ok['format']}: every checksum and the layout)")
    except NotDistsparseFile as exc:
        print(f"distsparse: {exc}", file=sys.stderr)
        return 2
    except CheckpointError as exc:
        print(f"distsparse: DAMAGED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
