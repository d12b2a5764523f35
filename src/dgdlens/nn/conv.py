"""A small convolutional encoder/decoder pair for images stored as flat rows.

Both modules work on the flat layout every likelihood and data loader in dgdlens uses: an image
batch is a ``(n, channels * height * width)`` matrix. The encoder reshapes its input to
``(n, C, H, W)``, applies strided convolutions and a linear map to the latent; the decoder is its
mirror image (linear map, transposed convolutions) and returns flat raw outputs (logits for a
Bernoulli likelihood), so the pair plugs into :class:`~dgdlens.models.DecoderOnly` and
:class:`~dgdlens.models.Autoencoder` exactly like the MLPs.

With ``channels=(64, 64)``, ``kernel_size=4``, ``stride=2``, ``padding=1`` and ``n_latent=20`` on
28x28 images this is the architecture of the MNIST experiment in Schuster & Krogh (2021): two conv
layers with 64 channels and a fully connected layer to a 20-d representation, and the mirrored
decoder (129,428 and 132,481 weights). On sklearn's 8x8 digits the same settings give 8 -> 4 -> 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ConvEncoder", "ConvDecoder", "conv_encoder", "conv_decoder", "conv_output_sizes"]

_ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU, "leaky_relu": nn.LeakyReLU}


def _check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (height, width) or (channels, height, width) with positive sizes, "
                         f"got {tuple(image_shape)}")
    return shape  # type: ignore[return-value]


def conv_output_sizes(size: int, n_layers: int, kernel_size: int, stride: int, padding: int) -> list[int]:
    """Spatial size after each of ``n_layers`` convolutions, starting with the input size.

    Uses the standard formula ``floor((s + 2p - k) / s) + 1``; raises a ValueError when a layer would
    shrink the image to nothing, which tells the user to use fewer layers or a smaller kernel.
    """
    sizes = [int(size)]
    for _ in range(n_layers):
        nxt = (sizes[-1] + 2 * padding - kernel_size) // stride + 1
        if nxt < 1:
            raise ValueError(
                f"{n_layers} convolutions with kernel {kernel_size}, stride {stride}, padding {padding} shrink an "
                f"image side of {size} to nothing (sizes {sizes}); use fewer channels entries or a smaller kernel."
            )
        sizes.append(nxt)
    return sizes


class _ConvShape(nn.Module):
    """The settings and layer sizes a conv encoder and its mirrored decoder share."""

    kind = ""

    def __init__(self, image_shape: Sequence[int], n_latent: int, channels: Sequence[int] = (64, 64), *,
                 kernel_size: int = 4, stride: int = 2, padding: int = 1, activation: str = "relu"):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if n_latent < 1 or not channels:
            raise ValueError("n_latent must be positive and channels must list at least one layer")
        self.image_shape = _check_image_shape(image_shape)
        self.n_latent = int(n_latent)
        self.channels = [int(c) for c in channels]
        self.kernel_size, self.stride, self.padding = int(kernel_size), int(stride), int(padding)
        self.activation = activation
        _, h, w = self.image_shape
        self.heights = conv_output_sizes(h, len(self.channels), self.kernel_size, self.stride, self.padding)
        self.widths = conv_output_sizes(w, len(self.channels), self.kernel_size, self.stride, self.padding)

    @property
    def n_pixels(self) -> int:
        """Values per flat image row, ``channels * height * width``."""
        c, h, w = self.image_shape
        return c * h * w

    def _act(self) -> nn.Module:
        return _ACTIVATIONS[self.activation]()

    def config(self) -> dict:
        """The constructor settings, for saving and rebuilding.

        Returns
        -------
        dict
            ``kind``, ``image_shape`` (``[C, H, W]``), ``n_latent``, ``channels``, ``kernel_size``,
            ``stride``, ``padding`` and ``activation``.
        """
        return {"kind": self.kind, "image_shape": list(self.image_shape), "n_latent": self.n_latent,
                "channels": self.channels, "kernel_size": self.kernel_size, "stride": self.stride,
                "padding": self.padding, "activation": self.activation}


class ConvEncoder(_ConvShape):
    """Flat image rows -> strided convolutions -> linear map to ``n_latent``.

    Parameters
    ----------
    image_shape
        ``(channels, height, width)`` or ``(height, width)`` of one image.
    n_latent
        Representation size.
    channels
        Output channels of each convolution (one entry per layer).
    kernel_size, stride, padding
        Shared by all convolutions.
    activation
        Nonlinearity after every convolution (none after the final linear layer: a linear latent):
        ``"relu"``, ``"elu"``, ``"gelu"``, ``"silu"`` or ``"leaky_relu"``.

    Raises
    ------
    ValueError
        For an unknown activation, ``n_latent < 1``, empty ``channels``, a malformed ``image_shape``, or
        more layers than the image size allows.
    """

    kind = "conv_encoder"

    def __init__(self, image_shape: Sequence[int], n_latent: int, channels: Sequence[int] = (64, 64), *,
                 kernel_size: int = 4, stride: int = 2, padding: int = 1, activation: str = "relu"):
        super().__init__(image_shape, n_latent, channels, kernel_size=kernel_size, stride=stride, padding=padding,
                         activation=activation)
        c = self.image_shape[0]
        layers: list[nn.Module] = []
        for c_in, c_out in zip([c, *self.channels[:-1]], self.channels):
            layers += [nn.Conv2d(c_in, c_out, self.kernel_size, self.stride, self.padding), self._act()]
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(self.channels[-1] * self.heights[-1] * self.widths[-1], self.n_latent)

    @property
    def n_in(self) -> int:
        """Input width: values per flat image row, ``channels * height * width``."""
        return self.n_pixels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode flat image rows.

        Parameters
        ----------
        x
            ``n x (channels * height * width)`` images, flattened in ``(C, H, W)`` order.

        Returns
        -------
        torch.Tensor
            ``n x n_latent`` representations.

        Raises
        ------
        ValueError
            If the rows do not have :attr:`n_in` values.
        """
        if x.shape[-1] != self.n_in:
            raise ValueError(f"ConvEncoder expects rows of {self.n_in} values ({self.image_shape}), got {x.shape[-1]}")
        h = self.convs(x.reshape(-1, *self.image_shape))
        return self.fc(h.flatten(1))


class ConvDecoder(_ConvShape):
    """The mirror of :class:`ConvEncoder`: latent -> linear -> transposed convolutions -> flat raw output.

    ``channels`` are given in the encoder's order (e.g. ``(32, 64)``), so ``ConvDecoder(shape, m, ch)``
    mirrors ``ConvEncoder(shape, m, ch)``. The transposed convolutions get the ``output_padding``
    that restores the exact encoder sizes, so odd sides (28 -> 14 -> 7 -> 3) come back unchanged.
    The output has no activation: it is the likelihood's raw input (logits for Bernoulli).

    Parameters
    ----------
    image_shape
        ``(channels, height, width)`` or ``(height, width)`` of one output image.
    n_latent
        Representation size (input width).
    channels
        The mirrored encoder's output channels per convolution, in the encoder's order.
    kernel_size, stride, padding
        Shared by all transposed convolutions (as in the mirrored encoder).
    activation
        Nonlinearity after the linear layer and after every transposed convolution but the last:
        ``"relu"``, ``"elu"``, ``"gelu"``, ``"silu"`` or ``"leaky_relu"``.

    Raises
    ------
    ValueError
        For an unknown activation, ``n_latent < 1``, empty ``channels``, a malformed ``image_shape``, or
        more layers than the image size allows.
    """

    kind = "conv_decoder"

    def __init__(self, image_shape: Sequence[int], n_latent: int, channels: Sequence[int] = (64, 64), *,
                 kernel_size: int = 4, stride: int = 2, padding: int = 1, activation: str = "relu"):
        super().__init__(image_shape, n_latent, channels, kernel_size=kernel_size, stride=stride, padding=padding,
                         activation=activation)
        c = self.image_shape[0]
        self.fc = nn.Linear(self.n_latent, self.channels[-1] * self.heights[-1] * self.widths[-1])
        rev = list(reversed(self.channels))
        outs = [*rev[1:], c]
        layers: list[nn.Module] = [self._act()]
        n_layers = len(self.channels)
        for i, (c_in, c_out) in enumerate(zip(rev, outs)):
            # sizes run backwards: layer i maps heights[L-i] to heights[L-i-1]
            target_h, target_w = self.heights[n_layers - i - 1], self.widths[n_layers - i - 1]
            src_h, src_w = self.heights[n_layers - i], self.widths[n_layers - i]
            pad_h = target_h - ((src_h - 1) * self.stride - 2 * self.padding + self.kernel_size)
            pad_w = target_w - ((src_w - 1) * self.stride - 2 * self.padding + self.kernel_size)
            layers.append(nn.ConvTranspose2d(c_in, c_out, self.kernel_size, self.stride, self.padding,
                                             output_padding=(pad_h, pad_w)))
            if i < n_layers - 1:
                layers.append(self._act())
        self.deconvs = nn.Sequential(*layers)

    @property
    def n_out(self) -> int:
        """Output width: values per flat image row, ``channels * height * width``."""
        return self.n_pixels

    @property
    def n_in(self) -> int:
        """Input width: the representation size ``n_latent``."""
        return self.n_latent

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Decode latents to flat raw image rows.

        Parameters
        ----------
        z
            ``n x n_latent`` representations.

        Returns
        -------
        torch.Tensor
            ``n x (channels * height * width)`` raw outputs (no activation), flattened in ``(C, H, W)``
            order.
        """
        h = self.fc(z).reshape(-1, self.channels[-1], self.heights[-1], self.widths[-1])
        return self.deconvs(h).flatten(1)


def conv_encoder(image_shape: Sequence[int], n_latent: int, channels: Sequence[int] = (64, 64), **kwargs) -> ConvEncoder:
    """Build a :class:`ConvEncoder` (paper MNIST defaults: two 64-channel convs, kernel 4, stride 2).

    Parameters
    ----------
    image_shape
        ``(channels, height, width)`` or ``(height, width)`` of one image.
    n_latent
        Representation size.
    channels
        Output channels of each convolution (one entry per layer).
    **kwargs
        ``kernel_size``, ``stride``, ``padding`` and ``activation`` of :class:`ConvEncoder`.

    Returns
    -------
    ConvEncoder
        Maps flat image rows ``n x (C * H * W)`` to ``n x n_latent``.
    """
    return ConvEncoder(image_shape, n_latent, channels, **kwargs)


def conv_decoder(n_latent: int, image_shape: Sequence[int], channels: Sequence[int] = (64, 64), **kwargs) -> ConvDecoder:
    """Build the :class:`ConvDecoder` that mirrors ``conv_encoder(image_shape, n_latent, channels)``.

    The argument order (latent first) matches :func:`~dgdlens.nn.mlp_decoder`.

    Parameters
    ----------
    n_latent
        Representation size.
    image_shape
        ``(channels, height, width)`` or ``(height, width)`` of one output image.
    channels
        The mirrored encoder's channels, in the encoder's order.
    **kwargs
        ``kernel_size``, ``stride``, ``padding`` and ``activation`` of :class:`ConvDecoder`.

    Returns
    -------
    ConvDecoder
        Maps ``n x n_latent`` to flat raw image rows ``n x (C * H * W)`` (e.g. Bernoulli logits).
    """
    return ConvDecoder(image_shape, n_latent, channels, **kwargs)
