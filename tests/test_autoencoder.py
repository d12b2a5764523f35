"""Autoencoder: the encoder + decoder baseline of the decoder-only comparison."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import expit

from dgdlens._io import ModelFormatError
from dgdlens.models.autoencoder import Autoencoder
from dgdlens.nn.conv import conv_decoder, conv_encoder
from dgdlens.nn.decoders import mlp_decoder, mlp_encoder

FIT = dict(epochs=60, batch_size=32, lr=3e-3, validation_fraction=0.0, early_stopping=False, progress=False,
           device="cpu")


def pixels(n=120, seed=0):
    """Binary-ish 8x8 'images' from two latent factors, in [0, 1]."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 2))
    logits = 3 * z @ rng.standard_normal((2, 64))
    return expit(logits).astype(np.float32)


def make_ae(seed=0, m=2, **kwargs):
    torch.manual_seed(seed)
    return Autoencoder(mlp_encoder(64, m, (32,)), mlp_decoder(m, 64, (32,)), "bernoulli", seed=seed, **kwargs)


@pytest.fixture(scope="module")
def fitted():
    X = pixels()
    return make_ae().fit(X, **FIT), X


def test_fit_transform_shapes_and_loss_decreases(fitted):
    model, X = fitted
    z = model.transform(X[:10])
    assert z.shape == (10, 2) and z.dtype == np.float32
    np.testing.assert_allclose(model.latent_[:10], z, rtol=1e-5, atol=1e-6)  # latent_ is the encoder's output
    hist = model.history_["train_recon"].to_numpy()
    assert len(hist) == FIT["epochs"] and hist[-1] < 0.8 * hist[0]


def test_transform_and_error_match_direct_computation(fitted):
    """Latents are the encoder's forward pass; the error is the BCE per pixel written out in numpy."""
    model, X = fitted
    with torch.no_grad():
        z_direct = model.encoder(torch.from_numpy(X)).numpy()
        p = torch.sigmoid(model.decoder(torch.from_numpy(z_direct))).double().numpy()
    np.testing.assert_allclose(model.transform(X), z_direct, rtol=1e-5, atol=1e-6)
    bce = -(X * np.log(p) + (1 - X) * np.log1p(-p)).mean(1)
    np.testing.assert_allclose(model.reconstruction_error(X, per_sample=True), bce, rtol=1e-4)
    assert model.reconstruction_error(X) == pytest.approx(bce.mean(), rel=1e-4)
    np.testing.assert_allclose(model.decode(z_direct[:3]), p[:3], rtol=1e-5)


def test_refinement_lowers_the_error(fitted):
    """Optimising the encoder's latents with the decoder frozen can only help the reconstruction."""
    model, X = fitted
    before = model.reconstruction_error(X, per_sample=True)
    after = model.reconstruction_error(X, refine_steps=50, per_sample=True)
    assert np.all(after <= before + 1e-5) and after.mean() < before.mean()
    z = model.transform(X[:5], refine_steps=50)
    assert z.shape == (5, 2) and not np.allclose(z, model.transform(X[:5]))
    with pytest.raises(ValueError, match="refine_steps"):
        model.transform(X[:5], refine_steps=-1)


def test_deterministic_by_seed():
    X = pixels(60, seed=1)
    small = FIT | {"epochs": 5}
    a, b = make_ae().fit(X, **small), make_ae().fit(X, **small)
    np.testing.assert_array_equal(a.transform(X), b.transform(X))
    c = make_ae().fit(X, **(small | {"seed": 3}))  # same initial weights, other batch order
    assert not np.allclose(a.transform(X), c.transform(X))


def test_validation_split_and_nb_counts():
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(2.0, 2.0, size=(80, 1)) * np.ones((1, 30))).astype(np.float32)
    counts[counts.sum(1) == 0, 0] = 1
    torch.manual_seed(0)
    ae = Autoencoder(mlp_encoder(30, 2, (16,)), mlp_decoder(2, 30, (16,)), "nb")
    assert ae.module.input_transform == "log1p"  # the encoder sees log1p(counts) by default
    ae.fit(counts, **(FIT | {"epochs": 8, "validation_fraction": 0.25, "early_stopping": True, "patience": 2,
                            "min_epochs": 3}))
    assert len(ae.val_idx_) == 20 and "val_recon" in ae.history_
    assert np.isfinite(ae.reconstruction_error(counts[:5]))


def test_conv_pair_and_save_load(fitted, tmp_path):
    model, X = fitted
    model.save(tmp_path / "ae")
    loaded = Autoencoder.load(tmp_path / "ae")
    np.testing.assert_allclose(loaded.transform(X), model.transform(X), rtol=1e-6)
    assert loaded.reconstruction_error(X) == pytest.approx(model.reconstruction_error(X), rel=1e-6)
    assert loaded.is_fitted and len(loaded.history_) == FIT["epochs"]
    torch.manual_seed(0)
    conv = Autoencoder(conv_encoder((8, 8), 3, (8, 8)), conv_decoder(3, (8, 8), (8, 8)), "bce")
    conv.fit(X, **(FIT | {"epochs": 2}))
    conv.save(tmp_path / "conv")
    np.testing.assert_allclose(Autoencoder.load(tmp_path / "conv").transform(X[:4]), conv.transform(X[:4]),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelFormatError, match="Autoencoder"):
        from dgdlens.models.decoder_only import DecoderOnly

        DecoderOnly.load(tmp_path / "ae")


def test_bad_inputs_raise(fitted):
    model, X = fitted
    with pytest.raises(ValueError, match="must match|latent dimensions"):
        Autoencoder(mlp_encoder(64, 3, (8,)), mlp_decoder(2, 64, (8,)))
    with pytest.raises(ValueError, match="encoder could not encode"):
        Autoencoder(mlp_encoder(10, 2, (8,)), mlp_decoder(2, 64, (8,)))
    with pytest.raises(ValueError, match="torch.nn.Module"):
        Autoencoder("encoder", mlp_decoder(2, 64, (8,)))
    with pytest.raises(ValueError, match="features"):
        model.transform(X[:, :10])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.reconstruction_error(X * 5)
    with pytest.raises(ValueError, match="input_transform"):
        make_ae(input_transform="log")
    with pytest.raises(ValueError, match="epochs"):
        make_ae().fit(X, **(FIT | {"epochs": 0}))
    with pytest.warns(UserWarning, match="not been fitted"):
        make_ae().transform(X[:2])
