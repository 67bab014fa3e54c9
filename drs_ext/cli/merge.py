"""``drs merge OUT IN...``: join the shard TSVs of one run into one file in idx order."""

from __future__ import annotations

import argparse

from ..io.results import merge_tsv


def run(args: argparse.Namespace) -> int:
    rows = merge_tsv(args.output, args.inputs)
    print(f"{args.output}: {rows} rows merged from {len(args.inputs)} files")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="join shard TSVs into one file in idx order")
    p.add_argument("output")
    p.add_argument("inputs", nargs="+")
    p.set_defaults(func=run)
