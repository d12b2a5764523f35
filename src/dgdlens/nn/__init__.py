"""Torch building blocks: likelihoods, latent priors, decoders/encoders and the representation table."""

from .conv import ConvDecoder, ConvEncoder, conv_decoder, conv_encoder
from .covariates import CovariateDecoderModule, SupervisedGaussianMixture
from .decoders import MLP, mlp_decoder, mlp_encoder
from .likelihoods import Bernoulli, Gaussian, Likelihood, NegativeBinomial, make_likelihood, nb_log_prob
from .module import DecoderOnlyModule, frozen
from .priors import GaussianMixture, NoPrior, StandardNormal, default_sd_init, make_prior, softball_log_prob
from .representation import RepresentationTable

__all__ = [
    "MLP", "mlp_decoder", "mlp_encoder",
    "Likelihood", "NegativeBinomial", "Gaussian", "Bernoulli", "make_likelihood", "nb_log_prob",
    "GaussianMixture", "StandardNormal", "NoPrior", "make_prior", "softball_log_prob", "default_sd_init",
    "RepresentationTable", "DecoderOnlyModule", "frozen", "CovariateDecoderModule", "SupervisedGaussianMixture",
    "ConvEncoder", "ConvDecoder", "conv_encoder", "conv_decoder",
]
