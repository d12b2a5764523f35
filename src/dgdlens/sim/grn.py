"""A gene-regulatory simulator for single-cell counts with full ground truth.

The generative model, one step per piece of ground truth that is kept:

1. **Cell types and regulator activities.** Each of ``n_cell_types`` types switches every regulator
   on (with probability ``p_regulator_on``) or off; an "on" regulator has a high type-level activity,
   an "off" one a low activity (both Gamma distributed). A cell draws its type, then its own
   activities: the type level times log-normal cell-to-cell noise (``activity_noise``), so within a
   type the activities still vary continuously.
2. **A sparse regulator -> gene network.** Every (regulator, gene) edge exists with probability
   ``regulators_per_gene / n_regulators``; an edge represses with probability ``p_repression`` and
   activates otherwise; its strength is ``effect_size`` times a Gamma(4, 1/4) factor (mean 1).
3. **A saturating response.** Each regulator acts through a Hill function of its activity,
   ``h = a^k / (K^k + a^k)`` (threshold ``hill_threshold`` = K, coefficient ``hill_coefficient`` = k),
   and a gene's log expression rate is its basal level plus the signed, weighted sum of the Hill
   responses of its regulators: ``log rate = basal + h @ W``. A regulator's effect therefore levels off
   once it is well above threshold, however high its activity goes.
4. **Library size and counts.** Rates are normalised to a per-cell composition (softmax over genes),
   scaled by a log-normal library size, and counts are drawn from a Poisson or a negative binomial
   with gene-wise shape ``r`` (variance ``mu + mu^2 / r``), the parameterisation of
   :class:`dgdlens.nn.NegativeBinomial`.

Everything is vectorised over genes and drawn chunk by chunk over cells, so the dense mean matrix
never exists whole; 10,000 cells x 2,000 genes take about two seconds on one core.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

__all__ = ["GRNSimulation", "simulate_grn", "hill_response"]


def hill_response(activity: np.ndarray, threshold: float, coefficient: float) -> np.ndarray:
    """Saturating Hill function ``a^k / (K^k + a^k)`` for non-negative activities, in [0, 1).

    Written as ``1 / (1 + (K / a)^k)`` in log space so that ``a = 0`` gives exactly 0 and huge
    activities give 1 without overflow.

    Parameters
    ----------
    activity
        Non-negative regulator activities, any shape (e.g. cells x regulators).
    threshold
        ``K``, the activity at half saturation (> 0).
    coefficient
        ``k``, the Hill coefficient (steepness; larger is more switch-like).

    Returns
    -------
    numpy.ndarray
        float64 responses in [0, 1), same shape as ``activity``.
    """
    a = np.asarray(activity, dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_ratio = coefficient * (np.log(threshold) - np.log(a))  # -inf... +inf; a=0 -> +inf
    return 1.0 / (1.0 + np.exp(np.minimum(log_ratio, 700.0))) * (a > 0)


@dataclass
class GRNSimulation:
    """Counts and the ground truth that generated them (returned by :func:`simulate_grn`).

    Attributes
    ----------
    counts
        ``(n_cells, n_genes)`` CSR matrix of integer counts (float32 storage).
    cell_type
        ``(n_cells,)`` integer cell type of every cell.
    activity
        ``(n_cells, n_regulators)`` true regulator activities (non-negative).
    response
        ``(n_cells, n_regulators)`` Hill responses ``h(activity)`` in [0, 1): what the genes see.
    type_activity
        ``(n_cell_types, n_regulators)`` type-level activity (the median of a cell's activity).
    type_on
        ``(n_cell_types, n_regulators)`` boolean: regulator switched on in that type.
    network
        ``(n_regulators, n_genes)`` sparse CSR signed edge weights (positive: activation).
    basal
        ``(n_genes,)`` basal log expression rate.
    library_size
        ``(n_cells,)`` the library size each cell's composition was scaled by (expected total count).
    dispersion
        ``(n_genes,)`` negative-binomial shape ``r`` per gene, or ``None`` for Poisson counts.
    params
        The arguments of the simulation (sizes, noise, seed...).
    """

    counts: sp.csr_matrix
    cell_type: np.ndarray
    activity: np.ndarray
    response: np.ndarray
    type_activity: np.ndarray
    type_on: np.ndarray
    network: sp.csr_matrix
    basal: np.ndarray
    library_size: np.ndarray
    dispersion: np.ndarray | None
    params: dict = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        """Number of simulated cells."""
        return self.counts.shape[0]

    @property
    def n_genes(self) -> int:
        """Number of genes."""
        return self.counts.shape[1]

    @property
    def n_regulators(self) -> int:
        """Number of regulators."""
        return self.network.shape[0]

    @property
    def noise(self) -> str:
        """The count noise model: ``"nb"`` or ``"poisson"``."""
        return "poisson" if self.dispersion is None else "nb"

    def composition(self, cells: np.ndarray | slice | None = None) -> np.ndarray:
        """Per-cell expression composition (rows sum to 1) of the selected cells, dense.

        Recomputed from the ground truth; select few cells at a time for large simulations.

        Parameters
        ----------
        cells
            Which cells: integer indices, a boolean mask or a slice; ``None`` for all.

        Returns
        -------
        numpy.ndarray
            float64 ``(n_selected, n_genes)``, rows summing to 1.
        """
        sel = slice(None) if cells is None else cells
        return _composition(self.response[sel], self.network, self.basal)

    def expected_counts(self, cells: np.ndarray | slice | None = None) -> np.ndarray:
        """The mean of the count distribution, ``library_size * composition``, for the selected cells.

        Parameters
        ----------
        cells
            Which cells: integer indices, a boolean mask or a slice; ``None`` for all.

        Returns
        -------
        numpy.ndarray
            float64 ``(n_selected, n_genes)`` expected counts (dense).
        """
        sel = slice(None) if cells is None else cells
        return self.library_size[sel, None] * self.composition(sel)

    def to_anndata(self, *, counts_layer: bool = True):
        """The simulation as an AnnData.

        ``X`` (and ``layers["counts"]`` unless ``counts_layer=False``) holds the CSR counts;
        ``obs``: ``cell_type`` (categorical), ``library_size`` (true), ``total_counts`` (observed);
        ``obsm``: ``activity`` and ``response`` (cells x regulators);
        ``var``: ``basal``, ``dispersion`` (inf for Poisson), ``n_regulators`` (in-degree);
        ``varm["network"]``: genes x regulators signed weights (dense; there are few regulators);
        ``uns["grn"]``: type-level activities, on/off pattern, regulator and type names, parameters.

        Cells are named ``cell_0 ...``, genes ``gene_0 ...``, types ``type_0 ...``.

        Parameters
        ----------
        counts_layer
            Also store a copy of the counts in ``layers["counts"]``.

        Returns
        -------
        anndata.AnnData
            ``n_cells x n_genes``, holding copies (the simulation is not modified).
        """
        import anndata as ad
        import pandas as pd

        type_names = np.array([f"type_{t}" for t in range(self.type_activity.shape[0])])
        reg_names = np.array([f"regulator_{r}" for r in range(self.n_regulators)])
        obs = pd.DataFrame(
            {
                "cell_type": pd.Categorical(type_names[self.cell_type], categories=type_names),
                "library_size": self.library_size,
                "total_counts": np.asarray(self.counts.sum(axis=1)).ravel(),
            },
            index=[f"cell_{i}" for i in range(self.n_cells)],
        )
        var = pd.DataFrame(
            {
                "basal": self.basal,
                "dispersion": np.full(self.n_genes, np.inf) if self.dispersion is None else self.dispersion,
                "n_regulators": np.diff(self.network.tocsc().indptr),
            },
            index=[f"gene_{g}" for g in range(self.n_genes)],
        )
        adata = ad.AnnData(X=self.counts.copy(), obs=obs, var=var)
        if counts_layer:
            adata.layers["counts"] = self.counts.copy()
        adata.obsm["activity"] = self.activity.copy()
        adata.obsm["response"] = self.response.copy()
        adata.varm["network"] = self.network.T.toarray()
        adata.uns["grn"] = {
            "type_activity": self.type_activity.copy(),
            "type_on": self.type_on.copy(),
            "regulator_names": reg_names,
            "cell_type_names": type_names,
            "noise": self.noise,
            "params": dict(self.params),
        }
        return adata


def _composition(response: np.ndarray, network: sp.csr_matrix, basal: np.ndarray) -> np.ndarray:
    # log rate = basal + h @ W; softmax over genes with the max subtracted (no overflow)
    log_rate = basal[None, :] + np.asarray(network.T.dot(response.T).T)
    log_rate -= log_rate.max(axis=1, keepdims=True)
    rate = np.exp(log_rate)
    return rate / rate.sum(axis=1, keepdims=True)


def _check_positive_int(name: str, value) -> int:
    if int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _check_probability(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}.")
    return float(value)


def _check_nonnegative(name: str, value: float, *, strict: bool = False) -> float:
    if not np.isfinite(value) or value < 0 or (strict and value == 0):
        raise ValueError(f"{name} must be {'positive' if strict else 'non-negative'} and finite, got {value!r}.")
    return float(value)


def _type_pattern(rng: np.random.Generator, n_types: int, n_regs: int, p_on: float) -> np.ndarray:
    """Boolean (types x regulators) on/off pattern.

    Every type gets at least one regulator on, every regulator is on in at least one type, and (when
    there are several types and regulators) every regulator is off in at least one type, so no
    regulator is constant across types.
    """
    on = rng.random((n_types, n_regs)) < p_on
    for r in np.flatnonzero(~on.any(axis=0)):
        on[rng.integers(n_types), r] = True
    for t in np.flatnonzero(~on.any(axis=1)):
        on[t, rng.integers(n_regs)] = True
    if n_types > 1 and n_regs > 1:
        for r in np.flatnonzero(on.all(axis=0)):
            t = rng.integers(n_types)
            on[t, r] = False
            if not on[t].any():  # keep the type non-empty with another regulator
                on[t, (r + 1 + rng.integers(n_regs - 1)) % n_regs] = True
    return on


def _network(rng: np.random.Generator, n_regs: int, n_genes: int, density: float, p_rep: float,
             effect_size: float) -> sp.csr_matrix:
    edges = rng.random((n_regs, n_genes)) < density
    sign = np.where(rng.random((n_regs, n_genes)) < p_rep, -1.0, 1.0)
    strength = effect_size * rng.gamma(4.0, 0.25, size=(n_regs, n_genes))
    return sp.csr_matrix(np.where(edges, sign * strength, 0.0))


def simulate_grn(
    n_cells: int = 2000,
    n_genes: int = 1000,
    n_regulators: int = 10,
    n_cell_types: int = 6,
    *,
    regulators_per_gene: float = 2.0,
    p_regulator_on: float = 0.4,
    p_repression: float = 0.3,
    effect_size: float = 1.5,
    activity_on: float = 3.0,
    activity_off: float = 0.2,
    activity_noise: float = 0.4,
    hill_threshold: float = 1.0,
    hill_coefficient: float = 2.0,
    basal_sd: float = 1.0,
    library_size: float = 2000.0,
    library_sd: float = 0.3,
    noise: str = "nb",
    dispersion: float = 5.0,
    dispersion_sd: float = 0.5,
    cell_type_weights: np.ndarray | None = None,
    seed: int = 0,
    chunk_size: int = 2048,
) -> GRNSimulation:
    """Simulate single-cell counts from a sparse gene-regulatory network (see the module docstring).

    Parameters
    ----------
    n_cells, n_genes, n_regulators, n_cell_types
        Sizes.
    regulators_per_gene
        Expected number of regulators per gene (edge probability ``regulators_per_gene / n_regulators``);
        genes without regulators keep their basal level in every cell.
    p_regulator_on
        Probability that a regulator is switched on in a cell type.
    p_repression
        Probability that an edge represses its target (otherwise it activates it).
    effect_size
        Mean absolute log-fold change a fully saturated regulator causes on a target.
    activity_on, activity_off
        Mean type-level activity of a switched-on and a switched-off regulator (Gamma(5) distributed).
    activity_noise
        Standard deviation of the log-normal cell-to-cell factor on the activities (0: every cell of a
        type has its type's activities).
    hill_threshold, hill_coefficient
        Activity at half saturation ``K`` and steepness ``k`` of the Hill response.
    basal_sd
        Standard deviation of the genes' basal log rates.
    library_size, library_sd
        Median library size and the standard deviation of its logarithm.
    noise
        ``"nb"`` (negative binomial) or ``"poisson"``.
    dispersion, dispersion_sd
        Median NB shape ``r`` across genes and the standard deviation of ``log r`` (NB only).
    cell_type_weights
        Relative frequency of each cell type (default: equal).
    seed
        Seed of the numpy generator; the same seed gives the same simulation.
    chunk_size
        Cells per chunk when drawing counts (bounds memory to ``chunk_size x n_genes`` floats).

    Returns
    -------
    GRNSimulation
        Counts and ground truth; ``.to_anndata()`` converts it.
    """
    n_cells = _check_positive_int("n_cells", n_cells)
    n_genes = _check_positive_int("n_genes", n_genes)
    n_regs = _check_positive_int("n_regulators", n_regulators)
    n_types = _check_positive_int("n_cell_types", n_cell_types)
    chunk_size = _check_positive_int("chunk_size", chunk_size)
    p_on = _check_probability("p_regulator_on", p_regulator_on)
    p_rep = _check_probability("p_repression", p_repression)
    for name, value in (("effect_size", effect_size), ("activity_off", activity_off),
                        ("activity_noise", activity_noise), ("basal_sd", basal_sd), ("library_sd", library_sd),
                        ("dispersion_sd", dispersion_sd), ("regulators_per_gene", regulators_per_gene)):
        _check_nonnegative(name, value)
    for name, value in (("activity_on", activity_on), ("hill_threshold", hill_threshold),
                        ("hill_coefficient", hill_coefficient), ("library_size", library_size),
                        ("dispersion", dispersion)):
        _check_nonnegative(name, value, strict=True)
    if activity_on <= activity_off:
        raise ValueError(f"activity_on ({activity_on}) must be larger than activity_off ({activity_off}).")
    if noise not in {"nb", "poisson"}:
        raise ValueError(f"noise must be 'nb' or 'poisson', got {noise!r}.")
    if cell_type_weights is None:
        type_p = np.full(n_types, 1.0 / n_types)
    else:
        type_p = np.asarray(cell_type_weights, dtype=np.float64)
        if type_p.shape != (n_types,) or np.any(type_p < 0) or not np.isfinite(type_p).all() or type_p.sum() <= 0:
            raise ValueError(f"cell_type_weights must be {n_types} non-negative numbers with a positive sum.")
        type_p = type_p / type_p.sum()
    params = {
        "n_cells": n_cells, "n_genes": n_genes, "n_regulators": n_regs, "n_cell_types": n_types,
        "regulators_per_gene": float(regulators_per_gene), "p_regulator_on": p_on, "p_repression": p_rep,
        "effect_size": float(effect_size), "activity_on": float(activity_on), "activity_off": float(activity_off),
        "activity_noise": float(activity_noise), "hill_threshold": float(hill_threshold),
        "hill_coefficient": float(hill_coefficient), "basal_sd": float(basal_sd),
        "library_size": float(library_size), "library_sd": float(library_sd), "noise": noise,
        "dispersion": float(dispersion), "dispersion_sd": float(dispersion_sd),
        "cell_type_weights": type_p.tolist(), "seed": seed,
    }

    rng = np.random.default_rng(seed)
    # 1. cell types and activities
    type_on = _type_pattern(rng, n_types, n_regs, p_on)
    level_on = rng.gamma(5.0, activity_on / 5.0, size=(n_types, n_regs))
    level_off = rng.gamma(5.0, max(activity_off, 1e-12) / 5.0, size=(n_types, n_regs)) * (activity_off > 0)
    type_activity = np.where(type_on, level_on, level_off)
    cell_type = rng.choice(n_types, size=n_cells, p=type_p)
    # log-normal factor with median 1, so type_activity is the median activity of its cells
    activity = type_activity[cell_type] * np.exp(activity_noise * rng.standard_normal((n_cells, n_regs)))
    response = hill_response(activity, hill_threshold, hill_coefficient)

    # 2. network and gene parameters
    density = min(1.0, regulators_per_gene / n_regs)
    network = _network(rng, n_regs, n_genes, density, p_rep, effect_size)
    basal = basal_sd * rng.standard_normal(n_genes)
    lib = library_size * np.exp(library_sd * rng.standard_normal(n_cells))
    r = None if noise == "poisson" else dispersion * np.exp(dispersion_sd * rng.standard_normal(n_genes))

    # 3-4. counts, chunk by chunk
    blocks = []
    for start in range(0, n_cells, chunk_size):
        stop = min(start + chunk_size, n_cells)
        mu = lib[start:stop, None] * _composition(response[start:stop], network, basal)
        if r is not None:
            # Gamma-Poisson mixture: lambda ~ Gamma(shape=r, scale=mu/r) gives NB(mean mu, shape r)
            mu = rng.gamma(r[None, :], mu / r[None, :])
        blocks.append(sp.csr_matrix(rng.poisson(mu).astype(np.float32)))
    counts = sp.vstack(blocks, format="csr")
    return GRNSimulation(counts=counts, cell_type=cell_type, activity=activity, response=response,
                         type_activity=type_activity, type_on=type_on, network=network, basal=basal,
                         library_size=lib, dispersion=r, params=params)

