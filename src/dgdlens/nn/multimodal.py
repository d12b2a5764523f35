"""Several modalities (RNA, chromatin accessibility, surface proteins) decoded from one latent.

multiDGD's design (see ``shared/research/dgd.md`` sections 1.2-1.3): a shared trunk of hidden layers reads
the latent (and the covariate inputs), then one head per modality maps the trunk's output to that
modality's features, each with its own likelihood scaled by the cell's library size *in that modality*.

The modalities' features sit side by side in one output vector (``features = sum of the modalities'``),
so everything built for one likelihood (the training plan, held-out inference, candidate scoring)
works unchanged; :class:`MultiModalLikelihood` splits the vector, scores each block with its own
likelihood and per-cell library (``scale`` is ``cells x modalities``) and adds them with per-modality
weights.

A cell without data in a modality (library 0 there: a cell absent from that modality of a MuData, or
new cells with one modality only) contributes nothing for it, so unimodal cells are embedded from the
modality they have. :meth:`MultiModalLikelihood.observe` restricts the loss to a subset of each
modality's features (new data measured on fewer peaks): the compositions are renormalised over the
features present, as the library then counts only those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .decoders import _ACTIVATIONS, MLP
from .likelihoods import (Likelihood, NegativeBinomial, _nb_constant_terms, _nb_mean_terms, make_likelihood,
                          nb_log_prob)

__all__ = ["MultiHeadDecoder", "MultiModalLikelihood"]


class MultiHeadDecoder(nn.Module):
    """A shared trunk and one output head per modality; outputs concatenated in modality order.

    Parameters
    ----------
    n_in
        Input width (latent + covariate inputs).
    sizes
        Number of features of each modality, in order.
    hidden
        Widths of the trunk's layers (each followed by the activation).
    head_hidden
        Widths of each head's hidden layers before its output layer (``()``: one linear layer from the
        trunk to the features). The last layer of a wide modality (100k peaks) dominates the cost: its
        weights are ``width x features``, so a head's last width stays modest (multiDGD used
        ``max(100, sqrt(features))``; we keep the given widths).
    activation
        Activation after every hidden layer (``"relu"``, ``"elu"``, ``"gelu"``, ``"tanh"``, ``"leaky_relu"``).
    """

    def __init__(self, n_in: int, sizes: Sequence[int], hidden: Sequence[int] = (100, 100, 100),
                 head_hidden: Sequence[int] = (100,), activation: str = "relu") -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if not hidden:
            raise ValueError("The multi-head decoder needs at least one shared hidden layer (hidden=...).")
        self.n_in = int(n_in)
        self.sizes = [int(s) for s in sizes]
        self.hidden = [int(h) for h in hidden]
        self.head_hidden = [int(h) for h in head_hidden]
        self.activation = activation
        # the trunk's last layer is activated too: MLP leaves its output linear, so add the activation
        self.trunk = nn.Sequential(MLP(self.n_in, self.hidden[-1], self.hidden[:-1], activation),
                                   _ACTIVATIONS[activation]())
        self.heads = nn.ModuleList(MLP(self.hidden[-1], size, self.head_hidden, activation) for size in self.sizes)

    def forward(self, z: torch.Tensor, head: int | None = None) -> torch.Tensor:
        """Raw outputs of every head, concatenated: ``n x sum(sizes)``; or of one head only.

        Parameters
        ----------
        z
            Decoder input, ``n x n_in``.
        head
            Index of the one modality to decode (the others' wide layers are not computed); ``None``: all.

        Returns
        -------
        torch.Tensor
            ``n x sum(sizes)``, or ``n x sizes[head]``.
        """
        h = self.trunk(z)
        if head is not None:
            return self.heads[head](h)
        return torch.cat([one(h) for one in self.heads], dim=1)

    def config(self) -> dict:
        """The constructor settings, for saving and rebuilding.

        Returns
        -------
        dict
            ``kind`` (``"multihead"``), ``n_in``, ``sizes``, ``hidden``, ``head_hidden``, ``activation``.
        """
        return {"kind": "multihead", "n_in": self.n_in, "sizes": self.sizes, "hidden": self.hidden,
                "head_hidden": self.head_hidden, "activation": self.activation}


class MultiModalLikelihood(Likelihood):
    """One likelihood per modality over blocks of the feature axis, each with its own library size.

    Parameters
    ----------
    likelihoods
        One :class:`~dgdlens.nn.Likelihood` per modality (negative binomial, Poisson, binary), each built
        for its modality's number of features (``n_features``).
    names
        The modalities' names, in order (e.g. ``["rna", "atac"]``).
    weights
        Loss weight of each modality (default 1 each): the NLL is ``sum_m w_m * NLL_m``. Weights change
        the balance of training, not the reported per-modality likelihoods.

    Notes
    -----
    ``scale`` is ``cells x modalities``: each cell's library size in each modality. A library of 0 marks
    the modality as missing for that cell, and it then adds nothing to the NLL.
    """

    name = "multimodal"
    needs_scale = True

    def __init__(self, likelihoods: Sequence[Likelihood], names: Sequence[str], weights: Sequence[float] | None = None):
        super().__init__()
        if len(likelihoods) != len(names) or not likelihoods:
            raise ValueError("Give one likelihood per modality name (at least one).")
        sizes = [getattr(lik, "n_features", None) for lik in likelihoods]
        if any(s is None for s in sizes):
            raise ValueError("Every modality's likelihood needs its n_features.")
        self.likelihoods = nn.ModuleList(likelihoods)
        self.names = [str(n) for n in names]
        self.sizes = [int(s) for s in sizes]
        weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
        if len(weights) != len(names) or any(not np.isfinite(w) or w < 0 for w in weights):
            raise ValueError(f"weights must be one finite value >= 0 per modality, got {weights}.")
        self.weights = weights
        # a buffer, so it moves with the module: a tensor built per loss call is a host-to-GPU copy that
        # waits for the GPU every step (not saved: config() holds the weights)
        self.register_buffer("_weight_vector", torch.tensor(weights, dtype=torch.float32), persistent=False)
        self.n_features = sum(self.sizes)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).tolist()
        self._observed: list[np.ndarray | None] | None = None
        self._observed_on: dict[tuple[int, torch.device], torch.Tensor] = {}  # observed columns, per device

    def config(self) -> dict:
        """The constructor settings, for saving; :meth:`from_config` rebuilds it.

        Returns
        -------
        dict
            ``name`` (``"multimodal"``), ``names``, ``weights`` and each modality's likelihood config.
        """
        return {"name": self.name, "names": self.names, "weights": self.weights,
                "likelihoods": [lik.config() for lik in self.likelihoods]}

    @classmethod
    def from_config(cls, config: dict) -> MultiModalLikelihood:
        """Rebuild from :meth:`config`.

        Parameters
        ----------
        config
            A dict written by :meth:`config`.

        Returns
        -------
        MultiModalLikelihood
            With fresh parameters (load the state dict for the learned ones).
        """
        parts = [make_likelihood(c, c["n_features"]) for c in config["likelihoods"]]
        return cls(parts, config["names"], config.get("weights"))

    # ------------------------------------------------------------------ feature subsets
    @contextlib.contextmanager
    def observe(self, columns: Sequence[np.ndarray | None] | None):
        """Within the block, data carry only some features: ``columns[m]`` are the indices (within modality
        ``m``, increasing) of the features present, ``None`` for all. ``x`` then has the present features
        of every modality side by side, and each modality's composition is renormalised over its present
        features (the library counts only those).

        Parameters
        ----------
        columns
            One index array (or ``None``) per modality; ``None`` altogether: every feature.

        Yields
        ------
        None
        """
        if columns is not None and len(columns) != len(self.names):
            raise ValueError(f"observe() needs one column selection per modality ({len(self.names)}).")
        previous, self._observed = self._observed, (None if columns is None else
                                                    [None if c is None else np.asarray(c, np.int64) for c in columns])
        previous_on, self._observed_on = self._observed_on, {}
        try:
            yield
        finally:
            self._observed, self._observed_on = previous, previous_on

    def _observed_index(self, m: int, device: torch.device) -> torch.Tensor | None:
        """Modality ``m``'s observed columns as an index tensor on ``device``, copied there once per
        :meth:`observe` block rather than once per loss call."""
        if self._observed is None or self._observed[m] is None:
            return None
        key = (m, device)
        if key not in self._observed_on:
            self._observed_on[key] = torch.as_tensor(self._observed[m], device=device)
        return self._observed_on[key]

    def _x_offsets(self) -> list[int]:
        if self._observed is None:
            return self.offsets
        sizes = [s if c is None else len(c) for s, c in zip(self.sizes, self._observed)]
        return np.concatenate([[0], np.cumsum(sizes)]).tolist()

    def split_output(self, out: torch.Tensor) -> list[torch.Tensor]:
        """The decoder output's block of each modality (views, all features).

        Parameters
        ----------
        out
            ``n x n_features`` decoder output.

        Returns
        -------
        list of torch.Tensor
            ``n x sizes[m]`` per modality.
        """
        return [out[:, a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    @staticmethod
    def _scale_column(scale: torch.Tensor | None, m: int) -> torch.Tensor | None:
        if scale is None:
            return None
        return scale if scale.ndim == 1 else scale[:, m]

    # ------------------------------------------------------------------ likelihood
    def nll_per_modality(self, x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor | None, *,
                         without_constant: bool = False) -> torch.Tensor:
        """Unweighted NLL of each modality, ``n x modalities``; 0 where a cell's library in a modality is 0.

        Parameters
        ----------
        x
            Counts, ``n x features`` (all features, or only those selected by :meth:`observe`).
        out
            Decoder output, ``n x n_features`` (all features).
        scale
            Library sizes, ``n x modalities``.
        without_constant
            Leave out each modality's :meth:`~dgdlens.nn.Likelihood.nll_constant` (for :meth:`nll` given
            the whole constant).

        Returns
        -------
        torch.Tensor
            ``n x modalities``.
        """
        self._check_scale(scale)
        xo = self._x_offsets()
        parts = []
        for m, (lik, out_m) in enumerate(zip(self.likelihoods, self.split_output(out))):
            lib = scale[:, m]
            x_m = x[:, xo[m]:xo[m + 1]]
            # with a constant given for the whole (see nll), a modality that has one leaves it out here
            skip = without_constant and lik.has_nll_constant
            nll = _restricted_nll(lik, x_m, out_m, lib, self._observed_index(m, out.device), skip)
            parts.append(torch.where(lib > 0, nll, torch.zeros_like(nll)))
        return torch.stack(parts, dim=1)

    def _check_scale(self, scale) -> None:
        if scale is None or scale.ndim != 2 or scale.shape[1] != len(self.names):
            raise ValueError(f"A multi-modal likelihood needs each cell's library size per modality (cells x "
                             f"{len(self.names)}).")

    def nll(self, x, out, scale=None, constant=None):
        """Weighted sum over modalities of each modality's NLL (see :meth:`nll_per_modality`).

        Parameters
        ----------
        x
            Counts, ``n x features``.
        out
            Decoder output, ``n x n_features``.
        scale
            Library sizes, ``n x modalities``.
        constant
            :meth:`nll_constant` of the same ``x`` and ``scale`` (under the same :meth:`observe` block and
            parameters), or ``None``: the modalities that have one then compute only their other terms.

        Returns
        -------
        torch.Tensor
            ``(n,)``.
        """
        per = self.nll_per_modality(x, out, scale, without_constant=constant is not None)
        total = per.sum(1) if all(w == 1.0 for w in self.weights) else per @ self._weight_vector.to(per.dtype)
        return total if constant is None else total + constant

    def nll_constant(self, x, scale=None):
        """The weighted sum over modalities of each one's :meth:`~dgdlens.nn.Likelihood.nll_constant`
        (0 for a modality without one, or where the cell has no library); ``None`` when no modality has one.

        Parameters
        ----------
        x
            Counts, ``n x features`` (as for :meth:`nll`).
        scale
            Library sizes, ``n x modalities``.

        Returns
        -------
        torch.Tensor or None
            ``(n,)``.
        """
        self._check_scale(scale)
        xo = self._x_offsets()
        total = None
        for m, (lik, w) in enumerate(zip(self.likelihoods, self.weights)):
            idx = self._observed_index(m, x.device)
            if isinstance(lik, NegativeBinomial) and idx is not None and lik.log_r().shape[1] > 1:
                log_r = lik.log_r().index_select(1, idx)  # the dispersion of the observed features only
                const = -_nb_constant_terms(x[:, xo[m]:xo[m + 1]], log_r).sum(-1)
            else:
                const = lik.nll_constant(x[:, xo[m]:xo[m + 1]], scale[:, m])
            if const is None:
                continue
            const = torch.where(scale[:, m] > 0, const, torch.zeros_like(const)) * w
            total = const if total is None else total + const
        return total

    def mean(self, out, scale=None):
        """Each modality's mean (its likelihood's :meth:`~dgdlens.nn.Likelihood.mean`), concatenated. With
        ``scale=None`` each modality's composition (its block sums to 1 per cell).

        Parameters
        ----------
        out
            Decoder output, ``n x n_features``.
        scale
            Library sizes ``n x modalities``, or ``None``.

        Returns
        -------
        torch.Tensor
            ``n x n_features``.
        """
        return torch.cat([lik.mean(o, self._scale_column(scale, m))
                          for m, (lik, o) in enumerate(zip(self.likelihoods, self.split_output(out)))], dim=1)

    @torch.no_grad()
    def sample(self, out, scale=None, generator=None):
        """One draw per entry from each modality's likelihood, concatenated.

        Parameters
        ----------
        out
            Decoder output, ``n x n_features``.
        scale
            Library sizes ``n x modalities``.
        generator
            Torch random generator (``None``: the global one).

        Returns
        -------
        torch.Tensor
            ``n x n_features`` draws.
        """
        return torch.cat([lik.sample(o, self._scale_column(scale, m), generator=generator)
                          for m, (lik, o) in enumerate(zip(self.likelihoods, self.split_output(out)))], dim=1)


def _restricted_nll(lik: Likelihood, x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor,
                    idx: torch.Tensor | None, without_constant: bool = False) -> torch.Tensor:
    """``lik.nll`` on the features ``idx`` only (an index tensor on ``out``'s device): the output
    restricted to them (so a softmax renormalises over them) and a per-feature dispersion taken at them.
    ``without_constant``: only the terms that depend on the output (a zero constant passed on)."""
    zero = torch.zeros(x.shape[0], dtype=out.dtype, device=out.device) if without_constant else None
    if idx is None:
        return lik.nll(x, out, scale) if zero is None else lik.nll(x, out, scale, constant=zero)
    sub = out.index_select(1, idx)
    if isinstance(lik, NegativeBinomial):
        log_r = lik.log_r()
        if log_r.shape[1] > 1:
            log_r = log_r.index_select(1, idx)
        log_mean = lik.log_mean(sub, scale)
        if without_constant:
            return -_nb_mean_terms(x, log_mean, log_r).sum(-1)
        return -nb_log_prob(x, log_mean, log_r).sum(-1)
    return lik.nll(x, sub, scale) if zero is None else lik.nll(x, sub, scale, constant=zero)
