"""The pure steps called back to back, as one rank of a multi-process run (started by test_multiprocess.py).

Train, eval and recurrent eval steps are dispatched many times without the caller waiting in between, on a
mesh of every process's CPU devices (several per process): the pattern that deadlocked JAX's CPU runtime
before the steps waited for themselves there (xlstm_eqx.parallel.dispatch). As a script it joins the run and
prints one JSON line of :func:`run`'s results; the test also calls :func:`run` in one process for reference.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

CALLS = 60


def run(devices: list) -> dict:
    """Losses after CALLS back-to-back eval steps, one recurrent eval (32 chunks) and CALLS train steps on a
    data-parallel mesh of ``devices``, plus a checksum of the trained embedding."""
    import optax
    from jax.experimental import multihost_utils

    from xlstm_eqx.config import ModelConfig
    from xlstm_eqx.config.mesh import MeshConfig
    from xlstm_eqx.data import Batch
    from xlstm_eqx.models import build
    from xlstm_eqx.parallel import batch_spec, collectives_must_not_overlap, make_mesh
    from xlstm_eqx.train.metrics import to_host
    from xlstm_eqx.train.recurrent_eval import make_recurrent_eval_step
    from xlstm_eqx.train.state import init
    from xlstm_eqx.train.steps import make_eval_step, make_train_step

    mesh = make_mesh(MeshConfig(data=-1), devices)
    config = ModelConfig(vocab_size=64, embedding_dim=16, num_blocks=1, num_heads=2, chunk_size=8)
    tx = optax.sgd(0.01)
    state, static = init(build(config, key=jax.random.key(0)), tx, key=jax.random.key(1), mesh=mesh)
    rows, processes = 2 * len(devices), len({d.process_index for d in devices})
    tokens = np.random.default_rng(0).integers(0, 64, size=(rows, 65)).astype(np.int32)
    mine = np.array_split(tokens, processes)[jax.process_index()]  # this process's rows, in process order
    sharding = jax.sharding.NamedSharding(mesh, batch_spec(2, mesh))
    batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                         Batch.from_tokens(jnp.asarray(mine)))  # fmt: skip

    eval_step, recurrent = make_eval_step(static, mesh), make_recurrent_eval_step(static, mesh, chunk_size=2)
    metrics = None
    for _ in range(CALLS):
        metrics = eval_step(state, batch, metrics)
    evaluated, recurrent_metrics = to_host(metrics), to_host(recurrent(state, batch))
    train_step = make_train_step(static, tx, mesh)
    for _ in range(CALLS):
        state, train_metrics = train_step(state, batch)
    embedding = multihost_utils.process_allgather(state.params.embedding.weight, tiled=True)
    return {
        "must_wait": collectives_must_not_overlap(mesh), "eval_loss": float(evaluated["loss"]),
        "recurrent_loss": float(recurrent_metrics["loss"]), "train_loss": float(to_host(train_metrics)["loss_mean"]),
        "steps": int(jax.device_get(state.step)), "embedding_abs_sum": float(np.abs(np.asarray(embedding)).sum()),
    }  # fmt: skip


if __name__ == "__main__":
    from xlstm_eqx.parallel.distributed import initialize, resolve

    initialize(resolve())
    print(json.dumps(run(jax.devices())))
