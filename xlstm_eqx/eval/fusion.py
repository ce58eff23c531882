"""Fusing per-row (per-window or per-chunk) partial results back into one result per document.

Evaluation splits a long document over several rows (fixed windows) or chunks (recurrent path); each row
contributes a partial log-likelihood and partial correct/target counts, tagged with its ``document_index``
(1-based; 0 marks padding rows). The host concatenates those per-example metrics across batches
(``single_noreduce[_wcount]``), and :func:`fuse_document_results` sums them per document.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def _pair(results: Mapping[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
    if key not in results:
        raise KeyError(f"fuse_document_results needs {key!r} (values, counts); got keys {sorted(results)}")
    values, counts = results[key]
    return np.asarray(values, np.float64).ravel(), np.asarray(counts, np.float64).ravel()


def fuse_document_results(
    results: Mapping[str, Any],
    *,
    documents: str = "document_idx_single_noreduce",
    loglikelihood: str = "loglikelihood_single_noreduce_wcount",
    accuracies: str = "accuracies_single_noreduce_wcount",
) -> list[tuple[float, bool]]:
    """(Σ log-likelihood, greedy) per document, in ascending document order.

    ``results`` holds the concatenated host metrics: per-row document indices, per-row log-likelihood sums with
    their target counts, and per-row correct counts with their target counts. Padding rows (index 0) are
    skipped. A document is greedy when every one of its scored tokens was the argmax (Σ correct == Σ targets).
    Raises ValueError when the arrays disagree in length, when the two target counts of a row differ, or when
    document indices are missing between 1 and the largest (a lost row would silently shift every later result).
    """
    index = np.asarray(results[documents]).ravel().astype(np.int64) if documents in results else None
    if index is None:
        raise KeyError(f"fuse_document_results needs {documents!r}; got keys {sorted(results)}")
    ll, ll_counts = _pair(results, loglikelihood)
    correct, targets = _pair(results, accuracies)
    if not len(index) == len(ll) == len(correct):
        raise ValueError(f"row counts differ: {len(index)} document indices, {len(ll)} log-likelihoods, "
                         f"{len(correct)} accuracies")  # fmt: skip
    if not np.array_equal(ll_counts, targets):
        row = int(np.flatnonzero(ll_counts != targets)[0])
        raise ValueError(
            f"row {row}: {ll_counts[row]:g} targets in the log-likelihood, {targets[row]:g} in the accuracies"
        )
    real = index > 0
    if not np.any(real):
        return []
    documents_seen = np.unique(index[real])
    expected = np.arange(1, documents_seen[-1] + 1)
    if len(documents_seen) != len(expected):
        missing = np.setdiff1d(expected, documents_seen)[:10].tolist()
        raise ValueError(f"documents missing from the results (first ones: {missing}); a row was lost")
    size = int(documents_seen[-1]) + 1
    total_ll = np.bincount(index[real], weights=ll[real], minlength=size)[1:]
    total_correct = np.bincount(index[real], weights=correct[real], minlength=size)[1:]
    total_targets = np.bincount(index[real], weights=targets[real], minlength=size)[1:]
    return [(float(v), bool(c == t)) for v, c, t in zip(total_ll, total_correct, total_targets)]
