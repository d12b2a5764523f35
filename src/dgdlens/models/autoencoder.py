"""The autoencoder baseline of the decoder-only comparison (Schuster & Krogh 2021).

An :class:`Autoencoder` is the same decoder and likelihood as a
:class:`~dgdlens.models.decoder_only.DecoderOnly` model, with an encoder producing the latents
instead of free per-sample representations. Data registration and checking, the reconstruction
error, decoding and saving are shared with :class:`DecoderOnly` (:class:`LatentModel`: same units,
same checks), and training goes through the same runner (:meth:`~dgdlens.models.base.BaseModel.train`:
seeded validation split, early stopping with restore-best, checkpoints, ``torchrun``) with the
:class:`~dgdlens.train.autoencoder_plan.AutoencoderPlan`, so a comparison between the two differs only
in how latents are obtained.
"""

from __future__ import annotations

from dataclasses import fields
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..data.loader import BatchLoader
from ..data.matrix import RowMatrix
from ..nn.likelihoods import Likelihood, make_likelihood
from ..nn.module import frozen, likelihood_nll
from ..train.autoencoder_plan import AutoencoderPlan, AutoencoderPlanConfig
from ..train.inference import optimise_latents
from .decoder_only import (
    LatentModel,
    infer_n_latent,
    load_module,
    module_config,
    output_width,
    probe_module,
    split_options,
)

__all__ = ["Autoencoder"]

_AE_DEFAULTS = {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 1e-4}
_AE_OPTIONS = {f.name for f in fields(AutoencoderPlanConfig)} - {"batch_size", "seed"}


class _AEModule(nn.Module):
    """Encoder + decoder + likelihood in one module (one state dict, one ``.to(device)``)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, likelihood: Likelihood, input_transform: str):
        super().__init__()
        self.encoder, self.decoder, self.likelihood = encoder, decoder, likelihood
        self.input_transform = input_transform

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform == "log1p":
            # raw counts span orders of magnitude; the encoder sees log1p of them, the loss the counts
            x = torch.log1p(x)
        return self.encoder(x)

    def recon_nll(self, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        return self.likelihood.nll(x, self.decoder(self.encode(x)), scale)


class Autoencoder(LatentModel):
    """Encoder + decoder trained end to end on the reconstruction loss (the decoder-only baseline).

    Parameters
    ----------
    X
        Training data, ``(n_samples, n_features)``: numpy array, torch tensor, scipy sparse matrix or
        AnnData (its ``X``). Never modified.
    encoder
        Torch module mapping ``(n, n_features)`` rows to ``(n, n_latent)`` latents
        (:func:`dgdlens.models.mlp_encoder`, :func:`dgdlens.nn.conv.conv_encoder`).
    decoder
        Torch module mapping latents back to ``(n, n_features)`` raw outputs; use the same decoder
        architecture (and initial weights) as the :class:`DecoderOnly` model it is compared with.
        Both modules are trained in place.
    likelihood
        ``"bernoulli"`` (``"bce"``), ``"gaussian"`` (``"mse"``), ``"nb"`` or a Likelihood instance.
    n_latent
        Latent size; read from the modules when omitted.
    likelihood_kwargs
        Extra arguments for :func:`~dgdlens.nn.make_likelihood`.
    scaling
        NB only: ``"sum"`` (mean = total count x composition) or ``"none"``.
    input_transform
        What the encoder sees: ``"auto"`` (``log1p`` for NB counts, the data otherwise), ``"log1p"``
        or ``"none"``. The loss is always on the untransformed data.
    validation_fraction
        Share of samples held out (seeded, :func:`~dgdlens.data.split.train_validation_split`); their
        reconstruction NLL is what early stopping watches. ``0``: train on everything.
    seed
        Seeds the split and (the default of ``train(seed=...)``) the batch order and dropout.
    """

    _model_kind: ClassVar[str] = "Autoencoder"

    def __init__(self, X, encoder: nn.Module, decoder: nn.Module, likelihood: str | Likelihood = "bernoulli", *,
                 n_latent: int | None = None, likelihood_kwargs: dict | None = None, scaling: str = "sum",
                 input_transform: str = "auto", validation_fraction: float = 0.1, seed: int = 0) -> None:
        self._build(encoder, decoder, likelihood, n_latent=n_latent, likelihood_kwargs=likelihood_kwargs,
                    scaling=scaling, input_transform=input_transform, validation_fraction=validation_fraction,
                    seed=seed)
        self._register(X)

    def _build(self, encoder, decoder, likelihood, *, n_latent, likelihood_kwargs, scaling, input_transform,
               validation_fraction, seed) -> None:
        for name, module in (("encoder", encoder), ("decoder", decoder)):
            if not isinstance(module, nn.Module):
                raise ValueError(f"{name} must be a torch.nn.Module, got {type(module).__name__}.")
        if input_transform not in {"auto", "log1p", "none"}:
            raise ValueError(f"input_transform must be 'auto', 'log1p' or 'none', got {input_transform!r}")
        self.n_latent = infer_n_latent(n_latent, decoder, encoder)
        self.n_features = output_width(decoder, self.n_latent)
        lik = make_likelihood(likelihood, self.n_features, **(likelihood_kwargs or {}))
        if input_transform == "auto":
            input_transform = "log1p" if lik.name == "nb" else "none"
        self.module = _AEModule(encoder, decoder, lik, input_transform)
        out = probe_module(encoder, self.n_features,
                           f"The encoder could not encode rows of {self.n_features} features (the decoder's output size)")
        if tuple(out.shape) != (2, self.n_latent):
            raise ValueError(f"The encoder maps {self.n_features} features to shape {tuple(out.shape)[1:]}, but the "
                             f"decoder takes {self.n_latent} latent dimensions; they must match.")
        self._init_common(scaling, validation_fraction, seed)

    @property
    def encoder(self) -> nn.Module:
        """The encoder (a ``torch.nn.Module``).
        """
        return self.module.encoder

    # ------------------------------------------------------------------ training (BaseModel.train)
    def train(self, max_epochs: int | None = None, batch_size: int | None = None, early_stopping: bool = True,
              **options) -> Autoencoder:
        """Train encoder and decoder on the reconstruction NLL with Adam; returns ``self``.

        The runner's arguments and defaults are those of :meth:`DecoderOnly.train
        <dgdlens.models.decoder_only.DecoderOnly.train>`. The model's own options
        (:class:`~dgdlens.train.autoencoder_plan.AutoencoderPlanConfig`): ``lr`` (1e-3), ``betas``
        ((0.9, 0.999)) and ``weight_decay`` (1e-4) of Adam over encoder, decoder and likelihood;
        ``validation_batch_size``, ``shuffle_block_size``, ``max_batches``.

        Parameters
        ----------
        max_epochs, batch_size, early_stopping
            As in :meth:`DecoderOnly.train <dgdlens.models.decoder_only.DecoderOnly.train>`.
        **options
            The runner's options (``device``, ``checkpoint_path``, ``patience``, ...) and the plan's
            (``lr``, ``betas``, ``weight_decay``, ``validation_batch_size``, ``shuffle_block_size``,
            ``max_batches``).

        Returns
        -------
        Autoencoder
            ``self``, trained.
        """
        return super().train(max_epochs, batch_size, early_stopping, **options)

    def _make_plan(self, *, batch_size: int, seed: int, **options) -> AutoencoderPlan:
        self._require_data("train")
        opts = split_options(options, _AE_DEFAULTS, _AE_OPTIONS)
        config = AutoencoderPlanConfig(batch_size=batch_size, seed=seed, **opts)
        return AutoencoderPlan(self.module, self._matrix, self._scale, self.train_idx, self.val_idx, config)

    def _collect_training(self, plan: AutoencoderPlan) -> None:
        """Nothing to read back: the plan trained ``self.module`` in place."""

    # ------------------------------------------------------------------ latents
    def _encode(self, matrix: RowMatrix, batch_size: int = 1024) -> np.ndarray:
        loader = BatchLoader(matrix, None, None, batch_size=batch_size, shuffle=False, device=self.device)
        out = np.empty((matrix.n_obs, self.n_latent), dtype=np.float32)
        self.module.eval()
        with torch.no_grad():
            for batch in loader:
                out[batch.index.cpu().numpy()] = self.module.encode(batch.x).cpu().numpy()
        return out

    def get_latent_representation(self, X=None, *, refine_steps: int = 0, lr: float = 0.05,
                                  batch_size: int = 1024) -> np.ndarray:
        """Latents from the encoder, ``(n_samples, n_latent)`` float32: of the training data (input order,
        validation samples included) without ``X``, else of ``X``.

        ``refine_steps > 0`` then optimises each latent that many Adam steps (learning rate ``lr``) on
        its reconstruction NLL with the decoder frozen, the decoder-only model's test-time inference
        started from the encoder's guess. Comparing both tells how much of an autoencoder's test error
        is the encoder's (the amortisation gap) and how much the decoder's.

        Parameters
        ----------
        X
            Samples x features to embed; ``None`` for the training data.
        refine_steps
            Adam steps on each latent after the encoder (0: the encoder's output as is).
        lr
            Learning rate of the refinement.
        batch_size
            Samples per forward pass.

        Returns
        -------
        numpy.ndarray
            ``(n_samples, n_latent)`` float32 latents.
        """
        self._warn_if_untrained()
        if isinstance(refine_steps, bool) or int(refine_steps) != refine_steps or refine_steps < 0:
            raise ValueError(f"refine_steps must be a non-negative integer, got {refine_steps!r}")
        if self._is_registered(X):
            self._require_data("encode its training samples")
            matrix, scale = self._matrix, self._scale
        else:
            matrix, scale = self._data(X, "X")
        z = self._encode(matrix, batch_size)
        return self._refine(matrix, scale, z, int(refine_steps), float(lr), batch_size) if refine_steps else z

    def _refine(self, matrix: RowMatrix, scale: np.ndarray | None, z: np.ndarray, n_steps: int, lr: float,
                batch_size: int) -> np.ndarray:
        loader = BatchLoader(matrix, None, scale, batch_size=batch_size, shuffle=False, device=self.device)
        out = z.copy()
        self.module.eval()

        def objective(data, zb, s):
            x, constant = data
            return likelihood_nll(self.likelihood, x, self.decoder(zb), s, constant)

        with frozen(self.module):
            for batch in loader:
                pos = batch.index.cpu().numpy()
                z0 = torch.from_numpy(np.ascontiguousarray(z[pos])).to(self.device)
                with torch.no_grad():  # the count-only terms of the likelihood, once rather than every step
                    data = (batch.x, self.likelihood.nll_constant(batch.x, batch.scale))
                out[pos] = optimise_latents(objective, data, batch.scale, z0, n_steps, lr,
                                            (0.5, 0.7), 0.0).cpu().numpy()
        return out

    # ------------------------------------------------------------------ save / load (BaseModel)
    def _payload(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        config = {**self._data_config(), "input_transform": self.module.input_transform,
                  "encoder": module_config(self.encoder), "decoder": module_config(self.decoder),
                  "likelihood": self.likelihood.config()}
        return tensors, config

    @classmethod
    def _from_payload(cls, tensors, config, *, encoder: nn.Module | None = None, decoder: nn.Module | None = None,
                      X=None) -> Autoencoder:
        """``load(path, encoder=..., decoder=...)`` for custom modules; ``X=`` re-attaches the training data."""
        obj = cls.__new__(cls)
        obj._build(load_module(config["encoder"], encoder, "encoder"), load_module(config["decoder"], decoder, "decoder"),
                   config["likelihood"], n_latent=config["n_latent"], likelihood_kwargs=None, scaling=config["scaling"],
                   input_transform=config["input_transform"], validation_fraction=config["validation_fraction"],
                   seed=config["seed"])
        obj.module.load_state_dict({k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")},
                                   strict=True)
        obj._attach_saved_data(X, config)
        return obj
