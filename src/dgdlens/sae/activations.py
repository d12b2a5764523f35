"""Firing statistics of SAE activations: how often each feature fires, dead and dense features, mean L0.

These read activations alone (cells x features, dense or scipy sparse), so they work on any stored
``adata.obsm["X_sae"]`` without the SAE that produced it. :func:`dgdlens.sae.metrics` needs the SAE
and its input (FVU, cosine); :func:`dgdlens.pl.activation_frequency` draws :func:`firing_rates`.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["firing_rates", "activation_summary"]


def _check_activations(activations):
    if sp.issparse(activations):
        if len(activations.shape) != 2:
            raise ValueError(f"activations must be 2-D (cells x features), got shape {activations.shape}.")
        return activations
    arr = np.asarray(activations)
    if arr.ndim != 2:
        raise ValueError(f"activations must be 2-D (cells x features), got shape {arr.shape}.")
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"activations must be numeric, got dtype {arr.dtype}.")
    return arr


def _active_counts(activations, threshold: float, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature and per-cell counts of activations above ``threshold``, in row chunks."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 (an activation above it counts as firing), got {threshold}.")
    A = _check_activations(activations)
    n_cells, n_features = A.shape
    if n_cells == 0 or n_features == 0:
        raise ValueError(f"activations is empty (shape {A.shape}).")
    if sp.issparse(A):
        # Only stored entries can exceed a threshold >= 0, so the comparison stays sparse.
        A = A.tocsr() if A.format != "csr" else A
        above = A.copy()
        above.data = (above.data > threshold).astype(np.int64)
        above.eliminate_zeros()
        return np.asarray(above.sum(axis=0)).ravel(), np.asarray(above.sum(axis=1)).ravel()
    per_feature = np.zeros(n_features, dtype=np.int64)
    per_cell = np.empty(n_cells, dtype=np.int64)
    # Chunks bound the boolean temporary for (cells x features) inputs of any size.
    for start in range(0, n_cells, chunk_size):
        block = A[start:start + chunk_size] > threshold
        per_feature += block.sum(axis=0)
        per_cell[start:start + chunk_size] = block.sum(axis=1)
    return per_feature, per_cell


def firing_rates(activations, *, threshold: float = 0.0, chunk_size: int = 8192) -> np.ndarray:
    """Fraction of cells in which each feature is active (activation > ``threshold``).

    ``activations`` is cells x features, a numpy array or scipy sparse matrix; dense inputs are
    processed ``chunk_size`` rows at a time.
    """
    per_feature, per_cell = _active_counts(activations, threshold, chunk_size)
    return per_feature / per_cell.shape[0]


def activation_summary(
    activations, *, threshold: float = 0.0, dense_threshold: float = 0.1, chunk_size: int = 8192
) -> dict[str, float]:
    """Sparsity summary computed from activations alone.

    Returns ``l0`` (mean number of active features per cell), ``dead_fraction`` (features never
    active), ``dense_fraction`` (features active in more than ``dense_threshold`` of cells),
    ``n_features`` and ``n_cells``.
    """
    per_feature, per_cell = _active_counts(activations, threshold, chunk_size)
    rates = per_feature / per_cell.shape[0]
    return {
        "l0": float(per_cell.mean()),
        "dead_fraction": float((per_feature == 0).mean()),
        "dense_fraction": float((rates > dense_threshold).mean()),
        "n_features": int(per_feature.shape[0]),
        "n_cells": int(per_cell.shape[0]),
    }
