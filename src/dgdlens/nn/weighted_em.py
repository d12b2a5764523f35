"""EM for a Gaussian mixture with per-sample weights (diagonal or spherical covariances).

Why hand-written: sklearn's ``GaussianMixture`` takes no ``sample_weight``, and the DGD refits its mixture
to the latents of a weighted sample of cells (the decoder's sample keeps rare cells at a higher rate and
weighs them back by their inverse inclusion probability). Drawing a sample by weight with replacement and
fitting that instead duplicates cells and drops others. This follows sklearn's algorithm step for step
(k-means start from hard labels, the same M-step with ``reg_covar``, stopping when the mean log-likelihood
moves by less than ``tol``, the best of ``n_init`` starts), with every sum weighted; with all weights equal
to 1 it is sklearn's fit, and with integer weights it is sklearn's fit to the rows repeated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

__all__ = ["MixtureFit", "fit_weighted_mixture", "weighted_em"]

_LOG_2PI = math.log(2 * math.pi)


@dataclass
class MixtureFit:
    """A mixture fitted by :func:`fit_weighted_mixture` or :func:`weighted_em`.

    Parameters
    ----------
    weights
        Mixture weights, ``(K,)``, summing to 1.
    means
        Component means, ``(K, d)``.
    covariances
        Variances: ``(K, d)`` for diagonal components, ``(K,)`` for spherical ones (``reg_covar`` included).
    lower_bound
        The weighted mean log-likelihood per sample at the last E-step.
    converged
        Whether EM stopped on ``tol`` before ``max_iter``.
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    lower_bound: float
    converged: bool


def _log_prob(x: np.ndarray, means: np.ndarray, covariances: np.ndarray) -> np.ndarray:
    """``log N(x_n | mean_k, diag(var_k))``, ``n x K``, by the expanded square (one matrix product)."""
    var = covariances if covariances.ndim == 2 else np.repeat(covariances[:, None], x.shape[1], axis=1)
    prec = 1.0 / var
    sq = (x**2) @ prec.T - 2.0 * x @ (means * prec).T + (means**2 * prec).sum(1)
    return -0.5 * (x.shape[1] * _LOG_2PI + np.log(var).sum(1) + sq)


def _m_step(x: np.ndarray, resp: np.ndarray, w: np.ndarray, covariance: str, reg_covar: float):
    """Weighted maximum-likelihood weights, means and covariances given responsibilities."""
    rw = resp * w[:, None]
    nk = rw.sum(0) + 10 * np.finfo(resp.dtype).eps
    means = (rw.T @ x) / nk[:, None]
    var = (rw.T @ x**2) / nk[:, None] - means**2 + reg_covar
    if covariance == "spherical":
        var = var.mean(1)
    return nk / nk.sum(), means, var


def weighted_em(x: np.ndarray, w: np.ndarray, resp: np.ndarray, covariance: str, *, reg_covar: float = 1e-6,
                max_iter: int = 200, tol: float = 1e-3) -> MixtureFit:
    """EM from initial responsibilities ``resp`` (``n x K``; hard labels for a k-means start).

    Parameters
    ----------
    x
        Samples, ``n x d`` (float64).
    w
        Non-negative sample weights, ``(n,)``; only their ratios matter.
    resp
        Initial responsibilities; the first M-step turns them into parameters.
    covariance
        ``"diag"`` or ``"spherical"`` (sklearn's names).
    reg_covar, max_iter, tol
        As sklearn's ``GaussianMixture``: added to every variance, most EM iterations, and the change of
        the weighted mean log-likelihood below which EM stops.

    Returns
    -------
    MixtureFit
    """
    weights, means, var = _m_step(x, resp, w, covariance, reg_covar)
    total = w.sum()
    bound, converged = -np.inf, False
    for _ in range(max_iter):
        log_prob = _log_prob(x, means, var) + np.log(weights)
        norm = logsumexp(log_prob, axis=1)
        previous, bound = bound, float(w @ norm / total)
        weights, means, var = _m_step(x, np.exp(log_prob - norm[:, None]), w, covariance, reg_covar)
        if abs(bound - previous) < tol:
            converged = True
            break
    return MixtureFit(weights, means, var, bound, converged)


def fit_weighted_mixture(x: np.ndarray, w: np.ndarray, n_components: int, covariance: str, *, seed: int = 0,
                         n_init: int = 5, reg_covar: float = 1e-6, max_iter: int = 200,
                         tol: float = 1e-3) -> MixtureFit:
    """The best (highest weighted mean log-likelihood) of ``n_init`` EM runs, each from a weighted k-means
    start (sklearn's ``KMeans`` with ``sample_weight``, one shared seeded random state as sklearn's own
    ``GaussianMixture`` uses).

    Parameters
    ----------
    x, w
        Samples ``n x d`` and their non-negative weights ``(n,)``.
    n_components
        K; at most the number of samples with positive weight.
    covariance
        ``"diag"`` or ``"spherical"``.
    seed, n_init, reg_covar, max_iter, tol
        As sklearn's ``GaussianMixture`` (``random_state`` for ``seed``).

    Returns
    -------
    MixtureFit

    Raises
    ------
    ValueError
        For weights that are negative, not finite, all zero or of the wrong length, fewer positively
        weighted samples than components, or an unknown covariance.
    """
    from sklearn.cluster import KMeans

    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    if covariance not in {"diag", "spherical"}:
        raise ValueError(f"covariance must be 'diag' or 'spherical', got {covariance!r}")
    if w.shape != (x.shape[0],) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"sample weights must be {x.shape[0]} finite non-negative numbers, not all zero")
    if int((w > 0).sum()) < n_components:
        raise ValueError(f"Cannot fit {n_components} mixture components to {int((w > 0).sum())} weighted latents.")
    state = np.random.RandomState(seed)
    best = None
    for _ in range(n_init):
        labels = KMeans(n_components, n_init=1, random_state=state).fit(x, sample_weight=w).labels_
        fit = weighted_em(x, w, np.eye(n_components)[labels], covariance, reg_covar=reg_covar,
                          max_iter=max_iter, tol=tol)
        if best is None or fit.lower_bound > best.lower_bound:
            best = fit
    return best
