"""The `drs` command end to end on tiny data: train -> certify -> crash -> resume -> shards ->
merge -> analyze, DRS checkpoints, the error messages, data loaders and the demo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import norm

from drs_ext import cli
from drs_ext.cli.certify import build_smoothed
from drs_ext.cli.common import select_indices
from drs_ext.io.checkpoint import load_branch, load_checkpoint
from drs_ext.io.data import load_dataset
from drs_ext.io.results import read_tsv

CERTIFY = ["--n0", "10", "--n", "30", "--batch", "32", "--no-progress"]


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = (rng.random((n, 8, 8)) * 40).astype(np.uint8)
    for c in range(3):
        x[y == c, c * 2 : c * 2 + 3, :] += 200  # class c is a bright band: learnable in 1 epoch
    return x, y


@pytest.fixture(scope="module", autouse=True)
def cli_on_cpu():
    """These are the command line's CPU tests, also where a GPU is visible (scripts/gpu_check.sh
    runs them there): default_device() would move them onto CUDA, where cuDNN's choice of
    algorithm (TF32, channels_last) can flip a near-tie vote of these tiny models, and the exact
    row comparisons below would compare two devices. test_smoothing.py certifies on CUDA."""
    with pytest.MonkeyPatch.context() as patch:
        for command in cli.SUBCOMMANDS:
            if hasattr(command, "default_device"):
                patch.setattr(command, "default_device", lambda: "cpu")
        yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Tiny npz data, an RS model and a DRS pair fine-tuned from it (Xia et al.'s recipe)."""
    root = tmp_path_factory.mktemp("cli")
    x_train, y_train = make_images(48, 0)
    x_test, y_test = make_images(10, 1)
    np.savez(root / "data.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    data = f"npz:{root / 'data.npz'}"
    common = ["--data", data, "--epochs", "1", "--batch", "16", "--lr", "0.05", "--no-progress"]
    assert (
        cli.main(
            [
                "train",
                *common,
                "--arch",
                "digits_cnn",
                "--arch-arg",
                "width=4",
                "--sigma",
                "0.25",
                "--out",
                str(root / "rs"),
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "train",
                *common,
                "--pretrained",
                str(root / "rs" / "model.pt"),
                "--recipe",
                "consistency",
                "--recipe-arg",
                "m=2",
                "lam=5",
                "--sigma",
                "0.2",
                "--partition",
                "diag",
                "--both-branches",
                "--fill",
                "pair",
                "--out",
                str(root / "drs"),
            ]
        )
        == 0
    )
    return root, data


def rows_without_time(path) -> list[str]:
    return [row.line.rsplit("\t", 1)[0] for row in read_tsv(path)]


def certify(workdir, out, *extra, checkpoints=None) -> int:
    root, data = workdir
    checkpoints = checkpoints or [str(root / "rs" / "model.pt")]
    return cli.main(
        [
            "certify",
            "--data",
            data,
            "--checkpoint",
            *checkpoints,
            *CERTIFY,
            "--out",
            str(out),
            *extra,
        ]
    )


def test_train_writes_self_describing_checkpoints(workdir):
    root, _ = workdir
    _, rs = load_branch(root / "rs" / "model.pt")
    assert (rs.arch, rs.partition, rs.sigma, rs.recipe["name"]) == (
        "digits_cnn",
        "none",
        0.25,
        "gaussian",
    )
    for branch in (0, 1):
        _, spec = load_branch(root / "drs" / f"branch{branch}.pt")
        assert (spec.partition, spec.branch, spec.fill, spec.sigma) == ("diag", branch, "pair", 0.2)
        assert spec.recipe == {"name": "consistency", "m": 2, "lam": 5, "eta": 0.5}
        assert (root / "drs" / f"branch{branch}.log.csv").read_text().startswith("epoch,loss")


def test_certify_resume_after_a_crash_equals_an_uninterrupted_run(workdir, tmp_path, capsys):
    assert certify(workdir, tmp_path / "full.tsv") == 0
    full = rows_without_time(tmp_path / "full.tsv")
    assert len(full) == 10 and [r.split("\t")[0] for r in full] == [str(i) for i in range(10)]
    # A crash while row 6 was being written: the file ends in the middle of that line.
    text = (tmp_path / "full.tsv").read_text()
    cut = text.index("\n6\t") + 5
    (tmp_path / "crashed.tsv").write_text(text[:cut])
    assert certify(workdir, tmp_path / "crashed.tsv", "--resume") == 0
    assert "redoing the half-written last line" in capsys.readouterr().err
    assert rows_without_time(tmp_path / "crashed.tsv") == full
    # Resuming a finished file changes nothing.
    before = (tmp_path / "crashed.tsv").read_text()
    assert certify(workdir, tmp_path / "crashed.tsv", "--resume") == 0
    assert (tmp_path / "crashed.tsv").read_text() == before


def test_shards_and_torchrun_merge_into_the_single_run(workdir, tmp_path, monkeypatch):
    assert certify(workdir, tmp_path / "full.tsv", "--skip", "2") == 0
    for k in range(2):
        assert certify(workdir, tmp_path / "part.tsv", "--skip", "2", "--shard", f"{k}/2") == 0
    assert [r.idx for r in read_tsv(tmp_path / "part.shard1of2.tsv")] == [2, 6]
    merged = tmp_path / "merged.tsv"
    assert (
        cli.main(
            [
                "merge",
                str(merged),
                str(tmp_path / "part.shard1of2.tsv"),
                str(tmp_path / "part.shard0of2.tsv"),
            ]
        )
        == 0
    )
    assert rows_without_time(merged) == rows_without_time(tmp_path / "full.tsv")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert certify(workdir, tmp_path / "env.tsv", "--skip", "2", "--device", "cpu") == 0
    assert rows_without_time(tmp_path / "env.shard1of2.tsv") == rows_without_time(
        tmp_path / "part.shard1of2.tsv"
    )


def test_select_indices_covers_every_image_once():
    shards = [select_indices(100, skip=3, max_index=50, shard=k, shards=4) for k in range(4)]
    assert sorted(sum(shards, [])) == list(range(0, 50, 3))
    assert all(shards)  # sharding by position: no idle worker even though every idx is 0 mod 3


def test_drs_certify_and_analyze(workdir, tmp_path, capsys):
    root, _ = workdir
    pair = [str(root / "drs" / "branch0.pt"), str(root / "drs" / "branch1.pt")]
    assert certify(workdir, tmp_path / "drs.tsv", checkpoints=pair) == 0
    assert certify(workdir, tmp_path / "swapped.tsv", checkpoints=pair[::-1]) == 0
    assert rows_without_time(tmp_path / "drs.tsv") == rows_without_time(tmp_path / "swapped.tsv")
    smoothed, spec = build_smoothed(pair, 0.2, "cpu")
    assert smoothed.fill == spec.fill == "pair"  # certified on the views it was trained on
    assert certify(workdir, tmp_path / "rs.tsv") == 0
    capsys.readouterr()
    plot = tmp_path / "curves.png"
    assert (
        cli.main(
            [
                "analyze",
                str(tmp_path / "rs.tsv"),
                str(tmp_path / "drs.tsv"),
                "--radii",
                "0",
                "0.1",
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| | rs | drs |" in out and "| cert. acc. @ r = 0.1 |" in out and "| ACR |" in out
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_model_call_flags_change_no_certificate(workdir, tmp_path):
    """--channels-last, --cuda-graph (inert off the GPU) and --no-prefetch change timing only;
    --autocast changes the model's logits, so only the rows' shape is checked for it."""
    root, _ = workdir
    pair = [str(root / "drs" / "branch0.pt"), str(root / "drs" / "branch1.pt")]
    assert certify(workdir, tmp_path / "plain.tsv", checkpoints=pair) == 0
    fast = ["--channels-last", "--cuda-graph", "--no-prefetch"]
    assert certify(workdir, tmp_path / "fast.tsv", *fast, checkpoints=pair) == 0
    assert rows_without_time(tmp_path / "fast.tsv") == rows_without_time(tmp_path / "plain.tsv")
    smoothed, _ = build_smoothed(pair, None, "cpu", channels_last=True, prefetch_noise=False)
    assert not smoothed.prefetch_noise and smoothed.model_call.channels_last
    kernels = [w for w in smoothed.branches[0].parameters() if w.dim() == 4]
    assert kernels and all(w.is_contiguous(memory_format=torch.channels_last) for w in kernels)
    assert certify(workdir, tmp_path / "bf16.tsv", "--autocast", "bf16", checkpoints=pair) == 0
    assert len(read_tsv(tmp_path / "bf16.tsv")) == 10


def error_of(capsys, argv) -> str:
    assert cli.main(argv) == 2
    return capsys.readouterr().err


def test_clear_errors(workdir, tmp_path, capsys):
    root, data = workdir
    base = ["certify", "--data", data, *CERTIFY, "--out", str(tmp_path / "x.tsv")]
    branch0, branch1 = str(root / "drs" / "branch0.pt"), str(root / "drs" / "branch1.pt")
    err = error_of(capsys, [*base, "--checkpoint", str(tmp_path / "missing.pt")])
    assert "checkpoint not found" in err and "missing.pt" in err
    err = error_of(capsys, [*base, "--checkpoint", str(root / "rs" / "model.pt"), "--sigma", "0.5"])
    assert "--sigma 0.5 does not match the sigma 0.25" in err
    err = error_of(capsys, [*base, "--checkpoint", branch0, branch1, "--sigma", "0.25"])
    assert "does not match the sigma 0.2" in err
    payload = load_checkpoint(branch1)
    payload["fill"] = "zeros"
    torch.save(payload, tmp_path / "zeros.pt")
    err = error_of(capsys, [*base, "--checkpoint", branch0, str(tmp_path / "zeros.pt")])
    assert "disagree on fill" in err
    err = error_of(capsys, [*base, "--checkpoint", branch0, branch0])
    assert "one branch-0 and one branch-1" in err
    err = error_of(capsys, [*base, "--checkpoint", branch0])
    assert "certify DRS with both branch checkpoints" in err
    (tmp_path / "junk.pt").write_bytes(b"junk")
    err = error_of(capsys, [*base, "--checkpoint", str(tmp_path / "junk.pt")])
    assert "junk.pt: not a readable drs_ext checkpoint" in err
    tsv = tmp_path / "x.tsv"
    header = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
    tsv.write_text(header + "0\t0\tzero\t0.1\t1\t0:00:01\n1\t1\t1\t0.1\t1\t0:00:01\n")
    err = error_of(capsys, [*base, "--checkpoint", str(root / "rs" / "model.pt"), "--resume"])
    assert "x.tsv:2: non-numeric" in err
    err = error_of(capsys, [*base, "--checkpoint", str(root / "rs" / "model.pt")])
    assert "--resume" in err and "--overwrite" in err
    err = error_of(capsys, [*base, "--checkpoint", str(root / "rs" / "model.pt"), "--shard", "2/2"])
    assert "--shard" in err


def test_resume_refuses_a_file_from_another_selection(workdir, tmp_path, capsys):
    assert certify(workdir, tmp_path / "a.tsv", "--max", "3") == 0
    err = error_of(
        capsys,
        [
            "certify",
            "--data",
            workdir[1],
            "--checkpoint",
            str(workdir[0] / "rs" / "model.pt"),
            *CERTIFY,
            "--skip",
            "2",
            "--out",
            str(tmp_path / "a.tsv"),
            "--resume",
        ],
    )
    assert "skip: 1 (the file) vs 2 (this run)" in err
    # A file without its settings (older drs_ext) is still caught by the selection check.
    (tmp_path / "a.tsv.settings.json").unlink()
    err = error_of(
        capsys,
        [
            "certify",
            "--data",
            workdir[1],
            "--checkpoint",
            str(workdir[0] / "rs" / "model.pt"),
            *CERTIFY,
            "--skip",
            "2",
            "--out",
            str(tmp_path / "a.tsv"),
            "--resume",
        ],
    )
    assert "cannot be checked" in err and "--skip/--max/--shard" in err


def test_data_specs(tmp_path):
    from PIL import Image

    x, y = make_images(6, 2)
    rgb = np.repeat(x[..., None], 3, axis=-1)  # (N, H, W, C) uint8
    np.savez(tmp_path / "hwc.npz", images=rgb, labels=y)
    ds = load_dataset(f"npz:{tmp_path / 'hwc.npz'}", "test")
    assert ds.input_shape == (3, 8, 8) and ds.num_classes == 3 and len(ds) == 6
    torch.testing.assert_close(ds[1][0][0], torch.from_numpy(x[1]).float() / 255)
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        folder = tmp_path / "imgs" / "train" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i}.png")
    ds = load_dataset(f"folder:{tmp_path / 'imgs'}", "train")
    assert ds.input_shape == (1, 8, 8) and ds.classes == ["class0", "class1", "class2"]
    torch.testing.assert_close(ds[0][0][0], torch.from_numpy(x[0]).float() / 255)
    digits = load_dataset("digits", "test")
    assert len(digits) == 500 and digits.input_shape == (1, 32, 32)
    assert len(load_dataset("digits", "train")) == 1297
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        load_dataset(f"npz:{tmp_path / 'nothing.npz'}")
    with pytest.raises(ValueError, match="unknown data set spec"):
        load_dataset("mnist")
    if not _has_torchvision():
        with pytest.raises(ImportError, match="torchvision"):
            load_dataset("torchvision:CIFAR10:/tmp")


def _has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def test_demo_runs_end_to_end(tmp_path, capsys):
    argv = [
        "demo",
        "--epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--num-test",
        "4",
        "--n",
        "20",
        "--width",
        "4",
        "--estimator-epochs",
        "1",
        "--label-n",
        "10",
        "--selector-epochs",
        "1",
        "--lams",
        "0",
        "1",
        "--n-selector",
        "50",
        "--attack-num",
        "2",
        "--attack-n",
        "20",
        "--attack-steps",
        "1",
        "--epsilons",
        "0.5",
        "--out-dir",
        str(tmp_path / "demo"),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| | "))
    assert "| RS σ=0.5 |" in header and "| DRS σ=0.354/branch |" in header
    assert "| RS σ=0.25 |" in header and "| RS σ=1 |" in header and "| σ-routed |" in header
    assert "σ-routing: images routed σ = 0.25:" in out
    routed = read_tsv(tmp_path / "demo" / "routed.tsv")
    assert len(routed) == 4 and all(len(row.extra) == 3 for row in routed)
    # The note names the radius cap of n = 20 draws at α = 0.001: σ Φ⁻¹(α^(1/n)) for RS.
    cap = 0.5 * norm.ppf(0.001 ** (1 / 20))
    assert f"RS σ=0.5: {cap:.2f}" in out and "falls to 0 there" in out
    assert f"RS σ=0.5: {cap:.2f}" in (tmp_path / "demo" / "summary.md").read_text()
    for name in ("drs.tsv", "certified_accuracy.png", "summary.md", "drs/branch1.pt"):
        assert (tmp_path / "demo" / name).exists(), name
    assert len(read_tsv(tmp_path / "demo" / "drs.tsv")) == 4
    # The σ-selector's columns (one per λ, the radius capped by D = 0.25) and the attack table.
    assert "| σ-selector λ=0 |" in header and "| σ-selector λ=1 |" in header
    for lam in ("0", "1"):
        rows = read_tsv(tmp_path / "demo" / f"selector_{lam}.tsv")
        assert len(rows) == 4 and all(len(r.extra) == 4 and r.radius <= 0.25 for r in rows)
    attack = next(line for line in out.splitlines() if line.startswith("| | RS σ=0.5 |"))
    assert "σ-selector λ=0.5 (σ fixed)" in attack and "σ-selector λ=0.5 (pipeline)" in attack
    assert "| robust acc. @ ε = 0.5 |" in out and "0 changed PREDICT's class there" in out
    for name in (
        "attack.png",
        "attack_rs.tsv",
        "attack_selector_pipeline.tsv",
        "universal/model.pt",
    ):
        assert (tmp_path / "demo" / name).exists(), name
    assert "robust acc. @ ε = 0.5" in (tmp_path / "demo" / "summary.md").read_text()
    # A rerun resumes (nothing left to do); other settings need --overwrite or another dir.
    assert cli.main(argv) == 0
    assert "other settings" in error_of(capsys, [*argv, "--n", "30"])


def test_cohen_flag_names_are_aliases(workdir, tmp_path):
    """--N0 / --N (Cohen et al.'s certify.py) give the same file as --n0 / --n."""
    root, data = workdir
    rows = {}
    for flags, name in (
        (["--n0", "10", "--n", "30"], "lower"),
        (["--N0", "10", "--N", "30"], "cohen"),
    ):
        argv = ["certify", "--data", data, "--checkpoint", str(root / "rs" / "model.pt")]
        argv += [*flags, "--batch", "32", "--max", "3", "--out", str(tmp_path / f"{name}.tsv")]
        assert cli.main(argv) == 0
        rows[name] = rows_without_time(tmp_path / f"{name}.tsv")
    assert rows["lower"] == rows["cohen"] and len(rows["lower"]) == 3


def test_progress_bars_only_on_a_terminal(workdir, tmp_path, capsys):
    """Off a terminal (a captured log) no bar is drawn even without --no-progress."""
    root, data = workdir
    argv = ["certify", "--data", data, "--checkpoint", str(root / "rs" / "model.pt")]
    argv += ["--n0", "10", "--n", "30", "--max", "2", "--out", str(tmp_path / "log.tsv")]
    assert cli.main(argv) == 0
    assert "it/s" not in capsys.readouterr().err
