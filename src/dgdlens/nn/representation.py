"""The per-sample representation table: one free latent vector per sample, learned by gradient descent.

Two ways to step it, both kept because they trade differently:

- ``"epoch"`` (the reference DGD): gradients of every row accumulate over the whole epoch and a dense
  Adam takes one step at the end, i.e. one full-batch step per epoch.
- ``"batch"``: a lazy (sparse) Adam steps only the rows of the current mini-batch, every mini-batch.
  Rows that are not in the batch are not moved by stale momentum, which a dense Adam would do.

The optimisers live in the training plan (:class:`dgdlens.train.DecoderOnlyPlan`).

Why the dense gradient is not autograd's: ``F.embedding``'s dense backward allocates a zero gradient
the size of the whole table for every mini-batch and autograd then adds it to ``.grad``, so one step
costs O(rows in the table) and an epoch O(rows x batches), quadratic in the cells. At 1,000,000 cells
x 20 dimensions that is 9.8 ms per step against 0.7 ms for the batch's rows alone
(benchmarks/latent_table_step.py), and a DGD epoch took 180 s instead of 42 s.
:class:`_GatherRows` adds the batch's gradient rows into ``.grad`` in place instead, the same sums.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["RepresentationTable"]


class _GatherRows(torch.autograd.Function):
    """``z[index]`` whose backward adds the rows' gradients into ``z.grad`` in place (O(batch), not O(n)).

    The value returned for ``z`` is ``None``: the accumulation already happened, exactly as autograd
    would have made it (``.grad`` created as zeros on first use, then ``grad[index] += g``), so
    optimisers and ``zero_grad`` see an ordinary dense gradient.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.table = z
        ctx.save_for_backward(index)
        return F.embedding(index, z.detach())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        z = ctx.table
        if z.grad is None:
            z.grad = torch.zeros_like(z)
        z.grad.index_add_(0, index.reshape(-1), grad.reshape(-1, z.shape[1]).to(z.grad.dtype))
        return None, None


class RepresentationTable(nn.Module):
    """An ``(n, dim)`` table of latent vectors, gathered by sample index.

    ``sparse_grad=True`` makes the gradient a sparse tensor touching only the gathered rows (needed
    for the per-batch lazy Adam). The dense gradient (the default) is a full ``(n, dim)`` ``.grad``, but
    each backward only adds into the gathered rows, so a step costs the batch, not the table.

    Parameters
    ----------
    n
        Number of rows (samples, e.g. cells).
    dim
        Latent dimension.
    init
        ``"zeros"`` (default: every latent starts at the origin, as the reference DGD), ``"normal"``
        (independent normal entries with standard deviation ``init_std``), or an ``n x dim`` tensor (copied,
        as float32).
    sparse_grad
        Return sparse gradients (see above); can be changed later through the attribute.
    generator
        Torch generator for ``init="normal"`` (``None``: the global one).
    init_std
        Standard deviation of ``init="normal"``.

    Raises
    ------
    ValueError
        For an unknown ``init`` or a tensor of the wrong shape.
    """

    def __init__(self, n: int, dim: int, *, init: str | torch.Tensor = "zeros", sparse_grad: bool = False,
                 generator: torch.Generator | None = None, init_std: float = 1.0):
        super().__init__()
        if isinstance(init, torch.Tensor):
            if tuple(init.shape) != (n, dim):
                raise ValueError(f"initial representation has shape {tuple(init.shape)}, expected {(n, dim)}")
            z = init.detach().clone().float()
        elif init == "zeros":
            z = torch.zeros(n, dim)
        elif init == "normal":
            z = torch.randn(n, dim, generator=generator) * init_std
        else:
            raise ValueError(f"init must be 'zeros', 'normal' or a tensor, got {init!r}")
        self.z = nn.Parameter(z)
        self.sparse_grad = bool(sparse_grad)

    @property
    def n(self) -> int:
        """Number of rows (samples)."""
        return self.z.shape[0]

    @property
    def dim(self) -> int:
        """Latent dimension."""
        return self.z.shape[1]

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """Gather the latents of the given rows (differentiable with respect to the table).

        Parameters
        ----------
        index
            Row indices, int64, any shape (usually ``(batch,)``), on the table's device.

        Returns
        -------
        torch.Tensor
            ``index.shape + (dim,)`` latents.
        """
        if self.sparse_grad or not torch.is_grad_enabled() or not self.z.requires_grad:
            return F.embedding(index, self.z, sparse=self.sparse_grad)
        return _GatherRows.apply(self.z, index)
