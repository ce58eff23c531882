"""The chunkwise form's read-out inside chunks, with a hand-written backward.

Given each chunk's starting state, every output of the chunk is the stabilised read-out of the carried state
plus the chunk's own causal (L, L) interactions. Autodiff of that read-out stores or recomputes several (L, L)
intermediates, differentiates the stabiliser through a row max (an equality count per row) and the pairwise
decays through a reduce-window cumulative sum; its backward cost about four times the forward here. The rule
below recomputes the scores once and uses three facts:

* h depends on the stabiliser m only through eps: with unstabilised N, D (num = e^{-m} N, den = e^{-m} D),
  h = N / (max(|D|, 1) + eps·e^m), so ∂h/∂m = -h·eps / (max(|den|, e^{-m}) + eps). The other gradients are
  taken with m held fixed, and m's own gradient is that closed form, sent to the entries that attain the
  max and shared among ties as ``jnp.max`` and ``jnp.maximum`` share them.
* The pairwise log decays are differences b_τ - b_σ of within-chunk cumulative sums b: the forward sums them
  directly (no cancellation), but their gradient, a linear map, is just row sums minus column sums followed
  by a reverse cumulative sum: O(L) per row instead of a second (L, L) cumulative sum.
* Masked entries have zero scores, so their gradients vanish without extra selects.

Shapes (one head of one sequence, C chunks of length L): q, k (C, L, DK); v (C, L, DV); gate pre-activation
i and log forget gate lf (C, L); starting states C0 (C, DK, DV), n0 (C, DK), m0 (C,); ``count`` (C, L) int32
document index within each chunk (None: no resets).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .common import contract_positions, pairwise_log_decay, read_out


def chunk_read_out(
    q: Float[Array, "c l dk"],
    k: Float[Array, "c l dk"],
    v: Float[Array, "c l dv"],
    i_preact: Float[Array, "c l"],
    lf: Float[Array, "c l"],
    C0: Float[Array, "c dk dv"],
    n0: Float[Array, "c dk"],
    m0: Float[Array, " c"],
    count: Int[Array, "c l"] | None,
    eps: float,
) -> Float[Array, "c l dv"]:
    """h for every position of every chunk (same value as autodiff-able code; the VJP is hand-written)."""
    return _read_out(eps, q, k, v, i_preact, lf, C0, n0, m0, count)


def _log_weights(i_preact, lf, m0, count):
    """Masked pairwise log weights (C, L, L), carried-state log scales (C, L), the stabiliser m, row max."""
    length = lf.shape[-1]
    neg_inf = jnp.array(-jnp.inf, lf.dtype)
    visible = jnp.tril(jnp.ones((length, length), dtype=bool))
    if count is not None:
        visible = visible & (count[:, :, None] == count[:, None, :])
    log_d = jnp.where(visible, pairwise_log_decay(lf) + i_preact[:, None, :], neg_inf)
    carry_log = jnp.cumsum(lf, axis=-1) + m0[:, None]
    if count is not None:
        carry_log = jnp.where(count == 0, carry_log, neg_inf)
    row_max = jnp.max(log_d, axis=-1)
    return log_d, carry_log, jnp.maximum(carry_log, row_max), row_max


def _scores(q, k, i_preact, lf, m0, count):
    """Stabilised scores S (C, L, L), carried-state weights (C, L), m and the pieces the backward needs."""
    log_d, carry_log, m, row_max = _log_weights(i_preact, lf, m0, count)
    q_scaled = q * (q.shape[-1] ** -0.5)
    raw = jnp.einsum("cld,csd->cls", q_scaled, k)
    decay = jnp.exp(log_d - m[..., None])
    return q_scaled, raw, decay, raw * decay, jnp.exp(carry_log - m), m, log_d, carry_log, row_max


def _forward(q, k, v, i_preact, lf, C0, n0, m0, count, eps):
    q_scaled, _, _, scores, carry_weight, m, *_ = _scores(q, k, i_preact, lf, m0, count)
    num = jnp.einsum("cls,cse->cle", scores, v) + carry_weight[..., None] * jnp.einsum("cld,cde->cle", q_scaled, C0)
    den = jnp.sum(scores, axis=-1) + carry_weight * jnp.einsum("cld,cd->cl", q_scaled, n0)
    return read_out(num, den, m, eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _read_out(eps, q, k, v, i_preact, lf, C0, n0, m0, count):
    return _forward(q, k, v, i_preact, lf, C0, n0, m0, count, eps)


def _read_out_fwd(eps, q, k, v, i_preact, lf, C0, n0, m0, count):
    h = _forward(q, k, v, i_preact, lf, C0, n0, m0, count, eps)
    return h, (q, k, v, i_preact, lf, C0, n0, m0, count, h)


def _balanced_weight(a, b):
    """d max(a, b) / da as ``jnp.maximum`` defines it: 1 where a > b, 1/2 at a tie, else 0."""
    return jnp.where(a > b, 1.0, jnp.where(a == b, 0.5, 0.0)).astype(a.dtype)


def _read_out_bwd(eps, residuals, dh):
    q, k, v, i_preact, lf, C0, n0, m0, count, h = residuals
    q_scaled, raw, decay, scores, carry_weight, m, log_d, carry_log, row_max = _scores(q, k, i_preact, lf, m0, count)
    carried_C = jnp.einsum("cld,cde->cle", q_scaled, C0)
    carried_n = jnp.einsum("cld,cd->cl", q_scaled, n0)
    den = jnp.sum(scores, axis=-1) + carry_weight * carried_n
    floor = jnp.exp(-m)
    denom = jnp.maximum(jnp.abs(den), floor) + eps

    d_num = dh / denom[..., None]
    d_denom = -jnp.sum(d_num * h, axis=-1)
    d_den = d_denom * _balanced_weight(jnp.abs(den), floor) * jnp.sign(den)
    d_m = eps * d_denom  # the whole dependence of h on m (see the module docstring)

    # Gradients with m held fixed.
    d_scores = jnp.einsum("cle,cse->cls", d_num, v) + d_den[..., None]
    dv = contract_positions(scores, d_num)
    d_raw = d_scores * decay
    carried_d_q = jnp.einsum("cle,cde->cld", d_num, C0) + d_den[..., None] * n0[:, None, :]
    dq_scaled = jnp.einsum("cls,csd->cld", d_raw, k) + carry_weight[..., None] * carried_d_q
    dk = contract_positions(d_raw, q_scaled)
    weighted_q = carry_weight[..., None] * q_scaled
    dC0 = contract_positions(weighted_q, d_num)
    dn0 = jnp.einsum("cld,cl->cd", weighted_q, d_den)
    d_carry_weight = jnp.sum(d_num * carried_C, axis=-1) + d_den * carried_n
    d_carry_log = d_carry_weight * carry_weight
    d_log_d = d_scores * scores

    # m = max(carry_log, max_σ log_d): its gradient goes to whichever attains it.
    to_carry = _balanced_weight(carry_log, row_max)
    d_carry_log = d_carry_log + d_m * to_carry
    at_max = (log_d == row_max[..., None]).astype(log_d.dtype)
    # Ties share the gradient as jnp.max's rule does. The count is at least 1 by construction (row_max is
    # this log_d's own max); the floor only guards against a compiler recomputing the two differently.
    share = d_m * (1.0 - to_carry) / jnp.maximum(jnp.sum(at_max, axis=-1), 1.0)
    d_log_d = d_log_d + at_max * share[..., None]

    # log_d[τ, σ] = b_τ - b_σ + i_σ with b the inclusive cumulative sum of lf; carry_log = b + m0.
    column_sums = jnp.sum(d_log_d, axis=-2)
    d_b = jnp.sum(d_log_d, axis=-1) - column_sums + d_carry_log
    d_lf = jnp.flip(jnp.cumsum(jnp.flip(d_b, -1), axis=-1), -1)
    dm0 = jnp.sum(d_carry_log, axis=-1)
    dq = dq_scaled * (q.shape[-1] ** -0.5)
    return dq, dk, dv, column_sums, d_lf, dC0, dn0, dm0, None


_read_out.defvjp(_read_out_fwd, _read_out_bwd)
