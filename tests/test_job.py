"""The main job end to end on a small text corpus, restore onto other meshes, and bad run directories."""

import json
import logging
import math

import jax
import numpy as np
import pytest
from loop_setup import MODEL, Stream, eval_set, job_config, setup

from xlstm_eqx.config import Config, ConfigError, to_dict
from xlstm_eqx.config.mesh import MeshConfig
from xlstm_eqx.config.run import CheckpointConfig, LoopConfig
from xlstm_eqx.io.checkpoint import Checkpointer
from xlstm_eqx.loop import LogPathError, checkpoint_hook, evaluate, fit
from xlstm_eqx.loop.job import train_job
from xlstm_eqx.loop.restore import load_from_checkpoint, load_pretrained
from xlstm_eqx.train.optim import optimizer_step_count


def test_job_trains_tests_on_the_best_checkpoint_and_leaves_artifacts(corpus, tmp_path):
    # checkpoints every 4 steps coincide with the validations: those saves must carry the validation metrics
    summary = train_job(job_config(corpus, tmp_path / "run", "checkpoint.every_n_steps=4"), sample_prompt="KING:",
                        sample_tokens=8)  # fmt: skip
    run = tmp_path / "run"
    assert summary["status"] == "success" and summary["steps"] == 12
    assert math.isfinite(summary["val_perplexity"]) and summary["unigram_val_perplexity"] > 1
    steps = Checkpointer(run / "checkpoints", CheckpointConfig(monitor="loss"), read_only=True)
    best = steps.best_step()
    val = {r["log_step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
           if r["mode"] == "val"}  # fmt: skip
    assert best == min(val, key=val.get) and summary["test_checkpoint_step"] == best
    assert 12 in steps.steps()  # the final state is always saved
    assert isinstance(summary["sample"], str)
    assert (run / "tensorboard" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "status.json").read_text())["status"] == "success"
    text = (run / "output.log").read_text()
    assert "parameters:\nparameter " in text and "lm_head.weight " in text  # the parameter table
    loaded = load_from_checkpoint(run)
    assert loaded.step == 12 and loaded.config == job_config(corpus, run, "checkpoint.every_n_steps=4")


def test_restore_onto_other_meshes_gives_the_same_eval_loss(tmp_path):
    fsdp8 = MeshConfig(data=1, fsdp=8, fsdp_min_weight_size=0)
    state, train_step, eval_step, *_ = setup(mesh_config=fsdp8, total_steps=10)
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(state.params))
    config = Config(model=MODEL, mesh=fsdp8)
    checkpointer = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    meta = lambda e: {"config": to_dict(config), "total_steps": 10}  # noqa: E731
    hooks = [checkpoint_hook(checkpointer, CheckpointConfig(every_n_steps=4), meta)]
    result = fit(state, train_step, eval_step, Stream(), config=LoopConfig(num_train_steps=4), hooks=hooks)
    checkpointer.close()
    expected = evaluate(eval_step, result.state, eval_set(2))["loss"]
    for mesh, devices in [(MeshConfig(data=1, fsdp=2, fsdp_min_weight_size=0), jax.devices()[:2]),
                          (MeshConfig(data=1), jax.devices()[:1])]:  # fmt: skip
        loaded = load_from_checkpoint(tmp_path, mesh=mesh, devices=devices)
        assert loaded.step == 4 and len(jax.tree.leaves(loaded.state.params)[0].sharding.device_set) == len(devices)
        _, _, eval_other, *_ = setup(mesh_config=mesh, devices=devices)
        assert evaluate(eval_other, loaded.state, eval_set(2))["loss"] == pytest.approx(expected, rel=2e-6)
    # load_pretrained without the optimizer state: the schedule continues from the restored step.
    fresh, *_ = setup(mesh_config=MeshConfig(data=1), devices=jax.devices()[:1])
    restored, _ = load_pretrained(tmp_path, fresh, "latest", optimizer=False)
    assert int(restored.step) == 4 and int(optimizer_step_count(restored.opt_state)) == 4
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(restored.params)),
                                                     jax.tree.leaves(jax.device_get(result.state.params))))  # fmt: skip


def test_run_directory_of_another_model_is_refused_and_kept(corpus, tmp_path):
    run = tmp_path / "run"
    train_job(job_config(corpus, run, "loop.num_train_steps=5", "loop.check_val_every_n_steps=-1",
                         "checkpoint.monitor=null"))  # fmt: skip
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match=r"another model config.*model\.embedding_dim: 32 in the checkpoint, 48 now"):
        train_job(job_config(corpus, run, "model.embedding_dim=48", "checkpoint.monitor=null"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert json.loads((run / "status.json").read_text())["status"] == "error"
    # the same weights under another execution policy resume
    resumed = train_job(job_config(corpus, run, "loop.num_train_steps=6", "loop.check_val_every_n_steps=-1",
                                   "checkpoint.monitor=null", "model.remat=none", "model.kernel=parallel"))  # fmt: skip
    assert (resumed["status"], resumed["resumed_from_step"], resumed["steps"]) == ("success", 5, 6)


def test_checkpoints_without_optimizer_state_resume_on_schedule(corpus, tmp_path):
    run = tmp_path / "run"
    args = ["loop.check_val_every_n_steps=-1", "checkpoint.monitor=null", "checkpoint.save_optimizer=false",
            "hooks.lr_monitor_every_n_steps=1", "data.test_files=[]"]  # fmt: skip
    train_job(job_config(corpus, run, "loop.num_train_steps=5", *args))
    assert not (run / "checkpoints" / "5" / "opt_state").exists()
    summary = train_job(job_config(corpus, run, "loop.num_train_steps=7", *args))
    assert summary["resumed_from_step"] == 5 and summary["status"] == "success"
    loaded = load_from_checkpoint(run)  # rebuilds a fresh optimizer state, counted from the restored step
    assert loaded.step == 7 and int(optimizer_step_count(loaded.state.opt_state)) == 7
    lr = {r["log_step"]: r["optimizer/lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
          if "optimizer/lr" in r}  # fmt: skip
    assert sorted(lr) == [1, 2, 3, 4, 5, 6, 7]
    assert lr[1] < lr[6] <= lr[5]  # on the decaying schedule (warmup: 2 steps), not warming up again


def test_corrupt_latest_checkpoint_falls_back_and_says_so(corpus, tmp_path, caplog):
    run = tmp_path / "run"
    args = ["loop.check_val_every_n_steps=-1", "checkpoint.monitor=null", "checkpoint.keep_latest=3"]
    train_job(job_config(corpus, run, "loop.num_train_steps=10", *args))
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 10 and len(steps) >= 2
    latest = run / "checkpoints" / "10"
    for path in latest.rglob("*"):
        if path.is_file() and path.stat().st_size > 0 and "state" in path.parts:
            path.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        summary = train_job(job_config(corpus, run, *args))
    assert summary["resumed_from_step"] == steps[-2] and summary["status"] == "success"
    assert "checkpoint 10" in caplog.text and "unreadable" in caplog.text
    assert f"falling back to {steps[-2]}" in caplog.text
    assert (run / "checkpoints" / "unreadable" / "10").is_dir()  # set aside, not deleted


def test_monitor_errors_are_clear(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint.monitor: 'perplexity_x' is not among the validation metrics"):
        train_job(job_config(corpus, tmp_path / "a", "checkpoint.monitor=perplexity_x", "checkpoint.every_n_steps=2"))
    kept = Checkpointer(tmp_path / "a" / "checkpoints", CheckpointConfig(), read_only=True)
    assert kept.steps() == [2, 4]  # step 4 is saved at its validation before the error: no training is lost
    status = json.loads((tmp_path / "a" / "status.json").read_text())
    assert status["status"] == "error" and "perplexity_x" in status["error"]  # the run's record says why
    text = (tmp_path / "a" / "output.log").read_text()
    assert "the run failed" in text and "Traceback" in text and "step 2/" in text
    with pytest.raises(ConfigError, match="never validates"):
        train_job(job_config(corpus, tmp_path / "b", "loop.check_val_every_n_steps=-1",
                             "loop.check_val_every_n_epoch=-1"))  # fmt: skip


def test_unwritable_run_directory(corpus, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LogPathError, match="cannot write to the run directory"):
        train_job(job_config(corpus, blocker / "run"))


@pytest.mark.slow  # the sharded step itself is checked against one device in test_train_step; this is the whole job
def test_sharded_job_equals_single_device_job(corpus, tmp_path):
    # SGD: float32 Adam amplifies reduction-order rounding step after step; SGD keeps it at rounding level.
    common = ["optim.name=sgd", "optim.momentum=0.9", "optim.weight_decay=0.0", "optim.learning_rate=0.3",
              "loop.num_train_steps=8", "checkpoint.enabled=false", "checkpoint.monitor=null"]  # fmt: skip
    single = train_job(job_config(corpus, tmp_path / "one", "mesh.data=1", *common))
    sharded = train_job(job_config(corpus, tmp_path / "four", "mesh.data=2", "mesh.fsdp=2",
                                   "mesh.fsdp_min_weight_size=0", *common))  # fmt: skip
    assert single["status"] == sharded["status"] == "success"
    assert sharded["val_loss"] == pytest.approx(single["val_loss"], rel=1e-6)
    # compare losses (log perplexity): exp turns a rounding-level loss difference into a larger relative one
    assert math.log(sharded["test_perplexity"]) == pytest.approx(math.log(single["test_perplexity"]), rel=1e-6)
    rows = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    parallel = [r for r in rows(tmp_path / "four") if r["mode"] == "parallel"][0]
    assert (parallel["mesh_data"], parallel["mesh_fsdp"]) == (2, 2)


def test_an_eval_batch_the_mesh_cannot_split_is_refused_before_anything_runs(corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"data.eval_batch_size: 3 rows do not split over the mesh's data × fsdp = 2"):
        train_job(job_config(corpus, tmp_path / "run", "mesh.data=2", "data.eval_batch_size=3"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_named_validation_sets_are_validated_and_monitored_each_on_its_own(corpus, tmp_path):
    sets = f"data.validation_files=[plays={corpus}/val.txt,again={corpus}/val.txt,tests={corpus}/test.txt]"
    args = [sets, "checkpoint.monitor=tests_loss", "loop.num_train_steps=4", "data.test_files=[]"]
    summary = train_job(job_config(corpus, tmp_path / "run", *args))
    assert summary["status"] == "success"
    assert summary["val_plays_loss"] == summary["val_again_loss"] != summary["val_tests_loss"]  # same file, same loss
    assert summary["unigram_val_plays_perplexity"] > 1 and summary["val_loss"] is None
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["mode"] == "val"]
    assert val and all({"plays_loss", "again_loss", "tests_perplexity"} <= set(r) and "loss" not in r for r in val)
