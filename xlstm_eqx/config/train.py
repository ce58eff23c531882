"""Configuration of the pure step functions (seed TrainerConfig's step-level fields)."""

from __future__ import annotations

from dataclasses import dataclass

from .parsing import ConfigError

# Per-example values, gathered rather than summed over devices (see train.metrics).
PER_EXAMPLE_MODES = ("single_noreduce", "single_noreduce_wcount")
LOG_MODES = ("mean", "mean_nopostfix", "single", "max", "std", *PER_EXAMPLE_MODES)


@dataclass(frozen=True)
class TrainConfig:
    """What a train/eval step computes and reports. Loop cadence (validation, logging) lives with the loop.

    ``gradient_accumulate_steps`` micro-batches per step (``gradient_accumulate_scan``: lax.scan instead of an
    unrolled loop); ``check_for_nan`` skips and flags a step whose loss or gradients are not finite (the step
    counter advances, the optimizer's schedule count does not: the learning rate continues from where the
    last applied update left it);
    ``debug`` runs the steps without jit (same numbers, Python-level debugging); ``seed_eval`` seeds any
    randomness of evaluation; ``z_loss`` adds z·logsumexp(logits)² to the objective.
    """

    debug: bool = False
    donate_train_state: bool = True
    gradient_accumulate_steps: int = 1
    gradient_accumulate_scan: bool = False
    check_for_nan: bool = True
    log_grad_norm: bool = True
    log_grad_norm_per_param: bool = False
    log_param_norm: bool = True
    log_param_norm_per_param: bool = False
    log_intermediates: bool = False
    default_train_log_modes: tuple[str, ...] = ("mean",)
    intermediates_log_modes: tuple[str, ...] = ("mean",)
    seed_eval: int = 0
    z_loss: float = 0.0

    def __post_init__(self):
        if self.gradient_accumulate_steps < 1:
            raise ConfigError("gradient_accumulate_steps", f"must be ≥ 1, got {self.gradient_accumulate_steps}")
        for name in ("default_train_log_modes", "intermediates_log_modes"):
            unknown = [m for m in getattr(self, name) if m not in LOG_MODES]
            if unknown:
                raise ConfigError(name, f"unknown log modes {unknown}; choose from {list(LOG_MODES)}")
            per_example = [m for m in getattr(self, name) if m in PER_EXAMPLE_MODES]
            if per_example:
                raise ConfigError(
                    name,
                    f"{per_example} would apply to every train metric, the loss that the step and the loop read "
                    "included; give per-example values to the metrics that need them: make_train_step(modes={name: "
                    "mode}) or make_eval_step(modes=...)",
                )
        if self.z_loss < 0:
            raise ConfigError("z_loss", f"must be ≥ 0, got {self.z_loss}")
