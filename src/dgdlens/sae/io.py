"""Getting embeddings into an SAE: arrays, tensors, AnnData ``obsm`` and files, read one batch at a time.

:class:`EmbeddingRows` wraps whatever holds the cells x dimensions matrix and serves float32 torch
batches on a device, so training, encoding and metrics share one code path and never copy or modify
the caller's data as a whole. :func:`load_embedding` reads the file formats cell embeddings usually
come in (``.npy``, ``.npz``, ``.pt``, ``.csv``/``.tsv``, ``.h5ad``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ..data.matrix import RowMatrix

__all__ = ["EmbeddingRows", "as_rows", "load_embedding"]

#: Dense inputs up to this many bytes are moved to the training device in one piece (fast indexing).
_DEVICE_COPY_LIMIT = 2 * 1024**3


def _is_anndata(obj) -> bool:
    return type(obj).__name__ == "AnnData" and hasattr(obj, "obs") and hasattr(obj, "obsm")


def _from_anndata(adata, use_rep: str | None, what: str, argument: str = "use_rep"):
    """The matrix ``use_rep`` names: an ``obsm`` key, or ``"X"`` for ``adata.X`` (scanpy's convention)."""
    if use_rep is None:
        keys = list(adata.obsm.keys())
        raise ValueError(
            f"{what} is an AnnData; say which embedding to use with {argument}= (available in obsm: "
            f"{keys or 'none'}), or {argument}='X' to use adata.X."
        )
    if use_rep == "X":
        return adata.X
    if use_rep not in adata.obsm:
        raise ValueError(
            f"{argument} {use_rep!r} is not in {what}.obsm (available: {list(adata.obsm.keys()) or 'none'}); "
            f"pass one of those, or {argument}='X' for adata.X."
        )
    value = adata.obsm[use_rep]
    if isinstance(value, pd.DataFrame):
        value = value.to_numpy()
    return value


class EmbeddingRows:
    """Row access to a cells x dimensions matrix as float32 torch batches.

    Parameters
    ----------
    X
        numpy array, torch tensor, scipy sparse matrix, pandas DataFrame, or AnnData (with ``use_rep``).
    use_rep
        For AnnData: the ``obsm`` key holding the embedding (``"X"`` for ``adata.X``).
    what
        Name of the argument, used in error messages.
    """

    def __init__(self, X, use_rep: str | None = None, *, what: str = "X") -> None:
        if _is_anndata(X):
            X = _from_anndata(X, use_rep, what)
        elif use_rep is not None:
            raise ValueError(f"use_rep={use_rep!r} was given but {what} is a {type(X).__name__}, not an AnnData.")
        if X is None:
            raise ValueError(f"{what} is None; pass a cells x dimensions matrix.")
        if isinstance(X, pd.DataFrame):
            X = X.to_numpy()
        self.tensor: torch.Tensor | None = None
        self.matrix: RowMatrix | None = None
        if isinstance(X, torch.Tensor):
            if X.ndim != 2:
                raise ValueError(f"{what} must be 2-D (cells x dimensions), got a tensor of shape {tuple(X.shape)}.")
            if X.is_complex() or X.dtype == torch.bool:
                raise ValueError(f"{what} must hold real numbers, got dtype {X.dtype}.")
            self.tensor = X.detach()
            shape = tuple(X.shape)
        else:
            if isinstance(X, np.ndarray) and (X.dtype == object or not np.issubdtype(X.dtype, np.number)
                                              or np.issubdtype(X.dtype, np.complexfloating)):
                raise ValueError(f"{what} must hold real numbers, got dtype {X.dtype}.")
            if isinstance(X, np.ndarray) and X.ndim != 2:
                raise ValueError(f"{what} must be 2-D (cells x dimensions), got an array of shape {X.shape}.")
            try:
                self.matrix = RowMatrix(X)
            except TypeError as err:
                raise ValueError(f"{what}: {err}") from err
            shape = self.matrix.shape
        self.n_obs, self.n_vars = int(shape[0]), int(shape[1])
        self.what = what
        if self.n_obs == 0 or self.n_vars == 0:
            raise ValueError(f"{what} is empty (shape {shape}); it needs at least one cell and one dimension.")

    # ------------------------------------------------------------------ reading
    def rows(self, index, device: torch.device | str = "cpu") -> torch.Tensor:
        """Rows ``index`` (numpy integers, or an int64 tensor: already on the data's device, it costs no
        host transfer) as a float32 tensor on ``device``.

        Parameters
        ----------
        index
            Row indices (any order, repeats allowed).
        device
            Torch device of the returned tensor.

        Returns
        -------
        torch.Tensor
            float32 ``(len(index), n_vars)``.
        """
        if self.tensor is not None:
            if isinstance(index, torch.Tensor):
                idx = index.to(self.tensor.device)
            else:
                idx = torch.as_tensor(np.asarray(index, dtype=np.int64), device=self.tensor.device)
            return self.tensor.index_select(0, idx).to(device=device, dtype=torch.float32)
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        rows = torch.from_numpy(self.matrix.rows(index, dtype=np.float32))
        if torch.device(device).type == "cuda":  # pinned, so the copy does not wait for the GPU's queue
            return rows.pin_memory().to(device, non_blocking=True)
        return rows.to(device)

    def slice(self, start: int, stop: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Contiguous rows ``start:stop`` as a float32 tensor on ``device``.

        Parameters
        ----------
        start, stop
            First row and one past the last row (Python slice semantics).
        device
            Torch device of the returned tensor.

        Returns
        -------
        torch.Tensor
            float32 ``(stop - start, n_vars)``.
        """
        if self.tensor is not None:
            return self.tensor[start:stop].to(device=device, dtype=torch.float32)
        if self.matrix.kind == "dense":
            block = np.asarray(self.matrix.X[start:stop], dtype=np.float32)
            return torch.from_numpy(np.ascontiguousarray(block)).to(device)
        return self.rows(np.arange(start, stop), device)

    def iter_slices(self, batch_size: int, device: torch.device | str = "cpu"):
        """Yield ``(start, stop, tensor)`` over all rows in order.

        Parameters
        ----------
        batch_size
            Rows per slice (the last one may be shorter).
        device
            Torch device of the tensors.

        Yields
        ------
        tuple of (int, int, torch.Tensor)
            ``start``, ``stop`` and the float32 rows ``start:stop``, ``(stop - start, n_vars)``.
        """
        for start in range(0, self.n_obs, batch_size):
            stop = min(start + batch_size, self.n_obs)
            yield start, stop, self.slice(start, stop, device)

    @property
    def on_device(self) -> torch.device | None:
        """The device holding the rows as one tensor (``None``: rows are read from a matrix or file)."""
        return None if self.tensor is None else self.tensor.device

    def fingerprint(self, n_rows: int = 4) -> dict:
        """Shape and a SHA-256 of the first and last ``n_rows`` rows (float32 bytes): cheap, and enough for a
        checkpoint to tell other data from this.

        Parameters
        ----------
        n_rows
            Number of rows hashed at each end.

        Returns
        -------
        dict
            ``{"n_obs": int, "n_vars": int, "rows_sha256": str}`` (the first 32 hex digits of the digest).
        """
        import hashlib

        digest = hashlib.sha256(f"{self.n_obs}x{self.n_vars}".encode())
        head = np.arange(min(n_rows, self.n_obs))
        tail = np.arange(max(self.n_obs - n_rows, 0), self.n_obs)
        for index in (head, tail):
            digest.update(np.ascontiguousarray(self.rows(index).numpy()).tobytes())
        return {"n_obs": self.n_obs, "n_vars": self.n_vars, "rows_sha256": digest.hexdigest()[:32]}

    def to_device(self, device: torch.device | str) -> EmbeddingRows:
        """A view whose rows already live on ``device`` when the data are dense and small enough.

        Copies at most once (a float32 version for the device); the caller's array is untouched.

        Parameters
        ----------
        device
            Torch device to hold the rows.

        Returns
        -------
        EmbeddingRows
            A new view backed by a float32 tensor on ``device``, or ``self`` when the data are sparse or
            larger than 2 GiB as float32.
        """
        dense = self.tensor is not None or self.matrix.kind == "dense"
        if not dense or self.n_obs * self.n_vars * 4 > _DEVICE_COPY_LIMIT:
            return self
        out = EmbeddingRows.__new__(EmbeddingRows)
        out.__dict__.update(self.__dict__)
        source = self.tensor if self.tensor is not None else torch.from_numpy(np.asarray(self.matrix.X))
        out.tensor = source.to(device=device, dtype=torch.float32)
        out.matrix = None
        return out

    # ------------------------------------------------------------------ checks
    def check_finite(self, chunk_size: int = 65_536) -> None:
        """Raise a ValueError naming the first rows with NaN or infinite values.

        Parameters
        ----------
        chunk_size
            Rows read at a time (on the CPU).
        """
        for start, stop, block in self.iter_slices(chunk_size):
            finite = torch.isfinite(block)
            if not bool(finite.all()):
                bad_row = start + int((~finite).any(dim=1).nonzero()[0, 0])
                raise ValueError(
                    f"{self.what} contains NaN or infinite values (first in row {bad_row}). Remove or impute those "
                    "cells before training or encoding."
                )

    def check_dim(self, d_in: int) -> None:
        """Raise a ValueError unless the rows have ``d_in`` dimensions (columns).

        Parameters
        ----------
        d_in
            The expected number of dimensions (an SAE's input dimension).
        """
        if self.n_vars != d_in:
            raise ValueError(
                f"{self.what} has {self.n_vars} dimensions but the SAE was trained on {d_in}; pass the same embedding "
                "(same obsm key / model) the SAE was trained on."
            )


def as_rows(X, use_rep: str | None = None, *, what: str = "X") -> EmbeddingRows:
    """:class:`EmbeddingRows` for ``X`` (returned unchanged if it already is one)."""
    if isinstance(X, EmbeddingRows):
        return X
    return EmbeddingRows(X, use_rep, what=what)


def load_embedding(path, *, key: str | None = None) -> tuple[np.ndarray, pd.Index | None]:
    """Read a cell embedding from a file: returns ``(matrix, cell_index_or_None)``.

    Formats: ``.npy``; ``.npz`` (``key`` names the array, optional when there is one); ``.pt``/``.pth``
    (a tensor, or a dict of tensors with ``key``); ``.csv``/``.tsv`` (first column = cell index, the
    rest numeric); ``.h5ad`` (``key`` = the ``obsm`` key).

    Parameters
    ----------
    path
        File to read; the format is chosen by its suffix.
    key
        Which array to read from a file that holds several: the array name in a ``.npz``, the dict key in a
        ``.pt``/``.pth``, the ``obsm`` key (or ``"X"``) in a ``.h5ad`` (required there). Ignored otherwise.

    Returns
    -------
    tuple of (numpy.ndarray, pandas.Index or None)
        The cells x dimensions matrix (dtype as stored; float32 for text files) and the cell names for
        ``.csv``/``.tsv``/``.txt`` (first column) and ``.h5ad`` (``obs_names``), ``None`` for the others.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No embedding file at {path}.")
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False), None
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            names = list(data.keys())
            name = _pick_key(key, names, path)
            return data[name], None
    if suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            obj = obj[_pick_key(key, list(obj), path)]
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"{path} holds a {type(obj).__name__}, not a tensor; save the embedding as a tensor.")
        return obj.detach().cpu().numpy(), None
    if suffix in (".csv", ".tsv", ".txt"):
        frame = pd.read_csv(path, sep="\t" if suffix != ".csv" else ",", index_col=0)
        non_numeric = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
        if non_numeric:
            raise ValueError(
                f"{path} has non-numeric columns {non_numeric[:5]}; the first column must be the cell index and the "
                "rest the embedding dimensions."
            )
        return frame.to_numpy(dtype=np.float32), pd.Index(frame.index)
    if suffix == ".h5ad":
        import anndata

        adata = anndata.read_h5ad(path)
        value = _from_anndata(adata, key, str(path), argument="key")
        value = value.toarray() if sp.issparse(value) else np.asarray(value)
        return value, pd.Index(adata.obs_names)
    raise ValueError(f"Unsupported embedding file type {suffix!r} for {path}; use .npy, .npz, .pt, .csv, .tsv or .h5ad.")


def _pick_key(key: str | None, names: list[str], path: Path) -> str:
    if key is None:
        if len(names) == 1:
            return names[0]
        raise ValueError(f"{path} holds several arrays {names}; say which one with key=.")
    if key not in names:
        raise ValueError(f"{path} has no array {key!r} (available: {names}).")
    return key
