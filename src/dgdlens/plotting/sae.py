"""Sparse-autoencoder quality: how often each feature fires, dead and dense features, mean L0."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ._utils import new_axes

__all__ = ["firing_rates", "activation_summary", "activation_frequency"]


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


def activation_frequency(
    activations=None,
    *,
    rates: np.ndarray | None = None,
    n_cells: int | None = None,
    threshold: float = 0.0,
    dense_threshold: float = 0.1,
    bins: int = 40,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (5.4, 3.6),
) -> Figure:
    """Histogram of feature firing rates on a log10 axis, with dead features counted in the title.

    Pass either ``activations`` (cells x features, dense or sparse) or precomputed ``rates``
    (fraction of cells per feature) with ``n_cells``. Dead features (rate 0) cannot sit on a log
    axis; their number is reported instead. The dashed line marks ``dense_threshold``.

    Returns
    -------
    The figure drawn on (``ax.figure`` when ``ax`` is given).
    """
    if (activations is None) == (rates is None):
        raise ValueError("pass exactly one of activations= or rates=.")
    if rates is None:
        rates = firing_rates(activations, threshold=threshold)
        n_cells = activations.shape[0]
    else:
        rates = np.asarray(rates, dtype=np.float64).ravel()
        if rates.size == 0 or not np.isfinite(rates).all() or (rates < 0).any() or (rates > 1).any():
            raise ValueError("rates must be a non-empty array of fractions in [0, 1].")
        if n_cells is None or n_cells < 1:
            raise ValueError("n_cells (the number of cells the rates were computed on) is required with rates=.")
    fig, ax = new_axes(ax, figsize)
    live = rates[rates > 0]
    n_dead = int(rates.size - live.size)
    if live.size:
        lowest = np.log10(1.0 / n_cells)
        edges = np.linspace(min(lowest, np.log10(live.min())) - 0.05, 0.0 + 1e-9, bins + 1)
        ax.hist(np.log10(live), bins=edges, color="#4c72b0", edgecolor="white", linewidth=0.4)
        ax.axvline(np.log10(dense_threshold), color="0.3", ls="--", lw=1.0,
                   label=f"dense (> {dense_threshold:.0%} of cells)")
        ax.legend(frameon=False, fontsize="small", loc="upper left")
    else:
        ax.text(0.5, 0.5, "no feature is ever active", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("log10 fraction of cells where the feature is active")
    ax.set_ylabel("number of features")
    ax.set_title(f"{rates.size} features; dead (never active): {n_dead} ({n_dead / rates.size:.1%})",
                 fontsize="medium")
    return fig
