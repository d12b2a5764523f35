"""The GRN simulator: its ground truth must explain its counts."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from dgdlens.sim.grn import hill_response, simulate_grn


def _direct_mean(adata) -> np.ndarray:
    """The expected counts recomputed from the AnnData's ground truth with a plain numpy formula."""
    p = adata.uns["grn"]["params"]
    a = adata.obsm["activity"]
    k, K = p["hill_coefficient"], p["hill_threshold"]
    h = a**k / (K**k + a**k)
    log_rate = adata.var["basal"].to_numpy()[None, :] + h @ adata.varm["network"].T
    rate = np.exp(log_rate)
    return adata.obs["library_size"].to_numpy()[:, None] * rate / rate.sum(axis=1, keepdims=True)


def test_hill_response_matches_formula():
    a = np.array([0.0, 0.1, 1.0, 2.0, 50.0, 1e6])
    expected = a**3 / (2.0**3 + a**3)
    np.testing.assert_allclose(hill_response(a, 2.0, 3.0), expected, rtol=1e-12, atol=1e-300)
    assert hill_response(np.array([0.0]), 1.0, 2.0)[0] == 0.0


@pytest.mark.parametrize("noise", ["poisson", "nb"])
def test_counts_follow_ground_truth(noise):
    sim = simulate_grn(3000, 300, n_regulators=8, n_cell_types=5, noise=noise, library_size=500, seed=3)
    adata = sim.to_anndata()
    mu = _direct_mean(adata)
    np.testing.assert_allclose(sim.expected_counts(), mu, rtol=1e-9)
    x = adata.X.toarray().astype(np.float64)
    assert sp.isspmatrix_csr(adata.X) and np.all(x == np.round(x)) and x.min() >= 0
    # Pearson residuals with the model's variance have variance ~1 (Poisson: mu; NB: mu + mu^2/r)
    var = mu if noise == "poisson" else mu + mu**2 / adata.var["dispersion"].to_numpy()[None, :]
    resid = (x - mu) / np.sqrt(var)
    assert abs(resid.mean()) < 0.01
    assert resid.var() == pytest.approx(1.0, abs=0.05)
    # per-gene means agree with the expected means (z-test over 3000 cells, every gene)
    z = (x - mu).sum(0) / np.sqrt(var.sum(0))
    assert np.abs(z).max() < 5.0
    # library size is the expected total count
    ratio = x.sum(1) / adata.obs["library_size"].to_numpy()
    assert ratio.mean() == pytest.approx(1.0, abs=0.01)
    np.testing.assert_array_equal(adata.obs["total_counts"].to_numpy(), x.sum(1))


def test_activities_match_cell_types_and_network_is_sparse():
    sim = simulate_grn(4000, 400, n_regulators=10, n_cell_types=4, regulators_per_gene=2.0, activity_noise=0.3,
                       seed=1)
    # the log-normal factor has median 1: per type, the median activity is the type level
    for t in range(4):
        med = np.median(sim.activity[sim.cell_type == t], axis=0)
        np.testing.assert_allclose(med, sim.type_activity[t], rtol=0.08)
    on_levels = sim.type_activity[sim.type_on]
    off_levels = sim.type_activity[~sim.type_on]
    assert on_levels.min() > off_levels.max()
    assert sim.type_on.any(axis=1).all() and sim.type_on.any(axis=0).all() and (~sim.type_on).any(axis=0).all()
    density = sim.network.nnz / np.prod(sim.network.shape)
    assert density == pytest.approx(0.2, abs=0.03)
    assert (sim.network.data < 0).mean() == pytest.approx(0.3, abs=0.06)
    np.testing.assert_allclose(sim.response, hill_response(sim.activity, 1.0, 2.0))


def test_saturation_and_sign_of_effects():
    """A strongly active regulator raises its activated targets and lowers its repressed ones."""
    sim = simulate_grn(2000, 400, n_regulators=5, n_cell_types=4, seed=7, noise="poisson", library_size=5000)
    comp = sim.composition()
    W = sim.network.toarray()
    h = sim.response
    checked = 0
    for r in range(sim.n_regulators):
        hi, lo = h[:, r] > 0.7, h[:, r] < 0.2
        if hi.sum() < 50 or lo.sum() < 50:
            continue
        lfc = np.log(comp[hi].mean(0)) - np.log(comp[lo].mean(0))
        only_r = (W != 0).sum(0) == 1  # targets regulated by r alone
        act, rep = only_r & (W[r] > 0), only_r & (W[r] < 0)
        if act.sum() and rep.sum():
            assert lfc[act].mean() > lfc[rep].mean() + 0.5
            checked += 1
    assert checked >= 2


def test_deterministic_by_seed_and_anndata_io(tmp_path):
    a, b = simulate_grn(200, 50, seed=11), simulate_grn(200, 50, seed=11)
    assert (a.counts != b.counts).nnz == 0
    np.testing.assert_array_equal(a.activity, b.activity)
    c = simulate_grn(200, 50, seed=12)
    assert (a.counts != c.counts).nnz > 0
    adata = a.to_anndata()
    assert adata.obsm["activity"].shape == (200, 10) and adata.varm["network"].shape == (50, 10)
    assert adata.uns["grn"]["params"]["seed"] == 11
    assert adata.var["dispersion"].between(0, np.inf, inclusive="neither").all()
    adata.write_h5ad(tmp_path / "sim.h5ad")  # ground truth in uns/obsm/varm is writable
    assert np.isinf(simulate_grn(20, 10, noise="poisson").to_anndata().var["dispersion"]).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_cells": 0}, "n_cells"),
        ({"noise": "zinb"}, "noise"),
        ({"p_repression": 1.5}, "p_repression"),
        ({"activity_on": 0.1, "activity_off": 0.2}, "activity_on"),
        ({"cell_type_weights": [1.0, 2.0]}, "cell_type_weights"),
        ({"dispersion": 0.0}, "dispersion"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simulate_grn(**({"n_cells": 10, "n_genes": 5} | kwargs))
