"""The steps' inputs: the token-id check runs as a program of its own, so the step programs stay cacheable,
and all steps on one mesh share it."""

import functools
import inspect
import re

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
