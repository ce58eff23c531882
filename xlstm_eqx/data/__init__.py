"""Data: the Batch pytrees, document sources, the grain pipeline, the default corpus and tokenizer."""

from .batch import Batch, IndexedBatch, document_starts
from .corpus import default_corpus, read_documents
from .loader import BatchIterator, eval_batches, train_batches
from .pipeline import DataConfig, eval_dataset, train_dataset
from .sources import ByteTokenizer, JsonlSource, SyntheticTokenSource, TextFileSource, open_documents
from .tokenizer import DEFAULT_TOKENIZER, Tokenizer, check_fits_model

__all__ = [
    "DEFAULT_TOKENIZER",
    "Batch",
    "BatchIterator",
    "ByteTokenizer",
    "DataConfig",
    "IndexedBatch",
    "JsonlSource",
    "SyntheticTokenSource",
    "TextFileSource",
    "Tokenizer",
    "check_fits_model",
    "default_corpus",
    "document_starts",
    "eval_batches",
    "eval_dataset",
    "open_documents",
    "read_documents",
    "train_batches",
    "train_dataset",
]
