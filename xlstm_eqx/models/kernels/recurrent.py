"""Recurrent mLSTM: the definition of the cell, one step at a time (decoding) or scanned."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from .common import MLSTMState, accumulation_dtype, log_forget, read_out, vary_like, zero_state


def recurrent_step(
    q: Float[Array, " dk"],
    k: Float[Array, " dk"],
    v: Float[Array, " dv"],
    i_preact: Float[Array, ""],
    f_preact: Float[Array, ""],
    state: MLSTMState,
    reset: Bool[Array, ""] | None = None,
    *,
    eps: float = 1e-6,
) -> tuple[Float[Array, " dv"], MLSTMState]:
    """One token: update (C, n, m) and read h. ``reset`` wipes the memory before writing."""
    acc = accumulation_dtype(i_preact)
    q, k, v = (x.astype(acc) for x in (q, k, v))
    C, n, m = state
    carried = log_forget(f_preact) + m  # log-scale of the old memory after forgetting
    if reset is not None:
        # -inf, not a masked exp: exp of the unselected branch could overflow and poison gradients.
        carried = jnp.where(reset, jnp.array(-jnp.inf, acc), carried)
    m_new = jnp.maximum(carried, i_preact)
    f_weight = jnp.exp(carried - m_new)
    i_weight = jnp.exp(i_preact - m_new)
    C = f_weight * C + i_weight * jnp.outer(k, v)
    n = f_weight * n + i_weight * k
    q_scaled = q * (q.shape[-1] ** -0.5)
    h = read_out(q_scaled @ C, q_scaled @ n, m_new, eps)
    return h.astype(v.dtype), MLSTMState(C, n, m_new)


def recurrent(
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
    """The recurrence scanned over a sequence; returns all outputs and the final state."""
    acc = accumulation_dtype(i_preact)
    state = vary_like(initial_state or zero_state(q.shape[-1], v.shape[-1], acc), q, k, v, i_preact, f_preact)
    resets = reset if reset is not None else jnp.zeros(q.shape[:1], bool)

    def step(carry: MLSTMState, xs):
        q_t, k_t, v_t, i_t, f_t, r_t = xs
        h_t, carry = recurrent_step(q_t, k_t, v_t, i_t, f_t, carry, r_t if reset is not None else None, eps=eps)
        return carry, h_t

    final, h = lax.scan(step, state, (q, k, v, i_preact, f_preact, resets))
    return h.astype(v.dtype), final
