"""The lm-eval adapter: requests go through the tested scoring core; rolling paths agree; generation stops at
``until``; the bundled tasks run end to end through ``simple_evaluate``."""

import jax
import jax.numpy as jnp
import lm_eval
import numpy as np
import pytest
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from xlstm_eqx.config import ModelConfig
from xlstm_eqx.data.tokenizer import Tokenizer
from xlstm_eqx.eval.lm_adapter import XlstmEqxLM, bucketed_prompt
from xlstm_eqx.eval.scoring import ScoringSettings
from xlstm_eqx.eval.tasks import BUNDLED_TASKS, bundled_task_dir
from xlstm_eqx.models import build
from xlstm_eqx.models.generate import generate_jit


@pytest.fixture(scope="module")
def lm():
    model = build(ModelConfig(vocab_size=4096, embedding_dim=32, num_blocks=1, num_heads=2, chunk_size=16),
                  key=jax.random.key(0))  # fmt: skip
    return XlstmEqxLM(model, Tokenizer.load(), ScoringSettings(window=64, batch_size=4, chunk_size=16))


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_rolling_paths_agree_and_equal_a_single_continuation(lm):
    text = "Is this a dagger which I see before me, the handle toward my hand? Come, let me clutch thee."
    recurrent = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])[0]
    lm.use_infinite_eval = False
    try:
        windowed = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])[0]
    finally:
        lm.use_infinite_eval = True
    assert len(lm.tok_encode(text)) < 64  # one window: both paths see the whole text
    assert recurrent == pytest.approx(windowed, abs=1e-4)
    ((whole, _),) = lm._loglikelihood_tokens([(None, [lm.eot_token_id], lm.tok_encode(text))])
    assert recurrent == pytest.approx(whole, abs=1e-4)


def test_prompts_are_padded_to_a_few_lengths_without_changing_the_continuation(lm):
    eod = lm.eot_token_id
    assert [len(bucketed_prompt([eod, *range(1, n)], eod)) for n in (1, 5, 16, 17, 40)] == [16, 16, 16, 32, 64]
    assert bucketed_prompt([7, 8, 9], eod) == [7, 8, 9]  # no leading EOD (a window's tail): left as it is
    prompt = [eod, *lm.tok_encode("KING.\n")]
    runs = [generate_jit(lm.model, jnp.asarray(p, jnp.int32), 24, key=jax.random.key(0), temperature=0.0, eod_id=eod)
            for p in (prompt, bucketed_prompt(prompt, eod))]  # fmt: skip
    np.testing.assert_array_equal(*runs)


def test_generation_stops_at_until_and_max_tokens(lm):
    free = lm.generate_until([request("generate_until", "KING.\n", {"max_gen_toks": 24})])[0]
    prompt = jnp.asarray(bucketed_prompt([lm.eot_token_id, *lm.tok_encode("KING.\n")], lm.eot_token_id), jnp.int32)
    greedy = [int(t) for t in generate_jit(lm.model, prompt, 24, key=jax.random.key(0), temperature=0.0,
                                           eod_id=lm.eot_token_id)]  # fmt: skip
    assert free == lm.tok_decode(greedy[: greedy.index(lm.eot_token_id)] if lm.eot_token_id in greedy else greedy)
    stop = free[len(free) // 2 : len(free) // 2 + 2] or "e"
    cut = lm.generate_until([request("generate_until", "KING.\n", {"until": [stop], "max_gen_toks": 24})])[0]
    assert stop not in cut and free.startswith(cut)
    sampled = lm.generate_until([request("generate_until", "KING.\n", {"temperature": 1.0, "top_p": 0.9, "top_k": 50,
                                                                      "max_gen_toks": 8})])[0]  # fmt: skip
    assert isinstance(sampled, str)
    # lm-eval's default gen_kwargs: greedy, and the temperature that comes with do_sample=False is accepted
    defaults = {"until": [], "do_sample": False, "temperature": 0.0, "max_gen_toks": 24}
    assert lm.generate_until([request("generate_until", "KING.\n", defaults)])[0] == free
    # do_sample alone samples at temperature 1 (request 0's key)
    drawn = [int(t) for t in generate_jit(lm.model, prompt, 8, key=jax.random.fold_in(lm._key, 0), temperature=1.0,
                                          eod_id=lm.eot_token_id)]  # fmt: skip
    drawn = drawn[: drawn.index(lm.eot_token_id)] if lm.eot_token_id in drawn else drawn
    sampled = lm.generate_until([request("generate_until", "KING.\n", {"do_sample": True, "max_gen_toks": 8})])[0]
    assert sampled == lm.tok_decode(drawn)
    for no_top_k in (0, -1):  # the HF / vLLM spelling of "no top-k"
        kwargs = {"do_sample": True, "top_k": no_top_k, "max_gen_toks": 8}
        assert lm.generate_until([request("generate_until", "KING.\n", kwargs)])[0] == sampled
    with pytest.raises(ValueError, match="unsupported gen_kwargs \\['typical_p'\\]"):
        lm.generate_until([request("generate_until", "KING.\n", {"typical_p": 0.9})])


def test_bundled_tasks_run_through_simple_evaluate(lm, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    manager = TaskManager(include_path=str(bundled_task_dir()), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(BUNDLED_TASKS), task_manager=manager, limit=3,
                                      bootstrap_iters=0)  # fmt: skip
    scores = results["results"]
    assert scores["shakespeare_cloze"]["perplexity,none"] > 1
    assert 0 <= scores["shakespeare_next_line"]["acc,none"] <= 1
    assert scores["shakespeare_ppl"]["word_perplexity,none"] > 1
