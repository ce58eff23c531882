"""``fit``: the training loop, composing ``train_step`` / ``eval_step`` with hooks, a logger and a progress bar."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
from tqdm.auto import tqdm

from ..config.parsing import ConfigError
from ..config.run import LoopConfig
from ..io.writers import TRAIN_LOSS_KEYS
from ..train.metrics import merge_metrics
from ..train.metrics_host import add_perplexity, read_accumulator, to_host
from .evaluate import EvalSets, evaluate, fresh_pass
from .events import Event, Hook, Stop, fire
from .hooks import nan_stop
from .logger import RunLogger, StepTimer

DATA_EXHAUSTED = "data_exhausted"  # the status of a run whose training stream ended before the planned total


@dataclasses.dataclass(frozen=True)
class FitResult:
    """``status``: ``success``, ``nan``, ``data_exhausted`` or the status of a hook's Stop; ``results``:
    ``val_step_<s>``, ``val_epoch_<e>`` and ``test`` → host metrics."""

    state: Any
    status: str
    step: int
    results: dict[str, dict[str, Any]]
    reason: str = ""


def plan_steps(config: LoopConfig, steps_per_epoch: int | None) -> tuple[int, int]:
    """(total steps, steps per epoch). Without any epoch length a step-limited run is one epoch."""
    per_epoch = config.steps_per_epoch or steps_per_epoch
    if config.num_epochs is None and config.num_train_steps is None:
        raise ConfigError("loop.num_train_steps", "set loop.num_epochs or loop.num_train_steps")
    if config.num_epochs is not None:
        if per_epoch is None:
            raise ConfigError("loop.steps_per_epoch", "loop.num_epochs needs the epoch length in steps")
        return config.num_epochs * per_epoch, per_epoch
    return config.num_train_steps, per_epoch or config.num_train_steps


def _step_scalars(metrics: dict[str, Any]) -> tuple[float, bool]:
    """This step's loss (NaN when the train log modes give none of ``TRAIN_LOSS_KEYS``, or the batch scored no
    token) and its non-finite flag: the step's own check (``nonfinite_max``, which covers the loss and the
    gradients) where it ran, else a non-finite loss over scored tokens. A batch that scores nothing is not
    non-finite. One small device_get; waits for the step."""
    loss_key = next((k for k in TRAIN_LOSS_KEYS if k in metrics), None)
    keys = [k for k in (loss_key, "nonfinite_max") if k is not None and k in metrics]
    host = jax.device_get({k: metrics[k] for k in keys})
    loss, nothing_scored = read_accumulator(host[loss_key]) if loss_key is not None else (math.nan, True)
    if "nonfinite_max" in host:
        return float(loss), bool(read_accumulator(host["nonfinite_max"])[0] > 0)
    return float(loss), not nothing_scored and not math.isfinite(loss)


def _check_reiterable(sets: EvalSets | None, field: str) -> None:
    """Validation runs many times: a one-shot iterator would be used up by the first one."""
    named = sets.items() if isinstance(sets, Mapping) else [("", sets)]
    for name, one in named:
        if one is not None and not callable(one) and iter(one) is one:
            where = f"{field}[{name!r}]" if name else field
            raise TypeError(
                f"{where} is an iterator, which the first validation would use up; pass a list of batches or a "
                "zero-argument callable that returns a new iterator"
            )


def check_eval_step(eval_step: Callable[..., Any], state: Any, sets: EvalSets) -> None:
    """Runs ``eval_step`` on the first batch of every set and waits for it, so that a broken eval step or an
    evaluation batch the mesh cannot split fails before training, not at the first validation hours later.
    Consumes nothing: every set is re-iterable. An error gets a note naming the set."""
    named = sets.items() if isinstance(sets, Mapping) else [("", sets)]
    for name, one in named:
        batch = next(iter(fresh_pass(one)), None)
        if batch is None:
            continue
        try:
            jax.block_until_ready(eval_step(state, getattr(batch, "batch", batch), None))
        except Exception as error:
            where = f"validation set {name!r}" if name else "the validation set"
            error.add_note(f"(eval_step failed on the first batch of {where}, checked before training)")
            raise


def _describe(row: Mapping[str, Any], keys: Sequence[str]) -> str:
    """``key value`` pairs of the scalars among ``keys`` that ``row`` has, for the text log."""
    return ", ".join(f"{k} {row[k]:.5g}" for k in keys if isinstance(row.get(k), int | float))


def run_info(state: Any, batch: Any, total: int, per_epoch: int) -> dict[str, dict[str, Any]]:
    """Start-up summary rows: ``model`` (parameters, optimizer-state size), ``dataset``, ``parallel`` (mesh)."""
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    sharding = getattr(jax.tree.leaves(state.params)[0], "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    axes = dict(mesh.shape) if mesh is not None else {}
    return {
        "model": {"num_params": count(state.params), "num_optimizer_state": count(state.opt_state)},
        "dataset": {
            "global_batch_size": batch.inputs.shape[0],
            "local_batch_size": batch.inputs.shape[0] // jax.process_count(),  # rows each process loads
            "seq_len": batch.inputs.shape[1],
            "tokens_per_step": batch.inputs.size,
            "steps_per_epoch": per_epoch,
            "num_epochs": math.ceil(total / per_epoch),
            "num_train_steps": total,
        },
        "parallel": {
            **{f"mesh_{k}": v for k, v in axes.items()},
            "devices": jax.device_count(),
            "processes": jax.process_count(),
        },
    }


def fit(
    state: Any,
    train_step: Callable[[Any, Any], tuple[Any, Any]],
    eval_step: Callable[..., Any],
    train_data: Iterator[Any],
    *,
    config: LoopConfig,
    log_every_n_steps: int = 50,
    steps_per_epoch: int | None = None,
    val_data: EvalSets | None = None,
    test_data: EvalSets | None = None,
    hooks: Sequence[Hook] = (),
    logger: RunLogger | None = None,
    restore_best: Callable[[Any], tuple[Any, int]] | None = None,
    process_index: int = 0,
    stop_on_nan: bool = True,
) -> FitResult:
    """Trains ``state`` from its own step (so a restored state resumes) to the planned total. ``state`` is
    consumed (the train step donates it); use the returned one.

    ``train_data`` is an endless iterator of global batches (with ``get_state`` if it can be checkpointed); one
    that ends early stops the run after its last batch with status ``data_exhausted`` (the state is returned and
    the checkpoint hook saves it). ``val_data`` / ``test_data`` are evaluation sets (see :mod:`.evaluate`;
    validation sets must be re-iterable: lists or zero-argument callables, not iterators). Validation runs every
    ``check_val_every_n_steps`` steps and after every ``check_val_every_n_epoch``-th epoch (the last step ends
    the last epoch, whole or partial, so the final state is validated when that epoch's turn comes; once per
    step: an epoch-end validation at a step that was just validated re-uses that result). The test runs at the
    end on ``restore_best(state) -> (state, step)`` (the best checkpoint) if given, else on the final state.

    ``stop_on_nan``: stop with status ``nan`` at the first non-finite step or validation (:func:`.hooks.nan_stop`
    runs before ``hooks``); with the train step's ``check_for_nan`` that step changed nothing. Before the first
    step, ``eval_step`` is tried on the first batch of every validation set (:func:`check_eval_step`).
    """
    total, per_epoch = plan_steps(config, steps_per_epoch)
    _check_reiterable(val_data, "val_data")
    hooks = [nan_stop(), *hooks] if stop_on_nan else list(hooks)
    step = int(jax.device_get(state.step))
    write = logger.write if logger is not None else (lambda *args: True)
    info = logger.info if logger is not None else (lambda *args: None)
    results: dict[str, dict[str, Any]] = {}
    timer, epoch_start = StepTimer(), time.perf_counter()
    show_bars = config.enable_progress_bar and process_index == 0  # training, validation and test bars

    def emit(kind, metrics=None, *, mode="train", at_state=None, epoch=None, **fields) -> Stop | None:
        epoch = epoch if epoch is not None else max(step - 1, 0) // per_epoch + 1
        event = Event(
            kind,
            step,
            epoch,
            state if at_state is None else at_state,
            dict(metrics or {}),
            data_state=data_state,
            process_index=process_index,
            **fields,
        )
        logged, stop = fire(hooks, event)
        write(mode, step, epoch, {**event.metrics, **logged.pop(None, {}), **logged.pop(mode, {})})
        for other, extra in logged.items():
            write(other, step, epoch, extra)
        return stop

    def train_row(running: Any) -> dict[str, Any]:
        """The log row of the steps merged into ``running`` since the last row."""
        row = {**add_perplexity(to_host(running)), **timer.rates(step, tokens)}
        return {**row, "epoch": max(step - 1, 0) // per_epoch + 1}

    def validate(trigger: str) -> tuple[dict[str, Any], Stop | None]:
        stop = emit("val_start", mode="val", trigger=trigger)
        metrics = evaluate(eval_step, state, val_data, progress_bar=show_bars, desc="validation")
        info("validation at step %d: %s", step, _describe(metrics, ("loss", "accuracy", "perplexity")))
        stop = emit("val_end", metrics, mode="val", trigger=trigger) or stop
        timer.reset(step)  # evaluation time never counts as step time
        return metrics, stop

    get_data_state = getattr(train_data, "get_state", lambda: None)
    data_state = get_data_state()  # the stream's position after the last step taken (what a checkpoint needs)

    def next_batch() -> Any:
        """The next training batch, or None when the run needs no more or the stream has ended."""
        return next(train_data, None) if step < total else None

    def ran_out() -> Stop:
        return Stop(DATA_EXHAUSTED, f"train_data ended after step {step} of {total}: pass an endless stream")

    batch = next_batch()
    tokens = 0 if batch is None else int(batch.inputs.size)  # per step: rows × length of the global batch
    if batch is not None:
        for mode, row in run_info(state, batch, total, per_epoch).items():
            write(mode, step, step // per_epoch + 1, {**row, "start_step": step})
            info("%s: %s", mode, ", ".join(f"{k} {v:,}" for k, v in row.items()))
        if val_data is not None:
            check_eval_step(eval_step, state, val_data)
    stop = emit("train_start")
    bar = tqdm(
        total=total,
        initial=step,
        desc="Training",
        leave=False,
        dynamic_ncols=True,
        disable=not show_bars,
    )
    running, first, last_val, tick = None, True, -1, time.perf_counter()
    while stop is None and step < total:
        if batch is None:  # the stream ended before the planned total
            stop = ran_out()
            break
        if step % per_epoch == 0:
            epoch_start = time.perf_counter()
            info("epoch %d starts at step %d", step // per_epoch + 1, step)
            stop = emit("epoch_start", epoch=step // per_epoch + 1)
            if stop is not None:
                break
        started = time.perf_counter()
        state, metrics = train_step(state, batch)
        step += 1
        data_state = get_data_state()
        batch = next_batch()  # loads while the device computes
        loss, nonfinite = _step_scalars(metrics)
        running = metrics if running is None else merge_metrics(running, metrics)
        now = time.perf_counter()
        if first:  # the first call compiles: reported on its own, kept out of step_time
            write("timing", step, max(step - 1, 0) // per_epoch + 1, {"compile_time": now - started})
            timer.reset(step)
            first = False
        logged = {}
        if step % log_every_n_steps == 0 or step == total or nonfinite:  # the last interval may be partial
            logged, running = train_row(running), None
            info("step %d/%d: %s", step, total, _describe(logged, (*TRAIN_LOSS_KEYS, "accuracy_mean", "tokens_per_s")))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4g}", tok_s=f"{tokens / max(now - tick, 1e-9):.0f}", refresh=False)
        tick = now
        by_steps = config.check_val_every_n_steps > 0 and step % config.check_val_every_n_steps == 0
        # the last step ends its epoch even when that epoch is partial (a step budget that is not a whole number
        # of epochs), so the final state is validated (and checkpointed with metrics) like any epoch end
        ends_epoch, epoch = step % per_epoch == 0 or step == total, (step - 1) // per_epoch + 1
        every = config.check_val_every_n_epoch
        by_epoch = ends_epoch and every > 0 and epoch % every == 0
        follows = val_data is not None and (by_steps or by_epoch)
        stop = emit("step", logged, loss=loss, nonfinite=nonfinite, validation_follows=follows)
        if stop is not None:
            break
        if val_data is not None and by_steps:
            results[f"val_step_{step}"], stop = validate("step")
            last_val = step
        if ends_epoch and stop is None:
            stop = emit("epoch_end", {"epoch_time": time.perf_counter() - epoch_start})
            if val_data is not None and by_epoch and stop is None:
                if last_val == step:
                    results[f"val_epoch_{epoch}"] = results[f"val_step_{step}"]
                else:
                    results[f"val_epoch_{epoch}"], stop = validate("epoch")
                    last_val = step
    bar.close()
    if running is not None:  # a hook stopped the run inside a log interval: its steps still get their row
        write("train", step, max(step - 1, 0) // per_epoch + 1, train_row(running))
    status = "success" if stop is None else stop.status
    emit("train_end", status=status)
    if stop is not None and logger is not None:
        logger.warning("training stopped at step %d: %s", step, stop.reason)
    if test_data is not None and status == "success":
        test_state, source = restore_best(state) if restore_best is not None else (state, step)
        emit("test_start", mode="test", at_state=test_state)
        metrics = {
            **evaluate(eval_step, test_state, test_data, progress_bar=show_bars, desc="test"),
            "checkpoint_step": source,
        }
        info("test of step %d: %s", source, _describe(metrics, ("loss", "accuracy", "perplexity")))
        emit("test_end", metrics, mode="test", at_state=test_state)
        results["test"] = metrics
    return FitResult(state, status, step, results, "" if stop is None else stop.reason)
