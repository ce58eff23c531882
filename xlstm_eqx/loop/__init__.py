"""The training loop around the pure step functions: events and hooks, logging, evaluation, ``fit``."""

from .evaluate import evaluate
from .events import Event, Log, Stop, every_n_epochs, every_n_steps, fire, main_process_only, on
from .fit import FitResult, fit, plan_steps
from .hooks import checkpoint_hook, extended_evaluation, lr_monitor, nan_stop, profiler
from .logger import LogPathError, RunLogger

__all__ = [
    "Event",
    "FitResult",
    "Log",
    "LogPathError",
    "RunLogger",
    "Stop",
    "checkpoint_hook",
    "evaluate",
    "every_n_epochs",
    "every_n_steps",
    "extended_evaluation",
    "fire",
    "fit",
    "lr_monitor",
    "main_process_only",
    "nan_stop",
    "on",
    "plan_steps",
    "profiler",
]
