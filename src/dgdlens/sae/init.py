"""What an SAE learns from the data before its first step: the input normalisation and the data-dependent
initialisation (``b_dec`` at the data's geometric median, the encoder scaled to the data, JumpReLU thresholds
at the target sparsity). :meth:`dgdlens.sae.SAE.prepare_for_training` calls these; variant-specific parts
are methods of the variants (no type checks here).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from .io import EmbeddingRows

if TYPE_CHECKING:  # pragma: no cover
    from .variants import SAE

__all__ = ["geometric_median", "normalisation_statistics", "init_from_data", "scale_encoder_to_data"]


@torch.no_grad()
def normalisation_statistics(data: EmbeddingRows, idx: np.ndarray, mode: str, *, n_total: int | None = None,
                             reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                             chunk: int = 65_536) -> tuple[np.ndarray, float]:
    """Mean vector of the training cells and the scalar of ``SAEConfig.normalize`` (float64 sums).

    ``idx``: this process's training rows; ``reduce_sum`` (under ``torchrun``) sums the statistics over the
    processes, whose rows together are the ``n_total`` training cells.
    """
    total = torch.zeros(data.n_vars, dtype=torch.float64)
    sq_norm = 0.0
    for start in range(0, len(idx), chunk):
        x = data.rows(idx[start:start + chunk]).double()
        total += x.sum(0).cpu()
        sq_norm += float(x.pow(2).sum())
    if reduce_sum is not None:
        both = reduce_sum(torch.cat([total, torch.tensor([sq_norm], dtype=torch.float64)]))
        total, sq_norm = both[:-1].cpu(), float(both[-1])
    n, d = (len(idx) if n_total is None else int(n_total)), data.n_vars
    mean = (total / n).numpy()
    if mode in ("none", "center"):
        return mean, 1.0
    mean_sq = sq_norm / n
    if mode == "center_scale":
        mean_sq -= float((mean**2).sum())  # E||x - mu||^2 = E||x||^2 - ||mu||^2
    scale = math.sqrt(max(mean_sq, 0.0) / d)
    if not scale > 1e-12 * (1.0 + float(np.abs(mean).max())):
        raise ValueError(
            "X has (numerically) zero variance across cells, so it cannot be normalised; check the embedding, "
            "or pass normalize='none'."
        )
    return mean, scale


def geometric_median(points: torch.Tensor, *, max_iter: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """Geometric median of the rows of ``points`` (Weiszfeld's algorithm, float64).

    The point minimising the sum of Euclidean distances to the rows; a robust centre (``b_dec``'s default
    start).

    Parameters
    ----------
    points
        ``(n_points, d)`` tensor.
    max_iter
        Maximum Weiszfeld iterations (starting from the mean).
    tol
        Stop when an iteration moves the estimate by at most ``tol * (1 + ||median||)``.

    Returns
    -------
    torch.Tensor
        ``(d,)`` median, in ``points``' dtype and on its device.
    """
    pts = points.double()
    median = pts.mean(0)
    for _ in range(max_iter):
        dist = (pts - median).norm(dim=1).clamp_min(1e-12)
        weights = 1.0 / dist
        new = (weights[:, None] * pts).sum(0) / weights.sum()
        shift = float((new - median).norm())
        median = new
        if shift <= tol * (1.0 + float(median.norm())):
            break
    return median.to(points.dtype)


@torch.no_grad()
def init_from_data(model: SAE, data: EmbeddingRows, idx: np.ndarray, seed: int, n_sample: int = 8192) -> None:
    """Data-dependent initialisation on a seeded sample of training cells (the same on every process):
    ``b_dec`` (geometric median or mean), the variant's own start (JumpReLU with a target L0 ``k``: thresholds
    at each latent's ``1 - k / n_latents`` quantile, so training starts at the target sparsity instead of as a
    dense ReLU) and the encoder scale (transpose init)."""
    cfg = model.config
    rng = np.random.default_rng(seed + 1)
    sample = idx if len(idx) <= n_sample else np.sort(rng.choice(idx, n_sample, replace=False))
    x_n = model.normalise(data.rows(sample, model.device))
    if cfg.b_dec_init == "zeros":
        model.b_dec.zero_()
    elif cfg.b_dec_init == "geometric_median":
        model.b_dec.copy_(geometric_median(x_n))
    elif cfg.b_dec_init == "mean":
        model.b_dec.copy_(x_n.mean(0))
    model.init_variant_from_sample(x_n)
    if cfg.init == "transpose":
        scale_encoder_to_data(model, x_n[:2048])


@torch.no_grad()
def scale_encoder_to_data(model: SAE, x_n: torch.Tensor) -> None:
    """Scale the transpose-initialised encoder so the first reconstruction has the least-squares magnitude.

    With ``W_enc = W_dec^T`` every active latent adds its full projection, so ``m`` random unit directions
    reconstruct ``x`` about ``m / (2 d)`` times too large (ReLU) and wide dictionaries start with FVU >> 1
    and spend many steps shrinking the encoder. ReLU and TopK are positively homogeneous (and ``b_enc`` is
    zero here), so scaling the encoder by ``s`` scales the reconstruction by exactly ``s``; JumpReLU is too
    when its thresholds are scaled along (:meth:`~dgdlens.sae.SAE.scale_encoder_`).
    """
    target = x_n - model.b_dec
    pre = model.pre_activations(x_n)
    recon = model.activate_train(pre) @ model.W_dec
    denom = float((recon * recon).sum())
    if denom > 0:
        scale = float((recon * target).sum()) / denom
        if scale > 0:
            model.scale_encoder_(scale)
