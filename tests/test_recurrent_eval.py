"""recurrent_eval_step: chunked evaluation with carried state equals full-sequence evaluation."""

import jax
import jax.numpy as jnp
import optax
import pytest
from test_train_step import make_batch, perturbed_model

from xlstm_eqx.config import ModelConfig
from xlstm_eqx.config.mesh import MeshConfig
from xlstm_eqx.data import Batch
from xlstm_eqx.models import build
from xlstm_eqx.parallel import make_mesh
from xlstm_eqx.train.metrics import to_host
from xlstm_eqx.train.recurrent_eval import make_recurrent_eval_step
from xlstm_eqx.train.state import init
from xlstm_eqx.train.steps import make_eval_step


def setup(mesh_shape):
    data, fsdp, model = mesh_shape
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, model=model), jax.devices()[: data * fsdp * model])
    state, static = init(perturbed_model(jax.random.key(1)), optax.sgd(0.1), key=jax.random.key(2), mesh=mesh)
    return mesh, state, static


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)])
@pytest.mark.parametrize("chunk_size", [7, 24, 64])
def test_chunked_equals_full_sequence(mesh_shape, chunk_size):
    mesh, state, static = setup(mesh_shape)
    batches = [make_batch(jax.random.key(i)) for i in range(2)]  # 24 tokens, two documents per row
    full, chunked = None, None
    eval_step = make_eval_step(static, mesh)
    recurrent = make_recurrent_eval_step(static, mesh, chunk_size=chunk_size)
    for batch in batches:
        full = eval_step(state, batch, full)
        chunked = recurrent(state, batch, chunked)
    full, chunked = to_host(full), to_host(chunked)
    assert chunked["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert chunked["accuracy"] == pytest.approx(full["accuracy"], rel=1e-5)


def test_a_65536_token_document_in_chunks():
    """Runs in memory bounded by the chunk: only (rows, chunk) activations ever exist."""
    config = ModelConfig(vocab_size=32, embedding_dim=32, num_blocks=1, num_heads=2, chunk_size=64)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    state, static = init(build(config, key=jax.random.key(0)), optax.sgd(0.1), key=jax.random.key(1), mesh=mesh)
    tokens = jax.random.randint(jax.random.key(2), (1, 65_537), 0, 32, dtype=jnp.int32)
    batch = Batch.from_tokens(tokens)
    chunked = to_host(make_recurrent_eval_step(static, mesh, chunk_size=4096)(state, batch))
    full = to_host(make_eval_step(static, mesh)(state, batch))  # one 65,536-token pass, for reference
    assert chunked["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert chunked["accuracy"] == pytest.approx(full["accuracy"], rel=1e-5)
