"""Controls for steering: is a feature's effect on a gene larger than that of other edits of the same size?

Decoded values are deterministic, so a test across cells of "did the decoded mean change" calls almost
every gene significant for any edit, a random one included (issue 16: 8,955 genes for a same-norm random
direction). The question a user asks is comparative, and :func:`dgdlens.steer.steer` answers it with
two control distributions, each applied with the *same per-cell activation change* ``delta`` as the edit:

- **random directions** (``n_controls``, default 200): ``z + delta * r`` with ``r`` drawn isotropically
  and scaled to the norm of the feature's decoder direction ``w``. They are *not* made orthogonal to
  ``w``: a random feature direction is then exchangeable with the controls, so its empirical p-value is
  uniform. Orthogonal controls are too small exactly when a gene's response is aligned with ``w`` (in 16
  latent dimensions, 2.9 % of random-direction p-values fell at or below 0.01 with orthogonal controls
  against 1.0 % with isotropic ones: ``tests/test_steer.py``);
- **other live features** (``feature_controls``, default on, at most ``max_feature_controls``): the
  decoder direction of every other SAE feature that fires in at least one of the given cells,
  ``z + delta * W_dec[j]``. A feature picked at random is exchangeable with the others, so its p-value is
  uniform too.

Per gene the effect is the mean over cells of ``log2((mu' + pc) / (mu + pc))``; against each control
distribution, ``p = (1 + #{controls with |effect| >= |observed|}) / (1 + #controls)`` (``pval_random``,
``pval_features``). ``pval`` is the one ``control`` chooses: ``"random"`` (default), ``"features"``, or
``"both"`` (the larger of the two: the gene must beat both kinds of control; valid if either null holds).
``padj`` is BH across genes. The smallest possible p is ``1 / (1 + #controls)``, so with thousands of
genes BH reaches a gene only when many genes beat every control: raise ``n_controls`` for resolution. An
SAE with few live features limits ``pval_features`` the same way (64 features: p >= 1/64), which is why
it is not the default. Per gene set the statistic is the mean effect over the set's genes, compared with
the same statistic under the controls (BH across sets).

**Off the manifold.** The prior's log-density (``model.prior.log_prob`` or ``model.gmm.log_prob``) of
each cell's latent before and after the edit is reported; cells that end below the 1st percentile of the
reference latents' log-density (the model's training latents when it has them, else the given cells) are
flagged, and a warning is raised when at least 5 % of the edited cells are flagged (and more than before
the edit). Decoded values of such latents are extrapolations.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from .stats import bh_adjust

__all__ = [
    "control_directions", "decoded_effects", "empirical_pvalues", "combined_pvalues", "CONTROLS",
    "gene_set_tests", "prior_log_density", "manifold_check", "reference_latents",
]


def control_directions(W_dec: np.ndarray, feature: int, *, n_controls: int = 200, live=None,
                       feature_controls: bool = True, max_feature_controls: int = 500, seed: int = 0):
    """``(random, features, feature_ids)``: isotropic random directions of the feature's norm
    (n_controls x d) and the decoder directions of other live features (m x d) with their indices."""
    W = np.asarray(W_dec, dtype=np.float64)
    w = W[feature]
    rng = np.random.default_rng(seed)
    R = rng.standard_normal((int(n_controls), W.shape[1]))
    R *= np.linalg.norm(w) / np.maximum(np.linalg.norm(R, axis=1, keepdims=True), 1e-300)
    ids = np.zeros(0, dtype=np.int64)
    if feature_controls:
        ids = np.arange(W.shape[0]) if live is None else np.flatnonzero(np.asarray(live, dtype=bool))
        ids = ids[ids != feature]
        if len(ids) > max_feature_controls:
            ids = np.sort(rng.choice(ids, max_feature_controls, replace=False))
    return R, W[ids], ids


def decoded_effects(model, z: np.ndarray, lib, delta: np.ndarray, directions: np.ndarray, mu: np.ndarray, *,
                    scale: float, pseudocount: float, budget: float = 2e8, extra=None) -> np.ndarray:
    """Mean over cells of ``log2((mu(z + delta v) + pc) / (mu + pc))`` for every direction ``v`` (rows of
    ``directions``): (n_directions x genes). Cells with ``delta == 0`` contribute 0 without decoding.
    ``extra``: each cell's covariate input for a model with covariates (``decode_latent(..., extra=)``)."""
    n, G = mu.shape
    moved_all = np.flatnonzero(delta != 0)
    out = np.zeros((len(directions), G))
    if len(moved_all) == 0 or len(directions) == 0:
        return out
    # decoded values held at once: directions x cells x genes float64, within ``budget`` bytes (cells are
    # taken in chunks too, so the memory does not grow with the number of cells)
    cells_per_chunk = max(1, int(budget // max(8 * G, 1)))
    for c0 in range(0, len(moved_all), cells_per_chunk):
        moved = moved_all[c0:c0 + cells_per_chunk]
        base = np.log2(mu[moved].astype(np.float64) * scale + pseudocount)
        zm = z[moved].astype(np.float64)
        dm = delta[moved]
        libm = None if lib is None else np.asarray(lib)[moved]
        per_batch = max(1, int(budget // max(8 * len(moved) * G, 1)))
        for start in range(0, len(directions), per_batch):
            V = directions[start:start + per_batch]
            z_new = (zm[None, :, :] + dm[None, :, None] * V[:, None, :]).reshape(-1, zm.shape[1]).astype(np.float32)
            lib_new = None if libm is None else np.tile(libm, len(V))
            kw = {} if extra is None else {"extra": np.tile(np.asarray(extra)[moved], (len(V), 1))}
            mu_new = np.asarray(model.decode_latent(z_new, lib_new, **kw), dtype=np.float64).reshape(
                len(V), len(moved), G)
            out[start:start + len(V)] += (np.log2(mu_new * scale + pseudocount) - base[None]).sum(axis=1) / n
    return out


def empirical_pvalues(observed: np.ndarray, controls: np.ndarray) -> np.ndarray:
    """``(1 + #{controls with |c| >= |observed|}) / (1 + #controls)`` per column; 1 without controls."""
    observed = np.abs(np.asarray(observed, dtype=np.float64))
    controls = np.abs(np.asarray(controls, dtype=np.float64))
    if controls.shape[0] == 0:
        return np.ones_like(observed)
    # a control equal to the observed value up to rounding counts as "at least as large"
    tol = 1e-12 * np.maximum(observed, 1e-300)
    return (1.0 + (controls >= observed[None, :] - tol).sum(axis=0)) / (1.0 + controls.shape[0])


CONTROLS = ("random", "features", "both")


def combined_pvalues(observed, control_random, control_features, control: str = "random"):
    """(p, p_random, p_features); ``p`` by ``control`` (see the module docstring). An empty control set
    gives p = 1 (``"both"`` then uses the other one)."""
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {CONTROLS}, got {control!r}.")
    p_r = empirical_pvalues(observed, control_random)
    p_f = empirical_pvalues(observed, control_features)
    if control == "random":
        return p_r, p_r, p_f
    if control == "features":
        return p_f, p_r, p_f
    p = p_r if control_features.shape[0] == 0 else (p_f if control_random.shape[0] == 0 else np.maximum(p_r, p_f))
    return p, p_r, p_f


def gene_set_tests(gene_names, lfc: np.ndarray, control_random: np.ndarray, control_features: np.ndarray,
                   gene_sets, *, alpha: float = 0.05, min_size: int = 10, max_size: int | None = 500,
                   use_aliases: bool = True, control: str = "random") -> pd.DataFrame:
    """Per gene set: mean log2 fold change of its genes vs the same statistic under the controls."""
    from .lens.enrichment import index_gene_sets

    columns = ["term", "description", "set_size", "mean_log2fc", "pval", "pval_random", "pval_features",
               "padj", "direction", "significant"]
    try:
        index = index_gene_sets(np.asarray(gene_names, dtype=object), gene_sets, min_size=min_size,
                                max_size=max_size, use_aliases=use_aliases)
    except ValueError:  # no gene of the model in the collection, or no set of a usable size
        return pd.DataFrame(columns=columns)
    M = index.membership.astype(np.float64)
    sizes = np.maximum(index.set_sizes, 1).astype(np.float64)

    def stat(L):
        L = np.atleast_2d(L)
        return np.asarray(M @ L.T).T / sizes[None, :] if L.shape[0] else np.zeros((0, len(sizes)))

    obs = stat(lfc)[0]
    p, p_r, p_f = combined_pvalues(obs, stat(control_random), stat(control_features), control)
    padj = bh_adjust(p)
    out = pd.DataFrame({
        "term": index.terms, "description": index.descriptions, "set_size": index.set_sizes,
        "mean_log2fc": obs, "pval": p, "pval_random": p_r, "pval_features": p_f, "padj": padj,
        "direction": np.where(obs >= 0, "up", "down").astype(object), "significant": padj < alpha})
    out.attrs["gene_sets"] = dict(index.provenance)
    return out.sort_values(["pval", "mean_log2fc"], ascending=[True, False], key=None, kind="stable",
                           ignore_index=True)


def _prior_module(model):
    for name in ("prior", "gmm"):
        try:
            prior = getattr(model, name, None)
        except Exception:  # noqa: BLE001 - a property that cannot answer means "no prior"
            prior = None
        if prior is not None and hasattr(prior, "log_prob"):
            return prior
    return None


def prior_log_density(model, z: np.ndarray, batch: int = 8192) -> np.ndarray | None:
    """The model's prior log-density of each latent (``model.prior`` or ``model.gmm``), or ``None``."""
    prior = _prior_module(model)
    if prior is None:
        return None
    import torch

    try:
        device = next(prior.parameters()).device
    except (StopIteration, AttributeError):
        device = torch.device("cpu")
    out = []
    with torch.no_grad():
        for i in range(0, len(z), batch):
            zt = torch.as_tensor(np.asarray(z[i:i + batch], dtype=np.float32), device=device)
            out.append(prior.log_prob(zt).double().cpu().numpy().reshape(-1))
    return np.concatenate(out) if out else np.zeros(0)


def reference_latents(model, fallback: np.ndarray) -> tuple[np.ndarray, str]:
    """The model's training latents when it returns them without data, else ``fallback``."""
    getter = getattr(model, "get_latent_representation", None)
    if getter is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = np.asarray(getter(), dtype=np.float32)
            if ref.ndim == 2 and ref.shape[1] == fallback.shape[1] and len(ref):
                return ref, "training latents"
        except Exception:  # noqa: BLE001 - any model that cannot return them: use the given cells
            pass
    return fallback, "given latents"


def manifold_check(model, z: np.ndarray, z_new: np.ndarray, reference: np.ndarray, *, reference_name: str = "",
                   quantile: float = 1.0, warn_fraction: float = 0.05, stacklevel: int = 3) -> dict | None:
    """Prior log-density before/after per cell and the off-manifold flags (see the module docstring)."""
    before = prior_log_density(model, z)
    if before is None:
        return None
    after = prior_log_density(model, z_new)
    ref = prior_log_density(model, reference)
    threshold = float(np.percentile(ref, quantile))
    off_before = before < threshold
    off_after = after < threshold
    frac_before, frac_after = float(off_before.mean()), float(off_after.mean())
    info = {
        "log_prior": before, "log_prior_steered": after, "off_manifold": off_after,
        "threshold": threshold, "reference": reference_name, "quantile": quantile,
        "fraction_off_before": frac_before, "fraction_off_after": frac_after,
        "median_delta": float(np.median(after - before)),
    }
    if frac_after >= warn_fraction and frac_after > frac_before:
        warnings.warn(
            f"The edit moves {frac_after:.0%} of the steered cells below percentile {quantile:g} of the "
            f"prior log-density of the {reference_name or 'reference latents'} ({frac_before:.0%} were "
            f"below it before; median change {info['median_delta']:+.3g} nats): their decoded expression is "
            "an extrapolation off the data manifold. Use a smaller value, or clamp to activations seen in "
            "real cells.", UserWarning, stacklevel=stacklevel)
    return info
