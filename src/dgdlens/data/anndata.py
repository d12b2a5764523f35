"""AnnData handling: pick the count matrix, check labels, align genes of new data to a model."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .matrix import RowMatrix

__all__ = ["get_matrix", "check_labels_key", "align_genes", "GeneMismatchError"]


class GeneMismatchError(ValueError):
    """New data lack genes that the model was trained on."""


def _is_anndata(obj) -> bool:
    return type(obj).__name__ == "AnnData" and hasattr(obj, "obs") and hasattr(obj, "var")


def _layer_names(adata) -> list[str]:
    """The layers' names (anndata 0.13 also lists ``None``, its name for ``X``)."""
    return [k for k in adata.layers.keys() if k is not None]


def get_matrix(adata, layer: str | None = None) -> RowMatrix:
    """The matrix to model: ``adata.layers[layer]``, ``adata.raw.X`` for ``layer="raw"``, else ``adata.X``
    (``layer=None`` or ``"X"``; ``"X"`` lets a caller ask for ``X`` explicitly where ``None`` means a default).

    Parameters
    ----------
    adata
        An :class:`anndata.AnnData` (in memory or backed), ``cells x genes``.
    layer
        ``None`` or ``"X"``: ``adata.X`` (``"X"`` reads ``adata.layers["X"]`` if such a layer exists);
        ``"raw"``: ``adata.raw.X``; any other name: ``adata.layers[layer]``.

    Returns
    -------
    RowMatrix
        A row-access wrapper around the chosen matrix (dense, sparse or backed; not copied), ``cells x genes``.

    Raises
    ------
    TypeError
        If ``adata`` is not an AnnData.
    ValueError
        If ``layer="raw"`` and ``adata.raw`` is ``None``, or the layer does not exist.
    """
    if not _is_anndata(adata):
        raise TypeError(f"Expected an AnnData object, got {type(adata).__name__}. Wrap arrays with anndata.AnnData(X).")
    if layer is None or (layer == "X" and "X" not in adata.layers):
        X = adata.X
    elif layer == "raw":
        if adata.raw is None:
            raise ValueError("layer='raw' was requested but adata.raw is None; pass layer=None or a layer name.")
        X = adata.raw.X
    else:
        if layer not in adata.layers:
            raise ValueError(
                f"Layer {layer!r} not found in adata.layers (available: {_layer_names(adata) or 'none'}); "
                "pass layer=None to use adata.X."
            )
        X = adata.layers[layer]
    return RowMatrix(X)


def var_names_for(adata, layer: str | None) -> pd.Index:
    if layer == "raw":
        return pd.Index(adata.raw.var_names)
    return pd.Index(adata.var_names)


#: A label column with more categories than this (or than half the cells) looks like an id, not a cell type.
MAX_LABEL_CATEGORIES = 100


def check_labels_key(adata, labels_key: str | None) -> pd.Categorical | None:
    """The label column as a categorical, or None; a clear error when the column does not exist.

    Labels set the number of mixture components (one per category), so a column that looks
    continuous (non-integer numbers) or has very many categories (an id column) gets a warning.

    Parameters
    ----------
    adata
        An :class:`anndata.AnnData`.
    labels_key
        A column of ``adata.obs`` (e.g. cell types), or ``None``.

    Returns
    -------
    pandas.Categorical or None
        One label per cell (missing values stay missing, code ``-1``), or ``None`` when ``labels_key`` is
        ``None``.

    Raises
    ------
    ValueError
        If ``labels_key`` is not a column of ``adata.obs``.

    Warns
    -----
    UserWarning
        When the column holds non-integer numbers, or has more than :data:`MAX_LABEL_CATEGORIES`
        categories or (with at least 20 cells) more categories than half the cells.
    """
    if labels_key is None:
        return None
    if labels_key not in adata.obs.columns:
        raise ValueError(
            f"labels_key {labels_key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)}). "
            "Pass an existing column name or labels_key=None."
        )
    column = adata.obs[labels_key]
    labels = pd.Categorical(column.astype("object").where(column.notna(), None))
    n_cats, n_obs = len(labels.categories), len(column)
    if pd.api.types.is_float_dtype(column.dtype):
        values = column.dropna().to_numpy()
        if values.size and not np.all(values == np.round(values)):
            warnings.warn(
                f"labels_key {labels_key!r} holds continuous numbers (e.g. {values[values != np.round(values)][0]:g}), "
                f"not categories, which gives {n_cats} mixture components; pass a categorical column such as "
                "cell type, or labels_key=None with n_components.",
                UserWarning, stacklevel=3,
            )
            return labels
    if n_cats > MAX_LABEL_CATEGORIES or (n_obs >= 20 and n_cats > n_obs / 2):
        warnings.warn(
            f"labels_key {labels_key!r} has {n_cats} categories for {n_obs} cells (it looks like an id, not a "
            f"cell type), which gives {n_cats} mixture components; pass a column with fewer categories, "
            "or labels_key=None with n_components.",
            UserWarning, stacklevel=3,
        )
    return labels


def align_genes(new_var_names, model_var_names) -> np.ndarray:
    """Column indices into the new data that give the model's genes in the model's order.

    Missing genes raise :class:`GeneMismatchError`; extra genes are dropped with a warning.

    Parameters
    ----------
    new_var_names
        Gene names of the new data (its columns, e.g. ``adata.var_names``), unique.
    model_var_names
        Gene names the model was trained on, in the model's order.

    Returns
    -------
    numpy.ndarray
        ``(n_model_genes,)`` integer column indices into the new data: ``new[:, idx]`` has the model's
        genes in the model's order.

    Raises
    ------
    ValueError
        If the new gene names have duplicates.
    GeneMismatchError
        If any of the model's genes is missing from the new data.
    """
    new = pd.Index(new_var_names)
    model = pd.Index(model_var_names)
    if new.has_duplicates:
        dup = new[new.duplicated()].unique()[:5].tolist()
        raise ValueError(f"The new data have duplicated gene names (e.g. {dup}); call adata.var_names_make_unique().")
    missing = model.difference(new, sort=False)
    if len(missing):
        overlap = len(model) - len(missing)
        raise GeneMismatchError(
            f"{len(missing)} of the model's {len(model)} genes are missing from the new data "
            f"(e.g. {missing[:5].tolist()}); only {overlap} match. Make sure both use the same gene identifiers "
            "(symbols vs Ensembl IDs) and, if genes were filtered, add the missing ones as zero columns."
        )
    if len(new) > len(model):
        warnings.warn(
            f"The new data have {len(new) - len(model)} genes the model does not know; they are ignored.",
            stacklevel=3,
        )
    return new.get_indexer(model)
