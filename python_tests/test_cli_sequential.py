"""`drs certify --sequential`: rows equal to the library's one-image-at-a-time procedures,
independent of the batch size, resumable after a crash, sharded and merged like a fixed-n run,
and its settings recorded and compared."""

from __future__ import annotations

import json
import math

import pytest
from test_cli import cli_on_cpu, error_of, workdir  # noqa: F401  (fixtures)
from test_cli_routed import routing  # noqa: F401  (fixture)
from test_cli_selector import selector, selector_argv  # noqa: F401  (fixture)

from drs_ext import cli
from drs_ext.cli import build_parser
from drs_ext.cli.certify import build_smoothed, validate
from drs_ext.cli.routed import build_router
from drs_ext.cli.selected import build_selected
from drs_ext.io.data import load_dataset
from drs_ext.io.results import read_tsv
from drs_ext.io.rows import radius_text
from drs_ext.io.settings import sidecar_path
from drs_ext.smoothing.at_radius import certify_radius
from drs_ext.smoothing.sequential import certify_sequential
from drs_ext.smoothing.sigma_routing_sequential import (
    certify_routed_radius,
    certify_routed_sequential,
)
from drs_ext.smoothing.sigma_selector_sequential import MAX_N_H, certify_selector_sequential

# max_n = 3000 lets the confident images stop early and the others run to the end.
SEQ = ["--n0", "10", "--n", "3000", "--alpha", "0.01", "--no-progress", "--sequential"]


def rows_without_time(path) -> list[tuple[str, ...]]:
    """Every field but the time (the sixth of Cohen et al.'s, before the samples column)."""
    return [
        tuple(f for k, f in enumerate(row.line.split("\t")) if k != 5) for row in read_tsv(path)
    ]


def certify_seq(workdir, out, *extra, checkpoints=None, batch=64) -> int:  # noqa: F811
    root, data = workdir
    checkpoints = checkpoints or [str(root / "rs" / "model.pt")]
    argv = ["certify", "--data", data, "--checkpoint", *checkpoints, *SEQ]
    return cli.main([*argv, "--batch", str(batch), "--out", str(out), *extra])


def drs_pair(workdir) -> list[str]:  # noqa: F811
    root, _ = workdir
    return [str(root / "drs" / "branch0.pt"), str(root / "drs" / "branch1.pt")]


@pytest.mark.parametrize("method", ["rs", "drs"])
def test_rows_are_the_library_certificates_whatever_the_batch(workdir, tmp_path, method):  # noqa: F811
    root, data = workdir
    checkpoints = drs_pair(workdir) if method == "drs" else [str(root / "rs" / "model.pt")]
    assert certify_seq(workdir, tmp_path / "a.tsv", checkpoints=checkpoints, batch=64) == 0
    assert certify_seq(workdir, tmp_path / "b.tsv", checkpoints=checkpoints, batch=7) == 0
    assert rows_without_time(tmp_path / "a.tsv") == rows_without_time(tmp_path / "b.tsv")
    rows = read_tsv(tmp_path / "a.tsv")
    smoothed, _ = build_smoothed(checkpoints, None, "cpu")
    dataset = load_dataset(data, "test")
    stopped_early = 0
    for row in rows:
        x, label = dataset[row.idx]
        alone = certify_sequential(
            smoothed, x, 10, 3000, 0.01, 100, tol=0.01, seed=0, stream=row.idx
        )
        assert (row.label, row.predict, row.correct) == (
            label,
            alone.prediction,
            alone.prediction == label,
        )
        assert row.radius <= alone.radius and row.radius == pytest.approx(alone.radius, abs=1e-2)
        assert row.extra == (alone.forward_passes,)
        stopped_early += alone.forward_passes < len(smoothed.sigmas) * (10 + 3000)
    assert stopped_early > 0, "no image stopped before max_n: the test shows nothing"
    header = (tmp_path / "a.tsv").read_text().splitlines()[0].split("\t")
    assert header[-1] == "samples"
    settings = json.loads(sidecar_path(tmp_path / "a.tsv").read_text())["settings"]
    assert settings["sequential"] == "radius-estimate" and settings["tol"] == 0.01
    assert settings["n"] == 3000


def test_radius_grid_rows_are_the_radius_test(workdir, tmp_path):  # noqa: F811
    root, data = workdir
    radii = [0.0, 0.1, 0.2, 0.4]
    out = tmp_path / "grid.tsv"
    assert certify_seq(workdir, out, "--radii", *map(str, radii)) == 0
    smoothed, _ = build_smoothed([str(root / "rs" / "model.pt")], None, "cpu")
    dataset = load_dataset(data, "test")
    for row in read_tsv(out):
        x, _ = dataset[row.idx]
        alone = certify_radius(smoothed, x, radii, 10, 3000, 0.01, 100, seed=0, stream=row.idx)
        assert (row.predict, row.radius, row.extra) == (
            alone.prediction,
            alone.radius,
            (alone.forward_passes,),
        )
        assert row.radius in radii
    settings = json.loads(sidecar_path(out).read_text())["settings"]
    assert settings["radii"] == radii and settings["beta"] == 0.01


def test_resume_after_a_crash_and_shards_equal_one_run(workdir, tmp_path, capsys):  # noqa: F811
    full = tmp_path / "full.tsv"
    assert certify_seq(workdir, full) == 0
    expected = rows_without_time(full)
    text = full.read_text()
    cut = text.index("\n6\t") + 5  # the crash came while row 6 was being written
    (tmp_path / "crashed.tsv").write_text(text[:cut])
    (tmp_path / "crashed.tsv.settings.json").write_text(sidecar_path(full).read_text())
    assert certify_seq(workdir, tmp_path / "crashed.tsv", "--resume") == 0
    assert "redoing the half-written last line" in capsys.readouterr().err
    assert rows_without_time(tmp_path / "crashed.tsv") == expected
    for k in range(3):
        assert certify_seq(workdir, tmp_path / "part.tsv", "--shard", f"{k}/3") == 0
    parts = [str(tmp_path / f"part.shard{k}of3.tsv") for k in range(3)]
    assert cli.main(["merge", str(tmp_path / "merged.tsv"), *parts]) == 0
    assert rows_without_time(tmp_path / "merged.tsv") == expected
    assert "samples" in (tmp_path / "merged.tsv").read_text().splitlines()[0]


def test_resume_refuses_other_sequential_settings(workdir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "r.tsv"
    assert certify_seq(workdir, out, "--max", "3") == 0
    assert certify_seq(workdir, out, "--resume", "--tol", "0.05") == 2
    assert "tol: 0.01 (the file) vs 0.05 (this run)" in capsys.readouterr().err
    assert certify_seq(workdir, out, "--resume", "--radii", "0", "0.5") == 2
    err = capsys.readouterr().err
    assert 'sequential: "radius-estimate" (the file) vs "radius-test" (this run)' in err
    fixed = ["certify", "--data", workdir[1], "--checkpoint", str(workdir[0] / "rs" / "model.pt")]
    fixed += ["--n0", "10", "--n", "3000", "--alpha", "0.01", "--no-progress", "--resume"]
    assert cli.main([*fixed, "--out", str(out)]) == 2  # a fixed-n run has no samples column
    assert "samples" in capsys.readouterr().err
    assert len(read_tsv(out)) == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tol", "0.05"], "--tol applies with --sequential only"),
        (["--radii", "0", "0.5"], "--radii applies with --sequential only"),
        (["--sequential", "--tol", "-1"], "--tol must be a finite number >= 0"),
        (["--sequential", "--radii", "0.5", "0.25"], "--radii must be strictly increasing"),
        (["--sequential", "--radii", "0", "nan"], "--radii must be finite numbers >= 0"),
        (["--tol", "0.01"], "--tol applies with --sequential only"),
        (["--sequential", "--beta", "0.01"], "--beta is the level of the radius test's futility"),
        (["--sequential", "--cuda-graph"], "--cuda-graph does not apply with --sequential"),
        (["--sequential", "--no-prefetch"], "--no-prefetch does not apply with --sequential"),
        (["--sequential", "--radii", "0", "--beta", "1.5"], "--beta must lie in the open"),
        (["--sequential", "--radii", "0", "--tol", "0.1"], "--tol applies to the radius estimate"),
        (["--sequential", "--radii", "0", "--tol", "0.01"], "--tol applies to the radius estimate"),
        (
            [
                "--sequential",
                "--selector",
                "s.pt",
                "--lam",
                "0.5",
                "--levels",
                "0.5",
                "--radii",
                "0",
            ],
            "--radii does not apply with --selector",
        ),
    ],
)
def test_clear_errors(workdir, tmp_path, capsys, extra, message):  # noqa: F811
    root, data = workdir
    out = tmp_path / "x.tsv"
    argv = ["certify", "--data", data, "--checkpoint", str(root / "rs" / "model.pt")]
    assert message in error_of(capsys, [*argv, "--no-progress", "--out", str(out), *extra])
    assert not out.exists() and not sidecar_path(out).exists()


def test_selector_sample_limit_is_the_most_draws_with_sequential(selector, tmp_path):  # noqa: F811
    """--n-selector is the most selector draws of a sequential test: any number >= 1 is sound
    (a fixed N_h must carry the order statistics, test_cli_selector), and it defaults to the
    library's max_n_h."""
    argv = ["certify", *selector_argv(selector), "--out", str(tmp_path / "s.tsv")]
    args = build_parser().parse_args([*argv, "--sequential", "--n-selector", "10"])
    validate(args)
    assert args.n_selector == 10
    args = build_parser().parse_args([a for a in argv if a not in ("--n-selector", "60")])
    args.sequential = True
    validate(args)
    assert args.n_selector == MAX_N_H


def test_selector_rows_are_the_sequential_selector(selector, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "sel.tsv"
    argv = ["certify", *selector_argv(selector), "--n0", "10", "--n", "2000", "--alpha", "0.01"]
    argv += ["--batch", "64", "--no-progress", "--sequential", "--tol", "0.02"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    args = build_parser().parse_args([*argv, "--out", str(out)])
    model, _ = build_selected(args, "cpu")
    dataset = load_dataset(selector[1], "test")
    rows = read_tsv(out)
    assert len(rows) == 10
    for row in rows:
        x, _ = dataset[row.idx]
        alone = certify_selector_sequential(
            model, x, 10, 2000, 0.01, 64, lam=0.5, max_n_h=60, tol=0.02, seed=0, stream=row.idx
        )
        assert (row.predict, row.radius) == (alone.prediction, float(radius_text(alone.radius)))
        sigma, lam, selector_passes, passes = row.extra
        assert (
            sigma == alone.sigma or math.isnan(sigma) and math.isnan(alone.sigma)
        ) and lam == 0.5
        assert (selector_passes, passes) == (alone.selector_forward_passes, alone.forward_passes)
    settings = json.loads(sidecar_path(out).read_text())["settings"]
    assert settings["sequential"] == "radius-estimate" and settings["lam"] == 0.5
    # Resume of a finished file adds nothing; other settings are refused.
    assert cli.main([*argv, "--out", str(out), "--resume"]) == 0 and len(read_tsv(out)) == 10
    other = [a if a != "0.02" else "0.05" for a in argv]
    assert cli.main([*other, "--out", str(out), "--resume"]) == 2
    assert "tol: 0.02 (the file) vs 0.05 (this run)" in capsys.readouterr().err


@pytest.mark.parametrize("question", ["estimate", "radii"])
def test_routed_rows_are_the_sequential_router(routing, tmp_path, question):  # noqa: F811
    root, data, experts, estimator = routing
    out = tmp_path / "routed.tsv"
    argv = ["certify", "--data", data, "--estimator", estimator, "--checkpoint", *experts, *SEQ]
    radii = [0.0, 0.1, 0.2]
    argv += ["--radii", *map(str, radii)] if question == "radii" else []
    assert cli.main([*argv, "--batch", "50", "--out", str(out)]) == 0
    header = out.read_text().splitlines()[0].split("\t")
    assert header[6:] == ["sigma", "radius_sigma", "radius_c", "samples"]
    router, _ = build_router(estimator, experts, "cpu")
    dataset = load_dataset(data, "test")
    rows = read_tsv(out)
    assert len(rows) == 10
    for row in rows:
        x, _ = dataset[row.idx]
        if question == "radii":
            # --beta defaults to --alpha, at each stage (the library's default is the stage's α).
            alone = certify_routed_radius(
                router, x, radii, 10, 3000, 0.01, 64, beta=0.01, seed=0, stream=row.idx
            )
            assert row.radius == alone.radius
        else:
            alone = certify_routed_sequential(router, x, 10, 3000, 0.01, 64, seed=0, stream=row.idx)
            assert row.radius == float(radius_text(alone.radius))
        assert row.predict == alone.prediction
        expected = (alone.sigma, alone.radius_sigma, alone.radius_c, alone.forward_passes)
        assert all(
            a == b or (math.isnan(a) and math.isnan(b))
            for a, b in zip(row.extra, expected, strict=True)
        )
    settings = json.loads(sidecar_path(out).read_text())["settings"]
    if question == "radii":  # what ran is recorded: beta = alpha
        assert (settings["radii"], settings["beta"]) == (radii, 0.01)
    # Shards merge into the single run.
    for k in range(2):
        assert (
            cli.main([*argv, "--batch", "7", "--out", str(tmp_path / "p.tsv"), "--shard", f"{k}/2"])
            == 0
        )
    parts = [str(tmp_path / f"p.shard{k}of2.tsv") for k in range(2)]
    assert cli.main(["merge", str(tmp_path / "merged.tsv"), *parts]) == 0
    assert rows_without_time(tmp_path / "merged.tsv") == rows_without_time(out)
