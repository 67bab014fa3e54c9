"""Certification results in Cohen et al.'s TSV format: write, resume, merge, analyse, plot.

The format is the one ``certify.py`` of Cohen et al. (2019) writes, so their ``analyze.py`` and
the tools built on it read our files unchanged::

    idx<TAB>label<TAB>predict<TAB>radius<TAB>correct<TAB>time
    0<TAB>3<TAB>3<TAB>0.912<TAB>1<TAB>0:00:01.234567

``radius`` is written with ``"{:.3}"`` (three significant digits), ``correct`` as 0/1, ``time``
as ``str(datetime.timedelta)``; an abstention is ``predict = -1``, ``radius = 0.0``. One row per
image, flushed as soon as it is known, so a crash loses at most the row being written.
"""

from __future__ import annotations

import datetime
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "HEADER",
    "Row",
    "Summary",
    "TsvWriter",
    "certified_accuracy_at",
    "format_row",
    "markdown_table",
    "merge_tsv",
    "parse_row",
    "plot_certified_accuracy",
    "read_tsv",
    "summarize",
]

FIELDS = ("idx", "label", "predict", "radius", "correct", "time")
HEADER = "\t".join(FIELDS)
_TIME = re.compile(r"^(-?\d+ days?, )?\d+:\d\d:\d\d(\.\d+)?$")


@dataclass(frozen=True)
class Row:
    idx: int
    label: int
    predict: int
    radius: float
    correct: int
    time: str
    line: str  # the row as written, so merging never re-formats a number


def format_row(
    idx: int, label: int, predict: int, radius: float, correct: bool | int, seconds: float
) -> str:
    """One TSV line (no newline), formatted exactly as Cohen et al.'s certify.py does."""
    time_elapsed = str(datetime.timedelta(seconds=seconds))
    return f"{idx}\t{label}\t{predict}\t{radius:.3}\t{int(correct)}\t{time_elapsed}"


def parse_row(line: str, where: str) -> Row:
    """Parse one data line; ``where`` ("file:line") prefixes the error message."""
    fields = line.split("\t")
    if len(fields) != len(FIELDS):
        raise ValueError(f"{where}: expected {len(FIELDS)} tab-separated fields, got {len(fields)}")
    try:
        idx, label, predict, correct = (int(fields[i]) for i in (0, 1, 2, 4))
        radius = float(fields[3])
    except ValueError as err:
        raise ValueError(f"{where}: non-numeric field in {line!r} ({err})") from err
    if idx < 0 or correct not in (0, 1) or not (radius >= 0.0) or not _TIME.match(fields[5]):
        raise ValueError(f"{where}: invalid row {line!r}")
    return Row(idx, label, predict, radius, correct, fields[5], line)


def _check_header(first_line: str, path: Path) -> None:
    if first_line.rstrip("\r") != HEADER:
        raise ValueError(
            f"{path}:1: not a certification TSV: header is {first_line!r}, expected {HEADER!r}"
        )


def read_tsv(path: str | os.PathLike) -> list[Row]:
    """All rows of a complete TSV; any malformed line (even the last) raises ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    lines = path.read_text().split("\n")
    if lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: empty file, expected the header {HEADER!r}")
    _check_header(lines[0], path)
    rows = [parse_row(line, f"{path}:{n}") for n, line in enumerate(lines[1:], start=2)]
    _check_increasing(rows, path)
    return rows


def _check_increasing(rows: Sequence[Row], path: Path) -> None:
    for n, (prev, row) in enumerate(zip(rows, rows[1:], strict=False), start=3):
        if row.idx <= prev.idx:
            raise ValueError(f"{path}:{n}: idx {row.idx} does not increase (previous {prev.idx})")


def _scan_for_resume(path: Path) -> tuple[list[Row], int, str | None]:
    """(complete rows, byte length to keep, the half-written line dropped or None)."""
    data = path.read_bytes()
    if b"\n" not in data:
        # Crashed before the header's newline: anything that is a prefix of it is redone.
        if HEADER.encode().startswith(data):
            return [], 0, None
        _check_header(data.decode(errors="replace"), path)
    header_end = data.index(b"\n") + 1
    _check_header(data[: header_end - 1].decode(errors="replace"), path)
    body = data[header_end:].decode()
    complete, _, partial = body.rpartition("\n")
    lines = complete.split("\n") if complete else []
    keep = len(data) - len(partial.encode())
    dropped = partial or None
    rows = [parse_row(line, f"{path}:{n}") for n, line in enumerate(lines[:-1], start=2)]
    if lines:
        # The last complete line can only be damaged by the crash too: redo it, do not fail.
        try:
            rows.append(parse_row(lines[-1], f"{path}:{len(lines) + 1}"))
        except ValueError:
            keep -= len(lines[-1].encode()) + 1
            dropped = lines[-1] + ("\n" + partial if partial else "")
    _check_increasing(rows, path)
    return rows, keep, dropped


class TsvWriter:
    """Appends rows to a TSV, each flushed at once; ``resume=True`` continues an existing file.

    Resuming validates the header and every row, and truncates a half-written last line (no
    trailing newline, wrong field count or unparsable) so that image is certified again; a
    malformed line before it is an error, not something to silently drop. ``done`` holds the
    rows already in the file. Without ``resume`` an existing file is only replaced when
    ``overwrite`` is set, so a typo never destroys hours of certification.
    """

    def __init__(self, path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.done: list[Row] = []
        self.dropped: str | None = None
        if resume and self.path.exists():
            self.done, keep, self.dropped = _scan_for_resume(self.path)
            with self.path.open("r+b") as f:
                f.truncate(keep)
        elif self.path.exists() and not overwrite:
            raise FileExistsError(
                f"{self.path} exists; pass --resume to continue it or --overwrite to replace it"
            )
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
        self._file = self.path.open("a")
        if self._file.tell() == 0:
            self._file.write(HEADER + "\n")
            self._file.flush()

    @property
    def last_idx(self) -> int:
        return self.done[-1].idx if self.done else -1

    def write(
        self, idx: int, label: int, predict: int, radius: float, correct: bool | int, seconds: float
    ) -> None:
        if idx <= self.last_idx:
            raise ValueError(f"{self.path}: idx {idx} written after idx {self.last_idx}")
        line = format_row(idx, label, predict, radius, correct, seconds)
        self._file.write(line + "\n")
        self._file.flush()
        self.done.append(parse_row(line, str(self.path)))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TsvWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def merge_tsv(out: str | os.PathLike, inputs: Sequence[str | os.PathLike]) -> int:
    """Join shard files into ``out`` in idx order; returns the number of rows.

    Every input must be a complete TSV with the standard header; an idx present in two inputs
    is an error (shards overlap, or one file was given twice).
    """
    out = Path(out)
    if not inputs:
        raise ValueError("merge needs at least one input file")
    if any(Path(p).resolve() == out.resolve() for p in inputs):
        raise ValueError(f"the output {out} is also an input; write the merge to a new file")
    owner: dict[int, Path] = {}
    rows: list[Row] = []
    for path in map(Path, inputs):
        for row in read_tsv(path):
            if row.idx in owner:
                raise ValueError(f"idx {row.idx} appears in both {owner[row.idx]} and {path}")
            owner[row.idx] = path
            rows.append(row)
    rows.sort(key=lambda r: r.idx)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in [HEADER, *(r.line for r in rows)]))
    os.replace(tmp, out)
    return len(rows)


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
