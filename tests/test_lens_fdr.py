"""The lens' statistical safeguards: the active-group minimum, the global FDR, count splitting, the
expression-matched background and the collapse of redundant terms."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import dgdlens.lens as lens
from dgdlens.lens.groups import make_feature_groups


def test_active_group_is_the_top_max_min_cells_or_fraction():
    rng = np.random.default_rng(0)
    n = 700
    A = np.zeros((n, 3))
    A[rng.choice(n, 300, replace=False), 0] = rng.exponential(size=300)
    A[rng.choice(n, 15, replace=False), 1] = rng.exponential(size=15)  # fewer active cells than the minimum
    A[:, 2] = rng.exponential(size=n)
    g = make_feature_groups(sp.csr_matrix(A), min_active_cells=20)
    s = g.summary.set_index("feature")
    # top 1 % of 700 cells is 7; the documented minimum of 20 applies
    assert s.loc[0, "n_high"] == 20 and s.loc[2, "n_high"] == 20
    assert s.loc[1, "status"] == "too_few_active" and 1 not in g.features
    np.testing.assert_array_equal(np.sort(g.high_cells(0)), np.sort(np.argsort(-A[:, 0])[:20]))
    assert s.loc[0, "high_threshold"] == pytest.approx(np.sort(A[:, 0])[-20])
    # a larger fraction wins over the minimum: top 10 % = 70 cells
    g90 = make_feature_groups(sp.csr_matrix(A), percentile=90.0, min_active_cells=20)
    assert g90.summary.set_index("feature").loc[2, "n_high"] == 70
    # the reference rule (compat="paper") keeps its percentile groups: 7 cells here
    gp = make_feature_groups(sp.csr_matrix(A), min_active_cells=20, high="percentile")
    assert gp.summary.set_index("feature").loc[2, "n_high"] == 7


@pytest.fixture(scope="module")
def planted():
    return lens.planted_data(n_cells=1500, n_genes=1500, n_features=60, n_planted=10, gene_sets="hallmark",
                             set_size_range=(15, 200), seed=1)


def test_significant_and_the_filter_use_the_global_fdr(planted):
    res = lens.annotate(planted.activations, planted.counts, planted.gene_names, planted.gene_sets, min_set_size=5)
    assert len(res) and (res["padj_global"] <= 0.05).all() and res["significant"].all()
    full = lens.annotate(planted.activations, planted.counts, planted.gene_names, planted.gene_sets,
                         min_set_size=5, max_padj=None)
    np.testing.assert_array_equal(full["significant"], full["padj_global"] <= 0.05)
    assert full.attrs["settings"]["fdr"] == "global"
    per = lens.annotate(planted.activations, planted.counts, planted.gene_names, planted.gene_sets,
                        min_set_size=5, fdr="per_feature")
    assert (per["padj"] <= 0.05).all() and len(per) >= len(res)  # per-feature BH admits more rows


def test_count_split_halves_and_is_on_for_counts_only(planted):
    X = planted.counts
    X_a, X_b = lens.split_counts(X, seed=3)
    np.testing.assert_array_equal((X_a + X_b).toarray(), X.toarray())
    assert abs(X_a.sum() / X.sum() - 0.5) < 0.01
    assert np.all(X_a.data == np.round(X_a.data)) and X_b.data.min() >= 0
    res = lens.annotate(planted.activations, X, planted.gene_names, planted.gene_sets, min_set_size=5,
                        features=np.arange(10))
    assert res.attrs["settings"]["count_split_applied"] is True
    # the DE is on X_b: identical to passing X_b without splitting
    same = lens.annotate(planted.activations, lens.split_counts(X, seed=0)[1], planted.gene_names,
                         planted.gene_sets, min_set_size=5, features=np.arange(10), count_split=False)
    assert len(res)
    pd.testing.assert_frame_equal(res.reset_index(drop=True), same.reset_index(drop=True), check_like=True)
    logn = sp.csr_matrix(X, dtype=np.float32)
    logn.data = np.log1p(logn.data) + 0.01
    res_l = lens.annotate(planted.activations, logn, planted.gene_names, planted.gene_sets, min_set_size=5,
                          features=np.arange(5))
    assert res_l.attrs["settings"]["count_split_applied"] is False
    with pytest.raises(ValueError, match="integer counts"):
        lens.annotate(planted.activations, logn, planted.gene_names, planted.gene_sets, count_split=True)
    # planted signal survives the halving
    _, feats = lens.annotate(planted.activations, X, planted.gene_names, planted.gene_sets, min_set_size=5,
                             return_features=True)
    truth = planted.truth.set_index("feature")
    top = feats.set_index("feature")["top_term"]
    assert np.mean([top[f] == truth.loc[f, "term"] for f in truth.index]) >= 0.8


def test_matched_background_removes_the_expression_bias():
    """Genes are selected with probability rising with expression and three sets are highly expressed: the
    whole-universe test calls them enriched in most lists, the matched background at about the nominal rate."""
    rng = np.random.default_rng(0)
    sets = lens.gene_sets("hallmark")
    universe = sorted(sets.genes())[:3000]
    means = rng.lognormal(0, 1, size=len(universe))
    pos = {g: i for i, g in enumerate(universe)}
    high_terms = ["HALLMARK_MYC_TARGETS_V1", "HALLMARK_OXIDATIVE_PHOSPHORYLATION", "HALLMARK_E2F_TARGETS"]
    for t in high_terms:
        idx = [pos[g] for g in sets[t] if g in pos]
        means[idx] *= 6
    prob = np.argsort(np.argsort(means)) ** 3.0
    prob /= prob.sum()
    lists = {f"L{i}": list(np.asarray(universe)[rng.choice(len(universe), 150, replace=False, p=prob)])
             for i in range(40)}
    plain = lens.enrich(lists, universe, sets, min_size=5, max_padj=None)
    matched = lens.enrich(lists, universe, sets, min_size=5, max_padj=None, background="matched",
                          gene_means=dict(zip(universe, means, strict=True)))
    frac_plain = plain[plain.significant]["query"].nunique() / len(lists)
    frac_matched = matched[matched.significant]["query"].nunique() / len(lists)
    assert frac_plain > 0.5
    assert frac_matched <= 0.15  # nominal 0.05 per list under the global BH; 40 lists
    assert (matched["universe_size"] < len(universe)).all()
    # hypergeometric columns are computed in the matched universe
    from scipy import stats

    np.testing.assert_allclose(
        matched["pval"], stats.hypergeom.sf(matched["overlap"] - 1, matched["universe_size"], matched["set_size"],
                                            matched["n_selected"]), rtol=1e-9)


def test_redundant_terms_collapse_into_the_most_specific():
    genes_child = ",".join(f"HLA-D{i}" for i in range(8))
    genes_parent = genes_child + ",CD74,CIITA"
    genes_other = "A,B,C,D,E,F"
    res = pd.DataFrame({
        "feature": [0, 0, 0, 0, 1], "term": ["parent", "child", "other", "weak", "child"],
        "direction": ["up"] * 5, "set_size": [200, 15, 40, 30, 15], "pval": [1e-12, 1e-10, 1e-5, 0.5, 1e-6],
        "genes": [genes_parent, genes_child, genes_other, genes_child, genes_child],
        "significant": [True, True, True, False, True]})
    marked = lens.mark_redundant(res)
    m = marked.set_index(["feature", "term"])
    assert m.loc[(0, "parent"), "collapsed_into"] == "child"  # Jaccard 8/10 with the more specific term
    assert m.loc[(0, "child"), "n_collapsed"] == 1 and m.loc[(0, "child"), "collapsed_terms"] == "parent"
    assert m.loc[(0, "other"), "collapsed_into"] == "" and m.loc[(0, "weak"), "collapsed_into"] == ""
    assert m.loc[(1, "child"), "collapsed_into"] == ""  # other features are separate
    short = lens.collapse_terms(res)
    assert sorted(short["term"]) == ["child", "child", "other"]
