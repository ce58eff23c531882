"""Sampling: the recurrent decode agrees with the parallel forward, keys and top-k behave, bad arguments are named."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from xlstm_eqx.config import ModelConfig
from xlstm_eqx.data.tokenizer import Tokenizer
from xlstm_eqx.models import build
from xlstm_eqx.models.generate import _sample, generate, generate_jit, sample_text

# vocab 4096 to match the shipped tokenizer; chunk 8 so the 13-token prompt spans chunks with a remainder.
TINY = ModelConfig(vocab_size=4096, embedding_dim=64, num_blocks=2, num_heads=2, chunk_size=8)
PROMPT_LEN, NUM_TOKENS = 13, 12


def tiny_model(config, seed=0):
    """Random weights of the right scale put straight into the model's skeleton: no initialiser runs, so nothing
    is compiled (building eagerly or under jit costs seconds). Gate kernels are random too (a fresh init has
    zero gate kernels), so gates and memory depend on the tokens."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = jax.tree_util.keystr(path), leaf.shape
        if "norm" in name:
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif "igate_preact.bias" in name:
            value = -2.0 + rng.standard_normal(shape)
        elif "fgate_preact.bias" in name:
            value = 3.0 + rng.standard_normal(shape)
        else:  # weights (..., out, in): unit-variance outputs
            value = rng.standard_normal(shape) / np.sqrt(shape[-1])
        return jnp.asarray(value, leaf.dtype)

    skeleton = eqx.filter_eval_shape(build, config, key=jax.random.key(0))
    return jax.tree_util.tree_map_with_path(fill, skeleton)


@eqx.filter_jit
def forward(model, tokens, reset):
    return model(tokens, reset=reset)[0]


def full_forward(model, prompt, generated, eod_id=None):
    """Logits of the parallel forward over prompt + generated (causal: position i sees tokens <= i), with the
    memory wiped at EOD inputs when ``eod_id`` is given, as ``generate`` does."""
    tokens = jnp.concatenate([prompt.astype(jnp.int32), generated])
    return forward(model, tokens, tokens == (-1 if eod_id is None else eod_id))


def assert_greedy(logits, generated):
    """Each generated token is the argmax of ``logits`` at the position before it, and that decision is not a
    near-tie that rounding in the recurrent vs parallel forms could flip (which would make the test flaky)."""
    decisions = logits[PROMPT_LEN - 1 : -1]
    np.testing.assert_array_equal(np.asarray(generated), np.asarray(jnp.argmax(decisions, axis=-1)))
    top2 = jnp.sort(decisions, axis=-1)[:, -2:]
    assert float(jnp.min(top2[:, 1] - top2[:, 0])) > 1e-4


@pytest.fixture(scope="module")
def model():
    return tiny_model(TINY)


@pytest.fixture(scope="module")
def prompt():
    return jax.random.randint(jax.random.key(2), (PROMPT_LEN,), 0, TINY.vocab_size)


@pytest.fixture(scope="module")
def greedy(model, prompt):
    return generate_jit(model, prompt, NUM_TOKENS, key=jax.random.key(3), temperature=0.0)


def test_greedy_recurrent_decode_equals_parallel_forward(model, prompt, greedy):
    """The state carried through the scan of recurrent steps matches the parallel (chunkwise) forward."""
    assert greedy.shape == (NUM_TOKENS,) and greedy.dtype == jnp.int32
    assert_greedy(full_forward(model, prompt, greedy), greedy)
    assert len(set(np.asarray(greedy).tolist())) > 1  # not one token repeated: the context matters


def test_eod_wipes_the_memory_like_a_document_start(model, prompt, greedy):
    """With eod_id, an EOD input (here: the 4th greedy token, and wherever it occurs in the prompt) starts a
    fresh document in the recurrent decode exactly as ``reset`` does in the parallel forward."""
    eod = int(greedy[3])
    tokens = generate_jit(model, prompt, NUM_TOKENS, key=jax.random.key(3), temperature=0.0, eod_id=eod)
    np.testing.assert_array_equal(tokens[:4], greedy[:4])  # identical up to and including the first EOD
    assert not np.array_equal(tokens[4:], greedy[4:])  # after it, the memory of the prompt is gone
    assert_greedy(full_forward(model, prompt, tokens, eod), tokens)


@pytest.mark.parametrize(("temperature", "top_k"), [(0.0, None), (1.0, None), (1.0, 5)])  # every sampling path
def test_sampled_ids_are_int32_under_x64(temperature, top_k):
    with jax.enable_x64(True):  # argmax and categorical return int64 here; the scan carry needs one dtype
        token = _sample(jnp.arange(64.0), jax.random.key(4), temperature, top_k)
    assert token.dtype == jnp.int32 and 0 <= int(token) < 64


def test_generate_traces_under_jit_and_vmap(model, prompt):
    """``generate`` itself is traceable (only shapes are traced here: no compilation)."""
    keys = jax.random.split(jax.random.key(8), 5)
    batched = jax.vmap(lambda k: generate(model, prompt, NUM_TOKENS, key=k, temperature=0.7, top_k=3, eod_id=0))
    out = eqx.filter_eval_shape(eqx.filter_jit(batched), keys)
    assert out.shape == (5, NUM_TOKENS) and out.dtype == jnp.int32


def test_top_k_keeps_exactly_the_k_best(model, prompt, greedy):
    """top_k=1 is the argmax (ties included: lax.top_k and argmax both pick the lower id); a hot top-3 draw
    only ever picks among the 3 best and, given enough draws, picks each of them."""
    logits = jnp.concatenate([full_forward(model, prompt, greedy), jnp.zeros((1, TINY.vocab_size))])
    picks = jax.vmap(lambda row, k: _sample(row, k, 1.5, 1))(logits, jax.random.split(jax.random.key(7), len(logits)))
    np.testing.assert_array_equal(picks, jnp.argmax(logits, axis=-1))
    assert int(picks[-1]) == 0  # the all-tied row
    row = logits[PROMPT_LEN - 1]
    draws = jax.vmap(lambda k: _sample(row, k, 50.0, 3))(jax.random.split(jax.random.key(8), 200))
    assert set(np.asarray(draws).tolist()) == set(np.asarray(jax.lax.top_k(row, 3)[1]).tolist())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"prompt": jnp.zeros((0,), jnp.int32)}, "prompt is empty"),
        (
            {"prompt": jnp.array([1, 4096, 2])},
            r"prompt has token ids outside \[0, vocab_size=4096\).* 4096 at position 1",
        ),
        ({"prompt": jnp.array([-1, 2])}, "prompt has token ids outside"),
        ({"prompt": jnp.zeros((2, 3), jnp.int32)}, "prompt"),
        ({"prompt": jnp.array([0.5, 1.0])}, "prompt"),
        ({"num_tokens": 0}, "num_tokens must be at least 1"),
        ({"num_tokens": 2.0}, "num_tokens"),
        ({"temperature": -0.5}, "temperature must be"),
        ({"temperature": float("nan")}, "temperature must be"),
        ({"top_k": 0}, r"top_k must be in \[1, vocab_size=4096\]"),
        ({"top_k": 4097}, "top_k must be in"),
        ({"eod_id": 4096}, r"eod_id must be in \[0, vocab_size=4096\)"),
    ],
)
@pytest.mark.parametrize("fn", [generate, generate_jit])
def test_bad_arguments_are_named(model, fn, change, match):
    """Raised before anything is traced. (A wrong type, shape or dtype may be caught first by jaxtyping's runtime
    check, which the test suite switches on; its message names the parameter too.)"""
    args = {"prompt": jnp.array([1, 2, 3]), "num_tokens": 4, "temperature": 1.0, "top_k": None, **change}
    with pytest.raises((ValueError, TypeError, TypeCheckError), match=match):
        fn(model, args.pop("prompt"), args.pop("num_tokens"), key=jax.random.key(0), **args)


def test_same_key_same_sample_other_key_differs(model):
    """Sampling with the settings and prompt shape of ``sample_text(..., "KING", ...)`` below (one compilation)."""
    prompt = jnp.array([0, 574])  # EOD + "KING" in the shipped tokenizer

    def sample(seed):
        return generate_jit(model, prompt, NUM_TOKENS, key=jax.random.key(seed), temperature=0.8, top_k=40, eod_id=0)

    first, again, other = sample(4), sample(4), sample(5)
    assert first.shape == (NUM_TOKENS,) and first.dtype == jnp.int32
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)  # 12 draws from a top-40 softmax all colliding: negligible
    # numpy integers pass the argument check, so they must be static like the Python ints they equal
    numpy_ints = generate_jit(model, prompt, np.int64(NUM_TOKENS), key=jax.random.key(4), temperature=0.8,
                              top_k=np.int32(40), eod_id=np.int64(0))  # fmt: skip
    np.testing.assert_array_equal(numpy_ints, first)


def test_python_ints_and_numpy_prompts_are_accepted_where_floats_and_jax_arrays_are(model, prompt, greedy):
    """``temperature=0`` / ``top_p=1`` and a numpy prompt pass the runtime type checker and mean what 0.0 / 1.0
    and the jax array do."""
    np_prompt = np.asarray(prompt)
    for fn in (generate, generate_jit):
        np.testing.assert_array_equal(fn(model, np_prompt, NUM_TOKENS, key=jax.random.key(3), temperature=0), greedy)
    as_ints = generate_jit(model, prompt, NUM_TOKENS, key=jax.random.key(7), temperature=1, top_p=1)
    as_floats = generate_jit(model, prompt, NUM_TOKENS, key=jax.random.key(7), temperature=1.0, top_p=1.0)
    np.testing.assert_array_equal(as_ints, as_floats)


def test_sample_text_with_the_shipped_tokenizer(model):
    tokenizer = Tokenizer.load()
    assert tokenizer.vocab_size == TINY.vocab_size and tokenizer.eod_id == 0
    assert tokenizer.encode("KING") == [574]
    text = sample_text(model, tokenizer, "KING", NUM_TOKENS, key=jax.random.key(9))
    assert isinstance(text, str) and text.startswith("KING") and len(text) > len("KING")
    assert sample_text(model, tokenizer, "KING", NUM_TOKENS, key=jax.random.key(9)) == text
    # The model sees EOD + prompt, generated EODs start fresh documents, prompt and continuation decode together.
    continuation = generate_jit(
        model, jnp.array([0, 574]), NUM_TOKENS, key=jax.random.key(9), temperature=0.8, top_k=40, eod_id=0
    )
    assert text == tokenizer.decode([574, *np.asarray(continuation).tolist()])
    # An empty prompt starts a fresh document from the EOD token alone, which is not echoed.
    from_nothing = sample_text(model, tokenizer, "", NUM_TOKENS, key=jax.random.key(9), temperature=0.0)
    assert isinstance(from_nothing, str) and from_nothing
    expected = generate_jit(
        model, jnp.array([0]), NUM_TOKENS, key=jax.random.key(0), temperature=0.0, top_k=40, eod_id=0
    )
    assert from_nothing == tokenizer.decode(np.asarray(expected).tolist())


def test_sample_text_rejects_a_tokenizer_larger_than_the_vocab():
    small = eqx.filter_eval_shape(build, ModelConfig(**{**TINY.__dict__, "vocab_size": 300}), key=jax.random.key(0))
    with pytest.raises(ValueError, match="vocab_size"):
        sample_text(small, Tokenizer.load(), "hi", 2, key=jax.random.key(0))


def test_top_p_samples_only_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (0.5 < 0.7 ≤ 0.8), top_p 0.5 only the first
    logits = jnp.log(jnp.asarray([0.05, 0.5, 0.15, 0.3]))
    keys = jax.random.split(jax.random.key(11), 400)
    nucleus = set(np.asarray(jax.vmap(lambda k: _sample(logits, k, 1.0, None, 0.7))(keys)).tolist())
    assert nucleus == {1, 3}
    assert set(np.asarray(jax.vmap(lambda k: _sample(logits, k, 1.0, None, 0.5))(keys)).tolist()) == {1}
    assert set(np.asarray(jax.vmap(lambda k: _sample(logits, k, 1.0, 3, 1.0))(keys)).tolist()) == {1, 2, 3}


def test_a_concrete_prompt_is_checked_on_the_host_and_a_traced_one_on_the_device(model):
    """A concrete prompt is checked before tracing, so generate_jit's program holds no host callback and JAX's
    persistent compilation cache can keep it; a prompt traced by an outer jit is checked inside the program."""
    prompt, key = jnp.array([1, 2, 3]), jax.random.key(0)
    program = lambda run, *args: str(jax.make_jaxpr(run)(model, *args))  # noqa: E731
    concrete = program(lambda m: generate_jit(m, prompt, 2, key=key, temperature=0.0))
    traced = program(lambda m, p: generate_jit(m, p, 2, key=key, temperature=0.0), prompt)
    assert "callback" not in concrete and "callback" in traced
    with pytest.raises(Exception, match="token id outside"):
        jax.block_until_ready(eqx.filter_jit(lambda m, p: generate(m, p, 2, key=key))(model, jnp.array([1, 4096])))
