"""Small building blocks: dtype-aware dense application, soft caps, norms, SwiGLU, initialisers."""

from __future__ import annotations

import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

from .kernels.common import row_major_transpose, varying_like
from .matmul_policy import LowPrecisionMatmul, upcasts_low_precision_matmul
from .remat import saved


def dense(
    layer: eqx.nn.Linear,
    x: Float[Array, "*batch d_in"],
    out_dtype: jnp.dtype | None = None,
    *,
    upcast: bool = False,
) -> Float[Array, "*batch d_out"]:
    """Applies ``layer`` (weight in torch's (out, in) layout) over any leading axes.

    The matmul runs in ``x``'s dtype (the compute dtype); ``out_dtype`` sets the accumulation and
    result dtype (e.g. float32 logits from bfloat16 activations). ``upcast``: see :func:`project`.
    """
    return project(x, layer.weight, layer.bias, out_dtype, upcast=upcast)


def project(
    x: Float[Array, "*batch d_in"],
    weight: Float[Array, "d_out d_in"],
    bias: Float[Array, " d_out"] | None = None,
    out_dtype: jnp.dtype | None = None,
    *,
    upcast: bool = False,
) -> Float[Array, "*batch d_out"]:
    """x @ weightᵀ (+ bias) computed in ``x``'s dtype, accumulated and returned in ``out_dtype``.

    Leading axes are flattened into one row axis first: the weight gradient is then a plain 2-D product
    (rows contracted), which XLA:CPU runs without the slow 3-D transposes a (batch, t) pair of axes costs.
    Below float32 (bfloat16 compute), the forward and both backward products take low-precision inputs and
    accumulate in float32 (see :func:`mixed_precision_matmul`); ``upcast`` runs those products as float32 GEMMs
    on the (exactly) upcast operands, the faster kernel on CPUs without bfloat16 dot instructions
    (:mod:`.matmul_policy` decides).
    """
    out_dtype = out_dtype or x.dtype
    rows = x.reshape(-1, x.shape[-1])
    if jnp.dtype(x.dtype).itemsize < 4:
        # Both operands vary over every mesh axis either does (e.g. a weight split over ``model``): the casts'
        # transposes then psum each cotangent back to its operand's type, as autodiff does for a plain einsum.
        weight = varying_like(weight, rows)
        y = mixed_precision_matmul(varying_like(rows, weight), weight, upcast).astype(out_dtype)
        y = saved(y)  # after the cast: a saved bf16 output is half the bytes
    else:
        y = jnp.einsum("ri,oi->ro", rows, weight.astype(x.dtype), preferred_element_type=out_dtype)
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias.astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mixed_precision_matmul(
    x: Float[Array, "r d_in"], weight: Float[Array, "d_out d_in"], upcast: bool = False
) -> Float[Array, "r d_out"]:
    """x @ weightᵀ in float32 from ``x``'s low-precision dtype (the weight is cast to it).

    Its gradient keeps the same recipe: the incoming float32 cotangent is cast to ``x``'s dtype and both
    products (dx, dW) take low-precision inputs with float32 accumulation; dW is returned in the weight's own
    dtype. Plain autodiff would upcast both backward products to float32, and XLA:CPU runs bfloat16→float32
    products about twice as fast as float32 ones on CPUs with bfloat16 dot instructions (while
    bfloat16→bfloat16 ones are slower than float32).

    ``upcast``: the same three products on operands converted to float32 first, run by the float32 GEMM. A
    product of two bfloat16 values is exact in float32, so only the summation order differs; on a CPU without
    bfloat16 dot instructions this is the faster kernel (XLA:CPU emulates the low-precision one).
    """
    if upcast:
        return jnp.einsum("ri,oi->ro", x.astype(jnp.float32), weight.astype(x.dtype).astype(jnp.float32))
    return jnp.einsum("ri,oi->ro", x, weight.astype(x.dtype), preferred_element_type=jnp.float32)


def _mixed_precision_matmul_fwd(x, weight, upcast):
    return mixed_precision_matmul(x, weight, upcast), (x, weight)


def _mixed_precision_matmul_bwd(upcast, residuals, g):
    x, weight = residuals
    g = g.astype(x.dtype)  # the cotangent rounded as the native kernel's input is, on either path
    if upcast:
        g32, x32 = g.astype(jnp.float32), x.astype(jnp.float32)
        dx = g32 @ weight.astype(x.dtype).astype(jnp.float32)
        dw = jnp.einsum("ro,ri->oi", g32, x32)  # the float32 GEMM takes either layout at full speed
        return dx.astype(x.dtype), dw.astype(weight.dtype)
    dx = jnp.einsum("ro,oi->ri", g, weight.astype(x.dtype), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), _rows_contracted(g, x).astype(weight.dtype)


def _rows_contracted(g: Float[Array, "r d_out"], x: Float[Array, "r d_in"]) -> Float[Array, "d_out d_in"]:
    """gᵀ x (the weight gradient) in float32, with the smaller operand's transpose materialised row-major first.

    XLA:CPU's fast low-precision GEMM (YNNPACK) only takes a left operand that is row-major with its
    contracted axis last. The plain ``einsum("ro,ri->oi")`` contracts the left operand's first axis, so XLA
    upcasts both operands and runs the product in float32 at half the speed (config B's lm head: 128 → 72
    ms); a bare transpose does not help (see :func:`row_major_transpose`). The copy costs one pass over the
    operand, so the smaller one is transposed: gᵀ·x when d_out < d_in, else (xᵀ·g)ᵀ, whose (d_in, d_out)
    float32 result is transposed back behind a second barrier (without it XLA folds that transpose into the
    product, which it then cannot run in bfloat16 at all). For config B's lm head (d_out 8192 = 16 × d_in)
    that saves a 32 MB copy per step: train step +2.2% in bf16 (``variants.py``); transposing x always (also
    for d_out < d_in) cost 7%.
    """
    if g.shape[1] >= x.shape[1]:
        dw_t = jnp.einsum("ir,ro->io", row_major_transpose(x), g, preferred_element_type=jnp.float32)
        return lax.optimization_barrier(dw_t).T
    return jnp.einsum("or,ri->oi", row_major_transpose(g), x, preferred_element_type=jnp.float32)


mixed_precision_matmul.defvjp(_mixed_precision_matmul_fwd, _mixed_precision_matmul_bwd)


def row_parallel(
    layer: eqx.nn.Linear, x: Float[Array, "*batch d_in"], tp_axis: str | None, *, upcast: bool = False
) -> Float[Array, "*batch d_out"]:
    """``dense`` for a layer whose input features are split over mesh axis ``tp_axis`` (tensor parallel).

    Each device holds a slice of the weight's input columns and computes a partial product; the
    partials are summed over ``tp_axis`` and the (replicated) bias is added once, after the sum.
    """
    y = project(x, layer.weight, upcast=upcast)
    if tp_axis is not None:
        y = jax.lax.psum(y, tp_axis)
    return y if layer.bias is None else y + layer.bias.astype(y.dtype)


def gate_dtype(compute_dtype) -> jnp.dtype:
    """Gates, cell states and logits: float32, or float64 when the model computes in float64."""
    # Not jnp.promote_types: it raises for (bfloat16 | float64, float32) under strict dtype promotion.
    return jnp.dtype(jnp.float64 if jnp.dtype(compute_dtype) == jnp.float64 else jnp.float32)


def soft_cap(x: Float[Array, "*shape"], cap: float | None) -> Float[Array, "*shape"]:
    """cap · tanh(x / cap); identity when ``cap`` is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def normal_(layer: eqx.nn.Linear, std: float, key: PRNGKeyArray) -> eqx.nn.Linear:
    """Returns ``layer`` with weight ~ N(0, std²) and a zero bias."""
    weight = std * jax.random.normal(key, layer.weight.shape, layer.weight.dtype)
    layer = eqx.tree_at(lambda m: m.weight, layer, weight)
    if layer.bias is not None:
        layer = eqx.tree_at(lambda m: m.bias, layer, jnp.zeros_like(layer.bias))
    return layer


def small_init_std(dim: int) -> float:
    """Std of the 'small init' (Nguyen & Salazar): sqrt(2 / (5·dim))."""
    return math.sqrt(2.0 / (5.0 * dim))


def wang_init_std(dim: int, num_blocks: int) -> float:
    """Std of Wang's init for output projections: 2 / (num_blocks·sqrt(dim))."""
    return 2.0 / (num_blocks * math.sqrt(dim))


def rms_norm(dim: int, eps: float, dtype) -> eqx.nn.RMSNorm:
    """Scale-only RMSNorm over the last axis (reduction in float32, see eqx.nn.RMSNorm)."""
    return eqx.nn.RMSNorm(dim, eps=eps, use_bias=False, dtype=dtype)


def apply_norm(norm: eqx.Module, x: Float[Array, "*batch d"]) -> Float[Array, "*batch d"]:
    """Applies a per-vector Equinox norm over all leading axes."""
    flat = x.reshape(-1, x.shape[-1])
    return jax.vmap(norm)(flat).reshape(x.shape)


class MultiHeadNorm(eqx.Module):
    """Per-head LayerNorm or RMSNorm over each head's features; weight per (head, feature)."""

    norms: eqx.nn.LayerNorm | eqx.nn.RMSNorm  # stacked: leading axis = heads

    def __init__(self, num_heads: int, head_dim: int, kind: str, eps: float, dtype):
        def make(_):
            if kind == "layernorm":
                return eqx.nn.LayerNorm(head_dim, eps=eps, use_bias=False, dtype=dtype)
            return rms_norm(head_dim, eps, dtype)

        self.norms = eqx.filter_vmap(make)(jnp.arange(num_heads))

    def __call__(self, h: Float[Array, "*batch heads dh"]) -> Float[Array, "*batch heads dh"]:
        per_head = eqx.filter_vmap(lambda norm, x: jax.vmap(norm)(x), in_axes=(eqx.if_array(0), 1), out_axes=1)
        return per_head(self.norms, h.reshape(-1, *h.shape[-2:])).reshape(h.shape)


class FeedForward(eqx.Module):
    """SwiGLU: proj_down(silu(proj_up_gate(u)) ⊙ proj_up(u)); no biases unless ``use_bias``."""

    proj_up_gate: eqx.nn.Linear
    proj_up: eqx.nn.Linear
    proj_down: eqx.nn.Linear
    low_precision_matmul: LowPrecisionMatmul = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        hidden: int,
        use_bias: bool,
        std_in: float,
        std_out: float,
        dtype,
        low_precision_matmul: LowPrecisionMatmul = "auto",
        *,
        key,
    ):
        k1, k2, k3 = jax.random.split(key, 3)
        linear = lambda i, o, k: eqx.nn.Linear(i, o, use_bias=use_bias, dtype=dtype, key=k)  # noqa: E731
        self.proj_up_gate = normal_(linear(dim, hidden, k1), std_in, k1)
        self.proj_up = normal_(linear(dim, hidden, k2), std_in, k2)
        self.proj_down = normal_(linear(hidden, dim, k3), std_out, k3)
        self.low_precision_matmul = low_precision_matmul

    def __call__(self, u: Float[Array, "*rows d"], tp_axis: str | None = None) -> Float[Array, "*rows d"]:
        """``tp_axis``: mesh axis over which the hidden features are split (None: not split)."""
        # The products' outputs in the compute dtype (what remat saves: in bf16 half the bytes of float32 ones, and
        # the backward then computes from exactly the values the forward used); the gating in float32 (XLA:CPU
        # emulates bfloat16 elementwise math, rounding after every operation). Config B bf16: +1.6 to +3.9% over
        # keeping float32 accumulators, with `remat.saved`'s in-place stacking.
        acc, upcast = gate_dtype(u.dtype), upcasts_low_precision_matmul(self.low_precision_matmul)
        gate, up = (dense(layer, u, upcast=upcast).astype(acc) for layer in (self.proj_up_gate, self.proj_up))
        hidden = jax.nn.silu(gate) * up
        return row_parallel(self.proj_down, hidden.astype(u.dtype), tp_axis, upcast=upcast)
