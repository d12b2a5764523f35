"""Covariates of the DGD (batch_key, categorical and continuous covariates; multiDGD's correction model).

Independent truths: scipy's Gaussian log-density for the supervised prior; simulated batches with known
cell types and known batch effects (dgdlens.sim.simulate_batches) for mixing, cell-type separation,
unseen batches and batch-corrected expression; exact equality for save/load and checkpoint resume.
"""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.model_selection import cross_val_predict
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

import dgdlens as dl
from dgdlens.nn.covariates import SupervisedGaussianMixture

torch.set_num_threads(1)

MODEL = {"n_latent": 8, "n_components": 4, "hidden": (64, 64), "seed": 0}
TRAIN = {"max_epochs": 300, "batch_size": 128, "progress": False, "lr_decay_epoch": None, "device": "cpu"}
FAST = {"batch_size": 64, "rep_step": "batch", "lr_rep": 0.05, "early_stopping": False, "device": "cpu",
        "progress": False}
SMALL = {"n_latent": 4, "hidden": (16,), "n_components": 2}


@pytest.fixture(scope="module")
def sim():
    return dl.sim.simulate_batches(150, 120, n_types=4, n_batches=3, n_unseen_batches=1, seed=0)


@pytest.fixture(scope="module")
def seen(sim):
    return sim[~sim.obs["unseen"].values].copy()


@pytest.fixture(scope="module")
def unseen(sim):
    return sim[sim.obs["unseen"].values].copy()


@pytest.fixture(scope="module")
def plain(seen):
    return dl.DGD(seen, **MODEL).train(**TRAIN)


@pytest.fixture(scope="module")
def corrected(seen):
    return dl.DGD(seen, batch_key="batch", **MODEL).train(**TRAIN)


def knn_accuracy(z, labels, k=15):
    return float((cross_val_predict(KNeighborsClassifier(k), z, labels, cv=3) == labels).mean())


def batch_entropy(z, batches, k=15):
    """Mean normalised entropy of the batch labels among each cell's k nearest neighbours (1 = mixed)."""
    idx = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z, return_distance=False)[:, 1:]
    batches = np.asarray(batches)  # pandas 3's string arrays take no 2-D index
    cats = np.unique(batches)
    p = np.stack([(batches[idx] == c).mean(1) for c in cats], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    return float(h.mean() / np.log(len(cats)))


# ---------------------------------------------------------------------------------------------- the prior
def test_supervised_prior_is_the_own_component_density_and_the_marginal_when_unknown():
    prior = SupervisedGaussianMixture(3, 2, counts=[10, 30, 60], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prior.neglogvar.copy_(torch.tensor([[1.0], [2.0], [0.5]]))
    c = torch.randn(7, 2)
    codes = torch.tensor([0, 1, 2, -1, 0, -1, 2])
    got = prior.log_prob(c, codes).detach().numpy()
    mean, var = prior.mean.detach().numpy(), np.exp(-prior.neglogvar.detach().numpy()[:, 0])
    comp = np.stack([multivariate_normal(mean[k], var[k] * np.eye(2)).logpdf(c.numpy()) for k in range(3)], axis=1)
    marginal = logsumexp(comp + np.log([0.1, 0.3, 0.6]), axis=1)
    want = np.where(codes.numpy() >= 0, comp[np.arange(7), codes.numpy().clip(0)], marginal)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # not multiplied by the number of categories (multiDGD's x C): a labelled cell's term does not
    # depend on how many other categories exist
    bigger = SupervisedGaussianMixture(6, 2)
    with torch.no_grad():
        bigger.mean[:3] = prior.mean
        bigger.neglogvar[:3] = prior.neglogvar
    known = codes >= 0
    np.testing.assert_allclose(bigger.log_prob(c[known], codes[known]).detach().numpy(), want[known.numpy()],
                               rtol=1e-5, atol=1e-5)
    # extra (new) components share the trained precision and are scored by code >= n_components
    extra = torch.zeros(1, 2)
    lp = prior.log_prob(c, torch.full((7,), 3), extra_mean=extra).detach().numpy()
    v = np.exp(-prior.neglogvar.detach().numpy().mean())
    np.testing.assert_allclose(lp, multivariate_normal(np.zeros(2), v * np.eye(2)).logpdf(c.numpy()), rtol=1e-5)


# ---------------------------------------------------------------------------------------------- integration
def test_batches_mix_in_the_latent_while_cell_types_stay_separated(seen, plain, corrected):
    types = seen.obs["cell_type"].astype(str).values
    batches = seen.obs["batch"].astype(str).values
    z0, z1 = plain.get_latent_representation(), corrected.get_latent_representation()
    assert z1.shape == (seen.n_obs, MODEL["n_latent"])  # the biological latent only
    h0, h1 = batch_entropy(z0, batches), batch_entropy(z1, batches)
    acc0, acc1 = knn_accuracy(z0, batches), knn_accuracy(z1, batches)
    assert h0 < 0.15 and h1 > h0 + 0.4, (h0, h1)  # without covariates the batches separate; with them they mix
    assert acc0 > 0.95 and acc1 < acc0 - 0.25, (acc0, acc1)
    assert knn_accuracy(z1, types) > 0.95  # cell types stay apart
    # and the covariate latents carry the batch instead
    assert knn_accuracy(corrected.get_covariate_representation(), batches) > 0.95


def test_cells_of_an_unseen_batch_land_with_their_cell_type(seen, unseen, corrected):
    clf = KNeighborsClassifier(15).fit(corrected.get_latent_representation(), seen.obs["cell_type"].astype(str))
    z = corrected.get_latent_representation(unseen, progress=False)
    assert (clf.predict(z) == unseen.obs["cell_type"].astype(str).values).mean() > 0.9
    means = corrected._last_new_category_means["batch"]
    assert list(means) == ["batch3"] and np.all(np.isfinite(means["batch3"]))
    # its cells keep their (new) category name
    assert set(corrected.get_covariate_categories(unseen, progress=False)) == {"batch3"}


def test_several_new_batches_at_once_and_a_batch_of_one_cell(unseen, corrected):
    new = unseen.copy()
    names = np.where(np.arange(new.n_obs) % 2 == 0, "newA", "newB").astype(object)
    names[0] = "solo"  # a new batch with a single cell
    new.obs["batch"] = names
    z = corrected.get_latent_representation(new, progress=False, n_steps=50, new_category_rounds=3)
    assert np.all(np.isfinite(z))
    assert sorted(corrected._last_new_category_means["batch"]) == ["newA", "newB", "solo"]
    # the one-cell batch's component is centred on that cell's covariate latent (documented behaviour)
    c = corrected.get_covariate_representation(new, progress=False, n_steps=50, new_category_rounds=3)
    assert np.all(np.isfinite(c))


def test_known_batch_and_inferred_batch_for_held_out_cells(seen, corrected):
    cells = seen[:120].copy()
    z_train = corrected.get_latent_representation()[:120]
    z_known = corrected.get_latent_representation(cells, progress=False)
    spread = np.linalg.norm(z_train - z_train.mean(0), axis=1).mean()
    assert np.linalg.norm(z_known - z_train, axis=1).mean() < 0.25 * spread  # a training cell embedded again
    hidden = cells.copy()
    del hidden.obs["batch"]
    with pytest.warns(UserWarning, match="inferred"):
        inferred = corrected.get_covariate_categories(hidden, progress=False)
    assert (inferred == cells.obs["batch"].astype(str).values).mean() > 0.8
    with pytest.warns(UserWarning, match="inferred"):
        out = corrected.add_to_adata(hidden, progress=False)
    assert "dgd_batch" in out.obs and out.obsm["X_dgd_batch"].shape == (120, 2)


def test_batch_corrected_expression_agrees_across_batches(seen, corrected):
    types = seen.obs["cell_type"].astype(str).values
    batches = seen.obs["batch"].astype(str).values
    own = corrected.get_normalized_expression()
    fixed = corrected.get_normalized_expression(transform_batch="batch0")
    np.testing.assert_allclose(fixed.sum(1), 1.0, rtol=1e-4)

    def spread(expr):
        """Mean over types of the across-batch sd of the per-(type, batch) mean log expression."""
        out = []
        for t in np.unique(types):
            means = [np.log(expr[(types == t) & (batches == b)].mean(0) + 1e-6) for b in np.unique(batches)
                     if ((types == t) & (batches == b)).any()]
            if len(means) > 1:
                out.append(np.std(means, axis=0).mean())
        return float(np.mean(out))

    assert spread(fixed) < 0.35 * spread(own), (spread(fixed), spread(own))
    # against the truth: decoded as batch0, a type's profile follows the planted batch0 composition
    truth = seen.uns["batch_truth"]
    logits = truth["log_profile"] + truth["gene_shift"][0]
    for t in range(4):
        want = np.log(np.exp(logits[t]) / np.exp(logits[t]).sum())
        got = np.log(fixed[types == f"type{t}"].mean(0))
        assert np.corrcoef(want, got)[0, 1] > 0.9
    counts = corrected.sample_counts(transform_batch="batch1", seed=1)
    assert counts.shape == seen.shape
    with pytest.raises(ValueError, match="not a trained category"):
        corrected.get_normalized_expression(transform_batch="nope")


def test_save_load_keeps_covariate_latents_exactly(tmp_path, seen, corrected):
    corrected.save(tmp_path / "m")
    back = dl.DGD.load(tmp_path / "m")
    np.testing.assert_array_equal(back.get_covariate_representation(), corrected.get_covariate_representation())
    np.testing.assert_array_equal(back.get_latent_representation(), corrected.get_latent_representation())
    np.testing.assert_array_equal(back.get_normalized_expression(transform_batch="batch2"),
                                  corrected.get_normalized_expression(transform_batch="batch2"))
    assert back.covariate_categories("batch") == ["batch0", "batch1", "batch2"]
    target = corrected.add_to_adata(seen.copy())
    assert target.obsm["X_dgd_batch"].shape == (seen.n_obs, 2)


# ---------------------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def tiny():
    ad = dl.sim.simulate_batches(40, 60, n_types=2, n_batches=2, n_unseen_batches=0, markers_per_type=10, seed=3)
    ad.obs["donor"] = np.where(np.arange(ad.n_obs) % 3 == 0, "d0", "d1")
    ad.obs["pct"] = np.random.default_rng(0).uniform(0, 10, ad.n_obs)
    return ad


def test_checkpoint_resume_is_bit_exact_with_covariates(tiny, tmp_path):
    kw = dict(batch_key="batch", categorical_covariate_keys=["donor"], continuous_covariate_keys=["pct"], **SMALL)
    opts = FAST | {"restore_best": False, "lr_decay_epoch": 3}
    straight = dl.DGD(tiny, seed=1, **kw).train(max_epochs=6, **opts)
    ckpt = tmp_path / "run.ckpt"
    dl.DGD(tiny, seed=1, **kw).train(max_epochs=2, checkpoint_path=str(ckpt), **opts)
    resumed = dl.DGD(tiny, seed=1, **kw).train(max_epochs=6, resume_from=str(ckpt), **opts)
    np.testing.assert_array_equal(resumed.history_["train_loss"], straight.history_["train_loss"])
    np.testing.assert_array_equal(resumed.get_latent_representation(), straight.get_latent_representation())
    for key in ("batch", "donor"):
        np.testing.assert_array_equal(resumed.get_covariate_representation(key=key),
                                      straight.get_covariate_representation(key=key))
    # a checkpoint of the model without covariates is refused
    with pytest.raises(ValueError, match="other data or another model"):
        dl.DGD(tiny, seed=1, batch_key="batch", **SMALL).train(max_epochs=6, resume_from=str(ckpt), **opts)


def test_several_covariates_and_continuous_standardisation(tiny, tmp_path):
    m = dl.DGD(tiny, batch_key="batch", categorical_covariate_keys=["donor"], continuous_covariate_keys=["pct"],
               n_latent_covariate=3, **SMALL).train(max_epochs=3, **FAST)
    assert len(m.module.covariate_priors) == 2 and m.module.decoder[0].in_features == 4 + 3 + 3 + 1
    train = tiny.obs["pct"].values[m.train_idx]
    stats = m.covariates["continuous"][0]
    assert stats["mean"] == pytest.approx(train.mean()) and stats["sd"] == pytest.approx(train.std())
    out = m.add_to_adata(tiny.copy())
    assert out.obsm["X_dgd_batch"].shape == (tiny.n_obs, 3) and out.obsm["X_dgd_donor"].shape == (tiny.n_obs, 3)
    m.save(tmp_path / "m")
    back = dl.DGD.load(tmp_path / "m")
    assert back.covariates["continuous"][0]["mean"] == stats["mean"]
    np.testing.assert_array_equal(back.get_normalized_expression(), m.get_normalized_expression())
    new = tiny[:10].copy()
    del new.obs["pct"]
    with pytest.raises(ValueError, match="no column 'pct'"):
        m.get_latent_representation(new, progress=False)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_covariate_input(tiny):
    bad = tiny.copy()
    bad.obs["batch"] = bad.obs["batch"].astype(object)
    bad.obs.iloc[3, bad.obs.columns.get_loc("batch")] = np.nan
    with pytest.raises(ValueError, match="missing value.*Fill them"):
        dl.DGD(bad, batch_key="batch", **SMALL)
    one = tiny.copy()
    one.obs["batch"] = "only"
    with pytest.warns(UserWarning, match="single category"):
        dl.DGD(one, batch_key="batch", **SMALL)
    for value in (np.nan, np.inf):
        cont = tiny.copy()
        cont.obs.iloc[0, cont.obs.columns.get_loc("pct")] = value
        with pytest.raises(ValueError, match="NaN or infinite"):
            dl.DGD(cont, continuous_covariate_keys=["pct"], **SMALL)
    with pytest.raises(ValueError, match="no column"):
        dl.DGD(tiny, batch_key="nope", **SMALL)
    with pytest.raises(ValueError, match="given twice"):
        dl.DGD(tiny, batch_key="batch", categorical_covariate_keys=["batch"], **SMALL)


def test_a_category_seen_only_in_validation_cells_moves_them_to_training(tiny):
    probe = dl.DGD(tiny, validation_fraction=0.2, seed=0, **SMALL)
    ad = tiny.copy()
    ad.obs["batch"] = ad.obs["batch"].astype(str)
    lonely = ad.obs_names[probe.val_idx[:2]]
    ad.obs.loc[lonely, "batch"] = "rare"
    with pytest.warns(UserWarning, match="moved into the training split"):
        m = dl.DGD(ad, batch_key="batch", validation_fraction=0.2, seed=0, **SMALL)
    assert set(probe.val_idx[:2]) <= set(m.train_idx) and not set(m.train_idx) & set(m.val_idx)
    assert "rare" in m.covariate_categories()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.train(max_epochs=2, **FAST)
    assert m.get_covariate_representation().shape == (ad.n_obs, 2)


def test_models_without_covariates_are_unchanged(tiny):
    m = dl.DGD(tiny, **SMALL)
    assert type(m.module).__name__ == "DecoderOnlyModule" and not m.has_covariates
    with pytest.raises(ValueError, match="no categorical covariates"):
        m.get_covariate_representation()
    with pytest.raises(ValueError, match="needs a model with covariates"):
        m.train(max_epochs=1, **FAST).get_normalized_expression(transform_batch="batch0")
    assert isinstance(pd.Index(m.var_names), pd.Index)


# ---------------------------------------------------------------------------------------------- lens / steer
def test_lens_groups_within_batches_are_batch_matched():
    from dgdlens.lens.groups import make_feature_groups

    rng = np.random.default_rng(0)
    n = 1000
    batch = np.where(np.arange(n) < 500, "a", "b")
    act = np.zeros((n, 2))
    fire = np.where(batch == "a", rng.random(n) < 0.3, rng.random(n) < 0.05)  # fires mostly in batch a
    act[fire, 0] = rng.random(int(fire.sum())) + 0.1
    act[:, 1] = rng.random(n) * (rng.random(n) < 0.2)
    kw = {"percentile": 85, "max_low_cells": 300, "min_active_cells": 5}
    plain = make_feature_groups(act, **kw)
    matched = make_feature_groups(act, groupby=batch, **kw)
    high = matched.high_cells(0)
    np.testing.assert_array_equal(high, plain.high_cells(0))  # the active group is unchanged
    share_high = (batch[high] == "a").mean()
    assert abs((batch[plain.low_cells(0)] == "a").mean() - share_high) > 0.3  # unmatched: batch-confounded
    low = matched.low_cells(0)
    assert abs((batch[low] == "a").mean() - share_high) < 0.02 and len(low) == matched.n_low[0] > 100
    assert not np.any(act[low, 0] != 0)  # only silent cells
    with pytest.raises(ValueError, match="low='silent'"):
        make_feature_groups(act, groupby=batch, low="rest", **kw)


def test_steering_decodes_with_own_or_chosen_batch(seen, corrected):
    from dgdlens.steer import _covariate_input

    own = _covariate_input(corrected, corrected.adata, None, None, seen.n_obs)
    np.testing.assert_array_equal(own[:, :2], corrected.get_covariate_representation())
    fixed = _covariate_input(corrected, np.zeros((5, 8)), None, "batch1", 5)
    mean = corrected.module.covariate_priors[0].mean.detach().numpy()[1]
    np.testing.assert_allclose(fixed, np.repeat(mean[None], 5, 0))
    with pytest.raises(ValueError, match="transform_batch"):
        _covariate_input(corrected, np.zeros((5, 8)), None, None, 5)
    z = corrected.get_latent_representation()[:4]
    a = corrected.decode_latent(z, extra=own[:4])
    np.testing.assert_allclose(a, corrected.get_normalized_expression()[:4], rtol=1e-5)


def test_cli_train_with_batch_key(tiny, tmp_path):
    from dgdlens.cli import main

    tiny.write_h5ad(tmp_path / "d.h5ad")
    code = main(["train", str(tmp_path / "d.h5ad"), "--out", str(tmp_path / "m"), "--batch-key", "batch",
                 "--epochs", "2", "--n-latent", "3", "--n-components", "2", "--hidden", "8", "--device", "cpu",
                 "--no-progress"])
    assert code == 0
    back = dl.DGD.load(tmp_path / "m")
    assert back.categorical_covariate_keys == ["batch"] and back.params["batch_key"] == "batch"
