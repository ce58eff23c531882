"""Trainer step throughput: ``xe.train.make_train_step`` tokens/s and compile time, 1 device vs a (2,2,2) mesh.

What is measured
    The library's own training step, ``jit(shard_map(...))`` from ``xe.train.make_train_step`` (state
    donated, NaN check and grad/param-norm metrics on, as ``TrainConfig()`` defaults), float32, with AdamW from
    ``xe.train.build_optimizer(cfg.optim)`` (defaults: clip 1.0, constant LR), for config A
    (configs/bench_a.yaml, T=256, batch 8) and config B (configs/bench_b.yaml, T=512, batch 4): 2048 tokens per step.
    * mesh ``1``: ``make_mesh(MeshConfig(data=1), jax.devices()[:1])``, the single-device path.
    * mesh ``2x2x2``: data=2, fsdp=2, model=2 over 8 *fake* CPU devices (``XLA_FLAGS=
      --xla_force_host_platform_device_count=8``, set in the child's environment before jax is imported) with
      ``fsdp_min_weight_size=0``, so every parameter that can be is FSDP-sharded (``fsdp_sharded_leaves`` and
      ``tp_sharded_leaves`` count leaves whose placed sharding names the axis). The 8 fake devices share the same
      2 cores, so this measures the sharding / communication overhead of the program (all-gathers, reduce-
      scatters, all-reduces, 8 small per-device programs), never a speed-up. A ``train_step_sharded_ratio`` line per
      config gives tokens/s(2x2x2) ÷ tokens/s(1) from children of the same parent run.

How
    State from ``xe.train.init`` (model built under jit with output shardings); one batch ``Batch.from_tokens`` of
    uniform random int32 tokens (batch, T+1), placed once with the mesh's batch sharding outside the timed region.
    ``trace_s`` = ``train_step.lower(state, batch)``, ``compile_s`` = ``.compile()`` of it (the update; the step's
    token-id check is a small program of its own). Then the step itself is called (check, then update): one
    untimed warm-up step (``first_call_s``, ``compiles_first_call``), then ``--steps`` (≥5) steps timed one by
    one with ``jax.block_until_ready`` (median reported), each passing the returned (donated) state back in;
    ``compiles_during_timing`` counts XLA compilations in the timed steps and must be 0 (a state whose returned
    shardings differed from its input shardings would show up here). FLOPs/token and MFU use
    ``flops_per_token`` from benchmarks/model.py; MFU is against the parent's measured float32 ``jit(jnp.dot)``
    2048² roofline (its own ``matmul_roofline`` line). Each (config, mesh) runs in a fresh subprocess, so
    ``peak_rss_mb`` is that run's own. Loss (≈ ln V at init) is reported as a sanity check.

Usage
    python benchmarks/step.py                              # A and B, meshes 1 and 2x2x2
    python benchmarks/step.py --configs B --meshes 1 --steps 8
    python benchmarks/step.py --single A 2x2x2             # one run in this process
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time


def _mesh_shape(text: str) -> tuple[int, int, int]:
    """'1' -> (1, 1, 1); 'DxFxM' -> (D, F, M)."""
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) == 1:
        parts = [parts[0], 1, 1]
    if len(parts) != 3 or min(parts) < 1:
        raise ValueError(f"mesh must be N or DxFxM, got {text!r}")
    return parts[0], parts[1], parts[2]


# Fake CPU devices must be requested before jax is first imported (here, via _common/model).
if "--single" in sys.argv[:-2]:
    try:
        _n = math.prod(_mesh_shape(sys.argv[sys.argv.index("--single") + 2]))
    except ValueError:
        _n = 1  # argparse reports the bad mesh
    if _n > 1:
        _flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count={_n}".strip()

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    TrainStepLoop,
    compile_counter,
    emit,
    init_train_step,
    log,
    matmul_gflops,
    peak_rss_mb,
    run_child,
    time_calls,
    timed,
    timing_fields,
)
from model import PRESETS, ROOT, flops_per_token  # noqa: E402

MESHES = ("1", "2x2x2")


def run_single(preset: str, mesh_name: str, args: argparse.Namespace) -> None:
    import equinox as eqx
    import jax

    import xlstm_eqx as xe
    from xlstm_eqx.models import count_params
    from xlstm_eqx.parallel import FSDP_AXIS, TP_AXIS

    spec = PRESETS[preset]
    t_len, batch_size = spec["T"], spec["batch"]
    cfg = xe.load_config(os.path.join(ROOT, spec["path"]), overrides=["model.compute_dtype=float32", *args.override])
    data, fsdp, tp = _mesh_shape(mesh_name)
    n_dev = data * fsdp * tp
    if len(jax.devices()) < n_dev:
        raise RuntimeError(f"mesh {mesh_name} needs {n_dev} devices, jax sees {len(jax.devices())}")
    mesh = xe.make_mesh(xe.MeshConfig(data=data, fsdp=fsdp, model=tp), jax.devices()[:n_dev])
    min_size = 0 if n_dev > 1 else cfg.mesh.fsdp_min_weight_size
    roofline = args.roofline_gflops or matmul_gflops(2048, "float32")["gflops"]

    state, static, train_step, batch, _, init_s = init_train_step(
        cfg, mesh, batch_size=batch_size, seq_len=t_len, seed=args.seed, fsdp_min_weight_size=min_size
    )
    flops = flops_per_token(eqx.combine(state.params, static), cfg.model)["train"]
    leaves = jax.tree.leaves(state.params)
    sharded_over = lambda axis: sum(any(axis in str(d) for d in x.sharding.spec if d) for x in leaves)  # noqa: E731

    t0 = time.perf_counter()
    lowered = train_step.lower(state, batch)
    trace_s = time.perf_counter() - t0
    _, compile_s = timed(lowered.compile)

    step = TrainStepLoop(train_step, state, batch)
    del state  # donated by the first step

    first_compiles = compile_counter()
    (_, first_s) = timed(step)
    compiles_first = first_compiles()
    stats = time_calls(step, repeats=args.steps, warmup=0)
    losses, finite = step.losses()
    if stats["compiles_during_timing"]:
        log(f"[step] WARNING: {stats['compiles_during_timing']} compilations during timed steps ({preset} {mesh_name})")
    if not finite:
        log(f"[step] WARNING: non-finite loss in {preset} {mesh_name}: {losses}")

    step_tokens = batch_size * t_len
    tokens_per_s = step_tokens / stats["median_s"]
    gflops = flops * tokens_per_s / 1e9
    emit(
        {
            "bench": "train_step",
            "config": preset,
            "mesh": mesh_name,
            "devices_used": n_dev,
            "fsdp_min_weight_size": min_size,
            "T": t_len,
            "batch": batch_size,
            "dtype": "float32",
            "params": count_params(cfg.model),
            "fsdp_sharded_leaves": sharded_over(FSDP_AXIS),
            "tp_sharded_leaves": sharded_over(TP_AXIS),
            "param_leaves": len(leaves),
            "tokens_per_s": round(tokens_per_s, 1),
            **timing_fields(stats, trace_s=trace_s, compile_s=compile_s),
            "steps": args.steps,
            "init_s": round(init_s, 3),
            "first_call_s": round(first_s, 4),
            "compiles_first_call": compiles_first,
            "mflop_per_token": round(flops / 1e6, 2),
            "gflops": round(gflops, 1),
            "roofline_fp32_gflops": roofline,
            "mfu": round(gflops / roofline, 4),
            "loss_first": round(losses[0], 4),
            "loss_last": round(losses[-1], 4),
            "ln_vocab": round(math.log(cfg.model.vocab_size), 4),
            "loss_finite": finite,
            "peak_rss_mb": peak_rss_mb(),
        }
    )


def run_sweep(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    roofline = matmul_gflops(2048, "float32")
    emit(roofline)
    for preset in args.configs:
        results = {}
        for mesh_name in args.meshes:
            child = [
                os.path.abspath(__file__), "--single", preset, mesh_name, "--steps", str(args.steps),
                "--seed", str(args.seed), "--roofline-gflops", str(roofline["gflops"]),
                *[x for o in args.override for x in ("--override", o)],
            ]  # fmt: skip
            records, wall = run_child(child, timeout=args.child_timeout)
            log(f"[step] {preset} mesh {mesh_name}: child wall {wall:.1f}s")
            for record in records:
                if "error" in record:
                    record = {"bench": "train_step", "config": preset, "mesh": mesh_name, **record}
                elif record.get("bench") == "train_step":
                    results[mesh_name] = record
                record["child_wall_s"] = round(wall, 2)
                emit(record)
        single = results.get("1")
        for mesh_name, record in results.items():
            if mesh_name == "1" or single is None:
                continue
            emit(
                {
                    "bench": "train_step_sharded_ratio",
                    "config": preset,
                    "mesh": mesh_name,
                    "baseline_mesh": "1",
                    "tokens_per_s_ratio": round(record["tokens_per_s"] / single["tokens_per_s"], 4),
                    "step_s_ratio": round(record["step_s"] / single["step_s"], 4),
                    "compile_s_ratio": round(record["compile_s"] / single["compile_s"], 4),
                    "peak_rss_ratio": round(record["peak_rss_mb"] / single["peak_rss_mb"], 4),
                    "compiles_during_timing": record["compiles_during_timing"],
                }
            )
    log(f"[step] total {time.perf_counter() - start:.1f}s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", choices=sorted(PRESETS), default=sorted(PRESETS))
    parser.add_argument("--meshes", nargs="+", default=list(MESHES), help="N or DxFxM, e.g. 1 2x2x2")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (≥5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", action="append", default=[], help="extra config override, e.g. model.remat=block")
    parser.add_argument("--roofline-gflops", type=float, default=None, help="skip measuring the fp32 dot")
    parser.add_argument("--child-timeout", type=float, default=600.0)
    parser.add_argument("--single", nargs=2, metavar=("CONFIG", "MESH"), help="run one config here")
    args = parser.parse_args(argv)
    if args.steps < 5:
        parser.error("--steps must be ≥ 5")
    for mesh_name in [*args.meshes, *(args.single[1:] if args.single else [])]:
        try:
            _mesh_shape(mesh_name)
        except ValueError as err:
            parser.error(str(err))
    if args.single:
        if args.single[0] not in PRESETS:
            parser.error(f"--single CONFIG MESH with CONFIG in {sorted(PRESETS)}")
        run_single(args.single[0], args.single[1], args)
    else:
        run_sweep(args)


if __name__ == "__main__":
    main()
