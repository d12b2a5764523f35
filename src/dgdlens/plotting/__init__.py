"""Plotting functions (scanpy-style ``pl``) for dgdlens results.

Every function takes plain data (numpy arrays, scipy sparse matrices, pandas objects; AnnData where
natural) and returns a :class:`matplotlib.figure.Figure`, or draws on the ``ax`` it is given and
returns that axes' figure. Figures are built without ``pyplot``: nothing is shown, nothing is
registered globally, and everything works on a headless machine. Save with ``fig.savefig(path)``;
in Jupyter, a returned figure is displayed as the cell's output.

Helpers that compute what is plotted are exported too: :func:`compute_umap`,
:func:`contingency_table`, :func:`cluster_agreement`, :func:`firing_rates`,
:func:`activation_summary`, :func:`top_changed_genes`.
"""

from __future__ import annotations

from .clusters import cluster_agreement, contingency_heatmap, contingency_table
from .embedding import activation_columns, compute_umap, embedding, feature_activations
from .sae import activation_frequency, activation_summary, firing_rates
from .steering import as_lfc_series, steering_lfc, top_changed_genes
from .training import find_best_epoch, history_metrics, training_curves

__all__ = [
    "training_curves", "history_metrics", "find_best_epoch",
    "compute_umap", "embedding", "feature_activations", "activation_columns",
    "contingency_table", "cluster_agreement", "contingency_heatmap",
    "firing_rates", "activation_summary", "activation_frequency",
    "as_lfc_series", "top_changed_genes", "steering_lfc",
]
