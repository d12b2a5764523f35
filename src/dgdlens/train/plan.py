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
        """Move to ``device``, take this process's shard of the data and build the optimisers."""
        self.strategy, self.device = strategy, device

    @property
    def has_validation(self) -> bool:
        return False

    def check_same_everywhere(self, n_obs: int, n_vars: int, train_idx: np.ndarray, n_val: int, batch_size: int,
                              seed: int, *extra: int, what: str = "the data, split or training settings") -> None:
        """Under several processes: every process must hold the same data, split and settings (checked), and
        the global batch must give every process at least one sample."""
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
        every process takes the same number of steps per epoch."""
        size = self.strategy.world_size
        if size == 1:
            return BatchLoader(matrix, rows, scale, batch_size=batch_size, shuffle=True, seed=seed,
                               device=self.device, block_size=block_size)
        n_batches = None if n_total is None else min(max(1, math.ceil(n_total / batch_size)), n_total // size)
        return BatchLoader(matrix, rows, scale, batch_size=max(1, math.ceil(batch_size / size)), shuffle=True,
                           seed=[seed, self.strategy.rank], device=self.device, block_size=block_size,
                           n_batches=n_batches)

    def monitored(self) -> str:
        return self.monitor if self.has_validation else self.monitor_without_validation

    # ------------------------------------------------------------------ the epoch
    def on_epoch_start(self, epoch: int) -> None:
        """Schedules that change at epoch boundaries (learning-rate drops, prior refits)."""

    def train_batches(self) -> Iterable:
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError

    def training_step(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss to backpropagate, {statistic: batch sum})``; statistics stay on the device."""
        raise NotImplementedError

    def shared_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters replicated on every process (their gradients are summed across processes)."""
        return []

    def optimizer_step(self) -> None:
        raise NotImplementedError

    def on_epoch_end(self) -> None:
        """Work after the last batch (the DGD's once-per-epoch latent step)."""

    def validation_epoch(self) -> dict[str, torch.Tensor]:
        return {}

    def summarise(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """Per-epoch history values from the (process-summed, CPU) statistics."""
        raise NotImplementedError

    def on_train_end(self) -> None:
        """Work after training and restore-best (mixture refit, threshold calibration, gathering shards)."""

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def snapshot(self) -> dict:
        """A copy of the weights (and per-sample tables) of the best epoch."""
        raise NotImplementedError

    def restore(self, snapshot: dict) -> None:
        raise NotImplementedError

    def describe(self) -> dict:
        """The plan's settings, for the saved model's ``train_config``."""
        return {}
