"""dgdlens: decoder-only generative models of single-cell data and lenses on their latent spaces."""

__version__ = "0.1.0"
