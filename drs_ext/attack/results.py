"""Attack results on disk: a TSV in the style of Cohen et al.'s files, one row per image and ε,
with a settings sidecar (drs_ext/io/settings.py); the accuracy table, the plot, and the check
of attacks against a certification file of the same model.

    idx<TAB>label<TAB>epsilon<TAB>predict<TAB>correct<TAB>delta_norm<TAB>sigma
    0<TAB>3<TAB>0.5<TAB>3<TAB>1<TAB>0.49999997<TAB>0.5

``predict`` is the smoothed classifier's PREDICT on the attacked input (-1: abstained, which
counts as wrong), ``delta_norm`` the ℓ2 norm of the perturbation, ``sigma`` the level PREDICT
used (nan when an input-dependent σ abstained). ε = 0 is the clean input. An image's rows are
written together, in ε order, so an interrupted file resumes at the first unfinished image.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ..io.results import read_tsv
from ..io.settings import (
    UncheckedSettingsWarning,
    read_sidecar,
    settings_differences,
    sidecar_path,
    write_sidecar,
)
from .pgd import ATTACK_FIELDS, AttackRow, accuracy_by_epsilon, attack_contradictions

__all__ = [
    "ATTACK_HEADER",
    "AttackWriter",
    "accuracy_table",
    "certificates_of",
    "contradiction_report",
    "plot_attack",
    "read_attack_tsv",
]

ATTACK_HEADER = "\t".join(ATTACK_FIELDS)
# Settings a certification file may differ in from an attack file of the same model and images:
# how each was sampled, which images each selected, and the attack's own parameters.
_NOT_THE_MODEL = (
    "n0",
    "n",
    "alpha",
    "seed",
    "skip",
    "max",
    "shard",
    "shards",
    "autocast",
    "drs_ext_version",
    "n_selector",
)


def format_attack_row(row: AttackRow) -> str:
    return (
        f"{row.idx}\t{row.label}\t{row.epsilon!r}\t{row.predict}\t{int(row.correct)}\t"
        f"{float(row.delta_norm)!r}\t{float(row.sigma)!r}"
    )


def parse_attack_row(line: str, where: str) -> AttackRow:
    fields = line.split("\t")
    if len(fields) != len(ATTACK_FIELDS):
        raise ValueError(
            f"{where}: expected {len(ATTACK_FIELDS)} tab-separated fields, got {len(fields)}"
        )
    try:
        idx, label, predict, correct = (int(fields[i]) for i in (0, 1, 3, 4))
        epsilon, delta, sigma = (float(fields[i]) for i in (2, 5, 6))
    except ValueError:
        raise ValueError(f"{where}: non-numeric field in {line!r}") from None
    if idx < 0 or correct not in (0, 1) or not epsilon >= 0 or not delta >= 0:
        raise ValueError(f"{where}: invalid attack row {line!r}")
    return AttackRow(idx, label, epsilon, predict, bool(correct), delta, sigma)


def _read_lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").split("\n")
    if not lines or lines[0].rstrip("\r") != ATTACK_HEADER:
        raise ValueError(f"{path}:1: not an attack TSV (expected the header {ATTACK_HEADER!r})")
    return [line.rstrip("\r") for line in lines[1:]]


def read_attack_tsv(path: str | os.PathLike) -> list[AttackRow]:
    """Every row of a complete attack TSV; a malformed line raises ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"attack results file not found: {path}")
    lines = _read_lines(path)
    if lines and lines[-1] == "":
        lines.pop()
    return [parse_attack_row(line, f"{path}:{n}") for n, line in enumerate(lines, start=2)]


class AttackWriter:
    """Appends the rows of each attacked image (every ε of `epsilons`), flushed at once.

    ``resume=True`` keeps the images whose rows are all there (a prefix of the file) and drops
    the rest, so an interrupted image is attacked again; its settings must match the sidecar's
    (``max`` may change, as for certification). Without ``resume`` an existing file is replaced
    only with ``overwrite``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        epsilons: Sequence[float],
        *,
        resume: bool = False,
        overwrite: bool = False,
        settings: dict,
        run_info: dict | None = None,
    ) -> None:
        self.path = Path(path)
        self.grid = list(epsilons)
        self.settings = settings
        self.run_info = run_info
        self.rows: list[AttackRow] = []
        if self.path.exists() and not resume and not overwrite:
            raise FileExistsError(
                f"{self.path} exists; pass --resume to continue it or --overwrite to replace it"
            )
        if resume and self.path.exists():
            self.rows = self._complete_images()
            self._check_settings()
        self._file = None

    def _complete_images(self) -> list[AttackRow]:
        lines = _read_lines(self.path)
        rows = []
        for n, line in enumerate(lines, start=2):
            try:
                rows.append(parse_attack_row(line, f"{self.path}:{n}"))
            except ValueError:
                break  # the crash's half-written line and whatever follows it are redone
        width = len(self.grid)
        keep = []
        for start in range(0, len(rows) - width + 1, width):
            image = rows[start : start + width]
            same = len({r.idx for r in image}) == 1
            if not same or [r.epsilon for r in image] != self.grid:
                break
            keep += image
        return keep

    def _check_settings(self) -> None:
        if not self.rows:
            return
        recorded = read_sidecar(self.path)
        if recorded is None:
            warnings.warn(
                f"{self.path} has no settings file: its rows cannot be checked against this run",
                UncheckedSettingsWarning,
                stacklevel=3,
            )
            return
        differences = settings_differences(
            recorded["settings"], self.settings, ignore=("max",), names=("the file", "this run")
        )
        if differences:
            raise ValueError(
                f"cannot resume {self.path}: it was made with other settings:\n  "
                + "\n  ".join(differences)
            )

    @property
    def done(self) -> list[AttackRow]:
        """One row (the clean one) per image already attacked, in file order."""
        return self.rows[:: max(len(self.grid), 1)]

    def _open(self) -> None:
        if self._file is not None:
            return
        write_sidecar(self.path, self.settings, self.run_info)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The kept rows (a resumed file's finished images) replace the file in one step, so a
        # crash here leaves either the old file or the new one.
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in self._lines()))
        os.replace(tmp, self.path)
        self._file = self.path.open("a")

    def _lines(self) -> list[str]:
        return [ATTACK_HEADER, *(format_attack_row(r) for r in self.rows)]

    def write(self, rows: Iterable[AttackRow]) -> None:
        """The rows of whole images, ordered by image and then ε."""
        rows = sorted(rows, key=lambda r: (r.idx, r.epsilon))
        self._open()
        self._file.write("".join(format_attack_row(r) + "\n" for r in rows))
        self._file.flush()
        self.rows += rows

    def __enter__(self) -> AttackWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self._open()
        if self._file is not None:
            self._file.close()


def accuracy_table(results: Mapping[str, Sequence[AttackRow]]) -> str:
    """Markdown: one column per model, clean accuracy (ε = 0) then robust accuracy per ε."""
    acc = {name: accuracy_by_epsilon(rows) for name, rows in results.items()}
    grid = sorted({eps for a in acc.values() for eps in a})
    lines = [
        "| | " + " | ".join(results) + " |",
        "|---|" + "---:|" * len(results),
    ]
    for eps in grid:
        label = "clean accuracy" if eps == 0 else f"robust acc. @ ε = {eps:g}"
        cells = (f"{100 * a[eps]:.1f}%" if eps in a else "–" for a in acc.values())
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    counts = (str(len({r.idx for r in rows})) for rows in results.values())
    lines.append("| images | " + " | ".join(counts) + " |")
    return "\n".join(lines)


def plot_attack(
    results: Mapping[str, Sequence[AttackRow]], path: str | os.PathLike, *, title: str = ""
) -> None:
    """PNG of accuracy under attack against ε, one line per model (headless)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, rows in results.items():
        acc = accuracy_by_epsilon(rows)
        ax.plot(list(acc), list(acc.values()), marker="o", label=name)
    ax.set_xlabel("attack budget ε (ℓ2)")
    ax.set_ylabel("accuracy under attack")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def certificates_of(
    cert_tsv: str | os.PathLike, attack_settings: dict | None = None
) -> dict[int, tuple[int, float]]:
    """{idx: (class, radius)} of a certification TSV, after checking (when both files have
    settings) that it certified the same model on the same images as the attack: every setting
    both record, except how each sampled and which images each selected."""
    rows = read_tsv(cert_tsv)
    recorded = read_sidecar(cert_tsv)
    if recorded is None or attack_settings is None:
        warnings.warn(
            f"{cert_tsv}: no settings to compare; assuming it certified the attacked model",
            UncheckedSettingsWarning,
            stacklevel=2,
        )
    else:
        cert = recorded["settings"]
        shared = set(cert) & set(attack_settings)
        ignore = (set(cert) | set(attack_settings)) - shared | set(_NOT_THE_MODEL)
        differences = settings_differences(
            cert, attack_settings, ignore=ignore, names=("the certificates", "the attack")
        )
        if differences:
            raise ValueError(
                f"{cert_tsv} certified another model or data set ({sidecar_path(cert_tsv).name}):"
                "\n  " + "\n  ".join(differences)
            )
    return {row.idx: (row.predict, row.radius) for row in rows}


def contradiction_report(
    rows: Sequence[AttackRow], certificates: Mapping[int, tuple[int, float]]
) -> tuple[str, int]:
    """(a one-paragraph report, the number of attacks that beat a certificate)."""
    found = attack_contradictions(rows, certificates)
    attacked = [r for r in rows if r.epsilon > 0 and certificates.get(r.idx, (-1, 0))[0] >= 0]
    inside = sum(r.delta_norm < certificates[r.idx][1] for r in attacked)
    text = (
        f"certificate check: {len(attacked)} attacks on certified images, {inside} of them "
        f"inside the certified radius; {len(found)} changed PREDICT's class there"
    )
    for row, cls, radius in found[:10]:
        text += (
            f"\n  idx {row.idx}: certified {cls} at radius {radius:.3g}, attack at ε = "
            f"{row.epsilon:g} (‖δ‖ = {row.delta_norm:.3g}) gives {row.predict}"
        )
    return text, len(found)
