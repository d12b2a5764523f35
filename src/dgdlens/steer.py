"""Steer one SAE feature and read out the effect through a generative model's decoder.

For latents ``z`` (cells x d) with SAE activations ``f`` and the feature's decoder direction
``w = W_dec[i]`` (input units), the steered latent is

    z' = z + (f'_i - f_i) * w

so the SAE's reconstruction error ``z - decode(f)`` is kept and only the edited feature moves the cell
(the reference decoded the edited activations alone, which also moved unedited cells by the error).
Modes: ``clamp`` (``f'_i = value``), ``add`` (``f_i + value``), ``scale`` (``f_i * value``) and
``ablate`` (``f'_i = 0``). Activations stay non-negative: a negative result is set to 0.

``z`` and ``z'`` are decoded by the model (``decode_latent``, with the cells' library sizes when known).
Per gene, ``log2((mu' + pc) / (mu + pc))`` is computed in every steered cell; the mean over cells is the
log fold change. Decoded values are deterministic, so a test across cells would call almost any
consistent change significant; instead each gene's change is compared with the changes the same
per-cell activation edit makes along ``n_controls`` (200) random directions of the same norm and along
the other live features' decoder directions: an empirical p-value per gene and per gene set, BH across
genes (sets). The prior log-density of the latents before and after the edit is reported and edits that
leave the data manifold are flagged with a warning. Details: :mod:`dgdlens.steer_control`. The changed
genes (up and down apart) are also tested for gene-set over-representation. ``random_control=True``
additionally returns the full result of one random direction of the same norm, scored against the same
controls (about as many genes as the FDR allows should come out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from ._device import resolve_device
from .stats import bh_adjust
from .steer_control import (
    combined_pvalues,
    control_directions,
    decoded_effects,
    gene_set_tests,
    manifold_check,
    reference_latents,
)

__all__ = ["steer", "SteerResult", "STEER_MODES", "steering_summary"]

STEER_MODES = ("clamp", "add", "scale", "ablate")


@dataclass
class SteerResult:
    """What :func:`steer` returns.

    Attributes
    ----------
    feature, mode, value
        The edit.
    cells
        Indices of the steered cells (into the input).
    z, z_steered
        Latents before and after (cells x d).
    activation, activation_steered
        The feature's activation before and after, per cell.
    expression, expression_steered
        Decoded means before and after (cells x genes; counts when library sizes are known,
        otherwise per-cell compositions).
    genes
        One row per gene: ``gene, mean_before, mean_after, log2fc, sd_log2fc_cells, pval, pval_random,
        pval_features, padj, direction``. ``pval`` is the empirical p against the controls chosen by
        ``control`` (default the random directions), ``padj`` its BH adjustment across genes;
        ``sd_log2fc_cells`` (spread of the per-cell log-ratios) is descriptive only.
    enrichment
        ORA of the up and down genes (empty without gene sets or changed genes).
    control
        The same result for one random direction of equal norm (``random_control=True``), else ``None``.
    gene_set_tests
        Per gene set: mean log2 fold change of its genes vs the controls (``pval``, ``padj``), or ``None``
        without gene sets.
    manifold
        Prior log-density per cell before (``log_prior``) and after (``log_prior_steered``), the flags
        ``off_manifold``, the threshold and fractions (see :func:`dgdlens.steer_control.manifold_check`);
        ``None`` for a model without a prior.
    n_controls
        ``{"random": ..., "features": ..., "pval_from": ...}``: how many control directions of each kind
        were used and which of them gave ``pval`` (the ``control`` argument of :func:`steer`).
    """

    feature: int
    mode: str
    value: float | None
    cells: np.ndarray
    z: np.ndarray
    z_steered: np.ndarray
    activation: np.ndarray
    activation_steered: np.ndarray
    expression: np.ndarray
    expression_steered: np.ndarray
    genes: pd.DataFrame
    enrichment: pd.DataFrame
    control: SteerResult | None = None
    gene_set_tests: pd.DataFrame | None = None
    manifold: dict | None = None
    n_controls: dict | None = None

    @property
    def shift(self) -> np.ndarray:
        """Euclidean distance each cell moved in latent space."""
        return np.linalg.norm(self.z_steered - self.z, axis=1)

    def __repr__(self) -> str:
        n_up = int((self.genes["direction"] == "up").sum())
        n_down = int((self.genes["direction"] == "down").sum())
        return (
            f"SteerResult(feature={self.feature}, mode={self.mode!r}, value={self.value}, cells={len(self.cells)}, "
            f"genes up={n_up}, down={n_down}, enriched terms={len(self.enrichment)}, "
            f"control={'yes' if self.control is not None else 'no'})"
        )


def _is_anndata(obj) -> bool:
    return hasattr(obj, "obs") and hasattr(obj, "var") and hasattr(obj, "obsm")


def _latents_and_library(model, data, layer, use_rep, library_size):
    """Latents (cells x d) and library sizes (or None) from an AnnData or a latent matrix."""
    if _is_anndata(data):
        if use_rep is not None:
            if use_rep not in data.obsm:
                raise ValueError(f"use_rep={use_rep!r} is not in adata.obsm (available: {list(data.obsm)}).")
            z = np.asarray(data.obsm[use_rep], dtype=np.float32)
        else:
            z = model.get_latent_representation(data, layer=layer)
        if library_size is None and hasattr(model, "get_library_sizes"):
            library_size = model.get_library_sizes(data, layer=layer)
        return z, library_size
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    if sp.issparse(data):
        raise ValueError("Latents must be a dense (cells x latent dims) array, not a sparse matrix.")
    z = np.asarray(data, dtype=np.float32)
    return z, library_size


def _covariate_input(model, data, layer, transform_batch, n: int):
    """The decoder's covariate input per cell for a model with covariates (``None`` otherwise): each cell's
    own covariate latents (AnnData input), or every cell as if from ``transform_batch``."""
    if not getattr(model, "has_covariates", False):
        if transform_batch is not None:
            raise ValueError("transform_batch needs a model with covariates (e.g. DGD(..., batch_key=...)).")
        return None
    if _is_anndata(data):
        return model.covariate_input(data, layer=layer, transform_batch=transform_batch, progress=False)
    if transform_batch is None:
        raise ValueError("This model has covariates (batch_key=...): pass the cells' AnnData, so that each cell is "
                         "decoded with its own covariate latents, or transform_batch=... to decode every cell as if "
                         "it came from that batch.")
    return model.covariate_input(n_cells=n, transform_batch=transform_batch)


class _ModalityView:
    """One modality of a multi-modal model, seen as a one-modality model by steering: decodes that modality's
    head only (its means at the cells' library in it, or its composition), its features as ``var_names``;
    everything else (prior, covariate inputs, latents) is the model's own."""

    def __init__(self, model, modality: str):
        self._model = model
        self._m = model._modality_index(modality)
        self.var_names = model.modality_var_names(modality)
        self.modality = modality

    def __getattr__(self, name):
        return getattr(self._model, name)

    def decode_latent(self, z, library_size=None, *, extra=None, transform_batch=None, batch_size: int = 2048):
        return self._model.decode_latent(z, library_size, extra=extra, transform_batch=transform_batch,
                                         batch_size=batch_size, modality=self.modality)


def _for_modality(model, modality: str | None):
    """The model itself, or for a multi-modal model the view of the modality steering decodes."""
    if not getattr(model, "is_multimodal", False):
        if modality is not None:
            raise ValueError("modality= is for models built on several modalities.")
        return model
    if modality is None:
        raise ValueError(f"This model has several modalities {model.modality_names}; say which one steering decodes "
                         "(modality='rna', or run it once per modality).")
    return _ModalityView(model, modality)


def _decode(model, z, lib, extra):
    return model.decode_latent(z, lib) if extra is None else model.decode_latent(z, lib, extra=extra)


def _check_feature(sae, feature) -> int:
    if isinstance(feature, bool | np.bool_) or not isinstance(feature, int | np.integer):
        raise ValueError(f"feature must be an integer index of an SAE latent, got {feature!r}.")
    if not 0 <= int(feature) < sae.n_latents:
        raise ValueError(
            f"feature {feature} is out of range: the SAE has {sae.n_latents} latents (0..{sae.n_latents - 1})."
        )
    return int(feature)


def _new_activation(f: np.ndarray, mode: str, value) -> np.ndarray:
    if mode not in STEER_MODES:
        raise ValueError(f"mode must be one of {STEER_MODES}, got {mode!r}.")
    if mode == "ablate":
        if value not in (None, 0, 0.0):
            raise ValueError(
                "mode='ablate' sets the feature to 0; do not pass a value (or use mode='clamp')."
            )
        return np.zeros_like(f)
    if value is None:
        raise ValueError(
            f"mode={mode!r} needs value= (clamp: target activation; add: amount; scale: factor)."
        )
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"value must be finite, got {value}.")
    if mode == "clamp":
        if value < 0:
            raise ValueError(f"SAE activations are non-negative; clamp value must be >= 0, got {value}.")
        out = np.full_like(f, value)
    elif mode == "add":
        out = f + value
    else:
        out = f * value
    return np.maximum(out, 0.0)  # the SAE cannot produce negative activations


def _gene_table(mu, mu_s, gene_names, pseudocount, alpha, min_log2fc, control_random,
                control_features, control: str = "random") -> pd.DataFrame:
    lr = np.log2(mu_s + pseudocount) - np.log2(mu + pseudocount)
    mean = lr.mean(axis=0)
    sd = lr.std(axis=0, ddof=1) if lr.shape[0] > 1 else np.full(len(mean), np.nan)
    p, p_r, p_f = combined_pvalues(mean, control_random, control_features, control)
    padj = bh_adjust(p)
    direction = np.full(len(mean), "", dtype=object)
    sig = padj < alpha
    direction[sig & (mean >= min_log2fc)] = "up"
    direction[sig & (mean <= -min_log2fc)] = "down"
    out = pd.DataFrame(
        {
            "gene": gene_names, "mean_before": mu.mean(axis=0), "mean_after": mu_s.mean(axis=0),
            "log2fc": mean, "sd_log2fc_cells": sd, "pval": p, "pval_random": p_r, "pval_features": p_f,
            "padj": padj, "direction": direction}
    )
    return out.sort_values(
        ["pval", "log2fc"], key=lambda c: c.abs() if c.name == "log2fc" else c, ascending=[True, False],
        kind="stable", ignore_index=True)


def _changed_gene_enrichment(genes: pd.DataFrame, gene_sets, top_genes: int, **kwargs) -> pd.DataFrame:
    from .lens.enrichment import RESULT_COLUMNS, enrich

    lists = {}
    for direction in ("up", "down"):
        chosen = genes[genes["direction"] == direction]
        chosen = chosen.reindex(chosen["log2fc"].abs().sort_values(ascending=False).index).head(top_genes)
        if len(chosen):
            lists[direction] = chosen["gene"].tolist()
    if gene_sets is None or not lists:
        return pd.DataFrame(columns=["query", *RESULT_COLUMNS[1:]])
    out = enrich(lists, genes["gene"].tolist(), gene_sets, **kwargs)
    out["direction"] = out["query"]
    return out


def steer(
    model, sae, adata_or_latents, *, feature: int, mode: str = "clamp", value: float | None = None,
    cells=None, random_control: bool = False, library_size=None, layer: str | None = None,
    use_rep: str | None = None, gene_sets="go_bp", pseudocount: float = 0.1, alpha: float = 0.05,
    min_log2fc: float = 0.25, top_genes: int = 200, enrichment_kwargs: dict | None = None, seed: int = 0,
    device: str | torch.device | None = None, n_controls: int = 200, feature_controls: bool = True,
    max_feature_controls: int = 500, control: str = "random", reference=None,
    manifold_quantile: float = 1.0, transform_batch=None, max_cells: int | None = 10_000,
    modality: str | None = None) -> SteerResult:
    """Change one SAE feature, move the latents along its decoder direction, decode, and compare.

    Parameters
    ----------
    model
        A trained generative model with ``decode_latent(z, library_size=None)`` (e.g. :class:`dgdlens.DGD`)
        and, for AnnData input, ``get_latent_representation(adata)``.
    sae
        The SAE trained on that model's latents (:mod:`dgdlens.sae`).
    adata_or_latents
        AnnData (latents from ``obsm[use_rep]``, or from the model with ``use_rep=None``; library sizes
        from the model) or a (cells x latent dims) array.
    feature
        Index of the SAE latent to steer.
    mode, value
        ``"clamp"`` to ``value``, ``"add"`` ``value``, ``"scale"`` by ``value``, or ``"ablate"`` (no value).
    cells
        Indices or boolean mask of the cells to steer (default: all).
    max_cells
        Steer at most this many of them: a larger selection is replaced by a seeded uniform random
        subsample (sorted; ``result.cells`` lists it, ``seed`` draws it). The result holds cells x genes
        decoded means, so this bounds its memory on an atlas; with at most ``max_cells`` selected cells the
        result is the same as without the limit. ``None``: every selected cell.
    transform_batch
        For a model with covariates (``DGD(..., batch_key=...)``): ``None`` (default) decodes every cell with
        its own covariate latents (as the seed's multiDGD study does; needs the cells' AnnData); a batch
        name decodes every cell as if it came from that batch (that batch's component mean; a latent matrix
        is then enough).
    random_control
        Also return the full result of one random direction of the same norm (same activation changes),
        scored against the same controls.
    library_size
        Per-cell library sizes for decoding (default: the model's, for AnnData input; else compositions).
    layer
        AnnData input: where the model reads the cells' counts (library sizes, and latents when
        ``use_rep=None``); default the model's training layer, ``"raw"`` for ``adata.raw.X``.
    use_rep
        AnnData input: the obsm key holding the cells' latents (e.g. ``"X_dgd"`` from
        ``model.add_to_adata``); ``None`` embeds the cells with the model first.
    gene_sets
        Collection for the enrichment of changed genes (``None`` skips it).
    pseudocount
        Added to decoded means before the log-ratio (counts per cell when library sizes are used,
        else composition units scaled by 1e4, i.e. per 10k).
    alpha, min_log2fc, top_genes
        A gene is "up"/"down" when its BH-adjusted empirical p < ``alpha`` and ``|log2fc| >= min_log2fc``;
        the ``top_genes`` largest changes per direction go into the enrichment.
    n_controls, feature_controls, max_feature_controls
        Random directions of the feature's norm (isotropic, at least 100 recommended; the smallest
        p-value is ``1 / (n_controls + 1)``), and whether to use the other live features' decoder
        directions (at most ``max_feature_controls``) as a second control; see
        :mod:`dgdlens.steer_control`.
    control
        Which control gives ``pval``: ``"random"`` (default), ``"features"`` or ``"both"`` (the larger p).
    reference, manifold_quantile
        Latents that define the data manifold for the off-manifold check (default: the model's training
        latents when it returns them, else the given cells) and the percentile of their prior
        log-density below which a steered cell is flagged (1).
    seed
        Seeds the control directions.
    device
        Where the SAE encodes and the model decodes (moves both there); default: where they are.
    modality
        For a model with several modalities (:class:`dgdlens.DGD` on a MuData): the modality whose head is
        decoded (``"rna"``: genes; ``"atac"``: peaks, whose decoded means are accessibility probabilities for
        a binary modality, at each cell's own depth). Run once per modality to read an edit in both.

    Returns
    -------
    SteerResult
        The edit (``feature``, ``mode``, ``value``), the steered cell indices, latents, activations and
        decoded means before and after (cells x latent dims, cells, cells x genes), the per-gene table
        ``genes`` (``log2fc``, empirical ``pval``, BH ``padj``, ``direction`` "up"/"down"/""), the ORA
        of the changed genes (``enrichment``), per-set tests (``gene_set_tests``), the off-manifold check
        (``manifold``), the control counts (``n_controls``) and, with ``random_control=True``, the same
        result for a random direction (``control``). See :class:`SteerResult`.
    """
    if pseudocount <= 0:
        raise ValueError(f"pseudocount must be positive, got {pseudocount}.")
    feature = _check_feature(sae, feature)
    if device is not None:
        dev = resolve_device(device)
        sae.to(dev)
        if hasattr(model, "_to"):
            model._to(dev)
    view = _for_modality(model, modality)
    z_all, lib_all = _latents_and_library(model, adata_or_latents, layer, use_rep, library_size)
    if view is not model and library_size is None and lib_all is not None:
        lib_all = np.asarray(lib_all)[:, view._m]  # the cells' library in the decoded modality
    model = view
    if z_all.ndim != 2 or z_all.shape[1] != sae.d_in:
        raise ValueError(f"Latents must have shape (cells, {sae.d_in}) to match the SAE, got {z_all.shape}.")
    if not np.all(np.isfinite(z_all)):
        raise ValueError("Latents contain NaN or infinite values.")
    idx = _subsample(_cell_indices(cells, len(z_all)), max_cells, seed)
    z = z_all[idx]
    extra_all = _covariate_input(model, adata_or_latents, layer, transform_batch, len(z_all))
    extra = None if extra_all is None else extra_all[idx]
    lib = None
    if lib_all is not None:
        lib = np.broadcast_to(np.asarray(lib_all, dtype=np.float32).reshape(-1), (len(z_all),))[idx]
    F_z = sae.encode(z)
    f = np.asarray(F_z[:, feature].toarray()).ravel().astype(np.float64)
    live = np.asarray((F_z != 0).sum(axis=0)).ravel() > 0
    f_new = _new_activation(f, mode, value)
    delta = f_new - f
    direction = sae.W_dec[feature].detach().double().cpu().numpy()
    gene_names = np.asarray(
        getattr(model, "var_names", None) if getattr(model, "var_names", None) is not None else np.arange(0),
        dtype=object,
    )

    mu = _decode(model, z, lib, extra)
    names = gene_names if len(gene_names) == mu.shape[1] else np.array(
        [f"gene{i}" for i in range(mu.shape[1])], dtype=object)
    scale = 1.0 if lib is not None else 1e4  # compositions are compared per 10k, like normalised counts
    value = None if value is None else float(value)

    if control not in ("random", "features", "both"):
        raise ValueError(f"control must be 'random', 'features' or 'both', got {control!r}.")
    if n_controls < 1:
        raise ValueError(f"n_controls must be at least 1 (100 or more recommended), got {n_controls}.")
    W_dec = sae.W_dec.detach().double().cpu().numpy()
    R, W_other, _ = control_directions(W_dec, feature, n_controls=n_controls, live=live,
                                       feature_controls=feature_controls,
                                       max_feature_controls=max_feature_controls, seed=seed)
    C_r = decoded_effects(model, z, lib, delta, R, mu, scale=scale, pseudocount=pseudocount, extra=extra)
    C_f = decoded_effects(model, z, lib, delta, W_other, mu, scale=scale, pseudocount=pseudocount, extra=extra)
    enrich_kw = dict(enrichment_kwargs or {})
    set_kw = {k: enrich_kw[k] for k in ("min_size", "max_size", "use_aliases") if k in enrich_kw}

    def run(direction_vec: np.ndarray) -> SteerResult:
        z_new = (z.astype(np.float64) + delta[:, None] * direction_vec[None, :]).astype(np.float32)
        mu_new = _decode(model, z_new, lib, extra)
        genes = _gene_table(mu.astype(np.float64) * scale, np.asarray(mu_new, dtype=np.float64) * scale, names,
                            pseudocount, alpha, min_log2fc, C_r, C_f, control)
        enrichment = _changed_gene_enrichment(genes, gene_sets, top_genes, **enrich_kw)
        sets = None
        if gene_sets is not None:
            lfc = genes.set_index("gene")["log2fc"].reindex(names).to_numpy()
            sets = gene_set_tests(names, lfc, C_r, C_f, gene_sets, alpha=alpha, control=control, **set_kw)
        return SteerResult(feature, mode, value, idx, z, z_new, f, f_new, mu, mu_new, genes, enrichment,
                           gene_set_tests=sets,
                           n_controls={"random": len(R), "features": len(W_other), "pval_from": control})

    result = run(direction)
    ref = reference_latents(model, z_all) if reference is None else (
        np.asarray(reference, dtype=np.float32), "given reference")
    result.manifold = manifold_check(model, z, result.z_steered, ref[0], reference_name=ref[1],
                                     quantile=manifold_quantile)
    if random_control:
        # one more isotropic draw of the same norm, independent of the control set: scored like the feature
        r = np.random.default_rng([seed, 1]).standard_normal(len(direction))
        r *= np.linalg.norm(direction) / np.linalg.norm(r)
        result.control = run(r)
    return result


def _subsample(idx: np.ndarray, max_cells: int | None, seed: int) -> np.ndarray:
    """At most ``max_cells`` of ``idx``: a seeded uniform subsample, kept in the given order."""
    if max_cells is None or len(idx) <= max_cells:
        return idx
    if max_cells < 1:
        raise ValueError(f"max_cells must be a positive integer or None, got {max_cells}.")
    keep = np.sort(np.random.default_rng([seed, 2]).choice(len(idx), max_cells, replace=False))
    return idx[keep]


def _cell_indices(cells, n: int) -> np.ndarray:
    if cells is None:
        return np.arange(n)
    cells = np.asarray(cells)
    if cells.dtype == bool:
        if cells.shape != (n,):
            raise ValueError(f"Boolean cells mask has length {cells.shape[0]}, expected {n}.")
        idx = np.flatnonzero(cells)
    else:
        if not np.issubdtype(cells.dtype, np.integer):
            raise ValueError("cells must be integer indices or a boolean mask.")
        idx = cells.astype(np.int64)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise ValueError(f"cells contains indices outside [0, {n}).")
        idx = np.where(idx < 0, idx + n, idx)
    if idx.size == 0:
        raise ValueError("No cells selected to steer.")
    return idx


def steering_summary(result: SteerResult) -> dict:
    """Numbers that describe a steering result (``summary.json`` of ``dgdlens steer`` and the demo).

    Parameters
    ----------
    result
        What :func:`steer` returned.

    Returns
    -------
    dict
        JSON-serialisable summary: ``feature``, ``mode``, ``value``, ``n_cells`` (steered cells),
        ``mean_shift`` (mean Euclidean latent distance moved), ``genes_up``, ``genes_down`` and
        ``enriched_terms`` (rows of the ORA table). When the result has them, also ``significance`` (how
        the p-values were obtained), ``n_controls_random``, ``n_controls_features``,
        ``gene_sets_significant``, ``fraction_off_manifold`` (after the edit),
        ``fraction_off_manifold_before``, ``median_delta_log_prior`` and ``control_genes_changed``
        (genes called up or down for the random-direction control).
    """
    genes = result.genes
    summary = {"feature": int(result.feature), "mode": result.mode, "value": result.value,
               "n_cells": int(len(result.cells)), "mean_shift": float(result.shift.mean()),
               "genes_up": int((genes["direction"] == "up").sum()),
               "genes_down": int((genes["direction"] == "down").sum()),
               "enriched_terms": int(len(result.enrichment)),
               }
    if result.n_controls is not None:
        kind = {"random": "random directions of the same norm", "features": "other live features' directions",
                "both": "both random directions and other live features (the larger p)"}
        summary["significance"] = (f"empirical p vs control edits with the same activation change: "
                                   f"{kind.get(result.n_controls.get('pval_from', 'random'), '')}; BH across genes")
        summary["n_controls_random"] = int(result.n_controls["random"])
        summary["n_controls_features"] = int(result.n_controls["features"])
    if result.gene_set_tests is not None:
        summary["gene_sets_significant"] = int(result.gene_set_tests["significant"].sum())
    if result.manifold is not None:
        summary["fraction_off_manifold"] = result.manifold["fraction_off_after"]
        summary["fraction_off_manifold_before"] = result.manifold["fraction_off_before"]
        summary["median_delta_log_prior"] = result.manifold["median_delta"]
    if result.control is not None:
        control = result.control.genes
        summary["control_genes_changed"] = int(control["direction"].isin(["up", "down"]).sum())
    return summary
