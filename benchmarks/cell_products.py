"""The mLSTM cell's batched products in a train step: XLA:CPU (ours) against torch's ``bmm`` (the peer).

What is measured
    The chunkwise cell multiplies many small matrices, one pair per (row, head, chunk): q·kᵀ, scores·v, q·C₀,
    k̂ᵀv and their gradients, each (L × d) at chunk length L. This script compiles the library's train step for
    config A or B (one device, as benchmarks/step.py sets it up, with ``--override`` applied), reads every
    product with batch dimensions out of the compiled module (``dot`` instructions, fused or not), and
    canonicalises each as (batch, m, k, n): batch = the product of the batch axes, k of the contracted ones.
    Products inside the scanned blocks run once per block, so each is counted ``num_blocks`` times (the cell
    only lives there). Each distinct shape is then timed alone, alternating sides (``--rounds`` turns of
    ``--repeats`` calls after a warm-up; median of the turns' medians), both on ``os.cpu_count()`` threads:

    * ours: ``jit(einsum("bmk,bkn->bmn"))`` in float32, the cell's precision in both of our precisions;
    * peer: ``torch.bmm`` in float32 and in bfloat16 (what autocast gives the peer's cell in its bf16 step).

    Output, one JSON line each: ``cell_product`` per shape with GFLOP/s of each side and ``ratio`` (ours ÷ the
    peer's float32 rate); ``cell_products_step`` with the products' time per step on each side (Σ count·FLOPs ÷
    rate), the floor each library puts under the cell. Without torch, ours alone (peer fields null).

Usage
    .venv-peer/bin/python benchmarks/cell_products.py --config B
    .venv-peer/bin/python benchmarks/cell_products.py --config A --override model.chunk_size=32
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import alternating_gflops, emit, init_train_step, log, torch_peer  # noqa: E402
from hlo_products import batched_products  # noqa: E402
from model import PRESETS, preset_config  # noqa: E402


def ours_call(shape):
    import jax
    import jax.numpy as jnp
    import numpy as np

    batch, m, k, n = shape
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((batch, m, k), np.float32))
    b = jnp.asarray(rng.standard_normal((batch, k, n), np.float32))
    product = jax.jit(lambda a, b: jnp.einsum("bmk,bkn->bmn", a, b))
    return lambda: jax.block_until_ready(product(a, b))


def peer_call(shape, dtype_name: str):
    import torch

    batch, m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, dtype_name)
    a = torch.randn(batch, m, k, generator=generator).to(dtype)
    b = torch.randn(batch, k, n, generator=generator).to(dtype)
    return lambda: torch.bmm(a, b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(PRESETS), default="B")
    parser.add_argument("--override", action="append", default=[], help="config override, e.g. model.chunk_size=32")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per turn")
    parser.add_argument("--rounds", type=int, default=3, help="alternating turns per side")
    args = parser.parse_args()

    peer = torch_peer("cell_products")
    cfg = preset_config(args.config, args.override)
    if not cfg.model.scan_blocks:
        parser.error("the per-block count assumes scanned blocks (model.scan_blocks=true)")
    preset = PRESETS[args.config]
    setup = init_train_step(cfg, batch_size=preset["batch"], seq_len=preset["T"], seed=0)
    found = batched_products(setup.train_step.lower(setup.state, setup.batch).compile().as_text())
    log(f"[cell_products] {sum(found.values())} batched products, {len(found)} shapes, × {cfg.model.num_blocks} blocks")
    sides = ("ours", "peer_fp32", "peer_bf16") if peer else ("ours",)
    step_s = dict.fromkeys(sides, 0.0)
    for shape, occurrences in sorted(found.items()):
        count = occurrences * cfg.model.num_blocks
        calls = {"ours": ours_call(shape)}
        if peer:
            calls |= {"peer_fp32": peer_call(shape, "float32"), "peer_bf16": peer_call(shape, "bfloat16")}
        flops = 2.0 * math.prod(shape)
        rate = alternating_gflops(calls, flops, rounds=args.rounds, repeats=args.repeats)
        for side in rate:
            step_s[side] += count * flops / (rate[side] * 1e9)
        emit(
            {
                "bench": "cell_product",
                "config": args.config,
                "overrides": args.override,
                "batch_m_k_n": list(shape),
                "count_per_step": count,
                **{f"{side}_gflops": round(r, 1) for side, r in rate.items()},
                "ratio": round(rate["ours"] / rate["peer_fp32"], 3) if peer else None,
                "peer": peer,
            }
        )
    emit(
        {
            "bench": "cell_products_step",
            "config": args.config,
            "overrides": args.override,
            "gflop_per_step": round(
                sum(2.0 * math.prod(s) * c for s, c in found.items()) * cfg.model.num_blocks / 1e9, 2
            ),
            **{f"{side}_ms": round(seconds * 1e3, 1) for side, seconds in step_s.items()},
            "peer": peer,
        }
    )


if __name__ == "__main__":
    main()
