"""The maths of a decoder-only generative model: decoder + output likelihood + latent prior."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .likelihoods import Likelihood

__all__ = ["DecoderOnlyModule", "frozen"]


@contextmanager
def frozen(module: nn.Module):
    """Temporarily stop gradients to ``module``'s parameters (held-out fitting, validation)."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


class DecoderOnlyModule(nn.Module):
    """Decoder + output likelihood + latent prior: the maths of a decoder-only generative model."""

    def __init__(self, decoder: nn.Module, likelihood: Likelihood, prior: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder
        self.likelihood = likelihood
        self.prior = prior

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def recon_nll(self, x: torch.Tensor, z: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Negative log-likelihood of each sample, summed over features, shape (n,)."""
        return self.likelihood.nll(x, self.decode(z), scale)

    def prior_nll(self, z: torch.Tensor) -> torch.Tensor:
        """Negative log-density of each latent under the prior, shape (n,)."""
        return -self.prior.log_prob(z)

    def batch_nll(self, x: torch.Tensor, zs: list[torch.Tensor], scale: torch.Tensor | None = None, codes=None,
                  cont=None, extra_means=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction NLL, prior NLL) per sample for the latent blocks ``zs`` (here one block; the
        covariate module, :class:`~dgdlens.nn.covariates.CovariateDecoderModule`, reads several)."""
        return self.recon_nll(x, zs[0], scale), self.prior_nll(zs[0])

    def hyperprior_nll(self) -> torch.Tensor:
        return -self.prior.log_hyperprior()
