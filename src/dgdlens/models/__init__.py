"""User-facing models: the DGD, the general decoder-only learner and its autoencoder baseline."""

from ..nn.decoders import mlp_decoder, mlp_encoder
from ._engine import DecoderOnlyModule, TrainConfig, Trainer, infer_latents
from .dgd import DGD

__all__ = ["DGD", "DecoderOnlyModule", "TrainConfig", "Trainer", "infer_latents", "mlp_decoder", "mlp_encoder"]
