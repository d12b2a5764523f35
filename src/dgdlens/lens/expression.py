"""Bring an expression matrix onto the scale the lens tests on: log1p of per-cell normalised values.

``expression`` may hold raw counts, log-normalised values, or a decoder's predicted means, sparse or
dense. ``kind="auto"`` decides which, from the values themselves:

- every value an integer -> ``"counts"``;
- non-integer with a maximum above 30 (impossible after ``log1p`` of per-10k values), or every row
  summing to 1 (a decoder's composition output) -> ``"means"``;
- otherwise -> ``"lognorm"`` (assumed to be natural ``log1p`` of per-cell normalised values, scanpy's
  ``normalize_total`` + ``log1p``).

Counts and means are scaled so each cell sums to ``target_sum`` (1e4) and then ``log1p``-transformed;
log-normalised input is used as it is. Pass ``kind=`` explicitly whenever you know it.
The input is never modified; the prepared matrix is a float32 copy (CSR unless the data are dense).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["PreparedExpression", "prepare_expression", "detect_expression_kind", "prepare_block", "ValueFacts"]

_KINDS = ("auto", "counts", "lognorm", "means", "raw")


@dataclass
class PreparedExpression:
    """Expression ready for group statistics.

    Attributes
    ----------
    X
        cells x genes, float32, CSR (or C-contiguous dense when the data are mostly non-zero).
    kind
        What the input was taken to be: ``"counts"``, ``"lognorm"``, ``"means"`` or ``"raw"`` (used as is).
    scale
        ``"log1p"`` (normalised then log1p, or given that way) or ``"linear"`` (``kind="raw"``).
    gene_names
        Gene identifiers (strings).
    """

    X: sp.csr_matrix | np.ndarray
    kind: str
    scale: str
    gene_names: np.ndarray
    target_sum: float | None = None
    _X_squared: object = field(default=None, repr=False)

    @property
    def n_cells(self) -> int:
        return self.X.shape[0]

    @property
    def n_genes(self) -> int:
        return self.X.shape[1]

    @property
    def is_sparse(self) -> bool:
        return sp.issparse(self.X)

    def squared(self):
        """``X**2`` in float64 (cached), for the scipy engine; float32 squares would lose the precision
        the one-pass variances need."""
        if self._X_squared is None:
            X = self.X.astype(np.float64)
            self._X_squared = X.multiply(X).tocsr() if self.is_sparse else X * X
        return self._X_squared

    def expressed_genes(self) -> np.ndarray:
        """Boolean mask of genes with a non-zero value in at least one cell."""
        if self.is_sparse:
            counts = np.bincount(self.X.indices[self.X.data != 0], minlength=self.n_genes)
            return counts > 0
        return np.any(self.X != 0, axis=0)


def _to_matrix(expression):
    """numpy / scipy / torch / DataFrame -> (matrix, column names or None)."""
    names = None
    if isinstance(expression, pd.DataFrame):
        names = expression.columns.astype(str).to_numpy()
        expression = expression.to_numpy()
    try:
        import torch

        if isinstance(expression, torch.Tensor):
            expression = expression.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    if sp.issparse(expression):
        return expression, names
    if hasattr(expression, "to_memory"):  # anndata backed sparse dataset
        return expression.to_memory(), names
    arr = np.asarray(expression)
    if arr.ndim != 2:
        raise ValueError(f"expression must be a 2-D cells x genes matrix, got shape {arr.shape}.")
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
        raise ValueError(f"expression must be numeric, got dtype {arr.dtype}.")
    return arr, names


def _iter_blocks(X, chunk: int = 4096):
    for start in range(0, X.shape[0], chunk):
        yield start, min(start + chunk, X.shape[0])


class ValueFacts:
    """What :func:`detect_expression_kind` needs, accumulated over row blocks (in memory or streamed):
    integer-ness, minimum, maximum and whether every non-empty row sums to 1. Non-finite values raise."""

    def __init__(self) -> None:
        self.all_integer = True
        self.vmax = -np.inf
        self.vmin = np.inf
        self.rows_not_one = 0

    def add(self, block, start: int, stop: int) -> np.ndarray:
        """Check the rows ``start:stop`` (CSR or dense ``block``) and return their sums (float64)."""
        vals = block.data if sp.issparse(block) else np.asarray(block).ravel()
        if vals.size:
            if not np.all(np.isfinite(vals)):
                raise ValueError(
                    f"expression contains NaN or infinite values (rows {start}-{stop}); remove or impute them first."
                )
            self.vmin = min(self.vmin, float(vals.min()))
            self.vmax = max(self.vmax, float(vals.max()))
            if self.all_integer:
                self.all_integer = bool(np.all(vals == np.round(vals)))
        sums = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
        nonempty = sums[sums > 0]
        # np.allclose(sums, 1, rtol=1e-3, atol=0), row by row so that blocks can be combined
        self.rows_not_one += int(np.count_nonzero(np.abs(nonempty - 1.0) > 1e-3))
        return sums

    def check_sign(self, allow_negative: bool) -> None:
        """Raise for negative values unless ``allow_negative``."""
        if not allow_negative and self.vmin < 0:
            raise ValueError(
                f"expression contains negative values (min {self.vmin:g}): it looks scaled or centred (e.g. "
                "sc.pp.scale). Pass counts, log-normalised values (normalize_total + log1p) or a decoder's means "
                "instead."
            )

    def as_dict(self) -> dict:
        """The facts as :func:`detect_expression_kind` reads them."""
        return {"all_integer": self.all_integer, "max": self.vmax, "min": self.vmin,
                "rows_not_one": self.rows_not_one}


def _check_values(X, *, allow_negative: bool) -> dict:
    """Finite/non-negative checks and the facts ``detect_expression_kind`` needs, one pass in row blocks."""
    facts = ValueFacts()
    row_sums = np.empty(X.shape[0])
    for start, stop in _iter_blocks(X):
        row_sums[start:stop] = facts.add(X[start:stop], start, stop)
    facts.check_sign(allow_negative)
    return {**facts.as_dict(), "row_sums": row_sums}


def detect_expression_kind(X, facts: dict | None = None) -> str:
    """``"counts"``, ``"means"`` or ``"lognorm"`` by the rules in the module docstring."""
    facts = facts or _check_values(X, allow_negative=True)
    if facts["all_integer"]:
        return "counts"
    if facts["max"] > 30 or facts["rows_not_one"] == 0:
        return "means"
    return "lognorm"


def prepare_expression(
    expression,
    gene_names=None,
    *,
    kind: str = "auto",
    target_sum: float = 1e4,
    dense_threshold: float = 0.5,
) -> PreparedExpression:
    """Validate ``expression`` and return it log-normalised as float32 (see the module docstring).

    Parameters
    ----------
    expression
        cells x genes: numpy array, scipy sparse matrix, torch tensor or DataFrame (columns = genes).
    gene_names
        Gene identifiers, one per column (taken from a DataFrame's columns when omitted).
    kind
        ``"auto"``, ``"counts"``, ``"lognorm"``, ``"means"``, or ``"raw"`` (use the values as they are,
        on their own scale; the reference method's behaviour).
    target_sum
        Per-cell total after normalisation of counts or means.
    dense_threshold
        Dense input with at least this fraction of non-zeros stays dense; sparser input becomes CSR.

    Returns
    -------
    PreparedExpression
        The prepared float32 matrix (CSR, or dense when mostly non-zero), the kind detected or given,
        its scale (``"log1p"`` or ``"linear"``), the gene names and ``target_sum`` where it applied.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}.")
    X, df_names = _to_matrix(expression)
    if gene_names is None:
        gene_names = df_names
    gene_names = check_gene_names(gene_names, X.shape[1])
    if X.shape[0] < 2 or X.shape[1] < 1:
        raise ValueError(f"expression needs at least 2 cells and 1 gene, got shape {X.shape}.")
    if sp.issparse(X) and X.format != "csr":
        X = sp.csr_matrix(X)
    facts = _check_values(X, allow_negative=(kind == "raw"))
    detected = detect_expression_kind(X, facts) if kind == "auto" else kind
    if detected == "raw":
        out = _as_float32(X, copy=True)
        return PreparedExpression(_finalise(out, dense_threshold), "raw", "linear", gene_names, None)
    if detected in {"counts", "means"}:
        sums = facts["row_sums"]
        # empty cells stay all-zero instead of dividing by zero
        scale = np.divide(target_sum, sums, out=np.zeros_like(sums), where=sums > 0).astype(np.float64)
        out = _scale_rows_log1p(X, scale)
        return PreparedExpression(_finalise(out, dense_threshold), detected, "log1p", gene_names, target_sum)
    out = _as_float32(X, copy=True)
    return PreparedExpression(_finalise(out, dense_threshold), "lognorm", "log1p", gene_names, None)


def check_gene_names(gene_names, n_columns: int) -> np.ndarray:
    """Gene names as an object array of strings, one per column and unique, or an error saying what to do."""
    if gene_names is None:
        raise ValueError("gene_names are required (one per expression column), e.g. gene_names=adata.var_names.")
    names = np.asarray([str(g) for g in gene_names], dtype=object)
    if len(names) != n_columns:
        raise ValueError(f"{len(names)} gene names for {n_columns} expression columns; they must match.")
    index = pd.Index(names)
    if index.has_duplicates:
        raise ValueError(
            f"gene_names contain duplicates (e.g. {index[index.duplicated()].unique()[:5].tolist()}); "
            "make them unique first (adata.var_names_make_unique())."
        )
    return names


def prepare_block(block, kind: str, target_sum: float | None):
    """Rows of the expression prepared as :func:`prepare_expression` prepares the whole matrix (``kind``
    already decided): float32 CSR, values identical to the corresponding rows of the whole result."""
    block = sp.csr_matrix(block) if not sp.issparse(block) or block.format != "csr" else block
    if kind in {"counts", "means"}:
        sums = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
        scale = np.divide(target_sum, sums, out=np.zeros_like(sums), where=sums > 0)
        out = _scale_rows_log1p(block, scale)
    else:
        out = _as_float32(block, copy=True)
    out.sort_indices()
    return out


def _as_float32(X, copy: bool):
    if sp.issparse(X):
        out = X.astype(np.float32, copy=copy)
        out.eliminate_zeros()
        return out
    return np.array(X, dtype=np.float32, copy=copy)


def _scale_rows_log1p(X, scale: np.ndarray):
    if sp.issparse(X):
        out = X.astype(np.float32, copy=True)
        row = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
        out.data = np.log1p(out.data.astype(np.float64) * scale[row]).astype(np.float32)
        out.eliminate_zeros()
        return out
    out = np.empty(X.shape, dtype=np.float32)
    for start, stop in _iter_blocks(X):
        out[start:stop] = np.log1p(np.asarray(X[start:stop], dtype=np.float64) * scale[start:stop, None])
    return out


def _finalise(X, dense_threshold: float):
    if sp.issparse(X):
        X.sort_indices()
        return X
    density = np.count_nonzero(X) / max(X.size, 1)
    if density >= dense_threshold:
        return np.ascontiguousarray(X, dtype=np.float32)
    return sp.csr_matrix(X)
