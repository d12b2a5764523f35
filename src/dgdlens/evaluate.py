"""Summaries of results as numbers and tables: clusters against labels, training histories, steering
fold changes.

Plain-data functions (numpy, pandas) with no plotting: :mod:`dgdlens.plotting` draws them,
:mod:`dgdlens.report` and the demo quote them.

- :func:`contingency_table`, :func:`cluster_agreement`: mixture components (or any clustering)
  against given labels (counts, ARI / NMI).
- :func:`history_metrics`, :func:`find_best_epoch`: the metrics and best epoch of a training history
  (a DataFrame such as ``model.history_``, a dict of columns, or a list of per-epoch dicts).
- :func:`as_lfc_series`, :func:`top_changed_genes`: per-gene log fold changes of a steering result.
- Held-out likelihood shared by all count models (DGD, DecoderOnly with an NB likelihood, scVI in the
  benchmark): :func:`binomial_split`, :func:`count_split_nll`, :func:`gene_split_nll`, the model interface
  :class:`NBSplitModel` and its builders :func:`split_model` (dgdlens models) and
  :func:`composition_split_model` (any softmax-composition NB decoder, e.g. scVI's).

The held-out protocol
---------------------
A model's latent for a held-out cell must never be fitted to the counts it is scored on: a latent
fitted by MAP on the scored counts rewards a flexible decoder for fitting noise, and an encoder is
not fitted at all, so "held-out NLL" compares unlike things. Two splits of each held-out cell avoid
that:

*Count splitting* (:func:`count_split_nll`). Each count is thinned, ``X_a ~ Binomial(X, p)`` and
``X_b = X - X_a`` (:func:`binomial_split`). The latent is inferred from ``X_a`` alone, with ``X_a``'s
library size (the model's own held-out inference, decoder frozen). Part B is scored with the model's
NB at that latent, the mean scaled to part B's library size ``L_b = sum_g X_b[g]`` (the observed total,
as scVI's and the DGD's likelihoods scale by the observed total):
``NLL_b = -sum_g log NB(X_b[g]; L_b * c_g(z), r_g)`` with ``c(z)`` the model's composition (softmax)
over genes. Unit: nats per cell, summed over all genes.
If ``X ~ Poisson(mu)`` the two parts are independent Poisson(p mu) and Poisson((1-p) mu), so this is
an exact held-out test. If ``X ~ NB(mu, r)`` each part is NB(p mu, r), NB((1-p) mu, r) marginally,
but they are *not* independent (they share the cell's gamma intensity): a model that fits part A's
cell-specific noise is partly rewarded on part B. The score is still comparable between models
scored on the same split (same ``p`` and ``seed``), and it no longer lets a model see the scored
counts, but it is not a pure out-of-sample test of the dispersion. Thinning a cell to half its
counts also makes part-A inference harder than inference from the whole cell (less signal, the same
prior), which is the price of never scoring the counts the latent was fitted to.

*Gene splitting* (:func:`gene_split_nll`). The genes are split at random (seeded) into an observed
set A and a scored set B. The latent is inferred from ``X[:, A]`` alone: NB likelihood with the
composition renormalised over A, ``c_g(z) / sum_{h in A} c_h(z)``, times ``L_A = sum_{g in A} X_g``
(plus the model's prior: MAP with the decoder frozen). Part B is scored with the composition
renormalised over B, ``mean_g = L_B * c_g(z) / sum_{h in B} c_h(z)``, ``L_B = sum_{g in B} X_g``.
Under the model the genes are conditionally independent given the latent, so part B is held out for
NB and Poisson alike; what it measures is how well the latent predicts unseen genes (imputation),
a different question from count splitting. Unit: nats per cell, summed over the genes in B.

The NLL per cell depends on the split (which counts or genes are scored), so compare models only on
the same split (same ``p``/``fraction`` and ``seed``) and the same cells.

The model interface
-------------------
:class:`NBSplitModel` is two callables, so anything with an NB output fits (the benchmark wraps scVI):

- ``infer(x, library, genes) -> latents``: latents of the cells from the counts ``x`` (CSR, cells x
  ``len(genes)``) of the observed genes ``genes`` (indices into the model's genes; all genes for count
  splitting), with ``library`` the per-cell total of ``x``. Latents can be any object the second
  callable understands (an array, usually).
- ``nb_params(latents, library, genes) -> (mean, r)``: the NB mean (cells x ``len(genes)``) and
  dispersion (broadcastable to it) of the scored genes ``genes`` for a cell whose part to score has the
  total ``library``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = [
    "contingency_table", "cluster_agreement",
    "history_metrics", "find_best_epoch",
    "as_lfc_series", "top_changed_genes",
    "binomial_split", "count_split_nll", "gene_split_nll", "nb_nll",
    "NBSplitModel", "split_model", "composition_split_model",
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

    Parameters
    ----------
    clusters
        One cluster (mixture component) per cell: a list, array, pandas Series or Categorical of length
        ``n_cells``. A Categorical keeps its category order; other values are sorted.
    labels
        One label per cell (e.g. ``adata.obs["cell_type"]``), same length and cell order as ``clusters``.
    normalize
        ``None`` (default) for cell counts, ``"rows"`` for row fractions (each row sums to 1),
        ``"columns"`` for column fractions.

    Returns
    -------
    pandas.DataFrame
        ``n_clusters x n_labels`` table, index named ``"cluster"``, columns named ``"label"``; int64 counts,
        or float fractions when ``normalize`` is set.
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

    Parameters
    ----------
    clusters
        One cluster per cell (list, array, Series or Categorical).
    labels
        One reference label per cell, same length and order as ``clusters``.

    Returns
    -------
    dict
        ``{"ari": float, "nmi": float, "n_cells": int}``: the two scores and the number of cells with
        both a cluster and a label.
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

    Parameters
    ----------
    history
        A training history: a DataFrame with one row per epoch (``model.history_``), a dict of columns,
        or a list of per-epoch dicts.

    Returns
    -------
    dict of str to dict of str to str
        ``{metric: {split: column}}`` with ``split`` ``"train"`` and/or ``"val"``. Raises ``ValueError``
        if there is no loss-like column or a metric column is not numeric.
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
    """Epoch with the lowest value of ``column`` (ignoring NaN); ``None`` if the column is absent or all NaN.

    Parameters
    ----------
    history
        A training history (DataFrame, dict of columns, or list of per-epoch dicts; see
        :func:`history_metrics`).
    column
        The column to minimise, by default ``"val_loss"``.

    Returns
    -------
    int, float or None
        The value of the history's ``epoch`` column at the minimum (a Python scalar), or its 1-based row
        number when the history has no ``epoch`` column; ``None`` when ``column`` is missing or has no
        finite value.
    """
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

    Parameters
    ----------
    lfc
        Per-gene log fold changes: Series, dict or DataFrame as described above.

    Returns
    -------
    pandas.Series
        float64 fold changes indexed by gene name (as ``str``), NaN and infinite values removed.
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
    """The ``n_up`` largest positive and ``n_down`` most negative fold changes (ties broken by gene order).

    Parameters
    ----------
    lfc
        Per-gene log fold changes (any input :func:`as_lfc_series` accepts).
    n_up
        Number of up-regulated (positive) genes to keep.
    n_down
        Number of down-regulated (negative) genes to keep.

    Returns
    -------
    tuple of pandas.Series
        ``(up, down)``: at most ``n_up`` positive fold changes sorted descending and at most ``n_down``
        negative fold changes sorted ascending (most negative first), indexed by gene name. Zeros are
        in neither.
    """
    values = as_lfc_series(lfc)
    up = values[values > 0].sort_values(ascending=False, kind="stable").head(n_up)
    down = values[values < 0].sort_values(ascending=True, kind="stable").head(n_down)
    return up, down


# --------------------------------------------------------------------------- held-out NB likelihood

def _check_counts(values: np.ndarray, what: str) -> None:
    if values.size and (not np.all(np.isfinite(values)) or values.min() < 0 or np.any(values != np.round(values))):
        raise ValueError(f"{what} must hold non-negative integer counts (raw UMIs), not normalised values.")


def binomial_split(X, p: float = 0.5, seed: int = 0):
    """Count splitting by binomial thinning: ``X_a ~ Binomial(X, p)`` elementwise, ``X_b = X - X_a``.

    ``X`` holds non-negative integer counts (cells x genes): a scipy sparse matrix (any format; both
    parts come back as CSR with explicit zeros removed, and only the stored entries are drawn, so the
    matrix is never densified) or a dense array (dense parts). The values keep ``X``'s dtype. The
    draw is reproducible for a given ``seed`` (``numpy.random.default_rng``), and ``X_a + X_b == X``.
    If ``X ~ Poisson(mu)`` the parts are independent Poisson(p mu) and Poisson((1 - p) mu); if
    ``X ~ NB(mu, r)`` they are NB(p mu, r) and NB((1 - p) mu, r) marginally but not independent.

    Parameters
    ----------
    X
        Raw counts, cells x genes (sparse matrix or 2-D array of non-negative integers).
    p
        Probability that a count goes to part A, strictly between 0 and 1 (default 0.5: an even split).
    seed
        Seed of the binomial draw.

    Returns
    -------
    tuple
        ``(X_a, X_b)``, each cells x genes with ``X``'s dtype: CSR matrices for a sparse ``X``, numpy
        arrays for a dense one.
    """
    p = float(p)
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be strictly between 0 and 1, got {p}.")
    rng = np.random.default_rng(seed)
    if sp.issparse(X):
        X = sp.csr_matrix(X, copy=True)
        X.sum_duplicates()  # canonical entry order: the draw depends only on the matrix and the seed
        X.sort_indices()
        _check_counts(X.data, "X")
        counts = X.data.astype(np.int64)
        drawn = rng.binomial(counts, p)
        shape, dtype = X.shape, X.data.dtype
        parts = []
        for values in (drawn, counts - drawn):
            part = sp.csr_matrix((values.astype(dtype), X.indices.copy(), X.indptr.copy()), shape=shape)
            part.eliminate_zeros()
            parts.append(part)
        return parts[0], parts[1]
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise ValueError(f"X must be a 2-D matrix (cells x genes), got shape {arr.shape}.")
    _check_counts(arr, "X")
    drawn = rng.binomial(arr.astype(np.int64), p)
    return drawn.astype(arr.dtype), (arr - drawn).astype(arr.dtype)


def nb_nll(x, mean, r, *, batch_size: int = 1024) -> np.ndarray:
    """Negative-binomial NLL per cell, summed over genes, float64 (nats).

    ``x`` counts (dense or sparse, cells x genes), ``mean`` the NB means (same shape), ``r`` the
    dispersion (shape parameter; broadcastable: per gene ``(G,)`` or ``(1, G)``, or per entry).
    Equals ``-scipy.stats.nbinom.logpmf(x, r, r / (r + mean)).sum(1)``; a zero mean with a zero count
    scores 0.

    Parameters
    ----------
    x
        Observed counts, cells x genes (dense array or scipy sparse matrix).
    mean
        NB means, cells x genes (same shape as ``x``).
    r
        NB dispersion (inverse overdispersion; larger is closer to Poisson): per gene ``(G,)`` or
        ``(1, G)``, or per entry (cells x genes).
    batch_size
        Cells per chunk (only ``batch_size`` rows of ``x`` are densified at a time).

    Returns
    -------
    numpy.ndarray
        ``(n_cells,)`` float64 NLL per cell in nats, summed over genes.
    """
    from scipy.special import gammaln, xlogy

    mean = np.asarray(mean, dtype=np.float64)
    r = np.asarray(r, dtype=np.float64)
    if mean.ndim != 2 or x.shape != mean.shape:
        raise ValueError(f"x {x.shape} and mean {mean.shape} must have the same (cells, genes) shape.")
    r = np.broadcast_to(r.reshape(1, -1) if r.ndim == 1 else r, mean.shape)
    out = np.empty(mean.shape[0], dtype=np.float64)
    for i in range(0, mean.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        xb = x[sl]
        xb = np.asarray(xb.toarray() if sp.issparse(xb) else xb, dtype=np.float64)
        m, rb = mean[sl], r[sl]
        total = m + rb
        logp = (gammaln(xb + rb) - gammaln(rb) - gammaln(xb + 1.0)
                + xlogy(xb, m) - xlogy(xb, total) + rb * (np.log(rb) - np.log(total)))
        out[sl] = -logp.sum(1)
    return out


@dataclass(frozen=True)
class NBSplitModel:
    """A count model as the held-out protocol sees it: infer latents, give NB parameters.

    - ``infer(x, library, genes) -> latents``: ``x`` the observed counts (CSR, cells x ``len(genes)``),
      ``library`` their per-cell totals, ``genes`` the indices (into the model's genes) of the observed
      columns. Returns one latent row per cell (an array; rows are sliced in batches).
    - ``nb_params(latents, library, genes) -> (mean, r)``: NB mean (cells x ``len(genes)``) and
      dispersion (broadcastable) of the genes ``genes`` for cells whose scored part has the totals
      ``library``.

    Build one with :func:`split_model` (a DGD or DecoderOnly) or :func:`composition_split_model` (any
    softmax-composition decoder with an NB likelihood, such as scVI's), or write the two callables.

    Parameters
    ----------
    infer
        ``(x, library, genes) -> latents``, as above.
    nb_params
        ``(latents, library, genes) -> (mean, r)``, as above.
    n_genes
        Number of genes of the model, if known (:func:`split_model` sets it); ``None`` otherwise.
    name
        A label for the model (e.g. in benchmark tables); :func:`split_model` uses the model's class name.
    """

    infer: Callable[[sp.csr_matrix, np.ndarray, np.ndarray], Any]
    nb_params: Callable[[Any, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
    n_genes: int | None = None
    name: str = ""


def composition_split_model(log_composition: Callable, log_r, *, n_latent: int | None = None,
                            prior_nll: Callable | None = None, start=None, n_steps: int = 200, lr: float = 1e-2,
                            betas: tuple[float, float] = (0.5, 0.7), tol: float = 0.0, batch_size: int = 1024,
                            device="cpu", freeze=None, name: str = "") -> NBSplitModel:
    """An :class:`NBSplitModel` for a decoder whose NB mean is ``library x composition(z)``, with MAP
    inference of the latents (decoder frozen).

    Parameters
    ----------
    log_composition
        ``z`` (torch, cells x n_latent) -> log composition over all the model's genes (cells x G), e.g.
        ``torch.log_softmax(decoder(z), -1)``; differentiable in ``z``.
    log_r
        Log NB dispersion per gene, ``(G,)`` or ``(1, G)`` (tensor or array), or a scalar; or a
        zero-argument callable returning one (read at each call, e.g. a module's parameter getter).
    n_latent
        Latent dimension; required with ``start=None`` (the start is then the origin).
    prior_nll
        ``z -> (cells,)`` negative log prior density added to the inference objective (e.g.
        ``0.5 * (z ** 2).sum(1)`` for N(0, I) up to a constant); ``None``: maximum likelihood.
    start
        Where each cell's optimisation starts: ``None`` the origin (needs ``n_latent``); a
        ``(K, n_latent)`` array of candidates (each cell starts from the one with the lowest objective);
        or a callable ``(x, library, genes) -> (cells, n_latent)`` array (an encoder: with ``n_steps=0``
        the latents are the encoder's, i.e. amortised inference).
    n_steps, lr, betas, tol
        Adam on the latents (:func:`dgdlens.train.inference.optimise_latents`; the DGD's held-out
        defaults: 200 steps, lr 1e-2, betas (0.5, 0.7)); ``tol`` > 0 stops early on a relative change.
    batch_size
        Cells per inference batch.
    device
        Torch device the latents are optimised on (``"cpu"``, ``"cuda"``, ...).
    freeze
        A torch module whose parameters get no gradient during inference (the decoder).
    name
        The returned model's :attr:`NBSplitModel.name`.

    Returns
    -------
    NBSplitModel
        ``infer`` returns a float32 array (cells x n_latent); ``nb_params`` returns ``(mean, r)`` as
        numpy arrays (cells x ``len(genes)`` and ``(len(genes),)`` or ``(1,)``).

    Notes
    -----
    The objective for observed genes A is ``-sum_{g in A} log NB(x_g; L * c_g(z) / sum_{h in A} c_h(z), r_g)
    + prior_nll(z)`` with ``L`` the observed total; :meth:`nb_params` renormalises the composition over
    the scored genes in the same way (a no-op when all genes are used).
    """
    import torch

    from .nn.likelihoods import _nb_constant_terms, _nb_mean_terms
    from .nn.module import frozen
    from .train.inference import optimise_latents

    dev = torch.device(device)

    def _log_r(genes) -> torch.Tensor:
        value = log_r() if callable(log_r) else log_r
        value = torch.as_tensor(value, dtype=torch.float32, device=dev).detach().reshape(-1)
        return value if value.numel() == 1 else value[torch.as_tensor(genes, device=dev)]

    def _log_mean(z, genes_t, log_lib):
        log_c = log_composition(z)[:, genes_t]
        return log_c - torch.logsumexp(log_c, dim=1, keepdim=True) + log_lib[:, None]

    def infer(x, library, genes):
        genes = np.asarray(genes)
        genes_t = torch.as_tensor(genes, device=dev)
        lr_g = _log_r(genes)
        z0_all = None
        if callable(start):
            z0_all = np.asarray(start(x, library, genes), dtype=np.float32)
        out = []
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size]
            xt = torch.as_tensor(xb.toarray() if sp.issparse(xb) else np.asarray(xb), dtype=torch.float32, device=dev)
            log_lib = torch.as_tensor(np.log(np.asarray(library[i:i + batch_size], dtype=np.float64)),
                                      dtype=torch.float32, device=dev)

            def objective(data, z_, log_lib_):  # data: counts and their NB terms free of the mean (see compact)
                x_, constant = data
                nll = constant - _nb_mean_terms(x_, _log_mean(z_, genes_t, log_lib_), lr_g).sum(1)
                return nll if prior_nll is None else nll + prior_nll(z_)

            with torch.no_grad():  # the dispersion is fixed, so these lgamma terms are computed once per batch
                data = (xt, -_nb_constant_terms(xt, lr_g).sum(1))

            ctx = frozen(freeze) if freeze is not None else _nullcontext()
            with ctx:
                if z0_all is not None:
                    z0 = torch.as_tensor(z0_all[i:i + batch_size], device=dev)
                else:
                    if start is None:
                        if n_latent is None:
                            raise ValueError("start=None needs n_latent (the origin's size).")
                        cand = torch.zeros(1, int(n_latent), device=dev)
                    else:
                        cand = torch.as_tensor(np.asarray(start, dtype=np.float32), device=dev)
                    with torch.no_grad():
                        n, k = xt.shape[0], cand.shape[0]
                        scores = torch.stack([objective(data, cand[j].expand(n, -1), log_lib) for j in range(k)], 1)
                        z0 = cand[scores.argmin(1)]
                z = optimise_latents(objective, data, log_lib, z0, int(n_steps), lr, betas, tol, compact=True)
            out.append(z.cpu().numpy())
        return np.concatenate(out) if out else np.empty((0, n_latent or 0), dtype=np.float32)

    def nb_params(z, library, genes):
        genes_t = torch.as_tensor(np.asarray(genes), device=dev)
        with torch.no_grad():
            zt = torch.as_tensor(np.asarray(z, dtype=np.float32), device=dev)
            log_lib = torch.as_tensor(np.log(np.asarray(library, dtype=np.float64)), dtype=torch.float32, device=dev)
            mean = _log_mean(zt, genes_t, log_lib).exp().cpu().numpy()
            r = _log_r(np.asarray(genes)).exp().cpu().numpy()
        return mean, r

    return NBSplitModel(infer=infer, nb_params=nb_params, name=name)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def split_model(model, **infer_kwargs) -> NBSplitModel:
    """The :class:`NBSplitModel` of a trained :class:`~dgdlens.DGD` or a :class:`~dgdlens.DecoderOnly`
    with an NB likelihood (softmax composition, ``scaling="sum"``).

    With all genes observed (count splitting) ``infer`` is the model's own held-out inference,
    ``model.get_latent_representation(new_counts, **infer_kwargs)`` (decoder and prior frozen, its
    candidate starts and Adam refinement). With a subset of genes observed (gene splitting) the same
    algorithm runs on the composition renormalised over the observed genes
    (:func:`composition_split_model`: best candidate start by likelihood + prior, then Adam with the
    model's held-out defaults, overridable by ``n_steps``, ``lr``, ``tol``, ``batch_size``).

    Parameters
    ----------
    model
        A trained :class:`~dgdlens.DGD` (``output_activation="softmax"``, ``scaling="sum"``) or
        :class:`~dgdlens.DecoderOnly` (``likelihood="nb"``, softmax composition, ``scaling="sum"``);
        anything else raises.
    **infer_kwargs
        Passed to ``model.get_latent_representation`` for count splitting (``progress=False`` unless
        given); ``n_steps``, ``lr``, ``tol``, ``batch_size`` (and ``n_candidates`` for a DecoderOnly)
        also set the gene-splitting inference.

    Returns
    -------
    NBSplitModel
        The model's held-out interface, with ``n_genes`` the model's gene count and ``name`` its class name.
    """
    import anndata as ad
    import torch

    from .models import DGD, DecoderOnly
    from .train.inference import default_candidates

    if isinstance(model, DGD):
        if model.params["output_activation"] != "softmax" or model.params["scaling"] != "sum":
            raise ValueError("count and gene splitting need a composition model (output_activation='softmax', "
                             f"scaling='sum'); this DGD has {model.params['output_activation']!r} / "
                             f"{model.params['scaling']!r}.")
        genes_all = pd.Index(model.var_names)

        def own_infer(x, library, genes):
            kwargs = {"progress": False} | infer_kwargs
            return model.get_latent_representation(ad.AnnData(sp.csr_matrix(x), var=pd.DataFrame(index=genes_all)),
                                                   layer="X", **kwargs)
        n_steps, lr, n_genes = infer_kwargs.get("n_steps", 200), infer_kwargs.get("lr", 1e-2), len(genes_all)
        tol = infer_kwargs.get("tol", 1e-5)  # infer_latents' default
        candidates = lambda: default_candidates(model.module, model.n_latent, model.device)
    elif isinstance(model, DecoderOnly):
        lik = model.likelihood
        if lik.name != "nb" or getattr(lik, "activation", None) != "softmax" or model.scaling != "sum":
            raise ValueError("count and gene splitting need DecoderOnly(likelihood='nb') with the softmax "
                             "composition and scaling='sum'.")

        def own_infer(x, library, genes):
            kwargs = {"progress": False} | infer_kwargs
            return model.get_latent_representation(sp.csr_matrix(x), **kwargs)
        n_steps, lr, n_genes = infer_kwargs.get("n_steps", 500), infer_kwargs.get("lr", 0.05), model.n_features
        tol = infer_kwargs.get("tol", 1e-6)  # DecoderOnly.get_latent_representation's default

        def candidates():
            cand = model._candidates(infer_kwargs.get("n_candidates", 32), model.seed)
            return default_candidates(model.module, model.n_latent, model.device) if cand is None else cand
    else:
        raise TypeError(f"split_model takes a DGD or a DecoderOnly, got {type(model).__name__}; wrap other "
                        "models with NBSplitModel(infer, nb_params) or composition_split_model(...).")
    module = model.module
    dev = model.device

    def log_composition(z):
        return torch.log_softmax(module.decode(z), dim=-1)

    def infer(x, library, genes):
        genes = np.asarray(genes)
        if len(genes) == n_genes and np.array_equal(genes, np.arange(n_genes)):
            return own_infer(x, library, genes)
        module.eval()
        sub = composition_split_model(log_composition, module.likelihood.log_r, n_latent=model.n_latent,
                                      prior_nll=module.prior_nll, start=candidates().detach().cpu().numpy(),
                                      n_steps=n_steps, lr=lr, tol=tol, batch_size=infer_kwargs.get("batch_size", 1024),
                                      device=dev, freeze=module)
        return sub.infer(x, library, genes)

    scorer = composition_split_model(log_composition, module.likelihood.log_r, n_latent=model.n_latent, device=dev)

    def nb_params(z, library, genes):
        module.eval()
        return scorer.nb_params(z, library, genes)

    return NBSplitModel(infer=infer, nb_params=nb_params, n_genes=n_genes, name=type(model).__name__)


def _held_out_counts(model, adata, layer):
    """(CSR counts in the model's gene order, cell names) of the cells to score."""
    names, obs = None, None
    if hasattr(adata, "obs_names") and hasattr(adata, "var_names"):
        from .data.anndata import align_genes, var_names_for

        if layer is None:
            layer = getattr(model, "layer", None)
        if layer in (None, "X"):
            X = adata.X
        elif layer == "raw":
            X = adata.raw.X
        else:
            X = adata.layers[layer]
        obs = pd.Index(adata.obs_names)
        names = var_names_for(adata, None if layer == "X" else layer)
        X = sp.csr_matrix(X) if not sp.issparse(X) else X.tocsr()
        model_genes = getattr(model, "var_names", None)
        if model_genes is not None and not names.equals(pd.Index(model_genes)):
            X = X[:, align_genes(names, model_genes)]
    else:
        X = adata.tocsr() if sp.issparse(adata) else sp.csr_matrix(np.asarray(adata))
        obs = pd.RangeIndex(X.shape[0])
        n_genes = getattr(model, "n_genes", None) or getattr(model, "n_features", None)
        if n_genes is not None and X.shape[1] != n_genes:
            raise ValueError(f"the counts have {X.shape[1]} genes but the model has {n_genes}; pass an AnnData "
                             "(genes aligned by name) or the columns in the model's order.")
    return X, obs


def _score_split(m: NBSplitModel, x_obs, genes_obs, x_scored, genes_scored, obs, name: str,
                 batch_size: int = 1024) -> pd.Series:
    lib_obs = np.asarray(x_obs.sum(1)).ravel().astype(np.float64)
    lib_scored = np.asarray(x_scored.sum(1)).ravel().astype(np.float64)
    ok = (lib_obs > 0) & (lib_scored > 0)
    out = np.full(x_obs.shape[0], np.nan)
    if not ok.all():
        warnings.warn(f"{int((~ok).sum())} cells have no counts in one part of the split; their NLL is NaN.",
                      stacklevel=3)
    rows = np.flatnonzero(ok)
    if len(rows):
        z = m.infer(x_obs[rows], lib_obs[rows], genes_obs)
        for i in range(0, len(rows), batch_size):
            sl = slice(i, i + batch_size)
            mean, r = m.nb_params(z[sl], lib_scored[rows[sl]], genes_scored)
            out[rows[sl]] = nb_nll(x_scored[rows[sl]], mean, r)
    return pd.Series(out, index=obs, name=name)


def _as_split_model(model, infer_kwargs) -> NBSplitModel:
    if isinstance(model, NBSplitModel):
        if infer_kwargs:
            raise TypeError(f"inference options {sorted(infer_kwargs)} go into the NBSplitModel itself.")
        return model
    return split_model(model, **infer_kwargs)


def count_split_nll(model, adata, *, layer: str | None = None, p: float = 0.5, seed: int = 0,
                    **infer_kwargs) -> pd.Series:
    """Held-out NB NLL per cell by count splitting (nats per cell, summed over genes).

    Each cell's counts are thinned (:func:`binomial_split` with ``p`` and ``seed``): the latent is
    inferred from part A only (the model's own held-out inference, decoder frozen, ``infer_kwargs``
    passed to it), and part B is scored with the model's NB at that latent with part B's library size.
    See the module docstring for what this measures (and the NB caveat).

    ``model`` is a trained :class:`~dgdlens.DGD`, a :class:`~dgdlens.DecoderOnly` with an NB likelihood,
    or an :class:`NBSplitModel`. ``adata`` holds the held-out cells' raw counts: an AnnData (counts in
    ``layer``; default the model's training layer; genes aligned to the model's by name) or a matrix
    in the model's gene order. Returns a Series indexed by cell (NaN for a cell with no count in one
    part).

    Parameters
    ----------
    model
        A trained DGD, an NB DecoderOnly, or an :class:`NBSplitModel`.
    adata
        Held-out raw counts: AnnData or a cells x genes matrix in the model's gene order.
    layer
        Layer of ``adata`` holding the counts (``"X"``, ``"raw"`` or a layer name); ``None`` uses the
        model's training layer.
    p
        Share of each count that goes to the observed part A (:func:`binomial_split`).
    seed
        Seed of the split; compare models only on the same ``p`` and ``seed``.
    **infer_kwargs
        Inference options for :func:`split_model` (not allowed with an :class:`NBSplitModel`).

    Returns
    -------
    pandas.Series or pandas.DataFrame
        float64 NLL of part B per cell (nats, summed over genes), indexed by cell name (or 0..n-1 for a
        matrix), named ``"count_split_nll"``. For a multi-modal DGD (``adata`` a MuData): a DataFrame with
        one column per modality (each modality thinned with ``p``, the latent inferred from every A part,
        each B part scored by its own likelihood at its B library; NaN where a cell has no B counts in a
        modality or no A counts at all).
    """
    if getattr(model, "is_multimodal", False):
        return _modalities_count_split(model, adata, p, seed, infer_kwargs)
    m = _as_split_model(model, infer_kwargs)
    X, obs = _held_out_counts(model, adata, layer)
    x_a, x_b = binomial_split(X, p, seed)
    genes = np.arange(X.shape[1])
    return _score_split(m, x_a, genes, x_b, genes, obs, "count_split_nll")


def _modalities_count_split(model, mdata, p: float, seed: int, infer_kwargs: dict) -> pd.DataFrame:
    """Count splitting for a multi-modal DGD: every modality's counts are thinned with the same ``p``; the
    latent is inferred from all the A parts (the model's own inference), each modality's B part is scored
    with its own likelihood and B library (a binary modality: B binarised, at B's depth)."""
    import mudata as md  # a dependency; imported here because importing it takes a while

    if type(mdata).__name__ != "MuData":
        raise ValueError("Count splitting a multi-modal model needs the held-out cells as a MuData.")
    names = [n for n in model.modality_names if n in mdata.mod]
    parts_a, parts_b = {}, {}
    for j, name in enumerate(names):
        mod = mdata.mod[name]
        x_a, x_b = binomial_split(sp.csr_matrix(mod.X), p, seed + j)
        parts_a[name] = ad.AnnData(x_a, obs=mod.obs[[]].copy(), var=mod.var[[]].copy())
        parts_b[name] = ad.AnnData(x_b, obs=mod.obs[[]].copy(), var=mod.var[[]].copy())
    a_mdata, b_mdata = md.MuData(parts_a), md.MuData(parts_b)
    lib_a = model.get_library_sizes(a_mdata)
    seen = lib_a.sum(1) > 0  # a cell with nothing in part A cannot be embedded from it
    out = pd.DataFrame(np.nan, index=pd.Index(a_mdata.obs_names), columns=names, dtype=np.float64)
    if not seen.any():
        return out
    a_kept, b_kept = a_mdata[seen].copy(), b_mdata[seen].copy()
    z = model.get_latent_representation(a_kept, **infer_kwargs)
    lib_b = model.get_library_sizes(b_kept)
    for name in names:
        m = model.modality_names.index(name)
        nll = model.get_reconstruction_error(b_kept, z=z, modality=name, per_sample=True)
        out.loc[seen, name] = np.where(lib_b[:, m] > 0, nll, np.nan)
    return out


def gene_split_nll(model, adata, *, layer: str | None = None, fraction: float = 0.5, seed: int = 0,
                   **infer_kwargs) -> pd.Series:
    """Held-out NB NLL per cell by gene splitting (nats per cell, summed over the scored genes).

    The genes are split at random (``seed``): a share ``fraction`` is observed (set A), the rest is
    scored (set B). The latent is inferred by MAP from ``X[:, A]`` with the composition renormalised
    over A and A's library size; B is scored with the composition renormalised over B times B's
    library size (module docstring). Arguments as :func:`count_split_nll`.

    Parameters
    ----------
    model
        A trained DGD, an NB DecoderOnly, or an :class:`NBSplitModel`.
    adata
        Held-out raw counts: AnnData or a cells x genes matrix in the model's gene order.
    layer
        Layer of ``adata`` holding the counts; ``None`` uses the model's training layer.
    fraction
        Share of the genes that is observed (set A), strictly between 0 and 1; the rest is scored.
    seed
        Seed of the gene permutation.
    **infer_kwargs
        Inference options for :func:`split_model` (not allowed with an :class:`NBSplitModel`).

    Returns
    -------
    pandas.Series
        float64 NLL per cell over the genes in B (nats), indexed by cell, named ``"gene_split_nll"``;
        NaN for a cell with no count in A or in B.
    """
    fraction = float(fraction)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be strictly between 0 and 1, got {fraction}.")
    m = _as_split_model(model, infer_kwargs)
    X, obs = _held_out_counts(model, adata, layer)
    n_genes = X.shape[1]
    n_obs_genes = round(fraction * n_genes)
    if not 0 < n_obs_genes < n_genes:
        raise ValueError(f"fraction={fraction} leaves no gene on one side of the split ({n_genes} genes).")
    order = np.random.default_rng(seed).permutation(n_genes)
    genes_a, genes_b = np.sort(order[:n_obs_genes]), np.sort(order[n_obs_genes:])
    return _score_split(m, X[:, genes_a], genes_a, X[:, genes_b], genes_b, obs, "gene_split_nll")
