"""Planted-signal data for checking and timing the lens: counts in which chosen SAE-like features switch
on known gene sets.

Every cell activates ``features_per_cell`` random features (exponential values). Feature *f* in the
planted list multiplies the expression rate of every gene in its set by ``1 + effect * a / a_max(f)``
in the cells where it fires (``a``: its activation), so its top cells over-express the set. Other
features are null: their activations are independent of expression.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .genesets import resolve_gene_sets

__all__ = ["PlantedData", "planted_data"]


@dataclass
class PlantedData:
    """counts (cells x genes CSR, float32), activations (cells x features CSR, float32), gene names,
    ``truth`` (one row per planted feature: feature, term, set genes present) and the gene sets used."""

    counts: sp.csr_matrix
    activations: sp.csr_matrix
    gene_names: np.ndarray
    truth: pd.DataFrame
    gene_sets: object


def planted_data(
    n_cells: int = 2000, n_genes: int = 2000, n_features: int = 100, n_planted: int = 20, *,
    gene_sets="hallmark", features_per_cell: int = 8, planted_activity: float = 0.05, effect: float = 3.0,
    library_size: float = 2000.0, set_size_range: tuple[int, int] = (20, 200), block_cells: int = 2048,
    seed: int = 0) -> PlantedData:
    """Simulate counts and activations with known feature -> gene-set links (see the module docstring).

    ``planted_activity`` is the fraction of cells in which each planted feature fires (null features fire
    in ``features_per_cell / n_features`` of cells). Genes are drawn from the collection (so the sets
    overlap as in real data) plus 5% names outside it.
    """
    rng = np.random.default_rng(seed)
    sets = resolve_gene_sets(gene_sets)
    pool = np.array(sorted(sets.genes()), dtype=object)
    n_in = min(len(pool), int(round(n_genes * 0.95)))
    genes = np.concatenate(
        [
            rng.choice(pool, n_in, replace=False),
            np.array([f"NOVEL{i}" for i in range(n_genes - n_in)], dtype=object),
        ]
    )
    col = {g: i for i, g in enumerate(genes)}
    sizes = {t: sum(g in col for g in members) for t, members in sets.items()}
    candidates = [t for t, s in sizes.items() if set_size_range[0] <= s <= set_size_range[1]]
    if len(candidates) < n_planted:
        raise ValueError(f"Only {len(candidates)} sets have {set_size_range} genes here; lower n_planted.")
    terms = rng.choice(np.array(sorted(candidates), dtype=object), n_planted, replace=False)
    planted = rng.choice(n_features, n_planted, replace=False)
    members = [np.array([col[g] for g in sets[t] if g in col]) for t in terms]

    # activations: features_per_cell random features per cell, plus planted features in planted_activity
    rows = np.repeat(np.arange(n_cells), features_per_cell)
    cols = rng.integers(0, n_features, size=len(rows))
    p_rows = np.flatnonzero(rng.random((n_cells, n_planted)).ravel() < planted_activity)
    rows = np.concatenate([rows, p_rows // n_planted])
    cols = np.concatenate([cols, planted[p_rows % n_planted]])
    A = sp.csr_matrix(
        (rng.exponential(1.0, size=len(rows)).astype(np.float32), (rows, cols)), shape=(n_cells, n_features)
    )
    A.sum_duplicates()
    A_max = np.asarray(A.max(axis=0).todense()).ravel()

    # planted effects as a (planted features x genes) matrix of set membership
    P = sp.csr_matrix(
        (
            np.ones(sum(len(m) for m in members)),
            (np.repeat(np.arange(n_planted), [len(m) for m in members]), np.concatenate(members)),
        ),
        shape=(n_planted, n_genes),
    )
    scale = effect / np.where(A_max[planted] > 0, A_max[planted], 1.0)
    base = rng.lognormal(0.0, 1.0, size=n_genes)
    base *= library_size / base.sum()  # expected total count per cell = library_size
    blocks = []
    for start in range(0, n_cells, block_cells):
        stop = min(start + block_cells, n_cells)
        boost = (A[start:stop][:, planted] @ sp.diags(scale) @ P).toarray()
        lib = rng.lognormal(0.0, 0.3, size=stop - start)[:, None]
        lam = base[None, :] * lib * (1.0 + boost)
        blocks.append(sp.csr_matrix(rng.poisson(lam).astype(np.float32)))
    counts = sp.vstack(blocks, format="csr")
    truth = pd.DataFrame({"feature": planted, "term": terms, "n_genes": [len(m) for m in members]})
    return PlantedData(
        counts, A.astype(np.float32), genes, truth.sort_values("feature", ignore_index=True), sets
    )
