"""``drs analyze``: certified accuracy at given radii, ACR and abstain rate of result files,
as a markdown table, and optionally a plot of certified accuracy against radius."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..io.results import markdown_table, plot_certified_accuracy, read_tsv, summarize
from .common import DEFAULT_RADII


def _names(paths: Sequence[str]) -> list[str]:
    stems = [Path(p).stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]


def analyze(
    paths: Sequence[str | Path],
    radii: Sequence[float],
    plot: str | Path | None = None,
    names: Sequence[str] | None = None,
    *,
    title: str | None = None,
    radius_caps: dict[str, float] | None = None,
) -> str:
    """Markdown table of the result files (and the plot, when asked); returns the table."""
    names = list(names) if names else _names([str(p) for p in paths])
    if len(names) != len(paths):
        raise ValueError(f"--names needs one name per file ({len(paths)}), got {len(names)}")
    rows = {name: read_tsv(path) for name, path in zip(names, paths, strict=True)}
    table = markdown_table([summarize(name, r, radii) for name, r in rows.items()])
    if plot:
        plot_certified_accuracy(rows, plot, title=title, radius_caps=radius_caps)
    return table


def run(args: argparse.Namespace) -> int:
    print(analyze(args.tsv, args.radii, args.plot, args.names, title=args.title))
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="certified accuracy table, ACR, abstain rate, plot")
    p.add_argument("tsv", nargs="+")
    p.add_argument("--radii", type=float, nargs="+", default=list(DEFAULT_RADII))
    p.add_argument("--plot", help="write a PNG of certified accuracy against radius")
    p.add_argument("--names", nargs="+", help="column names (default: file names)")
    p.add_argument("--title", help="title of the plot")
    p.set_defaults(func=run)
