"""AnnData-first tools (scanpy-style ``dl.tl``): each verb reads from an AnnData and writes its result back.

>>> import dgdlens as dl
>>> model.add_to_adata(adata)                                   # obsm["X_dgd"]
>>> sae = dl.tl.sae(adata, use_rep="X_dgd", n_latents=256, k=8)  # obsm["X_sae"], uns["X_sae"]
>>> dl.tl.annotate_features(adata, use_rep="X_sae", gene_sets="go_bp")   # uns["dgdlens_lens"]
>>> dl.tl.steer(adata, model, sae, feature=3, mode="add", value=2.0)   # uns["dgdlens_steer"]
>>> dl.tl.umap(adata, use_rep="X_dgd")                            # obsm["X_umap"]
>>> dl.pl.embedding(adata, basis="X_umap", color="cell_type")

Conventions, as in scanpy:

- The input embedding is ``adata.obsm[use_rep]`` (``use_rep="X"``: ``adata.X``); expression is
  ``adata.X``, ``adata.layers[layer]``, or ``adata.raw.X`` for ``layer="raw"``. Plotting functions
  (``dl.pl``) name the embedding they draw ``basis`` instead, like ``sc.pl``.
- Results go under ``key_added`` (``obsm`` for per-cell matrices, ``uns`` for tables and parameters);
  everything written is ``.h5ad``-serialisable.
- Options are keyword-only. ``copy=False`` (default) writes into ``adata`` and returns ``None``;
  ``copy=True`` works on a copy and returns it. :func:`sae` is the exception: a trained SAE is a
  model, which AnnData cannot store, so it always writes into ``adata`` and returns the SAE.

The array-level functions stay where they are: :func:`dgdlens.sae.train_sae`,
:func:`dgdlens.lens.annotate`, :func:`dgdlens.steer.steer`.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["sae", "annotate_features", "steer", "umap"]


def _is_anndata(obj) -> bool:
    return type(obj).__name__ == "AnnData" and hasattr(obj, "obsm") and hasattr(obj, "obs")


def _check_adata(adata, verb: str) -> None:
    if not _is_anndata(adata):
        raise TypeError(f"dl.tl.{verb} needs an AnnData, got {type(adata).__name__}; wrap arrays with "
                        "anndata.AnnData(X) or use the array-level function.")


def _rep(adata, use_rep: str, what: str = "use_rep"):
    """``adata.obsm[use_rep]`` (``"X"``: ``adata.X``), with an error that names the available keys."""
    if use_rep == "X":
        return adata.X
    if use_rep not in adata.obsm:
        raise ValueError(f"{what}={use_rep!r} is not in adata.obsm (available: "
                         f"{list(adata.obsm.keys())}); compute it first or pass another key.")
    return adata.obsm[use_rep]


def _scalars(mapping: dict) -> dict:
    """The scalar entries of ``mapping`` (what ``.h5ad`` stores as plain values), ``None`` as ``"None"``."""
    return _uns_safe({k: v for k, v in mapping.items() if v is None or isinstance(v, (str, int, float, bool))})


def _uns_safe(mapping: dict) -> dict:
    """``None`` cannot be written to ``.h5ad``: store it as the string ``"None"``."""
    return {k: ("None" if v is None else v) for k, v in mapping.items()}


# -------------------------------------------------------------------------------------------- sae

def sae(
    adata,
    use_rep: str = "X_dgd",
    *,
    kind: str = "topk",
    n_latents: int | None = None,
    k: int | None = None,
    max_epochs: int | None = None,
    key_added: str = "X_sae",
    device: str = "auto",
    seed: int = 0,
    **train_kwargs,
):
    """Train a sparse autoencoder on ``adata.obsm[use_rep]`` and store its activations.

    Parameters
    ----------
    adata
        Cells with the embedding in ``obsm[use_rep]`` (e.g. ``model.add_to_adata(adata)``).
    use_rep
        The embedding to train on (``"X"``: ``adata.X``).
    kind, n_latents, k, max_epochs, device, seed, **train_kwargs
        Passed to :func:`dgdlens.sae.train_sae` (e.g. ``batch_size``, ``validation_fraction``,
        ``preset="paper"``).
    key_added
        ``obsm[key_added]``: the activations (cells x latents, CSR); ``uns[key_added]``: the SAE's
        summary (``use_rep``, ``kind``, ``n_latents``, ``d_in``, ``config`` and ``train_summary`` (their
        scalar entries), and the firing statistics of :func:`dgdlens.sae.activations.activation_summary`).

    Returns
    -------
    The trained SAE (AnnData cannot hold a model: keep it, or ``sae.save(path)``). Unlike the other
    verbs this one has no ``copy``: it always writes into ``adata``.
    """
    from .sae import train_sae
    from .sae.activations import activation_summary

    _check_adata(adata, "sae")
    _rep(adata, use_rep)  # a clear error before any training
    model = train_sae(adata, kind, use_rep=use_rep, n_latents=n_latents, k=k, max_epochs=max_epochs,
                      device=device, seed=seed, **train_kwargs)
    activations = sp.csr_matrix(model.encode(adata, use_rep=use_rep))
    adata.obsm[key_added] = activations
    adata.uns[key_added] = {
        "use_rep": use_rep, "kind": str(kind), "n_latents": int(model.n_latents), "d_in": int(model.d_in),
        "config": _scalars(model.config.to_dict()),
        "train_summary": _scalars(getattr(model, "train_summary_", {})),
        "activation_summary": activation_summary(activations),
    }
    return model


# ---------------------------------------------------------------------------------------- annotate

def annotate_features(
    adata,
    use_rep: str = "X_sae",
    *,
    gene_sets="go_bp",
    layer: str | None = None,
    gene_symbols: str | None = None,
    key_added: str = "dgdlens_lens",
    copy: bool = False,
    **annotate_kwargs,
):
    """Annotate every SAE feature in ``adata.obsm[use_rep]`` with gene sets (:func:`dgdlens.lens.annotate`).

    A backed AnnData (``anndata.read_h5ad(path, backed="r")`` or a zarr store) is streamed in chunks of
    cells, never loaded (``max_memory=``, ``chunk_cells=`` tune it; see :mod:`dgdlens.lens.streaming`).

    Parameters
    ----------
    adata
        Cells x genes with the SAE activations in ``obsm[use_rep]`` (e.g. from :func:`sae`).
    use_rep
        The activations (cells x features, dense or sparse).
    gene_sets
        ``"go_bp"``, ``"go_mf"``, ``"go_cc"``, ``"hallmark"``, ``"reactome_wp_pid"``, a GMT path or a dict.
    layer
        Expression: ``None`` for ``adata.X``, a name in ``adata.layers``, or ``"raw"`` for ``adata.raw.X``
        (genes then from ``adata.raw``).
    gene_symbols
        Column of ``var`` (``raw.var`` with ``layer="raw"``) with gene symbols, when ``var_names`` are
        other identifiers.
    key_added
        ``uns[key_added]`` receives ``{"results": DataFrame, "features": DataFrame, "settings": dict,
        "gene_sets": dict}``; ``results`` equals ``dl.lens.annotate(...)`` and ``features`` its
        per-feature summary (``return_features=True``).
    copy
        Work on a copy of ``adata`` and return it.
    **annotate_kwargs
        Passed to :func:`dgdlens.lens.annotate` (``features``, ``compat``, ``max_padj``, ``seed``, ...).

    Returns
    -------
    AnnData or None
        The annotated copy with ``copy=True``, else ``None`` (``adata`` is changed in place).
    """
    from .data.anndata import get_matrix, var_names_for
    from .lens import annotate

    _check_adata(adata, "annotate_features")
    if "return_features" in annotate_kwargs:
        raise ValueError("annotate_features always stores the per-feature summary; "
                         "do not pass return_features.")
    adata = adata.copy() if copy else adata
    activations = _rep(adata, use_rep)
    expression = get_matrix(adata, layer).X
    var_names = var_names_for(adata, layer)
    if gene_symbols is not None:
        var = adata.raw.var if layer == "raw" else adata.var
        if gene_symbols not in var.columns:
            raise ValueError(f"{'adata.raw.var' if layer == 'raw' else 'adata.var'} has no column "
                             f"{gene_symbols!r} (columns: {list(var.columns)}).")
        var_names = var[gene_symbols].astype(str)
    results, features = annotate(activations, expression, np.asarray(var_names), gene_sets,
                                 return_features=True, **annotate_kwargs)
    adata.uns[key_added] = {
        "results": results.copy(), "features": features.copy(),
        "settings": _uns_safe(dict(results.attrs.get("settings", {}), use_rep=use_rep, layer=layer)),
        "gene_sets": dict(results.attrs.get("gene_sets", {})),
    }
    return adata if copy else None


# ------------------------------------------------------------------------------------------- steer

def steer(
    adata,
    model,
    sae,
    feature: int,
    *,
    use_rep: str | None = None,
    mode: str = "clamp",
    value: float | None = None,
    layer: str | None = None,
    key_added: str = "dgdlens_steer",
    copy: bool = False,
    **kwargs,
):
    """Steer SAE feature ``feature`` in ``adata``'s cells and store the changed genes (:func:`dgdlens.steer.steer`).

    Parameters
    ----------
    adata
        Cells x genes; the latents come from ``obsm[use_rep]`` or, with ``use_rep=None``, from the model.
    model, sae
        The generative model and the SAE trained on its latents.
    feature, mode, value
        The edit: ``"clamp"`` to ``value``, ``"add"`` ``value``, ``"scale"`` by ``value``, or ``"ablate"``.
    layer
        Counts the model reads (library sizes, and latents when ``use_rep=None``): ``None`` for
        ``adata.X``, a layer name, or ``"raw"`` for ``adata.raw.X``.
    key_added
        ``uns[key_added]`` receives ``genes`` (one row per gene: ``log2fc``, ``pval``, ``padj``,
        ``direction``, ...), ``enrichment`` (changed genes against gene sets), ``cells`` (indices of the
        steered cells), ``params``, ``n_controls``, ``gene_set_tests`` (gene sets against the control
        edits, when gene sets are given), ``manifold`` (per-cell prior log-density before and after the
        edit and the off-manifold flags, for a model with a prior), and with ``random_control=True`` a
        ``control`` dict with the same two tables. The per-cell latents and decoded expression are not
        stored: call :func:`dgdlens.steer.steer` for those.
    copy
        Work on a copy of ``adata`` and return it.
    **kwargs
        Passed to :func:`dgdlens.steer.steer` (``cells``, ``random_control``, ``gene_sets``, ``alpha``,
        ``min_log2fc``, ``device``, ...).

    Returns
    -------
    AnnData or None
        The steered copy with ``copy=True``, else ``None`` (``adata`` is changed in place).
    """
    from .steer import steer as steer_array

    _check_adata(adata, "steer")
    adata = adata.copy() if copy else adata
    if use_rep is not None:
        _rep(adata, use_rep)
    result = steer_array(model, sae, adata, feature=feature, mode=mode, value=value, layer=layer,
                         use_rep=use_rep, **kwargs)
    stored = {
        "genes": result.genes.copy(), "enrichment": result.enrichment.copy(),
        "cells": np.asarray(result.cells, dtype=np.int64),
        "params": _uns_safe({"feature": int(result.feature), "mode": result.mode, "value": result.value,
                             "use_rep": use_rep, "layer": layer, "n_cells": int(len(result.cells))}),
    }
    stored["n_controls"] = _uns_safe(dict(result.n_controls))
    if result.gene_set_tests is not None:
        stored["gene_set_tests"] = result.gene_set_tests.copy()
    if result.manifold is not None:
        stored["manifold"] = _uns_safe(dict(result.manifold))
    if result.control is not None:
        stored["control"] = {"genes": result.control.genes.copy(),
                             "enrichment": result.control.enrichment.copy()}
    adata.uns[key_added] = stored
    return adata if copy else None


# -------------------------------------------------------------------------------------------- umap

def umap(
    data,
    use_rep: str = "X_dgd",
    *,
    n_neighbors: int = 15,
    min_dist: float = 0.5,
    metric: str = "euclidean",
    seed: int = 0,
    key_added: str = "X_umap",
    copy: bool = False,
):
    """UMAP of an embedding (scanpy's kNN graph + UMAP), stored in ``obsm[key_added]``.

    Parameters
    ----------
    data
        An AnnData with the embedding in ``obsm[use_rep]``; or the embedding itself (cells x dims,
        finite), in which case the coordinates are returned (as ``sc.pp`` functions do for arrays).
    use_rep
        The embedding (``"X"``: ``adata.X``); ignored for array input.
    n_neighbors, min_dist, metric
        Passed to ``scanpy.pp.neighbors`` / ``scanpy.tl.umap``. ``n_neighbors`` is capped at
        ``n_cells - 1`` so tiny inputs still work.
    seed
        Random state of the kNN search and the layout; the same seed gives the same coordinates.
    key_added
        ``obsm[key_added]``: cells x 2 coordinates (float64); ``uns[key_added]``: the parameters.
        The caller's kNN graph (``obsp``) is left untouched.
    copy
        Work on a copy of the AnnData and return it.

    Returns
    -------
    Array input: the coordinates (cells x 2). AnnData input: ``None``, or the copy with ``copy=True``.
    """
    import anndata as ad
    import scanpy as sc

    latent = _rep(data, use_rep) if _is_anndata(data) else data
    if sp.issparse(latent):
        latent = latent.toarray()
    z = np.asarray(latent, dtype=np.float32)
    if z.ndim != 2:
        raise ValueError(f"the embedding must be a 2-D array (cells x dimensions), got shape {z.shape}.")
    if z.shape[0] < 3:
        raise ValueError(f"UMAP needs at least 3 cells, got {z.shape[0]}.")
    if not np.isfinite(z).all():
        raise ValueError("the embedding contains NaN or infinite values; UMAP cannot place those cells.")
    if n_neighbors < 2:
        raise ValueError(f"n_neighbors must be >= 2, got {n_neighbors}.")
    # A throw-away AnnData keeps the caller's graph untouched; X is empty, the embedding sits in obsm.
    holder = ad.AnnData(X=np.zeros((z.shape[0], 0), dtype=np.float32))
    holder.obsm["X_rep"] = z
    sc.pp.neighbors(holder, use_rep="X_rep", n_neighbors=min(n_neighbors, z.shape[0] - 1),
                    metric=metric, random_state=seed)
    sc.tl.umap(holder, min_dist=min_dist, random_state=seed)
    coords = np.asarray(holder.obsm["X_umap"], dtype=np.float64)
    if not _is_anndata(data):
        return coords
    adata = data.copy() if copy else data
    adata.obsm[key_added] = coords
    adata.uns[key_added] = {"params": {"use_rep": use_rep, "n_neighbors": int(n_neighbors),
                                       "min_dist": float(min_dist), "metric": metric, "seed": int(seed)}}
    return adata if copy else None
