"""Training plan of every decoder-only model (the DGD and :class:`~dgdlens.models.DecoderOnly`).

Each training sample owns a free latent vector (a row of a :class:`~dgdlens.nn.RepresentationTable`),
learned together with the decoder and the prior; validation samples' latents are fitted with the
model frozen, so the validation loss measures the decoder as held-out inference will use it.

With covariates (the DGD's ``batch_key``/``categorical_covariate_keys``) every sample owns several latent
blocks: the biological latent and one small latent per categorical covariate, each a table of its own,
sharded, optimised, checkpointed and restored exactly like the first; the per-sample categories and
continuous covariates (:class:`SampleCovariates`) are looked up by the same batch indices.

Under ``torchrun`` the decoder, likelihood and prior are replicated (gradients summed after every
step) and the representation tables are sharded by sample: each process owns a contiguous slice of
the training (and validation) samples, their latents and their optimiser state, and only ever reads
those rows of the data (a contiguous region of a backed file). ``batch_size`` is the global batch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from ..data.loader import BatchLoader
from ..data.matrix import RowMatrix
from ..nn.module import DecoderOnlyModule, frozen
from ..nn.representation import RepresentationTable
from .inference import optimise_latents
from .latent_init import pca_latents, pca_residuals
from .plan import TrainingPlan
from .sketch import residual_sample, sketch_sample

__all__ = ["DecoderOnlyPlanConfig", "DecoderOnlyPlan", "SampleCovariates", "REFIT_SAMPLE"]

#: most latents the end-of-training EM refit of the mixture uses (a seeded sample across all processes)
REFIT_SAMPLE = 100_000
#: Cells per batch of the end-of-training polish. Each cell stops on its own (``optimise_latents``), so
#: the batch changes no result; in order and 2,048 at a time it cost 25 % less per cell and step than
#: shuffled batches of 256 (60,000 simulated cells x 500 genes, one thread).
POLISH_BATCH = 2048


@dataclass
class DecoderOnlyPlanConfig:
    """The decoder-only training options. Defaults follow the reference scDGD trainer except where noted.

    Attributes
    ----------
    batch_size
        Mini-batch size (global across processes). Reference: 256.
    lr_decoder, lr_prior, lr_rep
        Adam learning rates (reference: 1e-3 / 1e-2 / 1e-2).
    betas, weight_decay, prior_weight_decay
        Adam betas and weight decay for decoder and prior (reference: (0.5, 0.7), 1e-4).
    rep_weight_decay
        L2 shrinkage of the representations (reference: Adam weight decay 1e-4 on them too).
    rep_step
        ``"epoch"``: one full-batch step per epoch from gradients accumulated over all mini-batches
        (the reference). ``"batch"``: a lazy Adam step on the batch rows after every mini-batch.
    rep_optimizer, rep_momentum
        ``"adam"`` (DGD) or ``"sgd"`` with momentum (the decoder-only "manifold" paper).
    latent_init
        ``"zeros"``: every latent starts at the origin (the reference). ``"pca"``: at its cell's principal
        components of the log-normalised counts, scaled into the prior's radius, with the mixture fitted
        to them by EM before the first epoch (see :mod:`dgdlens.train.latent_init` for why).
    lr_decay_epoch, lr_decay_factor, reset_optimizers_on_decay
        Reference: at epoch 300 the decoder learning rate drops 10x and the decoder and prior
        optimisers are re-created (their Adam state reset). ``None`` disables the drop.
    prior_refit_epoch, refit_prior_at_end
        Re-fit a mixture prior by EM on the training latents at the start of epoch ``prior_refit_epoch``
        (default never) and/or once after training (default ``True``). Why: every latent starts at the
        origin, where one component takes all cells; gradient steps then starve the others, so the jointly
        trained mixture ends with one or two occupied components even when the latents separate the cell
        types cleanly (planted 4 types: k-means on the latents ARI 1.0, mixture argmax ARI 0.0). The
        reference never refits (``refit_prior_at_end=False``).
    decoder_subsample
        Train the decoder, the prior and the latents on a seeded sample of at most this many training
        samples (and the same share of the validation samples). The others wait at their PCA start
        (``latent_init="pca"`` is required); at the end each starts from the least-squares line that maps
        the sample's PCA starts to their trained latents, and is polished with the decoder frozen, as new
        samples are embedded. ``None``: every sample trains. Why: a latent gets one step per pass, so the
        passes needed do not shrink with the data; past a size the decoder learns little from more cells,
        while every latent still costs a pass.
    decoder_subsample_by
        How that sample is drawn. ``"residual"`` (default): a tenth of the sample are the cells the PCA
        start's components explain worst for their library size
        (:func:`dgdlens.train.pca_residuals`: a type too rare to shape those components leaves
        its own markers unexplained, so its cells are among them), the rest uniform, with Horvitz-Thompson
        weights for the mixture refit (used with ``refit_sample_weights``). ``"random"``: a uniform
        sample, which keeps a population's share, so a type of 0.2 % of a million cells has 200 cells in
        100,000. ``"sketch"`` spreads it evenly over the
        PCA starts (:func:`dgdlens.train.sketch_sample`: boxes by side of the median along the first 16
        coordinates, the same number of samples from each), weighted likewise. Chosen on
        validation cells (``benchmarks/rare_types.py``, docs/benchmarks/time_to_quality.md).
    refit_sample_weights
        With a weighted sample (``"residual"``, ``"sketch"``): ``False`` (default) refits the mixture by
        plain EM on the sample's latents as they are, so its weights are the sample's proportions (cells
        the sample over-represents, such as a rare type's, weigh more than their share of all cells);
        ``True`` weighs EM by the sample's Horvitz-Thompson weights
        (:func:`~dgdlens.nn.fit_weighted_mixture`), so the weights are every cell's proportions. Chosen
        on validation cells (``benchmarks/mixture_refit.py``; 300,000 simulated cells with two rare
        types, three seeds, three refit seeds each): the plain refit fitted a 0.2 % type's held-out cells
        2.8 nats per cell better on average (652.2 vs 655.0), common cells the same (637.17 vs 637.15);
        on a million common cells the two tied within the refit's seed noise (620.72 vs 620.77). For
        population proportions, count the cluster assignments of all cells.
    polish_steps, polish_lr, polish_tol
        After the final refit, the training and validation latents are re-optimised for up to this many
        Adam steps under the refitted prior with the decoder frozen, exactly as held-out samples are
        embedded. A batch stops early once its mean loss changes by less than ``polish_tol`` (relative).
    hyperprior
        ``"per_cell"`` (default, the reference): the prior's own log-prior counts once per cell in every
        batch; ``"dataset"``: once per pass (the literal MAP objective), which lets the occupied components
        collapse (see the README's DGD section for the measurements).
    monitor
        ``"val_recon"`` (validation NLL per sample) or ``"val_loss"`` (NLL + prior).
    shuffle_block_size
        Rows per contiguous block for block shuffling (``None``: 1024 for backed data, a full shuffle in
        memory; ``0``: always a full shuffle). The same value gives the same batches in memory and on disk.
    max_batches
        Cut every epoch after this many batches (benchmarks; ``None``: all).
    lr_covariate_prior
        Adam learning rate of the covariate priors' means and precisions (``None``: ``lr_prior / 10``,
        multiDGD's 1e-3 next to 1e-2). Only used with covariates.
    seed
        Seeds the mini-batch order.
    """

    batch_size: int = 256
    lr_decoder: float = 1e-3
    lr_prior: float = 1e-2
    lr_rep: float = 1e-2
    betas: tuple[float, float] = (0.5, 0.7)
    weight_decay: float = 1e-4
    prior_weight_decay: float = 1e-4
    rep_weight_decay: float = 1e-4
    rep_step: str = "epoch"
    rep_optimizer: str = "adam"
    rep_momentum: float = 0.9
    latent_init: str = "zeros"
    lr_decay_epoch: int | None = 300
    lr_decay_factor: float = 0.1
    reset_optimizers_on_decay: bool = True
    prior_refit_epoch: int | None = None
    refit_prior_at_end: bool = True
    decoder_subsample: int | None = None
    decoder_subsample_by: str = "residual"
    refit_sample_weights: bool = False
    polish_steps: int = 100
    polish_lr: float = 1e-2
    polish_tol: float = 1e-4
    hyperprior: str = "per_cell"
    monitor: str = "val_recon"
    shuffle_block_size: int | None = None
    max_batches: int | None = None
    lr_covariate_prior: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        choices = {"rep_step": {"epoch", "batch"}, "rep_optimizer": {"adam", "sgd"}, "latent_init": {"zeros", "pca"},
                   "decoder_subsample_by": {"random", "sketch", "residual"},
                   "hyperprior": {"dataset", "per_cell"}, "monitor": {"val_recon", "val_loss"}}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {sorted(allowed)}, got {getattr(self, name)!r}")
        if isinstance(self.batch_size, bool) or int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        for name in ("lr_decoder", "lr_prior", "lr_rep", "polish_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if int(self.polish_steps) != self.polish_steps or self.polish_steps < 0:
            raise ValueError(f"polish_steps must be a non-negative integer, got {self.polish_steps!r}")
        if self.decoder_subsample is not None:
            n = self.decoder_subsample
            if isinstance(n, bool) or int(n) != n or n < 1:
                raise ValueError(f"decoder_subsample must be a positive integer or None, got {n!r}")
            if self.latent_init != "pca":
                raise ValueError("decoder_subsample needs latent_init='pca': the samples left out of training keep "
                                 "their starting latents until the end, and at the origin they would have none.")

    @classmethod
    def names(cls) -> set[str]:
        """The option names, e.g. to pick the plan's options out of a larger set of keyword arguments.

        Returns
        -------
        set of str
            The names of the dataclass fields.
        """
        return {f.name for f in fields(cls)}

    def to_dict(self) -> dict:
        """The options as a plain dict (for the saved model's ``train_config``).

        Returns
        -------
        dict
            ``{option name: value}`` for every field.
        """
        return asdict(self)


@dataclass
class SampleCovariates:
    """Per-sample covariates for every row of the data matrix.

    Attributes
    ----------
    codes
        (n_obs, n_categorical) int64 category codes (``-1``: unknown, scored under the marginal mixture).
    continuous
        (n_obs, n_continuous) float32 standardised continuous covariates, or ``None``.
    """

    codes: np.ndarray
    continuous: np.ndarray | None = None

    def local(self, rows: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        codes = torch.as_tensor(np.ascontiguousarray(self.codes[rows]), dtype=torch.int64, device=device)
        cont = (None if self.continuous is None else
                torch.as_tensor(np.ascontiguousarray(self.continuous[rows]), dtype=torch.float32, device=device))
        return codes, cont


def _rep_optimizer(tables: list[RepresentationTable], cfg: DecoderOnlyPlanConfig) -> torch.optim.Optimizer:
    """One optimiser over every latent block of a split (Adam is elementwise: the same as one per block)."""
    params = [t.z for t in tables]
    if cfg.rep_optimizer == "sgd":
        # plain SGD with momentum, as the paper's decoder-only learner used; in per-batch mode the
        # momentum keeps moving rows that are not in the batch (decaying), as it did there.
        return torch.optim.SGD(params, lr=cfg.lr_rep, momentum=cfg.rep_momentum,
                               weight_decay=0.0 if cfg.rep_step == "batch" else cfg.rep_weight_decay)
    if cfg.rep_step == "epoch":
        return torch.optim.Adam(params, lr=cfg.lr_rep, betas=cfg.betas, weight_decay=cfg.rep_weight_decay)
    return torch.optim.SparseAdam(params, lr=cfg.lr_rep, betas=cfg.betas)


def _as_list(table):
    if table is None:
        return None
    return list(table) if isinstance(table, (list, tuple)) else [table]


class DecoderOnlyPlan(TrainingPlan):
    """Decoder, prior and per-sample latents by MAP (see :class:`DecoderOnlyPlanConfig`).

    Parameters
    ----------
    module
        The model maths.
    matrix, scale
        All samples' data and per-sample scale factors (library sizes; ``None`` for none).
    train_idx, val_idx
        Rows of ``matrix`` in each split (sorted).
    train_table, val_table
        Full representation tables for the splits (``val_table`` ``None`` without a validation split),
        or lists of tables, one per latent block (biological first, then one per categorical covariate);
        on return from training they hold every sample's latents (``full_train_tables``,
        ``full_val_tables``; ``full_train_table`` is the first block), whatever the number of processes.
    config
        A :class:`DecoderOnlyPlanConfig`.
    covariates
        :class:`SampleCovariates` for every row of ``matrix`` when the module reads covariates
        (:class:`~dgdlens.nn.covariates.CovariateDecoderModule`), else ``None``.
    """

    def __init__(self, module: DecoderOnlyModule, matrix: RowMatrix, scale: np.ndarray | None,
                 train_idx: np.ndarray, val_idx: np.ndarray, train_table, val_table, config: DecoderOnlyPlanConfig,
                 covariates: SampleCovariates | None = None) -> None:
        super().__init__()
        self.module, self.matrix, self.scale = module, matrix, scale
        self.train_idx, self.val_idx = np.asarray(train_idx), np.asarray(val_idx)
        self.full_train_tables, self.full_val_tables = _as_list(train_table), _as_list(val_table)
        self.covariates = covariates
        self.cfg = config
        self.monitor = config.monitor
        self.n_train, self.n_val = len(self.train_idx), len(self.val_idx) if val_table is not None else 0
        self._cov_train = self._cov_val = (None, None)
        self._decayed = False
        self._last_hyper = torch.zeros(())

    # ------------------------------------------------------------------ set-up
    @property
    def has_validation(self) -> bool:
        """Whether a validation table was given and ``val_idx`` is non-empty."""
        return self.n_val > 0

    # the first block (the biological latent) under the names every caller used before blocks existed
    @property
    def full_train_table(self):
        """The biological latents of every training sample (a :class:`~dgdlens.nn.RepresentationTable`,
        ``n_train x n_latent``), the first block of ``full_train_tables``; ``None`` between :meth:`setup`
        and the end of training under several processes."""
        return None if self.full_train_tables is None else self.full_train_tables[0]

    @property
    def full_val_table(self):
        """The biological latents of every validation sample (first block of ``full_val_tables``), or
        ``None`` without a validation split (and during training under several processes)."""
        return None if self.full_val_tables is None else self.full_val_tables[0]

    @property
    def train_table(self):
        """This process's shard of the biological training latents (first block of ``train_tables``, on
        the training device); only after :meth:`setup`."""
        return self.train_tables[0]

    @property
    def val_table(self):
        """This process's shard of the biological validation latents, or ``None`` when there is no
        validation split (or it has fewer samples than processes); only after :meth:`setup`."""
        return None if self.val_tables is None else self.val_tables[0]

    def setup(self, strategy, device) -> None:
        """Check the processes agree, move the module to ``device`` (rank 0's weights everywhere), take this
        process's shard of the training and validation latent tables (and covariates), build the loaders
        and the optimisers of the decoder, the prior(s) and the latents.

        Parameters
        ----------
        strategy
            The runner's :class:`~dgdlens.train.Strategy`.
        device
            The resolved training device.
        """
        super().setup(strategy, device)
        cfg, size = self.cfg, strategy.world_size
        self.check_same_everywhere(self.matrix.n_obs, self.matrix.n_vars, self.train_idx, self.n_val, cfg.batch_size,
                                   cfg.seed)
        self.module.to(device)
        strategy.broadcast_module(self.module)
        self.train_lo, self.train_hi = strategy.shard(self.n_train)
        self.val_lo, self.val_hi = strategy.shard(self.n_val)
        self.train_tables = [self._local_table(t, self.train_lo, self.train_hi) for t in self.full_train_tables]
        use_val = self.n_val > 0 and self.n_val >= size
        self.val_tables = ([self._local_table(t, self.val_lo, self.val_hi) for t in self.full_val_tables]
                           if use_val else None)
        if size > 1:  # holding the full tables meanwhile would undo the sharding
            self.full_train_tables = self.full_val_tables = None
        self.n_fit, self.n_fit_val = self.n_train, (self.n_val if use_val else 0)
        # the epochs' sample (decoder_subsample): positions in the shards, and a sketch's weights
        self._fit_positions = self._fit_weights = None
        self._residual_scores = None  # per training sample of this shard, for decoder_subsample_by="residual"
        if cfg.latent_init == "pca":
            self._start_latents_from_pca()
        # every sample's latents on this process; the epochs may see a subsample of them (decoder_subsample)
        self._shard_tables = (self.train_tables, self.val_tables)
        if cfg.decoder_subsample is not None and cfg.decoder_subsample < self.n_train:
            if cfg.polish_steps < 1:
                raise ValueError(f"decoder_subsample={cfg.decoder_subsample} leaves {self.n_train - cfg.decoder_subsample} "
                                 "training samples to the end-of-training polish, but polish_steps=0; give "
                                 "polish_steps >= 1, or decoder_subsample=None to train every sample.")
            self._fit_positions = self._subsample_positions(cfg.decoder_subsample, use_val)
        self._bind_samples(self._fit_positions)
        strategy.agree([len(self.train_loader)], "the number of mini-batches per epoch")
        self.opt_rep = _rep_optimizer(self.train_tables, cfg)
        self.opt_val_rep = None if self.val_tables is None else _rep_optimizer(self.val_tables, cfg)
        self._build_optimizers(decayed=False)

    def _draws_residual_sample(self) -> bool:
        """Whether setup will draw a ``"residual"`` sample (so the PCA start's pass also scores the cells)."""
        cfg = self.cfg
        return (cfg.decoder_subsample_by == "residual" and cfg.decoder_subsample is not None
                and cfg.decoder_subsample < self.n_train)

    def _subsample_positions(self, n_fit: int, use_val: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Seeded positions, within this process's shards, of the training and validation samples the epochs
        see: ``n_fit`` training samples and the same share of the validation samples over all processes,
        each process taking its even share (so every process steps the same number of batches)."""
        st, seed = self.strategy, self.cfg.seed
        if n_fit < st.world_size:
            raise ValueError(f"decoder_subsample={n_fit} is smaller than the {st.world_size} processes; give each "
                             "process at least one cell.")
        self.n_fit = n_fit
        lo, hi = self._shard_of(n_fit, st.rank)
        rng = np.random.default_rng([seed, st.rank, 1])
        if self.cfg.decoder_subsample_by == "sketch":  # spread over the PCA starts (rare groups kept whole)
            starts = self.train_tables[0].z.detach().cpu().numpy()
            train_pos, self._fit_weights = sketch_sample(starts, hi - lo, rng)
        elif self.cfg.decoder_subsample_by == "residual":  # the cells the PCA explains worst, then uniform
            scores = self._residual_scores  # from the PCA start's pass over the data, when it ran
            if scores is None:  # the latents were not fresh (a second train call): the same PCA again
                scores = pca_residuals(self.matrix, self.train_idx, self._shard_rows()[0], self.train_tables[0].dim,
                                       seed=seed)
            train_pos, self._fit_weights = residual_sample(scores, hi - lo, rng)
            self._residual_scores = None
        else:
            train_pos = np.sort(rng.choice(self.train_hi - self.train_lo, hi - lo, replace=False))
        val_pos = None
        if use_val:
            self.n_fit_val = min(self.n_val, max(st.world_size, round(self.n_val * n_fit / self.n_train)))
            vlo, vhi = self._shard_of(self.n_fit_val, st.rank)
            val_pos = np.sort(rng.choice(self.val_hi - self.val_lo, vhi - vlo, replace=False))
        return train_pos, val_pos

    def _bind_samples(self, positions: tuple[np.ndarray, np.ndarray | None] | None) -> None:
        """Point the epochs (tables, covariates, loaders) at these positions of this process's training and
        validation shards (from :meth:`_subsample_positions`), or at every sample (``None``). A subsample's
        tables are copies: :meth:`_rejoin_subsample` writes them back."""
        cfg = self.cfg
        train, val = self._shard_tables
        rows, val_rows = self._shard_rows()
        if positions is not None:
            train_pos, val_pos = positions
            rows, train = rows[train_pos], [self._rows_of(t, train_pos) for t in train]
            if val is not None:
                val_rows, val = val_rows[val_pos], [self._rows_of(t, val_pos) for t in val]
        self.train_tables, self.val_tables = train, val
        sparse = cfg.rep_step == "batch" and cfg.rep_optimizer == "adam"
        for table in self.train_tables + (self.val_tables or []):
            table.sparse_grad = sparse
        if self.covariates is not None:
            self._cov_train = self.covariates.local(rows, self.device)
            if val is not None:
                self._cov_val = self.covariates.local(val_rows, self.device)
        self.train_loader = self._loader(rows, seed=cfg.seed, train=True)
        self.val_loader = None if val is None else self._loader(val_rows, seed=cfg.seed + 1, train=False)

    @staticmethod
    def _rows_of(table: RepresentationTable, positions: np.ndarray) -> RepresentationTable:
        picked = table.z.detach()[torch.from_numpy(positions).to(table.z.device)]
        return RepresentationTable(len(positions), table.dim, init=picked.cpu()).to(table.z.device)

    def _rejoin_subsample(self) -> bool:
        """Write the subsample's latents back into this process's tables, start every other latent where the
        subsample's training would have taken it, and point everything at every sample again; whether
        there was a subsample.

        The start: a least-squares line (with intercept) from the subsample's PCA starts to their trained
        latents, one map for every process, applied to the others' PCA starts. Measured on 20,000 left-out
        cells (60,000 simulated, 10,000 trained): the polish took 23 s to 799.22 nats per cell from the PCA
        start, 8.7 s to 798.95 from the line (18.8 steps per cell; the line from 50 principal components
        instead of the start's 20 did no better)."""
        if self._fit_positions is None:
            return False
        whole_train, whole_val = self._shard_tables
        train_pos, val_pos = self._fit_positions
        start = whole_train[0].z.detach()[torch.from_numpy(train_pos).to(self.device)]
        line = self._fitted_line(start, self.train_tables[0].z.detach())
        with torch.no_grad():
            for tables, whole, pos in ((self.train_tables, whole_train, train_pos),
                                       (self.val_tables, whole_val, val_pos)):
                for part, table in zip(tables or [], whole or []):
                    rows = torch.from_numpy(pos).to(table.z.device)
                    table.z.copy_(line(table.z.detach()))
                    table.z[rows] = part.z.detach()
        self._fit_positions = self._fit_weights = None
        self._bind_samples(None)
        return True

    def _fitted_line(self, x: torch.Tensor, y: torch.Tensor):
        """``f(x) = [x, 1] W`` fitted by least squares on every process's rows (normal equations summed
        over processes, in float64, with a tiny ridge so a constant column cannot make them singular)."""
        design = torch.cat([x, torch.ones(len(x), 1, device=x.device, dtype=x.dtype)], 1).double()
        normal = self.strategy.reduce_sum(torch.cat([design.T @ design, design.T @ y.double()], 1))
        gram, rhs = normal[:, :design.shape[1]], normal[:, design.shape[1]:]
        ridge = 1e-8 * torch.trace(gram) / len(gram)
        weights = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype, device=gram.device), rhs)

        def line(z: torch.Tensor) -> torch.Tensor:
            return (z.double() @ weights[:-1] + weights[-1]).to(z.dtype)

        return line

    def _start_latents_from_pca(self) -> None:
        """Put untrained latents at their cells' scaled PCA coordinates and fit the mixture to them by EM.

        Only latents that are all still at the origin move (a second ``train`` call, or a resumed run whose
        checkpoint is loaded after this, keeps what was learned). Every process fits the same components
        on the same seeded sample of all training cells and projects its own shard."""
        tables = [self.train_table] + ([] if self.val_table is None else [self.val_table])
        fresh = torch.tensor([float(all(not bool(t.z.detach().any()) for t in tables))])
        if float(self.strategy.reduce_sum(fresh)[0]) < self.strategy.world_size:
            return
        rows = [r for r in self._shard_rows() if r is not None]
        radius = float(getattr(self.module.prior, "softball_radius", 2.0))
        if self._draws_residual_sample():  # the sample's scores come from the same pass
            starts, scores = pca_latents(self.matrix, self.train_idx, rows, self.train_table.dim, radius=radius,
                                         seed=self.cfg.seed, residuals=True)
            self._residual_scores = scores[0]
        else:
            starts = pca_latents(self.matrix, self.train_idx, rows, self.train_table.dim, radius=radius,
                                 seed=self.cfg.seed)
        with torch.no_grad():
            for table, z in zip(tables, starts):
                table.z.copy_(torch.from_numpy(z).to(table.z.device))
        self._refit_prior()

    def _local_table(self, table, lo, hi):
        if table is None:
            return None
        if self.strategy.world_size == 1:
            return table.to(self.device)
        return RepresentationTable(hi - lo, table.dim, init=table.z.detach()[lo:hi].cpu()).to(self.device)

    def _shard_rows(self) -> tuple[np.ndarray, np.ndarray | None]:
        """This process's rows of the matrix: its training shard, and its validation shard (``None`` without
        validation)."""
        val_rows = None if self.val_tables is None else self.val_idx[self.val_lo:self.val_hi]
        return self.train_idx[self.train_lo:self.train_hi], val_rows

    def _scale_of(self, rows: np.ndarray) -> np.ndarray | None:
        return None if self.scale is None else self.scale[rows]

    def _loader(self, rows: np.ndarray, *, seed: int, train: bool) -> BatchLoader:
        loader = self.shuffled_loader(self.matrix, rows, self._scale_of(rows), batch_size=self.cfg.batch_size, seed=seed,
                                      block_size=self.cfg.shuffle_block_size, n_total=self.n_fit if train else None)
        if train:
            loader.max_batches = self.cfg.max_batches
        return loader

    def _build_optimizers(self, decayed: bool) -> None:
        cfg = self.cfg
        lr_dec = cfg.lr_decoder * (cfg.lr_decay_factor if decayed else 1.0)
        dec_params = list(self.module.decoder.parameters()) + list(self.module.likelihood.parameters())
        self.opt_decoder = torch.optim.Adam(dec_params, lr=lr_dec, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self._build_prior_optimizer()

    def _build_prior_optimizer(self) -> None:
        cfg = self.cfg
        params = [p for p in self.module.prior.parameters() if p.requires_grad]
        groups = [{"params": params}] if params else []
        cov_priors = getattr(self.module, "covariate_priors", None)
        cov_params = [] if cov_priors is None else [p for p in cov_priors.parameters() if p.requires_grad]
        if cov_params:
            lr = cfg.lr_prior / 10 if cfg.lr_covariate_prior is None else cfg.lr_covariate_prior
            groups.append({"params": cov_params, "lr": lr})
        self.opt_prior = (torch.optim.Adam(groups, lr=cfg.lr_prior, betas=cfg.betas, weight_decay=cfg.prior_weight_decay)
                          if groups else None)

    def shared_parameters(self):
        """The module's trainable parameters (decoder, likelihood, priors); the latents are sharded, not
        shared.

        Returns
        -------
        list of torch.nn.Parameter
            Every parameter of the module with ``requires_grad``.
        """
        return [p for p in self.module.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ schedules
    def on_epoch_start(self, epoch: int) -> None:
        """Apply the epoch's schedules: the decoder learning-rate drop at ``lr_decay_epoch`` (re-creating the
        decoder and prior optimisers with ``reset_optimizers_on_decay``), the mixture refit at
        ``prior_refit_epoch``; then training mode, and with ``rep_step="epoch"`` clear the latents'
        accumulated gradients.

        Parameters
        ----------
        epoch
            The 0-based epoch about to start.
        """
        cfg = self.cfg
        if cfg.lr_decay_epoch is not None and not self._decayed and epoch >= cfg.lr_decay_epoch:
            self._decayed = True
            if cfg.reset_optimizers_on_decay:
                self._build_optimizers(decayed=True)
            else:
                for group in self.opt_decoder.param_groups:
                    group["lr"] = cfg.lr_decoder * cfg.lr_decay_factor
        if cfg.prior_refit_epoch is not None and epoch == cfg.prior_refit_epoch and hasattr(self.module.prior, "fit_to"):
            self._refit_prior()
            self._build_prior_optimizer()
        self.module.train()
        if cfg.rep_step == "epoch":
            self.opt_rep.zero_grad(set_to_none=True)

    def _refit_prior(self) -> None:
        """EM refit of the mixture on a seeded sample of at most :data:`REFIT_SAMPLE` training latents from
        every process, fitted on rank 0 and broadcast (EM on millions of latents costs minutes for no gain).
        While the epochs train a weighted sample (residual or sketch) and ``refit_sample_weights`` is set,
        EM is weighted by the sample's weights, which travel with their latents to rank 0."""
        prior = self.module.prior
        if not hasattr(prior, "fit_to"):
            return
        st = self.strategy
        sizes = [hi - lo for lo, hi in (self._shard_of(self.n_fit, r) for r in range(st.world_size))]
        takes = [min(n, math.ceil(REFIT_SAMPLE / st.world_size)) for n in sizes]
        z = self.train_table.z.detach()
        rng = np.random.default_rng([self.cfg.seed, st.rank])
        # set while the epochs' sample is weighted (residual or sketch); with refit_sample_weights the mixture
        # is fitted by weighted EM, so it sees every cell's proportions, not the sample's
        weights = self._fit_weights if self.cfg.refit_sample_weights else None
        if takes[st.rank] < len(z):
            pick = np.sort(rng.choice(len(z), takes[st.rank], replace=False))
            z = z[torch.from_numpy(pick).to(z.device)]
            weights = None if weights is None else weights[pick]
        if weights is not None:  # weights travel as one more column, so they stay with their rows
            z = torch.cat([z, torch.as_tensor(weights, dtype=z.dtype, device=z.device)[:, None]], 1)
        sample = st.gather_rows(z, sum(takes), sizes=takes) if st.world_size > 1 else z
        if weights is not None:
            sample, weights = sample[:, :-1], sample[:, -1]
        if st.is_main and len(sample) >= getattr(prior, "n_components", 1):
            prior.fit_to(sample, seed=self.cfg.seed, sample_weight=weights)
        st.broadcast_module(prior)

    def _shard_of(self, n: int, rank: int) -> tuple[int, int]:
        size = self.strategy.world_size
        return n * rank // size, n * (rank + 1) // size

    # ------------------------------------------------------------------ steps
    def train_batches(self):
        """This process's shuffled training loader.

        Returns
        -------
        BatchLoader
            Yields :class:`~dgdlens.data.Batch` objects whose ``index`` are positions in this process's
            training shard (rows of ``train_table``).
        """
        return self.train_loader

    def zero_grad(self) -> None:
        """Clear the decoder and prior gradients, and the latents' too with ``rep_step="batch"`` (with
        ``"epoch"`` they accumulate over the epoch)."""
        self.opt_decoder.zero_grad(set_to_none=True)
        if self.opt_prior is not None:
            self.opt_prior.zero_grad(set_to_none=True)
        if self.cfg.rep_step == "batch":
            self.opt_rep.zero_grad(set_to_none=True)

    def _batch_covariates(self, index: torch.Tensor, cov) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        codes, cont = cov
        return (None if codes is None else codes[index]), (None if cont is None else cont[index])

    def _batch_loss(self, batch, tables: list[RepresentationTable], cov):
        zs = [t(batch.index) for t in tables]
        codes, cont = self._batch_covariates(batch.index, cov)
        recon, prior = self.module.batch_nll(batch.x, zs, batch.scale, codes, cont)
        loss = recon.sum() + prior.sum()
        if self.cfg.rep_step == "batch" and self.cfg.rep_weight_decay > 0:
            # the lazy optimisers have no weight decay; the same L2 shrinkage as a loss term
            loss = loss + 0.5 * self.cfg.rep_weight_decay * sum(z.pow(2).sum() for z in zs)
        return loss, recon.detach().sum(), prior.detach().sum()

    def training_step(self, batch):
        """Negative log joint of one batch: reconstruction NLL plus latent prior NLL, summed over samples,
        plus the prior's own hyperprior NLL weighted by the batch size (``hyperprior="per_cell"``) or by
        the batch's share of the training set (``"dataset"``); with ``rep_step="batch"`` also the L2
        shrinkage of the batch's latents.

        Parameters
        ----------
        batch
            A :class:`~dgdlens.data.Batch` of the training loader.

        Returns
        -------
        loss : torch.Tensor
            Scalar loss to backpropagate.
        sums : dict of str to torch.Tensor
            ``recon`` and ``prior``: the batch's summed reconstruction and latent-prior NLLs (scalars).
        """
        loss, recon, prior = self._batch_loss(batch, self.train_tables, self._cov_train)
        hyper = self.module.hyperprior_nll()
        n = len(batch.index)
        weight = n / self.n_fit if self.cfg.hyperprior == "dataset" else float(n)
        self._last_hyper = hyper.detach()
        return loss + weight * hyper, {"recon": recon, "prior": prior}

    def optimizer_step(self) -> None:
        """Step the decoder and prior optimisers, and the latents' with ``rep_step="batch"``."""
        self.opt_decoder.step()
        if self.opt_prior is not None:
            self.opt_prior.step()
        if self.cfg.rep_step == "batch":
            self.opt_rep.step()

    def on_epoch_end(self) -> None:
        """With ``rep_step="epoch"``: one step of the training latents from the gradients accumulated over
        the epoch."""
        if self.cfg.rep_step == "epoch":
            self.opt_rep.step()

    def validation_epoch(self) -> dict[str, torch.Tensor]:
        """One optimisation pass of the validation latents with the module frozen (eval mode), as held-out
        inference embeds new samples; the losses are those before the pass's update(s).

        Returns
        -------
        dict of str to torch.Tensor
            ``recon`` and ``prior``: summed NLLs over this process's validation samples (scalars), or ``{}``
            without validation latents (no validation split, or fewer validation samples than processes).
        """
        if self.val_loader is None:
            return {}
        per_epoch = self.cfg.rep_step == "epoch"
        self.module.eval()
        recon_sum = prior_sum = torch.zeros((), device=self.device)
        with frozen(self.module):
            if per_epoch:
                self.opt_val_rep.zero_grad(set_to_none=True)
            for batch in self.val_loader:
                if not per_epoch:
                    self.opt_val_rep.zero_grad(set_to_none=True)
                loss, recon, prior = self._batch_loss(batch, self.val_tables, self._cov_val)
                loss.backward()
                if not per_epoch:
                    self.opt_val_rep.step()
                recon_sum, prior_sum = recon_sum + recon, prior_sum + prior
            if per_epoch:
                self.opt_val_rep.step()
        return {"recon": recon_sum, "prior": prior_sum}

    def summarise(self, sums):
        """The epoch's history row.

        Parameters
        ----------
        sums
            Process-summed statistics: ``recon``, ``prior`` and, with validation, ``val::recon`` and
            ``val::prior``.

        Returns
        -------
        dict of str to float
            ``train_recon`` and ``train_prior`` (NLLs per training sample), ``train_loss`` (their sum),
            ``hyperprior`` (the prior's hyperprior NLL at the last step) and, with validation,
            ``val_recon`` and ``val_loss`` (per validation sample).
        """
        n = self.n_fit
        row = {"train_recon": float(sums["recon"]) / n, "train_prior": float(sums["prior"]) / n,
               "hyperprior": float(self._last_hyper)}
        row["train_loss"] = row["train_recon"] + row["train_prior"]
        if "val::recon" in sums:
            row["val_recon"] = float(sums["val::recon"]) / self.n_fit_val
            row["val_loss"] = (float(sums["val::recon"]) + float(sums["val::prior"])) / self.n_fit_val
        return row

    # ------------------------------------------------------------------ end of training
    def on_train_end(self) -> None:
        """With ``refit_prior_at_end``: refit the mixture by EM on (a sample of) the training latents and
        polish every latent under it; then gather the full latent tables into ``full_train_tables`` and
        ``full_val_tables`` on every process. With ``decoder_subsample`` the mixture is refitted to the
        subsample's trained latents, and every latent is polished (the others start on the line fitted from
        the subsample, see :meth:`_rejoin_subsample`)."""
        if self.cfg.refit_prior_at_end:
            self._refit_prior()
        if self._rejoin_subsample() or self.cfg.refit_prior_at_end:
            self._polish()
        self._gather_tables()

    def _polish(self) -> None:
        """Re-fit every latent under the final model with the decoder frozen (as held-out inference does)."""
        cfg = self.cfg
        if cfg.polish_steps <= 0:
            return

        self.module.eval()
        with frozen(self.module):
            for rows, tables, cov in zip(self._shard_rows(), (self.train_tables, self.val_tables),
                                         (self._cov_train, self._cov_val)):
                if tables is None:
                    continue
                loader = BatchLoader(self.matrix, rows, self._scale_of(rows), batch_size=POLISH_BATCH, shuffle=False,
                                     device=self.device)
                dims = [t.dim for t in tables]

                def objective(data, z, scale, dims=dims):  # covariates travel with the counts (see compact)
                    x, codes, cont, constant = data
                    recon, prior = self.module.batch_nll(x, list(torch.split(z, dims, dim=1)), scale, codes, cont,
                                                         constant=constant)
                    return recon + prior

                for batch in loader:
                    codes, cont = self._batch_covariates(batch.index, cov)
                    z0 = torch.cat([t.z.detach()[batch.index] for t in tables], dim=1)
                    # the likelihood's terms that the latents cannot change: once per batch, not per step
                    data = (batch.x, codes, cont, self.module.recon_constant(batch.x, batch.scale))
                    z = optimise_latents(objective, data, batch.scale, z0, cfg.polish_steps,
                                         cfg.polish_lr, cfg.betas, cfg.polish_tol, compact=True)
                    with torch.no_grad():
                        for t, part in zip(tables, torch.split(z, dims, dim=1)):
                            t.z[batch.index] = part

    def _gather_tables(self) -> None:
        """Every process ends with the complete tables (rebuilt from the shards under torchrun)."""
        st = self.strategy
        if st.world_size == 1:
            self.full_train_tables, self.full_val_tables = self.train_tables, self.val_tables
            return
        self.full_train_tables = []
        for table in self.train_tables:
            full = st.gather_rows(table.z.detach(), self.n_train).cpu()
            self.full_train_tables.append(RepresentationTable(self.n_train, table.dim, init=full).to(self.device))
        if self.n_val:
            self.full_val_tables = []
            for b, table in enumerate(self.train_tables):
                full_val = (st.gather_rows(self.val_tables[b].z.detach(), self.n_val).cpu()
                            if self.val_tables is not None else torch.zeros(self.n_val, table.dim))
                self.full_val_tables.append(RepresentationTable(self.n_val, table.dim, init=full_val).to(self.device))

    # ------------------------------------------------------------------ state
    def _tables_state(self, clone: bool) -> dict:
        """Block 0 as ``train_z``/``val_z`` (the format without covariates); further blocks as lists."""
        def get(t):
            return t.z.detach().clone() if clone else t.z.detach()

        out = {"train_z": get(self.train_tables[0]),
               "val_z": None if self.val_tables is None else get(self.val_tables[0])}
        if len(self.train_tables) > 1:
            out["train_cov_z"] = [get(t) for t in self.train_tables[1:]]
            out["val_cov_z"] = None if self.val_tables is None else [get(t) for t in self.val_tables[1:]]
        return out

    def _load_tables(self, state: dict) -> None:
        with torch.no_grad():
            self.train_tables[0].z.copy_(state["train_z"])
            if self.val_tables is not None and state["val_z"] is not None:
                self.val_tables[0].z.copy_(state["val_z"])
            if len(self.train_tables) > 1:
                for t, z in zip(self.train_tables[1:], state["train_cov_z"], strict=True):
                    t.z.copy_(z)
                if self.val_tables is not None and state.get("val_cov_z") is not None:
                    for t, z in zip(self.val_tables[1:], state["val_cov_z"], strict=True):
                        t.z.copy_(z)

    def snapshot(self) -> dict:
        """Copies of the module's weights and of this process's latent tables.

        Returns
        -------
        dict
            ``module`` (state dict), ``train_z``/``val_z`` (biological latents, ``val_z`` ``None`` without
            validation) and, with covariates, ``train_cov_z``/``val_cov_z`` (lists, one per covariate).
        """
        return {"module": copy.deepcopy(self.module.state_dict()), **self._tables_state(clone=True)}

    def restore(self, snapshot: dict) -> None:
        """Load the weights and latents of a :meth:`snapshot`.

        Parameters
        ----------
        snapshot
            A dict returned by :meth:`snapshot`.
        """
        self.module.load_state_dict(snapshot["module"])
        self._load_tables(snapshot)

    def state_dict(self) -> dict:
        """The resumable state (this process's shard of the latents under several processes).

        Returns
        -------
        dict
            The :meth:`snapshot` entries (not copied), the optimiser states ``opt_decoder``, ``opt_prior``,
            ``opt_rep``, ``opt_val_rep``, ``decayed`` (whether the learning-rate drop has happened) and the
            batch-order generator states ``train_rng``/``val_rng``.
        """
        return {
            "module": self.module.state_dict(),
            **self._tables_state(clone=False),
            "opt_decoder": self.opt_decoder.state_dict(),
            "opt_prior": None if self.opt_prior is None else self.opt_prior.state_dict(),
            "opt_rep": self.opt_rep.state_dict(),
            "opt_val_rep": None if self.opt_val_rep is None else self.opt_val_rep.state_dict(),
            "decayed": self._decayed,
            "train_rng": self.train_loader.rng.bit_generator.state,
            "val_rng": None if self.val_loader is None else self.val_loader.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (after :meth:`setup`; rebuilds the optimisers first if the
        learning-rate drop had happened).

        Parameters
        ----------
        state
            A dict as returned by :meth:`state_dict`.
        """
        self.module.load_state_dict(state["module"])
        self._load_tables(state)
        self._decayed = bool(state["decayed"])
        if self._decayed and self.cfg.reset_optimizers_on_decay:
            self._build_optimizers(decayed=True)
        self.opt_decoder.load_state_dict(state["opt_decoder"])
        if self.opt_prior is not None and state["opt_prior"] is not None:
            self.opt_prior.load_state_dict(state["opt_prior"])
        self.opt_rep.load_state_dict(state["opt_rep"])
        if self.opt_val_rep is not None and state["opt_val_rep"] is not None:
            self.opt_val_rep.load_state_dict(state["opt_val_rep"])
        self.train_loader.rng.bit_generator.state = state["train_rng"]
        if self.val_loader is not None and state["val_rng"] is not None:
            self.val_loader.rng.bit_generator.state = state["val_rng"]

    def describe(self) -> dict:
        """The training options.

        Returns
        -------
        dict
            The :class:`DecoderOnlyPlanConfig` as a dict.
        """
        return self.cfg.to_dict()
