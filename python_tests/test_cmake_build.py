"""CMakeLists.txt builds the same extension as setup.py, and the result loads and runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import drs_ext

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_loads_and_matches_the_setup_py_build(tmp_path: Path) -> None:
    build, package = tmp_path / "build", tmp_path / "pkg"
    shutil.copytree(ROOT / "drs_ext", package / "drs_ext", ignore=shutil.ignore_patterns("*.so"))
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(
        [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build),
            *generator,
            "-DDRS_CPU_ONLY=ON",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DDRS_OUTPUT_DIR={package / 'drs_ext'}",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True)
    code = (
        "import torch, drs_ext; "
        "x = torch.linspace(0, 1, 48).reshape(1, 3, 4, 4); "
        "print(drs_ext.__file__); "
        "torch.save(drs_ext.noisy_views(x, 0.5, num=3, seed=9), 'views.pt')"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=package, check=True, capture_output=True, text=True
    )
    assert run.stdout.strip() == str(package / "drs_ext" / "__init__.py")
    x = torch.linspace(0, 1, 48).reshape(1, 3, 4, 4)
    expected = drs_ext.noisy_views(x, 0.5, num=3, seed=9)
    # Same sources; compile flags may differ slightly, so allow float rounding only.
    torch.testing.assert_close(torch.load(package / "views.pt"), expected, rtol=0, atol=1e-6)
