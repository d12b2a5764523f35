"""Row access to a data matrix that is never densified whole.

:class:`RowMatrix` wraps whatever holds the data (a scipy sparse matrix, a numpy array, a torch
tensor, or a matrix backed on disk by anndata/h5py) behind one small interface:

- ``rows(index)``: the selected rows as a dense float32 numpy array (one mini-batch at a time)
- ``iter_chunks(chunk_size)``: contiguous row blocks as CSR, for passes over all the data
- ``row_sums()`` / ``col_sums()``: computed chunk by chunk, so a backed matrix stays on disk

and :func:`validate_counts` checks a count matrix chunk by chunk with errors that say what to do.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["RowMatrix", "validate_counts", "CountValidationError", "write_h5ad_in_chunks", "write_h5ad_out_of_core",
           "read_zarr_backed", "open_row_matrix"]


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
        if isinstance(X, torch.Tensor):
            X = X.detach().cpu().numpy()
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
        dtype = getattr(X, "dtype", None)
        if dtype is not None and not (np.issubdtype(np.dtype(dtype), np.number) or np.dtype(dtype) == bool):
            raise TypeError(
                f"The data matrix has dtype {dtype}, not numbers (often strings or mixed values read from a "
                "table); convert it to a numeric dtype first, e.g. adata.X = adata.X.astype(np.float32)."
            )
        self.X = X
        self.shape = (int(X.shape[0]), int(X.shape[1]))
        self._csr_arrays = None  # an on-disk CSR's data / indices / indptr arrays, once looked up

    @property
    def n_obs(self) -> int:
        """Number of rows (cells / samples)."""
        return self.shape[0]

    @property
    def n_vars(self) -> int:
        """Number of columns (genes / features)."""
        return self.shape[1]

    @property
    def backed(self) -> bool:
        """Whether the data stay on disk (an anndata backed sparse dataset or an h5py dataset): then rows
        are read in contiguous blocks and loaders prefetch."""
        return self.kind.startswith("backed")

    # ------------------------------------------------------------------ reading
    def _slice(self, start: int, stop: int):
        """Rows start:stop, as CSR (sparse kinds) or ndarray (dense kinds)."""
        if self.kind == "backed_sparse":
            return self._backed_csr_rows(start, stop)
        return self.X[start:stop]

    def _backed_csr_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows start:stop of an on-disk CSR, read from its three arrays directly: one ``indptr`` slice, then
        one slice each of ``indices`` and ``data``. anndata's own row slicing (0.12) looks up scipy's
        installed version through ``importlib.metadata`` on every call, which was 40 % of a backed
        training epoch; the arrays read here are the same bytes (tested against anndata's reading)."""
        if self._csr_arrays is None:  # looking the arrays up in the group costs as much as a small read
            group = self.X.group
            self._csr_arrays = (group["data"], group["indices"], group["indptr"])
        data, indices, indptr = self._csr_arrays
        indptr = np.asarray(indptr[start:stop + 1], dtype=np.int64)
        lo, hi = (int(indptr[0]), int(indptr[-1])) if len(indptr) else (0, 0)
        data, indices = data[lo:hi], indices[lo:hi]
        return sp.csr_matrix((data, indices, indptr - lo), shape=(max(stop - start, 0), self.shape[1]))

    def rows(self, index, dtype=np.float32) -> np.ndarray:
        """Dense rows for ``index`` (any order); the only place where data become dense.

        Parameters
        ----------
        index
            Row indices (any integer array-like, any order, repeats allowed).
        dtype
            Dtype of the result.

        Returns
        -------
        numpy.ndarray
            ``len(index) x n_vars`` dense array, rows in the order of ``index``.
        """
        index = np.asarray(index, dtype=np.int64)
        block = self.read_rows(index)
        return (block.toarray() if sp.issparse(block) else np.asarray(block)).astype(dtype, copy=False)

    def read_rows(self, index, *, max_gap: int = 64):
        """Rows ``index`` (any order) as CSR (sparse kinds) or ndarray (dense kinds), not densified.

        On disk, rows are read in increasing order (h5py needs it) as contiguous slices: rows less
        than ``max_gap`` apart share one slice and the rows in between are dropped after reading,
        which is much faster than row-by-row access. The requested order is restored at the end.

        Parameters
        ----------
        index
            Row indices (any integer array-like, any order, repeats allowed).
        max_gap
            On disk: rows at most this far apart are read in one contiguous slice (larger reads fewer,
            bigger slices). Ignored in memory.

        Returns
        -------
        scipy.sparse.csr_matrix or numpy.ndarray
            ``len(index) x n_vars`` rows in the order of ``index``: CSR for sparse data, an array for dense.
        """
        index = np.asarray(index, dtype=np.int64)
        if not self.backed:
            return self.X[index]
        if len(index) == 0:
            return self._slice(0, 0)
        order = np.argsort(index, kind="stable")
        uniq, inverse = np.unique(index[order], return_inverse=True)
        parts = []
        for run in np.split(uniq, np.flatnonzero(np.diff(uniq) > max_gap) + 1):
            block = self._slice(int(run[0]), int(run[-1]) + 1)
            if len(run) != run[-1] - run[0] + 1:
                block = block[run - run[0]]
            parts.append(block)
        if len(parts) == 1:
            block = parts[0]
        else:
            block = sp.vstack(parts, format="csr") if sp.issparse(parts[0]) else np.concatenate(parts)
        position = np.empty(len(index), dtype=np.int64)
        position[order] = inverse
        if len(uniq) == len(index) and np.all(position == np.arange(len(index))):
            return block  # already sorted and unique: no reordering copy
        return block[position]

    def iter_chunks(self, chunk_size: int = 10_000) -> Iterator[tuple[int, int, object]]:
        """Yield ``(start, stop, block)`` over contiguous row blocks; block is CSR or ndarray.

        Parameters
        ----------
        chunk_size
            Rows per block (the last block may be shorter).

        Yields
        ------
        start, stop : int
            The block holds rows ``start .. stop - 1``.
        block : scipy.sparse.csr_matrix or numpy.ndarray
            ``(stop - start) x n_vars`` rows, not densified.
        """
        for start in range(0, self.n_obs, chunk_size):
            stop = min(start + chunk_size, self.n_obs)
            yield start, stop, self._slice(start, stop)

    def row_sums(self, chunk_size: int = 10_000) -> np.ndarray:
        """Sum of every row (e.g. each cell's library size), computed block by block.

        Parameters
        ----------
        chunk_size
            Rows read at a time.

        Returns
        -------
        numpy.ndarray
            ``(n_obs,)`` float64 sums.
        """
        out = np.empty(self.n_obs, dtype=np.float64)
        for start, stop, block in self.iter_chunks(chunk_size):
            out[start:stop] = np.asarray(block.sum(axis=1)).ravel()
        return out

    def col_sums(self, chunk_size: int = 10_000) -> np.ndarray:
        """Sum of every column (e.g. each gene's total count), computed block by block.

        Parameters
        ----------
        chunk_size
            Rows read at a time.

        Returns
        -------
        numpy.ndarray
            ``(n_vars,)`` float64 sums.
        """
        out = np.zeros(self.n_vars, dtype=np.float64)
        for _, _, block in self.iter_chunks(chunk_size):
            out += np.asarray(block.sum(axis=0)).ravel()
        return out

    def subset_columns(self, columns: np.ndarray) -> RowMatrix:
        """A view restricted to ``columns`` (in memory only; backed data are subset per batch).

        Parameters
        ----------
        columns
            Column indices (e.g. from :func:`~dgdlens.data.align_genes`), in the order wanted.

        Returns
        -------
        RowMatrix
            ``n_obs x len(columns)``. In memory a new matrix built from ``X[:, columns]``; for backed data
            a wrapper that reads full rows from disk and selects the columns per block.
        """
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

    def read_rows(self, index, *, max_gap: int = 64):
        return self.parent.read_rows(index, max_gap=max_gap)[:, self.columns]


def open_row_matrix(source) -> tuple[RowMatrix, np.ndarray | None]:
    """Row access to ``source`` and its column names when it carries them.

    ``source`` may be a path to an ``.h5ad`` file (opened backed: its ``X``) or a ``.zarr`` store
    (:func:`read_zarr_backed`), a backed AnnData (its ``X``), a DataFrame (columns = names), or anything
    :class:`RowMatrix` wraps (names ``None``). Nothing is loaded whole.

    Parameters
    ----------
    source
        The matrix or where it lives.

    Returns
    -------
    tuple
        ``(RowMatrix, names or None)``; names as a numpy array of strings.
    """
    from pathlib import Path

    import pandas as pd

    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; pass the path of an .h5ad file or a .zarr store.")
        if path.suffix == ".zarr" or path.is_dir():
            adata = read_zarr_backed(path)
        else:
            import anndata

            adata = anndata.read_h5ad(path, backed="r")
        return RowMatrix(adata.X), np.asarray(adata.var_names.astype(str))
    if hasattr(source, "isbacked") and hasattr(source, "var_names"):
        return RowMatrix(source.X), np.asarray(source.var_names.astype(str))
    if isinstance(source, pd.DataFrame):
        return RowMatrix(source.to_numpy()), source.columns.astype(str).to_numpy()
    return RowMatrix(source), None


def _block_values(block) -> np.ndarray:
    return block.data if sp.issparse(block) else np.asarray(block).ravel()


def validate_counts(
    matrix: RowMatrix,
    *,
    what: str = "the count matrix",
    require_integer: bool = True,
    allow_empty_cells: bool = False,
    empty_genes: str = "warn",
    min_cells: int = 1,
    chunk_size: int = 10_000,
) -> dict:
    """Check that ``matrix`` holds non-negative, finite (integer) counts, chunk by chunk.

    Returns ``{"row_sums": ..., "col_sums": ...}`` computed on the way, so callers need no second pass.
    Raises :class:`CountValidationError` (a ``ValueError``) naming the problem and the fix: too few
    cells (fewer than ``min_cells``), no genes, NaN/infinite, negative or non-integer values, cells
    without counts (unless ``allow_empty_cells``).

    Genes without a single count are normal (after subsetting cells; in a backed atlas that is not
    rewritten to filter them) and are never an error: ``empty_genes="warn"`` (the default) issues a
    ``UserWarning`` saying how many there are (a negative-binomial model learns their mean to ~0),
    ``"ignore"`` says nothing.

    Parameters
    ----------
    matrix
        The data, ``cells x genes`` (a :class:`RowMatrix`; backed data are read chunk by chunk).
    what
        How the messages name the matrix (e.g. ``"adata.layers['counts']"``).
    require_integer
        Reject non-integer values (normalised or log-transformed data).
    allow_empty_cells
        Accept cells whose counts are all zero.
    empty_genes
        ``"warn"`` or ``"ignore"`` genes without any count.
    min_cells
        Fewest cells accepted.
    chunk_size
        Rows read at a time.

    Returns
    -------
    dict
        ``row_sums``: ``(n_obs,)`` float64 per-cell totals (library sizes); ``col_sums``: ``(n_vars,)``
        float64 per-gene totals.

    Raises
    ------
    CountValidationError
        For the problems listed above.
    ValueError
        For an invalid ``empty_genes``.
    """
    if empty_genes not in ("warn", "ignore"):
        raise ValueError(f"empty_genes must be 'warn' or 'ignore', got {empty_genes!r}.")
    if matrix.n_obs < min_cells:
        raise CountValidationError(
            f"Too few cells: {what} has {matrix.n_obs} cell(s), at least {min_cells} needed. Check that the cell "
            "filter or subset before this step kept the cells you meant."
        )
    if matrix.n_vars == 0:
        raise CountValidationError(f"{what} has no genes (0 columns); pass the AnnData with its genes.")
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
    n_empty_genes = int(np.sum(col_sums == 0))
    if n_empty_genes and empty_genes == "warn":
        warnings.warn(
            f"{what}: {n_empty_genes} of {matrix.n_vars} gene(s) have no counts in any cell; that is fine, "
            "their negative-binomial mean will learn to ~0 (filter them with "
            "sc.pp.filter_genes(adata, min_counts=1) to save a little time).",
            UserWarning, stacklevel=3,
        )
    return {"row_sums": row_sums, "col_sums": col_sums}


def write_h5ad_in_chunks(path, chunks, var_names, obs_names=None) -> int:
    """Write an ``.h5ad`` whose ``X`` (CSR) is appended chunk by chunk, never held whole in memory.

    ``chunks`` yields scipy sparse row blocks (cells x genes) in order; ``obs_names`` defaults to
    ``cell0, cell1, ...``. The file opens with ``anndata.read_h5ad(path, backed="r")``. Returns the
    number of cells written. The file is written whole or not at all (see :func:`dgdlens._io.atomic_path`).
    """
    from .._io import atomic_path

    with atomic_path(path) as tmp:
        return _write_h5ad_in_chunks(tmp, chunks, var_names, obs_names)


def _write_h5ad_in_chunks(path, chunks, var_names, obs_names) -> int:
    import anndata
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    var = pd.DataFrame(index=pd.Index(list(map(str, var_names))))
    n_obs = 0
    with h5py.File(path, "w") as f:
        for chunk in chunks:
            chunk = sp.csr_matrix(chunk)
            if chunk.shape[1] != len(var):
                raise ValueError(f"a chunk has {chunk.shape[1]} columns but there are {len(var)} var_names")
            if n_obs == 0:
                write_elem(f, "X", chunk)
            else:
                sparse_dataset(f["X"]).append(chunk)
            n_obs += chunk.shape[0]
        if n_obs == 0:
            raise ValueError("no chunks to write")
        names = [f"cell{i}" for i in range(n_obs)] if obs_names is None else list(map(str, obs_names))
        if len(names) != n_obs:
            raise ValueError(f"{len(names)} obs_names for {n_obs} cells")
        skeleton = anndata.AnnData(obs=pd.DataFrame(index=pd.Index(names)), var=var)
        for key in ("obs", "var"):
            write_elem(f, key, getattr(skeleton, key))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
    return n_obs


def write_h5ad_out_of_core(adata, path) -> None:
    """Write ``adata`` to a new ``path``. For a backed AnnData the file is copied on disk and only the
    in-memory parts (``obs``, ``var``, ``obsm``, ``uns``) are rewritten, so ``X`` is never loaded
    (``AnnData.write_h5ad`` reads a backed ``X`` whole).

    Either way the file is written to a temporary file next to ``path`` and renamed into place, so a
    full disk or a crash never leaves a partial ``.h5ad`` (see :func:`dgdlens._io.atomic_path`)."""
    import shutil
    from pathlib import Path

    import h5py
    from anndata.io import write_elem

    from .._io import atomic_path

    if not getattr(adata, "isbacked", False):
        with atomic_path(path) as tmp:
            adata.write_h5ad(tmp)
        return
    src, dst = Path(adata.filename).resolve(), Path(path).resolve()
    if src == dst:
        raise ValueError(f"{path} is the backed input file itself; write the results to a new file.")
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
        with h5py.File(tmp, "a") as f:
            for key in ("obs", "var", "obsm", "uns"):
                if key in f:
                    del f[key]
                value = getattr(adata, key)
                write_elem(f, key, value if key in ("obs", "var") else dict(value))


def read_zarr_backed(path, layer: str | None = None):
    """An AnnData from a ``.zarr`` store whose count matrix stays on disk (the zarr counterpart of
    ``anndata.read_h5ad(path, backed="r")``): ``X`` (or ``layers[layer]``, which then becomes ``X``)
    is a lazily read CSR dataset; ``obs`` and ``var`` are loaded."""
    import anndata
    import zarr
    from anndata.io import read_elem, sparse_dataset

    group = zarr.open(str(path), mode="r")
    key = "X" if layer is None else f"layers/{layer}"
    if key not in group:
        raise ValueError(f"{path} has no {key}; available layers: {list(group['layers'].keys()) if 'layers' in group else []}")
    return anndata.AnnData(X=sparse_dataset(group[key]), obs=read_elem(group["obs"]), var=read_elem(group["var"]))
