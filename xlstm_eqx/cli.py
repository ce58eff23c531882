"""Command line: ``xlstm-eqx train`` (the main job; one process of a multi-process run with the distributed
flags), ``launch`` (N local processes of one run), ``params``, ``convert`` and ``tokenizer``. Thin by design:
parse, wire, call."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import jax

from .config import ConfigError, load_config
from .data.sources import convert_to_array_record
from .data.tokenizer import add_train_arguments, train_command
from .host_memory import configure_host_memory, huge_page_advice
from .io.checkpoint import CheckpointError
from .loop.logger import LogPathError
from .models import count_params
from .parallel.distributed import DistributedError, initialize, resolve


def train(args: argparse.Namespace) -> int:
    from .loop.job import train_job

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("xlstm_eqx").setLevel(logging.INFO)
    configure_host_memory()  # $XLSTM_EQX_HOST_MEMORY=release opts out
    distributed = resolve(
        coordinator_address=args.coordinator_address, num_processes=args.num_processes, process_id=args.process_id,
        initialization_timeout_s=args.initialization_timeout, heartbeat_timeout_s=args.heartbeat_timeout,
        shutdown_timeout_s=args.shutdown_timeout,
    )  # fmt: skip
    config = load_config(args.config, args.overrides)  # before joining: a bad config fails every rank alike
    initialize(distributed)
    advice = huge_page_advice(jax.default_backend())  # after joining: the backend starts here
    if advice:
        logging.getLogger("xlstm_eqx").info(advice)
    summary = train_job(config, sample_prompt=args.prompt, sample_tokens=args.sample_tokens)
    sample = summary.pop("sample", None)
    if sample is not None:
        print(f"--- sample ({args.sample_tokens} tokens after {args.prompt!r}) ---\n{sample}\n---")
    print(json.dumps(summary))
    return 0 if summary["status"] == "success" else 1


def launch(args: argparse.Namespace) -> int:
    from .parallel.launch import launch_local

    rest = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not rest:
        raise ValueError("launch needs a command, e.g. xlstm-eqx launch --processes 2 -- xlstm-eqx train --config ...")
    result = launch_local(rest, args.processes, cpu_devices=args.cpu_devices, timeout_s=args.timeout,
                          log_dir=args.log_dir)  # fmt: skip
    print(f"launch: {result.reason}; exit codes {result.returncodes}", file=sys.stderr)
    return 0 if result.ok else 1


def _distributed_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-process run (else XLSTM_EQX_* variables, else SLURM, else one process)")
    group.add_argument("--coordinator-address", help="HOST:PORT where process 0 listens (the same on every process)")
    group.add_argument("--num-processes", type=int, help="processes in the run")
    group.add_argument("--process-id", type=int, help="this process's id, 0 … num-processes − 1")
    group.add_argument("--initialization-timeout", type=int, help="seconds to wait for all processes (default 120)")
    group.add_argument("--heartbeat-timeout", type=int, help="seconds until a silent process fails the run (30)")
    group.add_argument("--shutdown-timeout", type=int, help="seconds the processes wait for each other at exit (60)")


def params(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.table:  # shapes only: nothing is allocated, and the mesh needs no devices
        import equinox as eqx

        from .models import build
        from .train.param_table import abstract_mesh, format_param_table, param_rows

        shapes = eqx.filter(eqx.filter_eval_shape(build, config.model, key=jax.random.key(0)),
                            lambda x: isinstance(x, jax.ShapeDtypeStruct))  # fmt: skip
        rows = param_rows(shapes, abstract_mesh(config.mesh), fsdp_min_weight_size=config.mesh.fsdp_min_weight_size,
                          optim=config.optim)  # fmt: skip
        print(format_param_table(rows))
        return 0
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
    _distributed_flags(fit)
    fit.set_defaults(fn=train)
    local = commands.add_parser("launch", help="run a command (xlstm-eqx train …, lm_eval …) as N local processes")
    local.add_argument("--processes", type=int, required=True, help="number of local processes")
    local.add_argument("--cpu-devices", type=int, help="fake CPU devices per process (CPU only; default: JAX's)")
    local.add_argument("--timeout", type=float, help="stop all processes after this many seconds")
    local.add_argument("--log-dir", help="write rank<i>.log per process here (default: all to this terminal)")
    local.add_argument("command", nargs=argparse.REMAINDER, help="the command, e.g. -- xlstm-eqx train --config ...")
    local.set_defaults(fn=launch)
    count = commands.add_parser("params", help="print the parameter count (or table) of a config")
    count.add_argument("--config", required=True)
    count.add_argument("--table", action="store_true", help="every parameter: shape, dtype, sharding, weight decay")
    count.add_argument("overrides", nargs="*")
    count.set_defaults(fn=params)
    to_records = commands.add_parser("convert", help="convert text files/folders or JSONL to one ArrayRecord file")
    to_records.add_argument("inputs", nargs="+", help="text files, folders of .txt files, or .jsonl files")
    to_records.add_argument("--out", required=True, help="the .arecord file to write")
    to_records.add_argument("--text-field", default="text", help="JSONL field holding the document text")
    to_records.set_defaults(fn=convert)
    tokenizer = commands.add_parser("tokenizer", help="train a byte-level BPE tokenizer on text and save it as JSON")
    add_train_arguments(tokenizer)
    tokenizer.set_defaults(fn=train_command)
    args = parser.parse_args(argv)
    try:
        return _exit(args.fn(args))
    except (ConfigError, CheckpointError, LogPathError, DistributedError, FileNotFoundError, KeyError,
            ValueError) as error:  # fmt: skip
        print(f"error: {error}", file=sys.stderr)
        return _exit(2)
    except BaseException:
        if not jax.distributed.is_initialized():
            raise
        logging.getLogger("xlstm_eqx").exception("process %d of the run failed", jax.process_index())
        return _exit(1)


def _exit(code: int) -> int:
    """A failed process of a multi-process run leaves at once: JAX's exit handler would wait up to the shutdown
    timeout for peers that may be blocked in a collective with it. The others notice within the heartbeat timeout."""
    if code != 0 and jax.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
