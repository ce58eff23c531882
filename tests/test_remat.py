"""`models.remat.saved`: an identity for values and gradients that the "dots" policy keeps, 16-bit floats as bits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from xlstm_eqx.models.remat import REMAT_POLICIES, saved


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_saved_is_the_identity_with_an_identity_gradient(dtype):
    x = jnp.linspace(-3.0, 3.0, 24, dtype=jnp.float32).reshape(4, 6).astype(dtype)
    assert saved(x).dtype == dtype
    np.testing.assert_array_equal(np.asarray(saved(x), np.float32), np.asarray(x, np.float32))
    grad = jax.grad(lambda x: jnp.sum(jnp.sin(saved(x).astype(jnp.float32))))(x)
    expected = jax.grad(lambda x: jnp.sum(jnp.sin(x.astype(jnp.float32))))(x)
    assert grad.dtype == dtype
    np.testing.assert_array_equal(np.asarray(grad, np.float32), np.asarray(expected, np.float32))


def _scanned_loss(x, weights, mark):
    """Three remat'd layers under lax.scan, each a bf16 product whose output ``mark`` may pass through `saved`."""

    def layer(h, w):
        y = jnp.dot(h, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
        y = mark(y)
        return jnp.tanh(y.astype(jnp.float32)).astype(jnp.bfloat16), None

    layer = jax.checkpoint(layer, policy=REMAT_POLICIES["dots"], prevent_cse=False)
    return jnp.sum(lax.scan(layer, x, weights)[0].astype(jnp.float32) ** 2)


def test_the_dots_policy_stacks_saved_bfloat16_values_as_integer_bits():
    """The saved outputs of scanned blocks are stacked as uint16 (XLA:CPU updates an integer stack in place, a
    bfloat16 one by converting all of it to float32 and back at every block), and the gradients are unchanged."""
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], (4, 8)).astype(jnp.bfloat16)
    weights = (0.5 * jax.random.normal(keys[1], (3, 8, 8))).astype(jnp.bfloat16)
    compiled = lambda mark: jax.jit(jax.grad(lambda w: _scanned_loss(x, w, mark))).lower(weights).compile()  # noqa: E731
    marked, plain = compiled(saved), compiled(lambda y: y)

    assert "u16[3,4,8]" in marked.as_text()  # the three layers' saved outputs, one stack of bits
    assert "u16[3,4,8]" not in plain.as_text()
    as_f32 = lambda grads: np.asarray(grads, np.float32)  # noqa: E731
    np.testing.assert_allclose(as_f32(marked(weights)), as_f32(plain(weights)), rtol=1e-6)
