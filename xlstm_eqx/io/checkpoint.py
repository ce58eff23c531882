"""Orbax checkpoints of a ``TrainState`` plus a JSON ``meta`` dict, keeping the latest and the best.

A step directory ``<directory>/<step>/`` holds these orbax items:

* ``state``: ``{"params", "step", "key"}``: the model's arrays, the step counter, and the PRNG key as raw
  ``jax.random.key_data`` (uint32); the typed key is rebuilt with the restore target's key implementation;
* ``opt_state``: the optimizer state (only with ``save_optimizer``);
* ``meta``: the caller's JSON dict (the training loop stores the config dict under ``"config"``, the epoch,
  the data iterator state and host metrics);
* ``metrics`` (written by orbax): the finite numbers given to ``save``, which rank the checkpoints.

The caller decides when to save; this module decides what is kept and how it is read back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import numbers
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint import checkpoint_managers as cm

from ..config.run import CheckpointConfig
from ..train.state import TrainState

TMP_MARK = ".orbax-checkpoint-tmp"  # orbax names a step directory like this until its save has committed
UNREADABLE = "unreadable"  # unreadable step directories are moved into <directory>/unreadable/
Step = int | Literal["latest", "best"]


class CheckpointError(RuntimeError):
    """A checkpoint directory or step that cannot be used. The message names the directory and the step."""


class _Unreadable(CheckpointError):
    """Reading a step's files failed (corrupt, truncated or missing files)."""

    def __init__(self, step: int, directory: Path, error: Exception):
        message = str(error).split(" [tensorstore_spec=")[0]  # tensorstore appends kilobytes of JSON spec
        self.reason = f"{type(error).__name__}: {message[:500]}"
        super().__init__(f"checkpoint {step} in {directory} is unreadable ({self.reason})")


@contextlib.contextmanager
def _reading(step: int, directory: Path) -> Iterator[None]:
    """Turns any failure to read ``step`` (other than a CheckpointError) into ``_Unreadable``."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        raise _Unreadable(step, directory, e) from e


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)  # Python and numpy scalars


def _score(config: CheckpointConfig) -> Callable[[Any], float]:
    """Ranks a checkpoint by its metrics. Without the (finite) monitored metric it ranks worst: "not best"."""
    worst = math.inf if config.mode == "min" else -math.inf

    def score(metrics: Any) -> float:
        value = metrics.get(config.monitor) if isinstance(metrics, dict) and config.monitor else None
        return float(value) if _is_number(value) and math.isfinite(value) else worst

    return score


def _manager(directory: Path, config: CheckpointConfig, *, read_only: bool = False) -> ocp.CheckpointManager:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()  # named items, so item_metadata() can read them
    for item, args in [("state", ocp.args.StandardSave), ("state", ocp.args.StandardRestore),
                       ("opt_state", ocp.args.StandardSave), ("opt_state", ocp.args.StandardRestore),
                       ("meta", ocp.args.JsonSave), ("meta", ocp.args.JsonRestore)]:  # fmt: skip
        registry.add(item, args)
    policies: list[cm.PreservationPolicy] = [cm.LatestN(n=config.keep_latest)]  # n None: all
    if config.monitor is not None:  # BestN's default keeps every checkpoint without metrics forever
        policies.append(cm.BestN(get_metric_fn=_score(config), reverse=config.mode == "min", n=config.keep_best,
                                 keep_checkpoints_without_metrics=False))  # fmt: skip
    options = ocp.CheckpointManagerOptions(
        best_fn=_score(config),  # orbax writes the metrics item only when best_fn is set; retention is the policy's
        best_mode=config.mode,
        preservation_policy=cm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=config.async_save,
        read_only=read_only,
        save_interval_steps=0 if read_only else 1,  # orbax warns when it has to change it itself
        create=False,
    )
    return ocp.CheckpointManager(directory, options=options, handler_registry=registry)


def _resolve(mngr: ocp.CheckpointManager, step: Step, config: CheckpointConfig, directory: Path,
             metrics: Callable[[int], Any] | None = None) -> int:  # fmt: skip
    """The step number meant by ``step``; CheckpointError when there is none."""
    steps = [int(s) for s in mngr.all_steps()]
    if step == "best":
        if config.monitor is None:
            raise CheckpointError(f"no 'best' checkpoint in {directory}: checkpoint.monitor is not set")
        best = mngr.best_step()
        if best is None or not math.isfinite(_score(config)((metrics or mngr.metrics)(best))):
            raise CheckpointError(f"no checkpoint in {directory} has the metric {config.monitor!r} (steps: {steps})")
        return best
    if not steps:
        raise CheckpointError(f"no checkpoints in {directory}")
    if step == "latest":
        return steps[-1]
    if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {directory}; available steps: {steps}")
    return step


def _read_meta(mngr: ocp.CheckpointManager, step: int, directory: Path) -> dict:
    with _reading(step, directory):
        return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def read_checkpoint_meta(directory: str | Path, step: Step = "latest") -> tuple[int, dict]:
    """``(step, meta)`` of a checkpoint in ``directory``, without a TrainState or config.

    ``"best"`` ranks by the metrics stored with the checkpoints, with the monitor and mode from the latest
    checkpoint's ``meta["config"]["checkpoint"]`` (CheckpointError when these are absent)."""
    directory = Path(directory).absolute()
    config = CheckpointConfig()
    if step == "best":
        latest, meta = read_checkpoint_meta(directory, "latest")
        try:
            section = meta["config"]["checkpoint"]
            config = CheckpointConfig(monitor=section["monitor"], mode=section.get("mode", "min"))
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {latest} in {directory} has no meta['config']['checkpoint']") from e
    mngr = _manager(directory, config, read_only=True)
    try:
        resolved = _resolve(mngr, step, config, directory)
        return resolved, _read_meta(mngr, resolved, directory)
    finally:
        mngr.close()


def _key_impl(key: Any) -> Any:
    """The PRNG implementation of a typed key array or of its ShapeDtypeStruct."""
    if isinstance(key, jax.Array):
        return jax.random.key_impl(key)
    found = []
    jax.eval_shape(lambda k: found.append(jax.random.key_impl(k)), key)
    return found[0]


def _key_data_target(key: Any) -> jax.ShapeDtypeStruct:
    """Restore target of ``key_data(key)``: the key's sharding, with its trailing data axis unsharded."""
    data, sharding = jax.eval_shape(jax.random.key_data, key), key.sharding
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, P(*sharding.spec, *[None] * (data.ndim - len(sharding.spec))))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


def _signature(tree: Any) -> list[tuple[tuple[int, ...], str]]:
    return sorted((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree))


class Checkpointer:
    """Saves and restores TrainStates in ``directory`` (created) as ``config`` says.

    Keeps the latest ``keep_latest`` checkpoints and, with a ``monitor``, also the best ``keep_best`` by that
    metric (``mode`` min or max). The latest is never deleted; checkpoints saved without the monitored metric
    are never "best". ``read_only`` opens an existing directory for restoring: nothing is created or written.
    """

    def __init__(self, directory: str | Path, config: CheckpointConfig, *, logger: logging.Logger | None = None,
                 read_only: bool = False):  # fmt: skip
        self.directory, self.config, self.read_only = Path(directory).absolute(), config, read_only
        self.log = logger or logging.getLogger(__name__)
        self._metrics: dict[int, dict] = {}  # metrics saved by this process (on disk only once a save commits)
        if not read_only:
            try:  # fail here, clearly, rather than later inside an asynchronous save
                self.directory.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=self.directory).close()
            except OSError as e:
                raise CheckpointError(f"checkpoint directory {self.directory} cannot be created or written: {e}") from e
        for path in sorted(self.directory.glob(f"*{TMP_MARK}*")):
            self.log.warning("ignoring unfinished checkpoint %s (left by an interrupted save)", path)
        self._mngr = _manager(self.directory, config, read_only=read_only)

    def steps(self) -> list[int]:
        """All saved steps, ascending (including one whose asynchronous save is still being written)."""
        return [int(s) for s in self._mngr.all_steps()]

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def best_step(self) -> int | None:
        """Best step by the monitored metric; None without a monitor or when no checkpoint has that metric."""
        try:
            return self._resolve("best") if self.config.monitor is not None else None
        except CheckpointError:
            return None

    def _resolve(self, step: Step) -> int:
        known = lambda s: self._metrics[s] if s in self._metrics else self._mngr.metrics(s)  # noqa: E731
        return _resolve(self._mngr, step, self.config, self.directory, known)

    def save(self, step: int, state: TrainState, *, meta: dict, metrics: Mapping[str, Any] | None = None) -> bool:
        """Saves ``state`` and ``meta`` as ``step`` (in the background with ``async_save``). Returns False, with a
        warning, when ``step`` is not newer than the latest checkpoint. Only the finite numbers in ``metrics``
        are stored (arrays, strings and NaN are dropped)."""
        if self.read_only:
            raise CheckpointError(f"cannot save step {step}: {self.directory} was opened read-only")
        latest = self.latest_step()
        if latest is not None and step <= latest:
            why = "it already exists" if step in self.steps() else f"the latest checkpoint is {latest}"
            self.log.warning("not saving checkpoint %d in %s: %s", step, self.directory, why)
            return False
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"meta of checkpoint {step} in {self.directory} is not JSON: {e}") from e
        kept = {k: float(v) for k, v in (metrics or {}).items() if _is_number(v) and math.isfinite(v)}
        arrays = {"params": state.params, "step": state.step, "key": jax.random.key_data(state.key)}
        items = {"state": ocp.args.StandardSave(arrays), "meta": ocp.args.JsonSave(meta)}
        if self.config.save_optimizer:
            items["opt_state"] = ocp.args.StandardSave(state.opt_state)
        steps = set(self.steps())
        self._metrics = {s: m for s, m in self._metrics.items() if s in steps} | {step: kept}
        # metrics={} rather than None: with best_fn set, orbax logs a warning for every save without metrics.
        return bool(self._mngr.save(step, args=ocp.args.Composite(**items), metrics=kept, force=True))

    def read_meta(self, step: int) -> dict:
        """The ``meta`` dict saved with ``step``."""
        self.wait()
        return _read_meta(self._mngr, self._resolve(step), self.directory)

    def restore(self, step: Step, target: TrainState, *, optimizer: bool = True) -> tuple[TrainState, dict]:
        """``(state, meta)`` of ``step``, placed on the shardings of ``target`` (a TrainState of ShapeDtypeStructs
        with shardings, or of arrays). ``optimizer=False`` keeps ``target``'s (concrete) optimizer state."""
        self.wait()
        step = self._resolve(step)
        meta = _read_meta(self._mngr, step, self.directory)
        return self._load(step, target, optimizer), meta

    def restore_latest_valid(self, target: TrainState, *, check_meta: Callable[[dict], None] | None = None,
                             optimizer: bool = True) -> tuple[int, TrainState, dict] | None:  # fmt: skip
        """``(step, state, meta)`` of the newest readable checkpoint, or None when there is none.

        An unreadable step is logged, moved to ``<directory>/unreadable/`` and the previous one is tried.
        ``check_meta(meta)`` runs before a step's arrays are read; what it raises propagates unchanged, as do
        CheckpointErrors other than unreadable files (e.g. arrays that do not match ``target``)."""
        self.wait()
        candidates = self.steps()  # each tried once, newest first
        for i in reversed(range(len(candidates))):
            try:
                meta = _read_meta(self._mngr, candidates[i], self.directory)
                if check_meta is not None:
                    check_meta(meta)
                return candidates[i], self._load(candidates[i], target, optimizer), meta
            except _Unreadable as e:
                previous = candidates[i - 1] if i else "nothing"
                self.log.warning("checkpoint %d in %s is unreadable (%s); falling back to %s", candidates[i],
                                 self.directory, e.reason, previous)  # fmt: skip
                self._set_aside(candidates[i])
        return None

    def _set_aside(self, step: int) -> None:
        """Moves a step directory into ``unreadable/`` (never deletes it) and makes the manager forget it."""
        source = self.directory / str(step)  # orbax's default step naming: no prefix, no padding
        if jax.process_index() == 0 and source.exists():
            (self.directory / UNREADABLE).mkdir(exist_ok=True)
            dest, n = self.directory / UNREADABLE / source.name, 0
            while dest.exists():  # the same step number may have gone bad before
                n += 1
                dest = dest.with_name(f"{source.name}.{n}")
            source.rename(dest)
            self.log.warning("moved unreadable checkpoint %s to %s", source, dest)
        ocp.multihost.sync_global_processes(f"xlstm_eqx_checkpoint_set_aside_{step}")
        self._metrics.pop(step, None)
        self._mngr.reload()

    def _load(self, step: int, target: TrainState, optimizer: bool) -> TrainState:
        if not optimizer and not all(isinstance(x, jax.Array) for x in jax.tree.leaves(target.opt_state)):
            raise CheckpointError("restore(optimizer=False) needs a target whose opt_state holds arrays")
        abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)  # noqa: E731
        arrays = {"params": abstract(target.params), "step": abstract(target.step), "key": _key_data_target(target.key)}
        wanted = {"state": arrays, "opt_state": abstract(target.opt_state)} if optimizer else {"state": arrays}
        with _reading(step, self.directory):
            saved_items = self._mngr.metadata(step).item_handlers or {}
            stored = self._mngr.item_metadata(step)
            if optimizer and "opt_state" not in saved_items:
                raise CheckpointError(
                    f"checkpoint {step} in {self.directory} has no optimizer state (saved with "
                    "checkpoint.save_optimizer=false); restore it with optimizer=False and a concrete target"
                )
            for name, tree in wanted.items():
                if stored.get(name) is None:
                    raise FileNotFoundError(f"item {name!r} is missing")
                if _signature(stored[name]) != _signature(tree):
                    raise CheckpointError(
                        f"checkpoint {step} in {self.directory}: the {name!r} arrays do not match the target's shapes"
                        " and dtypes (a checkpoint of another model or optimizer?)"
                    )
            args = {name: ocp.args.StandardRestore(tree) for name, tree in wanted.items()}
            restored = self._mngr.restore(step, args=ocp.args.Composite(**args))
        state = restored["state"]
        key = jax.random.wrap_key_data(state["key"], impl=_key_impl(target.key))
        return TrainState(state["step"], state["params"], restored["opt_state"] if optimizer else target.opt_state, key)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves have been written."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then closes the orbax manager."""
        self.wait()
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
