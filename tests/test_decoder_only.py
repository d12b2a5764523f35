"""DecoderOnly: the general decoder-only learner (no encoder, one free latent per sample)."""

from __future__ import annotations

import pickle
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from sklearn.linear_model import LinearRegression

from dgdlens._io import ModelFormatError
from dgdlens.models.decoder_only import DecoderOnly
from dgdlens.nn.conv import conv_decoder
from dgdlens.nn.decoders import mlp_decoder
from dgdlens.train import CheckpointError
from dgdlens.train import runner as runner_module

N, M, P = 150, 2, 20
TRAIN = dict(max_epochs=150, batch_size=32, lr=3e-3, lr_rep=0.02, early_stopping=False, progress=False, device="cpu")


def planted(seed=0, n=N):
    """Gaussian data on a curved 2-d manifold: x = tanh(z A) + noise, with the true z kept."""
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, M)).astype(np.float32)
    A = rng.standard_normal((M, P)).astype(np.float32)
    X = np.tanh(Z @ A) + 0.05 * rng.standard_normal((n, P)).astype(np.float32)
    return X.astype(np.float32), Z


def make_model(X, seed=0, validation_fraction=0.0, **kwargs):
    torch.manual_seed(seed)
    return DecoderOnly(X, mlp_decoder(M, P, (32, 32)), "gaussian", seed=seed, validation_fraction=validation_fraction,
                       **kwargs)


def history(model) -> pd.DataFrame:
    return model.history_.drop(columns="time")


@pytest.fixture(scope="module")
def trained():
    X, Z = planted()
    return make_model(X).train(**TRAIN), X, Z


def test_training_learns_the_planted_latents(trained):
    model, X, Z = trained
    z = model.get_latent_representation()
    assert model.is_trained_ and z.shape == (N, M) and z.dtype == np.float32
    hist = model.history_["train_recon"].to_numpy()
    assert len(hist) == TRAIN["max_epochs"] and hist[-1] < hist[0] - 3.0  # loss decreases (per sample NLL)
    assert np.all(np.diff(hist[-20:]) < 0.05)  # and has settled
    # the learned latents are (up to a smooth map) the true ones: a linear map already explains them
    assert LinearRegression().fit(z, Z).score(z, Z) > 0.9
    # the fit reaches the noise floor: Gaussian NLL per entry with sigma=1 is 0.5*mse + 0.919
    floor = 0.5 * 0.05**2 + 0.5 * np.log(2 * np.pi)
    assert model.get_reconstruction_error(per_feature=True) == pytest.approx(floor, abs=0.01)
    # the default unit is nats per sample (summed over features), as the DGD's
    assert model.get_reconstruction_error() == pytest.approx(P * model.get_reconstruction_error(per_feature=True))
    assert model.get_reconstruction_error(X) == model.get_reconstruction_error()  # the registered X: learned latents
    np.testing.assert_array_equal(model.get_latent_representation(X), z)
    assert "trained" in repr(model) and "n_obs=150" in repr(model)


def test_inference_recovers_training_latents(trained):
    model, X, _ = trained
    learned = model.get_latent_representation()
    # start every sample at the origin, so nothing is copied from the training table
    z = model.get_latent_representation(X[:30], n_candidates=0, n_steps=300, lr=0.05, progress=False)
    assert z.shape == (30, M) and model.last_inference_loss_.shape == (30,)
    spread = np.linalg.norm(learned.std(0))
    dist = np.linalg.norm(z - learned[:30], axis=1) / spread
    assert np.median(dist) < 0.05 and dist.max() < 0.2
    # and reconstructs them as well as training did
    err_inf = model.get_reconstruction_error(X[:30], z=z, per_sample=True, per_feature=True)
    err_train = model.get_reconstruction_error(X[:30], z=learned[:30], per_sample=True, per_feature=True)
    assert err_inf.shape == (30,) and np.all(err_inf <= err_train + 1e-3)
    # the default infers the latents itself and gives the same number
    assert model.get_reconstruction_error(X[:30], per_feature=True, progress=False) == pytest.approx(err_inf.mean(),
                                                                                                     abs=1e-3)
    # candidate starts from the learned latents: one step from the best one already fits well
    z1 = model.get_latent_representation(X[:30], n_candidates=32, n_steps=1, progress=False)
    assert np.median(np.linalg.norm(z1 - learned[:30], axis=1) / spread) < 0.5


def test_training_is_deterministic_and_seed_dependent():
    X, _ = planted(1)
    small = TRAIN | {"max_epochs": 10}
    a, b = make_model(X).train(**small), make_model(X).train(**small)
    np.testing.assert_array_equal(a.get_latent_representation(), b.get_latent_representation())
    kw = dict(n_steps=50, progress=False)
    np.testing.assert_array_equal(a.get_latent_representation(X[:5], **kw), b.get_latent_representation(X[:5], **kw))
    c = make_model(X).train(**(small | {"seed": 1}))  # same initial weights, another batch order
    assert not np.allclose(a.get_latent_representation(), c.get_latent_representation())


def test_validation_split_and_early_stopping():
    X, _ = planted(2)
    model = make_model(X, validation_fraction=0.2)
    assert len(model.val_idx) == 30 and len(model.train_idx) == 120
    assert set(model.val_idx).isdisjoint(model.train_idx)
    # nothing improves by min_delta after the first epoch: stop after patience epochs, restore epoch 0
    model.train(**(TRAIN | {"max_epochs": 50, "early_stopping": True, "patience": 2, "min_epochs": 3,
                            "min_delta": 1e9}))
    summary = model.train_summary_
    assert summary["stopped_early"] and summary["epochs_run"] == 3 and summary["best_epoch"] == 0
    assert "val_recon" in model.history_ and model.get_latent_representation().shape == (N, M)
    one = make_model(X, validation_fraction=0.2).train(**(TRAIN | {"max_epochs": 1}))
    for key, value in one.module.decoder.state_dict().items():  # the restored weights are epoch 0's
        torch.testing.assert_close(model.module.decoder.state_dict()[key], value, rtol=0, atol=0)
    # without a validation split early stopping watches the training loss, and says so
    with pytest.warns(UserWarning, match="No validation split"):
        make_model(X).train(**(TRAIN | {"max_epochs": 2, "early_stopping": True}))


def test_bernoulli_conv_nb_and_priors():
    rng = np.random.default_rng(0)
    # Bernoulli with the conv decoder on 8x8 images stored as rows; sparse input is accepted
    imgs = (rng.random((40, 64)) < 0.3).astype(np.float32)
    torch.manual_seed(0)
    model = DecoderOnly(sp.csr_matrix(imgs), conv_decoder(3, (8, 8), (8, 8)), "bce", prior="normal",
                        validation_fraction=0.0)
    model.train(**(TRAIN | {"max_epochs": 5}))
    probs = model.decode(model.get_latent_representation()[:3])
    assert probs.shape == (3, 64) and probs.min() >= 0 and probs.max() <= 1
    # NB counts with a mixture prior: new samples start from the mixture means
    counts = rng.poisson(5.0, size=(40, 30)).astype(np.float32)
    torch.manual_seed(0)
    nb = DecoderOnly(counts, mlp_decoder(2, 30, (16,)), "nb", prior="gmm", n_components=3, validation_fraction=0.0)
    nb.train(**(TRAIN | {"max_epochs": 5, "lr_rep": 1e-3}))
    z = nb.get_latent_representation(counts[:4], n_steps=20, progress=False)
    assert z.shape == (4, 2) and np.isfinite(z).all()
    assert np.isfinite(nb.get_reconstruction_error(counts[:4], z=z))
    mean = nb.decode(z, scale=counts[:4].sum(1))
    np.testing.assert_allclose(mean.sum(1), counts[:4].sum(1), rtol=1e-4)  # softmax composition x library


def test_save_load_roundtrip(trained, tmp_path):
    model, X, _ = trained
    model.save(tmp_path / "m")
    loaded = DecoderOnly.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())
    z5 = model.get_latent_representation()[:5]
    np.testing.assert_allclose(loaded.decode(z5), model.decode(z5), rtol=1e-6)
    kw = dict(n_candidates=4, n_steps=20, progress=False)
    np.testing.assert_allclose(loaded.get_latent_representation(X[:5], **kw),
                               model.get_latent_representation(X[:5], **kw), rtol=1e-5, atol=1e-6)
    assert loaded.is_trained_ and len(loaded.history_) == TRAIN["max_epochs"]
    pd.testing.assert_frame_equal(loaded.history_, model.history_)
    # loaded without data: the training error needs X again (the same data, checked)
    with pytest.raises(ValueError, match="without its training data"):
        loaded.get_reconstruction_error()
    again = DecoderOnly.load(tmp_path / "m", X=X)
    assert again.get_reconstruction_error() == pytest.approx(model.get_reconstruction_error(), rel=1e-6)
    with pytest.raises(ModelFormatError, match="not the data"):
        DecoderOnly.load(tmp_path / "m", X=X + 0.5)
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "m")
    model.save(tmp_path / "nolat", save_latents=False)
    with pytest.raises(ValueError, match="save_latents=False"):
        DecoderOnly.load(tmp_path / "nolat").get_latent_representation()
    # a custom decoder cannot be rebuilt from its config: load() says to pass it
    DecoderOnly(X, torch.nn.Sequential(torch.nn.Linear(M, P)), "gaussian", n_latent=M).save(tmp_path / "custom")
    with pytest.raises(ModelFormatError, match="decoder="):
        DecoderOnly.load(tmp_path / "custom")
    again = DecoderOnly.load(tmp_path / "custom", decoder=torch.nn.Sequential(torch.nn.Linear(M, P)))
    assert again.n_features == P


def _keep_every_checkpoint(monkeypatch):
    """Copy each checkpoint the runner writes to ``<path>.epoch<k>`` (the file itself is overwritten)."""
    write = runner_module.write_checkpoint

    def keeping(path, state, **kwargs):
        out = write(path, state, **kwargs)
        shutil.copy(out, f"{path}.epoch{state['epoch']}")
        return out

    monkeypatch.setattr(runner_module, "write_checkpoint", keeping)


def test_checkpoint_resume_is_bit_exact(tmp_path, monkeypatch):
    _keep_every_checkpoint(monkeypatch)
    X, _ = planted(3, n=80)
    opts = dict(max_epochs=6, batch_size=16, early_stopping=True, patience=3, min_epochs=1, progress=False,
                device="cpu", polish_steps=5)
    build = dict(validation_fraction=0.25, prior="gmm", n_components=3)
    ckpt = tmp_path / "run.ckpt"
    full = make_model(X, **build).train(checkpoint_path=str(ckpt), checkpoint_every=2, **opts)
    assert sorted(p.name for p in tmp_path.glob("run.ckpt.epoch*")) == ["run.ckpt.epoch2", "run.ckpt.epoch4",
                                                                        "run.ckpt.epoch6"]
    resumed = make_model(X, **build).train(resume_from=str(tmp_path / "run.ckpt.epoch4"), **opts)
    pd.testing.assert_frame_equal(history(resumed), history(full))
    np.testing.assert_array_equal(resumed.get_latent_representation(), full.get_latent_representation())
    for key, value in full.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[key], value, rtol=0, atol=0)
    assert resumed.train_summary_["best_epoch"] == full.train_summary_["best_epoch"]


def test_checkpoint_of_other_data_is_refused(tmp_path):
    X, _ = planted(4, n=60)
    ckpt = str(tmp_path / "a.ckpt")
    opts = dict(max_epochs=1, batch_size=16, early_stopping=False, progress=False, device="cpu", polish_steps=0)
    make_model(X).train(checkpoint_path=ckpt, **opts)
    make_model(X).train(resume_from=ckpt, **(opts | {"max_epochs": 2}))  # the same data resume
    with pytest.raises(CheckpointError, match="data_sha256"):  # same shape, other values
        make_model(X[::-1].copy()).train(resume_from=ckpt, **opts)
    with pytest.raises(CheckpointError, match="n_obs"):  # other shape
        make_model(X[:50]).train(resume_from=ckpt, **opts)
    with pytest.raises(CheckpointError, match="split_sha256"):  # another split of the same data
        make_model(X, validation_fraction=0.2).train(resume_from=ckpt, **opts)
    # AnnData: the obs and var names are part of the fingerprint
    names = dict(obs=pd.DataFrame(index=[f"c{i}" for i in range(60)]),
                 var=pd.DataFrame(index=[f"g{j}" for j in range(P)]))
    adata_ckpt = str(tmp_path / "ad.ckpt")
    make_model(ad.AnnData(X, **names)).train(checkpoint_path=adata_ckpt, **opts)
    renamed = ad.AnnData(X, obs=pd.DataFrame(index=[f"d{i}" for i in range(60)]), var=names["var"])
    with pytest.raises(CheckpointError, match="data_sha256"):
        make_model(renamed).train(resume_from=adata_ckpt, **opts)


class _Payload:
    """Unpickling this creates a marker file: proof that a loader executed the pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_passed_as_checkpoint_is_refused_without_running(tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()  # the payload does run when unpickled
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.ckpt"
    torch.save({"epoch": 1, "plan": _Payload(marker)}, evil)  # what an old-style pickle checkpoint looks like
    X, _ = planted(5, n=40)
    with pytest.raises(CheckpointError, match="not a dgdlens checkpoint"):
        make_model(X).train(max_epochs=2, early_stopping=False, resume_from=str(evil), progress=False, device="cpu")
    assert not marker.exists()


def test_bad_inputs_raise(trained):
    model, X, _ = trained
    with pytest.raises(ValueError, match="features"):
        model.get_latent_representation(X[:, :5])
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        make_model(bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        DecoderOnly(X + 2.0, mlp_decoder(M, P, (8,)), "bernoulli")
    with pytest.raises(ValueError, match="integer|count"):
        DecoderOnly(np.abs(X) + 0.5, mlp_decoder(M, P, (8,)), "nb")
    with pytest.raises(ValueError, match="torch.nn.Module"):
        DecoderOnly(X, lambda z: z, "gaussian", n_latent=2)
    with pytest.raises(ValueError, match="latent of size"):
        DecoderOnly(X, mlp_decoder(M, P, (8,)), "gaussian", n_latent=5)
    with pytest.raises(ValueError, match="X is None"):
        DecoderOnly(None, mlp_decoder(M, P, (8,)), "gaussian")
    with pytest.raises(ValueError, match="validation_fraction"):
        make_model(X, validation_fraction=1.0)
    with pytest.raises(ValueError, match="empty"):
        model.get_latent_representation(np.zeros((0, P), dtype=np.float32))
    with pytest.raises(ValueError, match="z must have shape"):
        model.get_reconstruction_error(X[:3], z=np.zeros((2, M)))
    with pytest.raises(TypeError, match="Unknown training option"):
        make_model(X).train(not_an_option=1, **TRAIN)
    with pytest.raises(TypeError, match="'lr_decoder' is called 'lr'"):
        make_model(X).train(lr_decoder=1e-3, **(TRAIN | {"max_epochs": 1}))
    with pytest.raises(ValueError, match="max_epochs"):
        make_model(X).train(**(TRAIN | {"max_epochs": 0}))
    with pytest.warns(UserWarning, match="not been trained"):
        make_model(X).get_latent_representation(X[:2], n_steps=1, progress=False)
