"""Mixture components (or any clustering) against given labels: an annotated heatmap of the contingency
table, titled with the agreement scores (computed by :mod:`dgdlens.evaluate`)."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..evaluate import cluster_agreement, contingency_table
from ._utils import new_axes

__all__ = ["contingency_heatmap"]


def _diagonal_order(fractions: np.ndarray) -> np.ndarray:
    """Row order that groups clusters by their dominant label (in column order), largest share first."""
    dominant = fractions.argmax(axis=1)
    return np.lexsort((-fractions.max(axis=1), dominant))


def contingency_heatmap(
    clusters,
    labels,
    *,
    ax: Axes | None = None,
    annotate: bool = True,
    reorder: bool = True,
    cmap: str = "Blues",
    cluster_name: str = "mixture component",
    label_name: str = "label",
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Heatmap of clusters (rows) against labels (columns), each row normalised to sum to 1.

    Colour is the fraction of the cluster's cells that carry each label; the number printed in a
    square is the cell count. With ``reorder`` clusters are sorted by their dominant label, so a good
    match shows as a diagonal. The title gives ARI and NMI (see :func:`cluster_agreement`).

    Parameters
    ----------
    clusters, labels
        One cluster and one label per cell (arrays, lists, Series or Categoricals of equal length).
    ax
        Axes to draw on; default a new figure.
    annotate
        Print the cell count in every square.
    reorder
        Sort the clusters by their dominant label.
    cmap
        Matplotlib colour map of the fractions.
    cluster_name, label_name
        Axis labels.
    figsize
        Size of a new figure (default: from the table's shape).

    Returns
    -------
    matplotlib.figure.Figure
        The figure drawn on (``ax.figure`` when ``ax`` is given).
    """
    counts = contingency_table(clusters, labels)
    fractions = counts.div(counts.sum(axis=1), axis=0)
    if reorder:
        order = _diagonal_order(fractions.to_numpy())
        counts, fractions = counts.iloc[order], fractions.iloc[order]
    n_rows, n_cols = counts.shape
    # Room below the rows for the 45-degree column labels, so the colour bar keeps a readable height.
    label_room = 0.3 + 0.055 * max(len(str(c)) for c in counts.columns)
    fig, ax = new_axes(ax, figsize or (1.6 + 0.55 * n_cols + 1.2, max(3.4, 1.4 + 0.32 * n_rows + label_room)))
    image = ax.imshow(fractions.to_numpy(), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                      interpolation="nearest")
    if annotate:
        fontsize = 8 if max(n_rows, n_cols) <= 20 else 6
        for (i, j), n in np.ndenumerate(counts.to_numpy()):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=fontsize,
                        color="white" if fractions.iat[i, j] > 0.6 else "black")
    ax.set_xticks(range(n_cols), [str(c) for c in counts.columns], rotation=45, ha="right",
                  rotation_mode="anchor")
    ax.set_yticks(range(n_rows), [str(r) for r in counts.index])
    ax.set_xlabel(label_name)
    ax.set_ylabel(cluster_name)
    scores = cluster_agreement(clusters, labels)
    ax.set_title(f"ARI {scores['ari']:.2f}, NMI {scores['nmi']:.2f}", fontsize="medium")
    cb = fig.colorbar(image, ax=ax, shrink=0.9, pad=0.02)
    cb.set_label("share of the row's cells")
    return fig
