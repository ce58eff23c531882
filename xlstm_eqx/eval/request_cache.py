"""Where lm-eval caches the requests it builds (``cache_requests``), keyed by everything that shapes them.

lm-eval names a task's cached requests by the task name, the few-shot count, rank and world size only (plus the
tokenizer name with a chat template). Run again after rebuilding the task files, changing the few-shot seed or
passing another Jinja template, it would reuse the old prompts and score the wrong documents without a word. So
each run points lm-eval's cache at a folder of its own inside lm-eval's (``$LM_HARNESS_CACHE_PATH`` or lm-eval's
default), named by a digest of those inputs; runs with the same inputs share it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

from ..config.lm_eval import LMEvalConfig


def request_digest(config: LMEvalConfig, task_dir: Path, chat_template: str | None) -> str:
    """16 hex digits of: lm-eval's version, every file under ``task_dir`` (path and bytes; bytecode caches
    skipped), ``include_defaults``, ``seed`` (few-shot draws), ``num_fewshot``, ``system_instruction`` and the
    chat template in use (None without one)."""
    import lm_eval

    digest = hashlib.sha256()
    settings = (lm_eval.__version__, config.include_defaults, config.seed, config.num_fewshot,
                config.system_instruction, chat_template)  # fmt: skip
    digest.update(repr(settings).encode())
    for path in sorted(p for p in task_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(b"\0" + path.relative_to(task_dir).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def request_cache(config: LMEvalConfig, task_dir: Path, chat_template: str | None) -> Iterator[Path | None]:
    """While open, lm-eval reads and writes cached requests in ``<its cache>/xlstm_eqx-<digest>`` (yielded; None
    and nothing changed when ``config.cache_requests`` is off)."""
    if not config.cache_requests:
        yield None
        return
    import lm_eval.caching.cache as cache

    folder = Path(cache.PATH) / f"xlstm_eqx-{request_digest(config, task_dir, chat_template)}"
    with mock.patch.object(cache, "PATH", str(folder)):  # lm-eval reads the module global at every call
        yield folder
