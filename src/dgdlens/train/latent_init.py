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

__all__ = ["pca_latents", "pca_residuals"]

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
                seed: int = 0, max_fit_cells: int = 10_000, chunk_size: int = 10_000,
                residuals: bool = False) -> list[np.ndarray] | tuple[list[np.ndarray], list[np.ndarray]]:
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
    residuals
        Also return each projected cell's :func:`pca_residuals` score (from the same pass over the data).

    Returns
    -------
    list of numpy.ndarray
        One ``len(rows) x dim`` float32 array per entry of ``project_rows``; with ``residuals``, a tuple of
        that and one score array per entry.
    """
    pca, fitted = _fit_pca(matrix, fit_rows, dim, seed, max_fit_cells)
    if pca is None:
        starts = [np.zeros((len(r), dim), dtype=np.float32) for r in project_rows]
        return (starts, [np.zeros(len(r)) for r in project_rows]) if residuals else starts
    norms = np.linalg.norm(fitted, axis=1)
    scale = radius / max(float(np.quantile(norms, 0.95)), 1e-12)
    starts, scores = [], []
    for rows in project_rows:
        coords, score = _project(matrix, pca, rows, dim, chunk_size, scale)
        starts.append(coords)
        scores.append(score)
    return (starts, scores) if residuals else starts


def _fit_pca(matrix, fit_rows: np.ndarray, dim: int, seed: int, max_fit_cells: int):
    """(PCA fitted on a seeded sample of at most ``max_fit_cells`` of ``fit_rows``, the sample's coordinates);
    ``(None, None)`` when the data allow no component."""
    from sklearn.decomposition import PCA

    fit_rows = np.asarray(fit_rows, dtype=np.int64)
    rng = np.random.default_rng([seed, 71])
    sample = np.sort(rng.choice(fit_rows, min(len(fit_rows), max_fit_cells), replace=False))
    x = _log_normalised(matrix.read_rows(sample))
    k = int(min(dim, x.shape[1] - 1, len(sample) - 1))
    if k < 1:
        return None, None
    # arpack on sparse input centres implicitly (a LinearOperator), so the sample is never densified
    pca = PCA(n_components=k, svd_solver="arpack", random_state=seed).fit(x)
    return pca, pca.transform(x)


def _project(matrix, pca, rows, dim: int, chunk_size: int, scale: float,
             n_bins: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(``len(rows) x dim`` float32 coordinates times ``scale``, zero beyond the fitted components;
    :func:`pca_residuals` scores) of ``rows``, read in chunks."""
    rows = np.asarray(rows, dtype=np.int64)
    coords = np.zeros((len(rows), dim), dtype=np.float32)
    residual, log_library = np.empty(len(rows)), np.empty(len(rows))
    mean = pca.mean_
    for start in range(0, len(rows), chunk_size):
        block = matrix.read_rows(rows[start:start + chunk_size])
        x = _log_normalised(block)
        part = pca.transform(x)
        stop = start + len(part)
        coords[start:stop, :part.shape[1]] = part * scale
        # |x - mean|^2 - |projection|^2, kept sparse: |x|^2 - 2 x.mean + |mean|^2
        dist = np.asarray(x.multiply(x).sum(axis=1)).ravel() - 2 * (x @ mean) + mean @ mean
        residual[start:stop] = dist - (part ** 2).sum(axis=1)
        log_library[start:stop] = np.log(np.maximum(np.asarray(block.sum(axis=1)).ravel(), 1.0))
    return coords, _against_library(residual, log_library, n_bins)


def _against_library(residual: np.ndarray, log_library: np.ndarray, n_bins: int) -> np.ndarray:
    """``residual`` minus its median, over its median absolute deviation, within quantile bins of the
    library size (at least 100 cells per bin)."""
    if len(residual) == 0:
        return residual
    n_bins = max(1, min(int(n_bins), len(residual) // 100))
    edges = np.quantile(log_library, np.linspace(0, 1, n_bins + 1)[1:-1])
    bins = np.searchsorted(edges, log_library)
    out = np.empty(len(residual))
    for b in np.unique(bins):
        members = bins == b
        median = np.median(residual[members])
        spread = np.median(np.abs(residual[members] - median))
        out[members] = (residual[members] - median) / max(spread, 1e-12)
    return out


def pca_residuals(matrix, fit_rows: np.ndarray, rows: np.ndarray, dim: int, *, seed: int = 0,
                  max_fit_cells: int = 10_000, chunk_size: int = 10_000) -> np.ndarray:
    """How badly the first ``dim`` principal components explain each cell, for its library size.

    The squared distance of each cell's log-normalised counts from its projection on the components
    (fitted as in :func:`pca_latents`) is dominated by the library size (fewer counts, noisier logs), so it is
    compared with cells of a similar library: minus the median and over the median absolute deviation
    within 50 quantile bins of ``log(library)`` among ``rows``. A population too small to shape the top
    components (fitted on at most ``max_fit_cells``: a type of 0.2 % has about 20 cells there) leaves its
    own marker genes unexplained, so its cells stand out here; a larger one gets components of its own,
    and stands out in the coordinates instead.

    Parameters
    ----------
    matrix
        A :class:`~dgdlens.data.RowMatrix` of counts.
    fit_rows
        Rows the components are fitted on (a seeded sample of at most ``max_fit_cells``).
    rows
        Rows to score.
    dim
        Principal components.
    seed, max_fit_cells, chunk_size
        As in :func:`pca_latents` (the same arguments give the same components).

    Returns
    -------
    numpy.ndarray
        float64 per row of ``rows``; larger is worse explained. Zeros when the data allow no component.
    """
    return pca_latents(matrix, fit_rows, [rows], dim, radius=1.0, seed=seed, max_fit_cells=max_fit_cells,
                       chunk_size=chunk_size, residuals=True)[1][0]
