"""Command line: ``xlstm-eqx train`` (the main job), ``demo`` (a tiny model on synthetic data), ``params`` and
``convert``. Thin by design: parse, wire, call."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from .config import ConfigError, load_config
from .data.sources import convert_to_array_record
from .io.checkpoint import CheckpointError
from .loop.logger import LogPathError
from .models import build, count_params


def repeated_patterns(key, batch: int, length: int, alphabet: int, period: int):
    """Rows of a random ``period``-token pattern (ids < ``alphabet``) repeated: only memory predicts them."""
    pattern = jax.random.randint(key, (batch, period), 0, alphabet)
    return jnp.tile(pattern, (1, length // period + 1))[:, : length + 1]


def demo(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    key = jax.random.key(config.seed)
    model = build(config.model, key=key)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(args.lr, b2=0.95, weight_decay=0.1))
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    print(f"model: {count_params(model):,} parameters, config {args.config}", flush=True)

    def loss_fn(model, rows):
        logits, _ = jax.vmap(model)(rows[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]).mean()

    @eqx.filter_jit(donate="all-except-first")
    def step(rows, model, opt_state):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, rows)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    alphabet = min(args.alphabet, config.model.vocab_size)
    sample = lambda k: repeated_patterns(k, args.batch, args.length, alphabet, args.period)  # noqa: E731
    eval_rows = sample(jax.random.key(10_000))
    initial = float(loss_fn(model, eval_rows))
    start = time.perf_counter()
    for i in range(1, args.steps + 1):
        model, opt_state, loss = step(sample(jax.random.fold_in(key, i)), model, opt_state)
        if i % max(1, args.steps // 10) == 0 or i == 1:
            print(f"step {i:4d}  train loss {float(loss):.4f}", flush=True)
    elapsed = time.perf_counter() - start
    final = float(loss_fn(model, eval_rows))
    # After the first period the continuation is determined: the best loss is log(alphabet) / periods.
    floor = float(jnp.log(alphabet)) * args.period / args.length
    result = dict(
        eval_loss_before=initial,
        eval_loss_after=final,
        eval_loss_floor=floor,
        steps=args.steps,
        tokens_per_s=args.steps * args.batch * args.length / elapsed,
    )
    print(json.dumps(result))
    return 0 if final < initial else 1


def train(args: argparse.Namespace) -> int:
    from .loop.job import train_job

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("xlstm_eqx").setLevel(logging.INFO)
    config = load_config(args.config, args.overrides)
    summary = train_job(config, sample_prompt=args.prompt, sample_tokens=args.sample_tokens)
    sample = summary.pop("sample", None)
    if sample is not None:
        print(f"--- sample ({args.sample_tokens} tokens after {args.prompt!r}) ---\n{args.prompt}{sample}\n---")
    print(json.dumps(summary))
    return 0 if summary["status"] == "success" else 1


def params(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    print(json.dumps({"config": args.config, "parameters": count_params(config.model)}))
    return 0


def convert(args: argparse.Namespace) -> int:
    count = convert_to_array_record(args.inputs, args.out, text_field=args.text_field)
    print(json.dumps({"out": str(args.out), "documents": count}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xlstm-eqx", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("train", help="train (or resume) an xLSTM from a config; evaluate; print a sample")
    fit.add_argument("--config", default="configs/shakespeare.yaml")
    fit.add_argument("--prompt", default="ROMEO:\n", help="text the printed sample continues")
    fit.add_argument("--sample-tokens", type=int, default=120, help="0: no sample")
    fit.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loop.num_train_steps=100 log.run_dir=runs/x")
    fit.set_defaults(fn=train)
    run = commands.add_parser("demo", help="train a tiny xLSTM on repeated random patterns and report the loss")
    run.add_argument("--config", default="configs/tiny.yaml")
    run.add_argument("--steps", type=int, default=150)
    run.add_argument("--batch", type=int, default=16)
    run.add_argument("--length", type=int, default=64)
    run.add_argument("--period", type=int, default=8)
    run.add_argument("--alphabet", type=int, default=16, help="pattern tokens are drawn from the first N ids")
    run.add_argument("--lr", type=float, default=1e-2)
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_blocks=4")
    run.set_defaults(fn=demo)
    count = commands.add_parser("params", help="print the parameter count of a config")
    count.add_argument("--config", required=True)
    count.add_argument("overrides", nargs="*")
    count.set_defaults(fn=params)
    to_records = commands.add_parser("convert", help="convert text files/folders or JSONL to one ArrayRecord file")
    to_records.add_argument("inputs", nargs="+", help="text files, folders of .txt files, or .jsonl files")
    to_records.add_argument("--out", required=True, help="the .arecord file to write")
    to_records.add_argument("--text-field", default="text", help="JSONL field holding the document text")
    to_records.set_defaults(fn=convert)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, CheckpointError, LogPathError, FileNotFoundError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
