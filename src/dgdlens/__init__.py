"""dgdlens: decoder-only generative models of single-cell data and lenses on their latent spaces."""

__version__ = "0.1.0"

from . import data, models, nn  # noqa: E402
from .models import DGD  # noqa: E402

__all__ = ["DGD", "data", "models", "nn", "__version__"]
