"""The three mLSTM kernels compute one function: outputs, final states and gradients agree.

float64 checks the exact math (≤1e-10) on symmetric random inputs, including ill-conditioned
read-outs (|q·n| ≪ Σ|terms|). float32 checks ≤1e-5 relative to the output's scale on inputs whose
read-out is well-conditioned: where |den| ≈ 1% of the summed terms every float32 implementation
loses two digits (measured: κ≈100 gave 2e-5 in the recurrent form, 4e-6 in the parallel one).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from xlstm_eqx.models.kernels import MLSTMState, chunkwise, parallel, recurrent, recurrent_step

DK, DV = 8, 6


def make_inputs(key, t_len, *, gates="normal", dtype=jnp.float32, qk_mean=0.0, with_reset=False, with_state=False):
    keys = jax.random.split(key, 9)
    q = jax.random.normal(keys[0], (t_len, DK), dtype) + qk_mean
    k = jax.random.normal(keys[1], (t_len, DK), dtype) + qk_mean
    v = jax.random.normal(keys[2], (t_len, DV), dtype)
    if gates == "extreme":  # saturated gates: ±30, as after the soft cap's range
        i = 30.0 * jax.random.rademacher(keys[3], (t_len,), dtype)
        f = 30.0 * jax.random.rademacher(keys[4], (t_len,), dtype)
    else:
        i = 3.0 * jax.random.normal(keys[3], (t_len,), dtype)
        f = 3.0 * jax.random.normal(keys[4], (t_len,), dtype) + 2.0
    reset = jax.random.bernoulli(keys[5], 0.1, (t_len,)) if with_reset else None
    state = None
    if with_state:
        n = jnp.abs(jax.random.normal(keys[7], (DK,), dtype)) + qk_mean
        state = MLSTMState(jax.random.normal(keys[6], (DK, DV), dtype), n, 2.0 * jax.random.normal(keys[8], (), dtype))
    return (q, k, v, i, f, state, reset)


def outputs_and_grads(kernel, inputs):
    """(h, final state) and the gradient of a generic scalar of them w.r.t. every float input."""
    q, k, v, i, f, state, reset = inputs

    def scalar(floats):
        h, final = kernel(*floats, reset=reset)
        weights = jnp.cos(jnp.arange(h.size, dtype=h.dtype)).reshape(h.shape)
        return jnp.sum(h * weights) + jnp.sum(final.C) + jnp.sum(final.n) + final.m, (h, final)

    grads, (h, final) = jax.jit(jax.grad(scalar, has_aux=True))((q, k, v, i, f, state))
    return (h, final), grads


def max_relative_error(a, b):
    """max |a - b| over the whole pytree, relative to the largest magnitude of ``b``."""
    a_leaves, b_leaves = jax.tree.leaves(a), jax.tree.leaves(b)
    scale = max(float(jnp.max(jnp.abs(x))) for x in b_leaves)
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a_leaves, b_leaves))
    return diff / max(scale, 1e-30)


def readout_condition_number(inputs) -> float:
    """max_t Σ|terms of den_t| / max(|den_t|, e^{-m_t}), in float64 NumPy: the read-out's conditioning.

    A float32 result can be trusted to about 6 - log10(κ) digits, whatever the algorithm.
    """
    q, k, _, i, f, state, reset = (
        None if x is None else jax.tree.map(lambda a: np.asarray(a, np.float64), x) for x in inputs
    )
    t_len = len(i)
    cum = np.cumsum(-np.logaddexp(0.0, -f))
    visible = np.tril(np.ones((t_len, t_len), bool))
    carry_visible = np.ones(t_len, bool)
    if reset is not None:
        count = np.cumsum(reset)
        visible &= count[:, None] == count[None, :]
        carry_visible = count == 0
    with np.errstate(invalid="ignore", over="ignore"):
        log_d = np.where(visible, cum[:, None] - cum[None, :] + i[None, :], -np.inf)
        carry = np.where(carry_visible, cum + (state.m if state is not None else 0.0), -np.inf)
    m = np.maximum(carry, log_d.max(axis=1))
    q_scaled = q / np.sqrt(q.shape[1])
    terms = (q_scaled @ k.T) * np.exp(log_d - m[:, None])
    carry_term = np.exp(carry - m) * (q_scaled @ state.n if state is not None else 0.0)
    den = terms.sum(axis=1) + carry_term
    magnitude = np.abs(terms).sum(axis=1) + np.abs(carry_term)
    return float(np.max(magnitude / np.maximum(np.abs(den), np.exp(-m))))


KERNELS = {
    "parallel": parallel,
    "chunkwise7": functools.partial(chunkwise, chunk_size=7),  # divides none of the lengths below
    # 130 steps make 130 chunks: more than MAX_PARALLEL_CHUNKS, so the chunk states are scanned
    "chunkwise1": functools.partial(chunkwise, chunk_size=1),
}


def assert_all_agree(inputs, tol, kernels=KERNELS):
    ref_out, ref_grads = outputs_and_grads(recurrent, inputs)
    for name, kernel in kernels.items():
        out, grads = outputs_and_grads(kernel, inputs)
        assert max_relative_error(out[0], ref_out[0]) <= tol, f"{name}: outputs"
        for field in MLSTMState._fields:
            assert max_relative_error(getattr(out[1], field), getattr(ref_out[1], field)) <= tol, (
                f"{name}: state.{field}"
            )
        assert max_relative_error(grads, ref_grads) <= tol, f"{name}: gradients"


def covering(axes: dict[str, list], default: set[tuple]) -> list:
    """Every combination of the axes' values as pytest params; those outside ``default`` (chosen so that every
    pair of values of any two axes still occurs in it) are marked slow."""
    cases = list(itertools.product(*axes.values()))
    assert default <= set(cases), f"not combinations of the axes: {default - set(cases)}"
    for (i, a), (j, b) in itertools.combinations(enumerate(axes.values()), 2):
        missing = set(itertools.product(a, b)) - {(case[i], case[j]) for case in default}
        assert not missing, f"the default cases miss these pairs of {list(axes)[i]} and {list(axes)[j]}: {missing}"
    return [
        pytest.param(*case, marks=() if case in default else pytest.mark.slow, id="-".join(map(str, case)))
        for case in cases
    ]


@pytest.mark.parametrize(
    "with_extras, gates, t_len",
    covering(
        {"with_extras": [False, True], "gates": ["normal", "extreme"], "t_len": [1, 37, 130]},
        default={(False, "normal", 1), (True, "extreme", 1), (False, "extreme", 37), (True, "normal", 37),
                 (False, "extreme", 130), (True, "normal", 130)},
    ),
)  # fmt: skip
def test_exact_math_float64(x64, getkey, t_len, gates, with_extras):
    inputs = make_inputs(
        getkey(), t_len, gates=gates, dtype=jnp.float64, with_reset=with_extras, with_state=with_extras
    )
    assert_all_agree(inputs, tol=1e-10)


@pytest.mark.parametrize(
    "with_reset, gates, t_len",
    covering(
        {"with_reset": [False, True], "gates": ["normal", "extreme"], "t_len": [1, 2048]},
        default={(False, "normal", 1), (False, "extreme", 2048), (True, "normal", 2048), (True, "extreme", 1)},
    ),
)
def test_float32_agreement(getkey, t_len, gates, with_reset):
    inputs = make_inputs(getkey(), t_len, gates=gates, qk_mean=2.0, with_reset=with_reset, with_state=True)
    assert readout_condition_number(inputs) < 10, "test premise: a well-conditioned read-out"
    kernels = {**KERNELS, "chunkwise64": functools.partial(chunkwise, chunk_size=64)}
    assert_all_agree(inputs, tol=1e-5, kernels=kernels)


@pytest.mark.parametrize("chunk_size", [1, 5, 64, 1000])
def test_chunk_size_is_free(getkey, chunk_size):
    inputs = make_inputs(getkey(), 64, qk_mean=1.0)
    expected, _ = recurrent(*inputs[:5])
    h, _ = chunkwise(*inputs[:5], chunk_size=chunk_size)
    assert max_relative_error(h, expected) <= 1e-5


@pytest.mark.parametrize("kernel", [recurrent, *KERNELS.values()])
def test_reset_wipes_memory_exactly(getkey, kernel):
    """After a document start, outputs do not depend on anything before it — bit for bit."""
    q, k, v, i, f, state, _ = make_inputs(getkey(), 50, with_state=True)
    reset = jnp.zeros(50, bool).at[30].set(True)
    h, final = kernel(q, k, v, i, f, state, reset)
    changed = (
        q.at[:30].mul(-2.0),
        k.at[:30].add(1.0),
        v.at[:30].mul(3.0),
        i.at[:30].add(5.0),
        f.at[:30].add(-4.0),
    )
    h2, final2 = kernel(*changed, MLSTMState(state.C * 2, state.n + 1, state.m + 3), reset)
    assert jnp.array_equal(h[30:], h2[30:])
    assert all(jnp.array_equal(a, b) for a, b in zip(final, final2))
    assert not jnp.allclose(h[:30], h2[:30])


def test_step_equals_scan(getkey):
    q, k, v, i, f, state, _ = make_inputs(getkey(), 12, with_state=True)
    expected, expected_state = recurrent(q, k, v, i, f, state)
    steps = []
    for t in range(12):
        h_t, state = recurrent_step(q[t], k[t], v[t], i[t], f[t], state)
        steps.append(h_t)
    assert max_relative_error(jnp.stack(steps), expected) <= 1e-6
    assert max_relative_error(state, expected_state) <= 1e-6


def test_wrong_shapes_fail_with_named_dimension(getkey):
    q, k, v, i, f, _, _ = make_inputs(getkey(), 10)
    with pytest.raises(TypeCheckError, match="parameter 'k'"):
        parallel(q, k[:, :3], v, i, f)


def test_row_max_differentiates_like_jnp_max_ties_included(x64):
    """The stabilisers' row max (whose JVP floors the tie count at 1, see ``row_max``) has jnp.max's gradient."""
    from xlstm_eqx.models.kernels.common import row_max

    x = jnp.array([[1.0, 3.0, 3.0, -jnp.inf], [2.0, -1.0, 0.5, 0.25], [-jnp.inf, 0.0, -jnp.inf, -jnp.inf]])
    weights = jnp.array([0.5, -2.0, 3.0])
    for fn in (jax.grad, lambda f: jax.jit(jax.grad(f))):  # jit: XLA is free to recompute x for the equality
        ours = fn(lambda x: jnp.sum(weights * row_max(x)))(x)
        reference = jax.grad(lambda x: jnp.sum(weights * jnp.max(x, axis=-1)))(x)
        np.testing.assert_array_equal(ours, reference)
    np.testing.assert_array_equal(row_max(x), jnp.max(x, axis=-1))
