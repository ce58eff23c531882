"""The bfloat16 projections' backward: right values in every trace context, low-precision products on XLA:CPU
(or float32 ones on exactly upcast operands, where the CPU lacks bfloat16 dot instructions)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jaxtyping import TypeCheckError

from xlstm_eqx.models.layers import mixed_precision_matmul
from xlstm_eqx.models.matmul_policy import host_cpu_features, upcasts_low_precision_matmul

ROWS = 64
# (d_in, d_out): the weight gradient transposes the smaller operand, g for a narrowing layer and x for a widening one
SHAPES = {"narrowing": (48, 40), "widening": (40, 96)}


def _load_hlo_products():
    """benchmarks/hlo_products.py, the HLO-text reader profile_step.py uses, loaded from its file.

    Not through sys.path: a script there named like an installed package would shadow it for every later test
    (benchmarks/kernels.py once hid the ``kernels`` package that transformers ≥ 5.25 imports; it is now
    cell_kernels.py).
    """
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "hlo_products.py"
    spec = importlib.util.spec_from_file_location("hlo_products", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the module runs
    spec.loader.exec_module(module)
    return module


hlo_products = _load_hlo_products()


def _inputs(shape="narrowing"):
    d_in, d_out = SHAPES[shape]
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (ROWS, d_in)).astype(jnp.bfloat16)
    w = jax.random.normal(keys[1], (d_out, d_in))
    cot = jax.random.normal(keys[2], (ROWS, d_out))
    return x, w, cot


def _pullback(x, w, cot, upcast=False):
    return jax.vjp(lambda x, w: mixed_precision_matmul(x, w, upcast), x, w)[1](cot)


def _reference(x, w, cot):
    """(dx, dw) in float32 from the bfloat16-rounded inputs the products see."""
    x32, w16, cot16 = (a.astype(jnp.bfloat16).astype(jnp.float32) for a in (x, w, cot))
    return cot16 @ w16, cot16.T @ x32


def _in_scan(length):
    def run(x, w, cot):
        def body(carry, _):
            dx, dw = _pullback(x, w, cot)
            return carry, (dx, dw)

        _, (dx, dw) = lax.scan(body, 0, None, length=length)
        return dx[-1], dw[-1]

    return run


def _under_remat(x, w, cot):
    return jax.grad(jax.checkpoint(lambda x, w: jnp.sum(mixed_precision_matmul(x, w) * cot)), (0, 1))(x, w)


def _under_vmap(x, w, cot):
    dx, dw = jax.vmap(_pullback, (None, None, 0))(x, w, cot[None])
    return dx[0], dw[0]


CONTEXTS = {
    "eager": _pullback,
    "jit": jax.jit(_pullback),
    "scan_of_one": jax.jit(_in_scan(1)),  # a one-trip loop, which XLA inlines into the surrounding code
    "scan_of_three": jax.jit(_in_scan(3)),
    "remat": jax.jit(_under_remat),
    "vmap": jax.jit(_under_vmap),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("context", sorted(CONTEXTS))
def test_backward_values_in_every_trace_context(context, shape):
    x, w, cot = _inputs(shape)
    dx, dw = CONTEXTS[context](x, w, cot)
    ref_dx, ref_dw = _reference(x, w, cot)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx.astype(jnp.float32), ref_dx, rtol=1e-2, atol=5e-2)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_backward_product_takes_bfloat16_operands_on_cpu(shape):
    """Both backward products reach XLA:CPU's low-precision GEMM: no operand is upcast to float32 first.

    XLA upcasts a bfloat16 product whose left operand is contracted on its first axis (the plain weight
    gradient gᵀx); this test fails if that happens again.
    """
    if jax.default_backend() != "cpu":
        pytest.skip("the upcast rule being guarded against is XLA:CPU's")
    hlo = jax.jit(_pullback).lower(*_inputs(shape)).compile().as_text()
    dots = hlo_products.products(hlo)
    assert len(dots) == 2, hlo  # dx and dw
    for dot in dots:
        assert list(dot.operands.values()) == ["bf16", "bf16"], dot


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_upcast_products_equal_the_low_precision_ones(shape):
    """upcast=True runs the same three products on float32 copies of the bfloat16 operands: exact inputs, so
    the forward and both gradients agree with the native kernel to float32 summation order."""
    x, w, cot = _inputs(shape)
    run = jax.jit(lambda x, w, u: (mixed_precision_matmul(x, w, u), _pullback(x, w, cot, u)), static_argnums=2)
    (y, native), (y_up, upcast) = run(x, w, False), run(x, w, True)
    ref_dx, ref_dw = _reference(x, w, cot)
    assert y_up.dtype == jnp.float32 and upcast[0].dtype == jnp.bfloat16 and upcast[1].dtype == jnp.float32
    np.testing.assert_allclose(y_up, y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upcast[1], native[1], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(upcast[1], ref_dw, rtol=1e-5, atol=1e-4)
    # dx is rounded to bfloat16 at the end: at most one bfloat16 ulp apart where the float32 sums differ slightly
    np.testing.assert_allclose(upcast[0].astype(jnp.float32), native[0].astype(jnp.float32), rtol=2**-7, atol=1e-6)


def test_upcast_products_run_on_float32_operands():
    if jax.default_backend() != "cpu":
        pytest.skip("reads XLA:CPU's HLO")
    hlo = jax.jit(lambda x, w, cot: _pullback(x, w, cot, True)).lower(*_inputs()).compile().as_text()
    dots = hlo_products.products(hlo)
    assert len(dots) == 2, hlo
    for dot in dots:
        assert list(dot.operands.values()) == ["f32", "f32"], dot


@pytest.mark.parametrize(
    ("policy", "backend", "features", "upcast"),
    [
        ("native", "cpu", frozenset({"avx2"}), False),
        ("upcast", "gpu", frozenset(), True),
        ("auto", "cpu", frozenset({"fma", "avx2"}), True),  # AVX2 only: XLA:CPU emulates bfloat16 dots
        ("auto", "cpu", frozenset({"avx2", "avx512f", "avx512_bf16"}), False),
        ("auto", "cpu", frozenset({"avx2", "amx_bf16"}), False),
        ("auto", "cpu", frozenset({"asimd", "bf16"}), False),  # aarch64 FEAT_BF16
        ("auto", "cpu", frozenset(), False),  # features unknown: keep the native kernel
        ("auto", "gpu", frozenset({"avx2"}), False),
        ("auto", "tpu", frozenset(), False),
    ],
)
def test_low_precision_matmul_policy(policy, backend, features, upcast):
    assert upcasts_low_precision_matmul(policy, backend, features) is upcast


def test_low_precision_matmul_policy_rejects_unknown_names_and_reads_this_host():
    # TypeCheckError from the Literal annotation where runtime type checking is on (as in this suite)
    with pytest.raises((ValueError, TypeCheckError), match="low_precision_matmul"):
        upcasts_low_precision_matmul("fast", "cpu", frozenset())
    assert isinstance(host_cpu_features(), frozenset)
    if jax.default_backend() == "cpu" and "avx2" in host_cpu_features():
        has_bf16_dot = bool(host_cpu_features() & {"avx512_bf16", "amx_bf16"})
        assert upcasts_low_precision_matmul("auto") is not has_bf16_dot


def test_batched_products_are_read_with_their_sizes():
    """cell_products.py's reader: batch, free and contracted axes of every batched product, wherever they sit."""
    a, b = jnp.ones((3, 5, 7, 2), jnp.float32), jnp.ones((3, 2, 11, 7), jnp.float32)
    plain = jnp.ones((4, 6), jnp.float32)

    def program(a, b, plain):
        batched = jnp.einsum("xmkc,xcnk->xcmn", a, b)  # batch x·c = 6, m 5, k 7, n 11
        return batched, plain @ plain.T  # an unbatched product is not counted

    hlo = jax.jit(program).lower(a, b, plain).compile().as_text()
    assert hlo_products.batched_products(hlo) == {(6, 5, 7, 11): 1}
