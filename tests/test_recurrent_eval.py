"""recurrent_eval_step: chunked evaluation with carried state equals full-sequence evaluation."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from test_train_step import MODEL, make_batch, perturbed_model

from xlstm_eqx.config import ModelConfig
from xlstm_eqx.config.mesh import MeshConfig
from xlstm_eqx.config.train import TrainConfig
from xlstm_eqx.data import Batch
from xlstm_eqx.data.batch import document_starts
from xlstm_eqx.eval.scoring import ROW_MODES, row_measurements
from xlstm_eqx.models import build
from xlstm_eqx.parallel import batch_spec, make_mesh
from xlstm_eqx.train import loss as loss_module
from xlstm_eqx.train.metrics import to_host
from xlstm_eqx.train.recurrent_eval import make_recurrent_eval_step
from xlstm_eqx.train.state import init
from xlstm_eqx.train.steps import make_eval_step


def setup(mesh_shape):
    data, fsdp, model = mesh_shape
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, model=model), jax.devices()[: data * fsdp * model])
    state, static = init(perturbed_model(jax.random.key(1)), optax.sgd(0.1), key=jax.random.key(2), mesh=mesh)
    return mesh, state, static


@pytest.mark.parametrize(
    "chunk_size, mesh_shape",
    [(7, (1, 1, 1)), (7, (2, 2, 2)), pytest.param(24, (1, 1, 1), marks=pytest.mark.slow), (24, (2, 2, 2)),
     pytest.param(64, (1, 1, 1), marks=pytest.mark.slow), (64, (2, 2, 2))],
)  # fmt: skip
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


def test_every_log_mode_sees_the_batch_not_the_chunks():
    """max / std / single over batches equal eval_step's: a batch's chunks are summed before they are logged."""
    mesh, state, static = setup((2, 2, 2))
    modes = ("mean", "max", "std", "single")
    eval_step = make_eval_step(static, mesh, modes=modes)
    recurrent = make_recurrent_eval_step(static, mesh, chunk_size=7, modes=modes)  # 24 tokens: 4 chunks
    full, chunked = None, None
    for i in range(3):
        batch = make_batch(jax.random.key(10 + i))
        full, chunked = eval_step(state, batch, full), recurrent(state, batch, chunked)
    full, chunked = to_host(full), to_host(chunked)
    assert sorted(chunked) == sorted(full) and "loss_std" in full and full["loss_std"] > 0
    for key, value in full.items():
        assert chunked[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


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


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)])
def test_logits_in_slices_equal_whole_chunks(mesh_shape):
    """Slices of 5 positions (24 = 4·5 + 4, so a short last slice) give the metrics of whole-chunk logits, for the
    default measure and for per-example sums (the lm-eval scorer's)."""
    mesh, state, static = setup(mesh_shape)
    batch = make_batch(jax.random.key(3))
    for measure, modes in [(None, None), (row_measurements, ROW_MODES)]:
        steps = {
            size: make_recurrent_eval_step(static, mesh, chunk_size=24, logits_slice=size, measure=measure, modes=modes)
            for size in (24, 5)
        }
        whole, sliced = (to_host(step(state, batch)) for step in steps.values())
        assert sliced.keys() == whole.keys()
        for key, value in whole.items():
            np.testing.assert_allclose(sliced[key], value, rtol=1e-5, err_msg=key)


def test_a_chunk_holds_one_slice_of_logits_at_a_time():
    """The compiled chunk step's temporaries stay below ONE (rows, chunk, vocab) float32 logits buffer when the
    head runs in slices (auto: a quarter of the chunk here); with whole-chunk logits, the capped logits and the
    softmax's intermediates are several such buffers."""
    config = ModelConfig(vocab_size=4096, embedding_dim=32, num_blocks=1, num_heads=2, chunk_size=64)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    state, static = init(build(config, key=jax.random.key(0)), optax.sgd(0.1), key=jax.random.key(1), mesh=mesh)
    chunk = 1024
    batch = Batch.from_tokens(jnp.zeros((1, chunk + 1), jnp.int32))
    model_state = jax.tree.map(lambda a: a[None], static.init_state())
    logits_bytes = chunk * config.vocab_size * 4

    def temp_bytes(logits_slice):
        step = make_recurrent_eval_step(static, mesh, chunk_size=chunk, logits_slice=logits_slice)
        compiled = step.chunk_step.lower(state.params, model_state, batch, document_starts(batch.segment_ids))
        return compiled.compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(chunk) >= 2 * logits_bytes
    assert temp_bytes(None) < logits_bytes


def test_logits_slice_must_be_positive():
    mesh, _, static = setup((1, 1, 1))
    with pytest.raises(ValueError, match="logits_slice"):
        make_recurrent_eval_step(static, mesh, chunk_size=8, logits_slice=0)


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)])
def test_eval_step_in_logit_slices_equals_whole_logits(mesh_shape, monkeypatch):
    """make_eval_step's default loss (head in slices; the budget is shrunk here to slices of 5 positions per
    device, 24 = 4·5 + 4) gives lm_loss's loss, accuracy and z-loss."""
    mesh, state, static = setup(mesh_shape)
    rows_per_device = 8 // (mesh_shape[0] * mesh_shape[1])
    monkeypatch.setattr(loss_module, "LOGITS_SLICE_ELEMENTS", rows_per_device * 5 * static.config.vocab_size)
    config = TrainConfig(z_loss=1e-3)
    batch = make_batch(jax.random.key(4))
    whole = to_host(make_eval_step(static, mesh, config, loss_fn=loss_module.lm_loss)(state, batch))
    sliced = to_host(make_eval_step(static, mesh, config)(state, batch))
    assert sliced.keys() == whole.keys() >= {"loss", "accuracy", "z_loss"}
    for key, value in whole.items():
        assert sliced[key] == pytest.approx(value, rel=1e-5), key


def test_a_new_row_length_compiles_a_fixed_few_programs(caplog):
    """Chunk cutting is one program per row shape, not one per chunk offset (lm-eval sees many lengths)."""
    mesh, state, static = setup((2, 1, 1))
    step = make_recurrent_eval_step(static, mesh, chunk_size=8)
    step(state, make_batch(jax.random.key(3), length=24))  # compiles the chunk step and the small helpers
    placed = NamedSharding(mesh, batch_spec(2, mesh))  # as the loaders place them (no resharding programs)
    compiled, batches = [], [jax.device_put(make_batch(jax.random.key(4), length=n), placed) for n in (40, 72)]
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        for batch in batches:
            caplog.clear()
            step(state, batch)
            compiled.append([r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()])
    # a new length compiles prepare (so the log is being read), the batch's token check, and at most take_chunk
    names = [{name for m in p for name in re.findall(r"jit\((\w+)\)", m)} for p in compiled]
    assert all({"prepare", "check_tokens"} <= n <= {"prepare", "check_tokens", "take_chunk"} for n in names), names


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)])
def test_a_token_outside_the_vocabulary_is_a_clear_error_on_every_mesh(mesh_shape):
    """Every device raises together: a check on one device left the others waiting in a collective until XLA
    aborted the process."""
    mesh, state, static = setup(mesh_shape)
    batch = make_batch(jax.random.key(3))
    bad = eqx.tree_at(lambda b: b.inputs, batch, batch.inputs.at[5, 3].set(MODEL.vocab_size))
    steps = {"eval": make_eval_step(static, mesh), "recurrent": make_recurrent_eval_step(static, mesh, chunk_size=8)}
    for name, step in steps.items():
        with pytest.raises(Exception, match=r"token id outside \[0, vocab_size=64\) in batch.inputs") as raised:
            jax.block_until_ready(step(state, bad))
        assert "Termination timeout" not in str(raised.value), name
