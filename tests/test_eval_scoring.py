"""Scoring for the LM Evaluation Harness: batched continuation log-likelihoods and recurrent whole-document
scoring equal a direct computation from the model's full-sequence logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_eqx.config import ModelConfig
from xlstm_eqx.eval.scoring import score_continuations, score_document
from xlstm_eqx.models import build

CONFIG = ModelConfig(vocab_size=64, embedding_dim=32, num_blocks=2, num_heads=2, chunk_size=8)
EOD = 0


@pytest.fixture(scope="module")
def model():
    base = build(CONFIG, key=jax.random.key(0))
    leaves, treedef = jax.tree.flatten(base)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def direct(model, tokens, n_scored):
    """Σ log p of the last ``n_scored`` tokens from one full-sequence forward, and whether all were argmax."""
    logits, _ = model(jnp.asarray(tokens[:-1], jnp.int32))
    log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    positions = range(len(tokens) - 1 - n_scored, len(tokens) - 1)
    total = sum(float(log_probs[p, tokens[p + 1]]) for p in positions)
    greedy = all(int(np.argmax(log_probs[p])) == tokens[p + 1] for p in positions)
    return total, greedy


def random_tokens(seed, n):
    return [int(t) for t in np.random.default_rng(seed).integers(1, CONFIG.vocab_size, n)]


def test_continuations_equal_direct_computation(model):
    pairs = [([EOD, *random_tokens(i, 3 + 5 * i)], random_tokens(100 + i, 1 + i % 4)) for i in range(7)]
    scores = score_continuations(model, pairs, context_length=64, batch_size=3)
    for (context, continuation), (value, greedy) in zip(pairs, scores):
        expected, expected_greedy = direct(model, context + continuation, len(continuation))
        assert value == pytest.approx(expected, abs=1e-5)
        assert greedy == expected_greedy


def test_long_requests_keep_the_latest_context_and_score_only_the_continuation(model):
    context, continuation = [EOD, *random_tokens(1, 50)], random_tokens(2, 4)
    ((value, _),) = score_continuations(model, [(context, continuation)], context_length=20, batch_size=2)
    expected, _ = direct(model, (context + continuation)[-21:], len(continuation))
    assert value == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="exceeds context_length=3"):
        score_continuations(model, [([EOD], random_tokens(3, 4))], context_length=3, batch_size=1)
    with pytest.raises(ValueError, match="request 0: empty continuation"):
        score_continuations(model, [([EOD], [])], context_length=3, batch_size=1)


def test_greedy_continuation_is_flagged_greedy(model):
    context = [EOD, *random_tokens(5, 6)]
    tokens = list(context)
    for _ in range(4):  # extend with the argmax, one token at a time
        logits, _ = model(jnp.asarray(tokens, jnp.int32))
        tokens.append(int(jnp.argmax(logits[-1])))
    (_, greedy), (_, not_greedy) = score_continuations(
        model, [(context, tokens[len(context):]), (context, [(t + 1) % 64 or 1 for t in tokens[len(context):]])],
        context_length=64, batch_size=2,
    )  # fmt: skip
    assert greedy and not not_greedy


@pytest.mark.parametrize("chunk_size", [7, 16, 200])
def test_recurrent_document_score_equals_full_sequence(model, chunk_size):
    tokens = random_tokens(9, 61)
    value, greedy = score_document(model, tokens, eod_id=EOD, chunk_size=chunk_size)
    expected, expected_greedy = direct(model, [EOD, *tokens], len(tokens))
    assert value == pytest.approx(expected, abs=1e-4, rel=1e-6)
    assert greedy == expected_greedy
