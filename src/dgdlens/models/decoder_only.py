"""General decoder-only representation learning (Schuster & Krogh 2021, "A manifold learning perspective").

There is no encoder: every training sample owns a free latent vector, learned by gradient descent
together with the decoder, so the decoder's image of the latent space (a manifold) is fitted to the
data. New samples get their latent by the same optimisation with the decoder frozen.

:class:`DecoderOnly` registers its data at construction (as the DGD) and trains through the shared
runner (:meth:`~dgdlens.models.base.BaseModel.train`) with the decoder-only training plan
(:class:`~dgdlens.train.decoder_only_plan.DecoderOnlyPlan`, the DGD's), for any torch decoder, any
likelihood (Bernoulli/BCE, Gaussian/MSE, negative binomial) and an optional latent prior (none,
standard normal, Gaussian mixture). Its defaults follow the paper: Adam for the decoder, SGD with
momentum for the representations, stepped every mini-batch, no prior.

The module also holds :class:`LatentModel` and the small helpers that
:class:`~dgdlens.models.autoencoder.Autoencoder` shares with it, so both models register and check
data, measure error and save in exactly the same way.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from .._device import resolve_device
from .._io import ModelFormatError
from ..data.loader import BatchLoader
from ..data.matrix import RowMatrix, validate_counts
from ..data.split import train_validation_split
from ..nn.conv import ConvDecoder, ConvEncoder
from ..nn.decoders import MLP
from ..nn.likelihoods import Likelihood, make_likelihood
from ..nn.module import DecoderOnlyModule
from ..nn.priors import GaussianMixture, make_prior
from ..nn.representation import RepresentationTable
from ..train.decoder_only_plan import DecoderOnlyPlan, DecoderOnlyPlanConfig
from ..train.inference import infer_latents_sharded
from .base import RUNNER_OPTIONS, BaseModel

__all__ = ["DecoderOnly", "LatentModel", "as_row_matrix", "module_from_config"]


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
        stats = validate_counts(matrix, what=what, allow_empty_cells=False, empty_genes="warn")
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



def _is_anndata(X) -> bool:
    return type(X).__name__ == "AnnData" and hasattr(X, "obs")


def data_fingerprint(X, matrix: RowMatrix, sample_rows: int = 16) -> str:
    """SHA-256 over the data's shape, its obs/var names (AnnData) and its first and last rows' values:
    what a training checkpoint must match to be resumed on these data (cheap also for backed files)."""
    h = hashlib.sha256(f"{matrix.n_obs}x{matrix.n_vars}".encode())
    if _is_anndata(X):
        for names in (X.obs_names, X.var_names):
            h.update(b"\0" + "\n".join(map(str, names)).encode())
    n = matrix.n_obs
    rows = np.unique(np.concatenate([np.arange(min(sample_rows, n)), np.arange(max(0, n - sample_rows), n)]))
    h.update(np.ascontiguousarray(matrix.rows(rows), dtype=np.float32).tobytes())
    return h.hexdigest()


def split_options(options: dict, defaults: dict, allowed: set[str], renamed: dict[str, str] | None = None) -> dict:
    """``defaults`` updated by ``options``; a TypeError names unknown options (and the name to use instead)."""
    renamed = renamed or {}
    unknown = sorted(set(options) - allowed)
    if unknown:
        hints = "".join(f"; {k!r} is called {renamed[k]!r} here" for k in unknown if k in renamed)
        raise TypeError(f"Unknown training option(s) {unknown}{hints}; valid options: {sorted(allowed)} and the "
                        "runner's " + ", ".join(RUNNER_OPTIONS) + ".")
    return {**defaults, **options}


class LatentModel(BaseModel):
    """What :class:`DecoderOnly` and :class:`~dgdlens.models.autoencoder.Autoencoder` share: data
    registered at construction (one seeded train/validation split), the data checks, the checkpoint
    fingerprint, decoding and the reconstruction error, so both report in exactly the same units.

    Subclasses provide ``module`` (with ``decoder`` and ``likelihood``) and ``get_latent_representation``.
    """

    _default_max_epochs: ClassVar[int] = 200
    _default_batch_size: ClassVar[int] = 128

    module: nn.Module
    n_latent: int
    n_features: int
    scaling: str

    @property
    def decoder(self) -> nn.Module:
        return self.module.decoder

    @property
    def likelihood(self) -> Likelihood:
        return self.module.likelihood

    # ------------------------------------------------------------------ data
    def _init_common(self, scaling: str, validation_fraction: float, seed: int) -> None:
        if scaling not in {"sum", "none"}:
            raise ValueError(f"scaling must be 'sum' or 'none', got {scaling!r}")
        if not 0 <= validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
        self.scaling = scaling
        self.validation_fraction = float(validation_fraction)
        self.seed = int(seed)
        self.device = torch.device("cpu")
        self._init_fitted_state()
        self._X = self._matrix = self._scale = None
        self.n_obs = 0
        self.obs_names = self.var_names = None
        self.train_idx = self.val_idx = None
        self._data_sha256: str | None = None

    def _register(self, X) -> None:
        """Check and register the training data and split it (:func:`~dgdlens.data.split.train_validation_split`)."""
        if X is None:
            raise ValueError(f"X is None; pass the (samples x features) training data. A saved model is read with "
                             f"{type(self).__name__}.load(path), which needs no data.")
        matrix, scale = self._data(X, "X")
        self._X, self._matrix, self._scale = X, matrix, scale
        self.n_obs = matrix.n_obs
        if _is_anndata(X):
            self.obs_names, self.var_names = X.obs_names.copy(), X.var_names.copy()
        self.train_idx, self.val_idx = train_validation_split(matrix.n_obs, self.validation_fraction, self.seed)
        self._data_sha256 = data_fingerprint(X, matrix)

    def _data(self, X, what: str) -> tuple[RowMatrix, np.ndarray | None]:
        matrix = as_row_matrix(X, what)
        if matrix.n_vars != self.n_features:
            raise ValueError(f"{what} has {matrix.n_vars} features but the decoder outputs {self.n_features}; "
                             "pass data with the decoder's feature count (flatten images to rows).")
        return matrix, library_sizes(check_values(matrix, self.likelihood, what), self.scaling)

    @property
    def has_data(self) -> bool:
        return self._matrix is not None

    def _require_data(self, what: str) -> None:
        if not self.has_data:
            raise ValueError(f"This {type(self).__name__} was loaded without its training data, so it cannot {what}; "
                             f"load it with {type(self).__name__}.load(path, X=<the training data>), or pass X.")

    def _is_registered(self, X) -> bool:
        return X is None or (self._X is not None and X is self._X)

    def _fingerprint(self) -> dict:
        self._require_data("train")
        split = hashlib.sha256(np.ascontiguousarray(self.val_idx, dtype=np.int64).tobytes()).hexdigest()
        shapes = ";".join(f"{k}:{tuple(v.shape)}" for k, v in self.module.state_dict().items())
        return {"n_obs": int(self.n_obs), "n_features": int(self.n_features), "n_latent": int(self.n_latent),
                "n_train": len(self.train_idx), "n_val": len(self.val_idx), "data_sha256": self._data_sha256,
                "split_sha256": split, "module_sha256": hashlib.sha256(shapes.encode()).hexdigest()}

    def _data_config(self) -> dict:
        return {"n_obs": int(self.n_obs), "data_sha256": self._data_sha256, "seed": self.seed,
                "validation_fraction": self.validation_fraction, "scaling": self.scaling,
                "n_latent": self.n_latent, "n_features": self.n_features}

    def _attach_saved_data(self, X, config: dict) -> None:
        """After load: register ``X`` again (it must be the data the model was trained on), or record the size."""
        if X is None:
            self.n_obs = int(config["n_obs"])
            self._data_sha256 = config["data_sha256"]
            return
        self._register(X)
        if self._data_sha256 != config["data_sha256"]:
            raise ModelFormatError("X is not the data this model was trained on (shape, names or values differ); "
                                   "load without X and pass new data to get_latent_representation(X) instead.")

    # ------------------------------------------------------------------ outputs
    def __repr__(self) -> str:
        status = "trained" if self.is_trained_ else "not trained"
        return (f"{type(self).__name__}(n_obs={self.n_obs}, n_latent={self.n_latent}, n_features={self.n_features}, "
                f"likelihood={self.likelihood.name!r}{self._repr_extra()}, {status})")

    def _repr_extra(self) -> str:
        return ""

    def get_latent_representation(self, X=None, **kwargs) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def decode(self, z, scale=None, *, batch_size: int = 2048) -> np.ndarray:
        """The likelihood's mean at latents ``z`` (pixel probabilities for Bernoulli; for NB, the mean
        counts with ``scale`` = library size, else the per-sample composition)."""
        return decode_mean(self.decoder, self.likelihood, z, self.device, self.n_latent, scale, batch_size)

    def get_reconstruction_error(self, X=None, *, z=None, per_sample: bool = False, per_feature: bool = False,
                                 batch_size: int = 1024, **latent_kwargs) -> float | np.ndarray:
        """Reconstruction NLL of ``X`` (default: the training data, validation samples included).

        The unit is nats per sample (the NLL summed over features), averaged over samples, as the DGD's
        ``get_reconstruction_error``. ``per_feature=True`` divides by the number of features (e.g. BCE per
        pixel, the unit of the manifold benchmark); ``per_sample=True`` returns every sample's value.

        The latents are ``z`` when given, else :meth:`get_latent_representation` of ``X`` (with
        ``latent_kwargs``): the learned ones for the training data, inferred ones for new data.
        """
        self._warn_if_untrained()
        if self._is_registered(X):
            self._require_data("measure its training error")
            matrix, scale = self._matrix, self._scale
        else:
            matrix, scale = self._data(X, "X")
        if z is None:
            z = self.get_latent_representation(X, batch_size=batch_size, **latent_kwargs)
        z = np.asarray(z, dtype=np.float32)
        if z.shape != (matrix.n_obs, self.n_latent):
            raise ValueError(f"z must have shape ({matrix.n_obs}, {self.n_latent}), got {z.shape}")
        nll = per_sample_nll(self.decoder, self.likelihood, matrix, scale, z, self.device, batch_size)
        if per_feature:
            nll = nll / self.n_features
        return nll if per_sample else float(nll.mean())


# ---------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------

#: DecoderOnly's training options (the paper's choices) and what each is called in DecoderOnlyPlanConfig
_DO_DEFAULTS = {"lr": 1e-3, "lr_rep": 0.05, "rep_optimizer": "sgd", "rep_momentum": 0.9, "rep_step": "batch",
                "betas": (0.9, 0.999), "weight_decay": 1e-4, "rep_weight_decay": 0.0, "lr_prior": 1e-2,
                "lr_decay_epoch": None}
_DO_RENAMED = {"lr": "lr_decoder"}
_DO_OPTIONS = (DecoderOnlyPlanConfig.names() - {"batch_size", "seed", "lr_decoder"}) | set(_DO_DEFAULTS)


class DecoderOnly(LatentModel):
    """Decoder-only representation learner: a decoder and one free latent per sample, no encoder.

    Parameters
    ----------
    X
        Training data, ``(n_samples, n_features)``: numpy array, torch tensor, scipy sparse matrix or
        AnnData (its ``X``; obs and var names then enter the checkpoint fingerprint). Never modified.
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
    validation_fraction
        Share of samples held out (:func:`~dgdlens.data.split.train_validation_split`, seeded): their
        latents are fitted with the model frozen and their reconstruction NLL is what early stopping
        watches. ``0``: train on everything (early stopping then watches the training loss).
    seed
        Seeds the split, the representation init, and (the default of ``train(seed=...)``) the batch
        order and dropout, and the inference start points.

    Attributes
    ----------
    train_idx, val_idx
        Positions of the training and validation samples in ``X``.
    is_trained_, history_, train_summary_, train_config_
        After :meth:`train`: per-epoch ``train_recon``/``val_recon`` (NLL per sample), ``train_loss``/
        ``val_loss`` (+ prior) etc. in the ``history_`` DataFrame.
    """

    _model_kind: ClassVar[str] = "DecoderOnly"

    def __init__(self, X, decoder: nn.Module, likelihood: str | Likelihood = "bernoulli", n_latent: int | None = None,
                 prior: str | nn.Module | dict | None = None, *, n_components: int = 10, prior_kwargs: dict | None = None,
                 likelihood_kwargs: dict | None = None, scaling: str = "sum", rep_init: str = "zeros",
                 rep_init_std: float = 0.1, validation_fraction: float = 0.1, seed: int = 0) -> None:
        self._build(decoder, likelihood, n_latent, prior, n_components=n_components, prior_kwargs=prior_kwargs,
                    likelihood_kwargs=likelihood_kwargs, scaling=scaling, rep_init=rep_init, rep_init_std=rep_init_std,
                    validation_fraction=validation_fraction, seed=seed)
        self._register(X)
        self._new_tables()

    def _build(self, decoder, likelihood, n_latent, prior, *, n_components, prior_kwargs, likelihood_kwargs, scaling,
               rep_init, rep_init_std, validation_fraction, seed) -> None:
        if not isinstance(decoder, nn.Module):
            raise ValueError(f"decoder must be a torch.nn.Module, got {type(decoder).__name__}.")
        if rep_init not in {"zeros", "normal"}:
            raise ValueError(f"rep_init must be 'zeros' or 'normal', got {rep_init!r}")
        self.n_latent = infer_n_latent(n_latent, decoder)
        self.n_features = output_width(decoder, self.n_latent)
        lik = make_likelihood(likelihood, self.n_features, **(likelihood_kwargs or {}))
        gen = torch.Generator().manual_seed(int(seed))
        prior_kwargs = dict(prior_kwargs or {})
        if isinstance(prior, str) and prior in {"gmm", "mixture", "gaussian_mixture"}:
            prior_kwargs = {"n_components": int(n_components), "generator": gen} | prior_kwargs
        self.module = DecoderOnlyModule(decoder, lik, make_prior(prior, self.n_latent, **prior_kwargs))
        self.rep_init, self.rep_init_std = rep_init, float(rep_init_std)
        self._init_common(scaling, validation_fraction, seed)
        self._train_table: RepresentationTable | None = None
        self._val_table: RepresentationTable | None = None
        self.last_inference_loss_: np.ndarray | None = None

    def _new_tables(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)

        def table(n: int) -> RepresentationTable | None:
            return (None if n == 0 else
                    RepresentationTable(n, self.n_latent, init=self.rep_init, init_std=self.rep_init_std, generator=gen))

        self._train_table, self._val_table = table(len(self.train_idx)), table(len(self.val_idx))

    @property
    def prior(self) -> nn.Module:
        """The prior on the latents (a ``torch.nn.Module``: ``NoPrior``, ``StandardNormal`` or ``GaussianMixture``).
        """
        return self.module.prior

    def _repr_extra(self) -> str:
        return f", prior={getattr(self.prior, 'name', '?')!r}"

    def _to(self, device: torch.device) -> None:
        self.module.to(device)
        for table in (self._train_table, self._val_table):
            if table is not None:
                table.to(device)
        self.device = device

    # ------------------------------------------------------------------ training (BaseModel.train)
    def train(self, max_epochs: int | None = None, batch_size: int | None = None, early_stopping: bool = True,
              **options) -> DecoderOnly:
        """Learn the decoder (and prior) together with one latent per training sample.

        Under ``torchrun`` the latents are sharded over the processes and ``batch_size`` is the global batch.

        Parameters
        ----------
        max_epochs
            Upper bound on epochs (default 200).
        batch_size
            Samples per mini-batch (default 128).
        early_stopping
            Stop when the validation loss has not improved for ``patience`` epochs.
        **options
            ``device``, ``checkpoint_path``, ``checkpoint_every``, ``resume_from``, ``progress`` and the
            runner's ``patience``, ``min_delta``, ``min_epochs``, ``restore_best``, ``seed`` mean what they
            mean in :meth:`BaseModel.train <dgdlens.models.base.BaseModel.train>`. The model's own options
            (paper defaults; every field of :class:`~dgdlens.train.decoder_only_plan.DecoderOnlyPlanConfig`):
            ``lr``, ``betas``, ``weight_decay`` (Adam for the decoder and likelihood parameters; ``lr`` is
            the plan's ``lr_decoder``; default 1e-3, betas (0.9, 0.999), weight decay 1e-4);
            ``lr_rep``, ``rep_optimizer``, ``rep_momentum``, ``rep_step``, ``rep_weight_decay`` (the
            representations' optimiser; paper default: SGD with momentum 0.9, lr 0.05, stepped every
            mini-batch, no weight decay; ``rep_optimizer="adam"`` gives the DGD's optimiser and
            ``rep_step="epoch"`` the DGD's one step per epoch; the loss is summed over features and
            samples, so ``lr_rep`` is a step per unit of a single sample's gradient); ``lr_prior``,
            ``prior_weight_decay`` (Adam for a learned prior); ``lr_decay_epoch``, ``lr_decay_factor``,
            ``reset_optimizers_on_decay`` (default ``None``: no learning-rate drop); and
            ``prior_refit_epoch``, ``refit_prior_at_end``, ``polish_steps``, ``polish_lr``,
            ``polish_tol``, ``hyperprior``, ``monitor``, ``shuffle_block_size``, ``max_batches`` as in
            :class:`~dgdlens.train.decoder_only_plan.DecoderOnlyPlanConfig`.

        Returns
        -------
        DecoderOnly
            ``self``, trained.
        """
        return super().train(max_epochs, batch_size, early_stopping, **options)

    def _make_plan(self, *, batch_size: int, seed: int, **options) -> DecoderOnlyPlan:
        self._require_data("train")
        opts = split_options(options, _DO_DEFAULTS, _DO_OPTIONS, {"lr_decoder": "lr"})
        opts = {_DO_RENAMED.get(k, k): v for k, v in opts.items()}
        config = DecoderOnlyPlanConfig(batch_size=batch_size, seed=seed, **opts)
        if self._train_table is None:
            self._new_tables()
        return DecoderOnlyPlan(self.module, self._matrix, self._scale, self.train_idx, self.val_idx,
                               self._train_table, self._val_table, config)

    def _collect_training(self, plan: DecoderOnlyPlan) -> None:
        self._train_table, self._val_table = plan.full_train_table, plan.full_val_table

    # ------------------------------------------------------------------ latents
    def _learned_latents(self) -> np.ndarray:
        if self._train_table is None:
            raise ValueError("This model was saved without its latents (save_latents=False); pass X to "
                             "get_latent_representation(X) to embed samples.")
        latent = np.empty((self.n_obs, self.n_latent), dtype=np.float32)
        latent[self.train_idx] = self._train_table.z.detach().cpu().numpy()
        if self._val_table is not None:
            latent[self.val_idx] = self._val_table.z.detach().cpu().numpy()
        return latent

    def _candidates(self, n_candidates: int, seed: int) -> torch.Tensor | None:
        """Start points for new samples: the mixture means (GMM prior); otherwise the origin plus up to
        ``n_candidates`` learned latents chosen at random (seeded), i.e. points on the learned manifold."""
        if isinstance(self.prior, GaussianMixture) or n_candidates <= 0 or self._train_table is None:
            return None
        latent = self._learned_latents()
        pick = np.random.default_rng(seed).choice(len(latent), size=min(int(n_candidates), len(latent)), replace=False)
        return torch.from_numpy(np.concatenate([np.zeros((1, self.n_latent), np.float32), latent[np.sort(pick)]]))

    def get_latent_representation(self, X=None, *, n_steps: int = 500, lr: float = 0.05, n_candidates: int = 32,
                                  candidate_steps: int = 0, batch_size: int = 1024, tol: float = 1e-6,
                                  device: str | torch.device | None = None, progress: bool = True) -> np.ndarray:
        """Latents, ``(n_samples, n_latent)`` float32.

        Without ``X`` (or with the very object registered at construction): the learned latents of the
        training data, in input order (validation samples included: theirs were fitted with the decoder
        frozen). With new data: held-out inference with the decoder and prior frozen. Each sample starts
        from the best of several candidates (the mixture means for a GMM prior; else the origin and
        ``n_candidates`` learned latents), scored by its loss, then Adam (``lr``) refines it for up to
        ``n_steps`` steps, stopping early when the batch loss changes by less than ``tol`` (relative);
        ``candidate_steps > 0`` optimises every candidate that long before the choice. The objective is
        the reconstruction NLL plus the prior's NLL; each sample's final value is kept in
        ``last_inference_loss_``. Under ``torchrun`` the samples are shared out over the processes.

        Parameters
        ----------
        X
            Samples x features to embed; ``None`` for the training data's learned latents.
        n_steps
            Maximum Adam steps per batch of new samples.
        lr
            Adam learning rate.
        n_candidates
            Learned latents tried as starting points (besides the origin) when the prior is not a mixture.
        candidate_steps
            Steps every candidate is optimised before the best is chosen.
        batch_size
            Samples optimised together.
        tol
            Relative change of the batch loss below which the optimisation stops.
        device
            Where to compute (default: the model's device).
        progress
            Show a progress bar.

        Returns
        -------
        numpy.ndarray
            ``(n_samples, n_latent)`` float32 latents.
        """
        self._warn_if_untrained()
        if self._is_registered(X):
            return self._learned_latents()
        matrix, scale = self._data(X, "X")
        dev = self.device if device is None else resolve_device(device)
        self._to(dev)
        z, loss = infer_latents_sharded(self.module, matrix, scale, self.n_latent, batch_size=batch_size, device=dev,
                                        progress=progress, n_steps=int(n_steps), lr=float(lr),
                                        candidates=self._candidates(n_candidates, self.seed),
                                        candidate_steps=candidate_steps, tol=tol)
        self.last_inference_loss_ = loss
        return z

    # ------------------------------------------------------------------ save / load (BaseModel)
    def save(self, path, overwrite: bool = False, *, save_latents: bool = True) -> None:
        """Save to a directory (``weights.safetensors`` + ``config.json``, see :mod:`dgdlens._io`).

        ``save_latents=False`` leaves out the training samples' latents. dgdlens MLP and conv decoders
        are rebuilt from their config on :meth:`load`; any other decoder must be passed to it again.

        Parameters
        ----------
        path
            The directory to write.
        overwrite
            Replace an existing dgdlens model folder at ``path``.
        save_latents
            Also save the training samples' latents.
        """
        self._save_latents = bool(save_latents)
        try:
            super().save(path, overwrite)
        finally:
            del self._save_latents

    def _payload(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        if getattr(self, "_save_latents", True) and self._train_table is not None:
            tensors["latent"] = torch.from_numpy(self._learned_latents())
            tensors["train_idx"] = torch.from_numpy(np.asarray(self.train_idx, dtype=np.int64))
            tensors["val_idx"] = torch.from_numpy(np.asarray(self.val_idx, dtype=np.int64))
        config = {**self._data_config(), "rep_init": self.rep_init, "rep_init_std": self.rep_init_std,
                  "decoder": module_config(self.decoder), "likelihood": self.likelihood.config(),
                  "prior": self.prior.config() if hasattr(self.prior, "config") else None}
        return tensors, config

    @classmethod
    def _from_payload(cls, tensors, config, *, decoder: nn.Module | None = None, X=None) -> DecoderOnly:
        """``load(path, decoder=...)`` for a custom decoder; ``X=`` re-attaches the training data."""
        prior_cfg = config["prior"]
        obj = cls.__new__(cls)
        obj._build(load_module(config["decoder"], decoder, "decoder"), config["likelihood"], config["n_latent"],
                   None if prior_cfg is None or prior_cfg.get("name") == "none" else prior_cfg, n_components=10,
                   prior_kwargs=None, likelihood_kwargs=None, scaling=config["scaling"], rep_init=config["rep_init"],
                   rep_init_std=config["rep_init_std"], validation_fraction=config["validation_fraction"],
                   seed=config["seed"])
        if obj.n_features != config["n_features"]:
            raise ValueError(f"the decoder outputs {obj.n_features} features, the saved model {config['n_features']}")
        obj.module.load_state_dict({k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")},
                                   strict=True)
        obj._attach_saved_data(X, config)
        if "latent" in tensors:
            latent = tensors["latent"].float()
            obj.train_idx, obj.val_idx = tensors["train_idx"].numpy(), tensors["val_idx"].numpy()
            obj._train_table = RepresentationTable(len(obj.train_idx), obj.n_latent, init=latent[obj.train_idx])
            obj._val_table = (RepresentationTable(len(obj.val_idx), obj.n_latent, init=latent[obj.val_idx])
                              if len(obj.val_idx) else None)
        elif obj.has_data:
            obj._new_tables()
        return obj
