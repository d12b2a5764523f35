"""Sparse autoencoders on cell embeddings, and metrics for what they recover.

>>> import dgdlens as dl
>>> sae = dl.sae.train_sae(Z, kind="topk", n_latents=2000, k=8, epochs=50, device="cpu", seed=0)
>>> F = sae.encode(Z)              # scipy.sparse.csr_matrix, cells x latents
>>> dl.sae.metrics(sae, Z)         # FVU, MSE, cosine, L0, dead and dense fractions
>>> sae.save("my_sae"); sae = dl.sae.SAE.load("my_sae")

Variants (one class each, shared :class:`SAEConfig`): ``relu`` (ReLU + L1), ``topk``, ``batchtopk``,
``jumprelu``; ``train_sae(X, preset="paper")`` reproduces the reference SAE.
"""

from .config import KINDS, PRESETS, SAEConfig, paper_config
from .io import EmbeddingRows, load_embedding
from .metrics import (
    RecoveryResult,
    categorical_auroc,
    correlation_matrix,
    live_features,
    match_features,
    metrics,
    recovery,
    recovery_report,
    structure_identification,
)
from .train import geometric_median, train_sae
from .variants import SAE, VARIANTS, BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE, make_sae

__all__ = [
    "SAE", "ReLUSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "VARIANTS", "make_sae",
    "SAEConfig", "KINDS", "PRESETS", "paper_config",
    "train_sae", "geometric_median",
    "metrics", "correlation_matrix", "recovery", "RecoveryResult", "match_features", "categorical_auroc",
    "structure_identification", "recovery_report", "live_features",
    "EmbeddingRows", "load_embedding",
]
