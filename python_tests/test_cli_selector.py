"""The σ-selector and attacks on the command line: `drs train --recipe universal`, `drs train
--selector`, `drs certify --selector`, `drs attack` (every method; the certificate check and its
negative control), their files, resume and errors."""

from __future__ import annotations

import json
import math

import pytest
from test_cli import CERTIFY, cli_on_cpu, error_of, workdir  # noqa: F401

from drs_ext import cli
from drs_ext.attack.results import read_attack_tsv
from drs_ext.io.checkpoint import load_branch
from drs_ext.io.results import read_tsv
from drs_ext.io.settings import sidecar_path
from drs_ext.train import load_selector

LEVELS = ["--levels", "0.25", "0.5", "1.0"]
ATTACK = ["--steps", "2", "--num-noise", "2", "--n", "30", "--no-progress"]


@pytest.fixture(scope="module")
def selector(workdir):  # noqa: F811
    """A universal-σ model fine-tuned from the fixture's RS model, and a selector for it."""
    root, data = workdir
    common = ["--data", data, "--epochs", "1", "--batch", "16", "--no-progress"]
    argv = ["train", *common, "--pretrained", str(root / "rs" / "model.pt"), "--lr", "0.05"]
    argv += ["--recipe", "universal", "--recipe-arg", "sigma_min=0.25", "sigma_max=1.0"]
    assert cli.main([*argv, "--sigma", "0.5", "--out", str(root / "uni")]) == 0
    base = str(root / "uni" / "model.pt")
    argv = ["train", *common, "--selector", "--classifiers", base, "--arch-arg", "width=2"]
    argv += ["hidden=4", "--optimizer", "adam", "--lr", "0.01", "--weight-decay", "0"]
    assert cli.main([*argv, "--out", str(root / "sel")]) == 0
    return root, data, base, str(root / "sel" / "selector.pt")


def rows_without_time(path) -> list[list[str]]:
    return [[*f[:5], *f[6:]] for f in (row.line.split("\t") for row in read_tsv(path))]


def selector_argv(selector, *extra: str) -> list[str]:
    _, data, base, path = selector
    argv = ["--data", data, "--selector", path, "--checkpoint", base, "--lam", "0.5", *LEVELS]
    argv += ["--budget", "0.25", "--selector-noise", "0.25"]
    return [*argv, "--n-selector", "60", *extra]


def test_universal_and_selector_checkpoints(selector, capsys):
    root, data, base, path = selector
    _, spec = load_branch(base)
    assert spec.recipe == {"name": "universal", "sigma_min": 0.25, "sigma_max": 1.0}
    assert spec.sigma == 0.5
    model, payload = load_selector(path)
    assert (model.sigma_min, model.sigma_max) == (0.25, 1.0)  # the classifier's range
    assert payload["classifier"]["recipe"]["name"] == "universal"
    assert (root / "sel" / "selector.log.csv").read_text().startswith("epoch,loss,ce,kl")
    # Resuming a finished run trains nothing more; another objective refuses to resume.
    common = ["train", "--data", data, "--selector", "--classifiers", base, "--no-progress"]
    common += ["--epochs", "1", "--arch-arg", "width=2", "hidden=4", "--out", str(root / "sel")]
    assert cli.main([*common, "--optimizer", "adam", "--resume"]) == 0
    assert "cannot resume" in error_of(capsys, [*common, "--resume"])  # another optimizer
    assert "exists" in error_of(capsys, [*common, "--optimizer", "adam"])  # no --resume
    # The universal model certifies at any σ of its range, and only there.
    argv = ["certify", "--data", data, "--checkpoint", base, *CERTIFY, "--max", "2"]
    assert cli.main([*argv, "--sigma", "0.3", "--out", str(root / "u03.tsv")]) == 0
    settings = json.loads(sidecar_path(root / "u03.tsv").read_text())["settings"]
    assert settings["sigma"] == [0.3]
    err = error_of(capsys, [*argv, "--sigma", "1.5", "--out", str(root / "u15.tsv")])
    assert "outside [0.25, 1]" in err


def test_certify_with_a_selector_writes_sigma_bounds_and_lambda(selector, tmp_path):
    out = tmp_path / "sel.tsv"
    assert cli.main(["certify", *selector_argv(selector, *CERTIFY, "--out", str(out))]) == 0
    header = out.read_text().splitlines()[0].split("\t")
    assert header[6:] == ["sigma", "sigma_lower", "sigma_upper", "lam"]
    rows = read_tsv(out)
    assert len(rows) == 10
    for row in rows:
        sigma, low, high, lam = row.extra
        assert lam == 0.5 and 0.25 <= low <= high <= 1.0
        if row.predict != -1:  # a certified level, and the radius capped by D
            assert sigma in (0.25, 0.5, 1.0) and 0 < row.radius <= 0.25
        if math.isnan(sigma):
            assert row.predict == -1
    settings = json.loads(sidecar_path(out).read_text())["settings"]
    assert settings["method"] == "sigma-selector" and settings["levels"] == [0.25, 0.5, 1.0]
    assert (settings["lam"], settings["n_selector"], settings["budget"]) == (0.5, 60, 0.25)
    assert settings["selector_noise"] == 0.25 and len(settings["selector_sha256"]) == 64
    assert len(settings["checkpoint_sha256"]) == 2
    # Shards merge into the single run, row for row; resume refuses another λ.
    parts = []
    for k in range(2):
        part = tmp_path / "part.tsv"
        argv = selector_argv(selector, *CERTIFY, "--shard", f"{k}/2", "--out", str(part))
        assert cli.main(["certify", *argv]) == 0
        parts.append(str(tmp_path / f"part.shard{k}of2.tsv"))
    assert cli.main(["merge", str(tmp_path / "merged.tsv"), *parts]) == 0
    assert rows_without_time(tmp_path / "merged.tsv") == rows_without_time(out)
    argv = selector_argv(selector, *CERTIFY, "--out", str(out), "--resume")
    argv[argv.index("--lam") + 1] = "0.7"
    assert cli.main(["certify", *argv]) == 2


def attack(argv: list[str], out, *extra: str) -> int:
    return cli.main(["attack", *argv, *ATTACK, "--out", str(out), *extra])


def test_no_attack_beats_a_certificate_of_the_same_model(workdir, tmp_path, capsys):  # noqa: F811
    root, data = workdir
    rs = ["--data", data, "--checkpoint", str(root / "rs" / "model.pt"), "--max", "6"]
    cert = tmp_path / "rs.tsv"
    assert cli.main(["certify", *rs, *CERTIFY, "--out", str(cert)]) == 0
    out = tmp_path / "atk.tsv"
    grid = ["--epsilons", "0.05", "0.1", "2.0"]
    assert attack(rs, out, *grid, "--certificates", str(cert)) == 0
    text = capsys.readouterr().out
    assert "| clean accuracy |" in text and "robust acc. @ ε = 2" in text
    inside = int(text.split("certificate check: ")[1].split(" of them inside")[0].split(", ")[1])
    assert inside > 0 and "0 changed PREDICT's class there" in text
    rows = read_attack_tsv(out)
    assert [(r.idx, r.epsilon) for r in rows[:4]] == [(0, 0.0), (0, 0.05), (0, 0.1), (0, 2.0)]
    assert all(r.delta_norm <= r.epsilon + 1e-5 for r in rows)
    assert (tmp_path / "atk.png").exists()
    # Negative control: false certificates (another class, radius 9) are contradicted.
    fake = tmp_path / "fake.tsv"
    lines = cert.read_text().splitlines()
    body = [line.split("\t") for line in lines[1:]]
    false = ["\t".join([*f[:2], str((int(f[2]) + 1) % 3), "9.0", *f[4:]]) for f in body]
    fake.write_text("\n".join([lines[0], *false]) + "\n")
    assert attack(rs, tmp_path / "atk2.tsv", *grid, "--certificates", str(fake)) == 1
    assert "attacks beat a certificate" in capsys.readouterr().err
    # A crash in the middle of image 3: --resume redoes it and equals the full file.
    text = out.read_text().splitlines()
    out.write_text("\n".join(text[:14]) + "\n" + text[14][:5])
    assert attack(rs, out, *grid, "--resume") == 0
    assert [r for r in read_attack_tsv(out)] == rows


def test_attacks_on_the_selector_never_beat_its_certificates(selector, tmp_path, capsys):
    root, data, base, _ = selector
    cert = tmp_path / "sel.tsv"
    assert (
        cli.main(["certify", *selector_argv(selector, *CERTIFY, "--max", "4", "--out", str(cert))])
        == 0
    )
    for threat in ("classifier", "pipeline"):
        argv = selector_argv(selector, "--max", "4", "--threat", threat)
        out = tmp_path / f"{threat}.tsv"
        assert attack(argv, out, "--epsilons", "0.1", "1.0", "--certificates", str(cert)) == 0
        assert f"σ-selector λ=0.5 ({threat})" in capsys.readouterr().out
        assert len(read_attack_tsv(out)) == 12
    # The certificates must be the attacked model's: another λ is refused.
    argv = selector_argv(selector, "--max", "4")
    argv[argv.index("--lam") + 1] = "0.2"
    err = error_of(
        capsys,
        ["attack", *argv, *ATTACK, "--out", str(tmp_path / "x.tsv"), "--certificates", str(cert)],
    )
    assert "certified another model" in err and "lam" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epsilons", "-0.1"], "--epsilons must be finite numbers >= 0, got -0.1"),
        (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
        (["--num-noise", "0"], "--num-noise must be an integer >= 1"),
        (["--threat", "pipeline"], "--threat applies to σ-routing"),
        (["--lam", "0.5"], "--lam applies to the σ-selector"),
    ],
)
def test_attack_errors(workdir, tmp_path, capsys, flags, message):  # noqa: F811
    root, data = workdir
    argv = ["attack", "--data", data, "--checkpoint", str(root / "rs" / "model.pt")]
    assert message in error_of(capsys, [*argv, *flags, "--out", str(tmp_path / "a.tsv")])
    assert not (tmp_path / "a.tsv").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--lam", "1.5"), "--lam must be a number in [0, 1], got 1.5"),
        (("--budget", "0"), "--budget must be finite and > 0"),
        (("--selector-noise", "-1"), "--selector-noise must be finite and > 0"),
        (("--n-selector", "10"), "the smallest n that works is 49"),
        (("--levels", "0.5"), None),
    ],
)
def test_selector_certify_errors(selector, tmp_path, capsys, change, message):
    argv = selector_argv(selector, *CERTIFY, "--out", str(tmp_path / "s.tsv"))
    flag, value = change
    if flag == "--levels":  # levels must increase
        i = argv.index("--levels")
        argv[i + 1 : i + 4] = ["0.5", "0.25"]
        message = "levels must be strictly increasing"
    else:
        argv[argv.index(flag) + 1] = value
    assert message in error_of(capsys, ["certify", *argv])
    assert not (tmp_path / "s.tsv").exists()
