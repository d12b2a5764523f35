"""Latent priors against direct scipy computations: GMM density, soft-ball, hyperpriors, sampling, init."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special as sps
import scipy.stats as st
import torch

from dgdlens.nn import GaussianMixture, NoPrior, StandardNormal, make_prior, softball_log_prob
from dgdlens.nn.priors import log_ball_volume, sample_softball


def _random_gmm(covariance: str, k: int = 4, dim: int = 3, seed: int = 0) -> GaussianMixture:
    gen = torch.Generator().manual_seed(seed)
    gmm = GaussianMixture(k, dim, covariance=covariance, softball_radius=2.0, softball_sharpness=5.0,
                          generator=gen).double()
    with torch.no_grad():
        gmm.neglogvar.copy_(torch.randn(gmm.neglogvar.shape, generator=gen, dtype=torch.float64))
        gmm.weight_logits.copy_(torch.randn(k, generator=gen, dtype=torch.float64))
    return gmm


def _scipy_mixture_logpdf(gmm: GaussianMixture, z: np.ndarray) -> np.ndarray:
    """log sum_k pi_k N(z | mu_k, diag(exp(-neglogvar_k))) from scipy's multivariate normal."""
    means = gmm.mean.detach().numpy()
    var = np.broadcast_to(np.exp(-gmm.neglogvar.detach().numpy()), means.shape)
    w = sps.softmax(gmm.weight_logits.detach().numpy())
    comps = np.stack([np.log(w[k]) + st.multivariate_normal(means[k], np.diag(var[k])).logpdf(z)
                      for k in range(len(w))], axis=1)
    return sps.logsumexp(comps, axis=1), comps


# ---------------------------------------------------------------------------------------------- GMM density
@pytest.mark.parametrize("covariance", ["diagonal", "isotropic", "fixed"])
def test_gmm_log_prob_equals_scipy_mixture(covariance):
    gmm = _random_gmm(covariance)
    z = np.random.default_rng(1).normal(0, 1.5, (50, 3))
    ref, comps = _scipy_mixture_logpdf(gmm, z)
    zt = torch.from_numpy(z)
    np.testing.assert_allclose(gmm.log_prob(zt).detach().numpy(), ref, rtol=1e-10)
    np.testing.assert_allclose(gmm.component_log_prob(zt).detach().numpy(), comps, rtol=1e-10)
    # responsibilities: the posterior over components, rows sum to one
    resp = gmm.responsibilities(zt).detach().numpy()
    np.testing.assert_allclose(resp, sps.softmax(comps, axis=1), rtol=1e-9)
    np.testing.assert_allclose(resp.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(gmm.assign(zt).numpy(), comps.argmax(1))


def test_isotropic_gmm_with_one_latent_dimension():
    gmm = _random_gmm("isotropic", k=3, dim=1)
    z = np.linspace(-3, 3, 11)[:, None]
    np.testing.assert_allclose(gmm.log_prob(torch.from_numpy(z)).detach().numpy(), _scipy_mixture_logpdf(gmm, z)[0],
                               rtol=1e-10)


def test_tight_components_assign_without_underflow():
    """Precisions of e^12 in 20 dimensions: exp() of the densities under/overflows, log space does not."""
    gmm = GaussianMixture(5, 20, sd_init=math.exp(-6.0), generator=torch.Generator().manual_seed(0))
    far = gmm.mean.detach()[[3, 1]] + 0.3  # far from every mean in units of the tiny sd
    assert torch.isfinite(gmm.log_prob(far)).all()
    resp = gmm.responsibilities(far)
    assert torch.isfinite(resp).all()
    torch.testing.assert_close(resp.sum(1), torch.ones(2))
    np.testing.assert_array_equal(gmm.assign(gmm.mean.detach()).numpy(), np.arange(5))


def test_gmm_gradients_flow_to_all_parameters():
    gmm = GaussianMixture(3, 4, generator=torch.Generator().manual_seed(0))
    z = torch.randn(10, 4, requires_grad=True)
    (gmm.log_prob(z).sum() + gmm.log_hyperprior()).backward()
    for p in (z, gmm.mean, gmm.neglogvar, gmm.weight_logits):
        assert p.grad is not None and torch.isfinite(p.grad).all()


# ---------------------------------------------------------------------------------------------- soft ball
@pytest.mark.parametrize("dim, radius, exact", [(1, 2.0, 4.0), (2, 1.5, math.pi * 1.5**2),
                                                (3, 2.0, 4 / 3 * math.pi * 8.0), (4, 1.0, math.pi**2 / 2)])
def test_log_ball_volume_matches_closed_forms(dim, radius, exact):
    assert log_ball_volume(dim, radius) == pytest.approx(math.log(exact), rel=1e-12)


def test_log_ball_volume_matches_monte_carlo_in_5d():
    rng = np.random.default_rng(0)
    pts = rng.uniform(-1.3, 1.3, (400_000, 5))
    vol = 2.6**5 * np.mean(np.linalg.norm(pts, axis=1) <= 1.3)
    assert math.exp(log_ball_volume(5, 1.3)) == pytest.approx(vol, rel=0.02)


def test_softball_density_formula_and_sharp_limit_normalisation():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    r, a = 2.0, 5.0
    ref = -math.log(math.pi * r**2) - np.log1p(np.exp(a * (np.array([0.0, 1.0, 5.0]) / r - 1)))
    np.testing.assert_allclose(softball_log_prob(x, r, a).numpy(), ref, rtol=1e-12)
    # with a sharp edge the density is uniform on the ball: it integrates to 1 (grid integral in 2-D)
    g = torch.linspace(-3, 3, 1201, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    dens = softball_log_prob(torch.stack([xx, yy], -1), r, 400.0).exp()
    assert float(dens.sum() * (g[1] - g[0]) ** 2) == pytest.approx(1.0, abs=0.01)
    # and it stays finite far outside
    assert torch.isfinite(softball_log_prob(torch.tensor([[1e6, 0.0]]), r, a)).all()


def test_sample_softball_is_uniform_in_the_ball():
    pts = sample_softball(100_000, 3, 2.0, generator=torch.Generator().manual_seed(0))
    norms = pts.norm(dim=1)
    assert float(norms.max()) <= 2.0 + 1e-6
    # uniform in a 3-ball: P(|x| < R/2) = 1/8, and the mean is the origin
    assert float((norms < 1.0).double().mean()) == pytest.approx(1 / 8, abs=0.005)
    np.testing.assert_allclose(pts.mean(0).numpy(), 0.0, atol=0.02)


# ---------------------------------------------------------------------------------------------- hyperprior
@pytest.mark.parametrize("covariance", ["diagonal", "isotropic", "fixed"])
def test_log_hyperprior_is_softball_plus_gaussian_plus_dirichlet(covariance):
    gmm = GaussianMixture(4, 3, covariance=covariance, softball_radius=1.5, softball_sharpness=3.0, sd_sd=0.8,
                          dirichlet_alpha=2.5, generator=torch.Generator().manual_seed(3)).double()
    with torch.no_grad():
        if covariance != "fixed":
            gmm.neglogvar.add_(torch.randn(gmm.neglogvar.shape, dtype=torch.float64))
        gmm.weight_logits.copy_(torch.tensor([0.3, -1.0, 2.0, 0.0], dtype=torch.float64))
    means = gmm.mean.detach().numpy()
    norms = np.linalg.norm(means, axis=1)
    softball = np.sum(-log_ball_volume(3, 1.5) - np.log1p(np.exp(3.0 * (norms / 1.5 - 1))))
    pi = sps.softmax([0.3, -1.0, 2.0, 0.0])
    dirichlet = st.dirichlet.logpdf(pi, np.full(4, 2.5))
    expected = softball + dirichlet
    if covariance != "fixed":
        nlv = gmm.neglogvar.detach().numpy()
        expected += st.norm.logpdf(nlv, loc=-2 * math.log(gmm.sd_init), scale=0.8).sum()
    assert float(gmm.log_hyperprior().detach()) == pytest.approx(expected, rel=1e-7)


def test_flat_dirichlet_contributes_only_its_normaliser():
    gmm = GaussianMixture(5, 2, dirichlet_alpha=1.0, generator=torch.Generator().manual_seed(0))
    before = float(gmm.log_hyperprior().detach())
    with torch.no_grad():
        gmm.weight_logits.copy_(torch.tensor([3.0, -2.0, 0.0, 1.0, 0.5]))
    assert float(gmm.log_hyperprior().detach()) == pytest.approx(before, rel=1e-6)
    assert st.dirichlet.logpdf(np.full(5, 0.2), np.ones(5)) == pytest.approx(math.lgamma(5), rel=1e-12)


# ---------------------------------------------------------------------------------------------- init
@pytest.mark.parametrize("k", [1, 9, 27, 80, 81, 200])
def test_reference_init_uses_unrounded_sd_and_means_in_the_ball(k):
    gmm = GaussianMixture(k, 20, softball_radius=2.0, sd_init="reference", generator=torch.Generator().manual_seed(0))
    sd = 0.2 * 2.0 / k  # the reference formula; multiDGD's round(., 2) reaches 0 for K >= 81
    assert gmm.sd_init == pytest.approx(sd, rel=1e-12)
    assert gmm.neglogvar_prior_mean == pytest.approx(-2 * math.log(sd), rel=1e-12)
    assert torch.isfinite(gmm.neglogvar).all()
    torch.testing.assert_close(gmm.std, torch.full((k, 20), sd), rtol=1e-5, atol=0)
    assert float(gmm.mean.detach().norm(dim=1).max()) <= 2.0 + 1e-5
    torch.testing.assert_close(gmm.log_weights().exp(), torch.full((k,), 1.0 / k))


def test_default_sd_init_is_a_sixth_of_the_radius_for_any_k():
    for k in (2, 10, 100):
        gmm = GaussianMixture(k, 4, softball_radius=3.0)
        assert gmm.sd_init == pytest.approx(0.5)
        torch.testing.assert_close(gmm.std, torch.full((k, 4), 0.5))
    with pytest.raises(ValueError, match="sd_init"):
        GaussianMixture(3, 2, sd_init="tight")


def test_init_is_seeded_by_the_generator_and_sd_init_overrides():
    a = GaussianMixture(4, 5, generator=torch.Generator().manual_seed(7))
    b = GaussianMixture(4, 5, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a.mean, b.mean)
    assert GaussianMixture(4, 5, sd_init=0.3).sd_init == 0.3
    fixed = GaussianMixture(4, 5, covariance="fixed")
    assert "neglogvar" not in dict(fixed.named_parameters())


@pytest.mark.parametrize("kwargs, match", [
    ({"n_components": 0}, "n_components"),
    ({"covariance": "full"}, "covariance"),
    ({"softball_radius": 0.0}, "softball"),
    ({"sd_init": -1.0}, "sd_init"),
])
def test_gmm_rejects_bad_arguments(kwargs, match):
    args = {"n_components": 3, "dim": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**args)


# ---------------------------------------------------------------------------------------------- sampling
def test_gmm_samples_follow_weights_means_and_sds():
    gmm = GaussianMixture(3, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gmm.mean.copy_(torch.tensor([[-5.0, 0.0], [0.0, 5.0], [5.0, 0.0]]))
        gmm.neglogvar.copy_(-2 * torch.log(torch.tensor([[0.5, 1.0], [0.2, 0.2], [1.0, 2.0]])))
        gmm.weight_logits.copy_(torch.log(torch.tensor([0.2, 0.3, 0.5])))
    z, comp = gmm.sample(120_000, generator=torch.Generator().manual_seed(1))
    freq = np.bincount(comp.numpy(), minlength=3) / len(comp)
    np.testing.assert_allclose(freq, [0.2, 0.3, 0.5], atol=0.006)
    for k in range(3):
        zk = z[comp == k]
        np.testing.assert_allclose(zk.mean(0).numpy(), gmm.mean[k].detach().numpy(), atol=0.03)
        np.testing.assert_allclose(zk.std(0).numpy(), gmm.std[k].detach().numpy(), rtol=0.03)


# ---------------------------------------------------------------------------------------------- others
def test_standard_normal_and_no_prior():
    z = torch.randn(7, 4, dtype=torch.float64)
    ref = st.multivariate_normal(np.zeros(4), np.eye(4)).logpdf(z.numpy())
    np.testing.assert_allclose(StandardNormal(4).log_prob(z).numpy(), ref, rtol=1e-12)
    assert float(StandardNormal(4).log_hyperprior()) == 0.0
    assert torch.equal(NoPrior().log_prob(z), torch.zeros(7, dtype=torch.float64))


def test_make_prior_names_configs_and_errors():
    assert isinstance(make_prior(None, 3), NoPrior)
    assert isinstance(make_prior("normal", 3), StandardNormal)
    gmm = make_prior("gmm", 3, n_components=4, covariance="isotropic")
    assert isinstance(gmm, GaussianMixture) and gmm.neglogvar.shape == (4, 1)
    rebuilt = make_prior(gmm.config(), 3)
    assert rebuilt.config() == gmm.config()
    assert make_prior(gmm, 3) is gmm
    with pytest.raises(ValueError, match="Unknown prior"):
        make_prior("vamp", 3)
