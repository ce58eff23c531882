"""The run logger: metric rows to the writers, a text log file, the config, timings, and the final status.

Everything a run writes goes under ``run_dir``: ``metrics.jsonl``, ``metrics_<mode>.csv``, ``tensorboard/``,
``<cmd_logging_name>.log``, ``config.yaml`` and ``status.json``. Rows are written as they happen (a crash
loses at most the row being written). Only process 0 writes; other processes get a logger that writes nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..config.run import LogConfig
from ..io.writers import CsvWriter, JsonlWriter, MetricWriter, TensorBoardWriter, is_finite_row

TEXT_FORMAT = "%(asctime)s %(name)s:%(lineno)d %(levelname)s [R%(process_index)d] %(message)s"
PACKAGE_LOGGER = "xlstm_eqx"


class LogPathError(OSError):
    """The run directory (or a file in it) cannot be created or written."""


def check_writable(directory: Path) -> Path:
    """Creates ``directory`` and proves it writable, or raises LogPathError naming it and the OS error."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise LogPathError(f"cannot write to the run directory {directory}: {error.strerror or error}") from error
    return directory


class _RankFilter(logging.Filter):
    def __init__(self, process_index: int):
        super().__init__()
        self.process_index = process_index

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_index = self.process_index
        return True


class RunLogger:
    """Writes metric rows (``write``), the config (``log_config``), text (``info``/``warning``) and the final
    status (``finalize``) of one run. On process 0 the text log receives every INFO-and-up record of the
    ``xlstm_eqx`` loggers while the run is open; other processes write nothing. ``writers`` are added to the ones
    ``config.writers`` names; each gets every row and is closed with the run (a ``log_config(dict)`` method, if
    it has one, also gets the config)."""

    def __init__(
        self,
        run_dir: str | Path,
        config: LogConfig = LogConfig(),
        *,
        process_index: int = 0,
        writers: Sequence[MetricWriter] = (),
    ):
        self.run_dir = Path(run_dir)
        self.config = config
        self.is_main = process_index == 0
        self.text = logging.getLogger(f"{PACKAGE_LOGGER}.run")
        self._writers: list[Any] = []
        self._handler: logging.Handler | None = None
        self._closed = False
        if not self.is_main:
            return
        check_writable(self.run_dir)
        path = self.run_dir / f"{config.cmd_logging_name}.log"
        try:
            self._handler = logging.FileHandler(path)
        except OSError as error:
            raise LogPathError(f"cannot open the text log {path}: {error.strerror or error}") from error
        self._handler.setFormatter(logging.Formatter(TEXT_FORMAT))
        self._handler.addFilter(_RankFilter(process_index))
        self._handler.setLevel(logging.INFO)
        package = logging.getLogger(PACKAGE_LOGGER)
        package.addHandler(self._handler)
        if package.level == logging.NOTSET or package.level > logging.INFO:
            package.setLevel(logging.INFO)
        makers = {
            "jsonl": lambda: JsonlWriter(self.run_dir),
            "csv": lambda: CsvWriter(self.run_dir),
            "tensorboard": lambda: TensorBoardWriter(self.tensorboard_dir, config.tensorboard_flush_secs),
        }
        for writer in writers:
            if not isinstance(writer, MetricWriter):
                raise TypeError(f"{type(writer).__name__} is not a metric writer: it needs write() and close()")
        self._writers = [makers[name]() for name in config.writers] + list(writers)

    @property
    def tensorboard_dir(self) -> Path:
        return self.run_dir / "tensorboard"

    def write(self, mode: str, step: int, epoch: int, metrics: dict[str, Any]) -> bool:
        """One row of host metrics under ``mode`` at ``step``; returns False if a scalar in it is not finite."""
        if metrics and self.is_main and not self._closed:
            for writer in self._writers:
                writer.write(mode, step, epoch, metrics)
        return is_finite_row(metrics)

    def log_config(self, config: dict[str, Any]) -> None:
        """The full config: ``config.yaml`` in the run directory, the text log, and tensorboard (as text)."""
        if not self.is_main:
            return
        text = yaml.safe_dump(config, sort_keys=False)
        (self.run_dir / "config.yaml").write_text(text)
        self.text.info("config:\n%s", text)
        for writer in self._writers:
            if isinstance(writer, TensorBoardWriter):
                writer.add_text("config", "```\n" + text + "```")
            elif hasattr(writer, "log_config"):
                writer.log_config(config)

    def info(self, message: str, *args: Any) -> None:
        self.text.info(message, *args)

    def warning(self, message: str, *args: Any) -> None:
        self.text.warning(message, *args)

    def finalize(self, status: str, details: dict[str, Any] | None = None) -> None:
        """Writes ``status.json`` (status, time, details), flushes and closes the writers, detaches the text log."""
        if self._closed:
            return
        self._closed = True
        if self.is_main:
            record = {**(details or {}), "status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (self.run_dir / "status.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
            self.text.info("run finished with status %s", status)
        for writer in self._writers:
            writer.close()
        if self._handler is not None:
            logging.getLogger(PACKAGE_LOGGER).removeHandler(self._handler)
            self._handler.close()


class StepTimer:
    """Seconds per step between log rows, excluding compilation (the reference starts after the first step)
    and evaluation (``reset`` after each validation)."""

    def __init__(self):
        self._ref: tuple[float, int] | None = None

    def reset(self, step: int) -> None:
        self._ref = (time.perf_counter(), step)

    def rates(self, step: int, tokens_per_step: int) -> dict[str, float]:
        """``step_time`` and ``tokens_per_s`` since the reference, then moves the reference to ``step``."""
        now = time.perf_counter()
        out: dict[str, float] = {}
        if self._ref is not None and step > self._ref[1]:
            step_time = (now - self._ref[0]) / (step - self._ref[1])
            out = {"step_time": step_time, "tokens_per_s": tokens_per_step / step_time if step_time > 0 else math.nan}
        self._ref = (now, step)
        return out
