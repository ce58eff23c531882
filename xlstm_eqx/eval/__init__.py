"""Evaluation: metrics beyond the training loss, and bundled offline lm-eval tasks (:mod:`.tasks`)."""
