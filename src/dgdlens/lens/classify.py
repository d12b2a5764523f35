"""Local and global SAE features by cell type, as in the SAE paper (Schuster et al.).

A feature is *significant* for a cell type when its mean activation inside the type exceeds the mean
outside by more than ``z`` (1.96) times the sum of the two standard errors
(``mean_in - mean_out > z * (SE_in + SE_out)``, SE = sample SD / sqrt(n), zeros included).
**Local** features are significant for exactly one cell type; **global** are all other active features
(including "regional" ones, significant for several types, and those significant for none);
**dead** features never fire. All features and types are done at once with sparse group sums.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .groups import as_activation_matrix

__all__ = ["classify_features"]


def classify_features(activations, labels, *, z: float = 1.96, return_significance: bool = False):
    """Classify every feature as ``"local"``, ``"global"`` or ``"dead"`` (see the module docstring).

    Parameters
    ----------
    activations
        cells x features (dense or sparse).
    labels
        Cell-type label per cell (array, Series or Categorical); missing labels are not allowed.
    z
        Multiplier of the summed standard errors.
    return_significance
        Also return the (features x cell types) boolean significance table.

    Returns
    -------
    pandas.DataFrame
        DataFrame with one row per feature: ``feature, n_active, n_significant_types, n_types, class,
        cell_type`` (the significant type of a local feature; the type with the largest difference
        ``mean_in - mean_out`` otherwise) and ``difference`` (that difference).
    """
    A = as_activation_matrix(activations).tocsr()
    n, F = A.shape
    labels = pd.Categorical(
        np.asarray(labels, dtype=object) if not isinstance(labels, pd.Categorical) else labels
    )
    if len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries for {n} cells.")
    if np.any(labels.codes < 0):
        raise ValueError("labels contain missing values; fill or drop those cells first.")
    types = labels.categories
    if len(types) < 2:
        raise ValueError(f"Need at least two cell types to compare, got {list(types)}.")
    onehot = sp.csr_matrix((np.ones(n), (labels.codes, np.arange(n))), shape=(len(types), n))
    n_in = np.asarray(onehot.sum(axis=1)).ravel()[:, None]
    s_in = np.asarray((onehot @ A).todense())
    q_in = np.asarray((onehot @ A.multiply(A)).todense())
    s_all, q_all = s_in.sum(axis=0, keepdims=True), q_in.sum(axis=0, keepdims=True)
    n_out = n - n_in
    mean_in, se_in = _mean_se(s_in, q_in, n_in)
    mean_out, se_out = _mean_se(s_all - s_in, q_all - q_in, n_out)
    diff = mean_in - mean_out
    significant = diff > z * (se_in + se_out)  # types x features
    n_active = np.bincount(A.indices[A.data != 0], minlength=F)  # CSR: indices are feature columns
    n_sig = significant.sum(axis=0)
    cls = np.where(n_active == 0, "dead", np.where(n_sig == 1, "local", "global")).astype(object)
    best = np.where(n_sig == 1, np.argmax(significant, axis=0), np.argmax(diff, axis=0))
    out = pd.DataFrame(
        {
            "feature": np.arange(F), "n_active": n_active, "n_significant_types": n_sig,
            "n_types": len(types), "class": cls, "cell_type": np.asarray(types, dtype=object)[best],
            "difference": diff[best, np.arange(F)]}
    )
    out.loc[out["class"] == "dead", "cell_type"] = None
    if return_significance:
        return out, pd.DataFrame(significant.T, columns=list(types))
    return out


def _mean_se(s: np.ndarray, q: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = s / np.maximum(n, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.maximum(q - s * mean, 0.0) / (n - 1.0)
        se = np.where(n > 1, np.sqrt(var / n), np.inf)
    return mean, se
