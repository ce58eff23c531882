"""Reading a ``jax.profiler`` trace's device kernels: events, HLO names, categories and busy time (profile_gpu.py).

No JAX state is touched on import (``device_events`` imports jax when called), so tests can load this file alone.
"""

from __future__ import annotations

import re

GEMM_MARKERS = ("gemm", "cublas", "cutlass", "xmma", "nvjet", "sm90_", "wgmma", "dot", "matmul")


def category(kernel: str, op: str) -> str:
    """A coarse kind for a GPU kernel, from its name and its HLO instruction's opcode ("?" when unknown)."""
    names = kernel.lower()
    if any(marker in names for marker in GEMM_MARKERS) or op in ("dot", "custom-call"):
        return "gemm"
    if "memcpy" in names or "memset" in names:
        return "memset_memcpy"
    if "copy" in names or "transpose" in names or op in ("copy", "transpose"):
        return "copy_transpose"
    if "reduce" in names or "reduction" in names or op in ("reduce", "reduce-window"):
        return "reduce"
    if "fusion" in names or op == "fusion":
        return "elementwise"
    return "other"


# XLA:CPU's per-execution wrapper event: it spans the ops inside it, so summing it would count them twice.
CONTAINER_EVENTS = ("ThunkExecutor::Execute",)


def thread_events(path: str):
    """(thread name, [(name, start_ns, duration_ns)]) for every XLA:CPU worker thread in the trace file ``path``
    (container events included)."""
    import jax

    profile = jax.profiler.ProfileData.from_file(path)
    for plane in profile.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if line.name == "python":
                continue
            yield line.name, [(e.name, e.start_ns, e.duration_ns) for e in line.events]


def device_events(path: str):
    """[(kernel name, start_ns, duration_ns)] on the first accelerator plane of the trace file ``path``; on CPU, the
    worker threads' op events (:func:`thread_events` without container events)."""
    import jax

    profile = jax.profiler.ProfileData.from_file(path)
    device = sorted(
        (p for p in profile.planes if p.name.startswith("/device:") and "CPU" not in p.name), key=lambda p: p.name
    )
    if not device:
        return [e for _, events in thread_events(path) for e in events if e[0] not in CONTAINER_EVENTS]
    return [
        (event.name, event.start_ns, event.duration_ns)
        for line in device[0].lines
        if line.name.startswith("Stream")  # derived lines ("XLA Ops", "XLA Modules") repeat the stream kernels
        for event in line.events
    ]


def hlo_instruction(kernel: str, table: dict[str, dict[str, str]]) -> str | None:
    """The HLO instruction a kernel ran, by name: XLA:GPU names a fusion's kernel after it with '.' → '_'
    (``loop_convert_fusion.20`` → ``loop_convert_fusion_20``). Library kernels (cuBLAS, nvjet) have none. The
    trace's own ``hlo_op`` statistic names the enclosing command buffer (a CUDA graph) instead."""
    for candidate in (kernel, re.sub(r"_(\d+)$", r".\1", kernel)):
        if candidate in table:
            return candidate
    return None


def busy_ns(events) -> int:
    """Length of the union of the events' [start, start + duration) intervals."""
    total, end = 0, None
    for _, start, duration in sorted(events, key=lambda e: e[1]):
        stop = start + duration
        if end is None or start >= end:
            total += duration
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total
