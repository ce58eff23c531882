"""Metrics pytrees: the update rules of each log mode, reset, jit stability, cross-device reduction inside
shard_map (8 fake devices) against the single-device computation, host aggregation and perplexity naming."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from xlstm_eqx.train.metrics import (
    EVAL_LOG_MODES,
    LOG_MODES,
    LogModes,
    MaxAcc,
    MeanAcc,
    Measured,
    accumulate,
    as_log_modes,
    empty_like,
    merge_metrics,
    output_key,
    reduce_measured,
)
from xlstm_eqx.train.metrics_host import add_perplexity, aggregate_host, perplexity_key, to_host

ORDINARY = ("mean", "mean_nopostfix", "single", "max", "std")


def _run(steps, modes):
    """Folds a list of {name: Measured} steps into running metrics with one jitted step function."""
    step = jax.jit(lambda running, measured: merge_metrics(running, accumulate(measured, modes)))
    running = empty_like(jax.eval_shape(lambda m: accumulate(m, modes), steps[0]))
    for measured in steps:
        running = step(running, measured)
    return running, step


def test_update_rules_over_many_steps():
    rng = np.random.default_rng(0)
    n = 30
    counts = rng.integers(1, 50, n).astype(np.float32)
    values = {
        "loss": (rng.normal(2.0, 0.5, n) * counts).astype(np.float32),
        "neg": (-rng.uniform(1.0, 5.0, n) * counts).astype(np.float32),  # max must not report 0 (§10.2)
    }
    modes = {name: ORDINARY for name in values}
    running, _ = _run([{k: Measured(v[i], counts[i]) for k, v in values.items()} for i in range(n)], modes)
    host = to_host(running)
    assert set(host) == {output_key(k, m) for k in values for m in ORDINARY}
    for name, v in values.items():
        averages = v.astype(np.float64) / counts
        assert host[f"{name}_mean"] == pytest.approx(v.astype(np.float64).sum() / counts.sum(), rel=1e-5)
        assert host[name] == host[f"{name}_mean"]
        assert host[f"{name}_std"] == pytest.approx(averages.std(), rel=1e-4)
        assert host[f"{name}_max"] == pytest.approx(averages.max(), rel=1e-6)
        assert host[f"{name}_single"] == pytest.approx(averages[-1], rel=1e-6)
        assert all(isinstance(host[output_key(name, m)], float) for m in ORDINARY)
    assert host["neg_max"] < 0


def test_output_keys_follow_the_seed():
    keys = [output_key("loss", mode) for mode in LOG_MODES]
    assert keys == [
        "loss_mean",
        "loss",
        "loss_single",
        "loss_max",
        "loss_std",
        "loss_single_noreduce",
        "loss_single_noreduce_wcount",
    ]


def test_std_is_accurate_when_spread_is_small_against_level():
    # E[x²] - E[x]² in float32 is off by ~1% here; the pairwise merge is not.
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 9, 200).astype(np.float32)
    values = ((3.0 + 0.01 * rng.standard_normal(200)) * counts).astype(np.float32)
    running, _ = _run([{"loss": Measured(v, c)} for v, c in zip(values, counts)], {"loss": "std"})
    averages = (values / counts).astype(np.float64)
    assert to_host(running)["loss_std"] == pytest.approx(averages.std(), rel=1e-4)


def test_steps_without_count_and_empty_metrics():
    modes = {"loss": ORDINARY}
    steps = [{"loss": Measured(jnp.float32(v), jnp.float32(c))} for v, c in [(2.0, 1.0), (0.0, 0.0), (8.0, 2.0)]]
    host = to_host(_run(steps, modes)[0])
    assert host["loss_mean"] == pytest.approx(10.0 / 3.0)
    assert host["loss_max"] == 4.0  # the count-0 step adds nothing to max/std
    assert host["loss_std"] == pytest.approx(1.0)
    with pytest.warns(RuntimeWarning, match="loss_single"):
        host = to_host(_run(steps[:2], modes)[0])  # the last step had count 0
    assert np.isnan(host["loss_single"]) and host["loss_mean"] == 2.0
    with pytest.warns(RuntimeWarning, match="nothing accumulated"):
        empty = to_host(empty_like(accumulate(steps[0], modes)))
    assert all(np.isnan(v) for v in empty.values())


def test_reset_gives_just_the_new_values():
    modes = {"loss": ORDINARY, "seq": "single_noreduce_wcount"}
    measure = lambda v, c: {"loss": Measured(v, c), "seq": Measured(jnp.full(3, v), jnp.full(3, c))}  # noqa: E731
    running, _ = _run([measure(5.0, 1.0), measure(9.0, 2.0)], modes)
    reset = empty_like(running)
    assert jax.tree.structure(reset) == jax.tree.structure(running)
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(reset)] == [
        (x.shape, x.dtype) for x in jax.tree.leaves(running)
    ]
    assert float(reset["loss_max"].value) == -np.inf
    new = accumulate(measure(-3.0, 2.0), modes)
    after = to_host(merge_metrics(reset, new))
    expected = to_host(new)
    assert after.keys() == expected.keys()
    for key in ("loss_mean", "loss", "loss_single", "loss_max", "loss_std"):
        assert after[key] == expected[key]
    assert after["loss_max"] == -1.5
    np.testing.assert_array_equal(after["seq_single_noreduce_wcount"][0], np.full(3, -3.0))


def test_jitted_step_compiles_once_across_steps_and_resets():
    modes = LogModes({"seq": "single_noreduce"}, default=ORDINARY)
    rng = np.random.default_rng(2)

    def measure():
        return {
            "loss": Measured(jnp.float32(rng.normal()), jnp.float32(rng.integers(1, 9))),
            "seq": Measured(jnp.asarray(rng.normal(size=4), jnp.float32), jnp.float32(4)),
        }

    running, step = _run([measure() for _ in range(3)], modes)
    for _ in range(2):
        to_host(running)
        running = empty_like(running)
        for _ in range(3):
            running = step(running, measure())
    assert step._cache_size() == 1
    reset_then_fold = jax.jit(lambda m, measured: merge_metrics(empty_like(m), accumulate(measured, modes)))
    for _ in range(3):
        running = reset_then_fold(running, measure())
    assert reset_then_fold._cache_size() == 1


def test_merge_keeps_one_sided_keys_and_rejects_type_mismatch():
    a = accumulate({"loss": Measured(4.0, 2.0)})
    b = accumulate({"acc": Measured(1.0, 4.0)}, {"acc": ("mean", "max")})
    merged = merge_metrics(a, b)
    assert set(merged) == {"loss_mean", "acc_mean", "acc_max"}
    assert set(a) == {"loss_mean"}  # inputs untouched
    assert isinstance(merged["loss_mean"], MeanAcc) and isinstance(merged["acc_max"], MaxAcc)
    with pytest.raises(TypeError, match="loss_mean"):
        merge_metrics(a, {"loss_mean": merged["acc_max"]})


def test_default_modes():
    m = {"loss": Measured(6.0, 3.0)}
    assert set(accumulate(m)) == {"loss_mean"}  # nothing given -> "mean" (as documented by the seed)
    assert set(accumulate(m, EVAL_LOG_MODES)) == {"loss"}
    assert set(accumulate(m, ("max", "std"))) == {"loss_max", "loss_std"}
    assert set(accumulate(m, {"other": "max"})) == {"loss_mean"}
    modes = EVAL_LOG_MODES.override({"param_norm": "mean_nopostfix", "grad_norm": ["mean", "max"]})
    assert modes.of("grad_norm") == ("mean", "max") and modes.of("x") == ("mean_nopostfix",)
    assert as_log_modes(modes) is modes and modes == EVAL_LOG_MODES.override({"grad_norm": ("mean", "max")}).override(
        {"param_norm": ("mean_nopostfix",)}
    )


def test_unknown_mode_and_bad_combinations_are_errors():
    with pytest.raises(ValueError, match="'loss'.*'median'"):
        accumulate({"loss": Measured(1.0)}, {"loss": ("mean", "median")})
    with pytest.raises(ValueError, match="<default>.*'avg'"):
        LogModes(default="avg")
    with pytest.raises(ValueError, match="'seq'.*single_noreduce"):
        reduce_measured({"seq": Measured(jnp.ones(2))}, {"seq": ("mean", "single_noreduce")}, "data")
    with pytest.raises(ValueError, match="already taken"):
        accumulate({"loss": Measured(1.0), "loss_mean": Measured(1.0)}, {"loss_mean": "mean_nopostfix"})


def _local_measured(x, mask):
    """What a loss function reports on one device: token sums, per-row sums, and a device-invariant constant."""
    tokens = x * mask
    return {
        "loss": Measured(tokens.sum(), mask.sum()),
        "seq": Measured(tokens.sum(axis=1), mask.sum()),
        "nll": Measured(tokens.sum(axis=1), mask.sum(axis=1)),
        "const": Measured(jnp.float32(1.0), jnp.float32(1.0)),
    }


REDUCE_MODES = LogModes({"seq": "single_noreduce", "nll": "single_noreduce_wcount"}, default=ORDINARY)


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("layout", ["data8", "data_fsdp_model"])
def test_reduce_measured_in_shard_map_equals_single_device(layout, check_vma):
    auto = jax.sharding.AxisType.Auto
    if layout == "data8":
        mesh = jax.make_mesh((8,), ("data",), axis_types=(auto,))
        axes, batch_axes, spec = ("data",), None, P("data", None)
    else:  # rows over data x fsdp, the sequence split over model (each model shard scores a slice)
        mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"), axis_types=(auto,) * 3)
        axes, batch_axes, spec = ("data", "fsdp", "model"), ("data", "fsdp"), P(("data", "fsdp"), "model")

    def body(running, x, mask):
        reduced = reduce_measured(_local_measured(x, mask), REDUCE_MODES, axes, batch_axis_names=batch_axes)
        return merge_metrics(running, accumulate(reduced, REDUCE_MODES))

    step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), spec, spec), out_specs=P(), check_vma=check_vma))

    def direct(x, mask):  # the whole batch on one device; the constant was reported once per device
        measured = _local_measured(x, mask)
        measured["const"] = Measured(jnp.float32(8.0), jnp.float32(8.0))
        return accumulate(measured, REDUCE_MODES)

    rng = np.random.default_rng(3)
    batches = [
        (
            jnp.asarray(rng.normal(size=(16, 6)), jnp.float32),
            jnp.asarray(rng.random((16, 6)) < 0.6, jnp.float32),
        )
        for _ in range(3)
    ]
    reference = empty_like(jax.eval_shape(direct, *batches[0]))
    running = empty_like(reference, jax.sharding.NamedSharding(mesh, P()))  # placed like the step's output
    for x, mask in batches:
        running = step(running, x, mask)
        reference = merge_metrics(reference, direct(x, mask))
    got, want = to_host(running), to_host(reference)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert got["const"] == 1.0 and float(running["const_mean"].count) == 24.0
    # per-row values of the last batch, in global row order
    x, mask = batches[-1]
    np.testing.assert_allclose(got["seq_single_noreduce"], (x * mask).sum(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["nll_single_noreduce_wcount"][1], mask.sum(1))
    step(empty_like(running), x, mask)
    assert step._cache_size() == 1


def test_reduce_is_one_collective_per_kind():
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    spec = P(("data", "fsdp"), "model")
    fn = jax.shard_map(
        lambda x, mask: reduce_measured(
            _local_measured(x, mask), REDUCE_MODES, mesh.axis_names, batch_axis_names=spec[0]
        ),
        mesh=mesh,
        in_specs=(spec, spec),
        out_specs=P(),
    )
    jaxpr = str(jax.make_jaxpr(fn)(jnp.ones((16, 6)), jnp.ones((16, 6))))
    # one psum of all ordinary leaves, one psum over 'model' of the per-row leaves, one all-gather of those
    assert jaxpr.count("= psum") == 2 and jaxpr.count("= all_gather") == 1


def test_noreduce_values_concatenate_on_host():
    modes = LogModes({"seq": "single_noreduce", "nll": "single_noreduce_wcount"}, default="mean_nopostfix")
    rng = np.random.default_rng(4)
    batches = [(rng.normal(size=n).astype(np.float32), rng.integers(1, 9, n).astype(np.float32)) for n in (3, 5)]
    running, aggregated = None, {"earlier": 1.0}
    for values, counts in batches:
        measured = {
            "loss": Measured(values.sum(), counts.sum()),
            "seq": Measured(values, len(values)),
            "nll": Measured(values, counts),
        }
        step = accumulate(measured, modes)
        running = step if running is None else merge_metrics(running, step)
        aggregated = aggregate_host(aggregated, to_host(running), modes)
    all_values = np.concatenate([v for v, _ in batches])
    all_counts = np.concatenate([c for _, c in batches])
    np.testing.assert_allclose(aggregated["seq_single_noreduce"], all_values)
    np.testing.assert_allclose(aggregated["nll_single_noreduce_wcount"][0], all_values)
    np.testing.assert_allclose(aggregated["nll_single_noreduce_wcount"][1], all_counts)
    assert aggregated["loss"] == pytest.approx(all_values.sum() / all_counts.sum(), rel=1e-5)  # latest, not summed
    assert aggregated["earlier"] == 1.0


@pytest.mark.parametrize(
    "key, expected",
    [
        ("loss", "perplexity"),
        ("loss_mean", "perplexity_mean"),
        ("loss_single", "perplexity_single"),
        ("first_loss", "first_perplexity"),
        ("first_loss_mean", "first_perplexity_mean"),
        ("val_loss_single", "val_perplexity_single"),
        ("loss_std", None),
        ("loss_max", None),
        ("loss_single_noreduce", None),
        ("loss_single_noreduce_wcount", None),
        ("gloss", None),
        ("lossy", None),
        ("accuracy", None),
        ("z_loss", None),
        ("z_loss_mean", None),
        ("val_z_loss", None),
        ("shakespeare_z_loss_single", None),
        ("shakespeare_loss", "shakespeare_perplexity"),
    ],
)
def test_perplexity_key(key, expected):
    assert perplexity_key(key) == expected


def test_add_perplexity():
    host = {
        "loss_mean": 2.0,
        "loss_std": 0.5,
        "loss_max": 3.0,
        "first_loss": np.array([1.0, 0.0]),
        "loss_single": 1000.0,
        "nll_loss_single_noreduce_wcount": (np.ones(2), np.ones(2)),
        "aux_loss": 0.0,
        "aux_perplexity": -1.0,  # already there: never overwritten
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = add_perplexity(host)
    assert out["perplexity_mean"] == pytest.approx(np.exp(2.0)) and isinstance(out["perplexity_mean"], float)
    np.testing.assert_allclose(out["first_perplexity"], np.exp([1.0, 0.0]))
    assert out["perplexity_single"] == np.inf
    assert out["aux_perplexity"] == -1.0
    assert set(out) - set(host) == {"perplexity_mean", "first_perplexity", "perplexity_single"}
    assert "perplexity_mean" not in host


def test_host_functions_are_reexported():
    import xlstm_eqx.train.metrics as metrics
    import xlstm_eqx.train.metrics_host as metrics_host

    assert metrics.to_host is metrics_host.to_host and metrics.add_perplexity is metrics_host.add_perplexity
    with pytest.raises(AttributeError):
        metrics.no_such_function  # noqa: B018


def test_a_per_device_scalar_is_one_entry_per_device_on_one_device_too():
    """``single_noreduce`` of a 0-d value: shape (devices,), also without batch axes (one device)."""
    modes = LogModes({"s": "single_noreduce"}, default="mean_nopostfix")
    for devices in (1, 2):
        mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        axes = ("data",) if devices > 1 else ()  # one device: no batch axes, as the steps pass them

        def body(x, axes=axes):
            measured = {"s": Measured(x.sum(), jnp.float32(1.0))}
            return accumulate(reduce_measured(measured, modes, axes), modes)

        spec = P(*axes)  # the steps name only batch axes of size > 1 (parallel.batch_axes)
        step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=P()))
        got = to_host(step(jnp.arange(4.0)))["s_single_noreduce"]
        assert got.shape == (devices,) and got.sum() == 6.0
