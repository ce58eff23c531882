"""Loading checkpoints: automatic resume, ``load_pretrained`` into a state, ``load_from_checkpoint`` from nothing.

A run's checkpoints live in ``<run_dir>/checkpoints``; every function here accepts either the run directory or
that folder. Each checkpoint's meta holds the full config, so a model can be rebuilt from the checkpoint alone.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Literal

import equinox as eqx
import jax

from ..config import Config, from_dict, to_dict
from ..config.mesh import MeshConfig
from ..config.parsing import ConfigError
from ..config.run import CheckpointConfig
from ..io.checkpoint import Checkpointer, CheckpointError, read_checkpoint_meta
from ..models import build
from ..models.lm import EXECUTION_POLICY_FIELDS
from ..parallel import make_mesh
from ..train.optim import build_optimizer, set_optimizer_step_count
from ..train.state import TrainState, abstract_state, init

StepSpec = int | Literal["latest", "best"]


def checkpoint_dir(path: str | Path) -> Path:
    """``<path>/checkpoints`` when ``path`` is a run directory, else ``path`` itself."""
    path = Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def _differences(saved: Any, current: Any, prefix: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current))
        return [d for k in keys for d in _differences(saved.get(k), current.get(k), f"{prefix}.{k}")]
    saved = list(saved) if isinstance(saved, tuple) else saved
    current = list(current) if isinstance(current, tuple) else current
    return [] if saved == current else [f"{prefix}: {saved!r} in the checkpoint, {current!r} now"]


def model_config_check(config: Config, where: str | Path):
    """A ``check_meta`` for resuming: the checkpoint must hold the same model config as this run, up to its
    execution policy (``EXECUTION_POLICY_FIELDS``: kernel, chunk size, compute dtype, remat, …), which changes how
    the same weights run, not what they are (e.g. resuming a CPU run on a GPU with another kernel)."""

    def check(meta: dict[str, Any]) -> None:
        saved = meta.get("config", {}).get("model")
        if saved is None:
            raise CheckpointError(f"the checkpoint in {where} has no model config in its meta")
        weights_only = lambda fields: {k: v for k, v in fields.items() if k not in EXECUTION_POLICY_FIELDS}  # noqa: E731
        differences = _differences(weights_only(saved), weights_only(to_dict(config.model)), "model")
        if differences:
            raise ConfigError(
                "model",
                f"the run directory {where} holds a checkpoint of another model config ({'; '.join(differences)}); "
                "use another log.run_dir, or the same model config to resume",
            )

    return check


def restore_target(builder: Any, tx: Any, *, key: Any, mesh: Any, fsdp_min_weight_size: int,
                   with_optimizer: bool) -> tuple[TrainState, Any]:  # fmt: skip
    """``(target, static)`` to restore a checkpoint into. With the optimizer state in the checkpoint, the target
    is abstract (shapes and shardings only); without it, a fresh concrete state whose optimizer state the
    restore keeps (then pass the result through :func:`with_schedule_count_at_step`)."""
    make = abstract_state if with_optimizer else init
    return make(builder, tx, key=key, mesh=mesh, fsdp_min_weight_size=fsdp_min_weight_size)


def with_schedule_count_at_step(state: TrainState) -> TrainState:
    """``state`` with its optimizer's schedule count set to its step: a fresh optimizer state paired with restored
    weights continues the learning-rate schedule instead of warming up again."""
    return eqx.tree_at(lambda s: s.opt_state, state, set_optimizer_step_count(state.opt_state, state.step))


def load_pretrained(
    path: str | Path, state: TrainState, step: StepSpec = "latest", *, optimizer: bool = True
) -> tuple[TrainState, dict[str, Any]]:
    """``state`` with the arrays of a checkpoint, placed on ``state``'s own shardings (so any mesh works).

    ``step``: a number, ``"latest"`` or ``"best"`` (by the monitor the checkpointing run used). Without
    ``optimizer`` the optimizer state is ``state``'s own, with its schedule count set to the restored step,
    so the learning rate continues on schedule instead of warming up again.
    """
    directory = checkpoint_dir(path)
    _, meta = read_checkpoint_meta(directory, "latest")
    saved = meta.get("config", {}).get("checkpoint", {})
    config = CheckpointConfig(monitor=saved.get("monitor"), mode=saved.get("mode", "min"), async_save=False)
    checkpointer = Checkpointer(directory, config, read_only=True)
    try:
        restored, meta = checkpointer.restore(step, state, optimizer=optimizer)
    finally:
        checkpointer.close()
    return (restored if optimizer else with_schedule_count_at_step(restored)), meta


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What ``load_from_checkpoint`` rebuilds: the run's config, the model, the train state and its static half.

    ``model`` shares its arrays with ``state.params`` (one copy in memory). A train step donates the state it is
    given, which deletes them: after training ``state``, rebuild the model with ``eqx.combine(new.params, static)``.
    """

    config: Config
    model: eqx.Module
    state: TrainState
    static: Any
    step: int
    meta: dict[str, Any]


def load_from_checkpoint(
    path: str | Path, step: StepSpec = "latest", *, mesh: MeshConfig | None = None, devices: list | None = None
) -> Loaded:
    """Rebuilds config, model and train state from a checkpoint alone (``mesh`` overrides the saved mesh, e.g.
    to evaluate on one device a model trained with FSDP)."""
    directory = checkpoint_dir(path)
    resolved, meta = read_checkpoint_meta(directory, step)
    if "config" not in meta:
        raise CheckpointError(f"checkpoint {resolved} in {directory} has no config in its meta")
    config = from_dict(Config, meta["config"])
    if mesh is not None:
        config = dataclasses.replace(config, mesh=mesh)
    device_mesh = make_mesh(config.mesh, devices)
    tx = build_optimizer(config.optim, meta.get("total_steps"))
    with_optimizer = config.checkpoint.save_optimizer
    target, static = restore_target(
        functools.partial(build, config.model),
        tx,
        key=jax.random.key(config.seed),
        mesh=device_mesh,
        fsdp_min_weight_size=config.mesh.fsdp_min_weight_size,
        with_optimizer=with_optimizer,
    )
    checkpointer = Checkpointer(directory, dataclasses.replace(config.checkpoint, async_save=False), read_only=True)
    try:
        state, meta = checkpointer.restore(resolved, target, optimizer=with_optimizer)
    finally:
        checkpointer.close()
    state = state if with_optimizer else with_schedule_count_at_step(state)
    return Loaded(config, eqx.combine(state.params, static), state, static, resolved, meta)
