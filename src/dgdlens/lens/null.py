"""Realistic nulls for the lens: data in which every reported (feature, term) row is a false discovery.

The easy null (activations drawn independently of expression) misses the two ways real SAE features
mislead an enrichment analysis:

- **cluster confounding** (:func:`cluster_null`): cells fall into clusters whose marker genes are a random
  draw from the genes (so no gene set is truly linked to anything), and the features fire with
  cluster-dependent rates, permuted within clusters (:func:`permute_within_clusters`; the same operation
  turns a real SAE's activations into a null that keeps their cluster association). Every feature then
  has many real DE genes, correlated across features, but their link to any set is chance. Genes in
  ``n_high_sets`` sets are ``high_boost`` times more expressed, as housekeeping programs are in real data,
  which favours those sets whenever DE calls favour well-expressed genes;
- **double dipping** (:func:`shuffled_gene_features`): each gene's counts are permuted across cells (no
  program left), latents are the top principal components of the log-normalised counts, and a TopK SAE
  trained on them gives the features. Their active cells are chosen by the same noise the DE then tests.
  With ``fit_on=X_a`` (one binomial half of the counts) the latents see only that half, the count-splitting
  recipe of :mod:`dgdlens.lens.splitting`.

:func:`null_summary` turns an annotation table from such data into the false-term numbers that
``benchmarks/lens_null.py`` and ``tests/test_lens_null.py`` report.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .genesets import resolve_gene_sets

__all__ = ["cluster_null", "permute_within_clusters", "shuffle_genes", "shuffled_gene_features", "null_summary",
           "NullData"]


class NullData:
    """counts (CSR float32), activations (CSR float32), gene_names, clusters and the gene sets."""

    def __init__(self, counts, activations, gene_names, clusters, gene_sets):
        self.counts, self.activations, self.gene_names = counts, activations, gene_names
        self.clusters, self.gene_sets = clusters, gene_sets


def _genes(rng, sets, n_genes):
    pool = np.array(sorted(sets.genes()), dtype=object)
    n_in = min(len(pool), int(round(n_genes * 0.95)))
    return np.concatenate([rng.choice(pool, n_in, replace=False),
                           np.array([f"NOVEL{i}" for i in range(n_genes - n_in)], dtype=object)])


def _nb_counts(rng, mean: np.ndarray, dispersion: float) -> np.ndarray:
    lam = rng.gamma(1.0 / dispersion, dispersion * mean) if dispersion > 0 else mean
    return rng.poisson(lam).astype(np.float32)


def cluster_null(n_cells: int = 1500, n_genes: int = 2000, n_clusters: int = 6, n_features: int = 40, *,
                 gene_sets="hallmark", n_markers: int = 100, marker_lfc: float = 2.0, n_high_sets: int = 5,
                 high_boost: float = 4.0, library_size: float = 3000.0, dispersion: float = 0.2,
                 seed: int = 0) -> NullData:
    """Clustered NB counts with random marker genes and cluster-associated, within-cluster-permuted
    features (see the module docstring)."""
    rng = np.random.default_rng(seed)
    sets = resolve_gene_sets(gene_sets)
    genes = _genes(rng, sets, n_genes)
    base = rng.lognormal(0.0, 1.2, size=n_genes)
    col = {g: i for i, g in enumerate(genes)}
    terms = sorted(sets.keys())
    for t in rng.choice(np.array(terms, dtype=object), min(n_high_sets, len(terms)), replace=False):
        idx = [col[g] for g in sets[t] if g in col]
        base[idx] *= high_boost
    base *= library_size / base.sum()
    clusters = rng.integers(0, n_clusters, size=n_cells)
    lfc = np.zeros((n_clusters, n_genes))
    for c in range(n_clusters):
        markers = rng.choice(n_genes, n_markers, replace=False)
        lfc[c, markers] = rng.choice([-1.0, 1.0], n_markers) * marker_lfc * rng.uniform(0.5, 1.5, n_markers)
    lib = rng.lognormal(0.0, 0.3, size=n_cells)[:, None]
    mean = base[None, :] * np.exp2(lfc[clusters]) * lib
    counts = sp.csr_matrix(_nb_counts(rng, mean, dispersion))
    # features: each prefers one or two clusters (firing rate 30 %) and fires at 2 % elsewhere
    rate = np.full((n_clusters, n_features), 0.02)
    for f in range(n_features):
        rate[rng.choice(n_clusters, rng.integers(1, 3), replace=False), f] = 0.3
    fires = rng.random((n_cells, n_features)) < rate[clusters]
    A = np.where(fires, rng.exponential(1.0, size=fires.shape), 0.0).astype(np.float32)
    A = permute_within_clusters(sp.csr_matrix(A), clusters, seed=seed + 1)
    return NullData(counts, A, genes, clusters, sets)


def permute_within_clusters(activations, clusters, seed: int = 0) -> sp.csr_matrix:
    """Each feature's activations permuted among the cells of each cluster independently (keeps every
    feature's per-cluster distribution, removes any link to expression within clusters)."""
    A = sp.csc_matrix(activations, dtype=np.float32) if sp.issparse(activations) else sp.csc_matrix(
        np.asarray(activations, dtype=np.float32))
    clusters = np.asarray(clusters)
    rng = np.random.default_rng(seed)
    dense = A.toarray()
    for c in np.unique(clusters):
        cells = np.flatnonzero(clusters == c)
        for f in range(dense.shape[1]):
            dense[cells, f] = dense[rng.permutation(cells), f]
    return sp.csr_matrix(dense)


def shuffle_genes(counts, seed: int = 0) -> sp.csr_matrix:
    """Each gene's values permuted across cells independently (no co-expression left)."""
    X = sp.csc_matrix(counts, dtype=np.float32, copy=True)
    rng = np.random.default_rng(seed)
    n = X.shape[0]
    for j in range(X.shape[1]):
        a, b = X.indptr[j], X.indptr[j + 1]
        X.indices[a:b] = rng.choice(n, b - a, replace=False)
    X.has_sorted_indices = False
    X.sort_indices()
    return sp.csr_matrix(X)


def shuffled_gene_features(counts, *, fit_on=None, n_latent: int = 10, n_features: int = 32, k: int = 4,
                           max_epochs: int = 30, seed: int = 0) -> sp.csr_matrix:
    """SAE activations of cells whose latents are the top PCs of log-normalised ``fit_on`` (default the
    counts themselves, i.e. double dipping; pass the other binomial half to split)."""
    import torch

    from ..sae import train_sae

    X = sp.csr_matrix(counts if fit_on is None else fit_on, dtype=np.float64)
    sums = np.asarray(X.sum(axis=1)).ravel()
    L = sp.diags(1e4 / np.maximum(sums, 1.0)) @ X
    L.data = np.log1p(L.data)
    D = L.toarray()
    D -= D.mean(axis=0, keepdims=True)
    U, S, _ = np.linalg.svd(D, full_matrices=False)
    Z = (U[:, :n_latent] * S[:n_latent] / np.sqrt(len(D))).astype(np.float32)
    torch.manual_seed(seed)
    sae = train_sae(Z, kind="topk", n_latents=n_features, k=k, max_epochs=max_epochs, device="cpu", seed=seed,
                    progress=False)
    return sp.csr_matrix(sae.encode(Z), dtype=np.float32)


def null_summary(results: pd.DataFrame, features: pd.DataFrame | None = None) -> dict:
    """False-term numbers of an annotation of null data: every significant row is false, so the FDP of
    the run is 1 if anything is reported and 0 otherwise (its mean over runs estimates the FDR)."""
    sig = results[results["significant"].to_numpy(dtype=bool)] if len(results) else results
    out = {
        "false_rows": int(len(sig)),
        "features_with_false_terms": int(sig["feature"].nunique()) if len(sig) else 0,
        "fdp": float(len(sig) > 0),
        "min_padj_global": float(results["padj_global"].min()) if len(results) else 1.0,
    }
    if features is not None:
        out["features_tested"] = int((features["status"] == "ok").sum())
        out["mean_high_cells"] = float(features.loc[features["status"] == "ok", "n_high"].mean())
    return out
