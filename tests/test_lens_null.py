"""The lens on realistic nulls (dgdlens.lens.null): every reported row is false there, so the fraction of
runs reporting anything estimates the FDR, which must stay near the nominal 5 %."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp

import dgdlens.lens as lens
from dgdlens.lens import null


def test_cluster_confounded_null_keeps_the_false_term_rate_at_the_nominal_fdr():
    """8 seeds of clustered counts with random marker genes and cluster-associated features permuted within
    clusters (many real DE genes per feature, none linked to a set). At FDR 0.05 the expected number of runs
    with a false row is <= 0.4; P(>= 3 of 8) is 0.006 if the FDR holds, so at most 2 are allowed."""
    runs, de_genes = [], []
    for seed in range(8):
        d = null.cluster_null(n_cells=1000, n_genes=1200, n_features=24, seed=seed)
        res, feats = lens.annotate(d.activations, d.counts, d.gene_names, d.gene_sets, min_set_size=5,
                                   max_padj=None, return_features=True)
        s = null.null_summary(res, feats)
        runs.append(s["fdp"])
        ok = feats["status"] == "ok"
        de_genes.append(float((feats.loc[ok, "n_up"] + feats.loc[ok, "n_down"]).mean()))
        assert s["mean_high_cells"] >= 20  # the documented minimum active group
    assert np.mean(de_genes) > 2  # the features do have DE genes (about 5 per feature): the null is not empty
    assert sum(runs) <= 2, runs


def test_within_cluster_permutation_keeps_each_clusters_values():
    rng = np.random.default_rng(0)
    clusters = rng.integers(0, 3, size=200)
    A = sp.csr_matrix(rng.exponential(size=(200, 4)) * (rng.random((200, 4)) < 0.3))
    P = null.permute_within_clusters(A, clusters, seed=1).toarray()
    D = A.toarray()
    for c in range(3):
        np.testing.assert_allclose(np.sort(P[clusters == c], axis=0), np.sort(D[clusters == c], axis=0))
    assert not np.allclose(P, D)


def test_shuffled_gene_sae_features_report_no_terms_and_splitting_cuts_false_de_genes():
    """Features of an SAE on gene-shuffled counts: no term at FDR 0.05 in any setting; the DE genes they get
    are all false (double dipping), and fitting the latents on the other half (full split) leaves fewer."""
    warnings.simplefilter("ignore")
    d = null.cluster_null(n_cells=1000, n_genes=400, n_features=2, seed=0)
    Xs = null.shuffle_genes(d.counts, seed=100)
    X_a, X_b = lens.split_counts(Xs, seed=200)
    kw = dict(n_latent=5, n_features=16, k=2, max_epochs=15, seed=0)
    F = null.shuffled_gene_features(Xs, **kw)
    F_a = null.shuffled_gene_features(Xs, fit_on=X_a, **kw)
    de = {}
    for name, (A, X, opts) in {"double_dip": (F, Xs, {"count_split": False}),
                               "full_split": (F_a, X_b, {"count_split": False})}.items():
        res, feats = lens.annotate(A, X, d.gene_names, d.gene_sets, min_set_size=3, max_padj=None,
                                   return_features=True, **opts)
        assert not res["significant"].any(), name
        ok = feats["status"] == "ok"
        de[name] = float((feats.loc[ok, "n_up"] + feats.loc[ok, "n_down"]).mean())
    assert de["full_split"] <= de["double_dip"], de
