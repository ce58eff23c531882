"""xLSTM LM throughput: forward and AdamW train-step tokens/s, compile time, peak RSS, GFLOP/s and MFU.

What is measured
    Config A (configs/bench_a.yaml, T=256, batch 8) and config B (configs/bench_b.yaml, T=512,
    batch 4): 2048 tokens per step, as in /work/shared/reference/performance_anchors.md. Each in
    float32 and with ``model.compute_dtype=bfloat16`` (parameters stay float32).
    * ``model_fwd``: ``eqx.filter_jit`` of ``model.forward_batch`` (all rows at once) → logits.
    * ``model_train``: one training step under ``eqx.filter_jit(donate="all-except-first")``
      (model and optimiser state donated; the batch is the first argument): mean next-token
      cross-entropy (``optax.softmax_cross_entropy_with_integer_labels``), ``eqx.filter_value_and_grad``,
      ``optax.chain(clip_by_global_norm(1.0), adamw(3e-4, b2=0.95, weight_decay=0.1))``.
    Tokens are synthetic (uniform random ids, drawn once outside the timed region); the loss is
    reported as a sanity check (≈ ln V at initialisation, falling over the timed steps).

How
    ``trace_s`` is ``filter_jit(...).lower(...)`` and ``compile_s`` is ``.compile()`` of that;
    the timed steps then call the ``filter_jit`` wrapper itself (no second compile; the number
    of XLA compilations during the timed steps is reported as ``compiles_during_timing`` and
    must be 0). After one untimed warm-up call, ``--steps`` (≥5) calls are timed individually
    with ``jax.block_until_ready``; the median is reported. FLOPs per token use the analytical
    estimate of the anchors file: forward = 2·(matmul params, embedding gather excluded) + cell
    FLOPs; train = 6·(matmul params) + 3·cell FLOPs, with chunkwise cell FLOPs per head-token
    = 2·L·(DK+DV) + 4·DK·DV (L = chunk size). MFU = achieved GFLOP/s ÷ the measured float32
    ``jit(jnp.dot)`` 2048² throughput (its own ``matmul_roofline`` JSON line; the bfloat16 dot
    is reported too for context, but MFU is always against the float32 dot).
    Every (config, dtype, fwd|train) runs in a fresh subprocess so ``peak_rss_mb``
    (process-lifetime ru_maxrss) is that measurement's own.

Usage
    python benchmarks/model.py                                   # A and B, float32 and bfloat16
    python benchmarks/model.py --configs B --dtypes float32 --steps 10
    python benchmarks/model.py --single A bfloat16               # one config in this process
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, log, matmul_gflops, peak_rss_mb, run_child, time_calls, timed, timing_fields  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {
    "A": {"path": "configs/bench_a.yaml", "T": 256, "batch": 8},
    "B": {"path": "configs/bench_b.yaml", "T": 512, "batch": 4},
}
DTYPES = ("float32", "bfloat16")


def preset_config(preset: str, overrides: list[str] | tuple[str, ...] = ()):
    """The run config of ``PRESETS[preset]``, computing in float32 unless ``overrides`` say otherwise."""
    import xlstm_eqx as xe

    path = os.path.join(ROOT, PRESETS[preset]["path"])
    return xe.load_config(path, overrides=["model.compute_dtype=float32", *overrides])


MODES = ("fwd", "train")


def matmul_weight_shapes(model) -> list[tuple[int, ...]]:
    """Shapes of the weights every token multiplies: each linear layer's (…, d_out, d_in), scanned blocks stacked
    on leading axes, and the embedding table when the head is tied to it."""
    import equinox as eqx
    import jax

    is_linear = lambda x: isinstance(x, eqx.nn.Linear)  # noqa: E731
    shapes = [tuple(x.weight.shape) for x in jax.tree.leaves(model, is_leaf=is_linear) if is_linear(x)]
    if model.lm_head is None:  # tied head: the embedding table is also a matmul
        shapes.append(tuple(model.embedding.weight.shape))
    return shapes


def flops_per_token(model, config) -> dict[str, float]:
    """Analytical FLOPs per token of the forward pass and of a training step."""
    matmul_params = sum(math.prod(shape) for shape in matmul_weight_shapes(model))
    dk, dv, length = config.qk_head_dim, config.v_head_dim, config.chunk_size
    cell = (2 * length * (dk + dv) + 4 * dk * dv) * config.num_heads * config.num_blocks
    return {
        "matmul_params": matmul_params,
        "fwd": 2.0 * matmul_params + cell,
        "train": 6.0 * matmul_params + 3.0 * cell,
    }


def run_single(preset: str, dtype: str, mode: str, args: argparse.Namespace) -> None:
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    from xlstm_eqx.config import load_config
    from xlstm_eqx.models import build, count_params

    spec = PRESETS[preset]
    overrides = [f"model.compute_dtype={dtype}", *args.override]
    config = load_config(os.path.join(ROOT, spec["path"]), overrides=overrides).model
    t_len, batch = spec["T"], spec["batch"]
    model = build(config, key=jax.random.key(args.seed))
    flops = flops_per_token(model, config)
    roofline = args.roofline_gflops
    if roofline is None:
        rec = matmul_gflops(2048, "float32")
        roofline = rec["gflops"]

    tokens = jax.random.randint(jax.random.key(args.seed + 1), (batch, t_len + 1), 0, config.vocab_size)
    inputs, labels = jax.block_until_ready((tokens[:, :-1], tokens[:, 1:]))
    step_tokens = batch * t_len

    if mode == "fwd":

        @eqx.filter_jit
        def forward(model, inputs):
            return model.forward_batch(inputs)[0]

        t0 = time.perf_counter()
        lowered = forward.lower(model, inputs)
        trace_s = time.perf_counter() - t0
        _, compile_s = timed(lowered.compile)
        stats = time_calls(lambda: forward(model, inputs), repeats=args.steps)
        extra = {}
    else:
        optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(args.lr, b1=0.9, b2=0.95, weight_decay=0.1))
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

        @eqx.filter_jit(donate="all-except-first")
        def train_step(batch_xy, model, opt_state):
            x, y = batch_xy

            def loss_fn(model):
                logits = model.forward_batch(x)[0]
                return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()

            loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
            updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
            return loss, eqx.apply_updates(model, updates), opt_state

        t0 = time.perf_counter()
        lowered = train_step.lower((inputs, labels), model, opt_state)
        trace_s = time.perf_counter() - t0
        _, compile_s = timed(lowered.compile)
        carry = {"model": model, "opt": opt_state, "losses": []}
        del model, opt_state  # donated on the first step

        def step():
            loss, carry["model"], carry["opt"] = train_step((inputs, labels), carry["model"], carry["opt"])
            carry["losses"].append(loss)
            return loss

        stats = time_calls(step, repeats=args.steps)
        losses = [float(x) for x in carry["losses"]]
        finite = all(math.isfinite(x) for x in losses)
        extra = {
            "loss_first": round(losses[0], 4),
            "loss_last": round(losses[-1], 4),
            "ln_vocab": round(math.log(config.vocab_size), 4),
            "loss_finite": finite,
        }
        if not finite:
            log(f"[model] WARNING: non-finite loss in {preset}/{dtype}: {losses}")

    tokens_per_s = step_tokens / stats["median_s"]
    gflops = flops[mode] * tokens_per_s / 1e9
    if stats["compiles_during_timing"]:
        log(f"[model] WARNING: {stats['compiles_during_timing']} compilations during timed steps")
    emit(
        {
            "bench": f"model_{mode}",
            "config": preset,
            "dtype": dtype,
            "T": t_len,
            "batch": batch,
            "kernel": config.kernel,
            "scan_blocks": config.scan_blocks,
            "remat": config.remat,
            "params": count_params(config),
            "tokens_per_s": round(tokens_per_s, 1),
            **timing_fields(stats, trace_s=trace_s, compile_s=compile_s),
            "steps": args.steps,
            "first_call_s": stats["first_call_s"],
            "mflop_per_token": round(flops[mode] / 1e6, 2),
            "gflops": round(gflops, 1),
            "roofline_fp32_gflops": roofline,
            "mfu": round(gflops / roofline, 4),
            **extra,
            "peak_rss_mb": peak_rss_mb(),
        }
    )


def run_sweep(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    roofline = matmul_gflops(2048, "float32")
    emit(roofline)
    emit(matmul_gflops(2048, "bfloat16"))
    for preset in args.configs:
        for dtype in args.dtypes:
            for mode in args.modes:
                child = [
                    os.path.abspath(__file__), "--single", preset, dtype, "--mode", mode,
                    "--steps", str(args.steps), "--seed", str(args.seed), "--lr", str(args.lr),
                    "--roofline-gflops", str(roofline["gflops"]),
                    *[x for o in args.override for x in ("--override", o)],
                ]  # fmt: skip
                records, wall = run_child(child, timeout=args.child_timeout)
                log(f"[model] {preset} {dtype} {mode}: child wall {wall:.1f}s")
                for record in records:
                    if "error" in record:
                        record = {"bench": f"model_{mode}", "config": preset, "dtype": dtype, **record}
                    record["child_wall_s"] = round(wall, 2)
                    emit(record)
    log(f"[model] total {time.perf_counter() - start:.1f}s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", choices=sorted(PRESETS), default=sorted(PRESETS))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement (≥5)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--override", action="append", default=[], help="extra config override, e.g. model.scan_blocks=false"
    )
    parser.add_argument("--roofline-gflops", type=float, default=None, help="skip measuring the fp32 dot")
    parser.add_argument("--child-timeout", type=float, default=900.0)
    parser.add_argument("--single", nargs=2, metavar=("CONFIG", "DTYPE"), help="run one config here")
    parser.add_argument("--mode", choices=(*MODES, "both"), default="both", help="with --single")
    args = parser.parse_args(argv)
    if args.steps < 5:
        parser.error("--steps must be ≥ 5")
    if args.single:
        preset, dtype = args.single
        if preset not in PRESETS or dtype not in DTYPES:
            parser.error(f"--single CONFIG DTYPE with CONFIG in {sorted(PRESETS)}, DTYPE in {DTYPES}")
        for mode in MODES if args.mode == "both" else (args.mode,):
            run_single(preset, dtype, mode, args)
    else:
        run_sweep(args)


if __name__ == "__main__":
    main()
