"""The steps' inputs: the token-id check runs as a program of its own, so the step programs stay cacheable,
and all steps on one mesh share it; bad batches, meshes and donated states are refused by name."""

import functools
import inspect
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train_step import MODEL, make_batch, perturbed_model

from xlstm_eqx.config.mesh import MeshConfig
from xlstm_eqx.config.train import TrainConfig
from xlstm_eqx.data.batch import Batch, document_starts
from xlstm_eqx.models import build
from xlstm_eqx.parallel import make_mesh
from xlstm_eqx.train.loss import target_scores
from xlstm_eqx.train.metrics import to_host
from xlstm_eqx.train.recurrent_eval import make_recurrent_eval_step
from xlstm_eqx.train.state import init
from xlstm_eqx.train.step_inputs import check_tokens, make_batch_check
from xlstm_eqx.train.steps import make_eval_step, make_train_step


def test_the_step_programs_hold_no_host_callback_so_the_persistent_cache_can_keep_them():
    """JAX's persistent compilation cache refuses programs with host callbacks; the token check (one) runs as
    its own program before each step."""
    mesh = make_mesh(MeshConfig(data=2), jax.devices()[:2])
    tx = optax.sgd(0.1)
    state, static = init(perturbed_model(jax.random.key(1)), tx, key=jax.random.key(2), mesh=mesh)
    batch = make_batch(jax.random.key(3))
    model_state = jax.tree.map(lambda a: jnp.stack([a] * batch.inputs.shape[0]), static.init_state())
    resets = document_starts(batch.segment_ids)
    programs = {
        "token check": jax.jit(make_batch_check(static, mesh, jit=False)).lower(batch),
        "train": make_train_step(static, tx, mesh, TrainConfig(donate_train_state=False)).lower(state, batch),
        "eval": make_eval_step(static, mesh).batch_step.lower(state.params, batch),
        "recurrent": make_recurrent_eval_step(static, mesh, chunk_size=8).chunk_step.lower(
            state.params, model_state, batch, resets
        ),
    }
    holds_callback = {name: "callback" in lowered.as_text() for name, lowered in programs.items()}
    assert holds_callback == {"token check": True, "train": False, "eval": False, "recurrent": False}


def test_steps_on_one_mesh_share_one_compiled_token_check(caplog):
    """Every step made on a mesh reuses the token check compiled for the first: a job's train, validation and
    test steps (and a sweep's many) compile it once per batch shape, not once per step function."""
    mesh = make_mesh(MeshConfig(data=2), jax.devices()[:2])
    tx = optax.sgd(0.1)
    state, static = init(perturbed_model(jax.random.key(1)), tx, key=jax.random.key(2), mesh=mesh)
    batch = make_batch(jax.random.key(3))
    make_eval_step(static, mesh)(state, batch)  # compiles the check for this batch shape
    compiled = []
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        for step in (
            make_eval_step(static, mesh),
            make_train_step(static, tx, mesh, TrainConfig(donate_train_state=False)),
        ):
            caplog.clear()
            step(state, batch)
            compiled.append({name for r in caplog.records for name in re.findall(r"jit\((\w+)\)", r.getMessage())})
    # each new step function compiles its own program (the log is read), never the check again
    assert compiled == [{"batch_metrics"}, {"train_step"}], compiled


@pytest.mark.parametrize(("dtype", "vocab"), [(jnp.int8, 256), (jnp.int16, 50_304)])
def test_narrow_token_ids_are_checked_and_scored_as_int32_ones(dtype, vocab):
    """A vocabulary size the id dtype cannot hold (GPT-2's 50,304 in int16) must not wrap in the check or the
    loss (before: every id flagged, or the one-hot matching id + 2¹⁶ too)."""
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    top = min(vocab, int(jnp.iinfo(dtype).max) + 1) - 1
    tokens = jnp.array([[0, 1, top, 7, top]], dtype)
    batch = Batch.from_tokens(tokens)
    assert check_tokens(batch, vocab=vocab, mesh=mesh).inputs.dtype == dtype  # all ids valid: passes
    if top < vocab - 1:
        with pytest.raises(Exception, match=f"token id outside \\[0, vocab_size={top}\\)"):
            check_tokens(batch, vocab=top, mesh=mesh)
    logits = jax.random.normal(jax.random.key(0), (4, vocab))
    targets = jnp.array([0, 1, top, 7])
    narrow, wide = target_scores(logits, targets.astype(dtype)), target_scores(logits, targets)
    np.testing.assert_array_equal(narrow[0], wide[0])
    np.testing.assert_array_equal(narrow[1], wide[1])


def test_a_mesh_without_the_three_axes_is_refused_naming_them():
    mesh = jax.make_mesh((1,), ("data",))
    tx = optax.sgd(0.1)
    for make in (
        lambda: init(functools.partial(build, MODEL), tx, key=jax.random.key(2), mesh=mesh),  # traced, not run
        lambda: make_train_step(None, tx, mesh),
        lambda: make_eval_step(None, mesh),
        lambda: make_recurrent_eval_step(None, mesh, chunk_size=8),
    ):
        with pytest.raises(ValueError, match=r"mesh axes \('data',\): missing \['fsdp', 'model'\], unknown \[\]"):
            make()


def test_train_step_modes_must_be_a_mapping():
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    with pytest.raises(TypeError, match=r"parameter 'modes'[\s\S]*'max'"):  # the runtime type checker's
        make_train_step(None, optax.sgd(0.1), mesh, modes="max")
    unchecked = inspect.unwrap(make_train_step)  # what a user without runtime type checking calls
    with pytest.raises(TypeError, match=r"make_train_step\(modes=...\) maps metric names to their modes .* got 'max'"):
        unchecked(None, optax.sgd(0.1), mesh, modes="max")


def test_bad_batches_and_meshes_are_named():
    mesh = make_mesh(MeshConfig(data=4), jax.devices()[:4])
    tx = optax.sgd(0.1)
    state, static = init(perturbed_model(jax.random.key(1)), tx, key=jax.random.key(2), mesh=mesh)
    step = make_train_step(static, tx, mesh, TrainConfig(donate_train_state=False))
    with pytest.raises(ValueError, match="global batch size 6 is not divisible by data×fsdp = 4"):
        step(state, make_batch(jax.random.key(0), rows=6))
    bad = make_batch(jax.random.key(0))
    # With runtime type checking on (as in tests) Batch itself rejects these; without it the step does.
    with pytest.raises((ValueError, TypeError), match="targets"):
        step(state, Batch(bad.inputs, bad.targets[:, :5], bad.loss_mask, bad.segment_ids, bad.positions))
    with pytest.raises(TypeError, match="inputs"):
        step(state, Batch(bad.inputs.astype(jnp.float32), bad.targets, bad.loss_mask, bad.segment_ids, bad.positions))
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(MeshConfig(data=2, fsdp=4, model=2))
    with pytest.raises(ValueError, match=r"batch.inputs has shape \(4, 0\); expected \(batch, time\), both ≥ 1"):
        step(state, Batch(*(jnp.zeros((4, 0), x.dtype) for x in (bad.inputs, bad.targets, bad.loss_mask,
                                                                  bad.segment_ids, bad.positions))))  # fmt: skip


def test_a_default_mesh_that_leaves_a_process_out_is_refused(monkeypatch):
    """Two processes of four devices each: a data=4 mesh over the default devices would hold only process 0's."""
    import types

    fake = [types.SimpleNamespace(id=i, process_index=i // 4) for i in range(8)]
    monkeypatch.setattr(jax, "devices", lambda: fake)
    with pytest.raises(ValueError, match=r"leaves out every device of process\(es\) \[1\]"):
        make_mesh(MeshConfig(data=4))


def test_a_donated_state_passed_again_is_refused_by_name():
    """Donation frees the state's buffers; XLA:CPU would read them anyway (a segfault on several devices)."""
    mesh = make_mesh(MeshConfig(data=2), jax.devices()[:2])
    tx = optax.sgd(0.1)
    state, static = init(perturbed_model(jax.random.key(1)), tx, key=jax.random.key(2), mesh=mesh)
    step = make_train_step(static, tx, mesh, TrainConfig())
    batch = make_batch(jax.random.key(0), rows=4)
    new_state, _ = step(state, batch)
    with pytest.raises(ValueError, match="this state was donated to an earlier train_step call"):
        step(state, batch)
    step(new_state, batch)  # the returned state is the one to pass


def test_token_ids_are_checked_where_they_are_used():
    mesh = make_mesh(MeshConfig(data=2), jax.devices()[:2])
    tx = optax.sgd(0.1)
    state, static = init(perturbed_model(jax.random.key(1)), tx, key=jax.random.key(2), mesh=mesh)
    step = make_train_step(static, tx, mesh, TrainConfig(donate_train_state=False))
    batch = make_batch(jax.random.key(3))  # its last 3 positions are not scored
    ignored = eqx.tree_at(lambda b: b.targets, batch, batch.targets.at[:, -1].set(-100))
    np.testing.assert_array_equal(
        to_host(step(state, ignored)[1])["loss_mean"], to_host(step(state, batch)[1])["loss_mean"]
    )
    for field, where in (("targets", 0), ("inputs", -1)):
        bad = eqx.tree_at(
            lambda b, f=field: getattr(b, f), batch, getattr(batch, field).at[0, where].set(MODEL.vocab_size)
        )
        with pytest.raises(Exception, match=r"token id outside \[0, vocab_size=64\)"):
            jax.block_until_ready(step(state, bad))
