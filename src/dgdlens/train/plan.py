"""The per-model half of training: what one step does. The runner (:mod:`dgdlens.train.runner`) does the rest.

A plan owns the model's maths-level training choices (optimisers, schedules, losses, what a validation
pass means) and nothing about epochs, early stopping, checkpoints or processes. The runner calls, per
epoch::

    plan.on_epoch_start(epoch)
    for batch in plan.train_batches():
        plan.zero_grad()
        loss, sums = plan.training_step(batch)      # sums: {name: tensor}, accumulated on the device
        loss.backward()
        strategy.sync_gradients(plan.shared_parameters())
        plan.optimizer_step()
    plan.on_epoch_end()
    val_sums = plan.validation_epoch()              # {} when there is no validation split
    row = plan.summarise(reduced sums)              # floats for the history, read once per epoch

and ``plan.on_train_end()`` once after the best epoch is restored. ``state_dict``/``load_state_dict``
hold everything a bit-exact resume needs; ``snapshot``/``restore`` what restore-best needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from ..data.loader import BatchLoader
from .strategy import SingleProcess, Strategy

__all__ = ["TrainingPlan"]


class TrainingPlan:
    """Base class of the training plans (decoder-only/DGD, autoencoder, SAE)."""

    #: the history column early stopping watches when there is a validation split, and without one
    monitor: str = "val_loss"
    monitor_without_validation: str = "train_loss"

    def __init__(self) -> None:
        self.strategy: Strategy = SingleProcess()
        self.device = torch.device("cpu")

    # ------------------------------------------------------------------ set-up
    def setup(self, strategy: Strategy, device: torch.device) -> None:
        """Move to ``device``, take this process's shard of the data and build the optimisers.

        Called once by the runner before the first epoch (and before a checkpoint is loaded). The base
        class only records ``strategy`` and ``device``; subclasses call it first.

        Parameters
        ----------
        strategy
            How training is spread over processes (:class:`~dgdlens.train.SingleProcess` or
            :class:`~dgdlens.train.DataParallel`); plans ask it for their shard and hand it their shared
            parameters.
        device
            The resolved device this process trains on.
        """
        self.strategy, self.device = strategy, device

    @property
    def has_validation(self) -> bool:
        """Whether the plan has a validation split (then the runner monitors :attr:`monitor`, else
        :attr:`monitor_without_validation`). ``False`` in the base class."""
        return False

    def check_same_everywhere(self, n_obs: int, n_vars: int, train_idx: np.ndarray, n_val: int, batch_size: int,
                              seed: int, *extra: int, what: str = "the data, split or training settings") -> None:
        """Under several processes: every process must hold the same data, split and settings (checked), and
        the global batch must give every process at least one sample.

        In one process the agreement check is a no-op and nothing can fail.

        Parameters
        ----------
        n_obs, n_vars
            Shape of the whole data matrix (samples x features).
        train_idx
            Rows of the training split (a checksum of the first 2**20 is compared).
        n_val
            Number of validation samples.
        batch_size
            The global mini-batch size.
        seed
            The plan's seed.
        *extra
            Further integers that must agree (plan-specific settings).
        what
            What the values are, for the error message.

        Raises
        ------
        RuntimeError
            If the processes disagree on any of the values.
        ValueError
            If ``batch_size`` or the number of training samples is smaller than the number of processes.
        """
        size = self.strategy.world_size
        checksum = int(np.sum(np.asarray(train_idx)[: 1 << 20] % 1_000_003))
        self.strategy.agree([int(n_obs), int(n_vars), len(train_idx), int(n_val), int(seed), checksum,
                             int(batch_size), *map(int, extra)], what)
        if size > 1 and (batch_size < size or len(train_idx) < size):
            raise ValueError(f"batch_size ({batch_size}) and the number of training samples ({len(train_idx)}) must "
                             f"be at least the number of processes ({size}); batch_size is the global batch.")

    def shuffled_loader(self, matrix, rows: np.ndarray, scale: np.ndarray | None, *, batch_size: int, seed: int,
                        block_size: int | None, n_total: int | None = None) -> BatchLoader:
        """A shuffling loader over this process's ``rows``. Under several processes each takes its share of
        the global ``batch_size``, seeded per rank; with ``n_total`` (the split's size over all processes)
        every process takes the same number of steps per epoch.

        Parameters
        ----------
        matrix
            The whole data matrix (a :class:`~dgdlens.data.RowMatrix`, samples x features).
        rows
            The rows of ``matrix`` this process serves (its shard of the split), sorted for backed data.
        scale
            Per-row scale factors (e.g. library sizes) aligned with ``rows``, or ``None``.
        batch_size
            The global mini-batch size; under ``P`` processes each loader serves ``ceil(batch_size / P)``.
        seed
            Seed of the batch order (combined with the rank under several processes).
        block_size
            Rows per contiguous block for block shuffling (see :class:`~dgdlens.data.BatchLoader`; ``None``:
            1024 for backed data, a full shuffle in memory; ``0``: always a full shuffle).
        n_total
            Size of the whole split over all processes. Under several processes it fixes the number of
            batches per epoch to ``min(max(1, ceil(n_total / batch_size)), n_total // P)`` on every
            process. Ignored in one process.

        Returns
        -------
        BatchLoader
            A shuffling loader on the plan's device whose batch ``index`` values are positions within
            ``rows``.
        """
        size = self.strategy.world_size
        if size == 1:
            return BatchLoader(matrix, rows, scale, batch_size=batch_size, shuffle=True, seed=seed,
                               device=self.device, block_size=block_size)
        n_batches = None if n_total is None else min(max(1, math.ceil(n_total / batch_size)), n_total // size)
        return BatchLoader(matrix, rows, scale, batch_size=max(1, math.ceil(batch_size / size)), shuffle=True,
                           seed=[seed, self.strategy.rank], device=self.device, block_size=block_size,
                           n_batches=n_batches)

    def monitored(self) -> str:
        """The history column early stopping and restore-best watch.

        Returns
        -------
        str
            :attr:`monitor` when the plan has a validation split, else :attr:`monitor_without_validation`.
        """
        return self.monitor if self.has_validation else self.monitor_without_validation

    # ------------------------------------------------------------------ the epoch
    def on_epoch_start(self, epoch: int) -> None:
        """Schedules that change at epoch boundaries (learning-rate drops, prior refits).

        Parameters
        ----------
        epoch
            The 0-based index of the epoch about to start (continues from the checkpoint after a resume).
        """

    def train_batches(self) -> Iterable:
        """This process's mini-batches of one training epoch, in order.

        Returns
        -------
        Iterable
            One item per optimiser step; each is passed as-is to :meth:`training_step`.
        """
        raise NotImplementedError

    def zero_grad(self) -> None:
        """Clear the gradients of everything the next step optimises (called before every step)."""
        raise NotImplementedError

    def training_step(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss to backpropagate, {statistic: batch sum})``; statistics stay on the device.

        Parameters
        ----------
        batch
            One item of :meth:`train_batches`.

        Returns
        -------
        loss : torch.Tensor
            Scalar loss of the batch; the runner calls ``loss.backward()``.
        sums : dict of str to torch.Tensor
            Statistics summed over the batch's samples (any shape, constant per name); the runner adds them
            up over the epoch and passes the totals to :meth:`summarise`.
        """
        raise NotImplementedError

    def shared_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters replicated on every process (their gradients are summed across processes).

        Returns
        -------
        list of torch.nn.Parameter
            The same parameters in the same order on every process (empty in the base class).
        """
        return []

    def optimizer_step(self) -> None:
        """Apply the optimisers after ``loss.backward()`` and the gradient synchronisation."""
        raise NotImplementedError

    def on_epoch_end(self) -> None:
        """Work after the last batch (the DGD's once-per-epoch latent step)."""

    def validation_epoch(self) -> dict[str, torch.Tensor]:
        """One pass over this process's validation samples.

        Returns
        -------
        dict of str to torch.Tensor
            Validation statistics summed over the samples; the runner prefixes their names with ``val::``
            before :meth:`summarise`. Empty without a validation split (and in the base class).
        """
        return {}

    def summarise(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """Per-epoch history values from the (process-summed, CPU) statistics.

        Parameters
        ----------
        sums
            The epoch's totals of :meth:`training_step`'s statistics and, with a ``val::`` prefix, of
            :meth:`validation_epoch`'s, summed over processes, as float64 CPU tensors.

        Returns
        -------
        dict of str to float
            The epoch's history row (e.g. ``train_loss``, ``val_loss``); must contain the monitored column.
        """
        raise NotImplementedError

    def on_train_end(self) -> None:
        """Work after training and restore-best (mixture refit, threshold calibration, gathering shards)."""

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything a bit-exact resume needs (weights, optimiser states, random-generator states).

        Returns
        -------
        dict
            Nested dicts/lists of tensors and plain values, written by the runner's checkpoint
            (this process's shard under several processes). Tensors are not copied.
        """
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        """Restore the state of :meth:`state_dict` (called after :meth:`setup`, when resuming).

        Parameters
        ----------
        state
            A dict as returned by :meth:`state_dict`, read back from a checkpoint.
        """
        raise NotImplementedError

    def snapshot(self) -> dict:
        """A copy of the weights (and per-sample tables) of the best epoch.

        Returns
        -------
        dict
            Copied tensors that later training does not change; :meth:`restore` takes it back.
        """
        raise NotImplementedError

    def restore(self, snapshot: dict) -> None:
        """Load the weights (and per-sample tables) of a :meth:`snapshot` (restore-best).

        Parameters
        ----------
        snapshot
            A dict returned by :meth:`snapshot`.
        """
        raise NotImplementedError

    def describe(self) -> dict:
        """The plan's settings, for the saved model's ``train_config``.

        Returns
        -------
        dict
            JSON-serialisable settings (empty in the base class).
        """
        return {}
