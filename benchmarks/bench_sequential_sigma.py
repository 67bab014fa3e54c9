"""Sequential certification of the input-dependent σ methods against their fixed-n CERTIFY, side
by side through `drs certify` on the same models and images: forward passes per image, time,
certified accuracy, ACR.

    python benchmarks/bench_sequential_sigma.py [--models DIR] [--skip 10] [--no-write]

Models: the digits demo's (`drs demo --out-dir DIR`, run here when DIR lacks them, about 40 s
on 2 cores): σ-routing's estimator and its RS experts at Σ = {0.25, 0.5, 1}, and the σ-selector
over the same levels with D = s = 0.25 on the universal base classifier, at λ = 0.5.

Procedures (alpha = 0.001, n0 = 100, n = 100,000 per stage, seed 0, the test digits 0, skip,
2·skip, ...):
- σ-routing: fixed n (α/2 per stage), then `--sequential` (radius estimate, tol 0.01, n the
  most draws per stage) and `--sequential --radii` on the accuracy grid;
- σ-selector: fixed N_h = 1000 selector draws (α/4 + α/4) and n, then `--sequential` with at
  most 1000 selector draws and n classifier draws (tol 0.01), and with at most 5000 selector
  draws (an anytime-valid test needs more draws than a fixed-n one for the same answer).
Forward passes: the sequential TSVs' `samples` column; for a fixed n, n0 + n per stage that ran
(the classifier stage runs only when the first stage certified its σ).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from common import markdown, provenance, write_section

from drs_ext import cli
from drs_ext.cli.bench import device_description
from drs_ext.io.results import read_tsv
from drs_ext.smoothing.sequential import certified_accuracy

RADII = [0.0, 0.25, 0.5, 0.75, 1.0]
LEVELS = ["0.25", "0.5", "1.0"]
MODELS = ("router/estimator.pt", "rs_0.25/model.pt", "rs/model.pt", "rs_1/model.pt")
SELECTOR = ("selector/selector.pt", "universal/model.pt")
N_H = 1000  # the fixed-n selector draws (and the sequential ones' most, but for the last row)


def procedures(models: Path) -> list[tuple[str, str, list[str]]]:
    """(method, procedure, the `drs certify` arguments but --out), each method's fixed n first."""
    estimator, *experts = (str(models / f) for f in MODELS)
    selector, universal = (str(models / f) for f in SELECTOR)
    routed = ["--estimator", estimator, "--checkpoint", *experts]
    selected = ["--selector", selector, "--checkpoint", universal, "--lam", "0.5"]
    selected += ["--levels", *LEVELS, "--budget", "0.25", "--selector-noise", "0.25"]
    selected += ["--n-selector", str(N_H)]
    grid = ["--radii", *map(str, RADII)]
    return [
        ("σ-routing", "fixed n", routed),
        ("σ-routing", "sequential estimate, tol 0.01", [*routed, "--sequential"]),
        ("σ-routing", "sequential certify at r (grid)", [*routed, "--sequential", *grid]),
        ("σ-selector", "fixed N_h, n", selected),
        ("σ-selector", "sequential estimate, tol 0.01", [*selected, "--sequential"]),
        (
            "σ-selector",
            "sequential estimate, tol 0.01, N_h <= 5000",
            [*selected[:-1], "5000", "--sequential"],
        ),
    ]


def forward_passes(method: str, rows, columns: list[str], n0: int, n: int, n_h: int) -> float:
    """Mean forward passes per image: the samples column, or the fixed-n cost of the stages that
    ran (stage 2 runs when the TSV's sigma is not nan)."""
    if "samples" in columns:
        return float(np.mean([r.extra[-1] for r in rows]))
    first = n0 + n if method == "σ-routing" else n_h
    ran = [not math.isnan(r.extra[columns.index("sigma")]) for r in rows]
    return float(np.mean([first + (n0 + n) * second for second in ran]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="benchmarks/out/demo", help="a `drs demo` output dir")
    p.add_argument("--skip", type=int, default=10, help="certify every skip-th test digit")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    args = p.parse_args(argv)
    started = time.perf_counter()
    models = Path(args.models)
    if not all((models / f).exists() for f in MODELS + SELECTOR):
        print(f"training the demo's models into {models} ...", file=sys.stderr)
        demo = ["demo", "--out-dir", str(models), "--num-test", "20", "--attack-num", "4"]
        if cli.main([*demo, "--no-progress", "--overwrite"]) != 0:
            return 1
    common = ["--data", "digits", "--n0", str(args.n0), "--n", str(args.n)]
    common += ["--alpha", str(args.alpha), "--batch", str(args.batch), "--skip", str(args.skip)]
    common += ["--device", "cpu", "--no-progress", "--overwrite"]
    out_dir = models / "bench_sequential_sigma"
    out_dir.mkdir(exist_ok=True)
    table, baseline = [], {}
    for k, (method, name, extra) in enumerate(procedures(models)):
        out = out_dir / f"{k}.tsv"
        clock = time.perf_counter()
        if cli.main(["certify", *common, *extra, "--out", str(out)]) != 0:
            return 1
        seconds = time.perf_counter() - clock
        rows = read_tsv(out)
        columns = out.read_text().splitlines()[0].split("\t")[6:]  # the extra columns
        passes = forward_passes(method, rows, columns, args.n0, args.n, N_H)
        baseline.setdefault(method, passes)
        labels = [r.label for r in rows]
        accuracy = certified_accuracy([(r.predict, r.radius) for r in rows], labels, RADII)
        acr = np.mean([r.radius if r.correct else 0.0 for r in rows])
        table.append(
            [method, name, f"{passes:,.0f}", f"{baseline[method] / passes:.1f}x"]
            + [f"{1000 * seconds / len(rows):,.0f}"]
            + [f"{100 * a:.1f}" for a in accuracy]
            + ["—" if "grid" in name else f"{acr:.3f}"]
        )
        print(" | ".join(table[-1]), file=sys.stderr)
    header = ["method", "procedure", "forward passes / image", "fewer", "ms / image"]
    header += [f"acc @ {r:g}" for r in RADII] + ["ACR"]
    minutes = (time.perf_counter() - started) / 60
    command = "python benchmarks/bench_sequential_sigma.py " + " ".join(argv or sys.argv[1:])
    text = "\n\n".join(
        [
            provenance(device_description("cpu"), command.strip(), minutes),
            f"{len(rows)} test digits (every {args.skip}th), the digits demo's models; alpha = "
            f"{args.alpha:g}, n0 = {args.n0}, n = {args.n:,} per stage (the most, for the "
            "sequential runs), batches of "
            f"{args.batch}; σ-selector at λ = 0.5, D = s = 0.25, N_h = 1000 (the most, "
            "sequential). 'fewer' = the fixed-n procedure's forward passes / this one's; "
            "accuracy in %; ms / image from the run's wall time. The σ-selector certifies at "
            "most D = 0.25.",
            markdown(header, table),
        ]
    )
    print(text)
    if not args.no_write:
        write_section("Sequential certification, σ methods", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
