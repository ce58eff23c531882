"""xLSTM models as Equinox modules, and the mLSTM kernels they run on."""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PRNGKeyArray

from ..config import ModelConfig
from . import kernels
from .block import XLSTMBlock
from .kernels import MLSTMState
from .lm import xLSTMLM
from .mlstm_layer import MLSTMLayer


def build(config: ModelConfig, *, key: PRNGKeyArray) -> xLSTMLM:
    """A freshly initialised model for ``config``."""
    return xLSTMLM(config, key=key)


def count_params(config_or_model: ModelConfig | eqx.Module) -> int:
    """Number of parameters; for a config, computed from shapes only (nothing is allocated)."""
    model = config_or_model
    if isinstance(config_or_model, ModelConfig):
        model = eqx.filter_eval_shape(build, config_or_model, key=jax.random.key(0))
    leaves = jax.tree.leaves(eqx.filter(model, lambda x: hasattr(x, "shape") and hasattr(x, "dtype")))
    return int(sum(np.prod(leaf.shape) for leaf in leaves))


__all__ = ["MLSTMLayer", "MLSTMState", "XLSTMBlock", "build", "count_params", "kernels", "xLSTMLM"]
