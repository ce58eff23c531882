"""Metric writers for the logger: every row reaches disk when it is written, so a crash loses at most one row.

A row is ``(mode, step, epoch, metrics)`` with host metrics from ``xlstm_eqx.train.to_host``: scalars are written
everywhere; per-example arrays (the ``*_single_noreduce*`` modes) only to JSONL.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

_log = logging.getLogger(__name__)
STEP, EPOCH = "log_step", "log_epoch"
# A train row's loss under each train log mode (mean, single, mean_nopostfix, max), in the order readers prefer.
TRAIN_LOSS_KEYS = ("loss_mean", "loss_single", "loss", "loss_max")


@runtime_checkable
class MetricWriter(Protocol):
    """What the run logger needs of a writer (the seed's LoggerTool): rows as they come, then ``close``. Give
    your own (a database, wandb, …) to ``RunLogger(writers=...)`` / ``train_job(extra_writers=...)``."""

    def write(self, mode: str, step: int, epoch: int, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def drop_torn_last_line(path: Path) -> None:
    """Cuts ``path`` back to its last complete line when a crash left a partial one, so rows appended on resume
    start on a line of their own (a row glued onto the fragment would be lost too). Warns, naming the file and
    the fragment; a missing or empty file, or one ending in a newline, is left as it is."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as file:
        file.seek(-1, os.SEEK_END)
        if file.read(1) == b"\n":
            return
        cut = file.tell()
        while cut > 0:  # backwards, 64 KiB at a time, to the last newline
            start = max(cut - (1 << 16), 0)
            file.seek(start)
            newline = file.read(cut - start).rfind(b"\n")
            cut = start if newline < 0 else start + newline + 1
            if newline >= 0:
                break
        file.seek(cut)
        fragment = file.read(80)
        file.truncate(cut)
    fragment = fragment.decode(errors="replace")
    _log.warning("%s: dropped an incomplete last line (a crash mid-write?): %r", path, fragment)


def _host(value: Any) -> Any:
    """A device array (``jax.Array``, or anything else with ``__array__``) as a numpy array; others unchanged."""
    if hasattr(value, "__array__") and not isinstance(value, np.ndarray | np.generic):
        return np.asarray(value)
    return value


def _scalar(value: Any) -> float | None:
    """``value`` as a float if it is a scalar number, else None."""
    value = _host(value)
    if isinstance(value, bool | int | float | np.integer | np.floating):
        return float(value)
    if isinstance(value, np.ndarray) and value.size == 1:
        return float(value.reshape(()))
    return None


def _plain(value: Any) -> Any:
    value = _host(value)
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class JsonlWriter:
    """``<directory>/metrics.jsonl``: one JSON object per row (``mode``, ``log_step``, ``log_epoch``, metrics),
    appended and flushed at once; a resumed run appends to the same file."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_torn_last_line(self.path)
        self._file = self.path.open("a")

    def write(self, mode: str, step: int, epoch: int, metrics: dict[str, Any]) -> None:
        row = {"mode": mode, STEP: step, EPOCH: epoch, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class CsvWriter:
    """``<directory>/metrics_<mode>.csv`` per mode, one row appended and flushed per call.

    A row with columns the file does not have yet rewrites the file once with the widened header (earlier rows
    get empty cells), so rows are never held back in memory. Non-scalar metrics are left out.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._columns: dict[str, list[str]] = {}

    def path(self, mode: str) -> Path:
        return self.directory / f"metrics_{mode}.csv"

    def write(self, mode: str, step: int, epoch: int, metrics: dict[str, Any]) -> None:
        row = {STEP: step, EPOCH: epoch}
        row.update({k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None})
        path = self.path(mode)
        columns = self._columns.get(mode)
        if columns is None:  # first row of this mode in this process: the file may be a crashed run's
            drop_torn_last_line(path)
            columns = self._existing_columns(path)
        new = [key for key in row if key not in columns]
        if new or not path.exists():
            columns = columns + new
            self._rewrite(path, columns)
        self._columns[mode] = columns
        with path.open("a", newline="") as file:
            csv.DictWriter(file, columns).writerow(row)

    @staticmethod
    def _existing_columns(path: Path) -> list[str]:
        if not path.exists():
            return []
        with path.open(newline="") as file:
            return next(csv.reader(file), [])

    @staticmethod
    def _rewrite(path: Path, columns: list[str]) -> None:
        rows = []
        if path.exists():
            with path.open(newline="") as file:
                rows = list(csv.DictReader(file))
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as file:
            writer = csv.DictWriter(file, columns)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(path)  # atomic: a crash leaves the old or the new file, never half of one

    def close(self) -> None:
        pass


class TensorBoardWriter:
    """Scalars ``<mode>/<key>`` through tensorboardX into ``directory``, flushed after each row. Arrays are
    skipped; NaN and inf are written as they are (TensorBoard shows them)."""

    def __init__(self, directory: str | Path, flush_secs: int = 10):
        from tensorboardX import SummaryWriter

        self.directory = Path(directory)
        self._writer = SummaryWriter(str(self.directory), flush_secs=flush_secs)

    def write(self, mode: str, step: int, epoch: int, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            scalar = _scalar(value)
            if scalar is not None:
                self._writer.add_scalar(f"{mode}/{key}", scalar, global_step=step)
        self._writer.flush()

    def add_text(self, tag: str, text: str) -> None:
        self._writer.add_text(tag, text)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def is_finite_row(metrics: dict[str, Any]) -> bool:
    """True if every scalar metric is finite (the logger's NaN check on what it writes)."""
    return all(math.isfinite(v) for v in (_scalar(x) for x in metrics.values()) if v is not None)
