"""Shared pieces of the mLSTM cell kernels: the state type and the stabilised read-out.

Every kernel works on ONE head of ONE sequence (vmap over heads and batch outside):
``q, k: (T, DK)``, ``v: (T, DV)``, gate pre-activations ``i_preact, f_preact: (T,)``,
state ``C: (DK, DV)`` (key-major, read as qᵀC), ``n: (DK,)``, ``m: ()``.

The stabiliser ``m`` follows the recurrent definition in all three forms, including the
"phantom" initial state (m₀ = 0 when no state is given), so parallel, chunkwise and recurrent
results agree to rounding, not only up to where ``eps`` enters.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float


class MLSTMState(NamedTuple):
    """Recurrent memory of one head: matrix memory C, normaliser n, stabiliser (log-scale) m."""

    C: Float[Array, "*batch dk dv"]
    n: Float[Array, "*batch dk"]
    m: Float[Array, "*batch"]


def zero_state(dk: int, dv: int, dtype=jnp.float32) -> MLSTMState:
    """The empty memory (m = 0, as in the recurrent definition)."""
    return MLSTMState(jnp.zeros((dk, dv), dtype), jnp.zeros((dk,), dtype), jnp.zeros((), dtype))


def _varying_axes(x: Array) -> frozenset[str]:
    """Mesh axes over which ``x`` varies inside ``shard_map`` (empty outside it)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax ≥ 0.10; older releases call it ``vma``
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def varying_like(x: Array, *refs: Array) -> Array:
    """``x`` marked as varying over every mesh axis any of ``refs`` varies over (no-op outside shard_map).

    Autodiff turns this cast into the psum that reduces ``x``'s cotangent over those axes, so custom VJPs
    and scan carries that mix ``x`` with sharded values get consistent types.
    """
    missing = tuple(sorted(frozenset().union(*(_varying_axes(r) for r in refs)) - _varying_axes(x)))
    return lax.pcast(x, missing, to="varying") if missing else x


def vary_like(state: MLSTMState, *inputs: Array) -> MLSTMState:
    """``state`` marked as varying over every mesh axis the inputs vary over.

    A scan's carry must keep its type; inside ``shard_map`` a zero initial state is invariant while its
    updates (computed from sharded inputs) vary, so the carry is cast up front. No-op outside shard_map.
    """
    return MLSTMState(*(varying_like(leaf, *inputs) for leaf in state))


def accumulation_dtype(i_preact: Array) -> jnp.dtype:
    """Kernels compute in the gate dtype (float32, or float64 for exact-math checks)."""
    return i_preact.dtype


def read_out(
    num: Float[Array, "*t dv"], den: Float[Array, "*t"], m: Float[Array, "*t"], eps: float
) -> Float[Array, "*t dv"]:
    """h = num / (max(|den|, exp(-m)) + eps): the stabilised form of num / max(|den|, 1)."""
    return num / (jnp.maximum(jnp.abs(den), jnp.exp(-m)) + eps)[..., None]


@jax.custom_jvp
def row_max(x: Float[Array, "*rows n"]) -> Float[Array, "*rows"]:
    """``jnp.max(x, axis=-1)`` for stabilisers, with a JVP that cannot divide by zero.

    ``jnp.max``'s rule sends the tangent to the entries equal to the max and divides by their count. Under
    ``jit`` XLA may compute ``x`` once for the max and again, fused differently, for that equality; when the two
    differ in the last bit no entry matches and the gradient is 0/0 = NaN (seen with the parallel kernel: NaN
    gate gradients for a one-row batch, finite op by op). Here the count is at least 1: such a row's share is
    dropped instead, which moves only the stabiliser's own (eps-sized, see ``read_out``) gradient.
    """
    return jnp.max(x, axis=-1)


@row_max.defjvp
def _row_max_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    top = jnp.max(x, axis=-1)
    at_top = (x == top[..., None]).astype(x.dtype)
    return top, jnp.sum(at_top * dx, axis=-1) / jnp.maximum(jnp.sum(at_top, axis=-1), 1.0)


def log_forget(f_preact: Array) -> Array:
    """Log of the sigmoid forget gate; always ≤ 0, so cumulative sums of it are monotone."""
    return jax.nn.log_sigmoid(f_preact)


def resets_so_far(reset: Array, axis: int = -1) -> Array:
    """Inclusive count of document starts up to each position (int32)."""
    return jnp.cumsum(reset.astype(jnp.int32), axis=axis)


def pairwise_log_decay(lf: Float[Array, "*c t"]) -> Float[Array, "*c t t"]:
    """out[τ, σ] = Σ_{σ<j≤τ} lf_j for τ ≥ σ (0 above the diagonal; callers mask it).

    Summed directly rather than as a difference of cumulative sums, which cancels catastrophically in float32
    when gates are saturated (lf ≈ -30 per step). Up to ``MAX_PRODUCT_PAIRWISE`` steps (a chunk) the sums are
    one product with a constant 0/1 selection tensor (t², t): same-sign terms, so as exact as the running
    sum, but a GEMM instead of XLA:CPU's reduce-window tree, 7-10% faster for the whole chunkwise cell
    forward and backward. Longer inputs take a masked cumulative sum (the tensor grows as t³).
    """
    t = lf.shape[-1]
    if t <= MAX_PRODUCT_PAIRWISE:
        j = np.arange(t)
        selects = (j[None, :, None] < j[None, None, :]) & (j[None, None, :] <= j[:, None, None])  # [τ, σ, j]
        selection = jnp.asarray(selects.reshape(t * t, t), lf.dtype)
        sums = jnp.einsum("pj,...j->...p", selection, lf, precision=lax.Precision.HIGHEST)
        return sums.reshape(*lf.shape[:-1], t, t)
    strictly_lower = jnp.tril(jnp.ones((t, t), dtype=bool), k=-1)
    terms = jnp.where(strictly_lower, lf[..., :, None], jnp.zeros((), lf.dtype))
    return jnp.cumsum(terms, axis=-2)


MAX_PRODUCT_PAIRWISE = 64  # the selection tensor holds t³ entries: 1 MiB of float32 at t = 64


def row_major_transpose(a: Float[Array, "*lead m n"]) -> Float[Array, "*lead n m"]:
    """``a`` with its last two axes swapped, materialised as an array of its own (row-major) layout.

    XLA:CPU hands a product to its fast GEMM (YNNPACK) only when the left operand is row-major and contracted
    on its last axis. A bare transpose does not give that: XLA treats it as a column-major view, then folds it
    into the product's dimension numbers. The reshape gives the transpose a layout of its own, and the
    optimisation barrier keeps XLA from folding it away; the price is one copy of ``a``.
    """
    *lead, m, n = a.shape
    return lax.optimization_barrier(jnp.swapaxes(a, -1, -2).reshape(*lead, n, 1, m))[..., 0, :]


@jax.custom_vjp
def contract_positions(a: Float[Array, "*c l i"], b: Float[Array, "*c l j"]) -> Float[Array, "*c i j"]:
    """aᵀb over the position axis l (per leading index), with aᵀ materialised row-major first.

    XLA:CPU hands a product to its fast GEMM (YNNPACK) only when the left operand is contracted on its last
    axis; products over the position axis, such as k̂ᵀv for a chunk's memory, otherwise run on Eigen's batched
    dot, several times slower at these sizes (see :func:`row_major_transpose`). The VJP is written out so that
    its two products (b gᵀ and a g) contract their left operands' last axes as well.
    """
    return jnp.einsum("...il,...lj->...ij", row_major_transpose(a), b)


def _contract_positions_fwd(a, b):
    return contract_positions(a, b), (a, b)


def _contract_positions_bwd(residuals, g):
    a, b = residuals
    return jnp.einsum("...lj,...ij->...li", b, g), jnp.einsum("...li,...ij->...lj", a, g)


contract_positions.defvjp(_contract_positions_fwd, _contract_positions_bwd)
