"""Data: the Batch pytree (pipelines, tokenizer and corpus arrive with the data issue)."""

from .batch import Batch, document_starts

__all__ = ["Batch", "document_starts"]
