"""Data sets for training and certification, named by one spec string.

``load_dataset(spec, split)`` understands:

- ``digits``: scikit-learn's bundled handwritten digits (1797 images, 8×8, values 0..16), scaled
  to [0, 1] and resized to 1×32×32 with bilinear interpolation; a fixed stratified split keeps
  500 images for ``test`` and the rest for ``train``.
- ``npz:/path/file.npz``: arrays ``x`` (or ``images``) and ``y`` (or ``labels``); keys suffixed
  with the split (``x_train``, ``y_test``, ...) take precedence, so one file can hold both splits.
  Images are (N, H, W), (N, C, H, W) or (N, H, W, C); uint8 is divided by 255, floats must
  already lie in [0, 1].
- ``folder:/path``: one sub-folder per class (sorted names are the class indices), images read
  with PIL; if ``/path/<split>`` exists it is used, so ``/path/train`` and ``/path/test`` work.
- ``torchvision:NAME:/root``: ``torchvision.datasets.NAME`` (e.g. CIFAR10, MNIST), only when
  torchvision is installed; it is never required.

Every data set yields ``(image, label)`` with image a float32 (C, H, W) tensor in [0, 1] (the
space σ is measured in) and has ``num_classes`` and ``input_shape`` attributes.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["SPLITS", "FolderDataset", "ImageDataset", "TensorDataset", "load_dataset"]

SPLITS = ("train", "test")
DIGITS_TEST_SIZE = 500
DIGITS_SIZE = 32
_DIGITS_SPLIT_SEED = 0
# torchvision data sets whose held-out split is not called "test".
_TORCHVISION_TEST_SPLIT = {"ImageNet": "val"}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class ImageDataset(Dataset):
    """A labelled image data set with the metadata certification and checkpoints need."""

    num_classes: int
    input_shape: tuple[int, int, int]

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError


class TensorDataset(ImageDataset):
    """Images (N, C, H, W) float32 in [0, 1] and labels (N,) held in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None):
        if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and "
                f"{tuple(labels.shape)}"
            )
        if images.numel() and (float(images.min()) < 0.0 or float(images.max()) > 1.0):
            raise ValueError("images must lie in [0, 1] (σ is measured in that pixel scale)")
        self.images = images.float().contiguous()
        self.labels = labels.long()
        self.num_classes = num_classes if num_classes else int(self.labels.max()) + 1
        self.input_shape = tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def _pil_to_tensor(image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class FolderDataset(ImageDataset):
    """Images under ``root/<class>/``, decoded on access (a folder may not fit in memory)."""

    def __init__(self, root: Path) -> None:
        from PIL import Image

        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise ValueError(f"{root}: expected one sub-folder per class, found none")
        self.files: list[tuple[Path, int]] = [
            (f, label)
            for label, name in enumerate(classes)
            for f in sorted((root / name).rglob("*"))
            if f.suffix.lower() in _IMAGE_SUFFIXES
        ]
        if not self.files:
            raise ValueError(f"{root}: no image files ({sorted(_IMAGE_SUFFIXES)}) in class folders")
        self.classes = classes
        self.num_classes = len(classes)
        # Every image is converted to the first one's channel count (grey or RGB), so palette
        # or RGBA files in an RGB folder still stack into one batch.
        with Image.open(self.files[0][0]) as first:
            self._mode = "L" if first.mode in ("1", "L", "I", "I;16", "F") else "RGB"
            width, height = first.size
        self.input_shape = (1 if self._mode == "L" else 3, height, width)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.files[index]
        with Image.open(path) as image:
            tensor = _pil_to_tensor(image.convert(self._mode))
        if tuple(tensor.shape) != self.input_shape:
            raise ValueError(
                f"{path}: image shape {tuple(tensor.shape)} differs from {self.input_shape}; "
                "resize the folder's images to one size first"
            )
        return tensor, label


def _digits(split: str) -> TensorDataset:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ImportError(
            "the 'digits' data set needs scikit-learn: pip install 'drs_ext[demo]'"
        ) from err
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().div_(16.0).unsqueeze(1)
    # Bilinear weights are convex, so the clamp only removes float round-off above 1.
    images = F.interpolate(
        images, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False
    ).clamp_(0.0, 1.0)
    indices = np.arange(len(images))
    train_idx, test_idx = train_test_split(
        indices, test_size=DIGITS_TEST_SIZE, random_state=_DIGITS_SPLIT_SEED, stratify=bunch.target
    )
    chosen = np.sort(train_idx if split == "train" else test_idx)
    labels = torch.from_numpy(bunch.target[chosen]).long()
    return TensorDataset(images[torch.from_numpy(chosen)], labels, num_classes=10)


def _pick(arrays, names: tuple[str, ...], split: str, path: Path):
    for name in names:
        if f"{name}_{split}" in arrays.files:
            return arrays[f"{name}_{split}"]
    for name in names:
        if name in arrays.files:
            return arrays[name]
    wanted = " or ".join(f"{n!r}/{n}_{split!r}" for n in names)
    raise ValueError(f"{path}: no array named {wanted}; the file has {sorted(arrays.files)}")


def _npz(path: Path, split: str) -> TensorDataset:
    if not path.is_file():
        raise FileNotFoundError(f"npz data set not found: {path}")
    with np.load(path, allow_pickle=False) as arrays:
        x = _pick(arrays, ("x", "images"), split, path)
        y = _pick(arrays, ("y", "labels"), split, path)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3, 4):
        x = np.moveaxis(x[..., :3], -1, 1)  # (N, H, W, C) -> (N, C, H, W), alpha dropped
    elif x.ndim != 4:
        raise ValueError(f"{path}: images must be (N, H, W) or (N, C, H, W), got {x.shape}")
    images = torch.from_numpy(np.ascontiguousarray(x))
    images = images.float().div_(255.0) if x.dtype == np.uint8 else images.float()
    return TensorDataset(images, torch.from_numpy(np.asarray(y)).long().reshape(-1))


class _TorchvisionDataset(ImageDataset):
    def __init__(self, base, num_classes: int) -> None:
        self.base = base
        self.num_classes = num_classes
        self.input_shape = tuple(self[0][0].shape)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[index]
        return _pil_to_tensor(image), int(label)


def _torchvision(name: str, root: str, split: str, download: bool) -> ImageDataset:
    try:
        import torchvision.datasets
    except ImportError as err:
        raise ImportError(
            f"data set 'torchvision:{name}:...' needs torchvision, which is optional and not "
            "installed: pip install torchvision (matching your torch)"
        ) from err
    factory = getattr(torchvision.datasets, name, None)
    if factory is None:
        raise ValueError(f"torchvision.datasets has no data set named {name!r}")
    params = inspect.signature(factory).parameters
    kwargs: dict = {"download": download} if "download" in params else {}
    # CIFAR/MNIST take train=bool; SVHN, ImageNet and others take split="train"/"test"/"val".
    if "train" in params:
        kwargs["train"] = split == "train"
    elif "split" in params:
        kwargs["split"] = _TORCHVISION_TEST_SPLIT.get(name, "test") if split == "test" else split
    base = factory(root, **kwargs)
    if getattr(base, "classes", None):
        num_classes = len(base.classes)
    elif getattr(base, "labels", None) is not None or getattr(base, "targets", None) is not None:
        labels = base.labels if getattr(base, "labels", None) is not None else base.targets
        num_classes = int(np.max(np.asarray(labels))) + 1
    else:
        raise ValueError(f"torchvision data set {name} exposes no classes, labels or targets")
    return _TorchvisionDataset(base, num_classes)


def load_dataset(spec: str, split: str = "test", *, download: bool = False) -> ImageDataset:
    """Load the data set named by ``spec`` (see the module docstring) for ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    kind, _, rest = spec.partition(":")
    if kind == "digits" and not rest:
        return _digits(split)
    if kind == "npz" and rest:
        return _npz(Path(rest), split)
    if kind == "folder" and rest:
        root = Path(rest)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        return FolderDataset(root / split if (root / split).is_dir() else root)
    if kind == "torchvision":
        name, _, root = rest.partition(":")
        if name and root:
            return _torchvision(name, root, split, download)
    raise ValueError(
        f"unknown data set spec {spec!r}; use 'digits', 'npz:FILE', 'folder:DIR' or "
        "'torchvision:NAME:ROOT'"
    )
