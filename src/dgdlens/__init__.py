"""dgdlens: decoder-only generative models of single-cell data and lenses on their latent spaces.

>>> import dgdlens as dl
>>> model = dl.DGD(adata, labels_key="cell_type").train()
>>> model.add_to_adata()                                      # obsm["X_dgd"], obs["dgd_cluster"]
>>> sae = dl.tl.sae(adata, use_rep="X_dgd", kind="topk", n_latents=256, k=8)   # obsm["X_sae"]
>>> dl.tl.annotate_features(adata, use_rep="X_sae", gene_sets="go_bp")      # uns["dgdlens_lens"]
"""

from ._version import __version__  # noqa: E402

from . import data, evaluate, lens, models, nn, plotting, report, sae, sim, tl, train  # noqa: E402
from .models import DGD, Autoencoder, DecoderOnly  # noqa: E402
from .perturb import gene2peak  # noqa: E402
from .steer import steer  # noqa: E402

# scanpy-style aliases: plotting is also reachable as dl.pl
pl = plotting

__all__ = ["DGD", "DecoderOnly", "Autoencoder", "steer", "gene2peak", "data", "evaluate", "lens", "models", "nn", "plotting",
           "pl", "report", "sae", "sim", "tl", "train", "__version__"]
