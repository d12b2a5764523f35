"""The maths of a decoder-only generative model: decoder + output likelihood + latent prior."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .likelihoods import Likelihood

__all__ = ["DecoderOnlyModule", "frozen", "likelihood_nll"]


@contextmanager
def frozen(module: nn.Module):
    """Temporarily stop gradients to ``module``'s parameters (held-out fitting, validation).

    A context manager: on entry every parameter's ``requires_grad`` is set to ``False``; on exit each is
    restored to its previous value (also when an exception is raised). Gradients still flow to inputs
    such as latents.

    Parameters
    ----------
    module
        The module to freeze.

    Yields
    ------
    torch.nn.Module
        ``module`` itself.
    """
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def likelihood_nll(likelihood: Likelihood, x: torch.Tensor, out: torch.Tensor, scale: torch.Tensor | None,
                   constant: torch.Tensor | None) -> torch.Tensor:
    """``likelihood.nll(x, out, scale)``, reusing a precomputed :meth:`~dgdlens.nn.Likelihood.nll_constant`
    when one is given (only likelihoods that have one take the argument)."""
    if constant is None:
        return likelihood.nll(x, out, scale)
    return likelihood.nll(x, out, scale, constant=constant)


class DecoderOnlyModule(nn.Module):
    """Decoder + output likelihood + latent prior: the maths of a decoder-only generative model.

    Parameters
    ----------
    decoder
        Maps latents ``n x n_latent`` to the likelihood's raw output ``n x features`` (e.g. an
        :class:`~dgdlens.nn.MLP`).
    likelihood
        The output distribution (e.g. :class:`~dgdlens.nn.NegativeBinomial` for counts).
    prior
        The latent prior (:class:`~dgdlens.nn.GaussianMixture`, :class:`~dgdlens.nn.StandardNormal` or
        :class:`~dgdlens.nn.NoPrior`): any module with ``log_prob(z)`` and ``log_hyperprior()``.
    """

    def __init__(self, decoder: nn.Module, likelihood: Likelihood, prior: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder
        self.likelihood = likelihood
        self.prior = prior

    def decode(self, z: torch.Tensor, *, head: int | None = None) -> torch.Tensor:
        """The decoder's raw output (before the likelihood's activation).

        Parameters
        ----------
        z
            Latents, ``n x n_latent``.
        head
            With a :class:`~dgdlens.nn.MultiHeadDecoder`: only this modality's head (its features only);
            ``None``: every output.

        Returns
        -------
        torch.Tensor
            ``n x features``; :meth:`Likelihood.mean <dgdlens.nn.Likelihood.mean>` turns it into expected values.
        """
        return self._run_decoder(z, head)

    def _run_decoder(self, inputs: torch.Tensor, head: int | None) -> torch.Tensor:
        return self.decoder(inputs) if head is None else self.decoder(inputs, head=head)

    def recon_nll(self, x: torch.Tensor, z: torch.Tensor, scale: torch.Tensor | None = None,
                  constant: torch.Tensor | None = None) -> torch.Tensor:
        """Negative log-likelihood of each sample, summed over features, shape (n,).

        Parameters
        ----------
        x
            Data, ``n x features`` (e.g. ``cells x genes`` counts).
        z
            Latents, ``n x n_latent``.
        scale
            Per-sample scale factors ``(n,)`` (e.g. library sizes for a negative binomial), or ``None``.
        constant
            :meth:`recon_constant` of the same data, computed once while the module is frozen, or ``None``.

        Returns
        -------
        torch.Tensor
            ``(n,)`` reconstruction NLLs.
        """
        return likelihood_nll(self.likelihood, x, self.decode(z), scale, constant)

    def recon_constant(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor | None:
        """The part of :meth:`recon_nll` that does not depend on the latents (``None`` if the likelihood
        has none to split off): for fitting latents with the module frozen, where it is the same in every
        step (see :meth:`Likelihood.nll_constant <dgdlens.nn.Likelihood.nll_constant>`).

        Parameters
        ----------
        x
            Data, ``n x features``.
        scale
            Per-sample scale factors, or ``None``.

        Returns
        -------
        torch.Tensor or None
            ``(n,)``.
        """
        with torch.no_grad():
            return self.likelihood.nll_constant(x, scale)

    def prior_nll(self, z: torch.Tensor) -> torch.Tensor:
        """Negative log-density of each latent under the prior, shape (n,).

        Parameters
        ----------
        z
            Latents, ``n x n_latent``.

        Returns
        -------
        torch.Tensor
            ``(n,)`` prior NLLs (zeros for :class:`~dgdlens.nn.NoPrior`).
        """
        return -self.prior.log_prob(z)

    def batch_nll(self, x: torch.Tensor, zs: list[torch.Tensor], scale: torch.Tensor | None = None, codes=None,
                  cont=None, extra_means=None, constant=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction NLL, prior NLL) per sample for the latent blocks ``zs`` (here one block; the
        covariate module, :class:`~dgdlens.nn.covariates.CovariateDecoderModule`, reads several).

        Parameters
        ----------
        x
            Data, ``n x features``.
        zs
            Latent blocks; only ``zs[0]`` (``n x n_latent``) is used here.
        scale
            Per-sample scale factors ``(n,)``, or ``None``.
        codes, cont, extra_means
            Covariate inputs of the covariate module; ignored here.
        constant
            :meth:`recon_constant` of ``x`` (with the module frozen), or ``None``.

        Returns
        -------
        recon : torch.Tensor
            ``(n,)`` reconstruction NLLs.
        prior : torch.Tensor
            ``(n,)`` prior NLLs.
        """
        return self.recon_nll(x, zs[0], scale, constant), self.prior_nll(zs[0])

    def hyperprior_nll(self) -> torch.Tensor:
        """Negative log-prior of the prior's own parameters (0 for a prior without parameters).

        Returns
        -------
        torch.Tensor
            A scalar.
        """
        return -self.prior.log_hyperprior()
