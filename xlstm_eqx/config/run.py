"""Configuration of a training run around the step functions: data, loop cadence, logging, checkpoints, hooks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .parsing import ConfigError

WRITERS = ("jsonl", "csv", "tensorboard")


_SET_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.+)$")


def split_set_name(entry: str) -> tuple[str | None, str]:
    """``"plays=data/val.txt"`` → ``("plays", "data/val.txt")``; an entry without a name → ``(None, entry)``."""
    found = _SET_NAME.match(entry)
    return (found.group(1), found.group(2)) if found else (None, entry)


@dataclass(frozen=True)
class DataSection:
    """Where the text comes from and how it becomes batches.

    ``corpus`` ``"shakespeare"`` uses the default corpus's train/validation/test works; ``"files"`` reads
    ``train_files`` / ``validation_files`` / ``test_files`` (text files, folders of ``.txt`` or ``.jsonl``).
    ``tokenizer`` is a ``tokenizers`` JSON file (None = the shipped Shakespeare BPE). ``seq_len`` inputs per row;
    ``global_batch_size`` rows per step over all processes; ``eval_batch_size`` rows per evaluation batch
    (None = ``global_batch_size``); ``mode`` ``pack`` | ``concat``; ``val_max_batches`` caps each validation
    (None = the whole split). ``validation_files`` written ``NAME=PATH`` (all or none) make named validation sets,
    one per name, whose metrics are logged as ``<NAME>_loss`` etc. (monitor e.g. ``plays_loss``).
    """

    corpus: Literal["shakespeare", "files"] = "shakespeare"
    train_files: tuple[str, ...] = ()
    validation_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    tokenizer: str | None = None
    seq_len: int = 256
    global_batch_size: int = 16
    eval_batch_size: int | None = None
    mode: Literal["pack", "concat"] = "pack"
    shuffle: bool = True
    seed: int = 42
    worker_count: int = 0
    val_max_batches: int | None = None

    def __post_init__(self):
        for name in ("seq_len", "global_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be ≥ 1, got {getattr(self, name)}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError("eval_batch_size", f"must be ≥ 1 or null, got {self.eval_batch_size}")
        if self.corpus == "files" and not self.train_files:
            raise ConfigError("train_files", "corpus 'files' needs at least one training file or folder")
        for name in ("train_files", "validation_files", "test_files"):
            if self.corpus != "files" and getattr(self, name):
                raise ConfigError(name, f"is read only with corpus: files (corpus is {self.corpus!r}, which would "
                                        "ignore it); set data.corpus=files")  # fmt: skip
        names = [split_set_name(entry)[0] for entry in self.validation_files]
        if any(names) and not all(names):
            raise ConfigError("validation_files", "name every entry (NAME=PATH) or none of them, got "
                                                  f"{list(self.validation_files)}")  # fmt: skip
        if self.worker_count < 0:
            raise ConfigError("worker_count", f"must be ≥ 0 (0: load in this process), got {self.worker_count}")
        if self.val_max_batches is not None and self.val_max_batches < 1:
            raise ConfigError("val_max_batches", f"must be ≥ 1 or null, got {self.val_max_batches}")


@dataclass(frozen=True)
class LoopConfig:
    """How long to train and when to validate.

    Exactly one of ``num_epochs`` / ``num_train_steps`` (checked when training starts). An epoch is
    ``steps_per_epoch`` steps of the endless (per-epoch reshuffled) training stream; None = one pass over the
    training data, counted once before training; a step budget that is not a whole number of epochs ends with a
    partial epoch, which ends (and may validate) at the last step. Validation after every
    ``check_val_every_n_epoch``-th epoch and/or every ``check_val_every_n_steps`` steps (≤ 0 disables either).
    The progress bar shows loss, tokens/s and ETA; with it, each validation and test pass shows a transient bar of
    its own (on process 0 only).
    """

    num_epochs: int | None = None
    num_train_steps: int | None = None
    steps_per_epoch: int | None = None
    check_val_every_n_epoch: int = 1
    check_val_every_n_steps: int = -1
    enable_progress_bar: bool = True

    def __post_init__(self):
        if self.num_epochs is not None and self.num_train_steps is not None:
            raise ConfigError("num_epochs", "set only one of loop.num_epochs and loop.num_train_steps")
        for name in ("num_epochs", "num_train_steps", "steps_per_epoch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, f"must be ≥ 1 or null, got {value}")


@dataclass(frozen=True)
class LogConfig:
    """``run_dir`` holds everything a run writes (logs, tensorboard events, checkpoints); a run directory that
    already holds checkpoints is resumed. Train metrics are read, written and reset every
    ``log_every_n_steps`` steps; ``writers`` from ``jsonl``, ``csv``, ``tensorboard``; the text log is
    ``<run_dir>/<cmd_logging_name>.log``."""

    run_dir: str = "runs/default"
    log_every_n_steps: int = 50
    writers: tuple[str, ...] = WRITERS
    cmd_logging_name: str = "output"
    tensorboard_flush_secs: int = 30

    def __post_init__(self):
        if self.log_every_n_steps < 1:
            raise ConfigError("log_every_n_steps", f"must be ≥ 1, got {self.log_every_n_steps}")
        unknown = [w for w in self.writers if w not in WRITERS]
        if unknown:
            raise ConfigError("writers", f"unknown writers {unknown}; choose from {list(WRITERS)}")
        if not self.cmd_logging_name or "/" in self.cmd_logging_name:
            raise ConfigError("cmd_logging_name", f"must be a plain file name, got {self.cmd_logging_name!r}")


@dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in ``<run_dir>/checkpoints``: every ``every_n_steps`` steps (≤ 0: off), after each
    validation (``at_validation``) and at the end of training. The latest ``keep_latest`` are kept (null: all),
    and with a ``monitor`` (a validation metric key such as ``loss`` or ``<name>_loss``) also the best
    ``keep_best`` by ``mode``; the latest is never deleted. ``async_save`` writes in the background."""

    enabled: bool = True
    every_n_steps: int = -1
    at_validation: bool = True
    keep_latest: int | None = 1
    keep_best: int = 1
    monitor: str | None = None
    mode: Literal["min", "max"] = "min"
    async_save: bool = True
    save_optimizer: bool = True

    def __post_init__(self):
        if self.keep_latest is not None and self.keep_latest < 1:
            raise ConfigError(
                "keep_latest", f"must be ≥ 1 or null (keep all; the latest is always kept), got {self.keep_latest}"
            )
        if self.keep_best < 0:
            raise ConfigError("keep_best", f"must be ≥ 0, got {self.keep_best}")
        if self.mode not in ("min", "max"):
            raise ConfigError("mode", f"must be 'min' or 'max', got {self.mode!r}")
        if self.enabled and self.monitor is not None and not self.at_validation:
            raise ConfigError(
                "monitor",
                f"{self.monitor!r} ranks the checkpoints saved after validation, but at_validation is false, so "
                "no checkpoint would carry it; set at_validation: true or drop the monitor",
            )


@dataclass(frozen=True)
class HooksConfig:
    """Built-in hooks. ``lr_monitor_every_n_steps`` / ``lr_monitor_every_n_epochs``: log ``optimizer/lr`` (the LR
    the step's update applied) every N steps / at the end of every N-th epoch (≤ 0: off).
    ``profile_first_step`` / ``profile_num_steps``: a ``jax.profiler`` trace of that step range into
    ``<run_dir>/tensorboard`` (first step ≤ 0: off), repeated for ``profile_num_steps`` steps each time
    ``profile_every_minutes`` have passed since the last trace ended (≤ 0: only once). ``nan_stop``: stop at the
    first step whose loss or gradients are not finite (training's ``check_for_nan`` already keeps that step from
    changing anything)."""

    lr_monitor_every_n_steps: int = 50
    lr_monitor_every_n_epochs: int = -1
    profile_first_step: int = -1
    profile_num_steps: int = 5
    profile_every_minutes: float = 60.0
    nan_stop: bool = True

    def __post_init__(self):
        if self.profile_num_steps < 1:
            raise ConfigError("profile_num_steps", f"must be ≥ 1, got {self.profile_num_steps}")
