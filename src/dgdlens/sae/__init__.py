"""Sparse autoencoders on cell embeddings, and metrics for what they recover.

>>> import dgdlens as dl
>>> sae = dl.sae.train_sae(Z, kind="topk", n_latents=2000, k=8, max_epochs=50, seed=0)
>>> sae = dl.sae.train_sae(adata, use_rep="X_dgd", kind="topk", k=8, validation_fraction=0.1, early_stopping=True)
>>> F = sae.encode(Z)              # scipy.sparse.csr_matrix, cells x latents
>>> dl.sae.metrics(sae, Z)         # FVU, MSE, cosine, L0, dead and dense fractions
>>> dl.pl.training_curves(sae.history_)  # per-epoch loss, FVU, L0 (a DataFrame)
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
from .init import geometric_median
from .train import train_sae
from .variants import SAE, VARIANTS, BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE, make_sae

__all__ = [
    "SAE", "ReLUSAE", "TopKSAE", "BatchTopKSAE", "JumpReLUSAE", "VARIANTS", "make_sae",
    "SAEConfig", "KINDS", "PRESETS", "paper_config",
    "train_sae", "geometric_median",
    "metrics", "correlation_matrix", "recovery", "RecoveryResult", "match_features", "categorical_auroc",
    "structure_identification", "recovery_report", "live_features",
    "EmbeddingRows", "load_embedding",
]
