"""Chunkwise mLSTM: parallel inside chunks of length L, recurrent across chunks. O(T·L) memory.

The sequence length need not divide the chunk size: full chunks go through one pass and the
remainder through a second pass of the same function with a shorter chunk.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from .common import (
    MLSTMState,
    accumulation_dtype,
    log_forget,
    pairwise_log_decay,
    read_out,
    resets_so_far,
    vary_like,
    zero_state,
)


def chunkwise(
    q: Float[Array, "t dk"],
    k: Float[Array, "t dk"],
    v: Float[Array, "t dv"],
    i_preact: Float[Array, " t"],
    f_preact: Float[Array, " t"],
    initial_state: MLSTMState | None = None,
    reset: Bool[Array, " t"] | None = None,
    *,
    chunk_size: int = 64,
    eps: float = 1e-6,
) -> tuple[Float[Array, "t dv"], MLSTMState]:
    """Same outputs and final state as :func:`recurrent`, computed chunk by chunk."""
    acc = accumulation_dtype(i_preact)
    t_len, dk = q.shape
    state = vary_like(initial_state or zero_state(dk, v.shape[-1], acc), q, k, v, i_preact, f_preact)
    length = min(chunk_size, t_len)
    n_full = t_len // length
    split = n_full * length
    inputs = (q, k, v, i_preact, f_preact, reset)

    def chunked(lo: int, hi: int, n_chunks: int):
        return tuple(None if x is None else x[lo:hi].reshape(n_chunks, -1, *x.shape[1:]) for x in inputs)

    h, state = _run_chunks(*chunked(0, split, n_full), state, eps)
    if split < t_len:
        h_tail, state = _run_chunks(*chunked(split, t_len, 1), state, eps)
        h = jnp.concatenate([h, h_tail])
    return h.astype(v.dtype), state


def _run_chunks(q, k, v, i_preact, f_preact, reset, state: MLSTMState, eps: float):
    """q, k: (C, L, DK), v: (C, L, DV), gates/reset: (C, L). Returns h (C·L, DV) and the final state."""
    acc = accumulation_dtype(i_preact)
    q, k, v = (x.astype(acc) for x in (q, k, v))
    n_chunks, length, dk = q.shape
    lf = log_forget(f_preact)
    neg_inf = jnp.array(-jnp.inf, acc)

    # Log decay from chunk start through τ, and from after τ to the chunk end (direct sums; lf ≤ 0).
    decay_from_start = jnp.cumsum(lf, axis=-1)
    decay_to_end = jnp.concatenate(
        [jnp.flip(jnp.cumsum(jnp.flip(lf[:, 1:], -1), -1), -1), jnp.zeros((n_chunks, 1), acc)], axis=-1
    )
    chunk_decay = decay_from_start[:, -1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    if reset is None:
        visible, carry_in, reaches_end, carry_through = causal, None, None, None
    else:
        count = resets_so_far(reset)  # within each chunk
        visible = causal & (count[:, :, None] == count[:, None, :])
        carry_in = count == 0  # the incoming state is still visible at τ
        reaches_end = count == count[:, -1:]  # the write at τ survives to the chunk end
        carry_through = count[:, -1] == 0

    # 1) Each chunk's own contribution to the memory at its end, all chunks at once.
    write_log = decay_to_end + i_preact
    if reaches_end is not None:
        write_log = jnp.where(reaches_end, write_log, neg_inf)
        chunk_decay = jnp.where(carry_through, chunk_decay, neg_inf)
    write_max = jnp.max(write_log, axis=-1)
    write_weight = jnp.exp(write_log - write_max[:, None])
    delta_C = jnp.einsum("cld,cl,cle->cde", k, write_weight, v)
    delta_n = jnp.einsum("cld,cl->cd", k, write_weight)

    # 2) Recurrence over chunk states: only scalings and additions of (DK, DV) matrices.
    def advance(carry: MLSTMState, xs):
        decay, w_max, d_C, d_n = xs
        m_new = jnp.maximum(decay + carry.m, w_max)
        old, new = jnp.exp(decay + carry.m - m_new), jnp.exp(w_max - m_new)
        return MLSTMState(old * carry.C + new * d_C, old * carry.n + new * d_n, m_new), carry

    final, starts = lax.scan(advance, state, (chunk_decay, write_max, delta_C, delta_n))

    # 3) Outputs inside each chunk from its starting state plus the intra-chunk interactions.
    log_d = jnp.where(visible, pairwise_log_decay(lf) + i_preact[:, None, :], neg_inf)
    carry_log = decay_from_start + starts.m[:, None]
    if carry_in is not None:
        carry_log = jnp.where(carry_in, carry_log, neg_inf)
    m = jnp.maximum(carry_log, jnp.max(log_d, axis=-1))
    q_scaled = q * (dk**-0.5)
    scores = jnp.einsum("cld,csd->cls", q_scaled, k) * jnp.exp(log_d - m[..., None])
    carry_weight = jnp.exp(carry_log - m)
    num = jnp.einsum("cls,cse->cle", scores, v) + carry_weight[..., None] * jnp.einsum(
        "cld,cde->cle", q_scaled, starts.C
    )
    den = jnp.sum(scores, axis=-1) + carry_weight * jnp.einsum("cld,cd->cl", q_scaled, starts.n)
    h = read_out(num, den, m, eps)
    return h.reshape(n_chunks * length, -1), final
