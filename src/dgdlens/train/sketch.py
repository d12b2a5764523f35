"""A sample of cells spread evenly over where the cells are, not over the cells (a grid sketch).

A uniform sample keeps each population's share: a type of 0.2 % of the cells has 0.2 % of the sample.
Here the cells are put in boxes by which side of the median they lie on along each of their first
coordinates (the PCA starts' first 16: up to 2^16 boxes, the occupied ones a few thousand), and each box
gives the same number of cells, or all of its cells when it has fewer. A rare population, unusual in
several coordinates at once, fills boxes of its own that few other cells share, so it is kept nearly
whole while the boxes of common types are thinned (in the spirit of geometric sketching, Hie et al.
2019). Each kept cell's weight is its box's size over the box's take, so weighted sums over the sample
estimate sums over every cell.
"""

from __future__ import annotations

import numpy as np

__all__ = ["sketch_sample", "equal_takes", "grid_boxes", "residual_sample"]


def equal_takes(counts: np.ndarray, n_take: int, rng: np.random.Generator) -> np.ndarray:
    """How many cells each box gives: the same number ``q`` from every box (all of a smaller box's), ``q``
    the largest for which the total stays within ``n_take``; the few cells still missing come one each
    from randomly chosen boxes with cells left."""
    counts = np.asarray(counts, dtype=np.int64)
    n_take = int(min(n_take, counts.sum()))
    ordered = np.sort(counts)
    # total taken at quota q = sum(min(c, q)); find the largest q with total <= n_take
    below = np.concatenate([[0], np.cumsum(ordered)])
    n = len(ordered)
    lo, hi = 0, int(ordered[-1]) if n else 0
    while lo < hi:
        q = (lo + hi + 1) // 2
        k = np.searchsorted(ordered, q, side="left")  # boxes smaller than q give all their cells
        if below[k] + q * (n - k) <= n_take:
            lo = q
        else:
            hi = q - 1
    takes = np.minimum(counts, lo)
    missing = n_take - int(takes.sum())
    if missing > 0:
        open_boxes = np.flatnonzero(counts > takes)
        takes[rng.choice(open_boxes, missing, replace=False)] += 1
    return takes


def grid_boxes(z: np.ndarray, n_dims: int = 16) -> np.ndarray:
    """Box of each row: its side of the median along each of the first ``n_dims`` columns, as ``0..m-1``."""
    keys = np.zeros(len(z), dtype=np.int64)
    for j in range(min(n_dims, z.shape[1])):
        keys = keys * 2 + (z[:, j] > np.median(z[:, j]))
    return np.unique(keys, return_inverse=True)[1].reshape(-1)


def sketch_sample(z: np.ndarray, n_take: int, rng: np.random.Generator, *, n_dims: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Sorted positions of ``n_take`` rows of ``z`` spread evenly over its occupied grid boxes, and weights.

    Parameters
    ----------
    z
        ``n x d`` coordinates (e.g. the cells' PCA starts, largest variance first).
    n_take
        Rows to keep (all when ``n_take >= n``).
    rng
        Draws the rows each box gives.
    n_dims
        Coordinates the grid splits (at their medians).

    Returns
    -------
    positions : numpy.ndarray
        int64, increasing.
    weights : numpy.ndarray
        float64 per kept row: its box's size over the box's take (they sum to ``n``).
    """
    n = len(z)
    if n_take >= n:
        return np.arange(n), np.ones(n)
    boxes = grid_boxes(z, n_dims)
    counts = np.bincount(boxes)
    takes = equal_takes(counts, n_take, rng)
    # a random order within each box: the first takes[b] rows of box b are kept
    order = np.lexsort((rng.random(n), boxes))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank_in_box = np.empty(n, dtype=np.int64)
    rank_in_box[order] = np.arange(n) - starts[boxes[order]]
    kept = np.flatnonzero(rank_in_box < takes[boxes])
    return kept, counts[boxes[kept]] / takes[boxes[kept]]


#: Share of a ``"residual"`` sample given to the cells the PCA start explains worst (the rest is uniform).
RESIDUAL_SHARE = 0.1


def residual_sample(scores: np.ndarray, n_take: int, rng: np.random.Generator, *,
                    share: float = RESIDUAL_SHARE) -> tuple[np.ndarray, np.ndarray]:
    """Sorted positions of ``n_take`` rows: the ``share`` of them with the highest ``scores`` for certain, the
    rest drawn uniformly from the others; and Horvitz-Thompson weights (1 for the certain rows, ``others /
    drawn`` for the drawn ones, so they sum to ``n``).

    Parameters
    ----------
    scores
        Per row, larger = more in need of a place (e.g. :func:`~dgdlens.train.pca_residuals`).
    n_take
        Rows to keep (all when ``n_take >= n``).
    rng
        Draws the uniform part.
    share
        Share of ``n_take`` taken by score.

    Returns
    -------
    positions : numpy.ndarray
        int64, increasing.
    weights : numpy.ndarray
        float64 per kept row.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if n_take >= n:
        return np.arange(n), np.ones(n)
    n_top = int(round(share * n_take))
    order = np.argsort(-scores, kind="stable")
    top, others = order[:n_top], order[n_top:]
    drawn = rng.choice(others, n_take - n_top, replace=False)
    kept = np.concatenate([top, drawn])
    weights = np.concatenate([np.ones(n_top), np.full(len(drawn), len(others) / max(len(drawn), 1))])
    sort = np.argsort(kept)
    return kept[sort], weights[sort]
