"""dl.lens.annotate end to end: every row re-derived with scipy, planted signal recovered, null features and
random gene lists give about the false-positive rate BH promises, the paper mode, the AnnData wrapper,
local/global classification and input errors."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

import dgdlens.lens as lens
from dgdlens import tl


@pytest.fixture(scope="module")
def planted():
    return lens.planted_data(
        n_cells=3000, n_genes=2000, n_features=150, n_planted=20, gene_sets="hallmark",
        set_size_range=(15, 200), seed=0)


@pytest.fixture(scope="module")
def annotated(planted):
    res, feats = lens.annotate(
        planted.activations, planted.counts, planted.gene_names, planted.gene_sets, min_set_size=5,
        max_padj=None, return_features=True)
    return res, feats


def test_rows_match_scipy_hypergeom_and_bh(annotated, planted):
    res, feats = annotated
    assert list(res.columns[:15]) == [
        "feature", "term", "description", "direction", "overlap", "set_size", "n_selected", "universe_size",
        "expected", "fold_enrichment", "odds_ratio", "pval", "padj", "padj_global", "genes"]
    ref = stats.hypergeom.sf(res["overlap"] - 1, res["universe_size"], res["set_size"], res["n_selected"])
    np.testing.assert_allclose(res["pval"], ref, rtol=1e-9)
    # fisher_exact(greater) on one row's 2x2 table is the same test
    row = res.iloc[0]
    K, n, k, N = int(row.overlap), int(row.set_size), int(row.n_selected), int(row.universe_size)
    table = [[K, k - K], [n - K, N - n - k + K]]
    assert stats.fisher_exact(table, alternative="greater")[1] == pytest.approx(row.pval, rel=1e-9)
    # BH within each feature over every (direction, set) test; untouched sets count as p = 1
    n_sets = res.attrs["settings"]["n_sets"]
    for f, sub in list(res.groupby("feature"))[:10]:
        n_dirs = int(
            (feats.set_index("feature").loc[f, ["n_up_in_universe", "n_down_in_universe"]] > 0).sum()
        )
        p = np.r_[sub["pval"].to_numpy(), np.ones(n_dirs * n_sets - len(sub))]
        np.testing.assert_allclose(sub["padj"], stats.false_discovery_control(p)[: len(sub)], rtol=1e-9)
    # global BH over every test of the call
    m = res.attrs["settings"]["n_tests"]
    p = np.r_[res["pval"].to_numpy(), np.ones(m - len(res))]
    np.testing.assert_allclose(res["padj_global"], stats.false_discovery_control(p)[: len(res)], rtol=1e-9)
    # the listed genes are the overlap: in the set, and as many as the overlap count
    for _, r in res.head(50).iterrows():
        genes = r.genes.split(",")
        assert len(genes) == r.overlap and set(genes) <= set(planted.gene_sets[r.term])


def test_selection_agrees_with_the_full_de_table(planted, annotated):
    _, feats = annotated
    f = int(planted.truth.feature.iloc[0])
    table = lens.differential_expression(
        planted.activations, planted.counts, [f], gene_names=planted.gene_names
    )
    row = feats.set_index("feature").loc[f]
    assert (table.direction == "up").sum() == row.n_up and (table.direction == "down").sum() == row.n_down


def test_planted_sets_are_top_terms_and_null_features_are_quiet(planted, annotated):
    res, feats = annotated
    feats = feats.set_index("feature")
    truth = planted.truth.set_index("feature")
    recovered = np.mean([feats.loc[f, "top_term"] == truth.loc[f, "term"] for f in truth.index])
    assert recovered >= 0.9
    sig = res[res.padj < 0.05]
    null_features = feats.index.difference(truth.index)
    frac_null_with_terms = np.isin(null_features, sig.feature.unique()).mean()
    assert frac_null_with_terms <= 0.1  # BH at 5% per feature: about 5% at most under the null


def test_random_gene_lists_give_the_promised_false_positive_rate():
    # under the null every discovery is false, so P(any discovery in a list) <= alpha per list
    rng = np.random.default_rng(0)
    sets = lens.gene_sets("hallmark")
    universe = sorted(sets.genes())[:3000]
    lists = {f"L{i}": list(rng.choice(universe, 150, replace=False)) for i in range(400)}
    res = lens.enrich(lists, universe, sets, min_size=5, max_padj=0.05)
    frac = res["query"].nunique() / len(lists)
    assert frac <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / len(lists))
    assert (res["padj_global"] < 0.05).sum() <= 5


def test_min_active_cells_is_applied(planted):
    res, feats = lens.annotate(
        planted.activations, planted.counts, planted.gene_names, planted.gene_sets, min_set_size=5,
        min_active_cells=10_000, return_features=True)
    assert len(res) == 0 and set(feats["status"]) == {"too_few_active"}


def test_paper_mode_reproduces_the_reference_statistics(planted):
    res = lens.annotate(
        planted.activations, planted.counts, planted.gene_names, planted.gene_sets, compat="paper"
    )
    assert {"binom_direction", "mw_pval", "effect_size", "p_threshold", "fold_change_threshold"} <= set(
        res.columns
    )
    assert (res["pval"] < 0.05).all() and (res["mw_pval"] < 0.05).all()
    ref = [
        stats.binomtest(int(r.overlap), int(r.n_selected), r.set_size / r.universe_size).pvalue
        for r in res.itertuples()
    ]
    np.testing.assert_allclose(res["pval"], ref, rtol=1e-9)
    # one feature re-derived the reference's way: Welch on raw values, BH over all genes, DEG rule, MW
    f = int(planted.truth.feature.iloc[0])
    X = planted.counts.toarray().astype(np.float64)
    a = planted.activations[:, f].toarray().ravel()
    high, low = X[a > np.percentile(a, 99)], X[a == 0]
    valid = (high.std(0) > 0) & (low.std(0) > 0)
    p = np.ones(X.shape[1])
    p[valid] = stats.ttest_ind(high[:, valid], low[:, valid], equal_var=False).pvalue
    padj = stats.false_discovery_control(p)
    fc = high.mean(0) / (low.mean(0) + 1e-8)
    p_thr = 1e-5 if (padj < 1e-5).any() else 0.05
    deg = (padj < p_thr) & ((fc > 2) | (fc < 0.5)) if fc.max() >= 2 else padj < p_thr
    sub = res[res.feature == f]
    assert len(sub) and (sub["n_selected"] == deg.sum()).all() and (sub["p_threshold"] == p_thr).all()
    ranks = np.empty(len(fc))
    ranks[np.argsort(fc, kind="stable")] = np.arange(1, len(fc) + 1)
    names = list(planted.gene_names)
    for r in sub.head(3).itertuples():
        in_set = np.isin(names, planted.gene_sets[r.term])
        n_s, n_t = in_set.sum(), (~in_set).sum()
        u_s = n_s * n_t + n_s * (n_s + 1) / 2 - ranks[in_set].sum()
        u_t = n_s * n_t + n_t * (n_t + 1) / 2 - ranks[~in_set].sum()
        z = (min(u_s, u_t) - n_s * n_t / 2) / np.sqrt(n_s * n_t * (n_s + n_t + 1) / 12)
        assert r.mw_pval == pytest.approx(stats.norm.cdf(z), rel=1e-9)
        assert r.effect_size == pytest.approx(u_s / (n_s * n_t), rel=1e-9)
    truth = planted.truth.set_index("feature")
    top = res.sort_values("pval").drop_duplicates("feature").set_index("feature")["term"]
    assert np.mean([top.get(f) == truth.loc[f, "term"] for f in truth.index]) >= 0.8


def test_annotate_features_writes_uns_that_survives_h5ad(planted, tmp_path):
    """The AnnData verb is dl.tl.annotate_features: obsm[use_rep] in, uns[key_added] out, equal to lens.annotate."""
    adata = ad.AnnData(planted.counts)
    adata.var_names = list(planted.gene_names)
    adata.obsm["X_sae"] = planted.activations
    assert tl.annotate_features(adata, use_rep="X_sae", gene_sets="hallmark", min_set_size=5,
                                features=np.arange(40)) is None
    stored = adata.uns["dgdlens_lens"]
    assert set(stored) == {"results", "features", "settings", "gene_sets"}
    assert len(stored["features"]) == 40 and stored["gene_sets"]["name"] == "hallmark"
    assert stored["settings"]["use_rep"] == "X_sae" and stored["settings"]["layer"] == "None"
    res, feats = lens.annotate(planted.activations, planted.counts, planted.gene_names, "hallmark",
                               min_set_size=5, features=np.arange(40), return_features=True)
    pd.testing.assert_frame_equal(stored["results"], res)
    pd.testing.assert_frame_equal(stored["features"], feats)
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad").uns["dgdlens_lens"]
    pd.testing.assert_frame_equal(
        back["results"].reset_index(drop=True), res.reset_index(drop=True), check_dtype=False,
        check_index_type=False)
    with pytest.raises(ValueError, match="not in adata.obsm"):
        tl.annotate_features(adata, use_rep="X_missing")
    assert not hasattr(lens, "annotate_adata")  # one AnnData verb, not two


def test_annotate_features_layer_raw_reads_adata_raw(planted):
    """layer="raw" means adata.raw.X (and raw's genes), the one raw-data convention; copy=True leaves adata alone."""
    counts = sp.csr_matrix(planted.counts)
    adata = ad.AnnData(counts)
    adata.var_names = list(planted.gene_names)
    adata.raw = adata.copy()
    adata = adata[:, :500].copy()  # X has fewer genes than raw
    adata.X = sp.csr_matrix(adata.shape)
    adata.layers["counts"] = counts[:, :500]
    adata.obsm["X_sae"] = planted.activations
    out = tl.annotate_features(adata, gene_sets="hallmark", layer="raw", min_set_size=5, features=np.arange(10),
                               copy=True)
    assert "dgdlens_lens" not in adata.uns
    direct = lens.annotate(planted.activations, counts, planted.gene_names, "hallmark", min_set_size=5,
                           features=np.arange(10))
    pd.testing.assert_frame_equal(out.uns["dgdlens_lens"]["results"], direct)
    tl.annotate_features(adata, gene_sets="hallmark", layer="counts", min_set_size=5, features=np.arange(10),
                         key_added="lens_counts")
    layer_direct = lens.annotate(planted.activations, counts[:, :500], planted.gene_names[:500], "hallmark",
                                 min_set_size=5, features=np.arange(10))
    pd.testing.assert_frame_equal(adata.uns["lens_counts"]["results"], layer_direct)
    with pytest.raises(ValueError, match="not found"):
        tl.annotate_features(adata, layer="missing")


def test_classify_local_and_global_features():
    rng = np.random.default_rng(0)
    labels = np.repeat(["B", "NK", "T"], 300)
    A = np.zeros((900, 4))
    A[:300, 0] = rng.exponential(size=300)  # only in B cells: local
    A[:, 1] = rng.exponential(size=900) * (rng.uniform(size=900) < 0.3)  # everywhere alike: global
    A[300:, 2] = rng.exponential(size=600)  # NK and T: regional, counted as global
    table, sig = lens.classify_features(sp.csr_matrix(A), labels, return_significance=True)
    assert list(table["class"]) == ["local", "global", "global", "dead"]
    assert table.loc[0, "cell_type"] == "B" and table.loc[2, "n_significant_types"] == 2
    assert sig.loc[0].tolist() == [True, False, False]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"compat": "fast"}, "compat"), ({"max_padj": 2.0}, "max_padj"),
        ({"gene_sets": "kegg"}, "Unknown gene-set collection"),
        ({"gene_sets": {"S": "ABC"}}, "single string"), ({"low": "bottomless"}, "low must be")],
)
def test_bad_arguments_are_errors(planted, kwargs, match):
    args = {"gene_sets": planted.gene_sets, **kwargs}
    with pytest.raises(ValueError, match=match):
        lens.annotate(planted.activations[:200], planted.counts[:200], planted.gene_names, **args)


def test_mismatched_inputs_are_errors(planted):
    with pytest.raises(ValueError, match="same cells"):
        lens.annotate(planted.activations[:100], planted.counts[:200], planted.gene_names, "hallmark")
    with pytest.raises(ValueError, match="gene names"):
        lens.annotate(planted.activations, planted.counts, planted.gene_names[:-1], "hallmark")
    with pytest.raises(ValueError, match="NaN"):
        lens.annotate(np.full((200, 3), np.nan), planted.counts[:200], planted.gene_names, "hallmark")
    with pytest.raises(ValueError, match="None of the"):
        lens.annotate(planted.activations, planted.counts, [f"NOTAGENE{i}" for i in range(2000)], "hallmark")
