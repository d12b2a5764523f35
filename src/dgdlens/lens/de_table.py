"""The full differential-expression table (every gene, every p-value) for a few features, in memory or
streamed from disk; :func:`dgdlens.lens.annotate` uses the same groups and statistics (:mod:`.de`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..stats import bh_adjust
from .de import _check_rows, iter_de_chunks
from .expression import PreparedExpression, prepare_expression
from .groups import make_feature_groups
from .splitting import maybe_split
from .streaming import StreamedExpression, iter_streamed_de_chunks, use_stream

__all__ = ["differential_expression"]


def differential_expression(
    activations,
    expression,
    features,
    *,
    gene_names=None,
    expression_kind: str = "auto",
    target_sum: float = 1e4,
    percentile: float = 99.0,
    low: str = "silent",
    max_low_cells: int | None = 2000,
    min_active_cells: int = 20,
    min_group_cells: int = 3,
    test: str = "t-test",
    variance_guard: str | None = "floor",
    pseudocount: float = 1.0,
    de_alpha: float = 0.05,
    min_log2fc: float = 0.25,
    seed: int = 0,
    engine: str = "auto",
    count_split: bool | str = "auto",
    split_seed: int = 0,
    high: str = "top",
    stream: bool | str = "auto",
    chunk_cells: int = 4096,
) -> pd.DataFrame:
    """Full per-gene DE table (high vs low group) for a few features.

    Uses the same groups and statistics as :func:`dgdlens.lens.annotate` (see :mod:`dgdlens.lens.de`),
    but evaluates every p-value and the exact BH adjustment.

    Parameters
    ----------
    activations
        cells x features (dense, sparse, torch, or on disk as in :func:`~dgdlens.lens.annotate`).
    expression
        cells x genes: counts, log-normalised values or decoder means, in memory or on disk (a path, a
        backed AnnData's ``X``), or an already prepared :class:`~dgdlens.lens.expression.PreparedExpression`.
    features
        The feature (column) indices to test; each must pass the group-size checks.
    gene_names
        One per expression column (taken from the file for a path).
    expression_kind, target_sum
        As in :func:`~dgdlens.lens.prepare_expression`.
    percentile, low, max_low_cells, min_active_cells, min_group_cells, seed, high
        Grouping, as in :func:`~dgdlens.lens.groups.make_feature_groups`.
    test, variance_guard, pseudocount
        DE test, small-group variance guard and the log2 fold change's pseudocount (:mod:`~dgdlens.lens.de`).
    de_alpha, min_log2fc
        A gene's ``direction`` is set when ``padj < de_alpha`` and ``|log2fc| >= min_log2fc``.
    engine
        Group-sum engine: ``"auto"``, ``"numba"`` or ``"scipy"``.
    count_split, split_seed
        As in :func:`~dgdlens.lens.annotate` (integer counts: the DE uses the same binomial half).
    stream, chunk_cells
        As in :func:`~dgdlens.lens.annotate`: expression on disk is streamed (t-test only).

    Returns
    -------
    pandas.DataFrame
        DataFrame with one row per (feature, gene): ``feature, gene, mean_high, mean_low, log2fc, statistic,
        df, pval, padj, direction`` (``"up"``/``"down"`` for selected genes, else ``""``), ``n_high, n_low``.
    """
    streaming = use_stream(stream, expression)
    if streaming:
        prep = expression if isinstance(expression, StreamedExpression) else StreamedExpression(
            expression, gene_names, kind=expression_kind, target_sum=target_sum, count_split=count_split,
            split_seed=split_seed, chunk_cells=chunk_cells)
    else:
        if not isinstance(expression, PreparedExpression):
            expression, _ = maybe_split(expression, count_split, split_seed)
        prep = expression if isinstance(expression, PreparedExpression) else prepare_expression(
            expression, gene_names, kind=expression_kind, target_sum=target_sum)
    features = np.atleast_1d(np.asarray(features))
    groups = make_feature_groups(
        activations, features=features, percentile=percentile, low=low, max_low_cells=max_low_cells,
        min_active_cells=min_active_cells, min_group_cells=min_group_cells, seed=seed, high=high)
    _check_rows(groups, prep)
    skipped = groups.summary[groups.summary["status"] != "ok"]
    if len(skipped):
        raise ValueError(
            "Some features cannot be tested: "
            + ", ".join(f"{f} ({s})" for f, s in zip(skipped["feature"], skipped["status"], strict=True))
            + ". Lower min_active_cells / min_group_cells or choose other features."
        )
    frames = []
    de_chunks = iter_streamed_de_chunks if streaming else iter_de_chunks
    for chunk in de_chunks(prep, groups, test=test, variance_guard=variance_guard, pseudocount=pseudocount,
                           engine=engine, full_pvalues=True):
        log2fc = chunk.log2fc
        for i, row in enumerate(chunk.rows):
            p = chunk.pvals[i]
            tested = chunk.tested[i]
            padj = np.ones_like(p)
            if tested.any():
                padj[tested] = bh_adjust(p[tested])
            direction = np.full(len(p), "", dtype=object)
            sig = tested & (padj < de_alpha)
            direction[sig & (chunk.statistic[i] > 0) & (log2fc[i] >= min_log2fc)] = "up"
            direction[sig & (chunk.statistic[i] < 0) & (log2fc[i] <= -min_log2fc)] = "down"
            frames.append(pd.DataFrame({
                "feature": groups.features[row], "gene": prep.gene_names,
                "mean_high": chunk.mean_high[i], "mean_low": chunk.mean_low[i], "log2fc": log2fc[i],
                "statistic": chunk.statistic[i], "df": chunk.df[i] if chunk.df is not None else np.nan,
                "pval": p, "padj": padj, "tested": tested, "direction": direction,
                "n_high": chunk.n_high[i], "n_low": chunk.n_low[i],
            }))
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values(["feature", "pval", "statistic"], ascending=[True, True, False], ignore_index=True)


