"""Output likelihoods: turn a decoder's raw output into a distribution over the data.

Every likelihood has the same small interface so that any decoder-only model can use any of them:

- ``nll(x, out, scale=None)``: negative log-likelihood per sample, summed over features, shape (n,)
- ``mean(out, scale=None)``: the distribution's mean, shape (n, features)
- ``sample(out, scale=None, generator=None)``: one draw per entry

``out`` is the decoder's last-layer output (no activation), ``scale`` a per-sample factor such as the
library size (only the negative binomial uses it).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "Likelihood",
    "NegativeBinomial",
    "Gaussian",
    "Bernoulli",
    "Poisson",
    "BinaryAccessibility",
    "nb_log_prob",
    "make_likelihood",
]


def nb_log_prob(x: torch.Tensor, log_mean: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """Elementwise log-pmf of a negative binomial with mean ``m`` and shape (number of failures) ``r``.

    Written in log space: ``log(m + r)`` is a logaddexp, so a mean of 1e-30 or 1e6 stays finite and
    there is no epsilon hack. Equals ``scipy.stats.nbinom.logpmf(x, n=r, p=r/(r+m))``.
    Variance is ``m + m^2 / r``.

    Parameters
    ----------
    x
        Counts (non-negative, float dtype), e.g. ``cells x genes``.
    log_mean
        ``log m``, broadcastable against ``x``.
    log_r
        ``log r`` (dispersion; larger r is closer to Poisson), broadcastable against ``x``, e.g. ``1 x genes``.

    Returns
    -------
    torch.Tensor
        The log-probability of every entry, with the broadcast shape of the inputs (not summed).
    """
    r = log_r.exp()
    log_m_plus_r = torch.logaddexp(log_mean, log_r)
    return (
        torch.lgamma(x + r)
        - torch.lgamma(r)
        - torch.lgamma(x + 1.0)
        + x * (log_mean - log_m_plus_r)
        + r * (log_r - log_m_plus_r)
    )


def _nb_constant_terms(x: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """The terms of :func:`nb_log_prob` that do not depend on the mean (elementwise): three ``lgamma``."""
    r = log_r.exp()
    return torch.lgamma(x + r) - torch.lgamma(r) - torch.lgamma(x + 1.0)


def _nb_mean_terms(x: torch.Tensor, log_mean: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """The terms of :func:`nb_log_prob` that depend on the mean (elementwise); with
    :func:`_nb_constant_terms` they add up to it."""
    log_m_plus_r = torch.logaddexp(log_mean, log_r)
    return x * (log_mean - log_m_plus_r) + log_r.exp() * (log_r - log_m_plus_r)


class Likelihood(nn.Module):
    """Base class. Subclasses implement ``nll``, ``mean`` and ``sample``.

    ``name`` identifies the likelihood in saved configs (:func:`make_likelihood`); ``needs_scale`` says
    whether it uses the per-sample ``scale``.
    """

    name: str = "base"
    needs_scale: bool = False

    def nll_constant(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor | None:
        """The part of each sample's NLL that depends neither on ``out`` nor on ``scale``, under the
        likelihood's current parameters; ``None`` where there is none worth computing apart (the default).

        Fitting latents with the model frozen scores the same data many times while only ``out`` changes:
        computed once per batch and passed to ``nll(..., constant=...)``, it spares the terms that cannot
        change (for the negative binomial three ``lgamma`` per entry; ``benchmarks/frozen_inference.py``).
        It is stale once the parameters change, so training does not use it.

        Parameters
        ----------
        x
            Data, ``samples x features``.
        scale
            Per-sample scale factors, or ``None`` (the constant never depends on them; accepted so that a
            likelihood whose data block depends on them, the multi-modal one, can mask).

        Returns
        -------
        torch.Tensor or None
            ``(samples,)``, or ``None``.
        """
        return None

    @property
    def has_nll_constant(self) -> bool:
        """Whether this likelihood splits off an :meth:`nll_constant` (and its ``nll`` takes ``constant``)."""
        return type(self).nll_constant is not Likelihood.nll_constant

    def nll(self, x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Negative log-likelihood of the data under the distribution ``out`` parameterises.

        Parameters
        ----------
        x
            Observed data, ``samples x features``.
        out
            The decoder's raw output (no activation), ``samples x features``.
        scale
            Per-sample scale factors, shape ``(samples,)`` (e.g. library sizes), or ``None``.

        Returns
        -------
        torch.Tensor
            ``(samples,)``: the NLL of each sample, summed over features.
        """
        raise NotImplementedError

    def mean(self, out: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The distribution's mean.

        Parameters
        ----------
        out
            The decoder's raw output, ``samples x features``.
        scale
            Per-sample scale factors, shape ``(samples,)``, or ``None``.

        Returns
        -------
        torch.Tensor
            ``samples x features`` means, in data units.
        """
        raise NotImplementedError

    def sample(self, out, scale=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """One random draw per entry.

        Parameters
        ----------
        out
            The decoder's raw output, ``samples x features``.
        scale
            Per-sample scale factors, shape ``(samples,)``, or ``None``.
        generator
            Torch random generator for reproducible draws (``None``: the global one).

        Returns
        -------
        torch.Tensor
            ``samples x features`` draws.
        """
        raise NotImplementedError

    def config(self) -> dict:
        """The constructor settings, for saving; :func:`make_likelihood` rebuilds the likelihood from it.

        Returns
        -------
        dict
            ``{"name": ...}`` plus the subclass's settings (learned parameters are in the state dict).
        """
        return {"name": self.name}


class NegativeBinomial(Likelihood):
    """Negative binomial counts with mean ``scale * activation(out)`` and learned dispersion.

    Parameters
    ----------
    n_features
        Number of output features (genes).
    activation
        ``"softmax"`` (default): ``out`` becomes a per-cell composition (rows sum to 1) and ``scale`` is
        the library size, so the mean is ``library * composition`` (multiDGD, scVI). ``"softplus"``: the
        reference scDGD HEAD, usually with ``scale`` = max count of the cell. ``"sigmoid"``: the scDGD
        paper version, mean bounded by ``scale`` (max count of the cell).
    dispersion
        ``"gene"`` (one r per feature, the reference) or ``"shared"`` (one r overall).
    r_init
        Initial dispersion r.
    r_min
        The reference uses ``r = exp(log_r) + 1`` so r >= 1; ``r_min=1.0`` reproduces that (default),
        ``r_min=0`` allows over-dispersion beyond r = 1.

    Raises
    ------
    ValueError
        For an unknown ``activation`` or ``dispersion``, or ``r_init <= r_min``.
    """

    name = "nb"
    needs_scale = True

    def __init__(
        self,
        n_features: int,
        *,
        activation: str = "softmax",
        dispersion: str = "gene",
        r_init: float = 2.0,
        r_min: float = 1.0,
    ) -> None:
        super().__init__()
        if activation not in {"softmax", "softplus", "sigmoid"}:
            raise ValueError(f"activation must be 'softmax', 'softplus' or 'sigmoid', got {activation!r}")
        if dispersion not in {"gene", "shared"}:
            raise ValueError(f"dispersion must be 'gene' or 'shared', got {dispersion!r}")
        if r_init <= r_min:
            raise ValueError(f"r_init ({r_init}) must be larger than r_min ({r_min})")
        self.n_features = int(n_features)
        self.activation = activation
        self.dispersion = dispersion
        self.r_init = float(r_init)
        self.r_min = float(r_min)
        size = self.n_features if dispersion == "gene" else 1
        self.log_r_free = nn.Parameter(torch.full((1, size), math.log(r_init - r_min)))

    def config(self) -> dict:
        """The constructor settings, for saving (the learned dispersion is in the state dict).

        Returns
        -------
        dict
            ``name`` (``"nb"``), ``n_features``, ``activation``, ``dispersion``, ``r_init`` and ``r_min``.
        """
        return {
            "name": self.name,
            "n_features": self.n_features,
            "activation": self.activation,
            "dispersion": self.dispersion,
            "r_init": self.r_init,
            "r_min": self.r_min,
        }

    def log_r(self) -> torch.Tensor:
        """Log of the dispersion, ``log(exp(log_r_free) + r_min)``.

        Returns
        -------
        torch.Tensor
            ``1 x n_features`` (``dispersion="gene"``) or ``1 x 1`` (``"shared"``).
        """
        if self.r_min > 0:
            # full_like, not torch.tensor(..., device=...): the latter is a host-to-GPU copy that waits
            # for the GPU, and this runs in every loss call
            return torch.logaddexp(self.log_r_free, torch.full_like(self.log_r_free, math.log(self.r_min)))
        return self.log_r_free

    @property
    def r(self) -> torch.Tensor:
        """The dispersion r (``>= r_min``; variance ``m + m^2 / r``), ``1 x n_features`` or ``1 x 1``."""
        return self.log_r().exp()

    def log_mean(self, out: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """Log of the mean, ``log(scale) + log(activation(out))``, computed in log space.

        Parameters
        ----------
        out
            The decoder's raw output, ``samples x features``.
        scale
            Per-sample scale factors, shape ``(samples,)`` (library size for ``"softmax"``, the cell's
            maximum count for ``"softplus"``/``"sigmoid"``; clamped at 1e-12), or ``None`` for none.

        Returns
        -------
        torch.Tensor
            ``samples x features`` log-means.
        """
        if self.activation == "softmax":
            log_y = F.log_softmax(out, dim=-1)
        elif self.activation == "softplus":
            # log(softplus(out)) computed without underflow for very negative out
            log_y = torch.where(out < -15, out, torch.log(F.softplus(out).clamp_min(1e-30)))
        else:
            log_y = F.logsigmoid(out)
        if scale is None:
            return log_y
        return log_y + torch.log(scale.reshape(-1, 1).clamp_min(1e-12))

    def nll_constant(self, x, scale=None):
        """``-sum lgamma(x + r) - lgamma(r) - lgamma(x + 1)`` per sample (see
        :meth:`Likelihood.nll_constant <dgdlens.nn.Likelihood.nll_constant>`).

        Parameters
        ----------
        x
            Counts, ``samples x features`` (float dtype).
        scale
            Ignored (the constant does not depend on it).

        Returns
        -------
        torch.Tensor
            ``(samples,)``.
        """
        return -_nb_constant_terms(x, self.log_r()).sum(-1)

    def nll(self, x, out, scale=None, constant=None):
        """Negative binomial NLL of counts.

        Parameters
        ----------
        x
            Counts, ``samples x features`` (float dtype).
        out
            The decoder's raw output, ``samples x features``.
        scale
            Per-sample scale factors ``(samples,)`` (see :meth:`log_mean`), or ``None``.
        constant
            :meth:`nll_constant` of the same ``x`` under the current dispersion, or ``None`` (computed here).
            The result is the same up to rounding.

        Returns
        -------
        torch.Tensor
            ``(samples,)``: NLL of each sample, summed over features.
        """
        if constant is None:
            return -nb_log_prob(x, self.log_mean(out, scale), self.log_r()).sum(-1)
        return constant - _nb_mean_terms(x, self.log_mean(out, scale), self.log_r()).sum(-1)

    def mean(self, out, scale=None):
        """Expected counts, ``scale * activation(out)``.

        Parameters
        ----------
        out
            The decoder's raw output, ``samples x features``.
        scale
            Per-sample scale factors ``(samples,)``, or ``None`` (then the mean is the activation itself,
            e.g. a composition for ``"softmax"``).

        Returns
        -------
        torch.Tensor
            ``samples x features`` means.
        """
        return self.log_mean(out, scale).exp()

    @torch.no_grad()
    def sample(self, out, scale=None, generator=None):
        """Draw counts by the Gamma-Poisson construction (no gradient).

        Parameters
        ----------
        out
            The decoder's raw output, ``samples x features``.
        scale
            Per-sample scale factors ``(samples,)``, or ``None``.
        generator
            Torch generator of the Poisson draw (the Gamma draw always uses the global generator).

        Returns
        -------
        torch.Tensor
            ``samples x features`` integer-valued float counts.
        """
        # draws are integers: no gradient flows through them (and none should leak into callers)
        mean = self.mean(out, scale)
        r = self.r.expand_as(mean)
        # Gamma-Poisson mixture: lambda ~ Gamma(shape=r, rate=r/m), x ~ Poisson(lambda).
        # Mean m, variance m + m^2/r. (The reference passed r/(m+r) as torch's success
        # probability, which gives mean r^2/m; this construction has no such trap.)
        lam = torch._standard_gamma(r) * (mean / r)
        return torch.poisson(lam, generator=generator)


class Gaussian(Likelihood):
    """Gaussian with identity mean and a fixed or learned variance.

    With ``sigma=1`` and ``learn_sigma=False`` the NLL is 0.5 * squared error + a constant, so
    minimising it is minimising the MSE.

    Parameters
    ----------
    n_features
        Number of features; with ``learn_sigma`` one sigma per feature (``None``: one shared sigma).
    sigma
        The standard deviation (initial value when learned), in data units.
    learn_sigma
        Learn ``log sigma`` as a parameter; otherwise it is a fixed buffer. ``scale`` is ignored.
    """

    name = "gaussian"

    def __init__(self, n_features: int | None = None, *, sigma: float = 1.0, learn_sigma: bool = False):
        super().__init__()
        self.n_features = n_features
        self.learn_sigma = bool(learn_sigma)
        log_sigma = torch.tensor(math.log(sigma))
        if learn_sigma:
            self.log_sigma = nn.Parameter(log_sigma.repeat(1, n_features or 1))
        else:
            self.register_buffer("log_sigma", log_sigma.reshape(1, 1))

    def config(self) -> dict:
        """The constructor settings, for saving.

        Returns
        -------
        dict
            ``name`` (``"gaussian"``), ``n_features``, ``learn_sigma`` and ``sigma`` (the mean of the
            current sigmas; learned per-feature values are in the state dict).
        """
        return {"name": self.name, "n_features": self.n_features, "learn_sigma": self.learn_sigma,
                "sigma": float(self.log_sigma.detach().exp().mean())}

    def nll(self, x, out, scale=None):
        """Gaussian NLL with mean ``out`` (constants included).

        Parameters
        ----------
        x
            Data, ``samples x features``.
        out
            The decoder's output (the mean), ``samples x features``.
        scale
            Ignored.

        Returns
        -------
        torch.Tensor
            ``(samples,)``: NLL of each sample, summed over features.
        """
        ls = self.log_sigma
        return (0.5 * ((x - out) / ls.exp()) ** 2 + ls + 0.5 * math.log(2 * math.pi)).sum(-1)

    def mean(self, out, scale=None):
        """The mean, which is ``out`` itself.

        Parameters
        ----------
        out
            The decoder's output, ``samples x features``.
        scale
            Ignored.

        Returns
        -------
        torch.Tensor
            ``out``.
        """
        return out

    def sample(self, out, scale=None, generator=None):
        """Draw ``out + sigma * noise`` with standard normal noise.

        Parameters
        ----------
        out
            The decoder's output, ``samples x features``.
        scale
            Ignored.
        generator
            Torch generator of the noise (``None``: the global one).

        Returns
        -------
        torch.Tensor
            ``samples x features`` draws.
        """
        noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        return out + noise * self.log_sigma.exp()


class Bernoulli(Likelihood):
    """Bernoulli on logits; accepts targets in [0, 1] (binary cross-entropy, as for scaled pixels).

    Parameters
    ----------
    n_features
        Number of features (recorded in :meth:`config` only; there are no parameters). ``scale`` is ignored.
    """

    name = "bernoulli"

    def __init__(self, n_features: int | None = None):
        super().__init__()
        self.n_features = n_features

    def config(self) -> dict:
        """The constructor settings, for saving.

        Returns
        -------
        dict
            ``{"name": "bernoulli", "n_features": n_features}``.
        """
        return {"name": self.name, "n_features": self.n_features}

    def nll(self, x, out, scale=None):
        """Binary cross-entropy of targets in [0, 1] given logits.

        Parameters
        ----------
        x
            Targets in [0, 1], ``samples x features``.
        out
            Logits, ``samples x features``.
        scale
            Ignored.

        Returns
        -------
        torch.Tensor
            ``(samples,)``: NLL of each sample, summed over features.
        """
        return F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(-1)

    def mean(self, out, scale=None):
        """The success probabilities, ``sigmoid(out)``.

        Parameters
        ----------
        out
            Logits, ``samples x features``.
        scale
            Ignored.

        Returns
        -------
        torch.Tensor
            ``samples x features`` probabilities.
        """
        return torch.sigmoid(out)

    def sample(self, out, scale=None, generator=None):
        """Draw 0/1 values with probabilities ``sigmoid(out)``.

        Parameters
        ----------
        out
            Logits, ``samples x features``.
        scale
            Ignored.
        generator
            Torch random generator (``None``: the global one).

        Returns
        -------
        torch.Tensor
            ``samples x features`` draws (0.0 or 1.0).
        """
        return torch.bernoulli(torch.sigmoid(out), generator=generator)


def _log_composition(out: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``log(scale * softmax(out))`` computed in log space (``scale`` clamped at 1e-12; ``None``: no scale)."""
    log_y = F.log_softmax(out, dim=-1)
    if scale is None:
        return log_y
    return log_y + torch.log(scale.reshape(-1, 1).clamp_min(1e-12))


class Poisson(Likelihood):
    """Poisson counts with mean ``scale * softmax(out)``: a per-cell composition times the library size.

    For sparse counts with little overdispersion (ATAC fragments in peaks, as an alternative to the
    binary model). ``log p(x) = x log m - m - log x!`` (equals ``scipy.stats.poisson.logpmf(x, m)``).

    Parameters
    ----------
    n_features
        Number of features (recorded in :meth:`config` only; there are no parameters).
    """

    name = "poisson"
    needs_scale = True

    def __init__(self, n_features: int | None = None):
        super().__init__()
        self.n_features = n_features

    def config(self) -> dict:
        """The constructor settings, for saving.

        Returns
        -------
        dict
            ``{"name": "poisson", "n_features": n_features}``.
        """
        return {"name": self.name, "n_features": self.n_features}

    def nll_constant(self, x, scale=None):
        """``sum lgamma(x + 1)`` per sample (see
        :meth:`Likelihood.nll_constant <dgdlens.nn.Likelihood.nll_constant>`).

        Parameters
        ----------
        x
            Counts, ``samples x features`` (float dtype).
        scale
            Ignored.

        Returns
        -------
        torch.Tensor
            ``(samples,)``.
        """
        return torch.lgamma(x + 1.0).sum(-1)

    def nll(self, x, out, scale=None, constant=None):
        """Poisson NLL of counts.

        Parameters
        ----------
        x
            Counts, ``samples x features`` (float dtype).
        out
            The decoder's raw output, ``samples x features``.
        scale
            Per-sample library sizes ``(samples,)``, or ``None`` (then the mean is the composition).
        constant
            :meth:`nll_constant` of the same ``x``, or ``None`` (computed here).

        Returns
        -------
        torch.Tensor
            ``(samples,)``: NLL of each sample, summed over features.
        """
        log_m = _log_composition(out, scale)
        if constant is None:
            return -(x * log_m - log_m.exp() - torch.lgamma(x + 1.0)).sum(-1)
        return constant - (x * log_m - log_m.exp()).sum(-1)

    def mean(self, out, scale=None):
        """Expected counts ``scale * softmax(out)`` (the composition when ``scale`` is ``None``).

        Parameters
        ----------
        out
            The decoder's raw output, ``samples x features``.
        scale
            Per-sample library sizes ``(samples,)``, or ``None``.

        Returns
        -------
        torch.Tensor
            ``samples x features`` means.
        """
        return _log_composition(out, scale).exp()

    @torch.no_grad()
    def sample(self, out, scale=None, generator=None):
        """Poisson draws with the given means.

        Parameters
        ----------
        out
            The decoder's raw output, ``samples x features``.
        scale
            Per-sample library sizes ``(samples,)``, or ``None``.
        generator
            Torch random generator (``None``: the global one).

        Returns
        -------
        torch.Tensor
            ``samples x features`` integer-valued float counts.
        """
        return torch.poisson(self.mean(out, scale), generator=generator)


class BinaryAccessibility(Likelihood):
    """Bernoulli on binarised counts (``x > 0``) with ``P(x > 0) = 1 - exp(-scale * softmax(out))``.

    The probability that a Poisson count with mean ``scale * softmax(out)`` is non-zero: the decoder
    learns a per-cell accessibility composition, as for the count likelihoods, and the cell's depth
    (``scale``: its total counts in the modality, e.g. fragments in peaks) sets how many of its open
    regions are seen. A cell with twice the fragments sees more of the same peaks, without a separate
    depth model; the link is the complementary log-log of a binary GLM with an offset. Binarising is
    what most ATAC tools do (MultiVI, PeakVI, ArchR): peak counts of 1 and 2 mostly reflect the two
    insertions of one fragment rather than twice the accessibility.

    Parameters
    ----------
    n_features
        Number of features (recorded in :meth:`config` only; there are no parameters).
    """

    name = "binary"
    needs_scale = True

    #: Below this rate ``log(1 - exp(-rate))`` is computed as ``log(rate) - rate / 2`` (its series),
    #: exact to float32 precision and finite with a finite gradient when the rate underflows.
    SMALL_RATE = 1e-4

    def __init__(self, n_features: int | None = None):
        super().__init__()
        self.n_features = n_features

    def config(self) -> dict:
        """The constructor settings, for saving.

        Returns
        -------
        dict
            ``{"name": "binary", "n_features": n_features}``.
        """
        return {"name": self.name, "n_features": self.n_features}

    def _log_open(self, log_rate: torch.Tensor) -> torch.Tensor:
        rate = log_rate.exp()
        safe = rate.clamp_min(self.SMALL_RATE)  # keeps the unused branch's gradient finite
        return torch.where(rate < self.SMALL_RATE, log_rate - rate / 2, torch.log(-torch.expm1(-safe)))

    def nll(self, x, out, scale=None):
        """Bernoulli NLL of ``x > 0``.

        Parameters
        ----------
        x
            Counts or 0/1 values, ``samples x features`` (any value > 0 counts as open).
        out
            The decoder's raw output, ``samples x features``.
        scale
            Per-sample depth ``(samples,)`` (total counts of the modality), or ``None`` (depth 1).

        Returns
        -------
        torch.Tensor
            ``(samples,)``: NLL of each sample, summed over features.
        """
        # log P(closed) = -rate, log P(open) = log(1 - exp(-rate)); the rates of a cell sum to its depth
        # (softmax), so NLL = depth - sum over the OPEN features of (rate + log(1 - exp(-rate))): only the
        # few open entries (ATAC: ~3 %) need the expensive terms, not all 100k peaks of a mini-batch.
        log_comp = F.log_softmax(out, dim=-1)
        if scale is None:
            depth = log_comp.new_ones(out.shape[0])
        else:
            depth = scale.reshape(-1).to(log_comp.dtype).clamp_min(1e-12)
        # dense on a GPU: indexing the open entries would wait for the device (a host sync)
        open_sum = self._open_sum_dense if out.is_cuda else self._open_sum_sparse
        return depth - open_sum(x, log_comp, depth.log())

    def _open_sum_sparse(self, x, log_comp, log_depth):
        """Per cell, sum over its open features of ``rate + log(1 - exp(-rate))``, on the open entries only."""
        rows, cols = (x > 0).nonzero(as_tuple=True)
        log_rate = log_comp[rows, cols] + log_depth[rows]
        return torch.zeros_like(log_depth).index_add(0, rows, log_rate.exp() + self._log_open(log_rate))

    def _open_sum_dense(self, x, log_comp, log_depth):
        """The same as :meth:`_open_sum_sparse`, elementwise over every entry (no data-dependent shapes)."""
        log_rate = log_comp + log_depth[:, None]
        term = torch.where(x > 0, log_rate.exp() + self._log_open(log_rate), torch.zeros_like(log_rate))
        return term.sum(-1)

    def mean(self, out, scale=None):
        """``P(x > 0) = 1 - exp(-scale * softmax(out))``; with ``scale=None`` the accessibility composition
        ``softmax(out)`` (rows sum to 1), as the count likelihoods' normalised mean.

        Parameters
        ----------
        out
            The decoder's raw output, ``samples x features``.
        scale
            Per-sample depth ``(samples,)``, or ``None``.

        Returns
        -------
        torch.Tensor
            ``samples x features`` probabilities (or the composition).
        """
        log_rate = _log_composition(out, scale)
        return log_rate.exp() if scale is None else -torch.expm1(-log_rate.exp())

    @torch.no_grad()
    def sample(self, out, scale=None, generator=None):
        """Draw 0/1 values with probabilities :meth:`mean` (``scale`` needed).

        Parameters
        ----------
        out
            The decoder's raw output, ``samples x features``.
        scale
            Per-sample depth ``(samples,)``.
        generator
            Torch random generator (``None``: the global one).

        Returns
        -------
        torch.Tensor
            ``samples x features`` draws (0.0 or 1.0).
        """
        if scale is None:
            raise ValueError("Sampling binary accessibility needs each cell's depth (scale=...).")
        return torch.bernoulli(self.mean(out, scale), generator=generator)


_ALIASES = {
    "nb": "nb", "negative_binomial": "nb", "negbinom": "nb",
    "gaussian": "gaussian", "normal": "gaussian", "mse": "gaussian",
    "bernoulli": "bernoulli", "bce": "bernoulli",
    "poisson": "poisson",
    "binary": "binary", "binary_accessibility": "binary",
}


def make_likelihood(spec: str | dict | Likelihood, n_features: int, **kwargs) -> Likelihood:
    """Build a likelihood from a name (``"nb"``, ``"gaussian"``/``"mse"``, ``"bernoulli"``/``"bce"``,
    ``"poisson"``, ``"binary"``), a saved config dict, or pass an instance through.

    Parameters
    ----------
    spec
        A name (case-insensitive; also ``"negative_binomial"``, ``"negbinom"``, ``"normal"``), a dict from
        :meth:`Likelihood.config` (its settings become keyword arguments), or a :class:`Likelihood`
        (returned unchanged).
    n_features
        Number of output features (genes); overrides the dict's ``n_features``.
    **kwargs
        Constructor options (e.g. ``activation``, ``dispersion`` for ``"nb"``; ``sigma``,
        ``learn_sigma`` for ``"gaussian"``); they win over a dict's settings. Ignored for ``"bernoulli"``.

    Returns
    -------
    Likelihood
        A new :class:`NegativeBinomial`, :class:`Gaussian`, :class:`Bernoulli`, :class:`Poisson` or
        :class:`BinaryAccessibility` (or ``spec`` itself).

    Raises
    ------
    ValueError
        For an unknown name.
    """
    if isinstance(spec, Likelihood):
        return spec
    if isinstance(spec, dict):
        kwargs = {k: v for k, v in spec.items() if k not in {"name", "n_features"}} | kwargs
        spec = spec["name"]
    key = _ALIASES.get(str(spec).lower())
    if key is None:
        raise ValueError(f"Unknown likelihood {spec!r}; use one of 'nb', 'gaussian' (or 'mse'), 'bernoulli' (or 'bce'), "
                         "'poisson', 'binary'.")
    if key == "nb":
        return NegativeBinomial(n_features, **kwargs)
    if key == "gaussian":
        return Gaussian(n_features, **kwargs)
    if key == "poisson":
        return Poisson(n_features)
    if key == "binary":
        return BinaryAccessibility(n_features)
    return Bernoulli(n_features)
