"""The last raw errors of the `drs` command made clear (issue 66, cases 6 and 8): each names the
argument and what was expected, and comes before any file is written or any epoch runs."""

from __future__ import annotations

import pytest
from run_fixtures import certify_argv, make_run_inputs

from drs_ext import cli
from drs_ext.io.results import read_tsv
from drs_ext.train import Trainer, make_recipe
from drs_ext.train.trainer import TrainConfig


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_run_inputs(tmp_path_factory.mktemp("errors"))


def error_of(capsys, argv) -> str:
    assert cli.main([str(a) for a in argv]) == 2
    return capsys.readouterr().err


def train_argv(inputs, out, *extra) -> list[str]:
    return ["train", "--data", inputs["data"], "--arch", "digits_cnn", "--arch-arg", "width=2"] + [
        "--sigma",
        "0.25",
        "--batch",
        "8",
        "--no-progress",
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


def test_train_with_zero_epochs_is_an_error_and_claims_no_file(inputs, tmp_path, capsys):
    err = error_of(capsys, train_argv(inputs, tmp_path / "run", "--epochs", "0"))
    assert "--epochs must be an integer >= 1, got 0" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="epochs must be an integer >= 1, got 0"):
        TrainConfig(epochs=0)


@pytest.mark.parametrize(
    ("recipe", "arg", "message"),
    [
        ("macer", "lam=abc", "recipe 'macer' parameter lam must be a finite number (default 12.0)"),
        ("consistency", "m=2.5", "recipe 'consistency' parameter m must be an integer (default 2)"),
        ("smoothadv", "epsilon=True", "parameter epsilon must be a finite number"),
        ("macer", "gamma=inf", "parameter gamma must be a finite number"),
    ],
)
def test_recipe_arguments_are_checked_before_training(
    inputs, tmp_path, capsys, monkeypatch, recipe, arg, message
):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(Trainer, "fit", no_training)
    argv = train_argv(inputs, tmp_path / "run", "--recipe", recipe, "--recipe-arg", arg)
    err = error_of(capsys, [*argv, "--epochs", "1"])
    assert message in err
    assert not (tmp_path / "run").exists()


def test_recipe_arguments_of_the_right_type_are_converted():
    assert make_recipe("macer", lam=5).lam == 5.0 and isinstance(
        make_recipe("macer", lam=5).lam, float
    )
    assert make_recipe("consistency", m=4, lam=1).to_dict() == {
        "name": "consistency",
        "m": 4,
        "lam": 1.0,
        "eta": 0.5,
    }


@pytest.mark.parametrize("value", ["0", "-5", "-2"])
def test_max_other_than_minus_one_or_positive_is_an_error(inputs, tmp_path, capsys, value):
    out = tmp_path / "x.tsv"
    err = error_of(capsys, certify_argv(inputs, out, "--max", value))
    assert f"--max must be -1 (no limit) or an image index >= 1 to stop before, got {value}" in err
    assert not out.exists()


def test_max_minus_one_means_every_image_and_max_index_is_its_alias(inputs, tmp_path):
    assert cli.main(certify_argv(inputs, tmp_path / "all.tsv", "--max", "-1")) == 0
    assert len(read_tsv(tmp_path / "all.tsv")) == 8
    assert cli.main(certify_argv(inputs, tmp_path / "three.tsv", "--max-index", "3")) == 0
    assert [r.idx for r in read_tsv(tmp_path / "three.tsv")] == [0, 1, 2]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--n0", "0"], "--n0 must be an integer >= 1"),
        (["--batch", "0"], "--batch must be an integer >= 1"),
        (["--skip", "0"], "--skip must be an integer >= 1"),
        (["--alpha", "nan"], "--alpha must lie in the open interval (0, 1), got nan"),
        (["--sigma", "-1"], "--sigma must be finite and > 0"),
        (["--seed", "-1"], "--seed must be in [0, 2^63)"),
    ],
)
def test_certify_arguments_are_clear_errors(inputs, tmp_path, capsys, flags, message):
    assert message in error_of(capsys, certify_argv(inputs, tmp_path / "x.tsv", *flags))
    assert not (tmp_path / "x.tsv").exists()
