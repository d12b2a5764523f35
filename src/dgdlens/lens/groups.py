"""High- and low-activation cell groups for every feature at once.

For feature *f* with activations ``a`` over all *n* cells:

- **high** group (``high="top"``, default): the ``max(min_active_cells, ceil((1 - p/100) * n))`` most
  active cells among the cells where the feature fires (``a != 0``; default p = 99, so the top 1 % of all
  cells but never fewer than ``min_active_cells``, 20). Ties at the boundary go to the earlier cell. A
  feature active in fewer cells than that uses all its active cells; one active in fewer than
  ``min_active_cells`` is skipped. At 700 cells the top 1 % would be 7 cells; the minimum makes it 20.
  ``high="percentile"`` (the reference's rule, used by ``compat="paper"``): active cells with
  ``a > percentile(a, p)`` (numpy's linear percentile over *all* cells, zeros included), with no minimum.
- **low** group, by ``low=``:

  - ``"silent"`` (default): cells where the feature is exactly 0;
  - ``"rest"``: every cell not in the high group;
  - ``"bottom"``: cells at or below the (100 - p)th percentile (for a sparse feature active in < 99% of
    cells this is again the silent cells).

  When more than ``max_low_cells`` cells qualify, a random subset of that size is used. One random
  order of all cells is drawn from ``seed``; each feature's low group is the first ``max_low_cells``
  qualifying cells in that order. For each feature this is a uniform random sample of its qualifying
  cells, and because features share the same order their low groups overlap, which lets the
  statistics be computed from running prefix sums instead of a product per feature.

Features with fewer than ``min_active_cells`` active cells, or with a group smaller than
``min_group_cells``, are skipped (and listed with the reason in :attr:`FeatureGroups.summary`, whose
``high_threshold`` is the smallest activation inside the high group for ``high="top"`` and the percentile
for ``high="percentile"``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.matrix import open_row_matrix

__all__ = ["FeatureGroups", "make_feature_groups", "as_activation_matrix", "column_percentiles"]

_LOW_MODES = ("silent", "rest", "bottom")
_HIGH_RULES = ("top", "percentile")


def as_activation_matrix(activations, *, max_dense_entries: int = 200_000_000) -> sp.csc_matrix:
    """Validate activations (cells x features) and return them as CSC float64.

    Activations on disk (a ``.npy`` / ``.npz`` / ``.h5ad`` path, a memory-mapped array, an h5py or backed
    sparse dataset) are read in row chunks and only their non-zeros are kept, so a dense file larger than
    memory works when the activations are sparse (SAE features are).

    Non-negative activations (SAE features) keep their sparsity. If any value is negative (e.g. raw
    latent dimensions), every entry, zeros included, is stored explicitly so that percentiles and
    groups treat zeros like any other value.
    """
    try:
        import torch

        if isinstance(activations, torch.Tensor):
            activations = activations.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(activations, pd.DataFrame):
        activations = activations.to_numpy()
    if _on_disk(activations):
        activations = _read_sparse_in_chunks(activations)
    if sp.issparse(activations):
        A = sp.csc_matrix(activations, dtype=np.float64)
        A.sum_duplicates()
        values = A.data
    else:
        arr = np.asarray(activations)
        if arr.ndim != 2:
            raise ValueError(f"activations must be a 2-D cells x features matrix, got shape {arr.shape}.")
        if not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
            raise ValueError(f"activations must be numeric, got dtype {arr.dtype}.")
        values = arr
        A = None
    if not np.all(np.isfinite(values)):
        raise ValueError("activations contain NaN or infinite values; check the SAE encoding / embeddings.")
    has_negative = bool(np.any(values < 0)) if np.size(values) else False
    if has_negative:
        warnings.warn(
            f"activations contain negative values (min {float(np.min(values)):.3g}); SAE activations are "
            "non-negative, so these look like raw latents or pre-activations. Zeros then count as ordinary "
            "values in the percentiles and groups; pass sae.encode(Z) if you meant the SAE features.",
            UserWarning, stacklevel=3,
        )
    if A is None:
        if has_negative:
            A = _dense_to_full_csc(np.asarray(values, dtype=np.float64))
        else:
            A = sp.csc_matrix(np.asarray(values, dtype=np.float64))
    elif has_negative:
        n_entries = A.shape[0] * A.shape[1]
        if n_entries > max_dense_entries:
            raise ValueError(
                f"Sparse activations with negative values would need all {n_entries:,} entries stored; "
                "pass non-negative SAE activations, or a dense array of a few latent dimensions."
            )
        A = _dense_to_full_csc(A.toarray())
    A.sort_indices()
    return A


def _on_disk(activations) -> bool:
    """A path, a numpy memmap, an h5py dataset or an anndata backed sparse dataset."""
    if isinstance(activations, (str, Path, np.memmap)):
        return True
    if sp.issparse(activations) or isinstance(activations, np.ndarray):
        return False
    return hasattr(activations, "to_memory") or type(activations).__module__.startswith("h5py")


def _read_sparse_in_chunks(source, chunk_cells: int = 16384) -> sp.csr_matrix:
    """Activations stored on disk, read ``chunk_cells`` rows at a time and kept sparse (only the non-zeros
    are ever held): a ``.npy`` file (memory-mapped), an ``.npz`` sparse matrix, an ``.h5ad`` or ``.zarr``
    whose ``X`` holds them, an h5py dataset or a backed sparse dataset."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"activations file {path} does not exist.")
        if path.suffix == ".npz":
            return sp.load_npz(path).tocsr()  # already sparse (load_npz never unpickles)
        if path.suffix == ".npy":
            source = np.load(path, mmap_mode="r", allow_pickle=False)
        elif path.suffix not in (".h5ad", ".zarr"):
            raise ValueError(f"activations file {path}: expected .npy, .npz, .h5ad or .zarr (its X).")
    matrix = open_row_matrix(source)[0]
    blocks = []
    for _, _, block in matrix.iter_chunks(chunk_cells):
        block = sp.csr_matrix(block, dtype=np.float64)
        block.eliminate_zeros()
        blocks.append(block)
    return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix(matrix.shape)


def _dense_to_full_csc(arr: np.ndarray) -> sp.csc_matrix:
    n, F = arr.shape
    data = np.asfortranarray(arr).ravel(order="F")
    indices = np.tile(np.arange(n, dtype=np.int64), F)
    indptr = np.arange(0, n * F + 1, n, dtype=np.int64)
    return sp.csc_matrix((data, indices, indptr), shape=(n, F))


def _entry_columns(A: sp.csc_matrix) -> np.ndarray:
    return np.repeat(np.arange(A.shape[1]), np.diff(A.indptr))


def column_percentiles(A: sp.csc_matrix, q: float) -> np.ndarray:
    """``np.percentile(A[:, j].toarray(), q)`` for every column j, without densifying.

    Implicit zeros take their place in the sorted column between the stored negatives and the
    stored non-negative values; numpy's default linear interpolation is reproduced.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}.")
    n, F = A.shape
    cols = _entry_columns(A)
    order = np.lexsort((A.data, cols))
    sorted_vals = A.data[order]
    starts = A.indptr[:-1]
    nnz = np.diff(A.indptr)
    n_neg = np.bincount(cols[A.data < 0], minlength=F)
    n_implicit = n - nnz

    def value_at(pos: np.ndarray) -> np.ndarray:
        out = np.zeros(F)
        neg = pos < n_neg
        out[neg] = sorted_vals[starts[neg] + pos[neg]]
        pos_side = pos >= n_neg + n_implicit
        out[pos_side] = sorted_vals[starts[pos_side] + pos[pos_side] - n_implicit[pos_side]]
        return out

    h = (n - 1) * q / 100.0
    lo = int(np.floor(h))
    hi = min(lo + 1, n - 1)
    frac = h - lo
    v_lo = value_at(np.full(F, lo))
    v_hi = value_at(np.full(F, hi))
    # numpy's _lerp: a + (b - a) * t, switched to b - (b - a) * (1 - t) for t >= 0.5
    diff = v_hi - v_lo
    return v_lo + diff * frac if frac < 0.5 else v_hi - diff * (1.0 - frac)


@dataclass
class FeatureGroups:
    """High/low groups for the analysed features (rows), in a form the group statistics consume.

    Attributes
    ----------
    features
        Column indices (into the activation matrix) of the analysed features, one per row below.
    high
        CSR (n_features x n_cells): membership of the high groups.
    order
        The seeded random order of all cells used to subsample the low groups.
    low_k
        Per feature, the low group is the qualifying cells among ``order[:low_k]``.
    low_excluded
        CSR (n_features x n_cells): cells inside ``order[:low_k]`` that do not qualify (e.g. active cells).
    n_high, n_low, n_active, high_threshold
        Per analysed feature.
    summary
        One row per requested feature (analysed or skipped) with ``status``.
    """

    n_cells: int
    features: np.ndarray
    high: sp.csr_matrix
    order: np.ndarray
    low_k: np.ndarray
    low_excluded: sp.csr_matrix
    n_high: np.ndarray
    n_low: np.ndarray
    n_active: np.ndarray
    high_threshold: np.ndarray
    summary: pd.DataFrame
    low_mode: str = "silent"

    @property
    def n_features(self) -> int:
        return len(self.features)

    def subset(self, rows: np.ndarray) -> FeatureGroups:
        """The same groups for a subset of the analysed features (row positions)."""
        rows = np.asarray(rows, dtype=np.int64)
        return FeatureGroups(
            self.n_cells, self.features[rows], self.high[rows], self.order, self.low_k[rows],
            self.low_excluded[rows], self.n_high[rows], self.n_low[rows], self.n_active[rows],
            self.high_threshold[rows], self.summary, self.low_mode,
        )

    def low_matrix(self, rows: np.ndarray | None = None) -> sp.csr_matrix:
        """Explicit CSR membership of the low groups (for rank tests and checks; costs Σ low_k entries)."""
        rows = np.arange(self.n_features) if rows is None else np.asarray(rows, dtype=np.int64)
        ks = self.low_k[rows]
        prefix = sp.csr_matrix(
            (np.ones(int(ks.sum())), np.concatenate([self.order[:k] for k in ks]) if len(ks) else np.zeros(0, int),
             np.r_[0, np.cumsum(ks)]),
            shape=(len(rows), self.n_cells),
        )
        excluded = self.low_excluded[rows].copy()
        excluded.data[:] = 1.0
        low = (prefix - excluded).tocsr()
        low.eliminate_zeros()
        low.sort_indices()
        return low

    def low_cells(self, row: int) -> np.ndarray:
        """Sorted cell indices of the low group of analysed feature ``row``."""
        return self.low_matrix(np.array([row])).indices.copy()

    def high_cells(self, row: int) -> np.ndarray:
        """Sorted cell indices of the high group of analysed feature ``row``."""
        return self.high.indices[self.high.indptr[row]:self.high.indptr[row + 1]].copy()


def _select_entries(A: sp.csc_matrix, mask: np.ndarray) -> sp.csr_matrix:
    """CSR (features x cells) holding the stored entries of A (cells x features) where ``mask``.

    A's columns are the features and its row indices are sorted, so the transposed selection is A's own
    structure with the unselected entries dropped (no sort). Values are int8 ones: a million-cell atlas
    has tens of millions of memberships.
    """
    cols = _entry_columns(A)
    indptr = np.r_[0, np.cumsum(np.bincount(cols[mask], minlength=A.shape[1]))].astype(np.int64)
    indices = A.indices[mask].astype(np.int32 if A.shape[0] < 2**31 else np.int64)
    M = sp.csr_matrix((np.ones(len(indices), dtype=np.int8), indices, indptr), shape=(A.shape[1], A.shape[0]))
    M.has_sorted_indices = True
    return M


def _top_active(A: sp.csc_matrix, cols: np.ndarray, active: np.ndarray, k: int):
    """Mask over ``A.data`` of the ``k`` largest active entries per column (ties: lower cell index first)
    and, per column, the smallest activation in that top group (0 for a column with no active entry).

    Columns with at most ``k`` active entries keep them all; only the others are sorted."""
    F = A.shape[1]
    mask = active.copy()
    n_active = np.bincount(cols[active], minlength=F)
    crowded = n_active > k
    if crowded.any():
        idx = np.flatnonzero(active & crowded[cols])
        # sort those entries by column, then activation descending, then cell index
        order = idx[np.lexsort((A.indices[idx], -A.data[idx], cols[idx]))]
        c = cols[order]
        starts = np.r_[0, np.flatnonzero(np.diff(c)) + 1]
        rank = np.arange(len(c)) - np.repeat(starts, np.diff(np.r_[starts, len(c)]))
        mask[order[rank >= k]] = False
    # smallest kept value per column: A.data is grouped by column, so one reduceat
    values = np.where(mask, A.data, np.inf)
    threshold = np.zeros(F)
    nonempty = np.flatnonzero(np.diff(A.indptr) > 0)
    if len(nonempty):
        threshold[nonempty] = np.minimum.reduceat(values, A.indptr[nonempty])
    threshold[~np.isfinite(threshold)] = 0.0
    return mask, threshold


def _low_prefix(excluded: sp.csr_matrix, rank: np.ndarray, order: np.ndarray, m: int | None, n: int):
    """Prefix lengths k_f and the excluded cells inside each prefix (see the module docstring)."""
    F = excluded.shape[0]
    row_len = np.diff(excluded.indptr)
    rows = np.repeat(np.arange(F), row_len)
    r = rank[excluded.indices]
    if m is not None:
        # k_f <= m + (excluded cells of f), so later positions can be dropped before sorting
        keep = r < np.minimum(m + row_len, n)[rows]
        rows, r = rows[keep], r[keep]
    E = sp.csr_matrix((np.ones(len(r), dtype=np.int8), (rows, r)), shape=(F, n))
    E.sort_indices()  # by position in the random order
    row_len = np.diff(E.indptr)
    rows = np.repeat(np.arange(F), row_len)
    pos_in_row = np.arange(E.nnz) - np.repeat(E.indptr[:-1], row_len)
    if m is None:
        k = np.full(F, n, dtype=np.int64)
    else:
        # The m-th qualifying position is m + (number of excluded positions e_i with e_i - i < m).
        before = (E.indices - pos_in_row) < m
        k = np.minimum(m + np.bincount(rows[before], minlength=F), n).astype(np.int64)
    inside = E.indices < k[rows]
    in_prefix = sp.csr_matrix(
        (np.ones(int(inside.sum()), dtype=np.int8), (rows[inside], order[E.indices[inside]])), shape=(F, n)
    )
    in_prefix.sort_indices()
    n_low = k - np.bincount(rows[inside], minlength=F)
    return k, in_prefix, n_low


def _matched_low(active: sp.csr_matrix, high: sp.csr_matrix, groupby, order: np.ndarray, m: int | None, n: int):
    """Silent cells per feature, drawn in ``order`` within each label of ``groupby`` with the label
    proportions of the feature's high group (see ``groupby`` in :func:`make_feature_groups`)."""
    labels = np.asarray(groupby)
    if labels.shape != (n,):
        raise ValueError(f"groupby must have one label per cell ({n}), got shape {labels.shape}.")
    if pd.isna(pd.Series(labels)).any():
        raise ValueError("groupby has missing labels; give every cell a group (e.g. its batch).")
    codes = pd.factorize(pd.Series(labels), sort=True)[0]
    B = codes.max() + 1 if n else 0
    codes_ordered = codes[order]
    F = high.shape[0]
    rows, cols, n_low = [], [], np.zeros(F, dtype=np.int64)
    for f in range(F):
        silent = np.ones(n, dtype=bool)
        silent[active.indices[active.indptr[f]:active.indptr[f + 1]]] = False
        nh = np.bincount(codes[high.indices[high.indptr[f]:high.indptr[f + 1]]], minlength=B).astype(np.float64)
        cand = order[silent[order]]
        cb = codes_ordered[silent[order]]
        ns = np.bincount(cb, minlength=B).astype(np.float64)
        chosen = np.zeros(0, dtype=np.int64)
        if nh.sum() > 0:
            cap = ns.sum() if m is None else float(m)
            scale = min(cap / nh.sum(), float(np.min(ns[nh > 0] / nh[nh > 0])))
            quota = np.floor(scale * nh + 1e-9).astype(np.int64)
            # position of each candidate within its label, in the random order
            pos = np.zeros(len(cand), dtype=np.int64)
            for b in np.flatnonzero(quota):
                sel = cb == b
                pos[sel] = np.arange(int(sel.sum()))
            chosen = np.sort(cand[pos < quota[cb]])
        excl = np.ones(n, dtype=bool)
        excl[chosen] = False
        idx = np.flatnonzero(excl)
        rows.append(np.full(len(idx), f))
        cols.append(idx)
        n_low[f] = len(chosen)
    r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    low_excluded = sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(F, n))
    low_excluded.sort_indices()
    return np.full(F, n, dtype=np.int64), low_excluded, n_low


def make_feature_groups(
    activations,
    *,
    features=None,
    percentile: float = 99.0,
    low: str = "silent",
    max_low_cells: int | None = 2000,
    min_active_cells: int = 20,
    min_group_cells: int = 3,
    seed: int = 0,
    high: str = "top",
    groupby=None,
) -> FeatureGroups:
    """Build high/low groups for all (or the selected) features; see the module docstring.

    Parameters
    ----------
    activations
        cells x features, dense or scipy sparse (e.g. the CSR from ``sae.encode``), or an already
        validated CSC from :func:`as_activation_matrix`.
    features
        Column indices to analyse (default: all).
    percentile
        High group: active cells strictly above this percentile of the feature over all cells.
    low
        ``"silent"``, ``"rest"`` or ``"bottom"``.
    max_low_cells
        Random subsample size for large low groups (``None``: use all qualifying cells).
    min_active_cells
        Features active (non-zero) in fewer cells are skipped.
    min_group_cells
        Features whose high or low group has fewer cells are skipped (Welch needs at least 2).
    seed
        Seed of the random cell order used for subsampling.
    high
        ``"top"`` (default): the ``max(min_active_cells, ceil((1 - percentile/100) * n_cells))`` most active
        cells; ``"percentile"``: active cells strictly above the percentile (no minimum; the reference).
    groupby
        Optional per-cell labels (e.g. the batch; one per cell): compare within each label and pool. The
        low group is drawn from the silent cells *batch-matched* to the high group: each label contributes
        low cells in the same proportion as it contributes high cells (the largest such group up to
        ``max_low_cells``; labels without high cells contribute none), so a gene that differs between
        batches is not reported because the feature fires more in one batch. Needs ``low="silent"``.
        Memory: the low groups are then stored explicitly (features x cells entries for the complement).

    Returns
    -------
    FeatureGroups
        The analysed features' high groups (CSR membership), the low groups as prefixes of one random
        cell order minus excluded cells, group sizes and thresholds, and ``summary``: one row per
        requested feature with its ``status`` (``"ok"`` or why it was skipped).
    """
    if high not in _HIGH_RULES:
        raise ValueError(f"high must be one of {_HIGH_RULES}, got {high!r}.")
    if low not in _LOW_MODES:
        raise ValueError(f"low must be one of {_LOW_MODES}, got {low!r}.")
    if max_low_cells is not None and max_low_cells < 2:
        raise ValueError(f"max_low_cells must be >= 2 or None, got {max_low_cells}.")
    if min_group_cells < 2:
        raise ValueError("min_group_cells must be at least 2 (a variance needs two cells).")
    A = activations if isinstance(activations, sp.csc_matrix) else as_activation_matrix(activations)
    n, F_all = A.shape
    if features is None:
        features = np.arange(F_all)
    else:
        features = np.asarray(features)
        if features.dtype == bool:
            if len(features) != F_all:
                raise ValueError(f"Boolean features mask has length {len(features)}, expected {F_all}.")
            features = np.flatnonzero(features)
        features = features.astype(np.int64)
        if features.size and (features.min() < 0 or features.max() >= F_all):
            raise ValueError(f"features must be column indices in [0, {F_all}); got values outside.")
        if len(np.unique(features)) != len(features):
            raise ValueError("features contains duplicates.")
    A = A[:, features] if len(features) != F_all or np.any(features != np.arange(F_all)) else A
    A = sp.csc_matrix(A)
    A.sort_indices()
    F = A.shape[1]

    cols = _entry_columns(A)
    active = A.data != 0
    n_active = np.bincount(cols[active], minlength=F)
    if high == "top":
        n_target = max(int(min_active_cells), int(np.ceil((100.0 - percentile) / 100.0 * n - 1e-9)), 1)
        high_mask, threshold = _top_active(A, cols, active, n_target)
    else:
        threshold = column_percentiles(A, percentile)
        high_mask = active & (A.data > threshold[cols])
    high = _select_entries(A, high_mask)
    n_high = np.diff(high.indptr)

    if low == "silent":
        excluded = _select_entries(A, active)
    elif low == "rest":
        excluded = high
    else:
        low_threshold = column_percentiles(A, 100.0 - percentile)
        excluded = _select_entries(A, A.data > low_threshold[cols])

    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    if groupby is None:
        low_k, low_excluded, n_low = _low_prefix(excluded, rank, order, max_low_cells, n)
    else:
        if low != "silent":
            raise ValueError(f"groupby needs low='silent' (got low={low!r}).")
        low_k, low_excluded, n_low = _matched_low(excluded, high, groupby, order, max_low_cells, n)

    status = np.full(F, "ok", dtype=object)
    status[n_low < min_group_cells] = "too_few_low"
    status[n_high < min_group_cells] = "too_few_high"
    status[n_active < min_active_cells] = "too_few_active"
    status[n_active == 0] = "dead"
    summary = pd.DataFrame({
        "feature": features, "n_active": n_active, "high_threshold": threshold,
        "n_high": n_high, "n_low": n_low, "status": status,
    })
    keep = np.flatnonzero(status == "ok")
    return FeatureGroups(
        n_cells=n, features=features[keep], high=high[keep], order=order, low_k=low_k[keep],
        low_excluded=low_excluded[keep], n_high=n_high[keep], n_low=n_low[keep], n_active=n_active[keep],
        high_threshold=threshold[keep], summary=summary, low_mode=low,
    )
