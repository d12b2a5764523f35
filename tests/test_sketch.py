"""The grid sketch behind ``decoder_subsample_by="sketch"`` and the residual sample behind ``"residual"``.

Independent truths: a brute-force search for the equal take; a planted rare population (its share in the
sample against the uniform share); planted type proportions, which the end-of-training mixture must
recover although the sketch over-represents the rare type.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import dgdlens as dl
from dgdlens.data.matrix import RowMatrix
from dgdlens.train.latent_init import pca_residuals
from dgdlens.train.sketch import equal_takes, grid_boxes, residual_sample, sketch_sample

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("seed", range(5))
def test_equal_takes_is_the_largest_equal_quota(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 60, size=40)
    n_take = int(rng.integers(1, counts.sum()))
    takes = equal_takes(counts, n_take, np.random.default_rng(0))
    assert takes.sum() == n_take and np.all(takes <= counts)
    # brute force: the largest q with sum(min(c, q)) <= n_take; every box gives min(c, q), a few one more
    q = max(q for q in range(counts.max() + 1) if np.minimum(counts, q).sum() <= n_take)
    extra = takes - np.minimum(counts, q)
    assert set(np.unique(extra)) <= {0, 1} and np.all(takes[extra == 1] == q + 1)


def test_a_rare_population_is_over_represented_and_weights_sum_to_the_cells():
    rng = np.random.default_rng(0)
    centers = rng.normal(0.0, 2.0, (11, 16))
    sizes = [1_980] * 10 + [200]  # ten common types and one of 1 %, each a cloud in 16 coordinates
    z = np.concatenate([c + rng.normal(0.0, 0.5, (n, 16)) for c, n in zip(centers, sizes)])
    pos, w = sketch_sample(z, 5_000, np.random.default_rng(1))
    assert len(pos) == 5_000 and np.all(np.diff(pos) > 0)
    kept_rare = np.mean(np.isin(np.arange(19_800, 20_000), pos))
    assert kept_rare > 0.45  # a uniform sample keeps 25 % (measured: 55 %)
    boxes = grid_boxes(z)
    taken = np.bincount(boxes[pos], minlength=boxes.max() + 1)
    np.testing.assert_allclose(w, np.bincount(boxes)[boxes[pos]] / taken[boxes[pos]])
    assert w.sum() == pytest.approx(len(z))
    again, _ = sketch_sample(z, 5_000, np.random.default_rng(1))
    np.testing.assert_array_equal(again, pos)


def _rare_and_common(n_common=1_900, n_rare=100, n_genes=60, seed=0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    base = rng.gamma(1.0, 1.0, n_genes)
    rare_profile = base.copy()
    rare_profile[:12] *= 8.0  # the rare type's own markers
    labels = np.r_[np.zeros(n_common, int), np.ones(n_rare, int)]
    profiles = np.stack([base / base.sum(), rare_profile / rare_profile.sum()])
    mean = profiles[labels] * rng.lognormal(np.log(600), 0.2, len(labels))[:, None]
    counts = rng.negative_binomial(5.0, 5.0 / (5.0 + mean)).astype(np.float32)
    counts[:, 0] += 1
    return ad.AnnData(sp.csr_matrix(counts),
                      obs=pd.DataFrame({"cell_type": np.where(labels == 1, "rare", "common")},
                                       index=[f"c{i}" for i in range(len(labels))]),
                      var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))


def test_the_sketch_trains_and_the_mixture_keeps_the_cells_proportions():
    data = _rare_and_common()
    model = dl.DGD(data, n_latent=4, hidden=(32,), n_components=2, seed=0)
    model.train(max_epochs=20, decoder_subsample=400, decoder_subsample_by="sketch", refit_sample_weights=True,
                batch_size=64, device="cpu", progress=False)
    assert model.train_config_["decoder_subsample_by"] == "sketch"
    # the sample over-represents the rare type, yet the weighted refit weighs it by its 5 % of the cells
    weights = np.sort(model.module.prior.log_weights().exp().detach().numpy())
    assert weights[0] == pytest.approx(0.05, abs=0.03)
    clusters = model.get_cluster_assignments()
    rare = data.obs["cell_type"].to_numpy() == "rare"
    assert np.mean(clusters[rare] == np.bincount(clusters[rare]).argmax()) > 0.9
    with pytest.raises(ValueError, match="decoder_subsample_by"):
        dl.DGD(data, n_components=2).train(max_epochs=1, decoder_subsample_by="kmeans", device="cpu", progress=False)


def test_pca_residuals_single_out_a_rare_type_and_not_small_libraries():
    """A 0.3 % type with its own markers, too rare to shape the top components, is the worst explained by
    them; among common cells the score does not follow the library size (the raw residual does: fewer
    counts, noisier logs). (A type of 1 % here gets a component of its own, and then no high score.)"""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    n_genes, n_types = 200, 6
    base = rng.gamma(0.8, 1.0, n_genes)
    shifts = np.zeros((n_types + 1, n_genes))
    for t in range(n_types + 1):
        shifts[t, rng.choice(n_genes, 25, replace=False)] = 1.8
    labels = np.r_[rng.integers(0, n_types, 9_970), np.full(30, n_types)]  # the last type: 0.3 %
    profiles = base * np.exp(shifts)
    profiles /= profiles.sum(1, keepdims=True)
    library = rng.lognormal(np.log(1500), 0.6, len(labels))
    counts = rng.negative_binomial(4.0, 4.0 / (4.0 + profiles[labels] * library[:, None])).astype(np.float32)
    matrix = RowMatrix(sp.csr_matrix(counts))
    scores = pca_residuals(matrix, np.arange(len(labels)), np.arange(len(labels)), 10, seed=0)
    rare = labels == n_types
    assert roc_auc_score(rare, scores) > 0.85  # measured 0.93
    common = ~rare
    assert abs(np.corrcoef(scores[common], np.log(counts[common].sum(1)))[0, 1]) < 0.1  # measured 0.02


def test_residual_sample_takes_the_top_share_for_certain_and_weights_the_rest():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=10_000)
    pos, w = residual_sample(scores, 2_000, np.random.default_rng(1), share=0.1)
    assert len(pos) == 2_000 and np.all(np.diff(pos) > 0)
    top = np.argsort(-scores)[:200]
    assert np.isin(top, pos).all()  # the 200 highest scores are all kept, with weight 1
    np.testing.assert_array_equal(w[np.isin(pos, top)], 1.0)
    np.testing.assert_allclose(w[~np.isin(pos, top)], 9_800 / 1_800)
    assert w.sum() == pytest.approx(10_000)
    # Horvitz-Thompson: the weighted sample mean of any per-row value estimates the mean over every row
    value = scores ** 2 + rng.normal(size=10_000)
    estimates = []
    for seed in range(30):
        p, wt = residual_sample(scores, 2_000, np.random.default_rng(seed))
        estimates.append(np.sum(wt * value[p]) / np.sum(wt))
    assert np.mean(estimates) == pytest.approx(value.mean(), abs=0.03)
    all_pos, all_w = residual_sample(scores, 20_000, np.random.default_rng(0))
    np.testing.assert_array_equal(all_pos, np.arange(10_000))
    np.testing.assert_array_equal(all_w, 1.0)


@pytest.mark.parametrize("weighted", [True, False])
def test_the_residual_sample_trains_and_the_mixture_takes_the_cells_or_the_samples_proportions(weighted):
    """With ``refit_sample_weights`` the mixture weighs the rare type by its 5 % of the cells; by default
    (plain EM on the sample) by its share of the sample, which the residual tenth raises."""
    data = _rare_and_common()
    model = dl.DGD(data, n_latent=4, hidden=(32,), n_components=2, seed=0)
    model.train(max_epochs=20, decoder_subsample=400, decoder_subsample_by="residual", batch_size=64,
                refit_sample_weights=weighted, device="cpu", progress=False)
    weights = np.sort(model.module.prior.log_weights().exp().detach().numpy())
    if weighted:
        assert weights[0] == pytest.approx(0.05, abs=0.03)  # measured 0.047
    else:
        assert weights[0] > 0.08  # measured 0.095: about 38 of the sample's 400 cells
    clusters = model.get_cluster_assignments()
    rare = data.obs["cell_type"].to_numpy() == "rare"
    assert np.mean(clusters[rare] == np.bincount(clusters[rare]).argmax()) > 0.9
