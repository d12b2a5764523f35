"""Every model, plan and verb on a CUDA device, checked against the same run on the CPU.

Skipped without a GPU (CI has none). ``benchmarks/gpu.sh`` runs this file on a lent GPU first.
``DGDLENS_TEST_DEVICE=cpu pytest tests/test_cuda.py`` runs the same code on the CPU, to check the tests
themselves without a GPU (the comparisons are then CPU against CPU).

Independent truths: planted cell types and planted sparse atoms (what the model must find on the
device), the CPU run of the same seed (what inference with frozen weights must give within float
tolerance), and a save/load round trip across devices (bit-identical weights).
"""

from __future__ import annotations

import os
import warnings

import anndata as ad
import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import dgdlens as dl
from dgdlens import sae as S
from dgdlens.sim.superposition import planted_sparse_codes
from dgdlens.train import TrainingInterrupted
from dgdlens.train.sae_plan import SAEPlan
from test_dgd import simulate_nb_mixture
from test_multimodal import paired_toy

DEVICE = os.environ.get("DGDLENS_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.usefixtures("one_thread"),
]

SMALL = {"n_latent": 5, "hidden": (32, 32), "n_components": 3}
RUN = {"batch_size": 64, "progress": False}


def _device_type(model) -> str:
    return torch.device(model.device).type


@pytest.fixture(scope="module")
def planted():
    return simulate_nb_mixture(n_cells=600, n_genes=100, n_types=3, seed=7)


@pytest.fixture(scope="module")
def on_device(planted):
    return dl.DGD(planted.copy(), seed=0, **SMALL).train(max_epochs=60, device=DEVICE, **RUN)


@pytest.fixture(scope="module")
def on_cpu(planted):
    return dl.DGD(planted.copy(), seed=0, **SMALL).train(max_epochs=60, device="cpu", **RUN)


def test_dgd_trains_on_the_device_and_finds_the_planted_types(on_device, on_cpu, planted):
    assert _device_type(on_device) == DEVICE
    labels = planted.obs["cell_type"].to_numpy()
    z = on_device.get_latent_representation()
    assert isinstance(z, np.ndarray) and z.shape == (planted.n_obs, 5) and np.isfinite(z).all()
    assert adjusted_rand_score(labels, KMeans(3, n_init=10, random_state=0).fit_predict(z)) > 0.95
    # the same seed on the CPU: float order differs on a GPU, so not bit-equal, but as good a fit
    nll_device = on_device.get_reconstruction_error(per_sample=True).mean()
    nll_cpu = on_cpu.get_reconstruction_error(per_sample=True).mean()
    assert abs(nll_device - nll_cpu) < 0.01 * nll_cpu


def test_held_out_inference_on_the_device_matches_the_cpu(on_cpu, planted):
    new = simulate_nb_mixture(n_cells=120, n_genes=100, n_types=3, seed=7)[:120].copy()
    new.obs_names = [f"new{i}" for i in range(new.n_obs)]
    z_cpu = on_cpu.get_latent_representation(new, device="cpu", progress=False)
    z_dev = on_cpu.get_latent_representation(new, device=DEVICE, progress=False)
    # the same start and the same 200 Adam steps with frozen weights: equal up to float rounding
    np.testing.assert_allclose(z_dev, z_cpu, atol=2e-3)
    nll = dl.evaluate.count_split_nll(on_cpu, new, device=DEVICE, progress=False)
    nll_cpu = dl.evaluate.count_split_nll(on_cpu, new, device="cpu", progress=False)
    np.testing.assert_allclose(nll.to_numpy(), nll_cpu.to_numpy(), rtol=1e-3)


def test_a_model_trained_on_the_device_saves_and_loads_on_the_cpu(on_device, planted, tmp_path):
    on_device.save(tmp_path / "m")
    back = dl.DGD.load(tmp_path / "m", planted.copy(), device="cpu")
    assert _device_type(back) == "cpu"
    for key, value in on_device.module.state_dict().items():
        torch.testing.assert_close(back.module.state_dict()[key], value.cpu(), rtol=0, atol=0)
    np.testing.assert_array_equal(back.get_latent_representation(), on_device.get_latent_representation())
    # and back onto the device
    again = dl.DGD.load(tmp_path / "m", planted.copy(), device=DEVICE)
    assert _device_type(again) == DEVICE
    np.testing.assert_array_equal(again.get_cluster_assignments(), on_device.get_cluster_assignments())


def test_checkpoint_on_the_device_resumes(planted, tmp_path):
    opts = RUN | {"device": DEVICE, "rep_step": "batch", "lr_decay_epoch": 3, "restore_best": False,
                  "early_stopping": False}
    straight = dl.DGD(planted.copy(), seed=2, **SMALL).train(max_epochs=6, **opts)
    ckpt = tmp_path / "run.ckpt"
    dl.DGD(planted.copy(), seed=2, **SMALL).train(max_epochs=2, checkpoint_path=str(ckpt), **opts)
    resumed = dl.DGD(planted.copy(), seed=2, **SMALL).train(max_epochs=6, resume_from=str(ckpt), **opts)
    assert len(resumed.history_) == 6
    # on the CPU this is bit-exact (test_dgd.py); a GPU's reductions may reorder, so within rounding
    np.testing.assert_allclose(resumed.history_["train_loss"], straight.history_["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(resumed.get_latent_representation(), straight.get_latent_representation(),
                               atol=1e-4)


def test_backed_file_and_decoder_subsample_on_the_device(tmp_path):
    data = simulate_nb_mixture(n_cells=900, n_genes=80, n_types=3, seed=5)
    data.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    model = dl.DGD(backed, seed=0, **SMALL)
    model.train(max_epochs=30, decoder_subsample=300, device=DEVICE, **RUN)
    assert model.train_config_["decoder_subsample"] == 300
    labels = data.obs["cell_type"].to_numpy()
    assert adjusted_rand_score(labels, model.get_cluster_assignments()) > 0.9
    backed.file.close()


def test_covariates_on_the_device(tmp_path):
    sim = dl.sim.simulate_batches(150, 120, n_types=4, n_batches=3, n_unseen_batches=1, seed=0)
    seen, unseen = sim[~sim.obs["unseen"].values].copy(), sim[sim.obs["unseen"].values].copy()
    model = dl.DGD(seen, batch_key="batch", n_latent=8, n_components=4, hidden=(64, 64), seed=0)
    model.train(max_epochs=150, batch_size=128, lr_decay_epoch=None, device=DEVICE, progress=False)
    assert _device_type(model) == DEVICE
    z = model.get_latent_representation()
    types = seen.obs["cell_type"].to_numpy()
    assert adjusted_rand_score(types, KMeans(4, n_init=10, random_state=0).fit_predict(z)) > 0.8
    # an unseen batch: its covariate latent is fitted on the device, the cells land with their types
    z_new = model.get_latent_representation(unseen, device=DEVICE, progress=False)
    assert z_new.shape == (unseen.n_obs, 8) and np.isfinite(z_new).all()
    assert model.get_covariate_representation(unseen, device=DEVICE, progress=False).shape[0] == unseen.n_obs


def test_two_modalities_on_the_device():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = paired_toy(150)
        mdata.obs["cell_type"] = [f"t{t}" for t in np.repeat(np.arange(3), 50)]
        model = dl.DGD(mdata, n_latent=4, n_components=3, hidden=(16,), head_hidden=(8,), seed=0)
        model.train(max_epochs=100, batch_size=32, rep_step="batch", lr_rep=0.05, early_stopping=False,
                    device=DEVICE, progress=False)
        z = model.get_latent_representation()
    assert _device_type(model) == DEVICE and np.isfinite(z).all()
    labels = mdata.obs["cell_type"].to_numpy()
    assert adjusted_rand_score(labels, KMeans(3, n_init=10, random_state=0).fit_predict(z)) > 0.9
    assert adjusted_rand_score(labels, model.get_cluster_assignments()) > 0.9


def test_generic_decoder_only_and_autoencoder_on_the_device():
    from sklearn.linear_model import LinearRegression
    from test_autoencoder import make_ae, pixels
    from test_decoder_only import TRAIN, make_model
    from test_decoder_only import planted as curved

    X, Z = curved()
    model = make_model(X).train(**(TRAIN | {"device": DEVICE}))
    z = model.get_latent_representation()
    assert LinearRegression().fit(z, Z).score(z, Z) > 0.9
    cpu = make_model(X).train(**(TRAIN | {"device": "cpu"}))
    assert model.get_reconstruction_error() == pytest.approx(cpu.get_reconstruction_error(), rel=0.02)
    images = pixels()
    ae = make_ae(images).train(max_epochs=30, batch_size=32, progress=False, device=DEVICE)
    np.testing.assert_allclose(ae.get_latent_representation(images[:10]),
                               ae.get_latent_representation()[:10], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def atoms():
    return planted_sparse_codes(n_samples=6000, n_atoms=64, dim=32, k_active=2, offset_scale=1.0, seed=0)


@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk", "jumprelu"])
def test_every_sae_kind_trains_on_the_device_and_matches_the_cpu(atoms, kind):
    train, test = atoms.X[:5000], atoms.X[5000:]
    opts = {"kind": kind, "n_latents": 128, "max_epochs": 3, "batch_size": 64, "seed": 0, "progress": False}
    if kind != "relu":
        opts["k"] = 2
    cpu = S.train_sae(train, device="cpu", **opts)
    dev = S.train_sae(train, device=DEVICE, **opts)
    q_cpu, q_dev = S.metrics(cpu, test), S.metrics(dev, test)
    assert q_dev["fvu"] == pytest.approx(q_cpu["fvu"], abs=0.02)
    assert q_dev["l0"] == pytest.approx(q_cpu["l0"], rel=0.1, abs=0.2)
    assert dev.encode(test).shape == (1000, 128)


def test_topk_sae_on_the_device_recovers_planted_atoms(atoms):
    train, test = atoms.X[:5000], atoms.X[5000:]
    sae = S.train_sae(train, kind="topk", n_latents=128, k=2, max_epochs=20, batch_size=64, seed=0,
                      device=DEVICE, progress=False)
    assert S.metrics(sae, test)["fvu"] < 0.05
    rec = S.recovery(sae.encode(test), atoms.codes[5000:], threshold=0.9)
    assert rec.summary["fraction_recovered"] >= 0.85


def test_sae_checkpoint_on_the_device_resumes(atoms, tmp_path, monkeypatch):
    from test_sae import _interrupt_at_epoch

    opts = {"kind": "topk", "n_latents": 64, "k": 2, "max_epochs": 4, "batch_size": 128, "seed": 0,
            "dead_after": 300, "device": DEVICE, "progress": False}
    X = atoms.X[:2000]
    straight = S.train_sae(X, **opts)
    ckpt = tmp_path / "sae.ckpt"
    original = _interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted):
        S.train_sae(X, checkpoint_path=str(ckpt), **opts)
    monkeypatch.setattr(SAEPlan, "on_epoch_start", original)
    resumed = S.train_sae(X, resume_from=str(ckpt), **opts)
    # bit-exact on the CPU (test_sae.py); on a GPU within rounding
    np.testing.assert_allclose(resumed.history_["train_loss"], straight.history_["train_loss"], rtol=1e-5)
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=1e-4, atol=1e-5)


def test_lens_and_steering_through_tl_on_the_device(on_device, planted):
    adata = planted.copy()
    on_device.add_to_adata(adata)
    sae = dl.tl.sae(adata, use_rep="X_dgd", kind="topk", n_latents=16, k=2, max_epochs=20, device=DEVICE,
                    progress=False)
    assert adata.obsm["X_sae"].shape == (adata.n_obs, 16)
    feature = int(np.asarray((adata.obsm["X_sae"] > 0).sum(0)).argmax())
    firing = adata.obsm["X_sae"][:, feature].toarray().ravel()
    seen = float(np.median(firing[firing > 0]))  # an activation half the cells it fires in reach
    dl.tl.steer(adata, on_device, sae, feature, use_rep="X_dgd", mode="clamp", value=seen, gene_sets=None,
                device=DEVICE, n_controls=20)
    genes = adata.uns["dgdlens_steer"]["genes"]
    assert len(genes) == adata.n_vars and np.isfinite(genes["log2fc"].to_numpy()).all()
