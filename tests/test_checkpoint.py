"""Checkpointer: bit-identical round trips, retention (latest + best), resharding on restore, fallback past
unreadable checkpoints, leftover orbax tmp directories, error messages, and reading meta from a directory alone."""

import dataclasses
import functools
import logging
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xlstm_eqx
from xlstm_eqx.config.mesh import MeshConfig
from xlstm_eqx.config.run import CheckpointConfig
from xlstm_eqx.io.checkpoint import UNREADABLE, Checkpointer, CheckpointError, read_checkpoint_meta
from xlstm_eqx.parallel.mesh import make_mesh
from xlstm_eqx.train.state import TrainState, abstract_state

CONFIG = xlstm_eqx.config.load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml")
BUILDER = functools.partial(xlstm_eqx.models.build, CONFIG.model)
TX = optax.adamw(1e-3)
META = {"config": {"checkpoint": {"monitor": "loss", "mode": "min"}}, "epoch": 3, "data": {"next_index": 8}}


def mesh_of(data: int, fsdp: int):
    return make_mesh(MeshConfig(data=data, fsdp=fsdp), jax.devices()[: data * fsdp])


def target(mesh, builder=BUILDER):
    return abstract_state(builder, TX, key=jax.random.key(1), mesh=mesh, fsdp_min_weight_size=0)[0]


def random_state(mesh, seed: int) -> TrainState:
    """A TrainState with the model's structure and the project's shardings on ``mesh``, every leaf random (so Adam's
    moments are not zeros). Filled from ``abstract_state``: much faster than compiling ``init`` for each mesh."""
    rng = np.random.default_rng(seed)

    def fill(leaf: jax.ShapeDtypeStruct) -> jax.Array:
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.device_put(jax.random.key(seed), leaf.sharding)
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return jax.device_put(rng.standard_normal(leaf.shape).astype(leaf.dtype), leaf.sharding)
        return jax.device_put(rng.integers(1, 100, leaf.shape).astype(leaf.dtype), leaf.sharding)

    return jax.tree.map(fill, target(mesh))


@pytest.fixture(scope="module")
def state():
    """A random TrainState sharded over fsdp=8."""
    return random_state(mesh_of(1, 8), seed=0)


def assert_same(restored: TrainState, expected: TrainState, *, shardings_of: TrainState | None = None):
    """Bit-identical leaves (keys compared through their data and implementation) and, optionally, shardings."""
    assert jax.random.key_impl(restored.key) == jax.random.key_impl(expected.key)
    assert jnp.issubdtype(restored.key.dtype, jax.dtypes.prng_key)
    unwrap = lambda s: (s.step, s.params, s.opt_state, jax.random.key_data(s.key))  # noqa: E731
    got, want = jax.tree.leaves(unwrap(restored)), jax.tree.leaves(unwrap(expected))
    assert jax.tree.structure(unwrap(restored)) == jax.tree.structure(unwrap(expected))
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    if shardings_of is not None:
        leaves = jax.tree.leaves((restored.step, restored.params, restored.opt_state))
        targets = jax.tree.leaves((shardings_of.step, shardings_of.params, shardings_of.opt_state))
        for a, t in zip(leaves, targets, strict=True):
            assert a.sharding.is_equivalent_to(t.sharding, a.ndim), (a.sharding, t.sharding)
        assert restored.key.sharding.is_equivalent_to(shardings_of.key.sharding, restored.key.ndim)


class WrongModel(Exception):
    pass


def reject(meta: dict) -> None:
    raise WrongModel("this checkpoint belongs to another model config")


def on_disk(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_round_trip_async_is_bit_identical(tmp_path, state):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=True))
    assert ckpt.save(7, state, meta=META, metrics={"loss": 1.5})
    ckpt.wait()
    restored, meta = ckpt.restore("latest", target(mesh_of(1, 8)))
    assert_same(restored, state, shardings_of=state)
    assert meta == META and ckpt.read_meta(7) == META
    again, _ = ckpt.restore(7, state)  # a concrete target works too
    assert_same(again, state, shardings_of=state)
    ckpt.close()


@pytest.mark.parametrize(
    ("mode", "values", "best"),
    [("min", [5, 1, None, 4, math.nan, 3, 6, 7], 2), ("max", [5, 1, None, 9, math.nan, 3, 6, 7], 4)],
)
def test_keeps_latest_and_best(tmp_path, state, mode, values, best):
    """None: a periodic save without metrics. NaN, strings, arrays and metrics other than the monitored one are
    dropped. None of these may count as best, nor be kept beyond the latest two."""
    config = CheckpointConfig(keep_latest=2, keep_best=1, monitor="loss", mode=mode)
    ckpt = Checkpointer(tmp_path, config)
    sign = 1 if mode == "min" else -1
    for step, value in enumerate(values, start=1):
        metrics = None if value is None else {"loss": value, "note": "text", "hist": np.ones(3)}
        assert ckpt.save(step, state, meta={"step": step}, metrics=metrics)
        so_far = [(sign * v, s) for s, v in enumerate(values[:step], start=1) if v is not None and not math.isnan(v)]
        assert ckpt.best_step() == min(so_far)[1]  # also while the async save of this step is in flight
    assert ckpt.save(9, state, meta={"step": 9}, metrics={"other": 0.0})
    ckpt.wait()
    assert on_disk(tmp_path) == ckpt.steps() == [best, 8, 9]
    assert ckpt.latest_step() == 9 and ckpt.best_step() == best
    assert not ckpt.save(9, state, meta={})  # an existing step is skipped
    assert not ckpt.save(3, state, meta={})  # and so is an older one
    ckpt.close()
    reopened = Checkpointer(tmp_path, config)  # best tracking from the metrics stored on disk
    assert reopened.best_step() == best and reopened.restore("best", state)[1] == {"step": best}
    reopened.close()


def test_keep_latest_null_keeps_every_checkpoint(tmp_path, state):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep_latest=None, monitor="loss", keep_best=1, async_save=False))
    for step in range(1, 9):
        ckpt.save(step, state, meta={}, metrics={"loss": float(step)})
    ckpt.wait()
    assert on_disk(tmp_path) == ckpt.steps() == list(range(1, 9)) and ckpt.best_step() == 1
    ckpt.close()
    with pytest.raises(ValueError, match="keep_latest"):
        CheckpointConfig(keep_latest=0)


def test_best_ignores_checkpoints_without_metrics(tmp_path, state):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep_latest=1, keep_best=1, monitor="loss", async_save=False))
    ckpt.save(1, state, meta={})
    ckpt.save(2, state, meta={}, metrics={"accuracy": 0.5})
    assert ckpt.best_step() is None and on_disk(tmp_path) == [2]
    with pytest.raises(CheckpointError, match="metric 'loss'"):
        ckpt.restore("best", state)
    ckpt.close()


@pytest.mark.parametrize(("data", "fsdp"), [(4, 2), (1, 1)])
def test_restore_onto_another_mesh(tmp_path, state, data, fsdp):
    assert any("fsdp" in leaf.sharding.spec for leaf in jax.tree.leaves(state.params))  # really sharded over 8
    with Checkpointer(tmp_path, CheckpointConfig()) as ckpt:
        ckpt.save(7, state, meta=META)
    ckpt = Checkpointer(tmp_path, CheckpointConfig())
    abstract = target(mesh_of(data, fsdp))
    restored, _ = ckpt.restore("latest", abstract)
    assert_same(restored, state, shardings_of=abstract)
    assert {d for leaf in jax.tree.leaves(restored) for d in leaf.devices()} == set(jax.devices()[: data * fsdp])
    ckpt.close()


def test_optimizer_false_keeps_target_opt_state(tmp_path, state):
    fresh = random_state(mesh_of(8, 1), seed=1)
    with Checkpointer(tmp_path, CheckpointConfig()) as ckpt:
        ckpt.save(7, state, meta={})
        restored, _ = ckpt.restore(7, fresh, optimizer=False)
        assert restored.opt_state is fresh.opt_state
        assert_same(restored, TrainState(state.step, state.params, fresh.opt_state, state.key))
        with pytest.raises(CheckpointError, match="opt_state holds arrays"):
            ckpt.restore(7, target(mesh_of(8, 1)), optimizer=False)
    with Checkpointer(tmp_path / "no_opt", CheckpointConfig(save_optimizer=False)) as ckpt:
        ckpt.save(7, state, meta={})
        with pytest.raises(CheckpointError, match="no optimizer state"):
            ckpt.restore(7, fresh)
        assert ckpt.restore(7, fresh, optimizer=False)[0].opt_state is fresh.opt_state


# When one of orbax's concurrent tensorstore reads fails, the others finish after orbax closed its asyncio loop
# and their callbacks raise "Event loop is closed" in tensorstore's threads: harmless, and not ours to fix.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_unreadable_latest_falls_back(tmp_path, state, caplog, damage):
    with Checkpointer(tmp_path, CheckpointConfig(keep_latest=3)) as ckpt:
        ckpt.save(1, state, meta={"step": 1})
        ckpt.save(2, state, meta={"step": 2})
    data_files = [p for p in (tmp_path / "2" / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    assert data_files
    for path in data_files:
        path.unlink() if damage == "delete" else path.write_bytes(path.read_bytes()[:10])
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep_latest=3))
    with pytest.raises(WrongModel):  # check_meta runs before any array is read
        ckpt.restore_latest_valid(state, check_meta=reject)
    assert (tmp_path / "2").is_dir()
    with caplog.at_level(logging.WARNING):
        step, restored, meta = ckpt.restore_latest_valid(target(mesh_of(1, 8)))
    assert (step, meta) == (1, {"step": 1})
    assert_same(restored, state)
    assert f"checkpoint 2 in {tmp_path} is unreadable" in caplog.text and "falling back to 1" in caplog.text
    assert (tmp_path / UNREADABLE / "2" / "state").is_dir() and not (tmp_path / "2").exists()
    assert ckpt.steps() == [1]
    assert ckpt.save(2, restored, meta={"step": "2 again"})  # the step number is free again
    assert ckpt.restore(2, state)[1] == {"step": "2 again"}
    ckpt.close()


def test_leftover_tmp_directory_is_ignored(tmp_path, state, caplog):
    with Checkpointer(tmp_path, CheckpointConfig(keep_latest=3)) as ckpt:
        ckpt.save(1, state, meta={"step": 1})
    leftover = tmp_path / "2.orbax-checkpoint-tmp-1234567"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "junk").write_text("half-written")
    with caplog.at_level(logging.WARNING):
        ckpt = Checkpointer(tmp_path, CheckpointConfig(keep_latest=3))
    assert "unfinished checkpoint" in caplog.text and leftover.name in caplog.text
    assert ckpt.steps() == [1]
    assert ckpt.restore_latest_valid(state)[0] == 1
    assert ckpt.save(2, state, meta={"step": 2}) and ckpt.restore(2, state)[1] == {"step": 2}
    ckpt.close()
    assert leftover.exists()  # reported, never deleted


def test_errors(tmp_path, state):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(keep_latest=2, async_save=False))
    assert ckpt.restore_latest_valid(state) is None and ckpt.latest_step() is None
    ckpt.save(1, state, meta=META)
    ckpt.save(2, state, meta=META)

    with pytest.raises(WrongModel):
        ckpt.restore_latest_valid(state, check_meta=reject)
    with pytest.raises(CheckpointError, match="monitor is not set"):
        ckpt.restore("best", state)
    with pytest.raises(CheckpointError, match=r"step 5 .*available steps: \[1, 2\]"):
        ckpt.restore(5, state)
    other = functools.partial(xlstm_eqx.models.build, dataclasses.replace(CONFIG.model, embedding_dim=32))
    with pytest.raises(CheckpointError, match="do not match"):  # a mismatch is not "unreadable": nothing moves
        ckpt.restore_latest_valid(target(mesh_of(8, 1), other))
    with pytest.raises(CheckpointError, match="not JSON"):
        ckpt.save(3, state, meta={"bad": object()})
    assert ckpt.steps() == [1, 2] and not (tmp_path / UNREADABLE).exists()
    ckpt.close()

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match=str(blocker / "ckpt")):
        Checkpointer(blocker / "ckpt", CheckpointConfig())


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_directory(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o500)
    try:
        with pytest.raises(CheckpointError, match=f"{parent / 'ckpt'}.*Permission denied"):
            Checkpointer(parent / "ckpt", CheckpointConfig())
    finally:
        parent.chmod(0o700)


def test_read_checkpoint_meta_from_directory_alone(tmp_path, state):
    run = tmp_path / "run"
    with Checkpointer(run, CheckpointConfig(keep_latest=5, monitor="loss", mode="min")) as ckpt:
        for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0)]:
            ckpt.save(step, state, meta={**META, "epoch": step}, metrics={"loss": loss})
        ckpt.save(4, state, meta={**META, "epoch": 4})
    assert read_checkpoint_meta(run) == (4, {**META, "epoch": 4})
    assert read_checkpoint_meta(str(run), 1)[1]["epoch"] == 1
    assert read_checkpoint_meta(run, "best") == (2, {**META, "epoch": 2})
    with pytest.raises(CheckpointError, match="available steps"):
        read_checkpoint_meta(run, 9)
    with pytest.raises(CheckpointError, match="no checkpoints"):
        read_checkpoint_meta(tmp_path / "empty")
    plain = tmp_path / "plain"
    with Checkpointer(plain, CheckpointConfig()) as ckpt:
        ckpt.save(1, state, meta={"epoch": 1})
    with pytest.raises(CheckpointError, match="config"):
        read_checkpoint_meta(plain, "best")
