"""Mini-batches of rows from a :class:`RowMatrix`, densified one batch at a time.

Every batch carries the sample indices it holds, because decoder-only models look up (and update)
the per-sample representation rows by index.

Data on disk (a backed AnnData) are read the way disks like: in contiguous blocks of rows. The epoch
order is *block shuffled*: blocks are visited in random order, ``buffer_blocks`` blocks at a time are
mixed and shuffled together, so every mini-batch draws cells from several random places of the file
while each block is read once per epoch as one contiguous CSR slice. A background thread reads and
densifies the next batches while the model computes on the current one (``prefetch``).

The batch order depends only on ``(n, batch_size, seed, block_size, buffer_blocks)``, never on where
the data live, so in-memory and backed data with the same settings give identical batches.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from .matrix import RowMatrix

__all__ = ["Batch", "BatchLoader", "batch_indices", "DEFAULT_BLOCK_SIZE", "DEFAULT_BUFFER_BLOCKS"]

#: rows per contiguous read for backed data (about 1-10 MB of CSR for typical single-cell data)
DEFAULT_BLOCK_SIZE = 1024
#: blocks mixed together into one shuffle buffer (a batch draws from up to this many file regions)
DEFAULT_BUFFER_BLOCKS = 16


@dataclass
class Batch:
    """One mini-batch of a :class:`BatchLoader`, on the loader's device.

    Attributes
    ----------
    index
        ``(batch,)`` int64 positions of the samples within the loader's split (``0 .. n - 1``, not rows of
        the matrix), e.g. to look up per-sample latents.
    x
        ``batch x features`` dense float32 data (e.g. counts).
    scale
        ``(batch,)`` float32 per-sample scale factors (e.g. library sizes), or ``None`` when the loader has
        none.
    """

    index: torch.Tensor  # positions into the table of this split (0..n-1), int64
    x: torch.Tensor  # dense float32 (batch, features)
    scale: torch.Tensor | None  # per-sample scale, e.g. library size, (batch,)


@dataclass
class LoaderStats:
    """Where a loader's time went (seconds, cumulative; :meth:`BatchLoader.reset_stats` zeroes them)."""

    read_s: float = 0.0  # reading blocks from the matrix (disk, decompression, CSR assembly)
    densify_s: float = 0.0  # building the dense float32 batches from the cached blocks
    wait_s: float = 0.0  # time the consumer (the training loop) waited for a batch
    n_batches: int = 0
    n_rows: int = 0
    n_blocks_read: int = 0
    extra: dict = field(default_factory=dict)


def batch_indices(n: int, batch_size: int, *, shuffle: bool, rng: np.random.Generator | None = None,
                  block_size: int | None = None, buffer_blocks: int = 1,
                  n_batches: int | None = None) -> list[np.ndarray]:
    """Split ``range(n)`` into mini-batches.

    With ``block_size`` (for data on disk) the order is shuffled by contiguous blocks: blocks are
    visited in random order, and each group of ``buffer_blocks`` consecutive blocks (in that random
    order) is shuffled jointly, so every batch reads from few contiguous regions while the epoch is
    still shuffled. ``n_batches`` splits the order into exactly that many batches of near-equal size
    (distributed training needs every process to take the same number of steps).

    Parameters
    ----------
    n
        Number of positions (samples in the split).
    batch_size
        Positions per batch (the last may be shorter); ignored with ``n_batches``.
    shuffle
        Shuffle the order; ``False`` gives ``0 .. n - 1`` in order.
    rng
        NumPy generator for the shuffle (required when ``shuffle`` is true); it is advanced.
    block_size
        Contiguous block length for block shuffling (``None``, or ``>= n``: a full permutation).
    buffer_blocks
        Consecutive (shuffled) blocks mixed together.
    n_batches
        Exact number of batches (``numpy.array_split`` of the order; batches may be empty when
        ``n_batches > n``).

    Returns
    -------
    list of numpy.ndarray
        Integer position arrays, one per batch, that together cover ``range(n)`` once.

    Raises
    ------
    ValueError
        If ``n_batches < 1``.
    """
    if not shuffle:
        order = np.arange(n)
    elif block_size is None or block_size >= n:
        order = rng.permutation(n)
    else:
        starts = np.arange(0, n, block_size)
        rng.shuffle(starts)
        pieces = []
        for g in range(0, len(starts), max(1, buffer_blocks)):
            group = np.concatenate([np.arange(s, min(s + block_size, n)) for s in starts[g:g + buffer_blocks]])
            pieces.append(group[rng.permutation(len(group))])
        order = np.concatenate(pieces) if pieces else np.arange(0)
    if n_batches is not None:
        if n_batches < 1:
            raise ValueError(f"n_batches must be positive, got {n_batches}")
        return list(np.array_split(order, n_batches))
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


class BatchLoader:
    """Iterate over a split of a data matrix in dense mini-batches.

    Parameters
    ----------
    matrix
        The rows to serve.
    rows
        Which rows of ``matrix`` make up this split (``None``: all). Batch ``index`` values are
        positions within this split. For backed data keep them sorted, so that a block of
        consecutive positions is a contiguous region of the file.
    scale
        Optional per-row scale factors for the split (e.g. library sizes), aligned with ``rows``.
    block_size
        Rows per block for block shuffling. ``None``: :data:`DEFAULT_BLOCK_SIZE` for backed data,
        a full shuffle for data in memory. ``0``: always a full shuffle.
    buffer_blocks
        Blocks shuffled together (see the module docstring).
    n_batches
        Exact number of batches per epoch (default: ``ceil(n / batch_size)``).
    prefetch
        Batches prepared ahead by a background thread. ``None``: 4 for backed data, 0 (no thread)
        in memory, where reading a batch costs almost nothing.
    max_batches
        Stop every epoch after this many batches (smoke runs and benchmarks; ``None``: all).
    """

    def __init__(self, matrix: RowMatrix, rows: np.ndarray | None = None, scale: np.ndarray | None = None,
                 *, batch_size: int = 256, shuffle: bool = True, seed=0, device: str | torch.device = "cpu",
                 block_size: int | None = None, buffer_blocks: int = DEFAULT_BUFFER_BLOCKS,
                 drop_last: bool = False, n_batches: int | None = None, prefetch: int | None = None,
                 max_batches: int | None = None):
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
        if block_size is None:
            block_size = DEFAULT_BLOCK_SIZE if matrix.backed else 0
        if block_size < 0:
            raise ValueError(f"block_size must be >= 0 (0: full shuffle), got {block_size}")
        self.block_size = int(block_size) or None
        self.buffer_blocks = max(1, int(buffer_blocks))
        self.drop_last = drop_last
        self.n_batches = n_batches
        self.prefetch = (4 if matrix.backed else 0) if prefetch is None else int(prefetch)
        self.max_batches = max_batches
        self.stats = LoaderStats()

    def __len__(self) -> int:
        n = self.n_batches if self.n_batches is not None else -(-len(self.rows) // self.batch_size)
        return n if self.max_batches is None else min(n, self.max_batches)

    @property
    def n(self) -> int:
        """Number of samples in the split (the rows this loader serves)."""
        return len(self.rows)

    def reset_stats(self) -> None:
        """Zero the timing and counting statistics in ``stats`` (a fresh ``LoaderStats``)."""
        self.stats = LoaderStats()

    # ------------------------------------------------------------------ batches
    def _to_batch(self, positions: np.ndarray, x: np.ndarray) -> Batch:
        scale = None if self.scale is None else torch.from_numpy(self.scale[positions])
        index = torch.from_numpy(np.asarray(positions, dtype=np.int64))
        x = torch.from_numpy(x)
        nb = self.device.type == "cuda"
        if nb and self.prefetch:
            x = x.pin_memory()
        return Batch(index.to(self.device, non_blocking=nb), x.to(self.device, non_blocking=nb),
                     None if scale is None else scale.to(self.device, non_blocking=nb))

    def get(self, positions: np.ndarray) -> Batch:
        """The batch of the given split positions, read directly (no block cache).

        Parameters
        ----------
        positions
            Integer positions within the split (``0 .. n - 1``), any order.

        Returns
        -------
        Batch
            ``index`` = ``positions``, ``x`` the dense rows (``len(positions) x features``) and ``scale``,
            on the loader's device.
        """
        return self._to_batch(positions, self.matrix.rows(self.rows[positions]))

    def _epoch_batches(self) -> list[np.ndarray]:
        batches = batch_indices(self.n, self.batch_size, shuffle=self.shuffle, rng=self.rng,
                                block_size=self.block_size, buffer_blocks=self.buffer_blocks,
                                n_batches=self.n_batches)
        if self.drop_last and self.n > self.batch_size and self.n_batches is None:
            batches = [b for b in batches if len(b) == self.batch_size]
        return batches if self.max_batches is None else batches[:self.max_batches]

    def _produce(self, batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions, dense rows) for each batch; backed data go through a cache of whole blocks."""
        if not (self.matrix.backed and self.block_size):
            for positions in batches:
                t0 = time.perf_counter()
                x = self.matrix.rows(self.rows[positions])
                self.stats.read_s += time.perf_counter() - t0
                yield positions, x
            return
        bs = self.block_size
        block_of = [positions // bs for positions in batches]
        last_use = {}
        for i, blocks in enumerate(block_of):
            for b in np.unique(blocks):
                last_use[int(b)] = i
        cache: dict[int, object] = {}
        for i, positions in enumerate(batches):
            blocks = block_of[i]
            needed = np.unique(blocks)
            for b in needed:
                b = int(b)
                if b not in cache:
                    t0 = time.perf_counter()
                    cache[b] = self.matrix.read_rows(self.rows[b * bs:min((b + 1) * bs, self.n)])
                    self.stats.read_s += time.perf_counter() - t0
                    self.stats.n_blocks_read += 1
            t0 = time.perf_counter()
            x = np.empty((len(positions), self.matrix.n_vars), dtype=np.float32)
            for b in needed:
                mask = blocks == b
                part = cache[int(b)][positions[mask] - int(b) * bs]
                x[mask] = part.toarray() if sp.issparse(part) else part
                if last_use[int(b)] == i:
                    del cache[int(b)]
            self.stats.densify_s += time.perf_counter() - t0
            yield positions, x

    def __iter__(self) -> Iterator[Batch]:
        batches = self._epoch_batches()  # drawn now, so the RNG advances exactly as without prefetching
        if self.prefetch <= 0:
            for positions, x in self._produce(batches):
                self.stats.n_batches += 1
                self.stats.n_rows += len(positions)
                yield self._to_batch(positions, x)
            return
        yield from self._iter_prefetched(batches)

    def _iter_prefetched(self, batches: list[np.ndarray]) -> Iterator[Batch]:
        """Read ahead in one background thread; the queue bounds how much is held in memory."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def worker() -> None:
            try:
                for item in self._produce(batches):
                    if not put(item):
                        return
                put(done)
            except BaseException as err:  # handed to the consumer, which re-raises it
                put(err)

        thread = threading.Thread(target=worker, name="dgdlens-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                self.stats.wait_s += time.perf_counter() - t0
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                self.stats.n_batches += 1
                self.stats.n_rows += len(item[0])
                yield self._to_batch(*item)
        finally:
            stop.set()
            thread.join()
