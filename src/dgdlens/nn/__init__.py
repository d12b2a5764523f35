"""Torch building blocks: likelihoods, latent priors, decoders/encoders and the representation table."""

from .conv import ConvDecoder, ConvEncoder, conv_decoder, conv_encoder
from .decoders import MLP, mlp_decoder, mlp_encoder
from .likelihoods import Bernoulli, Gaussian, Likelihood, NegativeBinomial, make_likelihood, nb_log_prob
from .priors import GaussianMixture, NoPrior, StandardNormal, default_sd_init, make_prior, softball_log_prob
from .representation import RepresentationTable, make_representation_optimizer

__all__ = [
    "MLP", "mlp_decoder", "mlp_encoder",
    "Likelihood", "NegativeBinomial", "Gaussian", "Bernoulli", "make_likelihood", "nb_log_prob",
    "GaussianMixture", "StandardNormal", "NoPrior", "make_prior", "softball_log_prob", "default_sd_init",
    "RepresentationTable", "make_representation_optimizer",
    "ConvEncoder", "ConvDecoder", "conv_encoder", "conv_decoder",
]
