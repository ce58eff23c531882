"""Byte-level BPE tokenizers trained locally (no hub), and the small wrapper the data pipeline uses.

The default tokenizer, :data:`DEFAULT_TOKENIZER`, ships with the package. It was made with this module's command
(also ``python -m xlstm_eqx.data.tokenizer train …``)::

    xlstm-eqx tokenizer --corpus default --vocab-size 4096 --out xlstm_eqx/data/assets/shakespeare_bpe4096.json

i.e. byte-level BPE (every byte is in the alphabet, so any text round-trips) trained on the train split of the
default corpus (:mod:`xlstm_eqx.data.corpus`), with the special tokens ``<|endoftext|>`` (id 0: end of document,
also used as BOS) and ``<pad>`` (id 1). Encoding adds no special tokens; the pipeline inserts EOD itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

__all__ = ["DEFAULT_TOKENIZER", "Tokenizer", "check_fits_model", "main", "train_bpe_tokenizer"]

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = [EOD_TOKEN, PAD_TOKEN]
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the special tokens
DEFAULT_TOKENIZER: Path = Path(__file__).resolve().parent / "assets" / "shakespeare_bpe4096.json"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, path: str | Path) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` (one string per document) and save it as JSON at ``path``.

    Deterministic for a given sequence of texts and vocab size. The result may have fewer than ``vocab_size``
    entries when the corpus is too small to learn that many merges.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special "
            f"tokens), got {vocab_size}"
        )
    seen = [0]

    def counted() -> Iterator[str]:
        for text in texts:
            seen[0] += len(text)
            yield text

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(counted(), trainer=trainer)
    if seen[0] == 0:
        raise ValueError("cannot train a tokenizer on an empty corpus (no text was given)")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return out


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """A loaded ``tokenizer.json``: encode/decode plus the ids the pipeline needs.

    ``eod_id`` is ``<|endoftext|>`` (required); it doubles as ``bos_id``. ``pad_id`` is ``<pad>``, or ``eod_id``
    when the file has no ``<pad>`` token (padding is masked out of the loss either way).
    """

    path: Path
    backend: tokenizers.Tokenizer
    eod_id: int
    pad_id: int

    @classmethod
    def load(cls, path: str | Path = DEFAULT_TOKENIZER) -> Tokenizer:
        """Load any ``tokenizer.json`` (from the ``tokenizers`` library) by path."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception for malformed files
            raise ValueError(f"not a valid tokenizer JSON file: {path} ({err})") from err
        eod = backend.token_to_id(EOD_TOKEN)
        if eod is None:
            raise ValueError(f"tokenizer {path} has no {EOD_TOKEN!r} token (needed as the end-of-document id)")
        pad = backend.token_to_id(PAD_TOKEN)
        return cls(path=path, backend=backend, eod_id=eod, pad_id=eod if pad is None else pad)

    @property
    def bos_id(self) -> int:
        """Documents start after an EOD token, so BOS is the EOD id."""
        return self.eod_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (every id is < vocab_size)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """A hash of the token → id table: equal exactly when two tokenizers map every token to the same id."""
        table = json.dumps(self.backend.get_vocab(with_added_tokens=True), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(table.encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens are added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (parallel in the Rust library)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens are kept unless ``skip_special_tokens``."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


def check_fits_model(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raise ValueError when the tokenizer can emit ids the model's embedding has no row for."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{model_vocab_size}; use a smaller tokenizer or a larger model vocab_size"
        )


def corpus_files(specs: Sequence[str]) -> list[Path]:
    """Expand ``--corpus`` arguments: ``default`` (train split of the default corpus), text files, or folders
    (their ``*.txt`` files, sorted)."""
    files: list[Path] = []
    for spec in specs:
        if spec == "default":
            from .corpus import default_corpus

            files.extend(default_corpus("train"))
            continue
        p = Path(spec)
        if p.is_dir():
            found = sorted(p.glob("*.txt"))
            if not found:
                raise FileNotFoundError(f"corpus folder has no .txt files: {p}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"corpus file not found: {p}")
    return files


def chars_per_token(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """Characters per token over ``texts`` (a compression measure)."""
    texts = list(texts)
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    return sum(len(t) for t in texts) / max(n_tokens, 1)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the tokenizer-training command (``xlstm-eqx tokenizer``, or this module's ``train``)."""
    parser.add_argument(
        "--corpus",
        nargs="+",
        default=["default"],
        metavar="default|PATH",
        help="'default' (train split of the Shakespeare corpus), text files, or folders of .txt files",
    )
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", type=Path, required=True, help="output tokenizer .json file")


def train_command(args: argparse.Namespace) -> int:
    """Trains and saves the tokenizer the parsed options ask for, and prints what it wrote."""
    from .corpus import read_documents

    files = corpus_files(args.corpus)
    out = train_bpe_tokenizer(read_documents(files), args.vocab_size, args.out)
    tok = Tokenizer.load(out)
    cpt = chars_per_token(tok, read_documents(files))
    print(
        f"wrote {out}: {tok.vocab_size} tokens from {len(files)} files, {out.stat().st_size} bytes, "
        f"{cpt:.3f} chars/token on the training text"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m xlstm_eqx.data.tokenizer train …`` (the same as ``xlstm-eqx tokenizer …``)."""
    parser = argparse.ArgumentParser(prog="python -m xlstm_eqx.data.tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_arguments(sub.add_parser("train", help="train a byte-level BPE tokenizer and save it as tokenizer JSON"))
    return train_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
