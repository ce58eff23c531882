"""Document sources: random-access sequences of documents (``len(src)``, ``src[i]``) for the grain pipelines.

Every source is picklable (grain's multiprocessing workers are spawned) and yields one document per index: a
``str`` (text files, JSONL), ``bytes`` holding UTF-8 text (ArrayRecord) or an int32 token array (synthetic). The
pipeline tokenises text and uses token arrays as they are. ``SyntheticTokenSource`` and ``ByteTokenizer`` are
small stand-ins for tests and benchmarks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TEXT_SUFFIXES = (".txt", ".md", ".text")


def _expand(paths: str | Path | Sequence[str | Path], suffixes: tuple[str, ...] | None) -> list[Path]:
    """Files named by ``paths``; a folder contributes its files (recursively, sorted, hidden ones skipped)."""
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    if not items:
        raise ValueError("no corpus paths given")
    files: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found = sorted(
                p
                for p in item.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(item).parts)
                and (suffixes is None or p.suffix in suffixes)
            )
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"corpus path does not exist: {item}")
    if not files:
        raise ValueError(f"empty corpus: no files found in {', '.join(map(str, items))}")
    return files


def _check_nonempty(source: Any, paths: Sequence[Path]) -> None:
    if len(source) == 0:
        raise ValueError(f"empty corpus: no documents in {', '.join(map(str, paths))}")


class TextFileSource:
    """One document per plain-text file (UTF-8). Folders contribute their ``.txt``/``.md``/``.text`` files."""

    def __init__(self, paths: str | Path | Sequence[str | Path]):
        self.files = [str(p) for p in _expand(paths, TEXT_SUFFIXES)]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> str:
        path = Path(self.files[index])
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


class JsonlSource:
    """One document per non-blank JSONL line, its text in ``text_field``. Lines are indexed by byte offset up front;
    a line is parsed when read, and a bad line raises naming ``FILE:LINE`` (1-based)."""

    def __init__(self, paths: str | Path | Sequence[str | Path], text_field: str = "text"):
        self.text_field = text_field
        self.files = [str(p) for p in _expand(paths, (".jsonl", ".json"))]
        index: list[tuple[int, int, int]] = []  # (file number, byte offset, line number)
        for number, name in enumerate(self.files):
            offset = 0
            with open(name, "rb") as f:
                for line_no, line in enumerate(f, start=1):
                    if line.strip():
                        index.append((number, offset, line_no))
                    offset += len(line)
        self.index = np.asarray(index, np.int64).reshape(-1, 3)
        _check_nonempty(self, [Path(f) for f in self.files])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> str:
        number, offset, line_no = (int(v) for v in self.index[index])
        name = self.files[number]
        with open(name, "rb") as f:
            f.seek(offset)
            line = f.readline()
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}:{line_no}: invalid JSON ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{name}:{line_no}: not UTF-8 (byte {e.start} of the line: {e.reason})") from None
        if not isinstance(record, dict) or self.text_field not in record:
            raise KeyError(f"{name}:{line_no}: missing text field {self.text_field!r}")
        text = record[self.text_field]
        if not isinstance(text, str):
            raise TypeError(f"{name}:{line_no}: field {self.text_field!r} is {type(text).__name__}, not a string")
        return text


def write_array_record(documents: Iterable[str], path: str | Path) -> int:
    """Writes each document as one UTF-8 record of an ArrayRecord file; returns the number written.

    All or nothing: the records go to a temporary file beside ``path``, which replaces ``path`` only once every
    document is written. An error on the way (a bad line in the source) leaves ``path`` as it was, and no
    truncated file that would read as a valid, shorter corpus."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    writer = ArrayRecordWriter(str(partial), "group_size:1")
    count = 0
    try:
        try:
            for doc in documents:
                writer.write(doc.encode("utf-8"))
                count += 1
        finally:
            writer.close()
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return count


def convert_to_array_record(paths: str | Path | Sequence[str | Path], out: str | Path, text_field: str = "text") -> int:
    """Converts text files / JSONL (chosen as in :func:`open_documents`) into one ``.arecord`` file."""
    source = open_documents(paths, text_field=text_field)
    return write_array_record((source[i] for i in range(len(source))), out)


def array_record_source(paths: str | Path | Sequence[str | Path]):
    """A ``grain.sources.ArrayRecordDataSource`` over ``.arecord`` files (records are UTF-8 ``bytes``)."""
    import grain

    files = _expand(paths, (".arecord",))
    source = grain.sources.ArrayRecordDataSource([str(f) for f in files])
    _check_nonempty(source, files)
    return source


def open_documents(paths: str | Path | Sequence[str | Path], text_field: str = "text"):
    """Picks a source by file type: ``.arecord`` → ArrayRecord, ``.jsonl``/``.json`` → JSONL, else plain text.
    A folder is judged by the files it holds (ArrayRecord first, then JSONL, then text)."""
    files = _expand(paths, None)
    suffixes = {f.suffix for f in files}
    if ".arecord" in suffixes:
        return array_record_source(paths)
    if suffixes & {".jsonl", ".json"}:
        return JsonlSource(paths, text_field)
    return TextFileSource(paths)


class SyntheticTokenSource:
    """Random token documents for tests and benchmarks: document ``i`` has a length in ``[min_len, max_len]`` and
    ids in ``[low, vocab_size)``, both drawn from ``seed`` and ``i`` alone (so any index is reproducible)."""

    def __init__(
        self, num_documents: int, vocab_size: int, min_len: int = 1, max_len: int = 64, seed: int = 0, low: int = 1
    ):
        if num_documents <= 0:
            raise ValueError(f"empty corpus: num_documents={num_documents}")
        if not 0 < min_len <= max_len or not 0 <= low < vocab_size:
            raise ValueError(f"bad synthetic ranges: len [{min_len}, {max_len}], ids [{low}, {vocab_size})")
        self.num_documents, self.vocab_size, self.min_len, self.max_len = num_documents, vocab_size, min_len, max_len
        self.seed, self.low = seed, low

    def __len__(self) -> int:
        return self.num_documents

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self.num_documents:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        n = int(rng.integers(self.min_len, self.max_len + 1))
        return rng.integers(self.low, self.vocab_size, size=n, dtype=np.int32)


class ByteTokenizer:
    """A trivial tokenizer for tests and benchmarks: ids = UTF-8 bytes + 1 (1 … 256), EOD = 0, vocab 257."""

    eod_id = 0
    vocab_size = 257

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [[b + 1 for b in text.encode("utf-8")] for text in texts]
