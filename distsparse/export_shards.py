"""Export of sharded groups (FSDP2 ``DTensor`` rows, TorchRec rectangles) by the ranks that
hold them, and its loading in one process or by row range.

:func:`distsparse.save_sparse_data` uses this module as soon as a selected group's rows are
spread over the ranks; it writes no file and holds no table whole on any rank:

* every rank writes ONE *part file* with the pieces it holds — a piece is a rectangle of a
  group's 2-D view (an FSDP2 rank's rows, a TorchRec shard), and rank 0's part also holds the
  replicated groups whole. A part file is itself a version-1 ``distsparse.sparse_data`` file
  (:mod:`distsparse.export`) whose groups are named ``<group>@<row>,<col>``, so it is
  verified by the very same reader; each piece is cut into the group's blocks from its own
  top-left corner (a block never spans two pieces, so nothing is exchanged);
* rank 0 then writes the *index* at ``path``, atomically and last — the commit point: a
  safetensors file without tensors, ``format_version`` ``"2"``, whose JSON ``state`` lists
  every group's shape, dtype, block shape and pieces (file, offset, size) and each part
  file's name and ``json_sha256``::

    {"groups": {"emb.weight": {"shape": [1000, 64], "dtype": "float32", "block_shape": [1, 4],
                               "pieces": [[0, 0, 500, 64, 0], [500, 0, 500, 64, 1]]}},
     "files": [["sp.safetensors.00000-3f2a....safetensors", "<json_sha256>"], ...],
     "sparsifier": {"class": "DataNormSparsifier", "step_count": 400}}

Part files are named ``<index name>.<rank>-<first 16 hex of their json_sha256>.safetensors``
in the index's folder: identical content gives identical names and bytes, and a new export
never overwrites a file the previous index still names, so a crash before the index is
replaced leaves the previous export whole. Rank 0 removes the previous index's part files
that the new one does not name, after the new index is in place.

Limitations:
    Every rank writes into the index's folder, so a job over several machines needs a
    shared filesystem (rank 0 checks that it sees every part before committing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint import (CheckpointError, CheckpointNotFoundError, _atomic_write, _check_header_limit, _check_layout,
                         _sha256)
from .masks import as_matrix

if TYPE_CHECKING:  # pragma: no cover
    from .distributed.comm import Comm
    from .sparsifier import BaseDataSparsifier

#: ``format_version`` of an index (the part files are version 1).
INDEX_VERSION = "2"


def _piece_name(name: str, row: int, col: int) -> str:
    return f"{name}@{row},{col}"


def _held_pieces(sparsifier: BaseDataSparsifier, name: str, rank: int) -> list[tuple[int, int, torch.Tensor]]:
    """``(row, col, masked 2-D piece)`` of group ``name`` that this rank holds."""
    group = sparsifier._groups[name]
    masked = sparsifier.get_data(name, return_original=False)
    if group.rects is not None:
        return [(r, c, t) for (r, c), t in masked.local_shards() if t.numel()]
    if group.sharded:
        if not group.layout.contributes:  # an HSDP replica: the shard's source writes it
            return []
        matrix = as_matrix(masked.to_local())
        return [(group.layout.row_range[0], 0, matrix)] if matrix.numel() else []
    local = masked.to_local() if group.layout is not None else masked  # Replicate() or plain
    return [(0, 0, as_matrix(local))] if rank == 0 else []


def _view_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    rows, cols = as_matrix(torch.empty(shape, device="meta")).shape
    return int(rows), int(cols)


def _part_bytes(pieces: dict[str, tuple[torch.Tensor, tuple[int, int]]],
                sparsifier_info: dict[str, Any]) -> tuple[bytes, str]:
    """A version-1 sparse data file of ``pieces`` ({piece name: (2-D data, block)}) and its
    ``json_sha256``."""
    from .export import FORMAT, _blocks_key, _encode_group, _tensor_digest, _values_key

    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, Any] = {}
    for key in sorted(pieces):
        data, block = pieces[key]
        rows, cols = data.shape
        block = (min(block[0], max(rows, 1)), min(block[1], max(cols, 1)))
        bitmap, values = _encode_group(data, block)
        tensors[_blocks_key(key)] = bitmap
        tensors[_values_key(key)] = values
        groups[key] = {"shape": [rows, cols], "dtype": str(data.dtype).replace("torch.", ""),
                       "block_shape": list(block), "grid": [-(-rows // block[0]), -(-cols // block[1])],
                       "stored_blocks": int(values.shape[0])}
    state = {"groups": groups, "checksums": {k: _tensor_digest(t) for k, t in sorted(tensors.items())},
             "sparsifier": sparsifier_info}
    return _metadata_file(tensors, state, "1", FORMAT, _check_header_limit)


def _metadata_file(tensors: dict[str, torch.Tensor], state: dict[str, Any], version: str, fmt: str,
                   check_limit: Any) -> tuple[bytes, str]:
    """(safetensors bytes, json_sha256) of ``tensors`` and the JSON ``state``; the header is
    written with sorted keys, so identical content gives identical bytes."""
    from safetensors.torch import save as st_save

    text = json.dumps(state, sort_keys=True, allow_nan=False)
    digest = _sha256(text.encode("utf-8"))
    metadata = {"format": fmt, "format_version": version, "state": text, "json_sha256": digest}
    check_limit(tensors, metadata, what=f"sparse data file of {len(tensors)} tensors")
    blob = st_save(tensors, metadata=metadata)
    # safetensors keeps __metadata__ in a Rust HashMap (random order): write the header sorted.
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + blob[8 + n :], digest


def save_sharded(target: Path, sparsifier: BaseDataSparsifier, names: list[str], comm: Comm) -> None:
    """Collective, inside ``save_sparse_data``'s operation: every rank writes its part file,
    rank 0 the index (module docstring). An error on any rank is raised on every rank and
    leaves the previous index (and the files it names) in place."""
    from .export import FORMAT, _block_shape

    rank = comm.rank
    info = {"class": type(sparsifier).__name__, "step_count": int(sparsifier.step_count)}
    report: dict[str, Any] = {}
    error: Exception | None = None
    written: Path | None = None
    try:
        pieces: dict[str, tuple[torch.Tensor, tuple[int, int]]] = {}
        held: dict[str, list[list[int]]] = {}
        for name in names:
            for row, col, data in _held_pieces(sparsifier, name, rank):
                pieces[_piece_name(name, row, col)] = (data.detach().to("cpu").contiguous(),
                                                       _block_shape(sparsifier, name))
                held.setdefault(name, []).append([row, col, int(data.shape[0]), int(data.shape[1])])
        report = {"held": held}
        if pieces:
            blob, digest = _part_bytes(pieces, info)
            file_name = f"{target.name}.{rank:05d}-{digest[:16]}.safetensors"
            written = None if (target.parent / file_name).exists() else target.parent / file_name
            _atomic_write(target.parent / file_name, blob)
            report.update(file=file_name, json_sha256=digest)
    except Exception as exc:  # noqa: BLE001 - raised on every rank just below
        error, report = exc, {"error": f"{type(exc).__name__}: {exc}"}
    reports = [json.loads(b) for b in comm.all_gather_bytes(json.dumps(report, sort_keys=True).encode())]
    failed = [r for r, rep in enumerate(reports) if "error" in rep]
    if failed and written is not None:  # a new part no index will name (one named by the previous stays)
        written.unlink(missing_ok=True)
    comm.raise_if_any_failed([report["error"]] if error else [], f"save_sparse_data({str(target)!r})",
                             local_error=error, failed=[bool(failed)])

    def write_index() -> None:
        state = _index_state(sparsifier, names, reports, info, target)
        previous = _previous_files(target)
        _atomic_write(target, _metadata_file({}, state, INDEX_VERSION, FORMAT, _check_header_limit)[0])
        keep = {f for f, _ in state["files"]}
        for stale in sorted(previous - keep):  # the previous export's parts, no longer named
            try:
                (target.parent / stale).unlink()
            except OSError:
                pass

    comm.run_on_coordinator(write_index, encode=lambda _: b"", decode=lambda _: None)


def _index_state(sparsifier: BaseDataSparsifier, names: list[str], reports: list[dict[str, Any]],
                 info: dict[str, Any], target: Path) -> dict[str, Any]:
    """The index's JSON state from every rank's report; checks that each group's pieces tile
    its 2-D view and that rank 0 sees every part file."""
    from .export import _block_shape

    files, file_of_rank = [], {}
    for r, rep in enumerate(reports):
        if "file" in rep:
            if not (target.parent / rep["file"]).exists():
                raise CheckpointError(f"save_sparse_data({str(target)!r}): rank 0 cannot see rank {r}'s part "
                                      f"{rep['file']!r}: a sharded export needs a folder every rank shares")
            file_of_rank[r] = len(files)
            files.append([rep["file"], rep["json_sha256"]])
    groups = {}
    for name in names:
        data = sparsifier._groups[name].data
        shape = [int(s) for s in data.shape]
        pieces = sorted([*piece, file_of_rank[r]] for r, rep in enumerate(reports)
                        for piece in rep["held"].get(name, []))
        _check_tiling(name, _view_shape(tuple(shape)), pieces, f"save_sparse_data({str(target)!r})")
        groups[name] = {"shape": shape, "dtype": str(data.dtype).replace("torch.", ""),
                        "block_shape": list(_block_shape(sparsifier, name)), "pieces": pieces}
    return {"groups": groups, "files": files, "sparsifier": info}


def _check_tiling(name: str, view: tuple[int, int], pieces: list[list[int]], where: str) -> None:
    """Each element of the ``view`` lies in exactly one piece ``[row, col, rows, cols, file]``."""
    rows, cols = view
    row_cuts = sorted({0, rows, *(p[0] for p in pieces), *(p[0] + p[2] for p in pieces)})
    col_cuts = sorted({0, cols, *(p[1] for p in pieces), *(p[1] + p[3] for p in pieces)})
    if row_cuts[-1] > rows or col_cuts[-1] > cols or row_cuts[0] < 0 or col_cuts[0] < 0:
        raise CheckpointError(f"{where}: group {name!r}: a piece lies outside its {rows} x {cols} view")
    cover = torch.zeros(len(row_cuts) - 1, len(col_cuts) - 1, dtype=torch.int64)
    for r, c, h, w, _ in pieces:
        cover[row_cuts.index(r) : row_cuts.index(r + h), col_cuts.index(c) : col_cuts.index(c + w)] += 1
    heights = torch.tensor(row_cuts).diff().gt(0)
    widths = torch.tensor(col_cuts).diff().gt(0)
    real = heights[:, None] & widths[None, :]
    if bool((cover[real] != 1).any()):
        raise CheckpointError(f"{where}: group {name!r}: its pieces {[p[:4] for p in pieces]} do not cover its "
                              f"{rows} x {cols} view exactly once (overlapping or missing shards)")


def _previous_files(target: Path) -> set[str]:
    """Part files named by the index now at ``target`` (none when it is not a readable index)."""
    try:
        state = json.loads(_check_layout(target.read_bytes(), "index")["__metadata__"]["state"])
        return {f for f, _ in state.get("files", [])} if isinstance(state, dict) else set()
    except Exception:  # noqa: BLE001 - no previous index, or not one of ours: nothing to remove
        return set()


# ----------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------


def load_index(target: Path, header: dict[str, Any], device: str | torch.device,
               rows: tuple[int, int] | None, names: list[str] | None) -> dict[str, torch.Tensor]:
    """The dense tensors of ``names`` (default: all), or their dimension-0 range ``rows``,
    of the export whose index header is ``header``; reads only the part files holding
    wanted pieces."""
    from .export import _BY_NAME

    where = f"sparse data file {str(target)!r}"
    meta = header.get("__metadata__") or {}
    text = meta.get("state")
    if not isinstance(text, str) or _sha256(text.encode("utf-8")) != meta.get("json_sha256"):
        raise CheckpointError(f"{where}: the index's JSON state is missing or does not match its checksum "
                              "(damaged file)")
    state = json.loads(text)
    if not isinstance(state, dict) or not isinstance(state.get("groups"), dict) or len(header) != 1:
        raise CheckpointError(f"{where}: malformed index: it needs a 'groups' object and no tensors (damaged file)")
    files = state.get("files")
    if not isinstance(files, list) or not all(isinstance(f, list) and len(f) == 2 and all(isinstance(x, str) for x in f)
                                              and "/" not in f[0] and os.sep not in f[0] for f in files):
        raise CheckpointError(f"{where}: malformed 'files' list (damaged file)")
    plans: dict[str, Any] = {}
    wanted: dict[int, list[tuple[str, list[int]]]] = {}
    for name in sorted(state["groups"]):
        if names is not None and name not in names:
            continue
        entry = state["groups"][name]
        try:
            shape, dtype = tuple(int(s) for s in entry["shape"]), _BY_NAME[entry["dtype"]]
            pieces = [[int(x) for x in p] for p in entry["pieces"]]
            assert all(len(p) == 5 and 0 <= p[4] < len(files) and min(p) >= 0 for p in pieces)
        except (KeyError, TypeError, ValueError, AssertionError):
            raise CheckpointError(f"{where}: group {name!r}: malformed entry (damaged file)") from None
        view = _view_shape(shape)
        _check_tiling(name, view, pieces, where)
        whole = rows is None or len(shape) < 2  # 1-D data (one row of its view) loads whole
        per = view[0] // shape[0] if not whole and shape[0] else 1
        lo, hi = (0, view[0]) if whole else (min(rows[0], shape[0]), min(rows[1], shape[0]))
        first, last = lo * per, hi * per
        out = torch.zeros(last - first, view[1], dtype=dtype)
        plans[name] = (shape, out, first, lo, hi)
        for piece in pieces:
            if piece[0] < last and piece[0] + piece[2] > first:
                wanted.setdefault(piece[4], []).append((name, piece))
    for index in sorted(wanted):
        file_name, digest = files[index]
        pieces = _read_part(target.parent / file_name, digest, where)
        for name, (r, c, h, w, _) in wanted[index]:
            shape, out, first, _, _ = plans[name]
            piece = pieces.get(_piece_name(name, r, c))
            if piece is None or tuple(piece.shape) != (h, w) or piece.dtype != out.dtype:
                raise CheckpointError(f"{where}: group {name!r}: part {file_name!r} lacks its piece at ({r}, {c}) "
                                      f"of {h} x {w} {out.dtype} (damaged export)")
            a, b = max(r, first), min(r + h, first + out.shape[0])
            out[a - first : b - first, c : c + w] = piece[a - r : b - r]
        del pieces
    result = {}
    for name, (shape, out, _, lo, hi) in plans.items():
        dims = shape if rows is None or len(shape) < 2 else (hi - lo, *shape[1:])
        result[name] = out.reshape(dims).to(device)
    return result


def _read_part(path: Path, digest: str, where: str) -> dict[str, torch.Tensor]:
    """A part file's pieces, after checking it is the very part the index names."""
    from .export import load_sparse_data

    try:
        with open(path, "rb") as f:
            head = f.read(8)
            header = json.loads(f.read(int.from_bytes(head, "little"))) if len(head) == 8 else {}
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{where}: its part {path.name!r} does not exist (copy every "
                                      f"{path.name.split('.0')[0]}.*.safetensors file beside the index)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{where}: cannot read its part {path.name!r}: {exc}") from None
    if not isinstance(header, dict) or (header.get("__metadata__") or {}).get("json_sha256") != digest:
        raise CheckpointError(f"{where}: part {path.name!r} is not the part this index names (its json_sha256 "
                              "differs: a part from another export, or a damaged file)")
    return load_sparse_data(path)

