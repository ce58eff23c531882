"""Loss curves from a run's ``metrics.jsonl`` (written by :class:`~xlstm_eqx.io.writers.JsonlWriter`) as a PNG.

Uses matplotlib's object API on the Agg canvas only (no pyplot, no global figure state, no display needed), so it
is safe in headless jobs and threads.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .writers import STEP, TRAIN_LOSS_KEYS

__all__ = ["plot_loss_curve", "read_loss_curves"]

TRAIN_MODE = "train"


def _is_eval_loss_key(key: str) -> bool:
    """Keys plotted for non-train modes: ``loss`` and ``<name>_loss``."""
    return key == "loss" or key.endswith("_loss")


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (arrays, strings, null, bool, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_loss_curves(metrics_jsonl: str | Path) -> tuple[dict[int, float], dict[str, dict[int, float]]]:
    """``(train, evals)``: the train loss by step, and per evaluation series ``"<mode> <key>"`` (``key`` is
    ``loss`` or ``<name>_loss``; e.g. ``"val loss"``) its loss by step; all sorted by step. The train loss is
    the first of ``TRAIN_LOSS_KEYS`` (``loss_mean``, ``loss_single``, ``loss``, ``loss_max``: one per train log
    mode) that has a finite value.

    A step that appears more than once (a resumed run appends to the file) keeps its last value. Non-finite
    values are left out. Raises ``FileNotFoundError`` naming a missing file, ``ValueError`` naming the line of a
    malformed row, and ``ValueError`` listing the keys found when no train row has a finite train loss.
    """
    return _read(metrics_jsonl)[1:]


def _read(metrics_jsonl: str | Path) -> tuple[str, dict[int, float], dict[str, dict[int, float]]]:
    """``(train loss key, train, evals)`` of :func:`read_loss_curves`."""
    path = Path(metrics_jsonl)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    train: dict[str, dict[int, float]] = {key: {} for key in TRAIN_LOSS_KEYS}
    evals: dict[str, dict[int, float]] = defaultdict(dict)
    train_keys: set[str] = set()
    modes: set[str] = set()
    with path.open() as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {number} is not valid JSON ({err.msg}): {line.strip()[:80]!r}") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {number} is not a JSON object: {line.strip()[:80]!r}")
            mode, step = row.get("mode"), row.get(STEP)
            if not isinstance(mode, str) or isinstance(step, bool) or not isinstance(step, int):
                raise ValueError(
                    f"{path}: line {number} lacks a string 'mode' and an integer '{STEP}' "
                    f"(got mode={mode!r}, {STEP}={step!r})"
                )
            modes.add(mode)
            if mode == TRAIN_MODE:
                train_keys.update(row)
                for key, points in train.items():
                    value = _number(row.get(key))
                    if value is not None:
                        points[step] = value
                    elif key in row:
                        points.pop(step, None)  # a later non-finite value replaces an earlier one at this step
                continue
            for key, raw in row.items():
                if not _is_eval_loss_key(key):
                    continue
                series = f"{mode} {key}"
                value = _number(raw)
                if value is not None:
                    evals[series][step] = value
                else:
                    evals[series].pop(step, None)
    train_key = next((key for key, points in train.items() if points), None)
    if train_key is None:
        if not train_keys:
            found = f"no rows with mode {TRAIN_MODE!r} (modes found: {sorted(modes) or 'none, the file is empty'})"
        else:
            found = f"{TRAIN_MODE!r} rows carry only the keys {sorted(train_keys)} (or no finite loss value)"
        raise ValueError(
            f"{path}: no train loss to plot: {found}; expected one of {list(TRAIN_LOSS_KEYS)} in {TRAIN_MODE!r} rows"
        )
    ordered = lambda points: dict(sorted(points.items()))  # noqa: E731
    plain_loss_first = lambda item: (item[0].split(" ")[0], not item[0].endswith(" loss"), item[0])  # noqa: E731
    series = {name: ordered(pts) for name, pts in sorted(evals.items(), key=plain_loss_first) if pts}
    return train_key, ordered(train[train_key]), series


def plot_loss_curve(metrics_jsonl: str | Path, out_png: str | Path, *, title: str | None = None) -> Path:
    """Plot train loss (``loss_mean`` of ``train`` rows, or what the train log modes gave; see
    :func:`read_loss_curves`: a line) and every evaluation loss (``loss`` or ``<name>_loss`` of other modes such
    as ``val``, markers joined by a line) against the step; save a PNG.

    ``title`` defaults to the run directory's name. Returns the path written (parent folders are created).
    Errors as in :func:`read_loss_curves`.
    """
    metrics_jsonl, out_png = Path(metrics_jsonl), Path(out_png)
    train_key, train, evals = _read(metrics_jsonl)

    figure = Figure(figsize=(8, 5), dpi=100, layout="tight")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    steps, losses = list(train), list(train.values())
    axes.plot(steps, losses, label=f"train {train_key}", linewidth=1.2, marker="o" if len(steps) == 1 else None)
    for name, points in evals.items():
        axes.plot(list(points), list(points.values()), label=name, marker="o", markersize=4, linewidth=1.0)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title if title is not None else metrics_jsonl.resolve().parent.name)
    axes.grid(True, alpha=0.3)
    axes.legend()

    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, format="png")
    return out_png
