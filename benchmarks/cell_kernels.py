"""mLSTM kernel throughput: forward and forward+backward of the parallel, chunkwise and recurrent forms.

What is measured
    Each kernel in ``xlstm_eqx.models.kernels`` handles ONE head of ONE sequence; here it is
    ``jax.vmap``-ed over a flat axis of ``BH`` independent (sequence, head) pairs and ``jax.jit``-ed.
    * ``fwd``: the outputs ``h`` (BH, T, DV) (the final state is not returned, so XLA may drop it);
    * ``fwdbwd``: ``jax.grad`` of ``sum(h)`` with respect to q, k, v and both gate pre-activations.
    ``tokens_per_s`` counts head-tokens: BH·T (sequence, head, position) triples per second.
    float32 throughout, DK = DV = 64 per head by default (``--dk``/``--dv``), chunk size 64.

Workload per call
    BH = max(1, head_tokens // T) with ``--head-tokens`` = 65536 by default, so every T does the
    same number of head-tokens (T=256 → BH=256 ... T=16384 → BH=4). A kernel whose cost is linear
    in T then shows the same tokens/s at every T; the final ``kernels_scaling`` line per kernel
    and mode gives tokens/s(largest T) / tokens/s(smallest T) (≈1 for linear cost, ≈ T_min/T_max
    for quadratic cost). Note that the sequential depth also grows with T (recurrent: T steps;
    chunkwise: T/64 chunk steps) while BH parallelism shrinks.

How
    Inputs are drawn once (q, k, v ~ N(0,1); i_preact ~ N(0,1); f_preact ~ N(3,1), i.e. forget
    gates ≈ 0.95). Compile time is ``jit(f).lower(...).compile()``; then the compiled function runs
    once untimed and ``--repeats`` (≥5) timed runs; the median is reported. Every (kernel, T,
    mode) runs in a fresh subprocess so ``peak_rss_mb`` (process-lifetime ru_maxrss) belongs to it.
    The parallel form materialises several (T, T) arrays per head: it is skipped (a JSON line with
    ``"skipped"``) where T²·BH·4 bytes ≥ ``--max-quadratic-gib`` (default 4 GiB).

Usage
    python benchmarks/cell_kernels.py                        # full sweep (~7 min on 2 cores, ~7 GB peak:
                                                             #   parallel T=4096 alone takes ~4 min)
    python benchmarks/cell_kernels.py --max-quadratic-gib 1  # same without parallel T≥4096 (~3 min)
    python benchmarks/cell_kernels.py --quick                # T 256 1024, 16384 head-tokens
    python benchmarks/cell_kernels.py --T 256 1024 --kernels chunkwise --modes fwd

    (Not named kernels.py: scripts here run with benchmarks/ first on sys.path, where a kernels.py would shadow
    the ``kernels`` package that transformers imports, and targets.py's decode peer would fail to load.)
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, log, peak_rss_mb, run_child, time_calls, timed, timing_fields  # noqa: E402

KERNEL_NAMES = ("parallel", "chunkwise", "recurrent")
MODES = ("fwd", "fwdbwd")
FULL_T = (256, 1024, 4096, 16384)
QUICK_T = (256, 1024)


def batch_heads(t_len: int, head_tokens: int) -> int:
    return max(1, head_tokens // t_len)


def quadratic_gib(t_len: int, bh: int) -> float:
    """Size of ONE float32 (BH, T, T) array, the parallel form's unit of memory."""
    return t_len * t_len * bh * 4 / 2**30


def record_identity(name: str, mode: str, t_len: int, bh: int) -> dict:
    """The fields that identify a kernel measurement (shared by measured and skipped records)."""
    return {"bench": "kernels", "config": f"{name}/{mode}", "kernel": name, "mode": mode, "dtype": "float32",
            "T": t_len, "BH": bh}  # fmt: skip


def run_single(args: argparse.Namespace) -> None:
    """One (kernel, T, mode) in this process: emits one JSON line."""
    import jax
    import jax.numpy as jnp

    from xlstm_eqx.models.kernels import KERNELS

    name, t_len, mode = args.single[0], int(args.single[1]), args.single[2]
    bh = batch_heads(t_len, args.head_tokens)
    kernel = KERNELS[name]
    kwargs = {"eps": 1e-6, **({"chunk_size": args.chunk_size} if name == "chunkwise" else {})}
    per_head = functools.partial(kernel, **kwargs)

    keys = jax.random.split(jax.random.key(args.seed), 5)
    q = jax.random.normal(keys[0], (bh, t_len, args.dk), jnp.float32)
    k = jax.random.normal(keys[1], (bh, t_len, args.dk), jnp.float32)
    v = jax.random.normal(keys[2], (bh, t_len, args.dv), jnp.float32)
    i_pre = jax.random.normal(keys[3], (bh, t_len), jnp.float32)
    f_pre = 3.0 + jax.random.normal(keys[4], (bh, t_len), jnp.float32)
    inputs = jax.block_until_ready((q, k, v, i_pre, f_pre))

    outputs = jax.vmap(lambda q, k, v, i, f: per_head(q, k, v, i, f)[0])
    if mode == "fwd":
        fn = outputs
    else:
        fn = jax.grad(lambda *xs: outputs(*xs).sum(), argnums=(0, 1, 2, 3, 4))

    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*inputs)
    trace_s = time.perf_counter() - t0
    compiled, compile_s = timed(lowered.compile)
    log(f"[kernels] {name} T={t_len} BH={bh} {mode}: lower {trace_s:.2f}s compile {compile_s:.2f}s")
    stats = time_calls(lambda: compiled(*inputs), repeats=args.repeats)
    head_tokens = bh * t_len
    emit(
        {
            **record_identity(name, mode, t_len, bh),
            "DK": args.dk,
            "DV": args.dv,
            "chunk_size": args.chunk_size if name == "chunkwise" else None,
            "tokens_per_s": round(head_tokens / stats["median_s"], 1),
            **timing_fields(stats, trace_s=trace_s, compile_s=compile_s),
            "repeats": args.repeats,
            "peak_rss_mb": peak_rss_mb(),
        }
    )


def scaling_record(kernel: str, mode: str, records: list[dict]) -> dict:
    """tokens/s at the largest measured T over tokens/s at the smallest measured T."""
    measured = sorted(
        (r for r in records if r.get("kernel") == kernel and r.get("mode") == mode and "tokens_per_s" in r),
        key=lambda r: r["T"],
    )
    out = {"bench": "kernels_scaling", "config": f"{kernel}/{mode}", "kernel": kernel, "mode": mode}
    if len(measured) < 2:
        return {**out, "skipped": f"need ≥2 measured T, have {len(measured)}"}
    small, large = measured[0], measured[-1]
    ratio = large["tokens_per_s"] / small["tokens_per_s"]
    return {
        **out,
        "T_small": small["T"],
        "T_large": large["T"],
        "tokens_per_s_by_T": {str(r["T"]): r["tokens_per_s"] for r in measured},
        "ratio": round(ratio, 3),
        "ratio_if_linear": 1.0,
        "ratio_if_quadratic": round(small["T"] / large["T"], 4),
        "peak_rss_mb_by_T": {str(r["T"]): r["peak_rss_mb"] for r in measured},
    }


def run_sweep(args: argparse.Namespace) -> None:
    t_values = args.T or (QUICK_T if args.quick else FULL_T)
    start = time.perf_counter()
    records: list[dict] = []
    for name in args.kernels:
        for t_len in t_values:
            bh = batch_heads(t_len, args.head_tokens)
            for mode in args.modes:
                if name == "parallel" and quadratic_gib(t_len, bh) >= args.max_quadratic_gib:
                    record = {
                        **record_identity(name, mode, t_len, bh),
                        "skipped": (
                            f"O(T^2) memory: one (BH,T,T) float32 array is "
                            f"{quadratic_gib(t_len, bh):.1f} GiB "
                            f"≥ {args.max_quadratic_gib} GiB"
                        ),
                    }
                    emit(record)
                    records.append(record)
                    continue
                child = [
                    os.path.abspath(__file__), "--single", name, str(t_len), mode,
                    "--head-tokens", str(args.head_tokens), "--dk", str(args.dk), "--dv", str(args.dv),
                    "--chunk-size", str(args.chunk_size), "--repeats", str(args.repeats),
                    "--seed", str(args.seed),
                ]  # fmt: skip
                got, wall = run_child(child, timeout=args.child_timeout)
                log(f"[kernels] {name} T={t_len} {mode}: child wall {wall:.1f}s")
                for record in got:
                    if "error" in record:
                        record = {"bench": "kernels", "config": f"{name}/{mode}", "kernel": name,
                                  "mode": mode, "T": t_len, "BH": bh, **record}  # fmt: skip
                    record["child_wall_s"] = round(wall, 2)
                    emit(record)
                    records.append(record)
    for name in args.kernels:
        for mode in args.modes:
            emit(scaling_record(name, mode, records))
    log(f"[kernels] total {time.perf_counter() - start:.1f}s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--T", type=int, nargs="+", help=f"sequence lengths (default {FULL_T})")
    parser.add_argument("--kernels", nargs="+", choices=KERNEL_NAMES, default=list(KERNEL_NAMES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--quick", action="store_true", help=f"T {QUICK_T} and 16384 head-tokens per call")
    parser.add_argument("--head-tokens", type=int, default=None, help="BH·T per call (default 65536)")
    parser.add_argument("--dk", type=int, default=64)
    parser.add_argument("--dv", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (≥5)")
    parser.add_argument("--max-quadratic-gib", type=float, default=4.0)
    parser.add_argument("--child-timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--single", nargs=3, metavar=("KERNEL", "T", "MODE"), help="run one measurement here")
    args = parser.parse_args(argv)
    if args.head_tokens is None:
        args.head_tokens = 16384 if args.quick else 65536
    if args.repeats < 5:
        parser.error("--repeats must be ≥ 5")
    if args.single:
        if args.single[0] not in KERNEL_NAMES or args.single[2] not in MODES:
            parser.error(f"--single KERNEL T MODE with KERNEL in {KERNEL_NAMES}, MODE in {MODES}")
        run_single(args)
    else:
        run_sweep(args)


if __name__ == "__main__":
    main()
