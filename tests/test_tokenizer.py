"""The shipped byte-level BPE tokenizer, its training command, and the wrapper's errors."""

import json

import pytest

from xlstm_eqx.data.corpus import default_corpus, read_documents
from xlstm_eqx.data.tokenizer import (
    DEFAULT_TOKENIZER,
    Tokenizer,
    check_fits_model,
    main,
    train_bpe_tokenizer,
)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(DEFAULT_TOKENIZER)


def test_default_tokenizer_ships_and_is_small(tok):
    assert DEFAULT_TOKENIZER.is_file() and DEFAULT_TOKENIZER.stat().st_size < 1_000_000
    assert tok.vocab_size == 4096
    assert tok.eod_id == tok.bos_id == 0 and tok.pad_id == 1
    assert tok.decode([tok.eod_id]) == "<|endoftext|>"


def test_round_trip_on_validation_text(tok):
    docs = list(read_documents(default_corpus("validation")))
    batch = tok.encode_batch(docs)
    assert batch[0] == tok.encode(docs[0])
    for doc, ids in zip(docs, batch):
        assert tok.decode(ids) == doc
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.eod_id not in ids and tok.pad_id not in ids  # no special tokens are added
        assert 2.5 < len(doc) / len(ids) < 3.5  # measured 2.92 chars/token


def test_round_trip_beyond_ascii(tok):
    text = "Héllo wörld — ¿qué? 🙂\n\ttabs"
    assert tok.decode(tok.encode(text)) == text


def test_committed_tokenizer_equals_a_retrain(tmp_path):
    # Training takes ~1.5 s, so the test retrains rather than comparing a few encodings.
    out = train_bpe_tokenizer(read_documents(default_corpus("train")), 4096, tmp_path / "t.json")
    assert json.loads(out.read_text()) == json.loads(DEFAULT_TOKENIZER.read_text())


def test_train_command_on_a_tiny_corpus(tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("the cat sat on the mat. " * 50)
    (folder / "b.txt").write_text("the dog sat on the log. " * 50)
    extra = tmp_path / "c.txt"
    extra.write_text("a cat and a dog.\n" * 20)
    out = tmp_path / "sub" / "tiny.json"
    assert main(["train", "--corpus", str(folder), str(extra), "--vocab-size", "300", "--out", str(out)]) == 0
    assert "tiny.json" in capsys.readouterr().out
    tiny = Tokenizer.load(out)
    assert 258 < tiny.vocab_size <= 300 and (tiny.eod_id, tiny.pad_id) == (0, 1)
    assert len(tiny.encode("the cat sat")) < len("the cat sat")
    assert tiny.decode(tiny.encode("the cat sat on the mat")) == "the cat sat on the mat"


def test_train_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        main(["train", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x.json")])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        main(["train", "--corpus", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "x.json")])
    with pytest.raises(ValueError, match="at least 258"):
        train_bpe_tokenizer(["text"], 100, tmp_path / "x.json")
    with pytest.raises(ValueError, match="empty corpus"):
        train_bpe_tokenizer([], 300, tmp_path / "x.json")


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        Tokenizer.load(tmp_path / "nothere.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.load(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"version": "1.0", "model": {"type": "Nope"}}))
    with pytest.raises(ValueError, match="wrong.json"):
        Tokenizer.load(wrong)


def test_load_requires_eod_token(tmp_path):
    spec = json.loads(DEFAULT_TOKENIZER.read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|endoftext|>"]
    del spec["model"]["vocab"]["<|endoftext|>"]
    path = tmp_path / "noeod.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"noeod.json.*<\|endoftext\|>"):
        Tokenizer.load(path)


def test_check_fits_model(tok):
    check_fits_model(tok, 4096)
    check_fits_model(tok, 50304)
    with pytest.raises(ValueError, match=r"shakespeare_bpe4096.json has 4096 tokens.*vocab_size is 1000"):
        check_fits_model(tok, 1000)
