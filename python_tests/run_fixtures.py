"""Tiny inputs for the tests that run `drs certify` / `drs merge` as a user does: an npz data set
of 8×8 images and untrained checkpoints (an RS model and a DRS pair). Untrained models are
enough there: those tests compare files, settings and errors, not accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from drs_ext.io.checkpoint import BranchSpec, save_checkpoint

NUM_IMAGES = 8
FAST = ["--n0", "4", "--n", "8", "--batch", "16", "--no-progress", "--device", "cpu"]


def make_run_inputs(root: Path) -> dict:
    """{"data": spec, "rs": path, "drs": [branch0, branch1], "rs_other": another RS model}."""
    rng = np.random.default_rng(3)
    x = (rng.random((NUM_IMAGES, 8, 8)) * 255).astype(np.uint8)
    y = np.arange(NUM_IMAGES) % 3
    np.savez(root / "data.npz", x_test=x, y_test=y, x_train=x, y_train=y)
    base = BranchSpec(
        arch="digits_cnn",
        num_classes=3,
        input_shape=(1, 8, 8),
        sigma=0.25,
        arch_kwargs={"width": 2},
    )
    paths: dict = {"data": f"npz:{root / 'data.npz'}"}
    for name, seed in (("rs", 0), ("rs_other", 1)):
        torch.manual_seed(seed)
        save_checkpoint(root / f"{name}.pt", base.build_model(), base)
    paths["rs"], paths["rs_other"] = str(root / "rs.pt"), str(root / "rs_other.pt")
    paths["drs"] = []
    for branch in (0, 1):
        spec = BranchSpec(
            arch=base.arch,
            num_classes=3,
            input_shape=(1, 8, 8),
            sigma=0.2,
            partition="diag",
            branch=branch,
            fill="pair",
            arch_kwargs={"width": 2},
        )
        torch.manual_seed(10 + branch)
        save_checkpoint(root / f"branch{branch}.pt", spec.build_model(), spec)
        paths["drs"].append(str(root / f"branch{branch}.pt"))
    return paths


def certify_argv(inputs: dict, out: Path, *extra: str, checkpoints=None) -> list[str]:
    checkpoints = checkpoints or [inputs["rs"]]
    return [
        "certify",
        "--data",
        inputs["data"],
        "--checkpoint",
        *checkpoints,
        *FAST,
        "--out",
        str(out),
        *extra,
    ]


def rows_without_time(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    return [line.rsplit("\t", 1)[0] for line in lines[1:]]
