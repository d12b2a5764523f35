"""Lens building blocks checked against scipy / numpy: hypergeometric tails, BH, binomial test, Welch,
Wilcoxon, percentiles, cell groups and expression preparation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

from dgdlens.lens import differential_expression, hypergeom_pvalues, make_feature_groups, prepare_expression
from dgdlens.stats import bh_adjust, bh_adjust_grouped, binom_test_two_sided
from dgdlens.lens.groups import column_percentiles


def test_hypergeom_pvalues_equal_scipy_including_tiny_tails():
    rng = np.random.default_rng(0)
    N = 15000
    n = rng.integers(5, 600, size=3000)
    k = rng.integers(1, 400, size=3000)
    K = np.minimum(rng.integers(0, 60, size=3000), np.minimum(n, k))
    # add extreme overlaps (p far below 1e-100) and the edges of the support
    n = np.r_[n, 200, 200, 50]
    k = np.r_[k, 200, 150, 10]
    K = np.r_[K, 200, 150, 0]
    ours = hypergeom_pvalues(K, n, k, N)
    ref = stats.hypergeom.sf(K - 1, N, n, k)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=0)
    assert ours[-1] == 1.0 and ours[-3] < 1e-300


def test_hypergeom_pvalues_refuse_values_outside_the_universe():
    # before, (K=0, n=12, k=5, N=10) aliased the packed key of another triple and returned 0.5
    np.testing.assert_allclose(hypergeom_pvalues([3, 6], [8, 8], [5, 7], 10),
                               stats.hypergeom.sf(np.array([2, 5]), 10, [8, 8], [5, 7]), rtol=1e-12)
    assert hypergeom_pvalues(6, 5, 5, 10)[0] == 0.0  # an overlap larger than the set: probability 0
    for args, match in (((0, 12, 5, 10), "n \\(set size\\)"), ((0, 5, 11, 10), "k \\(selection size\\)"),
                        ((-1, 5, 5, 10), "K \\(overlap\\)"), ((0, 5, 5, -3), "N"), ((1.5, 5, 5, 10), "integers")):
        with pytest.raises(ValueError, match=match):
            hypergeom_pvalues(*args)


def test_bh_matches_scipy_and_grouped_bh_counts_missing_tests_as_one():
    rng = np.random.default_rng(1)
    p = rng.uniform(size=500) ** 3
    np.testing.assert_allclose(bh_adjust(p), stats.false_discovery_control(p), rtol=1e-12)
    # three groups; each has 40 tests of which only some p-values are given (the rest are p = 1)
    groups = rng.integers(0, 3, size=60)
    q = rng.uniform(size=60) ** 4
    padj = bh_adjust_grouped(q, groups, np.array([40, 40, 40]))
    for g in range(3):
        sel = groups == g
        full = np.r_[q[sel], np.ones(40 - sel.sum())]
        np.testing.assert_allclose(padj[sel], stats.false_discovery_control(full)[: sel.sum()], rtol=1e-12)


def test_two_sided_binomial_equals_scipy_binomtest():
    rng = np.random.default_rng(2)
    n = rng.integers(1, 300, size=400)
    k = (rng.uniform(size=400) * (n + 1)).astype(int).clip(0, n)
    p = rng.uniform(0.001, 0.3, size=400)
    ours = binom_test_two_sided(k, n, p)
    ref = np.array(
        [stats.binomtest(int(a), int(b), float(c)).pvalue for a, b, c in zip(k, n, p, strict=True)]
    )
    np.testing.assert_allclose(ours, ref, rtol=1e-9)


def test_column_percentiles_equal_numpy_on_sparse_and_signed_columns():
    rng = np.random.default_rng(3)
    dense = rng.exponential(size=(300, 20)) * (rng.uniform(size=(300, 20)) < 0.2)
    dense[:, :3] -= 0.5 * (dense[:, :3] == 0)  # some columns with negative values too
    A = sp.csc_matrix(dense)
    for q in (0, 1, 37.5, 50, 99, 100):
        np.testing.assert_allclose(
            column_percentiles(A, q), np.percentile(dense, q, axis=0), rtol=1e-12, atol=1e-12
        )


def _dense(X) -> np.ndarray:
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)


def _small_data(seed=0, n=600, genes=40, features=6):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.gamma(1.0, 1.0, size=genes) * 2, size=(n, genes)).astype(float)
    A = rng.exponential(size=(n, features)) * (rng.uniform(size=(n, features)) < 0.2)
    counts[A[:, 0] > 1.0, :5] += 4  # feature 0 raises genes 0-4
    return counts, A, [f"G{i}" for i in range(genes)]


def test_welch_statistics_equal_scipy_ttest_ind():
    counts, A, names = _small_data()
    table = differential_expression(
        A, counts, [0, 1], gene_names=names, percentile=90, max_low_cells=None, variance_guard=None,
        high="percentile", count_split=False,
        min_active_cells=5)
    X = _dense(prepare_expression(counts, names).X)
    for f in (0, 1):
        a = A[:, f]
        high = (a > np.percentile(a, 90)) & (a != 0)
        low = a == 0
        ref = stats.ttest_ind(X[high], X[low], equal_var=False)
        sub = table[table.feature == f].set_index("gene").loc[names]
        ok = sub["tested"].to_numpy()
        np.testing.assert_allclose(sub["statistic"].to_numpy()[ok], ref.statistic[ok], rtol=1e-9)
        np.testing.assert_allclose(sub["pval"].to_numpy()[ok], ref.pvalue[ok], rtol=1e-8, atol=1e-300)
        # BH across the tested genes
        np.testing.assert_allclose(
            sub["padj"].to_numpy()[ok], stats.false_discovery_control(ref.pvalue[ok]), rtol=1e-8
        )
    top = table[(table.feature == 0) & (table.direction == "up")]["gene"]
    assert set(top) >= {"G0", "G1", "G2", "G3", "G4"}


def test_wilcoxon_equals_scipy_mannwhitneyu():
    counts, A, names = _small_data(seed=4)
    table = differential_expression(
        A, counts, [0], gene_names=names, percentile=90, max_low_cells=None, test="wilcoxon",
        high="percentile", count_split=False,
        min_active_cells=5)
    X = _dense(prepare_expression(counts, names).X)
    a = A[:, 0]
    high, low = (a > np.percentile(a, 90)) & (a != 0), a == 0
    ref = stats.mannwhitneyu(X[high], X[low], method="asymptotic", use_continuity=True)
    sub = table.set_index("gene").loc[names]
    np.testing.assert_allclose(sub["pval"].to_numpy(), ref.pvalue, rtol=1e-8)


def test_groups_high_low_and_min_active_cells_applied():
    rng = np.random.default_rng(5)
    n = 1000
    A = np.zeros((n, 4))
    A[rng.choice(n, 300, replace=False), 0] = rng.exponential(size=300)
    A[rng.choice(n, 10, replace=False), 1] = 1.0 + rng.uniform(size=10)  # too few active cells
    A[:, 2] = rng.exponential(size=n)  # dense feature: never silent
    g = make_feature_groups(A, percentile=99, max_low_cells=200, min_active_cells=20, seed=0)
    status = g.summary.set_index("feature")["status"]
    assert status[1] == "too_few_active" and status[3] == "dead" and status[2] == "too_few_low"
    assert list(g.features) == [0]
    high = g.high_cells(0)
    # the top max(min_active_cells, 1 % of cells) = 20 active cells (the 99th percentile alone gives 10)
    np.testing.assert_array_equal(high, np.sort(np.argsort(-A[:, 0], kind="stable")[:20]))
    assert len(np.flatnonzero(A[:, 0] > np.percentile(A[:, 0], 99))) == 10
    low = g.low_cells(0)
    assert len(low) == 200 and np.all(A[low, 0] == 0)
    # the subsample is seeded: same seed same cells, another seed other cells
    again = make_feature_groups(A, percentile=99, max_low_cells=200, min_active_cells=20, seed=0)
    other = make_feature_groups(A, percentile=99, max_low_cells=200, min_active_cells=20, seed=1)
    np.testing.assert_array_equal(again.low_cells(0), low)
    assert not np.array_equal(other.low_cells(0), low)


def test_prepare_expression_detects_kind_and_normalises():
    counts, _, names = _small_data()
    prep = prepare_expression(sp.csr_matrix(counts), names)
    assert prep.kind == "counts"
    expected = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(_dense(prep.X), expected, rtol=1e-6)
    assert prepare_expression(expected, names).kind == "lognorm"
    means = counts / counts.sum(1, keepdims=True)
    assert prepare_expression(means + 1e-9, names).kind == "means"


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (lambda X: np.where(np.arange(X.shape[1]) == 0, np.nan, X), "NaN"),
        (lambda X: X - 5.0, "negative"),
    ],
)
def test_prepare_expression_rejects_bad_values(bad, match):
    counts, _, names = _small_data()
    with pytest.raises(ValueError, match=match):
        prepare_expression(bad(counts), names)


def test_prepare_expression_rejects_bad_gene_names():
    counts, _, names = _small_data()
    with pytest.raises(ValueError, match="gene names"):
        prepare_expression(counts, names[:-1])
    with pytest.raises(ValueError, match="duplicates"):
        prepare_expression(counts, ["A"] * counts.shape[1])


@pytest.mark.parametrize("guard", ["floor", "overestim", None])
def test_compiled_and_numpy_paths_agree(guard):
    from dgdlens.lens._kernels import numba_available

    if not numba_available():
        pytest.skip("numba not available")
    counts, A, names = _small_data(seed=6, genes=60, features=10)
    counts[:, 7] = 0  # a gene that is zero everywhere, and one that is constant
    counts[:, 8] = 3
    kw = dict(gene_names=names, percentile=80, variance_guard=guard, min_active_cells=5, max_low_cells=150,
              count_split=False)
    fast = differential_expression(A, counts, np.arange(10), engine="auto", **kw).sort_values(
        ["feature", "gene"]
    )
    slow = differential_expression(A, counts, np.arange(10), engine="scipy", **kw).sort_values(
        ["feature", "gene"]
    )
    for col in ("mean_high", "mean_low", "statistic", "df", "pval", "padj"):
        np.testing.assert_allclose(fast[col], slow[col], rtol=1e-9, atol=1e-12, err_msg=col)
    assert (fast["tested"] == slow["tested"]).all() and (fast["direction"] == slow["direction"]).all()
