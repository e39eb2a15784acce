"""Pruned tables for serving: the kept rows of each table, compacted, plus an int32 index
remap — the layout FBGEMM's inference table-batched embeddings load.

:func:`save_pruned_tables` drops every row whose mask prunes all of its elements (rows only
partly pruned are kept, with their zeros) and writes one safetensors file;
:func:`load_pruned_tables` returns ``{name: PrunedTable}``. :mod:`distsparse.serving` turns a
:class:`PrunedTable` into an ``nn.Module``; :mod:`distsparse.integrations.fbgemm` into
FBGEMM's inference TBE.

File format ``distsparse.pruned_tables``, version 1
---------------------------------------------------
One safetensors file, nothing pickled. A table is the group's 2-D view
(:func:`distsparse.masks.as_matrix`: 1-D data is one row, N-D data is
``(prod(shape[:-1]), shape[-1])``) of ``rows × dim``; it keeps ``kept`` rows. Tensors, per
table ``<name>``, in this order (tables sorted by name):

* ``remap/<name>`` — ``int32 (rows,)``: the kept row's index in ``weight``, ``-1`` for a
  pruned row. Kept rows keep their order, so the non-negative entries are ``0, 1, …,
  kept-1`` in row order (the loader checks it);
* ``weight/<name>`` — the kept rows, by ``encoding``: ``float32`` / ``float64`` /
  ``float16`` / ``bfloat16`` → ``(kept, dim)`` of that dtype; ``int8`` / ``int4`` →
  ``uint8 (kept, 4 + ceil(dim * bits / 8))`` rows in FBGEMM's inference layout
  (:mod:`distsparse.quantization`: float16 scale, float16 bias, then the values).

``__metadata__``: ``format`` = ``"distsparse.pruned_tables"``, ``format_version`` = ``"1"``,
``state`` (JSON text) and ``json_sha256`` (its sha256)::

    {"tables": {"emb.weight": {"shape": [1000, 64], "rows": 1000, "dim": 64, "kept": 200,
                               "encoding": "int8", "source_dtype": "float32"}},
     "checksums": {"remap/emb.weight": "<sha256 hex of the tensor's bytes>", ...}}

The bytes depend only on the content: a file written by a one-process run, an FSDP2 run or
a TorchRec run of the same tables is the same file, bit for bit. Writes are atomic
(:func:`distsparse.checkpoint._atomic_write`).

Sharded groups (FSDP2 ``DTensor`` rows, TorchRec rectangles, column-wise included) are
written without gathering a table: every rank finds which of its rows keep an element, one
all-reduce of a per-row count gives every rank the global kept rows (the remap is their
running count, an exclusive scan), and rank 0 streams the kept rows into the file band by
band (at most :data:`BAND_ROWS` rows at once), receiving each band's pieces from the ranks that
hold them (:class:`distsparse.safetensors_stream.StreamingSafetensorsWriter`). A row that
column-wise sharding splits over ranks is kept if any of its elements is kept.

Limitations:
    Each rank holds one ``rows``-long count per table during the save (4 bytes per row, or 1
    below 256 ranks), 1/dim of the table. Pieces reach rank 0 by broadcast (``Comm`` has no
    point-to-point send yet): every rank receives every band, one band at a time. A *local*
    group (per-rank data) cannot be written when more than one rank takes part. The
    writer stages the file in an unlinked temporary file before the atomic rename (two
    writes of the file's bytes).
"""

from __future__ import annotations

import json
import mmap
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import (
    CheckpointError,
    _atomic_write,
    _check_layout,
    _header_size,
    _sha256,
)
from .distributed.comm import mark_raised_everywhere
from .export import _selected  # names= as save_sparse_data takes it
from .file_state import check_tensor_specs, load_checked_tensors, parse_state, read_file
from .masks import as_matrix
from .quantization import dequantize_rows, quantize_rows, quantized_row_bytes
from .safetensors_stream import StreamingSafetensorsWriter, safetensors_dtype

if TYPE_CHECKING:  # pragma: no cover
    from .sparsifier import BaseDataSparsifier

__all__ = ["PrunedTable", "save_pruned_tables", "load_pruned_tables", "FORMAT", "FORMAT_VERSION", "ENCODINGS"]

#: ``__metadata__["format"]`` of every pruned-tables file.
FORMAT = "distsparse.pruned_tables"
#: ``__metadata__["format_version"]`` written (and the only one read) by this version.
FORMAT_VERSION = "1"
#: Rows of one band the writer assembles at a time (bounds its memory on sharded tables).
BAND_ROWS = 65536

_FLOATS = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
_BITS = {"int8": 8, "int4": 4}
#: Weight encodings a file may hold.
ENCODINGS = tuple(_FLOATS) + tuple(_BITS)


def _encoding_of(dtype: Any, source: torch.dtype, name: str) -> str:
    """The encoding ``dtype=`` asks for (None: the data's own dtype)."""
    if dtype is None:
        text = str(source).replace("torch.", "")
        if text not in _FLOATS:
            raise TypeError(f"group {name!r}: cannot serve dtype {source}; pruned tables hold floating-point rows "
                            f"({sorted(_FLOATS)}), or pass dtype='int8' / 'int4'")
        return text
    if isinstance(dtype, torch.dtype):
        text = "int8" if dtype == torch.int8 else str(dtype).replace("torch.", "")
    elif isinstance(dtype, str):
        text = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}.get(dtype, dtype)
    else:
        text = repr(dtype)
    if text not in ENCODINGS:
        raise ValueError(f"dtype={dtype!r} is not a pruned-table encoding; choose one of {list(ENCODINGS)} "
                         "(or a torch float dtype; torch.int8 means row-wise int8)")
    return text


def _row_shape(encoding: str, dim: int) -> tuple[int, torch.dtype]:
    """(elements per stored row, stored dtype) of ``encoding``."""
    if encoding in _BITS:
        return quantized_row_bytes(dim, _BITS[encoding]), torch.uint8
    return dim, _FLOATS[encoding]


def _encode(rows: torch.Tensor, encoding: str) -> torch.Tensor:
    if encoding in _BITS:
        return quantize_rows(rows, _BITS[encoding])
    return rows.to(_FLOATS[encoding])


@dataclass(frozen=True)
class PrunedTable:
    """One served table: ``weight`` holds the kept rows (see ``encoding``), ``remap[i]`` is
    row ``i``'s index in ``weight`` or ``-1`` when row ``i`` was pruned, ``shape`` is the
    original data's shape (its 2-D view is ``rows × dim``)."""

    weight: torch.Tensor
    remap: torch.Tensor
    shape: tuple[int, ...]
    encoding: str = "float32"

    @property
    def rows(self) -> int:
        return int(self.remap.numel())

    @property
    def dim(self) -> int:
        return int(as_matrix(torch.empty(self.shape, device="meta")).shape[1])

    @property
    def kept(self) -> int:
        return int(self.weight.shape[0])

    @property
    def bits(self) -> int | None:
        """8 or 4 for quantized rows, None for floating-point rows."""
        return _BITS.get(self.encoding)

    @property
    def nbytes(self) -> int:
        """Bytes this table holds when served: kept rows plus the remap."""
        return self.weight.numel() * self.weight.element_size() + self.remap.numel() * self.remap.element_size()

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The kept rows as ``(kept, dim)`` floats (quantized rows dequantized)."""
        if self.bits is None:
            return self.weight.to(dtype)
        return dequantize_rows(self.weight, self.bits, self.dim, dtype)

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole ``rows × dim`` table again, pruned rows as zeros (a check, not for serving)."""
        rows = self.dequantized(dtype or (torch.float32 if self.bits else self.weight.dtype))
        out = torch.zeros(self.rows, self.dim, dtype=rows.dtype)
        kept = self.remap >= 0
        out[kept] = rows[self.remap[kept].long()]
        return out


# ----------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------


@dataclass
class _Piece:
    """A rectangle ``[row, row+rows) × [col, col+cols)`` of a table's 2-D view, held by ``holder``."""

    row: int
    col: int
    rows: int
    cols: int
    holder: int


@dataclass
class _Plan:
    name: str
    shape: tuple[int, ...]
    rows: int
    dim: int
    encoding: str
    source_dtype: str
    #: This rank's pieces: (global row, global col, 2-D data, its 2-D mask); masked band by band.
    local: list[tuple[int, int, torch.Tensor, torch.Tensor]]


def _plan_group(sparsifier: BaseDataSparsifier, name: str, dtype: Any) -> _Plan:
    """This rank's pieces of group ``name`` (masked data and mask, as 2-D views)."""
    group = sparsifier._groups[name]
    comm = sparsifier.comm
    writer = comm.rank == 0
    if group.rects is not None:
        shape = tuple(int(s) for s in group.rects.shape)
        source = group.rects.dtype
        local = [(r, c, t.detach(), m) for ((r, c), t), m in zip(group.rects.local_shards(), group.shard_masks())]
    else:
        shape = tuple(int(s) for s in group.data.shape)
        source = group.local.dtype
        if group.sharded:
            layout = group.layout
            local = []
            if layout.contributes:
                m = as_matrix(group.mask)
                local = [(layout.row_range[0], 0, as_matrix(group.local.detach()), m)]
        else:
            if not group.replicated and comm.world_size > 1:
                raise ValueError(f"group {name!r} is a local group (per-rank data) and cannot be written to one file "
                                 f"by {comm.world_size} ranks; pass names= with replicated or sharded groups")
            m = as_matrix(group.mask)
            local = [(0, 0, as_matrix(group.local.detach()), m)] if writer else []
    rows, dim = as_matrix(torch.empty(shape, device="meta")).shape
    encoding = _encoding_of(dtype, source, name)
    if not source.is_floating_point:
        raise TypeError(f"group {name!r}: cannot serve dtype {source}; pruned tables hold floating-point rows")
    return _Plan(name, shape, int(rows), int(dim), encoding, str(source).replace("torch.", ""), local)


def _check_tiling(name: str, pieces: list[_Piece], rows: int, dim: int) -> list[tuple[int, int, list[_Piece]]]:
    """Bands ``(r0, r1, pieces covering them, by column)`` of at most :data:`BAND_ROWS` rows;
    every band's pieces tile ``[0, dim)`` exactly (ValueError naming the group otherwise)."""
    cuts = {0, rows}
    for p in pieces:
        cuts.update((p.row, p.row + p.rows))
    edges = sorted(c for c in cuts if 0 <= c <= rows)
    bands = []
    for a, b in zip(edges, edges[1:]):
        covering = sorted((p for p in pieces if p.row <= a and p.row + p.rows >= b and p.cols), key=lambda p: p.col)
        col = 0
        for p in covering:
            if p.col != col:
                raise ValueError(f"group {name!r}: the ranks' shards do not tile rows [{a}, {b}) of the table: "
                                 f"columns {col}..{p.col} are {'missing' if p.col > col else 'held twice'}")
            col = p.col + p.cols
        if col != dim and rows and dim:
            raise ValueError(f"group {name!r}: the ranks' shards cover columns [0, {col}) of rows [{a}, {b}), "
                             f"the table has {dim}")
        for start in range(a, b, BAND_ROWS):
            bands.append((start, min(b, start + BAND_ROWS), covering))
    return bands


def _placeholder(tables: dict[str, Any], keys: list[str]) -> dict[str, str]:
    return _metadata(tables, dict.fromkeys(keys, "0" * 64))


def _metadata(tables: dict[str, Any], checksums: dict[str, str]) -> dict[str, str]:
    text = json.dumps({"tables": tables, "checksums": checksums}, sort_keys=True, allow_nan=False)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "state": text,
            "json_sha256": _sha256(text.encode("utf-8"))}


def _remap_key(name: str) -> str:
    return f"remap/{name}"


def _weight_key(name: str) -> str:
    return f"weight/{name}"


class _FileSink:
    """The writer's side of a save: a streaming safetensors file in an unlinked temporary
    file beside the target, renamed into place by ``_atomic_write`` at the end. Only rank 0
    has one; an I/O error is kept and raised at :meth:`finish` so the other ranks still
    leave every collective."""

    def __init__(self, target: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 tables: dict[str, Any]) -> None:
        self.target = target
        self.tables = tables
        self.keys = [s[0] for s in specs]
        self.error: BaseException | None = None
        self.file: Any = None
        self.writer: StreamingSafetensorsWriter | None = None
        try:
            folder = Path(os.path.realpath(target)).parent
            if not folder.is_dir():
                raise FileNotFoundError(f"cannot save {str(target)!r}: folder {str(folder)!r} does not exist")
            self.file = tempfile.TemporaryFile(dir=folder)
            self.writer = StreamingSafetensorsWriter(self.file, specs, _placeholder(tables, self.keys))
        except Exception as exc:  # noqa: BLE001 - raised at finish(), on every rank
            self.error = exc

    def write(self, key: str, chunk: torch.Tensor) -> None:
        if self.error is None:
            try:
                self.writer.write(key, chunk)  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - raised at finish()
                self.error = exc

    def finish(self) -> None:
        try:
            if self.error is not None:
                raise self.error
            assert self.writer is not None
            self.writer.close(_metadata(self.tables, {k: self.writer.sha256(k) for k in self.keys}))
            self.file.flush()
            with mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                _atomic_write(self.target, mapped)  # type: ignore[arg-type]
        finally:
            if self.file is not None:
                self.file.close()


def _pieces_payload(plans: list[_Plan], rank: int) -> bytes:
    return json.dumps({p.name: [[r, c, int(d.shape[0]), int(d.shape[1]), rank] for r, c, d, _ in p.local]
                       for p in plans}, sort_keys=True).encode()


def _row_counts(plan: _Plan, world: int) -> torch.Tensor:
    """This rank's count, per row of the table, of its pieces that keep an element of the row."""
    counts = torch.zeros(plan.rows, dtype=torch.uint8 if world < 256 else torch.int32)
    for r, _, _, mask in plan.local:
        counts[r : r + mask.shape[0]] += mask.any(dim=1).to(counts.dtype).cpu()
    return counts


def save_pruned_tables(path: str | os.PathLike[str], sparsifier: BaseDataSparsifier, names: Any = None, *,
                       dtype: Any = None) -> None:
    """Write the kept rows and the int32 remap of ``names`` (default: every added group) to
    ``path`` (format in this module's docstring), atomically.

    A row is dropped when its mask prunes every element; rows only partly pruned are kept
    with their zeros. ``dtype``: ``None`` keeps the data's dtype; ``torch.float16`` /
    ``"float16"`` (or another float dtype) converts; ``"int8"`` / ``"int4"`` quantize row-wise
    in FBGEMM's layout (:mod:`distsparse.quantization`).

    *Collective* when distributed: every rank of the sparsifier's group calls it with the same
    arguments; rank 0 writes, receiving sharded groups' kept rows band by band (no rank holds a
    whole sharded table), and every rank returns once the file is complete. An error on any
    rank is raised on every rank.

    Raises:
        ValueError: an unknown group; an unknown ``dtype``; a local group when more than one
            rank takes part; shards that do not tile their table.
        TypeError: a group whose data is not floating point.
    """
    comm = sparsifier.comm
    target = Path(os.fspath(path))
    what = f"save_pruned_tables({str(target)!r})"
    plans: list[_Plan] = []
    error: Exception | None = None
    description: dict[str, Any] = {}
    try:
        for name in _selected(sparsifier, names):
            plans.append(_plan_group(sparsifier, name, dtype))
        description = {p.name: {"shape": list(p.shape), "encoding": p.encoding} for p in plans}
    except Exception as exc:  # noqa: BLE001 - raised on every rank just below
        error = exc
        description = {"<names>": {"error": f"{type(exc).__name__}: {exc}"}}
    with comm.operation("save_pruned_tables", description):
        comm.raise_if_any_failed([f"{type(error).__name__}: {error}"] if error else [], what, local_error=error)
        gathered = [json.loads(b) for b in comm.all_gather_bytes(_pieces_payload(plans, comm.rank))]
        bands: dict[str, list[tuple[int, int, list[_Piece]]]] = {}
        problems: list[str] = []
        for plan in plans:
            pieces = [_Piece(*p) for per_rank in gathered for p in per_rank[plan.name]]
            try:
                bands[plan.name] = _check_tiling(plan.name, pieces, plan.rows, plan.dim)
            except ValueError as exc:
                problems.append(str(exc))
        if problems:  # every rank saw the same pieces, so every rank raises here alike
            raise mark_raised_everywhere(ValueError("; ".join(problems)))
        kept_rows = {}
        for plan in plans:
            counts = comm.all_reduce_sum(_row_counts(plan, comm.world_size), f"all_reduce (kept rows of {plan.name!r})")
            kept_rows[plan.name] = counts > 0
        tables, specs = {}, []
        for plan in plans:
            kept = int(kept_rows[plan.name].sum())
            width, stored = _row_shape(plan.encoding, plan.dim)
            tables[plan.name] = {"shape": list(plan.shape), "rows": plan.rows, "dim": plan.dim, "kept": kept,
                                 "encoding": plan.encoding, "source_dtype": plan.source_dtype}
            specs += [(_remap_key(plan.name), torch.int32, (plan.rows,)),
                      (_weight_key(plan.name), stored, (kept, width))]
        sink = _FileSink(target, specs, tables) if comm.rank == 0 else None
        for plan in plans:
            _stream_table(comm, plan, bands[plan.name], kept_rows[plan.name], sink)
        comm.run_on_coordinator(lambda: sink.finish(), encode=lambda _: b"",  # type: ignore[union-attr]
                                decode=lambda _: None)
        comm.finish("save_pruned_tables")


def _stream_table(comm: Any, plan: _Plan, bands: list[tuple[int, int, list[_Piece]]], kept_rows: torch.Tensor,
                  sink: _FileSink | None) -> None:
    """Stream one table's remap, then its kept rows band by band. Every rank runs the same
    loop (the bands and kept rows are global facts), joining one broadcast per piece that
    rank 0 does not hold."""
    if sink is not None:
        remap = torch.full((plan.rows,), -1, dtype=torch.int32)
        remap[kept_rows] = torch.arange(int(kept_rows.sum()), dtype=torch.int32)
        sink.write(_remap_key(plan.name), remap)
        del remap
    mine = {(r, c): (data, mask) for r, c, data, mask in plan.local}
    source = _FLOATS[plan.source_dtype]
    for a, b, covering in bands:
        keep = kept_rows[a:b]
        n = int(keep.sum())
        if n == 0:
            continue
        parts = []
        for p in covering:
            payload = None
            if comm.rank == p.holder:
                data, mask = mine[(p.row, p.col)]
                lo, hi = a - p.row, b - p.row
                part = torch.where(mask[lo:hi], data[lo:hi], 0.0).cpu()[keep].contiguous()
                payload = part.view(torch.uint8).numpy().tobytes() if p.holder != 0 else None
                if p.holder == 0:
                    parts.append(part)
            if p.holder != 0:
                received = comm.broadcast_bytes(payload, src=p.holder)
                if sink is not None:
                    parts.append(torch.frombuffer(bytearray(received), dtype=source).reshape(n, p.cols))
        if sink is not None:
            rows = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            sink.write(_weight_key(plan.name), _encode(rows, plan.encoding))


# ----------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(name: str, entry: Any, where: str) -> tuple[tuple[int, ...], int, int, int, str]:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{where}: table {name!r}: {what} (damaged file)")

    if not isinstance(entry, dict):
        raise bad("its entry is not an object")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape) \
            or not all(_is_count(entry.get(k)) for k in ("rows", "dim", "kept")) \
            or entry.get("encoding") not in ENCODINGS or not isinstance(entry.get("source_dtype"), str):
        raise bad("needs shape, rows, dim, kept, a known encoding and source_dtype")
    rows, dim = as_matrix(torch.empty(tuple(shape), device="meta")).shape
    if (rows, dim) != (entry["rows"], entry["dim"]) or entry["kept"] > rows:
        raise bad(f"rows {entry['rows']} × dim {entry['dim']} (kept {entry['kept']}) do not fit shape {shape}")
    return tuple(shape), int(rows), int(dim), entry["kept"], entry["encoding"]


def _expected_specs(tables: dict[str, Any], where: str) -> dict[str, tuple[str, str, list[int]]]:
    expected: dict[str, tuple[str, str, list[int]]] = {}
    for name, entry in tables.items():
        _, rows, dim, kept, encoding = _check_entry(name, entry, where)
        width, stored = _row_shape(encoding, dim)
        expected[_remap_key(name)] = (name, "I32", [rows])
        expected[_weight_key(name)] = (name, safetensors_dtype(stored), [kept, width])
    return expected


def _check_specs(header: dict[str, Any], tables: dict[str, Any], data_size: int, where: str) -> None:
    expected = _expected_specs(tables, where)
    check_tensor_specs(header, expected, data_size, where, "table")


def load_pruned_tables(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, PrunedTable]:
    """Read a file written by :func:`save_pruned_tables`: ``{name: PrunedTable}`` on ``device``.

    Not a collective. Everything is verified before a table is returned: the safetensors
    layout, ``format``/``format_version``, the JSON checksum, every tensor's sha256, dtypes
    and shapes against each table's entry, and the remap itself (values in ``[-1, kept)``,
    kept rows numbered ``0 … kept-1`` in order). Any problem raises
    :class:`~distsparse.checkpoint.CheckpointError` naming the file and the table; a missing
    file raises :class:`~distsparse.checkpoint.CheckpointNotFoundError`. Nothing is unpickled.
    """
    target = Path(os.fspath(path))
    where = f"pruned tables file {str(target)!r}"
    blob = read_file(target, "pruned tables")
    header = _check_layout(blob, where)
    state = parse_state(header, where, fmt=FORMAT, version=FORMAT_VERSION, what="pruned tables",
                        writer="distsparse.save_pruned_tables", keys=("tables", "checksums"))
    _check_specs(header, state["tables"], len(blob) - 8 - _header_size(blob), where)
    tensors = load_checked_tensors(blob, state["checksums"], where, "table")
    del blob
    out: dict[str, PrunedTable] = {}
    for name in sorted(state["tables"]):
        shape, _, _, kept, encoding = _check_entry(name, state["tables"][name], where)
        remap = tensors[_remap_key(name)]
        kept_mask = remap >= 0
        if bool((remap < -1).any()) or int(kept_mask.sum()) != kept \
                or not torch.equal(remap[kept_mask], torch.arange(kept, dtype=torch.int32)):
            raise CheckpointError(f"{where}: table {name!r}: the remap is not -1 for pruned rows and 0..{kept - 1} "
                                  "for the kept rows in order (damaged file)")
        out[name] = PrunedTable(tensors[_weight_key(name)].to(device), remap.to(device), shape, encoding)
    return out

