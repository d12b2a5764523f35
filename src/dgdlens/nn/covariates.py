"""Covariate latents (multiDGD's "correction" model): one small latent per cell and categorical covariate
(batch, donor, sample, technology), each with its own *supervised* Gaussian-mixture prior (one component per
category), concatenated with the biological latent (and the standardised continuous covariates) before the
decoder.

What differs from multiDGD (``_gmm.py:316-420``, ``_dgd.py:259-286``), and why:

- **Several covariates**, each with its own latent block and prior (multiDGD keeps only the first
  ``covariate_*`` column, with a warning).
- **No multiplication by C.** multiDGD multiplies a labelled cell's covariate log-density by the number of
  categories C, which weighs the covariate prior C times more than the biological prior and the
  reconstruction for no probabilistic reason (and makes the objective depend on how many batches there
  are). Here a labelled cell's covariate term is exactly ``log N(c | mu_k, sigma_k^2 I)`` of its own
  category ``k``: the prior of the covariate latent given its known category.
- **No abs().** multiDGD's semi-supervised branch (label 999) passes the log-density through ``abs()``,
  which flips the sign of a negative log-density so that the loss *rewards* improbable latents. Here a cell
  whose category is unknown is scored under the mixture's marginal density
  ``log sum_k pi_k N(c | mu_k, sigma_k^2 I)`` (a logsumexp, no abs), with ``pi_k`` the training frequencies.
- The initial standard deviation ``0.4 / C`` is not rounded (multiDGD rounds it to 2 decimals, which reaches
  0 and crashes for C >= 81).
- The mixture weights are the categories' training frequencies (a buffer, not learned): they are the MAP
  weights of a supervised mixture (Dirichlet alpha=1); multiDGD learns them under a Dirichlet(2) that the
  supervised term never informs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .module import DecoderOnlyModule, likelihood_nll
from .priors import _LOG_2PI, sample_softball, softball_log_prob

__all__ = ["SupervisedGaussianMixture", "CovariateDecoderModule", "default_covariate_sd"]


def default_covariate_sd(radius: float, n_categories: int) -> float:
    """multiDGD's initial covariate component sd, ``2 * radius / (10 * C)`` (0.4 / C for radius 2), unrounded."""
    return 2.0 * radius / (10.0 * max(int(n_categories), 1))


class SupervisedGaussianMixture(nn.Module):
    """A mixture with one isotropic Gaussian component per category of a covariate.

    A cell of known category ``k`` (code ``k >= 0``) is scored under its own component,
    ``log N(c | mu_k, sigma_k^2 I)``; a cell of unknown category (code ``-1``) under the marginal
    ``logsumexp_k [log pi_k + log N(c | mu_k, sigma_k^2 I)]``. Codes ``>= n_categories`` refer to extra
    components passed as ``extra_mean`` (categories learned at inference, e.g. a new batch); they share the
    trained components' average precision.

    Parameters
    ----------
    n_categories, dim
        Components (categories) and latent dimension (multiDGD: 2).
    counts
        Training cells per category (the mixture weights are their frequencies); default uniform.
    softball_radius, softball_sharpness
        Prior on the means, about uniform in a ball (multiDGD: 2 and 5); means are drawn from it.
    sd_init, sd_sd
        Initial component sd (default :func:`default_covariate_sd`) and sd of the Gaussian prior on the
        log-precisions around their initial value.
    generator
        Torch generator for the initial means (``None``: the global one).

    Raises
    ------
    ValueError
        For non-positive ``n_categories``, ``dim`` or ``sd_init``, or invalid ``counts``.
    """

    name = "supervised_gmm"

    def __init__(self, n_categories: int, dim: int = 2, *, counts=None, softball_radius: float = 2.0,
                 softball_sharpness: float = 5.0, sd_init: float | None = None, sd_sd: float = 1.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if n_categories < 1 or dim < 1:
            raise ValueError(f"n_categories and dim must be positive, got {n_categories} and {dim}")
        self.n_components = int(n_categories)
        self.dim = int(dim)
        self.softball_radius = float(softball_radius)
        self.softball_sharpness = float(softball_sharpness)
        self.sd_init = default_covariate_sd(softball_radius, n_categories) if sd_init is None else float(sd_init)
        if not self.sd_init > 0:
            raise ValueError(f"sd_init must be positive, got {sd_init}")
        self.sd_sd = float(sd_sd)
        self.neglogvar_prior_mean = -2.0 * math.log(self.sd_init)
        self.mean = nn.Parameter(sample_softball(self.n_components, self.dim, self.softball_radius, generator))
        self.neglogvar = nn.Parameter(torch.full((self.n_components, 1), self.neglogvar_prior_mean))
        counts = np.ones(self.n_components) if counts is None else np.asarray(counts, dtype=np.float64)
        if counts.shape != (self.n_components,) or np.any(counts < 0) or counts.sum() <= 0:
            raise ValueError("counts must be one non-negative number per category, not all zero")
        logw = np.log(np.maximum(counts, 1e-12) / counts.sum())
        self.register_buffer("log_weights", torch.as_tensor(logw, dtype=torch.float32))

    # ------------------------------------------------------------------ densities
    def _params(self, extra_mean: torch.Tensor | None):
        if extra_mean is None or extra_mean.shape[0] == 0:
            return self.mean, self.neglogvar
        nlv = self.neglogvar.mean().detach().expand(extra_mean.shape[0], 1)
        return torch.cat([self.mean, extra_mean.to(self.mean)]), torch.cat([self.neglogvar, nlv])

    def component_log_prob(self, c: torch.Tensor, extra_mean: torch.Tensor | None = None) -> torch.Tensor:
        """``log N(c | mu_k, sigma_k^2 I)`` for every cell and component (no weights), shape (n, K [+ extra]).

        Parameters
        ----------
        c
            Covariate latents, ``n x dim``.
        extra_mean
            Means of extra (new) components, ``n_extra x dim``, appended after the trained ones with the
            trained components' average log-precision (no gradient to it); ``None`` for none.

        Returns
        -------
        torch.Tensor
            ``n x K`` (``n x (K + n_extra)`` with ``extra_mean``) component log-densities.
        """
        mean, nlv = self._params(extra_mean)
        maha = (c.unsqueeze(1) - mean.unsqueeze(0)).pow(2).sum(-1) * nlv[:, 0].exp().unsqueeze(0)
        return -0.5 * maha + 0.5 * self.dim * nlv[:, 0] - 0.5 * self.dim * _LOG_2PI

    def log_prob(self, c: torch.Tensor, codes: torch.Tensor, extra_mean: torch.Tensor | None = None) -> torch.Tensor:
        """Supervised log-density per cell, shape (n,): own component for ``codes >= 0``, marginal over the
        trained components (weighted by training frequencies) for ``codes == -1``.

        Parameters
        ----------
        c
            Covariate latents, ``n x dim``.
        codes
            ``(n,)`` int64 category codes: ``0 .. K-1`` trained categories, ``K + m`` the ``m``-th row of
            ``extra_mean``, any negative value unknown.
        extra_mean
            Means of extra components for codes ``>= K`` (see :meth:`component_log_prob`), or ``None``.

        Returns
        -------
        torch.Tensor
            ``(n,)`` log-densities.
        """
        comp = self.component_log_prob(c, extra_mean)
        known = codes >= 0
        own = comp.gather(1, codes.clamp_min(0).unsqueeze(1)).squeeze(1)
        if own.device.type == "cpu" and bool(known.all()):
            return own  # on the CPU reading the flag is free and skips the marginal; on a GPU it would wait
        marginal = torch.logsumexp(comp[:, : self.n_components] + self.log_weights, dim=1)
        return torch.where(known, own, marginal)

    def log_hyperprior(self) -> torch.Tensor:
        """Soft-ball prior on the means + Gaussian prior on the log-precisions (a scalar).

        The weights are fixed training frequencies and have no prior term.

        Returns
        -------
        torch.Tensor
            Scalar log-prior of the means and log-precisions (differentiable).
        """
        lp = softball_log_prob(self.mean, self.softball_radius, self.softball_sharpness).sum()
        d = self.neglogvar - self.neglogvar_prior_mean
        return lp + (-0.5 * (d / self.sd_sd) ** 2 - math.log(self.sd_sd) - 0.5 * _LOG_2PI).sum()

    def assign(self, c: torch.Tensor) -> torch.Tensor:
        """Most probable trained category of each covariate latent (argmax of log pi_k + log N).

        Parameters
        ----------
        c
            Covariate latents, ``n x dim``.

        Returns
        -------
        torch.Tensor
            ``(n,)`` int64 category codes in ``0 .. K-1`` (extra components are never chosen).
        """
        return (self.component_log_prob(c) + self.log_weights).argmax(1)

    def config(self) -> dict:
        """The constructor settings, for saving (means, precisions and the weights buffer are in the state
        dict).

        Returns
        -------
        dict
            ``name`` (``"supervised_gmm"``), ``n_components``, ``dim``, ``softball_radius``,
            ``softball_sharpness``, ``sd_init`` and ``sd_sd``.
        """
        return {"name": self.name, "n_components": self.n_components, "dim": self.dim,
                "softball_radius": self.softball_radius, "softball_sharpness": self.softball_sharpness,
                "sd_init": self.sd_init, "sd_sd": self.sd_sd}


class CovariateDecoderModule(DecoderOnlyModule):
    """A decoder-only module whose decoder reads several latent blocks: the biological latent (with the
    usual prior) + one latent per categorical covariate (each with a :class:`SupervisedGaussianMixture`)
    + the standardised continuous covariates, concatenated in that order.

    :meth:`batch_nll` is the training plan's entry point (``zs`` = the blocks, ``codes`` the categories
    (n, n_categorical), ``cont`` the continuous covariates (n, n_continuous)); :meth:`decode` takes the
    biological latent and the rest (``extra``: the covariate latents and continuous values, concatenated).

    Parameters
    ----------
    decoder
        Maps the concatenated input, ``n x (n_latent + sum(covariate_dims) + n_continuous)``, to the
        likelihood's raw output ``n x features``.
    likelihood
        The output distribution (e.g. :class:`~dgdlens.nn.NegativeBinomial`).
    prior
        The biological latent's prior (e.g. :class:`~dgdlens.nn.GaussianMixture`).
    covariate_priors
        One :class:`SupervisedGaussianMixture` per categorical covariate, in the order of the latent blocks
        and of the columns of ``codes``.
    n_continuous
        Number of standardised continuous covariates appended to the decoder input (``0``: none).
    """

    def __init__(self, decoder: nn.Module, likelihood, prior: nn.Module,
                 covariate_priors: list[SupervisedGaussianMixture], n_continuous: int = 0) -> None:
        super().__init__(decoder, likelihood, prior)
        self.covariate_priors = nn.ModuleList(covariate_priors)
        self.n_continuous = int(n_continuous)

    @property
    def covariate_dims(self) -> list[int]:
        """Latent dimension of each categorical covariate's block, in order."""
        return [p.dim for p in self.covariate_priors]

    @property
    def n_extra(self) -> int:
        """Width of what is concatenated after the biological latent."""
        return sum(self.covariate_dims) + self.n_continuous

    def extra_input(self, cov_zs: list[torch.Tensor], cont: torch.Tensor | None) -> torch.Tensor:
        """Concatenate the covariate latents and the continuous covariates into the decoder's extra input.

        Parameters
        ----------
        cov_zs
            One ``n x d_j`` latent per categorical covariate.
        cont
            ``n x n_continuous`` standardised continuous covariates, or ``None`` (also left out when
            ``n_continuous`` is 0).

        Returns
        -------
        torch.Tensor
            ``n x n_extra``.
        """
        parts = list(cov_zs) + ([] if cont is None or self.n_continuous == 0 else [cont])
        return torch.cat(parts, dim=1)

    def decode(self, z: torch.Tensor, extra: torch.Tensor | None = None, *, head: int | None = None) -> torch.Tensor:
        """Decoder output for the biological latent ``z`` and ``extra`` (covariate latents + continuous
        covariates, concatenated; ``None`` when ``z`` already holds the full decoder input).

        Parameters
        ----------
        z
            Biological latents, ``n x n_latent`` (or the full ``n x (n_latent + n_extra)`` input when
            ``extra`` is ``None``).
        extra
            ``n x n_extra`` (see :meth:`extra_input`), moved to ``z``'s device and dtype; or ``None``.
        head
            With a :class:`~dgdlens.nn.MultiHeadDecoder`: only this modality's head; ``None``: every output.

        Returns
        -------
        torch.Tensor
            ``n x features`` raw decoder output.
        """
        return self._run_decoder(z if extra is None else torch.cat([z, extra.to(z)], dim=1), head)

    def covariate_prior_nll(self, cov_zs: list[torch.Tensor], codes: torch.Tensor,
                            extra_means: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Summed negative supervised log-density of the covariate latents.

        Parameters
        ----------
        cov_zs
            One ``n x d_j`` latent per categorical covariate.
        codes
            ``n x n_categorical`` int64 category codes (``-1``: unknown; ``>= C_j``: extra components).
        extra_means
            Per covariate, the means of its extra (new) categories or ``None``; ``None`` for none at all.

        Returns
        -------
        torch.Tensor
            ``(n,)``: ``-sum_j log p_j(c_j | code_j)``. ``None`` when ``cov_zs`` is empty.
        """
        out = cov_zs[0].new_zeros(cov_zs[0].shape[0]) if cov_zs else None
        for j, (prior, c) in enumerate(zip(self.covariate_priors, cov_zs)):
            extra = None if extra_means is None else extra_means[j]
            out = out - prior.log_prob(c, codes[:, j], extra)
        return out

    def batch_nll(self, x, zs, scale=None, codes=None, cont=None, extra_means=None, constant=None):
        """(reconstruction NLL, prior NLL) per sample for the blocks ``zs`` = [biological, covariate 1, ...].

        Parameters
        ----------
        x
            Data, ``n x features`` (e.g. ``cells x genes`` counts).
        zs
            Latent blocks: ``n x n_latent`` biological, then one ``n x d_j`` per categorical covariate.
        scale
            Per-sample scale factors ``(n,)`` (e.g. library sizes), or ``None``.
        codes
            ``n x n_categorical`` int64 category codes (see :meth:`SupervisedGaussianMixture.log_prob`);
            needed when ``zs`` has covariate blocks.
        cont
            ``n x n_continuous`` standardised continuous covariates, or ``None``.
        extra_means
            Per covariate, means of categories learned at inference (or ``None``), for codes ``>= C_j``.
        constant
            :meth:`~dgdlens.nn.DecoderOnlyModule.recon_constant` of ``x`` (with the module frozen), or ``None``.

        Returns
        -------
        recon : torch.Tensor
            ``(n,)`` reconstruction NLLs (summed over features).
        prior : torch.Tensor
            ``(n,)`` prior NLLs: the biological prior plus every covariate prior.
        """
        raw = self.decode(zs[0], self.extra_input(zs[1:], cont))
        recon = likelihood_nll(self.likelihood, x, raw, scale, constant)
        prior = self.prior_nll(zs[0])
        if len(zs) > 1:
            prior = prior + self.covariate_prior_nll(zs[1:], codes, extra_means)
        return recon, prior

    def hyperprior_nll(self) -> torch.Tensor:
        """Negative log-prior of the biological prior's and every covariate prior's own parameters.

        Returns
        -------
        torch.Tensor
            A scalar.
        """
        out = -self.prior.log_hyperprior()
        for p in self.covariate_priors:
            out = out - p.log_hyperprior()
        return out
