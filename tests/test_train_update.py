"""The train step's optimizer update: global-norm clipping on sharded meshes, the gradient norm the step hands
the clip, and the skip of a non-finite step. Set-up (``run``, the model and batches) from test_train_step.py."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_train_step import make_batch, perturbed_model, run

from xlstm_eqx.config.mesh import MeshConfig
from xlstm_eqx.config.train import TrainConfig
from xlstm_eqx.parallel import make_mesh
from xlstm_eqx.train.metrics import to_host
from xlstm_eqx.train.state import init
from xlstm_eqx.train.steps import make_train_step


def test_gradient_clipping_on_a_sharded_mesh_equals_one_device():
    """The global norm that clipping divides by spans every shard (FSDP and tensor-parallel pieces alike)."""
    from xlstm_eqx.train.optim import clip_by_global_norm

    tx = optax.chain(clip_by_global_norm(1e-3), optax.sgd(0.1, momentum=0.9))
    ref_params, ref_history, _ = run((1, 1, 1), tx=tx, steps=2)
    assert all(step["grad_norm_mean"] > 1e-2 for step in ref_history)  # clipping really scales every step
    params, history, _ = run((2, 2, 2), tx=tx, steps=2)
    for step, ref_step in zip(history, ref_history, strict=True):
        assert step["grad_norm_mean"] == pytest.approx(ref_step["grad_norm_mean"], rel=1e-5)
    for leaf, ref_leaf in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_allclose(leaf, ref_leaf, rtol=1e-5, atol=1e-7)


LR = 1e3


@pytest.mark.parametrize(
    "wrap",
    [
        lambda clip: optax.chain(clip, optax.sgd(LR, momentum=0.9)),  # the norm the step measured is the clip's
        lambda clip: optax.chain(optax.scale(3.0), clip, optax.sgd(LR)),  # the clip sees other updates
    ],
    ids=["first", "after-scale"],
)
def test_the_clip_given_the_steps_gradient_norm_equals_optax(wrap):
    """The step passes its gradient norm to our clip (one read of the gradients fewer); wherever the clip sees
    updates other than the step's gradients it must measure them itself, as optax's clip always does (MultiSteps:
    test_optim.py). Updates of norm LR · 1e-3 = 1 move parameters far enough for a wrong norm to show."""
    from xlstm_eqx.train.optim import clip_by_global_norm

    ours, _, _ = run((1, 1, 1), tx=wrap(clip_by_global_norm(1e-3)), steps=2)
    theirs, _, _ = run((1, 1, 1), tx=wrap(optax.clip_by_global_norm(1e-3)), steps=2)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # updates ≈ 1e-3; float32 rounding: 3e-8


def test_nonfinite_step_is_skipped_and_flagged():
    mesh = make_mesh(MeshConfig(data=2), jax.devices()[:2])
    tx = optax.adamw(1e-2)
    model = perturbed_model(jax.random.key(1))
    poisoned = eqx.tree_at(lambda m: m.out_norm.weight, model, model.out_norm.weight.at[0].set(jnp.nan))
    state, static = init(poisoned, tx, key=jax.random.key(2), mesh=mesh)
    before = jax.tree.map(np.asarray, state.params)
    step = make_train_step(static, tx, mesh, TrainConfig(donate_train_state=False))
    state, metrics = step(state, make_batch(jax.random.key(3)))
    assert to_host(metrics)["nonfinite_max"] == 1.0 and not math.isfinite(to_host(metrics)["loss_mean"])
    assert int(state.step) == 1
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)
