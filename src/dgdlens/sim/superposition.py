"""Simulations with known ground truth for testing what sparse autoencoders recover.

:func:`simulate_superposition` is the reference's large simulation ("sim2L", Schuster, MLCB 2025):

1. **Fixed structure** (``structure_seed``): a binary program -> gene matrix ``W`` (P x G, density 0.1) and
   a binary cell-type -> program mask ``C`` (T x P, density 0.3, or 0.7 with a single covariate).
2. **Per cell** (``seed``): program activities ``X ~ Poisson(1 + 0.1 i)`` (i = 0..P-1); a covariate
   ``b ~ Uniform{0..n_cov-1}`` and one scalar offset ``eps ~ N(b, 0.1)`` added to every program,
   ``X' = X + eps`` (no offset with one covariate); a cell type ``a ~ Uniform{0..T-1}`` masking programs,
   ``X'' = X' * C[a]``; genes ``Y = X'' W``.
3. Optional count noise (the reference has none): ``Y`` becomes the mean of Poisson or negative-binomial
   counts.

The random streams follow the reference draw for draw: ``W`` and ``C`` from numpy's legacy
``RandomState(structure_seed)``, the cells from a torch generator seeded with ``seed`` in the reference's
order, so a seed gives the reference's cells. Every level of the ground truth is kept.
The reference's multi-seed script saved every seed under the same name (the global seed instead of the
loop index); :func:`simulate_superposition_runs` writes one file per seed.

:func:`embed_superposition` is the reference's embedding step (an MLP autoencoder on the genes, MSE);
SAEs are then trained on its latents and scored against the ground truth on held-out cells
(:meth:`SuperpositionData.split`, :func:`dgdlens.sae.recovery_report`).

:func:`planted_sparse_codes` is a small generator for unit tests: samples that are sparse non-negative
combinations of more unit-norm atoms than dimensions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "SuperpositionData", "simulate_superposition", "simulate_superposition_runs", "load_superposition",
    "SuperpositionEmbedding", "embed_superposition", "reference_hidden_sizes",
    "PlantedSparseCodes", "planted_sparse_codes",
]

_ARRAYS = ("Y", "X", "X_cov", "X_ct", "cell_type", "covariate", "offset", "programs", "cell_type_programs",
           "rates", "counts")


@dataclass
class SuperpositionData:
    """One draw of the superposition simulation, with every level of the ground truth.

    Attributes
    ----------
    Y
        Cells x genes, ``X_ct @ programs`` (float32): the observable data.
    X, X_cov, X_ct
        Cells x programs: raw activities, after the covariate offset (X'), after the cell-type mask (X'').
    cell_type, covariate
        Integer labels per cell (the reference's A and B).
    offset
        The scalar covariate offset added to every program of a cell (``X_cov - X``).
    programs
        Programs x genes, boolean (the reference's ``W_xy``).
    cell_type_programs
        Cell types x programs, boolean mask (the reference's ``C``).
    rates
        Poisson rate of every program.
    counts
        Cells x genes integer counts when count noise was requested, else None.
    params
        The arguments of :func:`simulate_superposition`.
    """

    Y: np.ndarray
    X: np.ndarray
    X_cov: np.ndarray
    X_ct: np.ndarray
    cell_type: np.ndarray
    covariate: np.ndarray
    offset: np.ndarray
    programs: np.ndarray
    cell_type_programs: np.ndarray
    rates: np.ndarray
    counts: np.ndarray | None = None
    params: dict = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        """Number of simulated cells (rows of ``Y``)."""
        return int(self.Y.shape[0])

    def ground_truth(self) -> dict:
        """``{"continuous": {"X": ..., "X'": ..., "X''": ...}, "categorical": {"cell type": ..., "covariate": ...}}``.

        The shape :func:`dgdlens.sae.recovery_report` takes as ``continuous=`` and ``categorical=``.

        Returns
        -------
        dict
            ``"continuous"``: the three cells x programs activity levels; ``"categorical"``: the integer
            cell type per cell and, with more than one covariate, the covariate per cell. The arrays are
            the simulation's own (not copies).
        """
        categorical = {"cell type": self.cell_type}
        if self.params.get("n_covariates", 1) > 1:
            categorical["covariate"] = self.covariate
        return {"continuous": {"X": self.X, "X'": self.X_cov, "X''": self.X_ct}, "categorical": categorical}

    def subset(self, index) -> SuperpositionData:
        """The cells ``index`` (any integer index or boolean mask); the structure is shared.

        Parameters
        ----------
        index
            Integer indices or a boolean mask over cells (numpy indexing).

        Returns
        -------
        SuperpositionData
            The selected cells' rows of every per-cell array; ``programs``, ``cell_type_programs`` and
            ``rates`` are the same objects as in ``self``, ``params`` a copy.
        """
        index = np.asarray(index)
        pick = (lambda a: None if a is None else a[index])
        return SuperpositionData(
            Y=self.Y[index], X=self.X[index], X_cov=self.X_cov[index], X_ct=self.X_ct[index],
            cell_type=self.cell_type[index], covariate=self.covariate[index], offset=self.offset[index],
            programs=self.programs, cell_type_programs=self.cell_type_programs, rates=self.rates,
            counts=pick(self.counts), params=dict(self.params),
        )

    def split(self, test_fraction: float = 0.2, *, seed: int = 0) -> tuple[SuperpositionData, SuperpositionData]:
        """A seeded ``(train, test)`` split of the cells: fit embeddings and SAEs on ``train``, score recovery
        on ``test`` (the reference scored on the SAE's own training cells).

        Parameters
        ----------
        test_fraction
            Share of cells in the test set, in (0, 1); the test set has ``round(n_cells * test_fraction)``
            cells.
        seed
            Seed of the permutation.

        Returns
        -------
        tuple of SuperpositionData
            ``(train, test)``, disjoint, each in the original cell order.
        """
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}.")
        n_test = int(round(self.n_cells * test_fraction))
        if not 0 < n_test < self.n_cells:
            raise ValueError(f"test_fraction={test_fraction} of {self.n_cells} cells leaves an empty train or test set.")
        order = np.random.default_rng(seed).permutation(self.n_cells)
        return self.subset(np.sort(order[n_test:])), self.subset(np.sort(order[:n_test]))

    def to_anndata(self, *, use_counts: bool | None = None):
        """An AnnData: ``X`` = counts (if simulated and ``use_counts`` is not False) or ``Y``; the other
        levels in ``layers`` / ``obsm`` (``X_programs``, ``X_programs_cov``, ``X_programs_ct``), labels in
        ``obs``, the program -> gene matrix in ``varm["programs"]`` and the parameters in ``uns["sim2L"]``.

        ``layers["Y"]`` always holds ``Y``; ``obs`` has ``cell_type`` (``ct0 ...``), ``covariate``
        (``cov0 ...``) and ``offset``.

        Parameters
        ----------
        use_counts
            Put the integer counts in ``X``; ``None`` does so when counts were simulated, ``True`` without
            counts raises ``ValueError``, ``False`` puts ``Y`` in ``X``.

        Returns
        -------
        anndata.AnnData
            ``n_cells x n_genes`` (copies of the arrays).
        """
        import anndata
        import pandas as pd

        if use_counts is None:
            use_counts = self.counts is not None
        if use_counts and self.counts is None:
            raise ValueError("use_counts=True but the simulation has no counts; simulate with count_noise='poisson' or 'nb'.")
        n, g = self.Y.shape
        obs = pd.DataFrame({
            "cell_type": pd.Categorical([f"ct{i}" for i in self.cell_type],
                                        categories=[f"ct{i}" for i in range(self.cell_type_programs.shape[0])]),
            "covariate": pd.Categorical([f"cov{i}" for i in self.covariate],
                                        categories=[f"cov{i}" for i in range(self.params.get("n_covariates", 1))]),
            "offset": self.offset,
        }, index=[f"cell{i}" for i in range(n)])
        var = pd.DataFrame(index=[f"gene{j}" for j in range(g)])
        adata = anndata.AnnData(X=(self.counts if use_counts else self.Y).copy(), obs=obs, var=var)
        adata.layers["Y"] = self.Y.copy()
        adata.obsm["X_programs"] = self.X.copy()
        adata.obsm["X_programs_cov"] = self.X_cov.copy()
        adata.obsm["X_programs_ct"] = self.X_ct.copy()
        adata.varm["programs"] = self.programs.T.astype(np.int8)
        adata.uns["sim2L"] = {**{k: v for k, v in self.params.items() if v is not None},
                              "cell_type_programs": self.cell_type_programs.astype(np.int8)}
        return adata

    def save(self, path, *, overwrite: bool = False) -> Path:
        """Write to one ``.npz`` file (no pickles): every array plus the parameters as JSON.

        Parameters
        ----------
        path
            File to write; the suffix is replaced by ``.npz`` if it is not already. Missing parent
            directories are created.
        overwrite
            Replace an existing file; otherwise an existing one raises ``FileExistsError``.

        Returns
        -------
        pathlib.Path
            The path written (with the ``.npz`` suffix). Read it back with :func:`load_superposition`.
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {name: getattr(self, name) for name in _ARRAYS if getattr(self, name) is not None}
        np.savez(path, params=np.array(json.dumps(self.params)), **arrays)
        return path


def load_superposition(path) -> SuperpositionData:
    """Read a file written by :meth:`SuperpositionData.save`.

    Parameters
    ----------
    path
        The ``.npz`` file.

    Returns
    -------
    SuperpositionData
        The simulation, arrays as saved (``counts`` ``None`` when none were saved).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No simulation file at {path}.")
    with np.load(path, allow_pickle=False) as data:
        missing = [name for name in _ARRAYS[:-1] if name not in data]
        if missing or "params" not in data:
            raise ValueError(f"{path} is not a saved superposition simulation (missing {missing or ['params']}).")
        arrays = {name: data[name] for name in _ARRAYS if name in data}
        params = json.loads(str(data["params"]))
    return SuperpositionData(**arrays, params=params)


def simulate_superposition(
    n_cells: int = 10_000,
    *,
    n_programs: int = 100,
    n_genes: int = 20_000,
    n_cell_types: int = 40,
    n_covariates: int = 3,
    program_gene_density: float = 0.1,
    cell_type_program_density: float | None = None,
    base_rate: float = 1.0,
    rate_step: float = 0.1,
    offset_sd: float = 0.1,
    count_noise: str | None = None,
    library_scale: float = 1.0,
    nb_dispersion: float = 10.0,
    seed: int = 0,
    structure_seed: int = 0,
) -> SuperpositionData:
    """Simulate the reference's large superposition data set (see the module docstring).

    Parameters
    ----------
    n_cells, n_programs, n_genes, n_cell_types, n_covariates
        Sizes; the reference's "high complexity" set is 10,000 cells per seed, 100 programs, 20,000 genes,
        40 cell types and 3 covariates ("low": 10 cell types, 1 covariate).
    program_gene_density
        Probability that a program drives a gene (0.1).
    cell_type_program_density
        Probability that a cell type uses a program (default 0.3, or 0.7 with one covariate, as in the reference).
    base_rate, rate_step
        Program i has Poisson rate ``base_rate + rate_step * i``.
    offset_sd
        Standard deviation of the covariate offset ``eps ~ N(b, offset_sd)``.
    count_noise
        ``None`` (the reference: ``Y`` is exact), ``"poisson"`` or ``"nb"``: also draw integer ``counts``
        with mean ``library_scale * max(Y, 0)`` (negative binomial: variance ``mu + mu^2 / nb_dispersion``).
    library_scale
        Factor from ``Y`` to the counts' mean (count noise only).
    nb_dispersion
        NB shape ``r`` (count noise ``"nb"`` only; larger is closer to Poisson).
    seed, structure_seed
        Seeds of the cells and of the fixed structure (the reference always uses structure seed 0).

    Returns
    -------
    SuperpositionData
        The observable data ``Y`` and every level of the ground truth.
    """
    _check_positive_int(n_cells=n_cells, n_programs=n_programs, n_genes=n_genes, n_cell_types=n_cell_types,
                        n_covariates=n_covariates)
    if cell_type_program_density is None:
        cell_type_program_density = 0.7 if n_covariates == 1 else 0.3
    for name, p in (("program_gene_density", program_gene_density),
                    ("cell_type_program_density", cell_type_program_density)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} is a probability and must lie in [0, 1], got {p!r}.")
    if base_rate <= 0 or base_rate + rate_step * (n_programs - 1) <= 0:
        raise ValueError("Poisson rates base_rate + rate_step * i must all be positive.")
    if offset_sd < 0:
        raise ValueError(f"offset_sd must be >= 0, got {offset_sd!r}.")
    if count_noise not in (None, "poisson", "nb"):
        raise ValueError(f"count_noise must be None, 'poisson' or 'nb', got {count_noise!r}.")
    if library_scale <= 0 or nb_dispersion <= 0:
        raise ValueError("library_scale and nb_dispersion must be positive.")

    # Fixed structure: numpy's legacy stream, in the reference's order (W first, then C).
    structure_rng = np.random.RandomState(structure_seed)
    programs = structure_rng.binomial(1, program_gene_density, (n_programs, n_genes)).astype(bool)
    cell_type_programs = structure_rng.binomial(1, cell_type_program_density, (n_cell_types, n_programs)).astype(bool)

    # Cells: one torch generator, draws in the reference's order (activities, covariate, offset, cell type).
    gen = torch.Generator().manual_seed(int(seed))
    rates = torch.tensor([base_rate + rate_step * i for i in range(n_programs)])
    X = torch.poisson(rates.expand(n_cells, n_programs).contiguous(), generator=gen)
    covariate = _uniform_categorical(n_covariates, n_cells, gen)
    if n_covariates == 1:
        offset = torch.zeros(n_cells)
    else:
        means = torch.tensor([1.0 * i for i in range(n_covariates)])
        noise = torch.normal(means.expand(n_cells, n_covariates).contiguous(),
                             torch.full((n_cells, n_covariates), float(offset_sd)), generator=gen)
        offset = noise[torch.arange(n_cells), covariate]
    X_cov = X + offset[:, None]
    cell_type = _uniform_categorical(n_cell_types, n_cells, gen)
    X_ct = X_cov * torch.from_numpy(cell_type_programs).float()[cell_type]
    Y = _program_genes(X_ct.numpy(), programs)

    counts = None
    if count_noise is not None:
        counts = _count_noise(Y, count_noise, library_scale, nb_dispersion, seed)
    params = {
        "n_cells": n_cells, "n_programs": n_programs, "n_genes": n_genes, "n_cell_types": n_cell_types,
        "n_covariates": n_covariates, "program_gene_density": program_gene_density,
        "cell_type_program_density": cell_type_program_density, "base_rate": base_rate, "rate_step": rate_step,
        "offset_sd": offset_sd, "count_noise": count_noise, "library_scale": library_scale,
        "nb_dispersion": nb_dispersion, "seed": int(seed), "structure_seed": int(structure_seed),
    }
    return SuperpositionData(
        Y=Y, X=X.numpy(), X_cov=X_cov.numpy(), X_ct=X_ct.numpy(), cell_type=cell_type.numpy().astype(np.int64),
        covariate=covariate.numpy().astype(np.int64), offset=offset.numpy(), programs=programs,
        cell_type_programs=cell_type_programs, rates=rates.numpy(), counts=counts, params=params,
    )


def _uniform_categorical(n_classes: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``Categorical(uniform).sample((n,))`` as torch.distributions draws it (multinomial with replacement)."""
    probs = 1.0 / n_classes * torch.ones(n_classes)
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.multinomial(probs.reshape(1, -1), n, True, generator=gen).T.reshape(n)


def _program_genes(X_ct: np.ndarray, programs: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """``X_ct @ programs`` in float32, in row chunks so the float64 temporaries stay small."""
    W = programs.astype(np.float32)
    out = np.empty((X_ct.shape[0], W.shape[1]), dtype=np.float32)
    for start in range(0, X_ct.shape[0], chunk):
        out[start:start + chunk] = X_ct[start:start + chunk] @ W
    return out


def _count_noise(Y: np.ndarray, kind: str, scale: float, dispersion: float, seed: int, chunk: int = 4096) -> np.ndarray:
    rng = np.random.default_rng([int(seed), 7919])
    counts = np.empty(Y.shape, dtype=np.int64)
    for start in range(0, Y.shape[0], chunk):
        mu = scale * np.maximum(Y[start:start + chunk].astype(np.float64), 0.0)  # X' can dip below 0 by the offset
        if kind == "nb":
            mu = rng.gamma(dispersion, mu / dispersion)  # Gamma-Poisson mixture = NB(mean mu, shape r)
        counts[start:start + chunk] = rng.poisson(mu)
    return counts


def simulate_superposition_runs(seeds=range(10), *, out_dir=None, prefix: str = "sim2L", overwrite: bool = False,
                                **kwargs) -> list[SuperpositionData] | list[Path]:
    """One simulation per seed (the reference: seeds 0..9, 10,000 cells each).

    With ``out_dir``, each seed is written to its own ``{prefix}_seed{seed}.npz`` and the paths are returned
    (the reference wrote every seed to the same file name); otherwise the data are returned.

    Parameters
    ----------
    seeds
        Distinct cell seeds, one simulation each (the structure seed stays the same unless given in
        ``kwargs``, so all runs share ``programs`` and ``cell_type_programs``).
    out_dir
        Directory to write the files to; ``None`` keeps the data in memory.
    prefix
        File name prefix.
    overwrite
        Replace existing files.
    **kwargs
        Other arguments of :func:`simulate_superposition` (``n_cells``, ``n_programs``, ...).

    Returns
    -------
    list of SuperpositionData or list of pathlib.Path
        One entry per seed, in ``seeds`` order.
    """
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}.")
    out = []
    for s in seeds:
        data = simulate_superposition(seed=s, **kwargs)
        if out_dir is None:
            out.append(data)
        else:
            out.append(data.save(Path(out_dir) / f"{prefix}_seed{s}.npz", overwrite=overwrite))
    return out


# ---------------------------------------------------------------------- embedding with an autoencoder
def reference_hidden_sizes(n_genes: int, n_latent: int, depth: int = 2, width: str = "narrow") -> list[int]:
    """Hidden layer sizes of the reference's simulation autoencoder, input side first.

    ``depth`` counts the encoder's linear layers. ``"narrow"``: one layer of ``max(1000, 2 n_latent)`` then
    ``max(150, 2 n_latent)`` units (only the latter at depth 2); ``"wide"``: sizes evenly spaced from
    ``n_genes / 2`` down to the latent size (10,000 units for 20,000 genes: slow on a CPU).

    Parameters
    ----------
    n_genes
        Number of input genes.
    n_latent
        Latent size.
    depth
        Number of linear layers of the encoder (1: no hidden layer).
    width
        ``"narrow"`` or ``"wide"``.

    Returns
    -------
    list of int
        ``depth - 1`` hidden sizes, input side first (empty for ``depth=1``). For ``"wide"`` these are the
        interior points of ``linspace(n_latent, n_genes / 2, depth + 1)``, so ``n_genes / 2`` itself is
        not among them (e.g. ``[5075]`` for 20,000 genes, 150 latents, depth 2).
    """
    _check_positive_int(n_genes=n_genes, n_latent=n_latent, depth=depth)
    if width not in ("narrow", "wide"):
        raise ValueError(f"width must be 'narrow' or 'wide', got {width!r}.")
    if depth == 1:
        return []
    if width == "narrow":
        rest = [max(150, 2 * n_latent)] * (depth - 2)
        return [max(1000, 2 * n_latent), *rest] if depth > 2 else [max(150, 2 * n_latent)]
    steps = np.linspace(n_latent, int(0.5 * n_genes), num=depth + 1)[::-1]
    return [int(s) for s in steps[1:-1]]


@dataclass
class SuperpositionEmbedding:
    """An autoencoder fitted to simulated genes, and the latents of the cells it was fitted on.

    ``latent`` is cells x ``n_latent``; :meth:`transform` embeds other cells (e.g. held-out ones) with the
    same gene centring and scaling.

    Attributes
    ----------
    latent
        float32 cells x ``n_latent`` latents of the cells the autoencoder was fitted on.
    model
        The fitted :class:`dgdlens.models.Autoencoder`.
    gene_mean
        ``(n_genes,)`` gene means subtracted before encoding.
    scale
        The single scalar the centred genes are divided by (their overall standard deviation).
    """

    latent: np.ndarray
    model: object  # dgdlens.models.autoencoder.Autoencoder
    gene_mean: np.ndarray
    scale: float

    def standardise(self, Y) -> np.ndarray:
        """Centre and scale genes as for training: ``(Y - gene_mean) / scale``.

        Parameters
        ----------
        Y
            Cells x genes matrix (the simulation's ``Y``), same genes as the fitted data.

        Returns
        -------
        numpy.ndarray
            float32 cells x genes.
        """
        Y = np.asarray(Y, dtype=np.float32)
        if Y.ndim != 2 or Y.shape[1] != self.gene_mean.shape[0]:
            raise ValueError(f"Y must be cells x {self.gene_mean.shape[0]} genes, got shape {Y.shape}.")
        return (Y - self.gene_mean) / self.scale

    def transform(self, Y_or_data, *, batch_size: int = 1024) -> np.ndarray:
        """Latents (cells x ``n_latent``, float32) of a genes matrix or a :class:`SuperpositionData`.

        Parameters
        ----------
        Y_or_data
            Cells x genes array, or a :class:`SuperpositionData` (its ``Y``), e.g. held-out cells.
        batch_size
            Cells encoded per batch.

        Returns
        -------
        numpy.ndarray
            float32 cells x ``n_latent`` (the encoder's output).
        """
        Y = Y_or_data.Y if isinstance(Y_or_data, SuperpositionData) else Y_or_data
        return self.model.get_latent_representation(self.standardise(Y), batch_size=batch_size)


def embed_superposition(data, *, n_latent: int = 150, depth: int = 2, width: str = "narrow", hidden=None,
                        max_epochs: int = 100, batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.0,
                        validation_fraction: float = 0.1, patience: int = 20, device="cpu", seed: int = 0,
                        progress: bool = False, num_threads: int | None = None) -> SuperpositionEmbedding:
    """Fit the reference's embedding step: an MLP autoencoder with a squared-error loss on the genes.

    The genes are centred and divided by one scalar (their overall standard deviation) first, which keeps
    the relative gene scales the programs produce while giving the optimiser unit-scale inputs. Training
    uses :class:`dgdlens.models.autoencoder.Autoencoder` (Gaussian likelihood with unit variance = MSE), with
    a seeded validation split and early stopping (the reference swapped its train/validation slices and
    trained on 10%; here training uses ``1 - validation_fraction`` of the cells).

    Parameters
    ----------
    data
        A :class:`SuperpositionData` (its ``Y``) or a cells x genes array.
    n_latent, depth, width, hidden
        Latent size and encoder layout (:func:`reference_hidden_sizes`), or explicit ``hidden`` sizes,
        input side first; the decoder mirrors the encoder.
    max_epochs, batch_size, lr, weight_decay, validation_fraction, patience, device, seed, progress
        Training options of :meth:`Autoencoder.train <dgdlens.models.Autoencoder.train>` (early stopping
        whenever ``validation_fraction > 0``).
    num_threads
        CPU threads for torch while training (restored afterwards; ``None`` leaves torch's setting). On a
        busy machine one thread can be many times faster than oversubscribed cores.

    Returns
    -------
    SuperpositionEmbedding
        The fitted autoencoder and the latents of ``data``.
    """
    from ..models.autoencoder import Autoencoder
    from ..sae.train import torch_threads
    from ..nn.decoders import mlp_decoder, mlp_encoder

    Y = data.Y if isinstance(data, SuperpositionData) else data
    Y = np.asarray(Y, dtype=np.float32)
    if Y.ndim != 2 or Y.shape[0] < 2:
        raise ValueError(f"data must be a SuperpositionData or a cells x genes array with >= 2 cells, got shape {Y.shape}.")
    if not np.isfinite(Y).all():
        raise ValueError("The genes matrix contains NaN or infinite values.")
    n_genes = Y.shape[1]
    hidden = reference_hidden_sizes(n_genes, n_latent, depth, width) if hidden is None else [int(h) for h in hidden]
    gene_mean = Y.mean(0)
    scale = float(np.sqrt(((Y - gene_mean) ** 2).mean()))
    if not scale > 0:
        raise ValueError("The genes matrix is constant across cells; there is nothing to embed.")
    decoder_side = hidden[::-1]  # mlp_encoder mirrors a decoder's hidden list
    embedding = SuperpositionEmbedding(latent=np.zeros((0, n_latent), np.float32), model=None, gene_mean=gene_mean,
                                       scale=scale)
    with torch.random.fork_rng(devices=[]):  # seeded initial weights without touching the caller's RNG
        torch.manual_seed(seed)
        embedding.model = Autoencoder(embedding.standardise(Y), mlp_encoder(n_genes, n_latent, decoder_side),
                                      mlp_decoder(n_latent, n_genes, decoder_side), likelihood="gaussian",
                                      validation_fraction=validation_fraction, seed=seed)
    with torch_threads(num_threads):
        embedding.model.train(max_epochs=max_epochs, batch_size=batch_size, early_stopping=validation_fraction > 0,
                              lr=lr, weight_decay=weight_decay, patience=patience, seed=seed, device=device,
                              progress=progress)
    embedding.latent = embedding.model.get_latent_representation()
    return embedding


# ---------------------------------------------------------------------- planted sparse codes
@dataclass
class PlantedSparseCodes:
    """Samples ``X = codes @ atoms + offset + noise`` with exactly ``k_active`` non-zero codes per sample.

    Attributes
    ----------
    X
        float32 ``(n_samples, dim)`` samples.
    codes
        float32 ``(n_samples, n_atoms)`` non-negative true codes, ``k_active`` non-zeros per row.
    atoms
        float32 ``(n_atoms, dim)`` unit-norm dictionary rows.
    offset
        float32 ``(dim,)`` constant offset added to every sample.
    """

    X: np.ndarray  # (n_samples, dim) float32
    codes: np.ndarray  # (n_samples, n_atoms) float32, non-negative, k_active non-zeros per row
    atoms: np.ndarray  # (n_atoms, dim) float32, unit-norm rows
    offset: np.ndarray  # (dim,)


def planted_sparse_codes(n_samples: int = 5000, n_atoms: int = 64, dim: int = 16, k_active: int = 3, *,
                         magnitude: tuple[float, float] = (0.5, 1.5), offset_scale: float = 0.0,
                         noise_sd: float = 0.0, max_coherence: float | None = None, seed: int = 0
                         ) -> PlantedSparseCodes:
    """Sparse codes in superposition: more unit-norm atoms than dimensions, few active per sample.

    Parameters
    ----------
    n_samples
        Number of samples.
    n_atoms, dim, k_active
        Dictionary size, input dimension, and active atoms per sample (drawn uniformly without replacement).
    magnitude
        Active codes are Uniform(magnitude).
    offset_scale
        Standard deviation of a constant offset added to every sample (tests the decoder bias).
    noise_sd
        Gaussian noise per entry.
    max_coherence
        If set, atoms are redrawn until no two have ``|cosine|`` above it (up to 1,000 tries each).
    seed
        Seed of the numpy generator.

    Returns
    -------
    PlantedSparseCodes
        ``X`` (samples x ``dim``), the true ``codes`` (samples x atoms), the ``atoms`` and the ``offset``.
    """
    _check_positive_int(n_samples=n_samples, n_atoms=n_atoms, dim=dim, k_active=k_active)
    if k_active > n_atoms:
        raise ValueError(f"k_active={k_active} exceeds n_atoms={n_atoms}.")
    lo, hi = magnitude
    if not 0 <= lo <= hi:
        raise ValueError(f"magnitude must be (low, high) with 0 <= low <= high, got {magnitude!r}.")
    rng = np.random.default_rng(seed)
    atoms = _draw_atoms(rng, n_atoms, dim, max_coherence)
    active = np.argpartition(rng.random((n_samples, n_atoms)), k_active - 1, axis=1)[:, :k_active]
    codes = np.zeros((n_samples, n_atoms), dtype=np.float32)
    np.put_along_axis(codes, active, rng.uniform(lo, hi, (n_samples, k_active)).astype(np.float32), axis=1)
    offset = (rng.normal(0, offset_scale, dim) if offset_scale > 0 else np.zeros(dim)).astype(np.float32)
    X = codes @ atoms + offset
    if noise_sd > 0:
        X = X + rng.normal(0, noise_sd, X.shape).astype(np.float32)
    return PlantedSparseCodes(X=X.astype(np.float32), codes=codes, atoms=atoms, offset=offset)


def _draw_atoms(rng: np.random.Generator, n_atoms: int, dim: int, max_coherence: float | None) -> np.ndarray:
    atoms = np.empty((n_atoms, dim))
    for i in range(n_atoms):
        for _ in range(1000):
            a = rng.normal(size=dim)
            a /= np.linalg.norm(a)
            if max_coherence is None or i == 0 or np.abs(atoms[:i] @ a).max() <= max_coherence:
                break
        else:
            raise ValueError(f"Could not draw {n_atoms} atoms in {dim} dimensions with coherence <= {max_coherence}.")
        atoms[i] = a
    return atoms.astype(np.float32)


def _check_positive_int(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
