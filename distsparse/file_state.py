"""The checksummed JSON state that every distsparse safetensors file (sparse-data export,
pruned tables) carries in its ``__metadata__``: read the file, check its format, version and
JSON checksum, parse the JSON, load the tensors against their checksums. One place, so every
format refuses damage in the same words."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError, CheckpointNotFoundError, _sha256, check_spans_tile
from .safetensors_stream import _DTYPE_NAMES

__all__ = ["read_file", "checked_json", "parse_state", "check_tensor_specs", "tensor_digest", "load_checked_tensors"]


def read_file(target: Path, what: str) -> bytes:
    """The file's bytes; a missing or unreadable file is a ``CheckpointError`` naming ``what``."""
    try:
        return target.read_bytes()
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{what} file {str(target)!r} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {what} file {str(target)!r}: {exc}") from None


def checked_json(meta: dict[str, Any], where: str) -> Any:
    """The JSON ``state`` of a file's ``__metadata__``, parsed once its ``json_sha256`` matches."""
    text, digest = meta.get("state"), meta.get("json_sha256")
    if not isinstance(text, str) or not isinstance(digest, str):
        raise CheckpointError(f"{where}: metadata lacks 'state' or 'json_sha256' (damaged file)")
    if _sha256(text.encode("utf-8")) != digest:
        raise CheckpointError(f"{where}: the JSON state does not match its checksum (damaged file)")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"{where}: the JSON state is not valid JSON ({exc})") from None


def parse_state(header: dict[str, Any], where: str, *, fmt: str, version: str, what: str, writer: str,
                keys: tuple[str, str]) -> dict[str, Any]:
    """The verified JSON state of a file of format ``fmt``/``version`` (written by ``writer``),
    which must hold the objects named in ``keys``."""
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise CheckpointError(f"{where}: not a distsparse {what} file (its safetensors metadata lacks "
                              f"format={fmt!r}); write it with {writer}")
    if meta.get("format_version") != version:
        raise CheckpointError(f"{where}: format_version {meta.get('format_version')!r} is not supported; "
                              f"this distsparse reads version {version!r}")
    state = checked_json(meta, where)
    if not isinstance(state, dict) or not all(isinstance(state.get(k), dict) for k in keys):
        raise CheckpointError(f"{where}: malformed state: it needs {keys[0]!r} and {keys[1]!r} objects")
    return state


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of the tensor's bytes (row-major, little-endian as stored)."""
    return _sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def load_checked_tensors(blob: bytes, checksums: dict[str, Any], where: str, kind: str) -> dict[str, torch.Tensor]:
    """Every tensor of the file, each checked against ``checksums`` (keys ``<prefix>/<name>``;
    a mismatch names the ``kind`` — group or table — and the tensor)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(blob)
    except SafetensorError as exc:
        raise CheckpointError(f"{where}: safetensors cannot read the file ({exc})") from None
    if set(checksums) != set(tensors):
        raise CheckpointError(f"{where}: the checksum list does not match the tensors (damaged file)")
    for key in sorted(tensors):
        if tensor_digest(tensors[key]) != checksums[key]:
            raise CheckpointError(f"{where}: {kind} {key.split('/', 1)[1]!r}: tensor {key!r} does not match its "
                                  "sha256 checksum (damaged file)")
    return tensors


_ITEMSIZE = {tag: torch.empty(0, dtype=dtype).element_size() for dtype, tag in _DTYPE_NAMES.items()}


def _is_offsets(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def check_tensor_specs(header: dict[str, Any], expected: dict[str, tuple[str, str, list[int]]], data_size: int,
                       where: str, kind: str) -> None:
    """The file holds exactly the ``expected`` tensors (``key: (owner, dtype tag, shape)``,
    ``owner`` named as a ``kind``, "group" or "table"), each with that dtype and shape, and
    their byte spans tile the data section."""
    keys = {k for k in header if k != "__metadata__"}
    if keys != set(expected):
        raise CheckpointError(f"{where}: tensors do not match the {kind}s (unexpected: {sorted(keys - set(expected))}, "
                              f"missing: {sorted(set(expected) - keys)}; damaged file)")
    spans = []
    for key in sorted(keys):
        owner, dtype, shape = expected[key]
        spec = header[key]
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"} \
                or not _is_offsets(spec["data_offsets"]):
            raise CheckpointError(f"{where}: {kind} {owner!r}: tensor {key!r} has a malformed header entry "
                                  "(damaged file)")
        if spec["dtype"] != dtype or spec["shape"] != shape:
            raise CheckpointError(f"{where}: {kind} {owner!r}: tensor {key!r} is {spec['dtype']} {spec['shape']}, "
                                  f"expected {dtype} {shape} (damaged file)")
        start, end = spec["data_offsets"]
        if end - start != math.prod(shape) * _ITEMSIZE[dtype]:
            raise CheckpointError(f"{where}: {kind} {owner!r}: tensor {key!r}: data offsets {spec['data_offsets']} "
                                  f"do not match its shape {shape} (damaged file)")
        spans.append((start, end, key))
    check_spans_tile(spans, data_size, where)
