"""What made a result file: the settings sidecar ``<file>.settings.json`` next to each TSV.

The TSV itself stays Cohen et al.'s six columns, so pandas and their ``analyze.py`` read it
unchanged; everything else about the run lives in the sidecar::

    {
      "format": "drs_ext.results.settings", "format_version": 1,
      "settings": {"method": "drs", "sigma": [0.18, 0.18], "fill": "neighbors", "n0": 100,
                   "n": 100000, "alpha": 0.001, "seed": 0, "data": "digits", "split": "test",
                   "skip": 1, "max": -1, "shard": 0, "shards": 2, "autocast": null,
                   "checkpoint_sha256": ["…", "…"], "drs_ext_version": "0.1.0"},
      "run": {"checkpoints": [...], "selected": 250, "batch": 1000, "started": "…", ...}
    }

``settings`` is a flat dict compared key by key: rows from two runs may share a file (resume)
or be joined (merge) only if their settings agree, apart from the keys a command lets differ
(the shard index for merge; ``max`` for resume, which extends or shortens the selection).
``run`` is what legitimately differs between runs of one experiment (paths, batch size,
timestamps) and is never compared. ``run["selected"]`` is the number of images the run's
selection holds, so merge can tell a finished shard from an interrupted one.

A method contributes its own keys through its classifier's ``settings()`` (method name, σ per
branch, fill, and any per-stage parameters of a method with several stages).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from .._C import __version__

__all__ = [
    "SIDECAR_SUFFIX",
    "UncheckedSettingsWarning",
    "check_shard_set",
    "file_sha256",
    "read_sidecar",
    "run_settings",
    "settings_differences",
    "shard_of_name",
    "sidecar_path",
    "write_sidecar",
]

FORMAT = "drs_ext.results.settings"
FORMAT_VERSION = 1
SIDECAR_SUFFIX = ".settings.json"
_SHARD_NAME = re.compile(r"\.shard(\d+)of(\d+)(?:\.|$)")


def sidecar_path(tsv: str | os.PathLike) -> Path:
    """``rs.tsv`` -> ``rs.tsv.settings.json`` (next to the file, so a glob over ``*.tsv``, as
    in ``drs merge out.tsv part.shard*of4.tsv``, never picks it up)."""
    tsv = Path(tsv)
    return tsv.with_name(tsv.name + SIDECAR_SUFFIX)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain(value: object) -> object:
    """JSON-ready and comparable: NumPy scalars and tuples become Python numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # NumPy / torch scalars
        return value.item()
    return value


def run_settings(
    smoothed: object,
    *,
    checkpoints: Sequence[str | os.PathLike],
    data: str,
    split: str,
    n0: int,
    n: int,
    alpha: float,
    seed: int,
    skip: int,
    max_index: int,
    shard: int,
    shards: int,
    autocast: str | None = None,
    method_args: dict | None = None,
) -> dict:
    """The settings a certification run records and compares (one flat dict).

    ``smoothed.settings()`` gives the method's own keys (name, σ per branch, fill, ...);
    ``method_args`` the method's per-call arguments (the σ-selector's λ, N_h and selector
    digest), compared like the rest.
    Checkpoints are identified by content (SHA-256), sorted so the order they were named in does
    not matter: each checkpoint says itself which branch it is. ``autocast`` is compared because
    it changes the model's logits; the other model-call options do not and are not recorded.
    """
    settings = dict(smoothed.settings())  # type: ignore[attr-defined]
    settings.update(method_args or {})
    settings.update(
        autocast=autocast,
        n0=n0,
        n=n,
        alpha=alpha,
        seed=seed,
        data=data,
        split=split,
        skip=skip,
        max=max_index,
        shard=shard,
        shards=shards,
        checkpoint_sha256=sorted(file_sha256(p) for p in checkpoints),
        drs_ext_version=__version__,
    )
    return _plain(settings)  # type: ignore[return-value]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_sidecar(tsv: str | os.PathLike, settings: dict, run: dict | None = None) -> Path:
    """Write ``<tsv>.settings.json`` atomically (a crash leaves the old sidecar or the new one)."""
    path = sidecar_path(tsv)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "settings": _plain(settings),
        "run": _plain({**(run or {}), "written": now()}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def read_sidecar(tsv: str | os.PathLike) -> dict | None:
    """The sidecar of ``tsv`` as {"settings": ..., "run": ...}, or None if it has none (a file
    written by an older drs_ext or by Cohen et al.'s code: its settings cannot be checked)."""
    path = sidecar_path(tsv)
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable settings file ({err})") from None
    if not (
        isinstance(payload, dict)
        and payload.get("format") == FORMAT
        and isinstance(payload.get("settings"), dict)
    ):
        raise ValueError(f"{path}: not a drs_ext settings file (expected format {FORMAT!r})")
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: settings format version {payload.get('format_version')!r}; this drs_ext "
            f"reads version {FORMAT_VERSION}"
        )
    return {"settings": payload["settings"], "run": payload.get("run") or {}}


_ABSENT = object()


def _same(a: object, b: object) -> bool:
    return a == b or (a != a and b != b)  # NaN equals NaN here: the same setting


def settings_differences(
    recorded: dict, current: dict, *, ignore: Iterable[str] = (), names: tuple[str, str]
) -> list[str]:
    """One line per setting that differs, e.g. ``"n: 100 (the file) vs 5000 (this run)"``;
    ``names`` says what the two sides are. Keys in ``ignore`` are not compared; a key only one
    side has (a setting another method or version records) differs."""
    skip = set(ignore)
    lines = []
    for key in sorted((set(recorded) | set(current)) - skip):
        a, b = recorded.get(key, _ABSENT), current.get(key, _ABSENT)
        if a is _ABSENT or b is _ABSENT or not _same(a, b):
            shown = ["(not recorded)" if v is _ABSENT else json.dumps(v) for v in (a, b)]
            lines.append(f"{key}: {shown[0]} ({names[0]}) vs {shown[1]} ({names[1]})")
    return lines


class UncheckedSettingsWarning(UserWarning):
    """A result file without a settings sidecar was resumed or merged: nothing says whether its
    rows were made with the same settings as the rest."""


def shard_of_name(path: str | os.PathLike) -> tuple[int, int] | None:
    """(K, N) from a name like ``drs.shard2of4.tsv`` (what shard_path writes), else None."""
    match = _SHARD_NAME.search(Path(path).name)
    return (int(match[1]), int(match[2])) if match else None


def check_shard_set(
    paths: list[Path], count: dict[Path, int], allow_incomplete: bool
) -> tuple[dict, dict] | None:
    """Check that ``paths`` (with ``count[p]`` rows each) are the complete, finished shards of
    one run (merge_tsv); (settings, run info) of the merged file, or None when some input has
    no sidecar. A missing or unfinished shard is an error unless ``allow_incomplete``."""
    recorded = {p: read_sidecar(p) for p in paths}
    unchecked = [str(p) for p in paths if recorded[p] is None]
    if unchecked:
        warnings.warn(
            f"no settings file for {', '.join(unchecked)}: cannot check that the inputs come "
            "from one run",
            UncheckedSettingsWarning,
            stacklevel=3,
        )
    checked = [p for p in paths if recorded[p] is not None]
    differences = [
        line
        for p in checked[1:]
        for line in settings_differences(
            recorded[checked[0]]["settings"],
            recorded[p]["settings"],
            ignore=("shard",),
            names=(str(checked[0]), str(p)),
        )
    ]
    if differences:
        raise ValueError(
            "refusing to merge files made with different settings:\n  " + "\n  ".join(differences)
        )
    shard_of: dict[Path, tuple[int, int]] = {}
    for p in paths:
        named = shard_of_name(p)
        settings = recorded[p]["settings"] if recorded[p] else {}
        stored = (settings["shard"], settings["shards"]) if "shards" in settings else None
        if named and stored and named != stored:
            raise ValueError(
                f"{p}: the name says shard {named[0]} of {named[1]}, its settings file says "
                f"shard {stored[0]} of {stored[1]}"
            )
        if stored or named:
            shard_of[p] = stored or named  # type: ignore[assignment]
    problems = _shard_set_problems(shard_of)
    for p in checked:
        selected = recorded[p]["run"].get("selected")
        if isinstance(selected, int) and count[p] < selected:
            problems.append(
                f"{p} holds {count[p]} of the {selected} rows of its selection (interrupted? "
                "finish it with drs certify … --resume)"
            )
    if problems:
        message = "incomplete set of shards:\n  " + "\n  ".join(problems)
        if not allow_incomplete:
            raise ValueError(message + "\npass --allow-incomplete to merge them anyway")
        warnings.warn(message, UserWarning, stacklevel=3)
    if unchecked:
        return None
    settings = {**recorded[paths[0]]["settings"], "shard": 0, "shards": 1}
    selected = [recorded[p]["run"].get("selected") for p in paths]
    run = {"merged_from": [str(p) for p in paths]}
    if all(isinstance(s, int) for s in selected) and not problems:
        run["selected"] = sum(selected)
    return settings, run


def _shard_set_problems(shard_of: dict[Path, tuple[int, int]]) -> list[str]:
    if not shard_of:
        return []
    totals = sorted({n for _, n in shard_of.values()})
    if len(totals) > 1:
        listing = ", ".join(f"{p} ({k} of {n})" for p, (k, n) in shard_of.items())
        raise ValueError(f"the inputs come from splits into {totals} shards: {listing}")
    total = totals[0]
    seen: dict[int, Path] = {}
    for p, (k, _) in shard_of.items():
        if not 0 <= k < total:
            raise ValueError(f"{p}: shard {k} of {total} is not a shard index")
        if k in seen:
            raise ValueError(f"shard {k} of {total} given twice: {seen[k]} and {p}")
        seen[k] = p
    missing = sorted(set(range(total)) - set(seen))
    if not missing:
        return []
    return [f"shard {', '.join(map(str, missing))} of {total} missing (given: {sorted(seen)})"]
