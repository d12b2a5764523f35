"""Several modalities: the likelihoods against scipy, the data layer against dense truth, and the
multi-modal DGD on simulated multiome data (planted cell types, peak-gene links)."""

from __future__ import annotations

import warnings

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy import stats

import dgdlens as dl
from dgdlens.data.modalities import HStackRowMatrix, read_modalities
from dgdlens.data.matrix import RowMatrix
from dgdlens.nn import BinaryAccessibility, MultiHeadDecoder, MultiModalLikelihood, NegativeBinomial, Poisson

warnings.filterwarnings("ignore", message=".*Cannot join columns.*")

pytestmark = pytest.mark.usefixtures("one_thread")


def _softmax(a):
    e = np.exp(a - a.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# --------------------------------------------------------------------------- likelihoods vs scipy
def test_poisson_matches_scipy():
    rng = np.random.default_rng(0)
    out = rng.normal(size=(5, 30))
    lib = rng.uniform(10, 500, 5)
    mean = lib[:, None] * _softmax(out)
    x = rng.poisson(mean).astype(np.float64)
    got = Poisson(30).nll(torch.tensor(x), torch.tensor(out), torch.tensor(lib)).detach().numpy()
    want = -stats.poisson.logpmf(x, mean).sum(1)
    np.testing.assert_allclose(got, want, rtol=1e-9)


@pytest.mark.parametrize("depth", [1e-6, 0.5, 50.0, 5e4])
def test_binary_accessibility_matches_scipy_bernoulli(depth):
    rng = np.random.default_rng(1)
    out = rng.normal(scale=2, size=(4, 200))
    lib = np.full(4, depth)
    p = -np.expm1(-lib[:, None] * _softmax(out))  # P(Poisson > 0)
    x = rng.poisson(3 * p) * (rng.uniform(size=p.shape) < 0.5)
    got = BinaryAccessibility(200).nll(torch.tensor(x, dtype=torch.float64), torch.tensor(out),
                                       torch.tensor(lib)).detach().numpy()
    rate = lib[:, None] * _softmax(out)
    # P(open) = P(Poisson(rate) > 0): scipy's log survival function stays exact where p rounds to 0 or 1
    want = -np.where(x > 0, stats.poisson.logsf(0, rate), stats.poisson.logpmf(0, rate)).sum(1)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    if depth <= 50:  # where p is not rounded to 1, the same as a Bernoulli with that p
        np.testing.assert_allclose(got, -stats.bernoulli.logpmf((x > 0).astype(int), p).sum(1), rtol=1e-6)
    mean = BinaryAccessibility(200).mean(torch.tensor(out), torch.tensor(lib)).detach().numpy()
    np.testing.assert_allclose(mean, p, rtol=1e-9)


def test_binary_accessibility_gradient_finite_when_rate_underflows():
    out = torch.tensor([[-200.0, 0.0, 0.0]], requires_grad=True)
    x = torch.tensor([[1.0, 0.0, 1.0]])
    nll = BinaryAccessibility(3).nll(x, out, torch.tensor([10.0]))
    nll.sum().backward()
    assert torch.isfinite(nll).all() and torch.isfinite(out.grad).all()


def _multimodal(seed=0, weights=None):
    torch.manual_seed(seed)
    liks = [NegativeBinomial(6), BinaryAccessibility(9), Poisson(4)]
    with torch.no_grad():
        liks[0].log_r_free.copy_(torch.linspace(-1, 1, 6).reshape(1, -1))
    return MultiModalLikelihood(liks, ["rna", "atac", "prot"], weights)


def _nb_ref(x, mean, r):
    return -stats.nbinom.logpmf(x, r, r / (r + mean)).sum(1)


def test_multimodal_likelihood_is_the_sum_of_its_modalities_with_library_per_modality():
    rng = np.random.default_rng(2)
    lik = _multimodal(weights=[1.0, 2.0, 0.5]).double()
    out = rng.normal(size=(3, 19))
    lib = np.array([[100.0, 20.0, 50.0], [300.0, 0.0, 10.0], [0.0, 5.0, 80.0]])  # zeros: missing modality
    x = np.concatenate([rng.poisson(5, (3, 6)), rng.poisson(0.3, (3, 9)), rng.poisson(4, (3, 4))], 1).astype(float)
    x[1, 6:15] = 0
    x[2, :6] = 0
    per = lik.nll_per_modality(torch.tensor(x), torch.tensor(out), torch.tensor(lib)).detach().numpy()
    r = lik.likelihoods[0].r.detach().numpy()
    want_rna = _nb_ref(x[:, :6], lib[:, :1] * _softmax(out[:, :6]), r)
    p = -np.expm1(-lib[:, 1:2] * _softmax(out[:, 6:15]))
    want_atac = -np.where(x[:, 6:15] > 0, np.log(np.maximum(p, 1e-300)), np.log1p(-p)).sum(1)
    want_prot = -stats.poisson.logpmf(x[:, 15:], lib[:, 2:3] * _softmax(out[:, 15:])).sum(1)
    np.testing.assert_allclose(per[:, 0], np.where(lib[:, 0] > 0, want_rna, 0), rtol=1e-7)
    np.testing.assert_allclose(per[:, 1], np.where(lib[:, 1] > 0, want_atac, 0), rtol=1e-7)
    np.testing.assert_allclose(per[:, 2], want_prot, rtol=1e-7)
    total = lik.nll(torch.tensor(x), torch.tensor(out), torch.tensor(lib)).detach().numpy()
    np.testing.assert_allclose(total, per @ np.array([1.0, 2.0, 0.5]), rtol=1e-12)


def test_observe_restricts_each_modality_to_its_present_features_renormalised():
    rng = np.random.default_rng(3)
    lik = _multimodal().double()
    out = rng.normal(size=(2, 19))
    keep_rna, keep_atac = np.array([0, 2, 5]), np.array([1, 3, 4, 8])
    x = np.concatenate([rng.poisson(6, (2, 3)), (rng.uniform(size=(2, 4)) < 0.4), rng.poisson(3, (2, 4))],
                       1).astype(float)
    lib = np.stack([x[:, :3].sum(1), x[:, 3:7].sum(1) + 1, x[:, 7:].sum(1)], 1)
    with lik.observe([keep_rna, keep_atac, None]):
        per = lik.nll_per_modality(torch.tensor(x), torch.tensor(out), torch.tensor(lib)).detach().numpy()
    r = lik.likelihoods[0].r.detach().numpy()[:, keep_rna]
    # the composition over the present features only, as their library counts only them
    want_rna = _nb_ref(x[:, :3], lib[:, :1] * _softmax(out[:, keep_rna]), r)
    p = -np.expm1(-lib[:, 1:2] * _softmax(out[:, 6 + keep_atac]))
    want_atac = -np.where(x[:, 3:7] > 0, np.log(p), np.log1p(-p)).sum(1)
    np.testing.assert_allclose(per[:, 0], want_rna, rtol=1e-7)
    np.testing.assert_allclose(per[:, 1], want_atac, rtol=1e-7)
    assert lik._observed is None  # restored after the block


def test_multimodal_constant_reused_gives_scipys_weighted_nll_with_missing_modalities_and_subsets():
    """nll_constant computed once, then nll(..., constant=) for new outputs: the weighted sum of scipy's
    per-modality NLLs, with a missing modality adding nothing and the RNA restricted to present genes."""
    rng = np.random.default_rng(5)
    lik = _multimodal(weights=[1.0, 2.0, 0.5]).double()
    keep_rna = np.array([0, 2, 5])
    x = np.concatenate([rng.poisson(6, (3, 3)), rng.uniform(size=(3, 9)) < 0.3, rng.poisson(3, (3, 4))],
                       1).astype(float)
    lib = np.stack([x[:, :3].sum(1), x[:, 3:12].sum(1) + 1, x[:, 12:].sum(1)], 1)
    lib[1, 0] = 0.0  # cell 1 has no RNA
    r = lik.likelihoods[0].r.detach().numpy()[:, keep_rna]
    xt, libt = torch.tensor(x), torch.tensor(lib)
    with lik.observe([keep_rna, None, None]):
        constant = lik.nll_constant(xt, libt)
        for seed in range(2):
            out = np.random.default_rng(seed).normal(size=(3, 19))
            want_rna = np.where(lib[:, 0] > 0, _nb_ref(x[:, :3], lib[:, :1] * _softmax(out[:, keep_rna]), r), 0)
            rate = lib[:, 1:2] * _softmax(out[:, 6:15])
            want_atac = -np.where(x[:, 3:12] > 0, stats.poisson.logsf(0, rate), -rate).sum(1)
            want_prot = -stats.poisson.logpmf(x[:, 12:], lib[:, 2:3] * _softmax(out[:, 15:])).sum(1)
            want = want_rna + 2.0 * want_atac + 0.5 * want_prot
            got = lik.nll(xt, torch.tensor(out), libt, constant=constant).detach().numpy()
            np.testing.assert_allclose(got, want, rtol=1e-9)


def test_multimodal_likelihood_refuses_a_single_library_column():
    lik = _multimodal()
    with pytest.raises(ValueError, match="per modality"):
        lik.nll(torch.zeros(2, 19), torch.zeros(2, 19), torch.ones(2))


def test_multi_head_decoder_shapes_and_config():
    dec = MultiHeadDecoder(5, [7, 11], hidden=(8, 6), head_hidden=(4,))
    assert dec(torch.zeros(3, 5)).shape == (3, 18)
    assert dec.config()["sizes"] == [7, 11]
    assert sum(p.numel() for p in dec.heads[1].parameters()) == 6 * 4 + 4 + 4 * 11 + 11


# --------------------------------------------------------------------------- data layer
def _toy_mudata(n=40, seed=0, drop_atac=0):
    rng = np.random.default_rng(seed)
    rna = ad.AnnData(sp.csr_matrix(rng.poisson(2, (n, 12)).astype(np.float32)))
    atac = ad.AnnData(sp.csr_matrix((rng.uniform(size=(n, 30)) < 0.1).astype(np.float32)))
    rna.var_names = [f"g{i}" for i in range(12)]
    atac.var_names = [f"chr1:{i}00-{i}50" for i in range(30)]
    rna.obs_names = atac.obs_names = [f"c{i}" for i in range(n)]
    if drop_atac:
        atac = atac[drop_atac:].copy()
    return md.MuData({"rna": rna, "atac": atac})


def test_hstack_reads_rows_with_missing_cells_as_zeros():
    mdata = _toy_mudata(drop_atac=5)
    mods = read_modalities(mdata)
    X = mods.matrix()
    rna = mdata.mod["rna"][mdata.obs_names].X.toarray()
    atac = np.zeros((mdata.n_obs, 30), np.float32)
    pos = pd.Index(mdata.mod["atac"].obs_names).get_indexer(mdata.obs_names)
    atac[pos >= 0] = mdata.mod["atac"].X.toarray()[pos[pos >= 0]]
    dense = np.hstack([rna, atac])
    idx = np.array([7, 0, 3, 3, 39, 1])
    np.testing.assert_array_equal(X.rows(idx), dense[idx])
    np.testing.assert_array_equal(np.vstack([b.toarray() for _, _, b in X.iter_chunks(16)]), dense)
    assert mods.present[:5, 1].sum() == 0 and mods.present[5:, 1].all()


def test_one_anndata_with_a_modality_column_is_grouped_by_modality():
    rng = np.random.default_rng(4)
    X = sp.csr_matrix(rng.poisson(1, (10, 6)).astype(np.float32))
    a = ad.AnnData(X)
    a.var_names = ["p0", "g0", "p1", "g1", "g2", "p2"]
    a.var["feature_types"] = ["Peaks", "Gene Expression", "Peaks", "Gene Expression", "Gene Expression", "Peaks"]
    mods = read_modalities(a, modality_key="feature_types")
    assert mods.names == ["Peaks", "Gene Expression"]
    assert list(mods.var_names[0]) == ["p0", "p1", "p2"]
    np.testing.assert_array_equal(mods.matrix().rows(np.arange(10)), X.toarray()[:, [0, 2, 5, 1, 3, 4]])


# --------------------------------------------------------------------------- bad input
def test_bad_multimodal_input_raises_clear_errors():
    mdata = _toy_mudata()
    bad = mdata.mod["atac"].X.copy()
    bad.data[0] = -1
    mdata.mod["atac"].X = bad
    with pytest.raises(ValueError, match="modality 'atac'.*negative"):
        dl.DGD(md.MuData({"rna": mdata.mod["rna"], "atac": mdata.mod["atac"]}))
    good = _toy_mudata()
    empty = ad.AnnData(sp.csr_matrix((good.n_obs, 0), dtype=np.float32), obs=good.mod["rna"].obs.copy())
    with pytest.raises(ValueError, match="'prot' has no features"):
        dl.DGD(md.MuData({"rna": good.mod["rna"], "prot": empty}))
    with pytest.raises(ValueError, match="modality_likelihoods.*'atac'"):
        dl.DGD(good, modality_likelihoods={"atac": "gaussian"})
    with pytest.raises(ValueError, match="do not have"):
        dl.DGD(good, modality_weights={"protein": 2.0})
    with pytest.raises(ValueError, match="modality_key"):
        dl.DGD(good.mod["rna"], modality_weights={"rna": 1.0})


def test_mismatched_cells_between_modalities_are_refused():
    good = _toy_mudata()
    mods = read_modalities(good)
    # a modality whose cells are not the MuData's (edited without mdata.update())
    good.mod["atac"].obs_names = [f"x{i}" for i in range(good.n_obs)]
    with pytest.raises(ValueError, match="not in the MuData's obs_names"):
        read_modalities(good)
    assert mods.names == ["rna", "atac"]


# --------------------------------------------------------------------------- the model, mechanics
SMALL = {"n_latent": 4, "n_components": 3, "hidden": (16,), "head_hidden": (8,)}
FAST = {"batch_size": 32, "rep_step": "batch", "lr_rep": 0.05, "hyperprior": "per_cell", "early_stopping": False,
        "device": "cpu", "progress": False}


def paired_toy(n: int = 120) -> md.MuData:
    """``n`` cells of three types (in blocks of ``n // 3``), RNA (20 genes, Poisson) and ATAC (60 peaks) each
    shaped by the type; ``obs["batch"]`` alternates two batches."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rng = np.random.default_rng(5)
        types = np.repeat(np.arange(3), n // 3)
        def counts(k, depth, scale):
            prof = rng.normal(scale=scale, size=(3, k))
            w = np.exp(prof[types])
            w /= w.sum(1, keepdims=True)
            return sp.csr_matrix(rng.poisson(w * depth).astype(np.float32))
        rna, atac = ad.AnnData(counts(20, 400, 1.0)), ad.AnnData(counts(60, 40, 1.5))
        rna.var_names = [f"g{i}" for i in range(20)]
        atac.var_names = [f"chr2:{i}000-{i}500" for i in range(60)]
        rna.obs_names = atac.obs_names = [f"c{i}" for i in range(n)]
        mdata = md.MuData({"rna": rna, "atac": atac})
        mdata.obs["batch"] = np.where(np.arange(n) % 2 == 0, "b0", "b1")
        return mdata


@pytest.fixture(scope="module")
def toy():
    return paired_toy()


@pytest.fixture(scope="module")
def trained(toy):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dl.DGD(toy[:100].copy(), seed=0, **SMALL).train(max_epochs=5, **FAST)


def test_defaults_by_modality_name_and_repr(trained):
    assert [m["likelihood"] for m in trained.params["modalities"]] == ["nb", "binary"]
    assert trained.modality_names == ["rna", "atac"]
    assert "20 rna (nb) + 60 atac (binary)" in repr(trained)
    assert trained.library_size.shape == (100, 2)


def test_save_load_round_trip_keeps_modalities_and_predictions(trained, toy, tmp_path):
    new = toy[100:].copy()
    z = trained.get_latent_representation(new, progress=False)
    trained.save(tmp_path / "m")
    back = dl.DGD.load(tmp_path / "m")
    assert back.modality_names == ["rna", "atac"]
    np.testing.assert_array_equal(back.get_latent_representation(new, progress=False), z)
    np.testing.assert_array_equal(back.predict_modality(new, "atac", progress=False),
                                  trained.predict_modality(new, "atac", progress=False))
    back2 = dl.DGD.load(tmp_path / "m", adata=toy[:100].copy())
    assert back2.get_reconstruction_error(modality="rna") == pytest.approx(trained.get_reconstruction_error(modality="rna"))


def test_checkpoint_then_resume_equals_one_uninterrupted_run(toy, tmp_path):
    data = toy[:100].copy()
    opts = FAST | {"lr_decay_epoch": 3, "restore_best": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        straight = dl.DGD(data, seed=1, **SMALL).train(max_epochs=5, **opts)
        dl.DGD(data, seed=1, **SMALL).train(max_epochs=2, checkpoint_path=str(tmp_path / "c.ckpt"), **opts)
        resumed = dl.DGD(data, seed=1, **SMALL).train(max_epochs=5, resume_from=str(tmp_path / "c.ckpt"), **opts)
        np.testing.assert_array_equal(resumed.history_["train_loss"], straight.history_["train_loss"])
        other = dl.DGD(data, seed=1, modality_likelihoods={"atac": "poisson"}, **SMALL)
        with pytest.raises(ValueError, match="other data or another model"):
            other.train(max_epochs=3, resume_from=str(tmp_path / "c.ckpt"), **opts)


def test_cells_with_one_modality_are_embedded_from_it(trained, toy):
    new = toy[100:].copy()
    rna_only = md.MuData({"rna": new.mod["rna"]})
    z_joint = trained.get_latent_representation(new, progress=False)
    z_rna = trained.get_latent_representation(rna_only, progress=False)
    # a plain AnnData of one modality: found by its feature names, or said
    np.testing.assert_allclose(trained.get_latent_representation(new.mod["rna"], progress=False), z_rna, atol=1e-6)
    np.testing.assert_allclose(trained.get_latent_representation(new.mod["rna"], modality="rna", progress=False),
                               z_rna, atol=1e-6)
    # inferring from RNA alone is inferring with the ATAC term switched off: the same as a model whose
    # ATAC weight is zero, on the joint data
    assert not np.allclose(z_rna, z_joint)
    lib = trained.get_library_sizes(rna_only)
    assert lib.shape == (20, 2) and np.all(lib[:, 1] == 0)
    pred = trained.predict_modality(rna_only, "atac", average_modes=False, progress=False)
    assert pred.shape == (20, 60) and np.all((pred >= 0) & (pred <= 1))
    # with no ATAC data the depth is the training median
    median = float(np.median(trained.library_size[:, 1][trained.library_size[:, 1] > 0]))
    np.testing.assert_allclose(pred, trained.predict_modality(z=z_rna, modality="atac", library_size=median),
                               rtol=1e-6)


def test_unpaired_cells_in_one_mudata(trained, toy):
    new = toy[100:].copy()
    part = md.MuData({"rna": new.mod["rna"], "atac": new.mod["atac"][5:].copy()})
    z = trained.get_latent_representation(part, progress=False)
    z_rna = trained.get_latent_representation(md.MuData({"rna": new.mod["rna"][:5].copy()}), progress=False)
    z_joint = trained.get_latent_representation(new, progress=False)
    np.testing.assert_allclose(z[:5], z_rna, atol=1e-5)   # the cells without ATAC: from RNA alone
    np.testing.assert_allclose(z[5:], z_joint[5:], atol=1e-5)


def test_new_data_with_fewer_peaks_restricts_the_loss_to_the_shared_ones(trained, toy):
    new = toy[100:].copy()
    keep = np.arange(0, 60, 2)
    fewer = md.MuData({"rna": new.mod["rna"], "atac": new.mod["atac"][:, keep].copy()})
    with pytest.warns(UserWarning, match="30 of the model's 60 features"):
        z = trained.get_latent_representation(fewer, progress=False)
    # the same as scoring the model's own likelihood restricted by hand
    lik = trained.module.likelihood
    x = torch.from_numpy(np.hstack([new.mod["rna"].X.toarray(), new.mod["atac"].X.toarray()[:, keep]]))
    lib = torch.from_numpy(np.stack([x[:, :20].sum(1).numpy(), x[:, 20:].sum(1).numpy()], 1))
    with torch.no_grad(), lik.observe([None, keep]):
        raw = trained.module.decode(torch.from_numpy(z))
        want = lik.nll_per_modality(x, raw, lib).sum(1).numpy()  # reported unweighted
    got = trained.get_reconstruction_error(fewer, z=z, per_sample=True, progress=False)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert trained.predict_modality(fewer, "atac", progress=False).shape == (20, 60)


def test_reconstruction_error_per_modality_adds_up(trained, toy):
    new = toy[100:].copy()
    z = trained.get_latent_representation(new, progress=False)
    rna = trained.get_reconstruction_error(new, z=z, modality="rna", per_sample=True)
    atac = trained.get_reconstruction_error(new, z=z, modality="atac", per_sample=True)
    both = trained.get_reconstruction_error(new, z=z, per_sample=True)
    np.testing.assert_allclose(both, rna + atac, rtol=1e-6)
    with pytest.raises(ValueError, match="Unknown modality"):
        trained.get_reconstruction_error(new, z=z, modality="prot")


def test_normalized_expression_is_a_composition_per_modality(trained):
    full = trained.get_normalized_expression()
    np.testing.assert_allclose(full[:, :20].sum(1), 1, rtol=1e-5)
    np.testing.assert_allclose(full[:, 20:].sum(1), 1, rtol=1e-5)
    atac = trained.get_normalized_expression(modality="atac", gene_list=["chr2:3000-3500"])
    np.testing.assert_allclose(atac[:, 0], full[:, 23], rtol=1e-6)


def test_modalities_combine_with_covariates(toy):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = dl.DGD(toy[:100].copy(), batch_key="batch", seed=0, **SMALL).train(max_epochs=3, **FAST)
    new = toy[100:].copy()
    z = m.get_latent_representation(md.MuData({"rna": new.mod["rna"]}), progress=False)
    assert z.shape == (20, 4)
    pred = m.predict_modality(new, "atac", transform_batch="b0", progress=False)
    assert pred.shape == (20, 60)
    assert m.add_to_adata(new, progress=False).obsm["X_dgd_batch"].shape == (20, 2)


def test_one_anndata_with_a_modality_column_trains_like_the_mudata(toy):
    data = toy[:100].copy()
    joined = ad.concat([data.mod["rna"], data.mod["atac"]], axis=1)
    joined.var["feature_types"] = ["rna"] * 20 + ["atac"] * 60
    joined.obs_names = data.obs_names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = dl.DGD(joined, modality_key="feature_types", seed=3, **SMALL).train(max_epochs=2, **FAST)
        b = dl.DGD(data, seed=3, **SMALL).train(max_epochs=2, **FAST)
    np.testing.assert_allclose(a.get_latent_representation(), b.get_latent_representation(), atol=1e-5)


def test_steering_decodes_the_chosen_modality(trained):
    z = trained.get_latent_representation()
    sae = dl.sae.make_sae(dl.sae.SAEConfig(kind="relu", d_in=4, n_latents=8))
    res = dl.steer(trained, sae, z, feature=0, mode="add", value=1.0, modality="atac", gene_sets=None,
                   n_controls=20, feature_controls=False)
    assert res.expression.shape == (100, 60)
    with pytest.raises(ValueError, match="say which one"):
        dl.steer(trained, sae, z, feature=0, mode="add", value=1.0, gene_sets=None, n_controls=5)


# --------------------------------------------------------------------------- the model on simulated multiome
SIM_FAST = FAST | {"batch_size": 64}
SIM_NET = {"n_latent": 8, "hidden": (64, 64), "head_hidden": (64,), "seed": 0}


def _knn_accuracy(model, train, test, mods):
    from sklearn.neighbors import KNeighborsClassifier

    z = model.get_latent_representation(md.MuData({k: test.mod[k] for k in mods}), progress=False)
    knn = KNeighborsClassifier(15).fit(model.get_latent_representation(), train.obs["cell_type"].astype(str))
    return knn.score(z, test.obs["cell_type"].astype(str))


def test_two_modalities_recover_cell_types_that_neither_sees_alone():
    # types are rna group x atac group: RNA sees only the first, ATAC (nearly) only the second
    sim = dl.sim.simulate_multiome(n_cells=700, n_genes=300, n_peaks=2000, seed=1)
    train, test = sim[:560].copy(), sim[560:].copy()
    acc = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, mods in {"joint": ["rna", "atac"], "rna": ["rna"], "atac": ["atac"]}.items():
            model = dl.DGD(md.MuData({k: train.mod[k] for k in mods}), n_components=6, **SIM_NET)
            model.train(max_epochs=80, **SIM_FAST)
            acc[name] = _knn_accuracy(model, train, test, mods)
    # held-out cells, 6 types: one modality can tell at most half of them apart
    assert acc["rna"] < 0.7 and acc["atac"] < 0.7, acc
    assert acc["joint"] > 0.9, acc


@pytest.fixture(scope="module")
def shared():
    """Multiome where RNA and ATAC share the structure (peaks opened by the programs that drive genes)."""
    sim = dl.sim.simulate_multiome(n_cells=700, n_genes=300, n_peaks=2000, n_atac_groups=1, linked_fraction=0.3,
                                   type_effect=3.0, seed=0)
    train, test = sim[:560].copy(), sim[560:].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = dl.DGD(train, n_components=3, **SIM_NET).train(max_epochs=80, **SIM_FAST)
    return sim, train, test, model


def test_rna_to_atac_prediction_beats_the_per_peak_mean(shared):
    from sklearn.metrics import roc_auc_score

    sim, train, test, model = shared
    pred = model.predict_modality(md.MuData({"rna": test.mod["rna"]}), "atac", progress=False)
    truth = test.mod["atac"].X.toarray() > 0
    mean = np.broadcast_to((train.mod["atac"].X.toarray() > 0).mean(0), truth.shape)
    # the best any predictor of the cell type can do: each true type's fraction open in training
    types = train.obs["cell_type"].astype(str).to_numpy()
    per_type = {t: (train.mod["atac"].X.toarray()[types == t] > 0).mean(0) for t in set(types)}
    oracle = np.stack([per_type[t] for t in test.obs["cell_type"].astype(str)])
    auc_model, auc_mean = roc_auc_score(truth.ravel(), pred.ravel()), roc_auc_score(truth.ravel(), mean.ravel())
    auc_oracle = roc_auc_score(truth.ravel(), oracle.ravel())
    assert auc_model > auc_mean + 0.01, (auc_model, auc_mean)
    assert auc_model > auc_oracle - 0.01, (auc_model, auc_oracle)
    # ATAC -> RNA: the predicted composition correlates with the cells' own counts better than the mean's
    rna = model.predict_modality(md.MuData({"atac": test.mod["atac"]}), "rna", progress=False)
    counts = test.mod["rna"].X.toarray()
    expected = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    corr = lambda a, b: np.mean([np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(a.shape[1]) if a[:, j].std() > 0])
    assert corr(np.log1p(rna), expected) > 0.3


def test_gene2peak_recovers_the_planted_links(shared):
    from sklearn.metrics import roc_auc_score

    sim, train, test, model = shared
    links = sim.uns["truth"]["peak_gene_links"]
    genes, peaks = np.asarray(links["gene"]), np.asarray(links["peak"])
    markers = {g for group in sim.uns["truth"]["programs_rna"].values() for g in group}
    unlinked = np.asarray(sim.mod["atac"].var["linked_gene"] == "")
    aucs = []
    for gene in [g for g in dict.fromkeys(genes) if g in markers][:3]:
        table = dl.gene2peak(model, test, gene, progress=False).reindex(sim.mod["atac"].var_names)
        assert table.attrs["gene"] == gene and table.attrs["n_cells"] > 10
        own = np.isin(sim.mod["atac"].var_names, peaks[genes == gene])
        delta = table["delta"].to_numpy()
        assert delta[own].mean() < 0  # knocking the gene out closes its peaks
        keep = own | unlinked
        aucs.append(roc_auc_score(own[keep], -delta[keep]))
    assert np.mean(aucs) > 0.9, aucs
    with pytest.raises(ValueError, match="not a feature"):
        dl.gene2peak(model, test, "no-such-gene")


def test_null_nll_matches_scipy_on_dense_counts():
    from dgdlens.models.dgd import null_nll_per_cell

    rng = np.random.default_rng(7)
    X = rng.poisson(rng.gamma(0.3, 1, (50, 40))).astype(np.float64)
    X[0] = 0
    lib = X.sum(1)
    comp = X[1:].sum(0) / X[1:].sum()
    rate = lib[:, None] * comp
    cells = np.ones(50, dtype=bool)
    want_pois = -stats.poisson.logpmf(X, rate)[1:].sum(1).mean()
    with np.errstate(divide="ignore"):
        want_bin = -np.where(X > 0, stats.poisson.logsf(0, rate), stats.poisson.logpmf(0, rate))[1:].sum(1).mean()
    M = RowMatrix(sp.csr_matrix(X))
    assert null_nll_per_cell(M, None, lib, "poisson", cells) == pytest.approx(want_pois, rel=1e-9)
    assert null_nll_per_cell(M, None, lib, "binary", cells) == pytest.approx(want_bin, rel=1e-9)


def test_count_split_scores_each_modality_on_the_held_out_half(trained, toy):
    new = toy[100:].copy()
    table = dl.evaluate.count_split_nll(trained, new, seed=3, progress=False)
    assert list(table.columns) == ["rna", "atac"] and table.shape == (20, 2)
    # by hand: thin each modality the same way, infer from A, score B
    parts = [dl.evaluate.binomial_split(sp.csr_matrix(new.mod[k].X), 0.5, 3 + j) for j, k in enumerate(["rna", "atac"])]
    a = md.MuData({k: ad.AnnData(parts[j][0], obs=new.mod[k].obs[[]], var=new.mod[k].var[[]])
                   for j, k in enumerate(["rna", "atac"])})
    b = md.MuData({k: ad.AnnData(parts[j][1], obs=new.mod[k].obs[[]], var=new.mod[k].var[[]])
                   for j, k in enumerate(["rna", "atac"])})
    z = trained.get_latent_representation(a, progress=False)
    rna_b = b.mod["rna"].X.toarray()
    lik = trained.module.likelihood.likelihoods[0]
    with torch.no_grad():
        raw = trained.module.decode(torch.from_numpy(z))[:, :20].double()
        comp = torch.softmax(raw, 1).numpy()
    r = lik.r.detach().double().numpy()
    mean = rna_b.sum(1, keepdims=True) * comp
    want = -stats.nbinom.logpmf(rna_b, r, r / (r + mean)).sum(1)
    np.testing.assert_allclose(table["rna"].to_numpy(), want, rtol=1e-4)


def test_a_backed_h5mu_trains_exactly_like_the_data_in_memory(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = dl.sim.simulate_multiome(n_cells=300, n_genes=150, n_peaks=800, markers_per_group=20, seed=0)
        sim.write(tmp_path / "m.h5mu")
        backed = md.read_h5mu(tmp_path / "m.h5mu", backed="r")
        a = dl.DGD(backed, seed=0, **SMALL)
        assert a._matrix.backed  # read from disk, row block by row block
        a.train(max_epochs=2, **FAST)
        b = dl.DGD(md.read_h5mu(tmp_path / "m.h5mu"), seed=0, **SMALL).train(max_epochs=2, **FAST)
    np.testing.assert_allclose(a.history_["train_loss"], b.history_["train_loss"], rtol=1e-6)


def test_results_written_into_a_mudata_survive_h5mu(trained, toy, tmp_path):
    new = toy[100:].copy()
    trained.add_to_adata(new, progress=False)
    new.write(tmp_path / "out.h5mu")
    back = md.read_h5mu(tmp_path / "out.h5mu")
    np.testing.assert_allclose(back.obsm["X_dgd"], new.obsm["X_dgd"])
    assert back.uns["dgd"]["params"]["modalities"]["atac"]["likelihood"] == "binary"


def test_cross_modal_prediction_averages_over_modes_the_input_cannot_tell_apart(trained, toy):
    new = md.MuData({"rna": toy[100:].copy().mod["rna"]})
    point = trained.predict_modality(new, "atac", average_modes=False, progress=False)
    avg = trained.predict_modality(new, "atac", progress=False)
    # by hand: fit from every component mean, weight by the posterior of each fit
    from dgdlens.train.inference import infer_latents_sharded
    matrix, lib, observed = trained._new_data(new, None)
    means = trained.module.prior.mean.detach()
    with trained.module.likelihood.observe(observed):
        fits = [infer_latents_sharded(trained.module, matrix, lib, 4, batch_size=1024, device="cpu", progress=False,
                                      candidates=means[k:k + 1]) for k in range(3)]
    loss = np.stack([f[1] for f in fits], 1).astype(np.float64)
    w = np.exp(-(loss - loss.min(1, keepdims=True)))
    w /= w.sum(1, keepdims=True)
    depth = trained._median_library(1)
    want = sum(w[:, [k]] * trained.predict_modality(z=fits[k][0], modality="atac", library_size=depth)
               for k in range(3))
    np.testing.assert_allclose(avg, want, rtol=1e-4, atol=1e-6)
    assert avg.shape == point.shape


def test_binary_accessibility_gradient_and_both_code_paths_agree():
    torch.manual_seed(0)
    lik = BinaryAccessibility(40)
    x = (torch.rand(6, 40, dtype=torch.float64) < 0.2).double() * 2
    out = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    depth = torch.tensor([0.5, 3.0, 10.0, 40.0, 1e-3, 200.0], dtype=torch.float64)
    # analytic gradient (the sparse identity: the rates of a cell sum to its depth) vs finite differences
    assert torch.autograd.gradcheck(lambda o: lik.nll(x, o, depth), (out,))
    log_comp = torch.log_softmax(out, -1)
    np.testing.assert_allclose(lik._open_sum_sparse(x, log_comp, depth.log()).detach(),
                               lik._open_sum_dense(x, log_comp, depth.log()).detach(), rtol=1e-12)


def test_decoding_one_head_equals_slicing_the_full_decode(trained):
    z = trained.get_latent_representation()
    lib = trained.library_size
    full = trained.decode_latent(z, lib)
    atac = trained.decode_latent(z, lib[:, 1], modality="atac")
    np.testing.assert_allclose(atac, full[:, 20:], rtol=1e-6)
    np.testing.assert_allclose(trained.decode_latent(z, modality="rna"), trained.decode_latent(z)[:, :20], rtol=1e-6)
    with pytest.raises(ValueError, match="Unknown modality"):
        trained.decode_latent(z, modality="prot")
