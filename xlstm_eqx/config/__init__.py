"""Configuration: frozen dataclasses, YAML loading and dotted overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .lm_eval import LMEvalConfig
from .mesh import MeshConfig
from .model import ModelConfig
from .optim import OptimConfig
from .parsing import ConfigError, apply_overrides, from_dict, read_yaml, to_dict
from .run import CheckpointConfig, DataSection, HooksConfig, LogConfig, LoopConfig
from .train import TrainConfig


@dataclass(frozen=True)
class Config:
    """The whole run: one section per layer of the system."""

    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataSection = field(default_factory=DataSection)
    loop: LoopConfig = field(default_factory=LoopConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    lm_eval: LMEvalConfig = field(default_factory=LMEvalConfig)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Reads ``path`` (YAML; may be None for defaults), applies ``key.sub=value`` overrides, validates."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(Config, apply_overrides(data, overrides))


__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataSection",
    "HooksConfig",
    "LMEvalConfig",
    "LogConfig",
    "LoopConfig",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "read_yaml",
    "to_dict",
]
