"""Summaries of certification results: certified accuracy, ACR, abstain rate, tables, plots.

Re-exported by drs_ext/io/results.py, where the rows come from.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .results import Row

__all__ = [
    "Summary",
    "certified_accuracy_at",
    "markdown_table",
    "plot_certified_accuracy",
    "summarize",
]


@dataclass(frozen=True)
class Summary:
    name: str
    images: int
    certified_accuracy: dict[float, float]
    acr: float  # average certified radius: mean over all images of radius · correct
    abstain_rate: float


def _certified(rows: Sequence[Row]) -> tuple[np.ndarray, np.ndarray]:
    radius = np.array([r.radius for r in rows], dtype=float)
    correct = np.array([r.correct for r in rows], dtype=bool)
    return radius, correct


def certified_accuracy_at(rows: Sequence[Row], radii: Iterable[float]) -> np.ndarray:
    """Fraction of images classified correctly with certified radius >= r, for each r.

    The same quantity as Cohen et al.'s analyze.py: ``(correct & (radius >= r)).mean()``.
    """
    radius, correct = _certified(rows)
    r = np.asarray(list(radii), dtype=float)
    if not rows:
        return np.zeros_like(r)
    return (correct[None, :] & (radius[None, :] >= r[:, None])).mean(axis=1)


def summarize(name: str, rows: Sequence[Row], radii: Sequence[float]) -> Summary:
    """Certified accuracy at ``radii``, ACR (as in MACER and Jeong & Shin) and abstain rate."""
    if not rows:
        raise ValueError(f"{name}: no rows to analyse")
    radius, correct = _certified(rows)
    accuracy = certified_accuracy_at(rows, radii)
    return Summary(
        name=name,
        images=len(rows),
        certified_accuracy={float(r): float(a) for r, a in zip(radii, accuracy, strict=True)},
        acr=float((radius * correct).mean()),
        abstain_rate=float(np.mean([r.predict == -1 for r in rows])),
    )


def markdown_table(summaries: Sequence[Summary]) -> str:
    """One column per file, one line per radius, then ACR, abstain rate and image count."""
    radii = list(summaries[0].certified_accuracy)
    lines = [
        "| | " + " | ".join(s.name for s in summaries) + " |",
        "|---|" + "---:|" * len(summaries),
    ]
    for r in radii:
        cells = (f"{100 * s.certified_accuracy[r]:.1f}%" for s in summaries)
        lines.append(f"| cert. acc. @ r = {r:g} | " + " | ".join(cells) + " |")
    lines.append("| ACR | " + " | ".join(f"{s.acr:.3f}" for s in summaries) + " |")
    lines.append(
        "| abstain | " + " | ".join(f"{100 * s.abstain_rate:.1f}%" for s in summaries) + " |"
    )
    lines.append("| images | " + " | ".join(str(s.images) for s in summaries) + " |")
    return "\n".join(lines)


def plot_certified_accuracy(
    curves: dict[str, Sequence[Row]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    radius_caps: dict[str, float] | None = None,
) -> None:
    """PNG of certified accuracy against radius, one line per result file (no display needed).

    radius_caps: name -> the largest radius its sample size can certify, drawn as a dotted line
    in the curve's colour, so a curve's drop to 0 there reads as the budget, not the model.
    """
    # Figure + the Agg canvas directly: headless, and no global pyplot backend is switched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    top = max(
        (r.radius for rows in curves.values() for r in rows if math.isfinite(r.radius)), default=0
    )
    grid = np.linspace(0.0, max(top, 0.1) * 1.05, 400)
    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, rows in curves.items():
        (line,) = ax.plot(grid, certified_accuracy_at(rows, grid), label=name)
        cap = (radius_caps or {}).get(name)
        if cap is not None and math.isfinite(cap):
            ax.axvline(cap, color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("radius (ℓ2)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
