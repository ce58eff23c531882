"""Metric writers: what is read back from JSONL, CSV and TensorBoard files equals what was written."""

import csv
import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from xlstm_eqx.io import CsvWriter, JsonlWriter, TensorBoardWriter, is_finite_row

ROWS = [
    ("train", 10, 1, {"loss_mean": 3.5, "grad_norm_mean": 1.25, "param_norm": 40.0}),
    ("train", 20, 1, {"loss_mean": 3.0, "grad_norm_mean": 1.0, "param_norm": 40.5, "step_time": 0.1}),
    ("val", 20, 1, {"loss": 3.2, "accuracy": 0.25, "perplexity": float(np.exp(3.2))}),
    ("train", 30, 2, {"loss_mean": np.float32(2.75), "grad_norm_mean": np.array(0.5), "param_norm": 41.0}),
    ("train", 40, 2, {"loss_mean": jnp.float32(2.5), "grad_norm_mean": jnp.array(0.25), "param_norm": 41.5}),
]  # the last row's values are device arrays (a hook may log them unconverted)


def write_all(writer):
    for row in ROWS:
        writer.write(*row)
    writer.close()


def test_jsonl_rows_read_back_equal(tmp_path):
    write_all(JsonlWriter(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["mode"], r["log_step"], r["log_epoch"]) for r in rows] == [row[:3] for row in ROWS]
    for got, (_, _, _, metrics) in zip(rows, ROWS):
        assert {k: v for k, v in got.items() if k not in ("mode", "log_step", "log_epoch")} == pytest.approx(
            {k: float(v) for k, v in metrics.items()}
        )


def test_jsonl_keeps_per_example_arrays_and_appends_on_resume(tmp_path):
    writer = JsonlWriter(tmp_path)
    writer.write("val", 5, 1, {"loglik_single_noreduce_wcount": (np.array([-1.5, -2.0]), jnp.array([3, 4]))})
    writer.close()
    JsonlWriter(tmp_path).write("val", 6, 1, {"loss": 1.0})  # a resumed run appends
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loglik_single_noreduce_wcount"] == [[-1.5, -2.0], [3, 4]] and rows[1]["log_step"] == 6


def test_csv_streams_rows_and_widens_the_header(tmp_path):
    writer = CsvWriter(tmp_path)
    writer.write(*ROWS[0])
    # The first row is on disk before anything else happens (a crash now loses nothing).
    assert list(csv.DictReader(writer.path("train").open()))[0]["loss_mean"] == "3.5"
    for row in ROWS[1:]:
        writer.write(*row)
    train = list(csv.DictReader(writer.path("train").open()))
    assert [float(r["log_step"]) for r in train] == [10, 20, 30, 40]
    assert train[0]["step_time"] == "" and float(train[1]["step_time"]) == 0.1  # widened once, earlier cell empty
    assert float(train[2]["loss_mean"]) == pytest.approx(2.75) and float(train[2]["grad_norm_mean"]) == 0.5
    assert float(train[3]["loss_mean"]) == 2.5 and float(train[3]["grad_norm_mean"]) == 0.25
    val = list(csv.DictReader(writer.path("val").open()))
    assert float(val[0]["accuracy"]) == 0.25
    CsvWriter(tmp_path).write("train", 50, 2, {"loss_mean": 2.25})  # a resumed run continues the same file
    assert [r["log_step"] for r in csv.DictReader(writer.path("train").open())] == ["10", "20", "30", "40", "50"]


@pytest.mark.parametrize("torn", ['{"mode": "train", "log_st', ""])
def test_a_resumed_run_drops_a_torn_last_jsonl_line(tmp_path, caplog, torn):
    JsonlWriter(tmp_path).write("train", 1, 1, {"loss_mean": 3.0})
    path = tmp_path / "metrics.jsonl"
    with path.open("a") as file:  # a crash in the middle of writing the next row
        file.write(torn)
    JsonlWriter(tmp_path).write("train", 2, 1, {"loss_mean": 2.0})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["log_step"] for r in rows] == [1, 2]
    assert ("incomplete last line" in caplog.text) == bool(torn)


def test_a_resumed_run_drops_a_torn_last_csv_row(tmp_path, caplog):
    CsvWriter(tmp_path).write("train", 1, 1, {"loss_mean": 3.0, "lr": 0.1})
    path = CsvWriter(tmp_path).path("train")
    with path.open("a") as file:
        file.write("2,1,2.5")  # the row of step 2, cut short: its lr is missing
    CsvWriter(tmp_path).write("train", 3, 1, {"loss_mean": 2.0, "lr": 0.1, "grad_norm": 1.0})  # widens the header
    rows = list(csv.DictReader(path.open()))
    assert [(r["log_step"], r["loss_mean"], r["grad_norm"]) for r in rows] == [("1", "3.0", ""), ("3", "2.0", "1.0")]
    assert "incomplete last line" in caplog.text and "2,1,2.5" in caplog.text


def read_scalars(directory):
    """{tag: [(step, value)]} from TensorBoard event files (TFRecord framing: length, crc, data, crc)."""
    scalars = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_scalars_read_back_equal(tmp_path):
    write_all(TensorBoardWriter(tmp_path))
    scalars = read_scalars(tmp_path)
    assert [step for step, _ in scalars["train/loss_mean"]] == [10, 20, 30, 40]
    assert [value for _, value in scalars["train/loss_mean"]] == pytest.approx([3.5, 3.0, 2.75, 2.5])
    assert scalars["val/accuracy"] == [(20, pytest.approx(0.25))]


def test_finite_check():
    assert is_finite_row(ROWS[0][3])
    assert not is_finite_row({"loss_mean": float("nan")})
    assert not is_finite_row({"loss_mean": jnp.float32(float("inf"))})
