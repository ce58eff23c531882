"""Waiting for steps where JAX's CPU runtime cannot overlap cross-process collectives.

On CPU (gloo collectives), when a mesh spans several processes and this process holds several of its devices,
two programs with cross-process collectives in flight at once can deadlock: every process ends up blocked in
dispatch and no collective completes. Measured with jax 0.10.2 on 2 processes × 2 devices: a ``shard_map``
step with one ``psum``, dispatched back to back without waiting, hung within 40 calls in every try; waiting for
each call's outputs, or one device per process, never hung. The step builders therefore return steps that wait
for their outputs in exactly that configuration (nothing changes elsewhere, where asynchronous dispatch is
safe and overlaps host work with device work).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh


def collectives_must_not_overlap(mesh: Mesh) -> bool:
    """True where programs with collectives over ``mesh`` must run one at a time: CPU devices of several
    processes, more than one of them in this process."""
    devices = list(mesh.devices.flat)
    if devices[0].platform != "cpu":
        return False
    here = sum(d.process_index == jax.process_index() for d in devices)
    return here > 1 and len({d.process_index for d in devices}) > 1


class _WaitingStep:
    """``step`` whose call returns only once its outputs are computed; other attributes (``lower``,
    ``trace``, …) are the wrapped step's."""

    def __init__(self, step: Callable[..., Any]):
        self._step = step
        functools.update_wrapper(self, step)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return jax.block_until_ready(self._step(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._step, name)


def one_at_a_time(step: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
    """``step`` itself, or where :func:`collectives_must_not_overlap` holds for ``mesh``, ``step`` waiting for
    its outputs before it returns."""
    return _WaitingStep(step) if collectives_must_not_overlap(mesh) else step
