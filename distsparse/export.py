"""Export sparsified data as a compact block-sparse safetensors file, and load it back.

:func:`save_sparse_data` writes each group's data *with its mask applied* (what
``sparsifier.get_data(name, return_original=False)`` returns) in a block-sparse layout;
:func:`load_sparse_data` returns the dense tensors again, bit for bit. Where a checkpoint
(:mod:`distsparse.checkpoint`) holds masks to *resume training*, this file holds the
*result* — the sparse tables to ship — at a fraction of the dense size.

File format ``distsparse.sparse_data``, version 1
-------------------------------------------------
One safetensors file; nothing pickled. Each group is cut into its config's
``sparse_block_shape`` blocks on its 2-D view (:func:`distsparse.masks.as_matrix`: 1-D data
is one row, N-D data is ``(prod(shape[:-1]), shape[-1])``), partial blocks at the right and
bottom edges included; a block taller or wider than the view is clipped to the view's size
(the clipped shape is what the file records). A block is *stored* when any of its elements
is not ``+0.0`` (compared bit for bit, so a kept ``-0.0`` is stored); every other block
loads as ``+0.0``.

Tensors, per group ``<name>`` (used verbatim after the prefix):

* ``blocks/<name>`` — 1-D ``uint8``: one bit per block of the block grid, row-major over
  blocks, bit-packed by :func:`distsparse.masks.pack_bits` (1 = stored);
* ``values/<name>`` — ``(stored blocks, block rows, block cols)`` in the data's dtype, the
  stored blocks in row-major block order; elements of an edge block that lie outside the
  data are ``+0.0``.

Loading is one vectorised scatter per group: ``grid[bitmap] = values`` on the padded
block view, then a crop. ``__metadata__``: ``format`` = ``"distsparse.sparse_data"``,
``format_version`` = ``"1"``, ``state`` (JSON text) and ``json_sha256`` (its sha256)::

    {"groups": {"emb.weight": {"shape": [1000, 64], "dtype": "float32", "block_shape": [1, 4],
                               "grid": [1000, 16], "stored_blocks": 3200}},
     "sparsifier": {"class": "DataNormSparsifier", "step_count": 400},
     "checksums": {"blocks/emb.weight": "<sha256 hex of the tensor's bytes>", ...}}

Writing follows the checkpoint rules: the file is built completely, written to a temporary
file beside the target and renamed onto it (:func:`distsparse.checkpoint._atomic_write`).
Identical content gives identical bytes: the safetensors header is written with sorted keys.

Limitations:
    When distributed, the file is written by rank 0 from *its* copy of each group, so only
    replicated groups (identical on every rank) can be exported; selecting a local group
    (per-rank data such as a batch) on more than one rank raises ``ValueError`` naming it.
    Groups restored from a checkpoint but not added again (pending) hold no data and are
    not exported. A group whose config has no ``sparse_block_shape`` uses ``(1, 1)`` blocks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .checkpoint import (
    CheckpointError,
    _atomic_write,
    _check_header_limit,
    _check_layout,
    _header_size,
    _sha256,
)
from .file_state import check_tensor_specs, load_checked_tensors, parse_state, read_file
from .file_state import tensor_digest as _tensor_digest
from .masks import as_matrix, pack_bits, packed_size, unpack_bits

if TYPE_CHECKING:  # pragma: no cover
    from .sparsifier import BaseDataSparsifier

__all__ = ["save_sparse_data", "load_sparse_data", "FORMAT", "FORMAT_VERSION"]

#: ``__metadata__["format"]`` of every exported sparse-data file.
FORMAT = "distsparse.sparse_data"
#: ``__metadata__["format_version"]`` written (and the only one read) by this version.
FORMAT_VERSION = "1"

# torch dtype <-> safetensors dtype tag, for the dtypes a data group can hold.
_ST_DTYPES = {
    torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
    torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8",
}
_BY_NAME = {str(d).replace("torch.", ""): d for d in _ST_DTYPES}
# Same-size integer view of each dtype: "is this element +0.0" is "are its bits all zero".
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _values_key(name: str) -> str:
    return f"values/{name}"


def _blocks_key(name: str) -> str:
    return f"blocks/{name}"


def _block_shape(sparsifier: BaseDataSparsifier, name: str) -> tuple[int, int]:
    shape = sparsifier.data_groups[name].get("sparse_block_shape", (1, 1))
    bh, bw = (int(s) for s in shape)
    return bh, bw


def _grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int, int, int]:
    """(rows, cols, block rows, block cols) of ``shape``'s 2-D view."""
    rows, cols = as_matrix(torch.empty(shape, device="meta")).shape
    return rows, cols, -(-rows // block[0]), -(-cols // block[1])


def _stored_block(block: tuple[int, int], rows: int, cols: int) -> tuple[int, int]:
    """``block`` clipped to the 2-D view's size: a block taller or wider than the data covers
    the same elements as one of the data's own height or width, and padding to the declared
    size would cost memory for nothing (a (40000, 40000) block on a 1x1 table is 6.4 GB)."""
    return min(block[0], max(rows, 1)), min(block[1], max(cols, 1))


def _encode_group(data: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed bitmap of stored blocks, stored blocks' values) of one masked tensor."""
    bh, bw = block
    matrix = as_matrix(data.detach().to("cpu").contiguous())
    rows, cols = matrix.shape
    n_br, n_bc = -(-rows // bh), -(-cols // bw)
    pad_r, pad_c = n_br * bh - rows, n_bc * bw - cols
    if pad_r or pad_c:  # partial edge blocks: pad with +0.0 (never stored on their own)
        matrix = F.pad(matrix, (0, pad_c, 0, pad_r))
    bits = matrix.view(_BITS[matrix.element_size()])
    stored = bits.view(n_br, bh, n_bc, bw).ne(0).any(dim=3).any(dim=1)  # (n_br, n_bc)
    values = matrix.view(n_br, bh, n_bc, bw).permute(0, 2, 1, 3)[stored]  # (n_stored, bh, bw)
    return pack_bits(stored), values.contiguous()


def _selected(sparsifier: BaseDataSparsifier, names: Any) -> list[str]:
    if names is None:
        return sorted(sparsifier._groups)
    if isinstance(names, str):
        names = [names]
    selected = list(dict.fromkeys(names))
    for name in selected:
        sparsifier._group(name)  # ValueError naming the unknown group and the known ones
    return sorted(selected)


def _build(sparsifier: BaseDataSparsifier, names: list[str]) -> bytes:
    from safetensors.torch import save as st_save

    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, Any] = {}
    for name in names:
        data = sparsifier.get_data(name, return_original=False)
        if data.dtype not in _ST_DTYPES:
            raise TypeError(f"group {name!r}: cannot export dtype {data.dtype}; supported: "
                            f"{sorted(_BY_NAME)}")
        rows, cols, _, _ = _grid(tuple(data.shape), (1, 1))
        block = _stored_block(_block_shape(sparsifier, name), rows, cols)
        bitmap, values = _encode_group(data, block)
        _, _, n_br, n_bc = _grid(tuple(data.shape), block)
        tensors[_blocks_key(name)] = bitmap
        tensors[_values_key(name)] = values
        groups[name] = {"shape": [int(s) for s in data.shape], "dtype": str(data.dtype).replace("torch.", ""),
                        "block_shape": list(block), "grid": [n_br, n_bc], "stored_blocks": int(values.shape[0])}
    checksums = {key: _tensor_digest(t) for key, t in sorted(tensors.items())}
    state = {"groups": groups, "checksums": checksums,
             "sparsifier": {"class": type(sparsifier).__name__, "step_count": int(sparsifier.step_count)}}
    text = json.dumps(state, sort_keys=True, allow_nan=False)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "state": text,
                "json_sha256": _sha256(text.encode("utf-8"))}
    _check_header_limit(tensors, metadata, what=f"sparse data file of {len(names)} groups")
    return _sorted_header(st_save(tensors, metadata=metadata))


def _sorted_header(blob: bytes) -> bytes:
    """``blob`` with its safetensors header written with sorted keys.

    safetensors keeps ``__metadata__`` in a Rust ``HashMap`` whose order is random for every
    file, so two saves of the same content differed in their header bytes. The tensor bytes
    and their ``data_offsets`` (relative to the end of the header) are unchanged; the header
    is padded with spaces to a multiple of 8 bytes as safetensors writes it.
    """
    n = _header_size(blob)
    header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + n :]


def save_sparse_data(path: str | os.PathLike[str], sparsifier: BaseDataSparsifier,
                     names: Any = None) -> None:
    """Write the masked data of ``names`` (default: every added group) to ``path`` as a
    block-sparse safetensors file (format in this module's docstring), atomically.

    *Collective* when distributed: every rank of the sparsifier's group calls it with the
    same ``names``; rank 0 writes from its copy of the (replicated) groups and every rank
    returns once the file is complete. An error on any rank is raised on every rank.

    Sharded groups (FSDP2 ``DTensor`` rows, TorchRec rectangles) are written by the ranks
    holding them: each rank writes one part file beside ``path`` and rank 0 then writes
    ``path`` as the index naming them (format version 2, :mod:`distsparse.export_shards`);
    no rank gathers a table. :func:`load_sparse_data` reads it in one process, whole or by
    row range.

    Raises:
        ValueError: an unknown group name; a *local* group selected when more than one rank
            takes part (its data differs per rank: pass ``names=`` with replicated groups);
            the file's header would exceed safetensors' limit.
        TypeError: a group whose dtype safetensors cannot store.
    """
    comm = sparsifier.comm
    target = Path(os.fspath(path))
    what = f"save_sparse_data({str(target)!r})"
    selected: list[str] = []
    sharded: list[str] = []
    error: Exception | None = None
    description: dict[str, Any] = {}
    try:
        selected = _selected(sparsifier, names)
        for name in selected:
            data = sparsifier._groups[name].data
            description[name] = {"shape": list(data.shape), "dtype": str(data.dtype),
                                 "scope": "replicated" if sparsifier._groups[name].replicated else "local",
                                 "block_shape": list(_block_shape(sparsifier, name))}
        sharded = [n for n in selected if sparsifier._groups[n].distributed_rows]
        for name in sharded:
            description[name]["scope"] = "sharded"
        local = [n for n in selected if description[n]["scope"] == "local"]
        if local and comm.world_size > 1:
            raise ValueError(
                f"local groups {local} hold different data on each of the {comm.world_size} ranks and "
                "cannot be exported to one file; pass names= with replicated groups only "
                f"(replicated here: {[n for n in selected if n not in local]})")
    except Exception as exc:  # noqa: BLE001 - raised on every rank just below
        error = exc
        description = {"<names>": {"error": f"{type(exc).__name__}: {exc}"}}
    # The operation's first all-gather also checks that every rank selected the same groups
    # with the same shapes, dtypes, scopes and blocks (RankDisagreementError otherwise).
    with comm.operation("save_sparse_data", description):
        comm.raise_if_any_failed([f"{type(error).__name__}: {error}"] if error else [], what, local_error=error)

        if sharded:  # written by the ranks holding the rows, plus an index (distsparse.export_shards)
            from .export_shards import save_sharded

            save_sharded(target, sparsifier, selected, comm)
        else:
            def write() -> None:
                _atomic_write(target, _build(sparsifier, selected))

            comm.run_on_coordinator(write, encode=lambda _: b"", decode=lambda _: None)
        comm.finish("save_sparse_data")


# ----------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------


def _is_dims(value: Any, n: int | None = None) -> bool:
    return (isinstance(value, list) and (n is None or len(value) == n)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def _check_group_entry(name: str, entry: Any, where: str) -> tuple[tuple[int, ...], torch.dtype, tuple[int, int], int]:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: group {name!r}: {what} (damaged file)")

    if not isinstance(entry, dict):
        raise bad("its entry is not an object")
    shape, dtype, block = entry.get("shape"), entry.get("dtype"), entry.get("block_shape")
    if not _is_dims(shape) or dtype not in _BY_NAME or not _is_dims(block, 2) or min(block) < 1 \
            or not _is_dims(entry.get("grid"), 2) or not _is_dims([entry.get("stored_blocks")], 1):
        raise bad("needs shape, a supported dtype, block_shape, grid and stored_blocks")
    shape_t, block_t = tuple(shape), (block[0], block[1])
    _, _, n_br, n_bc = _grid(shape_t, block_t)
    if entry["grid"] != [n_br, n_bc]:
        raise bad(f"grid {entry['grid']} does not fit shape {list(shape_t)} in {list(block_t)} blocks")
    return shape_t, _BY_NAME[dtype], block_t, entry["stored_blocks"]


def _check_specs(header: dict[str, Any], groups: dict[str, Any], data_size: int, where: str) -> None:
    """Every tensor belongs to a group with the expected dtype and shape; spans tile the data."""
    expected: dict[str, tuple[str, str, list[int]]] = {}
    for name, entry in groups.items():
        shape, dtype, block, stored = _check_group_entry(name, entry, where)
        _, _, n_br, n_bc = _grid(shape, block)
        expected[_blocks_key(name)] = (name, "U8", [packed_size(n_br * n_bc)])
        expected[_values_key(name)] = (name, _ST_DTYPES[dtype], [stored, block[0], block[1]])
    check_tensor_specs(header, expected, data_size, where, "group")


def _decode_group(name: str, bitmap_packed: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...],
                  block: tuple[int, int], where: str) -> torch.Tensor:
    bh, bw = block
    rows, cols, n_br, n_bc = _grid(shape, block)
    pad = (-(n_br * n_bc)) % 8
    if pad and bitmap_packed.numel() and int(bitmap_packed[-1]) & ((1 << pad) - 1):
        raise CheckpointError(f"{where}: group {name!r}: the block bitmap has nonzero padding bits (damaged file)")
    stored = unpack_bits(bitmap_packed, (n_br, n_bc))
    count = int(stored.sum())
    if count != values.shape[0]:
        raise CheckpointError(f"{where}: group {name!r}: the block bitmap marks {count} stored blocks, "
                              f"the file holds {values.shape[0]} (damaged file)")
    # Decode into the data's own shape: the declared block size is not trusted to size an
    # allocation (a small file may declare a 1x1 table in (40000, 40000) blocks). Whole blocks
    # are scattered through a block view of the output; the edge blocks, cropped, by index.
    full_r, full_c = rows // bh, cols // bw
    out = torch.zeros(rows, cols, dtype=values.dtype)
    inner = torch.zeros_like(stored)
    inner[:full_r, :full_c] = True
    inner_of_stored = inner[stored]  # row-major over stored blocks, the order of `values`
    out[: full_r * bh, : full_c * bw].view(full_r, bh, full_c, bw).permute(0, 2, 1, 3)[
        stored[:full_r, :full_c]] = values[inner_of_stored]
    edge_values = values[~inner_of_stored]
    if edge_values.numel():
        edge = (stored & ~inner).nonzero()
        r = (edge[:, 0] * bh)[:, None, None] + torch.arange(bh)[None, :, None]
        c = (edge[:, 1] * bw)[:, None, None] + torch.arange(bw)[None, None, :]
        inside = (r < rows) & (c < cols)
        if bool(edge_values.view(_BITS[edge_values.element_size()])[~inside].ne(0).any()):
            raise CheckpointError(f"{where}: group {name!r}: values outside the data's shape are not +0.0 "
                                  "(damaged file)")
        out[r.expand_as(inside)[inside], c.expand_as(inside)[inside]] = edge_values[inside]
    return out.reshape(shape)


def load_sparse_data(path: str | os.PathLike[str], device: str | torch.device = "cpu", *,
                     names: Any = None, rows: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_sparse_data` and return ``{group name: dense
    tensor}`` with the original shapes and dtypes on ``device`` — bit-exact to the masked
    data that was saved (unstored blocks are ``+0.0``).

    ``names``: only these groups (a name or a list; unknown names raise ``ValueError``).
    ``rows=(start, stop)``: only ``data[start:stop]`` of every group of 2 or more dimensions
    (clipped like a slice; 1-D groups load whole) — for a job that shards the tables again,
    on any world size. An index of a sharded export (format version 2) is then read only in
    the part files holding the wanted groups and rows.

    Not a collective: any process may call it. Everything is verified before a tensor is
    returned: the safetensors layout, ``format``/``format_version``, the JSON checksum,
    every tensor's checksum, dtypes and shapes against each group's entry, the bitmap's
    count and padding. Any problem raises :class:`~distsparse.checkpoint.CheckpointError`
    naming the file (and the group); a missing file raises
    :class:`~distsparse.checkpoint.CheckpointNotFoundError`.
    """
    target = Path(os.fspath(path))
    where = f"sparse data file {str(target)!r}"
    if rows is not None and not (len(rows) == 2 and 0 <= int(rows[0]) <= int(rows[1])):
        raise ValueError(f"load_sparse_data: rows must be (start, stop) with 0 <= start <= stop, got {rows!r}")
    blob = read_file(target, "sparse data")
    header = _check_layout(blob, where)
    if (header.get("__metadata__") or {}).get("format") == FORMAT and _is_index(header):
        from .export_shards import load_index

        return _only(load_index(target, header, device, rows, _names(names)), names, where)
    state = parse_state(header, where, fmt=FORMAT, version=FORMAT_VERSION, what="sparse data",
                        writer="distsparse.save_sparse_data", keys=("groups", "checksums"))
    _check_specs(header, state["groups"], len(blob) - 8 - _header_size(blob), where)
    tensors = load_checked_tensors(blob, state["checksums"], where, "group")
    del blob
    out: dict[str, torch.Tensor] = {}
    wanted = _names(names)
    for name in sorted(state["groups"]):
        if wanted is not None and name not in wanted:
            continue
        shape, _, block, _ = _check_group_entry(name, state["groups"][name], where)
        dense = _decode_group(name, tensors[_blocks_key(name)], tensors[_values_key(name)], shape, block, where)
        if rows is not None and dense.dim() > 1:
            dense = dense[int(rows[0]) : int(rows[1])].clone()
        out[name] = dense.to(device)
    return _only(out, names, where)


def _names(names: Any) -> list[str] | None:
    return None if names is None else [names] if isinstance(names, str) else list(names)


def _only(out: dict[str, torch.Tensor], names: Any, where: str) -> dict[str, torch.Tensor]:
    """``out``, after checking that every requested name was found."""
    missing = sorted(set(_names(names) or []) - set(out))
    if missing:
        raise ValueError(f"{where} holds no group(s) {missing}")
    return out


def _is_index(header: dict[str, Any]) -> bool:
    """Whether ``header`` is the index of a sharded export (:mod:`distsparse.export_shards`)."""
    from .export_shards import INDEX_VERSION

    return header["__metadata__"].get("format_version") == INDEX_VERSION
