"""Our train step vs the PyTorch peer (``xlstm``'s xLSTMLarge), side by side in one run: tokens/s and their ratio.

What is measured
    One training step on 2048 tokens of config A (configs/bench_a.yaml, T=256, batch 8) and config B
    (configs/bench_b.yaml, T=512, batch 4), in fp32 and bf16, by two implementations of the same network:
    * ours: ``xe.train.make_train_step`` on one device, set up as benchmarks/step.py's mesh ``1`` does
      (``init_train_step`` in _common.py: state donated, NaN check and grad/param-norm metrics on, AdamW from
      ``cfg.optim``: lr 1e-3 constant, β2 0.95, weight decay 0.1 except norm/bias/embedding, clip 1.0).
      fp32: ``model.compute_dtype=float32``; bf16: ``model.compute_dtype=bfloat16`` (parameters, optimizer
      state and the loss stay float32).
    * peer: ``xlstm.xlstm_large.model.xLSTMLarge`` (PyPI ``xlstm``, kernels from ``mlstm_kernels``) built from the
      same ModelConfig fields, mode "train", chunkwise kernel ``--peer-kernel`` (default
      ``chunkwise--native_autograd``: pure torch, autograd backward), sequence and step kernels native,
      ``return_last_states=True`` (xlstm 2.0.6's layer fails in train mode without it; the states are dropped);
      ``torch.optim.AdamW(fused=True)`` (torch's fastest CPU path) with the same lr, betas, eps, weight decay and
      no-decay patterns
      (``cfg.optim.weight_decay_exclude`` searched in torch's parameter names), ``clip_grad_norm_`` 1.0, mean
      cross-entropy on float32 logits; ``torch.set_num_threads(os.cpu_count())``. bf16: forward and loss under
      ``torch.autocast("cpu", dtype=torch.bfloat16)`` (parameters and optimizer float32).
    Both train on the same random tokens (one batch, reused every step). Parameter counts of both are printed
    (and compared: ``params_match``).

How
    Both sides are built in this process, then warmed up with two untimed steps each (ours: the first one
    compiles). Then ``--rounds`` rounds alternate the sides (ours first in even rounds, the peer first in odd
    ones), each side timing its share of ``--steps`` steps one by one after one untimed settling step (the
    first step after the other side ran pays for the heap the two share; its median is
    ``<side>_settle_median_s``), so that load from other processes falls on both. Per side: the median of all
    its timed step times → tokens/s = batch·T / median; ``ratio`` = ours ÷ peer tokens/s (> 1: ours faster).
    ``ours_compiles_during_timing`` must be 0. FLOPs per token come from ``flops_per_token`` of
    benchmarks/model.py (same network, same figure for both), GFLOP/s and MFU against the measured
    ``jit(jnp.dot)`` 2048² roofline of the precision (its own ``matmul_roofline`` line: float32, or bfloat16
    operands with a float32 result for bf16); the contention probe (_common.py) is
    taken before and after the timed rounds. Loss (≈ ln V at initialisation) is a sanity check.

Set-up
    The peer lives in its own environment: ``make bench-compare`` creates ``.venv-peer`` with ``.[peer]`` (the
    ``xlstm`` package must stay out of ``.venv``). Without torch or xlstm the script says so on stderr, prints one
    ``{"bench": "compare", "peer": "absent", ...}`` line and exits 0.

Usage
    make bench-compare                                         # A and B, fp32 and bf16
    .venv-peer/bin/python benchmarks/compare.py --configs A --precisions fp32 bf16 --steps 6
    .venv-peer/bin/python benchmarks/compare.py --configs A --precisions fp32 --quick    # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import math
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    TrainStepLoop,
    contention_probe,
    emit,
    init_train_step,
    log,
    matmul_gflops,
    time_calls,
    timed,
)
from model import PRESETS, ROOT, flops_per_token  # noqa: E402

PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}
ROOFLINE_DTYPES = PRECISIONS  # MFU of each precision against the dot of its own operand dtype
PEER_KERNELS = ("chunkwise--native_autograd", "chunkwise--native_custbw")
WARMUP_STEPS = 2
PEER_HINT = "make bench-compare sets up .venv-peer"


def peer_import_error() -> str | None:
    """None when torch and xlstm's xLSTMLarge import, else why not."""
    try:
        import torch  # noqa: F401
        from xlstm.xlstm_large.model import xLSTMLarge  # noqa: F401
    except ImportError as err:
        return f"{type(err).__name__}: {err}"
    return None


def build_ours(spec: dict, dtype: str, seed: int):
    """Our train step on one device for a PRESETS entry: (TrainStepLoop, TrainStepSetup, run config)."""

    import xlstm_eqx as xe

    cfg = xe.load_config(os.path.join(ROOT, spec["path"]), overrides=[f"model.compute_dtype={dtype}"])
    setup = init_train_step(cfg, batch_size=spec["batch"], seq_len=spec["T"], seed=seed)
    return TrainStepLoop(setup.train_step, setup.state, setup.batch), setup, cfg


class PeerTrainStep:
    """The PyTorch peer: xLSTMLarge from our ModelConfig, AdamW as ours, one step per call on a fixed batch."""

    def __init__(self, cfg, tokens, *, kernel: str, bf16: bool, seed: int):
        import numpy as np
        import torch
        from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

        model_cfg, optim = cfg.model, cfg.optim
        if optim.name != "adamw":
            raise ValueError(f"the peer uses AdamW; the config asks for {optim.name}")
        torch.manual_seed(seed)
        self.torch = torch
        self.model = xLSTMLarge(
            xLSTMLargeConfig(
                embedding_dim=model_cfg.embedding_dim,
                num_heads=model_cfg.num_heads,
                num_blocks=model_cfg.num_blocks,
                vocab_size=model_cfg.vocab_size,
                use_bias=model_cfg.use_bias,
                norm_eps=model_cfg.norm_eps,
                qk_dim_factor=model_cfg.qk_dim_factor,
                v_dim_factor=model_cfg.v_dim_factor,
                chunkwise_kernel=kernel,
                sequence_kernel="native_sequence__native",
                step_kernel="native",
                mode="train",
                chunk_size=model_cfg.chunk_size,
                return_last_states=True,  # xlstm 2.0.6's mLSTMLayer always unpacks (h, state): False fails
                eps=model_cfg.cell_eps,
                ffn_proj_factor=model_cfg.ffn_proj_factor,
                ffn_round_up_to_multiple_of=model_cfg.ffn_round_up_to_multiple_of,
                gate_soft_cap=model_cfg.gate_soft_cap,
                output_logit_soft_cap=model_cfg.output_logit_soft_cap,
            )
        )
        self.model.train()
        no_decay = lambda name: any(re.search(p, name) for p in optim.weight_decay_exclude)  # noqa: E731
        named = list(self.model.named_parameters())
        groups = [
            {"params": [p for n, p in named if not no_decay(n)], "weight_decay": optim.weight_decay},
            {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0},
        ]
        # fused: torch's one-kernel AdamW, its fastest on CPU (its default there is the per-tensor loop, which
        # cost B's step 55-61 against 17-19 ms); ours is one fused XLA update
        self.optimizer = torch.optim.AdamW(groups, lr=optim.learning_rate, betas=(optim.b1, optim.b2), eps=optim.eps,
                                           fused=True)  # fmt: skip
        self.clip = optim.grad_clip_norm
        host_tokens = torch.from_numpy(np.array(tokens)).long()
        self.inputs, self.targets = host_tokens[:, :-1].contiguous(), host_tokens[:, 1:].contiguous()
        self.autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.losses: list = []

    def param_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def __call__(self) -> None:
        torch = self.torch
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            logits, _ = self.model(self.inputs)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), self.targets.flatten())
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.losses.append(loss.detach())


def round_sizes(steps: int, rounds: int) -> list[int]:
    """``steps`` timed steps split as evenly as possible over ``rounds`` rounds (none empty)."""
    rounds = min(rounds, steps)
    return [steps // rounds + (i < steps % rounds) for i in range(rounds)]


def time_alternately(ours, peer, steps: int, rounds: int) -> dict:
    """Step times of both sides, timed in alternating rounds; ours' XLA compilations during timing.

    Each side's turn starts with one untimed settling step (its time is kept apart, ``<side>_settle``). Both
    sides allocate from the one glibc heap (kept mapped, see xlstm_eqx.host_memory), so the first step after
    the other side ran finds its large blocks split up by the other's allocations and faults fresh pages in:
    on B bf16 our first step after the peer took 0.4-0.8 s more than the steps after it.
    """
    times = {"ours": [], "peer": [], "ours_settle": [], "peer_settle": []}
    compiles = 0
    for i, size in enumerate(round_sizes(steps, rounds)):
        order = [("ours", ours), ("peer", peer)]
        for side, call in order if i % 2 == 0 else order[::-1]:
            stats = time_calls(call, repeats=size, warmup=1, probe=False)
            times[side] += stats["times_s"]
            times[f"{side}_settle"].append(stats["first_call_s"])
            compiles += stats["compiles_during_timing"] if side == "ours" else 0
    return {**times, "ours_compiles": compiles}


def compare(preset: str, precision: str, args: argparse.Namespace, roofline: float) -> None:
    import equinox as eqx
    import torch

    from xlstm_eqx.models import count_params

    spec = PRESETS[preset]
    step_tokens = spec["batch"] * spec["T"]
    ours, setup, cfg = build_ours(spec, PRECISIONS[precision], args.seed)
    flops = flops_per_token(eqx.combine(setup.state.params, setup.static), cfg.model)["train"]
    peer = PeerTrainStep(cfg, setup.tokens, kernel=args.peer_kernel, bf16=precision == "bf16", seed=args.seed)
    del setup  # its state is donated by our first step

    first_s = {}
    for side, call in (("ours", ours), ("peer", peer)):
        _, first_s[side] = timed(call)
        for _ in range(WARMUP_STEPS - 1):
            timed(call)
    log(f"[compare] {preset} {precision}: warm (first step ours {first_s['ours']:.1f}s, peer {first_s['peer']:.1f}s)")

    probe_before = contention_probe()
    timing = time_alternately(ours, peer, args.steps, args.rounds)
    probe_after = contention_probe()

    ours_losses, ours_finite = ours.losses()
    peer_losses = [float(x) for x in peer.losses]
    ours_params, peer_params = count_params(cfg.model), peer.param_count()
    median = {side: statistics.median(timing[side]) for side in ("ours", "peer")}
    tokens_per_s = {side: step_tokens / median[side] for side in median}
    gflops = {side: flops * tokens_per_s[side] / 1e9 for side in median}
    if timing["ours_compiles"]:
        log(f"[compare] WARNING: {timing['ours_compiles']} XLA compilations during our timed steps")
    if ours_params != peer_params:
        log(f"[compare] WARNING: parameter counts differ: ours {ours_params:,}, peer {peer_params:,}")
    record = {
        "bench": "compare",
        "config": preset,
        "precision": precision,
        "T": spec["T"],
        "batch": spec["batch"],
        "ours_tokens_per_s": round(tokens_per_s["ours"], 1),
        "peer_tokens_per_s": round(tokens_per_s["peer"], 1),
        "ratio": round(tokens_per_s["ours"] / tokens_per_s["peer"], 4),
        "steps": args.steps,
        "rounds": len(round_sizes(args.steps, args.rounds)),
        "quick": args.quick,
        "ours_step_s": round(median["ours"], 5),
        "peer_step_s": round(median["peer"], 5),
        "ours_times_s": timing["ours"],
        "peer_times_s": timing["peer"],
        "ours_settle_median_s": round(statistics.median(timing["ours_settle"]), 5),
        "peer_settle_median_s": round(statistics.median(timing["peer_settle"]), 5),
        "ours_first_step_s": round(first_s["ours"], 3),
        "peer_first_step_s": round(first_s["peer"], 3),
        "ours_compiles_during_timing": timing["ours_compiles"],
        "ours_params": ours_params,
        "peer_params": peer_params,
        "params_match": ours_params == peer_params,
        "ours_precision": f"compute_dtype={PRECISIONS[precision]}, params float32",
        "peer_precision": "autocast bfloat16, params float32" if precision == "bf16" else "float32",
        "peer_kernel": args.peer_kernel,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "xlstm": importlib.metadata.version("xlstm"),
        "mlstm_kernels": importlib.metadata.version("mlstm_kernels"),
        "mflop_per_token": round(flops / 1e6, 2),
        "ours_gflops": round(gflops["ours"], 1),
        "peer_gflops": round(gflops["peer"], 1),
        "roofline_dtype": ROOFLINE_DTYPES[precision],
        "roofline_gflops": roofline,
        "ours_mfu": round(gflops["ours"] / roofline, 4),
        "peer_mfu": round(gflops["peer"] / roofline, 4),
        "ours_loss_first": round(ours_losses[0], 4),
        "ours_loss_last": round(ours_losses[-1], 4),
        "peer_loss_first": round(peer_losses[0], 4),
        "peer_loss_last": round(peer_losses[-1], 4),
        "ln_vocab": round(math.log(cfg.model.vocab_size), 4),
        "loss_finite": ours_finite and all(math.isfinite(x) for x in peer_losses),
        "probe_gflops_before": probe_before,
        "probe_gflops_after": probe_after,
    }
    if ours_params != peer_params:
        record["params_note"] = "parameter counts differ: the two networks are not the same"
    emit(record)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", choices=sorted(PRESETS), default=sorted(PRESETS))
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side (≥5)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds the steps are split over")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 timed steps per side, not a measurement")
    parser.add_argument("--peer-kernel", choices=PEER_KERNELS, default=PEER_KERNELS[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 2, 2
    elif args.steps < 5:
        parser.error("--steps must be ≥ 5 (or --quick for a smoke test)")
    if args.rounds < 1:
        parser.error("--rounds must be ≥ 1")

    missing = peer_import_error()
    if missing is not None:
        log(f"[compare] the PyTorch peer is not importable here ({missing}); nothing measured. {PEER_HINT}.")
        emit({"bench": "compare", "peer": "absent", "hint": PEER_HINT, "import_error": missing})
        return

    import torch

    torch.set_num_threads(os.cpu_count())
    rooflines = {precision: matmul_gflops(2048, ROOFLINE_DTYPES[precision]) for precision in args.precisions}
    for roofline in rooflines.values():
        emit(roofline)
    for preset in args.configs:
        for precision in args.precisions:
            compare(preset, precision, args, rooflines[precision]["gflops"])
            gc.collect()


if __name__ == "__main__":
    main()
