"""The main job: train an xLSTM from a :class:`Config` (resuming if the run directory holds a checkpoint),
validate, test on the best checkpoint, print a sample and draw the loss curve."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax

from ..config import Config, to_dict
from ..config.parsing import ConfigError
from ..data.tokenizer import DEFAULT_TOKENIZER, Tokenizer, check_fits_model
from ..io.checkpoint import Checkpointer
from ..io.writers import MetricWriter
from ..models import build
from ..parallel import make_mesh
from ..parallel.distributed import allgather_json
from ..train import build_optimizer, build_schedule, init, make_eval_step, make_train_step
from ..train.param_table import format_param_table, param_rows
from .events import Event, Hook
from .fit import fit, plan_steps
from .hooks import checkpoint_hook, lr_monitor, profiler
from .logger import RunLogger
from .restore import model_config_check, restore_target, with_schedule_count_at_step
from .run_data import build_run_data, unigram_perplexity


def _check_monitor(config: Config, has_validation: bool) -> None:
    validates = has_validation and (config.loop.check_val_every_n_epoch > 0 or config.loop.check_val_every_n_steps > 0)
    if config.checkpoint.enabled and config.checkpoint.monitor is not None and not validates:
        raise ConfigError(
            "checkpoint.monitor",
            f"{config.checkpoint.monitor!r} is a validation metric, but this run never validates "
            "(no validation data, or both loop.check_val_every_n_* ≤ 0)",
        )


def _resume_stream(stream: Any, saved: dict[str, Any] | None, step: int, logger: RunLogger) -> None:
    """Puts this process's training stream where it was at ``step``. The checkpoint holds the stream state of
    every process that wrote it; with a different process count the slices differ, so the stream restarts."""
    if saved is None:  # e.g. saved by Checkpointer.save outside the job
        logger.warning("the checkpoint of step %d holds no data-stream state: the data stream starts again from "
                       "its beginning", step)  # fmt: skip
        return
    if "processes" not in saved:  # written before per-process states were stored: one process
        saved = {"process_count": 1, "processes": [saved]}
    if saved["process_count"] == jax.process_count():
        stream.set_state(saved["processes"][jax.process_index()])
        return
    logger.warning(
        "the checkpoint of step %d was written by %d processes and this run has %d: the model, optimizer and step "
        "are restored exactly, but the data stream starts again from its beginning",
        step, saved["process_count"], jax.process_count(),
    )  # fmt: skip


def _lm_eval_hook(config: Config, static: Any, mesh: Any, run_dir: Path, latest: dict[str, float]) -> Hook:
    """lm-eval on the tested (and, if asked, validated) states; ``latest`` keeps the last results for the
    summary. Checks the tasks and the tokenizer before training starts, not after it."""
    from ..eval.lm_eval_run import lm_eval_hook, load_tokenizer, task_manager
    from ..eval.scoring import check_rows_split
    from ..eval.tasks import check_task_names

    check_task_names(config.lm_eval.evaluation_tasks, task_manager(config.lm_eval))
    tokenizer = load_tokenizer(config.lm_eval, config.data.tokenizer)
    check_fits_model(tokenizer, config.model.vocab_size)
    batch_size = config.data.eval_batch_size or config.data.global_batch_size
    check_rows_split(config.lm_eval.batch_size or batch_size, mesh, "lm_eval.batch_size")
    hook = lm_eval_hook(
        config.lm_eval, static, tokenizer, context_length=config.data.seq_len, batch_size=batch_size, mesh=mesh,
        fsdp_min_weight_size=config.mesh.fsdp_min_weight_size, output_dir=run_dir / "lm_eval",
    )  # fmt: skip

    def recording(event: Event) -> Any:
        actions = hook(event)
        for action in actions or ():
            latest.update(getattr(action, "metrics", {}))
        return actions

    return recording


def train_job(
    config: Config,
    *,
    extra_hooks: Sequence[Hook] = (),
    extra_writers: Sequence[MetricWriter] = (),
    sample_prompt: str = "",
    sample_tokens: int = 0,
) -> dict[str, Any]:
    """Runs the whole job and returns its summary (status, steps, validation/test perplexity, the unigram
    baseline, timings, sample). Everything is written under ``config.log.run_dir``; ``extra_writers`` (see
    :class:`~xlstm_eqx.io.writers.MetricWriter`) receive every metric row as well."""
    run_dir = Path(config.log.run_dir)
    logger = RunLogger(run_dir, config.log, process_index=jax.process_index(), writers=extra_writers)
    checkpointer, status, summary = None, "error", {}
    try:
        config_dict = to_dict(config)
        logger.log_config(config_dict)
        tokenizer = Tokenizer.load(config.data.tokenizer or DEFAULT_TOKENIZER)
        check_fits_model(tokenizer, config.model.vocab_size)
        tokenizer_meta = {"path": str(tokenizer.path), "vocab_size": tokenizer.vocab_size,
                          "fingerprint": tokenizer.fingerprint}  # fmt: skip
        mesh = make_mesh(config.mesh)
        data = build_run_data(config.data, tokenizer, mesh)
        _check_monitor(config, data.validation is not None)
        total, per_epoch = plan_steps(config.loop, data.steps_per_epoch)
        tx, schedule = build_optimizer(config.optim, total), build_schedule(config.optim, total)
        builder, key = functools.partial(build, config.model), jax.random.key(config.seed)
        fsdp_min = config.mesh.fsdp_min_weight_size
        state = resumed = None
        if config.checkpoint.enabled:
            checkpointer = Checkpointer(run_dir / "checkpoints", config.checkpoint)
            with_optimizer = config.checkpoint.save_optimizer
            target, static = restore_target(builder, tx, key=key, mesh=mesh, fsdp_min_weight_size=fsdp_min,
                                            with_optimizer=with_optimizer)  # fmt: skip
            found = checkpointer.restore_latest_valid(
                target, check_meta=model_config_check(config, run_dir), optimizer=with_optimizer
            )
            if found is not None:
                resumed, state, meta = found
                state = state if with_optimizer else with_schedule_count_at_step(state)
                _resume_stream(data.train, meta.get("data_state"), resumed, logger)
                logger.info("resuming from the checkpoint of step %d in %s", resumed, checkpointer.directory)
            elif not with_optimizer:
                state = target  # already a fresh, concrete state
        if state is None:
            state, static = init(builder, tx, key=key, mesh=mesh, fsdp_min_weight_size=fsdp_min)
        rows = param_rows(state.params, mesh, fsdp_min_weight_size=fsdp_min, optim=config.optim)
        logger.info("parameters:\n%s", format_param_table(rows))
        train_step = make_train_step(static, tx, mesh, config.train, fsdp_min_weight_size=fsdp_min)
        eval_step = make_eval_step(static, mesh, config.train, fsdp_min_weight_size=fsdp_min)

        def meta(event: Event) -> dict[str, Any]:
            scalars = {k: v for k, v in event.metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
            return {
                "config": config_dict,
                "step": event.step,
                "epoch": event.epoch,
                "total_steps": total,
                "data_state": {"process_count": jax.process_count(), "processes": allgather_json(event.data_state)},
                "metrics": scalars,
                "tokenizer": tokenizer_meta,
            }

        hc = config.hooks
        hooks: list[Hook] = [
            lr_monitor(schedule, hc.lr_monitor_every_n_steps, every_epochs=hc.lr_monitor_every_n_epochs),
            profiler(logger.tensorboard_dir, hc.profile_first_step, hc.profile_num_steps, hc.profile_every_minutes),
        ]
        if checkpointer is not None:
            hooks.append(checkpoint_hook(checkpointer, config.checkpoint, meta))
        lm_eval_metrics: dict[str, float] = {}
        if config.lm_eval.evaluation_tasks:
            hooks.append(_lm_eval_hook(config, static, mesh, run_dir, lm_eval_metrics))
        hooks.extend(extra_hooks)

        def restore_best(current):
            checkpointer.wait()
            best = checkpointer.best_step()
            if best is None:
                return current, int(current.step)
            return checkpointer.restore(best, current, optimizer=False)[0], best

        best_known = checkpointer is not None and config.checkpoint.monitor is not None
        started = time.perf_counter()
        result = fit(
            state, train_step, eval_step, data.train, config=config.loop,
            log_every_n_steps=config.log.log_every_n_steps, steps_per_epoch=per_epoch, val_data=data.validation,
            test_data=data.test, hooks=hooks, logger=logger,
            restore_best=restore_best if best_known else None, process_index=jax.process_index(),
            stop_on_nan=config.hooks.nan_stop,
        )  # fmt: skip
        status = result.status
        validations = [v for k, v in result.results.items() if k.startswith("val_")]
        last_val = validations[-1] if validations else {}
        val_sets = data.validation if isinstance(data.validation, dict) else {"": data.validation}
        summary = {
            "status": result.status,
            "run_dir": str(run_dir),
            "resumed_from_step": resumed,
            "steps": result.step,
            "steps_per_epoch": per_epoch,
            "train_seconds": time.perf_counter() - started,
            "val_loss": last_val.get("loss"),
            "val_perplexity": last_val.get("perplexity"),
            "test_perplexity": result.results.get("test", {}).get("perplexity"),
            "test_checkpoint_step": result.results.get("test", {}).get("checkpoint_step"),
        }
        summary.update(lm_eval_metrics)
        for name, one in val_sets.items():  # named sets: <name>_loss … in the rows, val_<name>_… here
            if one is None:
                continue
            suffix = f"_{name}" if name else ""
            if name:
                summary.update({f"val{suffix}_{k}": last_val.get(f"{name}_{k}") for k in ("loss", "perplexity")})
            summary[f"unigram_val{suffix}_perplexity"] = unigram_perplexity(
                data.train_token_counts, one(), config.model.vocab_size
            )
        if sample_tokens > 0:  # on every process: the weights span all of them
            from ..models.generate import sample_text

            model = eqx.combine(result.state.params, static)
            summary["sample"] = sample_text(model, tokenizer, sample_prompt, sample_tokens, key=jax.random.key(1))
        if "jsonl" in config.log.writers and jax.process_index() == 0:  # rows are on disk as soon as written
            from ..io.plot import plot_loss_curve

            try:
                curve = plot_loss_curve(run_dir / "metrics.jsonl", logger.tensorboard_dir / "loss.png")
                summary["loss_curve"] = str(curve)
            except (OSError, ValueError) as error:  # a missing figure does not fail a finished run
                logger.warning("no loss curve: %s", error)
                summary["loss_curve"] = None
        return summary
    except BaseException as error:  # the text log and status.json say why the run ended, then it propagates
        logger.text.exception("the run failed: %s", error)
        summary = {**summary, "error": f"{type(error).__name__}: {error}"}
        raise
    finally:
        if checkpointer is not None:
            checkpointer.close()
        logger.finalize(status, {k: v for k, v in summary.items() if k != "sample"})
