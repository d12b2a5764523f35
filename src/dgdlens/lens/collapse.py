"""Collapse redundant gene-set rows: one feature should not fill ten rows with the same MHC-II genes.

Within each (feature, direction), the significant rows are visited from the most specific term (fewest
set genes in the universe) to the least, ties by p-value. A row whose overlapping genes have a Jaccard
index of at least ``min_jaccard`` (default 0.5) with those of an already kept row is *collapsed into* that
row: nested GO terms (a parent that adds few genes to its child) and near-duplicate terms end up under the
most specific one. The comparison uses the genes that drove each test (the ``genes`` column), not the
whole sets, so it needs no GO graph.

:func:`mark_redundant` adds the columns ``collapsed_into`` ("" for a kept row), ``n_collapsed`` and
``collapsed_terms`` to the full table; :func:`collapse_terms` returns only the kept rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["mark_redundant", "collapse_terms"]


def mark_redundant(results: pd.DataFrame, *, min_jaccard: float = 0.5, significant_only: bool = True,
                   group_by=("feature", "direction")) -> pd.DataFrame:
    """A copy of ``results`` with ``collapsed_into``, ``n_collapsed`` and ``collapsed_terms`` (see module).

    Rows that are not significant (column ``significant``, when ``significant_only``) are never
    representatives and are not collapsed (``collapsed_into`` stays "").

    Parameters
    ----------
    results
        An enrichment table with one row per (feature, direction, term), e.g. from
        :func:`dgdlens.lens.annotate` or :func:`dgdlens.lens.enrich`. Used columns: ``term``, ``genes``
        (comma-separated overlapping genes that drove the test), and when present ``set_size`` and
        ``pval`` (the visiting order: fewest set genes first, ties by smaller p-value), ``significant``
        and the ``group_by`` columns. Without ``term`` or ``genes`` every row is kept.
    min_jaccard
        A row is collapsed into an already kept row of its group when the Jaccard index of their
        ``genes`` is at least this, in (0, 1]. 0.5 (default) merges terms sharing at least half of
        their combined overlapping genes; 1 merges only identical gene lists.
    significant_only
        Consider only rows whose ``significant`` column is true (default). With ``False``, or when the
        column is missing, every row takes part.
    group_by
        Columns within whose combinations rows are compared (default: per feature and direction);
        columns not in ``results`` are ignored, and with none left the whole table is one group.

    Returns
    -------
    pandas.DataFrame
        A copy of ``results`` (same rows, order and index) with three columns added (or overwritten):
        ``collapsed_into`` (the representative's term for a collapsed row, "" otherwise),
        ``n_collapsed`` (``int64``, how many rows were collapsed into this one) and ``collapsed_terms``
        (their terms, comma-separated).
    """
    if not 0 < min_jaccard <= 1:
        raise ValueError(f"min_jaccard must be in (0, 1], got {min_jaccard}.")
    out = results.copy()
    n = len(out)
    into = np.full(n, "", dtype=object)
    n_coll = np.zeros(n, dtype=np.int64)
    coll_terms = np.full(n, "", dtype=object)
    if n == 0 or "genes" not in out or "term" not in out:
        out["collapsed_into"], out["n_collapsed"], out["collapsed_terms"] = into, n_coll, coll_terms
        return out
    sig = out["significant"].to_numpy(dtype=bool) if (significant_only and "significant" in out) else np.ones(n, bool)
    keys = [c for c in group_by if c in out.columns]
    size = out["set_size"].to_numpy() if "set_size" in out else np.zeros(n)
    pval = out["pval"].to_numpy() if "pval" in out else np.zeros(n)
    terms = out["term"].astype(str).to_numpy()
    genes = out["genes"].fillna("").astype(str).to_numpy()
    pos = np.flatnonzero(sig)
    if len(pos):
        groups = out.iloc[pos].groupby(keys, sort=False).indices if keys else {None: np.arange(len(pos))}
        for idx in groups.values():
            rows = pos[np.asarray(idx)]
            rows = rows[np.lexsort((pval[rows], size[rows]))]
            kept: list[tuple[int, set]] = []
            for r in rows:
                g = set(filter(None, genes[r].split(",")))
                home = None
                for k, gk in kept:
                    union = len(g | gk)
                    if union and len(g & gk) / union >= min_jaccard:
                        home = k
                        break
                if home is None:
                    kept.append((r, g))
                else:
                    into[r] = terms[home]
                    n_coll[home] += 1
                    coll_terms[home] = terms[r] if not coll_terms[home] else coll_terms[home] + "," + terms[r]
    out["collapsed_into"], out["n_collapsed"], out["collapsed_terms"] = into, n_coll, coll_terms
    return out


def collapse_terms(results: pd.DataFrame, *, min_jaccard: float = 0.5, significant_only: bool = True) -> pd.DataFrame:
    """Only the kept (non-redundant) rows of ``results``, significant ones when ``significant_only``
    (see the module docstring); ``results`` without ``collapsed_into`` is marked first.

    Parameters
    ----------
    results
        An enrichment table (see :func:`mark_redundant`), marked or not. When it already has a
        ``collapsed_into`` column those marks are used as they are and ``min_jaccard`` has no effect.
    min_jaccard
        Jaccard threshold on the overlapping genes for marking (see :func:`mark_redundant`); default 0.5.
    significant_only
        Mark among significant rows only and return only significant kept rows (default). Ignored when
        ``results`` has no ``significant`` column.

    Returns
    -------
    pandas.DataFrame
        The representative rows with all columns of the marked table (including ``n_collapsed`` and
        ``collapsed_terms``, which list what each row stands for), in the original order, with a fresh
        ``RangeIndex``.
    """
    marked = results if "collapsed_into" in results else mark_redundant(
        results, min_jaccard=min_jaccard, significant_only=significant_only)
    keep = marked["collapsed_into"].astype(str).to_numpy() == ""
    if significant_only and "significant" in marked:
        keep &= marked["significant"].to_numpy(dtype=bool)
    return marked[keep].reset_index(drop=True)
