"""Autoencoder: the encoder + decoder baseline of the decoder-only comparison."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import expit

from dgdlens._io import ModelFormatError
from dgdlens.models.autoencoder import Autoencoder
from dgdlens.nn.conv import conv_decoder, conv_encoder
from dgdlens.nn.decoders import mlp_decoder, mlp_encoder
from dgdlens.train import CheckpointError
from dgdlens.train import runner as runner_module

TRAIN = dict(max_epochs=60, batch_size=32, lr=3e-3, early_stopping=False, progress=False, device="cpu")


def pixels(n=120, seed=0):
    """Binary-ish 8x8 'images' from two latent factors, in [0, 1]."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 2))
    logits = 3 * z @ rng.standard_normal((2, 64))
    return expit(logits).astype(np.float32)


def make_ae(X, seed=0, m=2, validation_fraction=0.0, **kwargs):
    torch.manual_seed(seed)
    return Autoencoder(X, mlp_encoder(64, m, (32,)), mlp_decoder(m, 64, (32,)), "bernoulli", seed=seed,
                       validation_fraction=validation_fraction, **kwargs)


def history(model) -> pd.DataFrame:
    return model.history_.drop(columns="time")


@pytest.fixture(scope="module")
def trained():
    X = pixels()
    return make_ae(X).train(**TRAIN), X


def test_latents_shapes_and_loss_decreases(trained):
    model, X = trained
    z = model.get_latent_representation(X[:10])
    assert z.shape == (10, 2) and z.dtype == np.float32
    # without X: the encoder's output for the training samples, in input order
    np.testing.assert_allclose(model.get_latent_representation()[:10], z, rtol=1e-5, atol=1e-6)
    hist = model.history_["train_recon"].to_numpy()
    assert len(hist) == TRAIN["max_epochs"] and hist[-1] < 0.8 * hist[0]
    assert model.is_trained_ and "trained" in repr(model)


def test_latents_and_error_match_direct_computation(trained):
    """Latents are the encoder's forward pass; the error is the BCE written out in numpy."""
    model, X = trained
    with torch.no_grad():
        z_direct = model.encoder(torch.from_numpy(X)).numpy()
        p = torch.sigmoid(model.decoder(torch.from_numpy(z_direct))).double().numpy()
    np.testing.assert_allclose(model.get_latent_representation(X), z_direct, rtol=1e-5, atol=1e-6)
    bce = -(X * np.log(p) + (1 - X) * np.log1p(-p))
    per_pixel = model.get_reconstruction_error(X[:50], per_sample=True, per_feature=True)
    np.testing.assert_allclose(per_pixel, bce[:50].mean(1), rtol=1e-4)
    # default: nats per sample (summed over features), averaged over samples, on the training data
    assert model.get_reconstruction_error() == pytest.approx(bce.sum(1).mean(), rel=1e-4)
    assert model.get_reconstruction_error(per_feature=True) == pytest.approx(bce.mean(), rel=1e-4)
    np.testing.assert_allclose(model.get_reconstruction_error(per_sample=True), bce.sum(1), rtol=1e-4)
    np.testing.assert_allclose(model.decode(z_direct[:3]), p[:3], rtol=1e-5)


def test_refinement_lowers_the_error(trained):
    """Optimising the encoder's latents with the decoder frozen can only help the reconstruction."""
    model, X = trained
    before = model.get_reconstruction_error(X, per_sample=True)
    after = model.get_reconstruction_error(X, refine_steps=50, per_sample=True)
    assert np.all(after <= before + 1e-4) and after.mean() < before.mean()
    z = model.get_latent_representation(X[:5], refine_steps=50)
    assert z.shape == (5, 2) and not np.allclose(z, model.get_latent_representation(X[:5]))
    with pytest.raises(ValueError, match="refine_steps"):
        model.get_latent_representation(X[:5], refine_steps=-1)


def test_deterministic_by_seed():
    X = pixels(60, seed=1)
    small = TRAIN | {"max_epochs": 5}
    a, b = make_ae(X).train(**small), make_ae(X).train(**small)
    np.testing.assert_array_equal(a.get_latent_representation(), b.get_latent_representation())
    c = make_ae(X).train(**(small | {"seed": 3}))  # same initial weights, other batch order
    assert not np.allclose(a.get_latent_representation(), c.get_latent_representation())


def test_validation_split_early_stopping_and_nb_counts():
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(2.0, 2.0, size=(80, 1)) * np.ones((1, 30))).astype(np.float32)
    counts[counts.sum(1) == 0, 0] = 1

    def make():
        torch.manual_seed(0)
        return Autoencoder(counts, mlp_encoder(30, 2, (16,)), mlp_decoder(2, 30, (16,)), "nb",
                           validation_fraction=0.25)

    ae = make()
    assert ae.module.input_transform == "log1p"  # the encoder sees log1p(counts) by default
    assert len(ae.val_idx) == 20 and set(ae.val_idx).isdisjoint(ae.train_idx)
    # nothing improves by min_delta after the first epoch: stop after patience epochs, restore epoch 0
    ae.train(**(TRAIN | {"max_epochs": 8, "early_stopping": True, "patience": 2, "min_epochs": 3, "min_delta": 1e9}))
    assert "val_recon" in ae.history_ and "val_loss" in ae.history_
    assert ae.train_summary_["stopped_early"] and ae.train_summary_["epochs_run"] == 3
    one = make().train(**(TRAIN | {"max_epochs": 1}))
    for key, value in one.module.state_dict().items():  # the restored weights are epoch 0's
        torch.testing.assert_close(ae.module.state_dict()[key], value, rtol=0, atol=0)
    assert np.isfinite(ae.get_reconstruction_error(counts[:5]))


def test_conv_pair_and_save_load(trained, tmp_path):
    model, X = trained
    model.save(tmp_path / "ae")
    loaded = Autoencoder.load(tmp_path / "ae")
    np.testing.assert_allclose(loaded.get_latent_representation(X), model.get_latent_representation(X), rtol=1e-6)
    assert loaded.get_reconstruction_error(X) == pytest.approx(model.get_reconstruction_error(X), rel=1e-6)
    assert loaded.is_trained_ and len(loaded.history_) == TRAIN["max_epochs"]
    pd.testing.assert_frame_equal(loaded.history_, model.history_)
    with pytest.raises(ValueError, match="without its training data"):
        loaded.get_latent_representation()
    with_data = Autoencoder.load(tmp_path / "ae", X=X)
    np.testing.assert_allclose(with_data.get_latent_representation(), model.get_latent_representation(), rtol=1e-6)
    torch.manual_seed(0)
    conv = Autoencoder(X, conv_encoder((8, 8), 3, (8, 8)), conv_decoder(3, (8, 8), (8, 8)), "bce")
    conv.train(**(TRAIN | {"max_epochs": 2}))
    conv.save(tmp_path / "conv")
    np.testing.assert_allclose(Autoencoder.load(tmp_path / "conv").get_latent_representation(X[:4]),
                               conv.get_latent_representation(X[:4]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelFormatError, match="Autoencoder"):
        from dgdlens.models.decoder_only import DecoderOnly

        DecoderOnly.load(tmp_path / "ae")
    # custom modules are passed to load() again
    torch.manual_seed(0)
    custom = Autoencoder(X, torch.nn.Linear(64, 2), torch.nn.Linear(2, 64), "bce", n_latent=2)
    custom.train(**(TRAIN | {"max_epochs": 1})).save(tmp_path / "custom")
    with pytest.raises(ModelFormatError, match="encoder="):
        Autoencoder.load(tmp_path / "custom")
    again = Autoencoder.load(tmp_path / "custom", encoder=torch.nn.Linear(64, 2), decoder=torch.nn.Linear(2, 64))
    np.testing.assert_array_equal(again.get_latent_representation(X[:3]), custom.get_latent_representation(X[:3]))


def test_checkpoint_resume_is_bit_exact(tmp_path, monkeypatch):
    write = runner_module.write_checkpoint

    def keeping(path, state, **kwargs):  # keep each checkpoint as <path>.epoch<k>
        out = write(path, state, **kwargs)
        shutil.copy(out, f"{path}.epoch{state['epoch']}")
        return out

    monkeypatch.setattr(runner_module, "write_checkpoint", keeping)
    X = pixels(80, seed=2)
    opts = dict(TRAIN, max_epochs=6, batch_size=16, early_stopping=True, patience=3, min_epochs=1)
    ckpt = tmp_path / "ae.ckpt"
    full = make_ae(X, validation_fraction=0.25).train(checkpoint_path=str(ckpt), checkpoint_every=2, **opts)
    assert (tmp_path / "ae.ckpt.epoch2").exists() and (tmp_path / "ae.ckpt.epoch4").exists()
    resumed = make_ae(X, validation_fraction=0.25).train(resume_from=str(tmp_path / "ae.ckpt.epoch2"), **opts)
    pd.testing.assert_frame_equal(history(resumed), history(full))
    for key, value in full.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[key], value, rtol=0, atol=0)
    np.testing.assert_array_equal(resumed.get_latent_representation(), full.get_latent_representation())


def test_checkpoint_of_other_data_or_a_pickle_is_refused(tmp_path):
    X = pixels(60, seed=3)
    opts = dict(TRAIN, max_epochs=1)
    ckpt = str(tmp_path / "a.ckpt")
    make_ae(X).train(checkpoint_path=ckpt, **opts)
    with pytest.raises(CheckpointError, match="data_sha256"):
        make_ae(X[::-1].copy()).train(resume_from=ckpt, **opts)
    with pytest.raises(CheckpointError, match="n_obs"):
        make_ae(X[:40]).train(resume_from=ckpt, **opts)
    with pytest.raises(CheckpointError, match="module_sha256"):  # another architecture
        torch.manual_seed(0)
        Autoencoder(X, mlp_encoder(64, 2, (16,)), mlp_decoder(2, 64, (16,)), validation_fraction=0.0).train(
            resume_from=ckpt, **opts)

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "marker"), "w"))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"epoch": 1, "plan": Payload()}))
    with pytest.raises(CheckpointError, match="not a dgdlens checkpoint"):
        make_ae(X).train(resume_from=str(evil), **opts)
    assert not (tmp_path / "marker").exists()
    pickle.loads(evil.read_bytes())
    assert (tmp_path / "marker").exists()  # the payload was live: refusing it is what kept it from running


def test_bad_inputs_raise(trained):
    model, X = trained
    with pytest.raises(ValueError, match="must match|latent dimensions"):
        Autoencoder(X, mlp_encoder(64, 3, (8,)), mlp_decoder(2, 64, (8,)))
    with pytest.raises(ValueError, match="encoder could not encode"):
        Autoencoder(X, mlp_encoder(10, 2, (8,)), mlp_decoder(2, 64, (8,)))
    with pytest.raises(ValueError, match="torch.nn.Module"):
        Autoencoder(X, "encoder", mlp_decoder(2, 64, (8,)))
    with pytest.raises(ValueError, match="X is None"):
        Autoencoder(None, mlp_encoder(64, 2, (8,)), mlp_decoder(2, 64, (8,)))
    with pytest.raises(ValueError, match="features"):
        model.get_latent_representation(X[:, :10])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.get_reconstruction_error(X * 5)
    with pytest.raises(ValueError, match="input_transform"):
        make_ae(X, input_transform="log")
    with pytest.raises(ValueError, match="max_epochs"):
        make_ae(X).train(**(TRAIN | {"max_epochs": 0}))
    with pytest.raises(TypeError, match="Unknown training option"):
        make_ae(X).train(**(TRAIN | {"lr_rep": 0.1}))
    with pytest.warns(UserWarning, match="not been trained"):
        make_ae(X).get_latent_representation(X[:2])
