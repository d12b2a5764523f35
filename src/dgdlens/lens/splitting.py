"""Count splitting for the lens: test differential expression on a binomial half of the counts.

Binomial thinning splits each count ``x`` into ``x_a ~ Binomial(x, 1/2)`` and ``x_b = x - x_a``. For
Poisson counts the two halves are independent given the cell's expression rates (Neufeld et al. 2022,
"Inference after latent variable estimation for single-cell RNA sequencing data"); for negative binomial
counts they are close to independent when the overdispersion is small.

What :func:`dgdlens.lens.annotate` does with it (``count_split="auto"``, on for integer counts): the
activation groups stay as given and the DE statistics are computed on ``x_b`` only.

- **What this removes:** nothing of the selection if the activations were computed from all counts. It
  removes the double dipping only when the activations were computed from ``x_a`` (latents inferred from
  ``x_a`` with a frozen decoder, then ``sae.encode``): then the groups are a function of ``x_a`` alone and
  the tests on ``x_b`` are valid. :func:`split_counts` gives both halves for that recipe, and
  ``annotate(F_from_x_a, x_b, count_split=False)`` runs it.
- **What it does not remove with activations from all counts:** the latents (hence the groups) were fitted
  on ``x_a + x_b``, so the noise in ``x_b`` still influenced which cells are "high". The split halves the
  share of the tested noise that the fit saw, which reduces but does not remove the bias
  (``benchmarks/lens_null.py`` measures both settings). It also halves the counts the tests use, so the
  power is lower.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ._kernels import binomial_half

__all__ = ["split_counts", "split_rows", "is_integer_counts", "maybe_split", "SPLIT_BLOCK_ROWS"]


# Rows are thinned in blocks of this many, block b with its own generator seeded by (seed, b): the draws
# of a row depend only on its block, so a stream over row chunks (aligned to blocks) or a shard on another
# process reproduces exactly the split of the whole matrix.
SPLIT_BLOCK_ROWS = 4096


def split_counts(X, p: float = 0.5, seed: int = 0) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """``(X_a, X_b)``: ``X_a = Binomial(X, p)`` entrywise and ``X_b = X - X_a`` (CSR, float32).

    The same thinning as the held-out protocol's ``binomial_split`` (``dgdlens.evaluate``), written here
    because the lens may not import ``evaluate`` (same layer, see the import contracts). The draws are
    made per block of ``SPLIT_BLOCK_ROWS`` rows (see :func:`split_rows`), so the lens' streaming path
    splits a file chunk by chunk, or across processes, into exactly these halves.

    Parameters
    ----------
    X
        cells x genes non-negative integer counts (dense or sparse).
    p
        Expected fraction of each count that goes to ``X_a``.
    seed
        Seed of the thinning.

    Returns
    -------
    tuple of scipy.sparse.csr_matrix
        ``(X_a, X_b)``, float32, explicit zeros removed.
    """
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}.")
    X = sp.csr_matrix(X, dtype=np.float64, copy=True)
    X.sum_duplicates()
    if X.nnz and (X.data.min() < 0 or np.any(X.data != np.round(X.data))):
        raise ValueError("count splitting needs non-negative integer counts.")
    return split_rows(X, 0, p, seed)


def split_rows(X: sp.csr_matrix, first_row: int, p: float, seed: int, *, halves: str = "both"):
    """Thin the rows ``first_row, first_row + 1, ...`` of a larger matrix, given as the CSR block ``X``.

    ``first_row`` must be a multiple of ``SPLIT_BLOCK_ROWS``; the result equals the corresponding rows of
    :func:`split_counts` on the whole matrix.

    Parameters
    ----------
    X
        CSR block of non-negative integer counts (validated by the caller).
    first_row
        Index of the block's first row in the whole matrix.
    p, seed
        As in :func:`split_counts`.
    halves
        ``"both"`` or ``"b"`` (only ``X_b``, what the lens tests on; saves a copy).

    Returns
    -------
    tuple of scipy.sparse.csr_matrix or scipy.sparse.csr_matrix
        ``(X_a, X_b)`` for the block, float32; only ``X_b`` with ``halves="b"``.
    """
    if first_row % SPLIT_BLOCK_ROWS:
        raise ValueError(f"first_row must be a multiple of {SPLIT_BLOCK_ROWS}, got {first_row}.")
    only_b = halves == "b"
    # the half the caller keeps, as float32 (X_b directly when only X_b is wanted)
    half = np.empty(X.nnz, dtype=np.float32)
    bounds = np.r_[X.indptr[:-1:SPLIT_BLOCK_ROWS], X.indptr[-1]] if X.shape[0] else np.zeros(1, dtype=np.int64)
    buffer = np.empty(int(np.diff(bounds).max(initial=0))) if p == 0.5 else None
    for start in range(0, X.shape[0], SPLIT_BLOCK_ROWS):
        stop = min(start + SPLIT_BLOCK_ROWS, X.shape[0])
        lo, hi = X.indptr[start], X.indptr[stop]
        rng = np.random.default_rng([seed, (first_row + start) // SPLIT_BLOCK_ROWS])
        counts = X.data[lo:hi]
        if p == 0.5:
            binomial_half(rng, counts, buffer, out=half[lo:hi], complement=only_b)
        else:
            draws = rng.binomial(counts.astype(np.int64), p)
            half[lo:hi] = counts - draws if only_b else draws
    if only_b:
        X_b = sp.csr_matrix((half, X.indices.copy(), X.indptr.copy()), shape=X.shape)
        X_b.eliminate_zeros()
        return X_b
    X_a = sp.csr_matrix((half, X.indices.copy(), X.indptr.copy()), shape=X.shape)
    X_b = sp.csr_matrix(((X.data - half).astype(np.float32), X.indices.copy(), X.indptr.copy()), shape=X.shape)
    X_a.eliminate_zeros()
    X_b.eliminate_zeros()
    return X_a, X_b


def is_integer_counts(X) -> bool:
    """True for a non-negative, all-integer numeric matrix (sparse or dense, numpy or torch)."""
    try:
        import torch

        if isinstance(X, torch.Tensor):
            X = X.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(X, "to_numpy") and not sp.issparse(X):
        X = X.to_numpy()
    values = X.data if sp.issparse(X) else np.asarray(X)
    if not np.issubdtype(values.dtype, np.number) or values.size == 0:
        return False
    return bool(values.min() >= 0 and np.all(values == np.round(values)))


def maybe_split(expression, count_split, seed: int):
    """(expression to test on, whether it is the held-out binomial half); see this module."""
    if count_split not in ("auto", True, False):
        raise ValueError(f"count_split must be 'auto', True or False, got {count_split!r}.")
    if count_split is False:
        return expression, False
    integer = is_integer_counts(expression)
    if not integer:
        if count_split is True:
            raise ValueError("count_split=True needs non-negative integer counts; pass raw counts or "
                             "count_split=False.")
        return expression, False
    values = expression.to_numpy() if isinstance(expression, pd.DataFrame) else expression
    try:
        import torch

        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    _, X_b = split_counts(values, 0.5, seed)
    if isinstance(expression, pd.DataFrame):
        return pd.DataFrame(X_b.toarray(), index=expression.index, columns=expression.columns), True
    return X_b, True
