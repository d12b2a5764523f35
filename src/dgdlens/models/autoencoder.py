"""The autoencoder baseline of the decoder-only comparison (Schuster & Krogh 2021).

An :class:`Autoencoder` is the same decoder and likelihood as a
:class:`~dgdlens.models.decoder_only.DecoderOnly` model, with an encoder producing the latents
instead of free per-sample representations. Data reading and checking, the reconstruction error,
decoding and saving are shared with :class:`DecoderOnly` (same units, same checks), and the
training options mirror it (Adam for the weights, a seeded validation split, early stopping on the
validation reconstruction NLL with restore-best, fixed epochs when there is no split), so a
comparison between the two differs only in how latents are obtained.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .._io import ModelFormatError, load_model_dir, save_model_dir
from ..data.loader import BatchLoader
from ..data.matrix import RowMatrix
from ..nn.likelihoods import Likelihood, make_likelihood
from ._engine import _optimise as optimise_latents
from ._engine import frozen, resolve_device
from .decoder_only import (
    LatentModel,
    infer_n_latent,
    load_module,
    module_config,
    output_width,
    per_sample_nll,
    probe_module,
    split_indices,
)

__all__ = ["Autoencoder"]

MODEL_KIND = "Autoencoder"


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
    seed
        Default seed of :meth:`fit` (split, batch order, dropout).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, likelihood: str | Likelihood = "bernoulli", *,
                 n_latent: int | None = None, likelihood_kwargs: dict | None = None, scaling: str = "sum",
                 input_transform: str = "auto", seed: int = 0) -> None:
        for name, module in (("encoder", encoder), ("decoder", decoder)):
            if not isinstance(module, nn.Module):
                raise ValueError(f"{name} must be a torch.nn.Module, got {type(module).__name__}.")
        if scaling not in {"sum", "none"}:
            raise ValueError(f"scaling must be 'sum' or 'none', got {scaling!r}")
        if input_transform not in {"auto", "log1p", "none"}:
            raise ValueError(f"input_transform must be 'auto', 'log1p' or 'none', got {input_transform!r}")
        self.n_latent = infer_n_latent(n_latent, decoder, encoder)
        self.n_features = output_width(decoder, self.n_latent)
        lik = make_likelihood(likelihood, self.n_features, **(likelihood_kwargs or {}))
        if input_transform == "auto":
            input_transform = "log1p" if lik.name == "nb" else "none"
        self.module = _AEModule(encoder, decoder, lik, input_transform)
        self._check_encoder()
        self._init_state(scaling, seed)

    def _check_encoder(self) -> None:
        out = probe_module(self.module.encoder, self.n_features,
                           f"The encoder could not encode rows of {self.n_features} features (the decoder's output size)")
        if tuple(out.shape) != (2, self.n_latent):
            raise ValueError(f"The encoder maps {self.n_features} features to shape {tuple(out.shape)[1:]}, but the "
                             f"decoder takes {self.n_latent} latent dimensions; they must match.")

    @property
    def encoder(self) -> nn.Module:
        return self.module.encoder

    def _to(self, device: torch.device) -> None:
        self.module.to(device)
        self.device = device

    # ------------------------------------------------------------------ training
    def _epoch(self, loader: BatchLoader, opt: torch.optim.Optimizer | None) -> float:
        """One pass; trains when ``opt`` is given, else evaluates. Returns the NLL per sample."""
        self.module.train(opt is not None)
        total = torch.zeros((), device=self.device)
        with torch.set_grad_enabled(opt is not None):
            for batch in loader:
                nll = self.module.recon_nll(batch.x, batch.scale)
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
                    # summed over samples and features, the same objective scale as DecoderOnly
                    nll.sum().backward()
                    opt.step()
                total = total + nll.detach().sum()
        return float(total) / loader.n

    def fit(self, X, *, epochs: int = 200, batch_size: int = 128, lr: float = 1e-3,
            betas: Sequence[float] = (0.9, 0.999), weight_decay: float = 1e-4, validation_fraction: float = 0.1,
            early_stopping: bool = True, patience: int = 20, min_epochs: int | None = None, min_delta: float = 0.0,
            restore_best: bool = True, seed: int | None = None, device: str | torch.device = "auto",
            progress: bool = True) -> Autoencoder:
        """Train encoder and decoder on the reconstruction NLL of ``X`` with Adam.

        Options mean what they mean in :meth:`DecoderOnly.fit`: a seeded validation split (its
        reconstruction NLL is monitored), early stopping after ``patience`` epochs without improvement
        by ``min_delta`` (not before ``min_epochs``, default ``min(50, epochs)``) with the best epoch
        restored; ``validation_fraction=0`` trains for ``epochs`` epochs on everything.
        """
        seed = self.seed if seed is None else int(seed)
        if int(epochs) < 1 or int(batch_size) < 1:
            raise ValueError("epochs and batch_size must be positive integers")
        matrix, scale = self._data(X, "X")
        train_idx, val_idx = split_indices(matrix.n_obs, validation_fraction, seed)
        if early_stopping and len(val_idx) == 0:
            warnings.warn("No validation split (validation_fraction=0 or too few samples): early stopping "
                          "monitors the training loss instead.", stacklevel=2)
        min_epochs = min(50, int(epochs)) if min_epochs is None else int(min_epochs)
        dev = resolve_device(device)
        self._to(dev)
        sub = (lambda idx: None if scale is None else scale[idx])
        train_loader = BatchLoader(matrix, train_idx, sub(train_idx), batch_size=batch_size, shuffle=True,
                                   seed=seed, device=dev)
        val_loader = (BatchLoader(matrix, val_idx, sub(val_idx), batch_size=1024, shuffle=False, device=dev)
                      if len(val_idx) else None)
        opt = torch.optim.Adam(self.module.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay)
        history: list[dict] = []
        best = {"value": math.inf, "epoch": -1, "state": None}
        wait, stopped = 0, False
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            bar = tqdm(range(int(epochs)), desc="training", disable=not progress, dynamic_ncols=True)
            for epoch in bar:
                row = {"epoch": epoch, "train_recon": self._epoch(train_loader, opt)}
                if val_loader is not None:
                    row["val_recon"] = self._epoch(val_loader, None)
                history.append(row)
                monitored = row.get("val_recon", row["train_recon"])
                if monitored < best["value"] - min_delta:
                    best = {"value": monitored, "epoch": epoch,
                            "state": copy.deepcopy(self.module.state_dict()) if restore_best else None}
                    wait = 0
                else:
                    wait += 1
                bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k != "epoch"})
                if early_stopping and epoch + 1 >= min_epochs and wait >= patience:
                    stopped = True
                    break
            bar.close()
        if restore_best and best["state"] is not None:
            self.module.load_state_dict(best["state"])
        self.history_ = pd.DataFrame(history)
        self.train_idx_, self.val_idx_ = train_idx, val_idx
        self.train_config_ = {"epochs": int(epochs), "batch_size": int(batch_size), "lr": lr, "betas": list(betas),
                              "weight_decay": weight_decay, "validation_fraction": validation_fraction,
                              "early_stopping": early_stopping, "patience": patience, "min_epochs": min_epochs,
                              "min_delta": min_delta, "restore_best": restore_best, "seed": seed}
        self.train_summary_ = {"best_epoch": int(best["epoch"]), "stopped_early": stopped, "epochs_run": len(history),
                               "fit_time_s": time.perf_counter() - t0}
        self.is_fitted = True
        self.latent_ = self._encode(matrix)
        return self

    # ------------------------------------------------------------------ inference
    def _encode(self, matrix: RowMatrix, batch_size: int = 1024) -> np.ndarray:
        loader = BatchLoader(matrix, None, None, batch_size=batch_size, shuffle=False, device=self.device)
        out = np.empty((matrix.n_obs, self.n_latent), dtype=np.float32)
        self.module.eval()
        with torch.no_grad():
            for batch in loader:
                out[batch.index.cpu().numpy()] = self.module.encode(batch.x).cpu().numpy()
        return out

    def transform(self, X, *, refine_steps: int = 0, lr: float = 0.05, batch_size: int = 1024) -> np.ndarray:
        """Latents of (new) samples from the encoder, ``(n_samples, n_latent)`` float32.

        ``refine_steps > 0`` then optimises each latent that many Adam steps (learning rate ``lr``) on
        its reconstruction NLL with the decoder frozen, the decoder-only model's test-time inference
        started from the encoder's guess. Comparing both tells how much of an autoencoder's test error
        is the encoder's (the amortisation gap) and how much the decoder's.
        """
        self._check_fitted()
        matrix, scale = self._data(X, "X")
        z = self._encode(matrix, batch_size)
        return self._refine(matrix, scale, z, int(refine_steps), float(lr), batch_size) if refine_steps else z

    def _refine(self, matrix: RowMatrix, scale: np.ndarray | None, z: np.ndarray, n_steps: int, lr: float,
                batch_size: int) -> np.ndarray:
        if n_steps < 0:
            raise ValueError(f"refine_steps must be a non-negative integer, got {n_steps}")
        loader = BatchLoader(matrix, None, scale, batch_size=batch_size, shuffle=False, device=self.device)
        out = z.copy()
        self.module.eval()

        def objective(x, zb, s):
            return self.likelihood.nll(x, self.decoder(zb), s)

        with frozen(self.module):
            for batch in loader:
                pos = batch.index.cpu().numpy()
                z0 = torch.from_numpy(np.ascontiguousarray(z[pos])).to(self.device)
                out[pos] = optimise_latents(objective, batch.x, batch.scale, z0, n_steps, lr,
                                            (0.5, 0.7), 0.0).cpu().numpy()
        return out

    def reconstruction_error(self, X, *, z: np.ndarray | None = None, per_sample: bool = False,
                             refine_steps: int = 0, lr: float = 0.05, batch_size: int = 1024) -> float | np.ndarray:
        """Mean reconstruction loss per entry (NLL per feature, e.g. BCE per pixel) on ``X``, with the
        latents from the encoder (refined by ``refine_steps``, see :meth:`transform`) or ``z``; same
        unit as :meth:`DecoderOnly.reconstruction_error`."""
        self._check_fitted()
        matrix, scale = self._data(X, "X")
        if z is None:
            z = self._encode(matrix, batch_size)
            if refine_steps:
                z = self._refine(matrix, scale, z, int(refine_steps), float(lr), batch_size)
        z = np.asarray(z, dtype=np.float32)
        if z.shape != (matrix.n_obs, self.n_latent):
            raise ValueError(f"z must have shape ({matrix.n_obs}, {self.n_latent}), got {z.shape}")
        per_entry = per_sample_nll(self.decoder, self.likelihood, matrix, scale, z, self.device, batch_size) / self.n_features
        return per_entry if per_sample else float(per_entry.mean())

    # ------------------------------------------------------------------ save / load
    def save(self, path, overwrite: bool = False) -> None:
        """Save to a directory (``weights.safetensors`` + ``config.json``, see :mod:`dgdlens._io`)."""
        tensors = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        config = {
            "n_latent": self.n_latent, "n_features": self.n_features, "seed": self.seed, "scaling": self.scaling,
            "input_transform": self.module.input_transform, "encoder": module_config(self.encoder),
            "decoder": module_config(self.decoder), "likelihood": self.likelihood.config(), "is_fitted": self.is_fitted,
            "train_config": self.train_config_, "train_summary": self.train_summary_,
            "history": self.history_.to_dict(orient="list"), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        save_model_dir(path, tensors, config, kind=MODEL_KIND, overwrite=overwrite)

    @classmethod
    def load(cls, path, *, encoder: nn.Module | None = None, decoder: nn.Module | None = None,
             device: str | torch.device = "cpu") -> Autoencoder:
        """Load a model written by :meth:`save` (pass ``encoder=``/``decoder=`` for custom architectures)."""
        tensors, cfg = load_model_dir(path, kind=MODEL_KIND)
        try:
            enc = load_module(cfg["encoder"], encoder, "encoder")
            dec = load_module(cfg["decoder"], decoder, "decoder")
            obj = cls(enc, dec, cfg["likelihood"], n_latent=cfg["n_latent"], scaling=cfg["scaling"],
                      input_transform=cfg["input_transform"], seed=cfg["seed"])
            state = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
            obj.module.load_state_dict(state, strict=True)
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            raise ModelFormatError(f"{path} does not match an Autoencoder ({err}); pass the modules it was saved "
                                   "with, or save the model again.") from err
        obj._restore_fit_state(cfg, device)
        return obj
