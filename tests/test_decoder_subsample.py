"""``decoder_subsample``: the epochs train on a seeded sample of the cells, the rest are embedded at the end.

Independent truths: the PCA start (``pca_latents``, tested against an SVD in test_latent_init.py) tells
which latents the epochs moved; Adam's first step moves a coordinate by at most its learning rate; planted
cell types tell whether the cells left out of training were embedded as well as the trained ones.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import dgdlens as dl
from dgdlens.data.matrix import RowMatrix
from dgdlens.train.latent_init import pca_latents
from test_dgd import SMALL, simulate_nb_mixture

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = {"batch_size": 64, "device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def planted():
    return simulate_nb_mixture(n_cells=300, n_genes=80, n_types=3, seed=3)


def _subsample(n_train: int, n_val: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the training and validation cells the plan trains in one process (seeded by
    ``[seed, rank, 1]``: the training positions drawn first, then the validation ones)."""
    rng = np.random.default_rng([seed, 0, 1])
    train, val = np.zeros(n_train, bool), np.zeros(n_val, bool)
    train[rng.choice(n_train, size, replace=False)] = True
    val[rng.choice(n_val, round(n_val * size / n_train), replace=False)] = True
    return train, val


def test_the_rest_start_on_the_subsample_line_then_polish(planted):
    model = dl.DGD(planted.copy(), n_components=3, seed=0, **SMALL)
    # three epochs, then one polish step: Adam's first step moves a coordinate by at most polish_lr
    model.train(max_epochs=3, early_stopping=False, decoder_subsample=100, decoder_subsample_by="random",
                polish_steps=1, polish_lr=1e-3, polish_tol=0.0, **RUN)  # a uniform sample, as _subsample draws
    radius = float(model.module.prior.softball_radius)
    starts = pca_latents(RowMatrix(planted.X), model.train_idx, [model.train_idx, model.val_idx], model.n_latent,
                         radius=radius, seed=0)
    z_train, z_val = model.train_rep.z.detach().numpy(), model.val_rep.z.detach().numpy()
    fitted, val_fitted = _subsample(len(z_train), len(z_val), 100)
    # the line, by numpy's least squares on the trained cells (their final latents: one polish step off)
    design = np.c_[starts[0][fitted], np.ones(fitted.sum())]
    weights = np.linalg.lstsq(design, z_train[fitted], rcond=None)[0]
    for start, z, trained in ((starts[0], z_train, fitted), (starts[1], z_val, val_fitted)):
        on_line = np.c_[start, np.ones(len(start))] @ weights
        rest = ~trained
        assert np.abs(z[rest] - on_line[rest]).max() < 5e-3  # one polish step (1e-3) off the line
        assert np.abs(z[rest] - start[rest]).max(1).mean() > 0.05  # and not where they started
        assert np.abs(z[trained] - start[trained]).max(1).min() > 2e-2  # trained: 3 steps of lr_rep 0.03
    assert model.train_config_["decoder_subsample"] == 100


def test_cells_left_out_are_embedded_as_well_as_trained_ones():
    data = simulate_nb_mixture(n_cells=1200, n_genes=80, n_types=3, seed=5)
    labels = data.obs["cell_type"].to_numpy()
    model = dl.DGD(data, n_components=3, seed=0, **SMALL)
    model.train(max_epochs=40, decoder_subsample=300, decoder_subsample_by="random", **RUN)
    z = model.get_latent_representation()
    nll = model.get_reconstruction_error(per_sample=True)
    fitted = np.zeros(data.n_obs, bool)
    fitted[model.train_idx[_subsample(len(model.train_idx), len(model.val_idx), 300)[0]]] = True
    rest = ~fitted
    rest[model.val_idx] = False
    clusters = KMeans(3, n_init=10, random_state=0).fit_predict(z)
    assert adjusted_rand_score(labels[rest], clusters[rest]) > 0.95
    assert adjusted_rand_score(labels, model.get_cluster_assignments()) > 0.9
    # the 810 cells no epoch saw fit their counts as well as the 300 that trained (within 1 %)
    assert nll[rest].mean() <= 1.01 * nll[fitted].mean()


@pytest.mark.parametrize(("rep_step", "by"), [("epoch", "random"), ("batch", "random"), ("epoch", "sketch"),
                                              ("epoch", "residual")])
def test_resume_with_a_subsample_is_exact(planted, tmp_path, rep_step, by):
    opts = RUN | {"early_stopping": False, "decoder_subsample": 120, "rep_step": rep_step, "restore_best": False,
                  "decoder_subsample_by": by}
    straight = dl.DGD(planted.copy(), n_components=3, seed=1, **SMALL).train(max_epochs=4, **opts)
    ckpt = tmp_path / "sub.ckpt"
    dl.DGD(planted.copy(), n_components=3, seed=1, **SMALL).train(max_epochs=2, checkpoint_path=str(ckpt), **opts)
    resumed = dl.DGD(planted.copy(), n_components=3, seed=1, **SMALL).train(max_epochs=4, resume_from=str(ckpt),
                                                                           **opts)
    np.testing.assert_array_equal(resumed.history_["train_loss"], straight.history_["train_loss"])
    np.testing.assert_array_equal(resumed.get_latent_representation(), straight.get_latent_representation())


def test_subsample_as_large_as_the_data_changes_nothing(planted):
    runs = [dl.DGD(planted.copy(), n_components=3, seed=0, **SMALL).train(max_epochs=3, early_stopping=False,
                                                                          **(RUN | extra))
            for extra in ({}, {"decoder_subsample": 10_000})]
    np.testing.assert_array_equal(runs[0].get_latent_representation(), runs[1].get_latent_representation())


@pytest.mark.parametrize("bad, match", [
    ({"decoder_subsample": 0}, "positive integer"),
    ({"decoder_subsample": 2.5}, "positive integer"),
    ({"decoder_subsample": 50, "latent_init": "zeros"}, "latent_init='pca'"),
    ({"decoder_subsample": 50, "polish_steps": 0}, "polish_steps"),
])
def test_bad_subsample_options_are_refused(planted, bad, match):
    with pytest.raises(ValueError, match=match):
        dl.DGD(planted.copy(), n_components=3, **SMALL).train(max_epochs=1, **(RUN | bad))
