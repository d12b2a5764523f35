"""Priors on the latent space: a learned Gaussian mixture with hyperpriors, and a standard normal.

Every prior has ``log_prob(z) -> (n,)`` (log-density per sample) and ``log_hyperprior() -> scalar``
(log-prior of the prior's own parameters, 0 when it has none).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .weighted_em import fit_weighted_mixture, weighted_em

__all__ = [
    "GaussianMixture",
    "StandardNormal",
    "NoPrior",
    "log_ball_volume",
    "default_sd_init",
    "softball_log_prob",
    "sample_softball",
    "make_prior",
]

_LOG_2PI = math.log(2 * math.pi)


def log_ball_volume(dim: int, radius: float) -> float:
    """log of the volume of a ``dim``-dimensional ball of radius ``radius``."""
    return 0.5 * dim * math.log(math.pi) + dim * math.log(radius) - math.lgamma(0.5 * dim + 1.0)


def softball_log_prob(x: torch.Tensor, radius: float, sharpness: float) -> torch.Tensor:
    """The "soft ball": about uniform inside a ball of ``radius`` with a logistic edge of ``sharpness``.

    ``log p(x) = -log Vol(ball) - log(1 + exp(sharpness * (|x| / radius - 1)))``; the normaliser is
    the hard ball's volume, which is what the reference uses (exact only in the sharp limit).

    Parameters
    ----------
    x
        Points, ``... x dim`` (e.g. the mixture means, ``K x dim``).
    radius
        Radius of the ball, in latent units.
    sharpness
        Steepness of the logistic edge (larger: closer to a hard ball).

    Returns
    -------
    torch.Tensor
        Log-density of every point, shape ``x.shape[:-1]``.
    """
    dim = x.shape[-1]
    norm = x.norm(dim=-1)
    return -log_ball_volume(dim, radius) - nn.functional.softplus(sharpness * (norm / radius - 1.0))


def sample_softball(n: int, dim: int, radius: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform draws in a ball: a random direction times ``radius * U^(1/dim)``."""
    direction = torch.randn(n, dim, generator=generator)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    r = radius * torch.rand(n, 1, generator=generator) ** (1.0 / dim)
    return direction * r


def default_sd_init(radius: float, n_components: int, sd_init: float | str | None = None) -> float:
    """Initial component standard deviation (also the centre of the log-precision prior).

    ``None``: ``radius / 6``, so that a component's +-3 sd spans half the soft ball. The reference's
    ``0.2 * radius / K`` (``"reference"``) makes components so tight (0.04 for K=10, 0.015 for K=27)
    that, with every representation starting at the origin, one component captures all cells and
    the mixture collapses: on pbmc68k (K=10, 200 epochs) it gave a single cluster and a validation
    NB loss of 687 nats/cell, against 7 clusters and 660 with ``radius / 6`` (see the README).

    Parameters
    ----------
    radius
        The soft-ball radius of the mixture means' prior, in latent units.
    n_components
        Number of mixture components K (only used by ``"reference"``).
    sd_init
        ``None`` or ``"auto"``: ``radius / 6``; ``"reference"``: ``0.2 * radius / n_components``; a number:
        used as given.

    Returns
    -------
    float
        The initial standard deviation (positivity is checked by the caller).

    Raises
    ------
    ValueError
        For any other string.
    """
    if sd_init is None or sd_init == "auto":
        return radius / 6.0
    if sd_init == "reference":
        return 0.2 * radius / n_components
    if isinstance(sd_init, str):
        raise ValueError(f"sd_init must be a positive number, None or 'reference', got {sd_init!r}")
    return float(sd_init)


class NoPrior(nn.Module):
    """No latent prior (plain decoder-only learning)."""

    name = "none"

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Zero log-density (a flat prior).

        Parameters
        ----------
        z
            Latents, ``samples x dim``.

        Returns
        -------
        torch.Tensor
            ``(samples,)`` zeros, on ``z``'s device.
        """
        return z.new_zeros(z.shape[0])

    def log_hyperprior(self) -> torch.Tensor:
        """Zero: there are no prior parameters.

        Returns
        -------
        torch.Tensor
            A scalar zero (CPU).
        """
        return torch.zeros(())

    def config(self) -> dict:
        """The settings, for saving; :func:`make_prior` rebuilds the prior from it.

        Returns
        -------
        dict
            ``{"name": "none"}``.
        """
        return {"name": self.name}


class StandardNormal(nn.Module):
    """Isotropic standard normal N(0, I) on the latent.

    Parameters
    ----------
    dim
        Latent dimension (recorded in :meth:`config` only; the density takes it from ``z``).
    """

    name = "normal"

    def __init__(self, dim: int | None = None):
        super().__init__()
        self.dim = dim

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density of N(0, I).

        Parameters
        ----------
        z
            Latents, ``samples x dim``.

        Returns
        -------
        torch.Tensor
            ``(samples,)`` log-densities.
        """
        return -0.5 * (z**2).sum(-1) - 0.5 * z.shape[-1] * _LOG_2PI

    def log_hyperprior(self) -> torch.Tensor:
        """Zero: there are no prior parameters.

        Returns
        -------
        torch.Tensor
            A scalar zero (CPU).
        """
        return torch.zeros(())

    def config(self) -> dict:
        """The settings, for saving; :func:`make_prior` rebuilds the prior from it.

        Returns
        -------
        dict
            ``{"name": "normal", "dim": dim}``.
        """
        return {"name": self.name, "dim": self.dim}


class GaussianMixture(nn.Module):
    """Gaussian mixture prior with learned means, precisions and weights (MAP, as in the DGD).

    Parameters
    ----------
    n_components, dim
        K components in a ``dim``-dimensional latent space.
    covariance
        ``"diagonal"`` (one precision per component and dimension, the reference default),
        ``"isotropic"`` (one per component) or ``"fixed"`` (not learned).
    softball_radius, softball_sharpness
        Prior on the means: about uniform in a ball (the reference scDGD uses 1 and 1, multiDGD 2 and 5).
        Means are initialised by sampling from it.
    sd_init
        Initial standard deviation of every component, also the mean of the log-precision prior.
        ``None`` (default): ``radius / 6``, see :func:`default_sd_init`. ``"reference"``: the
        reference's ``0.2 * radius / K``, without its rounding (which reaches 0 for K >= 81).
    sd_sd
        Standard deviation of the Gaussian prior on the log-precisions (reference: 1).
    dirichlet_alpha
        Concentration of the symmetric Dirichlet prior on the weights (reference: 1, i.e. flat).
    generator
        Torch generator for the initial means (``None``: the global one).

    Raises
    ------
    ValueError
        For ``n_components < 1``, an unknown ``covariance``, a non-positive radius, sharpness or
        ``sd_init``.
    """

    name = "gmm"

    def __init__(
        self,
        n_components: int,
        dim: int,
        *,
        covariance: str = "diagonal",
        softball_radius: float = 2.0,
        softball_sharpness: float = 5.0,
        sd_init: float | str | None = None,
        sd_sd: float = 1.0,
        dirichlet_alpha: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if n_components < 1:
            raise ValueError(f"n_components must be at least 1, got {n_components}")
        if covariance not in {"diagonal", "isotropic", "fixed"}:
            raise ValueError(f"covariance must be 'diagonal', 'isotropic' or 'fixed', got {covariance!r}")
        if softball_radius <= 0 or softball_sharpness <= 0:
            raise ValueError("softball_radius and softball_sharpness must be positive")
        sd_init = default_sd_init(softball_radius, n_components, sd_init)
        if sd_init <= 0:
            raise ValueError(f"sd_init must be positive, got {sd_init}")
        self.n_components = int(n_components)
        self.dim = int(dim)
        self.covariance = covariance
        self.softball_radius = float(softball_radius)
        self.softball_sharpness = float(softball_sharpness)
        self.sd_init = float(sd_init)
        self.sd_sd = float(sd_sd)
        self.dirichlet_alpha = float(dirichlet_alpha)
        # prior mean of the log-precision ("neglogvar" in the reference)
        self.neglogvar_prior_mean = -2.0 * math.log(self.sd_init)

        self.mean = nn.Parameter(sample_softball(self.n_components, self.dim, self.softball_radius, generator))
        nlv_shape = (self.n_components, self.dim) if covariance == "diagonal" else (self.n_components, 1)
        nlv = torch.full(nlv_shape, self.neglogvar_prior_mean)
        if covariance == "fixed":
            self.register_buffer("neglogvar", nlv)
        else:
            self.neglogvar = nn.Parameter(nlv)
        self.weight_logits = nn.Parameter(torch.ones(self.n_components))

    def config(self) -> dict:
        """The constructor settings, for saving (the learned means, precisions and weights are in the state
        dict); :func:`make_prior` rebuilds the prior from it.

        Returns
        -------
        dict
            ``name`` (``"gmm"``), ``n_components``, ``dim``, ``covariance``, ``softball_radius``,
            ``softball_sharpness``, ``sd_init`` (the resolved number), ``sd_sd`` and ``dirichlet_alpha``.
        """
        return {
            "name": self.name,
            "n_components": self.n_components,
            "dim": self.dim,
            "covariance": self.covariance,
            "softball_radius": self.softball_radius,
            "softball_sharpness": self.softball_sharpness,
            "sd_init": self.sd_init,
            "sd_sd": self.sd_sd,
            "dirichlet_alpha": self.dirichlet_alpha,
        }

    # ------------------------------------------------------------------ densities
    def log_weights(self) -> torch.Tensor:
        """Log mixture weights, ``log pi_k`` (a log-softmax of the weight logits).

        Returns
        -------
        torch.Tensor
            ``(K,)``; their exponentials sum to 1.
        """
        return torch.log_softmax(self.weight_logits, dim=0)

    def component_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log(pi_k) + log N(z | mu_k, Sigma_k) for every sample and component, shape (n, K).

        Parameters
        ----------
        z
            Latents, ``n x dim``.

        Returns
        -------
        torch.Tensor
            ``n x K`` weighted component log-densities.
        """
        precision = self.neglogvar.exp()  # (K, L) or (K, 1)
        diff = z.unsqueeze(1) - self.mean.unsqueeze(0)  # (n, K, L)
        maha = (diff.pow(2) * precision.unsqueeze(0)).sum(-1)  # (n, K)
        # log-determinant of the precision; an isotropic component has dim identical entries
        logdet = self.neglogvar.sum(-1) if self.neglogvar.shape[1] == self.dim else self.dim * self.neglogvar[:, 0]
        return -0.5 * maha + 0.5 * logdet - 0.5 * self.dim * _LOG_2PI + self.log_weights()

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) = logsumexp_k [log pi_k + log N(z | mu_k, Sigma_k)], shape (n,).

        Parameters
        ----------
        z
            Latents, ``n x dim``.

        Returns
        -------
        torch.Tensor
            ``(n,)`` log-densities under the mixture.
        """
        return torch.logsumexp(self.component_log_prob(z), dim=1)

    def log_hyperprior(self) -> torch.Tensor:
        """log p(means) + log p(log-precisions) + log Dirichlet(weights), a scalar.

        The means are scored under the soft ball, the log-precisions under a Gaussian centred at
        ``-2 log(sd_init)`` with standard deviation ``sd_sd`` (left out for ``covariance="fixed"``), the
        weights under a symmetric Dirichlet(``dirichlet_alpha``).

        Returns
        -------
        torch.Tensor
            Scalar log-prior of the mixture's parameters (differentiable).
        """
        lp = softball_log_prob(self.mean, self.softball_radius, self.softball_sharpness).sum()
        if self.covariance != "fixed":
            d = self.neglogvar - self.neglogvar_prior_mean
            lp = lp + (-0.5 * (d / self.sd_sd) ** 2 - math.log(self.sd_sd) - 0.5 * _LOG_2PI).sum()
        a, k = self.dirichlet_alpha, self.n_components
        log_norm = math.lgamma(a * k) - k * math.lgamma(a)
        return lp + log_norm + (a - 1.0) * self.log_weights().sum()

    # ------------------------------------------------------------------ re-initialisation
    @torch.no_grad()
    def fit_to(self, z: torch.Tensor, *, seed: int = 0, min_sd: float | None = None, n_init: int = 5,
               max_samples: int | None = 100_000, sample_weight: np.ndarray | torch.Tensor | None = None,
               weighted_start: str = "kmeans") -> None:
        """Re-initialise means, precisions and weights by EM on the latents ``z`` (sklearn's
        ``GaussianMixture``, k-means start).

        Why: the DGD starts every cell's latent at the origin, so the component nearest to it takes all
        cells and the others are starved (their weights and means then drift to nothing); the mixture
        collapses to one cluster even when the latents separate cleanly. Refitting once the decoder has
        spread the latents gives every component cells to explain. Standard deviations are floored at
        ``min_sd`` (default ``sd_init / 10``) so that a tight early cluster does not start degenerate.
        EM keeps the best of ``n_init`` k-means starts (one start merged two of three planted types);
        at most ``max_samples`` latents (a seeded sample) are used, which bounds time and memory at 1M cells.

        Parameters
        ----------
        z
            Latents, ``n x dim`` (any device; copied to the CPU in float64). ``n`` must be at least K.
        seed
            Seeds the subsample and sklearn's k-means starts.
        min_sd
            Floor of the fitted standard deviations (``None``: ``sd_init / 10``).
        n_init
            Number of k-means starts; the best EM fit is kept.
        max_samples
            Most latents used (``None``: all).
        sample_weight
            One non-negative weight per latent (``None``: all equal): EM maximises the weighted likelihood
            (:func:`~dgdlens.nn.fit_weighted_mixture`, sklearn's algorithm with weighted sums),
            so a sample that kept some cells at a higher rate, weighted by inverse inclusion probability,
            gives the mixture the whole data's proportions without duplicating or dropping cells.
        weighted_start
            With ``sample_weight``, where weighted EM starts: ``"kmeans"``, from weighted k-means (the best
            of ``n_init``); ``"unweighted"``, from the unweighted fit's responsibilities, so the components
            are placed as the sample shows the latents (over-represented cells included) and the weighted
            EM then gives them the whole data's weights and shapes.

        Raises
        ------
        ValueError
            If there are fewer latents than components, or weights that are negative, not finite, all zero
            or not one per latent.

        Notes
        -----
        Modifies the parameters in place. With ``covariance="fixed"`` the precisions are kept; an
        isotropic mixture is fitted as sklearn's ``"spherical"``.
        """
        from sklearn.mixture import GaussianMixture as SkGaussianMixture

        x = z.detach().double().cpu().numpy()
        w = None
        if sample_weight is not None:
            w = np.asarray(sample_weight.detach().cpu() if torch.is_tensor(sample_weight) else sample_weight,
                           dtype=np.float64).reshape(-1)
            if len(w) != x.shape[0]:
                raise ValueError(f"sample_weight has {len(w)} entries for {x.shape[0]} latents; give one per latent")
        if max_samples is not None and x.shape[0] > max_samples:
            keep = np.sort(np.random.default_rng(seed).choice(x.shape[0], max_samples, replace=False))
            x, w = x[keep], (None if w is None else w[keep])  # uniform thinning keeps the weights' ratios
        k = self.n_components
        if x.shape[0] < k:
            raise ValueError(f"Cannot fit {k} mixture components to {x.shape[0]} latents.")
        kind = {"diagonal": "diag", "isotropic": "spherical", "fixed": "spherical"}[self.covariance]
        if weighted_start not in {"kmeans", "unweighted"}:
            raise ValueError(f"weighted_start must be 'kmeans' or 'unweighted', got {weighted_start!r}")
        if w is None or weighted_start == "unweighted":
            gm = SkGaussianMixture(k, covariance_type=kind, random_state=seed, reg_covar=1e-6, max_iter=200,
                                   n_init=n_init).fit(x)
            weights, means, covariances = gm.weights_, gm.means_, gm.covariances_
        if w is not None:
            fit = (fit_weighted_mixture(x, w, k, kind, seed=seed, n_init=n_init, reg_covar=1e-6, max_iter=200)
                   if weighted_start == "kmeans" else
                   weighted_em(x, w, gm.predict_proba(x), kind, reg_covar=1e-6, max_iter=200))
            weights, means, covariances = fit.weights, fit.means, fit.covariances
        self.mean.copy_(torch.as_tensor(means, dtype=self.mean.dtype))
        self.weight_logits.copy_(torch.as_tensor(np.log(np.maximum(weights, 1e-12)), dtype=self.mean.dtype))
        if self.covariance != "fixed":
            floor = (self.sd_init / 10.0 if min_sd is None else min_sd) ** 2
            var = np.maximum(np.asarray(covariances, dtype=np.float64), floor).reshape(k, -1)
            self.neglogvar.copy_(torch.as_tensor(-np.log(var), dtype=self.neglogvar.dtype).expand_as(self.neglogvar))

    # ------------------------------------------------------------------ clustering
    def responsibilities(self, z: torch.Tensor) -> torch.Tensor:
        """Posterior component probabilities, softmax of the component log-probabilities; rows sum to 1.

        Parameters
        ----------
        z
            Latents, ``n x dim``.

        Returns
        -------
        torch.Tensor
            ``n x K`` responsibilities.
        """
        return torch.softmax(self.component_log_prob(z), dim=1)

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """Most probable component, argmax on log-probabilities (no exp(), so no under/overflow).

        Parameters
        ----------
        z
            Latents, ``n x dim``.

        Returns
        -------
        torch.Tensor
            ``(n,)`` int64 component indices in ``0 .. K-1``.
        """
        return self.component_log_prob(z).argmax(dim=1)

    @property
    def std(self) -> torch.Tensor:
        """Component standard deviations, ``K x dim`` (an isotropic component repeats its value)."""
        return (-0.5 * self.neglogvar).exp().expand(self.n_components, self.dim)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` latents; returns (z, component index).

        Parameters
        ----------
        n
            Number of draws.
        generator
            A CPU torch generator for reproducible draws (``None``: the global one).

        Returns
        -------
        z : torch.Tensor
            ``n x dim`` latents on the CPU, no gradient.
        component : torch.Tensor
            ``(n,)`` int64 index of the component each draw came from.
        """
        with torch.no_grad():
            comp = torch.multinomial(self.log_weights().exp().cpu(), n, replacement=True, generator=generator)
            noise = torch.randn(n, self.dim, generator=generator)
            z = self.mean.detach().cpu()[comp] + noise * self.std.detach().cpu()[comp]
        return z, comp


def make_prior(spec: str | dict | nn.Module | None, dim: int, **kwargs) -> nn.Module:
    """Build a latent prior from ``None``/``"none"``, ``"normal"``, ``"gmm"``, a saved config, or a module.

    Parameters
    ----------
    spec
        ``None``/``"none"`` (:class:`NoPrior`), ``"normal"``/``"standard_normal"`` (:class:`StandardNormal`),
        ``"gmm"``/``"mixture"``/``"gaussian_mixture"`` (:class:`GaussianMixture`), a dict from a prior's
        ``config()`` (its settings become keyword arguments), or a module (returned unchanged).
    dim
        Latent dimension; overrides the dict's ``dim``.
    **kwargs
        :class:`GaussianMixture` options (``n_components`` is required for a mixture); they win over a
        dict's settings. Ignored for the other priors.

    Returns
    -------
    torch.nn.Module
        The prior (``spec`` itself for a module).

    Raises
    ------
    ValueError
        For an unknown name.
    """
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, dict):
        kwargs = {k: v for k, v in spec.items() if k not in {"name", "dim"}} | kwargs
        spec = spec["name"]
    if spec is None or spec == "none":
        return NoPrior()
    if spec in {"normal", "standard_normal"}:
        return StandardNormal(dim)
    if spec in {"gmm", "mixture", "gaussian_mixture"}:
        return GaussianMixture(dim=dim, **kwargs)
    raise ValueError(f"Unknown prior {spec!r}; use None, 'normal' or 'gmm'.")
