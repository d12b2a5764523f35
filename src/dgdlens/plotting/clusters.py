"""Mixture components (or any clustering) against given labels: contingency table, agreement scores
(ARI / NMI) and an annotated heatmap."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ._utils import as_categories, new_axes

__all__ = ["contingency_table", "cluster_agreement", "contingency_heatmap"]


def _paired(clusters, labels) -> tuple[np.ndarray, list, np.ndarray, list, int]:
    """Integer codes of clusters and labels over cells where both are present, and the dropped count."""
    c_codes, c_cats, c_missing = as_categories(clusters, "clusters")
    l_codes, l_cats, l_missing = as_categories(labels, "labels", n=len(c_codes))
    keep = ~(c_missing | l_missing)
    if not keep.any():
        raise ValueError("no cell has both a cluster and a label; check for missing values.")
    return c_codes[keep], c_cats, l_codes[keep], l_cats, int((~keep).sum())


def contingency_table(clusters, labels, *, normalize: str | None = None) -> pd.DataFrame:
    """Cells per (cluster, label) pair: rows are clusters, columns labels.

    Cells with a missing cluster or label are left out. ``normalize="rows"`` divides each row by its
    total (the label composition of each cluster), ``"columns"`` each column, ``None`` keeps counts.
    Clusters and labels that no remaining cell carries are dropped.
    """
    if normalize not in (None, "rows", "columns"):
        raise ValueError(f"normalize must be None, 'rows' or 'columns', got {normalize!r}.")
    c_codes, c_cats, l_codes, l_cats, _ = _paired(clusters, labels)
    counts = np.zeros((len(c_cats), len(l_cats)), dtype=np.int64)
    np.add.at(counts, (c_codes, l_codes), 1)
    rows, cols = counts.sum(axis=1) > 0, counts.sum(axis=0) > 0
    table = pd.DataFrame(counts[rows][:, cols], index=pd.Index([c for c, k in zip(c_cats, rows) if k], name="cluster"),
                         columns=pd.Index([c for c, k in zip(l_cats, cols) if k], name="label"))
    if normalize == "rows":
        return table.div(table.sum(axis=1), axis=0)
    if normalize == "columns":
        return table.div(table.sum(axis=0), axis=1)
    return table


def cluster_agreement(clusters, labels) -> dict[str, float]:
    """Adjusted Rand index and normalised mutual information (arithmetic mean) between clusters and labels.

    Computed with scikit-learn over the cells that have both; also returns ``n_cells`` used.
    Both scores are 1 for identical partitions (whatever the names) and about 0 for unrelated ones.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    c_codes, _, l_codes, _, _ = _paired(clusters, labels)
    return {
        "ari": float(adjusted_rand_score(l_codes, c_codes)),
        "nmi": float(normalized_mutual_info_score(l_codes, c_codes)),
        "n_cells": int(c_codes.size),
    }


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

    Returns
    -------
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
