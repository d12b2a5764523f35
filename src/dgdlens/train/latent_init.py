"""Where the per-cell latents start: the origin (the reference DGD) or a PCA projection.

Why a projection: every latent takes one Adam step per epoch, and Adam moves a coordinate by about
the learning rate (1e-2) per step, so latents that start at the origin need a few hundred epochs just
to travel to the radius (~2) where the mixture's components sit - at any number of cells. Started
at the principal components of the log-normalised counts, scaled into that radius, cells of different
types are apart from the first epoch and the decoder learns a map from a sensible layout.

The components are fitted on a seeded sample of at most ``max_fit_cells`` training cells (sparse,
implicitly centred: nothing is densified) and every cell is projected in row chunks, so the cost is a
fraction of one epoch and works the same for data on disk and for each process's shard.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["pca_latents"]

TARGET_SIZE = 1e4  # counts per cell after normalisation (scanpy's normalize_total default)


def _log_normalised(block) -> sp.csr_matrix:
    """log1p(counts / row total x 1e4) of a row block, kept sparse (float64 for the SVD)."""
    x = sp.csr_matrix(block, dtype=np.float64, copy=True)
    totals = np.asarray(x.sum(axis=1)).ravel()
    totals[totals <= 0] = 1.0
    x.data *= np.repeat(TARGET_SIZE / totals, np.diff(x.indptr))
    np.log1p(x.data, out=x.data)
    return x


def pca_latents(matrix, fit_rows: np.ndarray, project_rows: list[np.ndarray], dim: int, *, radius: float,
                seed: int = 0, max_fit_cells: int = 10_000, chunk_size: int = 10_000) -> list[np.ndarray]:
    """PCA coordinates of cells, scaled so that 95 % of the fitted cells lie within ``radius``.

    Parameters
    ----------
    matrix
        A :class:`~dgdlens.data.RowMatrix` of counts (in memory or on disk).
    fit_rows
        Rows the components are fitted on (a seeded sample of at most ``max_fit_cells`` of them is used).
    project_rows
        Lists of rows to project (e.g. this process's training and validation cells).
    dim
        Latent dimensions. Components beyond what the data allow (features - 1, cells - 1) are zero.
    radius
        The 95th percentile of the fitted cells' norms after scaling (the mixture prior's softball radius).
    seed
        Seeds the sample and the eigensolver's start vector.
    max_fit_cells, chunk_size
        Sample size for the fit; rows per projected chunk.

    Returns
    -------
    list of numpy.ndarray
        One ``len(rows) x dim`` float32 array per entry of ``project_rows``.
    """
    from sklearn.decomposition import PCA

    fit_rows = np.asarray(fit_rows, dtype=np.int64)
    rng = np.random.default_rng([seed, 71])
    sample = np.sort(rng.choice(fit_rows, min(len(fit_rows), max_fit_cells), replace=False))
    x = _log_normalised(matrix.read_rows(sample))
    k = int(min(dim, x.shape[1] - 1, len(sample) - 1))
    if k < 1:
        return [np.zeros((len(r), dim), dtype=np.float32) for r in project_rows]
    # arpack on sparse input centres implicitly (a LinearOperator), so the sample is never densified
    pca = PCA(n_components=k, svd_solver="arpack", random_state=seed).fit(x)
    fitted = pca.transform(x)
    norms = np.linalg.norm(fitted, axis=1)
    scale = radius / max(float(np.quantile(norms, 0.95)), 1e-12)
    out = []
    for rows in project_rows:
        rows = np.asarray(rows, dtype=np.int64)
        z = np.zeros((len(rows), dim), dtype=np.float32)
        for start in range(0, len(rows), chunk_size):
            part = rows[start:start + chunk_size]
            z[start:start + len(part), :k] = pca.transform(_log_normalised(matrix.read_rows(part))) * scale
        out.append(z)
    return out
