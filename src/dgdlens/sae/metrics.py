"""SAE quality metrics, and recovery metrics against known ground truth.

Quality (:func:`metrics`): FVU, explained variance, MSE, cosine, L0, dead and dense fractions,
streamed over batches.

Recovery (run these on *held-out* cells, not the SAE's training cells):

- :func:`correlation_matrix`: Pearson r between every feature and every variable as one standardised
  matrix product (sparse activations are never centred or densified; chunked over features).
- :func:`recovery`: per variable the best |r| over live features, the fraction recovered at
  ``|r| >= threshold``, and a one-to-one Hungarian matching so one feature is not credited twice.
- :func:`categorical_auroc`: one-vs-rest AUROC of every feature for every class (rank-based, vectorised).
- :func:`structure_identification`: feature-to-gene links vs a true program-to-gene matrix.
- :func:`recovery_report`: all of the above for an SAE and a dict of ground-truth variables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from scipy import stats
from scipy.optimize import linear_sum_assignment

from ..stats import bh_adjust
from .io import as_rows

__all__ = [
    "metrics", "correlation_matrix", "recovery", "RecoveryResult", "match_features", "categorical_auroc",
    "structure_identification", "recovery_report", "live_features",
]


# ---------------------------------------------------------------------- quality
@torch.no_grad()
def metrics(sae, X, *, use_rep: str | None = None, batch_size: int = 4096, dense_threshold: float | None = None
            ) -> dict:
    """Reconstruction and sparsity metrics of ``sae`` on ``X`` (all cells, streamed in batches).

    Returns a dict with

    - ``fvu``: fraction of variance unexplained, ``sum ||x - x̂||^2 / sum ||x - mean(x)||^2``;
      ``explained_variance = 1 - fvu``;
    - ``mse``: mean squared error per entry (cells x dimensions), in input units;
    - ``cosine``: mean over cells of the cosine between ``x`` and ``x̂``;
    - ``l0``: mean number of active latents per cell;
    - ``dead_fraction``: latents never active on ``X``; ``dense_fraction``: latents active on more than
      ``dense_threshold`` (default: the SAE's, 0.1) of the cells; ``n_live``, ``n_cells``.

    Parameters
    ----------
    sae
        A trained :class:`~dgdlens.sae.SAE`.
    X
        Inputs, cells x ``d_in`` (numpy array, torch tensor, scipy sparse matrix, DataFrame, or AnnData with
        ``use_rep``); use held-out cells for an honest FVU.
    use_rep
        For an AnnData: the ``obsm`` key of the embedding, or ``"X"``.
    batch_size
        Cells per batch (computed on the SAE's device).
    dense_threshold
        Firing rate above which a latent counts as dense; ``None`` uses ``sae.config.dense_threshold``.

    Returns
    -------
    dict
        The entries above: floats, and ints for ``n_live`` and ``n_cells``. ``fvu`` is NaN when ``X`` has
        no variance.
    """
    rows = as_rows(X, use_rep)
    rows.check_dim(sae.d_in)
    if dense_threshold is None:
        dense_threshold = sae.config.dense_threshold
    device = sae.device
    n, d = rows.n_obs, rows.n_vars
    sum_x = torch.zeros(d, dtype=torch.float64, device=device)
    sum_sq_x = 0.0
    sq_err = 0.0
    cos_sum = 0.0
    active = 0.0
    fires = torch.zeros(sae.n_latents, dtype=torch.float64, device=device)
    for _, _, x in rows.iter_slices(batch_size, device):
        x_hat, f = sae(x)
        xd, x_hatd = x.double(), x_hat.double()
        sum_x += xd.sum(0)
        sum_sq_x += float(xd.pow(2).sum())
        sq_err += float((xd - x_hatd).pow(2).sum())
        cos_sum += float(torch.nn.functional.cosine_similarity(xd, x_hatd, dim=1, eps=1e-12).sum())
        on = f > 0
        active += float(on.sum())
        fires += on.sum(0).double()
    total_var = sum_sq_x - float(sum_x.pow(2).sum()) / n  # sum ||x - mean||^2
    fvu = sq_err / total_var if total_var > 0 else float("nan")
    rate = fires / n
    return {
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "mse": sq_err / (n * d),
        "cosine": cos_sum / n,
        "l0": active / n,
        "dead_fraction": float((fires == 0).double().mean()),
        "dense_fraction": float((rate > dense_threshold).double().mean()),
        "n_live": int((fires > 0).sum()),
        "n_cells": n,
    }


# ---------------------------------------------------------------------- helpers
def _as_feature_matrix(activations, what: str = "activations"):
    """CSC sparse or float64 dense numpy, 2-D, finite."""
    if isinstance(activations, torch.Tensor):
        activations = activations.detach().cpu().numpy()
    if sp.issparse(activations):
        A = sp.csc_matrix(activations, dtype=np.float64)
        values = A.data
    else:
        A = np.asarray(activations, dtype=np.float64)
        values = A
        if A.ndim != 2:
            raise ValueError(f"{what} must be 2-D (cells x features), got shape {A.shape}.")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{what} contains NaN or infinite values.")
    return A


def _as_variables(variables, n_cells: int, what: str = "variables") -> np.ndarray:
    if isinstance(variables, pd.Series):
        variables = variables.to_frame()
    if isinstance(variables, pd.DataFrame):
        variables = variables.to_numpy()
    if isinstance(variables, torch.Tensor):
        variables = variables.detach().cpu().numpy()
    if sp.issparse(variables):
        variables = variables.toarray()
    V = np.asarray(variables, dtype=np.float64)
    if V.ndim == 1:
        V = V[:, None]
    if V.ndim != 2:
        raise ValueError(f"{what} must be 1-D or 2-D (cells x variables), got shape {V.shape}.")
    if V.shape[0] != n_cells:
        raise ValueError(
            f"{what} has {V.shape[0]} rows but the activations have {n_cells} cells; pass the ground truth of the "
            "same (held-out) cells, in the same order."
        )
    if not np.all(np.isfinite(V)):
        raise ValueError(f"{what} contains NaN or infinite values.")
    return V


def _column_moments(A) -> tuple[np.ndarray, np.ndarray]:
    """Column means and (population) standard deviations of dense or sparse ``A``."""
    n = A.shape[0]
    if sp.issparse(A):
        mean = np.asarray(A.sum(axis=0)).ravel() / n
        mean_sq = np.asarray(A.multiply(A).sum(axis=0)).ravel() / n
        var = np.maximum(mean_sq - mean**2, 0.0)
    else:
        mean = A.mean(0)
        var = A.var(0)
    return mean, np.sqrt(var)


def live_features(activations, *, min_std: float = 0.0) -> np.ndarray:
    """Indices of features that vary across the cells (a dead or constant feature has no correlation).

    Parameters
    ----------
    activations
        Cells x features (scipy sparse, numpy array or torch tensor), e.g. ``sae.encode(X)``.
    min_std
        Minimum population standard deviation over cells for a feature to count as live (a relative floor
        of ``1e-12`` times the largest activation always applies).

    Returns
    -------
    numpy.ndarray
        int64 column indices of the live features, ascending.
    """
    A = _as_feature_matrix(activations)
    _, std = _column_moments(A)
    scale = max(float(np.abs(A.data if sp.issparse(A) else A).max(initial=0.0)), 1.0)
    return np.flatnonzero(std > max(min_std, 1e-12 * scale))


# ---------------------------------------------------------------------- correlations
def correlation_matrix(activations, variables, *, chunk_size: int = 4096) -> np.ndarray:
    """Pearson r between every feature (column of ``activations``) and every variable.

    Computed as one standardised product ``A^T (V - mean V) / (n sd_A sd_V)``: centring the variables is
    enough, so sparse activations are used as they are, in chunks of ``chunk_size`` features. Constant
    features or variables get r = 0. Returns ``(n_features, n_variables)`` float64.

    Parameters
    ----------
    activations
        Cells x features (scipy sparse, numpy array or torch tensor); finite.
    variables
        Cells x variables (array, DataFrame, Series or 1-D array for one variable), same cells in the same
        order.
    chunk_size
        Features per chunk.

    Returns
    -------
    numpy.ndarray
        float64 ``(n_features, n_variables)`` Pearson correlations, clipped to [-1, 1].
    """
    A = _as_feature_matrix(activations)
    n = A.shape[0]
    V = _as_variables(variables, n)
    if n < 2:
        raise ValueError("Correlations need at least 2 cells.")
    v_mean, v_std = _column_moments(V)
    Vs = (V - v_mean) / np.where(v_std > 0, v_std, 1.0)
    _, a_std = _column_moments(A)
    out = np.zeros((A.shape[1], V.shape[1]))
    for start in range(0, A.shape[1], chunk_size):
        block = A[:, start:start + chunk_size]
        cov = np.asarray(block.T @ Vs) / n  # (features, variables); no centring of the sparse block needed
        sd = a_std[start:start + chunk_size]
        out[start:start + chunk_size] = np.divide(cov, sd[:, None], out=np.zeros_like(cov), where=sd[:, None] > 0)
    out[:, v_std == 0] = 0.0
    return np.clip(out, -1.0, 1.0)


def match_features(abs_corr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one assignment of features to variables maximising the summed score (Hungarian).

    ``abs_corr`` is ``(n_features, n_variables)``. Only each variable's ``n_variables`` best features can
    be in an optimal assignment (any other choice can be swapped for a free one at least as good), so the
    problem is reduced to at most ``n_variables^2`` candidate features before solving.
    Returns ``(feature_index, score)`` per variable; ``-1`` / 0 where there are fewer features than variables.

    Parameters
    ----------
    abs_corr
        ``(n_features, n_variables)`` scores to maximise, usually ``|r|`` from :func:`correlation_matrix`.

    Returns
    -------
    tuple of numpy.ndarray
        ``(feature, score)``, each ``(n_variables,)``: the row index of the feature matched to each variable
        (int64, -1 if none) and its score (float64, 0 if none).
    """
    S = np.asarray(abs_corr, dtype=np.float64)
    n_feat, n_var = S.shape
    feature = np.full(n_var, -1, dtype=np.int64)
    score = np.zeros(n_var)
    if n_feat == 0 or n_var == 0:
        return feature, score
    top = min(n_var, n_feat)
    if n_feat > top:
        cand = np.argpartition(-S, top - 1, axis=0)[:top]
        candidates = np.unique(cand.ravel())
    else:
        candidates = np.arange(n_feat)
    rows, cols = linear_sum_assignment(S[candidates], maximize=True)
    feature[cols] = candidates[rows]
    score[cols] = S[candidates[rows], cols]
    return feature, score


@dataclass
class RecoveryResult:
    """Per-variable recovery table and summary numbers (see :func:`recovery`).

    Attributes
    ----------
    per_variable
        One row per variable: ``variable``, ``best_feature``, ``best_r``, ``best_abs_r``,
        ``matched_feature``, ``matched_abs_r`` (feature indices are columns of the activations, -1 if none).
    summary
        ``n_variables``, ``n_live_features``, ``threshold``, ``fraction_recovered``,
        ``fraction_recovered_matched``, ``mean_best_abs_r``, ``median_best_abs_r``, ``mean_matched_abs_r``.
    correlations
        ``(n_live_features, n_variables)`` Pearson r of the live features (rows in ``live`` order) when
        ``keep_matrix=True``, else ``None``.
    live
        Column indices of the live features.
    """

    per_variable: pd.DataFrame
    summary: dict = field(default_factory=dict)
    correlations: np.ndarray | None = None  # (live features, variables) when keep_matrix=True
    live: np.ndarray | None = None  # column indices of the live features


def recovery(activations, variables, *, threshold: float = 0.9, names=None, keep_matrix: bool = False,
             chunk_size: int = 4096) -> RecoveryResult:
    """How well SAE features recover continuous ground-truth variables (use held-out cells).

    For every variable: the signed Pearson r with the largest ``|r|`` over live features and that feature
    (``best_r``, ``best_feature``), and the feature and ``|r|`` it gets in a one-to-one Hungarian matching
    (``matched_feature``, ``matched_abs_r``). Summary: ``fraction_recovered`` (best ``|r|`` >= threshold),
    ``fraction_recovered_matched``, mean and median best ``|r|``, ``n_live_features``.

    Parameters
    ----------
    activations
        Cells x features (scipy sparse, numpy array or torch tensor), e.g. ``sae.encode(X_heldout)``.
    variables
        Cells x variables ground truth (array, DataFrame, Series, or 1-D for one variable), same cells.
    threshold
        ``|r|`` at or above which a variable counts as recovered.
    names
        Variable names; ``None`` takes a DataFrame's columns, else ``"0", "1", ...``.
    keep_matrix
        Keep the live features x variables correlation matrix in the result.
    chunk_size
        Features per chunk of the correlation computation.

    Returns
    -------
    RecoveryResult
        The per-variable table, the summary, and optionally the correlation matrix.
    """
    A = _as_feature_matrix(activations)
    V = _as_variables(variables, A.shape[0])
    if names is None:
        names = getattr(variables, "columns", None)
    names = [str(i) for i in range(V.shape[1])] if names is None else [str(x) for x in names]
    if len(names) != V.shape[1]:
        raise ValueError(f"names has {len(names)} entries for {V.shape[1]} variables.")
    live = live_features(A)
    R = correlation_matrix(A[:, live], V, chunk_size=chunk_size) if len(live) else np.zeros((0, V.shape[1]))
    absR = np.abs(R)
    if len(live):
        best = absR.argmax(0)
        best_r = R[best, np.arange(V.shape[1])]
        best_feature = live[best]
    else:
        best_r = np.zeros(V.shape[1])
        best_feature = np.full(V.shape[1], -1)
    matched, matched_score = match_features(absR)
    matched_feature = np.where(matched >= 0, live[np.maximum(matched, 0)] if len(live) else -1, -1)
    table = pd.DataFrame({
        "variable": names, "best_feature": best_feature, "best_r": best_r, "best_abs_r": np.abs(best_r),
        "matched_feature": matched_feature, "matched_abs_r": matched_score,
    })
    summary = {
        "n_variables": V.shape[1],
        "n_live_features": int(len(live)),
        "threshold": threshold,
        "fraction_recovered": float((table["best_abs_r"] >= threshold).mean()),
        "fraction_recovered_matched": float((table["matched_abs_r"] >= threshold).mean()),
        "mean_best_abs_r": float(table["best_abs_r"].mean()),
        "median_best_abs_r": float(table["best_abs_r"].median()),
        "mean_matched_abs_r": float(table["matched_abs_r"].mean()),
    }
    return RecoveryResult(table, summary, R if keep_matrix else None, live)


# ---------------------------------------------------------------------- categorical variables
def categorical_auroc(activations, labels, *, chunk_size: int = 512, return_matrix: bool = False):
    """One-vs-rest AUROC of every feature for every class of ``labels`` (rank-based, vectorised).

    For a chunk of features the ranks over cells (ties averaged) are computed once and the rank sums of
    all classes come from one product with the class indicator matrix:
    ``AUROC = (R_class - n_c (n_c + 1) / 2) / (n_c (n - n_c))`` (the Mann-Whitney U statistic).

    Returns a DataFrame with one row per class: ``best_feature``, ``best_auroc`` (the feature that fires
    most specifically *for* the class), ``n_cells``; with ``return_matrix=True`` also the
    ``(features, classes)`` AUROC matrix.

    Parameters
    ----------
    activations
        Cells x features (scipy sparse, numpy array or torch tensor).
    labels
        One class label per cell (array, Series, list or tensor), no missing values, at least two classes.
    chunk_size
        Features ranked at a time (each chunk is densified: cells x ``chunk_size``).
    return_matrix
        Also return the full AUROC matrix.

    Returns
    -------
    pandas.DataFrame or tuple of (pandas.DataFrame, numpy.ndarray)
        Columns ``class`` (sorted), ``n_cells``, ``best_feature``, ``best_auroc``; with
        ``return_matrix=True`` also the float64 ``(n_features, n_classes)`` AUROC matrix.
    """
    A = _as_feature_matrix(activations)
    n = A.shape[0]
    labels = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).ravel()
    if labels.shape[0] != n:
        raise ValueError(f"labels has {labels.shape[0]} entries but the activations have {n} cells.")
    if pd.isna(labels).any():
        raise ValueError("labels contain missing values; drop those cells or give them their own class.")
    classes, codes = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"labels have a single class {classes.tolist()}; AUROC needs at least two.")
    onehot = sp.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(len(classes), n))
    n_pos = np.bincount(codes, minlength=len(classes)).astype(np.float64)
    n_neg = n - n_pos
    auroc = np.empty((A.shape[1], len(classes)))
    for start in range(0, A.shape[1], chunk_size):
        block = A[:, start:start + chunk_size]
        block = block.toarray() if sp.issparse(block) else block
        ranks = stats.rankdata(block, axis=0)  # average ranks for ties (e.g. all the zeros)
        rank_sums = np.asarray(onehot @ ranks).T  # (features, classes)
        auroc[start:start + chunk_size] = (rank_sums - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    best = auroc.argmax(0) if A.shape[1] else np.zeros(len(classes), dtype=int)
    table = pd.DataFrame({
        "class": classes, "n_cells": n_pos.astype(int),
        "best_feature": best if A.shape[1] else -1,
        "best_auroc": auroc[best, np.arange(len(classes))] if A.shape[1] else np.nan,
    })
    return (table, auroc) if return_matrix else table


# ---------------------------------------------------------------------- structure identification
def structure_identification(activations, expression, programs, *, percentile: float = 90.0, alpha: float = 0.05,
                             scope: str = "global", score: str = "pearson", min_score: float = 0.1,
                             chunk_size: int = 1024, max_sample: int = 20_000_000,
                             seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Do SAE features link to the genes of the true programs? (the reference's structure test, corrected)

    1. Link score of feature j and gene g over cells: Pearson r (``score="pearson"``, default) or the
       reference's uncentred cosine similarity (``score="cosine"``). Cosine between non-negative vectors
       mostly measures how constant a gene is, so even random features "link" to the always-on genes and
       look significant for the programs those genes belong to; centring removes that.
       A link also needs a score of at least ``min_score`` (0 to switch this off, as in the reference): a
       percentile alone always links some genes, and as all genes of a program move together, a feature
       correlating with one program at noise level (r ~ 0.03) would link to that program's genes and pass
       the hypergeometric test, which assumes independent genes.
    2. Links: scores above the ``percentile``-th percentile, taken over all live features x genes
       (``scope="global"``, the reference) or per feature (``scope="feature"``). The global percentile is
       exact up to ``max_sample`` scores and estimated from a seeded random subset of features beyond.
    3. Each feature's linked genes are tested against every program's genes (a row of ``programs``) with a
       one-sided hypergeometric test (the reference used a two-sided binomial); a feature is assigned to
       its most significant program when the Bonferroni-over-programs p-value survives a Benjamini-Hochberg
       correction across features at ``alpha``.
    4. Per program: ``coverage`` = the largest fraction of its genes linked by one assigned feature, with
       that feature's ``precision`` (share of its links inside the program).

    Parameters
    ----------
    activations
        Cells x features (sparse or dense), e.g. ``sae.encode(X_heldout)``.
    expression
        Cells x genes (dense or sparse), the same cells.
    programs
        Programs x genes binary matrix (the simulation's ``W``).
    percentile
        Link cut-off percentile of the scores, in (0, 100).
    alpha
        Benjamini-Hochberg false discovery rate across features.
    scope
        ``"global"`` (one cut-off over all live features x genes) or ``"feature"`` (one per feature).
    score
        ``"pearson"`` or ``"cosine"`` (uncentred, the reference's).
    min_score
        Smallest score a link may have (0 switches the floor off).
    chunk_size
        Features scored at a time.
    max_sample
        Largest number of scores used for the exact global percentile; beyond it a subset of features.
    seed
        Seed of that subset.

    Returns
    -------
    (per_program DataFrame, summary dict) with ``n_programs_identified``, ``fraction_identified``,
    ``mean_coverage`` (0 for unidentified programs), ``threshold`` (the link-score cut-off).
    """
    if scope not in ("global", "feature"):
        raise ValueError(f"scope must be 'global' or 'feature', got {scope!r}.")
    if score not in ("pearson", "cosine"):
        raise ValueError(f"score must be 'pearson' or 'cosine', got {score!r}.")
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must lie in (0, 100), got {percentile!r}.")
    A = _as_feature_matrix(activations)
    n = A.shape[0]
    Y = expression.detach().cpu().numpy() if isinstance(expression, torch.Tensor) else expression
    if sp.issparse(Y):
        Y = sp.csr_matrix(Y, dtype=np.float64)
    else:
        Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim != 2 or Y.shape[0] != n:
        raise ValueError(f"expression must be cells x genes with {n} rows, got shape {Y.shape}.")
    W = programs.detach().cpu().numpy() if isinstance(programs, torch.Tensor) else programs
    W = (W.toarray() if sp.issparse(W) else np.asarray(W)) != 0
    if W.ndim != 2 or W.shape[1] != Y.shape[1]:
        raise ValueError(f"programs must be programs x genes with {Y.shape[1]} genes, got shape {W.shape}.")
    n_genes = Y.shape[1]
    live = live_features(A)
    A = A[:, live]
    a_mean, a_sd = _column_moments(A)
    y_mean, y_sd = _column_moments(Y)
    if score == "cosine":  # uncentred: norms instead of standard deviations, no mean product
        a_mean, y_mean = np.zeros_like(a_mean), np.zeros_like(y_mean)
        a_sd = np.sqrt(np.asarray(A.multiply(A).sum(0)).ravel() if sp.issparse(A) else (A**2).sum(0)) / np.sqrt(n)
        y_sd = np.sqrt(np.asarray(Y.multiply(Y).sum(0)).ravel() if sp.issparse(Y) else (Y**2).sum(0)) / np.sqrt(n)
    y_sd = np.where(y_sd > 0, y_sd, np.inf)  # a constant gene links to nothing

    def scores(start: int, stop: int) -> np.ndarray:
        dot = A[:, start:stop].T @ Y  # (features, genes); sparse x dense gives dense, nothing is centred
        dot = dot.toarray() if sp.issparse(dot) else np.asarray(dot)
        cov = dot / n - a_mean[start:stop, None] * y_mean[None, :]
        return cov / a_sd[start:stop, None] / y_sd[None, :]

    threshold = None
    if scope == "global" and len(live):
        threshold = _global_percentile(scores, len(live), n_genes, percentile, chunk_size, max_sample, seed)
    program_size = W.sum(1).astype(np.int64)
    best_program = np.full(len(live), -1)
    best_p = np.ones(len(live))
    best_overlap = np.zeros(len(live), dtype=np.int64)
    n_links = np.zeros(len(live), dtype=np.int64)
    Wf = W.T.astype(np.float64)
    for start in range(0, len(live), chunk_size):
        stop = min(start + chunk_size, len(live))
        S = scores(start, stop)
        cut = threshold if scope == "global" else np.percentile(S, percentile, axis=1, keepdims=True)
        links = (S > cut) & (S >= min_score)
        overlap = (links.astype(np.float64) @ Wf).astype(np.int64)  # (features, programs)
        m = links.sum(1)
        # log scale: strong links underflow p to 0 and would tie
        log_p = stats.hypergeom.logsf(overlap - 1, n_genes, program_size[None, :], m[:, None])
        j = np.argmin(log_p, axis=1)
        rows = np.arange(stop - start)
        best_program[start:stop] = j
        best_p[start:stop] = np.exp(log_p[rows, j])
        best_overlap[start:stop] = overlap[rows, j]
        n_links[start:stop] = m
    p_bonf = np.minimum(best_p * W.shape[0], 1.0)
    significant = bh_adjust(p_bonf) <= alpha if len(live) else np.zeros(0, bool)
    coverage = np.zeros(W.shape[0])
    precision = np.zeros(W.shape[0])
    feature = np.full(W.shape[0], -1)
    for f_idx in np.flatnonzero(significant):  # only significant features; few, and each writes one program
        prog = best_program[f_idx]
        cov = best_overlap[f_idx] / max(program_size[prog], 1)
        if cov > coverage[prog]:
            coverage[prog] = cov
            precision[prog] = best_overlap[f_idx] / max(n_links[f_idx], 1)
            feature[prog] = live[f_idx]
    table = pd.DataFrame({
        "program": np.arange(W.shape[0]), "n_genes": program_size, "identified": feature >= 0,
        "feature": feature, "coverage": coverage, "precision": precision,
    })
    summary = {
        "n_programs": W.shape[0],
        "n_programs_identified": int((feature >= 0).sum()),
        "fraction_identified": float((feature >= 0).mean()),
        "mean_coverage": float(coverage.mean()),
        "n_significant_features": int(significant.sum()),
        "n_live_features": int(len(live)),
        "percentile": percentile,
        "scope": scope,
        "score": score,
        "min_score": min_score,
        "threshold": None if threshold is None else float(threshold),
    }
    return table, summary


def _global_percentile(scores, n_features, n_genes, percentile, chunk_size, max_sample, seed) -> float:
    """The percentile of all feature x gene scores; exact up to ``max_sample`` entries, else from a random
    subset of whole feature rows (seeded)."""
    per_row = max(n_genes, 1)
    if n_features * per_row <= max_sample:
        chosen = np.arange(n_features)
    else:
        n_rows = max(1, max_sample // per_row)
        chosen = np.sort(np.random.default_rng(seed).choice(n_features, n_rows, replace=False))
    pieces = []
    for start in range(0, len(chosen), chunk_size):
        rows = chosen[start:start + chunk_size]
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        block = scores(lo, hi)
        pieces.append(block[rows - lo].ravel())
    return float(np.percentile(np.concatenate(pieces), percentile))


# ---------------------------------------------------------------------- everything at once
def recovery_report(sae_or_activations, X=None, *, continuous: dict | None = None, categorical: dict | None = None,
                    threshold: float = 0.9, use_rep: str | None = None, batch_size: int = 2048) -> dict:
    """Recovery of every ground-truth group, plus the SAE's quality metrics when an SAE is given.

    Parameters
    ----------
    sae_or_activations
        A trained SAE (then ``X`` = held-out inputs) or an activation matrix (cells x features).
    X
        Held-out inputs (cells x ``d_in``, or AnnData with ``use_rep``); required with an SAE, ignored with
        activations.
    continuous
        ``{group name: cells x variables}``, e.g. ``{"X": programs, "X''": masked programs}``.
    categorical
        ``{name: labels per cell}``, e.g. ``{"cell type": ..., "covariate": ...}``.
    threshold
        Recovery cut-off, for ``|r|`` (continuous groups) and AUROC (categorical groups) alike.
    use_rep
        For an AnnData ``X``: the ``obsm`` key of the embedding.
    batch_size
        Cells per batch when encoding ``X``.

    Returns
    -------
    dict with ``summary`` (a DataFrame, one row per group), ``continuous`` (group -> RecoveryResult),
    ``categorical`` (name -> AUROC table) and ``quality`` (``metrics`` dict or None).
    """
    quality = None
    if hasattr(sae_or_activations, "encode") and hasattr(sae_or_activations, "W_dec"):
        if X is None:
            raise ValueError("recovery_report(sae, X, ...) needs the held-out inputs X when given an SAE.")
        activations = sae_or_activations.encode(X, use_rep=use_rep, batch_size=batch_size)
        quality = metrics(sae_or_activations, X, use_rep=use_rep)
    else:
        activations = sae_or_activations
    rows, cont, cat = [], {}, {}
    for name, values in (continuous or {}).items():
        res = recovery(activations, values, threshold=threshold)
        cont[name] = res
        rows.append({"group": name, "type": "continuous", "n": res.summary["n_variables"],
                     "fraction_recovered": res.summary["fraction_recovered"],
                     "fraction_recovered_matched": res.summary["fraction_recovered_matched"],
                     "mean_best": res.summary["mean_best_abs_r"]})
    for name, labels in (categorical or {}).items():
        table = categorical_auroc(activations, labels)
        cat[name] = table
        rows.append({"group": name, "type": "categorical (AUROC)", "n": len(table),
                     "fraction_recovered": float((table["best_auroc"] >= threshold).mean()),
                     "fraction_recovered_matched": np.nan, "mean_best": float(table["best_auroc"].mean())})
    return {"summary": pd.DataFrame(rows), "continuous": cont, "categorical": cat, "quality": quality}
