"""Sparse autoencoder variants over one base class: ReLU + L1, TopK, BatchTopK and JumpReLU.

Every variant computes, for an input ``x`` (cells x ``d_in``)::

    x_n  = (x - x_mean) / x_scale                     # training-time normalisation (identity once folded)
    pre  = W_enc (x_n - b_dec) + b_enc                # bias="tied"   (b_dec subtracted before encoding)
    pre  = W_enc x_n + b_enc                          # bias="untied" (the reference)
    f    = activation(pre)                            # variant-specific, >= 0
    x̂_n = W_dec^T f + b_dec

with ``W_enc`` and ``W_dec`` both stored as ``(n_latents, d_in)``.

**Training hooks.** :class:`~dgdlens.train.sae_plan.SAEPlan` trains every variant the same way; what
differs is a method of the variant: :meth:`SAE.auxiliary_loss` (AuxK for TopK and BatchTopK),
:meth:`SAE.training_statistics` and :meth:`SAE.end_training_epoch` (BatchTopK's running inference
threshold), :meth:`SAE.after_training` (BatchTopK's threshold calibration), and the data-dependent start
(:meth:`SAE.init_variant_from_sample`, :meth:`SAE.scale_encoder_`).

**Units.** ``train_sae`` folds the normalisation (and, for unconstrained decoders, the decoder row
norms) into the weights when it finishes, so a trained or loaded SAE has ``x_mean = 0``, ``x_scale = 1``
and unit-norm rows of ``W_dec`` *in the original input space*: ``decode(f) = f @ W_dec + b_dec``
exactly, and moving latent ``i`` by ``delta`` moves the reconstruction by ``delta * W_dec[i]`` in input
units. The fold is exact because the normalisation is one mean vector and one scalar, and every
activation here is positively homogeneous (thresholds are scaled along).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import _dist
from .._io import ModelFormatError, load_model_dir, save_model_dir
from ..train.fitted import FittedState
from .config import SAEConfig, canonical_kind
from .init import init_from_data, normalisation_statistics
from .io import EmbeddingRows, as_rows

__all__ = ["SAE", "ReLUSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "make_sae", "VARIANTS"]

MODEL_KIND = "sae"


class SAE(nn.Module, FittedState):
    """Base class of all SAE variants (use :func:`dgdlens.sae.train_sae` to make one).

    Public attributes: ``config`` (:class:`SAEConfig`), ``n_latents``, ``d_in``, ``W_enc``, ``b_enc``,
    ``W_dec`` (``n_latents x d_in``, unit-norm rows in input units once trained), ``b_dec``, and the
    fitted state every trained dgdlens object has: ``is_trained_``, ``history_`` (a DataFrame, one row
    per epoch; ``dl.pl.training_curves(sae.history_)``), ``train_summary_`` and ``train_config_``.
    (The SAE is a torch module, so its training verb is the function ``train_sae``: ``nn.Module.train``
    is torch's mode switch.)

    Parameters
    ----------
    config
        The SAE's :class:`SAEConfig`; it is copied and validated (``d_in`` and ``n_latents`` must be set),
        and its ``kind`` must match the class (use :func:`make_sae` to pick the class from the config).
        The weights are initialised with ``seed=0`` (:meth:`reset_parameters`).
    """

    kind: ClassVar[str] = "base"

    def __init__(self, config: SAEConfig) -> None:
        super().__init__()
        config = SAEConfig.from_dict(config.to_dict()).validate()
        if config.kind != self.kind:
            raise ValueError(f"{type(self).__name__} needs kind={self.kind!r}, got config.kind={config.kind!r}.")
        self.config = config
        d, m = config.d_in, config.n_latents
        self.W_enc = nn.Parameter(torch.empty(m, d))
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.W_dec = nn.Parameter(torch.empty(m, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("x_mean", torch.zeros(d))
        self.register_buffer("x_scale", torch.ones(()))
        self._init_fitted_state()
        self.reset_parameters(seed=0)

    # ------------------------------------------------------------------ shape
    @property
    def n_latents(self) -> int:
        """Dictionary width (number of latents)."""
        return self.config.n_latents

    @property
    def d_in(self) -> int:
        """Input (embedding) dimension."""
        return self.config.d_in

    @property
    def device(self) -> torch.device:
        """The torch device the weights are on."""
        return self.W_enc.device

    @property
    def folded(self) -> bool:
        """True when the input normalisation is folded into the weights (always, after training)."""
        return bool(torch.all(self.x_mean == 0)) and float(self.x_scale) == 1.0

    def extra_repr(self) -> str:
        """The shape and sparsity settings shown in the module's ``repr``.

        Returns
        -------
        str
            E.g. ``"d_in=20, n_latents=256, k=8, bias=tied, decoder_norm=unit"``.
        """
        c = self.config
        sparsity = f"k={c.k}" if c.k is not None else f"l1_coef={c.l1_coef:g}"
        return f"d_in={c.d_in}, n_latents={c.n_latents}, {sparsity}, bias={c.bias}, decoder_norm={c.decoder_norm}"

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Initialise the weights from ``seed`` (see ``SAEConfig.init``).

        Also resets variant parameters (BatchTopK's threshold to 0, JumpReLU's to
        ``jumprelu_threshold_init``). The normalisation buffers are left as they are.

        Parameters
        ----------
        seed
            Seed of a private ``torch.Generator`` (the global RNG is untouched).
        """
        gen = torch.Generator().manual_seed(int(seed))
        d, m = self.d_in, self.n_latents
        if self.config.init == "pytorch":
            # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
            enc_bound, dec_bound = 1.0 / math.sqrt(d), 1.0 / math.sqrt(m)
            W_enc = (torch.rand(m, d, generator=gen) * 2 - 1) * enc_bound
            b_enc = (torch.rand(m, generator=gen) * 2 - 1) * enc_bound
            W_dec = (torch.rand(m, d, generator=gen) * 2 - 1) * dec_bound
            b_dec = (torch.rand(d, generator=gen) * 2 - 1) * dec_bound
        else:
            W_dec = torch.randn(m, d, generator=gen)
            W_dec /= W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            W_enc = W_dec.clone()  # encoder = decoder transpose: every latent starts as a matched filter
            b_enc = torch.zeros(m)
            b_dec = torch.zeros(d)
        for param, value in ((self.W_enc, W_enc), (self.b_enc, b_enc), (self.W_dec, W_dec), (self.b_dec, b_dec)):
            param.copy_(value.to(param.device, param.dtype))
        self._reset_variant_parameters()

    def _reset_variant_parameters(self) -> None:
        """Variant-specific parameters (thresholds)."""

    # ------------------------------------------------------------------ training hooks
    @torch.no_grad()
    def prepare_for_training(self, data: EmbeddingRows, train_idx: np.ndarray, local_idx: np.ndarray, seed: int,
                             reduce_sum=None) -> tuple[np.ndarray, float]:
        """Set the input normalisation from the training cells and initialise from the data.

        ``local_idx``: this process's training rows (all of ``train_idx`` in one process); ``reduce_sum``
        sums the normalisation statistics over processes. Returns the training mean and scale.

        Parameters
        ----------
        data
            The training embedding (cells x ``d_in``).
        train_idx
            Row indices of all training cells (over every process).
        local_idx
            Row indices of this process's training cells.
        seed
            Seed of the sample of training cells used for the data-dependent start.
        reduce_sum
            Callable summing a tensor over processes (under ``torchrun``); ``None`` in one process.

        Returns
        -------
        tuple of (numpy.ndarray, float)
            ``(mean, scale)``: the training cells' mean vector ``(d_in,)`` (float64; subtracted only when
            ``normalize`` centres) and the scalar divisor (1.0 when ``normalize`` does not scale).
        """
        mode = self.config.normalize
        mean, scale = normalisation_statistics(data, local_idx, mode, n_total=len(train_idx), reduce_sum=reduce_sum)
        self.x_mean.copy_(torch.as_tensor(mean if mode in ("center", "center_scale") else 0.0,
                                          dtype=torch.float32, device=self.device).expand_as(self.x_mean))
        self.x_scale.fill_(scale)
        init_from_data(self, data, train_idx, seed)
        return mean, scale

    def init_variant_from_sample(self, x_n: torch.Tensor) -> None:
        """Variant-specific start from a sample of normalised training rows (after ``b_dec`` is set).

        The base class does nothing.

        Parameters
        ----------
        x_n
            Sample of normalised training rows, ``(n_sample, d_in)`` on the SAE's device.
        """

    @torch.no_grad()
    def scale_encoder_(self, scale: float) -> None:
        """Multiply the encoder by ``scale`` (and whatever must scale along with it).

        Parameters
        ----------
        scale
            Positive factor applied to ``W_enc`` and ``b_enc`` in place.
        """
        self.W_enc.mul_(scale)
        self.b_enc.mul_(scale)

    def auxiliary_loss(self, pre: torch.Tensor, x_n: torch.Tensor, x_hat: torch.Tensor,
                       dead: torch.Tensor) -> torch.Tensor | None:
        """An extra training loss (already weighted), or ``None``. ``dead``: boolean mask of the latents that
        have not fired recently. Must not synchronise with the host (no ``int()``/``float()`` of tensors).

        Parameters
        ----------
        pre
            Pre-activations of the batch, ``(batch, n_latents)`` (normalised units).
        x_n
            Normalised input batch, ``(batch, d_in)``.
        x_hat
            Normalised reconstruction of the batch, ``(batch, d_in)``.
        dead
            Boolean ``(n_latents,)`` mask of the dead latents.

        Returns
        -------
        torch.Tensor or None
            A scalar loss to add to the training loss, or ``None`` (the base class: no auxiliary loss).
        """
        return None

    def training_statistics(self, f: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-step sums (device tensors) the runner adds up over the epoch and processes.

        Parameters
        ----------
        f
            Training activations of the batch, ``(batch, n_latents)`` (normalised units).

        Returns
        -------
        dict of str to torch.Tensor
            Named scalar tensors to sum; the base class returns ``{}``.
        """
        return {}

    def end_training_epoch(self, sums: dict[str, torch.Tensor]) -> None:
        """Use the epoch's summed statistics (every process gets the same ones).

        The base class does nothing.

        Parameters
        ----------
        sums
            The epoch's sums of :meth:`training_statistics`' entries, by name.
        """

    def after_training(self, batches, reduce_sum) -> None:
        """Work with the final weights: ``batches`` yields this process's share of full-size training batches
        (input units), ``reduce_sum`` sums a tensor over processes.

        The base class does nothing.

        Parameters
        ----------
        batches
            Iterable of ``(batch, d_in)`` float32 tensors on the SAE's device.
        reduce_sum
            Callable summing a CPU tensor over processes (the identity in one process).
        """

    # ------------------------------------------------------------------ core maths (normalised units)
    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the training-time input normalisation, ``(x - x_mean) / x_scale`` (the identity once folded).

        Parameters
        ----------
        x
            Batch in input units, ``(batch, d_in)``.

        Returns
        -------
        torch.Tensor
            The batch in normalised units, same shape.
        """
        return (x - self.x_mean) / self.x_scale

    def pre_activations(self, x_n: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations: ``W_enc (x_n - b_dec) + b_enc`` (tied bias) or ``W_enc x_n + b_enc``
        (untied).

        Parameters
        ----------
        x_n
            Normalised batch, ``(batch, d_in)``.

        Returns
        -------
        torch.Tensor
            ``(batch, n_latents)`` pre-activations.
        """
        if self.config.bias == "tied":
            x_n = x_n - self.b_dec
        return x_n @ self.W_enc.T + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Inference activation (per sample; BatchTopK uses its threshold).

        Parameters
        ----------
        pre
            Pre-activations, ``(batch, n_latents)`` (normalised units).

        Returns
        -------
        torch.Tensor
            Non-negative activations, same shape; the base class raises ``NotImplementedError``.
        """
        raise NotImplementedError

    def activate_train(self, pre: torch.Tensor) -> torch.Tensor:
        """Training activation (BatchTopK selects over the whole batch); defaults to :meth:`activate`.

        Parameters
        ----------
        pre
            Pre-activations, ``(batch, n_latents)`` (normalised units).

        Returns
        -------
        torch.Tensor
            Non-negative activations, same shape.
        """
        return self.activate(pre)

    def decode_normalised(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction in normalised units, ``f @ W_dec + b_dec``.

        Parameters
        ----------
        f
            Activations in normalised units, ``(batch, n_latents)``.

        Returns
        -------
        torch.Tensor
            ``(batch, d_in)`` normalised reconstruction.
        """
        return f @ self.W_dec + self.b_dec

    def sparsity_loss(self, f: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """Sparsity penalty before its coefficient (zero for TopK variants).

        Parameters
        ----------
        f
            Training activations, ``(batch, n_latents)``.
        pre
            Pre-activations, ``(batch, n_latents)``.

        Returns
        -------
        torch.Tensor
            A scalar; the base class returns 0 (no penalty).
        """
        return f.new_zeros(())

    # ------------------------------------------------------------------ tensors in input units
    def encode_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Dense activations (in input units) of a torch batch ``x`` on the SAE's device; differentiable.

        Parameters
        ----------
        x
            Batch in input units, ``(batch, d_in)``, float32 on the SAE's device.

        Returns
        -------
        torch.Tensor
            ``(batch, n_latents)`` activations (inference activation), scaled by ``x_scale``.
        """
        return self.activate(self.pre_activations(self.normalise(x))) * self.x_scale

    def decode_tensor(self, f: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``f @ W_dec + b_dec`` in input units (torch); differentiable.

        Parameters
        ----------
        f
            Activations in input units, ``(batch, n_latents)``.

        Returns
        -------
        torch.Tensor
            ``(batch, d_in)`` reconstruction in input units.
        """
        return f @ self.W_dec + self.b_dec * self.x_scale + self.x_mean

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruction, activations)`` of a torch batch, both in input units.

        Parameters
        ----------
        x
            Batch in input units, ``(batch, d_in)``, on the SAE's device.

        Returns
        -------
        tuple of torch.Tensor
            ``(x_hat, f)``: reconstruction ``(batch, d_in)`` and activations ``(batch, n_latents)``.
        """
        f = self.encode_tensor(x)
        return self.decode_tensor(f), f

    # ------------------------------------------------------------------ public numpy / scipy API
    @torch.no_grad()
    def encode(self, X, *, use_rep: str | None = None, batch_size: int = 2048, progress: bool = False
               ) -> sp.csr_matrix:
        """Sparse activations (cells x latents, CSR, float32) of ``X``, computed batch by batch.

        ``X``: numpy array, torch tensor, scipy sparse matrix or AnnData (``use_rep``: the ``obsm`` key of
        the embedding, or ``"X"``). Only one
        batch of activations is ever dense, so 100k cells x 10k latents fit in memory whenever the
        non-zeros do.

        Parameters
        ----------
        X
            The embedding, cells x ``d_in``.
        use_rep
            For an AnnData: the ``obsm`` key of the embedding, or ``"X"``.
        batch_size
            Cells encoded per batch.
        progress
            Show a progress bar.

        Returns
        -------
        scipy.sparse.csr_matrix
            float32 activations, cells x ``n_latents``, in input units (only non-zeros stored).
        """
        rows = self._input_rows(X, use_rep)
        indptr = [np.zeros(1, dtype=np.int64)]
        indices, values = [], []
        offset = 0
        iterator = rows.iter_slices(_check_batch_size(batch_size), self.device)
        for start, stop, x in tqdm(iterator, total=-(-rows.n_obs // batch_size), disable=not progress,
                                   desc="encode", leave=False):
            f = self.encode_tensor(x)
            r, c = torch.nonzero(f, as_tuple=True)  # row-major order = CSR order
            counts = torch.bincount(r, minlength=stop - start)
            indptr.append(offset + np.cumsum(counts.cpu().numpy(), dtype=np.int64))
            indices.append(c.cpu().numpy().astype(np.int32, copy=False))
            values.append(f[r, c].cpu().numpy())
            offset += int(r.numel())
        ptr = np.concatenate(indptr)
        idx_dtype = np.int32 if offset < 2**31 - 1 else np.int64
        return sp.csr_matrix(
            (np.concatenate(values) if values else np.zeros(0, np.float32),
             np.concatenate(indices).astype(idx_dtype, copy=False) if indices else np.zeros(0, idx_dtype),
             ptr.astype(idx_dtype, copy=False)),
            shape=(rows.n_obs, self.n_latents),
        )

    @torch.no_grad()
    def decode(self, F, *, batch_size: int = 65_536) -> np.ndarray:
        """Reconstruction (cells x ``d_in``, float32 numpy) from activations ``F`` in input units.

        ``F``: scipy sparse matrix (as returned by :meth:`encode`), numpy array or torch tensor with
        ``n_latents`` columns.

        Parameters
        ----------
        F
            Activations, cells x ``n_latents``, in input units.
        batch_size
            Cells decoded per block (computed in float64).

        Returns
        -------
        numpy.ndarray
            float32 reconstruction, cells x ``d_in``.
        """
        if isinstance(F, torch.Tensor):
            F = F.detach().cpu().numpy()
        if not (sp.issparse(F) or isinstance(F, np.ndarray)):
            raise ValueError(f"decode expects a scipy sparse matrix, numpy array or tensor, got {type(F).__name__}.")
        if F.ndim != 2 or F.shape[1] != self.n_latents:
            raise ValueError(
                f"decode expects activations of shape (cells, {self.n_latents}), got {F.shape}; pass the output of "
                "sae.encode (same SAE)."
            )
        W, bias = self._decoder_in_input_units()
        F = sp.csr_matrix(F) if sp.issparse(F) else F
        out = np.empty((F.shape[0], self.d_in), dtype=np.float32)
        for start in range(0, F.shape[0], _check_batch_size(batch_size)):
            block = F[start:start + batch_size]
            dense_out = block @ W if sp.issparse(block) else np.asarray(block, dtype=np.float64) @ W
            out[start:start + batch_size] = np.asarray(dense_out) + bias
        return out

    @torch.no_grad()
    def reconstruct(self, X, *, use_rep: str | None = None, batch_size: int = 2048) -> np.ndarray:
        """``decode(encode(X))`` without building the sparse matrix (cells x ``d_in`` numpy).

        Parameters
        ----------
        X
            The embedding, cells x ``d_in`` (array, tensor, sparse matrix or AnnData with ``use_rep``).
        use_rep
            For an AnnData: the ``obsm`` key of the embedding, or ``"X"``.
        batch_size
            Cells per batch.

        Returns
        -------
        numpy.ndarray
            float32 reconstruction, cells x ``d_in``.
        """
        rows = self._input_rows(X, use_rep)
        out = np.empty((rows.n_obs, self.d_in), dtype=np.float32)
        for start, stop, x in rows.iter_slices(_check_batch_size(batch_size), self.device):
            out[start:stop] = self.forward(x)[0].cpu().numpy()
        return out

    def reconstruction_error(self, X, *, use_rep: str | None = None, batch_size: int = 2048) -> np.ndarray:
        """The SAE error term ``X - reconstruct(X)`` (keep it when steering so only the edit changes).

        Parameters
        ----------
        X
            The embedding, cells x ``d_in`` (array, tensor, sparse matrix or AnnData with ``use_rep``).
        use_rep
            For an AnnData: the ``obsm`` key of the embedding, or ``"X"``.
        batch_size
            Cells per batch.

        Returns
        -------
        numpy.ndarray
            float32 residual, cells x ``d_in``, in input units.
        """
        rows = self._input_rows(X, use_rep)
        out = self.reconstruct(rows, batch_size=batch_size)
        for start, stop, x in rows.iter_slices(65_536, "cpu"):
            out[start:stop] = x.numpy() - out[start:stop]
        return out

    def _input_rows(self, X, use_rep):
        rows = as_rows(X, use_rep)
        rows.check_dim(self.d_in)
        return rows

    def _decoder_in_input_units(self) -> tuple[np.ndarray, np.ndarray]:
        """``(W, bias)`` with ``x̂ = f @ W + bias`` for activations ``f`` in input units (float64)."""
        W = self.W_dec.detach().double().cpu().numpy()
        bias = (self.b_dec.detach().double() * self.x_scale.double() + self.x_mean.double()).cpu().numpy()
        return W, bias

    # ------------------------------------------------------------------ folding and saving
    @torch.no_grad()
    def folded_state(self) -> dict[str, torch.Tensor]:
        """The state dict with the normalisation (and free decoder norms) folded into the weights.

        With ``c = x_scale`` and ``mu = x_mean``: activations become ``c * n_i * f_i`` (``n_i`` the norm of
        decoder row i, only for unconstrained decoders), decoder rows ``W_dec[i] / n_i``, and the biases
        absorb ``mu`` and ``c``; reconstructions are unchanged.

        Returns
        -------
        dict of str to torch.Tensor
            A state dict for :meth:`torch.nn.Module.load_state_dict` (weights' dtype), with ``x_mean = 0``
            and ``x_scale = 1``; the SAE itself is unchanged.
        """
        c = self.x_scale.double()
        mu = self.x_mean.double()
        W_enc, b_enc = self.W_enc.double(), self.b_enc.double()
        W_dec, b_dec = self.W_dec.double(), self.b_dec.double()
        if self.config.bias == "tied":
            b_dec_new = mu + c * b_dec
            b_enc_new = c * b_enc
        else:
            b_enc_new = c * b_enc - W_enc @ mu
            b_dec_new = c * b_dec + mu
        scale = torch.full((self.n_latents,), float(c), dtype=torch.float64, device=self.device)
        W_enc_new, W_dec_new = W_enc.clone(), W_dec.clone()
        if self.config.decoder_norm != "unit":
            norms = W_dec.norm(dim=1)
            ok = norms > 1e-12  # a zero row stays zero: the latent contributes nothing either way
            n = torch.where(ok, norms, torch.ones_like(norms))
            W_enc_new = W_enc_new * n[:, None]
            b_enc_new = b_enc_new * n
            W_dec_new = W_dec_new / n[:, None]
            scale = scale * n
        state = {
            "W_enc": W_enc_new, "b_enc": b_enc_new, "W_dec": W_dec_new, "b_dec": b_dec_new,
            "x_mean": torch.zeros_like(mu), "x_scale": torch.ones_like(c),
        }
        state.update(self._fold_variant_state(scale))
        dtype = self.W_enc.dtype
        return {k: v.to(dtype) for k, v in state.items()}

    def _fold_variant_state(self, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """Variant parameters rescaled by the per-latent activation scale (float64)."""
        return {}

    @torch.no_grad()
    def fold_(self) -> SAE:
        """Fold the normalisation into the weights in place (idempotent); returns ``self``.

        Returns
        -------
        SAE
            ``self``, folded (see :meth:`folded_state`).
        """
        self.load_state_dict(self.folded_state())
        return self

    def save(self, path, *, overwrite: bool = False) -> Path:
        """Save to the directory ``path`` (``weights.safetensors`` + ``config.json``), weights folded, with
        the fitted state (``is_trained_``, ``history_``, ``train_summary_``, ``train_config_``).

        Under ``torchrun`` rank 0 writes and the other processes wait.

        Parameters
        ----------
        path
            Directory to write.
        overwrite
            Replace an existing model directory at ``path``; otherwise an existing one is an error.

        Returns
        -------
        pathlib.Path
            The directory written.
        """
        config = {"sae": self.config.to_dict(), **self._fitted_config()}
        # under torchrun rank 0 writes and the others wait (an error there is raised everywhere)
        return Path(_dist.run_on_main(save_model_dir, path, self.folded_state(), config, kind=MODEL_KIND,
                                      overwrite=overwrite) or path)

    @classmethod
    def load(cls, path, *, device: str | torch.device = "cpu") -> SAE:
        """Load an SAE saved with :meth:`save`; returns the right variant, in eval mode, on ``device``.

        Parameters
        ----------
        path
            Directory written by :meth:`save`.
        device
            Torch device to put the SAE on.

        Returns
        -------
        SAE
            An instance of the saved variant (:class:`TopKSAE`, ...), with its fitted state. Called on a
            variant class, a file holding another variant raises ``ModelFormatError``.
        """
        tensors, meta = load_model_dir(path, kind=MODEL_KIND)
        try:
            config = SAEConfig.from_dict(meta["sae"]).validate()
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFormatError(f"{path} has an invalid SAE config ({err}); save the model again.") from err
        variant = VARIANTS[config.kind]
        if cls is not SAE and cls is not variant:
            raise ModelFormatError(f"{path} holds a {config.kind!r} SAE; load it with SAE.load or {variant.__name__}.load.")
        model = variant(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        if expected != found:
            raise ModelFormatError(
                f"{path}: stored tensors {found} do not match a {config.kind!r} SAE with d_in={config.d_in}, "
                f"n_latents={config.n_latents} (expected {expected}); the directory mixes files from different models."
            )
        model.load_state_dict(tensors)
        if "is_trained" in meta:
            model._restore_fitted_config(meta)
        else:  # saved before the fitted state: "history" a list of per-epoch dicts, "training" a dict
            model._restore_fitted_config({"is_trained": bool(meta.get("history") or meta.get("training")),
                                          "history": meta.get("history"), "train_summary": meta.get("training")})
        return model.to(device).eval()


# ---------------------------------------------------------------------- variants
class ReLUSAE(SAE):
    """ReLU + L1 (Bricken et al. 2023; the reference's SAE with ``SAEConfig.bias="untied"``).

    Parameters
    ----------
    config
        An :class:`SAEConfig` with ``kind="relu"`` (see :class:`SAE`); ``l1_coef`` weighs the penalty.
    """

    kind = "relu"

    def activate(self, pre):
        """ReLU of the pre-activations.

        Parameters
        ----------
        pre
            Pre-activations, ``(batch, n_latents)``.

        Returns
        -------
        torch.Tensor
            ``relu(pre)``, same shape.
        """
        return torch.relu(pre)

    def sparsity_loss(self, f, pre):
        """L1 penalty of the activations (weighted by the decoder row norms with ``decoder_norm="scale_l1"``).

        Parameters
        ----------
        f
            Training activations, ``(batch, n_latents)``.
        pre
            Pre-activations (unused).

        Returns
        -------
        torch.Tensor
            Scalar: the L1 summed over latents and averaged over the batch (``mse_convention="sum"``), or
            averaged over every entry (``"mean"``).
        """
        weighted = f.abs()
        if self.config.decoder_norm == "scale_l1":
            weighted = weighted * self.W_dec.norm(dim=1)
        if self.config.mse_convention == "mean":
            return weighted.mean()
        return weighted.sum(dim=1).mean()


def _topk_per_sample(pre: torch.Tensor, k: int) -> torch.Tensor:
    values, index = pre.topk(k, dim=1, sorted=False)
    return torch.zeros_like(pre).scatter(1, index, torch.relu(values))


class _AuxK:
    """The AuxK loss of Gao et al. (2024), for the TopK variants."""

    def auxiliary_loss(self, pre, x_n, x_hat, dead):
        """Reconstruct the residual with the ``k_aux`` largest dead latents, normalised by its variance and
        weighted by ``auxk_alpha * min(n_dead / k_aux, 1)``.

        No host synchronisation on an accelerator: live latents are masked to ``-inf`` (their ReLU is 0), so
        the top ``min(k_aux, n_latents)`` holds every dead latent that would have been picked and zeros
        otherwise, and the weight is a tensor (0 when nothing is dead). On the CPU, where a host read is free,
        nothing dead skips the computation (``None``; the same training either way).
        """
        cfg = self.config
        if not cfg.auxk_alpha > 0:
            return None
        if pre.device.type == "cpu" and not bool(dead.any()):
            return None  # on the CPU reading a flag costs nothing and skips the work (the result is the same)
        k_aux_cfg = cfg.effective_k_aux()
        masked = pre.masked_fill(~dead, float("-inf"))
        values, index = masked.topk(min(k_aux_cfg, pre.shape[1]), dim=1, sorted=False)
        f_aux = torch.zeros_like(pre).scatter(1, index, torch.relu(values))
        residual = (x_n - x_hat).detach()  # the aux latents fit what the live ones miss, not the reverse
        residual_hat = f_aux @ self.W_dec
        denom = (residual - residual.mean(0)).pow(2).sum(1).mean().clamp_min(1e-12)
        aux = (residual_hat - residual).pow(2).sum(1).mean() / denom
        weight = (dead.sum().double() / k_aux_cfg).clamp(max=1.0) * cfg.auxk_alpha
        return aux * weight.to(aux.dtype)


class TopKSAE(_AuxK, SAE):
    """TopK (Gao et al. 2024): the ``k`` largest pre-activations per sample, ReLU'd; no sparsity penalty.

    Parameters
    ----------
    config
        An :class:`SAEConfig` with ``kind="topk"``, ``k`` set and ``decoder_norm="unit"`` (see :class:`SAE`).
    """

    kind = "topk"

    def activate(self, pre):
        """Keep each sample's ``k`` largest pre-activations (ReLU'd), zero the rest.

        Parameters
        ----------
        pre
            Pre-activations, ``(batch, n_latents)``.

        Returns
        -------
        torch.Tensor
            Activations with at most ``k`` non-zeros per row, same shape.
        """
        return _topk_per_sample(pre, self.config.k)


class BatchTopKSAE(_AuxK, SAE):
    """BatchTopK (Bussmann et al. 2024): during training the ``k * batch`` largest activations of the whole
    batch are kept, so L0 varies per sample with mean ``k``; at inference each latent fires above a
    threshold calibrated on the training data (``threshold``, per latent, in normalised units).

    Parameters
    ----------
    config
        An :class:`SAEConfig` with ``kind="batchtopk"`` and ``k`` set (see :class:`SAE`).
    """

    kind = "batchtopk"

    def __init__(self, config: SAEConfig) -> None:
        super().__init__(config)
        self.register_buffer("threshold", torch.zeros(config.n_latents))

    def _reset_variant_parameters(self) -> None:
        if hasattr(self, "threshold"):
            self.threshold.zero_()

    def activate(self, pre):
        """Inference activation: ``relu(pre)`` where ``pre`` exceeds the calibrated ``threshold``, else 0.

        Parameters
        ----------
        pre
            Pre-activations, ``(batch, n_latents)``.

        Returns
        -------
        torch.Tensor
            Activations, same shape (L0 varies per sample).
        """
        return torch.relu(pre) * (pre > self.threshold)

    def activate_train(self, pre):
        """Training activation: the ``k * batch`` largest ReLU'd pre-activations of the whole batch.

        Parameters
        ----------
        pre
            Pre-activations, ``(batch, n_latents)``.

        Returns
        -------
        torch.Tensor
            Activations, same shape, ``k`` non-zeros per sample on average.
        """
        return batch_topk(pre, self.config.k)

    def _fold_variant_state(self, scale):
        return {"threshold": self.threshold.double() * scale}

    # running estimate of the inference threshold during training: the mean over steps of the smallest
    # activation the batch kept (summed on the device, read once per epoch)
    def training_statistics(self, f):
        """The smallest activation the batch kept, for the running estimate of the inference threshold.

        Parameters
        ----------
        f
            Training activations of the batch, ``(batch, n_latents)``.

        Returns
        -------
        dict of str to torch.Tensor
            ``{"threshold_sum": smallest kept activation (0 if none), "threshold_steps": 1.0 or 0.0}``,
            float64 scalars on the device.
        """
        smallest = torch.where(f > 0, f, torch.full_like(f, float("inf"))).amin()
        kept = torch.isfinite(smallest)
        return {"threshold_sum": torch.where(kept, smallest, torch.zeros_like(smallest)).double(),
                "threshold_steps": kept.double()}

    @torch.no_grad()
    def end_training_epoch(self, sums):
        """Set ``threshold`` to the epoch's mean smallest kept activation (unchanged if no step kept one).

        Parameters
        ----------
        sums
            The epoch's sums of :meth:`training_statistics` (``threshold_sum``, ``threshold_steps``).
        """
        if float(sums["threshold_steps"]) > 0:
            self.threshold.fill_(float(sums["threshold_sum"]) / float(sums["threshold_steps"]))

    @torch.no_grad()
    def after_training(self, batches, reduce_sum):
        """Set the inference threshold to the mean, over training batches (weighted by size), of the smallest
        activation BatchTopK keeps, using the final weights (so inference L0 matches training L0 on average).

        Parameters
        ----------
        batches
            Iterable of this process's full-size training batches, ``(batch, d_in)`` tensors in input units.
        reduce_sum
            Callable summing a CPU tensor over processes (the identity in one process).
        """
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for x in batches:
            kept = self.activate_train(self.pre_activations(self.normalise(x)))
            smallest = torch.where(kept > 0, kept, torch.full_like(kept, float("inf"))).amin()
            found = torch.isfinite(smallest).double()
            total += torch.stack([torch.where(found > 0, smallest.double(), 0.0) * x.shape[0], found * x.shape[0]])
        total = reduce_sum(total.cpu())
        if float(total[1]) > 0:
            self.threshold.fill_(float(total[0]) / float(total[1]))


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k * batch`` largest ReLU'd pre-activations of the whole batch, zero the rest."""
    flat = torch.relu(pre).flatten()
    n_keep = min(k * pre.shape[0], flat.numel())
    values, index = flat.topk(n_keep, sorted=False)
    return torch.zeros_like(flat).scatter(0, index, values).view_as(pre)


class _JumpReLUFunction(torch.autograd.Function):
    """``pre * 1[pre > theta]`` with the straight-through threshold gradient of Rajamanoharan et al. (2024):
    d/dtheta = -(theta / eps) * K((pre - theta) / eps), K the unit rectangle kernel."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        grad_pre = grad * (pre > threshold)
        grad_threshold = (grad * -(threshold / eps) * kernel).sum(dim=0)
        return grad_pre, grad_threshold, None


class _StepFunction(torch.autograd.Function):
    """``1[pre > theta]`` with d/dtheta = -(1 / eps) * K((pre - theta) / eps) and no gradient to ``pre``."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        return None, (grad * -(1.0 / eps) * kernel).sum(dim=0), None


class JumpReLUSAE(SAE):
    """JumpReLU (Rajamanoharan et al. 2024): a learned threshold per latent and an L0 penalty trained with
    straight-through estimators. With ``k`` set, the penalty is ``(L0 / k - 1)^2`` (a target L0, as in
    dictionary_learning); otherwise it is the L0 itself.

    Parameters
    ----------
    config
        An :class:`SAEConfig` with ``kind="jumprelu"`` (see :class:`SAE`); thresholds start at
        ``jumprelu_threshold_init``.
    """

    kind = "jumprelu"

    def __init__(self, config: SAEConfig) -> None:
        super().__init__(config)
        self.log_threshold = nn.Parameter(torch.full((config.n_latents,), math.log(config.jumprelu_threshold_init)))

    def _reset_variant_parameters(self) -> None:
        if hasattr(self, "log_threshold"):
            self.log_threshold.data.fill_(math.log(self.config.jumprelu_threshold_init))

    @torch.no_grad()
    def init_variant_from_sample(self, x_n):
        """With a target L0 ``k``: each latent's threshold at its ``1 - k / n_latents`` quantile on the sample.

        Without ``k`` nothing changes. Thresholds are clamped below at ``jumprelu_threshold_init``.

        Parameters
        ----------
        x_n
            Sample of normalised training rows, ``(n_sample, d_in)``.
        """
        cfg = self.config
        if cfg.k is None:
            return
        rank = min(len(x_n), max(1, int(math.ceil((1.0 - cfg.k / cfg.n_latents) * len(x_n)))))
        x_in = x_n - self.b_dec if cfg.bias == "tied" else x_n
        for start in range(0, cfg.n_latents, 1024):  # latent chunks keep (sample x chunk) small
            sl = slice(start, start + 1024)
            pre = x_in @ self.W_enc[sl].T + self.b_enc[sl]
            q = pre.kthvalue(rank, dim=0).values
            self.log_threshold[sl] = q.clamp_min(cfg.jumprelu_threshold_init).log()

    @torch.no_grad()
    def scale_encoder_(self, scale):
        """Multiply the encoder by ``scale`` and the thresholds along with it (the activation scales exactly).

        Parameters
        ----------
        scale
            Positive factor.
        """
        super().scale_encoder_(scale)
        self.log_threshold.add_(math.log(scale))

    @property
    def threshold(self) -> torch.Tensor:
        """Per-latent thresholds ``exp(log_threshold)``, ``(n_latents,)``, in normalised units."""
        return self.log_threshold.exp()

    def activate(self, pre):
        """JumpReLU: ``pre`` where it exceeds the latent's threshold, else 0 (straight-through gradient
        to the threshold).

        Parameters
        ----------
        pre
            Pre-activations, ``(batch, n_latents)``.

        Returns
        -------
        torch.Tensor
            Activations, same shape.
        """
        return _JumpReLUFunction.apply(pre, self.threshold, self.config.jumprelu_bandwidth)

    def sparsity_loss(self, f, pre):
        """L0 penalty (number of active latents per sample, mean over the batch), with a straight-through
        gradient to the thresholds.

        Parameters
        ----------
        f
            Training activations (unused).
        pre
            Pre-activations, ``(batch, n_latents)``.

        Returns
        -------
        torch.Tensor
            Scalar: ``(L0 / k - 1)^2`` with a target ``k``; otherwise L0, divided by ``n_latents`` with
            ``mse_convention="mean"``.
        """
        l0 = _StepFunction.apply(pre, self.threshold, self.config.jumprelu_bandwidth).sum(dim=1).mean()
        if self.config.k is not None:
            return (l0 / self.config.k - 1.0) ** 2
        if self.config.mse_convention == "mean":
            return l0 / self.n_latents
        return l0

    def _fold_variant_state(self, scale):
        return {"log_threshold": self.log_threshold.double() + scale.log()}


VARIANTS: dict[str, type[SAE]] = {cls.kind: cls for cls in (ReLUSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE)}


def make_sae(config: SAEConfig) -> SAE:
    """A freshly initialised SAE of ``config.kind``.

    Parameters
    ----------
    config
        An :class:`SAEConfig` with ``d_in`` and ``n_latents`` set (aliases of ``kind`` are accepted).

    Returns
    -------
    SAE
        An untrained instance of the variant class (:data:`VARIANTS`), weights initialised with seed 0.
    """
    return VARIANTS[canonical_kind(config.kind)](config)


def _check_batch_size(batch_size: int) -> int:
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    return int(batch_size)
