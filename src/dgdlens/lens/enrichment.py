"""Over-representation analysis (ORA) of many gene selections against many gene sets at once.

For a selection of ``k`` genes inside a universe of ``N`` genes and a set with ``n`` universe genes, of
which ``K`` were selected, the p-value is the one-sided hypergeometric tail ``P(X >= K)``,
``X ~ Hypergeom(N, n, k)`` (Fisher's exact test, alternative "greater").

All selections x all sets are handled together:

1. the sets become a sparse (sets x genes) membership matrix over the universe, built once;
2. the overlaps ``K`` of every selection with every set are one sparse product (selections x sets);
3. each distinct ``(K, n, k)`` triple is evaluated once (:func:`~dgdlens.stats.hypergeom_logsf`),
   because thousands of (selection, set) pairs share their counts.

**Universe.** (genes tested) ∩ (genes annotated anywhere in the collection); old symbols and Ensembl IDs
are rescued through the bundled alias tables. Set sizes are counted inside the universe and the size
filter (``min_size``/``max_size``) is applied after that restriction.

**Multiple testing.** A selection with at least one universe gene is tested against every set that
passed the size filter; sets it does not touch have p = 1 and enter BH only through the number of
tests. ``padj`` is BH within each *feature* (its up and down selections together); ``padj_global`` is
BH over every (feature, direction, set) test of the whole call. ``significant`` and the table filter use
``padj_global`` by default (``fdr="global"``): that controls the false discovery rate over all reported
rows. ``fdr="per_feature"`` filters on ``padj`` instead, which controls it only within each feature, so
across thousands of features the expected number of false rows grows with the number of features.
Only p-values up to ``store_pvalue`` are kept while streaming; adjusted values at or below it are exact
(BH values of larger p-values can only be larger).

**Expression-matched background** (``background="matched"``, needs one mean expression per gene).
Genes that are highly expressed are both easier to call differentially expressed and over-represented
in some sets (ribosome, translation, MHC-II), so the whole-universe test can call such sets enriched
for any feature. With ``"matched"`` each selection is tested against its own universe: the universe
genes are cut into ``n_bins`` (10) equal-count bins of mean expression, and from each bin the universe
keeps the selected genes plus the first non-selected genes in a seeded random order, as many as make
every bin's share of the universe equal to its share of the selection (the bin that limits this keeps
all its genes). ``set_size`` and ``universe_size`` are then counted in that matched universe. Under a
null in which genes are selected at random *within* expression bins this hypergeometric test is valid;
the price is a smaller universe (less power).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..stats import bh_adjust_grouped, hypergeom_logsf
from .genesets import GeneMapping, GeneSets, map_gene_names, resolve_gene_sets

__all__ = [
    "GeneSetIndex", "index_gene_sets", "hypergeom_pvalues", "ORAAccumulator", "enrich", "RESULT_COLUMNS"]

_INTERNAL_COLUMNS = {
    "feature", "set", "overlap", "n_selected", "logp", "direction", "selection_row", "selection_id"}

RESULT_COLUMNS = [
    "feature", "term", "description", "direction", "overlap", "set_size", "n_selected", "universe_size",
    "expected", "fold_enrichment", "odds_ratio", "pval", "padj", "padj_global", "genes"]

FDR_SCOPES = ("global", "per_feature")
BACKGROUNDS = ("all", "matched")


@dataclass
class GeneSetIndex:
    """Gene sets aligned to the columns of an expression matrix.

    Attributes
    ----------
    gene_names
        The tested genes, in expression-column order.
    membership
        CSR (sets x genes, int32 0/1): gene g is a universe gene in set s.
    universe
        Boolean mask over ``gene_names``: the gene is in the universe.
    terms, descriptions, set_sizes
        Per kept set (sizes counted inside the universe).
    mapping
        How each tested gene was matched to the collection (see :func:`~dgdlens.lens.map_gene_names`).
    provenance
        Name, release, licence and citation of the collection.
    """

    gene_names: np.ndarray
    membership: sp.csr_matrix
    universe: np.ndarray
    terms: np.ndarray
    descriptions: np.ndarray
    set_sizes: np.ndarray
    mapping: GeneMapping
    provenance: dict = field(default_factory=dict)

    @property
    def universe_size(self) -> int:
        """Number of universe genes (``N`` of the hypergeometric test): tested genes found in the collection."""
        return int(self.universe.sum())

    @property
    def n_sets(self) -> int:
        """Number of sets kept after the size filter (rows of ``membership``)."""
        return len(self.terms)


def index_gene_sets(
    gene_names: Sequence[str], gene_sets="go_bp", *, tested=None, min_size: int = 10,
    max_size: int | None = 500, use_aliases: bool = True) -> GeneSetIndex:
    """Align a gene-set collection to the tested genes (see the module docstring for the universe).

    Parameters
    ----------
    gene_names
        Identifiers of the tested genes (symbols or Ensembl IDs), one per expression column.
    gene_sets
        Collection name (``"go_bp"``...), path to a GMT file, or ``{term: [genes]}``.
    tested
        Optional boolean mask of genes that could be selected at all (e.g. genes expressed in some
        cell); other genes stay out of the universe.
    min_size, max_size
        Keep sets with this many universe genes.
    use_aliases
        Rescue outdated symbols and Ensembl IDs through the bundled human tables.

    Returns
    -------
    GeneSetIndex
        ``membership`` is a (kept sets x ``len(gene_names)``) CSR 0/1 matrix whose columns follow
        ``gene_names``; ``universe`` marks the tested genes that are in the collection (and in ``tested``);
        ``terms``, ``descriptions`` and ``set_sizes`` (universe genes per set, between ``min_size`` and
        ``max_size``) describe its rows. Raises ``ValueError`` when no gene is in the collection or no
        set passes the size filter.
    """
    sets = resolve_gene_sets(gene_sets)
    gene_names = np.asarray([str(g) for g in gene_names], dtype=object)
    if min_size < 1:
        raise ValueError(f"min_size must be at least 1, got {min_size}.")
    if max_size is not None and max_size < min_size:
        raise ValueError(f"max_size ({max_size}) is smaller than min_size ({min_size}).")
    mapping = map_gene_names(gene_names, sets.genes(), use_aliases=use_aliases)
    universe = mapping.mask
    if tested is not None:
        tested = np.asarray(tested, dtype=bool)
        if tested.shape != universe.shape:
            raise ValueError(f"tested has {tested.shape[0]} entries for {len(gene_names)} genes.")
        universe = universe & tested
    if not universe.any():
        raise ValueError(
            f"None of the {len(gene_names)} genes (e.g. {list(gene_names[:3])}) is in the gene-set collection "
            f"{sets.name or 'given'!r}. Gene identifiers must be human symbols or Ensembl IDs for the bundled "
            "collections; pass your own sets as a dict or GMT file for other species or identifiers."
        )
    # all (set, gene) memberships as flat arrays, genes looked up among the universe symbols at once
    universe_cols = np.flatnonzero(universe)
    symbols = pd.Index([mapping.symbols[i] for i in universe_cols])
    all_terms = list(sets.keys())
    lengths = np.fromiter((len(g) for g in sets.values()), dtype=np.int64, count=len(all_terms))
    flat = np.fromiter(itertools.chain.from_iterable(sets.values()), dtype=object, count=int(lengths.sum()))
    set_of = np.repeat(np.arange(len(all_terms)), lengths)
    pos = symbols.get_indexer(flat)
    inside = pos >= 0
    sizes = np.bincount(set_of[inside], minlength=len(all_terms))
    keep_set = sizes >= min_size
    if max_size is not None:
        keep_set &= sizes <= max_size
    if not keep_set.any():
        raise ValueError(
            f"No gene set has between {min_size} and {max_size} genes among the {int(universe.sum())} universe genes; "
            "lower min_size / raise max_size, or check the gene identifiers."
        )
    new_id = np.cumsum(keep_set) - 1
    take = inside & keep_set[set_of]
    r, c = new_id[set_of[take]], universe_cols[pos[take]]
    kept = [all_terms[i] for i in np.flatnonzero(keep_set)]
    membership = sp.csr_matrix((np.ones(len(r), dtype=np.int32), (r, c)), shape=(len(kept), len(gene_names)))
    membership.sort_indices()
    terms = np.asarray(kept, dtype=object)
    return GeneSetIndex(
        gene_names=gene_names, membership=membership, universe=universe, terms=terms,
        descriptions=np.asarray([sets.description(t) for t in kept], dtype=object),
        set_sizes=np.diff(membership.indptr).astype(np.int64), mapping=mapping,
        provenance=sets.provenance() if isinstance(sets, GeneSets) else {})


def hypergeom_pvalues(K, n, k, N: int) -> np.ndarray:
    """``P(X >= K)`` for ``X ~ Hypergeom(N, n, k)``, elementwise (``N`` shared); equals
    ``scipy.stats.hypergeom.sf(K - 1, N, n, k)``.

    The (K, n, k) triples are packed into one integer key so that the distinct ones are found by a
    1-D sort, which stays fast for tens of millions of overlaps.

    Parameters
    ----------
    K
        Overlaps: selected genes that are in the set (integer array-like or scalar).
    n
        Set sizes counted in the universe (same length as ``K``, or a scalar).
    k
        Selection sizes: selected universe genes (same length as ``K``, or a scalar).
    N
        Universe size, shared by all tests. Every value must satisfy ``0 <= K <= N``, ``0 <= n <= N`` and
        ``0 <= k <= N`` (a ``ValueError`` says which does not); ``K`` above ``min(n, k)`` gives 0.

    Returns
    -------
    numpy.ndarray
        1-D ``float64`` p-values, one per (K, n, k) triple; the inputs are flattened, so a 2-D input comes
        back raveled (C order). Empty input gives an empty array.
    """
    _check_hypergeom_args(K, n, k, N)
    return np.exp(_hypergeom_logp(K, n, k, N))


def _check_hypergeom_args(K, n, k, N) -> None:
    # the fast path packs (K, n, k) into one integer key; a value outside [0, N] would silently alias
    # another triple, so out-of-range input is an error here rather than a wrong p-value
    if int(N) != N or N < 0:
        raise ValueError(f"N (the universe size) must be a non-negative integer, got {N!r}.")
    for name, values in (("K (overlap)", K), ("n (set size)", n), ("k (selection size)", k)):
        arr = np.asarray(values)
        if arr.size == 0:
            continue
        if not np.issubdtype(arr.dtype, np.integer) and not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold integers.")
        if arr.min() < 0 or arr.max() > N:
            raise ValueError(f"{name} must lie in [0, N={int(N)}], got values in [{arr.min()}, {arr.max()}]; "
                             "count sets and selections within the universe.")


def _hypergeom_logp(K, n, k, N: int) -> np.ndarray:
    K, n, k = (np.asarray(a, dtype=np.int64).ravel() for a in (K, n, k))
    if K.size == 0:
        return np.zeros(0)
    base = int(N) + 1
    if base**3 >= 2**63:
        return hypergeom_logsf(K, N, n, k)
    key = (K * base + n) * base + k
    uniq, inverse = np.unique(key, return_inverse=True)
    uk, rest = np.divmod(uniq, base * base)
    un, ukk = np.divmod(rest, base)
    return hypergeom_logsf(uk, np.full(len(uniq), N), un, ukk)[inverse]


def _expression_bins(means: np.ndarray, n_bins: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Equal-count bins of ``means`` (ranks, ties by position) and a seeded random order of the genes."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}.")
    rank = np.empty(len(means), dtype=np.int64)
    rank[np.argsort(means, kind="stable")] = np.arange(len(means))
    bins = (rank * n_bins) // max(len(means), 1)
    order = np.random.default_rng(seed).permutation(len(means))
    return bins.astype(np.int64), order


def _matched_universe(S: sp.csr_matrix, bins: np.ndarray, order: np.ndarray) -> sp.csr_matrix:
    """Per selection row (over universe columns), its expression-matched universe (see the module)."""
    n_bins = int(bins.max()) + 1 if len(bins) else 1
    bin_size = np.bincount(bins, minlength=n_bins)
    ordered_bins = bins[order]
    by_bin = [order[ordered_bins == b] for b in range(n_bins)]  # each bin's genes in the random order
    rows, cols = [], []
    for r in range(S.shape[0]):
        chosen = S.indices[S.indptr[r]:S.indptr[r + 1]]
        if len(chosen) == 0:
            continue
        s_b = np.bincount(bins[chosen], minlength=n_bins)
        has = s_b > 0
        c = np.min(bin_size[has] / s_b[has])
        target = np.minimum(bin_size, np.floor(c * s_b + 1e-9).astype(np.int64))
        picked = [chosen]
        is_chosen = np.zeros(len(bins), dtype=bool)
        is_chosen[chosen] = True
        for b in np.flatnonzero(has):
            extra = target[b] - s_b[b]
            if extra > 0:
                cand = by_bin[b][~is_chosen[by_bin[b]]]
                picked.append(cand[:extra])
        cols_r = np.concatenate(picked)
        rows.append(np.full(len(cols_r), r))
        cols.append(cols_r)
    if not rows:
        return sp.csr_matrix(S.shape, dtype=np.int32)
    r, c = np.concatenate(rows), np.concatenate(cols)
    U = sp.csr_matrix((np.ones(len(r), dtype=np.int32), (r, c)), shape=S.shape)
    U.sort_indices()
    return U


class ORAAccumulator:
    """Runs ORA for selections arriving chunk by chunk, keeps the small p-values, and builds the table.

    Parameters
    ----------
    index
        The aligned gene sets.
    store_pvalue
        p-values above this are not kept (their adjusted values cannot fall below it); 1 keeps all.
    fdr
        ``"global"`` (``significant`` and the table filter use ``padj_global``) or ``"per_feature"``
        (``padj``), see the module docstring.
    background, gene_means, n_bins, seed
        ``"all"`` (the universe) or ``"matched"`` (per-selection expression-matched universe built from
        ``gene_means``, one per gene of ``index.gene_names``; ``n_bins`` bins, ``seed`` for the order).
    """

    def __init__(self, index: GeneSetIndex, store_pvalue: float = 0.05, *, fdr: str = "global",
                 background: str = "all", gene_means=None, n_bins: int = 10, seed: int = 0):
        if not 0 < store_pvalue <= 1:
            raise ValueError(f"store_pvalue must be in (0, 1], got {store_pvalue}.")
        if fdr not in FDR_SCOPES:
            raise ValueError(f"fdr must be one of {FDR_SCOPES}, got {fdr!r}.")
        if background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}.")
        self.index = index
        self.store_pvalue = float(store_pvalue)
        self.fdr = fdr
        self.background = background
        self.universe_cols = np.flatnonzero(index.universe)
        self._bins = None
        if background == "matched":
            if gene_means is None:
                raise ValueError("background='matched' needs gene_means (one mean expression per gene).")
            gene_means = np.asarray(gene_means, dtype=np.float64).ravel()
            if len(gene_means) != len(index.gene_names):
                raise ValueError(f"gene_means has {len(gene_means)} values for {len(index.gene_names)} genes.")
            self._bins, self._bin_order = _expression_bins(gene_means[self.universe_cols], n_bins, seed)
        # membership restricted to universe columns, transposed for selections @ sets
        self._M_T = index.membership[:, self.universe_cols].T.tocsr()
        self._parts: list[dict[str, np.ndarray]] = []
        self._n_tests: dict[int, int] = {}  # feature -> number of (direction, set) tests
        self.extra_columns: tuple[str, ...] = ()  # columns subclasses add (present even in empty tables)

    def add(self, selection: sp.csr_matrix, features: np.ndarray, direction: str) -> np.ndarray:
        """Test each row of ``selection`` (rows x all genes, 0/1) as the gene list of ``features[row]``.

        Returns the number of selected universe genes per row.
        """
        S = sp.csr_matrix(selection)[:, self.universe_cols]
        S.data = np.ones(len(S.data), dtype=np.int32)
        k = np.diff(S.indptr).astype(np.int64)
        features = np.asarray(features, dtype=np.int64)
        for f in features[k > 0]:
            self._n_tests[int(f)] = self._n_tests.get(int(f), 0) + self.index.n_sets
        if not np.any(k > 0):
            return k
        overlaps = (S @ self._M_T).tocoo()
        row, col, K = overlaps.row, overlaps.col, overlaps.data.astype(np.int64)
        kk = k[row]
        if self._bins is None:
            n = self.index.set_sizes[col]
            N = np.full(len(row), len(self.universe_cols), dtype=np.int64)
        else:
            U = _matched_universe(S, self._bins, self._bin_order)
            N = np.diff(U.indptr).astype(np.int64)[row]
            n = np.asarray((U @ self._M_T)[row, col]).ravel().astype(np.int64)
        if self.store_pvalue < 0.5:
            # P(X >= K) >= 1/2 whenever K does not exceed the mean k*n/N (the median is within 1 of it)
            keep = K * N > kk * n
            row, col, K, n, kk, N = row[keep], col[keep], K[keep], n[keep], kk[keep], N[keep]
        logp = (_hypergeom_logp(K, n, kk, int(N[0])) if self._bins is None and len(N)
                else hypergeom_logsf(K, N, n, kk))
        keep = logp <= np.log(self.store_pvalue)
        part = {
            "feature": features[row[keep]], "set": col[keep].astype(np.int64), "overlap": K[keep],
            "n_selected": kk[keep], "logp": logp[keep],
            "direction": np.full(int(keep.sum()), direction, dtype=object), "selection_row": row[keep],
            "selection_id": np.full(int(keep.sum()), len(self._parts), dtype=np.int64)}
        if self._bins is not None:
            part["_n"], part["_N"] = n[keep], N[keep]
        self._parts.append(part)
        self._parts[-1]["_selection"] = S  # overlapping genes are read back from it for reported rows
        return k

    @property
    def n_tests_total(self) -> int:
        return int(sum(self._n_tests.values()))

    def table(
        self, *, max_padj: float | None = 0.05, feature_column: str = "feature",
        gene_labels: Sequence[str] | None = None) -> pd.DataFrame:
        """The tidy result (columns :data:`RESULT_COLUMNS` plus ``significant``), rows whose adjusted p
        in the ``fdr`` scope (``padj_global`` by default, else ``padj``) is at most ``max_padj`` (all kept
        rows when ``None``; ``significant`` then uses 0.05), sorted by feature, direction and p-value."""
        if max_padj is not None and max_padj > self.store_pvalue:
            raise ValueError(
                f"max_padj ({max_padj}) exceeds store_pvalue ({self.store_pvalue}); raise store_pvalue."
            )
        if self._parts:
            keys = [c for c in self._parts[0] if not c.startswith("_") or c in ("_n", "_N")]
            data = {c: np.concatenate([p[c] for p in self._parts]) for c in keys}
        else:
            data = {
                c: np.zeros(0, dtype=np.int64)
                for c in ("feature", "set", "overlap", "n_selected", "selection_row", "selection_id")
            }
            data["logp"] = np.zeros(0)
            data["direction"] = np.zeros(0, dtype=object)
        p = np.exp(data["logp"])
        feat = data["feature"]
        # per-feature BH: group ids must be dense integers for the n_tests look-up
        uniq_f, f_codes = np.unique(feat, return_inverse=True)
        n_tests = np.array([self._n_tests[int(f)] for f in uniq_f], dtype=np.float64)
        padj = bh_adjust_grouped(p, f_codes, n_tests) if len(p) else p
        padj_global = (
            bh_adjust_grouped(p, np.zeros(len(p), dtype=np.int64), np.array([max(self.n_tests_total, 1)]))
            if len(p)
            else p
        )
        scoped = padj_global if self.fdr == "global" else padj
        alpha = 0.05 if max_padj is None else max_padj
        keep = np.ones(len(p), dtype=bool) if max_padj is None else scoped <= max_padj
        sel = {c: v[keep] for c, v in data.items()}
        K = sel["overlap"].astype(np.int64)
        n = sel["_n"].astype(np.int64) if "_n" in sel else self.index.set_sizes[sel["set"]]
        k = sel["n_selected"].astype(np.int64)
        N = sel["_N"].astype(np.int64) if "_N" in sel else np.full(len(K), len(self.universe_cols), dtype=np.int64)
        expected = k * n / N
        with np.errstate(divide="ignore", invalid="ignore"):
            fold = K / expected
            odds = (K * (N - n - k + K)) / ((k - K) * (n - K))
        odds = np.where((k - K) * (n - K) == 0, np.inf, odds)
        out = pd.DataFrame(
            {
                feature_column: sel["feature"], "term": self.index.terms[sel["set"]],
                "description": self.index.descriptions[sel["set"]], "direction": sel["direction"],
                "overlap": K, "set_size": n, "n_selected": k,
                "universe_size": N, "expected": expected,
                "fold_enrichment": fold, "odds_ratio": odds, "pval": p[keep], "padj": padj[keep],
                "padj_global": padj_global[keep], "genes": self._overlap_genes(sel, gene_labels),
                "significant": scoped[keep] <= alpha}
        )
        for extra in (c for c in sel if c not in _INTERNAL_COLUMNS and not c.startswith("_")):
            out[extra] = sel[extra]
        for extra in self.extra_columns:
            if extra not in out:
                out[extra] = np.zeros(0, dtype=object)
        out = out.sort_values(
            [feature_column, "direction", "pval", "overlap"], ascending=[True, False, True, False],
            kind="stable", ignore_index=True)
        return out

    def _overlap_genes(self, sel: dict[str, np.ndarray], gene_labels) -> np.ndarray:
        labels = np.asarray(self.index.gene_names if gene_labels is None else gene_labels, dtype=object)
        labels = labels[self.universe_cols]
        out = np.empty(len(sel["set"]), dtype=object)
        M = self._M_T.T.tocsr()  # sets x universe genes
        for sid in np.unique(sel["selection_id"]):
            pos = np.flatnonzero(sel["selection_id"] == sid)
            S = self._parts[sid]["_selection"]
            hits = S[sel["selection_row"][pos]].multiply(M[sel["set"][pos]]).tocsr()
            hits.sort_indices()
            for i, (a, b) in enumerate(zip(hits.indptr[:-1], hits.indptr[1:], strict=True)):
                out[pos[i]] = ",".join(labels[hits.indices[a:b]])
        return out


def _as_gene_lists(gene_lists) -> dict[str, list[str]]:
    if isinstance(gene_lists, Mapping):
        out = {str(k): [str(g) for g in v] for k, v in gene_lists.items()}
    elif isinstance(gene_lists, str):
        raise ValueError("gene_lists must be a list of genes or a dict {name: [genes]}, not a single string.")
    else:
        out = {"query": [str(g) for g in gene_lists]}
    if not out:
        raise ValueError("gene_lists is empty.")
    return out


def enrich(
    gene_lists, universe: Iterable[str], gene_sets="go_bp", *, min_size: int = 10, max_size: int | None = 500,
    max_padj: float | None = 0.05, use_aliases: bool = True, fdr: str = "global", background: str = "all",
    gene_means=None, n_bins: int = 10, seed: int = 0) -> pd.DataFrame:
    """ORA of one or more gene lists (e.g. genes changed by steering) against a gene-set collection.

    Parameters
    ----------
    gene_lists
        A list of genes, or ``{name: [genes]}`` for several lists tested together.
    universe
        All genes that could have been selected (the tested genes); required, because the default
        "every gene in the collection" inflates significance.
    gene_sets
        Collection name, GMT path or dict.
    max_padj
        Report rows with a BH-adjusted p at or below this (``None``: every set that overlaps a list).
    fdr
        ``"global"``: BH over all lists x sets (``padj_global``) decides ``significant`` and the filter;
        ``"per_feature"``: BH within each list (``padj``).
    background, gene_means, n_bins, seed
        ``"matched"`` tests each list against an expression-matched universe (see the module docstring);
        ``gene_means``: a mean expression per universe gene (array in ``universe`` order, or a mapping).

    Returns
    -------
    DataFrame with the columns of :data:`RESULT_COLUMNS`, ``query`` in place of ``feature`` and
    ``direction`` set to ``"query"``.
    """
    lists = _as_gene_lists(gene_lists)
    universe = list(dict.fromkeys(str(g) for g in universe))
    if not universe:
        raise ValueError("universe is empty; pass the genes that were tested.")
    pos = {g: i for i, g in enumerate(universe)}
    missing = sorted({g for genes in lists.values() for g in genes if g not in pos})
    if missing:
        raise ValueError(
            f"{len(missing)} listed genes are not in the universe (e.g. {missing[:5]}); "
            "the universe must contain every gene that was tested."
        )
    index = index_gene_sets(
        universe, gene_sets, min_size=min_size, max_size=max_size, use_aliases=use_aliases
    )
    rows = np.concatenate([np.full(len(g), i) for i, g in enumerate(lists.values())]).astype(np.int64)
    cols = np.array([pos[g] for genes in lists.values() for g in genes], dtype=np.int64)
    S = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(lists), len(universe)))
    S.data[:] = 1
    if gene_means is not None:
        gene_means = (np.array([float(gene_means[g]) for g in universe]) if isinstance(gene_means, Mapping)
                      else np.asarray(gene_means, dtype=np.float64))
    acc = ORAAccumulator(index, store_pvalue=1.0 if max_padj is None else max(max_padj, 0.05), fdr=fdr,
                         background=background, gene_means=gene_means, n_bins=n_bins, seed=seed)
    acc.add(S, np.arange(len(lists)), "query")
    out = acc.table(max_padj=max_padj, feature_column="query")
    out["query"] = np.asarray(list(lists), dtype=object)[out["query"].to_numpy(dtype=np.int64)]
    out.attrs["gene_sets"] = index.provenance
    return out
