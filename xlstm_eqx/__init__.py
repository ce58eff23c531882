"""xlstm_eqx: xLSTM language models in Equinox, trained with pure JAX step functions."""

from . import config, data, models, parallel, train
from .config import Config, ConfigError, MeshConfig, ModelConfig, OptimConfig, TrainConfig, load_config
from .host_memory import configure_host_memory, malloc_uses_huge_pages
from .parallel import make_mesh

__all__ = [
    "Config",
    "ConfigError",
    "MeshConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "config",
    "configure_host_memory",
    "data",
    "load_config",
    "make_mesh",
    "malloc_uses_huge_pages",
    "models",
    "parallel",
    "train",
]
