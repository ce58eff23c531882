"""Training: TrainState, optimizers, loss, metrics, and the pure step functions."""

from .metrics import Measured, accumulate, merge_metrics, to_host
from .optim import build_optimizer, build_schedule, learning_rate_at
from .recurrent_eval import make_recurrent_eval_step
from .state import TrainState, abstract_state, init
from .steps import make_eval_step, make_train_step

__all__ = [
    "Measured",
    "TrainState",
    "accumulate",
    "merge_metrics",
    "make_recurrent_eval_step",
    "to_host",
    "build_optimizer",
    "build_schedule",
    "abstract_state",
    "init",
    "learning_rate_at",
    "make_eval_step",
    "make_train_step",
]
