"""Optimizers, weight decay, clipping and LR schedules: exact step semantics and decay direction."""

import functools
import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_schedules import reference_lr

from xlstm_eqx.config import ConfigError, ModelConfig, from_dict, to_dict
from xlstm_eqx.config.optim import OptimConfig
from xlstm_eqx.models.lm import xLSTMLM
from xlstm_eqx.train.optim import (
    build_optimizer,
    learning_rate_at,
    optimizer_step_count,
    parameter_path,
    set_optimizer_step_count,
    weight_decay_mask,
    with_standard_promotion,
)

OPTIMIZERS = ("adamw", "adam", "sgd", "lion", "ademamix")


# ------------------------------------------------------------------------------------- a small eqx model


class Tiny(eqx.Module):
    """Has decayed (proj.weight) and excluded leaves (embedding, norm, bias) and a non-array leaf."""

    embedding: eqx.nn.Embedding
    norm: eqx.nn.RMSNorm
    proj: eqx.nn.Linear
    activation: Callable

    def __init__(self, key):
        self.activation = jax.nn.tanh
        k1, k2 = jax.random.split(key)
        self.embedding = eqx.nn.Embedding(7, 4, key=k1)
        self.norm = eqx.nn.RMSNorm(4, use_bias=False)
        proj = eqx.nn.Linear(4, 3, key=k2)
        # Weights of magnitude 0.1 … 1 and both signs, so a decay step of size lr ≪ 0.1 never crosses 0.
        weight = jnp.linspace(0.1, 1.0, 12).reshape(3, 4) * jnp.asarray([1.0, -1.0, 1.0, -1.0])
        self.proj = eqx.tree_at(lambda p: p.weight, proj, weight)

    def __call__(self, tokens):
        h = jax.vmap(self.norm)(jax.vmap(self.embedding)(tokens))
        return jax.vmap(self.proj)(self.activation(h))


def split(model):
    return eqx.partition(model, eqx.is_inexact_array)


def test_mask_paths_on_the_real_model(getkey):
    config = ModelConfig(vocab_size=32, embedding_dim=16, num_blocks=1, num_heads=2, chunk_size=8)
    model = eqx.filter_eval_shape(xLSTMLM, config, key=getkey())  # abstract: no init compile, same paths
    params = eqx.filter(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    mask = weight_decay_mask(params)
    flags = {parameter_path(path): flag for path, flag in jax.tree_util.tree_leaves_with_path(mask)}
    assert len(flags) == len(jax.tree.leaves(params))
    decayed = {name for name, flag in flags.items() if flag}
    for name in ("blocks.mlstm_layer.q.weight", "blocks.ffn.proj_down.weight", "lm_head.weight"):
        assert name in decayed
    for name in (
        "embedding.weight",
        "blocks.norm_mlstm.weight",
        "blocks.mlstm_layer.igate_preact.bias",
        "blocks.mlstm_layer.multihead_norm.norms.weight",
        "out_norm.weight",
    ):
        assert name in flags and name not in decayed
    # Anchored patterns see the plain path; an empty exclude list decays every float array.
    assert not weight_decay_mask(params, (r"^lm_head\.weight$",)).lm_head.weight
    assert all(jax.tree.leaves(weight_decay_mask(params, ())))


def test_mask_keeps_none_holes_and_skips_non_arrays(getkey):
    model = Tiny(getkey())
    params, _ = split(model)
    mask = weight_decay_mask(params)
    assert mask.activation is None and jax.tree.structure(mask) == jax.tree.structure(params)
    assert (mask.proj.weight, mask.proj.bias, mask.norm.weight, mask.embedding.weight) == (True, False, False, False)
    assert weight_decay_mask(model).activation is False  # unfiltered model: the function leaf is not decayed


def config_for(name: str, **kwargs) -> OptimConfig:
    return OptimConfig(name=name, **kwargs)


@pytest.mark.parametrize("name", OPTIMIZERS + ("sgd-nesterov",))
def test_every_optimizer_reduces_a_quadratic_loss_under_jit(name, getkey):
    model = Tiny(getkey())
    tokens = jnp.arange(7)
    target = jax.random.normal(getkey(), (7, 3)) * 0.5
    if name == "sgd-nesterov":
        cfg = config_for("sgd", learning_rate=0.05, momentum=0.9, nesterov=True, warmup_steps=2)
    else:
        cfg = config_for(name, learning_rate=0.1 if name == "sgd" else 0.02, warmup_steps=2)
    tx = build_optimizer(cfg)
    params, static = split(model)
    state = tx.init(params)

    def loss_fn(p):
        return jnp.mean((eqx.combine(p, static)(tokens) - target) ** 2)

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return eqx.apply_updates(p, updates), s, loss

    losses = []
    for _ in range(30):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(optimizer_step_count(state)) == 30


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_weight_decay_shrinks_decayed_leaves_and_spares_excluded_ones(name, getkey):
    lr, wd = 0.01, 0.5
    cfg = config_for(name, learning_rate=lr, weight_decay=wd, eps=1e-8)
    tx = build_optimizer(cfg)
    params, _ = split(Tiny(getkey()))
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = tx.init(params)
    history = [params]
    update = jax.jit(tx.update)
    for _ in range(3):
        updates, state = update(zeros, state, history[-1])
        history.append(eqx.apply_updates(history[-1], updates))
    w0, w1 = params.proj.weight, history[1].proj.weight
    if name == "adam":  # coupled: g = wd·θ goes through Adam, first step moves by lr·g/(|g| + eps)
        g = wd * w0
        expected = w0 - lr * g / (jnp.abs(g) + 1e-8)
    else:  # decoupled (adamw, lion, ademamix) or coupled SGD without momentum: θ·(1 − lr·wd)
        expected = w0 * (1 - lr * wd)
    np.testing.assert_allclose(w1, expected, rtol=1e-6)
    for before, after in zip(history, history[1:]):
        assert jnp.all(jnp.abs(after.proj.weight) < jnp.abs(before.proj.weight))
        assert jnp.all(jnp.sign(after.proj.weight) == jnp.sign(before.proj.weight))
        for leaf in (lambda p: p.proj.bias, lambda p: p.norm.weight, lambda p: p.embedding.weight):
            assert jnp.array_equal(leaf(after), leaf(before))


def test_adamw_without_decay_is_adam(getkey):
    params, _ = split(Tiny(getkey()))
    grads = jax.tree.map(lambda p: jnp.cos(3 * p), params)
    results = []
    for name in ("adamw", "adam"):
        tx = build_optimizer(config_for(name, weight_decay=0.0))
        updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        results.append(updates)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, *results))


# -------------------------------------------------------------------------------- the LR actually applied


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_learning_rate_at_is_the_lr_actually_applied(name):
    """Measure the LR from the param change of each update and compare with learning_rate_at(count before)."""
    cfg = OptimConfig(
        name=name,
        learning_rate=0.01,
        weight_decay=0.0 if name in ("sgd", "adam") else 0.5,
        grad_clip_norm=None,
        warmup_steps=3,
        decay="linear",
        decay_steps=4,
        end_lr_factor=0.5,
        cooldown_steps=3,
    )
    total = 12
    tx = build_optimizer(cfg, total_steps=total)
    params = {"w": jnp.full((2,), 2.0)}
    # SGD, and Adam with a constant gradient (m̂ = g, v̂ = g² exactly): gradient 1, so Δθ = −lr (Adam: up to eps).
    # Decoupled decay with zero gradient: Δθ = −lr·wd·θ.
    coupled = name in ("sgd", "adam")
    grads = {"w": jnp.ones(2) if coupled else jnp.zeros(2)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for k in range(total + 2):
        assert int(optimizer_step_count(state)) == k
        updates, state = update(grads, state, params)
        delta = updates["w"][0]
        applied = -delta if coupled else -delta / (cfg.weight_decay * params["w"][0])
        params = optax_apply(params, updates)
        expected = learning_rate_at(cfg, k, total_steps=total)
        assert float(applied) == pytest.approx(float(expected), rel=1e-5, abs=1e-9), k
        assert float(expected) == pytest.approx(reference_lr(cfg, k, total), rel=1e-6, abs=1e-9)
        last = learning_rate_at(cfg, optimizer_step_count(state) - 1, total_steps=total)
        assert float(last) == float(expected)  # what an LR monitor reports after the update


def optax_apply(params, updates):
    return jax.tree.map(lambda p, u: p + u, params, updates)


def test_set_optimizer_step_count_resumes_the_schedule():
    cfg = OptimConfig(name="sgd", learning_rate=1.0, weight_decay=0.0, grad_clip_norm=None, warmup_steps=100)
    tx = build_optimizer(cfg)
    params = {"w": jnp.zeros(())}
    state = set_optimizer_step_count(tx.init(params), 40)
    assert int(optimizer_step_count(state)) == 40
    updates, state = tx.update({"w": jnp.ones(())}, state, params)
    assert float(updates["w"]) == pytest.approx(-0.4)
    assert int(optimizer_step_count(state)) == 41
    # the count is a buffer of its own (a train step donating the state would otherwise free it twice)
    step = jnp.asarray(40, jnp.int32)
    count = optimizer_step_count(set_optimizer_step_count(tx.init(params), step))
    assert count.unsafe_buffer_pointer() != step.unsafe_buffer_pointer() and int(count) == 40


# ------------------------------------------------------------------------------------------------ clipping


def test_gradient_clipping_caps_the_global_norm():
    cfg = OptimConfig(name="sgd", learning_rate=1.0, weight_decay=0.0, grad_clip_norm=0.5)
    tx = build_optimizer(cfg)
    params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    big = {"a": jnp.asarray([3.0, 4.0, 0.0]), "b": jnp.full((2, 2), 1.0)}  # norm sqrt(29)
    small = jax.tree.map(lambda g: g * 0.05, big)  # norm 0.27 < 0.5
    state = tx.init(params)
    for grads, scale in ((big, 0.5 / math.sqrt(29)), (small, 1.0)):
        updates, _ = tx.update(grads, state, params)
        assert float(optax_global_norm(updates)) == pytest.approx(scale * float(optax_global_norm(grads)), rel=1e-6)
        for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
            np.testing.assert_allclose(u, -scale * g, rtol=1e-6)  # same direction, only the length capped
    unclipped = build_optimizer(OptimConfig(name="sgd", learning_rate=1.0, weight_decay=0.0, grad_clip_norm=None))
    updates, _ = unclipped.update(big, unclipped.init(params), params)
    assert float(optax_global_norm(updates)) == pytest.approx(math.sqrt(29), rel=1e-6)


@pytest.mark.parametrize("scale", [0.1, 0.3, 7.0, 0.0, math.inf, math.nan])
def test_our_clip_gives_optax_clip_by_global_norm(scale):
    """One scalar multiply instead of optax's per-element divide (for XLA:CPU's fusion), the same rule."""
    from xlstm_eqx.train.optim import clip_by_global_norm

    keys = jax.random.split(jax.random.key(0), 3)
    grads = {"a": jax.random.normal(keys[0], (7, 5)), "b": [jax.random.normal(keys[1], (11,)), jnp.ones(())]}
    grads = jax.tree.map(lambda g: g * scale, grads)
    ours, theirs = clip_by_global_norm(1.5), optax.clip_by_global_norm(1.5)
    mine, _ = ours.update(grads, ours.init(grads))
    reference, _ = theirs.update(grads, theirs.init(grads))
    assert jax.tree.structure(ours.init(grads)) == jax.tree.structure(theirs.init(grads))  # checkpoints match
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-7, atol=0)  # NaN where optax has NaN


def test_a_known_norm_is_used_only_for_the_updates_it_was_computed_from():
    """The train step hands the clip the gradients' norm it already has; any other updates (a wrapper's, e.g.
    MultiSteps' accumulated ones) must be measured afresh, or the clip would scale by a stranger's norm."""
    from xlstm_eqx.train.optim import KnownNorm, clip_by_global_norm, with_standard_promotion

    grads = {"a": jnp.full((3, 4), 2.0), "b": [jnp.ones((5,))]}  # norm √53 ≈ 7.3
    clip = clip_by_global_norm(1.0)
    state = clip.init(grads)
    claimed = KnownNorm(grads, jnp.float32(4.0))  # deliberately not the true norm: shows which one was used
    trusted, _ = clip.update(grads, state, known_norm=claimed)
    np.testing.assert_allclose(trusted["a"], 2.0 / 4.0, rtol=1e-6)
    copy = jax.tree.map(jnp.array, grads)  # equal values, other arrays
    measured, _ = clip.update(copy, state, known_norm=claimed)
    np.testing.assert_allclose(measured["a"], 2.0 / math.sqrt(53), rtol=1e-6)
    rebuilt, _ = clip.update({"a": grads["a"], "b": grads["b"][0]}, state, known_norm=claimed)  # same leaves
    np.testing.assert_allclose(rebuilt["a"], 2.0 / math.sqrt(53), rtol=1e-6)  # other structure: measured

    # MultiSteps forwards extra arguments to its inner chain, with the accumulated mean instead of the updates
    every_2 = with_standard_promotion(optax.MultiSteps(optax.chain(clip, optax.sgd(1.0)), 2))
    state = every_2.init(grads)
    for scale in (5.0, -1.0):  # the mean, 2·grads, has twice the norm of the last updates, -grads
        step = jax.tree.map(functools.partial(jnp.multiply, scale), grads)
        updates, state = every_2.update(step, state, grads, known_norm=KnownNorm(step, optax.tree.norm(step)))
    np.testing.assert_allclose(updates["a"], -2.0 / math.sqrt(53), rtol=1e-6)  # the mean clipped to norm 1


def optax_global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(tree)))


# -------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(b2=1.0), "b2"),
        (dict(eps=-1.0), "eps"),
        (dict(eps=0.0), "eps"),  # adamw: a zero gradient entry would update by 0/0
        (dict(name="ademamix", eps=0.0), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(momentum=0.9), "momentum"),
        (dict(name="sgd", nesterov=True), "nesterov"),
        (dict(weight_decay_exclude=("(",)), "weight_decay_exclude"),
        (dict(grad_clip_norm=0.0), "grad_clip_norm"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(cooldown_steps=-5), "cooldown_steps"),
        (dict(warmup_init_factor=1.5), "warmup_init_factor"),
        (dict(decay="cosine"), "decay_steps"),
        (dict(decay_steps=10), "decay_steps"),
        (dict(decay="exponential", decay_steps=10, end_lr_factor=0.0), "end_lr_factor"),
        (dict(decay="linear", decay_steps=10, end_lr_factor=1.5), "end_lr_factor"),
        (dict(decay="linear", decay_steps=10, end_lr_factor=0.0, cooldown_steps=5), "cooldown_steps"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        OptimConfig(**kwargs)
    assert info.value.path == field


def test_unknown_names_are_rejected_without_a_type_checker():
    """Outside the tests nothing type-checks __init__; __post_init__ still rejects unknown names."""
    for field, value in (("name", "adamx"), ("decay", "cos")):
        cfg = OptimConfig()
        object.__setattr__(cfg, field, value)
        with pytest.raises(ConfigError) as info:
            cfg.__post_init__()
        assert info.value.path == field
        with pytest.raises(ConfigError) as info:
            from_dict(OptimConfig, {field: value}, "optim")
        assert info.value.path == f"optim.{field}" and "expected" in str(info.value)


def test_from_dict_round_trip_and_dotted_errors():
    data = {
        "name": "sgd",
        "learning_rate": 1,  # int → float
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay_exclude": ["norm", r"\.bias$"],
        "grad_clip_norm": None,
        "warmup_steps": 5,
        "decay": "cosine",
        "decay_steps": 50,
        "end_lr_factor": 0.0,
    }
    cfg = from_dict(OptimConfig, data)
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.weight_decay_exclude == ("norm", r"\.bias$")
    assert from_dict(OptimConfig, to_dict(cfg)) == cfg
    assert from_dict(OptimConfig, to_dict(OptimConfig())) == OptimConfig()
    with pytest.raises(ConfigError) as info:
        from_dict(OptimConfig, {"decay": "linear"}, "optim")
    assert info.value.path == "optim.decay_steps"


def test_optax_wrappers_run_under_strict_promotion_when_wrapped():
    """optax.MultiSteps divides float32 by an int32 count: it needs the same wrapper as our chain."""
    tx = with_standard_promotion(optax.MultiSteps(build_optimizer(OptimConfig(warmup_steps=2)), every_k_schedule=2))
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for micro_step in range(4):
        _, state = update({"w": jnp.ones(3)}, state, params)
        assert int(optimizer_step_count(state)) == (micro_step + 1) // 2  # counts real updates only
