"""Shared helpers for the benchmark scripts: timing, peak RSS, compile counting, JSON emission, train-step set-up.

Conventions used by every benchmark in this folder:

* Timing: one untimed warm-up/compile call, then the median (and min/max) of ``repeats`` (≥5)
  timed calls, each ended by ``jax.block_until_ready`` on its result (``time.perf_counter``).
* Peak RSS: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is the peak resident set size of the
  whole process *lifetime* (kilobytes on Linux). A number is only attributable to one
  configuration when that configuration ran alone in a fresh process, so the scripts run every
  configuration in its own subprocess (see :func:`run_child`).
* Recompilation: :func:`compile_counter` counts XLA backend compilations (via
  ``jax.monitoring``); a steady-state loop that compiles is reported, not hidden.
* Contention: the machine may be shared. :func:`environment` records the 1-minute load average
  and :func:`contention_probe` (a 1024² float32 dot, GFLOP/s) is taken right before and after
  each timed loop, so a disturbed measurement can be recognised and repeated.
* Output: exactly one JSON object per line on stdout per measurement (:func:`emit`); progress
  and diagnostics go to stderr (:func:`log`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from xlstm_eqx import configure_host_memory, malloc_uses_huge_pages
from xlstm_eqx.models.matmul_policy import (
    BF16_DOT_CPU_FEATURES,
    cpuinfo_fields,
    host_cpu_features,
    upcasts_low_precision_matmul,
)

# Every benchmark process (children inherit $XLSTM_EQX_HOST_MEMORY) runs under the policy `xlstm-eqx train` uses.
HOST_MEMORY = configure_host_memory()
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = {"count": 0, "seconds": 0.0}
_listener_installed = False


def log(*parts: Any) -> None:
    """Progress message to stderr (stdout is reserved for JSON lines)."""
    print(*parts, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (process-lifetime maximum)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / 1024.0, 1)


def environment() -> dict[str, Any]:
    """Fields identifying the software and hardware a measurement was taken on."""
    devices = jax.devices()
    return {
        "jax": jax.__version__,
        "devices": f"{len(devices)}x {devices[0].platform}:{devices[0].device_kind}",
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "host_memory": HOST_MEMORY,
        "malloc_huge_pages": malloc_uses_huge_pages(),  # GLIBC_TUNABLES at start (xlstm_eqx/host_memory.py)
        # false under "retain": single-device steps run inline, so their scratch stays in the main heap
        "cpu_async_dispatch": bool(jax.config.read("jax_cpu_enable_async_dispatch")),
        # bfloat16 dot instructions of this CPU (none on plain AVX2), and the kernel model.low_precision_matmul="auto"
        # picks for bf16 products here: the GEMM in bf16 ("native") or in float32 on upcast operands
        "cpu_bf16_dot": sorted(host_cpu_features() & BF16_DOT_CPU_FEATURES),
        "bf16_matmul_auto": "upcast" if upcasts_low_precision_matmul("auto") else "native",
    }


def cpu_name() -> str:
    """'<vendor> <model name>' from /proc/cpuinfo (machine kinds differ in GEMM libraries' speed), else platform's."""
    fields = cpuinfo_fields(("vendor_id", "model name"))
    return " ".join(fields[k] for k in ("vendor_id", "model name") if k in fields) or platform.processor()


def emit(record: dict[str, Any]) -> None:
    """Prints one measurement as one JSON line on stdout, with the environment fields appended."""
    out = dict(record)
    for key, value in environment().items():
        out.setdefault(key, value)
    print(json.dumps(out, sort_keys=False), flush=True)


def _on_event(event: str, duration: float, **_: Any) -> None:
    if event == COMPILE_EVENT:
        _compiles["count"] += 1
        _compiles["seconds"] += duration


def compile_counter() -> Callable[[], int]:
    """Starts counting XLA compilations; returns a function giving the count since this call."""
    global _listener_installed
    if not _listener_installed:
        jax.monitoring.register_event_duration_secs_listener(_on_event)
        _listener_installed = True
    start = _compiles["count"]
    return lambda: _compiles["count"] - start


def time_calls(call: Callable[[], Any], repeats: int = 5, warmup: int = 1, probe: bool = True) -> dict[str, Any]:
    """Times ``call()`` (a zero-argument closure; it may carry state between calls).

    The first ``warmup`` calls are timed separately (``first_call_s``: includes any tracing and
    compilation) and excluded; then ``repeats`` calls are timed one by one. Returns the median,
    min, max and all step times in seconds, and how many compilations happened during the timed
    calls (should be 0), and (``probe``) :func:`contention_probe` before and after the timed calls.
    """
    if repeats < 1:
        raise ValueError("repeats must be ≥ 1")
    first = None
    for _ in range(warmup):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        first = time.perf_counter() - t0 if first is None else first
    probe_before = contention_probe() if probe else None
    compiled_since = compile_counter()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    compiles = compiled_since()
    return {
        "first_call_s": None if first is None else round(first, 4),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": [round(t, 5) for t in times],
        "compiles_during_timing": compiles,
        "probe_gflops_before": probe_before,
        "probe_gflops_after": contention_probe() if probe else None,
    }


def torch_peer(script: str) -> str | None:
    """``"torch <version>"`` with torch set to ``os.cpu_count()`` threads, or None (logged) where torch is absent."""
    try:
        import torch
    except ImportError:
        log(f"[{script}] torch is not importable: timing ours alone (make bench-compare sets up .venv-peer)")
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    return f"torch {torch.__version__}"


def alternating_gflops(calls: dict[str, Callable[[], Any]], flops: float, *, rounds: int, repeats: int) -> dict:
    """{side: GFLOP/s} of each zero-argument call doing ``flops``: two warm-up calls each, then ``rounds`` turns
    in which every side runs ``repeats`` timed calls; the rate is from the median of the turns' medians (per-call
    times are rounded to 10 µs, too coarse to pool for small products)."""
    for call in calls.values():
        call(), call()  # compile / warm up
    medians: dict[str, list[float]] = {side: [] for side in calls}
    for _ in range(rounds):
        for side, call in calls.items():
            medians[side].append(time_calls(call, repeats=repeats, warmup=0, probe=False)["median_s"])
    return {side: flops / statistics.median(m) / 1e9 for side, m in medians.items()}


def timing_fields(stats: dict[str, Any], *, trace_s: float, compile_s: float) -> dict[str, Any]:
    """The timing part of every JSON record: median/min/max step time (from :func:`time_calls`), trace and
    compile time, compilations during timing (should be 0) and the contention probes around the timed calls."""
    return {
        "step_s": round(stats["median_s"], 5),
        "min_s": round(stats["min_s"], 5),
        "max_s": round(stats["max_s"], 5),
        "trace_s": round(trace_s, 3),
        "compile_s": round(compile_s, 3),
        "compiles_during_timing": stats["compiles_during_timing"],
        "probe_gflops_before": stats["probe_gflops_before"],
        "probe_gflops_after": stats["probe_gflops_after"],
    }


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Runs ``fn()`` once and returns (result, seconds); blocks on any arrays in the result."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def matmul_gflops(n: int = 2048, dtype: str = "float32", repeats: int = 10) -> dict[str, Any]:
    """Measured ``jit(jnp.dot)`` throughput for an n×n @ n×n product: the practical dot roofline. A 16-bit
    ``dtype`` is multiplied as the library's mixed-precision products are: 16-bit operands, float32 result."""
    import jax.numpy as jnp

    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
    dot = jax.jit(functools.partial(jnp.dot, preferred_element_type=jnp.float32))
    stats = time_calls(lambda: dot(a, b), repeats=repeats, probe=False)
    flops = 2.0 * n**3
    return {
        "bench": "matmul_roofline",
        "dtype": dtype,
        "n": n,
        "gflops": round(flops / stats["median_s"] / 1e9, 1),
        "best_gflops": round(flops / stats["min_s"] / 1e9, 1),
        "median_s": round(stats["median_s"], 5),
    }


def contention_probe(n: int = 1024, repeats: int = 5) -> float:
    """GFLOP/s of a small float32 ``jit(jnp.dot)``: drops well below the roofline when others run."""
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, a))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(dot(a, a))
        times.append(time.perf_counter() - t0)
    return round(2.0 * n**3 / statistics.median(times) / 1e9, 1)


def run_child(
    argv: list[str], timeout: float | None = None, env: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], float]:
    """Runs ``python argv...`` in a fresh process (``env`` added to ours); returns its JSON lines (parsed) and
    wall time.

    The child's stderr passes through; a child that crashes or is killed (e.g. out of memory)
    yields a single record with ``"error"`` instead of raising, so one bad config does not end
    the sweep.
    """
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, *argv],
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )
        stdout, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as err:
        out = err.stdout or ""
        stdout, rc = out if isinstance(out, str) else out.decode(), f"timeout after {timeout}s"
    wall = time.perf_counter() - t0
    records = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            records.append(json.loads(line))
    if rc != 0:
        records.append({"error": f"child exited with {rc}", "argv": argv[1:]})
    return records, wall


class TrainStepSetup(NamedTuple):
    """What :func:`init_train_step` returns."""

    state: Any  # xe.train.TrainState, donated by the first step
    static: Any  # the model's static half
    train_step: Callable  # train_step(state, batch) -> (state, metrics)
    batch: Any  # xlstm_eqx.data.Batch, placed with the mesh's batch sharding
    tokens: Any  # the (batch, T+1) int32 tokens the batch was made from, unplaced
    init_s: float  # seconds spent in xe.train.init


def init_train_step(
    cfg: Any, mesh: Any = None, *, batch_size: int, seq_len: int, seed: int, fsdp_min_weight_size: int | None = None
):
    """The library's train step set up as the trainer does it, with one synthetic batch.

    ``mesh`` None is one device; ``fsdp_min_weight_size`` None is the config's own (``cfg.mesh``).

    State from ``xe.train.init`` (model built under jit with output shardings, key ``seed``) with the optimizer of
    ``xe.train.build_optimizer(cfg.optim)``; ``xe.train.make_train_step(static, tx, mesh, cfg.train)``; one batch
    ``Batch.from_tokens`` of uniform random int32 tokens (batch, T+1) from key ``seed + 1``, placed once with the
    mesh's batch sharding outside any timed region. Returns a :class:`TrainStepSetup`.
    """
    from jax.sharding import NamedSharding

    import xlstm_eqx as xe
    from xlstm_eqx.data import Batch
    from xlstm_eqx.parallel import batch_spec

    if mesh is None:
        mesh = xe.make_mesh(xe.MeshConfig(data=1), jax.devices()[:1])
    if fsdp_min_weight_size is None:
        fsdp_min_weight_size = cfg.mesh.fsdp_min_weight_size
    tx = xe.train.build_optimizer(cfg.optim)
    build = functools.partial(xe.models.build, cfg.model)
    (state, static), init_s = timed(
        lambda: xe.train.init(build, tx, key=jax.random.key(seed), mesh=mesh, fsdp_min_weight_size=fsdp_min_weight_size)
    )
    train_step = xe.train.make_train_step(static, tx, mesh, cfg.train, fsdp_min_weight_size=fsdp_min_weight_size)
    tokens = jax.random.randint(jax.random.key(seed + 1), (batch_size, seq_len + 1), 0, cfg.model.vocab_size)
    tokens = tokens.astype("int32")
    batch = jax.block_until_ready(jax.device_put(Batch.from_tokens(tokens), NamedSharding(mesh, batch_spec(2, mesh))))
    return TrainStepSetup(state, static, train_step, batch, tokens, init_s)


class TrainStepLoop:
    """Calling it runs one ``train_step(state, batch)``, passing the returned (donated) state back in.

    Every step's metrics are kept; :meth:`losses` reads them back after the timed steps.
    """

    def __init__(self, train_step: Callable, state: Any, batch: Any):
        self.train_step, self.state, self.batch = train_step, state, batch
        self.metrics: list[Any] = []

    def __call__(self) -> Any:
        self.state, metrics = self.train_step(self.state, self.batch)
        self.metrics.append(metrics)
        return self.state.step

    def losses(self) -> tuple[list[float], bool]:
        """Mean loss of every step so far, and whether all were finite and no step was flagged non-finite."""
        from xlstm_eqx.train import to_host

        host = [to_host(m) for m in self.metrics]
        losses = [float(h["loss_mean"]) for h in host]
        finite = all(math.isfinite(x) for x in losses) and not any(float(h.get("nonfinite_max", 0)) for h in host)
        return losses, finite


def trace_train_steps(setup: TrainStepSetup, trace_dir: str, *, steps: int, warmup: int) -> tuple[str, float, str]:
    """Profiles the train step of ``setup`` (from :func:`init_train_step`).

    Compiles it, runs ``warmup`` untimed steps, then ``steps`` steps under ``jax.profiler.trace(trace_dir)``, each
    blocked on. Returns (the compiled module's HLO text, wall seconds per traced step, the trace's ``.xplane.pb``
    path). The setup's state is donated to the steps.
    """
    import glob

    hlo_text = setup.train_step.lower(setup.state, setup.batch).compile().as_text()
    step = TrainStepLoop(setup.train_step, setup.state, setup.batch)
    for _ in range(warmup):
        jax.block_until_ready(step())
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            jax.block_until_ready(step())
    wall = (time.perf_counter() - t0) / steps
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    return hlo_text, wall, path
