"""Extended evaluation: sharded per-example metrics equal a direct computation; as a hook its metrics reach the
validation rows; standalone on a checkpoint."""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from loop_setup import MODEL, Stream, eval_set, setup

from xlstm_eqx.config import Config, to_dict
from xlstm_eqx.config.mesh import MeshConfig
from xlstm_eqx.config.run import CheckpointConfig, LogConfig, LoopConfig
from xlstm_eqx.data.batch import IndexedBatch, document_starts
from xlstm_eqx.eval.extended import (
    evaluate_checkpoint,
    evaluate_extended,
    extended_evaluation_hook,
    make_extended_eval_step,
)
from xlstm_eqx.io.checkpoint import Checkpointer
from xlstm_eqx.loop import RunLogger, checkpoint_hook, fit
from xlstm_eqx.train.loss import lm_forward
from xlstm_eqx.train.metrics import Measured

MODES = {"row_loss": "single_noreduce_wcount", "ce_cubed": "mean_nopostfix", "last_ce": "single_noreduce"}


def per_row_measure(model, batch, key, *, z_loss=0.0, tp_axis=None):
    """Per-row CE sums with token counts, per-row CE of the last position, and the mean cubed token CE."""
    del key, z_loss
    logits, _ = lm_forward(model, batch.inputs, document_starts(batch.segment_ids), tp_axis=tp_axis)
    mask = batch.loss_mask.astype(logits.dtype)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch.targets) * mask
    rows = jnp.sum(ce, axis=-1)
    measured = {
        "row_loss": Measured(rows, jnp.sum(mask, axis=-1)),
        "ce_cubed": Measured(jnp.sum(ce**3), jnp.sum(mask)),
        "last_ce": Measured(ce[:, -1]),
    }
    return jnp.sum(rows), measured


def direct(state, static, batches):
    import equinox as eqx

    model = eqx.combine(jax.tree.map(jnp.asarray, jax.device_get(state.params)), static)
    rows, counts, last, cubed, tokens = [], [], [], 0.0, 0.0
    for batch in batches:
        logits = jax.vmap(lambda t: model(t)[0])(batch.inputs)  # no resets: Stream rows are one document each
        ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, batch.targets))
        rows.append(ce.sum(-1))
        counts.append(np.full(ce.shape[0], ce.shape[1], np.float32))
        last.append(ce[:, -1])
        cubed += float((ce**3).sum())
        tokens += ce.size
    return np.concatenate(rows), np.concatenate(counts), np.concatenate(last), cubed / tokens


@pytest.mark.parametrize("mesh_config", [MeshConfig(data=4), MeshConfig(data=2, fsdp=2, fsdp_min_weight_size=0)])
def test_sharded_per_example_metrics_equal_direct_computation(mesh_config):
    state, _, _, _, static, _ = setup(mesh_config=mesh_config)
    mesh = jax.tree.leaves(state.params)[0].sharding.mesh
    step = make_extended_eval_step(static, mesh, per_row_measure, MODES)
    batches = eval_set(3)
    host = evaluate_extended(step, state, batches, MODES)
    rows, counts, last, cubed = direct(state, static, batches)
    values, got_counts = host["row_loss_single_noreduce_wcount"]
    assert values.shape == (24,)
    np.testing.assert_allclose(values, rows, rtol=1e-5)
    np.testing.assert_array_equal(got_counts, counts)
    np.testing.assert_allclose(host["last_ce_single_noreduce"], last, rtol=1e-5, atol=1e-6)
    assert host["ce_cubed"] == pytest.approx(cubed, rel=1e-5)
    # indexed batches: each per-row value comes with its row's document and piece
    indexed = [IndexedBatch(b, jnp.arange(8, dtype=jnp.int32) + 8 * i + 1, jnp.full(8, i, jnp.int32))
               for i, b in enumerate(batches)]  # fmt: skip
    located = evaluate_extended(step, state, indexed, MODES)
    np.testing.assert_array_equal(located["document_idx_single_noreduce"], np.arange(24) + 1)
    np.testing.assert_array_equal(located["sequence_idx_single_noreduce"], np.repeat(np.arange(3), 8))
    np.testing.assert_array_equal(located["row_loss_single_noreduce_wcount"][0], values)


def test_as_a_hook_its_metrics_join_the_validation_rows(tmp_path):
    state, train_step, eval_step, _, static, _ = setup()
    mesh = jax.tree.leaves(state.params)[0].sharding.mesh
    step = make_extended_eval_step(static, mesh, per_row_measure, MODES)
    summarize = lambda host: {"ce_cubed": host["ce_cubed"], "worst_row": float(np.max(host["last_ce_single_noreduce"]))}  # noqa: E731
    hook = extended_evaluation_hook(
        step, eval_set(2), MODES, prefix="ext_", summarize=summarize, kinds=("val_end", "test_end")
    )
    logger = RunLogger(tmp_path, LogConfig(writers=("csv",)))
    config = LoopConfig(num_train_steps=6, check_val_every_n_steps=3, check_val_every_n_epoch=-1)
    fit(state, train_step, eval_step, Stream(), config=config, val_data=eval_set(1), test_data=eval_set(1),
        hooks=[hook], logger=logger)  # fmt: skip
    logger.finalize("success")
    for mode, steps in (("val", ["3", "6"]), ("test", ["6"])):
        with (tmp_path / f"metrics_{mode}.csv").open(newline="") as file:
            rows = list(csv.DictReader(file))
        assert [r["log_step"] for r in rows] == steps
        assert all(float(r["ext_ce_cubed"]) > 0 and float(r["ext_worst_row"]) > 0 and r["loss"] for r in rows)


def test_standalone_on_a_checkpoint(tmp_path):
    fsdp = MeshConfig(data=1, fsdp=4, fsdp_min_weight_size=0)
    state, train_step, eval_step, _, static, _ = setup(mesh_config=fsdp)
    checkpointer = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    meta = lambda e: {"config": to_dict(Config(model=MODEL, mesh=fsdp)), "total_steps": 40}  # noqa: E731
    hooks = [checkpoint_hook(checkpointer, CheckpointConfig(), meta)]
    result = fit(state, train_step, eval_step, Stream(), config=LoopConfig(num_train_steps=3), hooks=hooks)
    checkpointer.close()
    expected = direct(result.state, static, eval_set(2))
    host = evaluate_checkpoint(tmp_path, per_row_measure, MODES, lambda loaded: eval_set(2),
                               mesh=MeshConfig(data=1), devices=jax.devices()[:1])  # fmt: skip
    np.testing.assert_allclose(host["row_loss_single_noreduce_wcount"][0], expected[0], rtol=1e-5)
    assert host["ce_cubed"] == pytest.approx(expected[3], rel=1e-5)
