"""Built-in hooks: NaN stop, learning-rate monitor, profiler, checkpointing, and the extended-evaluation slot.

Each is a plain function of an :class:`~.events.Event` (built by a factory that closes over what it needs);
filter them with the combinators of :mod:`.events`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax

from ..config.parsing import ConfigError
from ..config.run import CheckpointConfig
from ..io.writers import is_finite_row
from ..train.optim import learning_rate_at, optimizer_step_count
from .events import Action, Event, Hook, Log, Stop, every_n_epochs, every_n_steps, main_process_only, on

LOGGER = logging.getLogger(__name__)


def nan_stop() -> Hook:
    """Stop with status ``nan`` at the first step whose loss or gradients are not finite, or at a validation
    with a non-finite metric. (With ``check_for_nan`` that step changed nothing, so the state stays good.)"""

    def hook(event: Event) -> Iterable[Action]:
        if event.kind == "step" and event.nonfinite:
            return [Stop("nan", f"non-finite loss or gradients at step {event.step} (loss {event.loss})")]
        if event.kind == "val_end":
            bad = [k for k, v in event.metrics.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                return [Stop("nan", f"non-finite validation metrics at step {event.step}: {', '.join(bad)}")]
        return []

    return hook


def lr_monitor(
    schedule: Callable[[Any], Any], every: int = 50, key: str = "optimizer/lr", every_epochs: int = -1
) -> Hook:
    """Every ``every`` steps, and at the end of every ``every_epochs``-th epoch (≤ 0: never), logs ``key`` = the
    learning rate the last step's update applied: the schedule at the optimizer's count before that update (a
    skipped non-finite step applied nothing and logs the next one). Epoch-end values join that step's train row."""

    def hook(event: Event) -> Iterable[Action]:
        count = optimizer_step_count(event.state.opt_state)
        return [Log({key: float(learning_rate_at(schedule, jax.numpy.maximum(count - 1, 0)))})]

    # every_n_steps passes epoch events and every_n_epochs step events: each filter acts on its own kind
    return main_process_only(every_n_steps(every, every_n_epochs(every_epochs, on(["step", "epoch_end"], hook))))


class _Profiler:
    """``jax.profiler`` traces of ``num_steps`` steps into ``directory``: from step ``first`` on, and again at the
    first step once ``every_s`` seconds have passed since training started or the last trace stopped
    (``every_s`` ≤ 0: never again). A trace stops early at a validation, an epoch end or the end of training
    (which would pollute it)."""

    def __init__(self, directory: str | Path, first: int, num_steps: int, every_s: float, clock: Callable[[], float]):
        self.directory, self.first, self.num_steps = str(directory), first, num_steps
        self.every_s, self.clock = every_s, clock
        self.active, self.last, self.since = False, 0, None

    def _due(self, event: Event) -> bool:
        if event.step == self.first - 1:
            return True
        return self.every_s > 0 and self.since is not None and self.clock() - self.since >= self.every_s

    def _stop(self, state: Any) -> None:
        if self.active:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active, self.since = False, self.clock()
            LOGGER.info("profiler trace written to %s", self.directory)

    def __call__(self, event: Event) -> None:
        if event.kind == "train_start" and self.since is None:
            self.since = self.clock()
        if event.kind in ("train_start", "step") and not self.active and self._due(event):
            jax.profiler.start_trace(self.directory)
            self.active, self.last = True, event.step + self.num_steps  # traces steps event.step + 1 … last
        elif event.kind == "step" and event.step >= self.last:
            self._stop(event.state)
        elif event.kind in ("val_start", "epoch_end", "train_end", "test_start"):
            self._stop(event.state)


def profiler(
    directory: str | Path,
    first_step: int,
    num_steps: int = 5,
    every_minutes: float = -1.0,
    clock: Callable[[], float] = time.monotonic,
) -> Hook:
    """Trace ``num_steps`` steps from ``first_step`` on (main process; ``first_step`` ≤ 0: never), and again each
    time ``every_minutes`` have passed since training started or the last trace ended (≤ 0: only the first).
    Each trace is its own run under ``directory/plugins/profile``."""
    if first_step <= 0:
        return lambda event: None
    return main_process_only(_Profiler(directory, first_step, num_steps, 60.0 * every_minutes, clock))


@jax.jit
def _all_finite(params: Any) -> jax.Array:
    """One bool: every floating-point parameter is finite."""
    leaves = [x for x in jax.tree.leaves(params) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
    return jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(x).all() for x in leaves]))


def checkpoint_hook(checkpointer: Any, config: CheckpointConfig, meta: Callable[[Event], dict[str, Any]]) -> Hook:
    """Saves through ``checkpointer`` every ``every_n_steps`` steps, after each validation (with its metrics,
    so the best can be kept) and at the end of a run that did not stop on NaN. Never saves a non-finite step,
    nor non-finite parameters (which a finite loss can hide when ``train.check_for_nan`` is off).
    A ``monitor`` missing from the validation metrics is an error naming the metrics that exist, raised after
    that validation's checkpoint is saved."""

    def save(event: Event, metrics: Mapping[str, Any] | None = None) -> None:
        if event.step == checkpointer.latest_step():  # already saved (e.g. at its validation, or a finished run)
            return
        if not bool(_all_finite(event.state.params)):
            LOGGER.warning("not saving checkpoint %d: its parameters are not all finite", event.step)
            return
        scalars = None if metrics is None else {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        checkpointer.save(event.step, event.state, meta=meta(event), metrics=scalars)

    def hook(event: Event) -> None:
        if event.kind == "step" and not event.nonfinite and config.every_n_steps > 0:
            # a validation of this step follows: save there, with the metrics that rank it among the best
            if event.step % config.every_n_steps == 0 and not (event.validation_follows and config.at_validation):
                save(event)
        elif event.kind == "val_end" and config.at_validation:
            if is_finite_row(dict(event.metrics)):  # never keep a model that evaluates to NaN
                save(event, event.metrics)
            if config.monitor is not None and config.monitor not in event.metrics:
                # after the save: the run stops on a name, not on the model, and resumes from this step
                raise ConfigError(
                    "checkpoint.monitor",
                    f"{config.monitor!r} is not among the validation metrics {sorted(event.metrics)} (the state "
                    f"of step {event.step} is saved: correct the name and run again to resume from it)",
                )
        elif event.kind == "train_end" and event.status not in ("nan",) and event.step > 0:
            save(event)

    return hook


def extended_evaluation(evaluate: Callable[[Any, Event], Mapping[str, Any]], mode: str | None = None) -> Hook:
    """The slot for extra evaluations (e.g. the LM Evaluation Harness): after every validation, logs
    ``evaluate(state, event)`` under ``mode`` (None: with the validation's own row)."""

    def hook(event: Event) -> Iterable[Action]:
        return [Log(dict(evaluate(event.state, event)), mode)]

    return on(["val_end"], hook)
