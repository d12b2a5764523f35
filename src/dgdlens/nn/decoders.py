"""Decoders (latent -> raw output for a likelihood) and encoders (data -> latent) built from MLPs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["MLP", "mlp_decoder", "mlp_encoder"]

_ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "tanh": nn.Tanh, "leaky_relu": nn.LeakyReLU}


class MLP(nn.Sequential):
    """Linear layers with an activation after every hidden layer and none after the last.

    Stores its own shape (``n_in``, ``hidden``, ``n_out``, ``activation``) so that a saved model can
    rebuild it from its config.

    Parameters
    ----------
    n_in
        Input width (e.g. the latent dimension for a decoder, the number of genes for an encoder).
    n_out
        Output width.
    hidden
        Widths of the hidden layers, in order (empty: one linear layer).
    activation
        ``"relu"``, ``"elu"``, ``"gelu"``, ``"tanh"`` or ``"leaky_relu"``, after every hidden layer.
    dropout
        Dropout probability after every hidden activation (``0``: no dropout layers).

    Raises
    ------
    ValueError
        For an unknown ``activation``.
    """

    def __init__(self, n_in: int, n_out: int, hidden: Sequence[int] = (100, 100, 100), activation: str = "relu",
                 dropout: float = 0.0):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        layers: list[nn.Module] = []
        sizes = [int(n_in), *[int(h) for h in hidden], int(n_out)]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(_ACTIVATIONS[activation]())
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
        super().__init__(*layers)
        self.n_in, self.n_out = int(n_in), int(n_out)
        self.hidden = [int(h) for h in hidden]
        self.activation = activation
        self.dropout = float(dropout)

    def config(self) -> dict:
        """The constructor settings, for saving and rebuilding.

        Returns
        -------
        dict
            ``kind`` (``"mlp"``), ``n_in``, ``n_out``, ``hidden`` (list), ``activation`` and ``dropout``.
        """
        return {"kind": "mlp", "n_in": self.n_in, "n_out": self.n_out, "hidden": self.hidden,
                "activation": self.activation, "dropout": self.dropout}


def mlp_decoder(n_latent: int, n_out: int, hidden: Sequence[int] = (100, 100, 100), activation: str = "relu",
                dropout: float = 0.0) -> MLP:
    """An MLP decoder ``n_latent -> *hidden -> n_out`` (reference DGD: 100-100-100, ReLU).

    Parameters
    ----------
    n_latent
        Latent dimension (input width).
    n_out
        Output width: the number of features (genes), the likelihood's raw input.
    hidden
        Hidden layer widths, from the latent side.
    activation
        ``"relu"``, ``"elu"``, ``"gelu"``, ``"tanh"`` or ``"leaky_relu"``, after every hidden layer.
    dropout
        Dropout probability after every hidden activation.

    Returns
    -------
    MLP
        The decoder, mapping ``n x n_latent`` to ``n x n_out`` raw outputs (no final activation).
    """
    return MLP(n_latent, n_out, hidden, activation, dropout)


def mlp_encoder(n_in: int, n_latent: int, hidden: Sequence[int] = (100, 100, 100), activation: str = "relu",
                dropout: float = 0.0) -> MLP:
    """The mirror of :func:`mlp_decoder`: ``n_in -> *reversed(hidden) -> n_latent``.

    Parameters
    ----------
    n_in
        Input width: the number of features (genes).
    n_latent
        Latent dimension (output width).
    hidden
        Hidden layer widths as given to :func:`mlp_decoder` (latent side first); they are used reversed.
    activation
        ``"relu"``, ``"elu"``, ``"gelu"``, ``"tanh"`` or ``"leaky_relu"``, after every hidden layer.
    dropout
        Dropout probability after every hidden activation.

    Returns
    -------
    MLP
        The encoder, mapping ``n x n_in`` to ``n x n_latent`` (linear last layer).
    """
    return MLP(n_in, n_latent, list(reversed(list(hidden))), activation, dropout)
