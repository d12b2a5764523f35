"""Latents started at PCA coordinates (``train(latent_init="pca")``).

Truth: numpy's SVD of the densified, centred log-normalised counts (an independent computation) and
the planted cell types of the simulation.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import dgdlens as dl
from dgdlens.data.matrix import RowMatrix
from dgdlens.train.latent_init import pca_latents
from test_dgd import SMALL, simulate_nb_mixture

pytestmark = pytest.mark.usefixtures("one_thread")

ORIGIN = {"batch_size": 64, "early_stopping": False, "device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def planted():
    return simulate_nb_mixture(n_cells=300, n_genes=80, n_types=3, seed=3)


def test_pca_latents_match_an_svd_of_the_dense_matrix(planted):
    x = planted.X.toarray().astype(np.float64)
    logn = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    centred = logn - logn.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    truth = centred @ vt[:4].T
    rows = np.arange(planted.n_obs)
    (z,) = pca_latents(RowMatrix(planted.X), rows, [rows], 6, radius=2.0, seed=0)
    assert z.shape == (planted.n_obs, 6)
    ratios = []
    for j in range(4):  # the leading components, up to sign, all scaled by one factor
        assert abs(np.corrcoef(z[:, j], truth[:, j])[0, 1]) > 0.999
        ratios.append(np.linalg.norm(z[:, j]) / np.linalg.norm(truth[:, j]))
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-3)
    assert np.quantile(np.linalg.norm(z, axis=1), 0.95) == pytest.approx(2.0, rel=1e-5)


def test_pca_latents_pad_dimensions_the_data_cannot_fill():
    rng = np.random.default_rng(0)
    x = rng.poisson(5.0, (50, 4)).astype(np.float32) + 1
    (z,) = pca_latents(RowMatrix(x), np.arange(50), [np.arange(50)], 6, radius=1.0)
    assert z.shape == (50, 6)
    assert np.all(z[:, 3:] == 0) and np.all(np.abs(z[:, :3]).sum(0) > 0)  # 4 features: 3 components


def _ari(model, labels):
    z = model.get_latent_representation()
    return adjusted_rand_score(labels, KMeans(3, n_init=10, random_state=0).fit_predict(z))


def test_pca_start_separates_planted_types_from_the_first_epochs(planted):
    labels = planted.obs["cell_type"].to_numpy()
    fast = dl.DGD(planted.copy(), n_components=3, seed=0, **SMALL)
    fast.train(max_epochs=3, latent_init="pca", polish_steps=0, refit_prior_at_end=False, **ORIGIN)
    slow = dl.DGD(planted.copy(), n_components=3, seed=0, **SMALL)
    slow.train(max_epochs=3, latent_init="zeros", polish_steps=0, refit_prior_at_end=False, **ORIGIN)
    assert _ari(fast, labels) > 0.95
    assert _ari(slow, labels) < 0.5  # three steps from the origin have not separated them yet
    # the mixture was fitted to the starting layout: its argmax already finds the types
    assert adjusted_rand_score(labels, fast.get_cluster_assignments()) > 0.9


def test_the_dgd_starts_from_pca_unless_it_has_covariates_or_modalities(planted):
    model = dl.DGD(planted.copy(), n_components=3, seed=0, **SMALL).train(max_epochs=1, **ORIGIN)
    assert model.train_config_["latent_init"] == "pca"
    batched = planted.copy()
    batched.obs["batch"] = np.where(np.arange(batched.n_obs) % 2, "a", "b")
    model = dl.DGD(batched, n_components=3, seed=0, batch_key="batch", **SMALL).train(max_epochs=1, **ORIGIN)
    assert model.train_config_["latent_init"] == "zeros"
    multiome = dl.sim.simulate_multiome(n_cells=120, n_genes=150, n_peaks=400, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cells without peaks in the small simulation
        model = dl.DGD(multiome, n_components=2, seed=0, **SMALL).train(max_epochs=1, **ORIGIN)
    assert model.train_config_["latent_init"] == "zeros"


def test_pca_start_only_moves_untrained_latents(planted):
    model = dl.DGD(planted.copy(), n_components=3, seed=0, **SMALL)
    model.train(max_epochs=2, latent_init="zeros", polish_steps=0, refit_prior_at_end=False, **ORIGIN)
    before = model.train_rep.z.detach().clone()
    model.train(max_epochs=1, latent_init="pca", lr_rep=1e-12, lr_decoder=1e-12, lr_prior=1e-12,
                polish_steps=0, refit_prior_at_end=False, **ORIGIN)
    torch.testing.assert_close(model.train_rep.z.detach(), before, atol=1e-6, rtol=0)


def test_pca_start_is_the_same_from_disk(planted, tmp_path):
    import anndata as ad

    path = tmp_path / "planted.h5ad"
    planted.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    runs = []
    for data in (planted.copy(), backed):
        model = dl.DGD(data, n_components=3, seed=0, **SMALL)
        model.train(max_epochs=1, latent_init="pca", lr_rep=1e-12, polish_steps=0, refit_prior_at_end=False, **ORIGIN)
        runs.append(model.train_rep.z.detach().numpy())
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5, atol=1e-6)


def test_unknown_latent_init_is_refused(planted):
    model = dl.DGD(planted.copy(), n_components=3, **SMALL)
    with pytest.raises(ValueError, match="latent_init"):
        model.train(max_epochs=1, latent_init="umap", **ORIGIN)
