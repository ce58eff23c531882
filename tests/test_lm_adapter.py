"""The lm-eval adapter: requests go through the tested scoring core; rolling paths agree; generation stops at
``until``; the bundled tasks run end to end through ``simple_evaluate``."""

import jax
import jax.numpy as jnp
import lm_eval
import pytest
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from xlstm_eqx.config import ModelConfig
from xlstm_eqx.data.tokenizer import Tokenizer
from xlstm_eqx.eval.lm_adapter import XlstmEqxLM
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


def test_generation_stops_at_until_and_max_tokens(lm):
    free = lm.generate_until([request("generate_until", "KING.\n", {"max_gen_toks": 24})])[0]
    prompt = jnp.asarray([lm.eot_token_id, *lm.tok_encode("KING.\n")], jnp.int32)
    greedy = [int(t) for t in generate_jit(lm.model, prompt, 24, key=jax.random.key(0), temperature=0.0,
                                           eod_id=lm.eot_token_id)]  # fmt: skip
    assert free == lm.tok_decode(greedy[: greedy.index(lm.eot_token_id)] if lm.eot_token_id in greedy else greedy)
    stop = free[len(free) // 2 : len(free) // 2 + 2] or "e"
    cut = lm.generate_until([request("generate_until", "KING.\n", {"until": [stop], "max_gen_toks": 24})])[0]
    assert stop not in cut and free.startswith(cut)
    sampled = lm.generate_until([request("generate_until", "KING.\n", {"temperature": 1.0, "top_p": 0.9, "top_k": 50,
                                                                      "max_gen_toks": 8})])[0]  # fmt: skip
    assert isinstance(sampled, str)
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
