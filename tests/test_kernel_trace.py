"""benchmarks/kernel_trace.py: the trace reading behind profile_gpu.py (busy time, kernel → HLO names, categories)."""

from __future__ import annotations

import glob
import importlib.util
import os
import pathlib

import jax
import jax.numpy as jnp


def _load_kernel_trace():
    """benchmarks/kernel_trace.py loaded from its file (benchmarks/ is not a package, and putting it on sys.path
    would shadow installed modules named like its scripts)."""
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "kernel_trace.py"
    spec = importlib.util.spec_from_file_location("kernel_trace", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kernel_trace = _load_kernel_trace()


def test_busy_time_is_the_union_of_intervals():
    events = [
        ("a", 0, 10),  # [0, 10)
        ("b", 5, 10),  # overlaps a: union [0, 15)
        ("c", 6, 2),  # inside b: adds nothing
        ("d", 20, 5),  # disjoint: [20, 25)
        ("e", 25, 1),  # touching d: [25, 26)
    ]
    assert kernel_trace.busy_ns(events) == 15 + 5 + 1
    assert kernel_trace.busy_ns(list(reversed(events))) == 21  # order of the events does not matter
    assert kernel_trace.busy_ns([]) == 0


def test_kernels_map_to_their_hlo_instructions():
    table = {"loop_convert_fusion.20": {}, "wrapped_tanh": {}, "fusion_819": {}, "gemm_fusion_dot.27": {}}
    assert kernel_trace.hlo_instruction("loop_convert_fusion_20", table) == "loop_convert_fusion.20"
    assert kernel_trace.hlo_instruction("wrapped_tanh", table) == "wrapped_tanh"
    assert kernel_trace.hlo_instruction("fusion_819", table) == "fusion_819"  # exact names win
    assert kernel_trace.hlo_instruction("gemm_fusion_dot_27", table) == "gemm_fusion_dot.27"
    assert kernel_trace.hlo_instruction("nvjet_sm90_tss_192x128_64x5_1x2_h_bz_coopB_NTT", table) is None


def test_categories():
    category = kernel_trace.category
    assert category("nvjet_sm90_tss_176x128_64x5_1x2_h_bz_TNN", "?") == "gemm"
    assert category("gemm_fusion_dot_general_95", "fusion") == "gemm"
    assert category("memcpy128", "?") == "memset_memcpy"
    assert category("loop_transpose_fusion_6", "fusion") == "copy_transpose"
    assert category("input_reduce_fusion_86", "fusion") == "reduce"
    assert category("loop_convert_fusion_20", "fusion") == "elementwise"
    assert category("wrapped_tanh", "fusion") == "elementwise"


def test_device_events_read_a_real_trace(tmp_path):
    """On CPU the reader falls back to the host plane's worker threads; every event has a name and a span."""
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    x = jnp.ones((256, 256))
    jax.block_until_ready(f(x))
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(3):
            jax.block_until_ready(f(x))
    path = sorted(glob.glob(os.path.join(tmp_path, "**", "*.xplane.pb"), recursive=True))[-1]
    events = kernel_trace.device_events(path)
    assert events and all(name and duration >= 0 for name, _, duration in events)
    span = max(s + d for _, s, d in events) - min(s for _, s, _ in events)
    assert 0 < kernel_trace.busy_ns(events) <= span
