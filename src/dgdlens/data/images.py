"""Image data sets for the decoder-only experiments, read from disk only (nothing is downloaded).

- :func:`load_digits_images`: scikit-learn's bundled 8x8 digits (1,797 images, in the sklearn wheel):
  the offline default.
- :func:`load_mnist`: MNIST or Fashion-MNIST from the original IDX files in a local folder
  (``train-images-idx3-ubyte[.gz]`` etc., also the torchvision ``<root>/MNIST/raw`` layout).
- :func:`read_idx`: the IDX reader itself (gzip-compressed or not, detected from the file's bytes).
- :func:`load_images`: one entry point by name.

Pixels come back as flat float32 rows scaled to [0, 1] (what a Bernoulli/BCE likelihood expects),
with the image shape kept alongside so convolutional models can reshape them.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ImageData", "IDXFormatError", "ImageFilesNotFoundError", "read_idx", "write_idx", "load_mnist",
           "load_digits_images", "load_images"]

# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/, "the IDX file format")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


class IDXFormatError(ValueError):
    """A file is not a valid IDX file (bad magic number, unknown type, wrong length)."""


class ImageFilesNotFoundError(FileNotFoundError, ValueError):
    """The IDX files of a data set are not in the given folder."""


@dataclass
class ImageData:
    """Images as flat rows plus their labels.

    Attributes
    ----------
    X
        ``(n, channels * height * width)`` float32 pixels (in [0, 1] when loaded with ``scale=True``).
    labels
        ``(n,)`` int64 class labels.
    image_shape
        ``(channels, height, width)`` of one image.
    name
        Data set name (``"digits"``, ``"mnist"``, ``"fashion_mnist"``) and split, for reports.
    """

    X: np.ndarray
    labels: np.ndarray
    image_shape: tuple[int, int, int]
    name: str

    def __post_init__(self) -> None:
        if self.X.ndim != 2 or self.X.shape[1] != int(np.prod(self.image_shape)):
            raise ValueError(f"X must have shape (n, {int(np.prod(self.image_shape))}) for images of shape "
                             f"{self.image_shape}, got {self.X.shape}")
        if len(self.labels) != len(self.X):
            raise ValueError(f"{len(self.labels)} labels for {len(self.X)} images; they must match.")

    def __len__(self) -> int:
        return len(self.X)

    @property
    def images(self) -> np.ndarray:
        """The pixels as ``(n, channels, height, width)`` (a view, no copy)."""
        return self.X.reshape(-1, *self.image_shape)

    def subset(self, index) -> ImageData:
        """The images at ``index`` (integer positions or a boolean mask), copied.

        Parameters
        ----------
        index
            Integer positions (any order), a boolean mask of length ``n``, or a slice.

        Returns
        -------
        ImageData
            The selected images and labels (copies), with the same ``image_shape`` and ``name``.
        """
        return ImageData(self.X[index].copy(), self.labels[index].copy(), self.image_shape, self.name)


# ---------------------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        head = fh.read(2)
    opener = gzip.open if head == _GZIP_MAGIC else open
    try:
        with opener(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError) as err:  # truncated or damaged gzip stream
        raise IDXFormatError(f"{path} could not be decompressed ({err}); the file is damaged, get a fresh copy.") from err


def read_idx(path) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip-compressed or not, into a numpy array.

    The header is two zero bytes, a type code, the number of dimensions, then one big-endian int32
    per dimension; the data follow in C order. Compression is detected from the file's first bytes,
    not its name.

    Parameters
    ----------
    path
        The IDX file (str or path-like), e.g. ``train-images-idx3-ubyte.gz``.

    Returns
    -------
    numpy.ndarray
        The array with the header's shape (MNIST images: ``(n, 28, 28)`` uint8; labels: ``(n,)`` uint8),
        in native byte order.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    IDXFormatError
        (a ValueError) the header is invalid or the data are shorter or longer than the header says.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No IDX file at {path}.")
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IDXFormatError(f"{path} is not an IDX file: it must start with two zero bytes (magic number).")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise IDXFormatError(f"{path} has unknown IDX data type 0x{code:02x}; valid: "
                             f"{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)}.")
    if ndim < 1:
        raise IDXFormatError(f"{path} declares 0 dimensions; an IDX file needs at least one.")
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise IDXFormatError(f"{path} is truncated inside its header.")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    got = len(raw) - header_end
    if got != expected:
        raise IDXFormatError(f"{path} holds {got} data bytes but its header {shape} ({dtype}) needs {expected}; "
                             "the file is truncated or damaged, get a fresh copy.")
    return np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file (gzip-compressed when ``compress`` or the name ends in ``.gz``).

    The inverse of :func:`read_idx`; useful for tests and for exporting subsets in the MNIST format.

    Parameters
    ----------
    path
        Destination file (str or path-like); overwritten if it exists.
    array
        Data with 1 to 255 dimensions and dtype uint8, int8, int16, int32, float32 or float64 (e.g.
        ``(n, 28, 28)`` uint8 images).
    compress
        Gzip the file; ``None``: only when ``path`` ends in ``.gz``.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        For a dtype or number of dimensions IDX cannot store.
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    key = array.dtype.newbyteorder("=")
    if key not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use uint8, int8, int16, int32, float32 or float64.")
    if array.ndim < 1 or array.ndim > 255:
        raise ValueError("IDX needs an array with 1 to 255 dimensions.")
    header = bytes([0, 0, codes[key], array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[codes[key]]).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    with (gzip.open if compress else open)(path, "wb") as fh:
        fh.write(payload)
    return path


# ---------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST
# ---------------------------------------------------------------------------------------------------

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_TORCHVISION_DIRS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_KIND_ALIASES = {"mnist": "mnist", "fashion": "fashion_mnist", "fashion_mnist": "fashion_mnist",
                 "fashion-mnist": "fashion_mnist", "fmnist": "fashion_mnist"}


def _find_file(folders: list[Path], prefix: str, what: str) -> Path | None:
    # the official names use "-idx3-ubyte"; some mirrors write ".idx3-ubyte"
    ndim = 3 if what == "images" else 1
    names = [f"{prefix}-{what}-idx{ndim}-ubyte", f"{prefix}-{what}.idx{ndim}-ubyte"]
    for folder in folders:
        for name in names:
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
    return None


def load_mnist(path, split: str = "train", *, kind: str = "mnist", scale: bool = True,
               limit: int | None = None) -> ImageData:
    """MNIST or Fashion-MNIST from the IDX files in a local folder (no download).

    Parameters
    ----------
    path
        Folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
        and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``), or a torchvision root
        (``<path>/MNIST/raw`` or ``<path>/FashionMNIST/raw``). Both data sets use the same file names.
    split
        ``"train"`` (60,000 images) or ``"test"`` (10,000).
    kind
        ``"mnist"`` or ``"fashion_mnist"``; only chooses the torchvision sub-folder and the name.
    scale
        Divide the 0-255 pixels by 255 (float32 in [0, 1]); ``False`` keeps the raw values as float32.
    limit
        Keep only the first ``limit`` images.

    Returns
    -------
    ImageData
        ``X`` of shape (n, 784), ``labels`` (n,), ``image_shape`` (1, 28, 28).
    """
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    key = _KIND_ALIASES.get(str(kind).lower())
    if key is None:
        raise ValueError(f"kind must be 'mnist' or 'fashion_mnist', got {kind!r}.")
    root = Path(path)
    if not root.is_dir():
        raise ImageFilesNotFoundError(f"{root} is not a folder; pass the folder that holds the IDX files.")
    folders = [root, root / _TORCHVISION_DIRS[key] / "raw", root / "raw"]
    prefix = _SPLIT_PREFIX[split]
    img_path, lab_path = _find_file(folders, prefix, "images"), _find_file(folders, prefix, "labels")
    if img_path is None or lab_path is None:
        missing = [n for n, p in ((f"{prefix}-images-idx3-ubyte[.gz]", img_path),
                                  (f"{prefix}-labels-idx1-ubyte[.gz]", lab_path)) if p is None]
        raise ImageFilesNotFoundError(
            f"Could not find {' and '.join(missing)} in {root} (also looked in {root / _TORCHVISION_DIRS[key] / 'raw'}). "
            "dgdlens never downloads data: put the original IDX files there, or use load_digits_images() offline."
        )
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3:
        raise IDXFormatError(f"{img_path} holds an array of shape {images.shape}; image files are (n, rows, cols).")
    if labels.ndim != 1:
        raise IDXFormatError(f"{lab_path} holds an array of shape {labels.shape}; label files are (n,).")
    if len(images) != len(labels):
        raise IDXFormatError(f"{img_path.name} has {len(images)} images but {lab_path.name} has {len(labels)} labels; "
                             "the files come from different data sets.")
    if limit is not None:
        if int(limit) < 1:
            raise ValueError(f"limit must be a positive integer, got {limit}.")
        images, labels = images[: int(limit)], labels[: int(limit)]
    n, h, w = images.shape
    X = images.reshape(n, h * w).astype(np.float32)
    if scale:
        X /= 255.0
    return ImageData(X, labels.astype(np.int64), (1, h, w), f"{key}-{split}")


def load_digits_images(*, scale: bool = True) -> ImageData:
    """scikit-learn's bundled handwritten digits: 1,797 images of 8x8, 10 classes (offline).

    ``scale=True`` divides the 0-16 grey levels by 16, so pixels are float32 in [0, 1].

    Parameters
    ----------
    scale
        Scale the pixels to ``[0, 1]`` (else scikit-learn's 0-16 values).

    Returns
    -------
    ImageData
        ``X`` (1,797 images x 64 pixels), ``labels`` (the digits) and ``image_shape``.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    X = bunch.data.astype(np.float32)
    if scale:
        X /= 16.0
    return ImageData(X, bunch.target.astype(np.int64), (1, 8, 8), "digits")


def load_images(name: str = "digits", path=None, split: str = "train", **kwargs) -> ImageData:
    """Load an image data set by name: ``"digits"`` (offline, default), ``"mnist"`` or ``"fashion_mnist"``
    (these need ``path``, a folder with the IDX files; see :func:`load_mnist`).

    Parameters
    ----------
    name
        ``"digits"``, ``"mnist"`` or ``"fashion_mnist"`` (case-insensitive; also ``"fashion"``,
        ``"fashion-mnist"``, ``"fmnist"``).
    path
        Folder with the IDX files (MNIST kinds only; ignored for ``"digits"``).
    split
        ``"train"`` or ``"test"`` (MNIST kinds only; the digits have no split).
    **kwargs
        Passed on: ``scale`` for the digits; ``scale`` and ``limit`` for :func:`load_mnist`.

    Returns
    -------
    ImageData
        Flat float32 pixel rows, labels and the image shape.

    Raises
    ------
    ValueError
        For an unknown name, or an MNIST kind without ``path``.
    """
    key = str(name).lower()
    if key == "digits":
        return load_digits_images(**kwargs)
    if key in _KIND_ALIASES:
        if path is None:
            raise ValueError(f"{name} needs path=<folder with the IDX files>; nothing is downloaded. "
                             "Use name='digits' for the bundled offline data.")
        return load_mnist(path, split, kind=key, **kwargs)
    raise ValueError(f"Unknown image data set {name!r}; use 'digits', 'mnist' or 'fashion_mnist'.")
