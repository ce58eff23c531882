"""A/B of execution policies and XLA:CPU options for the train step, alternating in one process.

What is measured
    For config A or B (as benchmarks/step.py sets them up: one device, float32 unless overridden), each
    ``--variant`` builds its own train state and step from the config plus the variant's overrides, and compiles
    the step with the variant's XLA options (``Lowered.compile(compiler_options=...)``, so every variant runs in
    this one process). Then ``--rounds`` rounds run ``--steps`` steps of every variant in turn; the first round is
    a warm-up and is not counted. Interleaving puts the machine's drift on every variant alike, which separate
    processes on a shared machine do not. One JSON line per variant: median and min step time, tokens/s and the
    ratio of its median tokens/s to the first variant's.

Variant syntax
    ``NAME=OVERRIDE[,OVERRIDE...]``; an override ``xla:FLAG=VALUE`` is an XLA option, ``env:VAR=VALUE`` sets an
    environment variable while the variant is traced and compiled (for code experiments gated on one), any other
    is a config override (``model.scan_blocks=false``). ``NAME=`` alone is the unchanged config. A list-valued XLA
    option separates its items with ``|`` (``xla:xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT|...``).

Usage
    python benchmarks/variants.py --config A --variant base= --variant unrolled=model.scan_blocks=false
    python benchmarks/variants.py --variant base= --variant fastmath=xla:xla_cpu_enable_fast_math=true
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, init_train_step, log  # noqa: E402
from model import PRESETS, preset_config  # noqa: E402


def _option_value(text: str) -> bool | int | str:
    """XLA options are typed: 'true'/'false' are bools, digits are ints."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return int(text) if text.lstrip("-").isdigit() else text


def parse_variant(text: str) -> tuple[str, list[str], dict[str, str], dict[str, str]]:
    """'name=a=1,xla:f=v,env:E=x' -> ('name', ['a=1'], {'f': 'v'}, {'E': 'x'})."""
    name, _, rest = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"variant {text!r} needs a name: NAME=OVERRIDES")
    overrides, options, env = [], {}, {}
    for item in filter(None, rest.split(",")):
        if item.startswith("env:"):
            var, sep, value = item[4:].partition("=")
            if not sep:
                raise argparse.ArgumentTypeError(f"environment override {item!r} must be env:VAR=VALUE")
            env[var] = value
        elif item.startswith("xla:"):
            flag, sep, value = item[4:].partition("=")
            if not sep:
                raise argparse.ArgumentTypeError(f"XLA option {item!r} must be xla:FLAG=VALUE")
            options[flag] = _option_value(value.replace("|", ","))  # a list-valued option's items
        else:
            overrides.append(item)
    return name, overrides, options, env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(PRESETS), default="A")
    parser.add_argument("--variant", type=parse_variant, action="append", required=True)
    parser.add_argument("--rounds", type=int, default=4, help="rounds, the first one a warm-up")
    parser.add_argument("--steps", type=int, default=4, help="steps per variant per round")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.rounds < 2 or (args.rounds - 1) * args.steps < 5:
        parser.error("need at least 2 rounds and ≥5 timed steps per variant")

    import jax

    spec = PRESETS[args.config]
    runs = {}
    for name, overrides, options, env in args.variant:
        cfg = preset_config(args.config, overrides)
        setup = init_train_step(cfg, batch_size=spec["batch"], seq_len=spec["T"], seed=args.seed)
        t0 = time.perf_counter()
        saved = {var: os.environ.get(var) for var in env}
        os.environ.update(env)
        try:
            compiled = setup.train_step.lower(setup.state, setup.batch).compile(compiler_options=options or None)
        finally:
            for var, value in saved.items():
                os.environ.pop(var) if value is None else os.environ.__setitem__(var, value)
        log(f"[variants] {name}: compiled in {time.perf_counter() - t0:.1f}s")
        runs[name] = {
            "step": compiled, "state": setup.state, "batch": setup.batch, "times": [], "spec": (overrides, options, env)
        }  # fmt: skip

    for round_index in range(args.rounds):
        for run in runs.values():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                run["state"], _ = run["step"](run["state"], run["batch"])
                jax.block_until_ready(run["state"])
                if round_index:
                    run["times"].append(time.perf_counter() - t0)

    tokens = spec["batch"] * spec["T"]
    baseline = None
    for name, run in runs.items():
        median = statistics.median(run["times"])
        tokens_per_s = tokens / median
        baseline = baseline or tokens_per_s
        emit(
            {
                "bench": "train_step_variant",
                "config": args.config,
                "variant": name,
                "overrides": run["spec"][0],
                "xla_options": run["spec"][1],
                "env": run["spec"][2],
                "tokens_per_s": round(tokens_per_s, 1),
                "ratio_to_first": round(tokens_per_s / baseline, 4),
                "step_s": round(median, 5),
                "min_s": round(min(run["times"]), 5),
                "timed_steps": len(run["times"]),
            }
        )


if __name__ == "__main__":
    main()
