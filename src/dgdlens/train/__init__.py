"""Training for every model: one runner, one small training plan per model, one checkpoint format.

- :class:`Runner` / :class:`RunnerConfig`: epochs, validation, early stopping with restore-best,
  progress, checkpoints (safetensors + JSON, no pickle), Ctrl-C, the distributed strategy.
- :class:`TrainingPlan`: what one model's step does (:class:`DecoderOnlyPlan` for the DGD and
  DecoderOnly, :class:`AutoencoderPlan`, :class:`SAEPlan`).
- :func:`make_strategy`: single process, or data-parallel under ``torchrun``.
"""

from .autoencoder_plan import AutoencoderPlan, AutoencoderPlanConfig
from .checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from .decoder_only_plan import DecoderOnlyPlan, DecoderOnlyPlanConfig
from .fitted import FittedState
from .inference import infer_latents, optimise_latents
from .plan import TrainingPlan
from .sae_plan import SAEPlan
from .latent_init import pca_latents, pca_residuals
from .sketch import residual_sample, sketch_sample
from .runner import Runner, RunnerConfig, TrainingInterrupted
from .strategy import DataParallel, SingleProcess, Strategy, make_strategy

__all__ = ["Runner", "RunnerConfig", "TrainingInterrupted", "TrainingPlan", "DecoderOnlyPlan", "DecoderOnlyPlanConfig",
           "AutoencoderPlan", "AutoencoderPlanConfig", "SAEPlan", "FittedState", "Strategy", "SingleProcess",
           "DataParallel", "make_strategy", "CheckpointError", "read_checkpoint", "write_checkpoint",
           "infer_latents", "optimise_latents", "sketch_sample", "residual_sample", "pca_latents", "pca_residuals"]
