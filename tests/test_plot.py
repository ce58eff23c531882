"""Loss-curve plots from metrics.jsonl: the PNG, duplicate steps from resumed runs, and named errors."""

import json
import math

import numpy as np
import pytest

from xlstm_eqx.io import JsonlWriter
from xlstm_eqx.io.plot import plot_loss_curve, read_loss_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(directory, steps=range(1, 61), val_every=10, resume_from=None):
    """A realistic metrics.jsonl: start-up rows, train rows, val rows, a timing row; optionally a resumed run that
    appends again from ``resume_from`` with slightly different values."""
    writer = JsonlWriter(directory)
    writer.write("model", 0, 1, {"num_params": 12345, "start_step": 0})

    def run(steps, offset):
        for step in steps:
            loss = 5.0 * math.exp(-step / 25) + 1.0 + offset
            writer.write("train", step, 1, {"loss_mean": np.float32(loss), "accuracy_mean": 0.1, "lr": 1e-3})
            if step % val_every == 0:
                writer.write("val", step, 1, {"loss": loss + 0.2, "perplexity": math.exp(loss + 0.2)})
                writer.write("val", step, 1, {"eval_loss": loss + 0.3})  # an extended evaluation's own row
        writer.write("timing", steps[-1], 1, {"compile_time": 3.2})

    run(list(steps), 0.0)
    if resume_from is not None:
        run(list(range(resume_from, steps[-1] + 1)), -0.5)
    writer.close()
    return writer.path


def test_plot_writes_a_png(tmp_path):
    metrics = write_run(tmp_path / "run")
    out = plot_loss_curve(metrics, tmp_path / "plots" / "loss.png", title="tiny run")
    assert out == tmp_path / "plots" / "loss.png"
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5_000  # axes, two series, legend: not a blank canvas
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (800, 500)


def test_series_and_default_title(tmp_path):
    metrics = write_run(tmp_path / "my_run")
    train, evals = read_loss_curves(str(metrics))
    assert list(train) == list(range(1, 61))
    assert list(evals) == ["val loss", "val eval_loss"]  # "perplexity", "accuracy_mean", "lr" are not losses
    assert list(evals["val loss"]) == [10, 20, 30, 40, 50, 60]
    assert plot_loss_curve(metrics, tmp_path / "default_title.png").stat().st_size > 5_000


def test_duplicate_steps_keep_the_last_occurrence(tmp_path):
    metrics = write_run(tmp_path / "run", resume_from=41)  # steps 41..60 written twice, 0.5 lower the 2nd time
    train, evals = read_loss_curves(metrics)
    assert list(train) == list(range(1, 61))  # each step once, in order
    first_run = lambda s: 5.0 * math.exp(-s / 25) + 1.0  # noqa: E731
    assert train[40] == pytest.approx(first_run(40))
    assert train[50] == pytest.approx(first_run(50) - 0.5)
    assert list(evals["val loss"]) == [10, 20, 30, 40, 50, 60]
    assert evals["val loss"][60] == pytest.approx(first_run(60) - 0.3)
    assert plot_loss_curve(metrics, tmp_path / "resumed.png").read_bytes().startswith(PNG_SIGNATURE)


def test_train_only_and_single_point(tmp_path):
    writer = JsonlWriter(tmp_path)
    writer.write("train", 7, 1, {"loss_mean": 2.5})
    writer.write("train", 8, 1, {"loss_mean": float("nan")})  # non-finite points are dropped
    writer.close()
    train, evals = read_loss_curves(writer.path)
    assert train == {7: 2.5} and evals == {}
    assert plot_loss_curve(writer.path, tmp_path / "one.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("key", ["loss", "loss_single", "loss_max"])
def test_train_loss_of_other_log_modes(tmp_path, key):
    """Without the mean log mode the curve shows the loss the train log modes gave (``loss_std`` is not one)."""
    writer = JsonlWriter(tmp_path)
    for step in (1, 2, 3):
        writer.write("train", step, 1, {key: 4.0 - step, "loss_std": 0.5})
    writer.close()
    train, _ = read_loss_curves(writer.path)
    assert train == {1: 3.0, 2: 2.0, 3: 1.0}
    assert plot_loss_curve(writer.path, tmp_path / "other.png").read_bytes().startswith(PNG_SIGNATURE)


def test_only_a_loss_spread_is_not_a_train_loss(tmp_path):
    writer = JsonlWriter(tmp_path)
    writer.write("train", 1, 1, {"loss_std": 0.5})
    writer.close()
    with pytest.raises(ValueError, match=r"no train loss.*'loss_std'.*expected one of \['loss_mean'"):
        read_loss_curves(writer.path)


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "metrics.jsonl"
    with pytest.raises(FileNotFoundError, match="nowhere/metrics.jsonl"):
        plot_loss_curve(missing, tmp_path / "x.png")


def test_no_train_loss_lists_the_keys_found(tmp_path):
    writer = JsonlWriter(tmp_path)
    writer.write("train", 1, 1, {"accuracy_mean": 0.5, "lr": 0.1})
    writer.write("val", 1, 1, {"loss": 3.0})
    writer.close()
    with pytest.raises(ValueError, match=r"no train loss.*\['accuracy_mean', 'log_epoch', 'log_step', 'lr', 'mode'\]"):
        plot_loss_curve(writer.path, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_no_train_rows_lists_the_modes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"mode": "val", "log_step": 1, "log_epoch": 1, "loss": 3.0}) + "\n")
    with pytest.raises(ValueError, match=r"no rows with mode 'train' \(modes found: \['val'\]\)"):
        plot_loss_curve(path, tmp_path / "x.png")
    path.write_text("")
    with pytest.raises(ValueError, match="the file is empty"):
        plot_loss_curve(path, tmp_path / "x.png")


@pytest.mark.parametrize(
    ("bad_line", "match"),
    [
        ('{"mode": "train", "log_step": 3, "loss_mean": 1.0', "line 3 is not valid JSON"),
        ("[1, 2]", "line 3 is not a JSON object"),
        ('{"mode": "train", "loss_mean": 1.0}', "line 3 lacks .*'log_step'"),
        ('{"log_step": 3, "loss_mean": 1.0}', "line 3 lacks a string 'mode'"),
    ],
)
def test_malformed_line_is_named_by_number(tmp_path, bad_line, match):
    rows = [{"mode": "train", "log_step": s, "log_epoch": 1, "loss_mean": 1.0} for s in (1, 2)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + bad_line + "\n")
    with pytest.raises(ValueError, match=match):
        plot_loss_curve(path, tmp_path / "x.png")
