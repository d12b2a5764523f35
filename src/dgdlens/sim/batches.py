"""Cell types seen through batches: negative-binomial counts with known batch effects (the ground truth
for covariate models and integration benchmarks).

Every cell has a type ``t`` and a batch ``b``. Its expected counts are

    mu_g = library * softmax_g( log_profile[t, g] + gene_shift[b, g] )

where ``log_profile`` is the type's log expression (a shared baseline plus type-specific marker genes),
``gene_shift[b]`` the batch's gene-wise log-scale effect (normal, ``batch_effect_sd``) and ``library`` a
log-normal library size whose median is shifted per batch (``library_shift[b]``, a log-scale effect).
Counts are NB with dispersion ``dispersion`` (variance ``mu + mu^2 / dispersion``). One batch lacks some
cell types, and the last ``n_unseen_batches`` batches are flagged ``obs["unseen"]`` (to hold out of
training and embed as new batches).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["simulate_batches"]


def simulate_batches(n_cells_per_batch: int = 300, n_genes: int = 200, *, n_types: int = 4, n_batches: int = 3,
                     n_unseen_batches: int = 1, batch_effect_sd: float = 0.7, library_shift_sd: float = 0.4,
                     type_effect: float = 2.0, markers_per_type: int = 15, missing_types: dict | None = None,
                     mean_library: float = 1500.0, dispersion: float = 5.0, seed: int = 0):
    """Simulate counts of ``n_types`` cell types in ``n_batches`` training batches + ``n_unseen_batches``.

    Parameters
    ----------
    n_cells_per_batch, n_genes, n_types
        Size of each batch, genes, cell types (types are spread evenly over a batch's allowed types).
    n_batches, n_unseen_batches
        Batches meant for training, and extra batches flagged ``obs["unseen"] = True`` (named after them).
    batch_effect_sd, library_shift_sd
        Standard deviations of the per-batch gene-wise log shifts and of the per-batch log library shift.
    type_effect, markers_per_type
        Log-fold change of each type's marker genes (markers are disjoint gene blocks).
    missing_types
        ``{batch index: [type indices]}`` a batch lacks; default: batch 1 lacks type 0 (when both exist).
    mean_library, dispersion
        Median library size before the batch shift; NB dispersion (inverse overdispersion).
    seed
        Seeds everything.

    Returns
    -------
    AnnData with integer counts in ``X`` (CSR, float32), ``obs["cell_type"]``, ``obs["batch"]`` (categorical,
    ``batch0``...), ``obs["unseen"]`` (bool) and ``obs["library"]``, and the truth in ``uns["batch_truth"]``:
    ``gene_shift`` (batches x genes), ``library_shift`` (batches), ``log_profile`` (types x genes, before
    batch effects), ``composition`` (types x genes, the batch-free expected composition), ``missing_types``.
    """
    import anndata as ad

    if min(n_cells_per_batch, n_genes, n_types, n_batches) < 1 or n_unseen_batches < 0:
        raise ValueError("n_cells_per_batch, n_genes, n_types and n_batches must be positive")
    if n_types * markers_per_type > n_genes:
        raise ValueError(f"{n_types} types x {markers_per_type} markers need at least that many genes ({n_genes}).")
    rng = np.random.default_rng(seed)
    total = n_batches + n_unseen_batches
    if missing_types is None:
        missing_types = {1: [0]} if n_batches > 1 and n_types > 1 else {}
    missing_types = {int(b): [int(t) for t in ts] for b, ts in missing_types.items()}

    base = rng.normal(0.0, 1.0, n_genes)
    log_profile = np.tile(base, (n_types, 1))
    for t in range(n_types):
        log_profile[t, t * markers_per_type:(t + 1) * markers_per_type] += type_effect
    gene_shift = rng.normal(0.0, batch_effect_sd, (total, n_genes))
    library_shift = rng.normal(0.0, library_shift_sd, total)

    types, batches, libs = [], [], []
    for b in range(total):
        allowed = [t for t in range(n_types) if t not in missing_types.get(b, [])]
        types.append(np.asarray(allowed)[np.arange(n_cells_per_batch) % len(allowed)])
        batches.append(np.full(n_cells_per_batch, b))
        libs.append(rng.lognormal(np.log(mean_library) + library_shift[b], 0.3, n_cells_per_batch))
    types, batches, libs = np.concatenate(types), np.concatenate(batches), np.concatenate(libs)
    logits = log_profile[types] + gene_shift[batches]
    comp = np.exp(logits - logits.max(1, keepdims=True))
    comp /= comp.sum(1, keepdims=True)
    mu = comp * libs[:, None]
    counts = rng.poisson(rng.gamma(dispersion, mu / dispersion)).astype(np.float32)
    empty = counts.sum(1) == 0
    counts[empty, 0] = 1.0

    order = rng.permutation(len(types))  # cells of all batches interleaved, as real data often are
    names = [f"batch{b}" for b in range(total)]
    obs = pd.DataFrame({
        "cell_type": pd.Categorical([f"type{t}" for t in types[order]], categories=[f"type{t}" for t in range(n_types)]),
        "batch": pd.Categorical([names[b] for b in batches[order]], categories=names),
        "unseen": batches[order] >= n_batches,
        "library": libs[order],
    }, index=[f"cell{i}" for i in range(len(order))])
    adata = ad.AnnData(sp.csr_matrix(counts[order]), obs=obs,
                       var=pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)]))
    base_comp = np.exp(log_profile - log_profile.max(1, keepdims=True))
    adata.uns["batch_truth"] = {
        "gene_shift": gene_shift, "library_shift": library_shift, "log_profile": log_profile,
        "composition": base_comp / base_comp.sum(1, keepdims=True),
        "missing_types": {names[b]: [f"type{t}" for t in ts] for b, ts in missing_types.items() if b < total},
        "batch_names": names, "n_seen_batches": n_batches,
    }
    return adata
