"""Multi-process runs on JAX's distributed runtime, as local processes over loopback.

Every run is bounded (launcher deadline, short heartbeat timeouts); coordinators bind 127.0.0.1 on a port
reserved with a lock, so parallel test runs cannot cross-talk. The training documents fill exactly one row
each, so the union of the processes' local batches is the single-process batch and the runs must agree to
float reduction-order noise (rtol 1e-5).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from xlstm_eqx.config import load_config
from xlstm_eqx.config.mesh import MeshConfig
from xlstm_eqx.loop.job import train_job
from xlstm_eqx.loop.restore import load_from_checkpoint
from xlstm_eqx.parallel.distributed import DistributedError, check_port_free, resolve
from xlstm_eqx.parallel.launch import dump_stacks, launch_local, reserved_port, start_ranks, stop_ranks, supervise

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN, BATCH = 32, 8
LM_EVAL = ["lm_eval.evaluation_tasks=[shakespeare]", "lm_eval.limit_requests=2", "lm_eval.bootstrap_iters=0",
           "lm_eval.write_out=false"]  # fmt: skip


def _exact_documents(texts: list[str], count: int, tokens: int) -> list[str]:
    """``count`` text pieces that tokenise to exactly ``tokens`` tokens (one full training row each)."""
    from xlstm_eqx.data.tokenizer import DEFAULT_TOKENIZER, Tokenizer

    tokenizer, docs = Tokenizer.load(DEFAULT_TOKENIZER), []
    text, position = "\n".join(texts), 0
    while len(docs) < count:
        piece = tokenizer.decode(tokenizer.encode(text[position : position + 8 * tokens])[: tokens + 4])
        while len(tokenizer.encode(piece)) > tokens:
            piece = piece[:-1]
        if len(tokenizer.encode(piece)) == tokens:
            docs.append(piece)
        position += len(piece) + 1
    return docs


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> Path:
    from xlstm_eqx.data.corpus import default_corpus

    root = tmp_path_factory.mktemp("mp_docs")
    plays = [p.read_text()[:20_000] for p in default_corpus("train")[:2]]
    lines = (json.dumps({"text": d}) for d in _exact_documents(plays, 64, SEQ_LEN - 1))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "val.txt").write_text(default_corpus("validation")[0].read_text()[:3_000])
    (root / "test.txt").write_text(default_corpus("test")[0].read_text()[:2_000])
    return root


def overrides(documents: Path, run_dir: Path, steps: int, *extra: str, test: bool = False) -> list[str]:
    return [
        "seed=0", "model.embedding_dim=32", "model.num_blocks=1", "model.num_heads=2", "model.chunk_size=16",
        "data.corpus=files", f"data.train_files=[{documents}/train.jsonl]",
        f"data.validation_files=[{documents}/val.txt]", f"data.test_files=[{documents / 'test.txt'}]" if test
        else "data.test_files=[]", f"data.seq_len={SEQ_LEN}", f"data.global_batch_size={BATCH}",
        f"data.eval_batch_size={BATCH}", "optim.warmup_steps=2", "optim.decay_steps=8", "mesh.data=4",
        f"loop.num_train_steps={steps}", "loop.check_val_every_n_steps=4", "loop.check_val_every_n_epoch=0",
        "loop.enable_progress_bar=false", "log.log_every_n_steps=1", "checkpoint.every_n_steps=4",
        "checkpoint.keep_latest=5", f"log.run_dir={run_dir}", *(LM_EVAL if test else ["lm_eval.evaluation_tasks=[]"]),
        *extra,
    ]  # fmt: skip


def train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "xlstm_eqx.cli", "train", "--config", "configs/shakespeare.yaml",
            "--sample-tokens", "0", "--heartbeat-timeout", "10", "--initialization-timeout", "60", *args]  # fmt: skip


def launch_logged(command: list[str], log_dir: Path, processes: int, devices: int, timeout_s: float) -> dict[str, str]:
    """Runs ``command`` as ``processes`` ranks of ``devices`` CPU devices each; their logs by file name
    (``rank0.log``, …), all of them shown if the run did not succeed."""
    result = launch_local(command, processes, cpu_devices=devices, timeout_s=timeout_s, log_dir=log_dir, cwd=ROOT)
    logs = {p.name: p.read_text() for p in log_dir.glob("rank*.log")}
    assert result.ok, f"{result.reason}\n" + "\n".join(f"--- {k}\n{v[-3000:]}" for k, v in sorted(logs.items()))
    return logs


def launch(run_dir: Path, processes: int, devices: int, args: list[str], *flags: str, timeout_s: float = 240):
    log_dir = run_dir / f"ranks_{processes}x{devices}"
    return launch_logged(train_command(*flags, *args), log_dir, processes, devices, timeout_s)


def rows(run_dir: Path, mode: str) -> dict[int, dict]:
    """The rows of ``mode`` with a loss by step; a step written twice (by two processes, or twice by one) fails."""
    found: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["mode"] == mode and ("loss_mean" in row or "loss" in row):
            assert row["log_step"] not in found, f"{mode} step {row['log_step']} was written twice"
            found[row["log_step"]] = row
    return found


def assert_weights_agree(ours: np.ndarray, reference: np.ndarray, rtol: float = 1e-5) -> None:
    """Trained weights agree to reduction-order noise: |ours - reference| ≤ rtol·|reference| in norm, per leaf.

    Not element by element: Adam divides each gradient by its own running scale, so an element whose gradient
    nearly cancels turns reduction-order noise into a visible difference. Measured in ONE process on this
    test's run (8 steps): embedding[1031, 25] differs by 4.0× an elementwise rtol 1e-5/atol 1e-6 between a
    1-device and a 4-device mesh, 2.2× between 2 and 4 devices, while every other element stays under 0.5×.
    A real disagreement (a row seen by the wrong process, a missed gradient reduction) moves many elements
    by a learning-rate step and fails the norm by orders of magnitude.
    """
    assert ours.shape == reference.shape
    difference, scale = np.linalg.norm(ours - reference), np.linalg.norm(reference)
    assert difference <= rtol * scale, f"weights differ by {difference:.3g} (norm), {difference / scale:.3g} relative"


def summary(log: str) -> dict:
    return json.loads([line for line in log.splitlines() if line.startswith('{"status"')][-1])


@pytest.fixture(scope="module")
def single_run(documents, tmp_path_factory) -> Path:
    """The reference: one process with 4 devices (this one), 8 steps, then the test pass and lm-eval."""
    run_dir = tmp_path_factory.mktemp("mp") / "single"
    assert train_job(load_config(ROOT / "configs/shakespeare.yaml", overrides(documents, run_dir, 8, test=True)))[
        "status"] == "success"  # fmt: skip
    return run_dir


def test_two_processes_train_resume_and_evaluate_like_one(documents, single_run, tmp_path):
    run_dir = tmp_path / "two"
    launch(run_dir, 2, 2, overrides(documents, run_dir, 4))  # stops at step 4 (a checkpoint) ...
    logs = launch(run_dir, 2, 2, overrides(documents, run_dir, 8, test=True), "--sample-tokens", "4")  # resumes
    assert summary(logs["rank0.log"])["resumed_from_step"] == 4
    assert "--- sample (4 tokens" in logs["rank0.log"]  # sampled on all processes (the weights span both)
    for mode in ("train", "val", "test"):
        ours, reference = rows(run_dir, mode), rows(single_run, mode)
        assert sorted(ours) == sorted(reference) and ours, mode
        keys = ["loss_mean" if mode == "train" else "loss"] + [k for k in reference[8] if k.startswith("lmeval_")]
        assert mode != "test" or len(keys) > 3  # the lm-eval metrics are there
        for step in reference:
            for key in keys:
                np.testing.assert_allclose(ours[step][key], reference[step][key], rtol=1e-5, err_msg=f"{mode} {key}")
    # every process wrote its shards into the one checkpoint, and its own data-stream position
    latest = run_dir / "checkpoints" / "8"
    assert {p.name for p in (latest / "state").glob("ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}
    meta = load_from_checkpoint(run_dir, mesh=MeshConfig(data=1), devices=jax.devices()[:1])  # 2 processes → 1
    assert meta.meta["data_state"]["process_count"] == 2 and len(meta.meta["data_state"]["processes"]) == 2
    reference = load_from_checkpoint(single_run, mesh=MeshConfig(data=1), devices=jax.devices()[:1])
    for a, b in zip(jax.tree.leaves(meta.state.params), jax.tree.leaves(reference.state.params), strict=True):
        assert_weights_agree(np.asarray(a), np.asarray(b))
    assert "Traceback" not in logs["rank1.log"]


def test_steps_called_back_to_back_across_processes_finish_and_agree(tmp_path):
    """Two processes of two CPU devices each, the steps dispatched without waiting (see mp_back_to_back_steps)."""
    from mp_back_to_back_steps import run

    script = [sys.executable, str(ROOT / "tests" / "mp_back_to_back_steps.py")]
    logs = launch_logged(script, tmp_path / "ranks", 2, 2, timeout_s=120)
    ours = [json.loads(logs[f"rank{r}.log"].strip().splitlines()[-1]) for r in range(2)]
    reference = run(jax.devices()[:4])  # one process, the same four-way data-parallel mesh
    assert ours[0] == ours[1] and ours[0]["must_wait"] and not reference["must_wait"]
    for key in ("eval_loss", "recurrent_loss", "train_loss", "embedding_abs_sum"):
        np.testing.assert_allclose(ours[0][key], reference[key], rtol=1e-5, err_msg=key)
    assert ours[0]["steps"] == reference["steps"] == 60


def test_one_process_checkpoint_resumes_as_two_slurm_tasks(documents, single_run, tmp_path):
    run_dir = tmp_path / "slurm"
    shutil.copytree(single_run / "checkpoints", run_dir / "checkpoints")
    base = {k: v for k, v in os.environ.items() if not k.startswith("XLSTM_EQX_") and "_proxy" not in k.lower()}
    slurm = {"SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2", "JAX_PLATFORMS": "cpu",
             "JAX_NUM_CPU_DEVICES": "2", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    (run_dir / "ranks").mkdir()
    procs = []
    # JAX derives the coordinator port from SLURM_JOB_ID: SLURM_JOB_ID % 4096 + 61440
    with reserved_port(candidates=range(61440, 65536)) as port:
        slurm.update(SLURM_JOB_ID=str(port - 61440), XLSTM_EQX_BIND_ADDRESS=f"127.0.0.1:{port}")
        try:
            for rank in range(2):
                env = {**base, **slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)}
                command = train_command(*overrides(documents, run_dir, 10))
                with open(run_dir / "ranks" / f"rank{rank}.log", "w") as out:
                    procs.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                                  start_new_session=True))  # fmt: skip
            reason = supervise(procs, 240)
        finally:
            stop_ranks(procs)
    log = (run_dir / "ranks" / "rank0.log").read_text()
    assert [p.returncode for p in procs] == [0, 0], f"{reason}\n{log[-3000:]}"
    assert "joining a run of 2 processes as process 0 via SLURM" in log
    assert summary(log)["resumed_from_step"] == 8 and summary(log)["steps"] == 10
    assert "written by 1 processes and this run has 2" in log  # the data stream restarts, and says so
    assert sorted(rows(run_dir, "train")) == [9, 10]


def test_a_killed_rank_ends_the_run_with_an_error(documents, tmp_path):
    run_dir = tmp_path / "killed"
    args = overrides(documents, run_dir, 100_000, "checkpoint.enabled=false", "loop.check_val_every_n_steps=0")
    with reserved_port() as port:
        procs = start_ranks(train_command(*args), 2, port, cpu_devices=2, log_dir=run_dir / "ranks", cwd=ROOT)
        try:
            deadline = time.monotonic() + 180
            metrics = run_dir / "metrics.jsonl"
            while not (metrics.exists() and '"loss_mean"' in metrics.read_text()):
                assert time.monotonic() < deadline and procs[0].poll() is None, "the run never started training"
                time.sleep(0.2)
            os.killpg(procs[1].pid, signal.SIGKILL)
            killed = time.monotonic()
            code = procs[0].wait(timeout=60)
            assert time.monotonic() - killed < 60
        finally:
            stop_ranks(procs)
    assert code != 0
    # How rank 0 learns of it depends on where it was when its peer died. Either JAX's heartbeat names the task
    # that stopped; or rank 0 was inside a collective and gloo lost its peer; or gloo's transport aborted on a
    # message of another size than the one it awaited. XLA's gloo communicator sends every all-reduce through
    # one untagged slot, so once a peer vanishes in mid-step the survivors' devices can leave the step's
    # collectives at different points, and the next message is then refused (`op.preamble.length <=
    # op.nbytes`). Seen in 2 of about 40 runs, both under load; the stack that faulthandler writes on the abort
    # showed rank 0 inside the step.
    log = (run_dir / "ranks" / "rank0.log").read_text()
    refused = code == -signal.SIGABRT and "op.preamble.length <= op.nbytes" in log
    in_step = re.search(r"Fatal Python error: Aborted[\s\S]*train_step[\s\S]*in fit", log)
    assert "unhealthy" in log or re.search(r"gloo.*(reset|closed) by peer", log) or (refused and in_step), (
        f"exit code {code}; {log[-3000:]}"
    )
    if code == -signal.SIGABRT:  # every abort leaves the Python stacks in the log (distributed.initialize)
        assert "Fatal Python error: Aborted" in log and "(most recent call first)" in log


def test_a_busy_coordinator_port_is_a_clear_error(tmp_path):
    with socket.socket() as taken:  # like a gRPC coordinator: bound with SO_REUSEPORT and listening
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DistributedError, match=f"port {port} .* already in use"):
            check_port_free(f"127.0.0.1:{port}")
        done = subprocess.run(
            train_command("--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0",
                          f"log.run_dir={tmp_path}"),
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 2 and "already in use" in done.stderr


def test_a_deadline_first_asks_the_ranks_for_their_stacks(tmp_path):
    """A rank that joined a run writes every thread's stack on SIGUSR1 and goes on; the launcher asks for it
    before stopping ranks at a deadline, so a hung run's logs say where each rank waited."""
    code = ("import signal, time; from xlstm_eqx.parallel.distributed import dump_stacks_on; "
            "dump_stacks_on(signal.SIGUSR1); print('ready', flush=True); "
            "[time.sleep(0.05) for _ in iter(int, 1)]")  # fmt: skip
    out = tmp_path / "rank0.log"
    with open(out, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "ready" not in out.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, out.read_text()
            time.sleep(0.05)
        dump_stacks([proc], wait_s=1.0)
        assert proc.poll() is None  # still running: only the stacks were written
        assert "most recent call first" in out.read_text() and "<listcomp>" in out.read_text()
    finally:
        stop_ranks([proc])


def test_settings_come_from_flags_then_environment_then_slurm():
    env = {"XLSTM_EQX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "XLSTM_EQX_NUM_PROCESSES": "4",
           "XLSTM_EQX_PROCESS_ID": "3"}  # fmt: skip
    config = resolve(environ=env)
    assert (config.coordinator_address, config.num_processes, config.process_id) == ("10.0.0.1:1234", 4, 3)
    assert resolve(process_id=1, environ=env).process_id == 1  # a flag wins over the environment
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "0"}  # fmt: skip
    assert resolve(environ=slurm).slurm and resolve(environ=slurm).process_id == 1
    assert not resolve(environ={**slurm, "SLURM_NTASKS": "1"}).multi_process
    assert not resolve(environ={}).multi_process and not resolve(num_processes=1, environ={}).multi_process
    assert resolve(environ={}, heartbeat_timeout_s=5).heartbeat_timeout_s == 5
    with pytest.raises(DistributedError, match="missing --coordinator-address"):
        resolve(num_processes=2, process_id=0, environ={})
    with pytest.raises(DistributedError, match="HOST:PORT"):
        resolve(coordinator_address="localhost", num_processes=2, process_id=0, environ={})
    with pytest.raises(DistributedError, match="process_id 2 is outside"):
        resolve(coordinator_address="localhost:5", num_processes=2, process_id=2, environ={})


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_four_processes(documents, single_run, tmp_path):
    run_dir = tmp_path / "four"
    launch(run_dir, 2, 2, overrides(documents, run_dir, 4))
    logs = launch(run_dir, 4, 1, overrides(documents, run_dir, 6))
    assert summary(logs["rank0.log"])["resumed_from_step"] == 4 and "written by 2 processes" in logs["rank0.log"]


@pytest.mark.slow
def test_four_processes_of_two_devices_train_like_one_process_of_eight(documents, single_run, tmp_path):
    run_dir = tmp_path / "eight"
    launch(run_dir, 4, 2, overrides(documents, run_dir, 8, "mesh.data=-1"))
    reference = tmp_path / "one"
    assert train_job(load_config(ROOT / "configs/shakespeare.yaml",
                                 overrides(documents, reference, 8, "mesh.data=8")))["status"] == "success"  # fmt: skip
    ours, theirs = rows(run_dir, "train"), rows(reference, "train")
    assert sorted(ours) == sorted(theirs) == list(range(1, 9))
    for step in theirs:
        np.testing.assert_allclose(ours[step]["loss_mean"], theirs[step]["loss_mean"], rtol=1e-5)
