"""Input/output: streamed metric writers (checkpoints arrive with the training loop)."""

from .writers import CsvWriter, JsonlWriter, MetricWriter, TensorBoardWriter, is_finite_row

__all__ = ["CsvWriter", "JsonlWriter", "MetricWriter", "TensorBoardWriter", "is_finite_row"]
