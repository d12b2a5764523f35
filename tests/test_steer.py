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


def test_fold_changes_and_statistics_equal_paired_log_ratios_with_scipy(setup):
    lib = np.random.default_rng(1).uniform(500, 3000, size=len(setup["Z"]))
    res = steer(
        setup["model"], setup["sae"], setup["Z"], feature=setup["feature"], mode="add", value=1.0,
        library_size=lib, gene_sets=None, pseudocount=0.5)
    np.testing.assert_allclose(res.expression.sum(1), lib, rtol=1e-4)  # decoded with the library sizes
    lr = np.log2(res.expression_steered.astype(np.float64) + 0.5) - np.log2(
        res.expression.astype(np.float64) + 0.5
    )
    ref = stats.ttest_1samp(lr, 0.0)
    genes = res.genes.set_index("gene").loc[list(setup["model"].var_names)]
    np.testing.assert_allclose(genes["log2fc"], lr.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(genes["statistic"], ref.statistic, rtol=1e-6)
    np.testing.assert_allclose(genes["pval"], ref.pvalue, rtol=1e-6, atol=1e-300)


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
    res = steer(model, sae, adata, feature=0, mode="clamp", value=1.0, gene_sets=None)
    np.testing.assert_allclose(res.expression.sum(1), counts.sum(1), rtol=1e-3)  # the cells' library sizes
    assert res.genes.shape[0] == 60 and set(res.genes["gene"]) == set(adata.var_names)


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
