"""Shared helpers for the plotting functions: axes creation, input checks, colour palettes.

Figures are created with :class:`matplotlib.figure.Figure` directly, never through ``pyplot``: no global
figure registry fills up, nothing depends on the active backend (Agg-safe on headless machines), and
calling a function twice never draws into an old figure by accident.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from ..evaluate import as_categories, as_vector

__all__ = ["new_axes", "as_vector", "as_coords", "categorical_palette", "as_categories", "obsm_matrix",
           "MISSING_COLOR"]

MISSING_COLOR = "#d3d3d3"


def new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """Return ``(figure, axes)``: the given axes and its figure, or a new constrained-layout figure."""
    if ax is not None:
        if not isinstance(ax, Axes):
            raise ValueError(f"ax must be a matplotlib Axes, got {type(ax).__name__}.")
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def is_anndata(obj) -> bool:
    return type(obj).__name__ == "AnnData" and hasattr(obj, "obsm") and hasattr(obj, "obs")


def obsm_matrix(data, basis: str):
    """``data.obsm[basis]`` for an AnnData (a clear error naming the available keys), else ``data``."""
    if not is_anndata(data):
        return data
    if basis not in data.obsm:
        raise ValueError(f"adata.obsm has no {basis!r}; available: {list(data.obsm.keys())}. "
                         "Compute it first (e.g. dl.tl.umap, dl.tl.sae) or pass basis=.")
    return data.obsm[basis]


def as_coords(coords, name: str = "coords") -> np.ndarray:
    """Validate 2-D embedding coordinates (cells x 2, finite) and return them as float64."""
    arr = np.asarray(coords, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape (n_cells, 2), got {arr.shape}.")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty: there are no cells to plot.")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise ValueError(f"{name} contains NaN or infinite values in {bad} cells; remove or recompute them.")
    return arr


def categorical_palette(n: int) -> list[str]:
    """``n`` distinct colours: tab10 up to 10, tab20 up to 20, tab20+tab20b+tab20c up to 60, then turbo."""
    if n <= 10:
        cols = colormaps["tab10"].colors[:n]
    elif n <= 20:
        cols = colormaps["tab20"].colors[:n]
    elif n <= 60:
        cols = (colormaps["tab20"].colors + colormaps["tab20b"].colors + colormaps["tab20c"].colors)[:n]
    else:
        cols = colormaps["turbo"](np.linspace(0.02, 0.98, n))
    return [to_hex(c) for c in cols]


def default_point_size(n_cells: int) -> float:
    """Marker area that keeps a few hundred to a few hundred thousand cells readable (scanpy-like)."""
    return float(np.clip(30000.0 / max(n_cells, 1), 0.3, 40.0))


def short_list(items: Sequence, limit: int) -> str:
    """``"a, b, c (+4 more)"``: a readable, bounded rendering of a long list."""
    items = [str(i) for i in items]
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f" (+{len(items) - limit} more)"
