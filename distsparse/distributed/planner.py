"""Who computes what in one ``step()``: whole groups and row ranges, balanced by size.

Pure and deterministic: :func:`plan` depends only on the world size and the groups'
names, 2-D view shapes, block shapes and flags, so every rank computes the same plan
without talking to the others. The sparsifier recomputes it when its groups change.

**The rule.** ``F = total / N`` is the fair share (elements of all replicated groups over
the world size). Whole groups are placed largest first on the least-loaded rank (LPT
greedy, as before this module existed). If that leaves some rank above
``max(F, U)`` — ``U`` the largest group that may not be split — the largest *splittable*
groups are split, as few as needed (found by bisection on their count): their elements
are poured, in name order, into the ranks' room below the common water level, rank by
rank, each cut rounded to the nearest block row. So:

* a small group (below ``min_split_elements``, fewer than two block rows, or a subclass
  without the sharded protocol) always stays whole — it never costs selection rounds;
* groups are split only when balance needs it: 8 equal tables on 2 ranks stay whole;
* every rank's load is at most ``max(F, U) + b``, ``b`` the largest block row of a split
  group (the rounding of its two cuts): ``F + b`` whenever no unsplittable group exceeds
  ``F`` and the splittable ones can even out the rest. Only when the unsplittable groups
  alone cannot be placed under ``max(F, U)`` (LPT's limit) is it up to ``F + U + b``.

**Which groups may be split** (issue 22: split only where it pays). By default
(``min_split_elements=None``) a group is splittable when :class:`SplitCosts` predicts that
its busiest rank finishes sooner with the group split over the ranks than with one rank
computing it whole (:meth:`SplitCosts.split_pays`). Both run the fused one-read kernel
(``distsparse.kernels.fused_cpu``; a shard ``distsparse.kernels.fused_shard``), so a split
halves the computation at world 2 but, on this project's 2-vCPU machine, two processes
reading side by side are slower per element, and the split adds a wait for the slowest
rank, the selection's all-reduces (~18.5 ms at world 2 on gloo over loopback, all told)
and the mask rows' exchange: tables from ~62M elements gain at world 2 (measured: even at
64M), ~43M at world 4; smaller ones are computed on every rank. The constants are fixed (the same on every rank, so every rank
makes the same plan) and were measured with ``benchmarks/bench_distributed.py --sweep``. An explicit ``min_split_elements`` restores the size rule:
every group of at least that many elements may be split when balance needs it.

**Whole groups computed on every rank** (kind ``"everywhere"``). A whole group costs its
owner the computation and every other rank the unpacking of its mask (plus its share of
the closing all-gather). Under the cost model (``min_split_elements=None``) a whole
splittable group — the built-in, deterministic kernels — whose computation fits on every
other rank without raising the busiest rank's load is instead computed by *every* rank from
its own copy (largest first): one table at world 2, say, or a third table at world 2 next
to two others. Its mask then does not travel; only a 8-byte digest of each rank's mask
rides in the step's closing all-gather, and when the digests differ (the replicated data
was not the same everywhere) the group's nominal ``owner`` sends its mask to every rank in
one extra all-gather, so every rank ends with the owner's mask as before.

A split group's shards are contiguous row ranges, in rank order along the rows, each
starting and ending at a multiple of the block height (the last may end at the last row),
so no block straddles two ranks. A split group whose pour lands on a single rank is whole.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction

__all__ = ["GroupSpec", "GroupPlan", "Plan", "SplitCosts", "plan", "DEFAULT_MIN_SPLIT_ELEMENTS"]

#: ``None``: the cost model (:class:`SplitCosts`) decides which groups may be split.
DEFAULT_MIN_SPLIT_ELEMENTS: int | None = None


@dataclass(frozen=True)
class SplitCosts:
    """The per-rank time model behind the default split decision. Defaults: one core of
    this project's 2-vCPU machine, gloo over loopback, two processes side by side
    (``benchmarks/bench_distributed.py --sweep`` with ``--min-split 1`` and ``0``,
    2026-12-03; ``benchmarks/results/distributed_sweep.md``).

    A group computed whole costs ``numel × whole_seconds_per_element`` (the fused CPU
    kernel, on every rank or on its owner). Split over ``N`` ranks, the busiest rank costs
    ``numel / N × split_seconds_per_element`` (the one-read kernel on its rows,
    :mod:`distsparse.kernels.fused_shard`, slowed by the other ranks' reads of the same
    memory), plus ``skew_seconds`` (the status all-reduce waiting for the slowest rank,
    and each rank's sample of the whole table), plus the selection's all-reduces — the
    status (``1 + 3`` int64: one-read shards), ``rounds`` rounds over the candidates
    (``2**candidate_digit_bits`` counts each) and the tie counts — each a ring of
    ``2(N−1)`` steps of ``step_latency_s`` plus a 1/N slice at ``allreduce_bytes_per_s``,
    plus packing, receiving and unpacking the other ranks' mask rows (``numel × (N−1)/N ×
    exchange_seconds_per_element``, one bit per block)."""

    #: Seconds per element of a whole group's mask (the fused one-read kernel, one thread):
    #: world 1 took 6.6-7.7 ms at 4M elements, 21-23 ms at 16M, 60-85 ms at 64M (dim 32).
    whole_seconds_per_element: float = 1.2e-9
    #: Seconds per element of a shard's rows (the one-read kernel, two processes side by side).
    split_seconds_per_element: float = 1.4e-9
    #: A split step's wait for the slowest rank and the per-rank whole-table sample: a forced
    #: split at world 2 took 25 ms at 4M elements, 33 ms at 16M, 67-90 ms at 64M (~19 ms fixed).
    skew_seconds: float = 16e-3
    #: One ring step of a small all-reduce: half the 0.49 ms of a raw 64-byte all-reduce at world 2
    #: (benchmarks/results/comm.md, load 0.45); ``selection.ALLREDUCE_STEP_LATENCY_S`` (104 µs) is the
    #: calibrated fit of larger buffers, optimistic for the step's short all-reduces.
    step_latency_s: float = 245e-6
    #: Ring all-reduce bandwidth (``selection.ALLREDUCE_BYTES_PER_S``).
    allreduce_bytes_per_s: float = 1.04e9
    #: Packing, receiving (one bit per block over gloo) and unpacking one element of another
    #: rank's mask rows.
    exchange_seconds_per_element: float = 0.4e-9
    #: Selection rounds over the candidates (float32 keys, 11-bit digits: few candidates, so
    #: ``selection.choose_digit_bits`` picks small histograms), then the tie counts.
    rounds: int = 3
    candidate_digit_bits: int = 11

    def fixed_seconds(self, world_size: int) -> float:
        """The split step's costs independent of the group's size at ``world_size``."""
        steps = 2 * (world_size - 1)

        def ring(n_bytes: int) -> float:
            return steps * (self.step_latency_s + n_bytes / (world_size * self.allreduce_bytes_per_s))

        return (self.skew_seconds + ring(8 * 4) + self.rounds * ring(8 << self.candidate_digit_bits)
                + ring(8 * world_size))

    def split_seconds(self, numel: int, world_size: int) -> float:
        """The busiest rank's modelled time for ``numel`` elements split over ``world_size`` ranks."""
        share = numel / world_size
        return (share * self.split_seconds_per_element + self.fixed_seconds(world_size)
                + (numel - share) * self.exchange_seconds_per_element)

    def split_pays(self, numel: int, world_size: int) -> bool:
        """Whether ``numel`` elements over ``world_size`` ranks beat one rank doing all."""
        if world_size < 2:
            return False
        return self.split_seconds(numel, world_size) < numel * self.whole_seconds_per_element


@dataclass(frozen=True)
class GroupSpec:
    """What the planner needs to know of one group (identical on every rank).

    ``rows, cols``: its 2-D view (``masks.as_matrix``); ``block_shape``: ``(bh, bw)``;
    ``replicated``: the same data on every rank (a local group is computed by every rank
    from its own data and is not planned); ``splittable``: its sparsifier implements the
    sharded protocol (a plain ``update_mask`` subclass sees whole tensors only).
    """

    name: str
    rows: int
    cols: int
    block_shape: tuple[int, int]
    replicated: bool = True
    splittable: bool = True

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    @property
    def block_row_elements(self) -> int:
        """Elements of one block row: the granularity of a split."""
        return self.block_shape[0] * self.cols


@dataclass(frozen=True)
class GroupPlan:
    """One group's assignment: ``kind`` is ``"whole"`` (``owner`` computes it),
    ``"everywhere"`` (every rank computes it whole; ``owner``'s mask wins if they differ),
    ``"split"`` (``ranges`` maps each rank holding rows to its ``(row_start, row_stop)``,
    ascending with the rank and contiguous; ``owner`` is ``None``) or ``"local"`` (every rank, its own data)."""

    name: str
    kind: str
    owner: int | None = None
    ranges: Mapping[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def lead(self) -> int | None:
        """What ``owner_of`` reports: the owner of a whole group; for a split group the
        rank holding row 0 (the first range); ``None`` for a local group."""
        if self.kind in ("whole", "everywhere"):
            return self.owner
        if self.kind == "split":
            return min(self.ranges, key=lambda r: self.ranges[r][0])
        return None


@dataclass(frozen=True)
class Plan:
    """The work of one step on every rank. ``loads[r]``: elements rank ``r`` scores;
    ``fair_share``: total / world size."""

    world_size: int
    groups: Mapping[str, GroupPlan]
    loads: tuple[int, ...]
    fair_share: float
    min_split_elements: int | None

    def assignment(self, name: str) -> dict[int, tuple[int, int]]:
        """``{rank: (row_start, row_stop)}`` of group ``name``: one entry covering every
        row for a whole group, one per holding rank for a split one, ``{}`` for a local one."""
        group = self._get(name)
        return dict(group.ranges)

    def owner_of(self, name: str) -> int | None:
        """See :attr:`GroupPlan.lead`."""
        return self._get(name).lead

    @property
    def split_names(self) -> list[str]:
        """Split groups in name order: the groups the step's selection rounds serve."""
        return [n for n in sorted(self.groups) if self.groups[n].kind == "split"]

    @property
    def everywhere_names(self) -> list[str]:
        """Whole groups every rank computes, in name order (their masks do not travel)."""
        return [n for n in sorted(self.groups) if self.groups[n].kind == "everywhere"]

    def work_of(self, rank: int) -> list[tuple[str, int, int]]:
        """``(name, row_start, row_stop)`` of the masks ``rank`` sends in the closing
        exchange, in name order (local and everywhere groups excluded)."""
        out = []
        for name in sorted(self.groups):
            if self.groups[name].kind == "everywhere":
                continue
            rows = self.groups[name].ranges.get(rank)
            if rows is not None:
                out.append((name, rows[0], rows[1]))
        return out

    def _get(self, name: str) -> GroupPlan:
        try:
            return self.groups[name]
        except KeyError:
            raise ValueError(f"group {name!r} is not in the plan; planned groups: {sorted(self.groups)}") from None


def _lpt(specs: list[GroupSpec], world_size: int) -> tuple[dict[str, int], list[int]]:
    """Largest first onto the least-loaded rank (name, then lowest rank break ties).
    Returns the owners and the real element loads (an empty group weighs 1 in the greedy
    only, so empty groups spread over the ranks)."""
    heap = [(0, r) for r in range(world_size)]
    owners: dict[str, int] = {}
    loads = [0] * world_size
    for spec in sorted(specs, key=lambda s: (-s.numel, s.name)):
        load, rank = heapq.heappop(heap)
        owners[spec.name] = rank
        loads[rank] += spec.numel
        heapq.heappush(heap, (load + max(spec.numel, 1), rank))
    return owners, loads


def _water_level(loads: list[int], volume: int) -> Fraction:
    """Level L with sum(max(0, L - load)) == volume (exact)."""
    ordered = sorted(loads)
    for i in range(1, len(ordered) + 1):
        level = Fraction(volume + sum(ordered[:i]), i)
        if i == len(ordered) or level <= ordered[i]:
            return level
    raise AssertionError("unreachable")


def _pour(split: list[GroupSpec], loads: list[int]) -> dict[str, dict[int, tuple[int, int]]]:
    """Pour the split groups (name order, concatenated) into each rank's room below the
    water level, rank by rank; cuts rounded to the nearest block row of the cut group."""
    volume = sum(s.numel for s in split)
    level = _water_level(loads, volume)
    offsets, start = [], 0
    for spec in split:
        offsets.append(start)
        start += spec.numel
    # Cut c_r: where rank r's portion ends, in the concatenated element sequence.
    cuts, acc = [], Fraction(0)
    for load in loads:
        acc += max(Fraction(0), level - load)
        cuts.append(acc)
    cuts[-1] = Fraction(volume)

    def snap(position: Fraction) -> tuple[int, int]:
        """(group index, row) of a cut, rounded to the nearest block row (half up)."""
        for g in range(len(split) - 1, -1, -1):
            if position >= offsets[g]:
                break
        spec = split[g]
        block_rows_in = (position - offsets[g]) / spec.block_row_elements
        row = min(spec.rows, int(block_rows_in + Fraction(1, 2)) * spec.block_shape[0])
        return g, row

    ranges: dict[str, dict[int, tuple[int, int]]] = {s.name: {} for s in split}
    prev = (0, 0)
    for rank, cut in enumerate(cuts):
        end = snap(cut) if rank < len(cuts) - 1 else (len(split) - 1, split[-1].rows)
        if end < prev:
            end = prev
        for g in range(prev[0], end[0] + 1):
            row_start = prev[1] if g == prev[0] else 0
            row_stop = end[1] if g == end[0] else split[g].rows
            if row_stop > row_start:
                ranges[split[g].name][rank] = (row_start, row_stop)
        prev = end
    return ranges


def _replicate_where_free(result: dict[str, GroupPlan], by_name: Mapping[str, GroupSpec], loads: list[int]) -> None:
    """Turn whole splittable groups into ``"everywhere"`` groups, largest first (then by
    name), while every other rank can compute the group too without its load exceeding
    the busiest rank's: the step's time does not grow, and the mask stops travelling."""
    busiest = max(loads)
    whole = sorted((g for g in result.values() if g.kind == "whole" and by_name[g.name].splittable),
                   key=lambda g: (-by_name[g.name].numel, g.name))
    world = range(len(loads))
    for group in whole:
        numel = by_name[group.name].numel
        if numel == 0 or any(loads[r] + numel > busiest for r in world if r != group.owner):
            continue
        for r in world:
            if r != group.owner:
                loads[r] += numel
        rows = by_name[group.name].rows
        result[group.name] = GroupPlan(group.name, "everywhere", group.owner, {r: (0, rows) for r in world})


def plan(world_size: int, groups: Iterable[GroupSpec], *,
         min_split_elements: int | None = DEFAULT_MIN_SPLIT_ELEMENTS,
         split_costs: SplitCosts = SplitCosts()) -> Plan:
    """The deterministic plan of one step (see the module docstring for the rule).
    ``min_split_elements=None``: ``split_costs`` decides which groups may be split."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    specs = sorted(groups, key=lambda s: s.name)
    for a, b in zip(specs, specs[1:]):
        if a.name == b.name:
            raise ValueError(f"group {a.name!r} is listed twice")
    for s in specs:
        if s.rows < 0 or s.cols < 0 or len(s.block_shape) != 2 or min(s.block_shape) < 1:
            raise ValueError(f"group {s.name!r}: bad shape {(s.rows, s.cols)} or block shape {s.block_shape}")
    local = [s for s in specs if not s.replicated]
    planned = [s for s in specs if s.replicated]
    total = sum(s.numel for s in planned)
    fair = total / world_size

    def eligible(s: GroupSpec) -> bool:
        if not (world_size > 1 and s.splittable and s.rows > s.block_shape[0]):
            return False
        if min_split_elements is None:
            return split_costs.split_pays(s.numel, world_size)
        return s.numel >= min_split_elements

    candidates = sorted((s for s in planned if eligible(s)), key=lambda s: (-s.numel, s.name))
    fixed = [s for s in planned if not eligible(s)]
    floor = max([fair] + [s.numel for s in fixed])  # no plan beats the largest unsplittable group

    def attempt(m: int):
        split = sorted(candidates[:m], key=lambda s: s.name)
        owners, loads = _lpt(fixed + candidates[m:], world_size)
        return split, owners, loads

    def balanced(m: int) -> bool:
        return max(attempt(m)[2]) <= floor

    # Fewest splits whose whole-group loads stay under the floor (bisection; LPT is not
    # strictly monotone in m, so the answer is a count that works, not always the least).
    must = sum(1 for s in candidates if s.numel > fair)
    lo, hi = must, len(candidates)
    if balanced(lo):
        hi = lo
    elif balanced(hi):
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if balanced(mid):
                hi = mid
            else:
                lo = mid
    split, owners, loads = attempt(hi)
    by_name = {s.name: s for s in planned}
    result: dict[str, GroupPlan] = {
        name: GroupPlan(name, "whole", rank, {rank: (0, by_name[name].rows)}) for name, rank in owners.items()
    }
    if split:
        for name, ranges in _pour(split, loads).items():
            for rank, (a, b) in ranges.items():
                loads[rank] += (b - a) * by_name[name].cols
            if len(ranges) == 1:  # the pour landed on one rank: no selection rounds needed
                (rank,) = ranges
                result[name] = GroupPlan(name, "whole", rank, dict(ranges))
            else:
                result[name] = GroupPlan(name, "split", None, dict(sorted(ranges.items())))
    if min_split_elements is None and world_size > 1:
        _replicate_where_free(result, by_name, loads)
    for s in local:
        result[s.name] = GroupPlan(s.name, "local")
    return Plan(world_size=world_size, groups={n: result[n] for n in sorted(result)},
                loads=tuple(loads), fair_share=fair, min_split_elements=min_split_elements)
