"""xLSTMLM: equivalent execution paths, initialisation, dtype policy and bad input."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from xlstm_eqx.config import ModelConfig
from xlstm_eqx.models import build, count_params, layers
from xlstm_eqx.models.layers import mixed_precision_matmul, small_init_std, wang_init_std
from xlstm_eqx.models.matmul_policy import host_cpu_features

TINY = ModelConfig(vocab_size=97, embedding_dim=64, num_blocks=3, num_heads=2, chunk_size=8)


def perturbed(model, key, scale=0.3):
    """Random gate weights so that gates and soft caps matter (a fresh init has zero gate kernels)."""
    leaves, treedef = jax.tree.flatten(model)
    keys = jax.random.split(key, len(leaves))
    noisy = [
        leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype) if eqx.is_inexact_array(leaf) else leaf
        for leaf, k in zip(leaves, keys)
    ]
    return jax.tree.unflatten(treedef, noisy)


@pytest.fixture(scope="module")
def model():
    return perturbed(build(TINY, key=jax.random.key(0)), jax.random.key(1))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(2), (45,), 0, TINY.vocab_size)


def scale_error(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def relative_error(grads, reference):
    """‖grads − reference‖ / ‖reference‖ over all leaves of two gradient pytrees."""
    pairs = list(zip(jax.tree.leaves(grads), jax.tree.leaves(reference)))
    diff = sum(float(jnp.sum((a - b) ** 2)) for a, b in pairs)
    return (diff / sum(float(jnp.sum(b**2)) for _, b in pairs)) ** 0.5


def test_full_equals_chunked_equals_token_by_token(model, tokens):
    full, final = eqx.filter_jit(lambda m, t: m(t))(model, tokens)
    first, state = model(tokens[:19])
    second, chunked_final = model(tokens[19:], state)
    assert scale_error(jnp.concatenate([first, second]), full) <= 1e-5

    step = eqx.filter_jit(lambda m, t, s: m(t, s))
    state, outs = None, []
    for t in range(tokens.shape[0]):
        logits, state = step(model, tokens[t : t + 1], state if state is not None else model.init_state())
        outs.append(logits)
    assert scale_error(jnp.concatenate(outs), full) <= 1e-5
    for got in (chunked_final, state):
        assert all(scale_error(a, b) <= 1e-5 for a, b in zip(got, final))


@pytest.mark.parametrize("kernel", ["parallel", "recurrent"])
def test_kernels_agree_in_the_model(model, tokens, kernel):
    reference, _ = model(tokens)
    logits, _ = model(tokens, kernel=kernel)
    assert scale_error(logits, reference) <= 1e-5


def loss_and_grads(model, tokens):
    """(loss, gradients) of the mean squared logits, one fresh compile (op by op is slower)."""
    return eqx.filter_jit(eqx.filter_value_and_grad(lambda m: jnp.mean(m(tokens)[0] ** 2)))(model)


@pytest.fixture(scope="module")
def float64_reference():
    """(model, tokens, loss, gradients) of a two-block float64 model under the default policy, computed once."""
    with jax.enable_x64(True):
        config = ModelConfig(**{**TINY.__dict__, "num_blocks": 2, "param_dtype": "float64", "compute_dtype": "float64"})
        model = perturbed(build(config, key=jax.random.key(0)), jax.random.key(1))
        tokens = jax.random.randint(jax.random.key(2), (21,), 0, TINY.vocab_size)  # 2 chunks of 8 + a remainder
        return (model, tokens, *loss_and_grads(model, tokens))


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"scan_blocks": False}, marks=pytest.mark.slow),  # unrolled blocks in float64: ~45 s to compile
        {"remat": "block"},
        {"remat": "none"},
        {"kernel": "parallel", "chunk_size": 5},
    ],
)
def test_execution_policies_do_not_change_results(x64, float64_reference, change):
    """Checked in float64: in float32 these gradients carry only ~5 digits (both paths ~1e-5 from float64)."""
    model, tokens, value, grads = float64_reference
    other_value, other_grads = loss_and_grads(model.with_policy(**change), tokens)
    assert abs(float(value - other_value)) <= 1e-10 * abs(float(value))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(other_grads)):
        assert scale_error(a, b) <= 1e-10


def test_document_reset_isolates_documents(model, tokens):
    reset = jnp.zeros(tokens.shape, bool).at[20].set(True)
    logits, _ = model(tokens, reset=reset)
    other_first_doc = tokens.at[:20].set((tokens[:20] + 7) % TINY.vocab_size)
    other, _ = model(other_first_doc, reset=reset)
    np.testing.assert_array_equal(other[20:], logits[20:])  # the wipe is exact, not exp(-25)
    assert not np.allclose(other[:20], logits[:20])
    alone, _ = model(tokens[20:])  # other chunk alignment, so equal up to rounding
    assert scale_error(alone, logits[20:]) <= 1e-5


def test_batched_with_vmap(model, tokens):
    batch = jnp.stack([tokens, jnp.flip(tokens)])
    logits, state = jax.vmap(model)(batch)
    assert logits.shape == (2, 45, TINY.vocab_size) and state.C.shape == (2, 3, 2, 16, 32)
    assert scale_error(logits[1], model(jnp.flip(tokens))[0]) <= 1e-5


def test_initialisation_follows_the_spec():
    m = build(TINY, key=jax.random.key(0))
    layer = m.blocks.mlstm_layer
    assert m.blocks.norm_mlstm.weight.shape == (3, 64)
    np.testing.assert_array_equal(layer.igate_preact.bias, -10.0)
    np.testing.assert_allclose(layer.fgate_preact.bias[0], [3.0, 6.0])
    for zero in (layer.igate_preact.weight, layer.fgate_preact.weight, layer.ogate_preact.weight):
        np.testing.assert_array_equal(zero, 0.0)
    np.testing.assert_array_equal(layer.multihead_norm.norms.weight, 1.0)
    np.testing.assert_allclose(jnp.std(layer.q.weight), small_init_std(64), rtol=0.1)
    np.testing.assert_allclose(jnp.std(layer.out_proj.weight), wang_init_std(64, 3), rtol=0.1)
    np.testing.assert_allclose(jnp.std(m.blocks.ffn.proj_down.weight), wang_init_std(64, 3), rtol=0.1)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(eqx.filter(m, eqx.is_inexact_array)))


def test_tied_embeddings_share_the_table(tokens):
    tied = ModelConfig(**{**TINY.__dict__, "tie_word_embeddings": True})
    m = build(tied, key=jax.random.key(0))
    assert m.lm_head is None
    assert count_params(tied) == count_params(TINY) - TINY.vocab_size * TINY.embedding_dim
    assert m(tokens)[0].shape == (45, TINY.vocab_size)


def test_bfloat16_compute_keeps_float32_params_and_logits(model, tokens):
    bf16 = model.with_policy(compute_dtype="bfloat16")
    logits, state = bf16(tokens)
    reference, _ = model(tokens)
    assert logits.dtype == jnp.float32 and state.C.dtype == jnp.float32
    assert scale_error(logits, reference) < 0.05  # bfloat16 has 8 mantissa bits


@pytest.fixture(scope="module")
def float32_and_bfloat16(model, tokens):
    """``loss_and_grads`` of the float32 model and of its bfloat16 policy with native low-precision GEMMs."""
    bf16 = model.with_policy(compute_dtype="bfloat16", low_precision_matmul="native")
    return loss_and_grads(model, tokens), loss_and_grads(bf16, tokens)


def test_bfloat16_gradients_are_as_accurate_as_plain_autodiff(model, tokens, float32_and_bfloat16, monkeypatch):
    """The bfloat16 matmuls' own backward (bf16 inputs, float32 accumulation) loses no more accuracy against
    float32 than JAX's autodiff of the same bfloat16 forward (whose backward products run in float32), and weight
    gradients stay float32."""
    (_, reference), (_, ours) = float32_and_bfloat16
    plain = lambda x, w, upcast=False: jnp.einsum("ri,oi->ro", x, w.astype(x.dtype), preferred_element_type=jnp.float32)  # noqa: E731
    monkeypatch.setattr(layers, "mixed_precision_matmul", plain)
    bf16 = model.with_policy(compute_dtype="bfloat16", low_precision_matmul="native")
    _, autodiff = loss_and_grads(bf16, tokens)  # a new jit wrapper, so the patch is traced, not served from a cache
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(ours))
    assert relative_error(autodiff, reference) > 1e-3  # the patch took effect: a bfloat16 forward, not float32
    assert relative_error(ours, reference) <= 1.1 * relative_error(autodiff, reference)
    assert relative_error(ours, autodiff) < 0.02


def test_upcast_bfloat16_products_give_the_same_bfloat16_model(model, tokens, float32_and_bfloat16):
    """The whole bf16 model with its products upcast to float32 GEMMs computes the native model's loss and
    gradients as accurately against float32, and far closer to the native ones than bfloat16's own error.

    Not closer: the two GEMMs sum in different orders (AMX's bf16 kernel adds products in pairs), which flips the
    bfloat16 rounding of a few activations and cotangents; the products' outputs are rounded to bfloat16 in the
    forward too (as autocast does; that is what remat saves), so the losses differ as well (1.0e-3 against
    bfloat16's own 5.2e-3 on an Intel AMX machine; bounded there, like the gradients, by a quarter of it). A flip is
    not a defect that the blocks amplify; it is how rounding treats any small difference. If two float32 tensors
    differ by ε (relative, L2), their bfloat16 roundings differ in a fraction ≈ ε/u of elements by one ulp each,
    i.e. by √(ε·u) with u = 2⁻⁸ (measured: ε = 1e-6, 1e-5, 1e-4 → 6.4e-5, 2.2e-4, 6.8e-4). Each of the backward's
    many roundings applies that map again, so any difference climbs towards u within a few of them: a 1e-6 jitter of
    the head weight moves this model's bf16 gradients by 0 (no flip) or ~6e-3 (float32: 1.6e-6). On an Intel AMX
    machine upcast and native gradients differ by 8.9e-3 (bfloat16's own error: 4.3e-2); where both kernels sum
    alike (AMD AVX-512, AVX2) they agree to 1e-5 and the losses to 1e-6, which is still asserted on CPUs without
    AMX. So the general bound is bfloat16's own error, and each product's exactness is tested tightly in
    test_low_precision_products.
    """
    (float32_loss, float32), (native_loss, native) = float32_and_bfloat16
    upcast_loss, upcast = loss_and_grads(
        model.with_policy(compute_dtype="bfloat16", low_precision_matmul="upcast"), tokens
    )
    amx = "amx_bf16" in host_cpu_features()
    loss_gap, bfloat16_loss_error = abs(float(upcast_loss - native_loss)), abs(float(native_loss - float32_loss))
    assert loss_gap <= (0.25 * bfloat16_loss_error if amx else 1e-6 * abs(float(native_loss)))
    bfloat16_error = relative_error(native, float32)
    assert bfloat16_error > 1e-2  # both really ran in bfloat16
    assert abs(relative_error(upcast, float32) - bfloat16_error) <= 0.05 * bfloat16_error
    assert relative_error(upcast, native) <= 0.25 * bfloat16_error
    if not amx:  # both GEMMs sum alike, so no rounding flips to climb
        assert relative_error(upcast, native) <= 1e-5


def test_mixed_precision_matmul_is_a_low_precision_product_and_its_gradient():
    x = jax.random.normal(jax.random.key(0), (6, 5)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (3, 5))
    cot = jax.random.normal(jax.random.key(2), (6, 3))
    y, pullback = jax.vjp(mixed_precision_matmul, x, w)
    dx, dw = pullback(cot)
    x32, w16 = x.astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32)
    cot16 = cot.astype(jnp.bfloat16).astype(jnp.float32)
    assert y.dtype == jnp.float32 and dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    np.testing.assert_allclose(y, x32 @ w16.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, cot16.T @ x32, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx.astype(jnp.float32), cot16 @ w16, rtol=1e-2, atol=1e-2)


def test_with_policy_reaches_every_layer_and_rejects_sizes(model):
    other = model.with_policy(kernel="recurrent", chunk_size=3)
    assert other.blocks.mlstm_layer.config.kernel == "recurrent" and other.config.chunk_size == 3
    assert other.blocks.mlstm_layer.q.weight is model.blocks.mlstm_layer.q.weight
    with pytest.raises(ValueError, match="num_blocks"):
        model.with_policy(num_blocks=2)


def test_count_params_from_config_matches_model():
    assert count_params(TINY) == count_params(build(TINY, key=jax.random.key(0)))


@pytest.mark.parametrize("bad", [-1, TINY.vocab_size])
def test_token_ids_out_of_range_raise_eagerly_and_under_jit(model, tokens, bad):
    bad_tokens = tokens.at[3].set(bad)
    with pytest.raises(Exception, match="token id outside"):
        model(bad_tokens)
    with pytest.raises(Exception, match="token id outside"):
        jax.block_until_ready(eqx.filter_jit(lambda m, t: m(t))(model, bad_tokens))


def test_wrong_shapes_name_the_dimension(model, tokens):
    with pytest.raises(TypeCheckError, match="parameter 'tokens'"):
        model(tokens[None, :])  # a batch must be vmapped, not passed whole
    with pytest.raises(TypeCheckError, match="parameter 'tokens'"):
        model(tokens.astype(jnp.float32))


def test_a_state_that_is_not_this_models_is_named(model, tokens):
    """MLSTMState is a NamedTuple, which no type checker looks inside: the model checks its shapes itself."""
    _, state = model(tokens[:5])
    model(tokens[5:], state)  # its own state: fine
    batched = jax.tree.map(lambda a: jnp.stack([a, a]), state)
    with pytest.raises(ValueError, match=r"state.C has shape \(2, 3, 2, 16, 32\); this model's is \(3, 2, 16, 32\)"):
        model(tokens, batched)  # a batch's state passed to the one-row call
    model.forward_batch(jnp.stack([tokens, tokens]), batched)  # where it belongs
    other = build(dataclasses.replace(TINY, num_heads=4), key=jax.random.key(1))
    with pytest.raises(ValueError, match=r"state.C has shape \(3, 4, 8, 16\)"):
        model(tokens, other.init_state())
    with pytest.raises(TypeError, match="state.m must be floating point, got int32"):
        model(tokens, state._replace(m=state.m.astype(jnp.int32)))
    with pytest.raises(TypeError, match="MLSTMState"):  # the type checker's error here; the model's without one
        model(tokens, tuple(state))
