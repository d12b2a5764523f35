"""Image loaders: IDX files written by the test, and sklearn's bundled digits."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from dgdlens.data.images import (
    IDXFormatError,
    ImageFilesNotFoundError,
    load_digits_images,
    load_images,
    load_mnist,
    read_idx,
    write_idx,
)


def _raw_idx(array: np.ndarray, code: int) -> bytes:
    """An IDX file built by hand from the format description (independent of write_idx)."""
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_split(folder, prefix, images, labels, *, gz):
    suffix = ".gz" if gz else ""
    opener = gzip.open if gz else open
    with opener(folder / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as fh:
        fh.write(_raw_idx(images, 0x08))
    with opener(folder / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as fh:
        fh.write(_raw_idx(labels, 0x08))


@pytest.fixture
def tiny_mnist():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[1, 0, 0] = 0, 255  # both ends of the range
    labels = rng.integers(0, 10, size=7, dtype=np.uint8)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_reads_tiny_idx(tmp_path, tiny_mnist, gz):
    images, labels = tiny_mnist
    _write_split(tmp_path, "t10k", images, labels, gz=gz)
    data = load_mnist(tmp_path, "test")
    assert data.X.shape == (7, 784) and data.X.dtype == np.float32 and data.image_shape == (1, 28, 28)
    np.testing.assert_allclose(data.X, images.reshape(7, -1) / 255.0, rtol=1e-6)
    assert data.X.min() == 0.0 and data.X.max() == 1.0
    np.testing.assert_array_equal(data.labels, labels)
    np.testing.assert_array_equal(data.images[3, 0], images[3] / np.float32(255.0))
    raw = load_mnist(tmp_path, "test", scale=False, limit=3)
    np.testing.assert_array_equal(raw.X, images[:3].reshape(3, -1))


def test_torchvision_layout_and_fashion(tmp_path, tiny_mnist):
    images, labels = tiny_mnist
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _write_split(raw, "train", images, labels, gz=True)
    data = load_images("fashion_mnist", tmp_path, "train")
    assert data.name == "fashion_mnist-train" and len(data) == 7
    with pytest.raises(ImageFilesNotFoundError, match="never downloads"):
        load_mnist(tmp_path, "test", kind="fashion")
    with pytest.raises(ValueError, match="path="):
        load_images("mnist")


@pytest.mark.parametrize("dtype, code", [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C),
                                         (np.float32, 0x0D), (np.float64, 0x0E)])
def test_read_idx_all_types_and_roundtrip(tmp_path, dtype, code):
    arr = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    if dtype == np.uint8:
        arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(_raw_idx(arr, code))
    out = read_idx(tmp_path / "a.idx")
    assert out.dtype == np.dtype(dtype) and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)
    write_idx(tmp_path / "b.idx.gz", arr)
    assert (tmp_path / "b.idx.gz").read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(read_idx(tmp_path / "b.idx.gz"), arr)


def test_bad_idx_files(tmp_path, tiny_mnist):
    images, labels = tiny_mnist
    good = _raw_idx(images, 0x08)
    cases = {
        "magic.idx": b"\x01" + good[1:],
        "type.idx": good[:2] + b"\x07" + good[3:],
        "short.idx": good[:-10],
        "long.idx": good + b"\x00",
        "header.idx": good[:6],
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(IDXFormatError):
            read_idx(tmp_path / name)
    (tmp_path / "broken.gz").write_bytes(gzip.compress(good)[:-20])
    with pytest.raises(IDXFormatError, match="decompressed|truncated"):
        read_idx(tmp_path / "broken.gz")
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope.idx")
    # images and labels that disagree in length
    _write_split(tmp_path, "train", images, labels[:5], gz=False)
    with pytest.raises(IDXFormatError, match="different data sets"):
        load_mnist(tmp_path, "train")


def test_digits_default():
    data = load_images()
    assert data.X.shape == (1797, 64) and data.image_shape == (1, 8, 8)
    assert data.X.min() == 0.0 and data.X.max() == 1.0 and data.X.dtype == np.float32
    assert set(np.unique(data.labels)) == set(range(10))
    from sklearn.datasets import load_digits

    np.testing.assert_allclose(data.X * 16, load_digits().data, atol=1e-5)
    sub = load_digits_images().subset(np.arange(5))
    assert sub.X.shape == (5, 64) and sub.X.base is None
