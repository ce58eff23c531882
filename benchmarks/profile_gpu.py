"""Where a train step's time goes on a GPU: a ``jax.profiler`` trace of the library's step, summed per kernel.

What is measured
    One run of benchmarks/gpu.py (``--run``, default the 165M preset in bf16 at T=2048 × batch 16), set up the
    same way, after ``--warmup`` untimed steps: ``--steps`` steps under ``jax.profiler.trace``. The device
    plane's kernel events (every ``Stream`` line of ``/device:GPU:0``) are summed per kernel name, and each
    fusion's kernel is joined by name with its HLO instruction in the compiled module's text, for its shape and
    the jaxpr operation it came from (library GEMMs such as cuBLAS's ``nvjet_*`` kernels have no such name; the
    events' own ``hlo_op`` statistic names the CUDA-graph command buffer that launched them). Output, one JSON
    line each:

    * ``gpu_profile_summary``: wall time per step, kernel time per step, the device's busy fraction (union of
      kernel intervals ÷ traced span: the rest is launch gaps and host waits), kernels per step, and kernel
      time per category: ``gemm`` (cuBLAS/cuBLASLt/CUTLASS and XLA's Triton GEMM fusions), ``copy_transpose``,
      ``reduce``, ``elementwise`` (other fusions), ``memset_memcpy``, ``other``.
    * ``gpu_profile_op``: the ``--top`` kernels by time per step, with category, runs per step, and the HLO
      instruction's shape and source operation ("?" and "" for library kernels).
    ``--out DIR`` keeps the raw trace (``*.xplane.pb``, readable with ``jax.profiler.ProfileData`` or
    TensorBoard's profile plugin) and the compiled module's text (``train_step.hlo.txt.gz``).

Usage
    python benchmarks/profile_gpu.py --out runs/profile_gpu
    python benchmarks/profile_gpu.py --run 165m_chunk128 --steps 3 --top 40
    python benchmarks/profile_gpu.py --quick          # smoke test on any backend (host-plane events on CPU)
    python benchmarks/profile_gpu.py --from-trace DIR/vm.xplane.pb --hlo DIR/train_step.hlo.txt.gz --steps 2
                                                      # summarise a kept trace anywhere (--steps as traced)
"""

from __future__ import annotations

import argparse
import collections
import gzip
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, init_train_step, log, trace_train_steps  # noqa: E402
from gpu import RUNS, run_config  # noqa: E402
from kernel_trace import busy_ns, category, device_events, hlo_instruction  # noqa: E402
from profile_step import instructions  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", choices=[r.name for r in RUNS], default="165m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="keep the trace and the compiled module's text here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script itself")
    parser.add_argument("--from-trace", metavar="XPLANE", help="summarise a kept trace instead (no device needed)")
    parser.add_argument("--hlo", metavar="HLO_GZ", help="with --from-trace: its train_step.hlo.txt.gz")
    args = parser.parse_args(argv)

    run = next(r for r in RUNS if r.name == args.run)
    if args.from_trace:
        hlo_text = gzip.open(args.hlo, "rt").read() if args.hlo else ""
        events, wall, (seq_len, batch) = device_events(args.from_trace), None, (None, None)
    else:
        cfg, seq_len, batch = run_config(run, args.quick)
        setup = init_train_step(cfg, batch_size=batch, seq_len=seq_len, seed=args.seed)
        with tempfile.TemporaryDirectory() as trace_dir:
            hlo_text, wall, path = trace_train_steps(setup, trace_dir, steps=args.steps, warmup=args.warmup)
            events = device_events(path)
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                shutil.copy(path, os.path.join(args.out, os.path.basename(path)))
                with gzip.open(os.path.join(args.out, "train_step.hlo.txt.gz"), "wt") as f:
                    f.write(hlo_text)
    table = instructions(hlo_text)

    per_kernel, counts = collections.Counter(), collections.Counter()
    for kernel, _, duration in events:
        per_kernel[kernel] += duration
        counts[kernel] += 1
    info = {k: table.get(hlo_instruction(k, table) or "", {"shape": "?", "op": "?", "op_name": ""}) for k in per_kernel}
    by_category = collections.Counter()
    for kernel, ns in per_kernel.items():
        by_category[category(kernel, info[kernel]["op"])] += ns
    span = (max(s + d for _, s, d in events) - min(s for _, s, _ in events)) if events else 0
    ms = lambda ns: round(ns / 1e6 / args.steps, 3)  # noqa: E731
    emit(
        {
            "bench": "gpu_profile_summary",
            "run": run.name,
            "T": seq_len,
            "batch": batch,
            "steps": args.steps,
            "wall_ms_per_step": round(wall * 1e3, 2) if wall else None,
            "kernel_ms_per_step": ms(sum(per_kernel.values())),
            "busy_fraction": round(busy_ns(events) / span, 4) if span else None,
            "kernels_per_step": round(len(events) / args.steps, 1),
            "category_ms_per_step": {k: ms(v) for k, v in by_category.most_common()},
            "quick": args.quick,
            "from_trace": args.from_trace,  # set: the environment fields describe the analysing machine
        }
    )
    for kernel, ns in per_kernel.most_common(args.top):
        emit(
            {
                "bench": "gpu_profile_op",
                "kernel": kernel[:120],
                "category": category(kernel, info[kernel]["op"]),
                "ms_per_step": ms(ns),
                "kernels_per_step": round(counts[kernel] / args.steps, 2),
                "shape": info[kernel]["shape"][:200],
                "source": info[kernel]["op_name"].removeprefix("jit(train_step)/")[:200],
            }
        )
    log(f"[profile_gpu] {len(per_kernel)} distinct kernels, {len(events)} kernel runs")


if __name__ == "__main__":
    main()
