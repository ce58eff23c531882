"""Training: TrainState, optimizers, loss, metrics, and the pure step functions."""

from .optim import build_optimizer, build_schedule, learning_rate_at
from .state import TrainState, init
from .steps import make_eval_step, make_train_step

__all__ = [
    "TrainState",
    "build_optimizer",
    "build_schedule",
    "init",
    "learning_rate_at",
    "make_eval_step",
    "make_train_step",
]
