"""Gene-set collections: the bundled offline files, GMT reading/writing, and gene-identifier rescue.

Every function that takes gene sets accepts

- a bundled collection name (``"go_bp"``, ``"go_mf"``, ``"go_cc"``, ``"hallmark"``, ``"reactome_wp_pid"``),
- a path to a ``.gmt`` / ``.gmt.gz`` file,
- a plain ``dict`` ``{term: [genes]}`` (or a :class:`GeneSets`).

Datasets often use older gene symbols (hg19 era) or Ensembl IDs while the collections use 2022 symbols.
:func:`map_gene_names` rescues them through the bundled alias and Ensembl tables (unambiguous pairs only),
so that the enrichment universe, (genes tested) ∩ (genes in the collection), loses as few genes as possible.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "GeneSets",
    "gene_sets",
    "available_gene_sets",
    "read_gmt",
    "write_gmt",
    "resolve_gene_sets",
    "gene_aliases",
    "ensembl_to_symbol",
    "map_gene_names",
    "GeneMapping",
]

_DATA_PACKAGE = "dgdlens.lens"  # files live in its data/ folder (no __init__ there)

_GO_RELEASE = "GO 2022-07-01, NCBI gene2go 2022-09-12 (org.Hs.eg.db 3.16.0)"
_GO_LICENSE = "CC BY 4.0, Gene Ontology Consortium"
_GO_CITATION = "Gene Ontology Consortium, Genetics 224(1), 2023; Ashburner et al., Nat Genet 25:25-29, 2000"
_MSIGDB_LICENSE = "CC BY 4.0 (MSigDB v7.5.1)"

# name -> file and provenance; the README next to the files carries the same attribution.
_COLLECTIONS: dict[str, dict[str, str]] = {
    "go_bp": {
        "file": "go_bp_human_2022.gmt.gz",
        "title": "GO Biological Process (human, annotations propagated to ancestors)",
        "release": _GO_RELEASE,
        "license": _GO_LICENSE,
        "citation": _GO_CITATION,
    },
    "go_mf": {
        "file": "go_mf_human_2022.gmt.gz",
        "title": "GO Molecular Function (human, propagated)",
        "release": _GO_RELEASE,
        "license": _GO_LICENSE,
        "citation": _GO_CITATION,
    },
    "go_cc": {
        "file": "go_cc_human_2022.gmt.gz",
        "title": "GO Cellular Component (human, propagated)",
        "release": _GO_RELEASE,
        "license": _GO_LICENSE,
        "citation": _GO_CITATION,
    },
    "hallmark": {
        "file": "msigdb_hallmark_v7.5.1.gmt.gz",
        "title": "MSigDB Hallmark gene sets",
        "release": "MSigDB v7.5.1",
        "license": _MSIGDB_LICENSE,
        "citation": "Liberzon et al., Cell Systems 1:417-425, 2015",
    },
    "reactome_wp_pid": {
        "file": "msigdb_c2cp_reactome_wp_pid_v7.5.1.gmt.gz",
        "title": "MSigDB C2 canonical pathways: Reactome, WikiPathways, PID (KEGG and BioCarta removed)",
        "release": "MSigDB v7.5.1",
        "license": _MSIGDB_LICENSE + "; KEGG_* and BIOCARTA_* sets excluded for licence reasons",
        "citation": "Liberzon et al., Bioinformatics 27:1739-1740, 2011; Reactome, WikiPathways and PID as appropriate",
    },
}

# Spellings users are likely to type for the same collections.
_NAME_ALIASES = {
    "gobp": "go_bp", "go_biological_process": "go_bp", "biological_process": "go_bp",
    "gomf": "go_mf", "go_molecular_function": "go_mf", "molecular_function": "go_mf",
    "gocc": "go_cc", "go_cellular_component": "go_cc", "cellular_component": "go_cc",
    "msigdb_hallmark": "hallmark", "hallmarks": "hallmark", "h": "hallmark",
    "reactome": "reactome_wp_pid", "c2cp": "reactome_wp_pid", "canonical_pathways": "reactome_wp_pid",
}


class GeneSets(dict):
    """``{term: [genes]}`` with term descriptions and provenance.

    A plain ``dict`` subclass, so it can be used wherever a dict of gene lists is expected.

    Parameters
    ----------
    sets
        ``{term ID: iterable of gene names}``. Term IDs are converted to ``str``; each gene list is
        cleaned: names are stripped, empty names dropped and duplicates removed (first occurrence kept,
        order preserved). A set given as a single string raises ``ValueError``. ``None`` (default) makes
        an empty collection.
    descriptions
        ``{term ID: human-readable description}``; terms without one fall back to their ID in
        :meth:`description`. Default: none.
    name, title, release, license, citation
        Provenance strings (collection key, long title, release/version, licence, citation to give
        with results); empty by default, as for user-made sets.

    Attributes
    ----------
    descriptions
        ``{term: human-readable description}`` (GO term names; MSigDB card URLs).
    name, title, release, license, citation
        Provenance of a bundled collection (empty strings for user-made sets).
    """

    def __init__(
        self,
        sets: Mapping[str, Iterable[str]] | None = None,
        *,
        descriptions: Mapping[str, str] | None = None,
        name: str = "",
        title: str = "",
        release: str = "",
        license: str = "",  # noqa: A002 - the natural word for it
        citation: str = "",
    ) -> None:
        super().__init__()
        for term, genes in (sets or {}).items():
            self[str(term)] = _clean_gene_list(term, genes)
        self.descriptions = {str(k): str(v) for k, v in (descriptions or {}).items()}
        self.name = name
        self.title = title
        self.release = release
        self.license = license
        self.citation = citation

    @classmethod
    def _trusted(cls, sets: dict[str, list[str]], descriptions: dict[str, str], **meta: str) -> GeneSets:
        """Build from lists that are already clean (parsed GMT, restricted copies): skips the per-gene
        cleaning, which dominates loading GO BP (~0.8M gene entries)."""
        out = cls(None, **meta)
        dict.update(out, sets)
        out.descriptions = descriptions
        return out

    def description(self, term: str) -> str:
        """The description of ``term`` (the term itself when none is known).

        Parameters
        ----------
        term
            A term ID (a key of the collection, or any string).

        Returns
        -------
        str
            ``descriptions[term]`` (e.g. the GO term name), or ``term`` itself when no description is
            stored.
        """
        return self.descriptions.get(term, term)

    def genes(self) -> set[str]:
        """All genes that belong to at least one set.

        Returns
        -------
        set of str
            The union of all gene lists (the collection's gene universe before any restriction to
            tested genes).
        """
        out: set[str] = set()
        for genes in self.values():
            out.update(genes)
        return out

    def sizes(self) -> pd.Series:
        """Number of genes per set.

        Returns
        -------
        pandas.Series
            ``int64`` sizes indexed by term ID, in collection order (counted over the whole set, not
            restricted to any tested genes).
        """
        return pd.Series({t: len(g) for t, g in self.items()}, dtype=np.int64)

    def provenance(self) -> dict[str, str]:
        """Name, release, licence and citation as a small dict (for result metadata).

        Returns
        -------
        dict of str to str
            Keys ``"name"``, ``"title"``, ``"release"``, ``"license"`` and ``"citation"`` (empty strings
            for user-made sets).
        """
        return {"name": self.name, "title": self.title, "release": self.release, "license": self.license,
                "citation": self.citation}

    def restrict(self, genes: Iterable[str] | None = None, *, min_size: int | None = None,
                 max_size: int | None = None) -> GeneSets:
        """A new collection with each set intersected with ``genes`` and filtered by size afterwards.

        Parameters
        ----------
        genes
            Genes to keep (e.g. the tested genes); each set keeps only its members among them, in the
            original order. ``None`` (default) keeps every member and only filters by size.
        min_size, max_size
            Inclusive bounds on the size of a set *after* the intersection; sets outside them are
            dropped. ``None`` (default) means no bound.

        Returns
        -------
        GeneSets
            A new collection (the original is not modified) with the kept sets, their descriptions and
            the same provenance.
        """
        keep = None if genes is None else set(genes)
        out = {}
        for term, members in self.items():
            if keep is not None:
                members = [g for g in members if g in keep]
            n = len(members)
            if (min_size is not None and n < min_size) or (max_size is not None and n > max_size):
                continue
            out[term] = members
        return GeneSets._trusted(out, {t: self.description(t) for t in out}, **self._meta())

    def _meta(self) -> dict[str, str]:
        return {"name": self.name, "title": self.title, "release": self.release, "license": self.license,
                "citation": self.citation}

    def copy(self) -> GeneSets:  # dict.copy would return a plain dict and drop the metadata
        """A copy that keeps the descriptions and provenance (``dict.copy`` would drop them).

        Returns
        -------
        GeneSets
            New collection with copied gene lists and descriptions, so either can be edited without
            affecting the other.
        """
        return GeneSets._trusted({t: list(g) for t, g in self.items()}, dict(self.descriptions), **self._meta())

    def __repr__(self) -> str:
        label = self.name or "custom"
        return f"GeneSets({label!r}, {len(self)} sets, {len(self.genes())} genes)"


def _clean_gene_list(term, genes) -> list[str]:
    if isinstance(genes, str | bytes):
        raise ValueError(
            f"Gene set {term!r} is a single string ({genes[:40]!r}), not a list of genes; "
            "pass {term: ['GENE1', 'GENE2', ...]}."
        )
    try:
        items = list(genes)
    except TypeError as err:
        raise ValueError(f"Gene set {term!r} must be an iterable of gene names, got {type(genes).__name__}.") from err
    # dict.fromkeys keeps the first occurrence in order: duplicates would inflate set sizes
    return list(dict.fromkeys(str(g).strip() for g in items if str(g).strip()))


# ---------------------------------------------------------------------------------------------- GMT files
def _parse_gmt(text: str, source: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    sets: dict[str, list[str]] = {}
    descriptions: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.rstrip("\r\n")
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(
                f"{source}, line {lineno}: a GMT line needs tab-separated 'ID<TAB>description<TAB>genes...', "
                f"got {line[:80]!r}. Check that the file uses tabs, not spaces."
            )
        term = fields[0].strip()
        if not term:
            raise ValueError(f"{source}, line {lineno}: empty gene-set ID.")
        if term in sets:
            raise ValueError(f"{source}, line {lineno}: gene-set ID {term!r} appears twice; IDs must be unique.")
        sets[term] = list(dict.fromkeys(g.strip() for g in fields[2:] if g.strip()))
        descriptions[term] = fields[1].strip()
    if not sets:
        raise ValueError(f"{source} contains no gene sets.")
    return sets, descriptions


def read_gmt(path: str | os.PathLike, *, name: str = "") -> GeneSets:
    """Read a GMT file (plain or gzipped) into :class:`GeneSets`.

    Parameters
    ----------
    path
        ``.gmt`` or ``.gmt.gz`` file: one set per line, ``ID<TAB>description<TAB>gene1<TAB>gene2...``.
    name
        Optional label stored on the result (``.name``); default: the file name without ``.gmt``/``.gmt.gz``.

    Returns
    -------
    GeneSets
        ``{ID: [genes]}`` in file order with the description column as ``.descriptions``. Gene lists are
        stripped and de-duplicated; the provenance fields other than ``name`` are empty. Gzip is detected
        from the file content, not the suffix. Raises ``ValueError`` for a malformed line, an empty or
        duplicated ID, or a file without sets.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GMT file {str(path)!r} does not exist.")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the suffix says
        raw = gzip.decompress(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a UTF-8 text GMT file (or a gzipped one).") from err
    sets, descriptions = _parse_gmt(text, str(path))
    return GeneSets._trusted(sets, descriptions, name=name or path.name.split(".gmt")[0])


def write_gmt(gene_sets: Mapping[str, Iterable[str]], path: str | os.PathLike) -> None:
    """Write gene sets as GMT (gzipped when ``path`` ends in ``.gz``).

    Parameters
    ----------
    gene_sets
        A :class:`GeneSets` or a ``{term ID: [genes]}`` mapping (cleaned as by :class:`GeneSets`). Each
        line is ``ID<TAB>description<TAB>gene1<TAB>gene2...``; the description is
        :meth:`GeneSets.description` (the ID itself when none is known), with tabs and newlines replaced
        by spaces. An ID containing a tab or newline raises ``ValueError``.
    path
        Output file; overwritten if it exists. A ``.gz`` suffix writes gzip-compressed text.
    """
    sets = gene_sets if isinstance(gene_sets, GeneSets) else GeneSets(gene_sets)
    lines = []
    for term, genes in sets.items():
        if "\t" in term or "\n" in term:
            raise ValueError(f"Gene-set ID {term!r} contains a tab or newline, which GMT cannot store.")
        desc = sets.description(term).replace("\t", " ").replace("\n", " ")
        lines.append("\t".join([term, desc, *genes]))
    data = ("\n".join(lines) + "\n").encode("utf-8")
    path = Path(path)
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


# ------------------------------------------------------------------------------------ bundled collections
def _canonical_name(name: str) -> str:
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = _NAME_ALIASES.get(key, key)
    if key not in _COLLECTIONS:
        raise ValueError(
            f"Unknown gene-set collection {name!r}. Bundled collections: {sorted(_COLLECTIONS)}; "
            "or pass a path to a .gmt file, or a dict {term: [genes]}."
        )
    return key


def _read_package_bytes(filename: str) -> bytes:
    return resources.files(_DATA_PACKAGE).joinpath("data").joinpath(filename).read_bytes()


@functools.lru_cache(maxsize=8)
def _load_collection(key: str) -> tuple[tuple[tuple[str, str, tuple[str, ...]], ...], dict[str, str]]:
    # Cached as immutable tuples: every caller gets a fresh GeneSets it may modify freely.
    info = _COLLECTIONS[key]
    text = gzip.decompress(_read_package_bytes(info["file"])).decode("utf-8")
    sets, descriptions = _parse_gmt(text, info["file"])
    return tuple((t, descriptions[t], tuple(g)) for t, g in sets.items()), info


def gene_sets(name: str = "go_bp", *, min_size: int | None = None, max_size: int | None = None) -> GeneSets:
    """A bundled gene-set collection (human gene symbols), loaded offline from package data.

    Parameters
    ----------
    name
        ``"go_bp"``, ``"go_mf"``, ``"go_cc"`` (GO 2022-07-01, annotations propagated to ancestor terms),
        ``"hallmark"`` (MSigDB v7.5.1) or ``"reactome_wp_pid"`` (MSigDB v7.5.1 C2:CP without KEGG/BioCarta).
    min_size, max_size
        Keep only sets with this many genes (counted in the whole collection; enrichment functions
        filter again after restricting sets to the tested genes).

    Returns
    -------
    GeneSets
        A ``dict`` ``{term ID: [genes]}`` with ``.descriptions`` (term names) and provenance
        (``.release``, ``.license``, ``.citation``). Cite the source and record the release with results.
    """
    key = _canonical_name(name)
    entries, info = _load_collection(key)
    out = GeneSets._trusted(
        {t: list(g) for t, _, g in entries},
        {t: d for t, d, _ in entries},
        name=key, title=info["title"], release=info["release"], license=info["license"],
        citation=info["citation"],
    )
    if min_size is not None or max_size is not None:
        out = out.restrict(min_size=min_size, max_size=max_size)
    return out


def available_gene_sets() -> pd.DataFrame:
    """The bundled collections with their size, release, licence and citation.

    Returns
    -------
    pandas.DataFrame
        One row per bundled collection, columns ``name`` (the key to pass to :func:`gene_sets`),
        ``title``, ``n_sets`` (number of sets before any size filter), ``release``, ``license``,
        ``citation`` and ``file`` (the package data file). Each collection is loaded once to count its
        sets.
    """
    rows = []
    for key, info in _COLLECTIONS.items():
        entries, _ = _load_collection(key)
        rows.append({"name": key, "title": info["title"], "n_sets": len(entries), "release": info["release"],
                     "license": info["license"], "citation": info["citation"], "file": info["file"]})
    return pd.DataFrame(rows)


def resolve_gene_sets(gene_sets_arg) -> GeneSets:
    """Turn any accepted gene-set argument (name, GMT path, dict, GeneSets) into :class:`GeneSets`."""
    if isinstance(gene_sets_arg, GeneSets):
        return gene_sets_arg
    if isinstance(gene_sets_arg, str | os.PathLike):
        text = str(gene_sets_arg)
        if text.endswith((".gmt", ".gmt.gz", ".gz")) or os.sep in text or Path(text).exists():
            return read_gmt(text)
        return gene_sets(text)
    if isinstance(gene_sets_arg, Mapping):
        if len(gene_sets_arg) == 0:
            raise ValueError("The gene-set dict is empty; pass at least one {term: [genes]} entry.")
        return GeneSets(gene_sets_arg)
    raise TypeError(
        f"gene_sets must be a collection name (e.g. 'go_bp'), a path to a .gmt file or a dict "
        f"{{term: [genes]}}; got {type(gene_sets_arg).__name__}."
    )


# ------------------------------------------------------------------------------------ identifier rescue
def _read_two_column_table(filename: str) -> pd.DataFrame:
    raw = gzip.decompress(_read_package_bytes(filename))
    return pd.read_csv(io.BytesIO(raw), sep="\t", dtype=str, keep_default_na=False)


@functools.lru_cache(maxsize=1)
def _alias_table() -> dict[str, str]:
    df = _read_two_column_table("human_gene_aliases_2022.tsv.gz")
    return dict(zip(df["alias"], df["symbol"], strict=True))


@functools.lru_cache(maxsize=1)
def _ensembl_table() -> dict[str, str]:
    df = _read_two_column_table("human_ensembl_to_symbol_2022.tsv.gz")
    # Some Ensembl IDs map to several symbols: keep only the unambiguous ones.
    counts = df["ensembl_id"].value_counts()
    df = df[df["ensembl_id"].map(counts) == 1]
    return dict(zip(df["ensembl_id"], df["symbol"], strict=True))


def gene_aliases() -> dict[str, str]:
    """Unambiguous human alias -> current symbol pairs (org.Hs.eg.db 3.16.0, NCBI Gene 2022-09-12).

    Returns
    -------
    dict of str to str
        ``{alias or previous symbol: current HGNC symbol}``, the table :func:`map_gene_names` uses; a
        fresh copy on each call, so it may be modified.
    """
    return dict(_alias_table())


def ensembl_to_symbol() -> dict[str, str]:
    """Unambiguous human Ensembl gene ID -> symbol pairs (org.Hs.eg.db 3.16.0, Ensembl 2022-06-28).

    Returns
    -------
    dict of str to str
        ``{Ensembl gene ID without version (ENSG...): symbol}``; IDs that map to several symbols are left
        out. A fresh copy on each call.
    """
    return dict(_ensembl_table())


_ENSEMBL_RE = re.compile(r"^ENSG\d{11}(\.\d+)?$")


@dataclass
class GeneMapping:
    """How the tested genes were matched to a collection.

    Attributes
    ----------
    symbols
        Per input gene, the collection symbol it stands for, or ``None`` (outside the universe).
    how
        Per input gene: ``"direct"``, ``"ensembl"``, ``"alias"``, ``"duplicate"`` (another input gene already
        stands for that symbol) or ``"unmapped"``.
    counts
        Number of input genes per ``how`` value (all five keys present).
    """

    symbols: list[str | None]
    how: list[str]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def mask(self) -> np.ndarray:
        """Boolean mask of input genes that are in the universe."""
        return np.array([s is not None for s in self.symbols], dtype=bool)


def map_gene_names(names: Sequence[str], collection_genes: Iterable[str], *, use_aliases: bool = True) -> GeneMapping:
    """Match gene identifiers to the symbols of a collection, rescuing old symbols and Ensembl IDs.

    Rules, in order: a name already in the collection is kept; an Ensembl ID (version suffix allowed)
    is mapped to its symbol; an alias is mapped to its current symbol (only unambiguous aliases are in
    the table). A rescued gene is dropped (``how="duplicate"``) when another input gene already stands
    for the same symbol, so that no collection gene is counted twice.

    Parameters
    ----------
    names
        The tested genes' identifiers (e.g. ``adata.var_names``).
    collection_genes
        All genes of the gene-set collection.
    use_aliases
        Rescue through the alias/Ensembl tables (human). With ``False`` only exact matches count.

    Returns
    -------
    GeneMapping
        Per input gene (same order and length as ``names``): the collection symbol it stands for or
        ``None`` (``symbols``), how it was matched (``how``), the number of genes per kind (``counts``),
        and ``mask``, the boolean universe mask over ``names``.
    """
    names = [str(n) for n in names]
    known = set(collection_genes)
    symbols: list[str | None] = [None] * len(names)
    how = ["unmapped"] * len(names)
    taken: set[str] = set()
    # Exact matches first, so a rescued alias never displaces a gene that matched directly.
    for i, name in enumerate(names):
        if name in known and name not in taken:
            symbols[i], how[i] = name, "direct"
            taken.add(name)
        elif name in known:
            how[i] = "duplicate"
    if use_aliases:
        aliases = _alias_table()
        ensembl = None
        for i, name in enumerate(names):
            if how[i] != "unmapped":
                continue
            target, kind = None, None
            if _ENSEMBL_RE.match(name):
                ensembl = ensembl if ensembl is not None else _ensembl_table()
                target, kind = ensembl.get(name.split(".")[0]), "ensembl"
            else:
                target, kind = aliases.get(name), "alias"
            if target is None or target not in known:
                continue
            if target in taken:
                how[i] = "duplicate"
                continue
            symbols[i], how[i] = target, kind
            taken.add(target)
    counts = {k: how.count(k) for k in ("direct", "ensembl", "alias", "duplicate", "unmapped")}
    return GeneMapping(symbols=symbols, how=how, counts=counts)
