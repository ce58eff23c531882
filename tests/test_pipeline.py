"""grain data pipelines: packing layout, splitting without truncation, shuffling, state restore, sharding, eval
padding, sources. Documents are synthetic token arrays (EOD chosen per test) or text with ``ByteTokenizer``
(ids = UTF-8 bytes + 1, EOD 0)."""

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlstm_eqx.data.batch import Batch, IndexedBatch, document_starts
from xlstm_eqx.data.loader import eval_batches, eval_num_batches, train_batches
from xlstm_eqx.data.pipeline import DataConfig
from xlstm_eqx.data.sources import (
    ByteTokenizer,
    JsonlSource,
    SyntheticTokenSource,
    TextFileSource,
    array_record_source,
    convert_to_array_record,
    open_documents,
)

EOD = 0


def unique_docs(lengths):
    """Documents whose tokens are all distinct across the corpus (ids from 1), so every token is traceable."""
    starts = np.cumsum([1, *lengths[:-1]])
    return [np.arange(s, s + n, dtype=np.int32) for s, n in zip(starts, lengths)]


def host(batches):
    """Batches as numpy (the pipeline yields jax arrays)."""
    return [jax.tree.map(np.asarray, b) for b in batches]


def take(it, n):
    return host(itertools.islice(it, n))


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("inputs", "targets", "loss_mask", "segment_ids", "positions"):
            np.testing.assert_array_equal(getattr(x, key), getattr(y, key), err_msg=key)


def test_reference_packing_example():
    docs = [np.array([1, 2, 3]), np.array([4, 5])]
    config = DataConfig(seq_len=8, global_batch_size=1, shuffle=False, num_epochs=1)
    (batch,) = host(train_batches(docs, None, config, eod_id=9))
    assert isinstance(batch, Batch)
    np.testing.assert_array_equal(batch.inputs, [[9, 1, 2, 3, 9, 4, 5, 0]])
    np.testing.assert_array_equal(batch.targets, [[1, 2, 3, 9, 4, 5, 9, 0]])
    np.testing.assert_array_equal(batch.segment_ids, [[1, 1, 1, 1, 2, 2, 2, 0]])
    np.testing.assert_array_equal(batch.positions, [[0, 1, 2, 3, 0, 1, 2, 0]])
    np.testing.assert_array_equal(batch.loss_mask, [[1, 1, 1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(document_starts(jnp.asarray(batch.segment_ids)), [[0, 0, 0, 0, 1, 0, 0, 1]])


@pytest.mark.parametrize("mode", ["pack", "concat"])
def test_long_documents_split_every_target_once(mode):
    seq_len = 8
    lengths = [3, 30, 7, 8, 9, 17, 1, 40, 2]
    docs = unique_docs(lengths)
    config = DataConfig(seq_len=seq_len, global_batch_size=2, mode=mode, shuffle=False, num_epochs=1)
    batches = host(train_batches(docs, None, config, eod_id=EOD))
    where = {int(t): (d, j) for d, doc in enumerate(docs) for j, t in enumerate(doc)}
    seen, eods = [], 0
    for b in batches:
        assert b.inputs.dtype == np.int32 and b.loss_mask.dtype == bool
        np.testing.assert_array_equal(b.loss_mask, b.segment_ids != 0)
        assert not b.inputs[~b.loss_mask].any() and not b.targets[~b.loss_mask].any()  # padding is zeros
        for x, y, p in zip(b.inputs[b.loss_mask], b.targets[b.loss_mask], b.positions[b.loss_mask]):
            if y == EOD:  # a document's end, predicted from its last token
                eods += 1
                d, j = where[int(x)]
                assert j == lengths[d] - 1 and p == lengths[d]
            else:
                d, j = where[int(y)]
                seen.append(int(y))
                assert p == j and x == (docs[d][j - 1] if j else EOD)
    assert sorted(seen) == sorted(where) and len(seen) == len(where)  # every token scored exactly once
    assert eods == len(docs)
    if mode == "concat":  # no padding before the final row
        assert all(b.loss_mask.all() for b in batches[:-1])


def test_segments_positions_and_document_starts_agree():
    docs = SyntheticTokenSource(40, vocab_size=50, min_len=1, max_len=30, seed=3)
    config = DataConfig(seq_len=16, global_batch_size=4, seed=1)
    for b in take(train_batches(docs, None, config, eod_id=EOD), 5):
        starts = np.asarray(document_starts(jnp.asarray(b.segment_ids)))
        real = b.segment_ids != 0
        # a piece starts at t = 0 or where the segment id changes; it is a document start iff its position is 0,
        # and then its first input is the leading EOD
        first = starts | (np.arange(16) == 0)
        np.testing.assert_array_equal((b.inputs == EOD) & real & (b.positions == 0), first & real & (b.positions == 0))
        assert ((b.inputs[real & (b.positions == 0)]) == EOD).all()
        inner = ~first & real
        prev_pos = np.concatenate([np.zeros((4, 1), np.int32), b.positions[:, :-1]], axis=1)
        np.testing.assert_array_equal(b.positions[inner], prev_pos[inner] + 1)  # positions count up in a piece


def one_doc_per_row(num_docs, seq_len=8):
    """Documents of seq_len - 1 tokens fill exactly one row each, so row order = document order."""
    return [np.full(seq_len - 1, i + 1, np.int32) for i in range(num_docs)]


def row_docs(batches):
    return [int(b) for batch in batches for b in batch.inputs[:, 1]]


def test_shuffle_per_epoch_and_determinism():
    docs = one_doc_per_row(12)
    config = DataConfig(seq_len=8, global_batch_size=3, num_epochs=2, num_packing_bins=1, seed=5)
    first = host(train_batches(docs, None, config, eod_id=EOD))
    again = host(train_batches(docs, None, config, eod_id=EOD))
    assert_batches_equal(first, again)
    order = row_docs(first)
    assert len(order) == 24 and sorted(order[:12]) == sorted(order[12:]) == list(range(1, 13))
    assert order[:12] != order[12:] and order[:12] != list(range(1, 13))
    other = row_docs(host(train_batches(docs, None, DataConfig(**{**config.__dict__, "seed": 6}), eod_id=EOD)))
    assert other != order


def test_two_processes_get_disjoint_covering_slices():
    docs = one_doc_per_row(10)
    seen = []
    for index in range(2):
        config = DataConfig(
            seq_len=8, global_batch_size=4, num_epochs=1, num_packing_bins=1, process_index=index, process_count=2
        )
        batches = host(train_batches(docs, None, config, eod_id=EOD))
        assert all(b.inputs.shape == (2, 8) for b in batches)  # local batch = global / processes
        seen.append({d for b in batches for d, m in zip(b.inputs[:, 1], b.loss_mask[:, 0]) if m})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(1, 11))


def test_infinite_by_default_and_global_sharding():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data", None))
    config = DataConfig(seq_len=8, global_batch_size=4)
    batches = take(train_batches(one_doc_per_row(2), None, config, eod_id=EOD, sharding=sharding), 20)
    assert len(batches) == 20 and all(b.loss_mask.all() for b in batches)  # two documents, repeated forever
    b = next(eval_batches(one_doc_per_row(3), None, config, eod_id=EOD, sharding=sharding))
    assert b.batch.inputs.sharding == sharding and b.document_index.sharding.spec == PartitionSpec("data")
    np.testing.assert_array_equal(b.document_index, [1, 2, 3, 0])
    assert not b.batch.loss_mask[3].any()


def _restore_check(config, k=3, n=4):
    docs = SyntheticTokenSource(60, vocab_size=100, min_len=1, max_len=40, seed=0)
    it = train_batches(docs, None, config, eod_id=EOD)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, n)
    resumed = train_batches(docs, None, config, eod_id=EOD)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, n), expected)


@pytest.mark.parametrize("mode", ["pack", "concat"])
def test_state_restore_inline(mode):
    _restore_check(DataConfig(seq_len=16, global_batch_size=4, mode=mode, seed=2))


def test_state_restore_with_workers():
    _restore_check(DataConfig(seq_len=16, global_batch_size=4, seed=2, worker_count=2, worker_buffer_size=2))


def test_eval_pipeline_indices_and_padding():
    seq_len, lengths = 8, [3, 20, 7, 1, 15, 4]
    docs = unique_docs(lengths)
    config = DataConfig(seq_len=seq_len, global_batch_size=4)
    batches = host(eval_batches(docs, None, config, eod_id=EOD))
    assert all(isinstance(b, IndexedBatch) and b.batch.inputs.shape == (4, seq_len) for b in batches)
    rows = [
        (int(d), int(s), b.batch, r)
        for b in batches
        for r, (d, s) in enumerate(zip(b.document_index, b.sequence_index))
    ]
    real = [(d, s) for d, s, _, _ in rows if d]
    expected = [(d + 1, k) for d, n in enumerate(lengths) for k in range(-(-(n + 1) // seq_len))]
    assert real == expected  # corpus order, pieces in order, documents numbered from 1
    assert len(rows) == 12 and len(real) == 9
    for d, s, batch, r in rows:
        if d == 0:  # padding rows never count
            assert not batch.loss_mask[r].any() and not batch.segment_ids[r].any() and s == 0
            continue
        full = np.concatenate([[EOD], docs[d - 1], [EOD]])
        n = int(batch.loss_mask[r].sum())
        np.testing.assert_array_equal(batch.targets[r, :n], full[s * seq_len + 1 : s * seq_len + 1 + n])
        np.testing.assert_array_equal(batch.positions[r, :n], np.arange(s * seq_len, s * seq_len + n))
        assert not batch.loss_mask[r, n:].any()


def test_eval_two_processes_use_global_document_numbers():
    docs = unique_docs([2, 3, 4, 5, 6])
    docs[0] = np.arange(100, 130, dtype=np.int32)  # 4 pieces: process 0 has 6 rows, process 1 has 2
    numbers, counts = [], []
    for index in range(2):
        config = DataConfig(seq_len=8, global_batch_size=4, process_index=index, process_count=2)
        assert eval_num_batches(docs, None, config, eod_id=EOD) == 3
        batches = host(eval_batches(docs, None, config, eod_id=EOD, num_batches=3))
        numbers.append([int(d) for b in batches for d in b.document_index if d])
        counts.append(len(batches))
        assert not any(b.batch.loss_mask.any() for b in batches if not b.document_index.any())
    assert numbers == [[1, 1, 1, 1, 3, 5], [2, 4]] and counts == [3, 3]
    it = eval_batches(docs, None, config, eod_id=EOD, num_batches=3)  # process 1: 1 real batch, then padding
    take(it, 1)
    state = json.loads(json.dumps(it.get_state()))
    rest = take(it, 5)
    resumed = eval_batches(docs, None, config, eod_id=EOD, num_batches=3)
    resumed.set_state(state)
    assert_batches_equal([b.batch for b in take(resumed, 5)], [b.batch for b in rest])
    assert len(rest) == 2 and not any(b.document_index.any() for b in rest)
    config = DataConfig(seq_len=8, global_batch_size=4, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="more than num_batches=2"):
        host(eval_batches(docs, None, config, eod_id=EOD, num_batches=2))


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_source_and_errors(tmp_path):
    good = write(tmp_path / "a.jsonl", '{"text": "hello"}\n\n{"text": "world", "id": 2}\n')
    assert [JsonlSource(good)[i] for i in range(2)] == ["hello", "world"]
    assert open_documents(good, text_field="text")[1] == "world"
    bad = write(tmp_path / "b.jsonl", '{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(KeyError, match=r"b\.jsonl:2: missing text field 'text'"):
        JsonlSource(bad)[1]
    broken = write(tmp_path / "c.jsonl", '{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2: invalid JSON"):
        host(train_batches(JsonlSource(broken), ByteTokenizer(), DataConfig(8, 1, num_epochs=1)))
    latin1 = tmp_path / "d.jsonl"
    latin1.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not UTF-8"):
        JsonlSource(latin1)[1]
    (tmp_path / "e.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match=r"e\.txt: not UTF-8 text \(byte 3"):
        TextFileSource(tmp_path / "e.txt")[0]


def test_missing_and_empty_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        TextFileSource(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty corpus.*empty"):
        open_documents(tmp_path / "empty")
    blank = write(tmp_path / "blank.jsonl", "\n\n")
    with pytest.raises(ValueError, match="empty corpus.*blank.jsonl"):
        JsonlSource(blank)
    with pytest.raises(ValueError, match="empty corpus"):
        train_batches([], ByteTokenizer(), DataConfig(8, 1))


def test_text_and_array_record_sources_give_identical_batches(tmp_path):
    texts = ["Hello, world.", "ünïcödé text that is longer than one row of sixteen", "x", "The end."]
    for i, text in enumerate(texts):
        write(tmp_path / "corpus" / f"doc{i}.txt", text)
    text_source = TextFileSource(tmp_path / "corpus")
    assert [text_source[i] for i in range(4)] == texts
    assert convert_to_array_record(tmp_path / "corpus", tmp_path / "ar" / "corpus.arecord") == 4
    ar_source = array_record_source(tmp_path / "ar")
    assert isinstance(open_documents(tmp_path / "ar"), type(ar_source))
    config = DataConfig(seq_len=16, global_batch_size=2, num_epochs=2, seed=7)
    from_text = host(train_batches(text_source, ByteTokenizer(), config))
    from_ar = host(train_batches(ar_source, ByteTokenizer(), config))
    assert_batches_equal(from_text, from_ar)
    scored = sum(int(b.loss_mask.sum()) for b in from_text)
    assert scored == 2 * sum(len(t.encode()) + 1 for t in texts)  # every byte and each document's EOD, per epoch


def test_no_leakage_across_packed_documents_through_the_memory():
    """Rows packed by the pipeline: changing the first document leaves the second one's logits bit-identical."""
    from xlstm_eqx.config import ModelConfig
    from xlstm_eqx.models import build
    from xlstm_eqx.train.loss import lm_forward

    docs = ["the first document, which will be changed", "and the second one, which must not notice"]
    changed = ["THE FIRST DOCUMENT, altered completely!!!", docs[1]]
    config = DataConfig(seq_len=128, global_batch_size=1, shuffle=False, num_epochs=1)
    model = build(
        ModelConfig(vocab_size=257, embedding_dim=32, num_blocks=2, num_heads=2, chunk_size=16), key=jax.random.key(0)
    )
    logits = []
    for corpus in (docs, changed):
        batch = next(iter(train_batches(corpus, ByteTokenizer(), config)))
        assert int(batch.segment_ids.max()) == 2  # both documents share the row
        out, _ = lm_forward(model, batch.inputs, document_starts(batch.segment_ids))
        logits.append((out, batch.segment_ids))
    (first, seg), (second, seg2) = logits
    assert jnp.array_equal(seg, seg2)
    in_second = seg[0] == 2
    np.testing.assert_array_equal(np.asarray(first[0][in_second]), np.asarray(second[0][in_second]))
    assert not np.allclose(np.asarray(first[0][seg[0] == 1]), np.asarray(second[0][seg[0] == 1]))
