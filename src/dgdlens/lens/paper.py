"""``compat="paper"``: the scFeatureLens reference statistics (Schuster et al.), vectorised.

What the reference does for each feature, reproduced here for all features at once:

- **Groups:** high = cells strictly above the feature's 99th percentile; low = *all* cells where the
  feature is exactly 0 (no subsampling).
- **DE:** plain Welch t-test per gene on the values as given (no normalisation, no log); genes with zero
  variance in either group get p = 1; BH across *all* genes; fold change = ``mean_high / (mean_low + 1e-8)``.
- **DEGs** (up and down pooled): ``padj < 1e-5`` and ``FC > 2`` or ``FC < 1/2``. Fallbacks: if no gene
  reaches ``padj < 1e-5`` the threshold becomes 0.05; if the largest fold change is below 2 the
  fold-change filter is dropped. The thresholds used are reported per row.
- **Enrichment,** for every set of 10-500 genes (counted among the expression genes) with the universe =
  all expression genes:

  - two-sided exact binomial test of the overlap against ``n_selected * set_size / n_genes``
    (identical to ``scipy.stats.binomtest``); ``binom_direction`` is ``"+"``/``"-"``;
  - Mann-Whitney on fold-change ranks (1..n_genes, ascending; ties broken by gene order): the smaller
    of the two U statistics, normal approximation without tie correction, ``p = Phi(z)``;
    ``effect_size = U_set' / (n_set * n_rest)`` where ``U_set'`` counts pairs with the set gene ranked
    *lower*, so values below 0.5 mean the set has higher fold changes.
- **Keep rule:** ``binom p < 0.05`` and ``MW p < 0.05`` (no multiple-testing correction in the
  reference; ``padj`` and ``padj_global`` are added here as BH of the binomial p-values).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy import special, stats

from ..stats import bh_adjust_grouped, binom_test_two_sided, t_pvalues
from .de import DEChunk
from .enrichment import GeneSetIndex, ORAAccumulator

__all__ = ["PAPER_SETTINGS", "paper_select_genes", "PaperAccumulator"]

# Options of annotate() that compat="paper" fixes to the reference's choices.
PAPER_SETTINGS = {
    "expression_kind": "raw", "variance_guard": None, "low": "silent", "max_low_cells": None,
    "min_set_size": 10, "max_set_size": 500, "test": "t-test", "high": "percentile", "count_split": False,
    "background": "all"}
_P_STRICT, _P_FALLBACK, _FC = 1e-5, 0.05, 2.0
_KEEP_P = 0.05


def paper_fold_change(chunk: DEChunk) -> np.ndarray:
    return chunk.mean_high / (chunk.mean_low + 1e-8)


def paper_select_genes(chunk: DEChunk) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Pooled DEG selection (rows x genes), and the p and fold-change thresholds used per row."""
    n_rows, n_genes = chunk.statistic.shape
    valid = (chunk.var_high > 0) & (chunk.var_low > 0)  # the reference's np.std > 0 in both groups
    crit = stats.norm.isf(_P_FALLBACK / 2.0)  # t has heavier tails: every gene with p <= 0.05 passes this
    r, g = np.nonzero(valid & (np.abs(chunk.statistic) >= crit))
    p = t_pvalues(chunk.statistic[r, g], chunk.df[r, g])
    padj = bh_adjust_grouped(p, r, np.full(n_rows, n_genes)) if len(p) else p
    strict_hit = np.bincount(r[padj < _P_STRICT], minlength=n_rows) > 0
    p_thr = np.where(strict_hit, _P_STRICT, _P_FALLBACK)
    fc = paper_fold_change(chunk)
    use_fc = fc.max(axis=1) >= _FC
    fc_thr = np.where(use_fc, _FC, np.nan)
    fc_rg = fc[r, g]
    keep = (padj < p_thr[r]) & (~use_fc[r] | (fc_rg > _FC) | (fc_rg < 1.0 / _FC))
    sel = sp.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.int32), (r[keep], g[keep])), shape=(n_rows, n_genes)
    )
    sel.sort_indices()
    return sel, p_thr, fc_thr


class PaperAccumulator(ORAAccumulator):
    """Binomial + Mann-Whitney enrichment for every (feature, set); keeps rows passing the keep rule
    (or every row with ``keep_all``)."""

    def __init__(self, index: GeneSetIndex, keep_all: bool = False):
        super().__init__(index, store_pvalue=1.0 if keep_all else _KEEP_P)
        self.keep_all = keep_all
        self.extra_columns = (
            "binom_direction", "mw_pval", "z_score", "effect_size", "p_threshold", "fold_change_threshold",
            "keep_rule")
        # the reference's universe is every expression gene, and sets are counted among them
        self.n_genes = len(index.gene_names)
        self._M_all_T = index.membership.T.tocsr().astype(np.float64)
        self.universe_cols = np.arange(self.n_genes)
        self._M_T = index.membership.T.tocsr()

    def add_paper(self, chunk: DEChunk, features: np.ndarray) -> np.ndarray:
        sel, p_thr, fc_thr = paper_select_genes(chunk)
        features = np.asarray(features, dtype=np.int64)
        N = self.n_genes
        n_sets = self.index.n_sets
        for f in features:
            self._n_tests[int(f)] = self._n_tests.get(int(f), 0) + n_sets
        k = np.diff(sel.indptr).astype(np.int64)
        K = np.asarray((sel.astype(np.float64) @ self._M_all_T).todense(), dtype=np.int64)  # rows x sets
        n_c = self.index.set_sizes
        binom_p = np.ones(K.shape)
        has = k > 0
        if has.any():
            kk = np.broadcast_to(k[has, None], K[has].shape)
            binom_p[has] = binom_test_two_sided(K[has], kk, np.broadcast_to(n_c / N, K[has].shape))
        z, mw_p, effect = _mann_whitney(paper_fold_change(chunk), self._M_all_T, n_c, N)
        # every row with binomial p <= 0.05 is stored so that the BH columns are exact; the keep rule
        # (which also needs the MW p) is applied when the table is built
        store = np.ones(K.shape, dtype=bool) if self.keep_all else (binom_p <= _KEEP_P) & has[:, None]
        row, col = np.nonzero(store)
        passes = (binom_p[row, col] < _KEEP_P) & (mw_p[row, col] < _KEEP_P) & has[row]
        expected = k[row] * n_c[col] / N
        self._parts.append(
            {
                "feature": features[row], "set": col.astype(np.int64), "overlap": K[row, col],
                "n_selected": k[row], "logp": np.log(binom_p[row, col]),
                "direction": np.full(len(row), "both", dtype=object), "selection_row": row,
                "selection_id": np.full(len(row), len(self._parts), dtype=np.int64),
                "binom_direction": np.where(K[row, col] > expected, "+", "-").astype(object),
                "mw_pval": mw_p[row, col], "z_score": z[row, col], "effect_size": effect[row, col],
                "p_threshold": p_thr[row], "fold_change_threshold": fc_thr[row], "keep_rule": passes,
                "_selection": sel}
        )
        return k

    def table(self, **kwargs):
        kwargs["max_padj"] = None  # the keep rule replaces the padj filter
        out = super().table(**kwargs)
        if not self.keep_all:
            out = out[out["keep_rule"].to_numpy(dtype=bool)].reset_index(drop=True)
        return out.drop(columns="keep_rule")


def _mann_whitney(fc: np.ndarray, M_T: sp.csr_matrix, n_s: np.ndarray, n_genes: int):
    """The reference's rank test for every (row, set): z, one-tailed p on min(U), effect size."""
    order = np.argsort(fc, axis=1, kind="stable")
    ranks = np.empty_like(order, dtype=np.float64)
    np.put_along_axis(ranks, order, np.arange(1, n_genes + 1, dtype=np.float64)[None, :], axis=1)
    r_s = np.asarray(M_T.T @ ranks.T).T  # rows x sets: rank sums of set genes
    n_s = n_s.astype(np.float64)[None, :]
    n_t = n_genes - n_s
    r_t = n_genes * (n_genes + 1) / 2.0 - r_s
    u_s = n_s * n_t + n_s * (n_s + 1) / 2.0 - r_s
    u_t = n_s * n_t + n_t * (n_t + 1) / 2.0 - r_t
    u = np.minimum(u_s, u_t)
    sd = np.sqrt(n_s * n_t * (n_s + n_t + 1) / 12.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(sd > 0, (u - n_s * n_t / 2.0) / sd, 0.0)
        effect = np.where(sd > 0, u_s / (n_s * n_t), 0.0)
    p = np.where(sd > 0, special.ndtr(z), 1.0)
    return z, p, effect
