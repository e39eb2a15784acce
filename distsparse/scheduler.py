"""BaseDataScheduler and the built-in schedules.

A scheduler varies one config value of every group (usually ``sparsity_level``) over
time. ``step()`` is decided once: rank 0 alone calls ``get_schedule_param()``, the
result travels as JSON bytes (never pickle; floats arrive bit for bit, rank 0 uses the
decoded values too) and every rank writes it into the sparsifier's ``data_groups``.
"""

from __future__ import annotations

import abc
import json
import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from .distributed.comm import mark_raised_everywhere
from .sparsifier import BaseDataSparsifier

__all__ = [
    "BaseDataScheduler",
    "GammaScheduler",
    "LambdaScheduler",
    "LinearScheduler",
    "CubicScheduler",
    "SCHEDULER_FORMAT_VERSION",
]

#: Version of the scheduler ``state_dict()`` layout.
SCHEDULER_FORMAT_VERSION = 1


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # torch / numpy scalars
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} value {value!r} is not JSON-able")


def _encode(values: Any) -> bytes:
    if not isinstance(values, Mapping):
        raise TypeError(f"get_schedule_param() must return a dict {{data_name: value}}, "
                        f"got {type(values).__name__}")
    bad = [k for k in values if not isinstance(k, str)]
    if bad:
        raise TypeError(f"get_schedule_param() keys must be group names (str), got {bad!r}")
    return json.dumps(dict(values), sort_keys=True, default=_json_default).encode()


def _decode(payload: bytes) -> dict[str, Any]:
    return json.loads(payload)


# {sparsifier: {schedule_param: weak reference to the scheduler driving it}}. Weak on both
# sides: a scheduler that is deleted (garbage-collected) frees its parameter for another.
_DRIVERS: weakref.WeakKeyDictionary[BaseDataSparsifier, dict[str, weakref.ref[BaseDataScheduler]]] = \
    weakref.WeakKeyDictionary()


def _driver(sparsifier: BaseDataSparsifier, schedule_param: str) -> BaseDataScheduler | None:
    ref = _DRIVERS.get(sparsifier, {}).get(schedule_param)
    return None if ref is None else ref()


class BaseDataScheduler(abc.ABC):
    r"""Varies ``schedule_param`` of every group of ``data_sparsifier`` over time.

    Subclasses implement :meth:`get_schedule_param`, returning ``{data_name: value}`` for
    the epoch ``self.last_epoch`` (already advanced when it is called). The constructor
    performs the initial ``step()`` (``last_epoch == 0`` afterwards), like torch's LR
    schedulers; a subclass that sets attributes *after* ``super().__init__`` (the seed
    README's ``GammaScheduler``) must not read them at epoch 0.

    ``step()`` is a *collective* when distributed. Groups added after construction are
    scheduled too: ``base_param[name]`` records a group's value the first time a step sees it.

    One scheduler drives a given ``schedule_param`` of a sparsifier: constructing a second
    one while the first exists raises ``ValueError`` naming it (two schedules would overwrite
    each other's values every step). Delete the first (``del scheduler``) to replace it.

    Example::

        class HalfEveryEpoch(BaseDataScheduler):
            def __init__(self, sparsifier):
                super().__init__(sparsifier, "sparsity_level")
            def get_schedule_param(self):
                return {n: self.base_param[n] * 0.5 ** self.last_epoch
                        for n in self.data_sparsifier.data_groups}
    """

    def __init__(self, data_sparsifier: BaseDataSparsifier, schedule_param: str,
                 last_epoch: int = -1, verbose: bool = False) -> None:
        if not isinstance(data_sparsifier, BaseDataSparsifier):
            raise TypeError(f"data_sparsifier must be a distsparse BaseDataSparsifier, "
                            f"got {type(data_sparsifier).__name__}")
        if schedule_param not in data_sparsifier.defaults:
            raise ValueError(f"schedule_param {schedule_param!r} is not a config of "
                             f"{type(data_sparsifier).__name__}; it knows {sorted(data_sparsifier.defaults)}")
        if isinstance(last_epoch, bool) or not isinstance(last_epoch, int) or last_epoch < -1:
            raise ValueError(f"last_epoch must be an int >= -1, got {last_epoch!r}")
        driver = _driver(data_sparsifier, schedule_param)
        if driver is not None:
            raise ValueError(
                f"{type(self).__name__}: {schedule_param!r} of this sparsifier is already driven by {driver!r}; "
                "one scheduler drives a parameter (the two would overwrite each other's values every step): "
                "use that scheduler, or delete it first (del scheduler)")
        self.data_sparsifier = data_sparsifier
        self.schedule_param = schedule_param
        self.last_epoch = last_epoch
        self.verbose = verbose
        #: {group name: its schedule_param value the first time this scheduler saw it}
        self.base_param: dict[str, Any] = {}
        self._last_param: dict[str, Any] = {}
        self._order_warned = False
        self.step()
        _DRIVERS.setdefault(data_sparsifier, {})[schedule_param] = weakref.ref(self)

    @abc.abstractmethod
    def get_schedule_param(self) -> dict[str, Any]:
        """``{data_name: value}`` for epoch ``self.last_epoch``; runs on rank 0 only."""

    def get_last_param(self) -> dict[str, Any]:
        """The values the last ``step()`` applied, ``{data_name: value}``."""
        return dict(self._last_param)

    def step(self) -> None:
        """Advance one epoch and apply the new values on every rank. *Collective*."""
        sparsifier = self.data_sparsifier
        comm = sparsifier.comm
        if self.last_epoch >= 0 and sparsifier.step_count == 0 and not self._order_warned:
            self._order_warned = True
            warnings.warn(
                "scheduler.step() was called before any sparsifier.step(): the first sparsity "
                "value is skipped. Call data_sparsifier.step() first, then data_scheduler.step().",
                UserWarning,
                stacklevel=2,
            )
        names = sorted(sparsifier.data_groups)
        new_base = {n: sparsifier.data_groups[n][self.schedule_param] for n in names if n not in self.base_param}
        previous_epoch, previous_base = self.last_epoch, self.base_param
        self.last_epoch += 1
        self.base_param = {**self.base_param, **new_base}
        op = f"{type(self).__name__}.step()"
        try:
            # One round trip: ranks check they are in the same call, scheduling the same
            # groups at the same epoch, and rank 0's values (or its exception) reach everyone.
            with comm.decided_operation(
                op, {"<scheduler>": {"groups": names, "last_epoch": previous_epoch,
                                     "schedule_param": self.schedule_param}},
                self.get_schedule_param, _encode, _decode,
            ) as values:
                try:
                    configs = self._validated(values)
                except (TypeError, ValueError) as exc:  # same values everywhere: same error
                    raise mark_raised_everywhere(exc)
                comm.finish(op)  # commit point: every rank has the values
        except BaseException:
            self.last_epoch, self.base_param = previous_epoch, previous_base
            raise
        for name, config in configs.items():
            sparsifier.data_groups[name] = config
        self._last_param = values
        if self.verbose:
            print(f"{type(self).__name__}: epoch {self.last_epoch}: {self.schedule_param} = {values}")

    def _validated(self, values: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """New configs for every returned group, all checked before any is applied."""
        sparsifier = self.data_sparsifier
        unknown = sorted(set(values) - set(sparsifier.data_groups))
        if unknown:
            raise ValueError(f"{type(self).__name__}.get_schedule_param() returned unknown group(s) "
                             f"{unknown}; known groups: {sorted(sparsifier.data_groups)}")
        configs = {}
        for name in sorted(values):
            config = {**sparsifier.data_groups[name], self.schedule_param: values[name]}
            configs[name] = sparsifier._canonical_config(name, config)
        return configs

    def state_dict(self) -> dict[str, Any]:
        """Explicit, JSON-able keys (never ``__dict__``, never the sparsifier)::

            {"format_version": 1, "scheduler": "CubicScheduler",
             "schedule_param": "sparsity_level", "last_epoch": 12,
             "base_param": {"emb": 0.0}, "last_param": {"emb": 0.37}}
        """
        return {
            "format_version": SCHEDULER_FORMAT_VERSION,
            "scheduler": type(self).__name__,
            "schedule_param": self.schedule_param,
            "last_epoch": self.last_epoch,
            "base_param": json.loads(json.dumps(self.base_param, default=_json_default)),
            "last_param": json.loads(json.dumps(self._last_param, default=_json_default)),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore epoch, base and last values; validates everything first."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"scheduler state_dict must be a mapping, got {type(state_dict).__name__}")
        missing = [k for k in ("format_version", "scheduler", "schedule_param", "last_epoch",
                               "base_param", "last_param") if k not in state_dict]
        if missing:
            raise ValueError(f"scheduler state_dict is missing {missing}")
        if state_dict["format_version"] != SCHEDULER_FORMAT_VERSION:
            raise ValueError(f"unsupported scheduler format_version {state_dict['format_version']!r}")
        if state_dict["scheduler"] != type(self).__name__:
            raise ValueError(f"scheduler state was saved by {state_dict['scheduler']!r}, "
                             f"not {type(self).__name__!r}")
        if state_dict["schedule_param"] != self.schedule_param:
            raise ValueError(f"scheduler state schedules {state_dict['schedule_param']!r}, "
                             f"this scheduler {self.schedule_param!r}")
        epoch = state_dict["last_epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < -1:
            raise ValueError(f"scheduler state last_epoch must be an int >= -1, got {epoch!r}")
        for key in ("base_param", "last_param"):
            value = state_dict[key]
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                raise ValueError(f"scheduler state {key} must map group names to values")
            for name in sorted(value):
                number = value[name]
                if isinstance(number, bool) or not isinstance(number, numbers.Real) or not math.isfinite(number):
                    raise ValueError(f"scheduler state {key}[{name!r}] must be a finite real number, got {number!r}")
                self._check_value(f"scheduler state {key}[{name!r}]", name, number)
        extra = sorted(set(state_dict["last_param"]) - set(state_dict["base_param"]))
        if extra:
            raise ValueError(f"scheduler state last_param has groups {extra} that base_param lacks "
                             "(every scheduled group has a base value)")
        self.last_epoch = epoch
        self.base_param = dict(state_dict["base_param"])
        self._last_param = dict(state_dict["last_param"])

    def _check_value(self, what: str, name: str, value: Any) -> None:
        """A restored value must be one the sparsifier accepts for a group it holds."""
        sparsifier = self.data_sparsifier
        config = sparsifier.data_groups.get(name, sparsifier.defaults)
        try:
            sparsifier._canonical_config(name, {**config, self.schedule_param: value})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{what}: {exc}") from None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(schedule_param={self.schedule_param!r}, "
                f"last_epoch={self.last_epoch}, groups={len(self.data_sparsifier.data_groups)})")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_schedulable(scheduler: str, sparsifier: BaseDataSparsifier, schedule_param: str,
                       argument: str, value: float) -> None:
    """Refuse at construction a value the sparsifier would refuse hundreds of steps later
    (``LinearScheduler(sp, final_value=1.5)``): it is validated as a config value now."""
    if not isinstance(sparsifier, BaseDataSparsifier) or schedule_param not in sparsifier.defaults:
        return  # BaseDataScheduler.__init__ names the problem
    try:
        sparsifier._canonical_config(f"<{scheduler} {argument}>",
                                     {**sparsifier.defaults, schedule_param: value})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{scheduler}: {argument}={value!r} is not a valid {schedule_param} ({exc})") from None


def _steps(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class GammaScheduler(BaseDataScheduler):
    """Multiplies each group's *base* value by ``gamma`` every epoch, up to ``threshold``.

    ``value = min(threshold, base × gamma ** last_epoch)`` (``max`` when ``gamma < 1``),
    so a group that starts at 0.1 with ``gamma=2`` ramps 0.1, 0.2, 0.4, 0.8. Unlike the
    seed README's example it scales the base, so a level never gets stuck at 0.0 × gamma.

    Example::

        sch = GammaScheduler(sparsifier, gamma=2.0, threshold=0.8)
    """

    def __init__(self, data_sparsifier: BaseDataSparsifier, gamma: float, threshold: float,
                 schedule_param: str = "sparsity_level", last_epoch: int = -1, verbose: bool = False) -> None:
        self.gamma = _number("gamma", gamma)
        if self.gamma <= 0:
            raise ValueError(f"gamma must be positive, got {gamma!r}")
        self.threshold = _number("threshold", threshold)
        _check_schedulable(type(self).__name__, data_sparsifier, schedule_param, "threshold", self.threshold)
        super().__init__(data_sparsifier, schedule_param, last_epoch, verbose)

    def get_schedule_param(self) -> dict[str, float]:
        clamp = min if self.gamma >= 1 else max
        return {name: clamp(self.threshold, float(self.base_param[name]) * self.gamma ** self.last_epoch)
                for name in self.data_sparsifier.data_groups}


class LambdaScheduler(BaseDataScheduler):
    """``value = base × fn(last_epoch)``, like ``torch.optim.lr_scheduler.LambdaLR``.

    ``lambdas`` is one callable for every group or ``{group name: callable}`` (groups not
    in the dict keep their base value). The callables are not saved in ``state_dict()``.

    Example::

        sch = LambdaScheduler(sparsifier, lambda epoch: min(1.0, epoch / 10))
    """

    def __init__(self, data_sparsifier: BaseDataSparsifier,
                 lambdas: Callable[[int], float] | Mapping[str, Callable[[int], float]],
                 schedule_param: str = "sparsity_level", last_epoch: int = -1, verbose: bool = False) -> None:
        if not callable(lambdas) and not (isinstance(lambdas, Mapping) and all(callable(f) for f in lambdas.values())):
            raise TypeError("lambdas must be a callable or a dict of group name -> callable")
        self.lambdas = lambdas
        super().__init__(data_sparsifier, schedule_param, last_epoch, verbose)

    def get_schedule_param(self) -> dict[str, float]:
        out = {}
        for name in self.data_sparsifier.data_groups:
            fn = self.lambdas if callable(self.lambdas) else self.lambdas.get(name)
            base = float(self.base_param[name])
            out[name] = base if fn is None else base * float(fn(self.last_epoch))
        return out


class _RampScheduler(BaseDataScheduler):
    """Shared arguments of the ramps: from ``initial_value`` at ``start_step`` to
    ``final_value`` at ``start_step + ramp_steps``; constant outside.

    ``initial_value=None`` (the default) starts each group from its own value when the
    scheduler first sees it (``base_param[name]``, e.g. the sparsifier's ``sparsity_level``):
    constructing a scheduler never changes a level. A number starts every group there.
    """

    def __init__(self, data_sparsifier: BaseDataSparsifier, final_value: float, initial_value: float | None = None,
                 start_step: int = 0, ramp_steps: int = 1000, schedule_param: str = "sparsity_level",
                 last_epoch: int = -1, verbose: bool = False) -> None:
        self.final_value = _number("final_value", final_value)
        self.initial_value = None if initial_value is None else _number("initial_value", initial_value)
        self.start_step = _steps("start_step", start_step, 0)
        self.ramp_steps = _steps("ramp_steps", ramp_steps, 1)
        for argument, value in (("initial_value", self.initial_value), ("final_value", self.final_value)):
            if value is not None:
                _check_schedulable(type(self).__name__, data_sparsifier, schedule_param, argument, value)
        super().__init__(data_sparsifier, schedule_param, last_epoch, verbose)

    def _progress(self) -> float:
        """Fraction of the ramp done at ``last_epoch``, in [0, 1]."""
        return min(1.0, max(0.0, (self.last_epoch - self.start_step) / self.ramp_steps))

    def _value(self, progress: float, initial: float) -> float:
        raise NotImplementedError

    def get_schedule_param(self) -> dict[str, float]:
        progress = self._progress()
        return {name: self._value(progress, float(self.base_param[name]) if self.initial_value is None
                                  else self.initial_value)
                for name in self.data_sparsifier.data_groups}


class LinearScheduler(_RampScheduler):
    """Linear ramp from ``initial_value`` (default: each group's current value) to
    ``final_value`` over ``ramp_steps`` steps.

    Example::

        sch = LinearScheduler(sparsifier, final_value=0.8, start_step=100, ramp_steps=1000)
    """

    def _value(self, progress: float, initial: float) -> float:
        if progress >= 1.0:
            return self.final_value
        return initial + (self.final_value - initial) * progress


class CubicScheduler(_RampScheduler):
    """Gradual magnitude pruning's cubic ramp (Zhu & Gupta, 2017).

    ``s_t = s_f + (s_i − s_f) · (1 − (t − t0) / (n·Δt))³`` for ``t0 ≤ t ≤ t0 + n·Δt``,
    with ``s_i = initial_value`` (default: each group's current value), ``s_f = final_value``, ``t0 = start_step``,
    ``n·Δt = ramp_steps``; the value changes only every ``update_every`` (Δt) steps. Fast
    pruning early, gentle near the end. ``t`` counts ``scheduler.step()`` calls: step it
    once per training step (or per epoch, with ``ramp_steps`` in epochs).

    Example::

        sch = CubicScheduler(sparsifier, final_value=0.8, start_step=200, ramp_steps=2000,
                             update_every=100)
    """

    def __init__(self, data_sparsifier: BaseDataSparsifier, final_value: float, initial_value: float | None = None,
                 start_step: int = 0, ramp_steps: int = 1000, update_every: int = 1,
                 schedule_param: str = "sparsity_level", last_epoch: int = -1, verbose: bool = False) -> None:
        self.update_every = _steps("update_every", update_every, 1)
        super().__init__(data_sparsifier, final_value, initial_value, start_step, ramp_steps,
                         schedule_param, last_epoch, verbose)

    def _progress(self) -> float:
        elapsed = max(0, self.last_epoch - self.start_step)
        elapsed -= elapsed % self.update_every
        return min(1.0, elapsed / self.ramp_steps)

    def _value(self, progress: float, initial: float) -> float:
        if progress >= 1.0:
            return self.final_value
        if progress <= 0.0:
            return initial  # exactly: 0.8 + (0.2 - 0.8) is 0.19999999999999996
        return self.final_value + (initial - self.final_value) * (1.0 - progress) ** 3
