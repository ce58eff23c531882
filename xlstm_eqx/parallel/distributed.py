"""Joining a multi-process run on JAX's distributed runtime (``jax.distributed``).

Where the settings come from, first match wins:

1. explicit values (``xlstm-eqx train --coordinator-address HOST:PORT --num-processes N --process-id I``);
2. the environment: ``XLSTM_EQX_COORDINATOR_ADDRESS``, ``XLSTM_EQX_NUM_PROCESSES``, ``XLSTM_EQX_PROCESS_ID``;
3. a SLURM step (``SLURM_JOB_ID``, ``SLURM_NTASKS`` > 1, ...): JAX's own cluster detection fills in all three;
4. none of these: a single process, and nothing is initialised.

Timeouts are short by default so that a dead rank ends the run instead of hanging it: a rank that never
connects fails the others after ``initialization_timeout_s``; a rank that stops sending heartbeats (killed, or
its machine died) makes the others abort after ``heartbeat_timeout_s``.
"""

from __future__ import annotations

import dataclasses
import errno
import faulthandler
import ipaddress
import json
import logging
import os
import signal
import socket
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

ENV_PREFIX = "XLSTM_EQX_"
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


class DistributedError(RuntimeError):
    """A multi-process setting that cannot work (the message names the flag or variable at fault)."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a run. ``coordinator_address`` is ``host:port`` of process 0 (None with
    ``slurm``); ``bind_address`` where process 0 listens (default: the coordinator address itself when it is a
    loopback address, else all interfaces on that port)."""

    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0
    bind_address: str | None = None
    slurm: bool = False
    initialization_timeout_s: int = 120
    heartbeat_timeout_s: int = 30
    shutdown_timeout_s: int = 60

    def __post_init__(self):
        if self.num_processes < 1:
            raise DistributedError(f"num_processes must be ≥ 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise DistributedError(f"process_id {self.process_id} is outside [0, num_processes={self.num_processes})")
        for name in ("initialization_timeout_s", "heartbeat_timeout_s", "shutdown_timeout_s"):
            if getattr(self, name) < 1:
                raise DistributedError(f"{name} must be ≥ 1 second, got {getattr(self, name)}")
        if self.num_processes > 1 and not self.slurm:
            split_address(self.coordinator_address, "coordinator_address")

    @property
    def multi_process(self) -> bool:
        return self.slurm or self.num_processes > 1


def split_address(address: str | None, name: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) → (host, port); DistributedError naming ``name`` otherwise."""
    host, sep, port = (address or "").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"{name} must be HOST:PORT with a port in 1..65535, got {address!r}")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
    **timeouts: int,
) -> DistributedConfig:
    """The :class:`DistributedConfig` of this process from explicit values, then the environment, then SLURM
    (see the module docstring). ``timeouts``: ``initialization_timeout_s`` etc. (None entries are ignored)."""
    env = os.environ if environ is None else environ
    timeouts = {k: v for k, v in timeouts.items() if v is not None}

    def pick(value, name: str) -> str | None:
        return str(value) if value is not None else env.get(ENV_PREFIX + name.upper())

    address = pick(coordinator_address, "coordinator_address")
    count, rank = pick(num_processes, "num_processes"), pick(process_id, "process_id")
    bind = env.get(ENV_PREFIX + "BIND_ADDRESS")
    if address is None and count is None and rank is None:
        if all(v in env for v in SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
            return DistributedConfig(slurm=True, bind_address=bind, num_processes=int(env["SLURM_NTASKS"]),
                                     process_id=int(env["SLURM_PROCID"]), **timeouts)  # fmt: skip
        return DistributedConfig(**timeouts)
    if count == "1" and rank in (None, "0") and address is None:
        return DistributedConfig(**timeouts)  # explicitly one process
    missing = [n for n, v in [("coordinator_address", address), ("num_processes", count), ("process_id", rank)]
               if v is None]  # fmt: skip
    if missing:
        flags = ", ".join(f"--{n.replace('_', '-')} (or {ENV_PREFIX}{n.upper()})" for n in missing)
        raise DistributedError(f"a multi-process run needs all of coordinator address, count and id; missing {flags}")
    try:
        count_i, rank_i = int(count), int(rank)
    except ValueError as e:
        raise DistributedError(f"num_processes and process_id must be integers, got {count!r}, {rank!r}") from e
    return DistributedConfig(address, count_i, rank_i, bind_address=bind, **timeouts)


def _bind_address(config: DistributedConfig) -> str | None:
    if config.bind_address is not None or config.coordinator_address is None:
        return config.bind_address
    host, port = split_address(config.coordinator_address, "coordinator_address")
    # JAX's default binds all interfaces; a loopback run must not be reachable from (or cross-talk with) others.
    return f"{'[::1]' if ':' in host else '127.0.0.1'}:{port}" if _is_loopback(host) else None


def check_port_free(address: str) -> None:
    """DistributedError when something already listens on ``address`` (``host:port``). gRPC binds with
    SO_REUSEPORT, so a second coordinator on a busy port would start silently and mix two runs; a plain bind
    (without SO_REUSEPORT) fails on any listener."""
    host, port = split_address(address, "bind_address")
    host = "0.0.0.0" if host in ("::", "") else host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are no conflict
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise DistributedError(
                    f"coordinator port {port} on {host} is already in use (another run, or a run that has not "
                    "exited yet): choose another port in --coordinator-address"
                ) from e
            raise DistributedError(f"cannot listen on the coordinator address {address}: {e}") from e


STACK_DUMP_SIGNAL = signal.SIGUSR1


def dump_stacks_on(signum: int) -> None:
    """On ``signum`` this process writes every thread's Python stack to stderr and goes on: a launcher (or a
    person, ``kill -USR1 PID``) sees where a hung rank waits, e.g. which collective. Kept if the signal already
    has a handler."""
    if signal.getsignal(signum) in (signal.SIG_DFL, None):
        faulthandler.register(signum, all_threads=True, chain=False)


def initialize(config: DistributedConfig) -> None:
    """Joins the run ``config`` describes (nothing for a single process). Afterwards ``jax.devices()`` are the
    devices of all processes and ``jax.process_index()`` is this process's id. Call before any other JAX use."""
    if not config.multi_process:
        return
    dump_stacks_on(STACK_DUMP_SIGNAL)
    # A rank that dies of a fatal signal (gloo and JAX's coordination service end a failed run with abort())
    # writes every thread's Python stack first: the log then shows which step or collective it was in.
    if not faulthandler.is_enabled():  # kept where the program already chose where it writes
        faulthandler.enable(all_threads=True)
    bind = _bind_address(config)
    if config.process_id == 0 and bind is not None:
        check_port_free(bind)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU
    where = "SLURM" if config.slurm else config.coordinator_address
    log.info("joining a run of %d processes as process %d via %s", config.num_processes, config.process_id, where)
    try:
        jax.distributed.initialize(
            coordinator_address=None if config.slurm else config.coordinator_address,
            num_processes=None if config.slurm else config.num_processes,
            process_id=None if config.slurm else config.process_id,
            coordinator_bind_address=bind,
            initialization_timeout=config.initialization_timeout_s,
            heartbeat_timeout_seconds=config.heartbeat_timeout_s,
            shutdown_timeout_seconds=config.shutdown_timeout_s,
        )
    except Exception as e:  # jax raises XlaRuntimeError (DEADLINE_EXCEEDED ...) when peers never arrive
        raise DistributedError(
            f"process {config.process_id} could not join the run at {where} within "
            f"{config.initialization_timeout_s} s: {str(e).splitlines()[0][:300]}"
        ) from e
    if jax.process_count() != config.num_processes:
        raise DistributedError(f"joined a run of {jax.process_count()} processes, expected {config.num_processes}")


def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-able ``value``, in process order, on every process (a collective: all processes
    must call it). One process: ``[value]``."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray(len(data)))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[: len(data)] = data
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths, strict=True)]
