"""The train step's dense products on each side's GEMM library: XLA:CPU (ours) against torch (the peer).

What is measured
    For config A or B, every distinct dense product of one train step. Each linear layer (d_out, d_in) of the
    model, the lm head included, with rows = batch·T, gives three products (m, k, n): the forward x·Wᵀ
    (rows, d_in, d_out), the input gradient g·W (rows, d_out, d_in) and the weight gradient gᵀ·x
    (d_out, rows, d_in), each run as often as the model has such layers (remat's recomputed forward products are
    not counted). Each shape is a plain product of row-major operands, timed alternately in both libraries
    (``--rounds`` turns of ``--repeats`` calls each after a warm-up; median of the turns' medians), both on
    ``os.cpu_count()`` threads:

    * ours: ``jit(jnp.dot)``; float32, or bfloat16 operands accumulated and returned in float32, as the library's
      mixed-precision products are (``models.layers.mixed_precision_matmul``);
    * peer: ``torch.mm``; float32, or bfloat16 operands with a bfloat16 result, as autocast's ``linear`` gives.

    Output, one JSON line each: ``gemm`` per (shape, precision) with GFLOP/s of both sides and ``ratio`` (ours ÷
    peer; above 1 ours is faster); ``gemm_step`` per precision with the step's product time on each side
    (Σ count·FLOPs ÷ rate): the floor each GEMM library puts under the step, to hold against the step times of
    ``compare.py``.

    Needs torch (``make bench-compare`` sets up ``.venv-peer``); without it, prints ours alone (peer fields null).

Usage
    .venv-peer/bin/python benchmarks/gemm.py --config B
    .venv-peer/bin/python benchmarks/gemm.py --config A --precisions bf16 --repeats 10
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import alternating_gflops, emit, torch_peer  # noqa: E402
from model import PRESETS, matmul_weight_shapes, preset_config  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def step_products(preset: str) -> collections.Counter:
    """{(m, k, n): count} of the dense products of one train step of ``preset`` (forward, dx, dW per layer)."""
    import equinox as eqx
    import jax

    import xlstm_eqx as xe

    cfg = preset_config(preset)
    rows = PRESETS[preset]["batch"] * PRESETS[preset]["T"]
    model = eqx.filter_eval_shape(xe.models.build, cfg.model, key=jax.random.key(0))
    counts: collections.Counter = collections.Counter()
    for shape in matmul_weight_shapes(model):
        *stacked, d_out, d_in = shape  # scanned blocks stack their layers' weights on leading axes
        layers = math.prod(stacked)
        counts[(rows, d_in, d_out)] += layers  # forward x·Wᵀ
        counts[(rows, d_out, d_in)] += layers  # input gradient g·W
        counts[(d_out, rows, d_in)] += layers  # weight gradient gᵀ·x
    return counts


def ours_call(shape, precision: str):
    import jax
    import jax.numpy as jnp
    import numpy as np

    m, k, n = shape
    rng = np.random.default_rng(0)
    dtype = jnp.float32 if precision == "fp32" else jnp.bfloat16
    a = jnp.asarray(rng.standard_normal((m, k), np.float32), dtype)
    b = jnp.asarray(rng.standard_normal((k, n), np.float32), dtype)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    return lambda: jax.block_until_ready(dot(a, b))


def peer_call(shape, precision: str):
    import torch

    m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    a = torch.randn(m, k, generator=generator).to(dtype)
    b = torch.randn(k, n, generator=generator).to(dtype)
    return lambda: torch.mm(a, b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(PRESETS), default="B")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--repeats", type=int, default=6, help="timed calls per turn")
    parser.add_argument("--rounds", type=int, default=3, help="alternating turns per side")
    args = parser.parse_args()

    peer = torch_peer("gemm")
    products = step_products(args.config)
    for precision in args.precisions:
        step_s = {"ours": 0.0, "peer": 0.0}
        for shape, count in sorted(products.items()):
            calls = {"ours": ours_call(shape, precision)}
            if peer:
                calls["peer"] = peer_call(shape, precision)
            flops = 2.0 * shape[0] * shape[1] * shape[2]
            rate = alternating_gflops(calls, flops, rounds=args.rounds, repeats=args.repeats)
            for side in rate:
                step_s[side] += count * flops / (rate[side] * 1e9)
            emit(
                {
                    "bench": "gemm",
                    "config": args.config,
                    "precision": precision,
                    "m_k_n": list(shape),
                    "count_per_step": count,
                    "ours_gflops": round(rate["ours"], 1),
                    "peer_gflops": round(rate["peer"], 1) if peer else None,
                    "ratio": round(rate["ours"] / rate["peer"], 3) if peer else None,
                    "peer": peer,
                }
            )
        total_gflop = sum(2.0 * m * k * n * c for (m, k, n), c in products.items()) / 1e9
        emit(
            {
                "bench": "gemm_step",
                "config": args.config,
                "precision": precision,
                "gflop_per_step": round(total_gflop, 1),
                "ours_products_ms": round(step_s["ours"] * 1e3, 1),
                "peer_products_ms": round(step_s["peer"] * 1e3, 1) if peer else None,
                "ratio": round(step_s["peer"] / step_s["ours"], 3) if peer else None,
                "peer": peer,
            }
        )


if __name__ == "__main__":
    main()
