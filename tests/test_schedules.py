"""Learning-rate schedules: exact values at every phase boundary (warmup → decay → stable → cooldown)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_eqx.config import ConfigError
from xlstm_eqx.config.optim import OptimConfig
from xlstm_eqx.train.optim import (
    build_optimizer,
    build_schedule,
    learning_rate_at,
)

DECAYS = ("constant", "cosine", "exponential", "linear")


def schedule_config(decay: str, **kwargs) -> OptimConfig:
    """Peak 1, warmup 10, decay 100 (0 for constant), cooldown 20, end factor 0.1."""
    base = dict(learning_rate=1.0, warmup_steps=10, decay=decay, decay_steps=0 if decay == "constant" else 100)
    return OptimConfig(**(base | dict(cooldown_steps=20, end_lr_factor=0.1) | kwargs))


def reference_lr(cfg: OptimConfig, k: int, total: int | None) -> float:
    """The documented schedule, written out independently in float64."""
    peak, w, d, c = cfg.learning_rate, cfg.warmup_steps, cfg.decay_steps, cfg.cooldown_steps
    end = peak * (1.0 if cfg.decay == "constant" else cfg.end_lr_factor)
    if c and k >= total:
        return 0.0
    if c and k >= total - c:
        return end * (total - k) / c
    if k < w:
        init = cfg.warmup_init_factor * peak
        return init + (peak - init) * k / w
    if k >= w + d:
        return end
    t = (k - w) / d
    if cfg.decay == "cosine":
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.decay == "exponential":
        return peak * (end / peak) ** t
    return peak + (end - peak) * t


# ---------------------------------------------------------------------------------------------- schedules

STEPS = (0, 5, 10, 50, 110, 179, 180, 190, 199, 200, 201, 2000)
HAND = {  # k -> expected LR for warmup 10, decay 100, cooldown 20, total 200, end factor 0.1
    "constant": (0, 0.5, 1, 1, 1, 1, 1, 0.5, 0.05, 0, 0, 0),
    "cosine": (0, 0.5, 1, 0.1 + 0.45 * (1 + math.cos(0.4 * math.pi)), 0.1, 0.1, 0.1, 0.05, 0.005, 0, 0, 0),
    "exponential": (0, 0.5, 1, 0.1**0.4, 0.1, 0.1, 0.1, 0.05, 0.005, 0, 0, 0),
    "linear": (0, 0.5, 1, 0.64, 0.1, 0.1, 0.1, 0.05, 0.005, 0, 0, 0),
}


@pytest.mark.parametrize("decay", DECAYS)
def test_schedule_values_at_exact_steps(decay):
    cfg = schedule_config(decay)
    schedule = build_schedule(cfg, total_steps=200)
    got = np.asarray(schedule(jnp.asarray(STEPS, dtype=jnp.int32)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, HAND[decay], rtol=1e-6, atol=1e-7)
    dense = np.arange(0, 260)
    np.testing.assert_allclose(
        schedule(jnp.asarray(dense, dtype=jnp.int32)), [reference_lr(cfg, k, 200) for k in dense], rtol=2e-6, atol=1e-7
    )
    # Same values one step at a time under jit, for Python ints and via learning_rate_at.
    assert float(jax.jit(schedule)(jnp.int32(190))) == pytest.approx(HAND[decay][7], rel=1e-6)
    assert float(learning_rate_at(cfg, 50, total_steps=200)) == pytest.approx(HAND[decay][3], rel=1e-6)


@pytest.mark.parametrize("decay", DECAYS)
def test_schedule_phase_shapes(decay):
    """Acceptance tests of the original (§7.3), with the phases of our own definition."""
    cfg = schedule_config(decay, warmup_init_factor=0.2, learning_rate=3e-3)
    total = 200
    lr = np.asarray(build_schedule(cfg, total)(jnp.arange(10 * total, dtype=jnp.int32)), dtype=np.float64)
    np.testing.assert_allclose(lr[:11], np.linspace(0.2 * 3e-3, 3e-3, 11), rtol=1e-6)
    end = cfg.end_learning_rate
    np.testing.assert_allclose(lr[180:201], np.linspace(end, 0.0, 21), rtol=1e-5, atol=1e-10)
    assert np.all(lr >= 0) and np.all(lr <= 3e-3 * (1 + 1e-6)) and np.all(lr[200:] == 0)
    decay_phase = lr[10:111]
    assert np.all(np.diff(decay_phase) <= 1e-9) and decay_phase[-1] == pytest.approx(end, rel=1e-6)
    if decay == "exponential":
        np.testing.assert_allclose(np.diff(np.log(decay_phase)), math.log(0.1) / 100, rtol=1e-3)
    if decay == "linear":
        np.testing.assert_allclose(decay_phase, np.linspace(3e-3, end, 101), rtol=1e-5)


@pytest.mark.parametrize("decay", DECAYS)
def test_without_cooldown_the_end_lr_holds_forever(decay):
    cfg = schedule_config(decay, cooldown_steps=0, end_lr_factor=0.5)
    schedule = build_schedule(cfg)  # no total needed
    ks = jnp.asarray([110, 111, 1000, 10**6, 2**31 - 1], dtype=jnp.int32)
    expected = 1.0 if decay == "constant" else 0.5  # exponential does not keep decaying past decay_steps
    np.testing.assert_allclose(schedule(ks), expected, rtol=1e-6)


def test_plain_constant_schedule_and_cooldown_without_stable_phase():
    assert float(build_schedule(OptimConfig(learning_rate=2e-3))(0)) == pytest.approx(2e-3)
    cfg = OptimConfig(learning_rate=1.0, warmup_steps=4, decay="linear", decay_steps=4, cooldown_steps=4)
    np.testing.assert_allclose(
        build_schedule(cfg, total_steps=12)(jnp.arange(14)),
        [0, 0.25, 0.5, 0.75, 1, 0.775, 0.55, 0.325, 0.1, 0.075, 0.05, 0.025, 0, 0],
        rtol=1e-6,
        atol=1e-7,
    )


def test_cooldown_needs_a_long_enough_total():
    cfg = schedule_config("linear")
    for total in (None, 129):
        with pytest.raises(ConfigError) as info:
            build_schedule(cfg, total_steps=total)
        assert info.value.path == "cooldown_steps"
    build_schedule(cfg, total_steps=130)  # warmup + decay + cooldown exactly
    with pytest.raises(ConfigError, match="cooldown_steps"):
        build_optimizer(cfg)
