"""Row access to a data matrix that is never densified whole.

:class:`RowMatrix` wraps whatever holds the data (a scipy sparse matrix, a numpy array, a torch
tensor, or a matrix backed on disk by anndata/h5py) behind one small interface:

- ``rows(index)``: the selected rows as a dense float32 numpy array (one mini-batch at a time)
- ``iter_chunks(chunk_size)``: contiguous row blocks as CSR, for passes over all the data
- ``row_sums()`` / ``col_sums()``: computed chunk by chunk, so a backed matrix stays on disk

and :func:`validate_counts` checks a count matrix chunk by chunk with errors that say what to do.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp

__all__ = ["RowMatrix", "validate_counts", "CountValidationError"]


class CountValidationError(ValueError):
    """A matrix that should hold counts does not."""


def _is_backed_sparse(X) -> bool:
    # anndata's on-disk CSR/CSC datasets (anndata.abc.CSRDataset in recent versions)
    return hasattr(X, "format") and hasattr(X, "shape") and hasattr(X, "to_memory") and not sp.issparse(X)


def _is_h5_dense(X) -> bool:
    return type(X).__module__.startswith("h5py") or type(X).__name__ == "Dataset" and hasattr(X, "id")


class RowMatrix:
    """Uniform, memory-bounded row access to a 2-D data matrix.

    Parameters
    ----------
    X
        ``scipy.sparse`` matrix (CSR is best; CSC is converted once), numpy array, torch tensor,
        anndata backed sparse dataset or h5py dataset.
    """

    def __init__(self, X) -> None:
        if X is None:
            raise ValueError("The data matrix is None: the AnnData has no X (or the layer is empty).")
        try:
            import torch

            if isinstance(X, torch.Tensor):
                X = X.detach().cpu().numpy()
        except ImportError:  # pragma: no cover - torch is a hard dependency
            pass
        if sp.issparse(X):
            if X.format != "csr":
                X = sp.csr_matrix(X)
            self.kind = "sparse"
        elif isinstance(X, np.ndarray):
            self.kind = "dense"
        elif _is_backed_sparse(X):
            if X.format != "csr":
                raise ValueError(
                    "A backed matrix must be stored as CSR (cells in rows) for row access; "
                    "re-write the file with a CSR X (e.g. adata.X = scipy.sparse.csr_matrix(adata.X))."
                )
            self.kind = "backed_sparse"
        elif _is_h5_dense(X):
            self.kind = "backed_dense"
        elif hasattr(X, "__array__") and getattr(X, "ndim", 2) == 2:
            X = np.asarray(X)
            self.kind = "dense"
        else:
            raise TypeError(f"Unsupported matrix type {type(X).__name__}; pass a numpy array, scipy sparse matrix or AnnData.")
        if len(X.shape) != 2:
            raise ValueError(f"Expected a 2-D matrix (cells x features), got shape {X.shape}")
        self.X = X
        self.shape = (int(X.shape[0]), int(X.shape[1]))

    @property
    def n_obs(self) -> int:
        return self.shape[0]

    @property
    def n_vars(self) -> int:
        return self.shape[1]

    @property
    def backed(self) -> bool:
        return self.kind.startswith("backed")

    # ------------------------------------------------------------------ reading
    def _slice(self, start: int, stop: int):
        """Rows start:stop, as CSR (sparse kinds) or ndarray (dense kinds)."""
        block = self.X[start:stop]
        if self.kind == "backed_sparse" and not sp.issparse(block):
            block = sp.csr_matrix(block)
        return block

    def rows(self, index, dtype=np.float32) -> np.ndarray:
        """Dense rows for ``index`` (any order); the only place where data become dense."""
        index = np.asarray(index, dtype=np.int64)
        if self.kind in {"sparse", "dense"}:
            block = self.X[index]
            return (block.toarray() if sp.issparse(block) else np.asarray(block)).astype(dtype, copy=False)
        # On disk, read in increasing order (h5py needs it, and it is faster), then restore the order.
        order = np.argsort(index, kind="stable")
        sorted_idx = index[order]
        uniq, inverse = np.unique(sorted_idx, return_inverse=True)
        if len(uniq) and uniq[-1] - uniq[0] + 1 == len(uniq):
            block = self._slice(int(uniq[0]), int(uniq[-1]) + 1)  # one contiguous read
        else:
            block = self.X[uniq]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        out = np.empty((len(index), self.n_vars), dtype=dtype)
        out[order] = block[inverse]
        return out

    def iter_chunks(self, chunk_size: int = 10_000) -> Iterator[tuple[int, int, object]]:
        """Yield ``(start, stop, block)`` over contiguous row blocks; block is CSR or ndarray."""
        for start in range(0, self.n_obs, chunk_size):
            stop = min(start + chunk_size, self.n_obs)
            yield start, stop, self._slice(start, stop)

    def row_sums(self, chunk_size: int = 10_000) -> np.ndarray:
        out = np.empty(self.n_obs, dtype=np.float64)
        for start, stop, block in self.iter_chunks(chunk_size):
            out[start:stop] = np.asarray(block.sum(axis=1)).ravel()
        return out

    def col_sums(self, chunk_size: int = 10_000) -> np.ndarray:
        out = np.zeros(self.n_vars, dtype=np.float64)
        for _, _, block in self.iter_chunks(chunk_size):
            out += np.asarray(block.sum(axis=0)).ravel()
        return out

    def subset_columns(self, columns: np.ndarray) -> RowMatrix:
        """A view restricted to ``columns`` (in memory only; backed data are subset per batch)."""
        if self.backed:
            return _ColumnSubset(self, np.asarray(columns))
        return RowMatrix(self.X[:, columns])


class _ColumnSubset(RowMatrix):
    """A backed matrix seen through a column selection, applied per block after reading."""

    def __init__(self, parent: RowMatrix, columns: np.ndarray):  # noqa: D107 - no super().__init__ on purpose
        self.parent = parent
        self.columns = columns
        self.kind = parent.kind
        self.X = parent.X
        self.shape = (parent.n_obs, len(columns))

    def _slice(self, start, stop):
        return self.parent._slice(start, stop)[:, self.columns]

    def rows(self, index, dtype=np.float32):
        full = RowMatrix.rows(self.parent, index, dtype)
        return full[:, self.columns]


def _block_values(block) -> np.ndarray:
    return block.data if sp.issparse(block) else np.asarray(block).ravel()


def validate_counts(
    matrix: RowMatrix,
    *,
    what: str = "the count matrix",
    require_integer: bool = True,
    allow_empty_cells: bool = False,
    allow_empty_genes: bool = True,
    chunk_size: int = 10_000,
) -> dict:
    """Check that ``matrix`` holds non-negative, finite (integer) counts, chunk by chunk.

    Returns ``{"row_sums": ..., "col_sums": ...}`` computed on the way, so callers need no second pass.
    Raises :class:`CountValidationError` (a ``ValueError``) naming the problem and the fix.
    """
    row_sums = np.empty(matrix.n_obs, dtype=np.float64)
    col_sums = np.zeros(matrix.n_vars, dtype=np.float64)
    for start, stop, block in matrix.iter_chunks(chunk_size):
        values = _block_values(block)
        if values.size:
            if not np.all(np.isfinite(values)):
                raise CountValidationError(
                    f"{what} contains NaN or infinite values (rows {start}-{stop}). Counts must be finite; "
                    "remove or fix those cells before training."
                )
            if values.min() < 0:
                raise CountValidationError(
                    f"{what} contains negative values (min {values.min():g}). It looks like scaled or centred "
                    "data; pass raw counts (e.g. layer='counts' or adata.raw) instead."
                )
            if require_integer and not np.all(values == np.round(values)):
                bad = values[values != np.round(values)][0]
                raise CountValidationError(
                    f"{what} contains non-integer values (e.g. {bad:g}). It looks normalised or log-transformed; "
                    "the negative-binomial model needs raw integer counts: pass the raw counts layer "
                    "(e.g. layer='counts'), or round them yourself if they are integer-valued estimates."
                )
        row_sums[start:stop] = np.asarray(block.sum(axis=1)).ravel()
        col_sums += np.asarray(block.sum(axis=0)).ravel()
    if not allow_empty_cells and np.any(row_sums == 0):
        n_empty = int(np.sum(row_sums == 0))
        raise CountValidationError(
            f"{what} has {n_empty} cell(s) with no counts (e.g. row {int(np.flatnonzero(row_sums == 0)[0])}). "
            "Remove them first, e.g. sc.pp.filter_cells(adata, min_counts=1)."
        )
    if not allow_empty_genes and np.any(col_sums == 0):
        n_empty = int(np.sum(col_sums == 0))
        raise CountValidationError(
            f"{what} has {n_empty} gene(s) with no counts in any cell. Remove them first, "
            "e.g. sc.pp.filter_genes(adata, min_counts=1)."
        )
    return {"row_sums": row_sums, "col_sums": col_sums}
