"""Differential expression, high vs low group, for many features at once.

Group sums and sums of squares come from sparse group-membership products (see ``_kernels``), chunked
over features so memory stays bounded: high groups directly, low groups as a running prefix sum over a
shared random cell order minus the excluded cells inside the prefix (see ``groups``). From them:

- **Welch t** on log-normalised expression, with a guard for small groups (``variance_guard``):

  - ``"floor"`` (default): the smaller group's variance is raised to at least the larger group's. A
    high group of ~40 cells often has a gene at zero in every cell; plain Welch then divides by the
    low group's variance alone and calls the gene strongly "down" (hundreds of spurious genes per
    feature on noise data). The floor makes the standard error at least what the larger, better
    estimated group implies; when the small group is the more variable one, it is plain Welch;
  - ``"overestim"``: scanpy's ``t-test_overestim_var`` (the larger group's variance divided by the
    smaller group's size);
  - ``None``: plain Welch, identical to ``scipy.stats.ttest_ind(equal_var=False)``.
- **Wilcoxon rank-sum** (``test="wilcoxon"``): normal approximation with tie and continuity
  correction, identical to ``scipy.stats.mannwhitneyu(method="asymptotic")``; needs explicit groups,
  so it costs ~0.1-1 s per feature on large data.
- **log2 fold change** ``log2((expm1(m_high) + pc) / (expm1(m_low) + pc))`` from the group means
  ``m`` of log1p-normalised expression (scanpy's formula; ``pc`` = ``pseudocount`` in normalised
  units, default 1 count per 10k, where scanpy uses 1e-9).
- **BH across genes** within each feature; genes with no variation in either group are not tested.
  Up and down genes are selected separately: ``padj < de_alpha`` and ``|log2fc| >= min_log2fc`` with
  the sign of the statistic, optionally capped at ``max_genes`` per direction.

For the selection only p-values below ``de_alpha`` matter, so p-values are evaluated only where
``|t|`` reaches the normal quantile of ``de_alpha / 2`` (a t-distribution has heavier tails, so every
other gene has p > de_alpha). Adjusted p-values at or below ``de_alpha`` are exact.
:func:`dgdlens.lens.differential_expression` computes the full table for chosen features.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import special, stats

from ..stats import bh_adjust_grouped, t_pvalues, welch_t
from ._kernels import group_moments, welch_from_moments
from .expression import PreparedExpression
from .groups import FeatureGroups

__all__ = ["DEChunk", "iter_de_chunks", "select_genes", "auto_chunk_size", "stats_from_moments", "t_test_chunk"]

_GUARDS = ("floor", "overestim", None)
_TESTS = ("t-test", "wilcoxon")


def auto_chunk_size(n_genes: int, budget_bytes: float = 4e8, n_arrays: int = 12) -> int:
    """Features per chunk so that ~``n_arrays`` dense float64 (features x genes) arrays fit the budget."""
    return int(np.clip(budget_bytes / (8.0 * n_arrays * max(n_genes, 1)), 16, 4096))


class PrefixSums:
    """Sums and sums of squares of expression over ``order[:k]``, for increasing k, chunk after chunk."""

    def __init__(self, prep: PreparedExpression, order: np.ndarray, engine: str):
        self.prep = prep
        self.order = order
        self.engine = engine
        self._reset()

    def _reset(self):
        self.pos = 0
        self.cum_sum = np.zeros(self.prep.n_genes)
        self.cum_sq = np.zeros(self.prep.n_genes)

    def at(self, ks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prefix sums at each of the sorted, distinct ``ks``."""
        ks = np.asarray(ks, dtype=np.int64)
        if len(ks) and ks[0] < self.pos:
            self._reset()  # a caller went back: start again from the beginning
        bounds = np.r_[self.pos, ks]
        lengths = np.diff(bounds)
        seg = sp.csr_matrix(
            (np.ones(int(lengths.sum())), self.order[self.pos:ks[-1]] if len(ks) else np.zeros(0, int),
             np.r_[0, np.cumsum(lengths)]),
            shape=(len(ks), self.prep.n_cells),
        )
        s, q = group_moments(seg, self.prep.X, engine=self.engine, X_squared=self._squared())
        s = np.cumsum(s, axis=0) + self.cum_sum
        q = np.cumsum(q, axis=0) + self.cum_sq
        if len(ks):
            self.pos = int(ks[-1])
            self.cum_sum, self.cum_sq = s[-1].copy(), q[-1].copy()
        return s, q

    def _squared(self):
        return self.prep.squared() if self.engine == "scipy" else None


@dataclass
class DEChunk:
    """Statistics for a chunk of features (rows) x all genes."""

    rows: np.ndarray          # positions among the analysed features
    statistic: np.ndarray     # Welch t or signed Wilcoxon z
    df: np.ndarray | None     # Welch degrees of freedom (None for Wilcoxon)
    tested: np.ndarray        # bool: gene varies in at least one group
    mean_high: np.ndarray
    mean_low: np.ndarray
    var_high: np.ndarray
    var_low: np.ndarray
    n_high: np.ndarray
    n_low: np.ndarray
    scale: str                # "log1p" or "linear": how log2 fold changes are formed from the means
    pseudocount: float
    pvals: np.ndarray | None = None  # full p-value matrix (only when requested)

    @property
    def log2fc(self) -> np.ndarray:
        """log2 fold change of every (row, gene); computed on demand (transcendentals are costly)."""
        return self.log2fc_at(slice(None), slice(None))

    def log2fc_at(self, r, g) -> np.ndarray:
        """log2 fold changes at the given (row, gene) positions only."""
        if self.scale == "log1p":
            return log2_fold_change(self.mean_high[r, g], self.mean_low[r, g], self.pseudocount)
        return np.log2((self.mean_high[r, g] + self.pseudocount) / (self.mean_low[r, g] + self.pseudocount))

    def candidate_pvalues(self, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, gene, p) for every tested gene whose p-value can be <= alpha."""
        if self.pvals is not None:
            r, g = np.nonzero(self.tested & (self.pvals <= alpha))
            return r, g, self.pvals[r, g]
        crit = stats.norm.isf(alpha / 2.0)
        r, g = np.nonzero(self.tested & (np.abs(self.statistic) >= crit))
        s = self.statistic[r, g]
        if self.df is None:
            p = np.minimum(2.0 * special.ndtr(-np.abs(s)), 1.0)
        else:
            p = t_pvalues(s, self.df[r, g])
        return r, g, p


def _moments_to_mean_var(s: np.ndarray, q: np.ndarray, n: np.ndarray):
    n = n.astype(np.float64)[:, None]
    mean = s / n
    with np.errstate(invalid="ignore", divide="ignore"):
        var = (q - s * mean) / (n - 1.0)
    # one-pass variances cancel: values within ~1e-12 of the second moment are rounding, not spread
    var[var < 1e-10 * np.maximum(q / n, 1e-300)] = 0.0
    return mean, var


def _group_stats(prep, groups: FeatureGroups, rows, prefix: PrefixSums, engine: str, guard):
    """(n_h, n_l, mean_h, var_h, mean_l, var_l, welch_t, df, tested) for the features ``rows``."""
    sq_kw = {"X_squared": prep.squared()} if engine == "scipy" else {}
    s_h, q_h = group_moments(groups.high[rows], prep.X, engine=engine, **sq_kw)
    ks, inverse = np.unique(groups.low_k[rows], return_inverse=True)
    p_s, p_q = prefix.at(ks)
    e_s, e_q = group_moments(groups.low_excluded[rows], prep.X, engine=engine, **sq_kw)
    return stats_from_moments(s_h, q_h, p_s, p_q, inverse, e_s, e_q, groups.n_high[rows], groups.n_low[rows],
                              engine, guard)


def stats_from_moments(s_h, q_h, p_s, p_q, inverse, e_s, e_q, n_h, n_l, engine: str, guard):
    """(n_h, n_l, mean_h, var_h, mean_l, var_l, welch_t, df, tested) from group sums: high-group sums
    ``s_h, q_h``; low-group sums as prefix sums ``p_s[inverse], p_q[inverse]`` minus the excluded cells'
    ``e_s, e_q`` (pass zeros for ``e`` and ``inverse = arange`` when the low sums are direct)."""
    fused = None if engine == "scipy" else welch_from_moments(s_h, q_h, p_s, p_q, inverse, e_s, e_q, n_h, n_l, guard)
    if fused is not None:
        return (n_h, n_l, *fused)
    # numpy path (numba unavailable, or engine="scipy"): the same arithmetic, one whole-array step at a time
    s_l = _cancel(p_s[inverse], e_s)
    q_l = _cancel(p_q[inverse], e_q)
    mean_h, var_h = _moments_to_mean_var(s_h, q_h, n_h)
    mean_l, var_l = _moments_to_mean_var(s_l, q_l, n_l)
    stat, df = _welch_guarded(n_h, mean_h, var_h, n_l, mean_l, var_l, guard)
    tested = (var_h > 0) | (var_l > 0) | (mean_h != mean_l)
    return n_h, n_l, mean_h, var_h, mean_l, var_l, stat, df, tested


def _cancel(prefix: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """prefix - excluded, with differences at rounding level set to exactly 0.

    A gene expressed only in excluded cells would otherwise get a low-group sum of ~1e-13 instead of 0,
    and a spurious infinite t against an all-zero high group.
    """
    out = prefix - excluded
    out[np.abs(out) <= 1e-11 * (np.abs(prefix) + np.abs(excluded))] = 0.0
    return out


def _welch_guarded(n_h, mean_h, var_h, n_l, mean_l, var_l, guard):
    nh = n_h.astype(np.float64)[:, None]
    nl = n_l.astype(np.float64)[:, None]
    if guard == "floor":
        small_is_high = (n_h <= n_l)[:, None]
        vh = np.where(small_is_high, np.maximum(var_h, var_l), var_h)
        vl = np.where(small_is_high, var_l, np.maximum(var_l, var_h))
        return welch_t(mean_h, vh, nh, mean_l, vl, nl)
    if guard == "overestim":
        # scanpy: the larger group's variance is divided by the smaller group's size (and df uses it too)
        n_small = np.minimum(nh, nl)
        vh_n = np.where(nh <= nl, nh, n_small)
        vl_n = np.where(nh <= nl, n_small, nl)
        return welch_t(mean_h, var_h, vh_n, mean_l, var_l, vl_n)
    return welch_t(mean_h, var_h, nh, mean_l, var_l, nl)


def check_de_options(test: str, variance_guard, pseudocount: float) -> None:
    """Raise for a test, variance guard or pseudocount the DE does not know (shared by both paths)."""
    if test not in _TESTS:
        raise ValueError(f"test must be one of {_TESTS}, got {test!r}.")
    if variance_guard not in _GUARDS:
        raise ValueError(f"variance_guard must be one of {_GUARDS}, got {variance_guard!r}.")
    if pseudocount <= 0:
        raise ValueError(f"pseudocount must be positive, got {pseudocount}.")


def log2_fold_change(mean_high, mean_low, pseudocount: float) -> np.ndarray:
    """``log2((expm1(m_high) + pc) / (expm1(m_low) + pc))`` for log1p-scale group means."""
    return (np.log(np.expm1(mean_high) + pseudocount) - np.log(np.expm1(mean_low) + pseudocount)) / np.log(2.0)


def iter_de_chunks(
    prep: PreparedExpression,
    groups: FeatureGroups,
    *,
    test: str = "t-test",
    variance_guard: str | None = "floor",
    pseudocount: float = 1.0,
    chunk_size: int | None = None,
    engine: str = "auto",
    full_pvalues: bool = False,
    progress: bool = False,
    desc: str = "DE",
) -> Iterator[DEChunk]:
    """Yield :class:`DEChunk` for all analysed features, chunk by chunk (in order of low-group prefix)."""
    check_de_options(test, variance_guard, pseudocount)
    chunk = chunk_size or auto_chunk_size(prep.n_genes)
    # prefix sums grow monotonically, so walk the features in order of their low-group prefix length
    order = np.argsort(groups.low_k, kind="stable")
    prefix = PrefixSums(prep, groups.order, engine)
    starts = range(0, groups.n_features, chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, total=len(starts), desc=desc, unit="chunk")
    for start in starts:
        rows = order[start:start + chunk]
        stats_ = _group_stats(prep, groups, rows, prefix, engine, variance_guard)
        if test == "t-test":
            yield t_test_chunk(rows, stats_, prep.scale, pseudocount, full_pvalues)
            continue
        n_h, n_l, mean_h, var_h, mean_l, var_l, _, _, _ = stats_
        stat, tested = _wilcoxon_chunk(prep, groups, rows)
        pvals = np.where(tested, _wilcoxon_p(stat), 1.0) if full_pvalues else None
        yield DEChunk(rows, stat, None, tested, mean_h, mean_l, var_h, var_l, n_h, n_l, prep.scale, pseudocount,
                      pvals)


def t_test_chunk(rows, stats_, scale: str, pseudocount: float, full_pvalues: bool) -> DEChunk:
    """The Welch-test :class:`DEChunk` of the features ``rows`` from :func:`stats_from_moments`' output."""
    n_h, n_l, mean_h, var_h, mean_l, var_l, stat, df, tested = stats_
    pvals = np.where(tested, t_pvalues(stat, df), 1.0) if full_pvalues else None
    return DEChunk(rows, stat, df, tested, mean_h, mean_l, var_h, var_l, n_h, n_l, scale, pseudocount, pvals)


def select_genes(
    chunk: DEChunk,
    *,
    de_alpha: float = 0.05,
    min_log2fc: float = 0.25,
    max_genes: int | None = None,
) -> tuple[sp.csr_matrix, sp.csr_matrix, pd.DataFrame]:
    """Up and down gene selections (rows x genes, boolean CSR) and a per-row count table."""
    n_rows, n_genes = chunk.statistic.shape
    n_tested = chunk.tested.sum(axis=1)
    r, g, p = chunk.candidate_pvalues(de_alpha)
    padj = bh_adjust_grouped(p, r, np.maximum(n_tested, 1))
    stat = chunk.statistic[r, g]
    lfc = chunk.log2fc_at(r, g)
    sig = padj < de_alpha
    out = []
    for sign, lfc_ok in ((1, lfc >= min_log2fc), (-1, lfc <= -min_log2fc)):
        keep = sig & lfc_ok & (np.sign(stat) == sign)
        rr, gg, pp, ss = r[keep], g[keep], p[keep], np.abs(stat[keep])
        if max_genes is not None:
            order = np.lexsort((-ss, pp, rr))
            rr, gg = rr[order], gg[order]
            starts = np.r_[0, np.flatnonzero(np.diff(rr)) + 1]
            rank = np.arange(len(rr)) - np.repeat(starts, np.diff(np.r_[starts, len(rr)]))
            rr, gg = rr[rank < max_genes], gg[rank < max_genes]
        sel = sp.csr_matrix((np.ones(len(rr), dtype=bool), (rr, gg)), shape=(n_rows, n_genes))
        sel.sort_indices()
        out.append(sel)
    counts = pd.DataFrame({
        "n_genes_tested": n_tested, "n_up": np.diff(out[0].indptr), "n_down": np.diff(out[1].indptr),
    })
    return out[0], out[1], counts


# ------------------------------------------------------------------------------------------- Wilcoxon
def _wilcoxon_p(z: np.ndarray) -> np.ndarray:
    return np.minimum(2.0 * special.ndtr(-np.abs(z)), 1.0)


def _wilcoxon_chunk(prep: PreparedExpression, groups: FeatureGroups, rows: np.ndarray, batch: int = 4):
    """Signed continuity-corrected z of the rank-sum test for each feature in ``rows`` x gene."""
    X = prep.X if prep.is_sparse else sp.csr_matrix(prep.X)
    if X.nnz and X.data.min() < 0:
        raise ValueError("test='wilcoxon' needs non-negative expression (zeros are ranked as one tie block).")
    n_genes = X.shape[1]
    z = np.zeros((len(rows), n_genes))
    tested = np.zeros((len(rows), n_genes), dtype=bool)
    low = groups.low_matrix(rows)
    for b0 in range(0, len(rows), batch):
        idx = np.arange(b0, min(b0 + batch, len(rows)))
        cells, feat, is_high = [], [], []
        for i in idx:
            h = groups.high_cells(rows[i])
            lo = low.indices[low.indptr[i]:low.indptr[i + 1]]
            cells += [h, lo]
            feat += [np.full(len(h) + len(lo), i - b0)]
            is_high += [np.ones(len(h), bool), np.zeros(len(lo), bool)]
        cells = np.concatenate(cells)
        feat = np.concatenate(feat)
        is_high = np.concatenate(is_high)
        sub = X[cells].tocoo()
        n_h = groups.n_high[rows[idx]].astype(np.float64)
        n_l = groups.n_low[rows[idx]].astype(np.float64)
        zz, tt = _rank_sum_z(sub.row, sub.col, sub.data, feat, is_high, len(idx), n_genes, n_h, n_l)
        z[idx] = zz
        tested[idx] = tt
    return z, tested


def _rank_sum_z(row, col, val, feat_of_cell, high_of_cell, n_feat, n_genes, n_h, n_l):
    """Rank-sum z per (feature, gene) from the non-zero entries; zeros form one tie block per gene."""
    key = feat_of_cell[row].astype(np.int64) * n_genes + col
    order = np.lexsort((val, key))
    key, val, is_high = key[order], val[order], high_of_cell[row][order]
    n_keys = n_feat * n_genes
    nnz_key = np.bincount(key, minlength=n_keys).astype(np.float64)
    key_start = np.r_[0, np.cumsum(nnz_key)[:-1]].astype(np.int64)
    pos = np.arange(len(key)) - key_start[key]                     # 0-based position among the key's non-zeros
    new_run = np.r_[True, (np.diff(key) != 0) | (np.diff(val) != 0)]
    run_id = np.cumsum(new_run) - 1
    run_first = pos[new_run]
    run_len = np.bincount(run_id).astype(np.float64)
    n_per_feat = n_h + n_l
    n_tot = np.repeat(n_per_feat, n_genes)                          # per key
    zeros = n_tot - nnz_key
    rank = zeros[key] + run_first[run_id] + (run_len[run_id] + 1.0) / 2.0
    r_high = np.bincount(key[is_high], weights=rank[is_high], minlength=n_keys)
    nnz_high = np.bincount(key[is_high], minlength=n_keys).astype(np.float64)
    nh = np.repeat(n_h, n_genes)
    nl = np.repeat(n_l, n_genes)
    r_high += (nh - nnz_high) * (zeros + 1.0) / 2.0
    u = r_high - nh * (nh + 1.0) / 2.0
    mu = nh * nl / 2.0
    run_key = key[new_run]
    ties = np.bincount(run_key, weights=run_len ** 3 - run_len, minlength=n_keys) + zeros ** 3 - zeros
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma = np.sqrt(nh * nl / 12.0 * ((n_tot + 1.0) - ties / (n_tot * (n_tot - 1.0))))
        z = np.sign(u - mu) * np.maximum(np.abs(u - mu) - 0.5, 0.0) / sigma
    tested = sigma > 1e-12
    z = np.where(tested, z, 0.0)
    return z.reshape(n_feat, n_genes), tested.reshape(n_feat, n_genes)


def _check_rows(groups: FeatureGroups, prep: PreparedExpression) -> None:
    if groups.n_cells != prep.n_cells:
        raise ValueError(
            f"activations have {groups.n_cells} cells (rows) but expression has {prep.n_cells}; "
            "they must describe the same cells in the same order."
        )
