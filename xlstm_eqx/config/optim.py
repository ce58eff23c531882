"""Optimizer, weight decay, gradient clipping and learning-rate schedule of a training run."""

from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass
from typing import Literal

from .parsing import ConfigError

OptimizerName = Literal["adamw", "adam", "sgd", "lion", "ademamix"]
DecayName = Literal["constant", "cosine", "exponential", "linear"]


@dataclass(frozen=True)
class OptimConfig:
    """What :func:`xlstm_eqx.train.optim.build_optimizer` and ``build_schedule`` build.

    Optimizer:

    - ``name``: ``adamw`` (Adam + decoupled decay), ``adam`` (Adam + coupled L2), ``sgd`` (coupled L2),
      ``lion`` (decoupled decay), ``ademamix`` (``optax.contrib.ademamix``, decoupled decay).
    - ``learning_rate``: peak LR of the schedule (> 0).
    - ``b1``, ``b2``: Adam/AdEMAMix first/second-moment decay rates; Lion's interpolation/momentum rates.
    - ``b3``, ``alpha``: AdEMAMix slow-EMA decay rate and mixing coefficient (constant, no warm-up).
    - ``eps``: Adam-family epsilon outside the square root.
    - ``momentum``, ``nesterov``: SGD heavy-ball momentum (0 = none) and Nesterov; only valid for ``sgd``.

    Regularisation:

    - ``weight_decay``: coefficient wd ≥ 0. Decoupled optimizers (adamw, lion, ademamix) apply
      θ ← θ − lr·wd·θ (scaled by the scheduled LR); ``adam`` and ``sgd`` add wd·θ to the (clipped)
      gradient before the optimizer (classic L2).
    - ``weight_decay_exclude``: regexes, each searched (``re.search``) in a parameter's dotted path
      such as ``blocks.mlstm_layer.q.weight``; a parameter matching any of them gets no decay.
    - ``grad_clip_norm``: clip the global gradient norm to this value before anything else (None = off).

    Schedule (k = the optimizer's update count before an update; that update applies ``schedule(k)``):

    - ``warmup_steps`` W: k ∈ [0, W) goes linearly from ``warmup_init_factor``·peak to peak (peak at k = W).
    - ``decay``, ``decay_steps`` D: k ∈ [W, W+D) goes from peak to ``end_lr_factor``·peak (reached at
      k = W+D) along a cosine, exponential (constant log-ratio) or linear curve; then stays there.
      ``constant`` requires D = 0 and keeps the peak.
    - ``cooldown_steps`` C: over the last C steps of a run of known length T (``total_steps`` argument of
      the builders, which then require T ≥ W + D + C) the LR goes linearly from ``end_learning_rate`` to 0:
      k ∈ [T−C, T), 0 from k = T on.
    """

    name: OptimizerName = "adamw"
    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.95
    b3: float = 0.9999
    alpha: float = 5.0
    eps: float = 1e-8
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.1
    weight_decay_exclude: tuple[str, ...] = ("norm", "bias", "embedding")
    grad_clip_norm: float | None = 1.0
    warmup_steps: int = 0
    warmup_init_factor: float = 0.0
    decay: DecayName = "constant"
    decay_steps: int = 0
    end_lr_factor: float = 0.1
    cooldown_steps: int = 0

    def __post_init__(self):
        for name, hint in (("name", OptimizerName), ("decay", DecayName)):
            if getattr(self, name) not in typing.get_args(hint):
                raise ConfigError(name, f"must be one of {typing.get_args(hint)}, got {getattr(self, name)!r}")
        for name in ("learning_rate", "b1", "b2", "b3", "alpha", "eps", "momentum", "weight_decay"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(name, f"must be finite, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError("learning_rate", f"must be positive, got {self.learning_rate}")
        for name in ("b1", "b2", "b3", "momentum"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, f"must lie in [0, 1), got {getattr(self, name)}")
        for name in ("alpha", "eps", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be non-negative, got {getattr(self, name)}")
        if self.name in ("adam", "adamw", "ademamix") and not self.eps > 0:
            # an entry whose gradient is exactly zero (an embedding row no batch used) would get 0/0 = NaN
            raise ConfigError("eps", f"must be positive for {self.name!r} (it divides by √ν + eps), got {self.eps}")
        if self.name != "sgd" and self.momentum != 0:
            raise ConfigError("momentum", f"only used by the sgd optimizer, not {self.name!r}; leave it at 0")
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ConfigError("nesterov", "needs name 'sgd' and a positive momentum")
        for pattern in self.weight_decay_exclude:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ConfigError("weight_decay_exclude", f"invalid regex {pattern!r}: {error}") from None
        if self.grad_clip_norm is not None and not (math.isfinite(self.grad_clip_norm) and self.grad_clip_norm > 0):
            raise ConfigError("grad_clip_norm", f"must be positive or null, got {self.grad_clip_norm}")
        self._check_schedule()

    def _check_schedule(self):
        for name in ("warmup_steps", "decay_steps", "cooldown_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be non-negative, got {getattr(self, name)}")
        if not 0 <= self.warmup_init_factor <= 1:
            raise ConfigError("warmup_init_factor", f"must lie in [0, 1], got {self.warmup_init_factor}")
        if self.decay == "constant" and self.decay_steps:
            raise ConfigError("decay_steps", f"must be 0 with decay 'constant', got {self.decay_steps}")
        if self.decay != "constant" and self.decay_steps == 0:
            raise ConfigError("decay_steps", f"must be positive with decay {self.decay!r}")
        factor = self.end_lr_factor
        if not 0 <= factor <= 1 or (self.decay == "exponential" and factor == 0):
            interval = "(0, 1]" if self.decay == "exponential" else "[0, 1]"
            raise ConfigError("end_lr_factor", f"must lie in {interval} for decay {self.decay!r}, got {factor}")
        if self.cooldown_steps and self.decay != "constant" and self.end_lr_factor == 0:
            raise ConfigError(
                "cooldown_steps", "nothing to cool from: the decay already ends at LR 0 (end_lr_factor 0)"
            )

    @property
    def end_learning_rate(self) -> float:
        """The LR after the decay phase (the peak for ``decay: constant``); cooldown starts from it."""
        return self.learning_rate * (1.0 if self.decay == "constant" else self.end_lr_factor)
