"""Parallel (quadratic, stabilised) mLSTM: all T×T interactions at once. Best for short sequences."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from .common import (
    MLSTMState,
    accumulation_dtype,
    log_forget,
    pairwise_log_decay,
    read_out,
    resets_so_far,
    row_max,
    zero_state,
)


def parallel(
    q: Float[Array, "t dk"],
    k: Float[Array, "t dk"],
    v: Float[Array, "t dv"],
    i_preact: Float[Array, " t"],
    f_preact: Float[Array, " t"],
    initial_state: MLSTMState | None = None,
    reset: Bool[Array, " t"] | None = None,
    *,
    eps: float = 1e-6,
) -> tuple[Float[Array, "t dv"], MLSTMState]:
    """h_t = Σ_s (q̂_t·k_s) D_ts v_s / normaliser, with D_ts = exp(Σ_{s<j≤t} lf_j + ĩ_s - m_t).

    Memory is O(T²); returns the same final state as the recurrent form.
    """
    acc = accumulation_dtype(i_preact)
    t_len, dk = q.shape
    q, k, v = (x.astype(acc) for x in (q, k, v))
    state = initial_state or zero_state(dk, v.shape[-1], acc)
    lf = log_forget(f_preact)
    neg_inf = jnp.array(-jnp.inf, acc)

    # Which writes (column s) reach which reads (row t), and whether the initial state reaches row t.
    causal = jnp.tril(jnp.ones((t_len, t_len), dtype=bool))
    if reset is None:
        visible, carry_visible = causal, None
    else:
        count = resets_so_far(reset)
        visible = causal & (count[:, None] == count[None, :])
        carry_visible = count == 0

    log_d = jnp.where(visible, pairwise_log_decay(lf) + i_preact[None, :], neg_inf)
    carry_log_scale = jnp.cumsum(lf) + state.m  # log-scale of the initial state seen from row t
    if carry_visible is not None:
        carry_log_scale = jnp.where(carry_visible, carry_log_scale, neg_inf)
    m = jnp.maximum(carry_log_scale, row_max(log_d))

    q_scaled = q * (dk**-0.5)
    scores = (q_scaled @ k.T) * jnp.exp(log_d - m[:, None])
    carry_weight = jnp.exp(carry_log_scale - m)
    num = scores @ v + carry_weight[:, None] * (q_scaled @ state.C)
    den = jnp.sum(scores, axis=-1) + carry_weight * (q_scaled @ state.n)
    h = read_out(num, den, m, eps)

    # Final state = the last row's weights applied as a rank-T update of the carried state.
    write_weight = jnp.exp(log_d[-1] - m[-1])
    final = MLSTMState(
        C=carry_weight[-1] * state.C + (k * write_weight[:, None]).T @ v,
        n=carry_weight[-1] * state.n + write_weight @ k,
        m=m[-1],
    )
    return h.astype(v.dtype), final
