r"""The ``drs`` command: one module per subcommand.

    drs train    --data digits --arch digits_cnn --recipe gaussian --sigma 0.25 --out runs/rs
    drs train    --data digits --pretrained runs/rs/model.pt --partition diag --both-branches \
                 --sigma 0.18 --optimizer adam --lr 1e-3 --epochs 40 --out runs/drs
    drs certify  --data digits --checkpoint runs/rs/model.pt --out rs.tsv
    drs certify  --data digits --checkpoint runs/drs/branch0.pt runs/drs/branch1.pt --out drs.tsv
    drs train    --data digits --selector --classifiers runs/uni/model.pt --out runs/sel \
                 --optimizer adam --lr 3e-3 --weight-decay 0 --epochs 10
    drs certify  --data digits --selector runs/sel/selector.pt --checkpoint runs/uni/model.pt \
                 --lam 0.5 --levels 0.25 0.5 1.0 --out sel.tsv
    drs attack   --data digits --checkpoint runs/rs/model.pt --epsilons 0.25 0.5 1 --out atk.tsv
    drs merge    all.tsv part.shard0of2.tsv part.shard1of2.tsv
    drs analyze  rs.tsv drs.tsv --radii 0 0.25 0.5 --plot curves.png
    drs bench    --shape 3 224 224 --num 100 --out-dtype float16
    drs demo
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from . import analyze, attack, bench, certify, demo, merge, train

__all__ = ["build_parser", "main"]

SUBCOMMANDS = (certify, attack, merge, analyze, train, bench, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drs",
        description="Certified robustness by randomized smoothing (RS) and Dual Randomized "
        "Smoothing (DRS), with σ chosen per input (σ-routing, σ-selector): train, certify, attack, "
        "merge shards, analyze, benchmark.",
        epilog="examples:\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _plain_warnings(args.command, warnings.showwarning)
        try:
            return args.func(args)
        except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
            print(f"drs {args.command}: error: {err}", file=sys.stderr)
            return 2


def _plain_warnings(command: str, show):
    """drs_ext's own warnings (an unchecked result file, NaN logits) as one plain line, like its
    errors; other packages' warnings keep Python's format, with their source line."""
    package = str(Path(__file__).resolve().parents[1])

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if str(Path(filename).resolve()).startswith(package):
            print(f"drs {command}: warning: {message}", file=file or sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning
