"""Events of a training run, the actions hooks answer with, and combinators that filter when a hook fires.

A hook is a plain function ``hook(event) -> Iterable[Action] | None``. The loop builds one immutable
:class:`Event` per moment of the run and hands it to every hook in order; hooks never mutate the loop, they
answer with actions: :class:`Log` (write metrics) or :class:`Stop` (end training with a status).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

EventKind = Literal[
    "train_start",
    "train_end",
    "epoch_start",
    "epoch_end",
    "step",
    "val_start",
    "val_end",
    "test_start",
    "test_end",
]
EVENT_KINDS: tuple[str, ...] = EventKind.__args__


@dataclasses.dataclass(frozen=True)
class Event:
    """One moment of a run.

    ``step``: optimizer steps completed so far (the step just taken for ``step`` events); ``epoch``: the 1-based
    epoch that step belongs to; ``state``: the current TrainState (device arrays; hooks must not donate it).
    ``metrics``: host metrics of the moment: for ``step`` the interval's train metrics on log steps (else empty;
    the step's own loss is ``loss``), for ``val_end``/``test_end`` the evaluation results, for ``epoch_end``
    ``epoch_time``. ``nonfinite``: the step's loss or gradients were not finite;
    ``validation_follows``: a validation of this same step comes next. ``trigger``: what started a
    validation (``"step"`` or ``"epoch"``). ``data_state``: the training iterator's state after this step (what a
    checkpoint must hold to resume exactly). ``status``: the run's status at ``train_end``.
    """

    kind: EventKind
    step: int
    epoch: int
    state: Any = None
    metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    loss: float = math.nan
    nonfinite: bool = False
    validation_follows: bool = False
    trigger: str = ""
    data_state: Mapping[str, Any] | None = None
    status: str = ""
    process_index: int = 0

    def __post_init__(self):
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {self.kind!r}; expected one of {EVENT_KINDS}")


@dataclasses.dataclass(frozen=True)
class Log:
    """Write ``metrics`` under ``mode`` (None: the mode of the event, ``train``/``val``/``test``)."""

    metrics: Mapping[str, Any]
    mode: str | None = None


@dataclasses.dataclass(frozen=True)
class Stop:
    """End training after this event with ``status`` (e.g. ``"nan"``), saying why."""

    status: str
    reason: str


Action = Log | Stop
Hook = Callable[[Event], Iterable[Action] | None]


def on(kinds: Iterable[str], hook: Hook) -> Hook:
    """``hook`` for events of the given kinds only."""
    kinds = frozenset(kinds)
    unknown = kinds - set(EVENT_KINDS)
    if unknown:
        raise ValueError(f"unknown event kinds {sorted(unknown)}; expected some of {EVENT_KINDS}")
    return _filtered(hook, lambda event: event.kind in kinds, f"on({sorted(kinds)})")


def every_n_steps(n: int, hook: Hook) -> Hook:
    """``step`` events only at multiples of ``n`` (n ≤ 0: never); other events pass unchanged."""
    return _filtered(hook, lambda e: e.kind != "step" or (n > 0 and e.step % n == 0), f"every_n_steps({n})")


def every_n_epochs(n: int, hook: Hook) -> Hook:
    """Epoch start/end and epoch-triggered validations only in epochs that are multiples of ``n`` (n ≤ 0:
    never). Step-triggered validations and all other events pass: a validation every N steps is never
    silently skipped because of the epoch it falls into."""

    def keep(event: Event) -> bool:
        by_epoch = event.kind in ("epoch_start", "epoch_end") or (
            event.kind in ("val_start", "val_end") and event.trigger == "epoch"
        )
        return not by_epoch or (n > 0 and event.epoch % n == 0)

    return _filtered(hook, keep, f"every_n_epochs({n})")


def main_process_only(hook: Hook) -> Hook:
    """``hook`` on process 0 only."""
    return _filtered(hook, lambda event: event.process_index == 0, "main_process_only")


def _filtered(hook: Hook, keep: Callable[[Event], bool], description: str) -> Hook:
    def filtered(event: Event) -> Iterable[Action] | None:
        return hook(event) if keep(event) else None

    filtered.__name__ = f"{description}({getattr(hook, '__name__', type(hook).__name__)})"
    return filtered


def fire(hooks: Iterable[Hook], event: Event) -> tuple[dict[str | None, dict[str, Any]], Stop | None]:
    """Runs every hook on ``event`` in order. Returns the metrics they logged, merged per mode (None = the
    event's own mode), and the first Stop (later hooks still run: a checkpoint hook after a NaN stop must see
    the event to decide not to save)."""
    logged: dict[str | None, dict[str, Any]] = {}
    stop: Stop | None = None
    for hook in hooks:
        for action in hook(event) or ():
            if isinstance(action, Log):
                logged.setdefault(action.mode, {}).update(action.metrics)
            elif isinstance(action, Stop):
                stop = stop or action
            else:
                raise TypeError(f"hook {getattr(hook, '__name__', hook)!r} returned {action!r}; expected Log or Stop")
    return logged, stop
