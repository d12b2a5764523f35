"""Simulated single-cell count matrices of any size, generated chunk by chunk.

Used by the out-of-core tests and ``benchmarks/scale.py``: a million cells are produced as a stream
of CSR chunks and written to disk (:func:`dgdlens.data.matrix.write_h5ad_in_chunks`) without the
matrix ever being whole in memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp

__all__ = ["simulate_count_chunks"]


def _template(n: int, n_genes: int, n_types: int, mean_library: float, rng: np.random.Generator):
    """``n`` Poisson cells from ``n_types`` expression programs (gamma-distributed gene weights)."""
    programs = rng.gamma(0.3, 1.0, size=(n_types, n_genes)) + 1e-3
    programs /= programs.sum(1, keepdims=True)
    labels = rng.integers(0, n_types, n)
    library = rng.lognormal(np.log(mean_library), 0.4, n)
    blocks = []
    for start in range(0, n, 2000):  # dense Poisson draws a few thousand cells at a time
        stop = min(start + 2000, n)
        lam = programs[labels[start:stop]] * library[start:stop, None]
        counts = rng.poisson(lam).astype(np.float32)
        counts[np.arange(stop - start), np.arange(start, stop) % n_genes] += 1  # no empty cell, no empty gene
        blocks.append(sp.csr_matrix(counts))
    return sp.vstack(blocks, format="csr"), labels


def simulate_count_chunks(n_cells: int, n_genes: int, *, n_types: int = 8, chunk_size: int = 10_000,
                          mean_library: float = 1500.0, template_cells: int = 20_000,
                          seed: int = 0) -> Iterator[tuple[sp.csr_matrix, np.ndarray]]:
    """Yield ``(counts, labels)`` chunks of ``chunk_size`` cells: float32 CSR counts and cell types.

    Up to ``template_cells`` cells are drawn from a Poisson model of ``n_types`` programs. Larger
    sets resample those cells and thin every count binomially (each cell keeps a random 60-100 %
    of its molecules), so every cell is distinct at the cost of a few draws per non-zero entry, not
    per gene: a million cells take minutes, not hours. Deterministic given ``seed``.

    Parameters
    ----------
    n_cells, n_genes
        Size of the whole matrix.
    n_types
        Number of cell types (expression programs).
    chunk_size
        Cells per yielded chunk (the last one may be smaller).
    mean_library
        Mean total count per template cell.
    template_cells
        Cells drawn from the Poisson model; more cells are resampled and thinned from these.
    seed
        Random seed.

    Yields
    ------
    tuple of (scipy.sparse.csr_matrix, numpy.ndarray)
        The counts of the next ``chunk_size`` cells (float32 CSR) and their cell types.
    """
    if n_cells < 1 or n_genes < 1 or chunk_size < 1:
        raise ValueError("n_cells, n_genes and chunk_size must be positive")
    rng = np.random.default_rng(seed)
    m = min(n_cells, template_cells)
    template, labels = _template(m, n_genes, n_types, mean_library, rng)
    for start in range(0, n_cells, chunk_size):
        stop = min(start + chunk_size, n_cells)
        if n_cells <= template_cells:
            yield template[start:stop], labels[start:stop]
            continue
        crng = np.random.default_rng([seed, start])
        pick = crng.integers(0, m, stop - start)
        block = template[pick]
        keep = crng.uniform(0.6, 1.0, stop - start)
        thinned = crng.binomial(block.data.astype(np.int64), np.repeat(keep, np.diff(block.indptr)))
        block.data = np.maximum(thinned, 0).astype(np.float32)
        block.eliminate_zeros()
        yield block, labels[pick]
