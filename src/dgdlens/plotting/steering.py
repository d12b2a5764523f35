"""Steering results: the genes whose decoded expression moved most when a feature was changed."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ._utils import new_axes

__all__ = ["as_lfc_series", "top_changed_genes", "steering_lfc"]

_LFC_COLUMNS = ("lfc", "log2fc", "log2_fold_change", "logfoldchange", "lfc_mean")


def as_lfc_series(lfc) -> pd.Series:
    """Per-gene log fold changes as a float Series indexed by gene name, non-finite entries dropped.

    Accepts a Series indexed by gene, a dict ``{gene: lfc}``, or a DataFrame with one of the columns
    ``lfc, log2fc, log2_fold_change, logfoldchange, lfc_mean`` (genes in the index or a ``gene`` column).
    """
    if isinstance(lfc, dict):
        lfc = pd.Series(lfc, dtype=np.float64)
    if isinstance(lfc, pd.DataFrame):
        col = next((c for c in _LFC_COLUMNS if c in lfc.columns), None)
        if col is None:
            raise ValueError(f"the fold-change table needs one of the columns {list(_LFC_COLUMNS)}; "
                             f"got {list(lfc.columns)}.")
        index = lfc["gene"].astype(str) if "gene" in lfc.columns else lfc.index.astype(str)
        lfc = pd.Series(lfc[col].to_numpy(), index=index)
    if not isinstance(lfc, pd.Series):
        raise ValueError(f"lfc must be a pandas Series indexed by gene name, got {type(lfc).__name__}.")
    try:
        values = pd.to_numeric(lfc, errors="raise").astype(np.float64)
    except (ValueError, TypeError) as err:
        raise ValueError(f"lfc must hold numbers: {err}") from None
    values.index = values.index.astype(str)
    return values[np.isfinite(values.to_numpy())]


def top_changed_genes(lfc, *, n_up: int = 15, n_down: int = 15) -> tuple[pd.Series, pd.Series]:
    """The ``n_up`` largest positive and ``n_down`` most negative fold changes (ties broken by gene order)."""
    values = as_lfc_series(lfc)
    up = values[values > 0].sort_values(ascending=False, kind="stable").head(n_up)
    down = values[values < 0].sort_values(ascending=True, kind="stable").head(n_down)
    return up, down


def steering_lfc(
    lfc,
    *,
    n_up: int = 15,
    n_down: int = 15,
    xlabel: str = "log2 fold change (steered / original)",
    title: str | None = None,
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Horizontal bar plot of the most up- (red) and down-regulated (blue) genes after steering.

    The strongest increase is at the top, the strongest decrease at the bottom.

    Returns
    -------
    The figure drawn on (``ax.figure`` when ``ax`` is given).
    """
    if n_up < 0 or n_down < 0:
        raise ValueError("n_up and n_down must be >= 0.")
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
