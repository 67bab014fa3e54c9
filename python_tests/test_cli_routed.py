"""σ-routing on the command line: `drs train --sigma-estimator`, `--finetune-experts` and
`drs certify --estimator`, their files and their errors."""

from __future__ import annotations

import json

import pytest
from test_cli import CERTIFY, cli_on_cpu, error_of, workdir  # noqa: F401  (fixtures)

from drs_ext import cli
from drs_ext.io.checkpoint import load_branch
from drs_ext.io.results import read_tsv
from drs_ext.io.settings import sidecar_path


@pytest.fixture(scope="module")
def routing(workdir):  # noqa: F811
    """A second RS level (σ = 0.5) beside the fixture's σ = 0.25 model, and an estimator."""
    root, data = workdir
    common = ["--data", data, "--epochs", "1", "--batch", "16", "--no-progress"]
    rs05 = ["train", *common, "--pretrained", str(root / "rs" / "model.pt"), "--lr", "0.05"]
    assert cli.main([*rs05, "--sigma", "0.5", "--out", str(root / "rs05")]) == 0
    experts = [str(root / "rs" / "model.pt"), str(root / "rs05" / "model.pt")]
    argv = ["train", *common, "--sigma-estimator", "--levels", "0.25", "0.5", "--sigma", "0.5"]
    argv += ["--classifiers", *experts, "--arch", "digits_cnn", "--arch-arg", "width=4"]
    argv += ["--label-n", "20", "--lr", "0.01", "--optimizer", "adam"]
    assert cli.main([*argv, "--out", str(root / "router")]) == 0
    return root, data, experts, str(root / "router" / "estimator.pt")


def test_estimator_checkpoint_knows_its_levels(routing) -> None:
    root, _, _, estimator = routing
    _, spec = load_branch(estimator)
    assert spec.levels == (0.25, 0.5) and spec.num_classes == 2 and spec.sigma == 0.5
    assert (root / "router" / "labels.pt").exists()
    assert "σ-estimator over levels (0.25, 0.5)" in spec.describe()


def test_certify_with_an_estimator_writes_the_stage_columns(routing, tmp_path) -> None:
    _, data, experts, estimator = routing
    out = tmp_path / "routed.tsv"
    argv = ["certify", "--data", data, "--estimator", estimator, "--checkpoint", *experts]
    assert cli.main([*argv, *CERTIFY, "--max", "4", "--out", str(out)]) == 0
    header = out.read_text().splitlines()[0].split("\t")
    assert header == ["idx", "label", "predict", "radius", "correct", "time", "sigma"] + [
        "radius_sigma",
        "radius_c",
    ]
    rows = read_tsv(out)
    assert [r.idx for r in rows] == [0, 1, 2, 3]
    for row in rows:
        sigma, r_sigma, r_c = row.extra
        if row.predict != -1:  # R = min(R_σ, R_c), both stages certified at a level of Σ
            assert sigma in (0.25, 0.5) and min(r_sigma, r_c) * 0.989 <= row.radius <= min(
                r_sigma, r_c
            )
    settings = json.loads(sidecar_path(out).read_text())["settings"]
    assert settings["method"] == "sigma-routing" and settings["levels"] == [0.25, 0.5]
    assert len(settings["checkpoint_sha256"]) == 3
    # Resume continues the same file; a different estimator σ-level set is another run.
    assert cli.main([*argv, *CERTIFY, "--max", "6", "--out", str(out), "--resume"]) == 0
    assert len(read_tsv(out)) == 6


def test_one_classifier_serves_every_level(routing, tmp_path) -> None:
    _, data, experts, estimator = routing
    out = tmp_path / "one.tsv"
    argv = ["certify", "--data", data, "--estimator", estimator, "--checkpoint", experts[0]]
    assert cli.main([*argv, *CERTIFY, "--max", "2", "--out", str(out)]) == 0
    settings = json.loads(sidecar_path(out).read_text())["settings"]
    assert [c["sigma"] for c in settings["classifiers"]] == [[0.25], [0.5]]


def test_finetune_experts_writes_one_checkpoint_per_level(routing) -> None:
    root, data, experts, estimator = routing
    argv = ["train", "--data", data, "--epochs", "1", "--batch", "16", "--no-progress"]
    argv += ["--finetune-experts", "--estimator", estimator, "--classifiers", *experts]
    assert cli.main([*argv, "--sigma", "0.5", "--out", str(root / "experts")]) == 0
    for i, sigma in enumerate((0.25, 0.5)):
        _, spec = load_branch(root / "experts" / f"level{i}.pt")
        assert spec.sigma == sigma and spec.levels is None


def test_routing_errors_name_the_problem_and_write_nothing(routing, tmp_path, capsys) -> None:
    _, data, experts, estimator = routing
    out = tmp_path / "bad.tsv"
    base = ["certify", "--data", data, *CERTIFY, "--out", str(out)]
    err = error_of(capsys, [*base, "--estimator", experts[0], "--checkpoint", *experts])
    assert "is a classifier, not a σ-estimator" in err
    err = error_of(capsys, [*base, "--estimator", estimator, "--checkpoint", estimator])
    assert "is a σ-estimator" in err
    err = error_of(capsys, [*base, "--estimator", estimator, "--checkpoint", *experts, experts[0]])
    assert "two RS classifiers at σ = 0.25" in err
    err = error_of(
        capsys, [*base, "--estimator", estimator, "--sigma", "0.5", "--checkpoint", *experts]
    )
    assert "--sigma does not apply with --estimator" in err
    assert not out.exists()
    train = ["train", "--data", data, "--epochs", "1", "--sigma", "0.5", "--out", str(tmp_path)]
    err = error_of(capsys, [*train, "--sigma-estimator", "--levels", "0.5", "0.25"])
    assert "--levels, --classifiers and --arch" in err
    argv = [*train, "--sigma-estimator", "--levels", "0.5", "0.25", "--arch", "digits_cnn"]
    assert "strictly increasing" in error_of(capsys, [*argv, "--classifiers", *experts])
    argv = [*train, "--sigma-estimator", "--levels", "0.25", "0.5", "--arch", "digits_cnn"]
    err = error_of(capsys, [*argv, "--classifiers", *experts, "--recipe-arg", "beta=2"])
    assert "takes m, lam, eta" in err
