"""User-facing models: the DGD, the general decoder-only learner and its autoencoder baseline."""

from ..nn.conv import conv_decoder, conv_encoder
from ..nn.decoders import mlp_decoder, mlp_encoder
from ._engine import DecoderOnlyModule, TrainConfig, Trainer, infer_latents
from .autoencoder import Autoencoder
from .decoder_only import DecoderOnly
from .dgd import DGD
from .sample_count import SampleCounts, count_parameters, sample_counts

__all__ = ["DGD", "DecoderOnly", "Autoencoder", "DecoderOnlyModule", "TrainConfig", "Trainer", "infer_latents",
           "mlp_decoder", "mlp_encoder", "conv_encoder", "conv_decoder", "sample_counts", "SampleCounts",
           "count_parameters"]
