"""The xLSTM-7B ("mLSTM v1") layer: projections → soft-capped gates → cell → head norm → output gate."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ..config import ModelConfig
from .kernels import KERNELS, MLSTMState
from .layers import MultiHeadNorm, dense, gate_dtype, normal_, row_parallel, small_init_std, soft_cap, wang_init_std
from .matmul_policy import upcasts_low_precision_matmul


class MLSTMLayer(eqx.Module):
    """Maps the pre-normed residual stream u (T, D) to (T, D); carries per-head states (NH, …)."""

    q: eqx.nn.Linear
    k: eqx.nn.Linear
    v: eqx.nn.Linear
    ogate_preact: eqx.nn.Linear
    igate_preact: eqx.nn.Linear
    fgate_preact: eqx.nn.Linear
    multihead_norm: MultiHeadNorm
    out_proj: eqx.nn.Linear
    config: ModelConfig = eqx.field(static=True)

    def __init__(self, config: ModelConfig, *, key: PRNGKeyArray):
        c, dtype = config, jnp.dtype(config.param_dtype)
        keys = jax.random.split(key, 7)
        linear = functools.partial(eqx.nn.Linear, use_bias=c.use_bias, dtype=dtype)
        small = small_init_std(c.embedding_dim)
        self.q = normal_(linear(c.embedding_dim, c.qk_dim, key=keys[0]), small, keys[0])
        self.k = normal_(linear(c.embedding_dim, c.qk_dim, key=keys[1]), small, keys[1])
        self.v = normal_(linear(c.embedding_dim, c.v_dim, key=keys[2]), small, keys[2])
        # Zero output-gate and gate kernels: the o-gate starts at 0.5, gates start at their biases.
        self.ogate_preact = normal_(linear(c.embedding_dim, c.v_dim, key=keys[3]), 0.0, keys[3])
        gate = functools.partial(eqx.nn.Linear, c.embedding_dim, c.num_heads, use_bias=True, dtype=dtype)
        self.igate_preact = eqx.tree_at(
            lambda m: (m.weight, m.bias),
            gate(key=keys[4]),
            (
                jnp.zeros((c.num_heads, c.embedding_dim), dtype),
                jnp.full((c.num_heads,), c.igate_bias_init, dtype),
            ),
        )
        self.fgate_preact = eqx.tree_at(
            lambda m: (m.weight, m.bias),
            gate(key=keys[5]),
            (
                jnp.zeros((c.num_heads, c.embedding_dim), dtype),
                jnp.linspace(*c.fgate_bias_init, c.num_heads, dtype=dtype),
            ),
        )
        self.multihead_norm = MultiHeadNorm(c.num_heads, c.v_head_dim, c.cell_norm_type, c.norm_eps, dtype)
        out_std = wang_init_std(c.embedding_dim, c.num_blocks) if c.output_init == "wang" else small
        self.out_proj = normal_(linear(c.v_dim, c.embedding_dim, key=keys[6]), out_std, keys[6])
        self.config = config

    def __call__(
        self,
        u: Float[Array, "batch t d"],
        state: MLSTMState | None = None,
        reset: Bool[Array, "batch t"] | None = None,
        *,
        kernel: str | None = None,
        tp_axis: str | None = None,
    ) -> tuple[Float[Array, "batch t d"], MLSTMState, dict[str, Float[Array, " batch"]]]:
        """(output, state (batch, heads, …), per-row gate statistics). ``tp_axis``: mesh axis over which heads are
        split; this device's weights then hold its heads only (statistics are averaged over all heads)."""
        c = self.config
        heads = lambda x, dim: x.reshape(*u.shape[:2], -1, dim)  # noqa: E731  (local heads under tensor parallelism)
        acc, upcast = gate_dtype(u.dtype), upcasts_low_precision_matmul(c.low_precision_matmul)
        # q, k, v leave the products in the compute dtype, which is what remat saves (in bf16 half the bytes of
        # float32), and enter the float32 cell converted: +1.5 to +2% bf16 train tokens/s on configs A and B over
        # float32 accumulators, now that `remat.saved` stacks bf16 in place (before it, float32 was 4% faster)
        q, k, v = (dense(layer, u, upcast=upcast).astype(acc) for layer in (self.q, self.k, self.v))
        q, k, v = heads(q, c.qk_head_dim), heads(k, c.qk_head_dim), heads(v, c.v_head_dim)
        gate_in = u.astype(acc)
        i_pre = soft_cap(dense(self.igate_preact, gate_in), c.gate_soft_cap)
        f_pre = soft_cap(dense(self.fgate_preact, gate_in), c.gate_soft_cap)

        cell = functools.partial(run_cell, kernel or c.kernel, chunk_size=c.chunk_size, eps=c.cell_eps)
        h, state = cell(q, k, v, i_pre, f_pre, state, reset)
        stats = {
            "igate_preact_mean": jnp.mean(i_pre, axis=(1, 2)),
            "fgate_mean": jnp.mean(jax.nn.sigmoid(f_pre), axis=(1, 2)),
            "cell_out_abs_mean": jnp.mean(jnp.abs(h), axis=(1, 2, 3)).astype(acc),
        }
        if tp_axis is not None:
            stats = jax.lax.pmean(stats, tp_axis)
        h = self.multihead_norm(h.astype(u.dtype)).reshape(*u.shape[:2], -1)
        # the gate from the bf16 (saved) pre-activation, applied in float32 and rounded once
        out_gate = jax.nn.sigmoid(dense(self.ogate_preact, u, upcast=upcast).astype(acc))
        gated = (out_gate * h.astype(acc)).astype(u.dtype)
        return row_parallel(self.out_proj, gated, tp_axis, upcast=upcast), state, stats


def run_cell(
    kernel: str,
    q: Float[Array, "batch t heads dk"],
    k: Float[Array, "batch t heads dk"],
    v: Float[Array, "batch t heads dv"],
    i_preact: Float[Array, "batch t heads"],
    f_preact: Float[Array, "batch t heads"],
    state: MLSTMState | None,
    reset: Bool[Array, "batch t"] | None,
    *,
    chunk_size: int,
    eps: float,
) -> tuple[Float[Array, "batch t heads dv"], MLSTMState]:
    """Runs the named kernel on every head of every row (state (batch, heads, …)). A single token always takes
    the recurrent step."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown mLSTM kernel {kernel!r}; choose one of {sorted(KERNELS)}")
    if q.shape[1] == 1:
        kernel = "recurrent"
    fn = KERNELS[kernel]
    fn = (
        functools.partial(fn, chunk_size=chunk_size, eps=eps)
        if kernel == "chunkwise"
        else functools.partial(fn, eps=eps)
    )
    optional = lambda x: None if x is None else 0  # noqa: E731  (vmap axis of an optional argument)

    def per_row(q, k, v, i, f, s, r):
        per_head = lambda q, k, v, i, f, s: fn(q, k, v, i, f, s, r)  # noqa: E731
        return jax.vmap(per_head, in_axes=(1, 1, 1, 1, 1, optional(s)), out_axes=(1, 0))(q, k, v, i, f, s)

    return jax.vmap(per_row, in_axes=(0, 0, 0, 0, 0, optional(state), optional(reset)))(
        q, k, v, i_preact, f_preact, state, reset
    )
