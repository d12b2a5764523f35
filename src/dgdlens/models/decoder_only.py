"""General decoder-only representation learning (Schuster & Krogh 2021, "A manifold learning perspective").

There is no encoder: every training sample owns a free latent vector, learned by gradient descent
together with the decoder, so the decoder's image of the latent space (a manifold) is fitted to the
data. New samples get their latent by the same optimisation with the decoder frozen.

:class:`DecoderOnly` is a thin, array-based front end to the shared engine
(:mod:`dgdlens.models._engine`: the same training loop and held-out inference as the DGD) for any
torch decoder, any likelihood (Bernoulli/BCE, Gaussian/MSE, negative binomial) and an optional
latent prior (none, standard normal, Gaussian mixture). Its defaults follow the paper: Adam for the
decoder, SGD with momentum for the representations, stepped every mini-batch, no prior.

The module also holds the small helpers that :class:`~dgdlens.models.autoencoder.Autoencoder`
shares with it, so both models read data, check it and measure error in exactly the same way.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from .._io import ModelFormatError, load_model_dir, save_model_dir
from ..data.loader import BatchLoader
from ..data.matrix import RowMatrix, validate_counts
from ..nn.conv import ConvDecoder, ConvEncoder
from ..nn.decoders import MLP
from ..nn.likelihoods import Likelihood, make_likelihood
from ..nn.priors import GaussianMixture, make_prior
from ..nn.representation import RepresentationTable
from ._engine import DecoderOnlyModule, TrainConfig, Trainer, infer_latents, resolve_device

__all__ = ["DecoderOnly", "LatentModel", "as_row_matrix", "module_from_config"]

MODEL_KIND = "DecoderOnly"


# ---------------------------------------------------------------------------------------------------
# helpers shared with the autoencoder
# ---------------------------------------------------------------------------------------------------

def as_row_matrix(X, what: str = "X") -> RowMatrix:
    """Wrap a numpy array, torch tensor, scipy sparse matrix or AnnData (its ``X``) for row access.

    Nothing is copied or densified here; batches are densified one at a time later.
    """
    if type(X).__name__ == "AnnData" and hasattr(X, "obs"):
        X = X.X
    if X is None:
        raise ValueError(f"{what} is None; pass a (samples x features) matrix.")
    if isinstance(X, list):
        X = np.asarray(X, dtype=np.float32)
    try:
        matrix = RowMatrix(X)
    except TypeError as err:
        raise ValueError(f"{what}: {err}") from err
    if matrix.n_obs == 0 or matrix.n_vars == 0:
        raise ValueError(f"{what} is empty (shape {matrix.shape}); pass at least one sample and one feature.")
    return matrix


def check_values(matrix: RowMatrix, likelihood: Likelihood, what: str = "X") -> np.ndarray | None:
    """Check that the data suit the likelihood, chunk by chunk; return NB library sizes (row sums).

    - every likelihood: finite values;
    - Bernoulli: values in [0, 1] (probabilities or scaled pixels);
    - negative binomial: non-negative integer counts, no empty rows.
    """
    if likelihood.name == "nb":
        stats = validate_counts(matrix, what=what, allow_empty_cells=False, allow_empty_genes=True)
        return stats["row_sums"].astype(np.float32)
    for start, stop, block in matrix.iter_chunks(8192):
        values = block.data if sp.issparse(block) else np.asarray(block)
        if values.size == 0:
            continue
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{what} contains NaN or infinite values (rows {start}-{stop}); remove or impute them first.")
        if likelihood.name == "bernoulli" and (values.min() < 0 or values.max() > 1):
            raise ValueError(
                f"{what} has values outside [0, 1] (min {values.min():g}, max {values.max():g}) but the likelihood is "
                "Bernoulli (binary cross-entropy); scale the data to [0, 1] (e.g. pixels / 255) or use "
                "likelihood='gaussian'."
            )
    return None


def library_sizes(row_sums: np.ndarray | None, scaling: str) -> np.ndarray | None:
    """Per-sample NB scale: the total count (``"sum"``) or none (``"none"``)."""
    if row_sums is None or scaling == "none":
        return None
    if scaling == "sum":
        return row_sums.astype(np.float32)
    raise ValueError(f"scaling must be 'sum' or 'none', got {scaling!r}")


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split of ``range(n)`` (sorted positions); fewer than 2 validation
    samples means no split."""
    if not 0 <= fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {fraction}")
    n_val = int(round(n * fraction))
    if n_val < 2 or n - n_val < 1:
        n_val = 0
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def probe_module(module: nn.Module, n_in: int, error: str) -> torch.Tensor:
    """One forward pass of two zero rows of width ``n_in`` (eval mode, no gradient, on the module's
    device); any failure becomes a ValueError that starts with ``error``."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            param = next(module.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
            return module(torch.zeros(2, n_in, device=device))
    except Exception as err:  # any shape error in a user's module
        raise ValueError(f"{error} ({err})") from err
    finally:
        module.train(was_training)


def output_width(decoder: nn.Module, n_latent: int) -> int:
    """Features a decoder produces, from one forward pass on zeros (in eval mode, no gradient)."""
    out = probe_module(decoder, n_latent, f"The decoder could not decode a latent of size {n_latent}; check n_latent.")
    if out.ndim != 2 or out.shape[0] != 2:
        raise ValueError(f"The decoder must map (n, {n_latent}) latents to (n, features) rows; it returned shape "
                         f"{tuple(out.shape)}. Flatten image outputs (e.g. with out.flatten(1)).")
    return int(out.shape[1])


def infer_n_latent(n_latent: int | None, *modules: nn.Module | None) -> int:
    """``n_latent`` if given, else read from the modules' ``n_latent``/``n_in`` (decoder) attributes."""
    if n_latent is not None:
        if int(n_latent) != n_latent or n_latent < 1:
            raise ValueError(f"n_latent must be a positive integer, got {n_latent!r}")
        return int(n_latent)
    for module in modules:
        for attr in ("n_latent", "n_in"):
            value = getattr(module, attr, None)
            if isinstance(value, int):
                return value
    raise ValueError("Could not read the latent size from the decoder; pass n_latent=.")


def per_sample_nll(decoder: nn.Module, likelihood: Likelihood, matrix: RowMatrix, scale: np.ndarray | None,
                   z: np.ndarray, device: torch.device, batch_size: int = 1024) -> np.ndarray:
    """Reconstruction NLL of every sample given its latent, summed over features, float64 (n,)."""
    loader = BatchLoader(matrix, None, scale, batch_size=batch_size, shuffle=False, device=device)
    out = np.empty(matrix.n_obs, dtype=np.float64)
    decoder.eval()
    with torch.no_grad():
        for batch in loader:
            pos = batch.index.cpu().numpy()
            zt = torch.from_numpy(np.ascontiguousarray(z[pos])).to(device)
            out[pos] = likelihood.nll(batch.x, decoder(zt), batch.scale).double().cpu().numpy()
    return out


def decode_mean(decoder: nn.Module, likelihood: Likelihood, z, device: torch.device, n_latent: int,
                scale=None, batch_size: int = 2048) -> np.ndarray:
    """The likelihood's mean at latents ``z`` (probabilities for Bernoulli, means for Gaussian, NB
    means scaled by ``scale``; for the softmax NB without ``scale``: the composition)."""
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2 or z.shape[1] != n_latent:
        raise ValueError(f"z must have shape (n_samples, {n_latent}), got {z.shape}")
    if scale is not None:
        # a writable copy: torch warns on (and must not share) numpy's read-only broadcast views
        scale = np.broadcast_to(np.asarray(scale, dtype=np.float32).reshape(-1), (len(z),)).copy()
    chunks = []
    decoder.eval()
    with torch.no_grad():
        for i in range(0, len(z), batch_size):
            raw = decoder(torch.from_numpy(z[i:i + batch_size]).to(device))
            s = None if scale is None else torch.from_numpy(np.ascontiguousarray(scale[i:i + batch_size])).to(device)
            chunks.append(likelihood.mean(raw, s).cpu().numpy())
    return np.concatenate(chunks) if chunks else np.empty((0, 0), dtype=np.float32)


_MODULE_BUILDERS = {
    "mlp": lambda c: MLP(c["n_in"], c["n_out"], c["hidden"], c["activation"], c.get("dropout", 0.0)),
    "conv_encoder": lambda c: ConvEncoder(c["image_shape"], c["n_latent"], c["channels"], kernel_size=c["kernel_size"],
                                          stride=c["stride"], padding=c["padding"], activation=c["activation"]),
    "conv_decoder": lambda c: ConvDecoder(c["image_shape"], c["n_latent"], c["channels"], kernel_size=c["kernel_size"],
                                          stride=c["stride"], padding=c["padding"], activation=c["activation"]),
}


def module_config(module: nn.Module) -> dict | None:
    """The rebuild recipe of a dgdlens MLP/conv module (``None`` for other modules)."""
    cfg = module.config() if hasattr(module, "config") and callable(module.config) else None
    return cfg if isinstance(cfg, dict) and cfg.get("kind") in _MODULE_BUILDERS else None


def module_from_config(cfg: dict) -> nn.Module:
    """Rebuild a module from :func:`module_config` output (MLP, ConvEncoder, ConvDecoder)."""
    try:
        return _MODULE_BUILDERS[cfg["kind"]](cfg)
    except (KeyError, TypeError) as err:
        raise ModelFormatError(f"Cannot rebuild a module from config {cfg!r} ({err}).") from err


def load_module(saved_cfg: dict | None, given: nn.Module | None, what: str) -> nn.Module:
    if given is not None:
        return given
    if saved_cfg is None:
        raise ValueError(f"The saved model's {what} is a custom torch module that cannot be rebuilt from its config; "
                         f"pass {what}=<a module with the same architecture> to load().")
    return module_from_config(saved_cfg)


class LatentModel:
    """What :class:`DecoderOnly` and :class:`~dgdlens.models.autoencoder.Autoencoder` share: a
    ``module`` with ``decoder`` and ``likelihood``, the same data checks, decoding and fitted-state
    warning, so both read data and report errors in exactly the same way."""

    module: nn.Module
    n_latent: int
    n_features: int
    scaling: str
    is_fitted: bool
    device: torch.device
    latent_: np.ndarray | None

    @property
    def decoder(self) -> nn.Module:
        return self.module.decoder

    @property
    def likelihood(self) -> Likelihood:
        return self.module.likelihood

    def _restore_fit_state(self, cfg: dict, device) -> None:
        """Fitted flag, training settings and history from a saved config, then move to ``device``."""
        self.is_fitted = bool(cfg.get("is_fitted"))
        self.train_config_ = cfg.get("train_config")
        self.train_summary_ = cfg.get("train_summary") or {}
        self.history_ = pd.DataFrame(cfg.get("history") or {})
        self._to(resolve_device(device))

    def _init_state(self, scaling: str, seed: int) -> None:
        """Settings and the unfitted state every model starts with (on the CPU until fitted)."""
        self.scaling = scaling
        self.seed = int(seed)
        self.device = torch.device("cpu")
        self.is_fitted = False
        self.latent_ = None
        self.history_ = pd.DataFrame()
        self.train_summary_: dict = {}
        self.train_config_: dict | None = None

    def _repr_extra(self) -> str:
        return ""

    def __repr__(self) -> str:
        status = "fitted" if self.is_fitted else "not fitted"
        return (f"{type(self).__name__}(n_latent={self.n_latent}, n_features={self.n_features}, "
                f"likelihood={self.likelihood.name!r}{self._repr_extra()}, {status})")

    def _data(self, X, what: str) -> tuple[RowMatrix, np.ndarray | None]:
        matrix = as_row_matrix(X, what)
        if matrix.n_vars != self.n_features:
            raise ValueError(f"{what} has {matrix.n_vars} features but the decoder outputs {self.n_features}; "
                             "pass data with the decoder's feature count (flatten images to rows).")
        return matrix, library_sizes(check_values(matrix, self.likelihood, what), self.scaling)

    def fit(self, X, **kwargs):  # pragma: no cover - overridden
        raise NotImplementedError

    def fit_transform(self, X, **fit_kwargs) -> np.ndarray:
        """:meth:`fit`, then return the training samples' latents ``latent_``."""
        return self.fit(X, **fit_kwargs).latent_

    def decode(self, z, scale=None, *, batch_size: int = 2048) -> np.ndarray:
        """The likelihood's mean at latents ``z`` (pixel probabilities for Bernoulli; for NB, the mean
        counts with ``scale`` = library size, else the per-sample composition)."""
        return decode_mean(self.decoder, self.likelihood, z, self.device, self.n_latent, scale, batch_size)

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            warnings.warn("The model has not been fitted; results come from its initial weights.", stacklevel=3)


# ---------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------

class DecoderOnly(LatentModel):
    """Decoder-only representation learner: a decoder and one free latent per sample, no encoder.

    Parameters
    ----------
    decoder
        Any torch module mapping ``(n, n_latent)`` latents to ``(n, n_features)`` raw outputs (logits
        for Bernoulli, means for Gaussian, NB log-composition logits). It is trained in place; build
        it under ``torch.manual_seed`` for reproducible initial weights. See
        :func:`dgdlens.models.mlp_decoder` and :func:`dgdlens.nn.conv.conv_decoder`.
    likelihood
        ``"bernoulli"`` (``"bce"``, data in [0, 1]), ``"gaussian"`` (``"mse"``), ``"nb"`` (raw counts,
        scaled by library size), or a :class:`~dgdlens.nn.Likelihood` instance.
    n_latent
        Latent size; read from ``decoder.n_in``/``decoder.n_latent`` when omitted.
    prior
        Latent prior: ``None`` (the paper), ``"normal"`` (standard normal) or ``"gmm"`` (learned
        Gaussian mixture with ``n_components``, as the DGD), or a prior module.
    n_components
        Mixture components for ``prior="gmm"``.
    prior_kwargs, likelihood_kwargs
        Extra arguments for :func:`~dgdlens.nn.make_prior` / :func:`~dgdlens.nn.make_likelihood`.
    scaling
        NB only: ``"sum"`` (mean = total count x composition) or ``"none"``.
    rep_init, rep_init_std
        Initial representations: ``"zeros"`` (the DGD reference) or ``"normal"`` with that standard
        deviation (seeded).
    seed
        Default seed of :meth:`fit` (split, representation init, batch order, dropout) and of the
        inference start points.

    Attributes (after :meth:`fit`)
    ------------------------------
    latent_
        ``(n_samples, n_latent)`` learned latents of the training data, in input order (validation
        samples included: theirs were fitted with the decoder frozen).
    history_
        Per-epoch ``train_recon`` / ``val_recon`` (NLL per sample) etc., a DataFrame.
    """

    def __init__(self, decoder: nn.Module, likelihood: str | Likelihood = "bernoulli", n_latent: int | None = None,
                 prior: str | nn.Module | None = None, *, n_components: int = 10, prior_kwargs: dict | None = None,
                 likelihood_kwargs: dict | None = None, scaling: str = "sum", rep_init: str = "zeros",
                 rep_init_std: float = 0.1, seed: int = 0) -> None:
        if not isinstance(decoder, nn.Module):
            raise ValueError(f"decoder must be a torch.nn.Module, got {type(decoder).__name__}.")
        if rep_init not in {"zeros", "normal"}:
            raise ValueError(f"rep_init must be 'zeros' or 'normal', got {rep_init!r}")
        if scaling not in {"sum", "none"}:
            raise ValueError(f"scaling must be 'sum' or 'none', got {scaling!r}")
        self.n_latent = infer_n_latent(n_latent, decoder)
        self.n_features = output_width(decoder, self.n_latent)
        lik = make_likelihood(likelihood, self.n_features, **(likelihood_kwargs or {}))
        gen = torch.Generator().manual_seed(int(seed))
        prior_kwargs = dict(prior_kwargs or {})
        if isinstance(prior, str) and prior in {"gmm", "mixture", "gaussian_mixture"}:
            prior_kwargs = {"n_components": int(n_components), "generator": gen} | prior_kwargs
        self.module = DecoderOnlyModule(decoder, lik, make_prior(prior, self.n_latent, **prior_kwargs))
        self.rep_init, self.rep_init_std = rep_init, float(rep_init_std)
        self._init_state(scaling, seed)
        self._train_table: RepresentationTable | None = None

    # ------------------------------------------------------------------ properties
    @property
    def prior(self) -> nn.Module:
        return self.module.prior

    def _repr_extra(self) -> str:
        return f", prior={getattr(self.prior, 'name', '?')!r}"

    # ------------------------------------------------------------------ data
    def _new_table(self, n: int, gen: torch.Generator) -> RepresentationTable | None:
        if n == 0:
            return None
        return RepresentationTable(n, self.n_latent, init=self.rep_init, init_std=self.rep_init_std, generator=gen)

    def _to(self, device: torch.device) -> None:
        self.module.to(device)
        if self._train_table is not None:
            self._train_table.to(device)
        self.device = device

    # ------------------------------------------------------------------ training
    def fit(self, X, *, epochs: int = 200, batch_size: int = 128, lr: float = 1e-3, lr_rep: float = 0.05,
            rep_optimizer: str = "sgd", rep_momentum: float = 0.9, rep_step: str = "batch",
            betas: Sequence[float] = (0.9, 0.999), weight_decay: float = 1e-4, rep_weight_decay: float = 0.0,
            lr_prior: float = 1e-2, validation_fraction: float = 0.1, early_stopping: bool = True,
            patience: int = 20, min_epochs: int | None = None, seed: int | None = None,
            device: str | torch.device = "auto", progress: bool = True, **train_kwargs) -> DecoderOnly:
        """Learn the decoder (and prior) together with one latent per sample of ``X``.

        Parameters
        ----------
        X
            ``(n_samples, n_features)`` numpy array, torch tensor, scipy sparse matrix or AnnData.
            Never modified.
        epochs, batch_size
            Maximum passes over the data and mini-batch size.
        lr, betas, weight_decay
            Adam for the decoder (and likelihood parameters). Paper: lr 1e-3 with weight decay.
        lr_rep, rep_optimizer, rep_momentum, rep_step, rep_weight_decay
            The representations' optimiser. Paper: SGD with momentum 0.9 (``rep_optimizer="sgd"``),
            stepped every mini-batch. ``"adam"`` gives the DGD's optimiser; ``rep_step="epoch"`` the
            DGD's one step per epoch from accumulated gradients. The loss is summed over features and
            samples, so ``lr_rep`` is a step per unit of a single sample's gradient.
        lr_prior
            Adam learning rate of a learned prior (mixture).
        validation_fraction, early_stopping, patience, min_epochs
            A seeded share of samples is held out; their latents are fitted with the model frozen and
            their reconstruction NLL is monitored. Training stops when it has not improved for
            ``patience`` epochs (not before ``min_epochs``, default ``min(50, epochs)``) and the best
            epoch is restored. ``validation_fraction=0`` trains on everything for ``epochs`` epochs.
        seed
            Overrides the model's seed for this fit.
        device
            ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
        progress
            Show a progress bar.
        **train_kwargs
            Any other :class:`~dgdlens.models._engine.TrainConfig` option (``min_delta``, ``monitor``,
            ``lr_decay_epoch``, ``checkpoint_path``...).
        """
        seed = self.seed if seed is None else int(seed)
        matrix, scale = self._data(X, "X")
        train_idx, val_idx = split_indices(matrix.n_obs, validation_fraction, seed)
        if early_stopping and len(val_idx) == 0:
            warnings.warn("No validation split (validation_fraction=0 or too few samples): early stopping "
                          "monitors the training loss instead.", stacklevel=2)
        cfg = TrainConfig.from_kwargs(**({
            "max_epochs": int(epochs), "batch_size": int(batch_size), "lr_decoder": float(lr),
            "lr_rep": float(lr_rep), "lr_prior": float(lr_prior), "rep_optimizer": rep_optimizer,
            "rep_momentum": float(rep_momentum), "rep_step": rep_step, "betas": tuple(betas),
            "weight_decay": float(weight_decay), "rep_weight_decay": float(rep_weight_decay),
            "lr_decay_epoch": None, "early_stopping": bool(early_stopping), "patience": int(patience),
            "min_epochs": min(50, int(epochs)) if min_epochs is None else int(min_epochs), "seed": seed,
            "progress": bool(progress)} | train_kwargs))
        dev = resolve_device(device)
        gen = torch.Generator().manual_seed(seed)
        self._train_table = self._new_table(len(train_idx), gen)
        val_table = self._new_table(len(val_idx), gen)
        self._to(dev)
        if val_table is not None:
            val_table.to(dev)
        sub = (lambda idx: None if scale is None else scale[idx])
        train_loader = BatchLoader(matrix, train_idx, sub(train_idx), batch_size=cfg.batch_size, shuffle=True,
                                   seed=seed, device=dev)
        val_loader = None if val_table is None else BatchLoader(matrix, val_idx, sub(val_idx),
                                                                batch_size=cfg.batch_size, shuffle=True,
                                                                seed=seed + 1, device=dev)
        trainer = Trainer(self.module, train_loader, val_loader, self._train_table, val_table, cfg, dev)
        # dropout and any other torch randomness inside the decoder follow the seed, not global state
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            trainer.fit()
        latent = np.empty((matrix.n_obs, self.n_latent), dtype=np.float32)
        latent[train_idx] = self._train_table.z.detach().cpu().numpy()
        if val_table is not None:
            latent[val_idx] = val_table.z.detach().cpu().numpy()
        self.latent_ = latent
        self.train_idx_, self.val_idx_ = train_idx, val_idx
        self.history_ = pd.DataFrame(trainer.history)
        self.train_config_ = cfg.to_dict()
        self.train_summary_ = {"best_epoch": int(trainer.best["epoch"]), "stopped_early": trainer.stopped_early,
                               "epochs_run": len(trainer.history), "fit_time_s": float(getattr(trainer, "fit_time", 0.0))}
        self.is_fitted = True
        return self

    # ------------------------------------------------------------------ inference
    def _candidates(self, n_candidates: int, seed: int) -> torch.Tensor | None:
        """Start points for new samples: the mixture means (GMM prior); otherwise the origin plus up to
        ``n_candidates`` training latents chosen at random (seeded), i.e. points on the learned manifold."""
        if isinstance(self.prior, GaussianMixture) or n_candidates <= 0 or self.latent_ is None:
            return None
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(self.latent_), size=min(int(n_candidates), len(self.latent_)), replace=False)
        cand = np.concatenate([np.zeros((1, self.n_latent), np.float32), self.latent_[np.sort(pick)]])
        return torch.from_numpy(cand)

    def transform(self, X, *, n_steps: int = 500, lr: float = 0.05, n_candidates: int = 32,
                  candidate_steps: int = 0, batch_size: int = 1024, tol: float = 1e-6,
                  device: str | torch.device | None = None, progress: bool = True) -> np.ndarray:
        """Latents of (new) samples by optimisation with the decoder and prior frozen.

        Each sample starts from the best of several candidates (the mixture means for a GMM prior;
        else the origin and ``n_candidates`` training latents), scored by its loss, then Adam refines
        it for up to ``n_steps`` steps (stopping early when the batch loss changes by less than
        ``tol`` relatively). The objective is the reconstruction NLL plus the prior's NLL.

        Returns
        -------
        numpy.ndarray
            ``(n_samples, n_latent)`` float32.
        """
        self._check_fitted()
        matrix, scale = self._data(X, "X")
        dev = self.device if device is None else resolve_device(device)
        self._to(dev)
        loader = BatchLoader(matrix, None, scale, batch_size=batch_size, shuffle=False, device=dev)
        z, loss = infer_latents(self.module, loader, self.n_latent, n_steps=int(n_steps), lr=float(lr),
                                candidates=self._candidates(n_candidates, self.seed), candidate_steps=candidate_steps,
                                tol=tol, progress=progress, device=dev)
        self.last_inference_loss_ = loss
        return z

    def reconstruction_error(self, X, *, z: np.ndarray | None = None, per_sample: bool = False,
                             batch_size: int = 1024, **transform_kwargs) -> float | np.ndarray:
        """Mean reconstruction loss per entry (NLL per feature, e.g. BCE per pixel) on ``X``.

        The latents are inferred first with :meth:`transform` (``transform_kwargs`` go there) unless
        given as ``z``; pass ``z=model.latent_`` for the training samples' learned latents. Same unit as
        :meth:`Autoencoder.reconstruction_error`, so the two models compare directly.
        ``per_sample=True`` returns each sample's mean loss per feature instead.
        """
        self._check_fitted()
        matrix, scale = self._data(X, "X")
        if z is None:
            z = self.transform(X, batch_size=batch_size, **transform_kwargs)
        z = np.asarray(z, dtype=np.float32)
        if z.shape != (matrix.n_obs, self.n_latent):
            raise ValueError(f"z must have shape ({matrix.n_obs}, {self.n_latent}), got {z.shape}")
        nll = per_sample_nll(self.decoder, self.likelihood, matrix, scale, z, self.device, batch_size)
        per_entry = nll / self.n_features
        return per_entry if per_sample else float(per_entry.mean())

    # ------------------------------------------------------------------ save / load
    def save(self, path, overwrite: bool = False, *, save_latents: bool = True) -> None:
        """Save to a directory (``weights.safetensors`` + ``config.json``, see :mod:`dgdlens._io`).

        dgdlens MLP and conv decoders are rebuilt from their config on :meth:`load`; any other decoder
        must be passed to :meth:`load` again.
        """
        tensors = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        if save_latents and self.latent_ is not None:
            tensors["latent"] = torch.from_numpy(self.latent_)
        config = {
            "n_latent": self.n_latent, "n_features": self.n_features, "seed": self.seed, "scaling": self.scaling,
            "rep_init": self.rep_init, "rep_init_std": self.rep_init_std,
            "decoder": module_config(self.decoder), "likelihood": self.likelihood.config(),
            "prior": self.prior.config() if hasattr(self.prior, "config") else None,
            "is_fitted": self.is_fitted, "train_config": self.train_config_, "train_summary": self.train_summary_,
            "history": self.history_.to_dict(orient="list"), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        save_model_dir(path, tensors, config, kind=MODEL_KIND, overwrite=overwrite)

    @classmethod
    def load(cls, path, *, decoder: nn.Module | None = None, device: str | torch.device = "cpu") -> DecoderOnly:
        """Load a model written by :meth:`save` (pass ``decoder=`` for a custom decoder architecture)."""
        tensors, cfg = load_model_dir(path, kind=MODEL_KIND)
        try:
            dec = load_module(cfg["decoder"], decoder, "decoder")
            prior_cfg = cfg["prior"]
            prior = None if prior_cfg is None or prior_cfg.get("name") == "none" else prior_cfg
            obj = cls(dec, cfg["likelihood"], cfg["n_latent"], prior, scaling=cfg["scaling"], rep_init=cfg["rep_init"],
                      rep_init_std=cfg["rep_init_std"], seed=cfg["seed"])
            if obj.n_features != cfg["n_features"]:
                raise ValueError(f"the decoder outputs {obj.n_features} features, the saved model {cfg['n_features']}")
            state = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
            obj.module.load_state_dict(state, strict=True)
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            raise ModelFormatError(f"{path} does not match a DecoderOnly model ({err}); pass the decoder it was "
                                   "saved with, or save the model again.") from err
        obj.latent_ = tensors["latent"].numpy() if "latent" in tensors else None
        obj._restore_fit_state(cfg, device)
        return obj

