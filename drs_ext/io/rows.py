"""One row of Cohen et al.'s certification TSV: the fields, formatting and parsing.

``idx label predict radius correct time``, as ``certify.py`` of Cohen et al. (2019) writes it:
``radius`` with ``"{:.3}"``, ``correct`` 0/1, ``time`` as ``str(datetime.timedelta)`` (plain
seconds, ``16.9``, are read too); then, in files of methods that report more, float columns
named in the header (``extra_fields``).
"""

from __future__ import annotations

import datetime
import decimal
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FIELDS", "HEADER", "Row", "check_header", "decode_text", "format_row", "parse_row"]

FIELDS = ("idx", "label", "predict", "radius", "correct", "time")
HEADER = "\t".join(FIELDS)
CLOCK = re.compile(r"^(?:(-?\d+) days?, )?(\d+):(\d\d):(\d\d(?:\.\d+)?)$")
SECONDS = re.compile(r"^\d+(?:\.\d*)?$")


@dataclass(frozen=True)
class Row:
    idx: int
    label: int
    predict: int
    radius: float
    correct: int
    time: str
    line: str  # the row as written, so merging never re-formats a number
    extra: tuple[float, ...] = ()  # the values of the file's extra columns, if any

    @property
    def seconds(self) -> float:
        """The time column in seconds, whether written as H:MM:SS.ffffff or as seconds."""
        return time_seconds(self.time)


def time_seconds(text: str) -> float:
    if SECONDS.match(text):
        return float(text)
    match = CLOCK.match(text)
    if not match:
        raise ValueError(f"not a time: {text!r}")
    days, hours, minutes, seconds = match.groups()
    return int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def radius_text(radius: float) -> str:
    """The radius with 3 significant digits, as Cohen et al.'s certify.py writes it, but rounded
    down: rounding to nearest could store a radius larger than the one certified."""
    text = f"{radius:.3}"
    if radius > 0 and math.isfinite(radius) and float(text) > radius:
        exact = decimal.Decimal(radius)  # the double's exact value
        step = decimal.Decimal(1).scaleb(exact.adjusted() - 2)
        text = f"{float(exact.quantize(step, rounding=decimal.ROUND_FLOOR)):.3}"
    return text


def format_row(
    idx: int, label: int, predict: int, radius: float, correct: bool | int, seconds: float
) -> str:
    """One TSV line (no newline) in Cohen et al.'s format (the radius rounded down)."""
    time_elapsed = str(datetime.timedelta(seconds=seconds))
    return f"{idx}\t{label}\t{predict}\t{radius_text(radius)}\t{int(correct)}\t{time_elapsed}"


def parse_row(line: str, where: str, extra_fields: Sequence[str] = ()) -> Row:
    """Parse one data line; ``where`` ("file:line") prefixes the error, which names the field."""
    fields = line.split("\t")
    names = (*FIELDS, *extra_fields)
    if len(fields) != len(names):
        raise ValueError(f"{where}: expected {len(names)} tab-separated fields, got {len(fields)}")
    values: dict[str, int | float] = {}
    extra = []
    for name, text in zip(names, fields, strict=True):
        if name == "time":
            continue
        try:
            value = int(text) if name in ("idx", "label", "predict", "correct") else float(text)
        except ValueError:
            raise ValueError(f"{where}: non-numeric field {name} = {text!r} in {line!r}") from None
        if name in FIELDS:
            values[name] = value
        else:
            extra.append(value)
    problem = None
    if values["idx"] < 0:
        problem = "idx must be >= 0"
    elif values["correct"] not in (0, 1):
        problem = "correct must be 0 or 1"
    elif not values["radius"] >= 0.0:
        problem = "radius must be >= 0"
    elif not (CLOCK.match(fields[5]) or SECONDS.match(fields[5])):
        problem = "time must be H:MM:SS[.ffffff] (str of a timedelta) or seconds"
    if problem:
        raise ValueError(f"{where}: invalid row {line!r}: {problem}")
    idx, label, predict, radius, correct = (values[name] for name in FIELDS[:5])
    return Row(
        int(idx), int(label), int(predict), radius, int(correct), fields[5], line, tuple(extra)
    )


def check_header(first_line: str, path: Path) -> tuple[str, ...]:
    """The names of the extra columns after Cohen et al.'s six (usually none)."""
    names = first_line.rstrip("\r").split("\t")
    if tuple(names[: len(FIELDS)]) != FIELDS or not all(names[len(FIELDS) :]):
        raise ValueError(
            f"{path}:1: not a certification TSV: header is {first_line!r}, expected {HEADER!r}"
            " (and optionally more named columns)"
        )
    return tuple(names[len(FIELDS) :])


def decode_text(data: bytes, path: Path, offset: int = 0) -> str:
    """UTF-8 text, else an error naming the file and the byte (``offset``: where data starts)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not a certification TSV: byte {offset + err.start} is not UTF-8 text "
            f"({data[err.start : err.start + 1]!r}); is it a binary file?"
        ) from None
