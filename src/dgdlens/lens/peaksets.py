"""Gene sets seen through chromatin: each gene set becomes the set of peaks linked to its genes.

The feature lens tests the differentially accessible peaks of every SAE feature against a collection of
sets exactly as it tests genes, as long as the sets list peak names. :func:`peak_sets` builds such a
collection from any gene-set collection and a peak-to-gene link table (several genes per peak and several
peaks per gene allowed), so that

>>> sets = peak_sets(programs, mdata.mod["atac"].var["linked_gene"])          # doctest: +SKIP
>>> annotate(activations, atac_counts, gene_names=peak_names, gene_sets=sets)  # doctest: +SKIP

annotates features by the chromatin of each programme. Links can come from a multiome analysis
(peak-gene correlation), from a simulation's truth, or from :func:`nearest_gene_links`, which links every
peak (``chrN:start-end``) to the gene whose transcription start site (TSS) is closest.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from .genesets import GeneSets, resolve_gene_sets

__all__ = ["peak_sets", "nearest_gene_links", "parse_peak_names"]

_PEAK_RE = re.compile(r"^(?P<chrom>.+?)[:_-](?P<start>\d+)[-_:](?P<end>\d+)$")


def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return value is pd.NA or str(value).strip() == ""


def _link_table(peak_to_gene) -> pd.DataFrame:
    """Any accepted link form as a two-column DataFrame ``peak, gene`` of strings (missing genes dropped)."""
    if isinstance(peak_to_gene, pd.DataFrame):
        missing = [c for c in ("peak", "gene") if c not in peak_to_gene.columns]
        if missing:
            raise ValueError(f"peak_to_gene as a DataFrame needs the columns 'peak' and 'gene' (one row per link); "
                             f"missing {missing}, got {list(peak_to_gene.columns)}.")
        pairs = zip(peak_to_gene["peak"].tolist(), peak_to_gene["gene"].tolist())
    elif isinstance(peak_to_gene, pd.Series):
        pairs = zip(peak_to_gene.index.tolist(), peak_to_gene.tolist())
    elif isinstance(peak_to_gene, Mapping):
        keys = set(peak_to_gene)
        columns = keys == {"peak", "gene"} and all(
            not isinstance(v, str) and np.ndim(np.asarray(v, dtype=object)) == 1 for v in peak_to_gene.values())
        if columns:  # {"peak": [...], "gene": [...]}, e.g. a simulation's uns["truth"]["peak_gene_links"]
            peaks, genes = list(peak_to_gene["peak"]), list(peak_to_gene["gene"])
            if len(peaks) != len(genes):
                raise ValueError(f"peak_to_gene['peak'] has {len(peaks)} entries but peak_to_gene['gene'] has "
                                 f"{len(genes)}; they must be the two columns of one link table.")
            pairs = zip(peaks, genes)
        else:
            pairs = peak_to_gene.items()
    else:
        raise TypeError("peak_to_gene must be a mapping {peak: gene or [genes]}, a pandas Series (index: peaks, "
                        "values: genes), a DataFrame with columns 'peak' and 'gene', or {'peak': [...], "
                        f"'gene': [...]}}; got {type(peak_to_gene).__name__}.")
    rows = []
    for peak, genes in pairs:
        if _is_missing(peak):
            continue
        if isinstance(genes, str) or not isinstance(genes, Iterable):
            genes = [genes]
        for gene in genes:
            if not _is_missing(gene):
                rows.append((str(peak).strip(), str(gene).strip()))
    return pd.DataFrame(rows, columns=["peak", "gene"]).drop_duplicates(ignore_index=True)


def peak_sets(gene_sets, peak_to_gene, *, peaks: Iterable[str] | None = None, min_size: int = 1,
              max_size: int | None = None) -> GeneSets:
    """A gene-set collection over peaks: each set holds the peaks linked to any of its genes.

    Parameters
    ----------
    gene_sets
        Any form the lens accepts: a bundled collection name (``"go_bp"``, ...), a ``.gmt`` path, a dict
        ``{term: [genes]}`` or a :class:`~dgdlens.lens.GeneSets`.
    peak_to_gene
        The links, several genes per peak and several peaks per gene allowed: a mapping
        ``{peak: gene}`` or ``{peak: [genes]}``; a pandas Series indexed by peak whose values are genes
        (e.g. ``mdata.mod["atac"].var["linked_gene"]``; repeated index entries allowed); a DataFrame with
        columns ``peak`` and ``gene`` (one row per link, e.g. from :func:`nearest_gene_links`); or
        ``{"peak": [...], "gene": [...]}``. Empty strings, ``None`` and NaN mean "no gene" and are skipped.
    peaks
        The peaks measured (e.g. ``mdata.mod["atac"].var_names``): links to other peaks are dropped.
        Default: every linked peak.
    min_size, max_size
        Keep a set only if it has at least ``min_size`` (and at most ``max_size``) peaks. The default keeps
        every set with one peak or more; the lens filters again on the peaks it tests (``min_set_size``).

    Returns
    -------
    GeneSets
        ``{term: [peaks]}`` with the same term IDs as ``gene_sets`` (a set's peaks in the order of its genes,
        then of the links; each peak once), descriptions ``"<description> (peaks of n of its m genes)"``
        and the source collection's provenance; pass it as ``gene_sets=`` with the peak names as
        ``gene_names=`` to :func:`dgdlens.lens.annotate` (with ``use_aliases=False``: peaks have no aliases).
    """
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 1:
        raise ValueError(f"min_size must be a positive integer, got {min_size!r}.")
    if max_size is not None and (not isinstance(max_size, (int, np.integer)) or max_size < min_size):
        raise ValueError(f"max_size must be None or an integer >= min_size ({min_size}), got {max_size!r}.")
    source = resolve_gene_sets(gene_sets)
    links = _link_table(peak_to_gene)
    if peaks is not None:
        measured = {str(p) for p in peaks}
        links = links[links["peak"].isin(measured)]
    by_gene: dict[str, list[str]] = {}
    for peak, gene in zip(links["peak"].tolist(), links["gene"].tolist()):
        by_gene.setdefault(gene, []).append(peak)
    sets, descriptions = {}, {}
    for term, genes in source.items():
        members = [p for g in genes for p in by_gene.get(g, ())]
        members = list(dict.fromkeys(members))
        if len(members) < min_size or (max_size is not None and len(members) > max_size):
            continue
        n_linked = sum(1 for g in genes if g in by_gene)
        sets[term] = members
        descriptions[term] = f"{source.description(term)} (peaks of {n_linked} of its {len(genes)} genes)"
    meta = source.provenance()
    meta["name"] = f"{meta['name']} peaks" if meta["name"] else "peak sets"
    if meta["title"]:
        meta["title"] = f"{meta['title']}, as peaks linked to the genes"
    return GeneSets._trusted(sets, descriptions, **meta)


def parse_peak_names(peaks: Iterable[str]) -> pd.DataFrame:
    """Split peak names such as ``chr1:100-600`` (also ``chr1-100-600``, ``chr1_100_600``) into coordinates.

    Parameters
    ----------
    peaks
        Peak names.

    Returns
    -------
    pandas.DataFrame
        Indexed by peak name, columns ``chrom`` (str), ``start`` and ``end`` (int64). A name that does not
        parse, or whose end lies before its start, raises ``ValueError`` (listing a few examples).
    """
    names = [str(p) for p in peaks]
    rows, bad = [], []
    for name in names:
        m = _PEAK_RE.match(name.strip())
        if m is None or int(m["end"]) < int(m["start"]):
            bad.append(name)
            rows.append(("", 0, 0))
        else:
            rows.append((m["chrom"], int(m["start"]), int(m["end"])))
    if bad:
        raise ValueError(f"{len(bad)} peak name(s) are not 'chrom:start-end' with start <= end, e.g. {bad[:3]}.")
    out = pd.DataFrame(rows, columns=["chrom", "start", "end"], index=pd.Index(names, name="peak"))
    return out.astype({"start": np.int64, "end": np.int64})


def _gene_tss(genes: pd.DataFrame) -> pd.DataFrame:
    """``gene, chrom, tss`` from a table with ``tss``, or with ``start``, ``end`` and ``strand``."""
    if not isinstance(genes, pd.DataFrame):
        raise TypeError(f"genes must be a pandas DataFrame, got {type(genes).__name__}.")
    table = genes.copy()
    if "gene" not in table.columns:
        table = table.rename_axis("gene").reset_index()
    if "chrom" not in table.columns:
        raise ValueError(f"genes needs a 'chrom' column; got {list(genes.columns)}.")
    if "tss" not in table.columns:
        if not {"start", "end", "strand"} <= set(table.columns):
            raise ValueError("genes needs a 'tss' column, or 'start', 'end' and 'strand' (the TSS is the start on "
                             f"'+', the end on '-'); got {list(genes.columns)}.")
        strand = table["strand"].astype(str).str.strip()
        if not strand.isin(["+", "-"]).all():
            raise ValueError(f"genes['strand'] must be '+' or '-', got e.g. {sorted(set(strand) - {'+', '-'})[:3]}.")
        table["tss"] = np.where(strand == "-", table["end"], table["start"])
    out = pd.DataFrame({"gene": table["gene"].astype(str), "chrom": table["chrom"].astype(str),
                        "tss": pd.to_numeric(table["tss"], errors="raise").astype(np.int64)})
    return out


def nearest_gene_links(peaks, genes: pd.DataFrame, *, max_distance: int | None = None) -> pd.DataFrame:
    """Link every peak to the gene with the nearest transcription start site (TSS) on its chromosome.

    The distance of a TSS to a peak ``[start, end]`` is 0 when it lies inside the peak, else its distance to
    the nearer end. Ties go to the TSS with the smaller position (then to the gene listed first).

    Parameters
    ----------
    peaks
        Peak names ``chrN:start-end`` (see :func:`parse_peak_names`; e.g. ``mdata.mod["atac"].var_names``),
        or a DataFrame indexed by peak name with columns ``chrom``, ``start``, ``end``.
    genes
        One row per gene: column ``gene`` (or the index) with its name, ``chrom`` and ``tss``; or ``start``,
        ``end`` and ``strand`` instead of ``tss`` (the TSS is ``start`` on ``+``, ``end`` on ``-``, as in a
        GTF's gene records). Chromosome names must be spelled as in the peak names.
    max_distance
        Leave a peak unlinked when its nearest TSS is farther than this (bp); ``None``: no limit.

    Returns
    -------
    pandas.DataFrame
        One row per linked peak, in the order of ``peaks``: ``peak``, ``gene``, ``distance`` (bp, int64).
        Peaks on a chromosome without genes (or beyond ``max_distance``) have no row. Pass it to
        :func:`peak_sets` as ``peak_to_gene``.
    """
    if max_distance is not None and (isinstance(max_distance, bool) or max_distance < 0):
        raise ValueError(f"max_distance must be None or >= 0, got {max_distance!r}.")
    if isinstance(peaks, pd.DataFrame):
        missing = {"chrom", "start", "end"} - set(peaks.columns)
        if missing:
            raise ValueError(f"peaks as a DataFrame needs the columns chrom, start, end; missing {sorted(missing)}.")
        coords = pd.DataFrame({"chrom": peaks["chrom"].astype(str).to_numpy(),
                               "start": peaks["start"].to_numpy(np.int64), "end": peaks["end"].to_numpy(np.int64)},
                              index=pd.Index(peaks.index.astype(str), name="peak"))
    else:
        coords = parse_peak_names(peaks)
    tss = _gene_tss(genes)
    peak_out, gene_out, dist_out, order_out = [], [], [], []
    position = np.arange(len(coords))
    for chrom, where in coords.groupby("chrom", sort=False).indices.items():
        on = tss[tss["chrom"] == chrom]
        if on.empty:
            continue
        order = np.argsort(on["tss"].to_numpy(), kind="stable")
        t = on["tss"].to_numpy()[order]
        names = on["gene"].to_numpy()[order]
        start = coords["start"].to_numpy()[where]
        end = coords["end"].to_numpy()[where]
        i = np.searchsorted(t, start, side="left")        # first TSS >= start
        j = np.searchsorted(t, end, side="right")         # first TSS > end
        big = np.iinfo(np.int64).max
        inside = i < j                                    # t[i] lies within [start, end]
        left = np.where(i > 0, start - t[np.maximum(i - 1, 0)], big)   # nearest TSS before the peak
        right = np.where(j < len(t), t[np.minimum(j, len(t) - 1)] - end, big)  # nearest after it
        # before the peak, take the first of genes sharing that TSS position (listed first)
        first_left = np.searchsorted(t, t[np.maximum(i - 1, 0)], side="left")
        best = np.where(inside, i, np.where(left <= right, first_left, j))
        distance = np.where(inside, 0, np.minimum(left, right))
        keep = np.ones(len(where), bool) if max_distance is None else distance <= max_distance
        peak_out.append(coords.index.to_numpy()[where][keep])
        gene_out.append(names[best[keep]])
        dist_out.append(distance[keep])
        order_out.append(position[where][keep])
    if not peak_out:
        return pd.DataFrame({"peak": pd.Series(dtype=object), "gene": pd.Series(dtype=object),
                             "distance": pd.Series(dtype=np.int64)})
    order = np.argsort(np.concatenate(order_out), kind="stable")
    return pd.DataFrame({"peak": np.concatenate(peak_out)[order], "gene": np.concatenate(gene_out)[order],
                         "distance": np.concatenate(dist_out).astype(np.int64)[order]})
