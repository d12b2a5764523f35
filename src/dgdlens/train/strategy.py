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
        """Whether this is rank 0 (or the only process): the one that writes files and prints."""
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """``[lo, hi)`` of this process's contiguous share of ``n`` samples.

        Parameters
        ----------
        n
            Number of samples (e.g. training cells) to split over the processes.

        Returns
        -------
        tuple of int
            ``(lo, hi)``: this process owns samples ``lo .. hi - 1``. In one process ``(0, n)``.
        """
        return 0, n

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over all processes (identical result on every process).

        Parameters
        ----------
        tensor
            This process's values (any shape), e.g. per-epoch statistic sums.

        Returns
        -------
        torch.Tensor
            Same shape and device as ``tensor``: the element-wise sum over processes (in one process,
            ``tensor`` itself).
        """
        return tensor

    def sync_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Make the gradients of replicated parameters the sum over all processes.

        Parameters
        ----------
        params
            The shared (replicated) parameters, in the same order on every process; a parameter without
            a gradient counts as zeros. Their ``.grad`` is replaced in place. No-op in one process.
        """

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Make every process's copy of ``module`` equal to rank 0's.

        Parameters
        ----------
        module
            Module whose parameters and buffers are overwritten in place with rank 0's. No-op in one
            process.
        """

    def gather_rows(self, local: torch.Tensor, n_total: int, sizes: list[int] | None = None) -> torch.Tensor:
        """Concatenate every process's contiguous shard of a per-sample table into the full table.

        Parameters
        ----------
        local
            This process's rows, ``rows x ...`` (e.g. its shard of the latent table, ``cells x latent``).
        n_total
            Number of rows of the full table over all processes.
        sizes
            Every process's number of rows, in rank order, when they are not the :meth:`shard` sizes of
            ``n_total``.

        Returns
        -------
        torch.Tensor
            ``n_total x ...`` on every process, on ``local``'s device (in one process, ``local`` itself).
        """
        return local

    def agree(self, values: list[int], what: str) -> None:
        """Raise if the processes disagree on these integers (data, settings).

        Parameters
        ----------
        values
            Integers that must be equal on every process (sizes, seeds, checksums), same length everywhere.
        what
            Description of what they are, used in the error message.

        Raises
        ------
        RuntimeError
            On every process, when some process holds different values. Never raised in one process.
        """

    def checkpoint_path(self, path: str) -> str:
        """This process's own checkpoint file.

        Parameters
        ----------
        path
            The checkpoint path the user asked for.

        Returns
        -------
        str
            ``path`` in one process; under several, a per-process shard file
            (``<path>.rank<r>-of-<P>``) holding that process's share of the per-sample state.
        """
        return str(path)


class SingleProcess(Strategy):
    """Training in one process: no sharding, no communication; every collective is the identity.

    ``shard(n)`` is ``(0, n)``, ``reduce_sum`` and ``gather_rows`` return their input, and
    ``sync_gradients``, ``broadcast_module`` and ``agree`` do nothing.
    """

    name = "single"


class DataParallel(Strategy):
    """Data-parallel training over a ``torch.distributed`` process group (gloo or nccl).

    Joins the process group set up by the launcher (``torchrun``) on construction; ``rank`` and
    ``world_size`` come from it. ``comm_s`` accumulates the seconds spent in gradient all-reduces.

    Parameters
    ----------
    device
        The training device (``"auto"``, ``"cpu"``, ``"cuda"``, a :class:`torch.device` or ``None``); it
        picks the backend: ``nccl`` when it resolves to CUDA, else ``gloo``.
    """

    name = "data_parallel"

    def __init__(self, device) -> None:
        _dist.init(device=device)
        self.rank = _dist.rank()
        self.world_size = _dist.world_size()
        self.comm_s = 0.0

    def shard(self, n: int) -> tuple[int, int]:
        """``[lo, hi)`` of this rank's contiguous share of ``n`` samples (shard sizes differ by at most one).

        Parameters
        ----------
        n
            Number of samples to split over the processes.

        Returns
        -------
        tuple of int
            ``(lo, hi)`` with ``lo = n * rank // world_size`` and ``hi = n * (rank + 1) // world_size``.
        """
        return _dist.shard_bounds(n, self.world_size, self.rank)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce sum over the processes; rank 0's result is broadcast so every rank is bit-identical.

        Parameters
        ----------
        tensor
            This process's values (any shape).

        Returns
        -------
        torch.Tensor
            A new tensor of the same shape on ``tensor``'s device: the sum over processes.
        """
        return _dist.all_reduce_sum(tensor)

    def sync_gradients(self, params) -> None:
        """Sum the gradients of the replicated parameters over the processes with one flat all-reduce.

        Parameters
        ----------
        params
            The shared parameters, same order on every rank; missing gradients count as zeros and every
            ``.grad`` is replaced by the summed one. The time taken is added to ``comm_s``.
        """
        tic = time.perf_counter()
        _dist.all_reduce_gradients(params)
        self.comm_s += time.perf_counter() - tic  # benchmarks report the share of time spent communicating

    def broadcast_module(self, module) -> None:
        """Overwrite every rank's parameters and buffers of ``module`` with rank 0's, in place.

        Parameters
        ----------
        module
            The :class:`torch.nn.Module` to synchronise.
        """
        _dist.broadcast_module(module)

    def gather_rows(self, local, n_total, sizes=None):
        """All-gather every rank's contiguous shard into the full table, on every rank.

        Parameters
        ----------
        local
            This rank's rows, ``rows x ...``.
        n_total
            Number of rows of the full table.
        sizes
            Every rank's number of rows when they are not the :meth:`shard` sizes of ``n_total``.

        Returns
        -------
        torch.Tensor
            ``n_total x ...`` on ``local``'s device, rows in rank order.

        Raises
        ------
        ValueError
            If this rank holds a different number of rows than expected.
        """
        return _dist.gather_rows(local, n_total, sizes)

    def agree(self, values, what) -> None:
        """Raise on every rank if these integers differ between ranks.

        Parameters
        ----------
        values
            Integers that must be equal on every rank (same length everywhere).
        what
            Description used in the error message.

        Raises
        ------
        RuntimeError
            When the ranks disagree (the message shows the element-wise min and max over ranks).
        """
        _dist.all_agree(values, what)

    def checkpoint_path(self, path: str) -> str:
        """This rank's own checkpoint shard file.

        Parameters
        ----------
        path
            The checkpoint path the user asked for.

        Returns
        -------
        str
            ``<path>.rank<r>-of-<P>`` under several processes (``path`` itself if the group has one process).
        """
        # each process writes its own shard of the per-sample state
        return _dist.shard_file(path)


def make_strategy(device=None) -> Strategy:
    """:class:`DataParallel` inside a multi-process launch (``torchrun``), else :class:`SingleProcess`.

    Parameters
    ----------
    device
        The training device; only used under several processes, to pick the backend (``nccl`` for CUDA,
        else ``gloo``). ``None`` means ``"auto"``.

    Returns
    -------
    Strategy
        A :class:`DataParallel` (joined to the process group) when ``WORLD_SIZE > 1`` or a group with
        several processes is already initialised, else a :class:`SingleProcess`.
    """
    return DataParallel(device) if _dist.is_distributed() else SingleProcess()
