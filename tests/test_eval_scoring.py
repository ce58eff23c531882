"""Scoring for the LM Evaluation Harness: fixed-window and recurrent scoring equal a direct computation from the
model's full-sequence logits, on one device and sharded; windows never score context tokens."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_eqx.config import MeshConfig, ModelConfig
from xlstm_eqx.eval.rows import window_rows
from xlstm_eqx.eval.scoring import Scorer, ScoringSettings
from xlstm_eqx.models import build
from xlstm_eqx.parallel import make_mesh

CONFIG = ModelConfig(vocab_size=64, embedding_dim=32, num_blocks=2, num_heads=2, chunk_size=8)
EOD = 0


@pytest.fixture(scope="module")
def model():
    base = build(CONFIG, key=jax.random.key(0))
    leaves, treedef = jax.tree.flatten(base)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@eqx.filter_jit
def _log_probs(model, tokens):
    return jax.nn.log_softmax(model(tokens)[0], axis=-1)


def direct(model, tokens, n_scored):
    """Σ log p of the last ``n_scored`` tokens from one full-sequence forward, and whether all were argmax.
    Inputs are right-padded to 128 (causal: padding never changes earlier positions), so one compilation."""
    inputs = np.zeros(128, np.int32)
    inputs[: len(tokens) - 1] = tokens[:-1]
    log_probs = np.asarray(_log_probs(model, jnp.asarray(inputs)))
    positions = range(len(tokens) - 1 - n_scored, len(tokens) - 1)
    total = sum(float(log_probs[p, tokens[p + 1]]) for p in positions)
    greedy = all(int(np.argmax(log_probs[p])) == tokens[p + 1] for p in positions)
    return total, greedy


def random_tokens(seed, n):
    return [int(t) for t in np.random.default_rng(seed).integers(1, CONFIG.vocab_size, n)]


def scorer(model, mesh_config=None, **settings):
    mesh = None if mesh_config is None else make_mesh(mesh_config, jax.devices()[:4])
    return Scorer(model, ScoringSettings(**{"window": 64, "chunk_size": 16, "batch_size": 4, **settings}), mesh)


@pytest.mark.parametrize("recurrent", [False, True])
def test_continuations_equal_direct_computation(model, recurrent):
    pairs = [([EOD, *random_tokens(i, 3 + 5 * i)], random_tokens(100 + i, 1 + i % 4)) for i in range(7)]
    scores = scorer(model, batch_size=3).score(pairs, recurrent=recurrent)
    for (context, continuation), (value, greedy) in zip(pairs, scores):
        expected, expected_greedy = direct(model, context + continuation, len(continuation))
        assert value == pytest.approx(expected, abs=1e-5)
        assert greedy == expected_greedy


def test_windows_score_every_continuation_token_once_and_never_the_context():
    tokens = list(range(100, 147))  # 47 tokens: 12 of context, 35 to score
    rows = window_rows(tokens, 12, 8, document=3)
    scored = [t for row in rows for t in row.tokens[len(row.tokens) - row.n_scored :]]
    assert scored == tokens[12:]
    assert all(len(row.tokens) <= 9 and row.document == 3 for row in rows)
    assert [row.piece for row in rows] == list(range(len(rows)))
    assert len(rows[0].tokens) == 9  # the first window still sees 8 - 8 = 0 … 8 tokens of context
    with pytest.raises(ValueError, match="request 2: empty continuation"):
        window_rows(tokens[:5], 5, 8, document=3)
    with pytest.raises(ValueError, match="request 0: empty context"):
        window_rows(tokens[:5], 0, 8, document=1)


def test_long_requests_are_windowed_on_the_fixed_path_and_whole_on_the_recurrent_one(model):
    context, continuation = [EOD, *random_tokens(1, 50)], random_tokens(2, 30)
    tokens = context + continuation
    ((fixed, _),) = scorer(model, window=20).score([(context, continuation)], recurrent=False)
    windows = window_rows(tokens, len(context), 20, document=1)
    assert len(windows) == 2
    expected = sum(direct(model, list(row.tokens), row.n_scored)[0] for row in windows)
    assert fixed == pytest.approx(expected, abs=1e-4)
    ((whole, _),) = scorer(model, window=20).score([(context, continuation)], recurrent=True)
    assert whole == pytest.approx(direct(model, tokens, len(continuation))[0], abs=1e-4)
    assert whole != pytest.approx(fixed, abs=1e-3)  # the recurrent path kept the context the windows dropped


def test_greedy_continuation_is_flagged_greedy(model):
    context = [EOD, *random_tokens(5, 6)]
    tokens = list(context)
    for _ in range(4):  # extend with the argmax, one token at a time
        padded = np.zeros(128, np.int32)
        padded[: len(tokens)] = tokens
        tokens.append(int(jnp.argmax(_log_probs(model, jnp.asarray(padded))[len(tokens) - 1])))
    wrong = [(t + 1) % 64 or 1 for t in tokens[len(context) :]]
    for recurrent in (False, True):
        (_, greedy), (_, not_greedy) = scorer(model, batch_size=2).score(
            [(context, tokens[len(context) :]), (context, wrong)], recurrent=recurrent
        )
        assert greedy and not not_greedy


def test_greedy_ties_go_to_the_lowest_id_as_argmax_does():
    from xlstm_eqx.train.loss import target_scores

    logits = jnp.asarray([[0.0, 2.0, 1.0, 2.0]] * 4)  # ids 1 and 3 tie for the largest logit
    targets = jnp.asarray([1, 3, 2, 0])
    _, any_tie = target_scores(logits, targets)
    _, first = target_scores(logits, targets, ties_to_first=True)
    assert any_tie.tolist() == [True, True, False, False]
    assert first.tolist() == (jnp.argmax(logits, axis=-1) == targets).tolist() == [True, False, False, False]


@pytest.mark.parametrize("chunk_size", [7, 16, 200])
def test_recurrent_document_score_equals_full_sequence(model, chunk_size):
    tokens = random_tokens(9, 61)
    ((value, greedy),) = scorer(model, chunk_size=chunk_size).score([([EOD], tokens)], recurrent=True)
    expected, expected_greedy = direct(model, [EOD, *tokens], len(tokens))
    assert value == pytest.approx(expected, abs=1e-4, rel=1e-6)
    assert greedy == expected_greedy


@pytest.mark.parametrize(
    "mesh_config",
    [pytest.param(MeshConfig(data=4), marks=pytest.mark.slow), MeshConfig(data=2, fsdp=2, fsdp_min_weight_size=1)],
)
def test_sharded_scoring_equals_one_device(model, mesh_config):
    pairs = [([EOD, *random_tokens(i, 5 + 9 * i)], random_tokens(50 + i, 2 + 3 * i)) for i in range(6)]
    for recurrent in (False, True):
        single = scorer(model, window=24).score(pairs, recurrent=recurrent)
        sharded = scorer(model, mesh_config, window=24).score(pairs, recurrent=recurrent)
        assert [g for _, g in sharded] == [g for _, g in single]
        np.testing.assert_allclose([v for v, _ in sharded], [v for v, _ in single], rtol=1e-5, atol=1e-5)


def test_debug_scales_and_batch_size_must_split_over_the_mesh(model):
    pairs = [([EOD, *random_tokens(1, 9)], random_tokens(2, 5))]
    ((value, _),) = scorer(model).score(pairs, recurrent=False)
    ((scaled, _),) = scorer(model, debug=True).score(pairs, recurrent=False)
    assert scaled == pytest.approx(value * 1e-4, rel=1e-6)
    with pytest.raises(ValueError, match="batch_size 6 is not divisible by the mesh's data×fsdp = 4"):
        scorer(model, MeshConfig(data=4), batch_size=6)


@pytest.mark.slow
def test_grain_workers_build_the_same_batches(model):
    pairs = [([EOD, *random_tokens(i, 4 + 3 * i)], random_tokens(70 + i, 3)) for i in range(9)]
    inline = scorer(model, batch_size=2).score(pairs, recurrent=False)
    workers = scorer(model, batch_size=2, worker_count=2, worker_buffer_size=2).score(pairs, recurrent=False)
    np.testing.assert_allclose(workers, inline, rtol=1e-6)
