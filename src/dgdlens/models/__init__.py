"""User-facing models: the DGD, the general decoder-only learner and its autoencoder baseline.

The training engine (runner, plans, held-out inference) lives in :mod:`dgdlens.train`.
"""

from ..nn.conv import conv_decoder, conv_encoder
from ..nn.decoders import mlp_decoder, mlp_encoder
from .autoencoder import Autoencoder
from .decoder_only import DecoderOnly
from .dgd import DGD
from .sample_count import SampleCounts, count_parameters, sample_counts

__all__ = ["DGD", "DecoderOnly", "Autoencoder", "mlp_decoder", "mlp_encoder", "conv_encoder", "conv_decoder",
           "sample_counts", "SampleCounts", "count_parameters"]
