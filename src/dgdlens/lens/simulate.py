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

__all__ = ["PlantedData", "planted_data", "write_planted_h5ad"]


@dataclass
class PlantedData:
    """counts (cells x genes CSR, float32), activations (cells x features CSR, float32), gene names,
    ``truth`` (one row per planted feature: feature, term, set genes present) and the gene sets used.

    Attributes
    ----------
    counts
        Simulated UMI-like counts, ``scipy.sparse.csr_matrix`` (cells x genes, ``float32``, integer values).
    activations
        SAE-like feature activations, ``scipy.sparse.csr_matrix`` (cells x features, ``float32``,
        non-negative).
    gene_names
        Object array of the ``n_genes`` gene names, in column order: symbols drawn from the collection
        followed by made-up ``NOVEL<i>`` names that are in no set.
    truth
        One row per planted feature, sorted by ``feature``: ``feature`` (column index into
        ``activations``), ``term`` (the planted set's ID) and ``n_genes`` (how many of its genes are
        among ``gene_names``, i.e. the genes whose rate it raises).
    gene_sets
        The full collection the planted sets came from (a :class:`~dgdlens.lens.GeneSets`), to pass to
        the lens unchanged.
    """

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

    Parameters
    ----------
    n_cells, n_genes, n_features
        Shape of the data: ``counts`` is ``n_cells x n_genes`` and ``activations`` is
        ``n_cells x n_features``.
    n_planted
        How many features are linked to a gene set (distinct features, each with a distinct set); at most
        ``n_features`` and at most the number of sets whose size fits ``set_size_range``.
    gene_sets
        Collection the genes and planted sets are drawn from: a bundled name (default ``"hallmark"``), a
        GMT path or ``{term: [genes]}``.
    features_per_cell
        Background activations per cell: this many features drawn at random (with replacement) in every
        cell, planted features included, with ``Exponential(1)`` values.
    planted_activity
        Extra probability, per cell and planted feature, that the feature fires (default 0.05: about 5%
        of cells, on top of its background firing).
    effect
        Strength of the link: in a cell where planted feature *f* has activation ``a``, the rate of each
        gene in its set is multiplied by ``1 + effect * a / a_max(f)`` (so up to ``1 + effect``, 4x by
        default); effects of several planted features on one gene add up.
    library_size
        Expected total count per cell before the planted boosts (per-cell size factors are log-normal
        with sd 0.3 around it).
    set_size_range
        Inclusive (min, max) number of a set's genes that must be among the simulated genes for it to be
        planted.
    block_cells
        Cells simulated per block (bounds the memory of the dense rate matrix). The random draws are
        made block by block, so the exact counts depend on it as well as on ``seed``.
    seed
        Seed of the random generator; the same arguments and seed give the same data.

    Returns
    -------
    PlantedData
        ``counts``, ``activations``, ``gene_names``, the ground truth ``truth`` (planted feature -> term)
        and the ``gene_sets`` used. Raises ``ValueError`` when fewer than ``n_planted`` sets fit
        ``set_size_range``.
    """
    rng = np.random.default_rng(seed)
    design = _planted_design(rng, n_cells, n_genes, n_features, n_planted, gene_sets, features_per_cell,
                             planted_activity, effect, library_size, set_size_range)
    counts = sp.vstack(list(_count_blocks(rng, design, block_cells)), format="csr")
    return PlantedData(counts, design.activations, design.gene_names, design.truth, design.gene_sets)


def write_planted_h5ad(
    path, n_cells: int, n_genes: int = 2000, n_features: int = 100, n_planted: int = 20, *,
    gene_sets="hallmark", features_per_cell: int = 8, planted_activity: float = 0.05, effect: float = 3.0,
    library_size: float = 2000.0, set_size_range: tuple[int, int] = (20, 200), block_cells: int = 2048,
    seed: int = 0) -> PlantedData:
    """:func:`planted_data` with the counts written to an ``.h5ad`` block by block (never held whole).

    The same model as :func:`planted_data` (the same genes, planted sets and activations for the same
    arguments), with the counts drawn by a faster, equivalent route for atlas sizes: each count is the sum
    of two independent Poisson parts, ``Poisson(base x size factor)`` drawn as a Poisson total spread over
    the genes by one shared multinomial, and ``Poisson(base x size factor x boost)`` drawn only where a
    planted feature fires. Same distribution, different draws: the counts differ from
    :func:`planted_data`'s. The file's ``X`` holds the counts (CSR, float32), its ``var_names`` the genes.

    Parameters
    ----------
    path
        The ``.h5ad`` to write (atomically).
    n_cells, n_genes, n_features, n_planted, gene_sets, features_per_cell, planted_activity, effect, \
library_size, set_size_range, block_cells, seed
        As in :func:`planted_data`.

    Returns
    -------
    PlantedData
        Everything but the counts (``counts`` is ``None``): activations, genes, truth and gene sets.
    """
    from ..data.matrix import write_h5ad_in_chunks

    rng = np.random.default_rng(seed)
    design = _planted_design(rng, n_cells, n_genes, n_features, n_planted, gene_sets, features_per_cell,
                             planted_activity, effect, library_size, set_size_range)
    write_h5ad_in_chunks(path, _fast_count_blocks(rng, design, block_cells), design.gene_names)
    return PlantedData(None, design.activations, design.gene_names, design.truth, design.gene_sets)


@dataclass
class _Design:
    activations: sp.csr_matrix
    gene_names: np.ndarray
    truth: pd.DataFrame
    gene_sets: object
    planted: np.ndarray
    scale: np.ndarray       # per planted feature: effect / its largest activation
    members: sp.csr_matrix  # planted features x genes: 1 on the genes of the feature's set
    base: np.ndarray


def _planted_design(rng, n_cells, n_genes, n_features, n_planted, gene_sets, features_per_cell, planted_activity,
                    effect, library_size, set_size_range) -> _Design:
    """Everything but the counts, drawn from ``rng`` in the order :func:`planted_data` always used."""
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
    del rows, cols, p_rows
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
    truth = pd.DataFrame({"feature": planted, "term": terms, "n_genes": [len(m) for m in members]})
    return _Design(A, genes, truth.sort_values("feature", ignore_index=True), sets, planted, scale, P, base)


def _count_blocks(rng, design: _Design, block_cells: int):
    """Poisson counts, ``block_cells`` cells at a time (float32 CSR blocks)."""
    A = design.activations
    n_cells = A.shape[0]
    for start in range(0, n_cells, block_cells):
        stop = min(start + block_cells, n_cells)
        boost = (A[start:stop][:, design.planted] @ sp.diags(design.scale) @ design.members).toarray()
        lib = rng.lognormal(0.0, 0.3, size=stop - start)[:, None]
        lam = design.base[None, :] * lib * (1.0 + boost)
        yield sp.csr_matrix(rng.poisson(lam).astype(np.float32))


def _alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker/Vose alias table of the distribution ``p``: draw ``i`` uniformly, keep it with probability
    ``keep[i]``, else take ``alias[i]`` (O(1) per draw, where ``searchsorted`` on a CDF is cache-bound)."""
    n = len(p)
    scaled = p * n / p.sum()
    keep, alias = np.ones(n), np.arange(n)
    small = [i for i in range(n) if scaled[i] < 1.0]
    large = [i for i in range(n) if scaled[i] >= 1.0]
    while small and large:
        s_, l_ = small.pop(), large.pop()
        keep[s_], alias[s_] = scaled[s_], l_
        scaled[l_] -= 1.0 - scaled[s_]
        (small if scaled[l_] < 1.0 else large).append(l_)
    return keep, alias


def _fast_count_blocks(rng, design: _Design, block_cells: int):
    """The counts of :func:`_count_blocks`' model without a dense rate matrix (see
    :func:`write_planted_h5ad`): base part by a shared multinomial, planted boosts as sparse Poissons."""
    A = design.activations
    n_cells, n_genes = A.shape[0], len(design.base)
    total = design.base.sum()
    keep, alias = _alias_table(design.base)
    block_cells = min(block_cells, 2048)  # bounds the dense bincount below (cells x genes int64)
    for start in range(0, n_cells, block_cells):
        stop = min(start + block_cells, n_cells)
        b = stop - start
        lib = rng.lognormal(0.0, 0.3, size=b)
        n_base = rng.poisson(lib * total)
        rows = np.repeat(np.arange(b, dtype=np.int64), n_base)
        pick = rng.integers(0, n_genes, size=len(rows))
        genes = np.where(rng.random(len(rows)) < keep[pick], pick, alias[pick])
        boost = (A[start:stop][:, design.planted] @ sp.diags(design.scale) @ design.members).tocoo()
        extra = rng.poisson(design.base[boost.col] * lib[boost.row] * boost.data)
        counts = np.bincount(rows * n_genes + genes, minlength=b * n_genes)
        np.add.at(counts, boost.row.astype(np.int64) * n_genes + boost.col, extra)
        keys = np.flatnonzero(counts)
        indptr = np.searchsorted(keys, np.arange(b + 1, dtype=np.int64) * n_genes)
        yield sp.csr_matrix((counts[keys].astype(np.float32), (keys % n_genes).astype(np.int32), indptr),
                            shape=(b, n_genes))
