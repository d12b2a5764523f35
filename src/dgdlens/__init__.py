"""dgdlens: decoder-only generative models of single-cell data and lenses on their latent spaces.

>>> import dgdlens as dl
>>> model = dl.DGD(adata, labels_key="cell_type").train()
>>> sae = dl.sae.train_sae(model.get_latent_representation(), kind="topk", n_latents=256, k=8)
>>> table = dl.lens.annotate(sae.encode(model.get_latent_representation()), adata, gene_sets="go_bp")
>>> result = dl.steer(model, sae, adata, feature=3, mode="add", value=2.0)
"""

from ._version import __version__  # noqa: E402

from . import data, evaluate, lens, models, nn, plotting, report, sae, sim, tl  # noqa: E402
from .models import DGD, Autoencoder, DecoderOnly  # noqa: E402
from .steer import steer  # noqa: E402

# scanpy-style aliases: plotting is also reachable as dl.pl
pl = plotting

__all__ = ["DGD", "DecoderOnly", "Autoencoder", "steer", "data", "evaluate", "lens", "models", "nn", "plotting",
           "pl", "report", "sae", "sim", "tl", "__version__"]
