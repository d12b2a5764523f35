"""How many training samples an encoder and a decoder need to be well-specified.

The counting argument of Schuster & Krogh (2021, "A manifold learning perspective on representation
learning"), section 2, as reconstructed in ``research/manifold.md`` section 3. With ``n`` data
dimensions, ``m`` latent dimensions and ``N`` training samples:

- an **encoder** with ``W_E`` weights is fitted to one ``m``-dimensional output per sample, so the
  data give ``N * m`` constraints and it needs ``N >= W_E / m`` samples;
- a **decoder** trained with free per-sample representations gets ``n`` equations per sample but
  each sample also adds ``m`` unknowns (its representation), so ``N * n >= W_D + N * m``, i.e.
  ``N >= W_D / (n - m)``.

Because ``n >> m`` for images and expression data, the decoder is pinned down by roughly ``n / m``
times fewer samples than an encoder of similar size. "Weights" here means every trainable scalar
(biases included); pass ``trainable_only=False`` to also count frozen parameters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from torch import nn

__all__ = [
    "SampleCounts",
    "count_parameters",
    "encoder_samples_needed",
    "decoder_samples_needed",
    "sample_counts",
]


def count_parameters(module: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of scalar parameters of ``module`` (only those with ``requires_grad`` by default).

    Parameters shared between submodules are counted once (``module.parameters()`` de-duplicates).

    Parameters
    ----------
    module
        A ``torch.nn.Module``.
    trainable_only
        Count only parameters with ``requires_grad``.

    Returns
    -------
    int
        The number of scalar parameters.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"Expected a torch.nn.Module, got {type(module).__name__}.")
    return int(sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only))


def _check_dims(n_features: int, n_latent: int) -> None:
    if int(n_latent) < 1:
        raise ValueError(f"n_latent must be a positive integer, got {n_latent}.")
    if int(n_features) < 1:
        raise ValueError(f"n_features (the data dimension) must be a positive integer, got {n_features}.")


def encoder_samples_needed(n_encoder_params: int, n_latent: int) -> int:
    """Smallest ``N`` with ``N * n_latent >= n_encoder_params``: ``ceil(W_E / m)``."""
    _check_dims(1, n_latent)
    if n_encoder_params < 0:
        raise ValueError(f"n_encoder_params must be non-negative, got {n_encoder_params}.")
    return math.ceil(int(n_encoder_params) / int(n_latent))


def decoder_samples_needed(n_decoder_params: int, n_features: int, n_latent: int) -> int:
    """Smallest ``N`` with ``N * n_features >= n_decoder_params + N * n_latent``: ``ceil(W_D / (n - m))``.

    Raises a ValueError when ``n_features <= n_latent``: every sample then adds at least as many
    unknowns as equations, so no number of samples specifies the decoder.
    """
    _check_dims(n_features, n_latent)
    if n_decoder_params < 0:
        raise ValueError(f"n_decoder_params must be non-negative, got {n_decoder_params}.")
    if n_features <= n_latent:
        raise ValueError(
            f"The data dimension ({n_features}) must exceed the latent dimension ({n_latent}) for a decoder with "
            "free representations to be specified by data; use a smaller n_latent."
        )
    return math.ceil(int(n_decoder_params) / (int(n_features) - int(n_latent)))


@dataclass(frozen=True)
class SampleCounts:
    """Result of :func:`sample_counts`.

    Attributes
    ----------
    n_features, n_latent
        Data dimension ``n`` and representation dimension ``m``.
    encoder_params, decoder_params
        ``W_E`` and ``W_D`` (``None`` when that module was not given).
    encoder_samples, decoder_samples
        Samples needed: ``ceil(W_E / m)`` and ``ceil(W_D / (n - m))`` (``None`` when not given).
    """

    n_features: int
    n_latent: int
    encoder_params: int | None
    decoder_params: int | None
    encoder_samples: int | None
    decoder_samples: int | None

    @property
    def ratio(self) -> float | None:
        """How many times more samples the encoder needs than the decoder."""
        if self.encoder_samples is None or not self.decoder_samples:
            return None
        return self.encoder_samples / self.decoder_samples

    def to_dict(self) -> dict:
        """The fields and the ratio as a plain dict (e.g. for JSON).

        Returns
        -------
        dict
            Every field plus ``ratio``.
        """
        return asdict(self) | {"ratio": self.ratio}

    def __str__(self) -> str:
        parts = [f"n={self.n_features}, m={self.n_latent}"]
        if self.encoder_params is not None:
            parts.append(f"encoder: {self.encoder_params:,} weights -> N >= {self.encoder_samples:,}")
        if self.decoder_params is not None:
            parts.append(f"decoder: {self.decoder_params:,} weights -> N >= {self.decoder_samples:,}")
        return "; ".join(parts)


def _infer_latent(encoder: nn.Module | None, decoder: nn.Module | None) -> int:
    for module, attrs in ((decoder, ("n_latent", "n_in")), (encoder, ("n_latent", "n_out"))):
        for attr in attrs:
            value = getattr(module, attr, None) if module is not None else None
            if isinstance(value, int):
                return value
    raise ValueError("Could not tell the latent dimension from the modules; pass n_latent=.")


def sample_counts(encoder: nn.Module | None = None, decoder: nn.Module | None = None, *, n_features: int,
                  n_latent: int | None = None, trainable_only: bool = True) -> SampleCounts:
    """Samples needed to well-specify an encoder and a decoder (Schuster & Krogh 2021, section 2).

    Parameters
    ----------
    encoder, decoder
        Torch modules (either may be ``None``). Their parameters are counted with
        :func:`count_parameters`.
    n_features
        Data dimension ``n`` (pixels, genes).
    n_latent
        Representation dimension ``m``. ``None`` reads it from ``decoder.n_latent``/``decoder.n_in``
        or ``encoder.n_latent``/``encoder.n_out`` (the dgdlens MLP and conv modules have them).
    trainable_only
        Count only parameters with ``requires_grad`` (frozen layers are not fitted to the data).

    Returns
    -------
    SampleCounts

    Examples
    --------
    >>> from dgdlens.nn.conv import conv_encoder, conv_decoder
    >>> sample_counts(conv_encoder((28, 28), 20), conv_decoder(20, (28, 28)), n_features=784)
    ... # doctest: +SKIP
    SampleCounts(n_features=784, n_latent=20, encoder_params=129428, decoder_params=132481,
                 encoder_samples=6472, decoder_samples=174)
    """
    if encoder is None and decoder is None:
        raise ValueError("Pass an encoder, a decoder or both.")
    m = _infer_latent(encoder, decoder) if n_latent is None else int(n_latent)
    _check_dims(n_features, m)
    w_e = None if encoder is None else count_parameters(encoder, trainable_only=trainable_only)
    w_d = None if decoder is None else count_parameters(decoder, trainable_only=trainable_only)
    return SampleCounts(
        n_features=int(n_features),
        n_latent=m,
        encoder_params=w_e,
        decoder_params=w_d,
        encoder_samples=None if w_e is None else encoder_samples_needed(w_e, m),
        decoder_samples=None if w_d is None else decoder_samples_needed(w_d, int(n_features), m),
    )
