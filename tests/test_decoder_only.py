"""DecoderOnly: the general decoder-only learner (no encoder, one free latent per sample)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.linear_model import LinearRegression

from dgdlens._io import ModelFormatError
from dgdlens.models.decoder_only import DecoderOnly
from dgdlens.nn.conv import conv_decoder
from dgdlens.nn.decoders import mlp_decoder

N, M, P = 150, 2, 20
FIT = dict(epochs=150, batch_size=32, lr=3e-3, lr_rep=0.02, validation_fraction=0.0, early_stopping=False,
           progress=False, device="cpu")


def planted(seed=0):
    """Gaussian data on a curved 2-d manifold: x = tanh(z A) + noise, with the true z kept."""
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((N, M)).astype(np.float32)
    A = rng.standard_normal((M, P)).astype(np.float32)
    X = np.tanh(Z @ A) + 0.05 * rng.standard_normal((N, P)).astype(np.float32)
    return X.astype(np.float32), Z


def make_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return DecoderOnly(mlp_decoder(M, P, (32, 32)), "gaussian", seed=seed, **kwargs)


@pytest.fixture(scope="module")
def fitted():
    X, Z = planted()
    return make_model().fit(X, **FIT), X, Z


def test_fit_learns_the_planted_latents(fitted):
    model, X, Z = fitted
    assert model.latent_.shape == (N, M) and model.latent_.dtype == np.float32
    hist = model.history_["train_recon"].to_numpy()
    assert len(hist) == FIT["epochs"] and hist[-1] < hist[0] - 3.0  # loss decreases (per sample NLL)
    assert np.all(np.diff(hist[-20:]) < 0.05)  # and has settled
    # the learned latents are (up to a smooth map) the true ones: a linear map already explains them
    assert LinearRegression().fit(model.latent_, Z).score(model.latent_, Z) > 0.9
    # the fit reaches the noise floor: Gaussian NLL per entry with sigma=1 is 0.5*mse + 0.919
    floor = 0.5 * 0.05**2 + 0.5 * np.log(2 * np.pi)
    assert model.reconstruction_error(X, z=model.latent_) == pytest.approx(floor, abs=0.01)


def test_inference_recovers_training_latents(fitted):
    model, X, _ = fitted
    # start every sample at the origin, so nothing is copied from the training table
    z = model.transform(X[:30], n_candidates=0, n_steps=300, lr=0.05, progress=False)
    assert z.shape == (30, M)
    spread = np.linalg.norm(model.latent_.std(0))
    dist = np.linalg.norm(z - model.latent_[:30], axis=1) / spread
    assert np.median(dist) < 0.05 and dist.max() < 0.2
    # and reconstructs them as well as training did
    err_inf = model.reconstruction_error(X[:30], z=z, per_sample=True)
    err_train = model.reconstruction_error(X[:30], z=model.latent_[:30], per_sample=True)
    assert err_inf.shape == (30,) and np.all(err_inf <= err_train + 1e-3)
    # default reconstruction_error infers the latents itself and gives the same number
    assert model.reconstruction_error(X[:30], progress=False) == pytest.approx(err_inf.mean(), abs=1e-3)


def test_fit_is_deterministic_and_seed_dependent():
    X, _ = planted(1)
    small = FIT | {"epochs": 10}
    a, b = make_model().fit(X, **small), make_model().fit(X, **small)
    np.testing.assert_array_equal(a.latent_, b.latent_)
    kw = dict(n_steps=50, progress=False)
    np.testing.assert_array_equal(a.transform(X[:5], **kw), b.transform(X[:5], **kw))
    c = make_model().fit(X, **(small | {"seed": 1}))
    assert not np.allclose(a.latent_, c.latent_)


def test_validation_split_and_early_stopping():
    X, _ = planted(2)
    model = make_model().fit(X, **(FIT | {"epochs": 15, "validation_fraction": 0.2, "early_stopping": True,
                                          "patience": 3, "min_epochs": 5}))
    assert len(model.val_idx_) == 30 and len(model.train_idx_) == 120
    assert set(model.val_idx_).isdisjoint(model.train_idx_)
    assert "val_recon" in model.history_ and model.latent_.shape == (N, M)
    assert model.train_summary_["best_epoch"] <= model.train_summary_["epochs_run"] - 1


def test_bernoulli_conv_nb_and_priors():
    rng = np.random.default_rng(0)
    # Bernoulli with the conv decoder on 8x8 images stored as rows; sparse input is accepted
    imgs = (rng.random((40, 64)) < 0.3).astype(np.float32)
    torch.manual_seed(0)
    model = DecoderOnly(conv_decoder(3, (8, 8), (8, 8)), "bce", prior="normal")
    model.fit(sp.csr_matrix(imgs), **(FIT | {"epochs": 5}))
    probs = model.decode(model.latent_[:3])
    assert probs.shape == (3, 64) and probs.min() >= 0 and probs.max() <= 1
    # NB counts with a mixture prior: new samples start from the mixture means
    counts = rng.poisson(5.0, size=(40, 30)).astype(np.float32)
    torch.manual_seed(0)
    nb = DecoderOnly(mlp_decoder(2, 30, (16,)), "nb", prior="gmm", n_components=3)
    nb.fit(counts, **(FIT | {"epochs": 5, "lr_rep": 1e-3}))
    z = nb.transform(counts[:4], n_steps=20, progress=False)
    assert z.shape == (4, 2) and np.isfinite(z).all()
    assert np.isfinite(nb.reconstruction_error(counts[:4], z=z))
    mean = nb.decode(z, scale=counts[:4].sum(1))
    np.testing.assert_allclose(mean.sum(1), counts[:4].sum(1), rtol=1e-4)  # softmax composition x library


def test_save_load_roundtrip(fitted, tmp_path):
    model, X, _ = fitted
    model.save(tmp_path / "m")
    loaded = DecoderOnly.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.latent_, model.latent_)
    np.testing.assert_allclose(loaded.decode(model.latent_[:5]), model.decode(model.latent_[:5]), rtol=1e-6)
    kw = dict(n_candidates=4, n_steps=20, progress=False)
    np.testing.assert_allclose(loaded.transform(X[:5], **kw), model.transform(X[:5], **kw), rtol=1e-5, atol=1e-6)
    assert loaded.is_fitted and len(loaded.history_) == FIT["epochs"]
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "m")
    # a custom decoder cannot be rebuilt from its config: load() says to pass it
    custom = torch.nn.Sequential(torch.nn.Linear(M, P))
    DecoderOnly(custom, "gaussian", n_latent=M).save(tmp_path / "custom")
    with pytest.raises(ModelFormatError, match="decoder="):
        DecoderOnly.load(tmp_path / "custom")
    again = DecoderOnly.load(tmp_path / "custom", decoder=torch.nn.Sequential(torch.nn.Linear(M, P)))
    assert again.n_features == P


def test_bad_inputs_raise(fitted):
    model, X, _ = fitted
    with pytest.raises(ValueError, match="features"):
        model.transform(X[:, :5])
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        make_model().fit(bad, **FIT)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        DecoderOnly(mlp_decoder(M, P, (8,)), "bernoulli").fit(X + 2.0, **FIT)
    with pytest.raises(ValueError, match="integer|count"):
        DecoderOnly(mlp_decoder(M, P, (8,)), "nb").fit(np.abs(X) + 0.5, **FIT)
    with pytest.raises(ValueError, match="torch.nn.Module"):
        DecoderOnly(lambda z: z, "gaussian", n_latent=2)
    with pytest.raises(ValueError, match="latent of size"):
        DecoderOnly(mlp_decoder(M, P, (8,)), "gaussian", n_latent=5)
    with pytest.raises(ValueError, match="empty"):
        model.transform(np.zeros((0, P), dtype=np.float32))
    with pytest.raises(ValueError, match="z must have shape"):
        model.reconstruction_error(X[:3], z=np.zeros((2, M)))
    with pytest.raises(TypeError, match="Unknown training option"):
        make_model().fit(X, not_an_option=1, **FIT)
    with pytest.warns(UserWarning, match="not been fitted"):
        make_model().transform(X[:2], n_steps=1, progress=False)
