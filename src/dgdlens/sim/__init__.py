"""Simulators with full ground truth.

- :func:`simulate_grn`: the decoder-only ("manifold") paper's gene-regulatory simulator (regulator
  activities per cell type, a sparse regulator-to-gene network, saturating response, library size,
  NB or Poisson counts).
- :func:`simulate_superposition`: the SAE paper's simulation (programs -> covariate offset ->
  cell-type masks -> genes), every level kept; :func:`embed_superposition` embeds it with an autoencoder.
- :func:`planted_sparse_codes`: sparse codes in superposition (more atoms than dimensions).
- :func:`simulate_batches`: cell types seen through batches (gene-wise and library batch effects, a
  batch lacking some types, unseen batches), the truth in ``uns``.
- :func:`simulate_count_chunks`: large count matrices generated chunk by chunk (scale benchmark).
- :func:`simulate_multiome`: paired RNA + ATAC (MuData), peaks linked to marker genes, the truth in ``uns``.
"""

from .batches import simulate_batches
from .counts import simulate_count_chunks
from .grn import GRNSimulation, hill_response, simulate_grn
from .multiome import simulate_multiome
from .superposition import (
    PlantedSparseCodes,
    SuperpositionData,
    SuperpositionEmbedding,
    embed_superposition,
    load_superposition,
    planted_sparse_codes,
    reference_hidden_sizes,
    simulate_superposition,
    simulate_superposition_runs,
)

__all__ = [
    "simulate_grn", "GRNSimulation", "hill_response",
    "simulate_superposition", "simulate_superposition_runs", "load_superposition", "SuperpositionData",
    "embed_superposition", "SuperpositionEmbedding", "planted_sparse_codes", "PlantedSparseCodes",
    "reference_hidden_sizes",
    "simulate_count_chunks", "simulate_batches", "simulate_multiome",
]
