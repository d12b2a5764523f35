"""Sparse-autoencoder quality: a histogram of how often each feature fires (rates from
:func:`dgdlens.sae.activations.firing_rates`)."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..sae.activations import firing_rates
from ._utils import new_axes, obsm_matrix

__all__ = ["activation_frequency"]


def activation_frequency(
    activations=None,
    *,
    rates: np.ndarray | None = None,
    n_cells: int | None = None,
    basis: str = "X_sae",
    threshold: float = 0.0,
    dense_threshold: float = 0.1,
    bins: int = 40,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (5.4, 3.6),
) -> Figure:
    """Histogram of feature firing rates on a log10 axis, with dead features counted in the title.

    Pass either ``activations`` (cells x features, dense or sparse, or an AnnData with them in
    ``obsm[basis]``) or precomputed ``rates`` (fraction of cells per feature) with ``n_cells``.
    Dead features (rate 0) cannot sit on a log axis; their number is reported instead. The dashed
    line marks ``dense_threshold``.

    Parameters
    ----------
    activations
        Cells x features (dense or sparse), or an AnnData with them in ``obsm[basis]``.
    rates
        Precomputed firing rate per feature (instead of ``activations``).
    n_cells
        Number of cells behind ``rates`` (for the title).
    basis
        With an AnnData, the ``obsm`` key of the activations.
    threshold
        A feature fires in a cell when its activation exceeds this.
    dense_threshold
        Rate above which a feature counts as dense (the dashed line).
    bins
        Histogram bins.
    ax
        Axes to draw on; default a new figure.
    figsize
        Size of a new figure.

    Returns
    -------
    matplotlib.figure.Figure
        The figure drawn on (``ax.figure`` when ``ax`` is given).
    """
    if (activations is None) == (rates is None):
        raise ValueError("pass exactly one of activations= or rates=.")
    if rates is None:
        activations = obsm_matrix(activations, basis)
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
