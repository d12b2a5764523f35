"""The DGD end to end on small simulated count data with planted cell types.

Ground truth comes from the simulation (planted clusters, the NB moments of the model itself) and
from round trips (save/load, checkpoint/resume, a training cell embedded again as a new cell).
Everything trains for seconds on CPU: few cells, few genes, a small decoder.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

import dgdlens as dl
from dgdlens._io import ModelFormatError
from dgdlens.data import GeneMismatchError
from dgdlens.models.dgd import default_n_components

SMALL = {"n_latent": 5, "hidden": (32, 32)}
# Per-batch representation steps reach a separated latent space in tens of epochs on this data; the
# reference's once-per-cell hyperprior keeps the mixture from shrinking onto one point meanwhile.
FAST = {"batch_size": 64, "rep_step": "batch", "lr_rep": 0.05, "hyperprior": "per_cell", "early_stopping": False,
        "device": "cpu", "progress": False}


pytestmark = pytest.mark.usefixtures("one_thread")


def simulate_nb_mixture(n_cells: int = 360, n_genes: int = 100, n_types: int = 3, seed: int = 0) -> ad.AnnData:
    """NB counts from ``n_types`` expression programs: each type up-regulates its own 15 genes 4-10x."""
    rng = np.random.default_rng(seed)
    base = rng.gamma(1.0, 1.0, n_genes)
    fold = np.ones((n_types, n_genes))
    for k in range(n_types):
        up = rng.choice(n_genes, 15, replace=False)
        fold[k, up] = rng.uniform(4, 10, 15)
    programs = base * fold
    programs /= programs.sum(1, keepdims=True)
    labels = rng.integers(0, n_types, n_cells)
    library = rng.lognormal(np.log(800), 0.3, n_cells)
    mean = programs[labels] * library[:, None]
    r = 5.0
    counts = rng.negative_binomial(r, r / (r + mean)).astype(np.float32)
    counts[np.arange(n_cells), np.arange(n_cells) % n_genes] += 1  # no empty cell or gene
    a = ad.AnnData(sp.csr_matrix(counts),
                   obs=pd.DataFrame({"cell_type": pd.Categorical([f"type{t}" for t in labels])},
                                    index=[f"cell{i}" for i in range(n_cells)]),
                   var=pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)]))
    a.layers["counts"] = a.X.copy()
    return a


@pytest.fixture(scope="module")
def planted() -> ad.AnnData:
    return simulate_nb_mixture()


@pytest.fixture(scope="module")
def trained(planted):
    """The model the read-only tests share, trained on a copy (so `planted` stays pristine)."""
    model = dl.DGD(planted.copy(), n_components=3, seed=0, **SMALL)
    model.train(max_epochs=60, **FAST)
    return model


@pytest.fixture(scope="module")
def tiny() -> ad.AnnData:
    return simulate_nb_mixture(n_cells=90, n_genes=30, seed=1)


@pytest.fixture(scope="module")
def new_cells(planted) -> ad.AnnData:
    """Copies of 24 training cells under new names: held-out inference must find them where they were."""
    rows = np.arange(0, 360, 15)
    new = planted[rows].copy()
    new.obs_names = [f"again{i}" for i in range(len(rows))]
    return new


# ---------------------------------------------------------------------------------------------- training
def test_training_lowers_the_loss(trained):
    h = trained.history_
    assert len(h) == 60 and trained.is_trained_
    assert {"train_recon", "train_prior", "val_recon", "val_loss", "train_loss", "time"} <= set(h.columns)
    for col in ("train_recon", "val_recon", "train_loss"):
        assert h[col].iloc[-5:].mean() < 0.8 * h[col].iloc[:5].mean(), col
    assert np.isfinite(h.to_numpy(dtype=float)).all()


def test_planted_cell_types_are_recovered(trained, planted):
    z = trained.get_latent_representation()
    assert z.shape == (360, 5) and z.dtype == np.float32
    kmeans = KMeans(3, n_init=10, random_state=0).fit_predict(z)
    assert adjusted_rand_score(planted.obs["cell_type"], kmeans) > 0.9


def test_planted_cell_types_are_the_mixture_clusters(trained, planted):
    # the final EM refit of the mixture (refit_prior_at_end) makes its argmax clusters the types
    assert adjusted_rand_score(planted.obs["cell_type"], trained.get_cluster_assignments()) > 0.9


def test_the_input_anndata_is_not_modified(planted):
    a = planted.copy()
    model = dl.DGD(a, seed=0, **SMALL)
    model.train(max_epochs=2, **FAST)
    assert (a.X != planted.X).nnz == 0
    assert list(a.obs.columns) == ["cell_type"] and not a.obsm and not a.uns
    assert a.layers.keys() == planted.layers.keys()


@pytest.mark.parametrize("rep_step", ["epoch", "batch"])
def test_both_representation_steps_train(tiny, rep_step):
    model = dl.DGD(tiny, seed=0, n_components=3, **SMALL)
    model.train(max_epochs=15, **(FAST | {"rep_step": rep_step, "lr_rep": 0.01}))
    h = model.history_
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]
    assert h["val_recon"].iloc[-1] < h["val_recon"].iloc[0]


def test_early_stopping_stops_and_restores_the_best_epoch(tiny):
    model = dl.DGD(tiny, seed=0, **SMALL)
    # a learning rate this large makes the validation loss climb quickly
    model.train(max_epochs=60, early_stopping=True, patience=3, min_epochs=1, lr_decoder=0.5, lr_rep=0.5,
                **{k: v for k, v in FAST.items() if k not in {"early_stopping", "lr_rep"}})
    s = model.train_summary_
    assert s["stopped_early"] and s["epochs_run"] < 60
    assert s["best_epoch"] == int(model.history_["val_recon"].idxmin())


def test_seeded_runs_are_reproducible(tiny):
    def run(seed):
        m = dl.DGD(tiny, seed=seed, **SMALL)
        m.train(max_epochs=4, **FAST)
        return m.get_latent_representation(), m.history_["train_loss"].to_numpy()

    z1, h1 = run(3)
    z2, h2 = run(3)
    z3, _ = run(4)
    np.testing.assert_array_equal(z1, z2)
    np.testing.assert_array_equal(h1, h2)
    assert not np.allclose(z1, z3)


@pytest.mark.parametrize("rep_step", ["epoch", "batch"])
def test_checkpoint_then_resume_equals_one_uninterrupted_run(tiny, tmp_path, rep_step):
    # the learning-rate drop (and optimiser reset) at epoch 3 falls inside the resumed part
    opts = FAST | {"rep_step": rep_step, "lr_decay_epoch": 3, "restore_best": False}
    straight = dl.DGD(tiny, seed=2, **SMALL).train(max_epochs=6, **opts)

    ckpt = tmp_path / "run.ckpt"
    dl.DGD(tiny, seed=2, **SMALL).train(max_epochs=2, checkpoint_path=str(ckpt), **opts)
    assert ckpt.exists()
    resumed = dl.DGD(tiny, seed=2, **SMALL).train(max_epochs=6, resume_from=str(ckpt), **opts)

    assert len(resumed.history_) == 6
    # bit for bit: the checkpoint holds every optimiser state, loader generator and the torch generator
    np.testing.assert_array_equal(resumed.history_["train_loss"], straight.history_["train_loss"])
    np.testing.assert_array_equal(resumed.get_latent_representation(), straight.get_latent_representation())
    # and a finished run can be continued for more epochs
    more = dl.DGD(tiny, seed=2, **SMALL).train(max_epochs=8, resume_from=str(ckpt), **opts)
    assert len(more.history_) == 8


def test_resume_refuses_a_checkpoint_of_other_data(tiny, planted, tmp_path):
    ckpt = tmp_path / "tiny.ckpt"
    dl.DGD(tiny, seed=0, **SMALL).train(max_epochs=1, checkpoint_path=str(ckpt), **FAST)
    with pytest.raises(ValueError, match="other data or another model"):
        dl.DGD(planted, seed=0, **SMALL).train(max_epochs=2, resume_from=str(ckpt), **FAST)
    # the same shapes but other genes: refused too (the checkpoint records a digest of the names)
    renamed = tiny.copy()
    renamed.var_names = [f"other{i}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match="genes"):
        dl.DGD(renamed, seed=0, **SMALL).train(max_epochs=2, resume_from=str(ckpt), **FAST)
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a dgdlens checkpoint"):
        dl.DGD(tiny, seed=0, **SMALL).train(max_epochs=2, resume_from=str(tmp_path / "bad.ckpt"), **FAST)


# ---------------------------------------------------------------------------------------------- outputs
def test_responsibilities_and_clusters(trained):
    resp = trained.get_responsibilities()
    assert resp.shape == (360, 3)
    np.testing.assert_allclose(resp.sum(1), 1.0, rtol=1e-5)
    clusters = trained.get_cluster_assignments()
    assert clusters.dtype.kind == "i" and clusters.shape == (360,)
    assert set(np.unique(clusters)) <= {0, 1, 2}
    np.testing.assert_array_equal(clusters, resp.argmax(1))


def test_normalized_expression_and_decoding(trained, planted):
    expr = trained.get_normalized_expression()
    assert expr.shape == (360, 100) and (expr >= 0).all()
    np.testing.assert_allclose(expr.sum(1), 1.0, rtol=1e-4)
    sub = trained.get_normalized_expression(gene_list=["gene7", "gene2"])
    np.testing.assert_array_equal(sub, expr[:, [7, 2]])
    with pytest.raises(ValueError, match="genes the model does not know"):
        trained.get_normalized_expression(gene_list=["gene1", "CD3E"])
    z = trained.get_latent_representation()[:10]
    lib = np.asarray(planted.X[:10].sum(1)).ravel()
    means = trained.decode_latent(z, library_size=lib)
    np.testing.assert_allclose(means.sum(1), lib, rtol=1e-4)
    np.testing.assert_allclose(means / lib[:, None], expr[:10], rtol=1e-4, atol=1e-8)


def test_sample_counts_have_the_model_mean_and_variance(trained):
    z0 = trained.get_latent_representation()[[0, 200]]
    n = 20_000
    z = np.repeat(z0, n, axis=0)
    lib = np.full(len(z), 500.0, dtype=np.float32)
    draws = trained.sample_counts(z=z, library_size=lib, seed=1)
    assert sp.isspmatrix_csr(draws) and draws.shape == (2 * n, 100)
    mean = trained.decode_latent(z0, library_size=np.full(2, 500.0))
    r = trained.module.likelihood.r.detach().cpu().numpy().ravel()
    var = mean + mean**2 / r
    for i in range(2):
        d = draws[i * n:(i + 1) * n].toarray()
        se = np.sqrt(var[i] / n)
        assert np.all(np.abs(d.mean(0) - mean[i]) < 5 * se + 1e-3)
        ok = mean[i] > 0.5
        np.testing.assert_allclose(d.var(0)[ok], var[i][ok], rtol=0.12)
    again = trained.sample_counts(z=z0, library_size=np.full(2, 500.0), seed=1)
    np.testing.assert_array_equal(again.toarray(), trained.sample_counts(z=z0, library_size=np.full(2, 500.0),
                                                                         seed=1).toarray())


def test_sample_counts_for_training_cells_use_their_library_sizes(trained, planted):
    draws = trained.sample_counts(seed=0)
    assert draws.shape == planted.shape
    lib = np.asarray(planted.X.sum(1)).ravel()
    assert abs(draws.sum() / lib.sum() - 1) < 0.02


def test_reconstruction_error_is_the_mean_cell_nll(trained):
    per_cell = trained.get_reconstruction_error(per_sample=True)
    assert per_cell.shape == (360,) and np.isfinite(per_cell).all()
    assert trained.get_reconstruction_error() == pytest.approx(per_cell.mean())
    assert trained.get_reconstruction_error() == pytest.approx(trained.history_["train_recon"].iloc[-1], rel=0.05)


# ---------------------------------------------------------------------------------------------- new cells
def test_duplicated_training_cells_land_near_their_training_representation(trained, new_cells):
    z_train = trained.get_latent_representation()
    z_new = trained.get_latent_representation(new_cells, progress=False)
    rows = np.arange(0, 360, 15)
    dist_own = np.linalg.norm(z_new - z_train[rows], axis=1)
    pairwise = np.linalg.norm(z_train[:, None] - z_train[None], axis=-1)
    typical = np.median(pairwise)
    assert np.median(dist_own) < 0.15 * typical
    # the copy's nearest training cell is of the same planted type
    nearest = np.linalg.norm(z_new[:, None] - z_train[None], axis=-1).argmin(1)
    types = new_cells.obs["cell_type"].to_numpy()
    assert np.mean(trained.adata.obs["cell_type"].to_numpy()[nearest] == types) > 0.95
    # the held-out reconstruction error is close to the training one of the same cells
    err_new = trained.get_reconstruction_error(new_cells, z=z_new, per_sample=True)
    err_train = trained.get_reconstruction_error(per_sample=True)[rows]
    assert np.mean(err_new) < np.mean(err_train) * 1.05


def test_held_out_inference_equals_adam_on_the_full_objective(trained, new_cells):
    """Held-out inference computes the likelihood's data-only terms once per batch: the latents must be
    those of plain Adam on the whole objective (recomputed every step) from the same starts. Every step
    runs (``tol=0``): with the stopping rule a loss that differs in its last bit can stop a cell one step
    sooner or later (seen on a fresh install: one cell 4e-3 apart), which says nothing about the terms."""
    import torch

    from dgdlens.data.loader import BatchLoader
    from dgdlens.data.matrix import RowMatrix
    from dgdlens.nn.module import frozen
    from dgdlens.train.inference import infer_latents, optimise_latents

    module = trained.module
    x = new_cells.X.toarray() if hasattr(new_cells.X, "toarray") else new_cells.X
    x = np.asarray(x, dtype=np.float32)
    scale = x.sum(1)
    loader = BatchLoader(RowMatrix(x), None, scale, batch_size=64, shuffle=False, device="cpu")
    z, loss = infer_latents(module, loader, trained.n_latent, n_steps=300, tol=0.0, progress=False)
    xt, st_ = torch.tensor(x), torch.tensor(scale)
    with frozen(module), torch.no_grad():  # the same start: the best mixture mean by recon + prior
        cand = module.prior.mean.detach()
        scores = torch.stack([module.recon_nll(xt, c.expand(len(x), -1), st_) + module.prior_nll(c[None])
                              for c in cand], 1)
        z0 = cand[scores.argmin(1)]
    with frozen(module):
        want = optimise_latents(lambda x_, z_, s_: module.recon_nll(x_, z_, s_) + module.prior_nll(z_), xt, st_,
                                z0, 300, 1e-2, (0.5, 0.7), 0.0, compact=True)
        with torch.no_grad():
            want_loss = module.recon_nll(xt, want, st_) + module.prior_nll(want)
    np.testing.assert_allclose(z, want.numpy(), atol=1e-5)  # measured: identical
    np.testing.assert_allclose(loss, want_loss.numpy(), rtol=1e-5)


def test_new_cells_with_shuffled_and_extra_genes(trained, new_cells):
    z_ref = trained.get_latent_representation(new_cells, progress=False)
    rng = np.random.default_rng(0)
    perm = rng.permutation(100)
    extra = sp.csr_matrix(rng.poisson(1.0, (new_cells.n_obs, 4)).astype(np.float32))
    X = sp.hstack([new_cells.X[:, perm], extra], format="csr")
    shuffled = ad.AnnData(X, obs=new_cells.obs.copy(),
                          var=pd.DataFrame(index=list(new_cells.var_names[perm]) + [f"extra{i}" for i in range(4)]))
    with pytest.warns(UserWarning, match="4 genes the model does not know"):
        z = trained.get_latent_representation(shuffled, progress=False)
    np.testing.assert_allclose(z, z_ref, rtol=1e-4, atol=1e-4)
    missing = new_cells[:, 5:].copy()
    with pytest.raises(GeneMismatchError, match="5 of the model's 100 genes are missing"):
        trained.get_latent_representation(missing, progress=False)


def test_outputs_for_new_cells(trained, new_cells):
    z = trained.get_latent_representation(new_cells, progress=False)
    np.testing.assert_array_equal(trained.get_cluster_assignments(z=z), trained.get_responsibilities(z=z).argmax(1))
    assert trained.get_normalized_expression(z=z).shape == (24, 100)
    draws = trained.sample_counts(new_cells, seed=0, progress=False)
    assert draws.shape == (24, 100)
    assert trained.get_reconstruction_error(new_cells, progress=False) > 0


def test_add_to_adata_writes_the_scverse_keys(trained, new_cells):
    target = trained.add_to_adata()
    assert target is trained.adata
    np.testing.assert_array_equal(target.obsm["X_dgd"], trained.get_latent_representation())
    assert isinstance(target.obs["dgd_cluster"].dtype, pd.CategoricalDtype)
    np.testing.assert_array_equal(target.obs["dgd_cluster"].astype(int), trained.get_cluster_assignments())
    np.testing.assert_allclose(target.obsm["dgd_responsibilities"].sum(1), 1.0, rtol=1e-5)
    assert target.uns["dgd"]["key_added"] == "X_dgd" and target.uns["dgd"]["params"]["n_latent"] == 5
    other = new_cells.copy()
    trained.add_to_adata(other, key_added="X_mine", cluster_key="mine", progress=False)
    assert other.obsm["X_mine"].shape == (24, 5) and "mine" in other.obs


# ---------------------------------------------------------------------------------------------- save / load
def test_save_load_without_data_gives_identical_outputs(trained, new_cells, tmp_path):
    trained.save(tmp_path / "m")
    loaded = dl.DGD.load(tmp_path / "m")
    assert loaded.adata is None and loaded.is_trained_
    assert repr(loaded) == repr(trained)
    np.testing.assert_array_equal(loaded.get_latent_representation(), trained.get_latent_representation())
    z = trained.get_latent_representation()[:7]
    np.testing.assert_array_equal(loaded.decode_latent(z), trained.decode_latent(z))
    np.testing.assert_array_equal(loaded.get_cluster_assignments(), trained.get_cluster_assignments())
    np.testing.assert_array_equal(loaded.get_latent_representation(new_cells, progress=False),
                                  trained.get_latent_representation(new_cells, progress=False))
    pd.testing.assert_frame_equal(loaded.history_, trained.history_, check_dtype=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        trained.save(tmp_path / "m")
    trained.save(tmp_path / "m", overwrite=True)
    # training-set outputs that need the counts ask for the data, and accept it back
    with pytest.raises(ValueError, match="loaded without its training data"):
        loaded.get_reconstruction_error()
    again = dl.DGD.load(tmp_path / "m", adata=trained.adata)
    assert again.get_reconstruction_error() == pytest.approx(trained.get_reconstruction_error(), rel=1e-6)


def test_save_without_representations_still_embeds_new_cells(trained, new_cells, tmp_path):
    trained.save(tmp_path / "light", save_representations=False)
    loaded = dl.DGD.load(tmp_path / "light")
    with pytest.raises(ValueError, match="without its training latents"):
        loaded.get_latent_representation()
    np.testing.assert_array_equal(loaded.get_latent_representation(new_cells, progress=False),
                                  trained.get_latent_representation(new_cells, progress=False))


def test_load_refuses_corrupted_or_foreign_directories(trained, tiny, tmp_path):
    trained.save(tmp_path / "m")
    with pytest.raises(ModelFormatError, match="No model directory"):
        dl.DGD.load(tmp_path / "nothing")
    w = tmp_path / "m" / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-8] + b"garbage!")
    with pytest.raises(ModelFormatError, match="checksum"):
        dl.DGD.load(tmp_path / "m")
    with pytest.raises(ValueError, match="genes differ"):
        trained.save(tmp_path / "m2")
        dl.DGD.load(tmp_path / "m2", adata=tiny)


# ---------------------------------------------------------------------------------------------- set-up and bad input
def test_number_of_components(planted):
    assert dl.DGD(planted, labels_key="cell_type", **SMALL).n_components == 3
    assert dl.DGD(planted, **SMALL).n_components == default_n_components(360)
    assert default_n_components(700) == 9 and default_n_components(10**6) == 20
    assert default_n_components(3) == 2 and default_n_components(10**12) == 30


def _with(planted, value, where=(3, 4)):
    a = planted.copy()
    X = a.X.toarray()
    X[where] = value
    a.X = sp.csr_matrix(X)
    return a


@pytest.mark.parametrize("value, match", [
    (-2.0, "negative values"), (np.nan, "NaN"), (1.5, "non-integer"),
])
def test_bad_counts_raise_value_errors_naming_the_fix(planted, value, match):
    with pytest.raises(ValueError, match=match):
        dl.DGD(_with(planted, value), **SMALL)


def test_empty_cells_raise_and_empty_genes_are_learned_to_zero(planted):
    a = planted.copy()
    X = a.X.toarray()
    X[7] = 0
    a.X = sp.csr_matrix(X)
    with pytest.raises(ValueError, match="cell.*no counts.*filter_cells"):
        dl.DGD(a, **SMALL)
    # a gene with no counts in any cell is normal (a subset of cells, a backed atlas): a warning, and the
    # model learns its expression to about zero
    X = planted.X.toarray()
    X[:, 9] = 0
    a.X = sp.csr_matrix(X)
    with pytest.warns(UserWarning, match="no counts"):
        model = dl.DGD(a, **SMALL)
    model.train(max_epochs=30, **FAST)
    share = model.get_normalized_expression()[:, 9]
    assert share.max() < 0.1 / a.n_vars  # far below an average gene's share


def test_bad_arguments_raise_clear_errors(planted, trained):
    with pytest.raises(ValueError, match="labels_key 'celltype' is not a column"):
        dl.DGD(planted, labels_key="celltype")
    with pytest.raises(ValueError, match="Layer 'spliced' not found"):
        dl.DGD(planted, layer="spliced")
    with pytest.raises(ValueError, match="adata is None"):
        dl.DGD(None)
    with pytest.raises(TypeError, match="Expected an AnnData"):
        dl.DGD(planted.X)
    with pytest.raises(ValueError, match="n_latent"):
        dl.DGD(planted, n_latent=0)
    with pytest.raises(ValueError, match="validation_fraction"):
        dl.DGD(planted, validation_fraction=1.0)
    with pytest.raises(ValueError, match="scaling"):
        dl.DGD(planted, scaling="median")
    with pytest.raises(TypeError, match="Unknown training option"):
        dl.DGD(planted, **SMALL).train(max_epochs=1, learning_rate=0.1)
    with pytest.raises(ValueError, match="z must have shape"):
        trained.decode_latent(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="negative values"):
        trained.get_latent_representation(_with(planted[:20].copy(), -1.0), progress=False)


def test_layer_holds_the_counts(planted):
    a = planted.copy()
    a.X = sp.csr_matrix(np.log1p(a.X.toarray()))  # normalised X, raw counts in a layer
    with pytest.raises(ValueError, match="non-integer.*layer='counts'"):
        dl.DGD(a, **SMALL)
    model = dl.DGD(a, layer="counts", **SMALL)
    model.train(max_epochs=1, **FAST)
    assert model.get_latent_representation().shape == (360, 5)


def test_device_argument(tiny):
    model = dl.DGD(tiny, **SMALL)
    model.train(max_epochs=1, **FAST)
    assert model.device == torch.device("cpu")
    if torch.cuda.is_available():
        model.train(max_epochs=2, **(FAST | {"device": "cuda"}))
        assert model.device.type == "cuda"
        assert isinstance(model.get_latent_representation(), np.ndarray)
        z = model.get_latent_representation(tiny[:5].copy(), device="cuda", progress=False)
        assert z.shape == (5, 5)
    else:
        with pytest.raises(ValueError, match="no CUDA device"):
            model.train(max_epochs=1, **(FAST | {"device": "cuda"}))


def test_untrained_model_warns(tiny):
    model = dl.DGD(tiny, **SMALL)
    with pytest.warns(UserWarning, match="not been trained"):
        model.get_latent_representation()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.train(max_epochs=1, **FAST)
        model.get_latent_representation()
