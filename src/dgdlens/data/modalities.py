"""Several modalities of the same cells: a MuData (``mdata.mod["rna"]``, ``["atac"]``, ``["prot"]``) or one
AnnData whose ``var`` has a modality column (``feature_types`` in 10x multiome files), seen as one
``cells x features`` matrix with the modalities' features side by side, never densified.

A MuData's modalities may hold different cells (unpaired data): a cell missing from a modality reads as
zeros there, and :attr:`Modalities.present` says which cells each modality has.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .anndata import get_matrix, var_names_for
from .matrix import RowMatrix, validate_counts

__all__ = ["Modalities", "read_modalities", "is_mudata", "default_modality_likelihood", "HStackRowMatrix",
           "mudata_without_pull"]


def mudata_without_pull():
    """A context in which ``MuData.update()`` does not copy the modalities' ``obs`` columns into the
    MuData's (as ``"rna:cell_type"``, ...): shared annotations are written on ``mdata.obs`` itself.

    mudata 0.3 spells it ``set_options(pull_on_update=False)``; 0.4 (Python 3.12+) moved the option to
    ``settings.override`` (and no longer pulls by default).
    """
    import mudata as md

    if hasattr(md, "set_options"):
        return md.set_options(pull_on_update=False)
    return md.settings.override(pull_on_update=False)

#: The likelihood a modality gets by its name when none is given: counts of RNA and proteins are
#: negative binomial; chromatin accessibility is binary (see :class:`~dgdlens.nn.BinaryAccessibility`).
_DEFAULT_LIKELIHOODS = {"rna": "nb", "gex": "nb", "gene expression": "nb", "atac": "binary", "peaks": "binary",
                        "chromatin": "binary", "prot": "nb", "protein": "nb", "adt": "nb",
                        "antibody capture": "nb"}


def default_modality_likelihood(name: str) -> str:
    """The default likelihood of a modality by its name: ``"binary"`` for ATAC-like names (``atac``,
    ``peaks``, ``chromatin``), ``"nb"`` for the rest (RNA, proteins, anything else).

    Parameters
    ----------
    name
        Modality name (case-insensitive).

    Returns
    -------
    str
        ``"nb"`` or ``"binary"``.
    """
    return _DEFAULT_LIKELIHOODS.get(str(name).lower(), "nb")


def is_mudata(obj) -> bool:
    """Whether ``obj`` is a :class:`mudata.MuData` (checked by type name: mudata need not be imported).

    Parameters
    ----------
    obj
        Any object.

    Returns
    -------
    bool
        ``True`` for a MuData.
    """
    return type(obj).__name__ == "MuData" and hasattr(obj, "mod")


@dataclass
class Modalities:
    """The modalities of a set of cells, side by side.

    Attributes
    ----------
    names
        Modality names, in order.
    var_names
        Each modality's feature names.
    parts
        Each modality's matrix (its own cells), in order.
    row_maps
        Per modality, the row of each cell in that modality's matrix (``-1``: the cell lacks it), or
        ``None`` when the rows are the cells in order.
    obs_names
        The cells.
    obs
        The cells' annotations (the MuData's or AnnData's ``obs``).
    """

    names: list[str]
    var_names: list[pd.Index]
    parts: list[RowMatrix]
    row_maps: list[np.ndarray | None]
    obs_names: pd.Index
    obs: pd.DataFrame

    @property
    def sizes(self) -> list[int]:
        """Features per modality."""
        return [len(v) for v in self.var_names]

    @property
    def present(self) -> np.ndarray:
        """``cells x modalities`` bool: whether the cell has data in the modality."""
        out = np.ones((len(self.obs_names), len(self.names)), dtype=bool)
        for m, rows in enumerate(self.row_maps):
            if rows is not None:
                out[:, m] = rows >= 0
        return out

    def matrix(self) -> HStackRowMatrix:
        """All modalities side by side, read lazily.

        Returns
        -------
        HStackRowMatrix
            ``cells x sum of features``; a cell missing from a modality reads as zeros there.
        """
        return HStackRowMatrix(self.parts, self.row_maps, len(self.obs_names))

    def library_sizes(self, *, what: str = "the data", allow_empty: bool = False) -> np.ndarray:
        """Validate every modality's counts and return each cell's total per modality (0 where it lacks it).

        Parameters
        ----------
        what
            How the messages name the data.
        allow_empty
            Accept cells with no counts at all (over all modalities).

        Returns
        -------
        numpy.ndarray
            float32 ``cells x modalities``.
        """
        lib = np.zeros((len(self.obs_names), len(self.names)), dtype=np.float64)
        for m, (name, part, rows) in enumerate(zip(self.names, self.parts, self.row_maps)):
            stats = validate_counts(part, what=f"{what}, modality {name!r}", allow_empty_cells=True,
                                    empty_genes="ignore")
            if rows is None:
                lib[:, m] = stats["row_sums"]
            else:
                lib[rows >= 0, m] = stats["row_sums"][rows[rows >= 0]]
            empty = int(np.sum((lib[:, m] == 0) & self.present[:, m]))
            if empty:
                warnings.warn(f"{what}: {empty} cell(s) have no counts in modality {name!r}; they are treated as "
                              "missing that modality (embedded from the others).", UserWarning, stacklevel=3)
        if not allow_empty and np.any(lib.sum(1) == 0):
            bad = int(np.flatnonzero(lib.sum(1) == 0)[0])
            raise ValueError(f"{what}: {int(np.sum(lib.sum(1) == 0))} cell(s) have no counts in any modality (e.g. "
                             f"{self.obs_names[bad]!r}); remove them first.")
        return lib.astype(np.float32)


def _layer_for(layer, name: str):
    return layer.get(name) if isinstance(layer, dict) else layer


def read_modalities(data, *, layer=None, modality_key: str | None = None, modality: str | None = None,
                    modalities: list[str] | None = None) -> Modalities:
    """Read the modalities of a MuData, of an AnnData with a ``var`` modality column, or of an AnnData of
    one modality.

    Parameters
    ----------
    data
        A :class:`mudata.MuData` (every ``mdata.mod``; cells aligned by ``mdata.obs_names``), or an AnnData.
    layer
        Where the counts are (as :func:`~dgdlens.data.get_matrix`); a dict ``{modality: layer}`` for a MuData.
    modality_key
        For an AnnData: the ``var`` column naming each feature's modality (features may come in any order;
        they are grouped by modality, in order of first appearance or of ``modalities``).
    modality
        For an AnnData of a single modality: its name.
    modalities
        Keep only these modalities, in this order (others are dropped; a missing one is an error).

    Returns
    -------
    Modalities

    Raises
    ------
    ValueError
        For an AnnData with neither ``modality_key`` nor ``modality``, an unknown column, a modality with no
        features, duplicated feature names, or MuData modalities whose cells are not in ``mdata.obs_names``.
    """
    if is_mudata(data):
        names = list(data.mod.keys()) if modalities is None else list(modalities)
        missing = [n for n in names if n not in data.mod]
        if missing:
            raise ValueError(f"The MuData has no modality {missing} (it has {list(data.mod.keys())}).")
        obs_names = pd.Index(data.obs_names)
        parts, var_names, row_maps = [], [], []
        for name in names:
            ad = data.mod[name]
            lay = _layer_for(layer, name)
            parts.append(get_matrix(ad, lay))
            var_names.append(var_names_for(ad, lay))
            own = pd.Index(ad.obs_names)
            if own.equals(obs_names):
                row_maps.append(None)
                continue
            if own.has_duplicates:
                raise ValueError(f"Modality {name!r} has duplicated cell names; call mdata.mod[{name!r}].obs_names_make_unique().")
            rows = own.get_indexer(obs_names)
            if np.any(~own.isin(obs_names)):
                raise ValueError(f"Modality {name!r} has cells that are not in the MuData's obs_names (call mdata.update()).")
            row_maps.append(rows)
        return _checked(Modalities(names, var_names, parts, row_maps, obs_names, data.obs))
    if type(data).__name__ != "AnnData":
        raise TypeError(f"Expected a MuData or an AnnData, got {type(data).__name__}.")
    if modality_key is not None:
        if modality_key not in data.var.columns:
            raise ValueError(f"var has no column {modality_key!r} naming each feature's modality "
                             f"(columns: {list(data.var.columns)[:20]}).")
        labels = pd.Index(data.var[modality_key].astype(str))
        found = list(dict.fromkeys(labels))
        names = found if modalities is None else list(modalities)
        whole = get_matrix(data, layer)
        all_names = var_names_for(data, layer)
        parts, var_names = [], []
        for name in names:
            cols = np.flatnonzero(labels == name)
            if modalities is not None and len(cols) == 0 and name not in found:
                continue  # a modality this AnnData lacks (new data with fewer modalities)
            parts.append(whole.subset_columns(cols))
            var_names.append(all_names[cols])
        names = [n for n in names if n in found]
        return _checked(Modalities(names, var_names, parts, [None] * len(names), pd.Index(data.obs_names), data.obs))
    if modality is None:
        raise ValueError("An AnnData of a multi-modal model needs modality_key= (a var column naming each feature's "
                         "modality) or modality= (the one modality it holds, e.g. 'rna').")
    return _checked(Modalities([str(modality)], [var_names_for(data, layer)], [get_matrix(data, layer)], [None],
                               pd.Index(data.obs_names), data.obs))


def _checked(mods: Modalities) -> Modalities:
    if len(set(mods.names)) != len(mods.names):
        raise ValueError(f"A modality is named twice: {mods.names}.")
    for name, names in zip(mods.names, mods.var_names):
        if len(names) == 0:
            raise ValueError(f"Modality {name!r} has no features; drop it or pass its features.")
        if names.has_duplicates:
            raise ValueError(f"Modality {name!r} has duplicated feature names; make them unique first "
                             "(e.g. mdata.mod[name].var_names_make_unique()).")
    return mods


class HStackRowMatrix(RowMatrix):
    """Matrices of the same cells side by side, read row block by row block (none is densified or copied).

    Parameters
    ----------
    parts
        One :class:`~dgdlens.data.RowMatrix` per block of columns.
    row_maps
        Per part, the row of each cell in it (``-1``: the cell is missing there and reads as zeros), or
        ``None`` for the identity.
    n_obs
        Number of cells.
    """

    def __init__(self, parts: list[RowMatrix], row_maps: list[np.ndarray | None], n_obs: int):  # noqa: D107
        self.parts = list(parts)
        self.row_maps = [None if r is None else np.asarray(r, dtype=np.int64) for r in row_maps]
        self.X = None
        self.kind = "backed_sparse" if any(p.backed for p in parts) else "sparse"
        self.shape = (int(n_obs), int(sum(p.n_vars for p in parts)))

    def _part_rows(self, part: RowMatrix, rows: np.ndarray | None, index: np.ndarray):
        if rows is None:
            block = part.read_rows(index)
            return block if sp.issparse(block) else sp.csr_matrix(block)
        src = rows[index]
        have = src >= 0
        block = part.read_rows(src[have])
        block = block if sp.issparse(block) else sp.csr_matrix(block)
        # scatter the rows present into an all-zero CSR of len(index) rows
        counts = np.zeros(len(index), dtype=np.int64)
        counts[have] = np.diff(block.indptr)
        indptr = np.concatenate([[0], np.cumsum(counts)])
        return sp.csr_matrix((block.data, block.indices, indptr), shape=(len(index), part.n_vars))

    def read_rows(self, index, *, max_gap: int = 64):
        """Rows ``index`` (any order) of every part, side by side, as CSR.

        Parameters
        ----------
        index
            Row indices (any order, repeats allowed).
        max_gap
            Unused (each part reads its own rows its own way).

        Returns
        -------
        scipy.sparse.csr_matrix
            ``len(index) x n_vars``.
        """
        index = np.asarray(index, dtype=np.int64)
        return sp.hstack([self._part_rows(p, r, index) for p, r in zip(self.parts, self.row_maps)], format="csr")

    def _slice(self, start: int, stop: int):
        return self.read_rows(np.arange(start, stop))
