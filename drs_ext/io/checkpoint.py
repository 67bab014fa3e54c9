"""Checkpoints of branch classifiers: one self-describing file per trained model.

Format (version 1): a dict written with ``torch.save`` and read with ``weights_only=True``:

==================  ==========================================================================
key                 value
==================  ==========================================================================
format              ``"drs_ext.branch"`` (tells a drs_ext checkpoint from any other .pt file)
format_version      ``1``
arch, arch_kwargs   registry name in :mod:`drs_ext.models` and its keyword arguments
num_classes         number of output logits
input_shape         ``[C, H, W]`` of the full-resolution images the model sees
sigma               noise σ of this branch, in [0, 1] pixel units (the σ_p of docs/design.md §2.4)
partition           ``"none"`` (RS: the whole image) or ``"diag"`` (a DRS branch)
branch              0 or 1 for ``"diag"`` (0 = fˡ, pixels with i + j even), 0 for ``"none"``
fill                how the noisy sub-image is brought back to full resolution (``"diag"`` only)
recipe              ``{"name": ..., <hyper-parameters>}`` the model was trained with
normalization       ``{"mean": [...], "std": [...]}`` applied inside the model, or None
levels              optional: the noise levels Σ a σ-estimator classifies into (class i is
                    levels[i]); absent or None for a classifier
state_dict          weights of the network (without the normalisation wrapper)
train_state         optional: what :class:`drs_ext.training.Trainer` needs to resume
==================  ==========================================================================

A model trained on branch p of partition "diag" with fill F must be certified on exactly those
views, so :func:`load_branch` returns the spec next to the model and :func:`check_drs_pair` /
:func:`check_sigma` refuse mismatched combinations instead of certifying a model on inputs it was
never trained for.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..models import build_model, unwrap_normalize
from ..ops import FILLS, PARTITIONS, num_branches

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "BranchSpec",
    "check_drs_pair",
    "check_sigma",
    "load_branch",
    "load_checkpoint",
    "save_checkpoint",
    "spec_from_checkpoint",
]

FORMAT = "drs_ext.branch"
FORMAT_VERSION = 1
_SPEC_KEYS = (
    "arch",
    "arch_kwargs",
    "num_classes",
    "input_shape",
    "sigma",
    "partition",
    "branch",
    "fill",
    "recipe",
    "normalization",
)
# Relative tolerance when comparing σ values that went through a decimal command line.
_SIGMA_RTOL = 1e-6


@dataclass(frozen=True)
class BranchSpec:
    """Everything needed to rebuild a branch classifier and feed it the views it was trained on."""

    arch: str
    num_classes: int
    input_shape: tuple[int, int, int]
    sigma: float
    partition: str = "none"
    branch: int = 0
    fill: str = "neighbors"
    recipe: dict = field(default_factory=dict)
    arch_kwargs: dict = field(default_factory=dict)
    normalization: dict | None = None
    levels: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {PARTITIONS}, got {self.partition!r}")
        if self.fill not in FILLS:
            raise ValueError(f"fill must be one of {FILLS}, got {self.fill!r}")
        if self.branch not in range(num_branches(self.partition)):
            raise ValueError(
                f"branch must be in [0, {num_branches(self.partition)}) for partition "
                f"{self.partition!r}, got {self.branch!r}"
            )
        if (
            not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma))
            or self.sigma <= 0
        ):
            raise ValueError(f"sigma must be a finite number > 0, got {self.sigma!r}")
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {self.input_shape!r}")
        if self.partition == "diag" and self.input_shape[2] % 2:
            raise ValueError(f"partition 'diag' needs an even width, got {self.input_shape!r}")
        if self.levels is not None:
            ok = len(self.levels) == self.num_classes and all(
                isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in self.levels
            )
            if not ok or list(self.levels) != sorted(set(self.levels)):
                raise ValueError(
                    f"levels must be {self.num_classes} increasing σ > 0 (one per output of the "
                    f"σ-estimator), got {self.levels!r}"
                )
            if self.partition != "none":
                raise ValueError("a σ-estimator smooths the whole image: partition must be 'none'")

    def build_model(self) -> nn.Module:
        """A freshly initialised model of this spec's architecture."""
        return build_model(
            self.arch,
            num_classes=self.num_classes,
            in_channels=self.input_shape[0],
            arch_kwargs=self.arch_kwargs,
            normalization=self.normalization,
        )

    def describe(self) -> str:
        if self.levels is not None:
            levels = ", ".join(f"{s:g}" for s in self.levels)
            return f"{self.arch} σ-estimator over levels ({levels}), sigma {self.sigma:g}"
        where = "RS" if self.partition == "none" else f"DRS branch {self.branch} (fill {self.fill})"
        return f"{self.arch} {where}, sigma {self.sigma:g}"


def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, spec: BranchSpec, *, train_state: dict | None = None
) -> None:
    """Write ``model`` with its spec; atomic, so a crash never leaves a half-written file."""
    path = Path(path)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(spec)}
    payload["input_shape"] = list(spec.input_shape)
    payload["levels"] = None if spec.levels is None else [float(s) for s in spec.levels]
    payload["state_dict"] = unwrap_normalize(model).state_dict()
    if train_state is not None:
        payload["train_state"] = train_state
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a checkpoint file; returns the raw dict (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise ValueError(f"{path}: not a readable drs_ext checkpoint ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not a drs_ext checkpoint (no format={FORMAT!r} entry); it may be a bare "
            "state dict or another project's file"
        )
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format_version {version!r} is newer than this drs_ext "
            f"understands ({FORMAT_VERSION}); upgrade drs_ext"
        )
    missing = [k for k in (*_SPEC_KEYS, "state_dict") if k not in payload]
    if missing:
        raise ValueError(f"{path}: corrupt drs_ext checkpoint, missing {missing}")
    return payload


def spec_from_checkpoint(payload: dict, path: str | os.PathLike = "<checkpoint>") -> BranchSpec:
    """The :class:`BranchSpec` stored in a validated checkpoint dict."""
    fields = {k: payload[k] for k in _SPEC_KEYS}
    fields["input_shape"] = tuple(fields["input_shape"])
    if payload.get("levels") is not None:  # files without it are classifiers
        fields["levels"] = tuple(payload["levels"])
    try:
        return BranchSpec(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: corrupt drs_ext checkpoint ({err})") from err


def load_branch(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, BranchSpec]:
    """Rebuild the model stored at ``path`` (in eval mode) and return it with its spec."""
    payload = load_checkpoint(path, map_location)
    spec = spec_from_checkpoint(payload, path)
    model = spec.build_model()
    try:
        unwrap_normalize(model).load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match architecture {spec.arch} ({err})") from err
    return model.to(map_location).eval(), spec


def _same_sigma(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_SIGMA_RTOL)


def check_drs_pair(
    first: BranchSpec, second: BranchSpec, names: tuple[str, str] = ("first", "second")
) -> tuple[int, int]:
    """Validate two checkpoints as the fˡ, fʳ pair of one DRS classifier.

    Returns the positions (0 or 1) of the branch-0 and branch-1 checkpoints in the argument order.
    """
    specs = {names[0]: first, names[1]: second}
    for name, spec in specs.items():
        if spec.partition != "diag":
            raise ValueError(
                f"{name} checkpoint is an RS model (partition {spec.partition!r}); DRS needs two "
                "branch models trained with partition 'diag'"
            )
    if {first.branch, second.branch} != {0, 1}:
        raise ValueError(
            f"DRS needs one branch-0 and one branch-1 checkpoint, got branches {first.branch} "
            f"({names[0]}) and {second.branch} ({names[1]})"
        )
    if first.fill != second.fill:
        raise ValueError(
            f"DRS checkpoints disagree on fill: {first.fill!r} ({names[0]}) vs {second.fill!r} "
            f"({names[1]}); train both branches with the same fill"
        )
    if not _same_sigma(first.sigma, second.sigma):
        raise ValueError(
            f"DRS checkpoints disagree on sigma: {first.sigma:g} ({names[0]}) vs "
            f"{second.sigma:g} ({names[1]}); Xia et al. pair branches at one σ"
        )
    for attr in ("num_classes", "input_shape"):
        if getattr(first, attr) != getattr(second, attr):
            raise ValueError(
                f"DRS checkpoints disagree on {attr}: {getattr(first, attr)} ({names[0]}) vs "
                f"{getattr(second, attr)} ({names[1]})"
            )
    return (0, 1) if first.branch == 0 else (1, 0)


def check_sigma(spec: BranchSpec, sigma: float | None, name: str = "checkpoint") -> float:
    """The σ to certify with: the checkpoint's, after checking a user-given value against it."""
    if sigma is not None and not _same_sigma(sigma, spec.sigma):
        raise ValueError(
            f"--sigma {sigma:g} does not match the sigma {spec.sigma:g} the {name} was trained "
            "with; certify at the training σ (omit --sigma to use it)"
        )
    return spec.sigma
