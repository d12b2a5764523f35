"""In-silico perturbation through a multi-modal DGD: change one gene's expression, re-infer the latent, and
read the predicted change in another modality (multiDGD's ``gene2peak``).

multiDGD's version zeroes the gene in the data and takes one Adam step on the latent using only that gene's
loss. Here the latent is re-inferred properly, from the cells' whole RNA profile with the gene changed (the
model's held-out inference, decoder frozen, the mixture prior included), and compared with the latent
inferred the same way from the unchanged RNA: the difference isolates the gene's effect from the
difference between a joint and an RNA-only embedding. Other modalities are left out of the inference
on purpose: their observed values would pin the latent where it is.

The result is an estimate of association through the model's latent space, not a causal effect: a peak
changes when the latent move that explains the gene's change also changes that peak.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["gene2peak"]


def gene2peak(model, data, gene: str, *, fold: float = 0.0, target: str = "atac", source: str = "rna",
              cells=None, min_count: int = 1, max_cells: int | None = 2000, refine_steps: int = 100,
              seed: int = 0, **infer_kwargs) -> pd.DataFrame:
    """Predicted change of every feature of ``target`` (peaks) when ``gene``'s counts are multiplied by ``fold``.

    Parameters
    ----------
    model
        A trained multi-modal :class:`dgdlens.DGD` (built on a MuData with ``source`` and ``target``).
    data
        The cells: a MuData holding the ``source`` modality (others are ignored), or an AnnData of it.
    gene
        A feature name of ``source``.
    fold
        Factor on the gene's counts (``0``: knock-out, as multiDGD; ``4``: over-expression), rounded to
        integer counts.
    target, source
        Modality read out and modality perturbed.
    cells
        Indices or boolean mask of the cells to perturb; default the cells with at least ``min_count``
        counts of the gene (a knock-out changes nothing in the others).
    min_count
        Cells need this many counts of the gene to be perturbed by default.
    max_cells
        Perturb at most this many cells (a seeded random subsample; ``None``: all).
    refine_steps
        After the usual embedding of the unchanged cells, both the unchanged and the changed latents take
        this many further steps from there (no early stop), so that the two differ only by the gene's
        effect (models without covariates; with covariates both are embedded the usual way).
    seed
        Seeds the subsample.
    **infer_kwargs
        Options of the held-out inference (``n_steps``, ``lr``, ``batch_size``, ``progress``, ...).

    Returns
    -------
    pandas.DataFrame
        One row per ``target`` feature, sorted by ``|delta|`` (largest first): ``delta`` the mean change of the
        predicted value over the perturbed cells (probability for a binary modality, expected counts at each
        cell's depth otherwise; at the training median depth for cells without ``target`` data),
        ``log2fc`` the log2 ratio of the mean predictions (pseudocount 1e-6), ``baseline`` the mean
        prediction before. ``attrs`` holds ``gene``, ``fold`` and ``n_cells``.

    Raises
    ------
    ValueError
        For a one-modality model, an unknown modality or gene, or no cell to perturb.
    """
    if not getattr(model, "is_multimodal", False):
        raise ValueError("gene2peak needs a DGD built on several modalities (a MuData with RNA and ATAC).")
    model._modality_index(target)
    genes = model.modality_var_names(source)
    if gene not in genes:
        raise ValueError(f"{gene!r} is not a feature of modality {source!r}.")
    if not np.isfinite(fold) or fold < 0:
        raise ValueError(f"fold must be finite and >= 0, got {fold}.")
    rna = _source_anndata(data, source)
    names = pd.Index(rna.var_names)
    col = names.get_loc(gene)
    X = sp.csr_matrix(rna.X)
    counts = np.asarray(X[:, col].todense()).ravel()
    if cells is None:
        idx = np.flatnonzero(counts >= min_count)
    else:
        mask = np.asarray(cells)
        idx = np.flatnonzero(mask) if mask.dtype == bool else mask.astype(np.int64)
    if max_cells is not None and len(idx) > max_cells:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_cells, replace=False))
    if len(idx) == 0:
        raise ValueError(f"No cell to perturb: none has {min_count} or more counts of {gene!r}.")
    import anndata as ad  # imported here: both are dependencies, but importing mudata costs time
    import mudata as md

    base = ad.AnnData(X[idx].astype(np.float32), obs=rna.obs.iloc[idx].copy(), var=rna.var[[]].copy())
    changed = base.X.tolil(copy=True)
    changed[:, col] = np.rint(counts[idx] * fold).reshape(-1, 1)
    pert = ad.AnnData(changed.tocsr(), obs=base.obs.copy(), var=base.var.copy())
    empty = np.asarray(pert.X.sum(1)).ravel() == 0
    if empty.any():  # a cell whose only counts were the gene: nothing left to infer from
        keep = ~empty
        base, pert = base[keep].copy(), pert[keep].copy()
    depth = _target_depth(model, data, target, base.obs_names)
    kw = {"progress": False, **infer_kwargs}
    # one-modality MuDatas: the model embeds them from that modality alone
    base, pert = md.MuData({source: base}), md.MuData({source: pert})
    z0 = model.get_latent_representation(base, **kw)
    if model.has_covariates:
        z1 = model.get_latent_representation(pert, **kw)
    else:
        # both continue from the same latents with the same fixed number of steps (no early stop), so
        # that their difference is the gene's effect, not a difference in where the optimiser stopped
        z0, z1 = (_continue(model, data_, z0, refine_steps) for data_ in (base, pert))
    p0 = model.predict_modality(base, target, z=z0, library_size=depth, **kw)
    p1 = model.predict_modality(pert, target, z=z1, library_size=depth, **kw)
    before, after = p0.mean(0), p1.mean(0)
    table = pd.DataFrame({"delta": (p1 - p0).mean(0), "log2fc": np.log2((after + 1e-6) / (before + 1e-6)),
                          "baseline": before}, index=model.modality_var_names(target))
    table.index.name = "feature"
    table = table.iloc[np.argsort(-np.abs(table["delta"].to_numpy()), kind="stable")]
    table.attrs.update({"gene": gene, "fold": float(fold), "n_cells": int(len(base))})
    return table


def _continue(model, data, z0: np.ndarray, n_steps: int) -> np.ndarray:
    """``n_steps`` Adam steps of the latents ``z0`` on the cells' data (decoder frozen, prior included)."""
    import torch

    from .nn.module import frozen
    from .train.inference import optimise_latents

    matrix, lib, observed = model._new_data(data, None)
    dev = model.device
    x = torch.from_numpy(matrix.rows(np.arange(matrix.n_obs))).to(dev)
    scale = torch.from_numpy(lib).to(dev)
    module = model.module

    def objective(data, z_, scale_):
        x_, constant = data
        return module.recon_nll(x_, z_, scale_, constant) + module.prior_nll(z_)

    module.eval()
    with frozen(module), module.likelihood.observe(observed):
        data = (x, module.recon_constant(x, scale))  # the count-only terms, once rather than every step
        z = optimise_latents(objective, data, scale, torch.from_numpy(z0).to(dev), n_steps, 1e-2, (0.5, 0.7), tol=0.0)
    return z.detach().cpu().numpy()


def _source_anndata(data, source: str):
    if type(data).__name__ == "MuData":
        if source not in data.mod:
            raise ValueError(f"The MuData has no {source!r} modality (it has {list(data.mod)}).")
        return data.mod[source]
    return data


def _target_depth(model, data, target: str, cells: pd.Index) -> np.ndarray:
    """Each cell's depth in ``target`` when the data have it, else the training median."""
    m = model._modality_index(target)
    depth = np.full(len(cells), model._median_library(m), dtype=np.float32)
    if type(data).__name__ == "MuData" and target in data.mod:
        own = data.mod[target]
        pos = pd.Index(own.obs_names).get_indexer(cells)
        totals = np.asarray(sp.csr_matrix(own.X).sum(1)).ravel()
        have = pos >= 0
        depth[have] = np.where(totals[pos[have]] > 0, totals[pos[have]], depth[have])
    return depth
