"""The Deep Generative Decoder (DGD) for single-cell RNA counts, on AnnData.

The user-facing class is thin: it validates and splits the data, builds a
:class:`~dgdlens.nn.DecoderOnlyModule` (MLP decoder, negative-binomial output scaled by library size,
Gaussian-mixture prior) and hands training to the shared runner (:class:`~dgdlens.train.DecoderOnlyPlan`,
the same plan as :class:`~dgdlens.models.DecoderOnly`) and held-out inference to
:mod:`dgdlens.train.inference`. Under ``torchrun`` nothing here changes: the runner's strategy shards the
cells over the processes.

Covariates (``batch_key``, ``categorical_covariate_keys``, ``continuous_covariate_keys``; multiDGD's
correction model, several covariates, its bugs fixed: see :mod:`dgdlens.nn.covariates`) make the module a
:class:`~dgdlens.nn.covariates.CovariateDecoderModule` and add one latent table per categorical covariate
to the same plan.

Several modalities (a MuData such as ``mdata.mod["rna"]`` + ``["atac"]``, or an AnnData with a ``var``
column naming each feature's modality) make the decoder a shared trunk with one head per modality
(:class:`~dgdlens.nn.MultiHeadDecoder`, multiDGD's design), each modality with its own likelihood and
library size (:class:`~dgdlens.nn.MultiModalLikelihood`). Cells with one modality only are embedded from
it, and the others predicted (:meth:`DGD.predict_modality`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .._device import resolve_device
from ..data.anndata import align_genes, check_labels_key, get_matrix, var_names_for
from ..data.loader import BatchLoader
from ..data.matrix import RowMatrix, validate_counts
from ..data.modalities import Modalities, default_modality_likelihood, is_mudata, read_modalities
from ..data.split import train_validation_split
from ..nn.covariates import CovariateDecoderModule, SupervisedGaussianMixture
from ..nn.decoders import MLP
from ..nn.likelihoods import NegativeBinomial, make_likelihood
from ..nn.module import DecoderOnlyModule
from ..nn.multimodal import MultiHeadDecoder, MultiModalLikelihood
from ..nn.priors import GaussianMixture
from ..nn.representation import RepresentationTable
from ..train.decoder_only_plan import DecoderOnlyPlan, DecoderOnlyPlanConfig, SampleCovariates
from ..train.inference import infer_covariate_latents_sharded, infer_latents_sharded
from .base import RUNNER_OPTIONS, BaseModel, names_digest

__all__ = ["DGD", "default_n_components"]

MODEL_KIND = "DGD"

#: The stopping rule of DGDs whose latents start at PCA coordinates, chosen on validation cells only
#: (benchmarks/time_to_quality.py --tune at 30k / 100k / 300k simulated cells, benchmarks/dgd_vs_scvi.py
#: --tune on pbmc68k and celltypist; numbers in docs/benchmarks/time_to_quality.md). The validation
#: reconstruction keeps creeping down long after held-out quality is flat (the validation latents get one
#: step per epoch), so the former "any improvement for 20 epochs" trained 267 epochs at 30k cells, with a
#: worse validation NLL than at 54. Stop once it has not improved by 0.1 % for 10 epochs: 54 / 64 / 53
#: epochs at 30k / 100k / 300k cells, each within 0.3 nats of the best validation NLL its run reached ...
EARLY_STOPPING = {"min_rel_delta": 1e-3, "patience": 10}
#: ... but never before the decoder has taken this many optimiser steps: a few hundred cells give two or
#: three steps per epoch, and there the relative rule stopped too soon (celltypist: 4014 vs 3978 nats,
#: pbmc68k 457.4 vs 456.2). Latents started at the origin (covariates, several modalities) keep the former
#: rule (any improvement within 20 epochs, at least 50): they travel for hundreds of epochs, not measured.
MIN_DECODER_STEPS = 1_000
#: Latents started at PCA coordinates are already laid out; each still moves about its learning rate per
#: epoch, so they take 3x the reference's 0.01 (chosen on validation cells: 30k cells 622.5 vs 622.9 nats
#: in the same time, 100k 621.3 vs 621.9 in 388 vs 468 s, 300k 620.9 after 41 epochs where 0.01 had
#: 621.2 after 53; pbmc68k and celltypist equal within 0.1 %). Started at the origin, the reference's.
PCA_START_LR_REP = 3e-2
#: PCA-started latents: past this many training cells the epochs train on a seeded sample of this many
#: (``decoder_subsample``) and every other cell is embedded at the end with the decoder frozen. A latent
#: takes one step per pass, so the DGD needs 50-80 passes at any size; on every cell of a million that is
#: 30+ minutes on 2 cores (30 capped epochs: 1,654 s, held-out NLL 622.0). Chosen on validation cells of
#: the million-cell simulation (benchmarks/time_to_quality.py --tune): 100,000 reached 620.57 nats in
#: 663 s, 300,000 reached 620.67 in 1,080 s. Below 100,000 was not tried: simulated types are few and
#: common. Rare types lose (benchmarks/rare_types.py, 300,000 cells, three seeds): with a uniform sample a
#: type of 0.2 % fitted 15 and 102 nats per held-out cell worse than with every cell; the default sample
#: (decoder_subsample_by="residual": a tenth are the cells the PCA start explains worst) narrowed that to
#: 10 and 23; pass None where rare populations matter (docs/benchmarks/time_to_quality.md).
DECODER_SUBSAMPLE = 100_000
_SCALINGS = {"sum", "max", "mean", "none"}


def default_n_components(n_cells: int, n_label_categories: int | None = None) -> int:
    """Number of mixture components when the user gives none.

    With a label column: one component per label category (the reference's rule). Without labels the
    reference falls back to K=1, which makes the mixture useless for clustering; we use
    ``round(log2(n_cells))`` clipped to [2, 30] (700 cells -> 9, 100k -> 17, 1M -> 20): slowly growing,
    in the range of the published models (K=7 to 27).
    """
    if n_label_categories:
        return int(n_label_categories)
    return int(np.clip(round(math.log2(max(n_cells, 2))), 2, 30))


def _library_sizes(matrix: RowMatrix, scaling: str, row_sums: np.ndarray) -> np.ndarray | None:
    """Per-cell scale factor of the NB mean: total counts (``"sum"``), max count (``"max"``), mean, or none."""
    if scaling == "sum":
        return row_sums.astype(np.float32)
    if scaling == "mean":
        return (row_sums / matrix.n_vars).astype(np.float32)
    if scaling == "max":
        out = np.empty(matrix.n_obs, dtype=np.float32)
        for start, stop, block in matrix.iter_chunks():
            out[start:stop] = np.asarray(block.max(axis=1).todense() if sp.issparse(block) else block.max(axis=1)).ravel()
        return out
    if scaling == "none":
        return None
    raise ValueError(f"scaling must be 'sum', 'max', 'mean' or 'none', got {scaling!r}")


class DGD(BaseModel):
    """Deep Generative Decoder: MAP estimation of a decoder, one latent vector per cell and a
    Gaussian-mixture prior, for raw single-cell RNA counts.

    Parameters
    ----------
    adata
        AnnData with raw integer counts (cells x genes) in ``X`` or in ``layer``. It is not modified.
        ``None`` is allowed only through :meth:`load`.
    layer
        Layer holding the counts (``None``: ``adata.X``; ``"raw"``: ``adata.raw.X``).
    n_latent
        Latent dimension (reference: 20).
    n_components
        Mixture components. Default: the number of categories of ``labels_key`` if given, else
        :func:`default_n_components`.
    labels_key
        Optional ``obs`` column of cell labels. Used only to choose ``n_components`` and for
        diagnostics (never for training or model selection).
    hidden, activation
        Decoder MLP widths and activation (reference: 100-100-100, ReLU).
    output_activation, scaling
        NB mean = scale x activation(decoder output). Default ``"softmax"`` with ``scaling="sum"``:
        a per-cell composition times the library size (multiDGD, scVI). The scDGD paper used
        ``"sigmoid"`` with ``"max"`` and scDGD HEAD ``"softplus"`` with ``"max"``.
    dispersion, r_init, r_min
        NB dispersion per gene (``"gene"``) or shared; initial r and lower bound (reference r = e^x + 1).
    covariance, softball_radius, softball_sharpness, sd_init, sd_sd, dirichlet_alpha
        Mixture prior, see :class:`~dgdlens.nn.GaussianMixture`: radius 2 and sharpness 5 as multiDGD;
        ``sd_init=None`` gives radius / 6 (the reference's ``0.2 * radius / K``, ``sd_init="reference"``,
        collapses the mixture to one cluster on pbmc68k; see :func:`~dgdlens.nn.priors.default_sd_init`).
    validation_fraction
        Share of cells held out as a validation split for early stopping (their latents are fitted
        with the model frozen). 0 disables it.
    batch_key, categorical_covariate_keys
        ``obs`` columns of categorical covariates (batch, donor, sample, technology; scvi-tools' names;
        ``batch_key`` is the first). Per covariate every cell gets its own ``n_latent_covariate``-d latent
        with a supervised Gaussian-mixture prior, one component per category (a cell's latent is scored
        under its own category's component; :class:`~dgdlens.nn.covariates.SupervisedGaussianMixture`),
        concatenated with the biological latent before the decoder. Training covariate latents start at
        their category's component mean (multiDGD). A missing value (NaN) is an error. A covariate with a
        single category warns (it adds nothing). A category present only among the validation cells moves
        those cells into the training split (with a warning), so that every category's component is
        learned from training cells.
    continuous_covariate_keys
        Numeric ``obs`` columns (e.g. ``percent_mito``) fed to the decoder as inputs, standardised with the
        training cells' mean and standard deviation (saved with the model). NaN or inf is an error.
    n_latent_covariate
        Dimension of each categorical covariate's latent (multiDGD: 2).
    modality_key
        For an AnnData holding several modalities: the ``var`` column naming each feature's modality
        (e.g. ``"feature_types"``). A :class:`mudata.MuData` needs none (its ``mod`` are the modalities).
    modality_likelihoods
        ``{modality: likelihood}`` for several modalities: ``"nb"`` (negative binomial), ``"poisson"`` or
        ``"binary"`` (Bernoulli on binarised counts, :class:`~dgdlens.nn.BinaryAccessibility`). Default by
        name: ``"binary"`` for ATAC (``atac``, ``peaks``), ``"nb"`` for RNA, proteins and anything else.
        Binary is the ATAC default because peak counts above 1 mostly reflect the two insertions of one
        fragment, not more accessibility (MultiVI and most ATAC tools binarise; multiDGD used NB counts,
        ``"nb"`` here).
    modality_weights
        ``"balanced"`` (default): weights that give each modality the first modality's share of the loss under
        the null model (every feature at its mean composition), so a sparse modality (60 open peaks per cell)
        or a small one (20 proteins) is not drowned by the RNA counts; ``None``: 1 each (the plain joint
        likelihood); or ``{modality: weight}``. Chosen on validation cells without labels: on the multiome
        simulation (3 seeds) balancing lowered the summed cross-modal held-out NLL (RNA from ATAC, ATAC from
        RNA) by 25-45 nats per cell (docs/concepts.md). The weights are saved in ``params["modalities"]``.
    head_hidden
        Several modalities: widths of each modality head's hidden layers after the shared trunk
        (``hidden``); the last one times the number of features is that head's largest layer.
    seed
        Seeds the split, the weights' initialisation and the mini-batch order.
    """

    def __init__(
        self,
        adata,
        layer: str | None = None,
        n_latent: int = 20,
        n_components: int | None = None,
        labels_key: str | None = None,
        *,
        hidden: Sequence[int] = (100, 100, 100),
        activation: str = "relu",
        output_activation: str = "softmax",
        scaling: str = "sum",
        dispersion: str = "gene",
        r_init: float = 2.0,
        r_min: float = 1.0,
        covariance: str = "diagonal",
        softball_radius: float = 2.0,
        softball_sharpness: float = 5.0,
        sd_init: float | str | None = None,
        sd_sd: float = 1.0,
        dirichlet_alpha: float = 1.0,
        validation_fraction: float = 0.1,
        seed: int = 0,
        batch_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        n_latent_covariate: int = 2,
        modality_key: str | None = None,
        modality_likelihoods: dict | None = None,
        modality_weights: dict | str | None = "balanced",
        head_hidden: Sequence[int] = (100,),
    ) -> None:
        _check_positive_int("n_latent", n_latent)
        if not 0 <= validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
        if scaling not in _SCALINGS:
            raise ValueError(f"scaling must be one of {sorted(_SCALINGS)}, got {scaling!r}")
        self.adata = adata
        self.layer = layer
        self.labels_key = labels_key
        self._init_fitted_state()
        self.device = torch.device("cpu")
        if adata is None:
            raise ValueError("adata is None; pass an AnnData with raw counts, or use DGD.load(path).")

        modal = None
        if is_mudata(adata) or modality_key is not None:
            if scaling != "sum":
                raise ValueError("Several modalities need scaling='sum' (each modality's library is its total counts).")
            modal = read_modalities(adata, layer=layer, modality_key=modality_key)
            matrix = modal.matrix()
        else:
            for name, value in (("modality_likelihoods", modality_likelihoods), ("modality_weights", modality_weights)):
                if value and not (name == "modality_weights" and value == "balanced"):
                    raise ValueError(f"{name} is for several modalities: pass a MuData or modality_key=...")
            matrix = get_matrix(adata, layer)
            stats = validate_counts(matrix, what=f"adata.{'X' if layer is None else f'layers[{layer!r}]'}",
                                    allow_empty_cells=False, empty_genes="warn")
        labels = check_labels_key(adata, labels_key)
        n_cats = None if labels is None else len(labels.categories)
        if n_components is None:
            n_components = default_n_components(matrix.n_obs, n_cats)
        _check_positive_int("n_components", n_components)
        if n_components > matrix.n_obs:
            warnings.warn(f"n_components={n_components} is more than the {matrix.n_obs} cells; most mixture "
                          "components will stay empty. Use fewer components.", stacklevel=2)

        if modal is None:
            self.var_names = var_names_for(adata, layer)
            if self.var_names.has_duplicates:
                raise ValueError("adata has duplicated gene names; call adata.var_names_make_unique() first.")
            self.library_size = _library_sizes(matrix, scaling, stats["row_sums"])
        else:
            self.var_names = pd.Index(np.concatenate([np.asarray(v, dtype=object) for v in modal.var_names]))
            if self.var_names.has_duplicates:
                dup = list(self.var_names[self.var_names.duplicated()][:3])
                raise ValueError(f"Feature names repeat across modalities (e.g. {dup}, a protein named like its gene); "
                                 "make them unique first, e.g. mdata.mod['prot'].var_names = 'prot:' + "
                                 "mdata.mod['prot'].var_names.")
            self.library_size = modal.library_sizes(what="the training data")
        self.obs_names = pd.Index(adata.obs_names)
        self.params = {
            "n_latent": int(n_latent), "n_components": int(n_components), "hidden": [int(h) for h in hidden],
            "activation": activation, "output_activation": output_activation, "scaling": scaling,
            "dispersion": dispersion, "r_init": float(r_init), "r_min": float(r_min), "covariance": covariance,
            "softball_radius": float(softball_radius), "softball_sharpness": float(softball_sharpness),
            "sd_init": sd_init, "sd_sd": float(sd_sd), "dirichlet_alpha": float(dirichlet_alpha),
            "validation_fraction": float(validation_fraction), "seed": int(seed),
        }
        if modal is not None:
            weighting = modality_weights if isinstance(modality_weights, str) else None
            if weighting is not None:
                if weighting != "balanced":
                    raise ValueError(f"modality_weights must be a dict or 'balanced', got {weighting!r}.")
                modality_weights = None
            self.params.update(_modality_params(modal.names, modal.sizes, modality_likelihoods, modality_weights,
                                                modality_key, head_hidden))
            self._weighting = weighting
        self.labels = labels
        self.train_idx, self.val_idx = train_validation_split(matrix.n_obs, validation_fraction, seed)
        self._matrix = matrix
        _check_positive_int("n_latent_covariate", n_latent_covariate)
        cat_keys = _categorical_keys(batch_key, categorical_covariate_keys)
        cont_keys = [str(k) for k in (continuous_covariate_keys or [])]
        if cat_keys or cont_keys:
            self.params.update({"batch_key": cat_keys[0] if batch_key is not None else None,
                                "categorical_covariate_keys": cat_keys, "continuous_covariate_keys": cont_keys,
                                "n_latent_covariate": int(n_latent_covariate)})
        self._setup_covariates(adata, cat_keys, cont_keys)
        if modal is not None and self.__dict__.pop("_weighting", None) == "balanced":
            self._balance_modalities(modal)  # on the training cells, so after the split
        self._build(len(self.var_names))

    # ------------------------------------------------------------------ construction
    def _build(self, n_genes: int) -> None:
        p = self.params
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(p["seed"])
            gen = torch.Generator().manual_seed(p["seed"])
            if self.is_multimodal:
                decoder, likelihood = self._multimodal_output()
            else:
                decoder = MLP(p["n_latent"] + self.n_covariate_inputs, n_genes, p["hidden"], p["activation"])
                likelihood = NegativeBinomial(n_genes, activation=p["output_activation"], dispersion=p["dispersion"],
                                              r_init=p["r_init"], r_min=p["r_min"])
            prior = GaussianMixture(p["n_components"], p["n_latent"], covariance=p["covariance"],
                                    softball_radius=p["softball_radius"], softball_sharpness=p["softball_sharpness"],
                                    sd_init=p["sd_init"], sd_sd=p["sd_sd"], dirichlet_alpha=p["dirichlet_alpha"],
                                    generator=gen)
            cov_priors = [SupervisedGaussianMixture(len(c["categories"]), p["n_latent_covariate"],
                                                    counts=c.get("train_counts"), softball_radius=2.0,
                                                    softball_sharpness=5.0, generator=gen)
                          for c in self.covariates["categorical"]]
        if self.has_covariates:
            self.module = CovariateDecoderModule(decoder, likelihood, prior, cov_priors,
                                                 n_continuous=len(self.covariates["continuous"]))
        else:
            self.module = DecoderOnlyModule(decoder, likelihood, prior)
        # Reference: representations start at zero (the mixture pulls them apart).
        self.train_rep = RepresentationTable(len(self.train_idx), p["n_latent"], init="zeros")
        self.val_rep = RepresentationTable(len(self.val_idx), p["n_latent"], init="zeros") if len(self.val_idx) else None
        # covariate latents start at their category's component mean (multiDGD's "origin" sampling)
        self.train_cov_reps, self.val_cov_reps = [], []
        for j, cp in enumerate(self.module.covariate_priors if self.has_covariates else []):
            mean = cp.mean.detach()
            codes = torch.as_tensor(self.covariate_codes[:, j], dtype=torch.int64)
            self.train_cov_reps.append(RepresentationTable(len(self.train_idx), cp.dim,
                                                           init=mean[codes[torch.as_tensor(self.train_idx)]]))
            if len(self.val_idx):
                self.val_cov_reps.append(RepresentationTable(len(self.val_idx), cp.dim,
                                                             init=mean[codes[torch.as_tensor(self.val_idx)]]))

    def _multimodal_output(self) -> tuple[MultiHeadDecoder, MultiModalLikelihood]:
        p = self.params
        mods = p["modalities"]
        decoder = MultiHeadDecoder(p["n_latent"] + self.n_covariate_inputs, [m["n_features"] for m in mods],
                                   p["hidden"], p["head_hidden"], p["activation"])
        nb_options = {"activation": "softmax", "dispersion": p["dispersion"], "r_init": p["r_init"], "r_min": p["r_min"]}
        parts = [make_likelihood(m["likelihood"], m["n_features"], **(nb_options if m["likelihood"] == "nb" else {}))
                 for m in mods]
        return decoder, MultiModalLikelihood(parts, [m["name"] for m in mods], [m["weight"] for m in mods])

    def _balance_modalities(self, modal) -> None:
        """Weights that give every modality the first one's share of the loss under the null model (each
        feature's mean composition): a modality of 60 open peaks per cell then counts as much as one
        of 2,000 RNA counts, instead of a tenth as much."""
        train = np.zeros(len(self.obs_names), dtype=bool)
        train[self.train_idx] = True
        null = [null_nll_per_cell(part, rows, self.library_size[:, m], spec["likelihood"], train)
                for m, (part, rows, spec) in enumerate(zip(modal.parts, modal.row_maps, self.params["modalities"]))]
        for spec, value in zip(self.params["modalities"], null):
            spec["weight"] = float(null[0] / value) if value > 0 else 1.0
        self.params["modality_weighting"] = "balanced"

    # ------------------------------------------------------------------ modalities
    @property
    def is_multimodal(self) -> bool:
        """Whether the model was built on several modalities (a MuData or ``modality_key``)."""
        return "modalities" in getattr(self, "params", {})

    @property
    def modality_names(self) -> list[str]:
        """The modalities' names in order (``[]`` for a single-modality model)."""
        return [m["name"] for m in self.params.get("modalities", [])]

    def _modality_index(self, modality: str) -> int:
        names = self.modality_names
        if not names:
            raise ValueError("This model has one modality; modality= is for models built on several (a MuData).")
        if modality not in names:
            raise ValueError(f"Unknown modality {modality!r}; the model has {names}.")
        return names.index(modality)

    def _modality_columns(self, modality: str) -> slice:
        m = self._modality_index(modality)
        sizes = [x["n_features"] for x in self.params["modalities"]]
        start = int(sum(sizes[:m]))
        return slice(start, start + sizes[m])

    def modality_var_names(self, modality: str) -> pd.Index:
        """Feature names of one modality.

        Parameters
        ----------
        modality
            A modality name (see :attr:`modality_names`).

        Returns
        -------
        pandas.Index
            Its features, in the model's order.
        """
        return self.var_names[self._modality_columns(modality)]

    def _new_modal_data(self, data, layer, modality: str | None):
        """New cells' counts restricted to the model's features, their per-modality libraries (0 where a modality
        is absent) and, per modality, the model features present (``None``: all)."""
        names = self.modality_names
        key = self.params.get("modality_key")
        if is_mudata(data):
            known = [n for n in data.mod if n in names]
            unknown = [n for n in data.mod if n not in names]
            if unknown:
                warnings.warn(f"Modalities {unknown} are not in the model ({names}) and are ignored.", stacklevel=4)
            mods = read_modalities(data, layer=layer, modalities=known)
        elif modality is None and key is not None and key in data.var.columns:
            mods = read_modalities(data, layer=layer, modality_key=key, modalities=names)
        else:
            mods = read_modalities(data, layer=layer, modality=modality or self._guess_modality(data, layer))
        parts, row_maps, observed = [], [], []
        for name in names:
            if name not in mods.names:
                observed.append(np.zeros(0, np.int64))
                continue
            j = mods.names.index(name)
            model_names = self.modality_var_names(name)
            where = pd.Index(mods.var_names[j]).get_indexer(model_names)
            have = np.flatnonzero(where >= 0)
            if len(have) == 0:
                warnings.warn(f"The new {name!r} data share no feature with the model; that modality is ignored.",
                              stacklevel=4)
                observed.append(np.zeros(0, np.int64))
                continue
            if len(have) < len(model_names):
                warnings.warn(f"The new {name!r} data have {len(have)} of the model's {len(model_names)} features; the "
                              "latent is inferred from those (the others are predicted).", stacklevel=4)
            part = mods.parts[j]
            if len(have) != part.n_vars or not np.array_equal(where[have], np.arange(part.n_vars)):
                part = part.subset_columns(where[have])
            parts.append(part)
            row_maps.append(mods.row_maps[j])
            observed.append(None if len(have) == len(model_names) else have)
        if not parts:
            raise ValueError(f"The new data hold none of the model's modalities {names} (or no shared features).")
        kept = Modalities([n for n, o in zip(names, observed) if o is None or len(o)],
                          [pd.Index([]) for _ in parts], parts, row_maps, mods.obs_names, mods.obs)
        lib_kept = kept.library_sizes(what="the new cells")
        lib = np.zeros((len(mods.obs_names), len(names)), dtype=np.float32)
        for j, name in enumerate(kept.names):
            lib[:, names.index(name)] = lib_kept[:, j]
        return kept.matrix(), lib, observed

    def _guess_modality(self, adata, layer) -> str:
        """The modality of an AnnData without a modality column: the one sharing most feature names."""
        own = var_names_for(adata, layer)
        overlap = [int(own.isin(self.modality_var_names(n)).sum()) for n in self.modality_names]
        if max(overlap) == 0:
            raise ValueError(f"The AnnData's features match none of the model's modalities {self.modality_names}; "
                             "check the feature names, or pass modality=... .")
        return self.modality_names[int(np.argmax(overlap))]

    # ------------------------------------------------------------------ covariates
    def _setup_covariates(self, adata, cat_keys: list[str], cont_keys: list[str]) -> None:
        """Validate the covariate columns, fix the categories and codes, and standardise the continuous ones."""
        obs = adata.obs
        categorical, codes = [], []
        for key in cat_keys:
            values = _obs_column(obs, key)
            missing = pd.isna(values)
            if missing.any():
                raise ValueError(
                    f"obs[{key!r}] has {int(missing.sum())} missing value(s); every cell needs its category. Fill them "
                    f"(e.g. adata.obs[{key!r}] = adata.obs[{key!r}].astype(str).where(adata.obs[{key!r}].notna(), "
                    "'unknown')) or drop those cells (adata = adata[adata.obs[key].notna()].copy()).")
            labels = pd.Index(values.astype(str))
            if isinstance(values.dtype, pd.CategoricalDtype):  # keep the user's order, only observed categories
                cats = [str(c) for c in values.cat.categories if str(c) in set(labels)]
            else:
                cats = sorted(set(labels))
            if len(cats) == 1:
                warnings.warn(f"obs[{key!r}] has a single category ({cats[0]!r}): the covariate adds nothing (every "
                              "cell gets the same prior component).", stacklevel=3)
            codes.append(pd.Index(cats).get_indexer(labels))
            categorical.append({"key": key, "categories": cats})
        self.covariate_codes = np.stack(codes, axis=1).astype(np.int64) if codes else np.zeros((len(obs), 0), np.int64)
        if codes and len(self.val_idx):
            only_val = np.zeros(len(obs), dtype=bool)
            for j in range(len(codes)):
                in_train = np.zeros(len(categorical[j]["categories"]), dtype=bool)
                in_train[self.covariate_codes[self.train_idx, j]] = True
                only_val |= ~in_train[self.covariate_codes[:, j]]
            moved = self.val_idx[only_val[self.val_idx]]
            if len(moved):
                warnings.warn(f"{len(moved)} validation cell(s) have a covariate category no training cell has; they "
                              "were moved into the training split so that every category is learned.", stacklevel=3)
                self.train_idx = np.sort(np.concatenate([self.train_idx, moved]))
                self.val_idx = np.setdiff1d(self.val_idx, moved)
        for j, c in enumerate(categorical):
            c["train_counts"] = np.bincount(self.covariate_codes[self.train_idx, j],
                                            minlength=len(c["categories"])).tolist()
        continuous, cont = [], []
        for key in cont_keys:
            values = _continuous_column(obs, key, what="the training cells")
            train = values[self.train_idx]
            mean, sd = float(train.mean()), float(train.std())
            if not sd > 0:
                warnings.warn(f"obs[{key!r}] is constant on the training cells; it is fed to the decoder centred "
                              "but unscaled and carries no information.", stacklevel=3)
                sd = 1.0
            continuous.append({"key": key, "mean": mean, "sd": sd})
            cont.append((values - mean) / sd)
        self.covariate_continuous = (np.stack(cont, axis=1).astype(np.float32) if cont else None)
        self.covariates = {"categorical": categorical, "continuous": continuous}

    @property
    def has_covariates(self) -> bool:
        """Whether the model was built with categorical or continuous covariates (``batch_key`` etc.)."""
        cov = getattr(self, "covariates", None)
        return bool(cov and (cov["categorical"] or cov["continuous"]))

    @property
    def n_covariate_inputs(self) -> int:
        """Decoder inputs after the biological latent (covariate latents + continuous covariates)."""
        if not self.has_covariates:
            return 0
        return (len(self.covariates["categorical"]) * self.params["n_latent_covariate"]
                + len(self.covariates["continuous"]))

    @property
    def categorical_covariate_keys(self) -> list[str]:
        """``obs`` keys of the categorical covariates, ``batch_key`` first; ``[]`` without covariates."""
        return [c["key"] for c in self.covariates["categorical"]] if self.has_covariates else []

    def covariate_categories(self, key: str | None = None) -> list[str]:
        """The trained categories of a categorical covariate (default: the first, ``batch_key``).

        Parameters
        ----------
        key
            ``obs`` key of a categorical covariate; ``None`` for the first one (``batch_key``).

        Returns
        -------
        list of str
            The categories in the order of their mixture components (a pandas Categorical's order, otherwise
            sorted). Raises ``ValueError`` for a model without categorical covariates or an unknown ``key``.
        """
        return list(self.covariates["categorical"][self._covariate_index(key)]["categories"])

    def _covariate_index(self, key: str | None) -> int:
        keys = self.categorical_covariate_keys
        if not keys:
            raise ValueError("This model has no categorical covariates (pass batch_key=... when creating it).")
        if key is None:
            return 0
        if key not in keys:
            raise ValueError(f"{key!r} is not a categorical covariate of this model; it has {keys}.")
        return keys.index(key)

    def _training_covariate_latents(self) -> list[np.ndarray]:
        out = []
        for j, table in enumerate(self.train_cov_reps):
            c = np.empty((len(self.obs_names), table.dim), dtype=np.float32)
            c[self.train_idx] = table.z.detach().cpu().numpy()
            if self.val_cov_reps:
                c[self.val_idx] = self.val_cov_reps[j].z.detach().cpu().numpy()
            out.append(c)
        return out

    def _new_covariates(self, adata) -> tuple[np.ndarray, np.ndarray | None, list[int], list[list[str]]]:
        """Codes of new cells' categories (-1: unknown, >= C_j: new categories, numbered in sorted order),
        their standardised continuous covariates, the number of new categories and their names."""
        obs = adata.obs
        codes, n_new, new_names = [], [], []
        for c in self.covariates["categorical"]:
            key, cats = c["key"], pd.Index(c["categories"])
            if key not in obs.columns:
                warnings.warn(f"obs[{key!r}] is absent from the new cells: each cell's {key} is inferred (the trained "
                              "category whose component best explains its fitted covariate latent).", stacklevel=4)
                codes.append(np.full(len(obs), -1, dtype=np.int64))
                n_new.append(0)
                new_names.append([])
                continue
            values = obs[key]
            missing = np.asarray(pd.isna(values))
            labels = pd.Index(values.astype(str))
            code = np.asarray(cats.get_indexer(labels), dtype=np.int64)
            unseen = sorted(set(labels[(code < 0) & ~missing]))
            code[(code < 0) & ~missing] = len(cats) + pd.Index(unseen).get_indexer(labels[(code < 0) & ~missing])
            code[missing] = -1
            codes.append(code)
            n_new.append(len(unseen))
            new_names.append(unseen)
        codes = np.stack(codes, axis=1) if codes else np.zeros((len(obs), 0), np.int64)
        cont = None
        if self.covariates["continuous"]:
            cont = np.stack([(_continuous_column(obs, c["key"], what="the new cells") - c["mean"]) / c["sd"]
                             for c in self.covariates["continuous"]], axis=1).astype(np.float32)
        return codes, cont, n_new, new_names

    def _embed(self, adata, layer, *, n_steps: int = 200, batch_size: int = 1024, lr: float = 1e-2,
               select_by: str = "recon+prior", candidate_steps: int = 0, new_category_rounds: int = 5,
               device=None, progress: bool = True, modality: str | None = None) -> dict:
        """Every latent block of the cells: stored for the training data, inferred (model frozen) for new cells.

        Returns ``{"z", "covariate_z" (list), "codes", "continuous", "category_names" (list per covariate:
        trained + new names), "inferred" (list of bool masks)}``.
        """
        self._check_trained()
        if self._is_training_data(adata):
            if getattr(self, "train_rep", None) is None:
                raise ValueError("This model was saved without its training latents (save_representations=False); "
                                 "pass adata=... to embed cells.")
            n_cat = len(self.categorical_covariate_keys)
            return {"z": self._training_latent(), "covariate_z": self._training_covariate_latents(),
                    "codes": self.covariate_codes, "continuous": self.covariate_continuous,
                    "category_names": [self.covariate_categories(k) for k in self.categorical_covariate_keys],
                    "inferred": [np.zeros(len(self.obs_names), bool)] * n_cat}
        matrix, lib, observed = self._new_data(adata, layer, modality)
        dev = self.device if device is None else resolve_device(device)
        self._to(dev)
        with self._observing(observed):
            return self._infer_new(adata, matrix, lib, dev, n_steps=n_steps, batch_size=batch_size, lr=lr,
                                   select_by=select_by, candidate_steps=candidate_steps,
                                   new_category_rounds=new_category_rounds, progress=progress)

    def _observing(self, observed):
        """Within the block, the likelihood scores only the features new data have (several modalities)."""
        if observed is None or not self.is_multimodal:
            return contextlib.nullcontext()
        return self.module.likelihood.observe(observed)

    def _infer_new(self, adata, matrix, lib, dev, *, n_steps, batch_size, lr, select_by, candidate_steps,
                   new_category_rounds, progress) -> dict:
        if not self.has_covariates:
            z, loss = infer_latents_sharded(self.module, matrix, lib, self.n_latent, batch_size=batch_size,
                                            n_steps=n_steps, lr=lr, select_by=select_by,
                                            candidate_steps=candidate_steps, progress=progress, device=dev)
            self._last_inference_loss = loss
            return {"z": z, "covariate_z": [], "codes": np.zeros((len(z), 0), np.int64), "continuous": None,
                    "category_names": [], "inferred": []}
        if candidate_steps:
            raise ValueError("candidate_steps is not supported with covariates (candidates are scored, not optimised).")
        codes, cont, n_new, new_names = self._new_covariates(adata)
        res = infer_covariate_latents_sharded(self.module, matrix, lib, self.n_latent, codes, cont, n_new,
                                              batch_size=batch_size, n_steps=n_steps, lr=lr, select_by=select_by,
                                              new_category_rounds=new_category_rounds, progress=progress, device=dev)
        self._last_inference_loss = res.loss
        self._last_new_category_means = {
            c["key"]: dict(zip(new_names[j], res.new_means[j])) for j, c in enumerate(self.covariates["categorical"])}
        return {"z": res.z, "covariate_z": res.covariate_z, "codes": res.codes, "continuous": cont,
                "category_names": [self.covariate_categories(k) + new_names[j]
                                   for j, k in enumerate(self.categorical_covariate_keys)],
                "inferred": [codes[:, j] < 0 for j in range(codes.shape[1])]}

    def _extra_input(self, covariate_z: list[np.ndarray], continuous: np.ndarray | None, n: int,
                     transform_batch=None) -> np.ndarray | None:
        """The decoder's input after the biological latent: each cell's own covariate latents, or with
        ``transform_batch`` (a category of ``batch_key``, or ``{key: category}``) that category's component
        mean for every cell; continuous covariates as given (zeros, the training mean, when ``None``)."""
        if not self.has_covariates:
            if transform_batch is not None:
                raise ValueError("transform_batch needs a model with covariates (batch_key=...).")
            return None
        chosen = {}
        if transform_batch is not None:
            items = (transform_batch.items() if isinstance(transform_batch, dict)
                     else [(self.categorical_covariate_keys[0] if self.categorical_covariate_keys else None,
                            transform_batch)])
            for key, cat in items:
                j = self._covariate_index(key)
                cats = self.covariate_categories(self.categorical_covariate_keys[j])
                if str(cat) not in cats:
                    raise ValueError(f"transform_batch={cat!r} is not a trained category of {self.categorical_covariate_keys[j]!r}"
                                     f" ({cats[:10]}{' ...' if len(cats) > 10 else ''}).")
                chosen[j] = cats.index(str(cat))
        parts = []
        for j, cp in enumerate(self.module.covariate_priors):
            if j in chosen:
                parts.append(np.repeat(cp.mean.detach().cpu().numpy()[chosen[j]][None, :], n, axis=0))
            else:
                if covariate_z is None or len(covariate_z) <= j:
                    raise ValueError("The cells' own covariate latents are unknown here; pass transform_batch=... "
                                     "(decode as if from one batch) or the AnnData of the cells.")
                parts.append(np.asarray(covariate_z[j], dtype=np.float32))
        if self.covariates["continuous"]:
            parts.append(np.zeros((n, len(self.covariates["continuous"])), np.float32) if continuous is None
                         else np.asarray(continuous, dtype=np.float32))
        return np.concatenate(parts, axis=1).astype(np.float32)

    def covariate_input(self, adata=None, *, layer: str | None = None, transform_batch=None,
                        n_cells: int | None = None, **infer_kwargs) -> np.ndarray | None:
        """The decoder's covariate input (covariate latents + standardised continuous covariates) for the cells
        of ``adata`` (default: the training cells): each cell's own, or with ``transform_batch`` every cell's
        batch covariate at that batch's component mean. ``n_cells`` without ``adata`` and with
        ``transform_batch``: for that many cells of no particular AnnData (continuous covariates at the
        training mean). ``None`` for a model without covariates.

        Parameters
        ----------
        adata
            AnnData of the cells; ``None`` (or the training AnnData itself) means the training cells and their
            learned latents, any other AnnData is embedded as new cells (genes aligned by name).
        layer
            Where a new AnnData's raw counts are: ``None`` the model's training layer, ``"X"`` for
            ``adata.X``, ``"raw"`` for ``adata.raw.X``, otherwise a layer name.
        transform_batch
            ``None`` for each cell's own covariate latents; a category of ``batch_key``, or
            ``{key: category}`` for several categorical covariates, to put every cell at that category's
            component mean.
        n_cells
            With ``adata=None`` and ``transform_batch``: build the input for this many cells of no
            particular AnnData (covariate latents at the chosen components, continuous covariates at 0,
            the training mean).
        **infer_kwargs
            Options of the held-out inference for new cells (``n_steps``, ``batch_size``, ``lr``,
            ``select_by``, ``candidate_steps``, ``new_category_rounds``, ``device``, ``progress``; see
            :meth:`get_latent_representation`). Unused for the training cells.

        Returns
        -------
        numpy.ndarray or None
            float32 ``(n_cells, n_covariate_inputs)``: the categorical covariates' latents
            (``n_latent_covariate`` columns each, in :attr:`categorical_covariate_keys` order) followed by the
            standardised continuous covariates; ``None`` without covariates. Pass it as ``extra`` to
            :meth:`decode_latent`.
        """
        if not self.has_covariates:
            return None
        if n_cells is not None and adata is None:
            return self._extra_input([], None, int(n_cells), transform_batch)
        emb = self._embed(adata, layer, **infer_kwargs)
        return self._extra_input(emb["covariate_z"], emb["continuous"], len(emb["z"]), transform_batch)

    @property
    def n_latent(self) -> int:
        """Dimension of the biological latent space."""
        return self.params["n_latent"]

    @property
    def n_components(self) -> int:
        """Number of components of the Gaussian-mixture prior."""
        return self.params["n_components"]

    @property
    def gmm(self) -> GaussianMixture:
        """The Gaussian-mixture prior over the biological latents (a torch module: means, covariances,
        mixture weights)."""
        return self.module.prior

    def __repr__(self) -> str:
        status = "trained" if self.is_trained_ else "not trained"
        if self.is_multimodal:
            features = " + ".join(f"{m['n_features']} {m['name']} ({m['likelihood']})" for m in self.params["modalities"])
        else:
            features = f"{len(self.var_names)} genes"
        return (f"DGD({len(self.obs_names)} cells x {features}, n_latent={self.n_latent}, "
                f"n_components={self.n_components}, {status})")

    # ------------------------------------------------------------------ training
    _model_kind = MODEL_KIND
    _default_max_epochs = 500
    _default_batch_size = 256

    def _default_latent_init(self) -> str:
        # PCA coordinates (about 2x less time to a better held-out NLL at 20k cells, chosen on validation
        # cells: benchmarks/time_to_quality.py --tune). With covariates at the origin, because the PCA layout
        # carries the batch effects the covariate latents are there to take; with several modalities too,
        # because one log-normalisation over concatenated genes and peaks is not a layout we measured (on
        # the shared-structure multiome test it lost the gene -> peak links).
        return "zeros" if (self.has_covariates or self.is_multimodal) else "pca"

    def _plan_defaults(self, options: dict) -> dict:
        """The plan options with the DGD's own defaults filled in where not given: the latents' start, and
        with the PCA start its learning rate and the decoder subsample."""
        options = dict(options)
        options.setdefault("latent_init", self._default_latent_init())
        if options["latent_init"] == "pca":
            options.setdefault("lr_rep", PCA_START_LR_REP)
            options.setdefault("decoder_subsample", DECODER_SUBSAMPLE)
        return options

    def _default_runner_options(self, max_epochs: int, batch_size: int, plan_kwargs: dict) -> dict:
        # the stopping rule was chosen for PCA-started latents; from the origin the former one stays
        options = self._plan_defaults(plan_kwargs)
        if options["latent_init"] != "pca":
            return super()._default_runner_options(max_epochs, batch_size, plan_kwargs)
        fitted = len(self.train_idx)  # the cells an epoch visits
        if options["decoder_subsample"] is not None:
            fitted = min(fitted, int(options["decoder_subsample"]))
        steps_per_epoch = max(1, math.ceil(fitted / batch_size))
        min_epochs = min(int(max_epochs), math.ceil(MIN_DECODER_STEPS / steps_per_epoch))
        return {**EARLY_STOPPING, "min_epochs": min_epochs}

    def train(self, max_epochs: int | None = None, batch_size: int | None = None, early_stopping: bool = True,
              **kwargs) -> DGD:
        """Fit decoder, mixture and per-cell latents by MAP.

        Takes every option of :meth:`BaseModel.train <dgdlens.models.base.BaseModel.train>` (``device``,
        ``checkpoint_path``, ``checkpoint_every``, ``resume_from``, ``patience``, ``min_epochs``, ...) and
        of :class:`~dgdlens.train.DecoderOnlyPlanConfig` (learning rates, ``rep_step``, ``hyperprior``,
        ``lr_decay_epoch``, ``refit_prior_at_end``, ``polish_steps``, ``latent_init``, ...). Defaults: 500 epochs,
        batches of 256, latents started at their cells' PCA coordinates with the mixture fitted to them
        (``latent_init="pca"``) and learning rate ``lr_rep=0.03``, early stopping once the validation cells'
        reconstruction NLL has not improved by 0.1 % (``min_rel_delta=1e-3``) for 10 epochs (``patience``),
        never before the decoder has taken 1,000 optimiser steps (``min_epochs``: 3 epochs with 90,000
        training cells, all 500 with at most 512; see ``dgdlens.models.dgd.EARLY_STOPPING``). Past 100,000
        training cells the epochs train on a seeded sample of 100,000 (``decoder_subsample``; ``None``
        trains every cell) and the other cells are embedded at the end with the decoder frozen (see
        ``dgdlens.models.dgd.DECODER_SUBSAMPLE``); a tenth of that sample are the cells the PCA start
        explains worst, the rest uniform (``decoder_subsample_by="residual"``; ``"random"``, ``"sketch"``).
        A sample fits rare populations worse (a type of 0.2 % of 300,000 simulated cells: 2-4 % higher
        held-out NLL than with every cell, 2-17 % with a uniform sample): pass ``decoder_subsample=None``
        where they matter (see the time-to-quality benchmark page). Models with
        covariates or several modalities start at the origin (``"zeros"``, the reference) with its
        ``lr_rep=0.01``, the former rule (``patience=20``, ``min_epochs=50``, any improvement counts) and
        every cell in every epoch.

        Parameters
        ----------
        max_epochs
            Passes over the training cells (``None``: 500).
        batch_size
            Cells per mini-batch (``None``: 256).
        early_stopping
            Stop when the validation loss has not improved by ``min_rel_delta`` (relative) for ``patience``
            epochs and restore the best epoch (the training loss is monitored when there is no validation
            split).
        **kwargs
            Runner options (``device``, ``checkpoint_path``, ``patience``, ``seed``, ...) and
            :class:`~dgdlens.train.DecoderOnlyPlanConfig` options; an unknown name raises ``TypeError``.

        Returns
        -------
        DGD
            ``self``, trained (``history_`` and ``train_summary_`` set), so calls can be chained.
        """
        self._require_data("train")
        return super().train(max_epochs, batch_size, early_stopping, **kwargs)

    def _make_plan(self, *, batch_size: int, seed: int, **options) -> DecoderOnlyPlan:
        unknown = sorted(set(options) - DecoderOnlyPlanConfig.names())
        if unknown:
            raise TypeError(f"Unknown training option(s) {unknown}; valid options: "
                            f"{sorted(DecoderOnlyPlanConfig.names() - {'batch_size', 'seed'})} and the runner's "
                            "(" + ", ".join(RUNNER_OPTIONS) + ").")
        cfg = DecoderOnlyPlanConfig(batch_size=batch_size, seed=seed, **self._plan_defaults(options))
        if not self.has_covariates:
            return DecoderOnlyPlan(self.module, self._matrix, self.library_size, self.train_idx, self.val_idx,
                                   self.train_rep, self.val_rep, cfg)
        val = None if self.val_rep is None else [self.val_rep, *self.val_cov_reps]
        return DecoderOnlyPlan(self.module, self._matrix, self.library_size, self.train_idx, self.val_idx,
                               [self.train_rep, *self.train_cov_reps], val, cfg,
                               covariates=SampleCovariates(self.covariate_codes, self.covariate_continuous))

    def _collect_training(self, plan: DecoderOnlyPlan) -> None:
        self.train_rep, self.val_rep = plan.full_train_table, plan.full_val_table
        self.train_cov_reps = list(plan.full_train_tables[1:])
        self.val_cov_reps = [] if plan.full_val_tables is None else list(plan.full_val_tables[1:])

    def _fingerprint(self) -> dict:
        out = {"n_obs": int(self._matrix.n_obs), "n_vars": int(self._matrix.n_vars),
               "n_train": len(self.train_idx), "n_val": len(self.val_idx),
               "genes": names_digest(self.var_names), "cells": names_digest(self.obs_names),
               "n_latent": self.n_latent, "n_components": self.n_components}
        if self.is_multimodal:
            out["modalities"] = names_digest([f"{m['name']}:{m['n_features']}:{m['likelihood']}:{m['weight']}"
                                              for m in self.params["modalities"]] + [str(self.params["head_hidden"])])
        if self.has_covariates:
            cov = self.covariates
            out["covariates"] = names_digest([c["key"] + ":" + "|".join(c["categories"]) for c in cov["categorical"]]
                                             + [c["key"] for c in cov["continuous"]]
                                             + [str(self.params["n_latent_covariate"])])
        return out

    def _to(self, dev: torch.device) -> None:
        self.module.to(dev)
        if self.train_rep is not None:  # None for a model saved with save_representations=False
            self.train_rep.to(dev)
        if self.val_rep is not None:
            self.val_rep.to(dev)
        for table in getattr(self, "train_cov_reps", []) + getattr(self, "val_cov_reps", []):
            table.to(dev)
        self.device = dev

    # ------------------------------------------------------------------ data access
    def _require_data(self, what: str) -> None:
        if self.adata is None:
            raise ValueError(f"This model was loaded without its training data, so {what}() needs an AnnData; "
                             "pass adata=... (new cells) or DGD.load(path, adata=training_adata).")

    def _training_latent(self) -> np.ndarray:
        z = np.empty((len(self.obs_names), self.n_latent), dtype=np.float32)
        z[self.train_idx] = self.train_rep.z.detach().cpu().numpy()
        if self.val_rep is not None:
            z[self.val_idx] = self.val_rep.z.detach().cpu().numpy()
        return z

    def _new_data(self, adata, layer: str | None, modality: str | None = None):
        """Counts of new cells restricted to the model's genes, their library sizes, and (several modalities)
        per modality the model features present (``None``: all; always ``None`` for one modality)."""
        layer = self.layer if layer is None else layer
        if self.is_multimodal:
            return self._new_modal_data(adata, layer, modality)
        if modality is not None:
            raise ValueError("modality= is for models built on several modalities (a MuData).")
        matrix = get_matrix(adata, layer)
        names = var_names_for(adata, layer)
        if not names.equals(self.var_names):
            matrix = matrix.subset_columns(align_genes(names, self.var_names))
        stats = validate_counts(matrix, what="the new cells' counts", allow_empty_cells=False, empty_genes="ignore")
        return matrix, _library_sizes(matrix, self.params["scaling"], stats["row_sums"]), None

    def _is_training_data(self, adata) -> bool:
        return adata is None or adata is self.adata

    def _latent_for(self, adata, layer, z, **infer_kwargs) -> np.ndarray:
        if z is not None:
            z = np.asarray(z, dtype=np.float32)
            if z.ndim != 2 or z.shape[1] != self.n_latent:
                raise ValueError(f"z must have shape (n_cells, {self.n_latent}), got {z.shape}")
            return z
        return self.get_latent_representation(adata, layer=layer, **infer_kwargs)

    def _check_trained(self) -> None:
        self._warn_if_untrained()

    # ------------------------------------------------------------------ outputs
    def get_latent_representation(self, adata=None, *, layer: str | None = None, n_steps: int = 200,
                                  batch_size: int = 1024, lr: float = 1e-2, select_by: str = "recon+prior",
                                  candidate_steps: int = 0, device: str | torch.device | None = None,
                                  progress: bool = True, new_category_rounds: int = 5,
                                  modality: str | None = None) -> np.ndarray:
        """Biological latent vectors (n_cells, n_latent); with covariates, without them (batch-free).

        Without ``adata`` (or with the training AnnData): the learned representations of the training
        and validation cells, in the AnnData's order. With new cells: held-out inference with the
        decoder and mixture frozen (genes aligned by ``var_names``): each cell starts at the best
        mixture mean (by reconstruction + prior), then Adam refines it for up to ``n_steps`` steps.
        ``layer`` says where the new cells' counts are: default the model's training layer, ``"X"`` for
        ``adata.X``, ``"raw"`` for ``adata.raw.X``.

        With covariates, a new cell's covariate latents are fitted at the same time
        (:func:`~dgdlens.train.inference.infer_covariate_latents`): a known category starts at its
        component mean and is optimised under it; a column absent from the new ``obs`` (or a missing
        value) is inferred (all trained components are candidates; :meth:`get_covariate_categories` says
        which was picked); a category the model has not seen (a new batch) gets a new component whose mean
        is learned from that batch's cells over ``new_category_rounds`` rounds while everything trained
        stays frozen (several new batches at once; a one-cell batch works, its batch effect then cannot be
        told apart from its biology).

        Parameters
        ----------
        adata
            AnnData of the cells; ``None`` (or the training AnnData itself) means the training cells and their
            learned latents, any other AnnData is embedded as new cells (genes aligned by name).
        layer
            Where a new AnnData's raw counts are: ``None`` the model's training layer, ``"X"`` for
            ``adata.X``, ``"raw"`` for ``adata.raw.X``, otherwise a layer name.
        n_steps
            Maximum Adam steps per new cell (the optimisation may stop earlier once the loss has converged).
        batch_size
            Cells inferred together.
        lr
            Adam learning rate on the latents.
        select_by
            How the start is chosen among the mixture means: ``"recon+prior"`` (reconstruction NLL + prior
            NLL, the paper) or ``"recon"`` (reconstruction only, multiDGD).
        candidate_steps
            If > 0, optimise every candidate start that many steps before choosing (slower; not supported
            with covariates).
        device
            Torch device for the inference of new cells (``None``: the model's current device); the model
            is moved there.
        progress
            Show a progress bar.
        new_category_rounds
            Rounds of alternating fits of new categories' component means and the cells' latents (covariate
            models with unseen categories only).
        modality
            Several modalities, new cells in an AnnData of one modality without the model's ``modality_key``
            column: which modality it holds (default: the one sharing most feature names). A MuData's
            modalities are known by name; cells are embedded from the modalities (and features) they have.

        Returns
        -------
        numpy.ndarray
            float32 ``(n_cells, n_latent)``, rows in ``adata``'s cell order.
        """
        return self._embed(adata, layer, n_steps=n_steps, batch_size=batch_size, lr=lr, select_by=select_by,
                           candidate_steps=candidate_steps, device=device, progress=progress,
                           new_category_rounds=new_category_rounds, modality=modality)["z"]

    def get_covariate_representation(self, adata=None, key: str | None = None, *, layer: str | None = None,
                                     **infer_kwargs) -> np.ndarray:
        """Covariate latents (n_cells, n_latent_covariate) of the categorical covariate ``key`` (default:
        the first, ``batch_key``): learned for the training cells, inferred for new cells (as in
        :meth:`get_latent_representation`, which takes the same options).

        Parameters
        ----------
        adata
            AnnData of the cells; ``None`` (or the training AnnData itself) means the training cells and their
            learned latents, any other AnnData is embedded as new cells (genes aligned by name).
        key
            ``obs`` key of the categorical covariate; ``None`` for ``batch_key`` (the first).
        layer
            Where a new AnnData's raw counts are: ``None`` the model's training layer, ``"X"`` for
            ``adata.X``, ``"raw"`` for ``adata.raw.X``, otherwise a layer name.
        **infer_kwargs
            Options of the held-out inference for new cells (``n_steps``, ``batch_size``, ``lr``,
            ``select_by``, ``candidate_steps``, ``new_category_rounds``, ``device``, ``progress``; see
            :meth:`get_latent_representation`). Unused for the training cells.

        Returns
        -------
        numpy.ndarray
            float32 ``(n_cells, n_latent_covariate)``.
        """
        j = self._covariate_index(key)
        return self._embed(adata, layer, **infer_kwargs)["covariate_z"][j]

    def get_covariate_categories(self, adata=None, key: str | None = None, *, layer: str | None = None,
                                 **infer_kwargs) -> np.ndarray:
        """Each cell's category of covariate ``key`` (default ``batch_key``) as strings: as given, or for new
        cells without the column (or with a missing value) the inferred one: the trained category whose
        component gives the fitted covariate latent the highest ``log pi_k + log N``.

        Parameters
        ----------
        adata
            AnnData of the cells; ``None`` (or the training AnnData itself) means the training cells and their
            learned latents, any other AnnData is embedded as new cells (genes aligned by name).
        key
            ``obs`` key of the categorical covariate; ``None`` for ``batch_key`` (the first).
        layer
            Where a new AnnData's raw counts are: ``None`` the model's training layer, ``"X"`` for
            ``adata.X``, ``"raw"`` for ``adata.raw.X``, otherwise a layer name.
        **infer_kwargs
            Options of the held-out inference for new cells (``n_steps``, ``batch_size``, ``lr``,
            ``select_by``, ``candidate_steps``, ``new_category_rounds``, ``device``, ``progress``; see
            :meth:`get_latent_representation`). Unused for the training cells.

        Returns
        -------
        numpy.ndarray
            Object array of ``n_cells`` category names (str); a category the model had not seen keeps its
            own name.
        """
        j = self._covariate_index(key)
        emb = self._embed(adata, layer, **infer_kwargs)
        return np.asarray(emb["category_names"][j], dtype=object)[emb["codes"][:, j]]

    def _prior_scores(self, z: np.ndarray, fn) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(z), 8192):
                zt = torch.from_numpy(z[i:i + 8192]).to(self.device)
                out.append(fn(zt).cpu().numpy())
        return np.concatenate(out) if out else np.empty((0,))

    def get_cluster_assignments(self, adata=None, *, z=None, layer: str | None = None, **infer_kwargs) -> np.ndarray:
        """Most probable mixture component of each cell (argmax on log-probabilities), int array.

        Parameters
        ----------
        adata
            AnnData of the cells; ``None`` (or the training AnnData itself) means the training cells and their
            learned latents, any other AnnData is embedded as new cells (genes aligned by name).
        z
            Biological latents ``(n_cells, n_latent)`` to use instead of the cells' own (fitted or inferred)
            latents.
        layer
            Where a new AnnData's raw counts are: ``None`` the model's training layer, ``"X"`` for
            ``adata.X``, ``"raw"`` for ``adata.raw.X``, otherwise a layer name.
        **infer_kwargs
            Options of the held-out inference for new cells (``n_steps``, ``batch_size``, ``lr``,
            ``select_by``, ``candidate_steps``, ``new_category_rounds``, ``device``, ``progress``; see
            :meth:`get_latent_representation`). Unused for the training cells.

        Returns
        -------
        numpy.ndarray
            int64 ``(n_cells,)`` component indices in ``0 .. n_components - 1``.
        """
        z = self._latent_for(adata, layer, z, **infer_kwargs)
        return self._prior_scores(z, self.gmm.assign).astype(np.int64)

    def get_responsibilities(self, adata=None, *, z=None, layer: str | None = None, **infer_kwargs) -> np.ndarray:
        """Posterior probability of each mixture component per cell, (n_cells, K); rows sum to 1.

        Parameters
        ----------
        adata
            AnnData of the cells; ``None`` (or the training AnnData itself) means the training cells and their
            learned latents, any other AnnData is embedded as new cells (genes aligned by name).
        z
            Biological latents ``(n_cells, n_latent)`` to use instead of the cells' own (fitted or inferred)
            latents.
        layer
            Where a new AnnData's raw counts are: ``None`` the model's training layer, ``"X"`` for
            ``adata.X``, ``"raw"`` for ``adata.raw.X``, otherwise a layer name.
        **infer_kwargs
            Options of the held-out inference for new cells (``n_steps``, ``batch_size``, ``lr``,
            ``select_by``, ``candidate_steps``, ``new_category_rounds``, ``device``, ``progress``; see
            :meth:`get_latent_representation`). Unused for the training cells.

        Returns
        -------
        numpy.ndarray
            float32 ``(n_cells, n_components)`` responsibilities.
        """
        z = self._latent_for(adata, layer, z, **infer_kwargs)
        return self._prior_scores(z, self.gmm.responsibilities)

    def _blocks_for(self, adata, layer, z, transform_batch=None, **infer_kwargs):
        """(biological latents, decoder's covariate input or None) for the cells of ``adata``."""
        if z is None:
            emb = self._embed(adata, layer, **infer_kwargs)
            return emb["z"], self._extra_input(emb["covariate_z"], emb["continuous"], len(emb["z"]), transform_batch)
        z = self._latent_for(adata, layer, z)
        if not self.has_covariates:
            return z, self._extra_input([], None, len(z), transform_batch)
        if self._is_training_data(adata) and len(z) != len(self.obs_names):
            # latents of no particular cells: only a chosen batch (and the training mean of continuous
            # covariates) can complete them
            return z, self._extra_input([], None, len(z), transform_batch)
        emb = self._embed(adata, layer, **infer_kwargs)
        return z, self._extra_input(emb["covariate_z"], emb["continuous"], len(z), transform_batch)

    def decode_latent(self, z, library_size=None, *, extra=None, transform_batch=None,
                      batch_size: int = 2048, modality: str | None = None) -> np.ndarray:
        """Decode latents to NB means (cells x genes). With ``library_size=None``: the per-cell
        composition (rows sum to 1), i.e. the normalised expression.

        With covariates the decoder also reads ``extra`` (n_cells, covariate inputs): the cells' covariate
        latents and standardised continuous covariates, from :meth:`covariate_input`; or
        ``transform_batch=`` (a category of ``batch_key``, or ``{key: category}`` for every categorical
        covariate) to decode every cell as if from that batch (continuous covariates at the training mean).

        Parameters
        ----------
        z
            Biological latents, ``(n_cells, n_latent)``.
        library_size
            Per-cell scale of the NB mean (total counts with ``scaling="sum"``): a scalar or ``(n_cells,)``;
            ``None`` returns the composition instead.
        extra
            Covariate input ``(n_cells, n_covariate_inputs)`` from :meth:`covariate_input`; only for a
            model with covariates.
        transform_batch
            Used when ``extra`` is ``None`` in a covariate model: the category (of ``batch_key``, or
            ``{key: category}``) whose component mean every cell is decoded with.
        batch_size
            Cells decoded per forward pass.
        modality
            Several modalities: decode this modality's head only (the others' layers are not computed);
            ``library_size`` is then a scalar or one value per cell, and the result has that modality's
            features. ``None``: every modality side by side, ``library_size`` cells x modalities.

        Returns
        -------
        numpy.ndarray
            float32 ``(n_cells, n_genes)``: NB means (expected counts), or with ``library_size=None`` each
            row normalised to sum to 1.
        """
        z = np.asarray(z, dtype=np.float32)
        if z.ndim != 2 or z.shape[1] != self.n_latent:
            raise ValueError(f"z must have shape (n_cells, {self.n_latent}), got {z.shape}")
        if extra is None and self.has_covariates:
            extra = self._extra_input([], None, len(z), transform_batch)
        elif extra is not None:
            if not self.has_covariates:
                raise ValueError("extra= is only for a model with covariates.")
            extra = np.asarray(extra, dtype=np.float32)
            if extra.shape != (len(z), self.n_covariate_inputs):
                raise ValueError(f"extra must have shape ({len(z)}, {self.n_covariate_inputs}), got {extra.shape}")
        if self.is_multimodal:
            return self._decode_modalities(z, extra, library_size, batch_size, modality)
        if modality is not None:
            raise ValueError("modality= is for models built on several modalities (a MuData).")
        if library_size is not None:
            # a real (writable) copy: torch.from_numpy warns on the read-only view broadcast_to returns
            library_size = np.array(np.broadcast_to(np.asarray(library_size, dtype=np.float32).reshape(-1), (len(z),))).copy()
        out = np.empty((len(z), len(self.var_names)), dtype=np.float32)
        self.module.eval()
        with torch.no_grad():
            for i in range(0, len(z), batch_size):
                raw = self._decode(z[i:i + batch_size], None if extra is None else extra[i:i + batch_size])
                mean = self.module.likelihood.mean(raw, None)
                if library_size is None:
                    mean = mean / mean.sum(1, keepdim=True)
                else:
                    if self.params["output_activation"] == "softmax":
                        mean = mean * torch.from_numpy(np.ascontiguousarray(library_size[i:i + batch_size])).to(self.device)[:, None]
                    else:
                        mean = self.module.likelihood.mean(
                            raw, torch.from_numpy(np.ascontiguousarray(library_size[i:i + batch_size])).to(self.device))
                out[i:i + batch_size] = mean.cpu().numpy()
        return out

    def _modal_library(self, library_size, n: int) -> np.ndarray | None:
        """Library sizes as ``n x modalities`` (from a scalar, one value per modality, or per cell and modality)."""
        if library_size is None:
            return None
        lib = np.asarray(library_size, dtype=np.float32)
        n_mod = len(self.modality_names)
        if lib.ndim == 1 and lib.shape[0] == n_mod and n != n_mod:
            lib = lib[None, :]
        elif lib.ndim <= 1 and lib.size == 1:
            lib = lib.reshape(1, 1)
        if lib.ndim != 2 or lib.shape[1] not in (1, n_mod) or lib.shape[0] not in (1, n):
            raise ValueError(f"library_size must be a scalar, one value per modality ({n_mod}) or cells x modalities "
                             f"({n} x {n_mod}), got shape {lib.shape}.")
        return np.array(np.broadcast_to(lib, (n, n_mod)))

    def _decode_modalities(self, z, extra, library_size, batch_size: int, modality: str | None = None) -> np.ndarray:
        """Each modality's mean at ``library_size`` (cells x modalities), or its composition when ``None``; with
        ``modality`` that modality's head only (``library_size`` a scalar or one value per cell), the other
        heads' (possibly 100k-wide) layers not computed."""
        if modality is None:
            head, mean, width = None, self.module.likelihood.mean, len(self.var_names)
            lib = self._modal_library(library_size, len(z))
        else:
            head = self._modality_index(modality)
            mean, width = self.module.likelihood.likelihoods[head].mean, self.params["modalities"][head]["n_features"]
            lib = None if library_size is None else np.array(
                np.broadcast_to(np.asarray(library_size, dtype=np.float32).reshape(-1), (len(z),)))
        out = np.empty((len(z), width), dtype=np.float32)
        self.module.eval()
        with torch.no_grad():
            for i in range(0, len(z), batch_size):
                raw = self._decode(z[i:i + batch_size], None if extra is None else extra[i:i + batch_size], head=head)
                scale = None if lib is None else torch.from_numpy(np.ascontiguousarray(lib[i:i + batch_size])).to(self.device)
                out[i:i + batch_size] = mean(raw, scale).cpu().numpy()
        return out

    def predict_modality(self, adata=None, modality: str | None = None, *, z=None, library_size=None,
                         layer: str | None = None, transform_batch=None, batch_size: int = 2048,
                         average_modes: bool = True, **infer_kwargs) -> np.ndarray:
        """Predict one modality of the cells from their latents: cross-modal prediction when the cells lack it
        (RNA -> ATAC, ATAC -> RNA), denoising when they have it.

        New cells are embedded from the modalities they have (decoder frozen); then the modality's head is
        decoded. Negative binomial and Poisson modalities give expected counts, the binary one the
        probability that a feature is non-zero (a peak is seen open).

        Parameters
        ----------
        adata
            The cells: ``None`` (the training cells), a MuData with any of the model's modalities, an AnnData
            with the model's ``modality_key`` column, or an AnnData of one modality (which one is found by
            its feature names; wrap it as ``MuData({"rna": adata})`` to say it).
        modality
            The modality to predict (e.g. ``"atac"``).
        z
            Latents ``(n_cells, n_latent)`` to decode instead of the cells' own.
        library_size
            Depth at which to predict: a scalar or ``(n_cells,)``. Default: each cell's own library in that
            modality where it has one, else the median library of the training cells in it.
        layer
            Where a new AnnData's counts are (see :meth:`get_latent_representation`).
        transform_batch
            Decode as if from this batch (see :meth:`get_normalized_expression`).
        batch_size
            Cells decoded per forward pass.
        average_modes
            For new cells that lack ``modality`` (cross-modal prediction; models without covariates): average
            the predictions over the mixture's modes instead of decoding one point. The latent is fitted
            from every component's mean in turn (``n_components`` fits) and the predictions are weighted by
            each fit's posterior, ``softmax(-(NLL + prior NLL))``. Where the observed modalities cannot tell
            two modes apart (structure only the missing modality sees) a point estimate commits to one and
            predicts confidently wrong; the average predicts their mixture. Where one mode dominates it is
            the point prediction. Ignored with ``z`` given.
        **infer_kwargs
            Options of the held-out inference for new cells (``n_steps``, ``lr``, ...; see
            :meth:`get_latent_representation`).

        Returns
        -------
        numpy.ndarray
            float32 ``(n_cells, n_features of the modality)``, columns :meth:`modality_var_names`.
        """
        if modality is None:
            raise ValueError(f"Say which modality to predict: modality= one of {self.modality_names}.")
        m = self._modality_index(modality)
        if (average_modes and z is None and not self._is_training_data(adata) and not self.has_covariates
                and isinstance(self.module.prior, GaussianMixture) and self.n_components > 1):
            return self._predict_over_modes(adata, layer, modality, library_size, batch_size, infer_kwargs)
        zb, extra = self._blocks_for(adata, layer, z, transform_batch, **infer_kwargs)
        n = len(zb)
        if library_size is None:
            own = self.get_library_sizes(adata, layer=layer)
            lib = np.full(n, self._median_library(m), dtype=np.float32)
            if own is not None and len(own) == n:
                lib = np.where(own[:, m] > 0, own[:, m], lib).astype(np.float32)
        else:
            lib = library_size
        return self._decode_modalities(zb, extra, lib, batch_size, modality)

    def _predict_over_modes(self, adata, layer, modality: str, library_size, batch_size: int,
                            infer_kwargs: dict) -> np.ndarray:
        """:meth:`predict_modality` averaged over the mixture's modes for the cells lacking ``modality``."""
        m = self._modality_index(modality)
        matrix, lib, observed = self._new_data(adata, layer)
        point = self.predict_modality(adata, modality, library_size=library_size, layer=layer, batch_size=batch_size,
                                      average_modes=False, **infer_kwargs)
        lacking = lib[:, m] == 0
        if not lacking.any():
            return point
        opts = {"batch_size": 1024, "n_steps": 200, "lr": 1e-2, "progress": False} | {
            k: v for k, v in infer_kwargs.items() if k in ("batch_size", "n_steps", "lr", "progress", "device")}
        dev = self.device if opts.get("device") is None else resolve_device(opts.pop("device"))
        opts.pop("device", None)
        self._to(dev)
        means = self.module.prior.mean.detach()
        fits = []
        with self._observing(observed):
            for k in range(self.n_components):
                fits.append(infer_latents_sharded(self.module, matrix, lib, self.n_latent, device=dev,
                                                  candidates=means[k:k + 1], **opts))
        loss = np.stack([f[1] for f in fits], axis=1).astype(np.float64)[lacking]
        weight = np.exp(-(loss - loss.min(1, keepdims=True)))
        weight /= weight.sum(1, keepdims=True)
        if library_size is None:  # these cells have no library in the modality: the training median
            depth = np.full(int(lacking.sum()), self._median_library(m), dtype=np.float32)
        else:
            depth = np.array(np.broadcast_to(np.asarray(library_size, np.float32).reshape(-1), (len(lib),)))[lacking]
        out = point.copy()
        avg = np.zeros((int(lacking.sum()), point.shape[1]), dtype=np.float64)
        for k, (zk, _) in enumerate(fits):
            pred = self.predict_modality(z=zk[lacking], modality=modality, library_size=depth, batch_size=batch_size,
                                         average_modes=False)
            avg += weight[:, k:k + 1] * pred
        out[lacking] = avg.astype(np.float32)
        return out

    def _median_library(self, m: int) -> float:
        """Median library of the training cells in modality ``m`` (over the cells that have it)."""
        lib = self.library_size
        if lib is None:
            raise ValueError("This model was saved without its per-cell state; pass library_size=... .")
        have = lib[:, m] > 0
        return float(np.median(lib[have, m])) if have.any() else 1.0

    def _decode(self, z: np.ndarray, extra: np.ndarray | None, head: int | None = None) -> torch.Tensor:
        """Raw decoder output of every feature, or (several modalities) of one modality's head only."""
        zt = torch.from_numpy(np.ascontiguousarray(z)).to(self.device)
        if extra is None:
            return self.module.decode(zt, head=head)
        return self.module.decode(zt, torch.from_numpy(np.ascontiguousarray(extra)).to(self.device), head=head)

    def get_normalized_expression(self, adata=None, *, z=None, layer: str | None = None,
                                  gene_list: Sequence[str] | None = None, transform_batch=None,
                                  modality: str | None = None, **infer_kwargs) -> np.ndarray:
        """Per-cell expression composition (rows sum to 1 over all model genes), (n_cells, n_genes).

        With covariates each cell is decoded with its own covariate latents (default), or with
        ``transform_batch`` as if it came from that batch (scVI's name): the batch covariate latent of
        every cell is that category's component mean (a category of ``batch_key``; ``{key: category}`` for
        several covariates; covariates not named keep each cell's own latent). That is batch-corrected
        expression: cells of one type from different batches decode alike.

        Parameters
        ----------
        adata
            AnnData of the cells; ``None`` (or the training AnnData itself) means the training cells and their
            learned latents, any other AnnData is embedded as new cells (genes aligned by name).
        z
            Biological latents ``(n_cells, n_latent)`` to use instead of the cells' own (fitted or inferred)
            latents.
        layer
            Where a new AnnData's raw counts are: ``None`` the model's training layer, ``"X"`` for
            ``adata.X``, ``"raw"`` for ``adata.raw.X``, otherwise a layer name.
        gene_list
            Gene names (model ``var_names``) of the columns to return, in that order; ``None`` for all genes.
            An unknown gene raises ``ValueError``.
        transform_batch
            ``None`` (each cell's own covariates), a category of ``batch_key``, or ``{key: category}``.
        modality
            Several modalities: only this modality's columns (each modality's composition sums to 1 per
            cell; ``None``: every modality side by side).
        **infer_kwargs
            Options of the held-out inference for new cells (``n_steps``, ``batch_size``, ``lr``,
            ``select_by``, ``candidate_steps``, ``new_category_rounds``, ``device``, ``progress``; see
            :meth:`get_latent_representation`). Unused for the training cells.

        Returns
        -------
        numpy.ndarray
            float32 ``(n_cells, n_genes)`` (or ``len(gene_list)`` columns); rows sum to 1 over all model
            genes (over each modality's features with several), so a ``gene_list`` subset sums to less.
        """
        z, extra = self._blocks_for(adata, layer, z, transform_batch, **infer_kwargs)
        out = self.decode_latent(z, extra=extra)
        if modality is not None:
            out = out[:, self._modality_columns(modality)]
            if gene_list is not None:
                names = self.modality_var_names(modality)
                idx = names.get_indexer(pd.Index(gene_list))
                if np.any(idx < 0):
                    raise ValueError(f"gene_list contains features modality {modality!r} does not have, e.g. "
                                     f"{list(pd.Index(gene_list)[idx < 0][:5])}.")
                out = out[:, idx]
            return out
        if gene_list is not None:
            idx = self.var_names.get_indexer(pd.Index(gene_list))
            if np.any(idx < 0):
                missing = list(pd.Index(gene_list)[idx < 0][:5])
                raise ValueError(f"gene_list contains genes the model does not know, e.g. {missing}.")
            out = out[:, idx]
        return out

    def get_library_sizes(self, adata=None, *, layer: str | None = None, modality: str | None = None) -> np.ndarray | None:
        """Per-cell scale of the NB mean (total counts with the default ``scaling="sum"``) of the training
        cells, or of new cells (their counts restricted to the model's genes). ``None`` with ``scaling="none"``.

        Parameters
        ----------
        adata
            ``None`` (or the training AnnData) for the training cells; otherwise new cells.
        layer
            Where a new AnnData's raw counts are: ``None`` the model's training layer, ``"X"`` for
            ``adata.X``, ``"raw"`` for ``adata.raw.X``, otherwise a layer name.
        modality
            Several modalities, a new AnnData of one modality: its name (found by feature names otherwise).

        Returns
        -------
        numpy.ndarray or None
            Several modalities: float32 ``(n_cells, n_modalities)``, each cell's total counts per modality
            (0 where it lacks one). Otherwise float32 ``(n_cells,)``: total counts (``scaling="sum"``), maximum count (``"max"``) or mean
            count (``"mean"``) per cell over the model's genes; ``None`` for ``scaling="none"``.
        """
        if self._is_training_data(adata):
            return self.library_size
        return self._new_data(adata, layer, modality)[1]

    def sample_counts(self, adata=None, *, z=None, layer: str | None = None, library_size=None, seed: int = 0,
                      batch_size: int = 2048, transform_batch=None, **infer_kwargs) -> sp.csr_matrix:
        """Draw counts from the model's NB for each cell (mean = library x composition, variance
        mean + mean^2 / r). Returned as a sparse CSR matrix (cells x genes), built batch by batch.
        ``transform_batch``: counterfactual counts as if every cell came from that batch (see
        :meth:`get_normalized_expression`), with each cell's own library size.

        Parameters
        ----------
        adata
            AnnData of the cells; ``None`` (or the training AnnData itself) means the training cells and their
            learned latents, any other AnnData is embedded as new cells (genes aligned by name).
        z
            Biological latents ``(n_cells, n_latent)`` to use instead of the cells' own (fitted or inferred)
            latents.
        layer
            Where a new AnnData's raw counts are: ``None`` the model's training layer, ``"X"`` for
            ``adata.X``, ``"raw"`` for ``adata.raw.X``, otherwise a layer name.
        library_size
            Per-cell scale ``(n_cells,)`` of the NB mean; ``None`` uses the cells' own
            (:meth:`get_library_sizes`).
        seed
            Seed of the draws (a ``torch.Generator`` on the model's device).
        batch_size
            Cells drawn per batch.
        transform_batch
            ``None``, a category of ``batch_key``, or ``{key: category}`` (as in
            :meth:`get_normalized_expression`).
        **infer_kwargs
            Options of the held-out inference for new cells (``n_steps``, ``batch_size``, ``lr``,
            ``select_by``, ``candidate_steps``, ``new_category_rounds``, ``device``, ``progress``; see
            :meth:`get_latent_representation`). Unused for the training cells.

        Returns
        -------
        scipy.sparse.csr_matrix
            Simulated counts, ``(n_cells, n_genes)``, float32 values.
        """
        z, extra = self._blocks_for(adata, layer, z, transform_batch, **infer_kwargs)
        lib = self.get_library_sizes(adata, layer=layer) if library_size is None else np.asarray(library_size, dtype=np.float32)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        blocks = []
        self.module.eval()
        with torch.no_grad():
            for i in range(0, len(z), batch_size):
                raw = self._decode(z[i:i + batch_size], None if extra is None else extra[i:i + batch_size])
                scale = None if lib is None else torch.from_numpy(np.ascontiguousarray(lib[i:i + batch_size])).to(self.device)
                draws = (self.module.likelihood.sample(raw, scale, generator=gen) if self.is_multimodal
                         else _nb_sample(self.module.likelihood, raw, scale, gen))
                blocks.append(sp.csr_matrix(draws.cpu().numpy()))
        return sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, len(self.var_names)))

    def get_reconstruction_error(self, adata=None, *, z=None, layer: str | None = None, batch_size: int = 1024,
                                 per_sample: bool = False, per_feature: bool = False, modality: str | None = None,
                                 **infer_kwargs):
        """Mean over cells of the negative log-likelihood summed over features (nats per cell; the NB for RNA).

        For new cells their latents are inferred first (decoder frozen). ``per_sample=True`` returns
        the per-cell values instead of the mean; ``per_feature=True`` divides by the number of genes
        (NLL per count entry), the unit :class:`~dgdlens.models.DecoderOnly` reports for images.
        With covariates each cell is decoded with its own covariate latents.

        Parameters
        ----------
        adata
            AnnData of the cells; ``None`` (or the training AnnData itself) means the training cells and their
            learned latents, any other AnnData is embedded as new cells (genes aligned by name).
        z
            Biological latents ``(n_cells, n_latent)`` to use instead of the cells' own (fitted or inferred)
            latents.
        layer
            Where a new AnnData's raw counts are: ``None`` the model's training layer, ``"X"`` for
            ``adata.X``, ``"raw"`` for ``adata.raw.X``, otherwise a layer name.
        batch_size
            Cells scored per batch.
        per_sample
            Return one value per cell instead of the mean.
        per_feature
            Divide by the number of genes (NLL per count entry instead of per cell).
        modality
            Several modalities: score this modality only (``None``: the sum over the modalities, unweighted).
            New cells' latents are inferred from every modality they have, whichever is scored; cells
            lacking the scored modality score 0.
        **infer_kwargs
            Options of the held-out inference for new cells (``n_steps``, ``batch_size``, ``lr``,
            ``select_by``, ``candidate_steps``, ``new_category_rounds``, ``device``, ``progress``; see
            :meth:`get_latent_representation`). Unused for the training cells.

        Returns
        -------
        float or numpy.ndarray
            The mean NLL over cells (nats per cell, or per entry with ``per_feature``), or with
            ``per_sample=True`` a float64 ``(n_cells,)`` array.
        """
        m = None if modality is None else self._modality_index(modality)
        observed = None
        if self._is_training_data(adata):
            self._require_data("get_reconstruction_error")
            matrix, lib = self._matrix, self.library_size
        else:
            matrix, lib, observed = self._new_data(adata, layer)
        z, extra = self._blocks_for(adata, layer, z, None, **infer_kwargs)
        loader = BatchLoader(matrix, None, lib, batch_size=batch_size, shuffle=False, device=self.device)
        nll = np.empty(matrix.n_obs, dtype=np.float64)
        self.module.eval()
        with torch.no_grad(), self._observing(observed):
            for batch in loader:
                pos = batch.index.cpu().numpy()
                raw = self._decode(z[pos], None if extra is None else extra[pos])
                if self.is_multimodal:
                    per = self.module.likelihood.nll_per_modality(batch.x, raw, batch.scale)
                    values = per.sum(1) if m is None else per[:, m]
                else:
                    values = self.module.likelihood.nll(batch.x, raw, batch.scale)
                nll[pos] = values.double().cpu().numpy()
        if per_feature:
            if m is None:
                n_features = matrix.n_vars
            else:
                n_features = (self.params["modalities"][m]["n_features"] if observed is None or observed[m] is None
                              else len(observed[m]))
            nll = nll / max(n_features, 1)
        return nll if per_sample else float(nll.mean())

    def add_to_adata(self, adata=None, *, key_added: str = "X_dgd", cluster_key: str = "dgd_cluster",
                     responsibilities_key: str | None = "dgd_responsibilities", uns_key: str = "dgd",
                     layer: str | None = None, **infer_kwargs):
        """Write latents to ``obsm[key_added]``, mixture clusters to ``obs[cluster_key]`` (categorical),
        responsibilities to ``obsm[responsibilities_key]`` and the model summary to ``uns[uns_key]``.

        With covariates also each categorical covariate's latents to ``obsm[f"{key_added}_{key}"]`` (e.g.
        ``X_dgd_batch``) and, where a new cell's category was inferred, the inferred categories to
        ``obs[f"dgd_{key}"]``. Without ``adata`` this writes into the training AnnData (you asked for it);
        returns the AnnData.

        Parameters
        ----------
        adata
            AnnData to write into; ``None`` writes into the training AnnData. New cells are embedded first.
        key_added
            ``obsm`` key of the latents ``(n_cells, n_latent)``; also the prefix of the covariate
            latents' keys.
        cluster_key
            ``obs`` key of the most probable mixture component (categorical ``"0" .. "K-1"``).
        responsibilities_key
            ``obsm`` key of the responsibilities ``(n_cells, n_components)``; ``None`` or ``""`` skips them.
        uns_key
            ``uns`` key of the model summary (``params``, ``key_added``, ``cluster_key``).
        layer
            Where a new AnnData's raw counts are: ``None`` the model's training layer, ``"X"`` for
            ``adata.X``, ``"raw"`` for ``adata.raw.X``, otherwise a layer name.
        **infer_kwargs
            Options of the held-out inference for new cells (``n_steps``, ``batch_size``, ``lr``,
            ``select_by``, ``candidate_steps``, ``new_category_rounds``, ``device``, ``progress``; see
            :meth:`get_latent_representation`). Unused for the training cells.

        Returns
        -------
        anndata.AnnData
            The AnnData written to (``adata``, or the training AnnData), modified in place.
        """
        target = self.adata if adata is None else adata
        if target is None:
            raise ValueError("No AnnData to write to: pass adata=...")
        emb = self._embed(adata, layer, **infer_kwargs)
        z = emb["z"]
        target.obsm[key_added] = z
        for j, key in enumerate(self.categorical_covariate_keys):
            target.obsm[f"{key_added}_{key}"] = emb["covariate_z"][j]
            if emb["inferred"][j].any():
                names = np.asarray(emb["category_names"][j], dtype=object)[emb["codes"][:, j]]
                target.obs[f"dgd_{key}"] = pd.Categorical(names.astype(str))
        clusters = self.get_cluster_assignments(z=z)
        target.obs[cluster_key] = pd.Categorical(clusters.astype(str), categories=[str(k) for k in range(self.n_components)])
        if responsibilities_key:
            target.obsm[responsibilities_key] = self.get_responsibilities(z=z)
        params = {k: v for k, v in self.params.items() if v is not None and v != []}
        if "modalities" in params:  # h5ad/h5mu store dicts, not lists of dicts
            params["modalities"] = {m["name"]: {k: v for k, v in m.items() if k != "name"} for m in params["modalities"]}
        target.uns[uns_key] = {"params": params, "key_added": key_added, "cluster_key": cluster_key}
        return target

    # ------------------------------------------------------------------ save / load
    def save(self, path, overwrite: bool = False, *, save_representations: bool = True) -> None:
        """Save to a directory: ``weights.safetensors`` (decoder, likelihood, mixture, latents, library
        sizes, split) + ``config.json`` (format version, parameters, gene names, cell names, history).
        Loading needs no training data. ``save_representations=False`` leaves out the per-cell state.

        Parameters
        ----------
        path
            Directory to write (created if needed).
        overwrite
            Replace an existing model directory at ``path``; otherwise an existing one is an error.
        save_representations
            Save the per-cell state (training/validation latents, split, library sizes, covariate codes,
            cell names). ``False`` gives a smaller file from which only new cells can be embedded.
        """
        self._save_representations = bool(save_representations)
        try:
            super().save(path, overwrite)
        finally:
            del self._save_representations

    def _payload(self) -> tuple[dict, dict]:
        with_reps = getattr(self, "_save_representations", True)
        tensors = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        if with_reps:
            tensors["representation.train"] = self.train_rep.z.detach()
            if self.val_rep is not None:
                tensors["representation.val"] = self.val_rep.z.detach()
            for j, table in enumerate(self.train_cov_reps):
                tensors[f"representation.train.covariate{j}"] = table.z.detach()
            for j, table in enumerate(self.val_cov_reps):
                tensors[f"representation.val.covariate{j}"] = table.z.detach()
            if self.has_covariates:
                tensors["covariate.codes"] = torch.from_numpy(np.ascontiguousarray(self.covariate_codes))
                if self.covariate_continuous is not None:
                    tensors["covariate.continuous"] = torch.from_numpy(self.covariate_continuous)
            tensors["split.train"] = torch.from_numpy(self.train_idx.astype(np.int64))
            tensors["split.val"] = torch.from_numpy(self.val_idx.astype(np.int64))
            if self.library_size is not None:
                tensors["library_size"] = torch.from_numpy(self.library_size)
        config = {
            "params": self.params,
            "layer": self.layer,
            "labels_key": self.labels_key,
            "label_categories": None if self.labels is None else list(map(str, self.labels.categories)),
            "var_names": list(map(str, self.var_names)),
            "obs_names": list(map(str, self.obs_names)) if with_reps else None,
        }
        if self.has_covariates:
            config["covariates"] = self.covariates
        return tensors, config

    @classmethod
    def load(cls, path, adata=None, *, layer: str | None = None, device: str | torch.device = "cpu") -> DGD:
        """Load a model saved with :meth:`save`. ``adata`` (optional) re-attaches the training data
        (needed only for :meth:`train` and training-set reconstruction error); it must have the
        same cells and genes.

        Parameters
        ----------
        path
            Directory written by :meth:`save`.
        adata
            The training AnnData to re-attach (same genes and cells, in the same order), or ``None``.
        layer
            Layer of ``adata`` with the counts; ``None`` keeps the layer the model was trained on.
        device
            Torch device to put the model on (``"cpu"``, ``"cuda"``, ``"auto"``, ...).

        Returns
        -------
        DGD
            The loaded model (trained state, history and parameters restored).
        """
        return super().load(path, device=device, adata=adata, layer=layer)

    @classmethod
    def _from_payload(cls, tensors: dict, config: dict, *, adata=None, layer: str | None = None) -> DGD:
        _validate_params(config["params"])
        obj = cls.__new__(cls)
        obj._init_fitted_state()
        obj.params = config["params"]
        obj.layer = config.get("layer") if layer is None else layer
        obj.labels_key = config.get("labels_key")
        obj.labels = None
        obj._label_categories = config.get("label_categories")
        obj.var_names = pd.Index(config["var_names"])
        obj.obs_names = pd.Index(config["obs_names"] or [])
        has_reps = "representation.train" in tensors
        obj.train_idx = tensors["split.train"].numpy() if has_reps else np.arange(0)
        obj.val_idx = tensors["split.val"].numpy() if has_reps else np.arange(0)
        obj.library_size = tensors["library_size"].numpy() if "library_size" in tensors else None
        obj.covariates = config.get("covariates") or {"categorical": [], "continuous": []}
        n_cat = len(obj.covariates["categorical"])
        obj.covariate_codes = (tensors["covariate.codes"].numpy() if "covariate.codes" in tensors
                               else np.zeros((len(obj.obs_names), n_cat), np.int64))
        obj.covariate_continuous = tensors["covariate.continuous"].numpy() if "covariate.continuous" in tensors else None
        obj._build(len(obj.var_names))
        state = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
        obj.module.load_state_dict(state, strict=True)
        if has_reps:
            with torch.no_grad():
                obj.train_rep.z.copy_(tensors["representation.train"])
                if obj.val_rep is not None:
                    obj.val_rep.z.copy_(tensors["representation.val"])
                for j, table in enumerate(obj.train_cov_reps):
                    table.z.copy_(tensors[f"representation.train.covariate{j}"])
                for j, table in enumerate(obj.val_cov_reps):
                    table.z.copy_(tensors[f"representation.val.covariate{j}"])
        else:
            obj.train_rep = None
            obj.train_cov_reps, obj.val_cov_reps = [], []
        obj.device = torch.device("cpu")
        obj.adata = None
        obj._matrix = None
        if adata is not None:
            obj._attach(adata)
        return obj

    def _attach(self, adata) -> None:
        if self.is_multimodal:
            mods = read_modalities(adata, layer=self.layer, modality_key=self.params.get("modality_key"),
                                   modalities=self.modality_names if is_mudata(adata) else None)
            names = pd.Index(np.concatenate([np.asarray(v, dtype=object) for v in mods.var_names]))
            if mods.names != self.modality_names or not names.equals(self.var_names):
                raise ValueError("The data's modalities or features differ from the model's; re-attach the training "
                                 "data, or embed them as new cells with get_latent_representation(...).")
            if len(self.obs_names) and not pd.Index(adata.obs_names).equals(self.obs_names):
                raise ValueError("The data's cells differ from the model's training cells.")
            self.adata, self._matrix = adata, mods.matrix()
            self.labels = check_labels_key(adata, self.labels_key) if self.labels_key in adata.obs else None
            return
        names = var_names_for(adata, self.layer)
        if not names.equals(self.var_names):
            raise ValueError("The AnnData's genes differ from the model's; re-attach the training data, "
                             "or embed it as new cells with get_latent_representation(adata).")
        if len(self.obs_names) and not pd.Index(adata.obs_names).equals(self.obs_names):
            raise ValueError("The AnnData's cells differ from the model's training cells; pass the training "
                             "AnnData, or embed these cells with get_latent_representation(adata).")
        self.adata = adata
        self._matrix = get_matrix(adata, self.layer)
        self.labels = check_labels_key(adata, self.labels_key) if self.labels_key in adata.obs else None


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _validate_params(params: dict) -> None:
    """Refuse a saved config this version cannot build (an edited or foreign file). The decoder,
    likelihood and prior constructors check their own choices (activation, dispersion, covariance)."""
    from .._io import ModelFormatError

    if params.get("scaling") not in _SCALINGS:
        raise ModelFormatError(f"The saved DGD has scaling={params.get('scaling')!r}, not one of {sorted(_SCALINGS)}; "
                               "the config was edited or is damaged, save the model again.")
    for key in ("n_latent", "n_components"):
        value = params.get(key)
        if not isinstance(value, int) or value < 1:
            raise ModelFormatError(f"The saved DGD has {key}={value!r}; it must be a positive integer. "
                                   "The config was edited or is damaged, save the model again.")


def _nb_sample(likelihood: NegativeBinomial, raw: torch.Tensor, scale, gen: torch.Generator) -> torch.Tensor:
    """Gamma-Poisson draws with an explicit generator (mean m, variance m + m^2 / r)."""
    mean = likelihood.mean(raw, scale)
    r = likelihood.r.expand_as(mean)
    lam = torch._standard_gamma(r) if gen is None else _gamma(r, gen)
    return torch.poisson(lam * (mean / r), generator=gen)


def _gamma(shape: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # torch's gamma sampler takes no generator; a seeded Gamma via Marsaglia-Tsang would be long, so
    # fork the global RNG and seed it from the generator instead (reproducible, global state untouched)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
    with torch.random.fork_rng(devices=[] if shape.device.type == "cpu" else [shape.device]):
        torch.manual_seed(seed)
        return torch._standard_gamma(shape)


def _categorical_keys(batch_key, categorical_covariate_keys) -> list[str]:
    if isinstance(categorical_covariate_keys, str):
        categorical_covariate_keys = [categorical_covariate_keys]
    keys = ([] if batch_key is None else [str(batch_key)]) + [str(k) for k in (categorical_covariate_keys or [])]
    if len(set(keys)) != len(keys):
        raise ValueError(f"A covariate is given twice ({keys}); batch_key is already the first categorical covariate.")
    return keys


def _obs_column(obs: pd.DataFrame, key: str) -> pd.Series:
    if key not in obs.columns:
        raise ValueError(f"obs has no column {key!r} (columns: {list(obs.columns)[:20]}).")
    return obs[key]


def _continuous_column(obs: pd.DataFrame, key: str, *, what: str) -> np.ndarray:
    values = _obs_column(obs, key)
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"obs[{key!r}] is a continuous covariate but is not numeric ({err}); pass it under "
                         "categorical_covariate_keys instead.") from err
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"obs[{key!r}] has {int(bad.sum())} NaN or infinite value(s) among {what}; fill or drop "
                         "those cells (a continuous covariate is a decoder input and must be finite).")
    return arr


def _modality_params(names: list[str], sizes: list[int], likelihoods: dict | None, weights: dict | None,
                     modality_key: str | None, head_hidden) -> dict:
    """The saved description of the modalities: name, features, likelihood and loss weight of each."""
    likelihoods, weights = dict(likelihoods or {}), dict(weights or {})
    for what, given in (("modality_likelihoods", likelihoods), ("modality_weights", weights)):
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"{what} names modalities the data do not have: {unknown} (modalities: {names}).")
    mods = []
    for name, size in zip(names, sizes):
        spec = str(likelihoods.get(name, default_modality_likelihood(name))).lower()
        if spec not in _MODALITY_LIKELIHOODS:
            raise ValueError(f"modality_likelihoods[{name!r}] = {spec!r}; use one of {sorted(_MODALITY_LIKELIHOODS)}.")
        weight = float(weights.get(name, 1.0))
        if not (np.isfinite(weight) and weight >= 0):
            raise ValueError(f"modality_weights[{name!r}] must be finite and >= 0, got {weight}.")
        mods.append({"name": str(name), "n_features": int(size), "likelihood": spec, "weight": weight})
    return {"modalities": mods, "modality_key": modality_key, "head_hidden": [int(h) for h in head_hidden]}


#: Likelihoods a modality may have: counts (negative binomial, Poisson) or binarised counts.
_MODALITY_LIKELIHOODS = {"nb", "poisson", "binary"}


def null_nll_per_cell(part: RowMatrix, rows: np.ndarray | None, library: np.ndarray, likelihood: str,
                      cells: np.ndarray) -> float:
    """Mean NLL per cell (over ``cells`` with data) of one modality under the null model: every cell the
    modality's mean composition at its own library, Poisson for counts (the NB's limit), Bernoulli
    ``1 - exp(-rate)`` for binary data. Computed from the non-zeros only (never dense).

    Parameters
    ----------
    part
        The modality's counts (its own rows).
    rows
        The row of each cell in ``part`` (``-1``: missing), or ``None`` for the identity.
    library
        Each cell's total in the modality (0: missing).
    likelihood
        ``"nb"``, ``"poisson"`` or ``"binary"``.
    cells
        Boolean mask of the cells to average over (e.g. the training split).

    Returns
    -------
    float
        Nats per cell.
    """
    from scipy.special import gammaln

    own_cells = np.arange(len(library)) if rows is None else rows
    use = cells & (library > 0) & (own_cells >= 0)
    if not use.any():
        return 0.0
    src = own_cells[use]
    lib = library[use].astype(np.float64)
    col = part.col_sums() if rows is None else np.asarray(part.read_rows(np.sort(src)).sum(0)).ravel()
    comp = col / max(col.sum(), 1.0)
    log_comp = np.log(np.maximum(comp, 1e-300))
    total = 0.0
    order = np.argsort(src)
    for start in range(0, len(src), 4096):
        pick = order[start:start + 4096]
        block = sp.csr_matrix(part.read_rows(src[pick]))
        block.sum_duplicates()
        cell_of = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
        x, g = block.data.astype(np.float64), block.indices
        log_rate = np.log(lib[pick][cell_of]) + log_comp[g]
        if likelihood == "binary":
            rate = np.exp(log_rate)
            # sum over all features of the closed term (= library) minus what the open ones change
            total += lib[pick].sum() - np.sum(rate + np.log(-np.expm1(-np.maximum(rate, 1e-300))))
        else:
            total += lib[pick].sum() - np.sum(x * log_rate - gammaln(x + 1.0))
    return float(total / use.sum())
