"""Every collective distsparse uses, behind one small object that degrades to local.

This is the only module that imports ``torch.distributed``. With no initialized process
group (and none passed in) every operation is a local no-op, so single-process code runs
the very same code path. All methods documented as *collective* must be called by every
rank of the group, in the same order; none of them iterates a ``set``.

Payloads are raw bytes (JSON or bit-packed masks) carried in ``uint8`` tensors: nothing
is pickled, so a rank can never execute code another rank sent.

Every distsparse operation (a sparsifier step, a scheduler step, a checkpoint save or
load) is framed by :meth:`Comm.begin` and :meth:`Comm.finish`. On the success path each is
ONE all-reduce (MIN) of two ``int64``: a fingerprint of the call (name and phase, the
per-``Comm`` call counter, a digest of the operation's description) and its negation, so
the result holds the lowest and the highest fingerprint over the ranks. Its size (16 bytes)
depends neither on the world size nor on the operation, so ranks that are out of step (one
calls ``step()`` while another calls ``save_checkpoint``) still meet in collectives of the
same size. Every rank sees the same MIN and MAX, so every rank detects a mismatch at once;
only then do they all-gather a small fixed frame (name, phase, counter, digest) to raise
:class:`RankDisagreementError` naming every rank's call, or their descriptions to name the
groups that differ. Payloads travel in collectives sized by what they carry: the
scheduler's values in one 256-byte all-reduce from the rank that decided them (which is also
that operation's commit point), ``begin``'s ``inline`` bytes in an all-gather.
``finish`` is the commit point: state changes only after every rank reached it, so a rank
that gave up waiting (the backstop timeout) cannot leave the others committed alone — they
wait in ``finish`` and give up too.

An operation whose body needs no collective (a step whose every mask comes from the rank's
own data) is *deferred* (``operation(..., deferred=True)``): its frame is sent once, at the
end, by :meth:`Comm.close`, with the rank's status and a digest of its outcome folded into the
fingerprint — one 16-byte all-reduce in all, which is also the commit point. A rank in another
call meets it in the same 16-byte all-reduce, so mismatches are found and named as above.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from contextlib import contextmanager
from datetime import timedelta
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

__all__ = ["Comm", "RankDisagreementError", "RemoteError", "CollectiveTimeoutError"]


def _all_gather_into(out: torch.Tensor, tensor: torch.Tensor, group: Any | None) -> Any:
    # torch 2.13 renamed all_gather_into_tensor to all_gather_single; support both.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, tensor, group=group, async_op=True)


def _default_timeout() -> float:
    raw = os.environ.get("DISTSPARSE_COLLECTIVE_TIMEOUT", "300")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"DISTSPARSE_COLLECTIVE_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"DISTSPARSE_COLLECTIVE_TIMEOUT must be positive, got {raw!r}")
    return value


class RankDisagreementError(RuntimeError):
    """Ranks hold different groups, shapes or configs; raised on every rank."""


class RemoteError(RuntimeError):
    """An exception raised on another rank (or on the coordinator), re-raised here."""


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete within the backstop timeout. The ``Comm`` (and so the
    sparsifier, its scheduler and checkpoints) refuses every later call: the ranks can no
    longer be trusted to be at the same point."""


class Comm:
    """Rank facts and the few collectives distsparse needs.

    ``process_group=None`` means the default group when ``torch.distributed`` is
    initialized, and purely local operation otherwise.

    Every collective waits at most ``timeout`` seconds (default: the environment variable
    ``DISTSPARSE_COLLECTIVE_TIMEOUT``, else 300) and then raises ``RuntimeError`` — a
    backstop for a rank that never arrives (crashed, or skipped a ``step()``), which the
    per-step agreement check cannot see. The process group is unusable after that.
    """

    def __init__(self, process_group: Any | None = None, timeout: float | None = None) -> None:
        self._group = process_group
        self.timeout = _default_timeout() if timeout is None else float(timeout)
        #: Number of operations begun on this Comm (every rank counts the same).
        self.calls = 0
        #: Why this Comm refuses every call (a timed-out collective, a rank that left an
        #: operation alone), or None while it is usable.
        self.broken: str | None = None
        self._operation: str | None = None
        #: Bytes this rank has sent in all-reduces so far (ring model: 2(N-1)/N of the
        #: buffer); the sparsifier reports the difference per step.
        self.all_reduce_bytes_sent = 0
        #: Bytes this rank has sent in the frames of begin/finish (same ring model).
        self.framing_bytes_sent = 0
        #: A decided operation whose value all-reduce already was its commit point.
        self._committed: str | None = None
        #: A deferred operation's description, framed by :meth:`close`.
        self._pending = b"{}"

    def _wait(self, start: Callable[[], Any], what: str) -> None:
        """Start a collective (``start()`` returns its work) and wait for it with the
        backstop timeout. A peer that went away may fail the start itself (gloo raises at
        once): that, too, becomes the named error below."""
        started = time.monotonic()
        try:
            start().wait(timeout=timedelta(seconds=self.timeout))
        except RuntimeError as exc:
            op = f" of {self._operation}" if self._operation else ""
            waited = time.monotonic() - started
            if waited < 0.9 * self.timeout:  # the backend gave up early: a peer went away
                message = (
                    f"distsparse: rank {self.rank}: {what}{op} failed after {waited:.2g} s, before "
                    f"the {self.timeout:g} s timeout: another rank crashed or closed its "
                    f"connection. Original error: {exc}"
                )
            else:
                message = (
                    f"distsparse: rank {self.rank} waited more than {self.timeout:g} s in {what}{op}; "
                    "another rank did not join (it crashed, it is still computing — raise "
                    "DISTSPARSE_COLLECTIVE_TIMEOUT for huge tables or a slow get_schedule_param() — "
                    "or it skipped a collective call such as step(), save_checkpoint() or "
                    f"scheduler.step()). Original error: {exc}"
                )
            self.broken = message
            raise CollectiveTimeoutError(message) from exc

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise CollectiveTimeoutError(
                "distsparse: this sparsifier's process group can no longer be used by distsparse "
                f"(ranks are no longer in step): {self.broken}"
            )

    # -- operation framing ------------------------------------------------------------
    def begin(self, op: str, description: dict[str, Any] | None = None,
              inline: bytes | None = None) -> list[bytes]:
        """Collective: the first call of every distsparse operation.

        One all-reduce of the frame (:func:`_frame`) of this operation's name, this Comm's
        call counter and a digest of ``description`` ({name: JSON-able facts} every rank
        must share). Raises :class:`RankDisagreementError` on every rank when the ranks are
        in different operations (naming each rank's call) or hold different descriptions
        (naming the groups). Returns every rank's ``inline`` bytes (any length, empty
        included), indexed by rank, gathered by one more all-gather; every rank passes
        ``inline`` or none does (whether it is passed is part of the frame).
        """
        self._check_usable()
        if inline is not None and len(inline) > _INLINE_BYTES:
            raise ValueError(f"inline payload of {len(inline)} bytes exceeds {_INLINE_BYTES}")
        self.calls += 1
        self._committed = None
        if not self.is_distributed or self.world_size == 1:
            self._operation = op
            return [inline or b""]
        self._open(op, description, carries=inline is not None)
        return self.all_gather_bytes(inline) if inline is not None else [b""] * self.world_size

    def _open(self, op: str, description: dict[str, Any] | None, carries: bool = False) -> None:
        """The distributed part of :meth:`begin`: returns once every rank is in the same call
        with the same description."""
        blob = _canonical(description or {})
        self._frame_all_reduce("<begin> " + op, _digest62(blob), carries, f"the start of {op}", blob)
        self._operation = op

    def finish(self, op: str) -> None:
        """Collective: the commit point of an operation. Every rank returns only once every
        rank reached it; a caller changes its state only after this returns."""
        if self._committed == op:  # a decided operation's value all-reduce was its commit point
            self._committed = None
        elif self.is_distributed and self.world_size > 1:
            self._frame_all_reduce("<finish> " + op, 0, False, f"the end of {op}", b"{}")
        self._operation = None

    def _defer(self, op: str, description: dict[str, Any] | None) -> None:
        """:meth:`begin` without its collective: the frame waits for :meth:`close`."""
        self._check_usable()
        self.calls += 1
        self._committed = None
        self._operation = op
        self._pending = _canonical(description or {})

    def close(self, op: str, errors: Sequence[str], local_error: BaseException | None, outcome: bytes) -> bool:
        """Collective: the ONE all-reduce of a deferred operation — its opening frame, its
        status and a digest of its ``outcome`` (bytes every rank should hold alike, e.g. the
        digests of masks every rank computed) in one 16-byte frame.

        Equal frames mean every rank is in the same call with the same description, none
        failed and all hold the same outcome: that all-reduce is the commit point (the
        body's ``finish`` sends nothing) and this returns True. Otherwise every rank sees
        the mismatch and all-gather their records: ranks in different calls or with different
        descriptions raise :class:`RankDisagreementError` as :meth:`begin` does; if any rank
        failed, every rank raises as :meth:`raise_if_any_failed`; else only the outcomes
        differ and this returns False (the caller settles it collectively, then calls
        ``finish``, a frame as usual)."""
        blob, self._pending = self._pending, b"{}"
        if not self.is_distributed or self.world_size == 1:
            if local_error is not None:
                raise local_error
            return True
        failed = bool(errors) or local_error is not None
        digest, result = _digest62(blob), _digest62(bytes([failed]) + outcome)
        call = "<begin> " + op
        frame = _frame(call, self.calls, digest, False, result)
        if self._frame_all_reduce_raw(frame, f"the step's frame, status and outcome of {op}"):
            self._committed = op
            return True
        records = self._gathered_records(call, digest, False, blob, failed, result)
        flags = [bool(status) for status, _ in records]
        if any(flags):
            self.raise_if_any_failed(errors, op, local_error=local_error, failed=flags)
        return False

    def _frame_all_reduce(self, call: str, digest: int, carries: bool, what: str, blob: bytes) -> None:
        """Collective: one all-reduce (MIN) of the 16-byte frame of ``call`` (see
        :func:`_frame`). Every rank sees the same result, so on a mismatch every rank goes on
        to :meth:`_gathered_records`, which raises."""
        if not self._frame_all_reduce_raw(_frame(call, self.calls, digest, carries), what):
            self._gathered_records(call, digest, carries, blob)
            raise RankDisagreementError(f"{call}: ranks' frames differ (rank {self.rank} of {self.world_size})")

    def _frame_all_reduce_raw(self, fingerprints: list[int], what: str) -> bool:
        """Collective: the all-reduce (MIN) of a frame; whether every rank sent the same."""
        frame = torch.tensor(fingerprints, dtype=torch.int64, device=self.device)
        n = self.world_size
        self.framing_bytes_sent += 2 * (n - 1) * frame.numel() * frame.element_size() // n
        self._wait(lambda: dist.all_reduce(frame, op=dist.ReduceOp.MIN, group=self._group, async_op=True),
                   f"all_reduce ({what})")
        low, minus_high = frame.cpu().tolist()
        return low == -minus_high

    def _gathered_records(self, call: str, digest: int, carries: bool, blob: bytes, failed: bool = False,
                          result: int = 0) -> list[tuple[bool, int]]:
        """Collective, on a mismatch only (every rank saw it): all-gather every rank's call
        name, counter, description digest, inline flag, status and outcome digest. Raises
        :class:`RankDisagreementError` naming every rank's call, or (same calls) the groups
        whose descriptions differ, or the ranks that passed inline bytes; else returns every
        rank's (failed, outcome digest) — a deferred operation's mismatch (:meth:`close`)."""
        name = call.encode()[:_NAME_BYTES].ljust(_NAME_BYTES, b"\0")
        mine = (name + self.calls.to_bytes(8, "little") + digest.to_bytes(8, "little") + bytes([carries, failed])
                + result.to_bytes(8, "little"))
        parts = self._all_gather_fixed(mine, "the names of the calls")
        calls = [(p[:_NAME_BYTES].rstrip(b"\0").decode(errors="replace").removeprefix("<begin> "),
                  int.from_bytes(p[_NAME_BYTES : _NAME_BYTES + 8], "little")) for p in parts]
        if any(c != calls[0] for c in calls):
            self._operation = None
            shown = "; ".join(f"rank {r}: {op} (distsparse call #{n})" for r, (op, n) in enumerate(calls))
            raise RankDisagreementError(
                f"distsparse: ranks are in different collective calls (rank {self.rank} of "
                f"{self.world_size}): {shown}. Every rank must call step(), scheduler.step(), "
                "save_checkpoint() and load_checkpoint() in the same order."
            )
        op = calls[0][0]
        if any(p[_NAME_BYTES + 8 : _NAME_BYTES + 16] != parts[0][_NAME_BYTES + 8 : _NAME_BYTES + 16] for p in parts):
            self._operation = None
            self._raise_on_disagreement(blob, op)
        carried = [r for r, p in enumerate(parts) if p[_NAME_BYTES + 16]]
        if carried and len(carried) < len(parts):
            self._operation = None
            raise RankDisagreementError(f"{op}: only rank(s) {carried} of {self.world_size} passed inline bytes")
        return [(bool(p[_NAME_BYTES + 17]), int.from_bytes(p[_NAME_BYTES + 18 :], "little")) for p in parts]

    @contextmanager
    def operation(self, op: str, description: dict[str, Any] | None = None,
                  inline: bytes | None = None, deferred: bool = False) -> Iterator[list[bytes]]:
        """``begin`` … body … (the body calls ``finish`` before committing).

        ``deferred``: for a body that makes no collective of its own — its frame is sent
        only by :meth:`close`, which the body then calls once with its outcome (see there).

        If the body raises an exception that is not raised on every rank alike (those
        are :class:`RankDisagreementError`, :class:`RemoteError`, and exceptions flagged
        by :func:`mark_raised_everywhere`, e.g. the local errors that
        :meth:`raise_if_any_failed` re-raises), this rank may have left the others
        inside a collective: the Comm is marked broken and refuses later calls.
        """
        if deferred:
            if inline is not None:
                raise ValueError("a deferred operation carries no inline bytes")
            self._defer(op, description)
            parts = [b""] * self.world_size
        else:
            parts = self.begin(op, description, inline)
        with self._guard(op):
            yield parts

    @contextmanager
    def _guard(self, op: str) -> Iterator[None]:
        """Mark the Comm broken when the body of ``op`` raises on this rank alone."""
        try:
            yield
        except BaseException as exc:
            everywhere = getattr(exc, "_distsparse_everywhere", False) or isinstance(
                exc, (RankDisagreementError, RemoteError, CollectiveTimeoutError))
            if not everywhere and self.broken is None and self.is_distributed and self.world_size > 1:
                self.broken = (f"rank {self.rank} left {op} with {type(exc).__name__}: {exc} while "
                               "other ranks may still be inside it")
            self._operation = self._committed = None
            raise

    # -- rank facts -------------------------------------------------------------------
    @property
    def is_distributed(self) -> bool:
        if self._group is not None:
            return True
        return dist.is_available() and dist.is_initialized()

    @property
    def group(self) -> Any | None:
        return self._group

    @property
    def rank(self) -> int:
        return dist.get_rank(self._group) if self.is_distributed else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self._group) if self.is_distributed else 1

    @property
    def device(self) -> torch.device:
        """Where collective buffers must live: CUDA for NCCL, CPU otherwise."""
        if self.is_distributed and dist.get_backend(self._group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def global_ranks(self) -> list[int]:
        """The global rank of every member of this group, in group-rank order."""
        return [self._global_rank(r) for r in range(self.world_size)]

    def job_world_size(self) -> int:
        """Processes in the whole job (the default group), 1 when not distributed."""
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def job_token(self) -> str | None:
        """A random token shared by every process of this job, created once in the default
        process group's store (checkpoints record it to tell this job's writers from an
        earlier job's); ``None`` when there is no store to ask."""
        try:
            from torch.distributed import distributed_c10d

            store = distributed_c10d._get_default_store()
            return store.compare_set("distsparse/job_token", "", secrets.token_hex(16)).decode()
        except Exception:  # noqa: BLE001 - no default group / store: the job cannot be named
            return None

    def _global_rank(self, group_rank: int) -> int:
        if self._group is None:
            return group_rank
        return dist.get_global_rank(self._group, group_rank)

    # -- byte collectives -------------------------------------------------------------
    def all_gather_bytes(self, payload: bytes) -> list[bytes]:
        """Collective: every rank's ``payload``, indexed by rank (sizes may differ)."""
        if not self.is_distributed or self.world_size == 1:
            return [payload]
        device = self.device
        size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
        sizes = [torch.empty_like(size) for _ in range(self.world_size)]
        self._wait(lambda: dist.all_gather(sizes, size, group=self._group, async_op=True), "all_gather (sizes)")
        lengths = [int(s.item()) for s in sizes]
        buf = torch.zeros(max(lengths) or 1, dtype=torch.uint8, device=device)
        if payload:
            buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        out = [torch.empty_like(buf) for _ in range(self.world_size)]
        self._wait(lambda: dist.all_gather(out, buf, group=self._group, async_op=True), "all_gather (bytes)")
        return [o[:n].cpu().numpy().tobytes() for o, n in zip(out, lengths)]

    def all_gather_tensor(self, tensor: torch.Tensor, lengths: Sequence[int],
                          what: str = "all_gather (masks)") -> list[torch.Tensor]:
        """Collective: every rank's 1-D ``uint8`` tensor, indexed by rank, in one all-gather.

        ``lengths[r]`` is rank r's tensor length, which every rank must already know (for
        masks it follows from ownership and shapes); shorter tensors are padded.
        """
        if not self.is_distributed or self.world_size == 1:
            return [tensor]
        device = self.device
        longest = max(lengths) or 1
        buf = torch.zeros(longest, dtype=torch.uint8, device=device)
        buf[: tensor.numel()] = tensor.to(device)
        out = torch.empty(self.world_size * longest, dtype=torch.uint8, device=device)
        self._wait(lambda: _all_gather_into(out, buf, self._group), what)
        return [out[r * longest : r * longest + n] for r, n in enumerate(lengths)]

    def all_reduce_sum(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """Collective: the element-wise sum of every rank's ``tensor`` (same shape and
        dtype everywhere), returned on ``tensor``'s device."""
        if not self.is_distributed or self.world_size == 1:
            return tensor
        buf = tensor.to(self.device, copy=True)
        n = self.world_size
        self.all_reduce_bytes_sent += 2 * (n - 1) * buf.numel() * buf.element_size() // n
        self._wait(lambda: dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self._group, async_op=True), what)
        return buf.to(tensor.device)

    def select_lowest(self, selections: Sequence[Any], failed: bool,
                      slots: Sequence[int] | None = None,
                      contributes: Sequence[bool] | None = None) -> tuple[bool, list[int]]:
        """Collective: run the radix-selection rounds of every split group of a step
        together (:class:`distsparse.distributed.selection.ShardSelection`, one per group, in name
        order, the same list on every rank): one all-reduce of all histograms per round,
        then one of the tie counts when some group splits its ties.

        ``failed``: this rank could not score its rows (it still sends empty histograms of
        the right sizes). The first round carries a failure count; if any rank failed,
        every rank stops there and returns ``(True, [])``. Otherwise returns
        ``(False, ties_before)``: per selection, the ties held by the shards of lower
        *slots*.

        ``slots[i]``: the position of this rank's shard of selection ``i`` in row order
        (default: the rank — a split group's row ranges ascend with the rank; a sharded
        group's shard index). ``contributes[i]`` False: this rank holds a copy of a shard
        another rank contributes (an HSDP replica): it sends zero histograms and zero
        tie counts but advances from the same global counts, so it ends identical.
        """
        from .selection import pack_histograms, unpack_histograms

        round_no = 0
        while any(not sel.done for sel in selections):
            sizes = [sel.histogram_size for sel in selections]
            status = torch.tensor([1 if failed else 0], dtype=torch.int64)
            hists = [sel.histogram().cpu() for sel in selections]
            if contributes is not None:
                hists = [h if c else torch.zeros_like(h) for h, c in zip(hists, contributes)]
            flat = torch.cat([status, pack_histograms(hists)])
            total = self.all_reduce_sum(flat, f"all_reduce (selection round {round_no})")
            if int(total[0]):
                return True, []
            for sel, hist in zip(selections, unpack_histograms(total[1:], sizes)):
                try:
                    sel.advance(hist)
                except (RuntimeError, ValueError) as exc:  # same global counts: same on every rank
                    raise mark_raised_everywhere(exc)
            round_no += 1
        need = [i for i, sel in enumerate(selections) if sel.needs_tie_prefix]
        ties_before = [0] * len(selections)
        if need:
            counts = torch.zeros(len(need), self.world_size, dtype=torch.int64)
            slot_of = list(slots) if slots is not None else [self.rank] * len(selections)
            for row, i in enumerate(need):
                local = selections[i].local_ties()  # also computed by a non-contributing replica
                if contributes is None or contributes[i]:
                    counts[row, slot_of[i]] = local
            counts = self.all_reduce_sum(counts, "all_reduce (tie counts)")
            for row, i in enumerate(need):
                ties_before[i] = int(counts[row, : slot_of[i]].sum())
        return False, ties_before

    def _all_gather_fixed(self, payload: bytes, what: str) -> list[bytes]:
        """Collective: like :meth:`all_gather_bytes` for payloads of one agreed size."""
        tensor = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        parts = self.all_gather_tensor(tensor, [len(payload)] * self.world_size, f"all_gather ({what})")
        return [p.cpu().numpy().tobytes() for p in parts]

    def broadcast_bytes(self, payload: bytes | None, src: int = 0) -> bytes:
        """Collective: ``payload`` from group rank ``src`` to every rank."""
        if not self.is_distributed or self.world_size == 1:
            assert payload is not None
            return payload
        device = self.device
        is_src = self.rank == src
        size = torch.tensor([len(payload) if is_src and payload is not None else 0], dtype=torch.int64, device=device)
        self._wait(lambda: dist.broadcast(size, src=self._global_rank(src), group=self._group, async_op=True),
                   "broadcast (size)")
        n = int(size.item())
        buf = torch.zeros(max(n, 1), dtype=torch.uint8, device=device)
        if is_src and n:
            buf[:n] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)  # type: ignore[arg-type]
        self._wait(lambda: dist.broadcast(buf, src=self._global_rank(src), group=self._group, async_op=True),
                   "broadcast (bytes)")
        return buf[:n].cpu().numpy().tobytes()

    # -- patterns ---------------------------------------------------------------------
    def run_on_coordinator(self, fn: Callable[[], T], encode: Callable[[T], bytes],
                           decode: Callable[[bytes], T], src: int = 0) -> T:
        """Collective: ``fn()`` runs on rank ``src`` only; every rank gets its decoded result.

        If ``fn`` raises on the coordinator, every rank raises (the coordinator re-raises
        its own exception, the others a :class:`RemoteError` carrying its message) instead
        of waiting forever. The coordinator also uses the *decoded* value, so all ranks hold
        the same bits.
        """
        if not self.is_distributed or self.world_size == 1:
            return decode(encode(fn()))
        payload: bytes | None = None
        error: BaseException | None = None
        if self.rank == src:
            try:
                payload = b"\x00" + encode(fn())
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                error = exc
                payload = b"\x01" + f"{type(exc).__name__}: {exc}".encode()
        received = self.broadcast_bytes(payload, src=src)
        if received[:1] == b"\x01":
            if error is not None:
                raise mark_raised_everywhere(error)
            raise RemoteError(f"rank {src} raised: {received[1:].decode(errors='replace')}")
        return decode(received[1:])

    def raise_if_any_failed(self, errors: Sequence[str], what: str,
                            local_error: BaseException | None = None,
                            failed: Sequence[bool] | None = None) -> None:
        """Collective: if any rank reports errors, every rank raises.

        A rank that failed re-raises ``local_error`` (its own exception, e.g. a ValueError
        naming the group); the others raise :class:`RemoteError` listing every rank's errors.
        ``failed`` (each rank's flag, when a caller already gathered them) saves a round trip.
        """
        local = "\n".join(errors).encode()
        if not self.is_distributed or self.world_size == 1:
            if local_error is not None:
                raise local_error
            if errors:
                raise RemoteError(local.decode())
            return
        if failed is None:
            flag = torch.tensor([1 if errors else 0], dtype=torch.int64, device=self.device)
            self._wait(lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True),
                       "all_reduce (status)")
            failed = [bool(int(flag.item()))]
        if not any(failed):
            return
        messages = self.all_gather_bytes(local)
        lines = [
            f"[rank {r}] {line}"
            for r, m in enumerate(messages)
            for line in m.decode(errors="replace").splitlines()
        ]
        if local_error is not None:
            raise mark_raised_everywhere(local_error)
        raise RemoteError(f"{what} failed:\n" + "\n".join(lines))

    def decided_operation(self, op: str, description: dict[str, dict[str, Any]],
                          fn: Callable[[], T], encode: Callable[[T], bytes],
                          decode: Callable[[bytes], T], src: int = 0):
        """Collective: :meth:`operation` whose value is ``fn()``'s result, computed on rank
        ``src`` alone — "decide on rank 0 and share" (the scheduler's step). After the
        frame, one all-reduce of 256 bytes carries ``src``'s status, the result's length and
        the result when it fits; every rank takes part in it, so it is also the commit point
        and the body's ``finish`` sends nothing. A longer result takes a broadcast of the
        rest, then ``finish`` is the usual frame.

        Use as ``with comm.decided_operation(...) as value:``. If ``fn`` raises on the
        coordinator, every rank raises (the coordinator its own exception, the others a
        :class:`RemoteError`). The coordinator uses the *decoded* value too, so all ranks
        hold the same bits.
        """
        self._check_usable()
        body, error = b"", None
        if self.rank == src:
            try:
                body = encode(fn())
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                error = exc
                body = f"{type(exc).__name__}: {exc}".encode()
        return self._decided(op, description, body, error, decode, src)

    @contextmanager
    def _decided(self, op, description, body, error, decode, src):
        self._check_usable()
        self.calls += 1
        failed = error is not None
        distributed = self.is_distributed and self.world_size > 1
        if distributed:
            self._open(op, description)
        else:
            self._operation = op
        with self._guard(op):
            if distributed:
                failed, body, whole = self._share_decision(failed, body if self.rank == src else None, src)
                self._committed = op if whole else None
            if failed:
                if error is not None:
                    raise mark_raised_everywhere(error)
                raise RemoteError(f"rank {src} raised: {body.decode(errors='replace')}")
            yield decode(body)

    def _share_decision(self, failed: bool, body: bytes | None, src: int) -> tuple[bool, bytes, bool]:
        """Collective: ``src``'s (failed, body) to every rank in one all-reduce (MIN) of a fixed
        ``_DECISION_BYTES`` of ``uint8`` — status, length and the body when it fits; the other
        ranks send 255s — and a broadcast of the rest of a longer body. Returns (failed, body,
        whether the all-reduce carried everything): every rank took part in it, so it can be
        the operation's commit point, and :meth:`finish` then sends nothing."""
        device = self.device
        head = torch.full((_DECISION_BYTES,), 255, dtype=torch.uint8, device=device)
        if self.rank == src:
            assert body is not None
            first = bytes([failed]) + len(body).to_bytes(8, "little") + body[: _DECISION_BYTES - 9]
            head[: len(first)] = torch.frombuffer(bytearray(first), dtype=torch.uint8)
        self._wait(lambda: dist.all_reduce(head, op=dist.ReduceOp.MIN, group=self._group, async_op=True),
                   "all_reduce (the decided value)")
        received = head.cpu().numpy().tobytes()
        length = int.from_bytes(received[1:9], "little")
        out = received[9 : 9 + min(length, _DECISION_BYTES - 9)]
        rest = length - len(out)
        if rest > 0:
            tail = torch.empty(rest, dtype=torch.uint8, device=device)
            if self.rank == src:
                tail.copy_(torch.frombuffer(bytearray(body[len(out) :]), dtype=torch.uint8))  # type: ignore[index]
            self._wait(lambda: dist.broadcast(tail, src=self._global_rank(src), group=self._group, async_op=True),
                       "broadcast (the rest of the decided value)")
            out += tail.cpu().numpy().tobytes()
        return bool(received[0]), out, rest <= 0

    def _raise_on_disagreement(self, blob: bytes, what: str) -> None:
        """Collective, on a mismatch only (every rank saw it): all-gather every rank's
        description and raise naming what differs."""
        described = [json.loads(b) for b in self.all_gather_bytes(blob)]
        problems = describe_differences(described)
        self._operation = None
        raise RankDisagreementError(
            f"{what}: ranks disagree (rank {self.rank} of {self.world_size}):\n  "
            + "\n  ".join(problems)
            + "\nEvery rank must add the same groups with the same shapes and configs "
            "(use replicated=False for per-rank data such as input batches)."
        )


def mark_raised_everywhere(exc: BaseException) -> BaseException:
    """Flag ``exc`` as raised on every rank alike (so the operation it leaves does not
    break the Comm) and return it."""
    try:
        exc._distsparse_everywhere = True  # type: ignore[attr-defined]
    except AttributeError:  # exceptions with __slots__: treated as one-sided
        pass
    return exc


def describe_differences(per_rank: Sequence[dict[str, dict[str, Any]]], noun: str = "group") -> list[str]:
    """Lines naming what differs between ranks' descriptions ({name: {key: value}})."""
    problems = []
    for name in sorted({n for d in per_rank for n in d}):
        entries = [d.get(name) for d in per_rank]
        if all(e == entries[0] for e in entries):
            continue
        missing = [r for r, e in enumerate(entries) if e is None]
        if missing:
            problems.append(f"{noun} {name!r} is missing on rank(s) {missing}")
            continue
        for key in sorted({k for e in entries for k in e}):
            values = [e.get(key) for e in entries]
            if any(v != values[0] for v in values):
                shown = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
                problems.append(f"{noun} {name!r} differs in {key}: {shown}")
    return problems


# Most bytes ``begin`` accepts as ``inline`` payload (they take their own all-gather).
_INLINE_BYTES = 4096
# Bytes of a call's name in the all-gather that names every rank's call after a mismatch.
_NAME_BYTES = 120
# Bytes of the all-reduce of a decided operation's value: status, length, then the value.
_DECISION_BYTES = 256
# Fingerprints are kept below 2**62 so that their negation (MAX as MIN) cannot overflow.
_FIELD = (1 << 62) - 1


def _digest62(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") & _FIELD


def _frame(call: str, calls: int, digest: int, carries: bool, result: int | None = None) -> list[int]:
    """The two ``int64`` all-reduced (MIN) at the start and end of every operation: a
    fingerprint of (call name and phase, call counter, description digest, whether inline
    bytes follow) and its negation, so one MIN gives the lowest and the highest fingerprint
    over the ranks — equal exactly when every rank is in the same call with the same
    description; ``result``: a deferred operation's status and outcome digest, see
    :meth:`Comm.close`). 16 bytes at every world size."""
    tail = "" if result is None else f"\0{result}"
    fingerprint = _digest62(f"{call}\0{calls}\0{digest}\0{int(carries)}{tail}".encode())
    return [fingerprint, -fingerprint]


def _canonical(description: dict[str, Any]) -> bytes:
    return json.dumps(description, sort_keys=True).encode()
