"""The held-out protocol of dgdlens.evaluate: count splitting, gene splitting, the NBSplitModel interface.

Truth comes from simulation: NB counts with known means and dispersions, and a "model" built from
those true parameters. If X ~ NB(mu, r), binomial thinning with probability p gives parts distributed
NB(p mu, r) and NB((1 - p) mu, r) (checked here with scipy), so the true model must score exactly
scipy's log-pmf of part B at the thinned parameters, and its mean score over many cells must match
the expected NLL (the NB entropy) at those parameters.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy import stats
from scipy.special import gammaln

import dgdlens as dl
from dgdlens.evaluate import (
    NBSplitModel,
    binomial_split,
    composition_split_model,
    count_split_nll,
    gene_split_nll,
    nb_nll,
    split_model,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def simulate(n_cells=3000, n_genes=25, seed=0):
    rng = np.random.default_rng(seed)
    mu = rng.gamma(2.0, 3.0, (n_cells, n_genes)) + 0.5
    r = rng.uniform(1.0, 5.0, n_genes)
    X = rng.negative_binomial(r, r / (r + mu)).astype(np.float32)
    return mu, r, X


def truth_model(mu, r, factor):
    """The true NB parameters of the scored part: mean ``factor * mu`` (the thinned mean), dispersion r.

    Its latent is the cell's row (the test keeps every cell, so rows line up)."""
    def infer(x, library, genes):
        return np.arange(x.shape[0])

    def nb_params(rows, library, genes):
        return factor * mu[rows][:, genes], r[genes]
    return NBSplitModel(infer=infer, nb_params=nb_params, n_genes=mu.shape[1], name="truth")


def expected_nll(m, r):
    """E[-log NB(Y; m, r)] for Y ~ NB(m, r) (the NB entropy) per entry, summed over the support with scipy."""
    m, r = np.broadcast_arrays(np.asarray(m, float), np.asarray(r, float))
    prob = r / (r + m)
    top = int(stats.nbinom.ppf(1 - 1e-10, r, prob).max()) + 1
    const, log_q = r * np.log(prob) - gammaln(r), np.log1p(-prob)
    out = np.zeros(m.shape)
    for k in range(top + 1):  # scipy's nbinom.logpmf written out (the same formula), for speed
        logp = const + gammaln(k + r) - gammaln(k + 1.0) + k * log_q
        out -= np.exp(logp) * logp
    return out


# ----------------------------------------------------------------------------- binomial_split

def test_thinned_nb_is_nb_with_thinned_mean_same_r():
    """Binomial(p) thinning of NB(mu, r) is NB(p mu, r): the empirical pmf of each part against scipy."""
    rng = np.random.default_rng(1)
    mu, r, p, n = 6.0, 1.5, 0.3, 200_000
    x = rng.negative_binomial(r, r / (r + mu), size=(n, 1)).astype(np.float64)
    a, b = binomial_split(x, p=p, seed=2)
    for part, m in ((a, p * mu), (b, (1 - p) * mu)):
        k = np.arange(40)
        emp = np.bincount(part[:, 0].astype(int), minlength=200)[:40] / n
        pmf = stats.nbinom.pmf(k, r, r / (r + m))
        assert np.abs(emp - pmf).max() < 4e-3
        assert part.mean() == pytest.approx(m, rel=0.02)
        assert part.var() == pytest.approx(m + m ** 2 / r, rel=0.04)  # the same r, not a rescaled one


def test_split_sums_back_and_keeps_sparsity_and_dtype():
    _, _, X = simulate(200, 40)
    S = sp.csc_matrix(X)  # any sparse format in, CSR out
    a, b = binomial_split(S, p=0.5, seed=0)
    assert sp.isspmatrix_csr(a) and sp.isspmatrix_csr(b)
    assert a.dtype == X.dtype and b.dtype == X.dtype
    np.testing.assert_array_equal((a + b).toarray(), X)
    assert a.nnz <= S.nnz and b.nnz <= S.nnz
    assert not (a.data == 0).any() and not (b.data == 0).any()  # no explicit zeros stored
    assert (a.data >= 0).all() and (b.data >= 0).all()
    assert a.sum() / X.sum() == pytest.approx(0.5, abs=0.01)
    # dense in, dense out
    da, db = binomial_split(X, p=0.25, seed=0)
    assert isinstance(da, np.ndarray) and da.dtype == X.dtype
    np.testing.assert_array_equal(da + db, X)
    assert da.sum() / X.sum() == pytest.approx(0.25, abs=0.01)


def test_split_reproducible_by_seed():
    _, _, X = simulate(100, 30)
    S = sp.csr_matrix(X)
    a1, _ = binomial_split(S, seed=7)
    a2, _ = binomial_split(S, seed=7)
    a3, _ = binomial_split(S, seed=8)
    assert (a1 != a2).nnz == 0
    assert (a1 != a3).nnz > 0


def test_split_never_densifies_a_huge_sparse_matrix():
    """10^6 x 10^5 would need 400 GB dense: this only passes if only the stored entries are touched."""
    rng = np.random.default_rng(0)
    n, g, nnz = 1_000_000, 100_000, 5000
    S = sp.csr_matrix((rng.integers(1, 20, nnz).astype(np.float32),
                       (rng.integers(0, n, nnz), rng.integers(0, g, nnz))), shape=(n, g))
    a, b = binomial_split(S, seed=0)
    assert a.shape == (n, g) and (a + b != S).nnz == 0


def test_split_rejects_non_counts_and_bad_p():
    with pytest.raises(ValueError, match="integer counts"):
        binomial_split(np.array([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="integer counts"):
        binomial_split(sp.csr_matrix(np.array([[-1.0, 1.0]])))
    with pytest.raises(ValueError, match="strictly between"):
        binomial_split(np.ones((2, 2)), p=1.0)


# ----------------------------------------------------------------------------- nb_nll

def test_nb_nll_matches_scipy():
    mu, r, X = simulate(50, 10)
    expected = -stats.nbinom.logpmf(X, r, r / (r + mu)).sum(1)
    np.testing.assert_allclose(nb_nll(X, mu, r), expected, rtol=1e-10)
    np.testing.assert_allclose(nb_nll(sp.csr_matrix(X), mu, r[None, :], batch_size=7), expected, rtol=1e-10)
    assert nb_nll(np.zeros((1, 2)), np.zeros((1, 2)), np.ones(2))[0] == 0.0


# ----------------------------------------------------------------------------- truth scores truth

@pytest.mark.parametrize("p", [0.5, 0.3])
def test_count_split_true_model_scores_true_likelihood_of_part_b(p):
    mu, r, X = simulate()
    truth = truth_model(mu, r, 1 - p)
    nll = count_split_nll(truth, sp.csr_matrix(X), p=p, seed=3)
    assert isinstance(nll, pd.Series) and len(nll) == len(X) and nll.notna().all()
    # exactly scipy's log-pmf of part B at the thinned parameters
    _, b = binomial_split(sp.csr_matrix(X), p=p, seed=3)
    m_b = (1 - p) * mu
    exact = -stats.nbinom.logpmf(b.toarray(), r, r / (r + m_b)).sum(1)
    np.testing.assert_allclose(nll.to_numpy(), exact, rtol=1e-9)
    # unbiased: the mean over cells estimates the expected NLL (entropy) of NB((1-p) mu, r)
    expected = expected_nll(m_b, r).sum(1)
    diff = nll.to_numpy() - expected
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    assert abs(diff.mean()) < 4 * se
    # a model with the un-thinned mean is worse by far more than the noise: the score discriminates
    wrong = count_split_nll(truth_model(mu, r, 1.0), sp.csr_matrix(X), p=p, seed=3)
    assert wrong.mean() - nll.mean() > 10 * se


def test_gene_split_true_model_scores_true_likelihood_of_scored_genes():
    mu, r, X = simulate()
    truth = truth_model(mu, r, 1.0)  # genes are not thinned: part B is NB(mu, r) on its genes
    nll = gene_split_nll(truth, X, fraction=0.4, seed=5)
    order = np.random.default_rng(5).permutation(X.shape[1])
    scored = np.sort(order[10:])  # round(0.4 * 25) = 10 observed genes
    exact = -stats.nbinom.logpmf(X[:, scored], r[scored], r[scored] / (r[scored] + mu[:, scored])).sum(1)
    np.testing.assert_allclose(nll.to_numpy(), exact, rtol=1e-9)
    expected = expected_nll(mu[:, scored], r[scored]).sum(1)
    diff = nll.to_numpy() - expected
    assert abs(diff.mean()) < 4 * diff.std(ddof=1) / np.sqrt(len(diff))


def test_composition_model_with_true_composition_is_close_to_truth():
    """The library-scaled composition (what real models use) with the true composition: the plug-in of
    part B's observed total costs little against the true thinned means."""
    mu, r, X = simulate(2000, 25, seed=4)
    comp = torch.as_tensor(np.log(mu / mu.sum(1, keepdims=True)), dtype=torch.float32)

    def log_composition(z):  # the "latent" is a one-hot of the cell: the true composition of that cell
        return z @ comp

    model = composition_split_model(log_composition, np.log(r), start=lambda x, lib, genes: np.eye(len(mu))[:x.shape[0]],
                                    n_steps=0)
    got = count_split_nll(model, X, seed=1)
    truth = count_split_nll(truth_model(mu, r, 0.5), X, seed=1)
    assert abs(got.mean() - truth.mean()) / truth.mean() < 0.01
    # renormalised over the scored genes: the means of the scored genes add up to their total
    genes = np.arange(5, 20)
    lib = np.full(3, 100.0)
    mean, rr = model.nb_params(np.eye(len(mu))[:3].astype(np.float32), lib, genes)
    np.testing.assert_allclose(mean.sum(1), lib, rtol=1e-5)
    np.testing.assert_allclose(rr, r[genes], rtol=1e-5)


# ----------------------------------------------------------------------------- dgdlens models

SMALL = {"n_latent": 4, "hidden": (16,)}
FAST = {"batch_size": 64, "rep_step": "batch", "lr_rep": 0.05, "hyperprior": "per_cell", "early_stopping": False,
        "device": "cpu", "progress": False}


def nb_programs(n_cells=160, n_genes=40, seed=0):
    rng = np.random.default_rng(seed)
    programs = rng.gamma(1.0, 1.0, (3, n_genes))
    programs /= programs.sum(1, keepdims=True)
    labels = rng.integers(0, 3, n_cells)
    mean = programs[labels] * rng.lognormal(np.log(400), 0.3, n_cells)[:, None]
    counts = rng.negative_binomial(5.0, 5.0 / (5.0 + mean)).astype(np.float32)
    counts[:, 0] += 1
    return ad.AnnData(sp.csr_matrix(counts), obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
                      var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))


@pytest.fixture(scope="module")
def dgd_and_test():
    data = nb_programs()
    train, test = data[:120].copy(), data[120:].copy()
    model = dl.DGD(train, n_components=3, seed=0, **SMALL)
    model.train(max_epochs=15, **FAST)
    return model, test


def test_count_split_dgd_uses_its_own_inference_on_part_a(dgd_and_test):
    model, test = dgd_and_test
    nll = count_split_nll(model, test, seed=2, n_steps=30)
    assert list(nll.index) == list(test.obs_names) and np.isfinite(nll).all()
    # by hand: latents from part A only (the model's own held-out inference), part B scored
    a, b = binomial_split(test.X, seed=2)
    z = model.get_latent_representation(ad.AnnData(a, var=test.var), n_steps=30, progress=False)
    lib_b = np.asarray(b.sum(1)).ravel()
    mean = model.decode_latent(z, library_size=lib_b)
    r = model.module.likelihood.r.detach().numpy().ravel()
    np.testing.assert_allclose(nll.to_numpy(), nb_nll(b, mean, r), rtol=1e-4)
    # the gene order of the AnnData does not matter (aligned by name)
    shuffled = test[:, test.var_names[::-1]].copy()
    np.testing.assert_allclose(count_split_nll(model, shuffled, seed=2, n_steps=30).to_numpy(), nll.to_numpy(),
                               rtol=1e-4)


def test_gene_split_dgd_is_finite_and_reproducible(dgd_and_test):
    model, test = dgd_and_test
    one = gene_split_nll(model, test, seed=1, n_steps=20)
    two = gene_split_nll(model, test, seed=1, n_steps=20)
    assert np.isfinite(one).all()
    np.testing.assert_allclose(one.to_numpy(), two.to_numpy())
    # the composition path with all genes is the same algorithm as the DGD's own inference
    m = split_model(model, n_steps=20)
    genes = np.arange(test.n_vars)
    lib = np.asarray(test.X.sum(1)).ravel()
    own = m.infer(test.X, lib, genes)
    cand = model.gmm.mean.detach().numpy()
    comp = composition_split_model(lambda z: torch.log_softmax(model.module.decode(z), -1),
                                   model.module.likelihood.log_r, prior_nll=model.module.prior_nll, start=cand,
                                   n_steps=20, tol=1e-5, freeze=model.module)
    np.testing.assert_allclose(comp.infer(test.X, lib, genes), own, atol=2e-3)


def test_decoder_only_nb_count_split():
    from dgdlens.models import DecoderOnly, mlp_decoder

    data = nb_programs(seed=1)
    X = data.X.toarray()
    torch.manual_seed(0)
    model = DecoderOnly(X[:120], mlp_decoder(3, X.shape[1], (16,)), "nb", prior="normal", validation_fraction=0.0)
    model.train(max_epochs=5, batch_size=64, progress=False)
    nll = count_split_nll(model, X[120:], seed=0, n_steps=20)
    assert len(nll) == 40 and np.isfinite(nll).all()
    assert np.isfinite(gene_split_nll(model, X[120:], seed=0, n_steps=20)).all()
    with pytest.raises(ValueError, match="genes"):
        count_split_nll(model, X[120:, :10])


def test_split_model_rejects_other_models():
    with pytest.raises(TypeError, match="NBSplitModel"):
        split_model(object())
