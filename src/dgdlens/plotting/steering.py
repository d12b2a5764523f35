"""Steering results: the genes whose decoded expression moved most when a feature was changed."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..evaluate import top_changed_genes
from ._utils import is_anndata, new_axes

__all__ = ["steering_lfc"]


def steering_lfc(
    lfc,
    *,
    key: str = "dgdlens_steer",
    n_up: int = 15,
    n_down: int = 15,
    xlabel: str = "log2 fold change (steered / original)",
    title: str | None = None,
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Horizontal bar plot of the most up- (red) and down-regulated (blue) genes after steering.

    The strongest increase is at the top, the strongest decrease at the bottom.

    Parameters
    ----------
    lfc
        Per-gene log fold changes (see :func:`dgdlens.evaluate.as_lfc_series`: a Series indexed by
        gene, a dict, or a table such as ``SteerResult.genes``), or an AnnData on which
        :func:`dgdlens.tl.steer` stored its result under ``uns[key]``.

    Returns
    -------
    matplotlib.figure.Figure
        The figure drawn on (``ax.figure`` when ``ax`` is given).
    """
    if n_up < 0 or n_down < 0:
        raise ValueError("n_up and n_down must be >= 0.")
    if is_anndata(lfc):
        if key not in lfc.uns or "genes" not in lfc.uns[key]:
            raise ValueError(f"adata.uns has no steering result under {key!r}; run dl.tl.steer first or pass key=.")
        lfc = lfc.uns[key]["genes"]
    up, down = top_changed_genes(lfc, n_up=n_up, n_down=n_down)
    shown = pd.concat([up, down.iloc[::-1]])  # top to bottom: +max ... smallest |lfc| ... -max
    fig, ax = new_axes(ax, figsize or (5.6, 1.0 + 0.22 * max(len(shown), 4)))
    if shown.empty:
        ax.text(0.5, 0.5, "no gene changed", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    else:
        y = np.arange(len(shown))[::-1]
        colors = np.where(shown.to_numpy() > 0, "#c0392b", "#2c6fbb")
        ax.barh(y, shown.to_numpy(), color=colors, height=0.75)
        ax.set_yticks(y, shown.index.tolist(), fontsize="small")
        ax.axvline(0.0, color="0.2", lw=0.8)
        ax.set_ylim(-0.7, len(shown) - 0.3)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3, lw=0.5)
    if title:
        ax.set_title(title, fontsize="medium")
    return fig
