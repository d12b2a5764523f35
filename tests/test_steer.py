"""dl.steer: the latent edit against an independent SAE round trip, no-op edits, statistics against scipy,
enrichment of a planted change, the random control, a real DGD, and input errors."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
import torch
from scipy import stats

import dgdlens.sae
from dgdlens.lens import gene_sets
from dgdlens.steer import steer


class SoftmaxDecoder:
    """A minimal generative model: composition = softmax(base + z @ B); means = library x composition."""

    def __init__(self, B: np.ndarray, base: np.ndarray, var_names):
        self.B, self.base, self.var_names = B, base, np.asarray(var_names, dtype=object)

    def decode_latent(self, z, library_size=None):
        logits = self.base[None, :] + np.asarray(z, dtype=np.float64) @ self.B
        comp = np.exp(logits - logits.max(1, keepdims=True))
        comp /= comp.sum(1, keepdims=True)
        if library_size is not None:
            comp = comp * np.asarray(library_size, dtype=np.float64).reshape(-1, 1)
        return comp.astype(np.float32)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    Z = rng.standard_normal((400, 16)).astype(np.float32)
    sae = dgdlens.sae.train_sae(
        Z, kind="topk", n_latents=24, k=3, max_epochs=20, device="cpu", seed=0, progress=False
    )
    F = sae.encode(Z)
    active = np.asarray((F != 0).sum(0)).ravel()
    feature = int(np.argmax(active))
    # genes: a hallmark set that the feature's decoder direction switches on, plus other collection genes
    hallmark = gene_sets("hallmark")
    target = "HALLMARK_HYPOXIA"
    others = sorted(hallmark.genes() - set(hallmark[target]))[:1500]
    names = list(hallmark[target]) + others
    in_set = np.isin(names, hallmark[target]).astype(np.float64)
    w = sae.W_dec[feature].detach().double().numpy()
    B = np.outer(w / (w @ w), in_set) * 1.5 + 0.05 * rng.standard_normal((16, len(names)))
    model = SoftmaxDecoder(B, rng.normal(size=len(names)), names)
    return {
        "Z": Z, "sae": sae, "F": F, "feature": feature, "model": model, "target": target, "active": active}


def test_steered_latent_is_the_sae_round_trip_with_the_error_kept(setup):
    Z, sae, F, f = setup["Z"], setup["sae"], setup["F"], setup["feature"]
    res = steer(setup["model"], sae, Z, feature=f, mode="clamp", value=3.0, gene_sets=None)
    F_new = F.toarray().astype(np.float64)
    F_new[:, f] = 3.0
    error = Z - sae.decode(F)
    expected = sae.decode(F_new) + error
    np.testing.assert_allclose(res.z_steered, expected, atol=2e-5)
    np.testing.assert_allclose(res.activation, F[:, f].toarray().ravel(), rtol=1e-6)
    assert np.all(res.activation_steered == 3.0)


@pytest.mark.parametrize(("mode", "value"), [("add", 0.0), ("scale", 1.0)])
def test_zero_delta_changes_nothing(setup, mode, value):
    res = steer(
        setup["model"], setup["sae"], setup["Z"], feature=setup["feature"], mode=mode, value=value,
        gene_sets="hallmark")
    np.testing.assert_array_equal(res.z_steered, res.z)
    np.testing.assert_array_equal(res.expression_steered, res.expression)
    assert (res.genes["log2fc"] == 0).all() and (res.genes["direction"] == "").all()
    assert (res.genes["pval"] == 1).all() and len(res.enrichment) == 0


def test_ablating_a_feature_that_does_not_fire_changes_nothing(setup):
    f = setup["feature"]
    silent = np.flatnonzero(setup["F"][:, f].toarray().ravel() == 0)
    assert len(silent) > 10
    res = steer(
        setup["model"], setup["sae"], setup["Z"], feature=f, mode="ablate", cells=silent, gene_sets=None
    )
    np.testing.assert_array_equal(res.z_steered, res.z)
    np.testing.assert_array_equal(res.expression_steered, res.expression)
    dead = np.flatnonzero(setup["active"] == 0)
    if len(dead):  # a latent that never fires anywhere: ablation is a no-op on every cell
        res = steer(
            setup["model"], setup["sae"], setup["Z"], feature=int(dead[0]), mode="ablate", gene_sets=None
        )
        np.testing.assert_array_equal(res.z_steered, res.z)


def test_fold_changes_and_empirical_pvalues_against_the_controls(setup):
    """log2fc is the mean paired log-ratio; pval_random is (1 + #controls with |effect| >= |observed|) / (1 + M)
    with the controls re-derived here by decoding each random direction separately."""
    from dgdlens.steer_control import control_directions

    lib = np.random.default_rng(1).uniform(500, 3000, size=len(setup["Z"]))
    res = steer(
        setup["model"], setup["sae"], setup["Z"], feature=setup["feature"], mode="add", value=1.0,
        library_size=lib, gene_sets=None, pseudocount=0.5, n_controls=7, seed=4)
    np.testing.assert_allclose(res.expression.sum(1), lib, rtol=1e-4)  # decoded with the library sizes
    lr = np.log2(res.expression_steered.astype(np.float64) + 0.5) - np.log2(
        res.expression.astype(np.float64) + 0.5
    )
    genes = res.genes.set_index("gene").loc[list(setup["model"].var_names)]
    np.testing.assert_allclose(genes["log2fc"], lr.mean(0), rtol=1e-6, atol=1e-9)
    assert "statistic" not in genes  # no t-test across cells on deterministic decoded values
    np.testing.assert_allclose(genes["sd_log2fc_cells"], lr.std(0, ddof=1), rtol=1e-5, atol=1e-9)
    R, _, _ = control_directions(setup["sae"].W_dec.detach().double().numpy(), setup["feature"], n_controls=7,
                                 seed=4, feature_controls=False)
    np.testing.assert_allclose(np.linalg.norm(R, axis=1), np.linalg.norm(setup["sae"].W_dec[setup["feature"]].detach().numpy()), rtol=1e-6)
    delta = res.activation_steered - res.activation
    ctrl = []
    for r in R:
        mu_c = setup["model"].decode_latent(res.z + (delta[:, None] * r[None, :]).astype(np.float32), lib)
        ctrl.append((np.log2(mu_c.astype(np.float64) + 0.5) - np.log2(res.expression.astype(np.float64) + 0.5)).mean(0))
    ctrl = np.abs(np.array(ctrl))
    obs = np.abs(genes["log2fc"].to_numpy())
    p_ref = (1 + (ctrl >= obs[None, :] * (1 - 1e-6)).sum(0)) / 8.0
    agree = np.isclose(genes["pval_random"].to_numpy(), p_ref)
    assert agree.mean() > 0.99  # float32 decoding: a control within rounding of the observed value may flip
    np.testing.assert_allclose(genes["pval"], genes["pval_random"])
    assert res.n_controls["random"] == 7 and res.n_controls["features"] >= 1
    np.testing.assert_allclose(genes["padj"], stats.false_discovery_control(genes["pval"]), rtol=1e-9)


def test_planted_change_is_enriched_and_the_random_control_is_not(setup):
    res = steer(
        setup["model"], setup["sae"], setup["Z"], feature=setup["feature"], mode="add", value=2.0,
        gene_sets="hallmark", random_control=True, seed=3, enrichment_kwargs={"min_size": 5})
    up = res.enrichment[res.enrichment.direction == "up"]
    assert len(up) and up.iloc[0]["term"] == setup["target"]
    np.testing.assert_allclose(res.control.shift, res.shift, rtol=1e-5)  # same norm, other direction
    # a random direction of the same length moves the planted genes much less than the feature does
    in_set = res.genes["gene"].isin(gene_sets("hallmark")[setup["target"]]).to_numpy()
    steered = res.genes["log2fc"].to_numpy()[in_set].mean()
    ctrl = res.control.genes.set_index("gene").loc[res.genes["gene"], "log2fc"].to_numpy()[in_set].mean()
    assert steered > 0.5 and abs(ctrl) < 0.5 * steered
    assert "up=" in repr(res)
    # the planted genes beat every random control (p at its floor 1/201) and pass BH; the set test agrees
    p_set = res.genes["pval"].to_numpy()[in_set]
    assert np.mean(p_set == 1 / 201) > 0.8 and np.mean(res.genes["padj"].to_numpy()[in_set] < 0.05) > 0.8
    sets = res.gene_set_tests
    assert sets.iloc[0]["term"] == setup["target"] and sets.iloc[0]["padj"] < 0.05
    # the random direction, scored against the same controls, changes few genes (the issue: 8,955 of 9,810)
    n_ctrl = int(res.control.genes["direction"].isin(["up", "down"]).sum())
    n_feat = int(res.genes["direction"].isin(["up", "down"]).sum())
    assert n_ctrl <= 0.05 * len(res.genes) and n_feat > 5 * max(n_ctrl, 1)


def test_steering_a_trained_dgd_through_anndata(tmp_path):
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(2.0, 1.0, size=(1, 60)) * rng.uniform(0.5, 2, size=(150, 1))).astype(
        np.float32
    )
    counts[:, 0] += 1
    adata = ad.AnnData(counts)
    adata.var_names = [f"G{i}" for i in range(60)]
    model = dgdlens.DGD(adata, n_latent=3, n_components=2, hidden=(16,), validation_fraction=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # early-stopping and few-epoch notices are not under test here
        model.train(max_epochs=2, progress=False, early_stopping=False)
    Z = model.get_latent_representation()
    sae = dgdlens.sae.train_sae(
        Z, kind="topk", n_latents=8, k=2, max_epochs=3, device="cpu", seed=0, progress=False
    )
    res = steer(model, sae, adata, feature=0, mode="clamp", value=0.0, gene_sets=None, n_controls=20)
    np.testing.assert_allclose(res.expression.sum(1), counts.sum(1), rtol=1e-3)  # the cells' library sizes
    assert res.genes.shape[0] == 60 and set(res.genes["gene"]) == set(adata.var_names)
    # the mixture's log-density per cell, before and after; the reference is the training latents
    lp = model.gmm.log_prob(torch.from_numpy(Z)).detach().numpy()
    np.testing.assert_allclose(res.manifold["log_prior"], lp, rtol=1e-5, atol=1e-5)
    assert res.manifold["reference"] == "training latents"
    assert res.manifold["threshold"] == pytest.approx(np.percentile(lp, 1.0), rel=1e-5)
    # a large move leaves the manifold: flagged per cell and warned about
    with pytest.warns(UserWarning, match="below percentile 1"):
        far = steer(model, sae, adata, feature=0, mode="add", value=50.0, gene_sets=None, n_controls=20)
    assert far.manifold["off_manifold"].mean() > 0.5 and far.manifold["median_delta"] < 0
    from dgdlens.steer import steering_summary

    summary = steering_summary(far)
    assert summary["fraction_off_manifold"] > 0.5 and "empirical p" in summary["significance"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_steer_on_cuda_matches_cpu(setup):
    cpu = steer(
        setup["model"], setup["sae"], setup["Z"], feature=setup["feature"], mode="clamp", value=2.0,
        gene_sets=None)
    gpu = steer(
        setup["model"], setup["sae"], setup["Z"], feature=setup["feature"], mode="clamp", value=2.0,
        gene_sets=None, device="cuda")
    setup["sae"].to("cpu")
    np.testing.assert_allclose(gpu.z_steered, cpu.z_steered, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "boost", "value": 1.0}, "mode must be"), ({"mode": "clamp"}, "needs value"),
        ({"mode": "ablate", "value": 2.0}, "ablate"), ({"mode": "clamp", "value": -1.0}, "non-negative"),
        ({"mode": "add", "value": float("nan")}, "finite"),
        ({"feature": 10_000, "mode": "ablate"}, "out of range"),
        ({"feature": 1.5, "mode": "ablate"}, "integer"),
        ({"mode": "ablate", "cells": np.array([], dtype=int)}, "No cells")],
)
def test_bad_steering_arguments_are_errors(setup, kwargs, match):
    args = {"feature": setup["feature"], "gene_sets": None, **kwargs}
    with pytest.raises(ValueError, match=match):
        steer(setup["model"], setup["sae"], setup["Z"], **args)


def test_latents_of_the_wrong_width_are_an_error(setup):
    with pytest.raises(ValueError, match="shape"):
        steer(setup["model"], setup["sae"], setup["Z"][:, :3], feature=0, mode="ablate", gene_sets=None)


class _StubSAE:
    """An SAE-shaped object whose decoder directions are iid isotropic Gaussian: every feature is a
    'random feature', exchangeable with the random controls and with the other features."""

    def __init__(self, W_enc: np.ndarray, W_dec: np.ndarray):
        self.W_enc, self.W_dec = W_enc, torch.from_numpy(W_dec)
        self.n_latents, self.d_in = W_dec.shape

    def encode(self, z):
        import scipy.sparse as sp

        return sp.csr_matrix(np.maximum(np.asarray(z, dtype=np.float64) @ self.W_enc, 0.0))

    def to(self, device):
        return self


def test_empirical_p_is_uniform_for_random_features_and_small_for_a_planted_one():
    """Calibration: a feature whose direction is random gets uniform p-values against both control kinds,
    pooled over 24 features x 300 genes; BH then finds (almost) nothing. Orthogonalised controls would not
    be calibrated in 16 dimensions (shown on a linear response, the reason the controls are isotropic)."""
    rng = np.random.default_rng(0)
    d, G, n = 16, 300, 60
    model = SoftmaxDecoder(0.5 * rng.standard_normal((d, G)), rng.normal(size=G), [f"g{i}" for i in range(G)])
    sae = _StubSAE(rng.standard_normal((d, 25)), rng.standard_normal((25, d)))
    Z = rng.standard_normal((n, d)).astype(np.float32)
    p_r, p_f, any_sig = [], [], []
    for f in range(24):
        res = steer(model, sae, Z, feature=f, mode="add", value=1.0, gene_sets=None, n_controls=100, seed=f)
        g = res.genes.set_index("gene").loc[model.var_names]
        p_r.append(g["pval_random"].to_numpy())
        p_f.append(g["pval_features"].to_numpy())
        any_sig.append(bool((g["padj"] < 0.05).any()))
    p_r, p_f = np.concatenate(p_r), np.concatenate(p_f)
    for p in (p_r, p_f):
        for t in (0.05, 0.1, 0.25, 0.5):
            # genes within one feature are correlated: allow a generous band around the nominal rate
            assert abs(np.mean(p <= t) - t) < 0.35 * t + 0.01, (t, np.mean(p <= t))
    # KS against uniform after removing the discreteness (p is on a grid of 1/(M+1))
    u = p_r - rng.uniform(0, 1 / 101, size=len(p_r))
    assert stats.kstest(u, "uniform").statistic < 0.06
    assert np.mean(any_sig) <= 0.15  # BH across genes: few random features get any gene at FDR 5 %
    # why not orthogonal controls: a linear response g, feature w, controls r (isotropic or orthogonal to w)
    tail = {}
    for orth in (False, True):
        hits = []
        for _ in range(20):
            B = rng.standard_normal((d, 1000))
            w = rng.standard_normal(d)
            R = rng.standard_normal((200, d))
            if orth:
                R -= np.outer(R @ w / (w @ w), w)
            R *= np.linalg.norm(w) / np.linalg.norm(R, axis=1, keepdims=True)
            obs, ctrl = np.abs(w @ B), np.abs(R @ B)
            hits.append(np.mean((1 + (ctrl >= obs).sum(0)) / 201 <= 0.01))
        tail[orth] = np.mean(hits)
    assert tail[False] < 0.016
    assert tail[True] > 0.02



def test_controls_decoded_in_cell_chunks_equal_one_pass(setup):
    """decoded_effects bounds its memory by decoding cells in chunks; the sums over cells are the same."""
    from dgdlens.steer_control import decoded_effects

    Z, model = setup["Z"], setup["model"]
    lib = np.random.default_rng(2).uniform(500, 3000, size=len(Z)).astype(np.float32)
    mu = model.decode_latent(Z, lib)
    delta = np.random.default_rng(3).uniform(-1, 1, size=len(Z))
    V = np.random.default_rng(4).standard_normal((5, Z.shape[1]))
    whole = decoded_effects(model, Z, lib, delta, V, mu, scale=1.0, pseudocount=0.5, budget=1e12)
    chunked = decoded_effects(model, Z, lib, delta, V, mu, scale=1.0, pseudocount=0.5, budget=8 * mu.shape[1] * 37)
    np.testing.assert_allclose(chunked, whole, rtol=1e-10, atol=1e-13)


def test_max_cells_steers_a_seeded_subsample_and_changes_nothing_when_all_fit(setup):
    kw = dict(feature=setup["feature"], mode="add", value=1.0, gene_sets=None, n_controls=20, seed=5)
    full = steer(setup["model"], setup["sae"], setup["Z"], **kw)
    same = steer(setup["model"], setup["sae"], setup["Z"], max_cells=len(setup["Z"]), **kw)
    np.testing.assert_array_equal(full.cells, same.cells)
    np.testing.assert_array_equal(full.genes["log2fc"], same.genes["log2fc"])
    cells = np.arange(50, 350)
    sub = steer(setup["model"], setup["sae"], setup["Z"], cells=cells, max_cells=120, **kw)
    again = steer(setup["model"], setup["sae"], setup["Z"], cells=cells, max_cells=120, **kw)
    assert len(sub.cells) == 120 and np.all(np.diff(sub.cells) > 0) and np.isin(sub.cells, cells).all()
    np.testing.assert_array_equal(sub.cells, again.cells)
    assert sub.expression.shape == (120, len(setup["model"].var_names))
    # the subsample estimates the same per-gene change as the whole selection
    whole = steer(setup["model"], setup["sae"], setup["Z"], cells=cells, max_cells=None, **kw)
    a = sub.genes.set_index("gene")["log2fc"]
    b = whole.genes.set_index("gene")["log2fc"].reindex(a.index)
    assert np.corrcoef(a, b)[0, 1] > 0.95
