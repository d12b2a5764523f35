"""One train/validation split policy for every model (DGD, DecoderOnly, Autoencoder, SAE, the demo)."""

from __future__ import annotations

import numpy as np

__all__ = ["train_validation_split", "MIN_VALIDATION"]

#: fewer validation samples than this is no validation split at all (its loss would be noise)
MIN_VALIDATION = 2


def train_validation_split(n: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into sorted training and validation positions.

    ``round(n * validation_fraction)`` samples are held out; when that is fewer than
    :data:`MIN_VALIDATION`, or would leave fewer than that many for training, nothing is held out
    (callers warn: early stopping then monitors the training loss).
    """
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    n = int(n)
    n_val = int(round(n * validation_fraction))
    if n_val < MIN_VALIDATION or n - n_val < MIN_VALIDATION:
        n_val = 0
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])
