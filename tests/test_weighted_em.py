"""Weighted EM for the mixture refit (``dgdlens.nn.weighted_em``, ``GaussianMixture.fit_to(sample_weight=)``).

Independent truths: sklearn's ``GaussianMixture`` from the same start (unit weights: the same fit; integer
weights: the same fit as to the rows repeated), with the start's parameters computed here by numpy group
statistics; and a planted mixture whose rare component a sample over-represents, weighted back by inverse
inclusion probability (Horvitz-Thompson), against the planted proportions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture as SkGaussianMixture

from dgdlens.nn.priors import GaussianMixture
from dgdlens.nn.weighted_em import fit_weighted_mixture, weighted_em


def _planted(n: int, proportions, seed: int, dim: int = 3):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 1.0], [0.0, 5.0, -2.0]])[:, :dim]
    sds = np.array([[0.5, 1.0, 0.7], [0.8, 0.4, 0.6], [0.6, 0.6, 1.2]])[:, :dim]
    labels = rng.choice(len(proportions), n, p=proportions)
    return centres[labels] + sds[labels] * rng.normal(size=(n, dim)), labels


def _sklearn_from_labels(x, labels, k, kind, iters, repeat=None):
    """sklearn's EM for ``iters`` iterations from the hard labels' group statistics (on ``x`` repeated
    ``repeat`` times row by row when given)."""
    if repeat is not None:
        x, labels = np.repeat(x, repeat, axis=0), np.repeat(labels, repeat)
    counts = np.bincount(labels, minlength=k)
    means = np.stack([x[labels == j].mean(0) for j in range(k)])
    var = np.stack([x[labels == j].var(0) for j in range(k)]) + 1e-6
    if kind == "spherical":
        var = var.mean(1)
    gm = SkGaussianMixture(k, covariance_type=kind, weights_init=counts / counts.sum(), means_init=means,
                           precisions_init=1.0 / var, reg_covar=1e-6, max_iter=iters, tol=0.0)
    with pytest.warns(Warning):  # sklearn warns that EM stopped at max_iter before tol=0
        gm.fit(x)
    return gm


@pytest.mark.parametrize("kind", ["diag", "spherical"])
def test_unit_weights_are_sklearns_em(kind):
    x, truth = _planted(600, [0.5, 0.3, 0.2], seed=0)
    labels = (truth + (np.arange(600) % 7 == 0)) % 3  # a start that EM has to repair
    fit = weighted_em(x, np.ones(600), np.eye(3)[labels], kind, max_iter=15, tol=0.0)
    gm = _sklearn_from_labels(x, labels, 3, kind, iters=15)
    np.testing.assert_allclose(fit.means, gm.means_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fit.weights, gm.weights_, rtol=1e-8)
    np.testing.assert_allclose(fit.covariances, gm.covariances_, rtol=1e-8)


@pytest.mark.parametrize("kind", ["diag", "spherical"])
def test_integer_weights_are_the_rows_repeated(kind):
    x, truth = _planted(400, [0.5, 0.3, 0.2], seed=1)
    repeat = np.random.default_rng(2).integers(1, 5, 400)
    labels = (truth + (np.arange(400) % 5 == 0)) % 3
    fit = weighted_em(x, repeat.astype(float), np.eye(3)[labels], kind, max_iter=12, tol=0.0)
    gm = _sklearn_from_labels(x, labels, 3, kind, iters=12, repeat=repeat)
    np.testing.assert_allclose(fit.means, gm.means_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fit.weights, gm.weights_, rtol=1e-8)
    np.testing.assert_allclose(fit.covariances, gm.covariances_, rtol=1e-8)
    # the weighted mean log-likelihood is sklearn's score of the repeated rows (parameters one step apart:
    # ours is read before the last M-step, so compare after a converged fit instead)
    full = fit_weighted_mixture(x, repeat.astype(float), 3, kind, seed=0, tol=1e-10, max_iter=500)
    ref = SkGaussianMixture(3, covariance_type=kind, reg_covar=1e-6, tol=1e-10, max_iter=500, random_state=0,
                            n_init=3).fit(np.repeat(x, repeat, axis=0))
    assert full.converged
    assert full.lower_bound == pytest.approx(ref.score(np.repeat(x, repeat, axis=0)), abs=1e-6)


def test_inverse_probability_weights_recover_the_planted_proportions():
    """A sample keeps every cell of a 2 % component and a tenth of the others; unweighted EM then sees it
    at about 17 %, weighted EM at its planted 2 %."""
    x, labels = _planted(60_000, [0.68, 0.30, 0.02], seed=3)
    rng = np.random.default_rng(4)
    keep_prob = np.where(labels == 2, 1.0, 0.1)
    kept = rng.random(len(x)) < keep_prob
    xs, ls, w = x[kept], labels[kept], 1.0 / keep_prob[kept]
    fit = fit_weighted_mixture(xs, w, 3, "diag", seed=0)
    order = np.argsort(fit.means[:, 1] * 10 + fit.means[:, 0])  # components by their centres: 0, 1, 2
    np.testing.assert_allclose(fit.weights[order], [0.68, 0.30, 0.02], atol=0.01)
    np.testing.assert_allclose(fit.means[order], [[0, 0, 0], [4, 0, 1], [0, 5, -2]], atol=0.1)
    plain = SkGaussianMixture(3, covariance_type="diag", random_state=0).fit(xs)
    assert plain.weights_.min() > 0.1  # what the refit saw before it took the weights
    assert np.mean(ls == 2) > 0.1


@pytest.mark.parametrize("start", ["kmeans", "unweighted"])
def test_fit_to_weighs_an_over_represented_component_back(start):
    """Either start of the weighted EM gives the planted proportions of the whole data, not the sample's."""
    x, labels = _planted(40_000, [0.68, 0.30, 0.02], seed=8)
    keep_prob = np.where(labels == 2, 1.0, 0.1)
    kept = np.random.default_rng(9).random(len(x)) < keep_prob
    prior = GaussianMixture(3, 3)
    prior.fit_to(torch.from_numpy(x[kept]).float(), sample_weight=1.0 / keep_prob[kept], weighted_start=start)
    means = prior.mean.detach().numpy()
    order = np.argsort(means[:, 1] * 10 + means[:, 0])
    np.testing.assert_allclose(prior.log_weights().exp().detach().numpy()[order], [0.68, 0.30, 0.02], atol=0.01)
    np.testing.assert_allclose(means[order], [[0, 0, 0], [4, 0, 1], [0, 5, -2]], atol=0.1)


def test_fit_to_with_weights_matches_the_rows_repeated():
    x, _ = _planted(3_000, [0.6, 0.3, 0.1], seed=5)
    repeat = np.random.default_rng(6).integers(1, 4, 3_000)
    weighted = GaussianMixture(3, 3, generator=torch.Generator().manual_seed(0))
    repeated = GaussianMixture(3, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        weighted.fit_to(torch.from_numpy(x).float(), sample_weight=torch.from_numpy(repeat).float())
        repeated.fit_to(torch.from_numpy(np.repeat(x, repeat, axis=0)).float(), max_samples=None)
    order_w, order_r = (np.argsort(m.mean.detach().numpy()[:, 0] + 10 * m.mean.detach().numpy()[:, 1])
                        for m in (weighted, repeated))
    for name in ("mean", "neglogvar"):
        np.testing.assert_allclose(getattr(weighted, name).detach().numpy()[order_w],
                                   getattr(repeated, name).detach().numpy()[order_r], atol=2e-3)
    np.testing.assert_allclose(weighted.log_weights().exp().detach().numpy()[order_w],
                               repeated.log_weights().exp().detach().numpy()[order_r], atol=2e-4)


def test_bad_weights_are_refused_with_the_reason():
    x, _ = _planted(100, [0.5, 0.3, 0.2], seed=7)
    prior = GaussianMixture(3, 3)
    with pytest.raises(ValueError, match="one per latent"):
        prior.fit_to(torch.from_numpy(x).float(), sample_weight=np.ones(99))
    for bad in (np.r_[-1.0, np.ones(99)], np.r_[np.nan, np.ones(99)], np.zeros(100)):
        with pytest.raises(ValueError, match="non-negative"):
            prior.fit_to(torch.from_numpy(x).float(), sample_weight=bad)
    with pytest.raises(ValueError, match="weighted_start"):
        prior.fit_to(torch.from_numpy(x).float(), sample_weight=np.ones(100), weighted_start="random")
    with pytest.raises(ValueError, match="weighted latents"):
        fit_weighted_mixture(x, np.r_[1.0, 1.0, np.zeros(98)], 3, "diag")
    with pytest.raises(ValueError, match="covariance"):
        fit_weighted_mixture(x, np.ones(100), 3, "full")
