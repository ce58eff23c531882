"""A tiny training setup shared by the loop tests: model, optimizer, steps and a resumable batch stream."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from xlstm_eqx.config import ModelConfig, load_config
from xlstm_eqx.config.mesh import MeshConfig
from xlstm_eqx.config.optim import OptimConfig
from xlstm_eqx.config.train import TrainConfig
from xlstm_eqx.data import Batch
from xlstm_eqx.models import build
from xlstm_eqx.parallel import make_mesh
from xlstm_eqx.train import build_optimizer, build_schedule, init, make_eval_step, make_train_step

MODEL = ModelConfig(vocab_size=64, embedding_dim=32, num_blocks=1, num_heads=2, chunk_size=8)
ROWS, LENGTH = 8, 16


class Stream:
    """Endless deterministic batches (batch i from key i) with ``get_state``/``set_state``; ``poison`` maps a
    step number (1-based) to a batch whose inputs are out of nothing but whose loss is made NaN."""

    def __init__(self, seed: int = 0, sharding=None):
        self.index, self.seed, self.sharding = 0, seed, sharding

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        key = jax.random.fold_in(jax.random.key(self.seed), self.index)
        self.index += 1
        tokens = jax.random.randint(key, (ROWS, LENGTH + 1), 0, MODEL.vocab_size // 4, dtype=jnp.int32)
        tokens = tokens.at[:, 1::2].set(tokens[:, 0::2][:, : LENGTH // 2])  # a learnable pattern: pairs repeat
        return Batch.from_tokens(tokens)

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = state["index"]


def eval_set(count: int = 2, seed: int = 99) -> list[Batch]:
    stream = Stream(seed)
    return [next(stream) for _ in range(count)]


def setup(mesh_config=MeshConfig(data=1), train_config=TrainConfig(), total_steps=40, optim=None, devices=None):
    """(state, train_step, eval_step, schedule, static, tx) on a mesh (default: one device); parameters are
    sharded over fsdp as ``mesh_config.fsdp_min_weight_size`` says."""
    optim = optim or OptimConfig(learning_rate=3e-3, warmup_steps=5, decay="cosine", decay_steps=20)
    mesh = make_mesh(mesh_config, devices or jax.devices()[: max(mesh_config.data, 1) * mesh_config.fsdp])
    tx = build_optimizer(optim, total_steps)
    fsdp_min = mesh_config.fsdp_min_weight_size
    state, static = init(functools.partial(build, MODEL), tx, key=jax.random.key(0), mesh=mesh,
                         fsdp_min_weight_size=fsdp_min)  # fmt: skip
    train_step = make_train_step(static, tx, mesh, train_config, fsdp_min_weight_size=fsdp_min)
    eval_step = make_eval_step(static, mesh, train_config, fsdp_min_weight_size=fsdp_min)
    return state, train_step, eval_step, build_schedule(optim, total_steps), static, tx


def params_numpy(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def job_config(corpus, run_dir, *overrides):
    return load_config(
        "configs/shakespeare.yaml",
        [
            "model.embedding_dim=32", "model.num_blocks=1", "model.num_heads=2", "model.chunk_size=16",
            "data.corpus=files", f"data.train_files=[{corpus}/train_a.txt,{corpus}/train_b.txt,{corpus}/train_c.txt]",
            f"data.validation_files=[{corpus}/val.txt]", f"data.test_files=[{corpus}/test.txt]",
            "data.seq_len=32", "data.global_batch_size=8", "optim.warmup_steps=2", "optim.decay_steps=8",
            "loop.num_train_steps=12", "loop.steps_per_epoch=6", "loop.check_val_every_n_steps=4",
            "loop.enable_progress_bar=false", "log.log_every_n_steps=2", "checkpoint.every_n_steps=5",
            "lm_eval.evaluation_tasks=[]",  # lm-eval in the job is tested in test_lm_eval_run, on its own
            f"log.run_dir={run_dir}", *overrides,
        ],
    )  # fmt: skip


def recorder():
    """(hook, seen): the hook appends (kind, step, epoch, trigger) of every event it is given to ``seen``."""
    seen = []

    def hook(event):
        seen.append((event.kind, event.step, event.epoch, event.trigger))

    return hook, seen
