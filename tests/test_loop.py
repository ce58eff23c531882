"""fit: events at exactly the expected steps, stops, non-finite steps, learning, logs read back equal to the metrics
(combinators: test_events.py; evaluation: test_evaluate.py)."""

import csv
import json
import math
import struct

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from loop_setup import Stream, eval_set, recorder

from xlstm_eqx.config.run import LogConfig, LoopConfig
from xlstm_eqx.loop import (
    RunLogger,
    Stop,
    evaluate,
    fit,
    lr_monitor,
    on,
)


def test_fit_fires_each_event_at_the_expected_steps(tiny):
    state, train_step, eval_step, *_ = tiny
    hook, seen = recorder()
    config = LoopConfig(num_train_steps=16, steps_per_epoch=4, check_val_every_n_steps=6, check_val_every_n_epoch=2)
    result = fit(state, train_step, eval_step, Stream(), config=config, log_every_n_steps=5, val_data=eval_set(1),
                 test_data=eval_set(1), hooks=[hook], logger=None)  # fmt: skip
    assert result.status == "success" and result.step == 16
    expected = [("train_start", 0, 1, "")]
    for step in range(1, 17):
        if step % 4 == 1:
            expected.append(("epoch_start", step - 1, (step - 1) // 4 + 1, ""))
        expected.append(("step", step, (step - 1) // 4 + 1, ""))
        if step % 6 == 0:
            expected += [
                ("val_start", step, (step - 1) // 4 + 1, "step"),
                ("val_end", step, (step - 1) // 4 + 1, "step"),
            ]
        if step % 4 == 0:
            expected.append(("epoch_end", step, step // 4, ""))
            if (step // 4) % 2 == 0:
                expected += [("val_start", step, step // 4, "epoch"), ("val_end", step, step // 4, "epoch")]
    expected += [("train_end", 16, 4, ""), ("test_start", 16, 4, ""), ("test_end", 16, 4, "")]
    assert seen == expected
    assert sorted(result.results) == ["test", "val_epoch_2", "val_epoch_4", "val_step_12", "val_step_6"]


@pytest.mark.parametrize("every", [1, 2])
def test_the_last_step_ends_a_partial_last_epoch(tiny, every):
    """6 steps of 4-step epochs: epoch 2 is partial and ends (and validates, when its turn) at step 6."""
    state, train_step, eval_step, *_ = tiny
    hook, seen = recorder()
    config = LoopConfig(num_train_steps=6, steps_per_epoch=4, check_val_every_n_steps=-1, check_val_every_n_epoch=every)
    result = fit(state, train_step, eval_step, Stream(), config=config, val_data=eval_set(1), hooks=[hook])
    assert [(k, s, e) for k, s, e, _ in seen if k in ("epoch_end", "val_end")] == [
        ("epoch_end", 4, 1), *([("val_end", 4, 1)] if every == 1 else []), ("epoch_end", 6, 2), ("val_end", 6, 2)
    ]  # fmt: skip
    assert sorted(result.results) == (["val_epoch_1", "val_epoch_2"] if every == 1 else ["val_epoch_2"])


def test_epoch_validation_at_a_validated_step_reuses_the_result(tiny):
    state, train_step, eval_step, *_ = tiny
    hook, seen = recorder()
    config = LoopConfig(num_train_steps=8, steps_per_epoch=4, check_val_every_n_steps=4, check_val_every_n_epoch=1)
    result = fit(state, train_step, eval_step, Stream(), config=config, val_data=eval_set(1), hooks=[hook])
    assert [(k, s) for k, s, _, _ in seen if k.startswith("val")] == [
        ("val_start", 4), ("val_end", 4), ("val_start", 8), ("val_end", 8)
    ]  # fmt: skip
    assert result.results["val_epoch_1"] is result.results["val_step_4"]


@pytest.mark.parametrize("batches", [3, 0])
def test_a_training_stream_that_ends_early_stops_the_run_with_its_state(tiny, batches):
    state, train_step, eval_step, *_ = tiny
    hook, seen = recorder()
    config = LoopConfig(num_train_steps=5)
    result = fit(state, train_step, eval_step, iter(eval_set(batches)), config=config, hooks=[hook],
                 test_data=eval_set(1))  # fmt: skip
    assert (result.status, result.step, int(result.state.step)) == ("data_exhausted", batches, batches)
    assert f"train_data ended after step {batches} of 5" in result.reason
    assert seen[-1] == ("train_end", batches, 1, "") and "test" not in result.results


def test_stop_action_ends_training_with_its_status(tiny):
    state, train_step, eval_step, *_ = tiny
    stopper = on(["step"], lambda e: [Stop("stopped", "enough")] if e.step == 3 else None)
    result = fit(state, train_step, eval_step, Stream(), config=LoopConfig(num_train_steps=10), hooks=[stopper],
                 test_data=eval_set(1))  # fmt: skip
    assert (result.status, result.step, result.reason) == ("stopped", 3, "enough")
    assert "test" not in result.results  # no test after an interrupted run


def _tensorboard_scalars(directory):
    """{tag: [(step, value)]} read straight from the event files (TFRecord framing + the Event proto)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_logs_read_back_equal_to_the_metrics(tiny, tmp_path):
    state, train_step, eval_step, schedule, *_ = tiny
    logger = RunLogger(tmp_path, LogConfig(log_every_n_steps=4, tensorboard_flush_secs=1))
    logger.log_config({"model": {"embedding_dim": 32}})
    config = LoopConfig(num_train_steps=12, steps_per_epoch=6, check_val_every_n_steps=4, check_val_every_n_epoch=-1)
    result = fit(state, train_step, eval_step, Stream(), config=config, log_every_n_steps=4, val_data=eval_set(1),
                 test_data=eval_set(1), hooks=[lr_monitor(schedule, 4)], logger=logger)  # fmt: skip
    logger.finalize(result.status)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val_rows = [r for r in rows if r["mode"] == "val"]
    assert [r["log_step"] for r in val_rows] == [4, 8, 12]
    for row in val_rows:
        expected = result.results[f"val_step_{row['log_step']}"]
        assert {k: row[k] for k in expected} == expected
    train_rows = [r for r in rows if r["mode"] == "train" and "loss_mean" in r]
    assert [r["log_step"] for r in train_rows] == [4, 8, 12]
    assert all(r["optimizer/lr"] == pytest.approx(float(schedule(r["log_step"] - 1)), rel=1e-6) for r in train_rows)
    assert all(r["step_time"] > 0 and r["tokens_per_s"] > 0 for r in train_rows)
    assert [r["log_step"] for r in rows if r["mode"] == "train" and "epoch_time" in r] == [6, 12]
    assert [r["compile_time"] > 0 for r in rows if r["mode"] == "timing"] == [True]
    assert {r["mode"] for r in rows} >= {"model", "dataset", "parallel", "test"}
    dataset = next(r for r in rows if r["mode"] == "dataset")
    assert (dataset["global_batch_size"], dataset["local_batch_size"], dataset["num_epochs"]) == (8, 8, 2)
    # CSV: the same numbers, row by row.
    with (tmp_path / "metrics_val.csv").open(newline="") as file:
        csv_rows = list(csv.DictReader(file))
    assert [int(r["log_step"]) for r in csv_rows] == [4, 8, 12]
    for row, json_row in zip(csv_rows, val_rows):
        assert all(float(row[k]) == pytest.approx(json_row[k], rel=1e-12) for k in ("loss", "accuracy", "perplexity"))
    # TensorBoard: float32 copies at the right steps.
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in scalars["val/loss"]] == [4, 8, 12]
    assert [v for _, v in scalars["val/loss"]] == pytest.approx([r["loss"] for r in val_rows], rel=1e-6)
    assert [s for s, _ in scalars["train/loss_mean"]] == [4, 8, 12]
    assert (tmp_path / "config.yaml").read_text().startswith("model:")
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "success"
    text = (tmp_path / "output.log").read_text()
    assert "run finished with status success" in text
    for line in ("step 4/12: loss_mean ", "validation at step 8: loss ", "epoch 2 starts at step 6", "test of step 12"):
        assert line in text, line  # progress goes to the text log as well
    assert math.isfinite(result.results["test"]["loss"])


def test_unwritable_run_directory_is_a_clear_error(tmp_path):
    from xlstm_eqx.loop import LogPathError

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(LogPathError, match="cannot write to the run directory .*file/run"):
        RunLogger(blocker / "run")


def _train_rows(directory):
    rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["mode"] == "train" and "loss_mean" in r]


def test_the_last_partial_log_interval_gets_its_own_row(tiny_module, tmp_path):
    state, train_step, eval_step, *_ = tiny_module
    copy = lambda: jax.tree.map(jnp.copy, state)  # noqa: E731
    logger = RunLogger(tmp_path / "end", LogConfig(writers=("jsonl",)))
    fit(copy(), train_step, eval_step, Stream(), config=LoopConfig(num_train_steps=12), log_every_n_steps=5,
        logger=logger)  # fmt: skip
    logger.finalize("success")
    rows = _train_rows(tmp_path / "end")
    assert [r["log_step"] for r in rows] == [5, 10, 12] and all(math.isfinite(r["loss_mean"]) for r in rows)
    assert rows[-1]["step_time"] > 0  # the rates cover the two steps of the last interval
    # a hook's Stop inside an interval: the steps since the last row still get theirs
    logger = RunLogger(tmp_path / "stop", LogConfig(writers=("jsonl",)))
    stopper = on(["step"], lambda e: [Stop("stopped", "enough")] if e.step == 7 else None)
    fit(copy(), train_step, eval_step, Stream(), config=LoopConfig(num_train_steps=12), log_every_n_steps=5,
        hooks=[stopper], logger=logger)  # fmt: skip
    logger.finalize("stopped")
    assert [r["log_step"] for r in _train_rows(tmp_path / "stop")] == [5, 7]


def test_training_learns_the_streams_pattern(tiny):
    """The stream's rows repeat every token pair: 30 steps must lower both the train loss and the loss on held-out
    batches of the same pattern well below their start (a loop that trains nothing would pass every other test)."""
    state, train_step, eval_step, *_ = tiny
    losses = []
    record = on(["step"], lambda e: losses.append(e.loss))
    held_out = [next(Stream(seed=99)) for _ in range(2)]
    before = evaluate(eval_step, state, held_out)["loss"]
    result = fit(state, train_step, eval_step, Stream(), config=LoopConfig(num_train_steps=30), hooks=[record])
    after = evaluate(eval_step, result.state, held_out)["loss"]
    assert result.status == "success" and len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert after < 0.8 * before


def test_a_stop_at_epoch_start_ends_training_before_that_epoch(tiny):
    state, train_step, eval_step, *_ = tiny
    stopper = on(["epoch_start"], lambda e: [Stop("time_limit", "no time for epoch 2")] if e.epoch == 2 else None)
    hook, seen = recorder()
    config = LoopConfig(num_train_steps=6, steps_per_epoch=2)
    result = fit(state, train_step, eval_step, Stream(), config=config, hooks=[stopper, hook])
    assert (result.status, result.step, int(result.state.step)) == ("time_limit", 2, 2)
    assert [k for k, *_ in seen if k == "step"] == ["step", "step"] and seen[-1][0] == "train_end"


def test_a_batch_that_scores_no_token_is_not_a_nan_step(tiny):
    """All targets masked: the step applies a finite (zero-gradient) update, so neither the step's own check nor
    the loop may call it non-finite (its mean loss is 0/0 only because nothing was scored)."""
    state, train_step, eval_step, *_ = tiny

    class EmptyThird(Stream):
        def __next__(self):
            batch = super().__next__()
            return (
                eqx.tree_at(lambda b: b.loss_mask, batch, jnp.zeros_like(batch.loss_mask)) if self.index == 3 else batch
            )

    config = LoopConfig(num_train_steps=4)  # fit stops at a non-finite step by default (stop_on_nan)
    with pytest.warns(RuntimeWarning, match="nothing accumulated"):  # the third step's own row has no loss
        result = fit(state, train_step, eval_step, EmptyThird(), config=config, log_every_n_steps=1)
    assert (result.status, result.step) == ("success", 4)


def test_an_empty_loss_is_judged_by_the_step_check_alone():
    from xlstm_eqx.loop.fit import _step_scalars
    from xlstm_eqx.train.metrics import Measured, accumulate

    zero, one = jnp.zeros(()), jnp.ones(())
    empty = {"loss": Measured(zero, zero), "nonfinite": Measured(zero, one)}
    loss, nonfinite = _step_scalars(accumulate(empty, {"loss": ("mean",), "nonfinite": ("max",)}))
    assert math.isnan(loss) and not nonfinite
    loss, nonfinite = _step_scalars(accumulate({"loss": Measured(zero, zero)}, ("mean",)))  # no step check
    assert math.isnan(loss) and not nonfinite
    assert _step_scalars(accumulate({"loss": Measured(jnp.inf * one, one)}, ("mean",)))[1]


def test_loss_of_other_log_modes_is_not_taken_for_nan():
    from xlstm_eqx.loop.fit import _step_scalars
    from xlstm_eqx.train.metrics import Measured, accumulate

    one = jnp.ones(())
    measured = {"loss": Measured(2.0 * one, one), "nonfinite": Measured(0.0 * one, one)}
    loss, nonfinite = _step_scalars(accumulate(measured, {"loss": ("std",), "nonfinite": ("max",)}))
    assert math.isnan(loss) and not nonfinite  # no loss among these modes: nothing to judge it by
    measured["nonfinite"] = Measured(one, one)
    assert _step_scalars(accumulate(measured, {"loss": ("std",), "nonfinite": ("max",)}))[1]
    loss, nonfinite = _step_scalars(accumulate({"loss": Measured(jnp.nan * one, one)}, ("single",)))
    assert math.isnan(loss) and nonfinite


def test_a_writer_of_ones_own_gets_every_row_and_the_config(tiny, tmp_path):
    class Rows:
        def __init__(self):
            self.rows, self.config, self.closed = [], None, False

        def write(self, mode, step, epoch, metrics):
            self.rows.append((mode, step, dict(metrics)))

        def log_config(self, config):
            self.config = config

        def close(self):
            self.closed = True

    state, train_step, eval_step, *_ = tiny
    mine = Rows()
    logger = RunLogger(tmp_path, LogConfig(writers=("jsonl",)), writers=[mine])
    logger.log_config({"seed": 3})
    fit(state, train_step, eval_step, Stream(), config=LoopConfig(num_train_steps=4, check_val_every_n_steps=2),
        log_every_n_steps=2, val_data=eval_set(1), logger=logger)  # fmt: skip
    logger.finalize("success")
    on_disk = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["log_step"]) for r in on_disk] == [(mode, step) for mode, step, _ in mine.rows]
    assert [s for m, s, row in mine.rows if m == "val"] == [2, 4] and mine.config == {"seed": 3} and mine.closed
    with pytest.raises(TypeError, match="not a metric writer|MetricWriter"):  # ours, or the type checker's
        RunLogger(tmp_path / "other", writers=[object()])
