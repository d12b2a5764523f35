"""Plotting functions (scanpy-style ``pl``) for dgdlens results.

Every function only draws: it takes plain data (numpy arrays, scipy sparse matrices, pandas objects)
or an AnnData with the data under a key, and returns a :class:`matplotlib.figure.Figure`, or draws on
the ``ax`` it is given and returns that axes' figure. As in scanpy, plots read an embedding from
``obsm[basis]`` (``basis="X_umap"``), while the ``dl.tl`` verbs that compute one read their input
from ``obsm[use_rep]``. Figures are built without ``pyplot``: nothing is shown, nothing is registered
globally, and everything works on a headless machine. Save with ``fig.savefig(path)``; in Jupyter, a
returned figure is displayed as the cell's output.

What the plots show is computed elsewhere: UMAP coordinates by :func:`dgdlens.tl.umap`, cluster
agreement, training-history and fold-change summaries by :mod:`dgdlens.evaluate`, SAE firing
statistics by :mod:`dgdlens.sae.activations`.
"""

from __future__ import annotations

from .clusters import contingency_heatmap
from .embedding import embedding, feature_activations
from .sae import activation_frequency
from .steering import steering_lfc
from .training import training_curves

__all__ = [
    "training_curves", "embedding", "feature_activations", "contingency_heatmap", "activation_frequency",
    "steering_lfc",
]
