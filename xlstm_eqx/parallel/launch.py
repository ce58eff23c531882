"""Starting a multi-process run on this machine: N local processes joined over loopback.

For trying the multi-process path on one host (each process with K fake CPU devices) and for the tests. On
several hosts, start one process per host yourself (or with SLURM); see the README.

The coordinator port is reserved per launch: a free port is picked by the kernel and an exclusive ``flock`` on
``<tmp>/xlstm_eqx_ports/<port>.lock`` is held until the run ends, so concurrent launches on the machine (e.g.
parallel test runs) never share a port. Every rank is supervised: when one exits non-zero, or the deadline
passes, all others are stopped (SIGTERM, then SIGKILL), so a failed rank never leaves the rest hanging.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

from .distributed import ENV_PREFIX, STACK_DUMP_SIGNAL

PORT_BUSY = "is already in use"  # in rank 0's error when its coordinator port was taken meanwhile


def _bindable(port: int) -> int | None:
    """``port`` (0: any free one) if it can be bound on 127.0.0.1 now, else None."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return None
        return probe.getsockname()[1]


@contextlib.contextmanager
def reserved_port(attempts: int = 50, candidates: Sequence[int] | None = None) -> Iterator[int]:
    """A free loopback TCP port (any, or one of ``candidates``), locked against every other launch on this
    machine while the block runs."""
    lock_dir = Path(tempfile.gettempdir()) / "xlstm_eqx_ports"
    lock_dir.mkdir(exist_ok=True)
    for _ in range(attempts):
        port = _bindable(0 if candidates is None else random.choice(candidates))
        if port is None:
            continue
        lock = open(lock_dir / f"{port}.lock", "w")  # noqa: SIM115 (held for the whole block)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        try:
            yield port
        finally:
            lock.close()
        return
    raise RuntimeError(f"no free, unlocked loopback port after {attempts} attempts")


def rank_environment(port: int, num_processes: int, rank: int, cpu_devices: int | None,
                     base: Mapping[str, str] | None = None) -> dict[str, str]:  # fmt: skip
    """The environment of one rank: the run's coordinates, unbuffered output, and no proxies (gRPC would
    route even loopback connections through them)."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if "_proxy" not in k.lower()}
    env.update({
        ENV_PREFIX + "COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        ENV_PREFIX + "NUM_PROCESSES": str(num_processes),
        ENV_PREFIX + "PROCESS_ID": str(rank),
        "PYTHONUNBUFFERED": "1",
    })  # fmt: skip
    if cpu_devices is not None:
        env.update({"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(cpu_devices)})
    return env


def start_ranks(command: Sequence[str], num_processes: int, port: int, *, cpu_devices: int | None = None,
                log_dir: str | Path | None = None, env: Mapping[str, str] | None = None,
                cwd: str | Path | None = None) -> list[subprocess.Popen]:  # fmt: skip
    """Starts ``command`` once per rank, each in its own session (so a rank's children are stopped with it).
    With ``log_dir`` rank i writes ``rank<i>.log`` there; otherwise all ranks write to this terminal."""
    procs = []
    for rank in range(num_processes):
        out: IO | None = None
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            out = open(Path(log_dir) / f"rank{rank}.log", "w")  # noqa: SIM115 (the child keeps it)
        procs.append(subprocess.Popen(
            list(command), env=rank_environment(port, num_processes, rank, cpu_devices, env), cwd=cwd,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        ))  # fmt: skip
        if log_dir is not None:
            out.close()
    return procs


def stop_ranks(procs: Sequence[subprocess.Popen], grace_s: int | float = 2.0) -> None:
    """SIGTERM to every still running rank's process group (or the rank, where it leads none), then SIGKILL
    after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:  # not a group leader (not started by start_ranks): the rank alone
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)
        deadline = time.monotonic() + grace_s
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
    for proc in procs:
        proc.wait()


def dump_stacks(procs: Sequence[subprocess.Popen], wait_s: float = 2.0) -> None:
    """Asks every still running rank to write its threads' stacks to its log (ranks that joined a run handle
    :data:`~.distributed.STACK_DUMP_SIGNAL`, see :func:`~.distributed.dump_stacks_on`), so a deadline shows
    where each one hung."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, STACK_DUMP_SIGNAL)
    if running:
        time.sleep(wait_s)


@dataclasses.dataclass(frozen=True)
class LaunchResult:
    """Exit code per rank (negative: killed by that signal), and why the run ended."""

    returncodes: list[int]
    reason: str
    port: int

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes)


def supervise(procs: Sequence[subprocess.Popen], timeout_s: int | float | None = None) -> str:
    """Waits until every rank has exited; stops all of them at the first non-zero exit or at the deadline.
    Returns what ended the run."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        codes = [p.poll() for p in procs]
        failed = [(i, rc) for i, rc in enumerate(codes) if rc not in (None, 0)]
        if failed:
            stop_ranks(procs)
            return f"rank {failed[0][0]} exited with {failed[0][1]}; stopped the others"
        if all(rc == 0 for rc in codes):
            return "all ranks finished"
        if deadline is not None and time.monotonic() > deadline:
            dump_stacks(procs)
            stop_ranks(procs)
            return f"deadline of {timeout_s} s passed; stopped all ranks"
        time.sleep(0.05)


def launch_local(command: Sequence[str], num_processes: int, *, cpu_devices: int | None = None,
                 timeout_s: int | float | None = None, log_dir: str | Path | None = None,
                 env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
                 port_attempts: int = 3) -> LaunchResult:  # fmt: skip
    """Runs ``command`` as ``num_processes`` ranks of one run on this machine and supervises them. Retries on
    a fresh port if rank 0 found its reserved port taken by another program (only checkable with ``log_dir``)."""
    if num_processes < 1 or port_attempts < 1:
        raise ValueError(f"num_processes and port_attempts must be ≥ 1, got {num_processes}, {port_attempts}")
    for _ in range(port_attempts):
        with reserved_port() as port:
            procs = start_ranks(command, num_processes, port, cpu_devices=cpu_devices, log_dir=log_dir, env=env,
                                cwd=cwd)  # fmt: skip
            reason = supervise(procs, timeout_s)
        result = LaunchResult([p.returncode for p in procs], reason, port)
        rank0_log = Path(log_dir) / "rank0.log" if log_dir is not None else None
        if result.ok or rank0_log is None or PORT_BUSY not in rank0_log.read_text(errors="replace"):
            break
    return result
