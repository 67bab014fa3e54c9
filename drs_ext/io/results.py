"""Certification results in Cohen et al.'s TSV format: write, resume, merge (analysis: summary.py).

The format is the one ``certify.py`` of Cohen et al. (2019) writes, so their ``analyze.py`` and
the tools built on it read our files unchanged::

    idx<TAB>label<TAB>predict<TAB>radius<TAB>correct<TAB>time
    0<TAB>3<TAB>3<TAB>0.912<TAB>1<TAB>0:00:01.234567

``radius`` is written with ``"{:.3}"`` (three significant digits), ``correct`` as 0/1, ``time``
as ``str(datetime.timedelta)``; an abstention is ``predict = -1``, ``radius = 0.0``. One row per
image, flushed as soon as it is known, so a crash loses at most the row being written. A method
with more to report (σ-routing's chosen σ, ...) appends float columns after the six
(``extra_fields``); readers that select columns by name, as analyze.py does, are unaffected. Files
whose time column holds plain seconds (``16.9``, as some of Cohen et al.'s stored results do)
are read too.

The settings that made a file live next to it in ``<file>.settings.json`` (settings.py):
resuming and merging compare them, so rows of two different experiments never share a file.
"""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from .rows import FIELDS, HEADER, Row, check_header, decode_text, format_row, parse_row
from .settings import (
    UncheckedSettingsWarning,
    check_shard_set,
    read_sidecar,
    settings_differences,
    sidecar_path,
    write_sidecar,
)
from .summary import (
    Summary,
    certified_accuracy_at,
    markdown_table,
    plot_certified_accuracy,
    summarize,
)

__all__ = [
    "HEADER",
    "Row",
    "Summary",
    "TsvWriter",
    "UncheckedSettingsWarning",
    "certified_accuracy_at",
    "format_row",
    "markdown_table",
    "merge_tsv",
    "parse_row",
    "plot_certified_accuracy",
    "read_tsv",
    "summarize",
]

# What a resume may change: a larger or smaller --max extends or ends the selection, and
# certify_images checks that the rows already written are a prefix of the new one.
RESUME_MAY_CHANGE = ("max",)


def read_tsv(path: str | os.PathLike) -> list[Row]:
    """All rows of a complete TSV; any malformed line (even the last) raises ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    lines = [line.removesuffix("\r") for line in decode_text(path.read_bytes(), path).split("\n")]
    if lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError(f"{path}: empty file, expected the header {HEADER!r}")
    extra = check_header(lines[0], path)
    rows = [parse_row(line, f"{path}:{n}", extra) for n, line in enumerate(lines[1:], start=2)]
    _check_increasing(rows, path)
    return rows


def _check_increasing(rows: Sequence[Row], path: Path) -> None:
    for n, (prev, row) in enumerate(zip(rows, rows[1:], strict=False), start=3):
        if row.idx <= prev.idx:
            raise ValueError(f"{path}:{n}: idx {row.idx} does not increase (previous {prev.idx})")


def _scan_for_resume(
    path: Path, extra_fields: Sequence[str] = ()
) -> tuple[list[Row], int, str | None]:
    """(complete rows, byte length to keep, the half-written line dropped or None)."""
    data = path.read_bytes()
    header = "\t".join((*FIELDS, *extra_fields))
    if b"\n" not in data:
        # Crashed before the header's newline: anything that is a prefix of it is redone.
        if header.encode().startswith(data):
            return [], 0, None
        check_header(data.decode(errors="replace"), path)
    header_end = data.index(b"\n") + 1
    found = check_header(data[: header_end - 1].decode(errors="replace"), path)
    if found != tuple(extra_fields):
        raise ValueError(
            f"{path}: its extra columns are {list(found)}, this run writes {list(extra_fields)}"
        )
    body = decode_text(data[header_end:], path, header_end)
    complete, _, partial = body.rpartition("\n")
    lines = complete.split("\n") if complete else []
    keep = len(data) - len(partial.encode())
    dropped = partial or None
    rows = [
        parse_row(line, f"{path}:{n}", extra_fields) for n, line in enumerate(lines[:-1], start=2)
    ]
    if lines:
        # The last complete line can only be damaged by the crash too: redo it, do not fail.
        try:
            rows.append(parse_row(lines[-1], f"{path}:{len(lines) + 1}", extra_fields))
        except ValueError:
            keep -= len(lines[-1].encode()) + 1
            dropped = lines[-1] + ("\n" + partial if partial else "")
    _check_increasing(rows, path)
    return rows, keep, dropped


class TsvWriter:
    """Appends rows to a TSV, each flushed at once; ``resume=True`` continues an existing file.

    Nothing on disk changes until the first row is written (or the writer is closed without an
    error): the constructor only checks, so a run that fails before its first row leaves the
    old file as it was, and no header-only file that would block the corrected rerun.

    Resuming validates the header and every row, and truncates a half-written last line (no
    trailing newline, wrong field count or unparsable) so that image is certified again; a
    malformed line before it is an error, not something to silently drop. ``done`` holds the
    rows already in the file. Without ``resume`` an existing file is only replaced when
    ``overwrite`` is set, so a typo never destroys hours of certification.

    ``settings`` (settings.run_settings) are written to the sidecar ``<path>.settings.json``
    with the first row, ``run_info`` next to them. Resuming a file whose sidecar records other
    settings raises ValueError naming each one; a file without a sidecar (older drs_ext,
    Cohen et al.'s code) is resumed with an UncheckedSettingsWarning, and keeps having none, as
    nothing says what its first rows were made with.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        resume: bool = False,
        overwrite: bool = False,
        settings: dict | None = None,
        run_info: dict | None = None,
        extra_fields: Sequence[str] = (),
    ):
        self.path = Path(path)
        self.extra_fields = tuple(extra_fields)
        self.settings = settings
        self.run_info = run_info
        self.done: list[Row] = []
        self.dropped: str | None = None
        self._append = resume and self.path.exists()
        self._keep = 0
        self._record = settings is not None
        self._file = None
        if self._append:
            self.done, self._keep, self.dropped = _scan_for_resume(self.path, self.extra_fields)
            self._check_resume()
        elif self.path.exists() and not overwrite:
            raise FileExistsError(
                f"{self.path} exists; pass --resume to continue it or --overwrite to replace it"
            )

    def _check_resume(self) -> None:
        if self.settings is None:
            self._record = False  # whatever the sidecar says stays; nothing to compare
            return
        if not self.done:
            return  # no finished row to protect: this run's settings will describe the file
        recorded = read_sidecar(self.path)
        if recorded is None:
            warnings.warn(
                f"{self.path} has no settings file ({sidecar_path(self.path).name}): its "
                f"{len(self.done)} rows cannot be checked against this run's settings",
                UncheckedSettingsWarning,
                stacklevel=3,
            )
            self._record = False
            return
        differences = settings_differences(
            recorded["settings"],
            self.settings,
            ignore=RESUME_MAY_CHANGE,
            names=("the file", "this run"),
        )
        if differences:
            raise ValueError(
                f"cannot resume {self.path}: it was made with other settings "
                f"({sidecar_path(self.path).name}):\n  "
                + "\n  ".join(differences)
                + "\nrerun with the file's settings, certify into another --out, or replace it "
                "with --overwrite"
            )

    def _open(self) -> None:
        """Touch the disk: the sidecar first, then the TSV (a crash between the two leaves a
        sidecar without rows, which the next run replaces)."""
        if self._file is not None:
            return
        if self._record:
            write_sidecar(self.path, self.settings or {}, self.run_info)
        if self._append:
            with self.path.open("r+b") as f:
                f.truncate(self._keep)
            self._file = self.path.open("a")
        else:
            if self.settings is None:
                sidecar_path(self.path).unlink(missing_ok=True)  # it described the old rows
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w")
        if self._file.tell() == 0:
            self._file.write("\t".join((*FIELDS, *self.extra_fields)) + "\n")
            self._file.flush()

    @property
    def last_idx(self) -> int:
        return self.done[-1].idx if self.done else -1

    def write(
        self,
        idx: int,
        label: int,
        predict: int,
        radius: float,
        correct: bool | int,
        seconds: float,
        *,
        extra: Sequence[float] = (),
    ) -> None:
        """One row; ``extra`` holds a value per extra column (written exactly: an integer as
        one, anything else as the repr of its float)."""
        if idx <= self.last_idx:
            raise ValueError(f"{self.path}: idx {idx} written after idx {self.last_idx}")
        if len(extra) != len(self.extra_fields):
            raise ValueError(
                f"{self.path}: {len(extra)} extra values for the columns {list(self.extra_fields)}"
            )
        line = format_row(idx, label, predict, radius, correct, seconds)
        line += "".join(f"\t{_exact_text(v)}" for v in extra)
        self._open()
        self._file.write(line + "\n")
        self._file.flush()
        self.done.append(parse_row(line, str(self.path), self.extra_fields))

    def close(self) -> None:
        """Finish the file: one that got no row still gets its header (an empty shard is a
        valid result), and a resumed one loses its half-written line."""
        self._open()
        self._file.close()

    def abandon(self) -> None:
        """Close without creating or truncating anything the run has not written to yet."""
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> TsvWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


def _exact_text(value: float) -> str:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    return repr(float(value))


def merge_tsv(
    out: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    *,
    overwrite: bool = False,
    allow_incomplete: bool = False,
) -> int:
    """Join shard files into ``out`` in idx order; returns the number of rows.

    Every input must be a complete TSV with the standard header; an idx present in two inputs
    is an error (shards overlap, or one file was given twice). The inputs' settings sidecars
    must agree on every setting but the shard index, and the shards (from the sidecars, else
    from names ``…shardKofN…``) must be all N of one split, each with every row its selection
    holds; ``allow_incomplete`` turns a missing or unfinished shard into a warning. An existing
    ``out`` is only replaced with ``overwrite``. The merged file gets a sidecar when every input
    had one.
    """
    out = Path(out)
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ValueError("merge needs at least one input file")
    if any(p.resolve() == out.resolve() for p in paths):
        raise ValueError(f"the output {out} is also an input; write the merge to a new file")
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out} exists; merge into a new file, or pass --overwrite to replace it"
        )
    owner: dict[int, Path] = {}
    rows: list[Row] = []
    count: dict[Path, int] = {}
    columns: dict[tuple[str, ...], Path] = {}
    for path in paths:
        file_rows = read_tsv(path)
        count[path] = len(file_rows)
        with path.open("rb") as f:
            columns.setdefault(check_header(f.readline().decode().rstrip("\n"), path), path)
        for row in file_rows:
            if row.idx in owner:
                raise ValueError(f"idx {row.idx} appears in both {owner[row.idx]} and {path}")
            owner[row.idx] = path
            rows.append(row)
    if len(columns) > 1:
        listing = "; ".join(f"{p}: {list(c) or 'none'}" for c, p in columns.items())
        raise ValueError(f"the inputs have different extra columns ({listing})")
    merged = check_shard_set(paths, count, allow_incomplete)
    rows.sort(key=lambda r: r.idx)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    header = "\t".join((*FIELDS, *next(iter(columns))))
    tmp.write_text("".join(line + "\n" for line in [header, *(r.line for r in rows)]))
    if merged is None:
        sidecar_path(out).unlink(missing_ok=True)
    else:
        write_sidecar(out, *merged)
    os.replace(tmp, out)
    return len(rows)
