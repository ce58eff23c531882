"""Requests as rows, rows as padded batches: the host side of LM-evaluation scoring.

A request is a token sequence ``all = context + continuation`` of which the continuation (every token from
``first_target`` on) is scored. It becomes one or more :class:`Row` s, each holding ``tokens`` (inputs
``tokens[:-1]``, targets ``tokens[1:]``) whose last ``n_scored`` targets are scored, tagged with the request's
``document`` number (1-based; 0 marks a padding row) and the row's ``piece`` number within it. Per-row results
are summed back per document by :func:`xlstm_eqx.eval.fusion.fuse_document_results`.

- :func:`window_rows` (fixed windows): disjoint runs of at most ``window`` scored targets, each preceded by as
  much context as the window holds; context tokens are never scored.
- :func:`whole_row` (recurrent path): the whole sequence in one row of any length, for the chunked recurrent
  evaluation step, so every token is conditioned on everything before it.

:class:`RowBatches` is a random-access source of padded batches (longest rows first, so padding is small),
which grain can read with worker processes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Row:
    """``tokens`` (length ≥ 2) of which the last ``n_scored`` targets count, from request ``document``."""

    tokens: tuple[int, ...]
    n_scored: int
    document: int
    piece: int = 0


def _check(all_tokens: Sequence[int], first_target: int, document: int) -> None:
    if not 1 <= first_target < len(all_tokens):
        what = "empty continuation (nothing to score)" if first_target >= len(all_tokens) else "empty context"
        raise ValueError(f"request {document - 1}: {what}; a request needs ≥ 1 context and ≥ 1 continuation token")


def window_rows(all_tokens: Sequence[int], first_target: int, window: int, document: int) -> list[Row]:
    """Rows of at most ``window`` inputs scoring the targets ``all_tokens[first_target:]`` exactly once.

    Targets are cut into consecutive runs of ``window``; the row of run ``[a, b)`` holds the ``window + 1``
    tokens ending at ``b`` (fewer at the start), so its first scored target still sees ``window - (b - a)``
    tokens of preceding context. One row when the request fits: its oldest context is dropped.
    """
    _check(all_tokens, first_target, document)
    if window < 1:
        raise ValueError(f"window must be ≥ 1, got {window}")
    rows = []
    for piece, a in enumerate(range(first_target, len(all_tokens), window)):
        b = min(a + window, len(all_tokens))
        start = max(0, b - 1 - window)
        rows.append(Row(tuple(all_tokens[start:b]), b - a, document, piece))
    return rows


def whole_row(all_tokens: Sequence[int], first_target: int, document: int) -> Row:
    """The whole request as one row (for the recurrent path: no length limit)."""
    _check(all_tokens, first_target, document)
    return Row(tuple(all_tokens), len(all_tokens) - first_target, document)


def power_of_two_length(length: int, limit: int) -> int:
    """Padded length of the fixed path: the next power of two (≥ 16) capped at ``limit``: few shapes to compile."""
    return min(max(16, 1 << (length - 1).bit_length()), limit)


def multiple_length(length: int, multiple: int) -> int:
    """Padded length of the recurrent path: a multiple of the chunk size (one compiled chunk shape)."""
    return multiple * math.ceil(length / multiple)


class RowBatches:
    """Padded batches of ``batch_size`` rows, longest rows first; ``self[i]`` is a dict of numpy arrays with the
    fields of an :class:`~xlstm_eqx.data.IndexedBatch` (``inputs``, ``targets``, ``loss_mask``, ``segment_ids``,
    ``positions`` (batch, T); ``document_index``, ``sequence_index`` (batch,)). ``pad_length(longest)`` gives
    each batch's T. A plain picklable object: grain worker processes can read it."""

    def __init__(self, rows: Sequence[Row], batch_size: int, pad_length: str, limit: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if pad_length not in ("power_of_two", "multiple"):
            raise ValueError(f"pad_length must be 'power_of_two' or 'multiple', got {pad_length!r}")
        self.rows = sorted(rows, key=lambda row: -len(row.tokens))
        self.batch_size, self.pad_length, self.limit = batch_size, pad_length, limit

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rows = self.rows[index * self.batch_size : (index + 1) * self.batch_size]
        longest = len(rows[0].tokens) - 1
        if self.pad_length == "power_of_two":
            length = power_of_two_length(longest, self.limit)
        else:
            length = multiple_length(longest, self.limit)
        shape = (self.batch_size, length)
        out = {name: np.zeros(shape, np.int32) for name in ("inputs", "targets", "segment_ids", "positions")}
        out["loss_mask"] = np.zeros(shape, bool)
        out["document_index"] = np.zeros(self.batch_size, np.int32)
        out["sequence_index"] = np.zeros(self.batch_size, np.int32)
        for r, row in enumerate(rows):
            t = len(row.tokens) - 1
            out["inputs"][r, :t], out["targets"][r, :t] = row.tokens[:-1], row.tokens[1:]
            out["loss_mask"][r, t - row.n_scored : t] = True
            out["segment_ids"][r, :t] = 1
            out["positions"][r, :t] = np.arange(t)
            out["document_index"][r], out["sequence_index"][r] = row.document, row.piece
        return out
