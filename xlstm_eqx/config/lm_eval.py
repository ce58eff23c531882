"""LM Evaluation Harness settings: which tasks, how requests are scored, what lm-eval is told."""

from __future__ import annotations

from dataclasses import dataclass

from .parsing import ConfigError


@dataclass(frozen=True)
class LMEvalConfig:
    """One lm-eval run (during training: after the test pass, and at validations if ``at_validation``).

    Tasks: ``evaluation_tasks`` (task or group names; empty = no lm-eval in the training job) are looked up in
    ``include_path`` (a directory of task YAMLs; None = the tasks bundled with xlstm_eqx) and, with
    ``include_defaults``, in lm-eval's built-in tasks (those read their datasets from the hub).
    ``tokenizer_path``: a ``tokenizers`` JSON file (None = the run's own tokenizer); its vocabulary must fit the
    model.

    Scoring: ``use_infinite_eval`` scores every request as one sequence, recurrently in chunks of
    ``infinite_eval_chunksize`` (no context limit); otherwise in windows of ``context_length`` inputs (None =
    the run's ``data.seq_len``). ``batch_size`` rows per batch (None = the run's evaluation batch size; a
    multiple of data × fsdp). ``worker_count`` grain processes build the batches, ``worker_buffer_size`` ahead
    each. ``debug`` scales log-likelihoods by 1e-4 (finite perplexities for a random-weight smoke test).
    ``max_gen_toks`` / ``seed``: defaults for generation requests.

    Passed to lm-eval: ``cache_requests`` (reuse built requests; cached per task files, seed, few-shot count,
    system instruction and chat template), ``limit_requests`` (documents per task),
    ``write_out`` (print prompts, and save per-sample outputs and the results under ``<run_dir>/lm_eval``),
    ``system_instruction``, ``num_fewshot``, ``bootstrap_iters`` (stderr resamples; 0 = none), and
    ``apply_chat_template`` (True = the adapter's role-tagged template, a string = a Jinja template of yours).
    """

    evaluation_tasks: tuple[str, ...] = ()
    tokenizer_path: str | None = None
    include_path: str | None = None
    include_defaults: bool = False
    cache_requests: bool = True
    limit_requests: int | None = None
    write_out: bool = False
    use_infinite_eval: bool = True
    infinite_eval_chunksize: int = 64
    context_length: int | None = None
    batch_size: int | None = None
    worker_buffer_size: int = 1
    worker_count: int = 0
    debug: bool = False
    system_instruction: str | None = None
    num_fewshot: int | None = None
    bootstrap_iters: int = 1000
    apply_chat_template: bool | str = False
    max_gen_toks: int = 256
    seed: int = 0
    at_validation: bool = False
    at_test: bool = True

    def __post_init__(self):
        positive = ("infinite_eval_chunksize", "worker_buffer_size", "max_gen_toks")
        optional_positive = ("limit_requests", "context_length", "batch_size")
        for name in positive + tuple(n for n in optional_positive if getattr(self, n) is not None):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be ≥ 1, got {getattr(self, name)}")
        for name in ("worker_count", "bootstrap_iters"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be ≥ 0, got {getattr(self, name)}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError("num_fewshot", f"must be ≥ 0, got {self.num_fewshot}")
        if isinstance(self.evaluation_tasks, str):
            raise ConfigError("evaluation_tasks", "must be a list of task names, got a string")
        if any(not name for name in self.evaluation_tasks):
            raise ConfigError("evaluation_tasks", f"task names must be non-empty, got {list(self.evaluation_tasks)}")
