"""One configuration dataclass shared by every SAE variant, and the ``paper`` preset.

The config holds both the architecture (what a saved model needs to rebuild itself) and the training
hyperparameters (so that a saved model records how it was made). Every field is validated in
:meth:`SAEConfig.validate`, which names the bad field and says what to pass instead.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

__all__ = ["SAEConfig", "KINDS", "paper_config", "PRESETS"]

#: The SAE variants, by the name used in ``train_sae(kind=...)`` and in saved configs.
KINDS = ("relu", "topk", "batchtopk", "jumprelu")
_ALIASES = {"relu_l1": "relu", "l1": "relu", "standard": "relu", "batch_topk": "batchtopk", "jump_relu": "jumprelu"}


def canonical_kind(kind: str) -> str:
    """Map accepted spellings (``"relu_l1"``, ``"batch_topk"``, ...) to one of :data:`KINDS`."""
    if not isinstance(kind, str):
        raise ValueError(f"kind must be a string, one of {KINDS}; got {kind!r}.")
    name = _ALIASES.get(kind.lower(), kind.lower())
    if name not in KINDS:
        raise ValueError(f"Unknown SAE kind {kind!r}; choose one of {KINDS}.")
    return name


@dataclass
class SAEConfig:
    """Architecture and training hyperparameters of a sparse autoencoder.

    The architecture settings (what a saved model needs to rebuild itself) are listed under Parameters,
    the training hyperparameters under Other Parameters. Every field is a keyword of the constructor and
    an attribute of the same name; :meth:`validate` checks them.

    Parameters
    ----------
    kind
        ``"relu"`` (ReLU + L1), ``"topk"``, ``"batchtopk"`` (TopK over the whole batch during training,
        a per-latent threshold at inference) or ``"jumprelu"`` (learned thresholds, L0 penalty).
    d_in, n_latents
        Input dimension and dictionary width. ``d_in`` is set from the data by ``train_sae``.
    k
        Active latents per sample for ``topk`` and ``batchtopk`` (mean over the batch for the latter);
        for ``jumprelu`` an optional target L0 (the sparsity loss is then ``coef * (L0/k - 1)^2``).
    bias
        ``"tied"``: the decoder bias ``b_dec`` is subtracted from the input before encoding and added
        after decoding (Bricken/OpenAI/SAELens). ``"untied"``: two independent biases, encoder
        ``W_enc x + b_enc`` and decoder ``W_dec^T f + b_dec`` (the reference's single-cell SAE).
    decoder_norm
        ``"unit"``: decoder rows are kept at unit L2 norm (gradient projected, rows renormalised after
        every step). ``"scale_l1"``: no constraint, the L1 penalty of latent i is multiplied by
        ``||W_dec[i]||`` (SAELens v6). ``"none"``: no constraint, plain L1 (the reference; it lets the
        model shrink decoder rows and inflate activations). Only ``"unit"`` is allowed for TopK variants,
        whose selection would otherwise depend on the decoder norms.
    normalize
        Input normalisation used during training, folded into the weights afterwards:
        ``"center_scale"`` subtracts the mean and divides by one scalar so that ``E||x - mean||^2 = d_in``;
        ``"scale"`` only divides by the scalar (``E||x||^2 = d_in``); ``"center"`` only subtracts the mean;
        ``"none"`` (the reference). The scaling is one scalar on purpose: it keeps unit-norm decoder rows
        unit-norm in the original input space and does not change which latents TopK selects.
    init
        ``"transpose"``: random unit decoder rows, encoder initialised as the decoder's transpose, zero
        encoder bias. ``"pytorch"``: PyTorch's default ``nn.Linear`` initialisation of both layers and
        their biases (the reference).
    b_dec_init
        ``"geometric_median"`` or ``"mean"`` of (a sample of) the normalised training data, ``"zeros"``,
        or ``"pytorch"`` (only with ``init="pytorch"``).

    Other Parameters
    ----------------
    max_epochs, batch_size, lr, adam_betas, adam_eps
        Passes over the training cells (the learning-rate and sparsity schedules span all of them, also
        when early stopping ends training sooner) and the Adam optimiser settings. ``lr=None`` picks ``2e-4 / sqrt(n_latents / 2**14)`` (sparsify's rule),
        capped at 2e-3.
    lr_warmup, lr_decay
        Fractions of all training steps for a linear learning-rate warm-up from 0 and a linear decay to 0
        at the end.
    l1_coef
        Sparsity coefficient: the L1 weight of ``relu``, the L0 weight of ``jumprelu``.
    l1_warmup
        Fraction of all steps over which the sparsity coefficient ramps up linearly from 0.
    mse_convention
        ``"sum"``: squared error summed over input dimensions, L1 summed over latents, both averaged over
        the batch (SAELens, dictionary_learning). ``"mean"``: both averaged over every entry (the
        reference), which makes the same ``l1_coef`` weaker the wider the dictionary.
    auxk_alpha, k_aux, dead_after
        AuxK loss for TopK variants: a latent is dead when it has not fired on the last ``dead_after``
        training samples (``None``: one epoch); the ``k_aux`` (``None``: ``d_in // 2``) largest dead
        latents reconstruct the residual, weighted by ``auxk_alpha * min(n_dead / k_aux, 1)``.
    jumprelu_bandwidth, jumprelu_threshold_init
        Width of the rectangle kernel of the straight-through estimator and initial threshold, both in
        normalised input units.
    dense_threshold
        A latent firing on more than this fraction of samples is counted as dense.
    grad_clip
        Maximum gradient norm (``None``: no clipping).
    extra
        Free-form settings kept with the config (saved in the model's ``config.json``); the SAE code does
        not read them.
    """

    kind: str = "topk"
    d_in: int | None = None
    n_latents: int | None = None
    k: int | None = None
    bias: str = "tied"
    decoder_norm: str = "unit"
    normalize: str = "center_scale"
    init: str = "transpose"
    b_dec_init: str = "geometric_median"
    # training
    max_epochs: int = 50
    batch_size: int = 256
    lr: float | None = None
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_warmup: float = 0.02
    lr_decay: float = 0.2
    l1_coef: float = 1.0
    l1_warmup: float = 0.05
    mse_convention: str = "sum"
    auxk_alpha: float = 1.0 / 32.0
    k_aux: int | None = None
    dead_after: int | None = None
    jumprelu_bandwidth: float = 0.05
    jumprelu_threshold_init: float = 0.05
    dense_threshold: float = 0.1
    grad_clip: float | None = None
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ helpers
    def replace(self, **changes) -> SAEConfig:
        """A copy with ``changes`` applied (unknown names raise a ValueError).

        Parameters
        ----------
        **changes
            Field names and their new values, e.g. ``k=16, max_epochs=100``.

        Returns
        -------
        SAEConfig
            A new config (not validated); ``self`` is unchanged.
        """
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(
                f"Unknown SAE setting(s) {unknown}; valid settings are {sorted(f.name for f in dataclasses.fields(self))}."
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The config as a JSON-serialisable dict (``adam_betas`` as a list); :meth:`from_dict` inverts it.

        Returns
        -------
        dict
            One entry per field.
        """
        out = dataclasses.asdict(self)
        out["adam_betas"] = list(self.adam_betas)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> SAEConfig:
        """Rebuild a config from :meth:`to_dict`'s output (e.g. a saved model's config).

        Parameters
        ----------
        data
            Field names to values. The old name ``epochs`` is read as ``max_epochs``; any other unknown
            field raises ``ValueError`` (a config written by a newer dgdlens).

        Returns
        -------
        SAEConfig
            The config (not validated).
        """
        names = {f.name for f in dataclasses.fields(cls)} | {"epochs"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Saved SAE config has unknown fields {unknown}; it was written by a newer dgdlens.")
        data = dict(data)
        if "epochs" in data and "max_epochs" not in data:  # configs saved before the rename
            data["max_epochs"] = data.pop("epochs")
        if "adam_betas" in data:
            data["adam_betas"] = tuple(data["adam_betas"])
        return cls(**data)

    def effective_lr(self) -> float:
        """The learning rate training uses: ``lr``, or when it is ``None`` ``2e-4 / sqrt(n_latents / 2**14)``
        capped at 2e-3 (needs ``n_latents``).

        Returns
        -------
        float
            The learning rate.
        """
        if self.lr is not None:
            return float(self.lr)
        return min(2e-3, 2e-4 / math.sqrt(self.n_latents / 2**14))

    def effective_k_aux(self) -> int:
        """The number of dead latents the AuxK loss uses: ``k_aux``, or when it is ``None`` ``d_in // 2``
        (at least 1; needs ``d_in``).

        Returns
        -------
        int
            The AuxK width.
        """
        return int(self.k_aux) if self.k_aux is not None else max(1, self.d_in // 2)

    # ------------------------------------------------------------------ validation
    def validate(self) -> SAEConfig:
        """Check every field; returns ``self`` (with ``kind`` canonicalised) or raises ValueError.

        Validation also normalises in place: ``kind`` aliases (``"relu_l1"``, ``"batch_topk"``, ...) become
        their canonical names, integer-valued fields become ``int`` and ``adam_betas`` a tuple of floats.

        Returns
        -------
        SAEConfig
            ``self``, so that ``SAEConfig(...).validate()`` can be chained.
        """
        self.kind = canonical_kind(self.kind)
        _check_choice("bias", self.bias, ("tied", "untied"))
        _check_choice("decoder_norm", self.decoder_norm, ("unit", "scale_l1", "none"))
        _check_choice("normalize", self.normalize, ("center_scale", "scale", "center", "none"))
        _check_choice("init", self.init, ("transpose", "pytorch"))
        _check_choice("b_dec_init", self.b_dec_init, ("geometric_median", "mean", "zeros", "pytorch"))
        _check_choice("mse_convention", self.mse_convention, ("sum", "mean"))
        if self.b_dec_init == "pytorch" and self.init != "pytorch":
            raise ValueError("b_dec_init='pytorch' needs init='pytorch'; use 'geometric_median', 'mean' or 'zeros'.")
        for name in ("d_in", "n_latents"):
            value = getattr(self, name)
            if value is None or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
            setattr(self, name, int(value))
        if self.kind in ("topk", "batchtopk"):
            if self.k is None:
                raise ValueError(f"kind={self.kind!r} needs k (active latents per sample), e.g. k=8.")
            if self.decoder_norm != "unit":
                raise ValueError(
                    f"kind={self.kind!r} needs decoder_norm='unit': with free decoder norms the TopK selection "
                    "would depend on them and could not be folded into unit-norm decoder directions."
                )
        if self.k is not None:
            if int(self.k) != self.k or not 1 <= self.k <= self.n_latents:
                raise ValueError(f"k must be an integer in [1, n_latents={self.n_latents}], got {self.k!r}.")
            self.k = int(self.k)
        for name in ("max_epochs", "batch_size"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
            setattr(self, name, int(value))
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number or None (automatic), got {self.lr!r}.")
        for name in ("lr_warmup", "lr_decay", "l1_warmup"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} is a fraction of all training steps and must lie in [0, 1], got {value!r}.")
        if self.lr_warmup + self.lr_decay > 1:
            raise ValueError(f"lr_warmup + lr_decay must not exceed 1 (got {self.lr_warmup} + {self.lr_decay}).")
        for name in ("l1_coef", "auxk_alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
        for name in ("jumprelu_bandwidth", "jumprelu_threshold_init"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}.")
        if not 0 < self.dense_threshold <= 1:
            raise ValueError(f"dense_threshold is a firing rate in (0, 1], got {self.dense_threshold!r}.")
        if self.k_aux is not None and (int(self.k_aux) != self.k_aux or self.k_aux < 1):
            raise ValueError(f"k_aux must be a positive integer or None, got {self.k_aux!r}.")
        if self.dead_after is not None and (int(self.dead_after) != self.dead_after or self.dead_after < 1):
            raise ValueError(f"dead_after must be a positive number of samples or None (one epoch), got {self.dead_after!r}.")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip!r}.")
        betas = tuple(self.adam_betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}.")
        self.adam_betas = (float(betas[0]), float(betas[1]))
        return self


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def paper_config(d_in: int | None = None) -> SAEConfig:
    """The reference SAE (Schuster, single-cell experiments), setting for setting.

    ReLU + L1 with the reference's *mean* convention (MSE averaged over batch x dimensions plus
    ``1e-3 * mean |f|``), Adam at a constant 1e-4, batch 128, 500 epochs, 10,000 latents, untied
    encoder and decoder biases, PyTorch's default ``nn.Linear`` initialisation, no input normalisation,
    no decoder-norm constraint, no warm-up and no dead-latent handling.

    After training, decoder norms are folded into the activations (exact for ReLU) so that ``W_dec``
    has unit rows like every other SAE here; reconstructions are unchanged and activations are the
    reference's multiplied by the norm of their decoder row.

    Parameters
    ----------
    d_in
        Input (embedding) dimension; ``None`` leaves it for ``train_sae`` to set from the data.

    Returns
    -------
    SAEConfig
        The preset (not validated).
    """
    return SAEConfig(
        kind="relu", d_in=d_in, n_latents=10_000, k=None, bias="untied", decoder_norm="none", normalize="none",
        init="pytorch", b_dec_init="pytorch", max_epochs=500, batch_size=128, lr=1e-4, lr_warmup=0.0, lr_decay=0.0,
        l1_coef=1e-3, l1_warmup=0.0, mse_convention="mean", auxk_alpha=0.0,
    )


#: Named presets accepted by ``train_sae(preset=...)``.
PRESETS = {"paper": paper_config}
