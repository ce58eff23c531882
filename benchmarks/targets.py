"""Issue 7 performance targets: long-context scaling, compile time vs depth, decode latency, recurrent-eval memory.

What is measured (config A, configs/bench_a.yaml: V2048 D256 L4 H4, chunkwise kernel, float32, one device)
    scaling  tokens/s of the library train step (``xe.train.make_train_step`` set up by ``init_train_step``, AdamW
             of ``cfg.optim``, as step.py does it) at T=512 × batch 16 and at T=8192 × batch 1: 8192 tokens per
             step in both, each run in its own process, the two lengths alternating over ``--scaling-repeats``
             rounds (default 2). ``target_scaling``: ratio = median tokens/s(T=8192) ÷ median tokens/s(T=512);
             met when ≥ 0.8.
    compile  trace_s = ``train_step.lower(state, batch)`` and compile_s = ``.compile()`` of that train step (T=256 ×
             batch 8, as step.py) with ``model.num_blocks`` 2 and 24, blocks scanned (bench_a.yaml's default).
             ``target_compile``: ratio = compile_s(24) ÷ compile_s(2) (met when ≤ 1.5); ``ratio_total`` is the
             same for trace_s + compile_s. The same is measured with ``model.scan_blocks=false`` at both depths
             (``target_compile_unrolled``: information only, ``met`` is null and ``would_meet`` says how it compares;
             the target is for scanned blocks). 24 unrolled blocks took ≈40 s to compile here;
             ``--no-compile-unrolled`` skips them.
    decode   ms per generated token, batch 1, greedy: wall time of one whole call that continues a 16-token prompt
             (uniform random ids) by N=64 tokens, prefill included, ÷ N. Ours: ``generate_jit(model, prompt, N,
             key=..., temperature=0)`` (one jitted prefill + ``lax.scan`` of recurrent steps). Peer: the same weights
             (``export_hf_checkpoint``) loaded by transformers' ``xLSTMForCausalLM.from_pretrained(dtype=float32)``,
             ``generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False)`` (recurrent-state cache on),
             ``torch.set_num_threads(os.cpu_count())``. ``target_decode``: ratio = ours ÷ peer; met when ≤ 0.5.
             ``tokens_match`` = fraction of the N positions where both greedy continuations agree (reported, never
             enforced: the model is untrained, so its logits are nearly flat and close calls can flip on rounding;
             min_new_tokens also bans the peer's EOS id, which ours does not).
    memory   the memory a recurrent evaluation of ONE document (batch 1) takes: 4,096 against 65,536 tokens (uniform
             random ids), each in its own process, with ``make_recurrent_eval_step(static, mesh, chunk_size=2048)``
             on parameters only (the optimizer state is dropped: an evaluation holds none). Before the measured
             eval a one-chunk document is evaluated (compiles the chunk step); then ``rss_before_mb`` (current
             VmRSS) and ``peak_before_mb`` are read, and after it the peak RSS (``ru_maxrss``). ``increment_mb`` =
             peak − rss_before: what the evaluation itself took. ``target_memory``: ratio = increment_mb(65,536) ÷
             increment_mb(4,096), met when ≤ 1.2. The ratio of whole-process peaks is reported as
             ``peak_rss_ratio`` (information only): a process floor of ≈550 MB (the JAX runtime, compiled programs,
             parameters) would hide almost any growth in it. Measured under the default host-memory policy
             (``retain``, see xlstm_eqx.host_memory), then once more under ``release`` (``target_memory_release``,
             information only). Under ``retain`` single-device computations run inline, so every chunk takes its
             temporaries from the one main heap; with asynchronous dispatch each worker thread that ran a chunk
             kept them in its own glibc arena.

How
    Every measurement runs in a fresh child process (``run_child``: its own compile caches and peak RSS); the parent
    re-emits the child's line with ``child_wall_s`` and then the target line. Timings: one untimed warm-up call with
    identical arguments, then ``--steps`` (≥5) calls timed one by one (``time_calls``: median, min, max,
    ``compiles_during_timing`` must be 0, contention probes around). ``--quick`` shrinks every size (scaling T 256 vs
    2048 with 2048 tokens, depth 2 vs 6, 16 decoded tokens, memory 1,024 vs 8,192 tokens) and marks each line
    ``"quick": true``. A missing measurement gives a target line with ``"met": null`` and ``"error"``.

Usage
    python benchmarks/targets.py                                  # all four targets
    python benchmarks/targets.py --quick                          # smoke test, ~3 min
    python benchmarks/targets.py --targets decode memory --steps 7
    python benchmarks/targets.py --targets compile --no-compile-unrolled
    python benchmarks/targets.py --child memory 65536             # one measurement in this process
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import TrainStepLoop, emit, init_train_step, log, peak_rss_mb, run_child, time_calls, timed  # noqa: E402
from model import PRESETS, preset_config  # noqa: E402

from xlstm_eqx.host_memory import ENV_VAR as HOST_MEMORY_ENV  # noqa: E402

TARGETS = ("scaling", "compile", "decode", "memory")
GOALS = {"scaling": (0.8, ">="), "compile": (1.5, "<="), "decode": (0.5, "<="), "memory": (1.2, "<=")}
FULL = {"scaling_T": [512, 8192], "scaling_tokens": 8192, "depths": [2, 24], "decode_tokens": 64,
        "memory_tokens": [4096, 65536]}  # fmt: skip
QUICK = {"scaling_T": [256, 2048], "scaling_tokens": 2048, "depths": [2, 6], "decode_tokens": 16,
         "memory_tokens": [1024, 8192]}  # fmt: skip


def _config(overrides: list[str]):
    return preset_config("A", overrides)


def _rss_now_mb() -> float:
    """Current resident set size (VmRSS) of this process, in MiB."""
    with open("/proc/self/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return round(kb / 1024.0, 1)


def _prompt(length: int, vocab: int, seed: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed).integers(0, vocab, length).tolist()


def _timing(stats: dict) -> dict:
    keys = ("median_s", "min_s", "max_s")
    rest = ("first_call_s", "compiles_during_timing", "probe_gflops_before", "probe_gflops_after")
    return {**{k: round(stats[k], 5) for k in keys}, **{k: stats[k] for k in rest}}


def child_scaling(t_len: int, batch: int, args: argparse.Namespace) -> None:
    cfg = _config([])
    setup = init_train_step(cfg, batch_size=batch, seq_len=t_len, seed=args.seed)
    step = TrainStepLoop(setup.train_step, setup.state, setup.batch)
    del setup  # its state is donated by the first step
    log(f"[targets] scaling T={t_len} batch={batch}: warm-up (compile) + {args.steps} timed steps")
    stats = time_calls(step, repeats=args.steps, warmup=1)
    losses, finite = step.losses()
    emit({"bench": "target_scaling_step", "T": t_len, "batch": batch, "tokens_per_step": t_len * batch,
          "tokens_per_s": round(t_len * batch / stats["median_s"], 1), **_timing(stats), "steps": args.steps,
          "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4), "loss_finite": finite,
          "peak_rss_mb": peak_rss_mb()})  # fmt: skip


def child_compile(depth: int, scan: str, args: argparse.Namespace) -> None:
    cfg = _config([f"model.num_blocks={depth}", f"model.scan_blocks={scan}"])
    setup = init_train_step(cfg, batch_size=PRESETS["A"]["batch"], seq_len=PRESETS["A"]["T"], seed=args.seed)
    log(f"[targets] compile num_blocks={depth} scan_blocks={scan}: lower + compile")
    t0 = time.perf_counter()
    lowered = setup.train_step.lower(setup.state, setup.batch)
    trace_s = time.perf_counter() - t0
    _, compile_s = timed(lowered.compile)
    emit({"bench": "target_compile_depth", "num_blocks": depth, "scan_blocks": scan == "true",
          "T": PRESETS["A"]["T"], "batch": PRESETS["A"]["batch"], "trace_s": round(trace_s, 3),
          "compile_s": round(compile_s, 3), "total_s": round(trace_s + compile_s, 3),
          "peak_rss_mb": peak_rss_mb()})  # fmt: skip


def child_decode_ours(ckpt: str, args: argparse.Namespace) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import xlstm_eqx as xe
    from xlstm_eqx.models.generate import generate_jit
    from xlstm_eqx.models.hf_interop import export_hf_checkpoint

    cfg = _config([])
    model = xe.models.build(cfg.model, key=jax.random.key(args.seed))
    export_hf_checkpoint(model, ckpt)
    prompt = jnp.asarray(_prompt(args.prompt_len, cfg.model.vocab_size, args.seed), jnp.int32)
    n, key = args.decode_tokens, jax.random.key(args.seed + 1)
    log(f"[targets] decode ours: {args.prompt_len}-token prompt + {n} tokens, warm-up + {args.steps} timed calls")
    stats = time_calls(lambda: generate_jit(model, prompt, n, key=key, temperature=0.0), repeats=args.steps)
    tokens = np.asarray(generate_jit(model, prompt, n, key=key, temperature=0.0)).tolist()
    emit({"bench": "target_decode_ours", "impl": "xlstm_eqx generate_jit", "new_tokens": n,
          "prompt_len": args.prompt_len, "ms_per_token": round(1000 * stats["median_s"] / n, 3), **_timing(stats),
          "tokens": tokens, "peak_rss_mb": peak_rss_mb()})  # fmt: skip


def child_decode_peer(ckpt: str, args: argparse.Namespace) -> None:
    try:
        import torch
        import transformers
        from transformers.models.xlstm import modeling_xlstm
    except ImportError as err:
        log(f"[targets] decode peer absent: {err}")
        emit({"bench": "target_decode_peer", "peer": "absent", "reason": str(err)})
        return
    torch.set_num_threads(os.cpu_count())
    model = transformers.xLSTMForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    vocab, n = model.config.vocab_size, args.decode_tokens
    ids = torch.tensor([_prompt(args.prompt_len, vocab, args.seed)], dtype=torch.long)
    out = {}

    def call() -> None:
        with torch.no_grad():
            out["seq"] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                        min_new_tokens=n, do_sample=False)  # fmt: skip

    log(f"[targets] decode peer: transformers {transformers.__version__}, warm-up + {args.steps} timed calls")
    stats = time_calls(call, repeats=args.steps)
    emit({"bench": "target_decode_peer", "impl": f"transformers {transformers.__version__} xLSTMForCausalLM",
          "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
          "external_xlstm_kernels": bool(modeling_xlstm.external_xlstm), "new_tokens": n,
          "prompt_len": args.prompt_len, "ms_per_token": round(1000 * stats["median_s"] / n, 3), **_timing(stats),
          "tokens": out["seq"][0, args.prompt_len :].tolist(), "peak_rss_mb": peak_rss_mb()})  # fmt: skip


def child_memory(n_tokens: int, args: argparse.Namespace) -> None:
    import functools

    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import xlstm_eqx as xe
    from xlstm_eqx.data import Batch
    from xlstm_eqx.train import to_host
    from xlstm_eqx.train.recurrent_eval import make_recurrent_eval_step

    cfg = _config([])
    mesh = xe.make_mesh(xe.MeshConfig(data=1), jax.devices()[:1])
    min_size = cfg.mesh.fsdp_min_weight_size
    build = functools.partial(xe.models.build, cfg.model)
    state, static = xe.train.init(build, xe.train.build_optimizer(cfg.optim), key=jax.random.key(args.seed),
                                  mesh=mesh, fsdp_min_weight_size=min_size)  # fmt: skip
    state = eqx.tree_at(lambda s: s.opt_state, state, None)  # parameters only
    eval_step = make_recurrent_eval_step(static, mesh, cfg.train, chunk_size=args.eval_chunk,
                                         fsdp_min_weight_size=min_size)  # fmt: skip
    tokens = jax.random.randint(jax.random.key(args.seed + 1), (1, n_tokens + 1), 0, cfg.model.vocab_size, jnp.int32)
    log(f"[targets] memory: warm-up on one {args.eval_chunk}-token chunk, then one {n_tokens}-token document")
    to_host(eval_step(state, Batch.from_tokens(tokens[:, : args.eval_chunk + 1])))
    batch = jax.block_until_ready(Batch.from_tokens(tokens))
    rss_before, peak_before = _rss_now_mb(), peak_rss_mb()
    metrics, eval_s = timed(lambda: to_host(eval_step(state, batch)))
    peak = peak_rss_mb()
    loss = float(metrics["loss"])
    emit({"bench": "target_memory_eval", "doc_tokens": n_tokens, "batch": 1, "chunk_size": args.eval_chunk,
          "chunks": math.ceil(n_tokens / args.eval_chunk), "rss_before_mb": rss_before,
          "peak_before_mb": peak_before, "peak_rss_mb": peak, "increment_mb": round(peak - rss_before, 1),
          "eval_s": round(eval_s, 3), "tokens_per_s": round(n_tokens / eval_s, 1), "loss": round(loss, 4),
          "ln_vocab": round(math.log(cfg.model.vocab_size), 4), "loss_finite": math.isfinite(loss)})  # fmt: skip


def _run(args: argparse.Namespace, child: list[str], bench: str, env: dict[str, str] | None = None) -> dict | None:
    """Runs one child measurement (``env`` added to its environment), re-emits its lines; returns its record
    named ``bench`` (None on failure)."""
    argv = [os.path.abspath(__file__), "--child", *child, "--steps", str(args.steps), "--seed", str(args.seed),
            "--prompt-len", str(args.prompt_len), "--decode-tokens", str(args.decode_tokens),
            "--eval-chunk", str(args.eval_chunk)]  # fmt: skip
    records, wall = run_child(argv, timeout=args.child_timeout, env=env)
    log(f"[targets] {' '.join(child)}: child wall {wall:.1f}s")
    found = None
    for record in records:
        if "error" in record:
            record = {"bench": bench, **record}
        elif record.get("bench") == bench:
            found = record
        emit({**record, "quick": args.quick, "child_wall_s": round(wall, 2)})
    return found


def _target(args: argparse.Namespace, name: str, ratio: float | None, fields: dict, key: str | None = None) -> None:
    """The target line; for an information-only ``key`` (not ``name``) ``met`` is null and ``would_meet`` is set."""
    goal, sense = GOALS[name]
    met = None if ratio is None else (ratio >= goal if sense == ">=" else ratio <= goal)
    extra = {"error": "a measurement is missing (see the lines above)"} if ratio is None else {}
    if key not in (None, name):
        met, extra = None, {**extra, "would_meet": met}
    emit({"bench": f"target_{key or name}", "ratio": None if ratio is None else round(ratio, 4), "target": goal,
          "target_sense": sense, "met": met, **fields, "quick": args.quick, **extra})  # fmt: skip


def _ratio(a: dict | None, b: dict | None, field: str) -> float | None:
    return None if a is None or b is None or a.get(field) is None or not b.get(field) else a[field] / b[field]


def parent(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    if "scaling" in args.targets:
        # the lengths alternate over --scaling-repeats rounds, so the machine's drift falls on both
        rates: dict[int, list] = {t_len: [] for t_len in args.scaling_T}
        for _ in range(args.scaling_repeats):
            for t_len in args.scaling_T:
                batch = max(1, args.scaling_tokens // t_len)
                run = _run(args, ["scaling", str(t_len), str(batch)], "target_scaling_step")
                rates[t_len].append(run and run["tokens_per_s"])
        medians = [None if None in r else round(statistics.median(r), 1) for r in rates.values()]
        short, long = ({"tokens_per_s": m} for m in (medians[0], medians[-1]))
        _target(args, "scaling", _ratio(long, short, "tokens_per_s"),
                {"T_short": args.scaling_T[0], "T_long": args.scaling_T[-1],
                 "tokens_per_s": [medians[0], medians[-1]], "tokens_per_s_runs": list(rates.values()),
                 "tokens_per_step": args.scaling_tokens})  # fmt: skip
    if "compile" in args.targets:
        for scan in ["true", "false"] if args.compile_unrolled else ["true"]:
            small, big = (_run(args, ["compile", str(d), scan], "target_compile_depth") for d in args.compile_depths)
            fields = {"num_blocks": args.compile_depths, "scan_blocks": scan == "true",
                      "compile_s": [r and r["compile_s"] for r in (small, big)],
                      "trace_s": [r and r["trace_s"] for r in (small, big)],
                      "ratio_total": _ratio(big, small, "total_s")}  # fmt: skip
            fields["ratio_total"] = fields["ratio_total"] and round(fields["ratio_total"], 4)
            if scan == "false":
                fields["note"] = "information only: the target applies to scanned blocks (target_compile)"
            _target(args, "compile", _ratio(big, small, "compile_s"), fields,
                    key="compile" if scan == "true" else "compile_unrolled")  # fmt: skip
    if "decode" in args.targets:
        with tempfile.TemporaryDirectory(prefix="xlstm_targets_") as ckpt:
            ours = _run(args, ["decode-ours", ckpt], "target_decode_ours")
            peer = _run(args, ["decode-peer", ckpt], "target_decode_peer") if ours else None
        fields = {"new_tokens": args.decode_tokens, "prompt_len": args.prompt_len,
                  "ours_ms_per_token": ours and ours["ms_per_token"],
                  "peer_ms_per_token": peer and peer.get("ms_per_token")}  # fmt: skip
        if peer is not None and peer.get("peer") == "absent":
            fields["peer"] = "absent"
        elif ours and peer:
            same = [a == b for a, b in zip(ours["tokens"], peer["tokens"], strict=False)]
            fields["tokens_match"] = round(sum(same) / max(len(ours["tokens"]), 1), 4)
            fields["first_mismatch"] = next((i for i, s in enumerate(same) if not s), None)
        _target(args, "decode", _ratio(ours, peer, "ms_per_token"), fields)
    if "memory" in args.targets:
        for policy in ("retain", "release"):  # the default host-memory policy first, the target's line
            env = {HOST_MEMORY_ENV: policy}
            small, big = (_run(args, ["memory", str(n)], "target_memory_eval", env) for n in args.memory_tokens)
            peaks = _ratio(big, small, "peak_rss_mb")
            _target(args, "memory", _ratio(big, small, "increment_mb"),
                    {"host_memory": policy, "doc_tokens": args.memory_tokens,
                     "increment_mb": [r and r["increment_mb"] for r in (small, big)],
                     "peak_rss_mb": [r and r["peak_rss_mb"] for r in (small, big)],
                     "peak_rss_ratio": peaks and round(peaks, 4), "loss": [r and r["loss"] for r in (small, big)]},
                    key="memory" if policy == "retain" else "memory_release")  # fmt: skip
    log(f"[targets] total {time.perf_counter() - start:.1f}s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test); lines say quick: true")
    parser.add_argument("--steps", type=int, default=5, help="timed calls per measurement (≥5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child-timeout", type=float, default=1800.0)
    parser.add_argument("--scaling-T", type=int, nargs=2, default=None, help="short and long T (512 8192)")
    parser.add_argument("--scaling-tokens", type=int, default=None, help="tokens per step (8192): batch = this ÷ T")
    parser.add_argument("--compile-depths", type=int, nargs=2, default=None, help="num_blocks (2 24)")
    parser.add_argument("--compile-unrolled", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure scan_blocks=false (information only; ≈1 min at depth 24)")  # fmt: skip
    parser.add_argument("--decode-tokens", type=int, default=None, help="new tokens (64)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--scaling-repeats", type=int, default=2, help="alternating runs of each length")
    parser.add_argument("--memory-tokens", type=int, nargs=2, default=None, help="document lengths (4096 65536)")
    parser.add_argument("--eval-chunk", type=int, default=2048, help="chunk_size of the recurrent eval")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 5:
        parser.error("--steps must be ≥ 5")
    sizes = QUICK if args.quick else FULL
    args.scaling_T = args.scaling_T or sizes["scaling_T"]
    args.scaling_tokens = args.scaling_tokens or sizes["scaling_tokens"]
    args.compile_depths = args.compile_depths or sizes["depths"]
    args.decode_tokens = args.decode_tokens or sizes["decode_tokens"]
    args.memory_tokens = args.memory_tokens or sizes["memory_tokens"]
    if not args.child:
        parent(args)
        return
    name, rest = args.child[0], args.child[1:]
    children = {"scaling": lambda: child_scaling(int(rest[0]), int(rest[1]), args),
                "compile": lambda: child_compile(int(rest[0]), rest[1] if len(rest) > 1 else "true", args),
                "decode-ours": lambda: child_decode_ours(rest[0], args),
                "decode-peer": lambda: child_decode_peer(rest[0], args),
                "memory": lambda: child_memory(int(rest[0]), args)}  # fmt: skip
    if name not in children:
        parser.error(f"--child {name}: expected one of {sorted(children)}")
    children[name]()


if __name__ == "__main__":
    main()
