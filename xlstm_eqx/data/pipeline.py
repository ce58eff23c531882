"""grain pipelines from documents to batches of numpy rows: training (packed) and evaluation (one piece per row).

:mod:`.loader` turns them into :class:`Batch` / :class:`IndexedBatch` iterators.

Layout of a document with tokens ``t1 … tn`` (EOD token ``E``): the sequence ``E t1 … tn E`` gives the
``n + 1`` (input, target) pairs ``(E, t1), (t1, t2), …, (tn, E)``: the leading EOD plays the BOS role (so the
first token is scored) and the trailing EOD is scored as the document's end. Nothing ever predicts across
documents. A document with more than ``L`` pairs is split into pieces of ``L`` pairs (the last may be shorter);
piece ``k`` starts where piece ``k - 1`` stopped, so every target is scored exactly once and nothing is truncated.
``positions`` are real positions in the document (piece ``k`` starts at ``k * L``). Empty documents are skipped.

Training rows (``mode="pack"``, the default) hold whole pieces placed first-fit into ``L``-slot rows (a piece
never straddles rows); ``mode="concat"`` concatenates pieces and cuts rows at exactly ``L`` (no padding except at
the very end of finite data; a cut piece continues at the start of the next row). ``segment_ids`` number the pieces
in a row from 1 (0 = padding), ``loss_mask`` is True exactly on real targets. This equals the reference packing
example: documents [1,2,3], [4,5] in 8 slots give inputs ``E 1 2 3 E 4 5 0``, targets ``1 2 3 E 4 5 E 0``, segment
ids ``1 1 1 1 2 2 2 0``, positions ``0 1 2 3 0 1 2 0``.

Training order: source → per-epoch shuffle (a fresh permutation each epoch, seeded) → repeat → this process's
slice ``[process_index::process_count]`` of that one global document stream → tokenise → split → pack → rows →
batch of ``global / process_count`` rows (a final partial batch is padded with all-masked rows) → optional
``mp_prefetch`` workers. Slicing after the shuffle makes the processes' documents at each step the same ones one
process would read: with documents that fill one row each, the union of the local batches is the
single-process global batch. Evaluation slices the documents in corpus order (document ``i`` to process
``i % process_count``). The iterator state (``get_state()``) is a JSON-able dict; ``set_state`` resumes exactly,
with workers too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import grain
import numpy as np

ROW_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
INDEX_KEYS = ("document_index", "sequence_index")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``seq_len`` L (inputs per row), ``global_batch_size`` rows over all processes, ``mode`` "pack" | "concat",
    ``num_epochs`` None = infinite, ``worker_count`` 0 = inline (else grain ``mp_prefetch`` workers)."""

    seq_len: int
    global_batch_size: int
    mode: Literal["pack", "concat"] = "pack"
    shuffle: bool = True
    seed: int = 42
    num_epochs: int | None = None
    worker_count: int = 0
    worker_buffer_size: int = 1
    process_index: int = 0
    process_count: int = 1
    num_packing_bins: int | None = None  # default: the local batch size
    read_threads: int = 1
    read_ahead: int = 16  # documents tokenised ahead of the packer

    def __post_init__(self):
        if self.seq_len < 1 or self.global_batch_size < 1:
            raise ValueError(f"seq_len and global_batch_size must be ≥ 1, got {self.seq_len}, {self.global_batch_size}")
        if self.mode not in ("pack", "concat"):
            raise ValueError(f"mode must be 'pack' or 'concat', got {self.mode!r}")
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} outside [0, {self.process_count})")
        if self.global_batch_size % self.process_count:
            raise ValueError(f"global_batch_size {self.global_batch_size} not divisible by process_count")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be ≥ 1 or None (infinite), got {self.num_epochs}")
        if self.read_threads < 1 or self.read_ahead < 1:
            raise ValueError(f"read_threads and read_ahead must be ≥ 1, got {self.read_threads}, {self.read_ahead}")
        if self.worker_count < 0 or self.worker_buffer_size < 1:
            raise ValueError(f"bad worker settings: {self.worker_count} workers, buffer {self.worker_buffer_size}")

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.process_count


class _Tokenize:
    """Document (str, UTF-8 bytes or a token array) → int32 tokens. Module level so spawned workers can unpickle."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, doc: Any) -> np.ndarray:
        if isinstance(doc, bytes):
            doc = doc.decode("utf-8")
        if isinstance(doc, str):
            if self.tokenizer is None:
                raise TypeError("text documents need a tokenizer")
            return np.asarray(self.tokenizer.encode_batch([doc])[0], np.int32).reshape(-1)
        tokens = np.asarray(doc)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"a document must be text or a 1-D integer array, got {tokens.dtype}{tokens.shape}")
        return tokens.astype(np.int32)


class _TokenizeIndexed(_Tokenize):
    def __call__(self, item: tuple[int, Any]) -> dict[str, Any]:
        index, doc = item
        return {"tokens": super().__call__(doc), "document_index": np.int32(index + 1)}


def _with_index(index: Any, doc: Any) -> tuple[int, Any]:
    return index, doc


class _SplitDocument(grain.experimental.FlatMapTransform):
    """Tokens → pieces of at most L (input, target) pairs with real positions (see the module docstring)."""

    max_fan_out = 1 << 30  # unused by FlatMapIterDataset; long documents are split however long they are

    def __init__(self, seq_len: int, eod_id: int):
        self.seq_len, self.eod_id = seq_len, eod_id

    def flat_map(self, element: Any) -> list[dict[str, Any]]:
        meta = element if isinstance(element, dict) else {}
        tokens = element["tokens"] if isinstance(element, dict) else element
        if len(tokens) == 0:
            return []
        eod = np.full(1, self.eod_id, np.int32)
        full = np.concatenate([eod, tokens, eod])
        pieces = []
        for k, start in enumerate(range(0, len(full) - 1, self.seq_len)):
            stop = min(start + self.seq_len, len(full) - 1)
            piece = {
                "inputs": full[start:stop],
                "targets": full[start + 1 : stop + 1],
                "positions": np.arange(start, stop, dtype=np.int32),
            }
            if "document_index" in meta:
                piece["document_index"] = meta["document_index"]
                piece["sequence_index"] = np.int32(k)
            pieces.append(piece)
        return pieces


def _packed_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain's packed features → our row fields (padding is 0 everywhere, never scored)."""
    segment_ids = packed["targets_segment_ids"].astype(np.int32)
    mask = segment_ids != 0
    return {
        "inputs": np.where(mask, packed["inputs"], 0).astype(np.int32),
        "targets": np.where(mask, packed["targets"], 0).astype(np.int32),
        "loss_mask": mask,
        "segment_ids": segment_ids,
        "positions": np.where(mask, packed["positions"], 0).astype(np.int32),
    }


class _PieceRow:
    """One piece per row, padded to L (evaluation)."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def __call__(self, piece: dict[str, Any]) -> dict[str, Any]:
        n, pad = len(piece["inputs"]), self.seq_len - len(piece["inputs"])
        row = {key: np.pad(piece[key], (0, pad)).astype(np.int32) for key in ("inputs", "targets", "positions")}
        row["loss_mask"] = np.arange(self.seq_len) < n
        row["segment_ids"] = row["loss_mask"].astype(np.int32)
        row.update({key: np.int32(piece[key]) for key in INDEX_KEYS})
        return row


class _PadBatch:
    """Pads a final partial batch to ``rows`` with all-zero rows (loss_mask False, segment / document index 0)."""

    def __init__(self, rows: int):
        self.rows = rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = self.rows - len(batch["inputs"])
        if missing == 0:
            return batch
        return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def _documents(source: Any, config: DataConfig, indexed: bool, stream: bool = False) -> grain.MapDataset:
    """This process's documents; ``stream``: of the shuffled, repeated training stream, else of the corpus."""
    if len(source) == 0:
        raise ValueError("empty corpus: the document source has no documents")
    ds = grain.MapDataset.source(source)
    if indexed:
        ds = ds.map_with_index(_with_index)  # global document numbers, taken before the process slice
    if stream:
        if config.shuffle:
            ds = ds.shuffle(seed=config.seed)  # before repeat: a fresh permutation every epoch, each document once
        ds = ds.repeat(config.num_epochs)
    # may be empty for a small evaluation corpus and many processes: the loader then yields padding batches
    return ds[config.process_index :: config.process_count]


def _read_options(config: DataConfig) -> grain.ReadOptions:
    """Read-ahead of tokenised documents. grain's default (16 threads, 500 documents) tokenises many epochs of a
    small corpus of long documents in the background, stealing the cores from compilation and the train step."""
    return grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.read_ahead)


def with_workers(ds: grain.IterDataset, worker_count: int, worker_buffer_size: int) -> grain.IterDataset:
    """``ds`` read by ``worker_count`` grain processes (``worker_buffer_size`` elements ahead each); 0 = inline."""
    if worker_count == 0:
        return ds
    from absl import flags

    if not flags.FLAGS.is_parsed():  # google/grain#1355: workers read an absl flag
        flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=worker_buffer_size)
    )


def _finish(ds: grain.IterDataset, config: DataConfig) -> grain.IterDataset:
    ds = ds.batch(config.local_batch_size, drop_remainder=False).map(_PadBatch(config.local_batch_size))
    return with_workers(ds, config.worker_count, config.worker_buffer_size)


def train_dataset(source: Any, tokenizer: Any, config: DataConfig, eod_id: int | None = None) -> grain.IterDataset:
    """The training pipeline as a grain IterDataset of dicts (numpy fields ``ROW_KEYS``, each (local batch, L)).

    ``source`` is any random-access document sequence (see :mod:`.sources`); ``tokenizer`` has
    ``encode_batch(texts)`` and ``eod_id`` (may be None for pre-tokenised sources if ``eod_id`` is given).
    """
    eod = _eod(tokenizer, eod_id)
    ds = _documents(source, config, indexed=False, stream=True)
    ds = ds.map(_Tokenize(tokenizer)).to_iter_dataset(_read_options(config))
    ds = grain.experimental.FlatMapIterDataset(ds, _SplitDocument(config.seq_len, eod))
    lengths = {key: config.seq_len for key in ("inputs", "targets", "positions")}
    if config.mode == "pack":
        ds = grain.experimental.FirstFitPackIterDataset(
            ds,
            length_struct=lengths,
            num_packing_bins=config.num_packing_bins or config.local_batch_size,
            shuffle_bins=False,
            seed=config.seed,
        )
    else:
        ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=lengths)
    return _finish(ds.map(_packed_row), config)


def eval_dataset(source: Any, tokenizer: Any, config: DataConfig, eod_id: int | None = None) -> grain.IterDataset:
    """The evaluation pipeline as a grain IterDataset of dicts: one document piece per row, in corpus order, one
    pass, no shuffle (``config.shuffle``, ``num_epochs`` and ``mode`` are ignored); ``ROW_KEYS`` plus
    ``INDEX_KEYS``. The final partial batch is padded with rows whose loss_mask is all False and indices 0."""
    eod = _eod(tokenizer, eod_id)
    ds = (
        _documents(source, config, indexed=True).map(_TokenizeIndexed(tokenizer)).to_iter_dataset(_read_options(config))
    )
    ds = grain.experimental.FlatMapIterDataset(ds, _SplitDocument(config.seq_len, eod))
    return _finish(ds.map(_PieceRow(config.seq_len)), config)


def _eod(tokenizer: Any, eod_id: int | None) -> int:
    eod = eod_id if eod_id is not None else getattr(tokenizer, "eod_id", None)
    if eod is None:
        raise ValueError("no EOD id: pass a tokenizer with .eod_id or eod_id=")
    return int(eod)
