"""Training plan of the :class:`~dgdlens.models.Autoencoder`: encoder + decoder (+ likelihood) by Adam.

The objective is the reconstruction NLL summed over features and samples (the same scale as the
decoder-only models' loss), the validation statistic the reconstruction NLL of the validation split
with the model in eval mode. Batch sums stay on the device; the runner reads them once per epoch.

Under ``torchrun`` every process holds a replica of the module (broadcast from rank 0 at set-up,
gradients summed after every step) and reads a contiguous shard of the training and validation rows;
``batch_size`` is the global batch, split evenly over the processes.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..data.loader import BatchLoader
from ..data.matrix import RowMatrix
from .plan import TrainingPlan

__all__ = ["AutoencoderPlanConfig", "AutoencoderPlan"]


@dataclass
class AutoencoderPlanConfig:
    """The autoencoder's training options.

    Attributes
    ----------
    batch_size
        Mini-batch size (global across processes).
    lr, betas, weight_decay
        Adam over the encoder, decoder and likelihood parameters.
    validation_batch_size
        Rows per batch of the validation pass (no gradients; only memory).
    shuffle_block_size, max_batches, seed
        Block shuffling, a cut of every epoch, and the seed of the batch order, as in
        :class:`~dgdlens.train.decoder_only_plan.DecoderOnlyPlanConfig`.
    """

    batch_size: int = 128
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    validation_batch_size: int = 1024
    shuffle_block_size: int | None = None
    max_batches: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        for name in ("batch_size", "validation_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be non-negative, got {self.weight_decay!r}")


class AutoencoderPlan(TrainingPlan):
    """Encoder + decoder trained end to end on the reconstruction NLL (see :class:`AutoencoderPlanConfig`).

    Parameters
    ----------
    module
        A module with ``recon_nll(x, scale) -> (n,)`` (NLL per sample, summed over features).
    matrix, scale
        All samples' data and per-sample scale factors (library sizes; ``None`` for none).
    train_idx, val_idx
        Rows of ``matrix`` in each split (sorted).
    config
        An :class:`AutoencoderPlanConfig`.

    History columns: ``train_recon``/``val_recon`` (NLL per sample) and ``train_loss``/``val_loss``
    (the same numbers: an autoencoder has no prior term).
    """

    monitor = "val_loss"
    monitor_without_validation = "train_loss"

    def __init__(self, module: nn.Module, matrix: RowMatrix, scale: np.ndarray | None, train_idx: np.ndarray,
                 val_idx: np.ndarray, config: AutoencoderPlanConfig) -> None:
        super().__init__()
        self.module, self.matrix, self.scale = module, matrix, scale
        self.train_idx, self.val_idx = np.asarray(train_idx), np.asarray(val_idx)
        self.cfg = config
        self.n_train, self.n_val = len(self.train_idx), len(self.val_idx)

    @property
    def has_validation(self) -> bool:
        """Whether ``val_idx`` is non-empty (then early stopping watches ``val_loss``)."""
        return self.n_val > 0

    # ------------------------------------------------------------------ set-up
    def setup(self, strategy, device) -> None:
        """Check the processes agree, move the module to ``device`` (rank 0's weights everywhere), build this
        process's shuffling training loader and unshuffled validation loader, and the Adam optimiser.

        Parameters
        ----------
        strategy
            The runner's :class:`~dgdlens.train.Strategy`.
        device
            The resolved training device.
        """
        super().setup(strategy, device)
        cfg = self.cfg
        self.check_same_everywhere(self.matrix.n_obs, self.matrix.n_vars, self.train_idx, self.n_val, cfg.batch_size,
                                   cfg.seed)
        self.module.to(device)
        strategy.broadcast_module(self.module)
        lo, hi = strategy.shard(self.n_train)
        rows = self.train_idx[lo:hi]
        scale = None if self.scale is None else self.scale[rows]
        self.train_loader = self.shuffled_loader(self.matrix, rows, scale, batch_size=cfg.batch_size, seed=cfg.seed,
                                                 block_size=cfg.shuffle_block_size, n_total=self.n_train)
        self.train_loader.max_batches = cfg.max_batches
        strategy.agree([len(self.train_loader)], "the number of mini-batches per epoch")
        self.val_loader = None
        if self.n_val:
            vlo, vhi = strategy.shard(self.n_val)
            vrows = self.val_idx[vlo:vhi]
            self.val_loader = BatchLoader(self.matrix, vrows, None if self.scale is None else self.scale[vrows],
                                          batch_size=cfg.validation_batch_size, shuffle=False, device=device)
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=cfg.lr, betas=cfg.betas,
                                          weight_decay=cfg.weight_decay)

    def shared_parameters(self):
        """The module's trainable parameters (all of them are replicated on every process).

        Returns
        -------
        list of torch.nn.Parameter
            Every parameter of the module with ``requires_grad``.
        """
        return [p for p in self.module.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ steps
    def on_epoch_start(self, epoch: int) -> None:
        """Put the module in training mode (dropout on).

        Parameters
        ----------
        epoch
            The 0-based epoch about to start (unused: no schedules).
        """
        self.module.train()

    def train_batches(self):
        """This process's shuffled training loader.

        Returns
        -------
        BatchLoader
            Yields :class:`~dgdlens.data.Batch` objects (``x``: ``batch x features``, ``scale``: ``(batch,)``).
        """
        return self.train_loader

    def zero_grad(self) -> None:
        """Clear the Adam optimiser's gradients."""
        self.optimizer.zero_grad(set_to_none=True)

    def training_step(self, batch):
        """Reconstruction NLL of one batch.

        Parameters
        ----------
        batch
            A :class:`~dgdlens.data.Batch` of the training loader.

        Returns
        -------
        loss : torch.Tensor
            Scalar: the NLL summed over the batch's samples and features.
        sums : dict of str to torch.Tensor
            ``{"recon": the same sum, detached}``.
        """
        nll = self.module.recon_nll(batch.x, batch.scale)
        # summed over samples and features: the decoder-only models' objective scale
        return nll.sum(), {"recon": nll.detach().sum()}

    def optimizer_step(self) -> None:
        """One Adam step over the encoder, decoder and likelihood parameters."""
        self.optimizer.step()

    def validation_epoch(self) -> dict[str, torch.Tensor]:
        """Reconstruction NLL of this process's validation rows, module in eval mode, no gradients.

        Returns
        -------
        dict of str to torch.Tensor
            ``{"recon": scalar NLL summed over samples and features}``, or ``{}`` without validation rows.
        """
        if self.val_loader is None:
            return {}
        self.module.eval()
        total = torch.zeros((), device=self.device)
        with torch.no_grad():
            for batch in self.val_loader:
                total = total + self.module.recon_nll(batch.x, batch.scale).sum()
        return {"recon": total}

    def summarise(self, sums):
        """The epoch's history row.

        Parameters
        ----------
        sums
            Process-summed statistics: ``recon`` and, with validation, ``val::recon``.

        Returns
        -------
        dict of str to float
            ``train_recon`` and ``train_loss`` (NLL per training sample, equal), plus ``val_recon`` and
            ``val_loss`` (per validation sample) when there is a validation split.
        """
        recon = float(sums["recon"]) / self.n_train
        row = {"train_recon": recon, "train_loss": recon}
        if "val::recon" in sums:
            val = float(sums["val::recon"]) / self.n_val
            row.update(val_recon=val, val_loss=val)
        return row

    def on_train_end(self) -> None:
        """Leave the module in eval mode."""
        self.module.eval()

    # ------------------------------------------------------------------ state
    def snapshot(self) -> dict:
        """A deep copy of the module's weights.

        Returns
        -------
        dict
            ``{"module": copied state dict}``.
        """
        return {"module": copy.deepcopy(self.module.state_dict())}

    def restore(self, snapshot: dict) -> None:
        """Load the module's weights from a :meth:`snapshot`.

        Parameters
        ----------
        snapshot
            A dict returned by :meth:`snapshot`.
        """
        self.module.load_state_dict(snapshot["module"])

    def state_dict(self) -> dict:
        """The resumable state.

        Returns
        -------
        dict
            ``module`` (weights), ``optimizer`` (Adam state) and ``train_rng`` (the batch order's generator
            state); not copies.
        """
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "train_rng": self.train_loader.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (after :meth:`setup`).

        Parameters
        ----------
        state
            A dict as returned by :meth:`state_dict`.
        """
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.train_loader.rng.bit_generator.state = state["train_rng"]

    def describe(self) -> dict:
        """The training options.

        Returns
        -------
        dict
            The :class:`AutoencoderPlanConfig` as a dict.
        """
        return asdict(self.cfg)
