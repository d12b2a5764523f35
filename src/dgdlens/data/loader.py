"""Mini-batches of rows from a :class:`RowMatrix`, densified one batch at a time.

Every batch carries the sample indices it holds, because decoder-only models look up (and update)
the per-sample representation rows by index.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .matrix import RowMatrix

__all__ = ["Batch", "BatchLoader", "batch_indices"]


@dataclass
class Batch:
    index: torch.Tensor  # positions into the table of this split (0..n-1), int64
    x: torch.Tensor  # dense float32 (batch, features)
    scale: torch.Tensor | None  # per-sample scale, e.g. library size, (batch,)


def batch_indices(n: int, batch_size: int, *, shuffle: bool, rng: np.random.Generator | None = None,
                  block_size: int | None = None) -> list[np.ndarray]:
    """Split ``range(n)`` into mini-batches.

    With ``block_size`` (for data on disk) the order is shuffled by contiguous blocks and then within
    each block, so every batch reads from few contiguous regions while the epoch is still shuffled.
    """
    if not shuffle:
        order = np.arange(n)
    elif block_size is None or block_size >= n:
        order = rng.permutation(n)
    else:
        starts = np.arange(0, n, block_size)
        rng.shuffle(starts)
        order = np.concatenate([start + rng.permutation(min(block_size, n - start)) for start in starts])
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


class BatchLoader:
    """Iterate over a split of a data matrix in dense mini-batches.

    Parameters
    ----------
    matrix
        The rows to serve.
    rows
        Which rows of ``matrix`` make up this split (``None``: all). Batch ``index`` values are
        positions within this split.
    scale
        Optional per-row scale factors for the split (e.g. library sizes), aligned with ``rows``.
    """

    def __init__(self, matrix: RowMatrix, rows: np.ndarray | None = None, scale: np.ndarray | None = None,
                 *, batch_size: int = 256, shuffle: bool = True, seed: int = 0, device: str | torch.device = "cpu",
                 block_size: int | None = None, drop_last: bool = False):
        self.matrix = matrix
        self.rows = np.arange(matrix.n_obs) if rows is None else np.asarray(rows, dtype=np.int64)
        self.scale = None if scale is None else np.asarray(scale, dtype=np.float32)
        if self.scale is not None and len(self.scale) != len(self.rows):
            raise ValueError("scale must have one value per row of the split")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)
        self.device = torch.device(device)
        if block_size is None and matrix.backed:
            block_size = max(self.batch_size * 16, 4096)
        self.block_size = block_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    @property
    def n(self) -> int:
        return len(self.rows)

    def get(self, positions: np.ndarray) -> Batch:
        x = torch.from_numpy(self.matrix.rows(self.rows[positions]))
        scale = None if self.scale is None else torch.from_numpy(self.scale[positions])
        index = torch.from_numpy(np.asarray(positions, dtype=np.int64))
        nb = self.device.type == "cuda"
        return Batch(index.to(self.device, non_blocking=nb), x.to(self.device, non_blocking=nb),
                     None if scale is None else scale.to(self.device, non_blocking=nb))

    def __iter__(self) -> Iterator[Batch]:
        for positions in batch_indices(self.n, self.batch_size, shuffle=self.shuffle, rng=self.rng,
                                       block_size=self.block_size):
            if self.drop_last and len(positions) < self.batch_size and self.n > self.batch_size:
                continue
            yield self.get(positions)
