"""Summaries of results as numbers and tables: clusters against labels, training histories, steering
fold changes.

Plain-data functions (numpy, pandas) with no plotting: :mod:`dgdlens.plotting` draws them,
:mod:`dgdlens.report` and the demo quote them.

- :func:`contingency_table`, :func:`cluster_agreement`: mixture components (or any clustering)
  against given labels (counts, ARI / NMI).
- :func:`history_metrics`, :func:`find_best_epoch`: the metrics and best epoch of a training history
  (a DataFrame such as ``model.history_``, a dict of columns, or a list of per-epoch dicts).
- :func:`as_lfc_series`, :func:`top_changed_genes`: per-gene log fold changes of a steering result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "contingency_table", "cluster_agreement",
    "history_metrics", "find_best_epoch",
    "as_lfc_series", "top_changed_genes",
]


# ------------------------------------------------------------------------------------- input checks

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


# ----------------------------------------------------------------------------------------- clusters

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


# ----------------------------------------------------------------------------------------- training

_SPLIT_PREFIXES = {"train": "train_", "val": "val_"}


def as_history(history) -> pd.DataFrame:
    """A training history as a DataFrame (one row per epoch).

    Accepts a DataFrame (``model.history_``), a dict of columns, or a list of per-epoch dicts.
    """
    if isinstance(history, pd.DataFrame):
        df = history
    elif isinstance(history, Mapping):
        df = pd.DataFrame(dict(history))
    elif isinstance(history, Sequence) and not isinstance(history, str) and all(
            isinstance(row, Mapping) for row in history):
        df = pd.DataFrame.from_records(list(history))
    else:
        raise ValueError(
            "history must be a pandas DataFrame, a dict of columns or a list of per-epoch dicts, "
            f"got {type(history).__name__}."
        )
    if len(df) == 0:
        raise ValueError("history is empty: there are no epochs to plot.")
    return df


def history_metrics(history) -> dict[str, dict[str, str]]:
    """Group history columns by metric: ``{"loss": {"train": "train_loss", "val": "val_loss"}, ...}``.

    Columns named ``train_<m>`` / ``val_<m>`` are paired by ``<m>``; a bare ``loss`` column counts as
    the training loss. ``"loss"`` comes first, other metrics follow in column order.
    """
    df = as_history(history)
    metrics: dict[str, dict[str, str]] = {}
    for col in df.columns:
        name = str(col)
        for split, prefix in _SPLIT_PREFIXES.items():
            if name.startswith(prefix) and len(name) > len(prefix):
                metrics.setdefault(name[len(prefix):], {})[split] = col
    if "loss" in df.columns and "train" not in metrics.get("loss", {}):
        metrics.setdefault("loss", {})["train"] = "loss"
    if not metrics:
        raise ValueError(
            "history has no loss columns: expected columns such as 'train_loss' and 'val_loss' "
            f"(got {list(map(str, df.columns))})."
        )
    for cols in metrics.values():
        for col in cols.values():
            if not pd.api.types.is_numeric_dtype(df[col]):
                raise ValueError(f"history column {col!r} must be numeric, got dtype {df[col].dtype}.")
    ordered = sorted(metrics, key=lambda m: (m != "loss", list(metrics).index(m)))
    return {m: metrics[m] for m in ordered}


def history_epochs(df: pd.DataFrame) -> np.ndarray:
    """The ``epoch`` column of a history, or 1..n when it has none."""
    if "epoch" in df.columns:
        epochs = df["epoch"].to_numpy()
        if not pd.api.types.is_numeric_dtype(df["epoch"]) or pd.isna(epochs).any():
            raise ValueError("history['epoch'] must hold numbers without missing values.")
        return epochs
    return np.arange(1, len(df) + 1)


def find_best_epoch(history, *, column: str = "val_loss"):
    """Epoch with the lowest value of ``column`` (ignoring NaN); ``None`` if the column is absent or all NaN."""
    df = as_history(history)
    if column not in df.columns:
        return None
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(values).any():
        return None
    idx = int(np.nanargmin(np.where(np.isfinite(values), values, np.nan)))
    epoch = history_epochs(df)[idx]
    return epoch.item() if hasattr(epoch, "item") else epoch


# ----------------------------------------------------------------------------------------- steering

_LFC_COLUMNS = ("lfc", "log2fc", "log2_fold_change", "logfoldchange", "lfc_mean")


def as_lfc_series(lfc) -> pd.Series:
    """Per-gene log fold changes as a float Series indexed by gene name, non-finite entries dropped.

    Accepts a Series indexed by gene, a dict ``{gene: lfc}``, or a DataFrame with one of the columns
    ``lfc, log2fc, log2_fold_change, logfoldchange, lfc_mean`` (genes in the index or a ``gene`` column),
    e.g. the ``genes`` table of a :class:`dgdlens.steer.SteerResult`.
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
