"""Running the LM Evaluation Harness from an :class:`~xlstm_eqx.config.lm_eval.LMEvalConfig`: the adapter built
from a model, a trained state or a checkpoint; results flattened to ``lmeval_<task>_<metric>``; per-sample
outputs saved with lm-eval's own ``EvaluationTracker``; a hook that runs it during training.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import equinox as eqx
import jax
from jax.sharding import Mesh

from ..config import MeshConfig, from_dict
from ..config.lm_eval import LMEvalConfig
from ..data.tokenizer import DEFAULT_TOKENIZER, Tokenizer
from ..loop.events import Event, Hook, Log, on
from ..loop.restore import load_from_checkpoint
from ..parallel import make_mesh
from .lm_adapter import XlstmEqxLM
from .request_cache import request_cache
from .scoring import ScoringSettings
from .tasks import bundled_task_dir, check_task_names

LOGGER = logging.getLogger(__name__)
# lm-eval bootstraps stderrs in a fork()ed multiprocessing pool unless this is set; forking a process that runs
# JAX's threads can deadlock, so the resampling runs in-process.
NO_FORK = {"DISABLE_MULTIPROC": "1"}


@dataclasses.dataclass(frozen=True)
class LMEvalResult:
    """``metrics``: ``lmeval_<task>_<metric>`` floats (NaN where lm-eval says N/A), including
    ``lmeval_<task>_token_perplexity`` for rolling-log-likelihood tasks; ``results``: lm-eval's results section;
    ``output_dir``: where ``write_out`` saved results and per-sample outputs (else None)."""

    metrics: dict[str, float]
    results: dict[str, Any]
    output_dir: Path | None = None


def load_tokenizer(config: LMEvalConfig, run_tokenizer: str | None = None) -> Tokenizer:
    """``config.tokenizer_path``, else the run's tokenizer file, else the shipped Shakespeare BPE."""
    path = config.tokenizer_path or run_tokenizer or DEFAULT_TOKENIZER
    if not Path(path).is_file():
        field = "lm_eval.tokenizer_path" if config.tokenizer_path else "data.tokenizer (lm_eval.tokenizer_path unset)"
        raise FileNotFoundError(f"{field}: no tokenizer file at {path}")
    return Tokenizer.load(path)


def build_lm(
    model: Any,
    tokenizer: Tokenizer,
    config: LMEvalConfig,
    *,
    context_length: int,
    batch_size: int,
    mesh: Mesh | None = None,
    fsdp_min_weight_size: int = 2**18,
) -> XlstmEqxLM:
    """The adapter for ``model``; ``context_length`` / ``batch_size`` apply where ``config`` leaves them None."""
    settings = ScoringSettings(
        window=config.context_length or context_length,
        chunk_size=config.infinite_eval_chunksize,
        batch_size=config.batch_size or batch_size,
        worker_count=config.worker_count,
        worker_buffer_size=config.worker_buffer_size,
        debug=config.debug,
    )
    template = config.apply_chat_template if isinstance(config.apply_chat_template, str) else None
    return XlstmEqxLM(
        model, tokenizer, settings, mesh=mesh, fsdp_min_weight_size=fsdp_min_weight_size,
        use_infinite_eval=config.use_infinite_eval, max_gen_toks=config.max_gen_toks, seed=config.seed,
        chat_template=template, tokenizer_name=str(config.tokenizer_path or "xlstm_eqx"),
    )  # fmt: skip


def task_dir(config: LMEvalConfig) -> Path:
    """``include_path``, default the bundled tasks; a clear error when it is not a directory."""
    include = Path(config.include_path) if config.include_path else bundled_task_dir()
    if not include.is_dir():
        raise FileNotFoundError(f"lm_eval.include_path: {include} is not a directory of task YAML files")
    return include


def task_manager(config: LMEvalConfig) -> Any:
    """lm-eval's TaskManager over ``include_path`` (default: the bundled tasks) [+ its built-in tasks]."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir(config)), include_defaults=config.include_defaults)


def metric_key(task: str, key: str) -> str:
    """``lmeval_<task>_<metric>`` for lm-eval's ``"<metric>,<filter>"`` (the filter is kept unless ``none``)."""
    metric, _, filter_name = key.partition(",")
    return f"lmeval_{task}_{metric}" + (f"_{filter_name}" if filter_name and filter_name != "none" else "")


def flatten_results(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """lm-eval's ``results`` section as ``lmeval_<task>_<metric>`` floats (N/A → NaN, aliases and samples
    counts dropped)."""
    out = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if key == "alias" or key == "samples":
                continue
            number = math.nan if value in ("N/A", None) else value
            if isinstance(number, int | float):
                out[metric_key(task, key)] = float(number)
    return out


def run_lm_eval(lm: XlstmEqxLM, config: LMEvalConfig, *, output_dir: str | Path | None = None) -> LMEvalResult:
    """lm-eval's ``simple_evaluate`` on ``config.evaluation_tasks`` with every setting of ``config``.

    Unknown task names fail before anything runs (with the close matches). With ``write_out``, results and
    per-sample outputs are saved under ``output_dir`` (required then). With ``cache_requests``, the built requests
    are cached under a key of the task files, seed, few-shot count, system instruction and chat template
    (:mod:`.request_cache`), so a change to any of them builds them afresh.
    """
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import make_table

    if not config.evaluation_tasks:
        raise ValueError("lm_eval.evaluation_tasks is empty: name at least one task or group")
    if config.write_out and output_dir is None:
        raise ValueError("lm_eval.write_out needs an output directory for the per-sample outputs")
    manager = task_manager(config)
    check_task_names(config.evaluation_tasks, manager)
    lm.token_loglikelihoods.clear()
    template = lm.chat_template(config.apply_chat_template)  # lm-eval asks for it only after evaluating
    with mock.patch.dict(os.environ, NO_FORK), request_cache(config, task_dir(config), template):
        evaluated = lm_eval.simple_evaluate(
            model=lm, tasks=list(config.evaluation_tasks), task_manager=manager, num_fewshot=config.num_fewshot,
            limit=config.limit_requests, cache_requests=config.cache_requests, write_out=config.write_out,
            log_samples=config.write_out, system_instruction=config.system_instruction,
            apply_chat_template=config.apply_chat_template, bootstrap_iters=config.bootstrap_iters,
            random_seed=config.seed, numpy_random_seed=config.seed, fewshot_random_seed=config.seed,
        )  # fmt: skip
    results = {task: dict(values) for task, values in evaluated["results"].items()}
    main = jax.process_index() == 0  # every process ran the same requests; process 0 reports and writes
    if main:
        LOGGER.info("lm-eval results:\n%s", make_table(evaluated))
    metrics = flatten_results(results)
    for task, (total, tokens) in lm.token_loglikelihoods.items():
        if tokens and task in results:
            metrics[f"lmeval_{task}_token_perplexity"] = math.exp(-total / tokens)
    saved = Path(output_dir) if config.write_out else None
    if saved is not None and main:
        tracker = EvaluationTracker(output_path=str(saved / "results.json"))
        samples = evaluated.pop("samples")
        tracker.save_results_aggregated(results=evaluated, samples=samples)
        for task in evaluated["configs"]:
            tracker.save_results_samples(task_name=task, samples=samples[task])
    return LMEvalResult(metrics, results, saved)


def lm_eval_hook(
    config: LMEvalConfig,
    static: Any,
    tokenizer: Tokenizer,
    *,
    context_length: int,
    batch_size: int,
    mesh: Mesh | None = None,
    fsdp_min_weight_size: int = 2**18,
    output_dir: str | Path | None = None,
) -> Hook:
    """A hook running lm-eval on the evaluated state at test ends (``at_test``; the tested checkpoint) and
    validation ends (``at_validation``), logging ``lmeval_*`` in that evaluation's row. The adapter (and its
    compiled steps) is built once; later events swap in their parameters."""
    kinds = ("test_end",) * config.at_test + ("val_end",) * config.at_validation
    built: list[XlstmEqxLM] = []

    def hook(event: Event) -> list[Log]:
        if not built:
            model = eqx.combine(event.state.params, static)
            built.append(build_lm(model, tokenizer, config, context_length=context_length, batch_size=batch_size,
                                  mesh=mesh, fsdp_min_weight_size=fsdp_min_weight_size))  # fmt: skip
        lm = built[0]
        lm.set_params(event.state.params)
        step = event.metrics.get("checkpoint_step", event.step)  # a test runs on the checkpoint it names
        where = None if output_dir is None else Path(output_dir) / f"{event.kind.split('_')[0]}_step{step}"
        return [Log(run_lm_eval(lm, config, output_dir=where).metrics)]

    return on(kinds, hook)


def lm_from_checkpoint(
    checkpoint: str | Path,
    step: int | str = "latest",
    tokenizer: str | None = None,
    data: int | None = None,
    fsdp: int = 1,
    **fields: Any,
) -> XlstmEqxLM:
    """The adapter for a saved model: ``checkpoint`` is a run directory (or its ``checkpoints`` folder), ``step``
    ``latest`` / ``best`` / a number; evaluated on a ``data`` × ``fsdp`` mesh (default: one device, or all
    devices of a multi-process run, where every process runs the same tasks and process 0 writes the results).
    ``fields`` are :class:`LMEvalConfig` settings (e.g. ``batch_size``, ``use_infinite_eval``); the run's own
    sequence length, evaluation batch size and tokenizer fill in the rest."""
    config = from_dict(LMEvalConfig, {**fields, **({"tokenizer_path": tokenizer} if tokenizer else {})})
    if data is None:
        data = -1 if jax.process_count() > 1 else 1
    loaded = load_from_checkpoint(checkpoint, step, mesh=MeshConfig(data=int(data), fsdp=int(fsdp)))
    run = loaded.config
    tokenizer = load_tokenizer(config, run.data.tokenizer)
    check_tokenizer_matches(tokenizer, loaded.meta.get("tokenizer"), checkpoint)
    mesh = make_mesh(run.mesh)
    return build_lm(
        loaded.model, tokenizer, config, context_length=run.data.seq_len,
        batch_size=_default_batch_size(run.data.eval_batch_size or run.data.global_batch_size,
                                       mesh.shape["data"] * mesh.shape["fsdp"]),  # fmt: skip
        mesh=mesh, fsdp_min_weight_size=run.mesh.fsdp_min_weight_size,
    )  # fmt: skip


def check_tokenizer_matches(tokenizer: Tokenizer, trained_with: Mapping[str, Any] | None, where: Any) -> None:
    """ValueError when ``tokenizer``'s token → id table is not the one the checkpoint was trained with (its meta
    records it; checkpoints without that record are checked only for the vocabulary size, by the adapter)."""
    if trained_with and trained_with.get("fingerprint") not in (None, tokenizer.fingerprint):
        raise ValueError(
            f"tokenizer {tokenizer.path} ({tokenizer.vocab_size} tokens) does not match the vocabulary the checkpoint "
            f"in {where} was trained with ({trained_with.get('path')}, {trained_with.get('vocab_size')} tokens); "
            "pass that tokenizer (lm_eval.tokenizer_path / tokenizer=...)"
        )


def _default_batch_size(run_batch_size: int, parallel: int) -> int:
    """The run's evaluation batch size rounded up to a multiple of the mesh's data × fsdp."""
    return parallel * math.ceil(run_batch_size / parallel)
