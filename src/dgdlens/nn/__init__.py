"""Torch building blocks: likelihoods, latent priors, decoders/encoders (multi-modal heads too) and the
representation table."""

from .conv import ConvDecoder, ConvEncoder, conv_decoder, conv_encoder
from .covariates import CovariateDecoderModule, SupervisedGaussianMixture
from .decoders import MLP, mlp_decoder, mlp_encoder
from .likelihoods import (
    Bernoulli,
    BinaryAccessibility,
    Gaussian,
    Likelihood,
    NegativeBinomial,
    Poisson,
    make_likelihood,
    nb_log_prob,
)
from .module import DecoderOnlyModule, frozen
from .multimodal import MultiHeadDecoder, MultiModalLikelihood
from .priors import GaussianMixture, NoPrior, StandardNormal, default_sd_init, make_prior, softball_log_prob
from .representation import RepresentationTable
from .weighted_em import MixtureFit, fit_weighted_mixture

__all__ = [
    "MLP", "mlp_decoder", "mlp_encoder",
    "Likelihood", "NegativeBinomial", "Gaussian", "Bernoulli", "Poisson", "BinaryAccessibility", "make_likelihood", "nb_log_prob",
    "GaussianMixture", "StandardNormal", "NoPrior", "make_prior", "softball_log_prob", "default_sd_init",
    "fit_weighted_mixture", "MixtureFit",
    "RepresentationTable", "DecoderOnlyModule", "frozen", "CovariateDecoderModule", "SupervisedGaussianMixture",
    "MultiHeadDecoder", "MultiModalLikelihood",
    "ConvEncoder", "ConvDecoder", "conv_encoder", "conv_decoder",
]
