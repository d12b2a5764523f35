"""Bundled and local datasets. Nothing here downloads: every loader reads a file on disk or in a wheel."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["pbmc68k_counts"]


def pbmc68k_counts(*, keep_scanpy_fields: bool = False):
    """Scanpy's bundled ``pbmc68k_reduced`` (700 cells x 765 genes) as exact integer UMI counts.

    The file stores ``raw.X = log1p(counts / n_counts * 1e4)`` where ``obs["n_counts"]`` is the cell's
    full-library total; ``rint(expm1(raw.X) * n_counts / 1e4)`` recovers the counts exactly (largest
    deviation from an integer: 0.08). ``X`` is CSR int-valued float32, also in ``layers["counts"]``.
    ``obs["bulk_labels"]`` holds 10 noisy cell-type labels (correlation with sorted bulk profiles).
    Library sizes for the DGD are the row sums over these 765 genes, not ``n_counts``.

    Parameters
    ----------
    keep_scanpy_fields
        Keep scanpy's processed fields of ``pbmc68k_reduced`` (PCA, neighbours, UMAP, ...) as well.

    Returns
    -------
    anndata.AnnData
        700 cells x 765 genes with exact integer counts in ``X`` and ``layers["counts"]`` and the cell
        annotations (``bulk_labels``, ...) in ``obs``.
    """
    import anndata as ad
    import scanpy as sc

    src = sc.datasets.pbmc68k_reduced()
    logn = src.raw.X.toarray() if sp.issparse(src.raw.X) else np.asarray(src.raw.X)
    counts = np.rint(np.expm1(logn) * src.obs["n_counts"].to_numpy()[:, None] / 1e4).astype(np.float32)
    X = sp.csr_matrix(counts)
    obs = src.obs[["bulk_labels", "n_counts", "n_genes", "percent_mito", "louvain", "phase"]].copy()
    obs = obs.rename(columns={"n_counts": "n_counts_full_library"})
    adata = ad.AnnData(X=X, obs=obs, var=src.raw.var[[]].copy())
    adata.layers["counts"] = X.copy()
    if keep_scanpy_fields:
        adata.obsm["X_umap_scanpy"] = src.obsm["X_umap"]
    adata.uns["dataset"] = {
        "name": "pbmc68k_reduced",
        "source": "scanpy.datasets.pbmc68k_reduced (Zheng et al. 2017, 10x Genomics); counts recovered exactly",
    }
    return adata
