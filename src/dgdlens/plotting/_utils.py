"""Shared helpers for the plotting functions: axes creation, input checks, colour palettes.

Figures are created with :class:`matplotlib.figure.Figure` directly, never through ``pyplot``: no global
figure registry fills up, nothing depends on the active backend (Agg-safe on headless machines), and
calling a function twice never draws into an old figure by accident.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

__all__ = ["new_axes", "as_vector", "as_coords", "categorical_palette", "as_categories", "MISSING_COLOR"]

MISSING_COLOR = "#d3d3d3"


def new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """Return ``(figure, axes)``: the given axes and its figure, or a new constrained-layout figure."""
    if ax is not None:
        if not isinstance(ax, Axes):
            raise ValueError(f"ax must be a matplotlib Axes, got {type(ax).__name__}.")
        return ax.figure, ax
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def as_vector(values, name: str, *, n: int | None = None) -> np.ndarray:
    """Convert a per-cell 1-D input (list, array, Series, Categorical) to a numpy array of length ``n``."""
    if values is None:
        raise ValueError(f"{name} is required.")
    if isinstance(values, (pd.Series, pd.Index, pd.Categorical)):
        arr = np.asarray(values, dtype=object) if isinstance(values.dtype, pd.CategoricalDtype) else np.asarray(values)
    else:
        arr = np.asarray(values)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one value per cell (1-D), got shape {arr.shape}.")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} values but there are {n} cells; pass one value per cell.")
    return arr


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


def as_categories(values, name: str, *, n: int | None = None) -> tuple[np.ndarray, list, np.ndarray]:
    """Encode categorical values as integer codes.

    Returns ``(codes, categories, missing)``: ``codes[i]`` indexes ``categories`` (-1 where missing),
    categories keep a pandas Categorical's order, otherwise they are sorted (numbers numerically).
    """
    if isinstance(values, pd.Series) and isinstance(values.dtype, pd.CategoricalDtype):
        cat = values.array
    elif isinstance(values, pd.Categorical):
        cat = values
    else:
        arr = as_vector(values, name, n=n)
        try:
            cat = pd.Categorical(arr)
        except TypeError:  # mixed types (e.g. ints and strings) cannot be sorted together
            cat = pd.Categorical(np.where(pd.isna(arr), None, arr.astype(str)))
    if n is not None and len(cat) != n:
        raise ValueError(f"{name} has {len(cat)} values but there are {n} cells; pass one value per cell.")
    # Drop categories no cell carries so that legends and tables only list what is present.
    cat = cat.remove_unused_categories()
    codes = np.asarray(cat.codes, dtype=np.int64)
    return codes, list(cat.categories), codes < 0


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
