"""Where a train step's time goes: a ``jax.profiler`` trace of the library's step, aggregated per XLA op.

What is measured
    ``xe.train.make_train_step`` for config A or B on one CPU device (set up as benchmarks/step.py does it),
    float32 unless overridden, after ``--warmup`` untimed steps: ``--steps`` steps under
    ``jax.profiler.trace``. The trace's XLA:CPU worker-thread events (one line per thread of the intra-op pool)
    are summed per HLO instruction, then joined with the compiled module's text to name each instruction's
    result shape and the jaxpr operation it came from (``op_name`` metadata). Output, one JSON line each:

    * ``profile_summary``: wall time per step, per-thread busy fraction (op time ÷ span; the container event
      ``ThunkExecutor::Execute`` is excluded), and op time per category per step: ``dot`` (XNNPACK/YNNPACK
      fusions and plain dots), ``copy_transpose`` (copies, transposes, bitcast-copies), ``elementwise``,
      ``reduce``, ``scatter_gather``, ``broadcast`` (buffer initialisation), ``other``.
    * ``profile_op``: the ``--top`` instructions by op time per step, with category, count per step, shape and
      source operation.
    * ``profile_library_dot``: every product XLA:CPU left outside its YNNPACK/XNNPACK fusions (a plain ``dot``
      instruction), with its operands' dtypes and contracted axes. These run on Eigen's thread pool after their
      trace event ends, so their op time above covers only the dispatch: a slow product hides here. ``upcast``
      marks a float32 operand converted by XLA for the product itself (``hlo_products.py``): XLA moved a
      low-precision product to float32 (it does so when the left operand is contracted on its first axis) and
      ran it at the float32 rate.

Usage
    python benchmarks/profile_step.py --config A
    python benchmarks/profile_step.py --config B --override model.scan_blocks=false --top 40
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, init_train_step, log, trace_train_steps  # noqa: E402
from hlo_products import products  # noqa: E402
from kernel_trace import CONTAINER_EVENTS, thread_events  # noqa: E402
from model import PRESETS, preset_config  # noqa: E402

INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<shape>\S+(?: \S+\))?)\S* (?P<op>[\w\-]+)\(")
OP_NAME = re.compile(r'op_name="(?P<op_name>[^"]*)"')


def category(name: str, op: str) -> str:
    """A coarse kind for an HLO instruction, from its name (fusions are named after their root ops) and opcode."""
    if name.startswith(("ynn_fusion", "xnn_fusion", "dot", "convolution")) or op in ("dot", "convolution"):
        return "dot"
    if "copy" in name or "transpose" in name or op in ("copy", "transpose"):
        return "copy_transpose"
    if "scatter" in name or "gather" in name or op in ("scatter", "gather", "dynamic-update-slice"):
        return "scatter_gather"
    if "reduce" in name or op in ("reduce", "reduce-window"):
        return "reduce"
    if "broadcast" in name and "fusion" not in name.replace("wrapped_broadcast", ""):
        return "broadcast"
    if op in ("fusion", "add", "multiply", "subtract", "divide", "exponential", "select", "maximum", "tanh"):
        return "elementwise"
    return "other"


def instructions(hlo_text: str) -> dict[str, dict[str, str]]:
    """Instruction name → {shape, op, op_name} for every instruction of the compiled module."""
    table = {}
    for line in hlo_text.splitlines():
        match = INSTRUCTION.match(line)
        if match:
            source = OP_NAME.search(line)
            table[match["name"]] = {
                "shape": match["shape"],
                "op": match["op"],
                "op_name": source["op_name"] if source else "",
            }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(PRESETS), default="A")
    parser.add_argument("--override", action="append", default=[], help="config override, e.g. model.chunk_size=32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    spec = PRESETS[args.config]
    cfg = preset_config(args.config, args.override)
    setup = init_train_step(cfg, batch_size=spec["batch"], seq_len=spec["T"], seed=args.seed)
    with tempfile.TemporaryDirectory() as trace_dir:
        hlo_text, wall, path = trace_train_steps(setup, trace_dir, steps=args.steps, warmup=args.warmup)
        threads = list(thread_events(path))
    table = instructions(hlo_text)

    per_op, counts = collections.Counter(), collections.Counter()
    busy = {}
    for thread, events in threads:
        ops = [e for e in events if e[0] not in CONTAINER_EVENTS]
        if not ops:
            continue
        span = max(s + d for _, s, d in ops) - min(s for _, s, _ in ops)
        busy[thread] = round(sum(d for *_, d in ops) / span, 3) if span else 0.0
        for name, _, duration in ops:
            per_op[name] += duration
            counts[name] += 1
    by_category = collections.Counter()
    for name, ns in per_op.items():
        info = table.get(name, {"op": "?"})
        by_category[category(name, info["op"])] += ns
    ms_per_step = lambda ns: round(ns / 1e6 / args.steps, 2)  # noqa: E731
    emit(
        {
            "bench": "profile_summary",
            "config": args.config,
            "overrides": args.override,
            "wall_ms_per_step": round(wall * 1e3, 1),
            "op_ms_per_step": ms_per_step(sum(per_op.values())),
            "thread_busy_fraction": sorted(busy.values(), reverse=True),
            "category_ms_per_step": {k: ms_per_step(v) for k, v in by_category.most_common()},
        }
    )
    for name, ns in per_op.most_common(args.top):
        info = table.get(name, {"shape": "?", "op": "?", "op_name": ""})
        emit(
            {
                "bench": "profile_op",
                "op": name,
                "category": category(name, info["op"]),
                "ms_per_step": ms_per_step(ns),
                "calls_per_step": round(counts[name] / args.steps, 2),
                "shape": info["shape"],
                "source": info["op_name"].removeprefix("jit(train_step)/")[:160],
            }
        )
    for dot in products(hlo_text):
        if not dot.fused:
            fields = {"op": dot.name, "shape": dot.shape, "operands": dot.operands, "contracted": dot.contracted}
            emit({"bench": "profile_library_dot", **fields, "upcast": dot.upcast})
    log(f"[profile] {len(per_op)} distinct ops, {len(threads)} worker threads")


if __name__ == "__main__":
    main()
