"""The data of a run, built from its config: the training stream, validation/test sets, and the epoch length."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from ..config.parsing import ConfigError
from ..config.run import DataSection, split_set_name
from ..data.corpus import default_corpus
from ..data.loader import BatchIterator, eval_batches, eval_num_batches, train_batches
from ..data.pipeline import DataConfig, train_dataset
from ..data.sources import open_documents
from ..data.tokenizer import Tokenizer
from ..parallel.distributed import allgather_json
from ..parallel.mesh import batch_parallel_size
from ..parallel.sharding import batch_spec


@dataclasses.dataclass(frozen=True)
class RunData:
    """``train``: the endless, resumable training stream of global batches; ``validation`` / ``test``: zero-argument
    callables returning a fresh pass (None when the split is absent), and for named validation sets a mapping
    name → such a callable; ``steps_per_epoch``: batches in one pass over the training data;
    ``train_token_counts``: token frequencies of that pass (for baselines)."""

    train: BatchIterator
    validation: Callable[[], Iterable[Any]] | dict[str, Callable[[], Iterable[Any]]] | None
    test: Callable[[], Iterable[Any]] | None
    steps_per_epoch: int
    train_token_counts: Counter


def split_paths(section: DataSection) -> tuple[list, list, list]:
    if section.corpus == "shakespeare":
        return default_corpus("train"), default_corpus("validation"), default_corpus("test")
    validation = [split_set_name(entry)[1] for entry in section.validation_files]
    return list(section.train_files), validation, list(section.test_files)


def _data_config(section: DataSection, rows: int, **changes: Any) -> DataConfig:
    return DataConfig(
        seq_len=section.seq_len,
        global_batch_size=rows,
        mode=section.mode,
        shuffle=section.shuffle,
        seed=section.seed,
        worker_count=section.worker_count,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        **changes,
    )


def build_run_data(section: DataSection, tokenizer: Tokenizer, mesh: Mesh) -> RunData:
    """Opens the splits, counts one training epoch (batches and token frequencies) and builds the iterators.
    Batches are global arrays sharded over the mesh's batch axes."""
    train_paths, val_paths, test_paths = split_paths(section)
    shards = batch_parallel_size(mesh)
    for name in ("global_batch_size", "eval_batch_size"):  # every process loads its own equal share of rows
        rows = getattr(section, name)
        if rows is not None and rows % jax.process_count():
            raise ConfigError(f"data.{name}", f"{rows} rows do not split over {jax.process_count()} processes")
        if rows is not None and rows % shards:
            raise ConfigError(f"data.{name}", f"{rows} rows do not split over the mesh's data × fsdp = {shards} shards")
    sharding = NamedSharding(mesh, batch_spec(2, mesh))
    train_source = open_documents(train_paths)
    one_pass = train_dataset(train_source, tokenizer, _data_config(section, section.global_batch_size, num_epochs=1))
    batches, counts = 0, Counter()
    for element in one_pass:
        batches += 1
        counts.update(element["targets"][element["loss_mask"]].tolist())
    # Each process counted its own slice of the epoch: the epoch is as long as the busiest slice.
    per_process = allgather_json([batches, counts])  # (JSON turns the token keys into strings)
    batches = max(found for found, _ in per_process)
    counts = sum((Counter({int(t): c for t, c in found.items()}) for _, found in per_process), Counter())
    if batches == 0:
        raise ValueError(f"the training data {train_paths} yields no batches")
    train = train_batches(train_source, tokenizer, _data_config(section, section.global_batch_size), sharding=sharding)
    eval_config = _data_config(section, section.eval_batch_size or section.global_batch_size)

    def eval_set(paths: list) -> Callable[[], Iterable[Any]] | None:
        if not paths:
            return None
        source = open_documents(paths)
        # every process must run the same number of (collective) eval steps, padding when its slice is shorter
        count = eval_num_batches(source, tokenizer, eval_config) if jax.process_count() > 1 else None
        return lambda: itertools.islice(
            eval_batches(source, tokenizer, eval_config, sharding=sharding, num_batches=count), section.val_max_batches
        )

    named = named_validation_sets(section)
    validation = {name: eval_set(paths) for name, paths in named.items()} if named else eval_set(val_paths)
    return RunData(train, validation, eval_set(test_paths), batches, counts)


def named_validation_sets(section: DataSection) -> dict[str, list[str]]:
    """``validation_files`` entries written ``NAME=PATH`` grouped by name (in order of first appearance): each
    name is its own validation set, logged as ``<name>_loss`` etc. Empty when the entries carry no names."""
    named: dict[str, list[str]] = {}
    for entry in section.validation_files:
        name, path = split_set_name(entry)
        if name is not None:
            named.setdefault(name, []).append(path)
    return named


def unigram_perplexity(train_counts: Counter, batches: Iterable[Any], vocab_size: int) -> float:
    """Perplexity on ``batches`` of the add-one-smoothed unigram model of ``train_counts``: the baseline a
    language model must clearly beat."""
    total = sum(train_counts.values())
    log_prob = np.full(vocab_size, math.log(1.0 / (total + vocab_size)))
    for token, count in train_counts.items():
        log_prob[token] = math.log((count + 1) / (total + vocab_size))
    scored, nll = 0, 0.0
    for batch in batches:
        inner = getattr(batch, "batch", batch)
        # the whole global batch on every process (a multi-process batch is not addressable as a whole)
        targets, mask = (np.asarray(multihost_utils.process_allgather(x, tiled=True))
                         for x in (inner.targets, inner.loss_mask))  # fmt: skip
        targets = targets[mask]
        nll -= float(log_prob[targets].sum())
        scored += targets.size
    return math.exp(nll / max(scored, 1))
