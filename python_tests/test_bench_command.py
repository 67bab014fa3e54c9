"""`drs bench`: the kernel check against the oracle, the timing table and its errors."""

from __future__ import annotations

import numpy as np
import torch

import drs_ext
from drs_ext import cli, reference
from drs_ext.cli import bench
from drs_ext.cli.bench import PlainViews


def error_of(capsys, argv) -> str:
    assert cli.main(argv) == 2
    return capsys.readouterr().err


TINY_BENCH = ["bench", "--device", "cpu", "--shape", "2", "4", "6", "--num", "3"]
TINY_BENCH += ["--repeats", "2", "--warmup", "1"]


def bench_rows(out: str) -> dict[str, dict[str, str]]:
    """The rows of `drs bench`'s table, keyed by partition, as {column: cell}."""
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [
        dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        for line in lines[1:]
    ]
    return {row["partition x fill"].split()[0]: row for row in rows}


def test_drs_bench_prints_both_pipelines_for_each_partition(capsys):
    assert cli.main(TINY_BENCH) == 0
    out = capsys.readouterr().out
    assert "Device: " in out and f"torch {torch.__version__}" in out and "threads" in out
    rows = bench_rows(out)
    assert set(rows) == {"diag", "none"}
    for row in rows.values():
        assert {"plain ms", "drs_ext ms"} <= set(row)
        speedup = float(row["speed-up"].removesuffix("x"))
        assert np.isfinite(speedup) and speedup > 0
        assert float(row["max dev. vs reference"]) < 1e-4
    assert rows["diag"]["views"] == "2 x 3 x 2x4x6"
    # One partition, 16-bit output (the CPU kernel writes it too), an odd width without diag.
    argv = [*TINY_BENCH, "--partition", "none", "--out-dtype", "bf16", "--shape", "1", "3", "5"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert set(bench_rows(out)) == {"none"} and "out bfloat16" in out


def test_drs_bench_errors_name_the_argument(capsys):
    err = error_of(capsys, [*TINY_BENCH, "--shape", "3", "4", "5"])
    assert "--shape 3 4 5 has an odd width W=5" in err and "--partition both" in err
    assert "--num must be >= 1, got 0" in error_of(capsys, [*TINY_BENCH, "--num", "0"])
    err = error_of(capsys, [*TINY_BENCH, "--out-dtype", "float64"])
    assert "--out-dtype must be one of float32, float16, bfloat16" in err and "float64" in err
    assert "--shape" in error_of(capsys, [*TINY_BENCH, "--shape", "0", "4", "4"])
    assert "--repeats" in error_of(capsys, [*TINY_BENCH, "--repeats", "0"])
    assert "--device 'tpu:x'" in error_of(capsys, [*TINY_BENCH, "--device", "tpu:x"])
    if not (torch.cuda.is_available() and drs_ext.built_with_cuda):
        assert "--device cuda:0: " in error_of(capsys, [*TINY_BENCH, "--device", "cuda:0"])


def test_drs_bench_refuses_to_time_a_wrong_op(monkeypatch, capsys):
    """The check before timing compares the op with drs_ext.reference: an op off by 1e-3 fails."""
    real = bench.noisy_views
    monkeypatch.setattr(bench, "noisy_views", lambda *a, **kw: real(*a, **kw) + 1e-3)
    assert cli.main(TINY_BENCH) == 1
    assert "deviates from drs_ext.reference by 1.0" in capsys.readouterr().err


def test_plain_views_fill_like_the_reference():
    """With σ → 0 both pipelines return the fill of the clean sub-image, so the benchmark's
    baseline computes the same function as drs_ext (a fair comparison)."""
    x = torch.rand(3, 6, 8)
    sigma = 1e-8
    expected = reference.noisy_views(
        x[None], [sigma, sigma], num=2, seed=0, partition="diag", fill="neighbors"
    )[0]
    plain = PlainViews(x, "diag")
    for p in (0, 1):
        torch.testing.assert_close(
            plain.branch(p, num=2, sigma=sigma), expected[p], rtol=0, atol=1e-6
        )
    views = PlainViews(x, "none").views(2, sigma, torch.float16)
    assert len(views) == 1 and views[0].dtype == torch.float16 and views[0].shape == (2, 3, 6, 8)
    torch.testing.assert_close(views[0].float(), x.expand(2, -1, -1, -1), rtol=0, atol=2e-3)
