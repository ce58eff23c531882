"""Checkpoint/resume through the loop: NaN stops keep the last good checkpoint; a run killed with SIGKILL at
random steps and resumed ends bit-identical to an uninterrupted one; bad run directories fail clearly."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from loop_setup import MODEL, Stream, eval_set, params_numpy, setup

from xlstm_eqx.config.run import CheckpointConfig, LoopConfig
from xlstm_eqx.config.train import TrainConfig
from xlstm_eqx.data.corpus import default_corpus
from xlstm_eqx.io.checkpoint import Checkpointer
from xlstm_eqx.loop import checkpoint_hook, fit, nan_stop
from xlstm_eqx.loop.restore import load_from_checkpoint
from xlstm_eqx.train.loss import lm_loss
from xlstm_eqx.train.metrics import Measured
from xlstm_eqx.train.steps import make_train_step

SENTINEL = MODEL.vocab_size - 1  # Stream never draws it (ids < vocab / 4)


class PoisonedStream(Stream):
    """Stream whose batch for step ``poison_step`` carries the sentinel token that makes the loss NaN."""

    def __init__(self, poison_step):
        super().__init__()
        self.poison_step = poison_step

    def __next__(self):
        batch = super().__next__()
        if self.index == self.poison_step:
            batch = eqx.tree_at(lambda b: b.inputs, batch, batch.inputs.at[0, 0].set(SENTINEL))
        return batch


def nan_on_sentinel(model, batch, key, **kwargs):
    value, measured = lm_loss(model, batch, key, **kwargs)
    poison = jnp.where(jnp.any(batch.inputs == SENTINEL), jnp.nan, 1.0).astype(value.dtype)
    measured["loss"] = Measured(measured["loss"].value * poison, measured["loss"].count)
    return value * poison, measured


@pytest.mark.parametrize("check_for_nan", [True, False])
def test_nan_stops_at_that_step_and_keeps_the_last_good_checkpoint(tmp_path, check_for_nan):
    config = TrainConfig(check_for_nan=check_for_nan)
    state, _, eval_step, _, static, tx = setup(train_config=config, total_steps=30)
    mesh = jax.tree.leaves(state.params)[0].sharding.mesh
    train_step = make_train_step(static, tx, mesh, config, loss_fn=nan_on_sentinel)
    checkpointer = Checkpointer(tmp_path, CheckpointConfig(keep_latest=10))
    meta = lambda e: {"step": e.step, "data_state": e.data_state}  # noqa: E731
    hooks = [checkpoint_hook(checkpointer, CheckpointConfig(every_n_steps=5), meta)]  # fit stops on NaN itself
    result = fit(state, train_step, eval_step, PoisonedStream(13), config=LoopConfig(num_train_steps=30),
                 val_data=eval_set(1), test_data=eval_set(1), hooks=hooks)  # fmt: skip
    checkpointer.wait()
    assert (result.status, result.step) == ("nan", 13)
    assert "step 13" in result.reason and "test" not in result.results
    assert checkpointer.steps() == [5, 10]  # nothing saved at the NaN step or at the end of the stopped run
    restored, saved_meta = checkpointer.restore("latest", result.state)
    assert saved_meta == {"step": 10, "data_state": {"index": 10}}
    assert all(np.isfinite(leaf).all() for leaf in params_numpy(restored))
    if check_for_nan:  # the NaN step changed nothing: the state is still that of step 12
        reference, *_ = setup(train_config=config, total_steps=30)
        ref = fit(reference, train_step, eval_step, Stream(), config=LoopConfig(num_train_steps=12))
        for a, b in zip(params_numpy(result.state), params_numpy(ref.state)):
            np.testing.assert_array_equal(a, b)
    checkpointer.close()


def test_without_stop_on_nan_a_checked_nan_step_is_skipped_and_training_goes_on():
    config = TrainConfig(check_for_nan=True)
    state, _, eval_step, _, static, tx = setup(train_config=config, total_steps=6)
    mesh = jax.tree.leaves(state.params)[0].sharding.mesh
    train_step = make_train_step(static, tx, mesh, config, loss_fn=nan_on_sentinel)
    seen = []
    hooks = [lambda e: seen.append(e.step) if e.kind == "step" and e.nonfinite else None]
    result = fit(state, train_step, eval_step, PoisonedStream(3), config=LoopConfig(num_train_steps=6),
                 hooks=hooks, stop_on_nan=False)  # fmt: skip
    assert (result.status, result.step, seen) == ("success", 6, [3])
    assert all(np.isfinite(leaf).all() for leaf in params_numpy(result.state))
    # an explicit nan_stop hook still stops a run that turned the built-in stop off
    state, *_ = setup(train_config=config, total_steps=6)
    result = fit(state, train_step, eval_step, PoisonedStream(3), config=LoopConfig(num_train_steps=6),
                 hooks=[nan_stop()], stop_on_nan=False)  # fmt: skip
    assert (result.status, result.step) == ("nan", 3)


def nan_gradients_on_sentinel(model, batch, key, **kwargs):
    """The loss itself, always finite, whose gradients are NaN on the sentinel batch (0 · sqrt'(0) · 0)."""
    value, measured = lm_loss(model, batch, key, **kwargs)
    weight = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))[0]
    at_zero = jnp.where(jnp.any(batch.inputs == SENTINEL), 0.0, 1.0) + 0.0 * weight.sum()
    return value + 0.0 * jnp.sqrt(at_zero).astype(value.dtype), measured


def test_parameters_made_non_finite_under_a_finite_loss_are_never_saved(tmp_path):
    config = TrainConfig(check_for_nan=False)  # nothing in the step sees the NaN gradients
    state, _, eval_step, _, static, tx = setup(train_config=config, total_steps=30)
    mesh = jax.tree.leaves(state.params)[0].sharding.mesh
    train_step = make_train_step(static, tx, mesh, config, loss_fn=nan_gradients_on_sentinel)
    checkpointer = Checkpointer(tmp_path, CheckpointConfig(keep_latest=10))
    hooks = [checkpoint_hook(checkpointer, CheckpointConfig(every_n_steps=3), lambda e: {})]
    result = fit(state, train_step, eval_step, PoisonedStream(6), config=LoopConfig(num_train_steps=30),
                 hooks=hooks)  # fmt: skip
    checkpointer.wait()
    # step 6's loss was finite but its update made the parameters NaN; step 7's loss shows it
    assert (result.status, result.step) == ("nan", 7)
    assert checkpointer.steps() == [3]
    checkpointer.close()


TRAIN_ARGS = [
    "model.vocab_size=4096",
    "model.embedding_dim=32",
    "model.num_blocks=1",
    "model.num_heads=2",
    "model.chunk_size=16",
    "data.seq_len=32",
    "data.global_batch_size=4",
    "data.val_max_batches=2",
    "optim.warmup_steps=3",
    "optim.decay=cosine",
    "optim.decay_steps=10",
    "loop.num_train_steps=24",
    "loop.steps_per_epoch=10",
    "loop.check_val_every_n_steps=8",
    "log.log_every_n_steps=1",
    "checkpoint.every_n_steps=3",
    "checkpoint.keep_latest=2",
    "checkpoint.monitor=loss",
    "hooks.lr_monitor_every_n_steps=4",
    "lm_eval.evaluation_tasks=[]",  # resuming is what is tested here
]


@pytest.fixture(scope="module")
def corpus_args(tmp_path_factory):
    """Slices of three plays (train) and one (validation, test): the run's data pass costs nothing."""
    root = tmp_path_factory.mktemp("corpus")
    for i, path in enumerate(default_corpus("train")[:3] + default_corpus("validation")[:1]):
        (root / f"{i}.txt").write_text(path.read_text()[:20_000])
    files = lambda *names: "[" + ",".join(f"{root}/{n}.txt" for n in names) + "]"  # noqa: E731
    return ["data.corpus=files", f"data.train_files={files(0, 1, 2)}", f"data.validation_files={files(3)}",
            f"data.test_files={files(3)}"]  # fmt: skip


def _command(run_dir, corpus_args):
    return [sys.executable, "-m", "xlstm_eqx.cli", "train", "--config", "configs/shakespeare.yaml",
            "--sample-tokens", "0", *TRAIN_ARGS, *corpus_args, f"log.run_dir={run_dir}"]  # fmt: skip


def _environment():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device: faster
    return {**env, "JAX_PLATFORMS": "cpu"}


def _logged_steps(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return max([r["log_step"] for r in rows if r["mode"] == "train" and "loss_mean" in r] or [0])


def _run_and_kill(run_dir, corpus_args, at_step, timeout=240):
    process = subprocess.Popen(_command(run_dir, corpus_args), env=_environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + timeout
    while _logged_steps(run_dir) < at_step:
        if process.poll() is not None:
            raise AssertionError(f"run ended before step {at_step}: {process.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no step {at_step} within {timeout}s")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _start(run_dir, corpus_args):
    """Starts a run whose output goes to files beside its run directory (a full pipe would stall it)."""
    out, err = (open(f"{run_dir}.{name}", "w+") for name in ("out", "err"))
    return subprocess.Popen(_command(run_dir, corpus_args), env=_environment(), stdout=out, stderr=err), out, err


def _finish(started, timeout=300):
    """Waits for a run from ``_start`` and returns its JSON summary."""
    process, out, err = started
    with out, err:
        try:
            process.wait(timeout=timeout)
        finally:
            if process.poll() is None:
                process.kill()
        err.seek(0), out.seek(0)
        assert process.returncode == 0, err.read()[-3000:]
        return json.loads(out.read().strip().splitlines()[-1])


def _run(run_dir, corpus_args):
    return _finish(_start(run_dir, corpus_args))


@pytest.mark.parametrize("num_kills", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_sigkill_at_random_steps_then_resume_is_bit_identical(tmp_path, corpus_args, num_kills):
    started = _start(tmp_path / "reference", corpus_args)  # alongside the killed runs: the machine has two cores
    rng = random.Random(1234)
    kills = sorted(rng.sample(range(2, 23), num_kills))
    try:
        for at_step in kills:
            _run_and_kill(tmp_path / "killed", corpus_args, at_step)
    except BaseException:
        started[0].kill()
        raise
    reference = _finish(started)
    assert reference["status"] == "success" and reference["resumed_from_step"] is None
    resumed = _run(tmp_path / "killed", corpus_args)
    assert resumed["status"] == "success" and resumed["resumed_from_step"] is not None
    a, b = load_from_checkpoint(tmp_path / "reference", 24), load_from_checkpoint(tmp_path / "killed", 24)
    arrays = lambda s: jax.device_get((s.step, s.params, s.opt_state, jax.random.key_data(s.key)))  # noqa: E731
    for x, y in zip(jax.tree.leaves(arrays(a.state)), jax.tree.leaves(arrays(b.state)), strict=True):
        np.testing.assert_array_equal(x, y)
    assert resumed["val_loss"] == reference["val_loss"]
    assert resumed["test_perplexity"] == reference["test_perplexity"]
