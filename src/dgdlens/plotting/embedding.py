"""2-D embeddings of cells: scatter plots coloured by a category (clusters, labels) or a value per cell
(a feature's activation). The coordinates come from elsewhere, e.g. :func:`dgdlens.tl.umap`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ._utils import (
    MISSING_COLOR,
    as_categories,
    as_coords,
    as_vector,
    categorical_palette,
    default_point_size,
    is_anndata,
    new_axes,
    obsm_matrix,
)

__all__ = ["embedding", "feature_activations"]


def _resolve_input(data, color, basis: str):
    """Accept coordinates or an AnnData (coordinates in ``obsm[basis]``, ``color`` may name an obs column)."""
    if is_anndata(data):
        coords = as_coords(obsm_matrix(data, basis), f"adata.obsm[{basis!r}]")
        if isinstance(color, str):
            if color not in data.obs.columns:
                raise ValueError(f"color={color!r} is not a column of adata.obs "
                                 f"(columns: {list(data.obs.columns)}).")
            return coords, data.obs[color], color
        return coords, color, None
    return as_coords(data), color, None


def _is_categorical(values) -> bool:
    if isinstance(values, (pd.Categorical,)) or (
        isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype)
    ):
        return True
    arr = np.asarray(values)
    return arr.dtype.kind in "OSUb"


def _categorical_scatter(ax, coords, values, *, size, legend_loc, palette, na_label):
    codes, cats, missing = as_categories(values, "color", n=coords.shape[0])
    colors = list(palette) if palette is not None else categorical_palette(len(cats))
    if len(colors) < len(cats):
        raise ValueError(f"palette has {len(colors)} colours but there are {len(cats)} categories.")
    point_colors = np.array([MISSING_COLOR] + colors[: len(cats)], dtype=object)[codes + 1]
    # Missing values first so that they never hide labelled cells; otherwise a fixed random order
    # avoids the last category painting over all others.
    order = np.random.default_rng(0).permutation(coords.shape[0])
    order = np.concatenate([order[missing[order]], order[~missing[order]]])
    ax.scatter(coords[order, 0], coords[order, 1], c=list(point_colors[order]), s=size, linewidths=0,
               rasterized=True)
    handles = [Line2D([], [], ls="", marker="o", color=colors[i], label=str(c)) for i, c in enumerate(cats)]
    if missing.any():
        handles.append(Line2D([], [], ls="", marker="o", color=MISSING_COLOR, label=na_label))
    if legend_loc == "right margin":
        ncol = 1 if len(handles) <= 16 else (2 if len(handles) <= 32 else 3)
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
                  fontsize="small", ncol=ncol, handletextpad=0.2, columnspacing=0.8, borderaxespad=0.3)
    elif legend_loc == "on data":
        outline = [patheffects.withStroke(linewidth=2.5, foreground="white")]
        for i, c in enumerate(cats):
            pos = np.median(coords[codes == i], axis=0)
            ax.text(pos[0], pos[1], str(c), ha="center", va="center", fontsize="small",
                    fontweight="bold", path_effects=outline)
    return cats


def _continuous_scatter(ax, coords, values, *, size, cmap, vmin, vmax, colorbar_label):
    vals = as_vector(values, "color", n=coords.shape[0]).astype(np.float64)
    finite = np.isfinite(vals)
    if (~finite).any():
        ax.scatter(coords[~finite, 0], coords[~finite, 1], c=MISSING_COLOR, s=size, linewidths=0,
                   rasterized=True)
    # Highest values on top: for sparse activations the few active cells must stay visible.
    order = np.flatnonzero(finite)[np.argsort(vals[finite], kind="stable")]
    lo = np.nanmin(vals[finite]) if vmin is None and finite.any() else vmin
    hi = np.nanmax(vals[finite]) if vmax is None and finite.any() else vmax
    if lo is not None and hi is not None and hi <= lo:
        hi = lo + 1.0  # constant colour (e.g. a feature that never fires) still gets a valid scale
    art = ax.scatter(coords[order, 0], coords[order, 1], c=vals[order], s=size, cmap=cmap, vmin=lo, vmax=hi,
                     linewidths=0, rasterized=True)
    cb = ax.figure.colorbar(art, ax=ax, shrink=0.8, pad=0.01)
    if colorbar_label:
        cb.set_label(colorbar_label)
    return art


def embedding(
    data,
    *,
    color=None,
    basis: str = "X_umap",
    categorical: bool | None = None,
    title: str | None = None,
    ax: Axes | None = None,
    size: float | None = None,
    palette: Sequence[str] | None = None,
    legend_loc: str | None = "right margin",
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar_label: str | None = None,
    na_label: str = "NA",
    axis_label: str | None = None,
    figsize: tuple[float, float] = (5.2, 4.2),
) -> Figure:
    """Scatter plot of cells in a 2-D embedding, coloured by a category or a value per cell.

    Parameters
    ----------
    data
        Coordinates (cells x 2) or an AnnData with the coordinates in ``obsm[basis]``.
    color
        One value per cell (array, list, Series, Categorical), or with an AnnData the name of an
        ``obs`` column. ``None`` draws all cells in grey.
    categorical
        Force categorical (legend) or continuous (colour bar) colouring; default: strings,
        booleans and pandas categoricals are categorical, numbers continuous.
    legend_loc
        For categories: ``"right margin"``, ``"on data"`` (labels at each category's median) or ``None``.
    cmap, vmin, vmax, colorbar_label
        For values: colour map and its limits (default: data range). Cells are drawn in increasing
        order so the highest values sit on top; NaN values are drawn in light grey.
    axis_label
        Axis name prefix (default: ``"UMAP"`` for ``X_umap``, else the basis without ``X_``).

    Returns
    -------
    matplotlib.figure.Figure
        The figure drawn on (``ax.figure`` when ``ax`` is given).
    """
    coords, values, color_name = _resolve_input(data, color, basis)
    fig, ax = new_axes(ax, figsize)
    size = default_point_size(coords.shape[0]) if size is None else size
    if legend_loc not in ("right margin", "on data", None):
        raise ValueError(f"legend_loc must be 'right margin', 'on data' or None, got {legend_loc!r}.")
    if values is None:
        ax.scatter(coords[:, 0], coords[:, 1], c="0.55", s=size, linewidths=0, rasterized=True)
    elif (categorical if categorical is not None else _is_categorical(values)):
        _categorical_scatter(ax, coords, values, size=size, legend_loc=legend_loc, palette=palette,
                             na_label=na_label)
    else:
        _continuous_scatter(ax, coords, values, size=size, cmap=cmap, vmin=vmin, vmax=vmax,
                            colorbar_label=colorbar_label)
    prefix = axis_label or ("UMAP" if basis == "X_umap" else basis.removeprefix("X_").upper())
    ax.set_xlabel(f"{prefix} 1")
    ax.set_ylabel(f"{prefix} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None or color_name is not None:
        ax.set_title(title if title is not None else color_name)
    return fig


def _activation_columns(activations, columns: Sequence[int]) -> np.ndarray:
    """Dense (cells x len(columns)) values of a few features; the full matrix is never densified."""
    if sp.issparse(activations):
        matrix = activations if activations.format in ("csr", "csc") else sp.csc_matrix(activations)
        return np.asarray(matrix[:, list(columns)].toarray(), dtype=np.float64)
    arr = np.asarray(activations)
    if arr.ndim != 2:
        raise ValueError(f"activations must be 2-D (cells x features), got shape {arr.shape}.")
    return np.asarray(arr[:, list(columns)], dtype=np.float64)


def feature_activations(
    coords,
    activations,
    features: Sequence[int],
    *,
    basis: str = "X_umap",
    titles: Sequence[str] | None = None,
    ncols: int = 3,
    cmap: str = "viridis",
    size: float | None = None,
    panel_size: tuple[float, float] = (3.6, 3.1),
) -> Figure:
    """Grid of embedding plots, one per SAE feature, coloured by that feature's activation.

    Parameters
    ----------
    coords
        Cells x 2 embedding coordinates, or an AnnData with them in ``obsm[basis]``.
    activations
        Cells x features, dense array or scipy sparse matrix (only the requested columns are densified);
        with an AnnData also the ``obsm`` key holding them (e.g. ``"X_sae"`` from :func:`dgdlens.tl.sae`).
    features
        Column indices of the features to show.
    basis
        With an AnnData, the ``obsm`` key of the coordinates.
    titles
        One title per feature (default ``"feature <index>"``).
    ncols
        Panels per row.
    cmap
        Matplotlib colour map of the activations.
    size
        Marker size (default: from the number of cells).
    panel_size
        Width and height of one panel, in inches.

    Returns
    -------
    matplotlib.figure.Figure
        The grid.
    """
    if is_anndata(coords):
        if isinstance(activations, str):
            activations = obsm_matrix(coords, activations)
        coords = obsm_matrix(coords, basis)
    coords = as_coords(coords)
    n_features_total = activations.shape[1] if hasattr(activations, "shape") and len(activations.shape) == 2 else None
    if n_features_total is None:
        raise ValueError("activations must be a 2-D array or sparse matrix (cells x features).")
    if activations.shape[0] != coords.shape[0]:
        raise ValueError(f"activations has {activations.shape[0]} rows but coords has {coords.shape[0]} cells.")
    features = [int(f) for f in features]
    if not features:
        raise ValueError("features is empty: pass at least one feature index.")
    bad = [f for f in features if not 0 <= f < n_features_total]
    if bad:
        raise ValueError(f"feature indices {bad} out of range for {n_features_total} features.")
    if titles is not None and len(titles) != len(features):
        raise ValueError(f"titles has {len(titles)} entries for {len(features)} features.")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}.")
    values = _activation_columns(activations, features)
    ncols = min(ncols, len(features))
    nrows = -(-len(features) // ncols)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for i, (axis, feat) in enumerate(zip(axes, features)):
        col = values[:, i]
        active = int((col > 0).sum())
        embedding(coords, color=col, categorical=False, ax=axis, cmap=cmap, size=size, vmin=0.0,
                  title=titles[i] if titles is not None else f"feature {feat}",
                  colorbar_label=None)
        axis.text(0.02, 0.02, f"active in {active} cells", transform=axis.transAxes, fontsize="x-small",
                  color="0.3")
        axis.title.set_fontsize("small")
    for axis in axes[len(features):]:
        axis.set_visible(False)
    return fig
