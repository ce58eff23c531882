"""Command line: ``xlstm-eqx train`` (the main job), ``params`` and ``convert``. Thin by design: parse, wire, call."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .config import ConfigError, load_config
from .data.sources import convert_to_array_record
from .io.checkpoint import CheckpointError
from .loop.logger import LogPathError
from .models import count_params


def train(args: argparse.Namespace) -> int:
    from .loop.job import train_job

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("xlstm_eqx").setLevel(logging.INFO)
    config = load_config(args.config, args.overrides)
    summary = train_job(config, sample_prompt=args.prompt, sample_tokens=args.sample_tokens)
    sample = summary.pop("sample", None)
    if sample is not None:
        print(f"--- sample ({args.sample_tokens} tokens after {args.prompt!r}) ---\n{sample}\n---")
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
