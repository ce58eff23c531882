"""One residual xLSTM-7B block: x + mLSTM(RMSNorm(x)), then + SwiGLU(RMSNorm(x))."""

from __future__ import annotations

import equinox as eqx
import jax
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ..config import ModelConfig
from .kernels import MLSTMState
from .layers import FeedForward, apply_norm, rms_norm, small_init_std, wang_init_std
from .mlstm_layer import MLSTMLayer


class XLSTMBlock(eqx.Module):
    norm_mlstm: eqx.nn.RMSNorm
    mlstm_layer: MLSTMLayer
    norm_ffn: eqx.nn.RMSNorm
    ffn: FeedForward

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        c = config
        k_mlstm, k_ffn = jax.random.split(key)
        dtype = c.param_dtype
        self.norm_mlstm = rms_norm(c.embedding_dim, c.norm_eps, dtype)
        self.mlstm_layer = MLSTMLayer(c, key=k_mlstm)
        self.norm_ffn = rms_norm(c.embedding_dim, c.norm_eps, dtype)
        std_out = (
            wang_init_std(c.embedding_dim, c.num_blocks) if c.output_init == "wang" else small_init_std(c.embedding_dim)
        )
        self.ffn = FeedForward(
            c.embedding_dim,
            c.ffn_hidden_dim,
            c.use_bias,
            small_init_std(c.embedding_dim),
            std_out,
            dtype,
            c.low_precision_matmul,
            key=k_ffn,
        )

    def __call__(
        self,
        x: Float[Array, "batch t d"],
        state: MLSTMState | None = None,
        reset: Bool[Array, "batch t"] | None = None,
        *,
        kernel: str | None = None,
        tp_axis: str | None = None,
    ) -> tuple[Float[Array, "batch t d"], MLSTMState, dict[str, Float[Array, " batch"]]]:
        """(output, state (batch, heads, …), the mLSTM layer's per-row gate statistics)."""
        y, state, stats = self.mlstm_layer(apply_norm(self.norm_mlstm, x), state, reset, kernel=kernel, tp_axis=tp_axis)
        x = x + y
        x = x + self.ffn(apply_norm(self.norm_ffn, x), tp_axis)
        return x, state, stats
