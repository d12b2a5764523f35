"""Paired single-cell multiome data (RNA + ATAC of the same cells) with ground truth.

Cell types are the grid ``rna_group x atac_group``: the RNA of a cell is driven by its *rna group* alone
(blocks of marker genes, the "programs"), its chromatin by its *atac group* (blocks of marker peaks) and,
through a minority of peaks LINKED to marker genes, by its rna group too. Each modality on its own
therefore sees only part of the cell-type structure; both together see all of it. That is the point of
the simulation: a joint (multimodal) model should separate all ``n_rna_groups * n_atac_groups`` types,
a model of either modality alone should not.

RNA. Expected counts are ``library * softmax_g(log_rna[r, g] + gene_shift[b, g])`` with
``log_rna[r] = base + type_effect * [g is a marker of program r]``, a log-normal library (median
``mean_rna_library``) and negative-binomial noise (dispersion ``rna_dispersion``).

ATAC. Every peak has a baseline log accessibility; a peak linked to gene ``g`` adds the log-fold change of
``g``'s program (``type_effect`` in the cells of ``g``'s rna group), a marker peak of atac group ``a`` adds
``type_effect`` in the cells of group ``a``. Counts are Poisson with mean
``depth * softmax_p(log_atac[r, a, p] + peak_shift[b, p])``, ``depth`` being a log-normal per-cell factor
times a scale calibrated so that the expected fraction of non-zero entries equals ``peak_density`` (real
fragments-in-peaks matrices are 2-5 % non-zero, mostly ones and twos).

Counts are drawn chunk by chunk and the ATAC matrix never exists densely: within a chunk, the cells of
one (type, batch) share a composition, so each peak's count summed over them is one Poisson draw, and
those counts are dealt to the cells in proportion to their depth (exact: given their sum, independent
Poisson counts are multinomial). The cost grows with the number of counts and of peaks, not with
cells x peaks: 20,000 cells x 100,000 peaks take seconds.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

if TYPE_CHECKING:
    import mudata

__all__ = ["simulate_multiome"]

# Log-scale spreads that are not arguments: per-cell library sizes and per-peak baseline accessibility
# (real peaks differ a lot in how often they are open; genes get the usual standard-normal baseline).
_RNA_LIBRARY_SD = 0.4
_ATAC_DEPTH_SD = 0.5
_GENE_BASE_SD = 1.0
_PEAK_BASE_SD = 0.7
# Memory caps of one chunk: dense float64 entries of an RNA chunk (a few temporaries of 8 MB each)
# and the number of ATAC counts drawn at once (a few arrays of that length, ~150 MB in all; larger
# chunks would spend less on the per-peak Poisson draws but more on memory traffic).
_RNA_DENSE_ENTRIES = 1_000_000
_ATAC_CHUNK_COUNTS = 4_000_000
_N_CHROMOSOMES = 22


def _check_args(n_cells, n_genes, n_peaks, n_rna_groups, n_atac_groups, n_batches, batch_effect_sd,
                linked_fraction, peaks_per_gene, peak_density, mean_rna_library, rna_dispersion,
                type_effect, markers_per_group, chunk_cells) -> tuple[int, int]:
    """Raise ``ValueError`` on inconsistent arguments; return (linked genes, marker peaks per atac group)."""
    ints = {"n_cells": n_cells, "n_genes": n_genes, "n_peaks": n_peaks, "n_rna_groups": n_rna_groups,
            "n_atac_groups": n_atac_groups, "n_batches": n_batches, "peaks_per_gene": peaks_per_gene,
            "markers_per_group": markers_per_group, "chunk_cells": chunk_cells}
    for name, value in ints.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    n_types = n_rna_groups * n_atac_groups
    if n_cells < n_types:
        raise ValueError(f"n_cells={n_cells} is fewer than the {n_types} cell types "
                         f"({n_rna_groups} rna groups x {n_atac_groups} atac groups)")
    if n_batches > n_cells:
        raise ValueError(f"n_batches={n_batches} is more than n_cells={n_cells}")
    if not 0.0 < peak_density < 1.0:
        raise ValueError(f"peak_density must lie in (0, 1), got {peak_density!r}")
    if not 0.0 <= linked_fraction <= 1.0:
        raise ValueError(f"linked_fraction must lie in [0, 1], got {linked_fraction!r}")
    for name, value in {"batch_effect_sd": batch_effect_sd, "type_effect": type_effect}.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    for name, value in {"mean_rna_library": mean_rna_library, "rna_dispersion": rna_dispersion}.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    if n_rna_groups * markers_per_group > n_genes:
        raise ValueError(f"{n_rna_groups} rna groups x {markers_per_group} marker genes need at least that "
                         f"many genes (n_genes={n_genes})")
    n_linked_genes = round(linked_fraction * n_peaks / peaks_per_gene)
    if n_linked_genes > n_genes:
        raise ValueError(f"linked_fraction={linked_fraction} of {n_peaks} peaks at {peaks_per_gene} peaks "
                         f"per gene needs {n_linked_genes} linked genes, more than n_genes={n_genes}")
    atac_markers = markers_per_group * peaks_per_gene
    needed = n_linked_genes * peaks_per_gene + n_atac_groups * atac_markers
    if needed > n_peaks:
        raise ValueError(f"{n_linked_genes * peaks_per_gene} linked peaks + {n_atac_groups} atac groups x "
                         f"{atac_markers} marker peaks = {needed} are more than n_peaks={n_peaks}")
    return n_linked_genes, atac_markers


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax (each row a composition)."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _peak_layout(n_linked_genes: int, peaks_per_gene: int, n_single: int, rng: np.random.Generator):
    """Place peaks on a toy genome: a linked gene's peaks side by side (within tens of kb, as enhancers
    and the promoter of one gene are), the other peaks one by one, all shuffled along 22 chromosomes.

    Returns the role index of each peak in genome order (roles: linked peaks gene by gene, then the
    single peaks), the peaks' names ``chrN:start-end`` (unique: peaks never overlap), and their
    chromosomes, starts and ends."""
    n_linked = n_linked_genes * peaks_per_gene
    unit_start = np.concatenate([np.arange(n_linked_genes) * peaks_per_gene, n_linked + np.arange(n_single)])
    unit_size = np.concatenate([np.full(n_linked_genes, peaks_per_gene), np.ones(n_single, dtype=np.int64)])
    perm = rng.permutation(len(unit_start))
    unit_start, unit_size = unit_start[perm], unit_size[perm]
    n = int(unit_size.sum())
    first_of_unit = np.cumsum(unit_size) - unit_size
    within = np.arange(n) - np.repeat(first_of_unit, unit_size)
    roles = np.repeat(unit_start, unit_size) + within

    n_chrom = min(_N_CHROMOSOMES, len(unit_start))
    unit_chrom = (np.arange(len(unit_start)) * n_chrom) // len(unit_start)
    chrom = np.repeat(unit_chrom, unit_size)
    width = rng.integers(300, 1001, n)
    gap = np.where(within == 0, rng.integers(2_000, 60_001, n), rng.integers(500, 15_001, n))
    step = gap.copy()
    step[1:] += width[:-1]
    pos = np.cumsum(step)
    chrom_first = np.searchsorted(chrom, np.arange(n_chrom))
    start = pos - pos[chrom_first[chrom]] + 10_000
    names = [f"chr{c + 1}:{s}-{s + w}" for c, s, w in zip(chrom.tolist(), start.tolist(), width.tolist())]
    return roles, names, np.char.add("chr", (chrom + 1).astype(str)), start, start + width


def _calibrate_depth(probs: np.ndarray, weights: np.ndarray, depth_factor: np.ndarray,
                     density: float) -> float:
    """The ATAC depth scale ``s`` whose expected fraction of non-zero entries is ``density``.

    A cell of combination ``k`` with depth factor ``f`` has ``P(count_p > 0) = 1 - exp(-s f probs[k, p])``;
    the expectation runs over the combinations (``weights``: their share of cells), over 16 quantiles of
    the realised depth factors and over the peaks, summarised by a 1000-bin histogram of their log
    probability (rates within 1 % of each other detect alike, so the summary is exact to well below
    the sampling noise, and each evaluation is cheap at any number of peaks). Bisection on ``log s``."""
    q = np.quantile(depth_factor, (np.arange(16) + 0.5) / 16)
    q *= depth_factor.mean() / q.mean()  # quantiles miss the tails; keep the mean (rates are small)
    rates, mass = [], []
    for w, p in zip(weights, probs):
        if w <= 0:
            continue
        logp = np.log(p)
        lo, width = logp.min(), (logp.max() - logp.min()) / 1000 + 1e-12
        b = np.minimum(((logp - lo) / width).astype(np.int64), 999)
        count = np.bincount(b, minlength=1000)
        summed = np.bincount(b, weights=p, minlength=1000)
        keep = count > 0
        rates.append(summed[keep] / count[keep])
        mass.append(w * count[keep] / len(p))
    rates, mass = np.concatenate(rates), np.concatenate(mass)

    def density_at(s: float) -> float:
        return float(mass @ np.mean(-np.expm1(-s * np.multiply.outer(q, rates)), axis=0))

    lo = hi = density * probs.shape[1] / float(np.mean(q))  # exact in the limit of small rates
    while density_at(lo) > density:
        lo /= 4.0
    while density_at(hi) < density:
        hi *= 4.0
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if density_at(mid) < density:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.0 + 1e-6:
            break
    return math.sqrt(lo * hi)


def _rna_counts(comp: np.ndarray, combo: np.ndarray, library: np.ndarray, dispersion: float,
                chunk: int, gamma_rng: np.random.Generator,
                poisson_rng: np.random.Generator) -> sp.csr_matrix:
    """NB (gamma-Poisson) counts, a dense chunk at a time, each chunk made sparse at once. The gamma and
    Poisson draws come from two generators consumed in cell order, so the result does not depend on
    ``chunk``."""
    n, n_genes = len(combo), comp.shape[1]
    data, indices, indptr = [], [], [np.zeros(1, dtype=np.int64)]
    offset = 0
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        m = stop - start
        rate = gamma_rng.standard_gamma(dispersion, size=(m, n_genes))  # mean 1, variance 1 / dispersion
        rate *= comp[combo[start:stop]]
        rate *= library[start:stop, None]
        rate /= dispersion
        counts = poisson_rng.poisson(rate)
        counts[counts.sum(1) == 0, 0] = 1  # no empty cell (library-size normalisation divides by it)
        flat = counts.ravel()
        nz = np.flatnonzero(flat)
        data.append(flat[nz].astype(np.float32))
        indices.append((nz % n_genes).astype(np.int32))
        indptr.append(offset + np.searchsorted(nz, np.arange(1, m + 1) * n_genes))
        offset += len(nz)
    return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)),
                         shape=(n, n_genes))


def _pick(cum: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse CDF: for each ``u`` in [0, 1), the index ``i`` with ``cum[i - 1] <= u < cum[i]``
    (``cum``: cumulative probabilities ending at 1).

    A guide table (Chen and Asau) jumps to the first candidate and a short forward walk finishes:
    a few vectorised passes per draw, several times faster than ``np.searchsorted``'s branchy search."""
    n = len(cum)
    size = 4 * n
    guide = np.searchsorted(cum, np.arange(size) / size, side="right")
    j = guide[np.minimum((u * size).astype(np.int64), size - 1)]
    np.minimum(j, n - 1, out=j)
    todo = np.flatnonzero(cum[j] <= u)
    while len(todo):
        j[todo] += 1
        todo = todo[(j[todo] < n - 1) & (cum[j[todo]] <= u[todo])]
    return j


def _atac_counts(probs: np.ndarray, combo: np.ndarray, expected: np.ndarray, chunk: int,
                 rng: np.random.Generator, capacity: int) -> sp.csr_matrix:
    """Sparse Poisson counts with means ``expected[c] * probs[combo[c], p]``, never dense.

    Per chunk and combination (cells sharing a composition), each peak's count summed over those cells
    is Poisson with the summed mean; its counts then go to cells with probabilities proportional to
    ``expected`` (given a Poisson total, independent Poisson counts are multinomial, so this is exact).
    The work is a few operations per count plus one Poisson draw per peak and chunk, and the
    inverse-CDF search runs over the chunk's cells (a small, cache-resident table), not the peaks.
    Counts come out peak by peak, so scipy's stable COO-to-CSR conversion leaves each row sorted with
    duplicates adjacent and merging them is one pass. The result is written into buffers of
    ``capacity`` entries (grown if needed) to avoid a final copy of the whole matrix."""
    n, n_peaks = len(combo), probs.shape[1]
    index_dtype = np.int32 if max(n_peaks, capacity) < np.iinfo(np.int32).max // 2 else np.int64
    data, indices = np.empty(capacity, dtype=np.float32), np.empty(capacity, dtype=index_dtype)
    indptr = np.zeros(n + 1, dtype=np.int64)
    peaks = np.arange(n_peaks, dtype=index_dtype)
    nnz = 0
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        m = stop - start
        k, lam = combo[start:stop], expected[start:stop]
        order = np.argsort(k, kind="stable").astype(index_dtype)
        kinds, first = np.unique(k[order], return_index=True)
        rows, cols = [], []
        for kind, lo, hi in zip(kinds, first, np.append(first[1:], m)):
            cells = order[lo:hi]
            cum = np.cumsum(lam[cells])
            per_peak = rng.poisson(cum[-1] * probs[kind])
            rows.append(cells[_pick(cum / cum[-1], rng.random(int(per_peak.sum())))])
            cols.append(np.repeat(peaks, per_peak))
        rows, cols = np.concatenate(rows), np.concatenate(cols)
        ones = np.ones(len(rows), dtype=np.float32)
        block = sp.coo_matrix((ones, (rows, cols)), shape=(m, n_peaks)).tocsr()
        del rows, cols, ones
        empty = np.flatnonzero(np.diff(block.indptr) == 0)
        if len(empty):  # no empty cell: give it one count drawn from its composition (rare)
            extra = [_pick(np.cumsum(probs[k[c]]) / probs[k[c]].sum(), rng.random(1))[0] for c in empty]
            block = block + sp.csr_matrix((np.ones(len(empty), dtype=np.float32), (empty, extra)),
                                          shape=block.shape)
            block.sort_indices()
        if nnz + block.nnz > len(data):
            grow = max(block.nnz, len(data) // 2)
            data = np.concatenate([data, np.empty(grow, dtype=data.dtype)])
            indices = np.concatenate([indices, np.empty(grow, dtype=indices.dtype)])
        data[nnz:nnz + block.nnz] = block.data
        indices[nnz:nnz + block.nnz] = block.indices
        indptr[start + 1:stop + 1] = nnz + block.indptr[1:]
        nnz += block.nnz
    data.resize(nnz, refcheck=False)  # shrinks in place: no copy of the whole matrix
    indices.resize(nnz, refcheck=False)
    out = sp.csr_matrix((data, indices, indptr.astype(index_dtype)), shape=(n, n_peaks), copy=False)
    out.has_sorted_indices = True
    return out


def simulate_multiome(n_cells: int = 2000, n_genes: int = 1000, n_peaks: int = 5000, *, n_rna_groups: int = 3,
                      n_atac_groups: int = 2, n_batches: int = 1, batch_effect_sd: float = 0.5,
                      linked_fraction: float = 0.03, peaks_per_gene: int = 3, peak_density: float = 0.03,
                      mean_rna_library: float = 2000.0, rna_dispersion: float = 5.0, type_effect: float = 2.0,
                      markers_per_group: int = 40, chunk_cells: int = 10_000, seed: int = 0) -> mudata.MuData:
    """Simulate paired RNA + ATAC counts of cell types ``rna_group x atac_group``, with the truth in ``uns``.

    RNA sees only a cell's rna group (marker-gene programs); ATAC sees its atac group (marker-peak blocks)
    and its rna group only through the peaks linked to marker genes, which follow their gene's log-fold
    change. See the module docstring for the model.

    Parameters
    ----------
    n_cells, n_genes, n_peaks
        Cells (spread evenly over cell types and batches, then shuffled), genes and peaks.
    n_rna_groups, n_atac_groups
        Groups seen by RNA (gene programs) and by ATAC (peak blocks); the cell types are their
        ``n_rna_groups * n_atac_groups`` combinations, ``T{r * n_atac_groups + a}``.
    n_batches, batch_effect_sd
        Batches ``b0``...; when ``n_batches > 1`` every batch shifts every gene's and every peak's log
        expression/accessibility by a normal draw of standard deviation ``batch_effect_sd``.
    linked_fraction, peaks_per_gene
        About ``linked_fraction * n_peaks`` peaks are linked to genes, ``peaks_per_gene`` per linked gene.
        Linked genes are the marker genes first (programs in turn), then other genes when more are needed
        (those links carry no type signal). The default is small on purpose: linked marker peaks are
        ATAC's only view of the rna groups, and it should stay partial.
    peak_density
        Target fraction of non-zero ATAC entries (the per-cell depth is calibrated to it), in (0, 1).
    mean_rna_library, rna_dispersion
        Median RNA library size (log-normal, log-scale sd 0.4) and NB dispersion (variance
        ``mu + mu^2 / rna_dispersion``).
    type_effect, markers_per_group
        Log-fold change of marker genes (and of the peaks linked to them) in their rna group and of marker
        peaks in their atac group; marker genes per rna group. Each atac group has
        ``markers_per_group * peaks_per_gene`` marker peaks (as many as a fully linked program has).
    chunk_cells
        Cells drawn at a time; chunks shrink further so that a dense RNA chunk stays near 8 MB per array
        and an ATAC chunk draws at most ~4 million counts. The RNA counts do not depend on it; the ATAC
        counts do (the same distribution, other draws), so it is part of what makes a run reproducible.
    seed
        Seeds everything; the same arguments and seed give the same data. The structure (programs,
        links, peaks) depends on the sizes and the seed, not on ``n_cells``.

    Returns
    -------
    mudata.MuData
        Modalities ``"rna"`` (var_names ``gene0``..., ``var["program"]``: the rna group of a marker gene or
        ``""``) and ``"atac"`` (var_names ``chrN:start-end``, ``var["linked_gene"]`` (``""`` when unlinked),
        ``var["program"]``: the rna group of the linked marker gene or the atac group of a marker peak or
        ``""``, ``var["chrom"]``, ``var["start"]``, ``var["end"]``), each with integer counts in ``X``
        (CSR, float32) and ``obs["library"]`` (RNA: the library size; ATAC: the expected count). The
        categorical ``cell_type``, ``rna_group`` (``r0``...), ``atac_group`` (``a0``...) and ``batch``
        (``b0``...) are in each modality's ``obs`` and in ``mdata.obs``. ``mdata.uns["truth"]``:
        ``peak_gene_links`` (``{"peak": [...], "gene": [...]}``), ``programs_rna`` (``{rna group: marker
        genes}``), ``programs_atac`` (``{atac group: marker peaks}``), ``type_groups`` (each type's rna and
        atac group), ``gene_shift`` and ``peak_shift`` (batches x genes/peaks log shifts, zeros for one
        batch) and ``settings`` (the arguments plus the calibrated ``atac_depth_median``, the median
        expected ATAC count of a cell, and the link counts).
    """
    import anndata as ad
    import mudata as md
    from ..data.modalities import mudata_without_pull

    n_linked_genes, atac_markers = _check_args(
        n_cells, n_genes, n_peaks, n_rna_groups, n_atac_groups, n_batches, batch_effect_sd, linked_fraction,
        peaks_per_gene, peak_density, mean_rna_library, rna_dispersion, type_effect, markers_per_group,
        chunk_cells)
    n_cells, n_genes, n_peaks = int(n_cells), int(n_genes), int(n_peaks)
    R, A, B = int(n_rna_groups), int(n_atac_groups), int(n_batches)
    M, ppg = int(markers_per_group), int(peaks_per_gene)
    # Independent streams: the structure does not depend on n_cells, and each modality's count draws
    # come from their own generators (the RNA ones consumed in cell order, so RNA chunking does not
    # matter; the ATAC draws are per chunk and per composition).
    structure_rng, cell_rng, gamma_rng, poisson_rng, atac_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5))

    # --- genes: programs (marker blocks of random genes) and the RNA log profile per rna group
    gene_perm = structure_rng.permutation(n_genes)
    markers = [np.sort(gene_perm[r * M:(r + 1) * M]) for r in range(R)]
    gene_group = np.full(n_genes, -1)
    for r in range(R):
        gene_group[markers[r]] = r
    gene_base = structure_rng.normal(0.0, _GENE_BASE_SD, n_genes)
    log_rna = np.tile(gene_base, (R, 1))
    for r in range(R):
        log_rna[r, markers[r]] += type_effect

    # --- links: marker genes first, programs in turn (equal shares), then other genes
    n_marker_linked = min(n_linked_genes, R * M)
    linked_genes = np.array([markers[i % R][i // R] for i in range(n_marker_linked)], dtype=np.int64)
    linked_genes = np.concatenate([linked_genes, gene_perm[R * M:R * M + n_linked_genes - n_marker_linked]])
    n_linked = n_linked_genes * ppg

    # --- peaks by role (linked gene by gene, then atac marker blocks, then background), laid on a genome
    roles, peak_names, chrom, start, end = _peak_layout(n_linked_genes, ppg, n_peaks - n_linked,
                                                        structure_rng)
    role_gene = np.full(n_peaks, -1)
    role_gene[:n_linked] = np.repeat(linked_genes, ppg)
    role_atac = np.full(n_peaks, -1)
    role_atac[n_linked:n_linked + A * atac_markers] = np.repeat(np.arange(A), atac_markers)
    peak_gene, peak_atac = role_gene[roles], role_atac[roles]  # per peak, in genome (var) order
    peak_rna = np.where(peak_gene >= 0, gene_group[np.maximum(peak_gene, 0)], -1)
    peak_base = structure_rng.normal(0.0, _PEAK_BASE_SD, n_peaks)
    log_atac = np.tile(peak_base, (R * A, 1))  # row r * A + a: the cell type's log accessibility
    for r in range(R):
        for a in range(A):
            log_atac[r * A + a, peak_rna == r] += type_effect  # linked peaks follow their gene's log-fold
            log_atac[r * A + a, peak_atac == a] += type_effect

    if B > 1:
        gene_shift = structure_rng.normal(0.0, batch_effect_sd, (B, n_genes))
        peak_shift = structure_rng.normal(0.0, batch_effect_sd, (B, n_peaks))
    else:
        gene_shift, peak_shift = np.zeros((1, n_genes)), np.zeros((1, n_peaks))

    # --- cells: batches dealt in turn (sizes within one), types in turn within each batch (rotated per
    # batch so the overall type counts stay within one too when they can), then shuffled
    n_types = R * A
    i = np.arange(n_cells)
    order = cell_rng.permutation(n_cells)
    ctype, batch = ((i // B + i % B) % n_types)[order], (i % B)[order]
    rgroup, agroup = ctype // A, ctype % A
    library = cell_rng.lognormal(np.log(mean_rna_library), _RNA_LIBRARY_SD, n_cells)
    depth_factor = cell_rng.lognormal(0.0, _ATAC_DEPTH_SD, n_cells)

    # --- RNA: one composition per (rna group, batch)
    comp_rna = _softmax_rows((log_rna[:, None, :] + gene_shift[None, :, :]).reshape(R * B, n_genes))
    rna_chunk = max(1, min(chunk_cells, _RNA_DENSE_ENTRIES // n_genes))
    rna_x = _rna_counts(comp_rna, rgroup * B + batch, library, rna_dispersion, rna_chunk, gamma_rng,
                        poisson_rng)

    # --- ATAC: one composition per (type, batch); depth calibrated to the target density
    atac_combo = ctype * B + batch
    probs = _softmax_rows((log_atac[:, None, :] + peak_shift[None, :, :]).reshape(n_types * B, n_peaks))
    weights = np.bincount(atac_combo, minlength=n_types * B) / n_cells
    scale = _calibrate_depth(probs, weights, depth_factor, peak_density)
    expected = scale * depth_factor
    atac_chunk = max(1, min(chunk_cells, int(_ATAC_CHUNK_COUNTS // max(float(expected.mean()), 1.0))))
    capacity = int(1.1 * peak_density * n_cells * n_peaks) + 1024  # the calibrated non-zeros, with room
    atac_x = _atac_counts(probs, atac_combo, expected, atac_chunk, atac_rng, capacity)
    del probs

    # --- AnnData / MuData
    type_names = [f"T{t}" for t in range(n_types)]
    rna_names, atac_names = [f"r{r}" for r in range(R)], [f"a{a}" for a in range(A)]
    batch_names = [f"b{b}" for b in range(B)]
    gene_names = [f"gene{g}" for g in range(n_genes)]
    obs = pd.DataFrame({
        "cell_type": pd.Categorical.from_codes(ctype, type_names),
        "rna_group": pd.Categorical.from_codes(rgroup, rna_names),
        "atac_group": pd.Categorical.from_codes(agroup, atac_names),
        "batch": pd.Categorical.from_codes(batch, batch_names),
    }, index=[f"cell{c}" for c in range(n_cells)])
    gene_program = np.array([""] + rna_names, dtype=object)[gene_group + 1]
    rna = ad.AnnData(rna_x, obs=obs.assign(library=library),
                     var=pd.DataFrame({"program": gene_program}, index=gene_names))
    peak_program = np.array([""] + rna_names + atac_names, dtype=object)[
        np.where(peak_rna >= 0, peak_rna + 1, np.where(peak_atac >= 0, R + 1 + peak_atac, 0))]
    atac_var = pd.DataFrame({
        "linked_gene": np.array([""] + gene_names, dtype=object)[peak_gene + 1],
        "program": peak_program,
        "chrom": chrom.astype(object), "start": start, "end": end,
    }, index=peak_names)
    atac = ad.AnnData(atac_x, obs=obs.assign(library=expected), var=atac_var)

    # The shared annotations live on mdata.obs itself; pull_on_update=False keeps mudata from also
    # copying them in as "rna:cell_type", "atac:cell_type", ... columns.
    with mudata_without_pull():
        mdata = md.MuData({"rna": rna, "atac": atac})
        for column in obs.columns:
            mdata.obs[column] = obs[column]
        mdata.update()

    peak_index = np.asarray(peak_names, dtype=object)
    linked = np.flatnonzero(peak_gene >= 0)
    mdata.uns["truth"] = {
        "peak_gene_links": {"peak": peak_index[linked].tolist(),
                            "gene": [gene_names[g] for g in peak_gene[linked]]},
        "programs_rna": {rna_names[r]: [gene_names[g] for g in markers[r]] for r in range(R)},
        "programs_atac": {atac_names[a]: peak_index[peak_atac == a].tolist() for a in range(A)},
        "type_groups": {"cell_type": type_names, "rna_group": [rna_names[t // A] for t in range(n_types)],
                        "atac_group": [atac_names[t % A] for t in range(n_types)]},
        "gene_shift": gene_shift, "peak_shift": peak_shift,
        "settings": {
            "n_cells": n_cells, "n_genes": n_genes, "n_peaks": n_peaks, "n_rna_groups": R,
            "n_atac_groups": A, "n_batches": B, "batch_effect_sd": float(batch_effect_sd),
            "linked_fraction": float(linked_fraction), "peaks_per_gene": ppg,
            "peak_density": float(peak_density), "mean_rna_library": float(mean_rna_library),
            "rna_dispersion": float(rna_dispersion), "type_effect": float(type_effect),
            "markers_per_group": M, "atac_markers_per_group": atac_markers, "seed": int(seed),
            "n_linked_genes": n_linked_genes, "n_linked_marker_genes": n_marker_linked,
            "n_linked_peaks": n_linked, "atac_depth_median": float(scale * np.median(depth_factor)),
        },
    }
    return mdata
