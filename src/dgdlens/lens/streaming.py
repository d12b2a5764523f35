"""The lens over expression that stays on disk: row chunks streamed through the group statistics.

Every statistic the t-test lens needs is a sum over cells: per feature and gene, the sum and the sum of
squares of log-normalised expression over the feature's high group and over its low group. They are
accumulated over row chunks of the expression (a backed ``.h5ad`` / zarr AnnData, an h5py dataset, or a
matrix in memory with ``stream=True``), read through the data layer the DGD trains from
(:class:`dgdlens.data.RowMatrix`):

1. **facts**: every chunk is validated (finite, non-negative) and the facts that decide what the
   values are (:func:`~dgdlens.lens.expression.detect_expression_kind`) and whether they are integer
   counts (count splitting) are gathered;
2. **statistics passes**: each chunk is split (:func:`~dgdlens.lens.splitting.split_rows`, the same draws
   as :func:`~dgdlens.lens.splitting.split_counts` on the whole matrix), normalised and ``log1p``-ed
   (:func:`~dgdlens.lens.expression.prepare_block`, the same values as the in-memory path), and scattered
   into the group sums of a block of features, while a background thread reads and prepares the next
   chunk. Blocks are as large as ``max_memory`` allows, so most runs need one pass; the first pass also
   counts the expressed genes and their means.

The facts pass is folded into the first statistics pass: what the values are is decided from the first
chunk and checked on every chunk (a wrong guess costs one more pass).

Memory: ``16 x B x G`` bytes of float64 sums (sum and sum of squares over the high groups) for a block
of ``B`` features and ``G`` genes, ``B`` = ``max_memory / (16 G)`` (32 instead of 16 when the low groups
are streamed too, see below); one chunk in flight and one being prepared (``chunk_cells`` rows, ~40 bytes
per non-zero); the activations' non-zeros and group memberships (~30 bytes per non-zero); the DE of
``chunk_size`` features at a time (as in memory). Nothing grows with the number of cells except the
activations' non-zeros.

Under ``torchrun`` (a process group initialised, e.g. by :func:`dgdlens._dist.init`), the chunks are dealt
to the ranks in turn and the sums are added with one all-reduce per block; every rank then computes the
same table. The low groups (random subsamples of ``max_low_cells`` silent cells) lie among the first few
thousand cells of one random order: those rows are kept as the stream passes them and the low statistics
computed from them as in memory. With ``max_low_cells=None`` (or features active almost everywhere) they
are streamed too (column totals minus the active cells, or explicit groups). P-values equal the
in-memory path's to float rounding.

Only the t-test streams: the Wilcoxon test ranks every group's values, which needs them in memory.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import _dist
from ..data.matrix import open_row_matrix
from ._kernels import group_moments
from .de import DEChunk, PrefixSums, auto_chunk_size, check_de_options, stats_from_moments, t_test_chunk
from .expression import PreparedExpression, ValueFacts, check_gene_names, detect_expression_kind, prepare_block
from .groups import FeatureGroups
from .splitting import SPLIT_BLOCK_ROWS, split_rows

__all__ = ["StreamedExpression", "is_streamable", "use_stream", "iter_streamed_de_chunks"]

_KINDS = ("auto", "counts", "lognorm", "means", "raw")


def use_stream(stream, expression) -> bool:
    """Whether to stream ``expression``: ``stream="auto"`` streams what lives on disk (see
    :func:`is_streamable`), ``True``/``False`` force it; an already prepared matrix keeps its kind."""
    if stream not in ("auto", True, False):
        raise ValueError(f"stream must be 'auto', True or False, got {stream!r}.")
    if hasattr(expression, "kind") and hasattr(expression, "scale"):  # already prepared
        return isinstance(expression, StreamedExpression)
    return is_streamable(expression) if stream == "auto" else bool(stream)


def is_streamable(expression) -> bool:
    """True for expression that lives on disk: a path, a backed AnnData matrix or an h5py dataset."""
    if isinstance(expression, (str, Path)):
        return True
    if sp.issparse(expression) or isinstance(expression, (np.ndarray, pd.DataFrame)):
        return False
    return getattr(expression, "isbacked", False) or hasattr(expression, "to_memory") or (
        type(expression).__module__.startswith("h5py"))


class StreamedExpression:
    """Expression read chunk by chunk and prepared like :func:`~dgdlens.lens.prepare_expression`.

    It offers what the lens reads from a :class:`~dgdlens.lens.expression.PreparedExpression`
    (``n_cells``, ``n_genes``, ``gene_names``, ``kind``, ``scale``, ``expressed_genes()``) except the
    matrix itself. What the values are (``kind`` and whether to count-split) is decided from the first
    chunk and confirmed on the first full pass (:meth:`confirm`); every chunk is validated as it is read.

    Parameters
    ----------
    expression
        A path (``.h5ad`` / ``.zarr``), a backed AnnData or its ``X``, an h5py dataset, or an in-memory
        matrix (cells x genes).
    gene_names
        One per column; taken from the file's ``var_names`` when omitted.
    kind, target_sum
        As in :func:`~dgdlens.lens.prepare_expression`.
    count_split, split_seed
        As in :func:`~dgdlens.lens.annotate`: ``"auto"`` splits integer counts.
    chunk_cells
        Rows per chunk (rounded up to a multiple of ``SPLIT_BLOCK_ROWS``).
    progress
        Show a progress bar per pass over the cells.
    """

    def __init__(self, expression, gene_names=None, *, kind: str = "auto", target_sum: float = 1e4,
                 count_split: bool | str = "auto", split_seed: int = 0, chunk_cells: int = 4096,
                 progress: bool = False):
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}.")
        if count_split not in ("auto", True, False):
            raise ValueError(f"count_split must be 'auto', True or False, got {count_split!r}.")
        if chunk_cells < 1:
            raise ValueError(f"chunk_cells must be a positive integer, got {chunk_cells}.")
        self.matrix, file_names = open_row_matrix(expression)
        self.gene_names = check_gene_names(file_names if gene_names is None else gene_names, self.matrix.n_vars)
        if self.n_cells < 2 or self.n_genes < 1:
            raise ValueError(f"expression needs at least 2 cells and 1 gene, got shape {self.matrix.shape}.")
        self.chunk_cells = int(np.ceil(chunk_cells / SPLIT_BLOCK_ROWS) * SPLIT_BLOCK_ROWS)
        self.requested_kind = kind
        self.count_split = count_split
        self.target_sum_requested = target_sum
        self.split_seed = split_seed
        self.progress = progress
        self.n_passes = 0
        self._facts = None        # ValueFacts of every cell, after the first pass
        self._expressed = None
        self._col_sums = None
        first = ValueFacts()
        first.add(self.matrix._slice(0, min(self.chunk_cells, self.n_cells)), 0, self.chunk_cells)
        self._decide(first)

    def _decide(self, facts: ValueFacts) -> None:
        """kind, split and scale from the facts (of the first chunk, then of every cell)."""
        integer_counts = facts.all_integer and facts.vmin >= 0
        if self.count_split is True and not integer_counts:
            raise ValueError("count_split=True needs non-negative integer counts; pass raw counts or "
                             "count_split=False.")
        self.split_applied = self.count_split is not False and integer_counts
        facts.check_sign(allow_negative=(self.requested_kind == "raw"))
        # a binomial half of integer counts is integer counts again
        kind = self.requested_kind
        self.kind = kind if kind != "auto" else detect_expression_kind(None, facts.as_dict())
        self.scale = "linear" if self.kind == "raw" else "log1p"
        self.target_sum = self.target_sum_requested if self.kind in {"counts", "means"} else None

    def confirm(self) -> bool:
        """After the first pass: check the decision made from the first chunk against every cell.

        Returns
        -------
        bool
            True when it holds; otherwise the kind and split are re-decided from all cells, the pass is
            forgotten, and the caller must pass over the cells again.
        """
        before = (self.kind, self.split_applied)
        self._decide(self._facts)
        if (self.kind, self.split_applied) == before:
            return True
        self._expressed = self._col_sums = self._facts = None
        return False

    # ------------------------------------------------------------------ shape
    @property
    def n_cells(self) -> int:
        """Number of cells (rows)."""
        return self.matrix.n_obs

    @property
    def n_genes(self) -> int:
        """Number of genes (columns)."""
        return self.matrix.n_vars

    # ------------------------------------------------------------------ passes
    def chunk_bounds(self) -> list[tuple[int, int]]:
        """The row chunks this process reads.

        Returns
        -------
        list of tuple of int
            ``(start, stop)`` per chunk: every chunk in one process, every ``world_size``-th one (starting
            at this rank's) under torchrun.
        """
        bounds = [(s, min(s + self.chunk_cells, self.n_cells)) for s in range(0, self.n_cells, self.chunk_cells)]
        if _dist.is_distributed():
            bounds = bounds[_dist.rank()::_dist.world_size()]
        return bounds

    def prepared_chunks(self) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        """Pass over this process's chunks, prepared like the in-memory path.

        The next chunk is read and prepared in a background thread while the caller works on the current
        one. The first pass also validates every value and records the facts, the expressed genes and the
        genes' means (call :meth:`confirm` after it).

        Yields
        ------
        tuple
            ``(start, stop, rows)``: the chunk's row range and its prepared values (float32 CSR, the
            binomial half when splitting, normalised and ``log1p``-ed).
        """
        first = self._facts is None
        tally = _PassTally(self.n_genes)
        bounds = self.chunk_bounds()
        if self.progress:
            from tqdm.auto import tqdm

            bounds = tqdm(bounds, desc=f"pass {self.n_passes + 1} over the cells", unit="chunk")
        yield from _one_ahead(self._prepare(bounds, first, tally))
        self.n_passes += 1
        if first:
            if _dist.is_distributed():
                _reduce_facts(tally.facts)
                tally.nnz = _all_reduce_numpy(tally.nnz.astype(np.float64))
                tally.col_sums = _all_reduce_numpy(tally.col_sums)
            self._facts = tally.facts
            self._expressed = tally.nnz > 0
            self._col_sums = tally.col_sums

    def _prepare(self, bounds, first: bool, tally: _PassTally) -> Iterator[tuple[int, int, sp.csr_matrix]]:
        for start, stop in bounds:
            block = self.matrix._slice(start, stop)
            block = sp.csr_matrix(block) if not sp.issparse(block) or block.format != "csr" else block
            if first:
                tally.facts.add(block, start, stop)
                tally.facts.check_sign(allow_negative=(self.requested_kind == "raw"))
            if self.split_applied and tally.facts.all_integer:
                block = split_rows(_sorted_csr(block), start, 0.5, self.split_seed, halves="b")
            prepared = prepare_block(block, self.kind, self.target_sum)
            del block
            if first:
                tally.nnz += np.bincount(prepared.indices[prepared.data != 0], minlength=self.n_genes)
                tally.col_sums += np.asarray(prepared.sum(axis=0, dtype=np.float64)).ravel()
            yield start, stop, prepared

    def expressed_genes(self) -> np.ndarray:
        """Genes with a non-zero prepared value in at least one cell (known after the first pass).

        Returns
        -------
        numpy.ndarray
            Boolean mask, one per gene.
        """
        if self._expressed is None:
            raise RuntimeError("expressed_genes() is known after the first pass over the cells.")
        return self._expressed

    def gene_means(self) -> np.ndarray:
        """Mean prepared (log-normalised) value per gene over all cells (known after the first pass).

        Returns
        -------
        numpy.ndarray
            float64, one per gene: the binning variable of ``background="matched"``.
        """
        if self._col_sums is None:
            raise RuntimeError("gene_means() is known after the first pass over the cells.")
        return self._col_sums / self.n_cells


class _PassTally:
    """What the first pass learns besides the statistics: value facts, non-zeros and sums per gene."""

    def __init__(self, n_genes: int):
        self.facts = ValueFacts()
        self.nnz = np.zeros(n_genes, dtype=np.int64)
        self.col_sums = np.zeros(n_genes)


def _one_ahead(items: Iterator) -> Iterator:
    """Iterate ``items`` one step ahead in a thread: the next chunk is read and prepared (h5py, numpy)
    while the caller's compiled kernels (which release the GIL) work on the current one. Errors in the
    thread are raised here; leaving early stops the thread after the chunk it is on."""
    slot: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slot.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slot.put(("done", None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            slot.put(("error", err))

    thread = threading.Thread(target=work, name="dgdlens-lens-reader", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = slot.get()
            if kind == "done":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # drain so that a worker blocked on put can see the stop flag
            try:
                slot.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


def _sorted_csr(block: sp.csr_matrix) -> sp.csr_matrix:
    """CSR with summed duplicates and sorted indices (what ``split_counts`` sees after its conversion)."""
    if block.has_canonical_format:
        return block
    block = block.copy()
    block.sum_duplicates()
    return block


def _all_reduce_numpy(values: np.ndarray, op: str = "sum") -> np.ndarray:
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
    reduce = _dist.all_reduce_sum if op == "sum" else _dist.all_reduce_max
    return reduce(tensor).numpy()


def _reduce_facts(facts: ValueFacts) -> None:
    # max over ranks of: max, -min, "some value non-integer", rows not summing to one (then summed below)
    out = _all_reduce_numpy(np.array([facts.vmax, -facts.vmin, float(not facts.all_integer)]), op="max")
    facts.vmax, facts.vmin, facts.all_integer = float(out[0]), float(-out[1]), not bool(out[2])
    facts.rows_not_one = int(_all_reduce_numpy(np.array([float(facts.rows_not_one)]))[0])


# ------------------------------------------------------------------------------------ group statistics
# The low groups are the first ``max_low_cells`` qualifying cells in one random order of all cells (see
# groups.py), so with the default subsample they all lie in the first K = max(low_k) cells of that order,
# a few thousand cells: those rows are kept in memory as the stream passes them ("gather") and the low
# statistics come from them exactly as in memory. When K is large (max_low_cells=None, or features that
# fire almost everywhere), the low sums are streamed like the high ones instead.
GATHER_MAX_CELLS = 32768


def _membership_csc(rows: sp.csr_matrix) -> sp.csc_matrix:
    """0/1 membership (groups x cells) as CSC, so that a chunk of cells is a cheap column slice."""
    m = sp.csc_matrix(rows, dtype=np.int8)
    m.data[:] = 1
    return m


class _GatheredLow:
    """The rows of the first ``K`` cells of the random order, kept as the stream passes them, and the
    low-group sums computed from them with the in-memory prefix-sum algorithm (:class:`~.de.PrefixSums`)."""

    def __init__(self, groups: FeatureGroups, K: int):
        self.groups = groups
        self.K = K
        self.rank = np.empty(groups.n_cells, dtype=np.int64)
        self.rank[groups.order] = np.arange(groups.n_cells)
        self.cells, self.blocks = [], []

    def add(self, start: int, X: sp.csr_matrix) -> None:
        """Keep the rows of chunk ``X`` (cells ``start...``) that lie in the prefix."""
        local = np.flatnonzero(self.rank[start:start + X.shape[0]] < self.K)
        if len(local):
            self.cells.append(start + local)
            self.blocks.append(X[local])

    def finish(self, stream: StreamedExpression, engine: str) -> None:
        """Index the kept rows (this process's share of the prefix) for :meth:`sums`."""
        cells = np.concatenate(self.cells) if self.cells else np.zeros(0, dtype=np.int64)
        X = sp.vstack(self.blocks, format="csr") if self.blocks else sp.csr_matrix((0, stream.n_genes),
                                                                                   dtype=np.float32)
        self.cells, self.blocks = [], []
        self.position = np.full(self.groups.n_cells, -1, dtype=np.int64)
        self.position[cells] = np.arange(len(cells))
        prefix = self.groups.order[:self.K]
        is_here = self.position[prefix] >= 0
        # prefix length k (in all cells) -> how many of those cells this process holds
        self.held_before = np.r_[0, np.cumsum(is_here)]
        sub = PreparedExpression(X, stream.kind, stream.scale, stream.gene_names, stream.target_sum)
        self.sub = sub
        self.prefix = PrefixSums(sub, self.position[prefix[is_here]], engine)
        self.engine = engine

    def sums(self, rows: np.ndarray):
        """(p_s, p_q, inverse, e_s, e_q): prefix sums at the features' ``low_k`` and the sums of their
        excluded cells, as :func:`~.de.stats_from_moments` takes them (added over processes)."""
        ks, inverse = np.unique(self.groups.low_k[rows], return_inverse=True)
        p_s, p_q = self.prefix.at(self.held_before[ks])
        excluded = self.groups.low_excluded[rows].tocoo()
        local = self.position[excluded.col]
        keep = local >= 0
        e = sp.csr_matrix((np.ones(int(keep.sum())), (excluded.row[keep], local[keep])),
                          shape=(len(rows), self.sub.n_cells))
        e_s, e_q = group_moments(e, self.sub.X, engine=self.engine)
        if _dist.is_distributed():
            p_s, p_q, e_s, e_q = (_all_reduce_numpy(a) for a in (p_s, p_q, e_s, e_q))
        return p_s, p_q, inverse, e_s, e_q


def _low_mode(groups: FeatureGroups) -> str:
    """"gather" (see above), "prefix" (few distinct k, e.g. every silent cell: column totals minus the
    excluded cells) or "explicit" (each low group's cells streamed like a high group)."""
    K = int(groups.low_k.max()) if groups.n_features else 0
    if K <= GATHER_MAX_CELLS:
        return "gather"
    return "prefix" if len(np.unique(groups.low_k)) <= 32 else "explicit"


def features_per_block(n_genes: int, max_memory: float, streamed_groups: int = 2) -> int:
    """Features whose streamed statistics fit ``max_memory`` bytes: 16 bytes (a float64 sum and sum of
    squares) per gene for each streamed group (the high group, and the low group unless gathered)."""
    return max(1, int(max_memory // (16 * streamed_groups * max(n_genes, 1))))


def _stream_block(stream: StreamedExpression, groups: FeatureGroups, rows: np.ndarray, mode: str,
                  gathered: _GatheredLow | None, engine: str):
    """One pass over the cells: the high sums of the features ``rows`` and, unless the low groups are
    gathered, their low sums (direct, or prefix segments + excluded cells)."""
    B, G = len(rows), stream.n_genes
    parts = [groups.high[rows]]
    if mode == "explicit":
        parts.append(groups.low_matrix(rows))
    elif mode == "prefix":
        parts.append(groups.low_excluded[rows])
    membership = _membership_csc(sp.vstack(parts, format="csr"))
    s = np.zeros((membership.shape[0], G))
    q = np.zeros((membership.shape[0], G))
    if mode == "prefix":
        ks = np.unique(groups.low_k[rows])
        rank = np.empty(groups.n_cells, dtype=np.int64)
        rank[groups.order] = np.arange(groups.n_cells)
        segment = np.searchsorted(ks, rank, side="right")  # cells with rank < ks[0] are in segment 0
        inside = segment < len(ks)
        segments = sp.csc_matrix(
            (np.ones(int(inside.sum()), dtype=np.int8), (segment[inside], np.flatnonzero(inside))),
            shape=(len(ks), groups.n_cells))
        p_s, p_q = np.zeros((len(ks), G)), np.zeros((len(ks), G))
    for start, stop, X in stream.prepared_chunks():
        group_moments(membership[:, start:stop], X, engine=engine, out=(s, q))
        if mode == "prefix":
            group_moments(segments[:, start:stop], X, engine=engine, out=(p_s, p_q))
        if gathered is not None:
            gathered.add(start, X)
    if _dist.is_distributed():
        s, q = _all_reduce_numpy(s), _all_reduce_numpy(q)
        if mode == "prefix":
            p_s, p_q = _all_reduce_numpy(p_s), _all_reduce_numpy(p_q)
    if mode == "prefix":
        low = (np.cumsum(p_s, axis=0), np.cumsum(p_q, axis=0), np.searchsorted(ks, groups.low_k[rows]))
        return s[:B], q[:B], low + (s[B:], q[B:])
    if mode == "explicit":
        return s[:B], q[:B], (s[B:], q[B:], np.arange(B), None, None)
    return s, q, None


def iter_streamed_de_chunks(
    stream: StreamedExpression,
    groups: FeatureGroups,
    *,
    test: str = "t-test",
    variance_guard: str | None = "floor",
    pseudocount: float = 1.0,
    chunk_size: int | None = None,
    engine: str = "auto",
    full_pvalues: bool = False,
    max_memory: float = 2.5e9,
    progress: bool = False,
) -> Iterator[DEChunk]:
    """:func:`dgdlens.lens.de.iter_de_chunks` over a :class:`StreamedExpression`: one pass over the cells
    per block of features (as many features per block as ``max_memory`` allows), then the DE of the
    block ``chunk_size`` features at a time. ``progress`` is the stream's own setting."""
    check_de_options(test, variance_guard, pseudocount)
    if test != "t-test":
        raise ValueError(
            f"test={test!r} cannot stream: a rank test needs every group's values in memory. Use the t-test "
            "(the default) on backed data, or load the expression (adata.to_memory()) for the Wilcoxon test."
        )
    if groups.n_cells != stream.n_cells:
        raise ValueError(
            f"activations have {groups.n_cells} cells (rows) but expression has {stream.n_cells}; "
            "they must describe the same cells in the same order."
        )
    chunk = chunk_size or auto_chunk_size(stream.n_genes)
    order = np.argsort(groups.low_k, kind="stable")  # the in-memory path's feature order
    mode = _low_mode(groups)
    block = features_per_block(stream.n_genes, max_memory, 1 if mode == "gather" else 2)
    n_blocks = -(-max(groups.n_features, 1) // block)
    block = -(-max(groups.n_features, 1) // n_blocks)  # as many passes, each with an equal share
    gathered = None
    b0 = 0
    while b0 < max(groups.n_features, 1):
        rows = order[b0:b0 + block]
        if mode == "gather" and gathered is None:
            gathered = _GatheredLow(groups, int(groups.low_k.max()) if groups.n_features else 0)
        s_h, q_h, low = _stream_block(stream, groups, rows, mode, gathered if b0 == 0 else None, engine)
        if stream.n_passes == 1 and not stream.confirm():
            gathered = None
            continue  # the first chunk misled the kind or split decision: pass again with the right one
        if b0 == 0 and gathered is not None:
            gathered.finish(stream, engine)
        for c0 in range(0, len(rows), chunk):
            sel = slice(c0, c0 + chunk)
            r = rows[sel]
            if low is None:
                p_s, p_q, inverse, e_s, e_q = gathered.sums(r)
            else:
                p_s, p_q, inverse, e_s, e_q = low[0], low[1], low[2][sel], low[3], low[4]
                if e_s is None:
                    e_s = e_q = np.zeros((len(r), stream.n_genes))
                else:
                    e_s, e_q = e_s[sel], e_q[sel]
            stats_ = stats_from_moments(s_h[sel], q_h[sel], p_s, p_q, inverse, e_s, e_q,
                                        groups.n_high[r], groups.n_low[r], engine, variance_guard)
            yield t_test_chunk(r, stats_, stream.scale, pseudocount, full_pvalues)
        b0 += block
