"""Step functions: sharded == single device, accumulation == big batch, NaN skipping, debug == jit, errors."""

import dataclasses
import functools
import math
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xlstm_eqx.config import ModelConfig
from xlstm_eqx.config.mesh import MeshConfig
from xlstm_eqx.config.train import TrainConfig
from xlstm_eqx.data import Batch
from xlstm_eqx.models import build
from xlstm_eqx.parallel import make_mesh
from xlstm_eqx.train.loss import lm_loss
from xlstm_eqx.train.metrics import Measured, to_host
from xlstm_eqx.train.state import init
from xlstm_eqx.train.steps import make_eval_step, make_train_step

# 8 heads and an FFN width of 192 so that every mesh up to model=8 divides them.
MODEL = ModelConfig(vocab_size=64, embedding_dim=64, num_blocks=2, num_heads=8, qk_dim_factor=1.0, chunk_size=8)


def make_batch(key, rows=8, length=24):
    """Two documents per row (a reset inside every row) and a padded tail that must not be scored."""
    tokens = jax.random.randint(key, (rows, length + 1), 0, MODEL.vocab_size, dtype=jnp.int32)
    batch = Batch.from_tokens(tokens)
    t = jnp.arange(length, dtype=jnp.int32)
    segment_ids = jnp.where(t < 10, 1, 2) * (t < length - 3).astype(jnp.int32)
    mask = jnp.broadcast_to(segment_ids > 0, batch.inputs.shape)
    positions = jnp.where(t < 10, t, t - 10)
    shape = batch.inputs.shape
    return Batch(
        batch.inputs, batch.targets, mask, jnp.broadcast_to(segment_ids, shape), jnp.broadcast_to(positions, shape)
    )


@eqx.filter_jit  # one compiled program instead of hundreds of eager init ops (~10 s per model)
def perturbed_model(key, scale=0.05, model_config=MODEL):
    """Noise on every weight so that gates matter. Much more than 0.05 makes the read-out ill-conditioned:
    float32 gradients then carry ~5 digits and sharded/single differ by 3e-5 from rounding alone (while
    float64 agrees to 1e-14, see test_sharded_equals_single_device_float64)."""
    model = build(model_config, key=jax.random.key(0))
    leaves, treedef = jax.tree.flatten(model)
    keys = jax.random.split(key, len(leaves))
    noisy = [leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


def run(mesh_shape, config=TrainConfig(), steps=3, tx=None, batches=None, model_config=MODEL, evaluate=False, **kw):
    """Returns (final params as numpy, host train metrics per step, eval metrics or None) on a mesh of that
    shape; the eval step runs (and compiles) only with ``evaluate``. ``kw`` go to ``make_train_step``."""
    data, fsdp, model = mesh_shape
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, model=model), jax.devices()[: data * fsdp * model])
    tx = tx or optax.adamw(1e-2, b2=0.95, weight_decay=0.1)
    state, static = init(
        perturbed_model(jax.random.key(1), model_config=model_config),
        tx,
        key=jax.random.key(2),
        mesh=mesh,
        fsdp_min_weight_size=0,
    )
    train_step = make_train_step(static, tx, mesh, config, fsdp_min_weight_size=0, **kw)
    batches = batches or [make_batch(jax.random.key(10 + i)) for i in range(steps)]
    history = []
    for batch in batches:
        state, metrics = train_step(state, batch)
        history.append(to_host(metrics))
    evaluation = None
    if evaluate:
        eval_step = make_eval_step(static, mesh, config, fsdp_min_weight_size=0)
        evaluation = to_host(eval_step(state, make_batch(jax.random.key(99)), None))
    return jax.tree.map(np.asarray, state.params), history, evaluation


def relative(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture(scope="module")
def single_device():
    return run((1, 1, 1), tx=SGD_MOMENTUM, evaluate=True)


@pytest.fixture(scope="module")
def single_device_sgd_step():
    """Parameters after one step of SGD at learning rate 1 on one device (start minus the gradient)."""
    return run((1, 1, 1), tx=optax.sgd(1.0), steps=1)[0]


FLOAT64 = MODEL.__class__(**{**MODEL.__dict__, "param_dtype": "float64", "compute_dtype": "float64"})


@pytest.fixture(scope="module")
def single_device_float64():
    with jax.enable_x64(True):
        return run((1, 1, 1), model_config=FLOAT64)


MESHES = [(8, 1, 1), pytest.param((2, 4, 1), marks=pytest.mark.slow), (2, 2, 2),
          pytest.param((1, 2, 4), marks=pytest.mark.slow), (1, 1, 8)]  # fmt: skip
# Three float32 steps are compared under SGD with momentum: Adam divides by √v, which turns float32 rounding
# noise in near-zero gradients into visible parameter differences (up to 8e-4 after 3 steps, on one device
# vs another, while the gradients themselves agree to < 1e-5). AdamW is checked in float64 below.
SGD_MOMENTUM = optax.sgd(0.1, momentum=0.9)


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_sharded_equals_single_device(single_device, mesh_shape):
    params, history, evaluation = run(mesh_shape, tx=SGD_MOMENTUM, evaluate=True)
    ref_params, ref_history, ref_evaluation = single_device
    for step, ref_step in zip(history, ref_history):
        for name in ("loss_mean", "accuracy_mean", "grad_norm_mean", "param_norm"):
            assert step[name] == pytest.approx(ref_step[name], rel=1e-5), name
        # make_batch: 8 rows of 24 positions, two documents and 21 scored targets per row, on every mesh
        batch_stats = ("token_utilization_mean", "tokens_per_batch_mean", "documents_per_batch_mean")
        assert [step[k] for k in batch_stats] == [ref_step[k] for k in batch_stats] == [21 / 24, 168, 16]
    for name in ("loss", "accuracy"):
        assert evaluation[name] == pytest.approx(ref_evaluation[name], rel=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        assert relative(a, b) <= 1e-5


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 1, 8)])
def test_sharded_equals_single_device_float64(x64, single_device_float64, mesh_shape):
    """Exact math with the real optimizer: parameters after three AdamW steps agree to rounding in float64."""
    sharded, history, _ = run(mesh_shape, model_config=FLOAT64)
    single, ref_history, _ = single_device_float64
    assert history[-1]["grad_norm_mean"] == pytest.approx(ref_history[-1]["grad_norm_mean"], rel=1e-6)  # float32 metric
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        assert relative(a, b) <= 1e-10


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 1, 8)])
def test_sharded_gradients_equal_single_device(single_device_sgd_step, mesh_shape):
    """With SGD at learning rate 1 one step moves every parameter by exactly minus its gradient."""
    start = jax.tree.map(np.asarray, eqx.filter(perturbed_model(jax.random.key(1)), eqx.is_array))
    grads = lambda params: jax.tree.map(np.subtract, start, params)  # noqa: E731
    sharded, _, _ = run(mesh_shape, tx=optax.sgd(1.0), steps=1)
    for a, b in zip(jax.tree.leaves(grads(sharded)), jax.tree.leaves(grads(single_device_sgd_step))):
        assert relative(a, b) <= 1e-5


def test_sharded_bfloat16_gradients_are_as_accurate_as_single_device(single_device_sgd_step):
    """bfloat16 compute on a data × fsdp × model mesh: the gradients' error against float32 is that of one device.

    Sharding changes which bfloat16 partial products are summed where, so the two bfloat16 runs differ by
    rounding; each must stay as close to the float32 gradients as the other.
    """
    sgd = optax.sgd(1.0)
    start = jax.tree.map(np.asarray, eqx.filter(perturbed_model(jax.random.key(1)), eqx.is_array))
    bf16 = MODEL.__class__(**{**MODEL.__dict__, "compute_dtype": "bfloat16"})

    def gradient(params):
        return np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(params))])

    def grads(mesh_shape, model_config):
        return gradient(run(mesh_shape, tx=sgd, steps=1, model_config=model_config)[0])

    reference = gradient(single_device_sgd_step)  # float32
    error = lambda g: float(np.linalg.norm(g - reference) / np.linalg.norm(reference))  # noqa: E731
    single, sharded = error(grads((1, 1, 1), bf16)), error(grads((2, 2, 2), bf16))
    assert 1e-4 < single < 0.05  # bfloat16 rounding is visible, and no more than that
    assert sharded < 1.5 * single


def lm_loss_and_row_sums(model, batch, key, **kw):
    """``lm_loss`` plus a per-example metric: each row's sum of scored target ids (and its token count)."""
    value, measured = lm_loss(model, batch, key, **kw)
    mask = batch.loss_mask.astype(jnp.float32)
    per_row = jnp.sum(batch.targets.astype(jnp.float32) * mask, axis=1)
    measured["row_sum"] = Measured(per_row)
    measured["row_sum_w"] = Measured(per_row, jnp.sum(mask, axis=1))
    return value, measured


def test_accumulation_equals_one_big_batch():
    """Four micro-batches, accumulated in a Python loop or in lax.scan, give the step of one batch of all four;
    per-example metrics keep one entry per row, in the batch's row order."""
    sgd, batch = optax.sgd(1.0), make_batch(jax.random.key(10))
    modes = {"row_sum": "single_noreduce", "row_sum_w": "single_noreduce_wcount"}
    per_row = dict(loss_fn=lm_loss_and_row_sums, modes=modes)
    big, ref_history, _ = run((2, 1, 1), tx=sgd, batches=[batch], **per_row)
    targets, mask = np.asarray(batch.targets), np.asarray(batch.loss_mask)
    row_sums, row_tokens = np.sum(targets * mask, 1), np.sum(mask, 1)
    for scan in (False, True):
        config = TrainConfig(gradient_accumulate_steps=4, gradient_accumulate_scan=scan)
        accumulated, history, _ = run((2, 1, 1), config, tx=sgd, batches=[batch], **per_row)
        assert history[0]["loss_mean"] == pytest.approx(ref_history[0]["loss_mean"], rel=1e-6), f"scan={scan}"
        for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(big)):
            assert relative(a, b) <= 1e-6, f"scan={scan}"
        for metrics in (history[0], ref_history[0]):
            assert (metrics["tokens_per_batch_mean"], metrics["documents_per_batch_mean"]) == (168, 16)  # one step
            np.testing.assert_array_equal(metrics["row_sum_single_noreduce"], row_sums)
            values, counts = metrics["row_sum_w_single_noreduce_wcount"]
            np.testing.assert_array_equal(values, row_sums)
            np.testing.assert_array_equal(counts, row_tokens)


@pytest.mark.slow  # op-by-op on two devices: ~50 s
def test_debug_mode_gives_the_same_numbers():
    """Without jit (op by op, debuggable) the step computes the same numbers as the compiled one."""
    params, history, evaluation = run((2, 1, 1), TrainConfig(debug=True), tx=SGD_MOMENTUM, steps=1, evaluate=True)
    ref_params, ref_history, ref_evaluation = run((2, 1, 1), tx=SGD_MOMENTUM, steps=1, evaluate=True)
    assert history[0]["loss_mean"] == pytest.approx(ref_history[0]["loss_mean"], rel=1e-6)
    assert evaluation["loss"] == pytest.approx(ref_evaluation["loss"], rel=1e-6)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        assert relative(a, b) <= 1e-6


def test_train_state_is_donated():
    mesh = make_mesh(MeshConfig(data=2), jax.devices()[:2])
    tx = optax.sgd(0.1)
    model = perturbed_model(jax.random.key(1))
    state, static = init(model, tx, key=jax.random.key(2), mesh=mesh)
    old_weight = state.params.lm_head.weight
    new_state, _ = make_train_step(static, tx, mesh)(state, make_batch(jax.random.key(3)))
    assert old_weight.is_deleted() and not new_state.params.lm_head.weight.is_deleted()
    # the state was copied out of the model it was made from: donating it leaves the caller's model alive
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array)))


def test_state_is_sharded_as_the_rules_say():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, model=2))
    state, _ = init(
        functools.partial(build, MODEL), optax.adam(1e-3), key=jax.random.key(0), mesh=mesh, fsdp_min_weight_size=0
    )
    q = state.params.blocks.mlstm_layer.q.weight  # (blocks, qk_dim, D): heads on 'model', D on 'fsdp'
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "model", "fsdp")
    mu = state.opt_state[0].mu.blocks.mlstm_layer.q.weight
    assert mu.sharding.spec == q.sharding.spec


def test_intermediates_and_per_parameter_norms_are_logged():
    config = TrainConfig(
        log_intermediates=True,
        intermediates_log_modes=("mean", "max"),
        log_grad_norm_per_param=True,
        log_param_norm_per_param=True,
    )
    _, history, _ = run((2, 1, 1), config, steps=1, tx=optax.sgd(0.1))
    logged = history[0]
    per_param = [key for key in logged if key.startswith("grad_norm_blocks.mlstm_layer.q.weight")]
    assert per_param == ["grad_norm_blocks.mlstm_layer.q.weight_mean"]
    assert logged["param_norm_out_norm.weight"] > 0.0  # parameter norms are never postfixed
    for block in range(MODEL.num_blocks):
        fgate = logged[f"intermediates/fgate_mean_{block}_mean"]
        assert 0.0 < fgate < 1.0 and logged[f"intermediates/fgate_mean_{block}_max"] == pytest.approx(fgate)
        assert f"intermediates/igate_preact_mean_{block}_mean" in logged
        assert logged[f"intermediates/cell_out_abs_mean_{block}_mean"] > 0.0
    # Equal on a tensor-parallel mesh (statistics are averaged over all heads, not the local ones).
    _, tp_history, _ = run((1, 1, 8), config, steps=1, tx=optax.sgd(0.1))
    for key, value in logged.items():
        if key.startswith("intermediates/"):
            assert tp_history[0][key] == pytest.approx(value, rel=1e-5), key
    # Equal with gradient accumulation over two micro-batches, looped or scanned (each half's statistics weigh
    # half): the same keys, the same averages.
    for scan in (False, True):
        accumulated = dataclasses.replace(config, gradient_accumulate_steps=2, gradient_accumulate_scan=scan)
        _, micro_history, _ = run((2, 1, 1), accumulated, steps=1, tx=optax.sgd(0.1))
        assert sorted(k for k in micro_history[0] if k.startswith("intermediates/")) == sorted(
            k for k in logged if k.startswith("intermediates/")
        )
        for key, value in logged.items():
            if key.startswith("intermediates/") and key.endswith("_mean"):
                assert micro_history[0][key] == pytest.approx(value, rel=1e-5), (scan, key)


def _group_size(groups: str, devices: int) -> int:
    """Participants per group of an HLO ``replica_groups`` value, in any of its three printed forms."""
    if groups.startswith("{"):  # explicit {{0,1},{2,3}}; {} = all devices
        first = re.match(r"\{\{([\d,]*)\}", groups)
        return len(first.group(1).split(",")) if first else devices
    if groups.startswith("["):  # iota [groups, size]<=[...]
        return int(re.match(r"\[\d+,(\d+)\]", groups).group(1))
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", groups.split("]", 1)[0]))  # mesh['axis_0'=2,...] {'axis_0'}
    return math.prod(int(sizes[name]) for name in re.findall(r"'(\w+)'", groups.split("]", 1)[1]))


def _all_reduces(train_step, state, batch, devices: int) -> list[tuple[int, int]]:
    """(elements in the largest operand, participants per group) of every all-reduce of the compiled step."""
    out = []
    for line in train_step.lower(state, batch).compile().as_text().splitlines():
        if " all-reduce(" in line or " all-reduce-start(" in line:
            result_shapes = line.split("=", 1)[1].split(" all-reduce", 1)[0]
            dims = re.findall(r"\w+\[([\d,]*)\]", result_shapes)
            elements = max(math.prod(int(d) for d in shape.split(",") if d) for shape in dims)
            groups = re.search(r"replica_groups=(\{\{[^ ]*\}\}|\{\}|\[[^ ]*\][^ ,]*|mesh\[[^]]*\] \{[^}]*\})", line)
            out.append((elements, _group_size(groups.group(1), devices)))
    return out


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (1, 1, 2), (2, 1, 1)])
def test_no_gradient_passes_through_a_one_participant_all_reduce(mesh_shape):
    """A mesh axis of size 1 joins no collective: on one device and on a pure tensor-parallel mesh (data × fsdp = 1)
    no all-reduce has groups of one, which XLA:CPU would still run as a copy of every replicated gradient. With
    data = 2 the replicated gradients are summed over both devices, which shows the check sees gradients at all."""
    data, fsdp, model = mesh_shape
    devices = data * fsdp * model
    tx = optax.adamw(1e-3)
    mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp, model=model), jax.devices()[:devices])
    state, static = init(perturbed_model(jax.random.key(1)), tx, key=jax.random.key(2), mesh=mesh)
    step = make_train_step(static, tx, mesh, TrainConfig(donate_train_state=False))
    reduces = _all_reduces(step, state, make_batch(jax.random.key(3)), devices)
    assert all(size > 1 for _, size in reduces), reduces
    if data == 2:
        assert max(elements for elements, _ in reduces) >= MODEL.vocab_size * MODEL.embedding_dim, reduces


def test_metrics_can_name_their_own_log_modes_and_the_others_keep_theirs():
    mesh = make_mesh(MeshConfig(data=2), jax.devices()[:2])
    tx = optax.sgd(0.1)
    state, static = init(perturbed_model(jax.random.key(1)), tx, key=jax.random.key(2), mesh=mesh)
    batch = make_batch(jax.random.key(3))
    step = make_train_step(static, tx, mesh, TrainConfig(donate_train_state=False), modes={"loss": ("mean", "max")})
    _, metrics = step(state, batch)
    assert {"loss_mean", "loss_max", "accuracy_mean", "nonfinite_max"} <= set(metrics)
    assert "accuracy_max" not in metrics
    evaluation = make_eval_step(static, mesh, modes={"accuracy": "max"})(state, batch)
    assert {"loss", "accuracy_max"} <= set(evaluation) and "loss_mean" not in evaluation  # `loss` keeps its name
    with pytest.raises(ValueError, match="unknown log mode 'maximum'"):
        make_train_step(static, tx, mesh, modes={"loss": "maximum"})

    def unnamed_loss(model, micro, key, **kwargs):
        value, measured = lm_loss(model, micro, key, **kwargs)
        return value, {"nll": measured["loss"]}

    with pytest.raises(ValueError, match="check_for_nan needs the loss_fn to measure 'loss'; it measured"):
        make_train_step(static, tx, mesh, loss_fn=unnamed_loss)(state, batch)
    without_check = make_train_step(static, tx, mesh, TrainConfig(check_for_nan=False), loss_fn=unnamed_loss)
    assert "nll_mean" in jax.eval_shape(without_check, state, batch)[1]


def test_evaluation_batches_draw_their_own_reproducible_numbers():
    """A loss that draws from its key (dropout at evaluation, say): each batch gets its own draw, and the same
    batch the same draw again (the key comes from seed_eval and the batch's tokens)."""
    mesh = make_mesh(MeshConfig(data=2), jax.devices()[:2])
    state, static = init(perturbed_model(jax.random.key(1)), optax.sgd(0.1), key=jax.random.key(2), mesh=mesh)

    def noisy_loss(model, batch, key, **kwargs):
        draw = jax.random.uniform(key)
        return draw, {"loss": Measured(draw, jnp.ones(())), "draw": Measured(draw, jnp.ones(()))}

    eval_step = make_eval_step(static, mesh, loss_fn=noisy_loss, modes=("single",))
    batches = [make_batch(jax.random.key(10 + i), rows=4) for i in range(3)]
    draws = [float(to_host(eval_step(state, b))["draw_single"]) for b in batches]
    assert len(set(draws)) == 3
    assert float(to_host(eval_step(state, batches[1]))["draw_single"]) == draws[1]
