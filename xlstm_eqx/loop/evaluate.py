"""Evaluation over one or several evaluation sets with the pure ``eval_step``."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sized
from typing import Any

from tqdm.auto import tqdm

from ..data.batch import Batch, IndexedBatch
from ..train.metrics_host import add_perplexity, to_host

EvalSet = Iterable[Batch | IndexedBatch] | Callable[[], Iterable[Batch | IndexedBatch]]
EvalSets = EvalSet | Mapping[str, EvalSet]


def fresh_pass(data: EvalSet) -> Iterable[Batch | IndexedBatch]:
    """One full pass: a zero-argument callable is called for a new iterator; a re-iterable (list) is iterated."""
    return data() if callable(data) else iter(data)


def evaluate(
    eval_step: Callable[..., Any], state: Any, data: EvalSets, *, progress_bar: bool = False, desc: str = "eval"
) -> dict[str, Any]:
    """Host metrics of ``state`` on ``data``: loss, accuracy, perplexity and ``epoch_time`` (seconds).

    A mapping of sets gives each set fresh metrics and prefixes its keys with ``<name>_`` (``shakespeare_loss``).
    A set that yields no batches is left out with a warning. ``progress_bar`` shows each set's pass as a
    transient tqdm bar labelled ``desc`` and the set's name (its length where the set has one).
    """
    start = time.perf_counter()
    named = data.items() if isinstance(data, Mapping) else [("", data)]
    out: dict[str, Any] = {}
    for name, one in named:
        metrics = None
        total = len(one) if progress_bar and isinstance(one, Sized) else None
        label = f"{desc} {name}".strip()
        for batch in tqdm(fresh_pass(one), desc=label, total=total, leave=False, disable=not progress_bar):
            metrics = eval_step(state, batch.batch if isinstance(batch, IndexedBatch) else batch, metrics)
        if metrics is None:
            warnings.warn(f"evaluation set {name or '(unnamed)'!r} yielded no batches", RuntimeWarning, stacklevel=2)
            continue
        prefix = f"{name}_" if name else ""
        out.update({prefix + key: value for key, value in add_perplexity(to_host(metrics)).items()})
    out["epoch_time"] = time.perf_counter() - start
    return out
