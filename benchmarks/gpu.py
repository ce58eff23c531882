"""Accelerator benchmarks: the library's train step in bf16 on one GPU, for the 165M preset and configs A and B.

What is measured (one process, one device; every record is one JSON line on stdout, flushed as it is taken)
    gpu_roofline      ``jit(jnp.dot)`` of two random n×n matrices (n = 8192): bf16 operands and result, and
                      float32 at JAX's default precision (TF32 on Hopper) and at ``precision=HIGHEST``; TFLOP/s over
                      a batch of back-to-back calls. ``gpu_copy`` is the device-memory bandwidth of ``x + 1`` over
                      a 1 GiB float32 array, counting the bytes read and written.
    gpu_train_step    ``xe.train.make_train_step`` on a one-device mesh, set up by ``init_train_step`` exactly as
                      step.py does it (AdamW of the config, NaN check and norm metrics on), with one batch of
                      uniform random tokens. bf16 is ``model.compute_dtype=bfloat16`` (float32 parameters, bf16
                      products with float32 accumulation, the mLSTM cell in float32). ``step_s`` is the median of
                      ``--steps`` steps each timed to completion; ``pipelined_step_s`` is the wall time of the same
                      number of steps dispatched back to back, divided by their number (host dispatch overlapped, as
                      in a training loop); ``tokens_per_s`` uses the pipelined time. ``mfu`` = model FLOP/s
                      (``flops_per_token`` of benchmarks/model.py: 6 × matmul parameters + 3 × chunkwise-cell FLOPs
                      per token) ÷ this run's bf16 dot rate; ``mfu_datasheet`` ÷ 989 TFLOP/s, the H100/H200 SXM
                      dense bf16 figure. ``temp_gib`` / ``argument_gib`` come from the compiled step's
                      ``memory_analysis()``.
                      Runs, most important first: the 165M preset (configs/xlstm_v1_165m.yaml: V50304 D768 L12
                      H4, 165M parameters) at T=2048 × batch 16 (32,768 tokens per step) in bf16; configs A and B
                      in bf16 at their CPU sizes (2048 tokens per step, far too small to fill the GPU, for
                      reference); the 165M preset at T=8192 × batch 4 (same tokens per step) for the long-context
                      scaling ratio (``gpu_scaling``); then the 165M preset's execution variants (chunk size 128
                      and 256, ``remat=none``, the parallel kernel, float32, batch 32); last the 1.3B preset
                      (configs/xlstm_v1_1.3b.yaml) at T=2048 × batch 8.
    A run that fails (out of memory, a compile error) gives a record with ``"error"`` and the sweep goes on; runs
    that would start after ``--budget-s`` seconds are skipped with a ``"skipped"`` record.

Usage
    python benchmarks/gpu.py                         # on a GPU machine; ~4 min on an H200
    python benchmarks/gpu.py --only 165m 165m_T8192 --steps 20
    python benchmarks/gpu.py --quick                 # smoke test of the script on any backend (tiny sizes)
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

import xlstm_eqx as xe

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import TrainStepLoop, compile_counter, emit, init_train_step, log, time_calls, timed  # noqa: E402
from model import ROOT, flops_per_token  # noqa: E402

DATASHEET_BF16_TFLOPS = 989.4  # H100/H200 SXM dense bf16 (no sparsity)
QUICK_MODEL = ["model.vocab_size=512", "model.embedding_dim=64", "model.num_blocks=2", "model.num_heads=2"]


@dataclass(frozen=True)
class Run:
    """One train-step measurement: a config file, its sequence shape, and overrides."""

    name: str
    path: str
    seq_len: int
    batch: int
    overrides: tuple[str, ...] = ()


BF16 = "model.compute_dtype=bfloat16"
M165 = "configs/xlstm_v1_165m.yaml"
RUNS = (
    Run("165m", M165, 2048, 16, (BF16,)),
    Run("A", "configs/bench_a.yaml", 256, 8, (BF16,)),
    Run("B", "configs/bench_b.yaml", 512, 4, (BF16,)),
    Run("165m_T8192", M165, 8192, 4, (BF16,)),
    Run("165m_chunk128", M165, 2048, 16, (BF16, "model.chunk_size=128")),
    Run("165m_remat_none", M165, 2048, 16, (BF16, "model.remat=none")),
    Run("165m_parallel", M165, 2048, 16, (BF16, "model.kernel=parallel")),
    Run("165m_chunk256", M165, 2048, 16, (BF16, "model.chunk_size=256")),
    Run("165m_fp32", M165, 2048, 16, ("model.compute_dtype=float32",)),
    Run("165m_B32", M165, 2048, 32, (BF16,)),
    Run("1.3b", "configs/xlstm_v1_1.3b.yaml", 2048, 8, (BF16,)),
)


def _rate(fn, *args, reps: int) -> float:
    """Seconds per call of ``fn(*args)`` over ``reps`` calls dispatched back to back (after one warm-up)."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    out = None
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps


def roofline(n: int, reps: int) -> dict[str, float]:
    """Emits the dot and copy ceilings; returns {name: rate} for MFU."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    rates = {}
    for name, dtype, precision in (
        ("bf16", jnp.bfloat16, None),
        ("fp32_default", jnp.float32, None),
        ("fp32_highest", jnp.float32, lax.Precision.HIGHEST),
    ):
        a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
        seconds = _rate(jax.jit(lambda x, y, p=precision: jnp.dot(x, y, precision=p)), a, b, reps=reps)
        rates[name] = 2.0 * n**3 / seconds / 1e12
        emit({"bench": "gpu_roofline", "dtype": name, "n": n, "tflops": round(rates[name], 1), "reps": reps})
        del a, b
    x = jax.random.normal(key_a, (max(n, 1024) * 32768,), jnp.float32)
    seconds = _rate(jax.jit(lambda v: v + 1.0), x, reps=reps)
    emit({"bench": "gpu_copy", "gib": round(x.nbytes / 2**30, 3), "tb_per_s": round(2 * x.nbytes / seconds / 1e12, 3)})
    return rates


def run_config(run: Run, quick: bool):
    """(config, seq_len, batch) of ``run``; ``quick`` shrinks the model and the batch for a smoke test."""
    overrides = ["model.compute_dtype=float32", *run.overrides, *(QUICK_MODEL if quick else ())]
    cfg = xe.load_config(os.path.join(ROOT, run.path), overrides=overrides)
    if quick:
        return cfg, max(64, run.seq_len // 16), max(1, run.batch // 2)
    return cfg, run.seq_len, run.batch


def train_step_record(run: Run, args: argparse.Namespace, bf16_tflops: float) -> dict:
    """Compiles and times the library train step for ``run``; returns its JSON record."""
    cfg, seq_len, batch = run_config(run, args.quick)
    state, static, train_step, batch_arrays, _, init_s = init_train_step(
        cfg, None, batch_size=batch, seq_len=seq_len, seed=args.seed
    )
    flops = flops_per_token(eqx.combine(state.params, static), cfg.model)["train"]
    t0 = time.perf_counter()
    lowered = train_step.lower(state, batch_arrays)
    trace_s = time.perf_counter() - t0
    compiled, compile_s = timed(lowered.compile)
    memory = compiled.memory_analysis()
    gib = lambda name: round(getattr(memory, name, 0) / 2**30, 3) if memory is not None else None  # noqa: E731

    step = TrainStepLoop(train_step, state, batch_arrays)
    del state
    counter = compile_counter()
    _, first_s = timed(step)  # the jit wrapper's own first call: cache lookup plus one step
    stats = time_calls(step, repeats=args.steps, warmup=0, probe=False)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        out = step()
    jax.block_until_ready(out)
    pipelined_s = (time.perf_counter() - t0) / args.steps
    losses, finite = step.losses()
    tokens = batch * seq_len
    tokens_per_s = tokens / pipelined_s
    tflops = flops * tokens_per_s / 1e12
    return {
        "bench": "gpu_train_step",
        "run": run.name,
        "config": run.path,
        "overrides": list(run.overrides),
        "T": seq_len,
        "batch": batch,
        "tokens_per_step": tokens,
        "params": xe.models.count_params(cfg.model),
        "compute_dtype": cfg.model.compute_dtype,
        "kernel": cfg.model.kernel,
        "chunk_size": cfg.model.chunk_size,
        "remat": cfg.model.remat,
        "tokens_per_s": round(tokens_per_s, 1),
        "pipelined_step_s": round(pipelined_s, 5),
        "step_s": round(stats["median_s"], 5),
        "min_s": round(stats["min_s"], 5),
        "max_s": round(stats["max_s"], 5),
        "steps": args.steps,
        "init_s": round(init_s, 2),
        "trace_s": round(trace_s, 2),
        "compile_s": round(compile_s, 2),
        "first_call_s": round(first_s, 4),
        "compiles_during_timing": counter(),
        "gflop_per_token": round(flops / 1e9, 4),
        "tflops": round(tflops, 2),
        "mfu": round(tflops / bf16_tflops, 4),
        "mfu_datasheet": round(tflops / DATASHEET_BF16_TFLOPS, 4),
        "temp_gib": gib("temp_size_in_bytes"),
        "argument_gib": gib("argument_size_in_bytes"),
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "ln_vocab": round(math.log(cfg.model.vocab_size), 4),
        "loss_finite": finite,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=[r.name for r in RUNS], help="these runs, in this order")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (≥5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no run after this many seconds")
    parser.add_argument("--no-roofline", action="store_true", help="skip the dot/copy ceilings (MFU vs datasheet)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script itself")
    args = parser.parse_args(argv)
    if args.steps < 5:
        parser.error("--steps must be ≥ 5")
    start = time.perf_counter()
    device = jax.devices()[0]
    emit({"bench": "gpu_environment", "platform": device.platform, "device_kind": device.device_kind,
          "quick": args.quick})  # fmt: skip
    if device.platform != "gpu" and not args.quick:
        log(f"[gpu] WARNING: jax's default device is {device.platform}, not a GPU; figures are not GPU figures")
    rates = {"bf16": DATASHEET_BF16_TFLOPS}
    if not args.no_roofline:
        rates = roofline(512 if args.quick else 8192, 3 if args.quick else 20)
    runs = [r for name in args.only for r in RUNS if r.name == name] if args.only else list(RUNS)
    done: dict[str, dict] = {}
    for run in runs:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            emit({"bench": "gpu_train_step", "run": run.name, "skipped": f"budget {args.budget_s}s spent"})
            continue
        log(f"[gpu] {run.name} at {elapsed:.0f}s")
        try:
            record = train_step_record(run, args, rates["bf16"])
            done[run.name] = record
        except Exception as err:  # one failing variant (e.g. out of memory) must not end the sweep
            record = {"bench": "gpu_train_step", "run": run.name, "error": f"{type(err).__name__}: {err}"[:2000]}
        record["quick"] = args.quick
        emit(record)
        gc.collect()
        jax.clear_caches()
    if "165m" in done and "165m_T8192" in done:
        short, long = done["165m"], done["165m_T8192"]
        ratio = long["tokens_per_s"] / short["tokens_per_s"]
        emit({"bench": "gpu_scaling", "runs": ["165m", "165m_T8192"], "T": [short["T"], long["T"]],
              "tokens_per_s": [short["tokens_per_s"], long["tokens_per_s"]], "ratio": round(ratio, 4),
              "quick": args.quick})  # fmt: skip
    log(f"[gpu] total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
