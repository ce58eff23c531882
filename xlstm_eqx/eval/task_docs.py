"""The documents of the bundled lm-eval tasks, built from the held-out plays (see :mod:`.tasks` for the formats).

The test works are parsed into scenes of numbered lines (speaker names, stage directions, blank lines kept), and
each task's docs are drawn from them with a seeded ``random.Random``, so a build is reproducible byte for byte.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..data.corpus import default_corpus, work_name

CLOZE_DOCS = 200
CLOZE_CONTEXT_WORDS = (40, 150)  # min, max words of context before the target word
NEXT_LINE_DOCS = 200
NEXT_LINE_CONTEXT_WORDS = (30, 120)
NEXT_LINE_MIN_CHARS = 20  # answer and distractor lines: at least this long and 4 words
DISTRACTORS = 3
DISTRACTOR_LENGTH_TOLERANCE = (0.15, 0.3, 0.6, 1.0)  # relative length difference, widened only when needed
PPL_DOCS = 20
PPL_CHARS = (1500, 3000, 4500)  # min, target, max characters of a passage

SCENE_RE = re.compile(r"^(?:SCENE|Scene)\s+(?:[IVXL]+|\d+)\b")
ACT_RE = re.compile(r"^(?:ACT|Act)\s+(?:[IVXL]+|\d+)\.?$")
SPEAKER_RE = re.compile(r"^[A-Z][A-Z' ,&-]*[A-Z]\.$")
CLOZE_LINE_RE = re.compile(r"^(?P<prefix>.*\S) (?P<word>[A-Za-z]{3,})(?:[.,;:!?]|--)*$")
SENTENCE_END_RE = re.compile(r"[.!?](?:--)?$")

# Kinds of line within a scene.
HEADING, BLANK, SPEAKER, DIRECTION, SPEECH, OTHER = "heading", "blank", "speaker", "direction", "speech", "other"


@dataclass(frozen=True)
class Line:
    text: str  # without trailing whitespace
    number: int  # 1-based line number in the work's file
    kind: str
    speech: int  # index of the speech within its scene; -1 outside speeches


@dataclass(frozen=True)
class Scene:
    work: str
    index: int  # 0-based, within the work
    lines: tuple[Line, ...]  # the heading first; no trailing blank lines


def _classify(work: str, index: int, numbered: list[tuple[int, str]]) -> Scene:
    while numbered and not numbered[-1][1]:
        numbered.pop()
    lines: list[Line] = []
    speech, in_direction, prev_blank = -1, False, False
    for k, (number, text) in enumerate(numbered):
        if k == 0:
            kind = HEADING
        elif not text.strip():
            kind, in_direction = BLANK, False
        elif in_direction or text.lstrip().startswith("["):
            kind, in_direction = DIRECTION, "]" not in text
        elif prev_blank and SPEAKER_RE.match(text):
            kind = SPEAKER
            speech += 1
        else:  # a speech goes on past stage directions, until the next speaker's name
            kind = SPEECH if speech >= 0 else OTHER
        prev_blank = kind == BLANK
        lines.append(Line(text, number, kind, speech if kind in (SPEAKER, SPEECH) else -1))
    return Scene(work, index, tuple(lines))


def parse_scenes(text: str, work: str) -> list[Scene]:
    """The scenes of one play, each from its ``SCENE``/``Scene`` heading to the next scene or act heading.

    The front matter (title, list of persons) and the act headings belong to no scene.
    """
    scenes: list[Scene] = []
    current: list[tuple[int, str]] | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if SCENE_RE.match(line) or ACT_RE.match(line):
            if current:
                scenes.append(_classify(work, len(scenes), current))
            current = [(number, line)] if SCENE_RE.match(line) else None
        elif current is not None:
            current.append((number, line))
    if current:
        scenes.append(_classify(work, len(scenes), current))
    return scenes


def load_test_scenes() -> list[Scene]:
    """The scenes of the default corpus's test split, in file order."""
    return [
        scene
        for path in default_corpus("test")
        for scene in parse_scenes(path.read_text(encoding="utf-8"), work_name(path))
    ]


def _context_start(lines: Sequence[Line], end: int, words: int, bounds: tuple[int, int]) -> int | None:
    """First line of a context made of ``lines[start:end]`` (plus ``words`` more words), within ``bounds`` words.

    Prefers, each at its latest (shortest context): a speaker's name or the scene heading, then a spoken line that
    begins a sentence, then any spoken line.
    """
    low, high = bounds
    sentence = anyline = None
    for start in range(end - 1, -1, -1):
        line = lines[start]
        words += len(line.text.split())
        if words > high:
            break
        if words < low or line.kind == BLANK:
            continue
        if line.kind in (HEADING, SPEAKER):
            return start
        if line.kind == SPEECH:
            prev = lines[start - 1]
            if sentence is None and prev.kind == SPEECH and SENTENCE_END_RE.search(prev.text):
                sentence = start
            if anyline is None:
                anyline = start
    return sentence if sentence is not None else anyline


def _join(lines: Iterable[Line]) -> str:
    return "\n".join(line.text for line in lines)


def _has_brackets(text: str) -> bool:
    return "[" in text or "]" in text


def cloze_docs(scenes: Sequence[Scene], rng: random.Random, n: int = CLOZE_DOCS) -> list[dict[str, Any]]:
    """``{work, line, context, target}``: ``context + " " + target`` is the text up to the end of line ``line``'s
    last word (its trailing punctuation left out)."""
    candidates = []
    for scene in scenes:
        for t, line in enumerate(scene.lines):
            if line.kind != SPEECH or _has_brackets(line.text):
                continue
            m = CLOZE_LINE_RE.match(line.text)
            if m is None:
                continue
            start = _context_start(scene.lines, t, len(m["prefix"].split()), CLOZE_CONTEXT_WORDS)
            if start is None:
                continue
            context = _join(scene.lines[start:t]) + "\n" + m["prefix"]
            candidates.append({"work": scene.work, "line": line.number, "context": context, "target": m["word"]})
    return [candidates[i] for i in sorted(rng.sample(range(len(candidates)), n))]


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z]+", " ", text.lower()).strip()


def _is_choice_line(line: Line) -> bool:
    text = line.text
    return (
        line.kind == SPEECH
        and not _has_brackets(text)
        and text == text.strip()
        and len(text) >= NEXT_LINE_MIN_CHARS
        and len(text.split()) >= 4
    )


def next_line_docs(scenes: Sequence[Scene], rng: random.Random, n: int = NEXT_LINE_DOCS) -> list[dict[str, Any]]:
    """``{work, line, context, choices, label}``: ``choices[label]`` is line ``line``, which follows ``context``
    (after a newline) within the same speech; the other choices are spoken lines from other scenes of the play."""
    pool: dict[str, list[tuple[int, str, str]]] = {}  # work -> (scene index, text, normalised), in file order
    seen: set[tuple[str, str]] = set()
    candidates = []
    for scene in scenes:
        for t, line in enumerate(scene.lines):
            if not _is_choice_line(line):
                continue
            if (scene.work, line.text) not in seen:
                seen.add((scene.work, line.text))
                pool.setdefault(scene.work, []).append((scene.index, line.text, _normalise(line.text)))
            prev = scene.lines[t - 1]
            if prev.kind != SPEECH or prev.speech != line.speech:
                continue
            start = _context_start(scene.lines, t, 0, NEXT_LINE_CONTEXT_WORDS)
            if start is not None:
                candidates.append((scene, start, t))

    docs = []
    for i in sorted(rng.sample(range(len(candidates)), n)):
        scene, start, t = candidates[i]
        answer = scene.lines[t].text
        avoid = {_normalise(answer)} | {_normalise(line.text) for line in scene.lines[start:t]}
        others = [
            text
            for index, text, normalised in pool[scene.work]
            if index != scene.index and text[0].isupper() == answer[0].isupper() and normalised not in avoid
        ]
        for tolerance in DISTRACTOR_LENGTH_TOLERANCE:
            near = [text for text in others if abs(len(text) - len(answer)) <= tolerance * len(answer)]
            if len(near) >= DISTRACTORS:
                break
        distractors = _pick_distinct(near, rng)
        label = rng.randrange(DISTRACTORS + 1)
        choices = distractors[:label] + [answer] + distractors[label:]
        docs.append(
            {
                "work": scene.work,
                "line": scene.lines[t].number,
                "context": _join(scene.lines[start:t]),
                "choices": choices,
                "label": label,
            }
        )
    return docs


def _pick_distinct(texts: list[str], rng: random.Random) -> list[str]:
    """:data:`DISTRACTORS` texts from ``texts`` that differ from each other once normalised."""
    picked: list[str] = []
    for text in rng.sample(texts, len(texts)):
        if _normalise(text) not in {_normalise(p) for p in picked}:
            picked.append(text)
            if len(picked) == DISTRACTORS:
                return picked
    raise ValueError(f"too few distinct distractor lines ({len(picked)} < {DISTRACTORS})")


def _passages(scene: Scene) -> list[tuple[int, str]]:
    """``(first line number, text)`` passages of a scene: runs of whole speeches (a speaker's name to the next one;
    the scene heading and its stage directions count as one) that stop once they reach the target size, or before
    they would pass the maximum. Passages shorter than the minimum are dropped."""
    low, target, high = PPL_CHARS
    starts = [i for i, line in enumerate(scene.lines) if line.kind in (HEADING, SPEAKER)]
    units = list(zip(starts, [*starts[1:], len(scene.lines)]))

    def text(first: int, stop: int) -> str:
        return _join(scene.lines[first:stop]).rstrip()

    passages: list[tuple[int, str]] = []
    first: int | None = None
    last = 0
    for start, stop in units:
        if first is not None and len(text(first, stop)) > high and len(text(first, last)) >= low:
            passages.append((scene.lines[first].number, text(first, last)))
            first = None
        if first is None:
            first = start
        last = stop
        if len(text(first, last)) >= target:
            passages.append((scene.lines[first].number, text(first, last)))
            first = None
    if first is not None:
        passages.append((scene.lines[first].number, text(first, last)))
    return [(number, passage) for number, passage in passages if len(passage) >= low]


def ppl_docs(scenes: Sequence[Scene], rng: random.Random, n: int = PPL_DOCS) -> list[dict[str, Any]]:
    """``{work, line, text}``: at most one passage per scene, ``line`` being the passage's first line."""
    per_scene = [(scene, passages) for scene in scenes if (passages := _passages(scene))]
    chosen = sorted(rng.sample(range(len(per_scene)), n))
    docs = []
    for i in chosen:
        scene, passages = per_scene[i]
        number, text = passages[rng.randrange(len(passages))]
        docs.append({"work": scene.work, "line": number, "text": text})
    return docs


def build_docs(seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """The docs of each bundled task, from the test split, deterministic given ``seed``."""
    scenes = load_test_scenes()
    makers = {"shakespeare_cloze": cloze_docs, "shakespeare_next_line": next_line_docs, "shakespeare_ppl": ppl_docs}
    return {task: makers[task](scenes, random.Random(f"{task}/{seed}")) for task in makers}
