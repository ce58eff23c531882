"""xlstm_eqx: xLSTM language models in Equinox, trained with pure JAX step functions."""

from . import config, models
from .config import Config, ConfigError, ModelConfig, load_config

__all__ = ["Config", "ConfigError", "ModelConfig", "config", "load_config", "models"]
