"""The RESULTS.md writer the benchmark scripts share.

The plain-PyTorch pipeline, the timers, the copy bandwidth and the table format live in
drs_ext.cli.bench (the `drs bench` command), so that `drs bench` and these scripts measure the
same things the same way.
"""

from __future__ import annotations

import datetime
import os
import re

__all__ = ["RESULTS", "markdown", "provenance", "write_section"]

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


def provenance(device: str, command: str, minutes: float | None = None) -> str:
    """The lines that open a section: date, device and command (and run time, if given), as
    markdown lines with hard breaks."""
    text = f"Date: {datetime.date.today().isoformat()}  \nDevice: {device}  \nCommand: `{command}`"
    return text if minutes is None else f"{text}  \nRun time: {minutes:.1f} min"


def markdown(header: list[str], rows: list[list]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])
