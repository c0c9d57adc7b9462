"""normdoctor.io.load_data: every source gives data that scan() accepts; bad data, clear errors."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from normdoctor import DataError, scan
from normdoctor.io import (
    GRAYSCALE_MEAN,
    GRAYSCALE_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderData,
    RandomDataWarning,
    load_data,
)

# Pixels go through uint8 -> float32 / 255 -> (x - mean) / std in float32: compare with a
# float64 reference at float32 resolution.
PIXEL_TOL = dict(rtol=1e-6, atol=1e-6)


class _TinyCNN(nn.Module):
    def __init__(self, channels: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _scans(model: nn.Module, data) -> None:
    report = scan(model, data, batch_size=4, shuffle=False)
    layer = report.layer("bn")
    assert layer.train is not None and layer.train.samples > 0


def _write_image(path: Path, seed: int, size=(6, 5), mode="RGB") -> np.ndarray:
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels if channels == 3 else pixels[..., 0], mode).save(path)
    return pixels


# --------------------------------------------------------------------------------- arrays


def test_npy_holds_the_inputs(tmp_path):
    x = np.random.default_rng(0).normal(size=(10, 3, 5, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    data = load_data(tmp_path / "x.npy")
    torch.testing.assert_close(data, torch.from_numpy(x), rtol=0, atol=0)
    _scans(_TinyCNN(), data)


@pytest.mark.parametrize("keys", [("inputs", "labels"), ("x", "y")], ids=["inputs", "x-y"])
def test_npz_with_inputs_and_labels(tmp_path, keys):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 3, 4, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=12)
    np.savez(tmp_path / "d.npz", **{keys[0]: x, keys[1]: y})
    data = load_data(str(tmp_path / "d.npz"))
    assert set(data) == {"inputs", "labels"}
    torch.testing.assert_close(data["inputs"], torch.from_numpy(x), rtol=0, atol=0)
    assert data["labels"].tolist() == y.tolist()
    _scans(_TinyCNN(), data)


def test_npz_with_a_bare_array_is_the_inputs(tmp_path):
    x = np.ones((5, 3, 4, 4), dtype=np.float32)
    np.savez(tmp_path / "d.npz", x)
    torch.testing.assert_close(load_data(tmp_path / "d.npz"), torch.ones(5, 3, 4, 4))


def test_sample_test_split_loads_and_scans():
    path = Path(__file__).resolve().parents[1] / "sample_models" / "data" / "test.npz"
    if not path.exists():
        pytest.skip("sample data not built")
    data = load_data(path)
    assert data["inputs"].shape == (360, 1, 8, 8) and data["labels"].shape == (360,)
    from sample_models.archs import DigitsCNN

    report = scan(DigitsCNN().eval(), data, batch_size=60, shuffle=False, max_batches=2)
    assert report.layer("norm1").train is not None


@pytest.mark.parametrize("form", ["tensor", "tuple", "dict", "xy-dict", "batches"])
def test_pt_files(tmp_path, form):
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, 4, 4, generator=gen), torch.arange(8) % 3
    obj = {
        "tensor": x,
        "tuple": (x, y),
        "dict": {"inputs": x, "labels": y},
        "xy-dict": {"x": x, "y": y},
        "batches": [(x[:4], y[:4]), (x[4:], y[4:])],
    }[form]
    torch.save(obj, tmp_path / "d.pt")
    data = load_data(tmp_path / "d.pt")
    if form == "tensor":
        torch.testing.assert_close(data, x, rtol=0, atol=0)
    elif form == "batches":
        assert isinstance(data, list) and len(data) == 2
    else:
        torch.testing.assert_close(data["inputs"], x, rtol=0, atol=0)
        assert data["labels"].tolist() == y.tolist()
    _scans(_TinyCNN(), data)


def test_non_string_data_is_returned_unchanged():
    x = torch.zeros(2, 3, 4, 4)
    assert load_data(x) is x


# ---------------------------------------------------------------------------- image folders


def test_image_folder_with_classes(tmp_path):
    expected = {}
    for cls, seeds in (("cat", (0, 1)), ("dog", (2, 3, 4))):
        (tmp_path / cls).mkdir()
        for seed in seeds:
            expected[(cls, seed)] = _write_image(tmp_path / cls / f"{seed}.png", seed)
    (tmp_path / "cat" / "notes.txt").write_text("not an image, ignored")
    before = _snapshot(tmp_path)
    data = load_data(tmp_path)
    assert isinstance(data, ImageFolderData)
    assert data.classes == ["cat", "dog"] and data.labels.tolist() == [0, 0, 1, 1, 1]
    assert len(data) == 5
    x, label = data[2]
    assert x.shape == (3, 5, 6) and x.dtype == torch.float32 and label == 1
    pixels = torch.from_numpy(expected[("dog", 2)]).permute(2, 0, 1).double() / 255.0
    # Pixels in [0, 1], not normalized unless asked (a model trained on [0, 1] pixels given
    # ImageNet-normalized ones reads as stale).
    torch.testing.assert_close(x.double(), pixels, **PIXEL_TOL)
    assert data.normalization == "pixels in [0, 1], not normalized"
    asked = load_data(tmp_path, normalize="imagenet")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    torch.testing.assert_close(asked[2][0].double(), (pixels - mean) / std, **PIXEL_TOL)
    assert "normalized with mean" in asked.normalization
    custom = load_data(tmp_path, normalize="0.5,0.25")
    torch.testing.assert_close(custom[2][0].double(), (pixels - 0.5) / 0.25, **PIXEL_TOL)
    _scans(_TinyCNN(), data)
    report = scan(_TinyCNN().eval(), data, batch_size=2, group_by="label", shuffle=False)
    assert report.composition.group_by == "label"
    assert _snapshot(tmp_path) == before, "reading images must not write anything"


def test_image_folder_without_classes_resized_grayscale_custom_norm(tmp_path):
    for seed in range(3):
        _write_image(tmp_path / f"{seed}.jpg", seed, size=(10 + seed, 7))
    data = load_data(tmp_path, image_size=(4, 5), grayscale=True, mean=(0.5,), std=(0.25,))
    assert data.labels is None and len(data) == 3
    assert data[0].shape == (1, 4, 5)
    # Values in [0, 1] normalized with mean 0.5, std 0.25 lie in [-2, 2].
    assert float(data[0].min()) >= -2.0 and float(data[0].max()) <= 2.0
    _scans(_TinyCNN(channels=1), data)


def test_grayscale_defaults(tmp_path):
    _write_image(tmp_path / "a.png", 0, mode="L")
    data = load_data(tmp_path, grayscale=True)
    assert data.mean == (0.0,) and data.std == (1.0,)
    asked = load_data(tmp_path, grayscale=True, normalize="imagenet")
    assert asked.mean == GRAYSCALE_MEAN and asked.std == GRAYSCALE_STD
    with pytest.raises(DataError, match="--normalize"):
        load_data(tmp_path, normalize="1,2,3")


def test_image_folder_tensors(tmp_path):
    (tmp_path / "a").mkdir()
    _write_image(tmp_path / "a" / "0.png", 0)
    _write_image(tmp_path / "a" / "1.png", 1)
    out = ImageFolderData(tmp_path).tensors()
    assert out["inputs"].shape == (2, 3, 5, 6) and out["labels"].tolist() == [0, 0]


# ---------------------------------------------------------------------- callables, random


def test_module_function_and_file_function(tmp_path):
    source = textwrap.dedent(
        """
        import torch

        def batches():
            gen = torch.Generator().manual_seed(0)
            return [(torch.randn(4, 3, 4, 4, generator=gen), torch.arange(4) % 3)
                    for _ in range(3)]
        """
    )
    (tmp_path / "my_data_mod.py").write_text(source)
    by_file = load_data(f"{tmp_path / 'my_data_mod.py'}:batches")
    assert len(by_file) == 3
    _scans(_TinyCNN(), by_file)
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        by_module = load_data("my_data_mod:batches")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_data_mod", None)
    torch.testing.assert_close(by_module[0][0], by_file[0][0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "spec, kwargs, shape",
    [
        ("random:6,3,4,4", {}, (6, 3, 4, 4)),
        ("random", {"input_shape": (5, 3, 4, 4)}, (5, 3, 4, 4)),
    ],
    ids=["in-spec", "input-shape"],
)
def test_random_data_warns(spec, kwargs, shape):
    with pytest.warns(RandomDataWarning, match="say little about drift"):
        x = load_data(spec, seed=3, **kwargs)
    assert tuple(x.shape) == shape
    with pytest.warns(RandomDataWarning):
        again = load_data(spec, seed=3, **kwargs)
    torch.testing.assert_close(x, again, rtol=0, atol=0)  # seeded
    _scans(_TinyCNN(), x)


# ------------------------------------------------------------------------------ bad data


def _bad_data_cases():
    def missing(d):
        return str(d / "nope.npz"), {}, r"no such file or folder"

    def empty_folder(d):
        (d / "imgs").mkdir()
        return d / "imgs", {}, r"no images found"

    def only_text_files(d):
        (d / "imgs").mkdir()
        (d / "imgs" / "readme.txt").write_text("hello")
        return d / "imgs", {}, r"no images found"

    def corrupt_image_among_good(d):
        (d / "imgs" / "a").mkdir(parents=True)
        for seed in range(3):
            _write_image(d / "imgs" / "a" / f"{seed}.png", seed)
        (d / "imgs" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
        return d / "imgs", {}, r"broken\.png: cannot decode image"

    def truncated_image(d):
        (d / "imgs").mkdir()
        _write_image(d / "imgs" / "good.png", 0, size=(30, 30))
        _write_image(d / "imgs" / "cut.png", 1, size=(30, 30))
        blob = (d / "imgs" / "cut.png").read_bytes()
        (d / "imgs" / "cut.png").write_bytes(blob[: len(blob) // 2])
        return d / "imgs", {}, r"cut\.png: cannot decode image"

    def sizes_differ(d):
        (d / "imgs").mkdir()
        _write_image(d / "imgs" / "a.png", 0, size=(4, 4))
        _write_image(d / "imgs" / "b.png", 1, size=(5, 4))
        return d / "imgs", {}, r"differ in size.*image size"

    def mixed_layout(d):
        (d / "imgs" / "cls").mkdir(parents=True)
        _write_image(d / "imgs" / "loose.png", 0)
        _write_image(d / "imgs" / "cls" / "a.png", 1)
        return d / "imgs", {}, r"both images and class sub-folders"

    def wrong_mean_length(d):
        (d / "imgs").mkdir()
        _write_image(d / "imgs" / "a.png", 0)
        return d / "imgs", {"mean": (0.1, 0.2)}, r"mean and std need 3 values"

    def npz_without_inputs(d):
        np.savez(d / "d.npz", a=np.zeros(3), b=np.zeros(3))
        return d / "d.npz", {}, r"no inputs among a, b"

    def npz_label_count(d):
        np.savez(d / "d.npz", inputs=np.zeros((4, 2)), labels=np.zeros(3))
        return d / "d.npz", {}, r"4 inputs but 3 labels"

    def npy_object_array(d):
        np.save(d / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
        return d / "o.npy", {}, r"cannot read the \.npy file"

    def pickled_pt(d):
        torch.save({"inputs": torch.zeros(2, 3), "meta": _Marker()}, d / "d.pt")
        return d / "d.pt", {}, r"pickled Python objects"

    def corrupt_pt(d):
        (d / "d.pt").write_bytes(b"PK\x03\x04 not really a zip")
        return d / "d.pt", {}, r"cannot read the data file"

    def unsupported_suffix(d):
        (d / "d.csv").write_text("1,2,3\n")
        return d / "d.csv", {}, r"unsupported data file type '\.csv'"

    def random_without_shape(d):
        return "random", {}, r"random data needs a shape"

    def random_bad_shape(d):
        return "random:3,x,4", {}, r"must be integers"

    def function_not_importing(d):
        return "no_such_module_xyz:make", {}, r"cannot import"

    def function_raises(d):
        (d / "bad_data.py").write_text("def make():\n    raise RuntimeError('no data today')\n")
        return f"{d / 'bad_data.py'}:make", {}, r"failed: RuntimeError: no data today"

    def function_returns_none(d):
        (d / "none_data.py").write_text("def make():\n    return None\n")
        return f"{d / 'none_data.py'}:make", {}, r"returned NoneType"

    return [
        missing,
        empty_folder,
        only_text_files,
        corrupt_image_among_good,
        truncated_image,
        sizes_differ,
        mixed_layout,
        wrong_mean_length,
        npz_without_inputs,
        npz_label_count,
        npy_object_array,
        pickled_pt,
        corrupt_pt,
        unsupported_suffix,
        random_without_shape,
        random_bad_shape,
        function_not_importing,
        function_raises,
        function_returns_none,
    ]


class _Marker:
    """Any class outside torch's weights_only allowlist."""


@pytest.mark.parametrize("case", _bad_data_cases(), ids=lambda f: f.__name__)
def test_bad_data_is_one_clear_data_error(case, tmp_path):
    spec, kwargs, pattern = case(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(DataError, match=pattern) as err:
        load_data(spec, **kwargs)
    assert "\n" not in str(err.value)
    assert _snapshot(tmp_path) == before, "nothing written, nothing changed"
