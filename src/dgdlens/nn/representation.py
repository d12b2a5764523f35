"""The per-sample representation table: one free latent vector per sample, learned by gradient descent.

Two ways to step it, both kept because they trade differently:

- ``"epoch"`` (the reference DGD): gradients of every row accumulate over the whole epoch and a dense
  Adam takes one step at the end, i.e. one full-batch step per epoch.
- ``"batch"``: a lazy (sparse) Adam steps only the rows of the current mini-batch, every mini-batch.
  Rows that are not in the batch are not moved by stale momentum, which a dense Adam would do.

The optimisers live in the training plan (:class:`dgdlens.train.DecoderOnlyPlan`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["RepresentationTable"]


class RepresentationTable(nn.Module):
    """An ``(n, dim)`` table of latent vectors, gathered by sample index.

    ``sparse_grad=True`` makes the gradient a sparse tensor touching only the gathered rows (needed
    for the per-batch lazy Adam and cheap for millions of rows).

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
        return F.embedding(index, self.z, sparse=self.sparse_grad)
