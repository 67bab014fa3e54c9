"""``drs merge OUT IN...``: join the shard TSVs of one run into one file in idx order.

The inputs' settings files must agree (all but the shard index), the shards must be all N of
one split, each finished, and an existing OUT is only replaced with --overwrite
(drs_ext/io/results.py merge_tsv).
"""

from __future__ import annotations

import argparse

from ..io.results import merge_tsv


def run(args: argparse.Namespace) -> int:
    rows = merge_tsv(
        args.output, args.inputs, overwrite=args.overwrite, allow_incomplete=args.allow_incomplete
    )
    print(f"{args.output}: {rows} rows merged from {len(args.inputs)} files")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="join shard TSVs into one file in idx order")
    p.add_argument("output")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="merge even if a shard is missing or unfinished (a warning instead of an error)",
    )
    p.set_defaults(func=run)
