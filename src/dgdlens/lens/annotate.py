"""Annotate every SAE feature with gene sets: groups -> differential expression -> enrichment.

For each feature (all at once, in chunks of features):

1. **groups** (:mod:`.groups`): high = the ``max(min_active_cells, ceil(1% of cells))`` most active cells
   (``percentile`` 99 sets the 1 %); low = cells where it is silent, a seeded random subsample of
   ``max_low_cells``; features active in fewer than ``min_active_cells`` cells are skipped (and listed
   with the reason);
2. **DE** (:mod:`.de`): Welch t on log-normalised expression (small-group variance guard on by
   default) or Wilcoxon; log2 fold change with a pseudocount; BH across genes; up and down genes are
   kept apart (``padj < de_alpha``, ``|log2fc| >= min_log2fc``, at most ``max_genes`` each). With
   integer counts the DE uses a binomial half of the counts by default (``count_split``; what this
   does and does not remove: :mod:`.splitting`);
3. **enrichment** (:mod:`.enrichment`): one-sided hypergeometric ORA of the up genes and of the down
   genes against every set (whole universe, or an expression-matched one with
   ``background="matched"``), BH within each feature (``padj``) and over every test of the call
   (``padj_global``). ``significant`` and the ``max_padj`` filter use ``padj_global`` (``fdr="global"``,
   the default): the FDR is controlled over all reported (feature, term, direction) rows;
4. **redundancy** (:mod:`.collapse`): significant rows of one feature and direction whose overlapping
   genes have Jaccard >= 0.5 are marked ``collapsed_into`` the most specific of them;
   :func:`dgdlens.lens.collapse_terms` gives the table with one row per group.

``compat="paper"`` swaps steps 2-3 for the reference scFeatureLens statistics (:mod:`.paper`).

This is the array-level function; :func:`dgdlens.tl.annotate_features` is the AnnData verb (reads
``obsm[use_rep]`` and ``layer``, writes ``uns[key_added]``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from .collapse import mark_redundant
from .de import iter_de_chunks, select_genes
from .enrichment import RESULT_COLUMNS, ORAAccumulator, index_gene_sets
from .expression import prepare_expression
from .groups import make_feature_groups
from .paper import PAPER_SETTINGS, PaperAccumulator
from .splitting import maybe_split as _maybe_split
from ..data.matrix import open_row_matrix
from .streaming import StreamedExpression, iter_streamed_de_chunks, use_stream

__all__ = ["annotate"]

_COMPAT = (None, "paper")


def annotate(
    activations, expression, gene_names=None, gene_sets="go_bp", *, features=None, compat: str | None = None,
    expression_kind: str = "auto", target_sum: float = 1e4, percentile: float = 99.0, low: str = "silent",
    max_low_cells: int | None = 2000, min_active_cells: int = 20, min_group_cells: int = 3,
    test: str = "t-test", variance_guard: str | None = "floor", pseudocount: float = 1.0,
    de_alpha: float = 0.05, min_log2fc: float = 0.25, max_genes: int | None = 500, min_set_size: int = 10,
    max_set_size: int | None = 500, max_padj: float | None = 0.05, use_aliases: bool = True, seed: int = 0,
    chunk_size: int | None = None, engine: str = "auto", progress: bool = False,
    return_features: bool = False, timings: dict | None = None, fdr: str = "global",
    count_split: bool | str = "auto", split_seed: int = 0, background: str = "all", n_bins: int = 10,
    collapse_jaccard: float | None = 0.5, groupby=None, stream: bool | str = "auto", chunk_cells: int = 4096,
    max_memory: float = 2.5e9):
    """Gene-set annotation of SAE features (see the module docstring for the method).

    Parameters
    ----------
    activations
        cells x features, dense or scipy sparse (``sae.encode(Z)``), or a torch tensor.
    expression
        cells x genes, same cells in the same order: raw counts, log-normalised values or a decoder's
        predicted means (detected from the values; set ``expression_kind`` to be explicit).
    gene_names
        One identifier per expression column (human symbols or Ensembl IDs for the bundled sets).
    gene_sets
        ``"go_bp"``, ``"go_mf"``, ``"go_cc"``, ``"hallmark"``, ``"reactome_wp_pid"``, a GMT path or a dict.
    features
        Feature (column) indices or boolean mask to analyse; default all.
    compat
        ``None`` (the defaults above) or ``"paper"``: the reference's groups, Welch test on raw values,
        DEG thresholds with fallbacks, two-sided binomial + Mann-Whitney (:mod:`dgdlens.lens.paper`);
        it overrides ``expression_kind, variance_guard, low, max_low_cells, min/max_set_size, test``.
    percentile, low, max_low_cells, min_active_cells, min_group_cells, seed
        Grouping, see :func:`dgdlens.lens.groups.make_feature_groups`.
    test, variance_guard, pseudocount, de_alpha, min_log2fc, max_genes
        DE and gene selection, see :mod:`dgdlens.lens.de`.
    min_set_size, max_set_size
        Sets are kept when this many of their genes are in the universe.
    max_padj
        The FDR level: report rows whose adjusted p (``padj_global`` with ``fdr="global"``) is at or below
        this; ``None`` reports every (feature, set, direction) whose overlap is at least 1 (can be millions
        of rows), with ``significant`` at 0.05.
    fdr
        ``"global"`` (default): BH over every (feature, direction, set) test decides ``significant`` and
        the filter; ``"per_feature"``: BH within each feature (``padj``), which does not control false
        rows across features.
    count_split, split_seed
        ``"auto"`` (default): for non-negative integer counts, run the DE on ``X_b = X - Binomial(X, 1/2)``
        (seeded by ``split_seed``), the activation groups unchanged; ``True`` requires counts, ``False``
        uses all counts. Removes double dipping only when the activations came from the other half
        ``X_a`` (see :mod:`dgdlens.lens.splitting` and :func:`dgdlens.lens.split_counts`).
    background, n_bins
        ``"all"`` (default) or ``"matched"``: each gene list is tested against a universe matched to it on
        ``n_bins`` bins of mean (log-normalised) expression; see :mod:`dgdlens.lens.enrichment`.
    groupby
        Optional per-cell labels, e.g. ``adata.obs["batch"]``: the active and silent groups are compared
        within each label and pooled (batch-matched silent cells; see ``groupby`` in
        :func:`dgdlens.lens.groups.make_feature_groups`), so a gene that differs between batches is not
        annotated as the feature's biology when the feature fires more in one batch. Use it for SAEs on a
        model trained with covariates too: its biological latent is batch-corrected, the counts are not.
    collapse_jaccard
        Mark significant rows whose overlap genes share at least this Jaccard index with a more specific
        row's (``collapsed_into``); ``None`` skips it.
    chunk_size, engine, progress
        Features per chunk (default: bounded memory), group-sum engine, progress bar.
    stream, chunk_cells, max_memory
        ``"auto"`` (default): expression that lives on disk (a path to an ``.h5ad`` / ``.zarr``, a backed
        AnnData's ``X``, an h5py dataset) is streamed in chunks of ``chunk_cells`` rows and never loaded
        whole; ``True`` streams in-memory data too; ``False`` loads backed data into memory. Streaming
        keeps the group statistics of as many features as ``max_memory`` bytes hold (``16 x features x
        genes`` bytes; 32 with ``max_low_cells=None``) and passes over the cells once per such block; the results equal the in-memory
        path's to float rounding (the t-test only; see :mod:`dgdlens.lens.streaming` for the memory bound
        and torchrun).
    return_features
        Also return the per-feature summary (status, group sizes, DEG counts, top term).
    timings
        A dict to receive wall-clock seconds per stage (``prepare``, ``groups``, ``gene_sets``, ``de``,
        ``enrichment``, ``table``) and CPU seconds under the same names with ``_cpu`` appended.

    Returns
    -------
    pandas.DataFrame or tuple of pandas.DataFrame
        DataFrame, one row per reported (feature, gene set, direction) with the columns
        ``feature, term, description, direction, overlap, set_size, n_selected, universe_size, expected,
        fold_enrichment, odds_ratio, pval, padj, padj_global, genes, significant, collapsed_into,
        n_collapsed, collapsed_terms`` (plus the reference's columns with ``compat="paper"``); ``.attrs``
        holds the gene-set provenance and the settings (``fdr``, ``count_split`` as applied). With
        ``return_features=True``: ``(results, features)``.
    """
    if compat not in _COMPAT:
        raise ValueError(f"compat must be None or 'paper', got {compat!r}.")
    settings = dict(
        expression_kind=expression_kind, variance_guard=variance_guard, low=low, max_low_cells=max_low_cells,
        min_set_size=min_set_size, max_set_size=max_set_size, test=test, high="top", count_split=count_split,
        background=background)
    if compat == "paper":
        settings.update(PAPER_SETTINGS)
    if max_padj is not None and not 0 < max_padj <= 1:
        raise ValueError(f"max_padj must be in (0, 1] or None, got {max_padj}.")
    if not 0 < de_alpha < 1:
        raise ValueError(f"de_alpha must be in (0, 1), got {de_alpha}.")
    if max_genes is not None and max_genes < 1:
        raise ValueError(f"max_genes must be a positive integer or None, got {max_genes}.")
    clock = _Clock(timings)

    streaming = use_stream(stream, expression)
    if streaming:
        prep = StreamedExpression(
            expression, gene_names, kind=settings["expression_kind"], target_sum=target_sum,
            count_split=settings["count_split"], split_seed=split_seed, chunk_cells=chunk_cells, progress=progress)
        split_applied = None  # known after the first pass (prep.split_applied)
    else:
        prep, split_applied = _prepare_in_memory(expression, gene_names, settings, target_sum, split_seed)
    clock.lap("prepare")
    groups = make_feature_groups(
        activations, features=features, percentile=percentile, low=settings["low"],
        max_low_cells=settings["max_low_cells"], min_active_cells=min_active_cells,
        min_group_cells=min_group_cells, seed=seed, high=settings["high"], groupby=groupby)
    if groups.n_cells != prep.n_cells:
        raise ValueError(
            f"activations have {groups.n_cells} cells (rows) but expression has {prep.n_cells}; "
            "they must describe the same cells in the same order."
        )
    clock.lap("groups")
    de_kwargs = dict(test=settings["test"], variance_guard=settings["variance_guard"], pseudocount=pseudocount,
                     chunk_size=chunk_size, engine=engine, progress=progress)
    chunks = (iter_streamed_de_chunks(prep, groups, max_memory=max_memory, **de_kwargs) if streaming
              else iter_de_chunks(prep, groups, desc="features", **de_kwargs))
    # the first chunk comes before the gene sets: a stream learns which genes are expressed on its first pass
    first_chunk = next(chunks, None)
    clock.lap("de")
    index = index_gene_sets(
        prep.gene_names, gene_sets, tested=prep.expressed_genes(), min_size=settings["min_set_size"],
        max_size=settings["max_set_size"], use_aliases=use_aliases)
    if compat == "paper":
        acc = PaperAccumulator(index, keep_all=max_padj is None)
    else:
        gene_means = None
        if settings["background"] == "matched":
            gene_means = prep.gene_means() if streaming else _gene_means(prep)
        acc = ORAAccumulator(index, store_pvalue=1.0 if max_padj is None else max(max_padj, 0.05), fdr=fdr,
                             background=settings["background"], gene_means=gene_means, n_bins=n_bins, seed=seed)
    clock.lap("gene_sets")

    counts = []
    while True:
        chunk, first_chunk = (first_chunk, None) if first_chunk is not None else (next(chunks, None), None)
        clock.lap("de")
        if chunk is None:
            break
        feats = groups.features[chunk.rows]
        if compat == "paper":
            k = acc.add_paper(chunk, feats)
            counts.append(
                pd.DataFrame({"feature": feats, "n_genes_tested": chunk.tested.sum(axis=1), "n_selected": k})
            )
        else:
            up, down, c = select_genes(chunk, de_alpha=de_alpha, min_log2fc=min_log2fc, max_genes=max_genes)
            c["feature"] = feats
            c["n_up_in_universe"] = acc.add(up, feats, "up")
            c["n_down_in_universe"] = acc.add(down, feats, "down")
            counts.append(c)
        clock.lap("enrichment")

    if compat == "paper":
        acc.fdr = fdr
    results = acc.table(max_padj=max_padj)
    results = results[
        [c for c in RESULT_COLUMNS if c in results] + [c for c in results if c not in RESULT_COLUMNS]
    ]
    if collapse_jaccard is not None:
        results = mark_redundant(results, min_jaccard=collapse_jaccard)
    results.attrs["gene_sets"] = dict(index.provenance)
    results.attrs["settings"] = _jsonable_settings(
        dict(
            compat=compat, percentile=percentile, min_active_cells=min_active_cells,
            min_group_cells=min_group_cells, pseudocount=pseudocount, de_alpha=de_alpha,
            min_log2fc=min_log2fc, max_genes=max_genes, max_padj=max_padj, seed=seed,
            expression_kind_detected=prep.kind, universe_size=index.universe_size, n_sets=index.n_sets,
            n_tests=acc.n_tests_total, fdr=fdr, split_seed=split_seed,
            count_split_applied=prep.split_applied if streaming else split_applied,  # a stream may re-decide
            streamed=streaming,
            n_bins=n_bins, collapse_jaccard=collapse_jaccard, **settings)
    )
    clock.lap("table")
    if not return_features:
        return results
    return results, _feature_summary(groups.summary, counts, results)


def _feature_summary(
    summary: pd.DataFrame, counts: list[pd.DataFrame], results: pd.DataFrame
) -> pd.DataFrame:
    out = summary.copy()
    if counts:
        out = out.merge(pd.concat(counts, ignore_index=True), on="feature", how="left")
        # skipped features were never tested: zero counts (integers, so the table stays h5ad-writable)
        for col in out.columns.drop(summary.columns):
            out[col] = out[col].fillna(0).astype(np.int64)
    best = (
        results.sort_values(["feature", "pval"], kind="stable")
        .drop_duplicates("feature")
        .set_index("feature")
    )
    sig = results[results["significant"].to_numpy(dtype=bool)] if "significant" in results else results
    n_terms = sig.groupby("feature").size()
    out["n_terms"] = out["feature"].map(n_terms).fillna(0).astype(np.int64)
    if "collapsed_into" in sig:
        kept = sig[sig["collapsed_into"].astype(str) == ""].groupby("feature").size()
        out["n_terms_collapsed"] = out["feature"].map(kept).fillna(0).astype(np.int64)
    for col, src in (
        ("top_term", "term"), ("top_description", "description"), ("top_direction", "direction")):
        out[col] = out["feature"].map(best[src]).fillna("").astype(object) if len(best) else ""
    out["top_padj"] = out["feature"].map(best["padj"]).astype(np.float64) if len(best) else np.nan
    if "padj_global" in best:
        out["top_padj_global"] = out["feature"].map(best["padj_global"]).astype(np.float64) if len(best) else np.nan
    return out


def _gene_means(prep) -> np.ndarray:
    """Mean of the prepared (log-normalised) expression per gene, the binning variable of the matched
    background (summed in float64, as the streaming path sums it)."""
    return np.asarray(prep.X.sum(axis=0, dtype=np.float64)).ravel() / prep.n_cells


def _prepare_in_memory(expression, gene_names, settings: dict, target_sum: float, split_seed: int):
    """(PreparedExpression, whether the count split was applied) for data in memory (or loaded whole)."""
    if hasattr(expression, "kind") and hasattr(expression, "scale"):
        return expression, False
    if isinstance(expression, (str, Path)) or getattr(expression, "isbacked", False):
        matrix, file_names = open_row_matrix(expression)
        expression, gene_names = matrix._slice(0, matrix.n_obs), file_names if gene_names is None else gene_names
    expression, split_applied = _maybe_split(expression, settings["count_split"], split_seed)
    return prepare_expression(expression, gene_names, kind=settings["expression_kind"],
                              target_sum=target_sum), split_applied


def _jsonable_settings(settings: dict) -> dict:
    # AnnData cannot store None in uns, and the settings end up there
    return {k: ("None" if v is None else v) for k, v in settings.items()}


class _Clock:
    """Accumulates wall-clock seconds per stage into ``sink[stage]`` and CPU seconds (all threads of this
    process) into ``sink[stage + "_cpu"]``; on a shared machine the CPU time is the steadier number."""

    def __init__(self, sink: dict | None):
        self.sink = sink
        self.t = time.perf_counter()
        self.c = time.process_time()

    def lap(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        if self.sink is not None:
            self.sink[name] = self.sink.get(name, 0.0) + now - self.t
            self.sink[name + "_cpu"] = self.sink.get(name + "_cpu", 0.0) + cpu - self.c
        self.t, self.c = now, cpu
