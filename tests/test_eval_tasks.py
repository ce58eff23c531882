"""The bundled offline lm-eval tasks: reproducible from our build command, well-formed, and runnable by lm-eval."""

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from xlstm_eqx.data.corpus import default_corpus, work_name
from xlstm_eqx.eval import tasks
from xlstm_eqx.eval.tasks import BUNDLED_TASKS, GROUP, build_tasks, bundled_task_dir, check_task_names

EXPECTED_METRICS = {
    "shakespeare_cloze": {"perplexity,none", "acc,none"},
    "shakespeare_next_line": {"acc,none", "acc_norm,none"},
    "shakespeare_ppl": {"word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"},
}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _docs(folder: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tasks")
    build_tasks(out, seed=0)
    return out


@pytest.fixture(scope="module")
def source_lines() -> dict[str, list[str]]:
    """Each test work's lines, without trailing whitespace, indexed from 0 (doc ``line`` numbers are 1-based)."""
    return {
        work_name(p): [s.rstrip() for s in p.read_text(encoding="utf-8").splitlines()] for p in default_corpus("test")
    }


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def test_build_is_deterministic_and_the_shipped_files_are_its_output(built, tmp_path):
    again = build_tasks(tmp_path / "again", seed=0)
    assert sorted(p.name for p in again) == sorted(_files(built))
    assert _files(tmp_path / "again") == _files(built)
    assert _files(bundled_task_dir()) == _files(built)  # regenerate with: python -m xlstm_eqx.eval.tasks build
    other = build_tasks(tmp_path / "seed1", seed=1)
    assert [p.read_bytes() for p in other if p.suffix == ".jsonl"] != [
        (built / p.name).read_bytes() for p in other if p.suffix == ".jsonl"
    ]


def test_the_loader_names_the_file_and_line_of_a_bad_doc(tmp_path):
    import importlib.util

    build_tasks(tmp_path, seed=0)
    path = tmp_path / "shakespeare_cloze.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + '{"context": "cut off\n' + "".join(lines[3:]), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("loader_under_test", tmp_path / f"{tasks.LOADER}.py")
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    assert len(loader.load({"test": "shakespeare_ppl.jsonl"})["test"]) == 20
    with pytest.raises(ValueError, match=r"shakespeare_cloze\.jsonl:3: not valid JSON"):
        loader.load({"test": "shakespeare_cloze.jsonl"})


def test_sizes(built):
    counts = {task: len(_docs(built, task)) for task in BUNDLED_TASKS}
    assert counts == {"shakespeare_cloze": 200, "shakespeare_next_line": 200, "shakespeare_ppl": 20}
    assert sum((built / f"{task}.jsonl").stat().st_size for task in BUNDLED_TASKS) < 1_000_000


def _assert_precedes(context: str, lines: list[str], index: int) -> None:
    """``context``'s lines are the source lines just before ``lines[index]``."""
    ctx = context.split("\n")
    assert ctx[0].strip()
    assert lines[index - len(ctx) : index] == ctx


def test_cloze_docs_are_true_continuations(built, source_lines):
    docs = _docs(built, "shakespeare_cloze")
    for doc in docs:
        lines = source_lines[doc["work"]]
        *before, last = doc["context"].split("\n")
        assert re.fullmatch(r"[A-Za-z]{3,}", doc["target"]) and last.strip()
        assert len(doc["context"].split()) >= 40
        # The target line is the context's last (partial) line + " " + target + nothing but punctuation.
        line = lines[doc["line"] - 1]
        assert line.startswith(f"{last} {doc['target']}")
        assert re.fullmatch(r"[.,;:!?-]*", line[len(last) + 1 + len(doc["target"]) :])
        if before:
            _assert_precedes("\n".join(before), lines, doc["line"] - 1)
    assert len({(d["work"], d["line"]) for d in docs}) == len(docs)
    assert {d["work"] for d in docs} == set(source_lines)


def test_next_line_docs_are_well_formed(built, source_lines):
    docs = _docs(built, "shakespeare_next_line")
    for doc in docs:
        lines = source_lines[doc["work"]]
        choices, label = doc["choices"], doc["label"]
        assert len(choices) == 4 and 0 <= label < 4
        assert choices[label] == lines[doc["line"] - 1]  # the true next line
        _assert_precedes(doc["context"], lines, doc["line"] - 1)
        assert lines[doc["line"] - 2].strip()  # the answer goes on the speech of the context's last line
        normalised = {re.sub(r"[^a-z]+", " ", c.lower()).strip() for c in choices}
        assert len(normalised) == 4  # distractors differ from the answer and from each other
        assert all(c.strip() == c and len(c) >= 20 for c in choices)
        assert len(doc["context"].split()) >= 30
    assert set(Counter(d["label"] for d in docs)) == {0, 1, 2, 3}


def test_ppl_docs_are_passages_of_the_test_works(built, source_lines):
    docs = _docs(built, "shakespeare_ppl")
    for doc in docs:
        text = doc["text"]
        assert 1500 <= len(text) and text == text.strip()
        n = text.count("\n") + 1
        assert "\n".join(source_lines[doc["work"]][doc["line"] - 1 : doc["line"] - 1 + n]) == text
    assert len({(d["work"], d["line"]) for d in docs}) == len(docs)
    assert sum(len(d["text"]) for d in docs) > 40_000


def test_cli(tmp_path, capsys):
    assert tasks.main(["build", "--out", str(tmp_path), "--seed", "3"]) == 0
    assert "shakespeare_cloze.jsonl" in capsys.readouterr().out
    assert tasks.main(["path"]) == 0
    assert capsys.readouterr().out.strip() == str(bundled_task_dir())


def _task_manager(include_path: Path):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path), include_defaults=False)


def _unigram_lm():
    """A tiny deterministic LM for lm-eval: characters scored by an add-one unigram model of a fixed text."""
    from lm_eval.api.model import LM

    sample = "Fair is foul, and foul is fair:\nHover through the fog and filthy air.\n\nMACBETH.\nSo foul and fair"
    counts = Counter(sample)
    total = sum(counts.values()) + 256

    def logprob(text: str) -> float:
        return sum(math.log((counts[c] + 1) / total) for c in text)

    class UnigramLM(LM):
        def __init__(self):
            super().__init__()
            self.requests: dict[str, list[tuple]] = {}

        def loglikelihood(self, requests):
            self.requests.setdefault("loglikelihood", []).extend(r.args for r in requests)
            top = counts.most_common(1)[0][0]
            return [(logprob(cont), all(c == top for c in cont)) for _, cont in (r.args for r in requests)]

        def loglikelihood_rolling(self, requests):
            self.requests.setdefault("loglikelihood_rolling", []).extend(r.args for r in requests)
            return [logprob(text) for (text,) in (r.args for r in requests)]

        def generate_until(self, requests):
            out = []
            for _context, gen_kwargs in (r.args for r in requests):
                text = "foul and fair\n\nMACBETH.\n"
                for stop in gen_kwargs.get("until", []):  # lm-eval leaves `until` to the model
                    text = text.split(stop)[0]
                out.append(text)
            return out

    return UnigramLM()


def test_lm_eval_runs_the_bundled_tasks(offline, built):
    import lm_eval

    lm = _unigram_lm()
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(BUNDLED_TASKS),
        task_manager=_task_manager(bundled_task_dir()),
        limit=5,
        bootstrap_iters=0,
    )
    for task, metrics in EXPECTED_METRICS.items():
        result = res["results"][task]
        assert metrics <= set(result), (task, result)
        assert all(math.isfinite(result[m]) for m in metrics)
    assert res["results"]["shakespeare_ppl"]["bits_per_byte,none"] > 0
    # What the LM is asked: cloze words after a space, next lines after a newline, whole passages to roll over.
    cloze = _docs(built, "shakespeare_cloze")[:5]
    next_line = _docs(built, "shakespeare_next_line")[:5]
    assert sorted(lm.requests["loglikelihood"]) == sorted(
        [(d["context"], " " + d["target"]) for d in cloze]
        + [(d["context"], "\n" + choice) for d in next_line for choice in d["choices"]]
    )
    assert sorted(lm.requests["loglikelihood_rolling"]) == sorted(
        (d["text"],) for d in _docs(built, "shakespeare_ppl")[:5]
    )


def test_the_group_and_a_relocated_build_run(offline, built):
    import lm_eval

    res = lm_eval.simple_evaluate(
        model=_unigram_lm(), tasks=[GROUP], task_manager=_task_manager(built), limit=2, bootstrap_iters=0
    )
    assert sorted(res["group_subtasks"][GROUP]) == sorted(BUNDLED_TASKS)
    for task, metrics in EXPECTED_METRICS.items():
        assert metrics <= set(res["results"][task])


def test_check_task_names():
    tm = _task_manager(bundled_task_dir())
    check_task_names([*BUNDLED_TASKS, GROUP, "shakespeare_*"], tm)
    with pytest.raises(ValueError, match="shakespeare_cloze") as info:
        check_task_names(["shakespeare_cloze", "shakespeare_clozee"], tm)
    assert "shakespeare_clozee" in str(info.value)
    with pytest.raises(ValueError, match="hellaswag"):
        check_task_names(["hellaswag"], tm)
