"""Data sources for :func:`normdoctor.scan`: files, image folders, Python callables, random data.

Every loader returns something :func:`normdoctor.scan` accepts (see ``normdoctor/batching.py``):
a tensor, an ``{"inputs": ..., "labels": ...}`` dict, a map-style ``Dataset`` or an iterable of
batches.  Nothing here unpickles Python objects: ``.pt`` files load with ``weights_only=True``,
``.npy``/``.npz`` with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..batching import INPUT_KEYS, LABEL_KEYS
from ..errors import DataError, one_line
from .models import import_object

__all__ = [
    "GRAYSCALE_MEAN",
    "GRAYSCALE_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageFolderData",
    "RandomDataWarning",
    "load_data",
]

_IMAGE_FORMATS = ["PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM"]

#: Per-channel mean and std of ImageNet (RGB, pixel values in [0, 1]): torchvision's defaults.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: For grayscale images: the average of the ImageNet channel values.
GRAYSCALE_MEAN = (0.449,)
GRAYSCALE_STD = (0.226,)
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)


class RandomDataWarning(UserWarning):
    """Random inputs say little about how a model drifts on real data."""


def load_data(
    spec: Any,
    *,
    input_shape: Sequence[int] | None = None,
    image_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
    grayscale: bool = False,
    normalize: str | None = None,
) -> Any:
    """Data for :func:`normdoctor.scan` from a file, a folder, a Python callable or ``random``.

    Args:
        spec: one of

            * ``path.pt`` (``torch.save`` of a tensor, an ``(inputs, labels)`` pair, a dict with
              ``inputs``/``labels`` (``x``/``y`` accepted) or a list of batches), loaded with
              ``weights_only=True``;
            * ``path.npy`` (the inputs) or ``path.npz`` (``inputs`` and optional ``labels``,
              ``x``/``y`` accepted; an archive with a single array holds the inputs);
            * a folder of images (PNG, JPEG, ...): see :class:`ImageFolderData`;
            * ``package.module:function`` or ``path/to/file.py:function``: called without
              arguments, it returns anything ``scan()`` accepts (typically an iterable of batches
              or a ``DataLoader``);
            * ``random`` or ``random:N,C,H,W``: standard normal inputs of that shape (first
              dimension: number of samples), with a :class:`RandomDataWarning`;
            * anything that is not a string or path is returned unchanged.
        input_shape: the shape for ``random`` without one in the spec.
        image_size: image folders: resize every image to ``size`` x ``size`` (an int) or
            ``(height, width)``; without it all images must share one size.
        mean, std: image folders: per-channel normalization of pixel values in [0, 1]; default
            none (pixels stay in [0, 1]).
        normalize: image folders, as the CLI's ``--normalize``: ``"imagenet"``
            (:data:`IMAGENET_MEAN`/:data:`IMAGENET_STD`; :data:`GRAYSCALE_MEAN`/``_STD`` with
            ``grayscale``), ``"MEAN,STD"`` or per channel ``"M1,M2,M3,S1,S2,S3"``.
        seed: seed of ``random`` data.
        grayscale: image folders: load images as one channel instead of RGB.

    Raises:
        DataError: with a one-line reason.
    """
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    text = os.fspath(spec)
    if text == "random" or text.startswith("random:"):
        return _random(text, input_shape, seed)
    path = Path(text)
    if normalize is not None:
        mean, std = _parse_normalize(normalize, grayscale)
    if path.is_dir():
        return ImageFolderData(path, image_size=image_size, mean=mean, std=std, grayscale=grayscale)
    if normalize is not None:
        raise DataError("--normalize applies to image folders only")
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".npy":
            return _load_npy(path)
        if suffix == ".npz":
            return _load_npz(path)
        if suffix in (".pt", ".pth", ".bin"):
            return _load_pt(path)
        raise DataError(
            f"{path}: unsupported data file type {suffix or '(no extension)'!r}: use .pt, .npy, "
            ".npz, a folder of images, module:function or random"
        )
    if ":" in text and not text.startswith("random"):
        return _from_callable(text)
    raise DataError(f"{text}: no such file or folder")


def _parse_normalize(text: str, grayscale: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``imagenet``, ``MEAN,STD`` or ``M1,...,Mc,S1,...,Sc`` as (mean, std)."""
    if text.strip().lower() == "imagenet":
        return (GRAYSCALE_MEAN, GRAYSCALE_STD) if grayscale else (IMAGENET_MEAN, IMAGENET_STD)
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or len(values) % 2:
        raise DataError(
            f"--normalize {text!r}: expected 'imagenet', 'MEAN,STD' or per channel "
            "'M1,M2,M3,S1,S2,S3'"
        )
    half = len(values) // 2
    return values[:half], values[half:]


# ---------------------------------------------------------------------------------- random


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in re.split(r"[,x]", text.strip()))
    except ValueError as exc:
        raise DataError(f"random data shape {text!r} must be integers like 64,3,32,32") from exc
    if not shape or any(d < 1 for d in shape):
        raise DataError(f"random data shape {text!r} must be positive integers like 64,3,32,32")
    return shape


def _random(text: str, input_shape: Sequence[int] | None, seed: int) -> torch.Tensor:
    if text.startswith("random:"):
        shape = _parse_shape(text[len("random:") :])
    elif input_shape is not None:
        shape = _parse_shape(",".join(str(d) for d in input_shape))
    else:
        raise DataError("random data needs a shape: random:N,C,H,W (N samples) or an input shape")
    if len(shape) < 2:
        raise DataError(f"random data shape {shape} needs a sample dimension and at least one more")
    warnings.warn(
        f"random inputs of shape {shape}: they say little about drift on real data; use them to "
        "check that the model runs, scan real data for a verdict",
        RandomDataWarning,
        stacklevel=3,
    )
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen)


# ---------------------------------------------------------------------------------- arrays


def _pick(names: Iterable[str], keys: Sequence[str]) -> str | None:
    names = list(names)
    return next((k for k in keys if k in names), None)


def _inputs_labels(
    inputs: torch.Tensor, labels: torch.Tensor | None, where: str
) -> torch.Tensor | dict[str, torch.Tensor]:
    if inputs.dim() == 0:
        raise DataError(f"{where}: the inputs are a scalar, expected samples along dimension 0")
    if inputs.shape[0] == 0:
        raise DataError(f"{where}: the inputs hold no samples")
    if labels is None:
        return inputs
    if labels.dim() == 0 or labels.shape[0] != inputs.shape[0]:
        n_labels = labels.shape[0] if labels.dim() else 0
        raise DataError(f"{where}: {inputs.shape[0]} inputs but {n_labels} labels")
    return {"inputs": inputs, "labels": labels}


def _array(value: np.ndarray, where: str) -> torch.Tensor:
    if value.dtype == object:
        raise DataError(f"{where}: object arrays are not supported")
    if not value.flags.writeable:
        value = value.copy()
    return torch.from_numpy(np.ascontiguousarray(value))


def _load_npy(path: Path) -> Any:
    try:
        value = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read the .npy file ({one_line(exc)})") from exc
    return _inputs_labels(_array(value, str(path)), None, str(path))


def _load_npz(path: Path) -> Any:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read the .npz file ({one_line(exc)})") from exc
    return _from_mapping(arrays, str(path))


def _from_mapping(values: dict[str, Any], where: str) -> Any:
    if not values:
        raise DataError(f"{where}: holds no arrays")
    x_key = _pick(values, INPUT_KEYS)
    y_key = _pick(values, LABEL_KEYS)
    if x_key is None:
        if len(values) == 1:
            x_key = next(iter(values))
        else:
            raise DataError(
                f"{where}: no inputs among {', '.join(sorted(values))} (expected 'inputs' or 'x', "
                "with optional 'labels' or 'y')"
            )

    def tensor(value: Any) -> torch.Tensor:
        if isinstance(value, np.ndarray):
            return _array(value, where)
        if isinstance(value, torch.Tensor):
            return value
        raise DataError(f"{where}: expected arrays or tensors, found a {type(value).__name__}")

    labels = tensor(values[y_key]) if y_key is not None else None
    return _inputs_labels(tensor(values[x_key]), labels, where)


def _load_pt(path: Path) -> Any:
    with open(path, "rb") as fh:
        zipped = fh.read(4) == b"PK\x03\x04"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as exc:
        message = one_line(exc)
        if "weights only" in str(exc).lower():
            raise DataError(
                f"{path}: holds pickled Python objects, which normdoctor does not unpickle; save "
                "plain tensors, e.g. torch.save({'inputs': x, 'labels': y}, path)"
            ) from exc
        raise DataError(f"{path}: cannot read the data file ({message})") from exc
    where = str(path)
    if isinstance(obj, torch.Tensor):
        return _inputs_labels(obj, None, where)
    if isinstance(obj, dict):
        return _from_mapping({str(k): v for k, v in obj.items()}, where)
    if isinstance(obj, (tuple, list)):
        if (
            len(obj) == 2
            and all(isinstance(v, torch.Tensor) for v in obj)
            and obj[1].dim() == 1
            and obj[0].dim() >= 1
            and obj[0].shape[0] == obj[1].shape[0]
        ):
            return _inputs_labels(obj[0], obj[1], where)
        if not obj:
            raise DataError(f"{where}: holds an empty list")
        return list(obj)  # a list of batches, used as given
    raise DataError(f"{where}: holds a {type(obj).__name__}, not tensors")


# ---------------------------------------------------------------------------- callables


def _from_callable(spec: str) -> Any:
    func = import_object(spec, what="data", error=DataError)
    if not callable(func):
        return func
    try:
        result = func()
    except Exception as exc:
        raise DataError(
            f"data function {spec!r} failed: {type(exc).__name__}: {one_line(exc)}"
        ) from exc
    if result is None or isinstance(result, (str, bytes)):
        raise DataError(
            f"data function {spec!r} returned {type(result).__name__}: expected tensors or an "
            "iterable of batches"
        )
    return result


# ------------------------------------------------------------------------------- images


class ImageFolderData(Dataset):
    """The images of a folder as a map-style dataset of normalized ``(C, H, W)`` float tensors.

    Layout: images directly in the folder (no labels), or in one sub-folder per class (labels
    are the indices of the sorted sub-folder names, as ``torchvision.datasets.ImageFolder``
    does; images further down a class folder belong to it).  Files without an image extension
    and hidden files are ignored.

    Every image is decoded once, up front (EXIF orientation applied, converted to RGB or to
    one channel with ``grayscale``, resized to ``image_size`` with bilinear filtering, no crop)
    and kept as ``uint8``; items are scaled to [0, 1] and, only when ``mean``/``std`` are
    given, normalized with them when read (:attr:`normalization` says which).

    A file with an image extension that cannot be decoded is refused (:class:`DataError` naming
    it), not skipped: skipping would silently change the samples, and so the batches and
    statistics the report describes.

    Attributes:
        files: the image paths, in sample order.
        classes: the class names (sub-folders), empty without labels.
        labels: per-sample class indices, or ``None``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        image_size: int | Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        grayscale: bool = False,
    ) -> None:
        try:
            from PIL import Image, ImageOps
        except ImportError as exc:
            raise DataError("image folders need Pillow: `pip install normdoctor[images]`") from exc
        self.root = Path(root)
        channels = 1 if grayscale else 3
        # No normalization unless asked: a model trained on [0, 1] pixels given ImageNet-
        # normalized ones reads as "stale statistics" (issue 12).
        self.mean = tuple(float(m) for m in (mean if mean is not None else (0.0,)))
        self.std = tuple(float(s) for s in (std if std is not None else (1.0,)))
        if len(self.mean) == 1:
            self.mean *= channels
        if len(self.std) == 1:
            self.std *= channels
        if len(self.mean) != channels or len(self.std) != channels:
            raise DataError(
                f"mean and std need {channels} values (or one) for "
                f"{'grayscale' if grayscale else 'RGB'} images"
            )
        if any(s <= 0 for s in self.std):
            raise DataError(f"std must be positive, got {self.std}")
        self.normalization = (
            "pixels in [0, 1], not normalized"
            if mean is None and std is None
            else f"pixels in [0, 1] normalized with mean {self.mean}, std {self.std}"
        )
        size = _image_size(image_size)
        self.files, self.classes, labels = _list_images(self.root)
        self.labels = torch.tensor(labels, dtype=torch.long) if labels is not None else None
        pixels = []
        first: tuple[Path, tuple[int, int]] | None = None
        for file in self.files:
            try:
                # Only the common raster decoders: Pillow picks one by content, and a ".png"
                # that is really EPS would otherwise reach Ghostscript.
                with Image.open(file, formats=_IMAGE_FORMATS) as opened:
                    img = ImageOps.exif_transpose(opened)
                    img = img.convert("L" if grayscale else "RGB")
                    if size is not None and img.size != (size[1], size[0]):
                        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                    array = np.asarray(img, dtype=np.uint8)
            except Exception as exc:
                raise DataError(
                    f"{file}: cannot decode image ({one_line(exc)}); remove or replace it"
                ) from exc
            hw = (int(array.shape[0]), int(array.shape[1]))
            if first is None:
                first = (file, hw)
            elif hw != first[1]:
                raise DataError(
                    f"images differ in size ({first[0].name} is {first[1][0]}x{first[1][1]}, "
                    f"{file.name} is {hw[0]}x{hw[1]}): pass an image size to resize them"
                )
            pixels.append(array.reshape(hw[0], hw[1], channels))
        self.pixels = np.stack(pixels)  # (N, H, W, C) uint8
        self._mean = torch.tensor(self.mean).view(-1, 1, 1)
        self._std = torch.tensor(self.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def image(self, index: int) -> torch.Tensor:
        x = torch.from_numpy(self.pixels[index]).permute(2, 0, 1).to(torch.float32) / 255.0
        return (x - self._mean) / self._std

    def __getitem__(self, index: int) -> Any:
        x = self.image(index)
        if self.labels is None:
            return x
        return x, int(self.labels[index])

    def tensors(self) -> torch.Tensor | dict[str, torch.Tensor]:
        """Everything as one tensor (and labels): ``{"inputs", "labels"}`` or the inputs."""
        x = torch.stack([self.image(i) for i in range(len(self))])
        return x if self.labels is None else {"inputs": x, "labels": self.labels.clone()}

    def __repr__(self) -> str:
        shape = tuple(self.pixels.shape[1:])
        return (
            f"ImageFolderData({str(self.root)!r}, {len(self)} images, HxWxC={shape}, "
            f"classes={len(self.classes)})"
        )


def _image_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        values = tuple(int(v) for v in image_size)
        if len(values) == 1:
            values = values * 2
        if len(values) != 2:
            raise DataError(f"image size must be an int or (height, width), got {image_size!r}")
        size = (values[0], values[1])
    if min(size) < 1:
        raise DataError(f"image size must be positive, got {image_size!r}")
    return size


def _is_image(path: Path) -> bool:
    return (
        path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS
    )


def _list_images(root: Path) -> tuple[list[Path], list[str], list[int] | None]:
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    loose = [p for p in entries if _is_image(p)]
    class_dirs = []
    for d in (p for p in entries if p.is_dir()):
        images = sorted(p for p in d.rglob("*") if _is_image(p) and not _hidden(p, d))
        if images:
            class_dirs.append((d.name, images))
    if loose and class_dirs:
        raise DataError(
            f"{root}: holds both images and class sub-folders ({loose[0].name}, "
            f"{class_dirs[0][0]}/): put every image in a class folder, or none"
        )
    if class_dirs:
        files, labels = [], []
        for index, (_name, images) in enumerate(class_dirs):
            files += images
            labels += [index] * len(images)
        return files, [name for name, _ in class_dirs], labels
    if loose:
        return loose, [], None
    kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
    raise DataError(f"{root}: no images found (looked for {kinds})")


def _hidden(path: Path, base: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(base).parts)
