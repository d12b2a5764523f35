"""Output likelihoods against independent references (scipy.stats, mpmath) and their sampling moments."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import scipy.stats as st
import torch

from dgdlens.nn import Bernoulli, Gaussian, NegativeBinomial, make_likelihood, nb_log_prob


def _nb(x, m, r):
    """nb_log_prob on float64 numpy inputs (mean m, shape r)."""
    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
    return nb_log_prob(t(x), t(m).log(), t(r).log()).numpy()


def _nb_mpmath(x, m, r) -> float:
    """The NB log-pmf at 50 digits: the reference for values where float64 scipy gives up."""
    mpmath.mp.dps = 50
    x, m, r = mpmath.mpf(x), mpmath.mpf(m), mpmath.mpf(r)
    return float(mpmath.loggamma(x + r) - mpmath.loggamma(r) - mpmath.loggamma(x + 1)
                 + x * mpmath.log(m / (m + r)) + r * mpmath.log(r / (m + r)))


# ---------------------------------------------------------------------------------------------- NB log-pmf
def test_nb_log_prob_equals_scipy_nbinom_on_a_grid():
    x = np.array([0, 1, 2, 5, 17, 100, 1000], dtype=np.float64)[:, None, None]
    m = np.array([0.01, 0.5, 3.0, 40.0, 900.0])[None, :, None]
    r = np.array([0.05, 1.0, 2.0, 30.0, 1e4])[None, None, :]
    x, m, r = np.broadcast_arrays(x, m, r)
    ours = _nb(x, m, r)
    ref = st.nbinom.logpmf(x, n=r, p=r / (r + m))
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "x, m, r",
    [
        (0, 1e-30, 2.0),  # a gene the decoder switched off
        (3, 1e-30, 2.0),  # ... yet observed: very unlikely, but finite
        (0, 1e6, 2.0),  # huge mean, zero count
        (1_000_000, 1e6, 2.0),
        (50_000, 3e4, 1e8),  # r -> infinity (Poisson limit)
        (7, 5.0, 1e-6),  # r -> 0 (extreme over-dispersion)
        (250_000, 1.0, 1.0),  # count far in the tail
    ],
)
def test_nb_log_prob_is_finite_and_exact_at_extremes(x, m, r):
    ours = float(_nb([x], [m], [r])[0])
    assert math.isfinite(ours)
    assert ours <= 1e-12  # a log-probability
    assert ours == pytest.approx(_nb_mpmath(x, m, r), rel=1e-7, abs=1e-7)


def test_nb_log_prob_has_finite_gradients_at_extremes():
    x = torch.tensor([0.0, 3.0, 0.0, 1e6, 50_000.0], dtype=torch.float32)
    log_m = torch.tensor([-69.0, -69.0, 13.8, 13.8, 10.3], requires_grad=True)  # 1e-30 ... 1e6
    log_r = torch.tensor([0.7, 0.7, 0.7, 0.7, 18.4], requires_grad=True)  # r = 2 ... 1e8
    lp = nb_log_prob(x, log_m, log_r)
    assert torch.isfinite(lp).all()
    lp.sum().backward()
    assert torch.isfinite(log_m.grad).all() and torch.isfinite(log_r.grad).all()


def test_nb_log_prob_in_float32_matches_float64():
    rng = np.random.default_rng(0)
    m = rng.lognormal(0, 2, 500)
    r = rng.lognormal(0, 1, 500)
    x = rng.negative_binomial(r, r / (r + m)).astype(np.float64)
    ref = st.nbinom.logpmf(x, n=r, p=r / (r + m))
    ours32 = nb_log_prob(torch.tensor(x, dtype=torch.float32), torch.tensor(np.log(m), dtype=torch.float32),
                         torch.tensor(np.log(r), dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(ours32, ref, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------------------------- NB module
@pytest.mark.parametrize("activation", ["softmax", "softplus", "sigmoid"])
def test_negative_binomial_nll_matches_scipy_for_each_activation(activation):
    torch.manual_seed(0)
    n, g = 6, 9
    lik = NegativeBinomial(g, activation=activation, r_init=3.0, r_min=1.0).double()
    with torch.no_grad():
        lik.log_r_free.copy_(torch.linspace(-2, 3, g).reshape(1, g))
    out = torch.randn(n, g, dtype=torch.float64) * 2
    scale = torch.tensor([10.0, 100.0, 1e3, 5.0, 1.0, 2e4], dtype=torch.float64)
    x = torch.randint(0, 40, (n, g)).double()

    act = {"softmax": lambda o: torch.softmax(o, -1), "softplus": torch.nn.functional.softplus,
           "sigmoid": torch.sigmoid}[activation]
    m = (act(out) * scale[:, None]).numpy()
    r = (1.0 + np.exp(lik.log_r_free.detach().numpy()))  # the reference's r = e^x + 1
    np.testing.assert_allclose(lik.r.detach().numpy(), r, rtol=1e-12)
    np.testing.assert_allclose(lik.mean(out, scale).detach().numpy(), m, rtol=1e-10)
    ref = -st.nbinom.logpmf(x.numpy(), n=r, p=r / (r + m)).sum(1)
    np.testing.assert_allclose(lik.nll(x, out, scale).detach().numpy(), ref, rtol=1e-9)


@pytest.mark.parametrize("kind", ["nb", "poisson"])
def test_nll_with_a_precomputed_constant_matches_scipy_for_any_output(kind):
    """The data-only terms computed once (``nll_constant``) and reused for outputs they were not computed
    with: the NLL is still scipy's, and the constant is the log-gamma terms alone."""
    from scipy.special import gammaln

    from dgdlens.nn import Poisson

    rng = np.random.default_rng(4)
    n, g = 5, 12
    x = torch.tensor(rng.poisson(6.0, (n, g)), dtype=torch.float64)
    scale = torch.tensor(rng.uniform(20, 400, n))
    lik = (NegativeBinomial(g, r_init=3.0) if kind == "nb" else Poisson(g)).double()
    if kind == "nb":
        with torch.no_grad():
            lik.log_r_free.copy_(torch.linspace(-2, 2, g).reshape(1, g))
    constant = lik.nll_constant(x, scale)
    xn = x.numpy()
    if kind == "nb":
        r = lik.r.detach().numpy()
        want_constant = -(gammaln(xn + r) - gammaln(r) - gammaln(xn + 1)).sum(1)
    else:
        want_constant = gammaln(xn + 1).sum(1)
    np.testing.assert_allclose(constant.detach().numpy(), want_constant, rtol=1e-12)
    for seed in range(3):  # outputs the constant never saw
        out = torch.tensor(np.random.default_rng(seed).normal(scale=2, size=(n, g)))
        m = (torch.softmax(out, -1) * scale[:, None]).numpy()
        want = (-st.nbinom.logpmf(xn, n=r, p=r / (r + m)).sum(1) if kind == "nb"
                else -st.poisson.logpmf(xn, m).sum(1))
        np.testing.assert_allclose(lik.nll(x, out, scale, constant=constant).detach().numpy(), want, rtol=1e-9)
        np.testing.assert_allclose(lik.nll(x, out, scale).detach().numpy(), want, rtol=1e-9)


def test_negative_binomial_softmax_mean_is_library_times_composition():
    lik = NegativeBinomial(5)
    out = torch.randn(4, 5)
    lib = torch.tensor([1.0, 10.0, 100.0, 1000.0])
    np.testing.assert_allclose(lik.mean(out).sum(1).numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(lik.mean(out, lib).sum(1).numpy(), lib.numpy(), rtol=1e-5)


def test_negative_binomial_initial_dispersion_and_options():
    assert torch.allclose(NegativeBinomial(4, r_init=2.0).r, torch.full((1, 4), 2.0))
    shared = NegativeBinomial(4, dispersion="shared", r_init=5.0, r_min=0.0)
    assert shared.log_r_free.shape == (1, 1) and torch.allclose(shared.r, torch.tensor(5.0))
    with pytest.raises(ValueError, match="activation"):
        NegativeBinomial(3, activation="exp")
    with pytest.raises(ValueError, match="dispersion"):
        NegativeBinomial(3, dispersion="cell")
    with pytest.raises(ValueError, match="r_init"):
        NegativeBinomial(3, r_init=1.0, r_min=1.0)


def test_softplus_log_mean_stays_finite_for_very_negative_output():
    lik = NegativeBinomial(3, activation="softplus")
    out = torch.tensor([[-200.0, -16.0, 3.0]], requires_grad=True)
    lm = lik.log_mean(out, torch.tensor([2.0]))
    assert torch.isfinite(lm).all()
    np.testing.assert_allclose(lm[0, 0].item(), -200.0 + math.log(2.0), rtol=1e-6)
    lik.nll(torch.tensor([[0.0, 1.0, 4.0]]), out, torch.tensor([2.0])).sum().backward()
    assert torch.isfinite(out.grad).all()


def test_negative_binomial_samples_have_model_mean_and_variance():
    torch.manual_seed(1)
    lik = NegativeBinomial(4, r_init=3.0, r_min=1.0)
    with torch.no_grad():
        lik.log_r_free.copy_(torch.tensor([[-1.0, 0.0, 1.0, 3.0]]))  # r = 1.37, 2, 3.72, 21.1
    out = torch.log(torch.tensor([[0.05, 0.15, 0.3, 0.5]]))
    n_draws = 200_000
    draws = lik.sample(out.expand(n_draws, -1), torch.full((n_draws,), 40.0)).double()
    m = 40.0 * torch.tensor([0.05, 0.15, 0.3, 0.5], dtype=torch.float64)
    r = lik.r.detach().double()[0]
    var = m + m**2 / r
    assert torch.all(draws == draws.round()) and torch.all(draws >= 0)
    np.testing.assert_allclose(draws.mean(0).numpy(), m.numpy(), rtol=0.02)
    np.testing.assert_allclose(draws.var(0).numpy(), var.numpy(), rtol=0.05)


# ---------------------------------------------------------------------------------------------- Gaussian / Bernoulli
def test_gaussian_nll_matches_scipy_norm_and_learns_sigma():
    x = torch.randn(5, 7, dtype=torch.float64)
    out = torch.randn(5, 7, dtype=torch.float64)
    fixed = Gaussian(7, sigma=0.7).double()
    ref = -st.norm.logpdf(x.numpy(), loc=out.numpy(), scale=0.7).sum(1)
    np.testing.assert_allclose(fixed.nll(x, out).numpy(), ref, rtol=1e-6)  # sigma stored in float32
    assert not list(fixed.parameters())

    learned = Gaussian(7, sigma=1.5, learn_sigma=True).double()
    assert learned.log_sigma.shape == (1, 7) and learned.log_sigma.requires_grad
    ref = -st.norm.logpdf(x.numpy(), loc=out.numpy(), scale=1.5).sum(1)
    np.testing.assert_allclose(learned.nll(x, out).detach().numpy(), ref, rtol=1e-6)
    assert torch.equal(learned.mean(out), out)


def test_gaussian_samples_have_mean_and_sd():
    torch.manual_seed(2)
    g = Gaussian(3, sigma=2.0)
    out = torch.tensor([[1.0, -3.0, 0.5]]).expand(100_000, -1)
    draws = g.sample(out, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(draws.mean(0).numpy(), [1.0, -3.0, 0.5], atol=0.03)
    np.testing.assert_allclose(draws.std(0).numpy(), 2.0, rtol=0.02)


def test_bernoulli_nll_matches_scipy_and_cross_entropy():
    torch.manual_seed(3)
    logits = torch.randn(6, 8, dtype=torch.float64) * 3
    x = torch.randint(0, 2, (6, 8)).double()
    p = torch.sigmoid(logits).numpy()
    b = Bernoulli(8)
    ref = -st.bernoulli.logpmf(x.numpy(), p).sum(1)
    np.testing.assert_allclose(b.nll(x, logits).numpy(), ref, rtol=1e-10)
    # targets in [0, 1] (scaled pixels): binary cross-entropy
    xf = torch.rand(6, 8, dtype=torch.float64)
    ref = -(xf.numpy() * np.log(p) + (1 - xf.numpy()) * np.log1p(-p)).sum(1)
    np.testing.assert_allclose(b.nll(xf, logits).numpy(), ref, rtol=1e-10)
    # extreme logits stay finite
    assert torch.isfinite(b.nll(torch.tensor([[1.0, 0.0]]), torch.tensor([[-500.0, 500.0]]))).all()


def test_bernoulli_samples_have_the_right_mean():
    out = torch.logit(torch.tensor([[0.1, 0.5, 0.9]])).expand(100_000, -1)
    draws = Bernoulli(3).sample(out, generator=torch.Generator().manual_seed(0))
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    np.testing.assert_allclose(draws.mean(0).numpy(), [0.1, 0.5, 0.9], atol=0.006)


# ---------------------------------------------------------------------------------------------- factory
def test_make_likelihood_names_configs_and_errors():
    assert isinstance(make_likelihood("nb", 5), NegativeBinomial)
    assert isinstance(make_likelihood("negative_binomial", 5), NegativeBinomial)
    assert isinstance(make_likelihood("MSE", 5), Gaussian)
    assert isinstance(make_likelihood("bce", 5), Bernoulli)
    nb = NegativeBinomial(5, activation="sigmoid", dispersion="shared", r_init=4.0)
    rebuilt = make_likelihood(nb.config(), 5)
    assert rebuilt.config() == nb.config()
    assert make_likelihood(nb, 5) is nb
    with pytest.raises(ValueError, match="Unknown likelihood 'zinb'"):
        make_likelihood("zinb", 5)
