"""lm-eval from an LMEvalConfig: the training job scores its tested checkpoint and logs ``lmeval_<task>_<metric>``;
every config field reaches lm-eval or the scorer; lm-eval's own CLI runs ``--model xlstm_eqx`` on a checkpoint;
bad tasks, checkpoints and tokenizers fail clearly."""

import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from loop_setup import job_config

from xlstm_eqx.config import ConfigError, LMEvalConfig, from_dict
from xlstm_eqx.data.tokenizer import Tokenizer, train_bpe_tokenizer
from xlstm_eqx.eval import lm_eval_registration
from xlstm_eqx.eval.lm_eval_run import flatten_results, lm_from_checkpoint, run_lm_eval
from xlstm_eqx.eval.tasks import bundled_task_dir
from xlstm_eqx.io.checkpoint import CheckpointError
from xlstm_eqx.loop.restore import load_from_checkpoint

LM_EVAL = ["lm_eval.evaluation_tasks=[shakespeare]", "lm_eval.limit_requests=2", "lm_eval.bootstrap_iters=0",
           "lm_eval.write_out=true", "lm_eval.batch_size=8", "lm_eval.context_length=64"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """lm-eval and HF datasets offline, their caches in temporary folders; restored after this module."""
    import lm_eval.caching.cache as cache

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cache, "PATH", str(tmp_path_factory.mktemp("lm_eval_cache")))
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        yield


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """A tiny trained run that ran lm-eval on the bundled group after its test pass."""
    from xlstm_eqx.loop.job import train_job

    run_dir = tmp_path_factory.mktemp("lm_eval_run") / "run"
    # mode=max makes the worse validation (step 2) the "best" checkpoint, so the test runs on another step
    config = job_config(corpus, run_dir, "loop.num_train_steps=4", "loop.check_val_every_n_steps=2",
                        "checkpoint.every_n_steps=4", "checkpoint.monitor=loss", "checkpoint.mode=max",
                        *LM_EVAL)  # fmt: skip
    return run_dir, train_job(config)


@pytest.fixture(scope="module")
def lm(run):
    return lm_from_checkpoint(run[0], batch_size=4, context_length=64)


def test_the_job_scores_its_tested_checkpoint_and_logs_lmeval_metrics(run):
    run_dir, summary = run
    assert summary["status"] == "success"
    expected = ["lmeval_shakespeare_cloze_acc", "lmeval_shakespeare_cloze_perplexity",
                "lmeval_shakespeare_next_line_acc_norm", "lmeval_shakespeare_ppl_word_perplexity",
                "lmeval_shakespeare_ppl_token_perplexity"]  # fmt: skip
    for key in expected:
        assert math.isfinite(summary[key]), key
    assert math.isnan(summary["lmeval_shakespeare_cloze_acc_stderr"])  # bootstrap_iters=0: lm-eval says N/A
    with open(run_dir / "metrics_test.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["lmeval_shakespeare_cloze_acc"]) == summary["lmeval_shakespeare_cloze_acc"]
    assert "lmeval_shakespeare_cloze_acc" not in (run_dir / "metrics_val.csv").read_text()  # at_validation off
    assert "lm-eval results:" in (run_dir / "output.log").read_text()
    (saved,) = (run_dir / "lm_eval").iterdir()
    assert summary["test_checkpoint_step"] == 2 and saved.name == "test_step2"  # named after the scored checkpoint
    for task in ("shakespeare_cloze", "shakespeare_next_line", "shakespeare_ppl"):
        (samples,) = saved.glob(f"samples_{task}_*.jsonl")
        assert len(samples.read_text().splitlines()) == 2  # limit_requests
    (results,) = saved.glob("results*.json")
    assert json.loads(results.read_text())["results"]["shakespeare_cloze"]["acc,none"] == pytest.approx(
        summary["lmeval_shakespeare_cloze_acc"]
    )


def test_token_perplexity_is_derived_from_the_rolling_loglikelihoods(run):
    run_dir, summary = run
    (samples,) = (run_dir / "lm_eval" / "test_step2").glob("samples_shakespeare_ppl_*.jsonl")
    tokenizer = Tokenizer.load()
    total = tokens = 0.0
    for sample in map(json.loads, samples.read_text().splitlines()):
        total += float(sample["filtered_resps"][0])
        tokens += len(tokenizer.encode(sample["arguments"]["gen_args_0"]["arg_0"]))
    assert summary["lmeval_shakespeare_ppl_token_perplexity"] == pytest.approx(math.exp(-total / tokens), rel=1e-5)


def test_prompt_fields_reach_lm_eval(lm, tmp_path):
    config = LMEvalConfig(evaluation_tasks=("shakespeare_next_line",), limit_requests=1, bootstrap_iters=0,
                          num_fewshot=1, system_instruction="Judge the verse.", apply_chat_template=True,
                          write_out=True, cache_requests=False)  # fmt: skip
    result = run_lm_eval(lm, config, output_dir=tmp_path)
    (samples,) = tmp_path.glob("samples_shakespeare_next_line_*.jsonl")
    prompt = json.loads(samples.read_text().splitlines()[0])["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.startswith("SYSTEM: Judge the verse.\n\nUSER:")  # the adapter's role-tagged template
    assert prompt.count("USER:") == 2 and "ASSISTANT:" in prompt  # one few-shot example, then the question
    assert 0 <= result.metrics["lmeval_shakespeare_next_line_acc"] <= 1
    custom = LMEvalConfig(evaluation_tasks=("shakespeare_next_line",), limit_requests=1, bootstrap_iters=0,
                          apply_chat_template="{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}",
                          write_out=True, cache_requests=False)  # fmt: skip
    run_lm_eval(lm, custom, output_dir=tmp_path / "custom")
    (samples,) = (tmp_path / "custom").glob("samples_shakespeare_next_line_*.jsonl")
    assert json.loads(samples.read_text().splitlines()[0])["arguments"]["gen_args_0"]["arg_0"].startswith("<<")


def test_bootstrap_iters_and_request_cache(lm, tmp_path, monkeypatch):
    import lm_eval.caching.cache as cache

    monkeypatch.setattr(cache, "PATH", str(tmp_path / "cache"))
    config = LMEvalConfig(evaluation_tasks=("shakespeare_cloze",), limit_requests=3, bootstrap_iters=10,
                          cache_requests=True)  # fmt: skip
    first = run_lm_eval(lm, config).metrics
    assert math.isfinite(first["lmeval_shakespeare_cloze_acc_stderr"])
    assert any((tmp_path / "cache").iterdir())  # the built requests were cached
    again = run_lm_eval(lm, config).metrics  # from the cache: same requests, same scores
    assert again["lmeval_shakespeare_cloze_perplexity"] == first["lmeval_shakespeare_cloze_perplexity"]


def test_cached_requests_are_rebuilt_when_what_shapes_them_changes(lm, tmp_path):
    """lm-eval keys its request cache by task name and few-shot count only: a new chat template (or seed, or
    task files) must not be answered with the prompts cached for the old one."""
    for mark in ("<<", "[["):
        config = LMEvalConfig(evaluation_tasks=("shakespeare_next_line",), limit_requests=1, bootstrap_iters=0,
                              apply_chat_template=mark + "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                              write_out=True, cache_requests=True)  # fmt: skip
        run_lm_eval(lm, config, output_dir=tmp_path / mark)
        (samples,) = (tmp_path / mark).glob("samples_shakespeare_next_line_*.jsonl")
        assert json.loads(samples.read_text().splitlines()[0])["arguments"]["gen_args_0"]["arg_0"].startswith(mark)


def test_the_request_cache_key_covers_task_files_seed_and_template(tmp_path):
    from xlstm_eqx.eval.request_cache import request_digest

    tasks = tmp_path / "tasks"
    shutil.copytree(bundled_task_dir(), tasks)
    config = LMEvalConfig(evaluation_tasks=("shakespeare_cloze",), num_fewshot=1)
    base = request_digest(config, tasks, None)
    assert request_digest(config, tasks, None) == base
    assert request_digest(dataclasses.replace(config, seed=1), tasks, None) != base
    assert request_digest(config, tasks, "{{ messages }}") != base
    (tasks / "__pycache__").mkdir(exist_ok=True)
    (tasks / "__pycache__" / "x.pyc").write_bytes(b"bytecode")  # not an input
    assert request_digest(config, tasks, None) == base
    cloze = tasks / "shakespeare_cloze.jsonl"
    cloze.write_text(cloze.read_text().replace("MALCOLM", "DUNCAN", 1))
    assert request_digest(config, tasks, None) != base


def test_scoring_fields_reach_the_scorer(run):
    lm = lm_from_checkpoint(run[0], context_length=48, batch_size=2, infinite_eval_chunksize=8, worker_count=0,
                            worker_buffer_size=3, debug=True, use_infinite_eval=False, max_gen_toks=5)  # fmt: skip
    settings = lm.scorer.settings
    assert (settings.window, settings.batch_size, settings.chunk_size) == (48, 2, 8)
    assert (settings.worker_buffer_size, settings.debug, lm.use_infinite_eval, lm.max_gen_toks) == (3, True, False, 5)
    default = lm_from_checkpoint(run[0])
    data = load_from_checkpoint(run[0]).config.data
    assert default.scorer.settings.window == data.seq_len
    assert default.scorer.settings.batch_size == (data.eval_batch_size or data.global_batch_size)
    assert default.use_infinite_eval and default.scorer.settings.chunk_size == 64


def test_flattened_names():
    flat = flatten_results({"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "em,strict-match": 1}})
    assert flat["lmeval_t_acc"] == 0.5 and math.isnan(flat["lmeval_t_acc_stderr"])
    assert flat["lmeval_t_em_strict-match"] == 1.0 and "lmeval_t_alias" not in flat


def test_lm_eval_cli_runs_the_registered_model_on_a_checkpoint(run, tmp_path):
    if not lm_eval_registration.pth_path().is_file():
        pytest.fail("lm-eval registration missing: run `python -m xlstm_eqx.eval.lm_eval_registration install`")
    lm_eval = Path(sys.executable).parent / "lm_eval"
    command = [str(lm_eval), "--model", "xlstm_eqx", "--model_args", f"checkpoint={run[0]},context_length=64",
               "--tasks", "shakespeare_cloze", "--include_path", str(bundled_task_dir()), "--limit", "2",
               "--batch_size", "4", "--output_path", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "shakespeare_cloze" in done.stdout and "acc" in done.stdout
    (results,) = (tmp_path / "out").rglob("results*.json")
    assert "acc,none" in json.loads(results.read_text())["results"]["shakespeare_cloze"]


def test_bad_inputs_are_clear(run, lm, tmp_path):
    with pytest.raises(
        ValueError, match="unknown lm-eval task.*'shakespeare_clozee' \\(did you mean 'shakespeare_cloze'"
    ):
        run_lm_eval(lm, LMEvalConfig(evaluation_tasks=("shakespeare_clozee",)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints in"):
        lm_from_checkpoint(tmp_path / "empty")
    other = train_bpe_tokenizer(["to be or not to be, that is the question"] * 20, 300, tmp_path / "other.json")
    with pytest.raises(ValueError, match="does not match the vocabulary the checkpoint in .* was trained with"):
        lm_from_checkpoint(run[0], tokenizer=str(other))
    with pytest.raises(FileNotFoundError, match="tokenizer_path: no tokenizer file at /nowhere.json"):
        lm_from_checkpoint(run[0], tokenizer="/nowhere.json")
    with pytest.raises(ConfigError, match="infinite_eval_chunksize"):
        from_dict(LMEvalConfig, {"infinite_eval_chunksize": 0})
    with pytest.raises(ConfigError, match="lm_eval.nonsense"):
        from_dict(LMEvalConfig, {"nonsense": 1}, "lm_eval")


def test_the_job_refuses_bad_lm_eval_settings_before_training(corpus, tmp_path):
    from xlstm_eqx.loop.job import train_job

    cases = [("lm_eval.batch_size=3", "lm_eval.batch_size 3 is not divisible by the mesh's data×fsdp = 8"),
             ("lm_eval.evaluation_tasks=[shakespear]", "did you mean 'shakespeare'")]  # fmt: skip
    for override, message in cases:
        run_dir = tmp_path / override.split("=")[0]
        with pytest.raises(ValueError, match=message):
            train_job(job_config(corpus, run_dir, "loop.num_train_steps=4", "lm_eval.evaluation_tasks=[shakespeare]",
                                 override))  # fmt: skip
        assert not list((run_dir / "checkpoints").glob("*"))  # nothing trained, nothing saved
