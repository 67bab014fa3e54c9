"""What only the repository's benchmark scripts share: the RESULTS.md writer, and the check
that a GPU script has something to run on.

The plain-PyTorch pipeline, the timers and the copy bandwidth live in drs_ext.bench, which pip
installs, so that `drs bench` and these scripts measure the same things the same way; `table` is
re-exported from there for the scripts.
"""

from __future__ import annotations

import os
import re

import torch

import drs_ext
from drs_ext.bench import table

__all__ = ["RESULTS", "cuda_kernels_missing", "table", "write_section"]

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def write_section(title: str, body: str, path: str = RESULTS) -> None:
    """Replace (or add) section `## title` of the results file (RESULTS.md); the other sections
    stay as they are."""
    text = "# drs_ext benchmark results\n\n"
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    section = f"## {title}\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + "\n\n" + section
    # Written beside and renamed over: a run killed mid-write leaves the old file whole.
    with open(path + ".tmp", "w") as f:
        f.write(text.rstrip() + "\n")
    os.replace(path + ".tmp", path)


def cuda_kernels_missing(script: str) -> bool:
    """True, after saying so, where `script` cannot run: no CUDA device, or a build of drs_ext
    without its CUDA kernels. The GPU scripts then exit 0 (nothing to measure is not a failure)."""
    if torch.cuda.is_available() and drs_ext.built_with_cuda:
        return False
    print(f"{script}: needs a CUDA device and drs_ext built with its CUDA kernels")
    return True
