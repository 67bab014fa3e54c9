"""benchmarks/common.py's write_section: a benchmark rewrites its own section of RESULTS.md and
leaves the others (and the figures of earlier runs) as they are."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "common.py")
common = importlib.util.module_from_spec(spec)
spec.loader.exec_module(common)

BEFORE = (
    "# drs_ext benchmark results\n\nIntro.\n\n"
    "## CPU\n\ncpu figures\n\n### (a) Noisy views\n\n| a |\n\n"
    "## GPU\n\nPending.\n\n"
    "## CUDA kernels, read without a GPU\n\nstatic counts\n"
)


def test_write_section_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text(BEFORE)
    common.write_section("GPU", "Date: today\n\n### (a, b) Noisy views\n\n| b |", str(path))
    assert path.read_text() == BEFORE.replace(
        "## GPU\n\nPending.\n", "## GPU\n\nDate: today\n\n### (a, b) Noisy views\n\n| b |\n"
    )
    common.write_section("CPU", "new cpu figures", str(path))
    text = path.read_text()
    assert (
        "cpu figures\n\n### (a) Noisy views" not in text and "## CPU\n\nnew cpu figures\n" in text
    )
    assert "| b |" in text and text.endswith(
        "## CUDA kernels, read without a GPU\n\nstatic counts\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"]  # no temporary file left


def test_write_section_adds_a_missing_section_and_creates_the_file(tmp_path):
    path = tmp_path / "new.md"
    common.write_section("GPU", "figures", str(path))
    assert path.read_text() == "# drs_ext benchmark results\n\n## GPU\n\nfigures\n"
    common.write_section("CPU", "more", str(path))
    assert path.read_text().endswith("## GPU\n\nfigures\n\n## CPU\n\nmore\n")
