"""The distributed part of ``step()``: groups whose rows are spread over the ranks.

Three kinds of group are computed by several ranks at once (see
:mod:`distsparse.sparsifier` for the scopes):

* *split* replicated groups — a big table every rank holds, scored in row ranges by the
  ranks the planner (:mod:`distsparse.distributed.planner`) assigns, its new mask then shared whole;
* *sharded* DTensor groups (FSDP2 ``Shard(0)``, HSDP) — each rank scores the blocks
  starting in its rows (:mod:`distsparse.distributed.sharding`), with row halos;
* *rectangle* groups (TorchRec shards, :mod:`distsparse.distributed.rects`) — row and column halos.

All of them find their global k lowest blocks in the same all-reduce rounds of the exact
radix selection (:mod:`distsparse.distributed.selection`, :meth:`Comm.select_lowest`), then each rank
writes its mask rows; :func:`exchange_masks` ends the step with one all-gather of every
rank's status and bit-packed masks. These functions are the sparsifier's step protocol,
kept apart from the group bookkeeping in :class:`~distsparse.sparsifier.BaseDataSparsifier`;
``sp`` is that sparsifier.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from .comm import mark_raised_everywhere
from ..kernels.mask_digest import mask_digest
from ..kernels.unpack_rows import unpack_blocks_into, unpack_into
from ..masks import (as_matrix, block_bits_size, pack_bits, pack_block_bits, packed_size, unpack_bits,
                     unpack_block_bits)
from .planner import Plan
from .rects import RectView, layout_from_gathered
from ..kernels import fused_shard
from .selection import ShardSelection, check_shard_rows, choose_digit_bits, nonfinite_error
from .sharding import ShardedRows

__all__ = ["close_everywhere", "compute_split", "digit_bits_for", "exchange_masks"]


def _zeros(mask: torch.Tensor) -> int:
    return int(mask.numel() - int(mask.count_nonzero()))


def compute_split(sp, plan: Plan | None, split: list[str], sharded: list[str],
                  pieces: dict[str, torch.Tensor], local_masks: dict[str, torch.Tensor],
                  fail: Any, errors: list[str], rects: list[str] = ()) -> tuple[bool, int]:
    """Score this rank's rows of every split and sharded group, find each group's global
    k lowest blocks with the other ranks (:meth:`Comm.select_lowest`, all groups in the
    same rounds), and write this rank's mask rows: into a new whole mask per split
    group (``pieces[name]``) and into a new local mask per sharded group
    (``local_masks[name]``, completed by the mask halo). Errors go to ``fail``; a
    status all-reduce first makes every rank skip the selection when any rank already
    failed. Returns (aborted, bytes this rank sent in the halo exchanges)."""
    comm, rank = sp._comm, sp._comm.rank
    fused_names = [n for n in split if _runs_fused(sp, n)]
    split = [n for n in split if n not in fused_names]
    fused = {n: _fused_shard(sp, plan, n, pieces, fail) for n in fused_names}
    selections: list[ShardSelection] = []
    slots: list[int] = []
    contributes: list[bool] = []
    shards: list[tuple[str, torch.Tensor, int, int, dict[str, Any]]] = []
    digit_bits = digit_bits_for(sp, split + sharded + list(rects))

    def select(name: str, scores_of: Any, n_blocks: int, config: dict[str, Any], empty: torch.Tensor) -> None:
        try:
            sp._canonical_config(name, dict(config))
            k = sp._blocks_to_prune(n_blocks, config)
            selection = ShardSelection(scores_of(), n_blocks, k, digit_bits)
        except Exception as exc:  # noqa: BLE001 - reported through the status exchange
            fail(name, exc)
            selection = ShardSelection(empty, n_blocks, 0, digit_bits)  # never used
        selections.append(selection)

    for name in split:
        matrix = as_matrix(sp._groups[name].local.detach())
        config = sp.data_groups[name]
        bh, bw = sp._block_shape(name)  # type: ignore[misc]
        n_blocks = -(-matrix.shape[0] // bh) * -(-matrix.shape[1] // bw)
        row_start, row_stop = plan.groups[name].ranges.get(rank, (0, 0))  # type: ignore[union-attr]
        empty = torch.empty((0, -(-matrix.shape[1] // bw)), dtype=matrix.dtype, device=matrix.device)
        select(name, lambda: (sp._shard_scores(name, matrix, row_start, row_stop, config)
                              if row_stop > row_start else empty), n_blocks, config, empty)
        slots.append(rank)
        contributes.append(True)
        shards.append((name, matrix, row_start, row_stop, config))
    halo_bytes = 0
    views: dict[str, ShardedRows] = {}
    if sharded:
        views, halo_bytes = _sharded_rows(sp, sharded)
    for name in sharded:
        view, config = views[name], sp.data_groups[name]
        lay = sp._groups[name].layout
        bh, bw = view.block
        n_blocks = -(-lay.rows // bh) * -(-lay.cols // bw)
        empty = torch.empty((0, -(-lay.cols // bw)), dtype=view.body.dtype, device=view.body.device)
        select(name, lambda: view.scores(sp, name, config), n_blocks, config, empty)
        slots.append(lay.shard)
        contributes.append(lay.contributes)
    rect_views: dict[str, RectView] = {}
    if rects:
        _learn_rect_layouts(sp, rects)
        rect_views, sent = _rect_views(sp, rects)
        halo_bytes += sent
    for name in rects:
        view, config = rect_views[name], sp.data_groups[name]
        lay = sp._groups[name].rect_layout
        bh, bw = view.block
        n_blocks = -(-lay.rows // bh) * -(-lay.cols // bw)

        def scores(view: RectView = view, name: str = name, config: dict[str, Any] = config) -> torch.Tensor:
            return view.scores(lambda m: sp._shard_scores(name, m, 0, m.shape[0], config))

        select(name, scores, n_blocks, config, torch.empty(0, dtype=view.dtype))
        slots.append(lay.slot() if lay.row_ordered else 0)
        contributes.append(True)
    # The status of every rank and, per fused split group, the one-read shards' (below, inside, missed)
    # or the three-pass shards' top-digit histograms, summed in one all-reduce.
    failed = comm.all_reduce_sum(torch.cat([torch.tensor([1 if errors else 0], dtype=torch.int64)]
                                           + [_fused_status(*fused[n]) for n in fused_names]),
                                 "all_reduce (status before selection)")
    if int(failed[0]):
        return True, halo_bytes
    n_rows = len(split) + len(sharded)
    n_own = n_rows + len(rects)
    totals, offset = {}, 1
    for name in fused_names:
        size = _fused_status(*fused[name]).numel()
        totals[name] = failed[offset : offset + size]
        offset += size
    # One-read shards whose summed brackets missed the k-th key: every rank (the same sums) runs the three
    # passes on them, with a second all-reduce of their histograms.
    missed = [n for n in fused_names if fused[n][2] and not fused_shard.OneReadShard.holds_cut(
        totals[n], fused[n][1])[0]]
    if missed:
        for name in missed:
            fused[name] = _fused_shard(sp, plan, name, pieces, fail, one_read=False)
        again = comm.all_reduce_sum(torch.cat([torch.tensor([1 if errors else 0], dtype=torch.int64)]
                                              + [_fused_status(*fused[n]) for n in missed]),
                                    "all_reduce (histograms after a missed bracket)")
        if int(again[0]):
            return True, halo_bytes
        for i, name in enumerate(missed):
            totals[name] = again[1 + i * fused_shard.BINS : 1 + (i + 1) * fused_shard.BINS]
    cuts = {}
    for name in fused_names:
        shard, k, one_read = fused[name]
        if one_read:
            _, need, n_cand = shard.holds_cut(totals[name], k)
            scores, cuts[name] = shard.candidates(), None
        else:
            hist = totals[name]
            digit, _, need = shard.digit_cut(hist, k)
            scores, idx = shard.candidates(digit)
            cuts[name] = (digit, idx)
            n_cand = int(hist[digit]) if digit >= 0 else 0
        # n_cand is global: the same digit width on every rank
        bits = choose_digit_bits(comm.world_size, 1, torch.finfo(scores.dtype).bits, n_cand // comm.world_size)
        selections.append(ShardSelection(scores, n_cand, need, bits))
        slots.append(rank)
        contributes.append(True)
    _, ties_before = comm.select_lowest(selections, failed=False, slots=slots, contributes=contributes)
    for name, sel, before in zip(fused_names, selections[n_own:], ties_before[n_own:]):
        try:
            pruned = sel.pruned(before) if sel.keys.numel() else None
            sel.release()
            if cuts[name] is None:  # one read: only the candidates' words are left to write
                fused[name][0].settle(pruned)
                continue
            digit, idx = cuts[name]
            config = sp.data_groups[name]
            zeros = config["zeros_per_block"]
            block = tuple(config["sparse_block_shape"])
            fused[name][0].write(digit, pruned, idx, block[0] * block[1] if zeros is None else zeros)
        except Exception as exc:  # noqa: BLE001
            fail(name, exc)
    rect_flags = _rect_flags(sp, rects, rect_views, selections[n_rows:n_own], ties_before[n_rows:n_own],
                             digit_bits)
    for (name, matrix, row_start, row_stop, config), sel, before in zip(shards, selections, ties_before):
        local = sp._groups[name].local
        try:
            # The keys (the scores' memory) go before the new mask is allocated.
            pruned = sel.pruned(before) if row_stop > row_start else None
            sel.release()
            pieces[name] = torch.empty(local.shape, dtype=torch.bool, device=local.device)  # the whole new mask
            if pruned is not None:
                sp._shard_mask(name, matrix, row_start, row_stop, pruned, config,
                                 as_matrix(pieces[name])[row_start:row_stop])
        except Exception as exc:  # noqa: BLE001
            pieces.setdefault(name, torch.empty(local.shape, dtype=torch.bool, device=local.device))
            fail(name, exc)
    outgoing: dict[str, torch.Tensor] = {}
    for name, sel, before in zip(sharded, selections[len(split):], ties_before[len(split):]):
        local = sp._groups[name].local
        try:
            pruned = sel.pruned(before)
            sel.release()  # the keys (the scores' memory) go before the new mask is allocated
            local_masks[name] = torch.empty(local.shape, dtype=torch.bool, device=local.device)
            outgoing[name] = views[name].build_mask(sp, name, sp.data_groups[name], pruned,
                                                    as_matrix(local_masks[name]))
        except Exception as exc:  # noqa: BLE001
            local_masks.setdefault(name, torch.empty(local.shape, dtype=torch.bool, device=local.device))
            fail(name, exc)
    if sharded:
        halo_bytes += _exchange_mask_halos(sp, sharded, views, outgoing, local_masks)
    if rects:
        halo_bytes += _rect_masks(sp, rects, rect_views, rect_flags, local_masks, fail)
    return False, halo_bytes

# -- split groups on the fused CPU kernel, see distsparse.kernels.fused_shard -------------------


def _built_in(method: Any) -> bool:
    """DataNormSparsifier's own method, not a subclass override (no import upward)."""
    return getattr(method, "__module__", None) == "distsparse.norm_sparsifier" and \
        getattr(method, "__qualname__", "").startswith("DataNormSparsifier.")


def _block_wire(sp, name: str) -> tuple[int, int] | None:
    """The block shape when every mask of group ``name`` is constant on its blocks — the
    built-in masks pruning whole blocks (``zeros_per_block`` the block) — so the exchange
    sends one bit per block (``masks.pack_block_bits``); else None (one bit per element).
    A function of the agreed configs and the code: the same on every rank."""
    kind = type(sp)
    if not (_built_in(kind.update_mask) and _built_in(kind._shard_mask)):
        return None
    config = sp.data_groups[name]
    try:
        bh, bw = (int(v) for v in config["sparse_block_shape"])
    except (KeyError, TypeError, ValueError):
        return None  # a bad config fails the step (every rank alike); the lengths stay computable
    zeros = config.get("zeros_per_block")
    return (bh, bw) if bh > 0 and bw > 0 and zeros in (None, bh * bw) else None


def _runs_fused(sp, name: str) -> bool:
    """Whether split group ``name`` runs the fused kernel on every rank: the built-in norm
    scoring (no subclass override), CPU float32/float64 data and the kernel available (the
    step's agreement compares that last fact, so every rank decides the same)."""
    kind = type(sp)
    if not (_built_in(kind._shard_scores) and _built_in(kind._shard_mask) and isinstance(getattr(sp, "norm", None), str)):
        return False
    data = sp._groups[name].local
    return fused_shard.applies(data.dtype, data.device)


def _fused_status(shard: Any, k: int, one_read: bool) -> torch.Tensor:
    """What a split group's shard adds to the status all-reduce: a one-read shard its
    ``(below, inside, missed)``, a three-pass shard its top-digit histogram (zeros from a
    rank that failed: the length depends on ``one_read`` only, the same on every rank)."""
    if one_read:
        return shard.status if shard is not None else torch.zeros(fused_shard.OneReadShard.STATUS, dtype=torch.int64)
    return shard.hist if shard is not None else torch.zeros(fused_shard.BINS, dtype=torch.int64)


def _fused_shard(sp, plan: Plan, name: str, pieces: dict[str, torch.Tensor], fail: Any,
                 one_read: bool = True) -> tuple[Any, int, bool]:
    """This rank's rows of split group ``name`` on the fused kernel, into its rows of the
    new whole mask (``pieces[name]``, allocated unless there already): the one read
    (:class:`~distsparse.kernels.fused_shard.OneReadShard`) where it applies and
    ``one_read``, else pass 1 of the three passes. Returns ``(shard or None on error, k,
    whether it is the one read)``; the last is a function of the group's shape and config
    only (the same on every rank, also when one rank failed: it sizes the status)."""
    local = sp._groups[name].local
    if name not in pieces:  # the whole new mask (a reused buffer: its pages are in memory)
        pieces[name] = fused_shard.new_whole_mask(local.shape)
    decided = False  # an error before the decision: on every rank alike (agreed shapes and configs)
    try:
        matrix = as_matrix(local.detach())
        config = sp.data_groups[name]
        sp._canonical_config(name, dict(config))
        bh, bw = sp._block_shape(name)  # type: ignore[misc]
        zeros = config["zeros_per_block"]
        k = sp._blocks_to_prune(-(-matrix.shape[0] // bh) * -(-matrix.shape[1] // bw), config)
        decided = one_read and fused_shard.one_read_applies(tuple(matrix.shape), (bh, bw),
                                                            bh * bw if zeros is None else zeros,
                                                            matrix.element_size(), k)
        row_start, row_stop = plan.groups[name].ranges.get(sp._comm.rank, (0, 0))
        check_shard_rows(matrix.shape[0], bh, row_start, row_stop)
        out = as_matrix(pieces[name])[row_start:row_stop]
        if decided:
            shard = fused_shard.OneReadShard(matrix, row_start, row_stop, (bh, bw), sp.norm, out, k)
        else:
            shard = fused_shard.FusedShard(matrix, row_start, row_stop, (bh, bw), sp.norm, out)
        if shard.nonfinite:
            error = nonfinite_error(matrix[row_start:row_stop], row_start)
            if error is not None:
                raise error
        return shard, k, decided
    except Exception as exc:  # noqa: BLE001 - reported through the status exchange
        fail(name, exc)
        return None, 0, decided

# -- rectangle-sharded groups (TorchRec), see distsparse.distributed.rects ------------------------

def _learn_rect_layouts(sp, names: list[str]) -> None:
    """Collective when some group's layout is not known yet (the same groups on every
    rank: the step's agreement covers it): one all-gather of every rank's rectangles."""
    unknown = [n for n in names if sp._groups[n].rect_layout is None]
    if not unknown:
        return
    mine = {n: [[r, c, int(t.shape[0]), int(t.shape[1])] for (r, c), t in sp._groups[n].rects.local_shards()]
            for n in unknown}
    gathered = [json.loads(b) for b in sp._comm.all_gather_bytes(json.dumps(mine, sort_keys=True).encode())]
    for name in unknown:
        group = sp._groups[name]
        try:
            group.rect_layout = layout_from_gathered(name, group.rects.shape, [g[name] for g in gathered],
                                                     sp._comm.rank)
        except ValueError as exc:  # the same lists on every rank: raised on every rank
            raise mark_raised_everywhere(exc)


def _sharded_block(sp, name: str, what: str) -> tuple[int, int]:
    """The group's block shape; a sparsifier that only implements ``update_mask`` (whole
    tensors) cannot mask a table that no rank holds whole."""
    block = sp._block_shape(name)
    if block is None:
        raise TypeError(f"group {name!r}: {type(sp).__name__} computes whole tensors only "
                        f"(update_mask); {what} needs the sharded protocol")
    return tuple(block)


def _rect_views(sp, names: list[str]) -> tuple[dict[str, RectView], int]:
    """Each rectangle-sharded group's :class:`~distsparse.distributed.rects.RectView` with its halo
    data: one all-gather of the rows/columns of blocks straddling shard boundaries (none
    when every boundary lies on a block edge). Returns the views and bytes sent."""
    comm = sp._comm
    views: dict[str, RectView] = {}
    for name in names:
        group = sp._groups[name]
        block = _sharded_block(sp, name, "a sharded table")
        views[name] = RectView(group.rect_layout, [t.detach() for t in group.rects.tensors], block)
    lengths = {n: views[n].halo_lengths(comm.world_size) for n in names}
    payload = [views[n].halo_payload() for n in names]  # also keeps pieces between this rank's own shards
    totals = [sum(lengths[n][r] for n in names) for r in range(comm.world_size)]
    if any(totals):
        gathered = comm.all_gather_tensor(torch.cat(payload), totals, "all_gather (table halos)")
    else:
        gathered = [torch.zeros(0, dtype=torch.uint8)] * comm.world_size
    offsets = [0] * comm.world_size
    for name in names:
        views[name].take_halo([g[offsets[r] : offsets[r] + lengths[name][r]] for r, g in enumerate(gathered)])
        offsets = [o + lengths[name][r] for r, o in enumerate(offsets)]
    return views, (max(totals) * (comm.world_size - 1) if any(totals) else 0)


def _rect_flags(sp, names: list[str], views: dict[str, RectView], selections: list[ShardSelection],
                ties_before: list[int], digit_bits: int) -> dict[str, torch.Tensor]:
    """Pruned flags of each group's local blocks. Where ties at the threshold are split
    and the layout is not row-ordered (column-wise shards: a rank's blocks interleave
    with others' in row-major order), the tied blocks' global indices go through a
    second exact selection (collective, the same groups on every rank)."""
    flags: dict[str, torch.Tensor] = {}
    by_index = [i for i, n in enumerate(names)
                if selections[i].needs_tie_prefix and not sp._groups[n].rect_layout.row_ordered]
    tied: dict[int, torch.Tensor] = {}
    index_selections = []
    for i in by_index:
        sel = selections[i]
        tied[i] = (sel.keys == sel.threshold).nonzero().reshape(-1)
        index_selections.append(ShardSelection(views[names[i]].global_indices(tied[i]), sel.tie_count,
                                               sel.ties, digit_bits))
    if index_selections:
        sp._comm.select_lowest(index_selections, failed=False)
    chosen = dict(zip(by_index, index_selections))
    for i, name in enumerate(names):
        sel = selections[i]
        if i in chosen:
            pruned = sel.keys < sel.threshold
            pruned[tied[i][chosen[i].pruned(0).to(tied[i].device)]] = True
        else:
            pruned = sel.pruned(ties_before[i])
        sel.release()
        flags[name] = pruned
    return flags


def _rect_masks(sp, names: list[str], views: dict[str, RectView], flags: dict[str, torch.Tensor],
                local_masks: dict[str, torch.Tensor], fail: Any) -> int:
    """Build each group's new flat local mask into ``local_masks``: this rank's owned
    regions, then (one all-gather, when some block straddles a boundary) the halo masks
    other ranks computed for its shards. Returns bytes sent."""
    comm = sp._comm
    outgoing: dict[str, list[torch.Tensor]] = {}
    targets: dict[str, dict[int, torch.Tensor]] = {}
    for name in names:
        group, view, config = sp._groups[name], views[name], sp.data_groups[name]
        flat = torch.empty(group.rects.local_numel(), dtype=torch.bool, device=group.rects.device)
        local_masks[name] = flat
        targets[name] = dict(zip(view.mine, group.shard_masks(flat)))
        try:
            def build(matrix: torch.Tensor, pruned: torch.Tensor, out: torch.Tensor,
                      name: str = name, config: dict[str, Any] = config) -> None:
                sp._shard_mask(name, matrix, 0, matrix.shape[0], pruned, config, out)

            outgoing[name] = view.build_masks(build, flags[name], targets[name])
        except Exception as exc:  # noqa: BLE001 - reported through the status exchange
            fail(name, exc)
    lengths = {n: views[n].mask_lengths(comm.world_size, packed_size) for n in names}
    totals = [sum(lengths[n][r] for n in names) for r in range(comm.world_size)]
    if not any(totals):
        return 0
    parts = []
    for name in names:
        packed = [pack_bits(p).cpu() for p in outgoing.get(name, []) if p.numel()]
        mine = torch.cat(packed) if packed else torch.zeros(0, dtype=torch.uint8)
        parts.append(torch.cat([mine, torch.zeros(lengths[name][comm.rank] - mine.numel(), dtype=torch.uint8)]))
    gathered = comm.all_gather_tensor(torch.cat(parts), totals, "all_gather (table mask halos)")
    offsets = [0] * comm.world_size
    for name in names:
        views[name].take_masks([g[offsets[r] : offsets[r] + lengths[name][r]] for r, g in enumerate(gathered)],
                               targets[name], unpack_bits, packed_size)
        offsets = [o + lengths[name][r] for r, o in enumerate(offsets)]
    return max(totals) * (comm.world_size - 1)


def digit_bits_for(sp, names: list[str]) -> int:
    """The radix digit width of this step's selection (identical on every rank: it
    depends on global shapes, dtypes and the world size only)."""
    if sp._selection_digit_bits is not None:
        return sp._selection_digit_bits
    if any(sp._groups[n].distributed_rows for n in names):
        # Sharded tables exist so that nothing table-sized travels: 4 rounds of 2 KiB
        # histograms per group (instead of 3 of 16 KiB with 11 bits, or 2 of 512 KiB) keep a
        # step's selection traffic under 100 kB per table even at 1,024 ranks (cost model).
        return 8
    key_bits = max((torch.finfo(sp._groups[n].data.dtype).bits for n in names), default=32)
    blocks = 0
    for name in names:
        group = sp._groups[name]
        rows, cols = (group.layout.rows, group.layout.cols) if group.sharded else as_matrix(group.local).shape
        bh, bw = sp._block_shape(name)  # type: ignore[misc]
        blocks += -(-rows // bh) * -(-cols // bw)
    return choose_digit_bits(sp.world_size, len(names), key_bits, keys_per_rank=blocks // sp.world_size)


def _sharded_rows(sp, names: list[str]) -> tuple[dict[str, ShardedRows], int]:
    """Each sharded group's owned rows on this rank (:class:`ShardedRows`), with the
    rows of straddling blocks that the next shards hold: one all-gather of every
    rank's first ``bh - 1`` rows of every group that has a straddling block (none when
    every shard boundary is a block boundary). Returns the views and bytes sent."""
    comm = sp._comm
    views: dict[str, ShardedRows] = {}
    need = []
    for name in names:
        group = sp._groups[name]
        block = _sharded_block(sp, name, "a sharded DTensor group")
        views[name] = ShardedRows(group.layout, as_matrix(group.local.detach()), block)
        if group.layout.needs_halo(block[0]):
            need.append(name)
    if not need:
        return views, 0
    lengths = [views[n].halo_nbytes for n in need]
    payload = torch.cat([views[n].first_rows_bytes() for n in need])
    gathered = comm.all_gather_tensor(payload, [sum(lengths)] * comm.world_size, "all_gather (row halos)")
    offset = 0
    for name, length in zip(need, lengths):
        views[name].take_halo([g[offset : offset + length] for g in gathered])
        offset += length
    return views, sum(lengths) * (comm.world_size - 1)


def _exchange_mask_halos(sp, names: list[str], views: dict[str, ShardedRows],
                         outgoing: dict[str, torch.Tensor], local_masks: dict[str, torch.Tensor]) -> int:
    """Mask rows of straddling blocks go to the shards holding them: one all-gather of
    every rank's bit-packed rows ``[e, b)`` (padded), from which each rank takes rows
    ``[s, a)``. Returns bytes sent."""
    comm = sp._comm
    need = [n for n in names if views[n].layout.needs_halo(views[n].block[0])]
    if not need:
        return 0
    lengths = [views[n].mask_halo_nbytes for n in need]
    parts = []
    for name, length in zip(need, lengths):
        rows = outgoing.get(name)
        packed = pack_bits(rows) if rows is not None and rows.numel() else torch.zeros(0, dtype=torch.uint8)
        parts.append(torch.cat([packed.cpu(), torch.zeros(length - packed.numel(), dtype=torch.uint8)]))
    gathered = comm.all_gather_tensor(torch.cat(parts), [sum(lengths)] * comm.world_size,
                                      "all_gather (mask halos)")
    offset = 0
    for name, length in zip(need, lengths):
        views[name].take_mask_halo([g[offset : offset + length] for g in gathered], as_matrix(local_masks[name]))
        offset += length
    return sum(lengths) * (comm.world_size - 1)


def exchange_masks(sp, plan: Plan, new_masks: dict[str, torch.Tensor], pieces: dict[str, torch.Tensor],
                   errors: list[str], first_error: BaseException | None,
                   aborted: bool = False, counted: list[str] = ()) -> tuple[int, int, dict[str, int]]:
    """One all-gather of every rank's status byte, the pruned-element counts of its
    part of each ``counted`` (sharded) group, the digest of its mask of each group every
    rank computes (planner kind ``"everywhere"``), and bit-packed mask rows — its whole
    groups and its row ranges of split groups, in name order, one bit per block where
    the masks prune whole blocks (:func:`_block_wire`), else per element — into ``new_masks``
    (whole masks of every replicated group). If any rank failed (or the selection was
    ``aborted`` for it), every rank raises instead. Where the digests of an everywhere
    group differ (its replicas were not the same data), :func:`_adopt_owner_masks` gives
    every rank the owner's mask. Returns (bytes sent, bytes received) by this rank and the
    global zero count of each counted group."""
    comm = sp._comm
    device = comm.device
    work = [plan.work_of(r) for r in range(comm.world_size)]
    everywhere = plan.everywhere_names

    def shape_of(name: str) -> tuple[int, int]:
        data = sp._groups[name].local
        return tuple(as_matrix(data).shape) if data.dim() else (1, 1)  # type: ignore[return-value]

    wire = {n: _block_wire(sp, n) for items in work for n, _, _ in items}

    def size_of(name: str, a: int, b: int) -> int:
        cols = shape_of(name)[1]
        return packed_size((b - a) * cols) if wire[name] is None else block_bits_size((b - a, cols), wire[name])

    def packed(mask: torch.Tensor, name: str) -> torch.Tensor:
        return pack_bits(mask) if wire[name] is None else pack_block_bits(as_matrix(mask), wire[name])

    head = 1 + 8 * len(counted) + 8 * len(everywhere)
    lengths = [head + sum(size_of(n, a, b) for n, a, b in items) for items in work]
    if errors or aborted:
        payload = torch.ones(1, dtype=torch.uint8, device=device)  # status 1; masks unused
    else:
        counts = torch.tensor([_zeros(new_masks[n]) if _contributes(sp, n) else 0 for n in counted]
                              + [mask_digest(new_masks[n]) for n in everywhere], dtype=torch.int64)
        parts = [torch.zeros(1, dtype=torch.uint8, device=device), counts.view(torch.uint8).to(device)]
        for name, a, b in work[comm.rank]:
            own = as_matrix(pieces[name])[a:b] if name in pieces else new_masks[name]
            parts.append(packed(own, name).to(device))
        payload = torch.cat(parts)
    gathered = comm.all_gather_tensor(payload, lengths)
    failed = [bool(int(part[0])) for part in gathered]
    if any(failed):
        comm.raise_if_any_failed(errors, f"{type(sp).__name__}.step()", local_error=first_error,
                                 failed=failed)
    totals = torch.zeros(len(counted), dtype=torch.int64)
    digests = []
    for part in gathered:
        words = part[1:head].cpu().clone().view(torch.int64)
        totals += words[: len(counted)]
        digests.append(words[len(counted):].tolist())
    zeros = dict(zip(counted, (int(t) for t in totals)))
    for r, items in enumerate(work):
        offset = head
        for name, a, b in items:
            size = size_of(name, a, b)
            if r != comm.rank:
                part = gathered[r][offset : offset + size]
                block = wire[name]
                if name in pieces:  # rows of a split group
                    rows = as_matrix(pieces[name])[a:b]
                    if block is None and not unpack_into(part, rows):
                        rows.copy_(unpack_bits(part, tuple(rows.shape)))
                    elif block is not None and not unpack_blocks_into(part, rows, block):
                        rows.copy_(unpack_block_bits(part, tuple(rows.shape), block))
                else:
                    data = sp._groups[name].local
                    mask = unpack_bits(part, tuple(data.shape)) if block is None else \
                        unpack_block_bits(part, shape_of(name), block).reshape(data.shape)
                    new_masks[name] = mask.to(data.device)
            offset += size
    new_masks.update(pieces)
    # all-gather: this rank's (padded) buffer goes to every other rank, theirs come here.
    padded = max(lengths)
    sent = received = padded * (comm.world_size - 1)
    differing = [n for i, n in enumerate(everywhere) if len({d[i] for d in digests}) > 1]
    if differing:  # the same list on every rank: every rank makes the extra collective
        extra = _adopt_owner_masks(sp, plan, differing, new_masks)
        sent, received = sent + extra, received + extra
    return sent, received, zeros


def close_everywhere(sp, plan: Plan, op: str, new_masks: dict[str, torch.Tensor], errors: list[str],
                     first_error: BaseException | None) -> int:
    """The end of a step whose every mask was computed from this rank's own data (groups
    computed everywhere, local groups): ONE all-reduce (:meth:`Comm.close`) of the step's
    frame, every rank's status and the digests of its everywhere masks. If those digests
    differ (the replicas were not the same data), a gather of each group's digests finds
    the groups, whose owners' masks every rank adopts (:func:`_adopt_owner_masks`). Every
    rank raises if any failed. Returns bytes sent (0 on the common path: framing only)."""
    comm = sp._comm
    everywhere = plan.everywhere_names
    digests = torch.tensor([0 if errors else mask_digest(new_masks[n]) for n in everywhere], dtype=torch.int64)
    outcome = digests.numpy().tobytes()
    if comm.close(op, errors, first_error, outcome):
        return 0
    mine = digests.view(torch.uint8)
    gathered = comm.all_gather_tensor(mine, [mine.numel()] * comm.world_size, "all_gather (mask digests)")
    per_rank = [g.cpu().clone().view(torch.int64).tolist() for g in gathered]
    differing = [n for i, n in enumerate(everywhere) if len({d[i] for d in per_rank}) > 1]
    sent = mine.numel() * (comm.world_size - 1)
    if differing:  # the same list on every rank: every rank makes the extra collective
        sent += _adopt_owner_masks(sp, plan, differing, new_masks)
    return sent


def _adopt_owner_masks(sp, plan: Plan, names: list[str], new_masks: dict[str, torch.Tensor]) -> int:
    """Groups every rank computed whose masks differ between ranks (their replicated data
    differed): one all-gather of each owner's bit-packed masks, which every rank adopts —
    the owner's copy decides, as when only the owner computes a group. Returns bytes sent."""
    comm = sp._comm
    owners = {n: plan.groups[n].owner for n in names}
    sizes = {n: packed_size(sp._groups[n].local.numel()) for n in names}
    lengths = [sum(sizes[n] for n in names if owners[n] == r) for r in range(comm.world_size)]
    mine = [pack_bits(new_masks[n]).to(comm.device) for n in names if owners[n] == comm.rank]
    payload = torch.cat(mine) if mine else torch.zeros(0, dtype=torch.uint8, device=comm.device)
    gathered = comm.all_gather_tensor(payload, lengths, "all_gather (owners' masks of differing replicas)")
    offsets = [0] * comm.world_size
    for name in names:
        owner, size = owners[name], sizes[name]
        if owner != comm.rank:
            data = sp._groups[name].local
            part = gathered[owner][offsets[owner] : offsets[owner] + size]
            new_masks[name] = unpack_bits(part, tuple(data.shape)).to(data.device)
        offsets[owner] += size
    return max(lengths) * (comm.world_size - 1)


def _contributes(sp, name: str) -> bool:
    """Whether this rank's part of a sharded group counts (an HSDP replica's does not)."""
    group = sp._groups[name]
    return group.rects is not None or group.layout.contributes

# -- state ------------------------------------------------------------------------
