"""How training is spread over processes: one strategy object the runner and plans talk to.

:class:`SingleProcess` does nothing special. :class:`DataParallel` (chosen automatically under
``torchrun``) replicates the shared parameters (broadcast from rank 0), sums their gradients after every
step with one flat all-reduce, sums the per-epoch statistics, and gives every rank a contiguous shard of
the samples (and of per-sample tables such as the DGD's latents). Models never branch on it: plans ask
the strategy for their shard and hand it their shared parameters.
"""

from __future__ import annotations

import time

import torch

from .. import _dist

__all__ = ["Strategy", "SingleProcess", "DataParallel", "make_strategy"]


class Strategy:
    """Interface; see :class:`SingleProcess` for the one-process meaning of every method."""

    name = "base"
    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """``[lo, hi)`` of this process's contiguous share of ``n`` samples."""
        return 0, n

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def sync_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Make the gradients of replicated parameters the sum over all processes."""

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Make every process's copy of ``module`` equal to rank 0's."""

    def gather_rows(self, local: torch.Tensor, n_total: int, sizes: list[int] | None = None) -> torch.Tensor:
        return local

    def agree(self, values: list[int], what: str) -> None:
        """Raise if the processes disagree on these integers (data, settings)."""

    def checkpoint_path(self, path: str) -> str:
        return str(path)


class SingleProcess(Strategy):
    name = "single"


class DataParallel(Strategy):
    """Data-parallel training over a ``torch.distributed`` process group (gloo or nccl)."""

    name = "data_parallel"

    def __init__(self, device) -> None:
        _dist.init(device=device)
        self.rank = _dist.rank()
        self.world_size = _dist.world_size()
        self.comm_s = 0.0

    def shard(self, n: int) -> tuple[int, int]:
        return _dist.shard_bounds(n, self.world_size, self.rank)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return _dist.all_reduce_sum(tensor)

    def sync_gradients(self, params) -> None:
        tic = time.perf_counter()
        _dist.all_reduce_gradients(params)
        self.comm_s += time.perf_counter() - tic  # benchmarks report the share of time spent communicating

    def broadcast_module(self, module) -> None:
        _dist.broadcast_module(module)

    def gather_rows(self, local, n_total, sizes=None):
        return _dist.gather_rows(local, n_total, sizes)

    def agree(self, values, what) -> None:
        _dist.all_agree(values, what)

    def checkpoint_path(self, path: str) -> str:
        # each process writes its own shard of the per-sample state
        return _dist.shard_file(path)


def make_strategy(device=None) -> Strategy:
    """:class:`DataParallel` inside a multi-process launch (``torchrun``), else :class:`SingleProcess`."""
    return DataParallel(device) if _dist.is_distributed() else SingleProcess()
