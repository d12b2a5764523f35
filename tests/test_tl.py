"""dl.tl: the AnnData verbs read ``obsm[use_rep]``, write under ``key_added`` and store exactly what the
array-level functions return (dl.sae.train_sae + encode, dl.steer.steer, the UMAP of an array)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import dgdlens as dl
from dgdlens import tl
from dgdlens.data.datasets import pbmc68k_counts
from dgdlens.sae.activations import activation_summary

SAE_OPTIONS = dict(kind="topk", n_latents=32, k=4, device="cpu", seed=0, progress=False, batch_size=64)


class LinearDecoder:
    """A stand-in generative model: softmax(z @ W) compositions, times the library size when given."""

    def __init__(self, d: int, var_names, seed: int = 0):
        self.W = np.random.default_rng(seed).normal(0, 1.0, (d, len(var_names)))
        self.var_names = pd.Index(var_names)

    def decode_latent(self, z, library_size=None):
        logits = np.asarray(z, dtype=np.float64) @ self.W
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out = p if library_size is None else p * np.asarray(library_size, dtype=np.float64)[:, None]
        return out.astype(np.float32)


@pytest.fixture(scope="module")
def adata():
    a = pbmc68k_counts()[:200].copy()
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (4, 8))
    a.obsm["X_dgd"] = (centres[rng.integers(0, 4, a.n_obs)] + rng.normal(size=(a.n_obs, 8))).astype(np.float32)
    return a


@pytest.fixture(scope="module")
def trained(adata):
    work = adata.copy()
    model = tl.sae(work, use_rep="X_dgd", max_epochs=3, **SAE_OPTIONS)
    return work, model


def test_sae_writes_csr_activations_and_an_h5ad_safe_summary(trained, adata, tmp_path):
    work, model = trained
    assert isinstance(model, dl.sae.SAE)
    F = work.obsm["X_sae"]
    assert sp.issparse(F) and F.format == "csr" and F.shape == (adata.n_obs, 32)
    # the same activations as the array-level calls with the same settings
    options = {k: v for k, v in SAE_OPTIONS.items() if k != "kind"}
    direct = dl.sae.train_sae(adata.obsm["X_dgd"], "topk", max_epochs=3, **options)
    np.testing.assert_array_equal(F.toarray(), direct.encode(adata.obsm["X_dgd"]).toarray())
    np.testing.assert_array_equal(F.toarray(), model.encode(adata.obsm["X_dgd"]).toarray())
    summary = work.uns["X_sae"]
    assert summary["use_rep"] == "X_dgd" and summary["kind"] == "topk"
    assert summary["n_latents"] == 32 and summary["d_in"] == 8 and summary["config"]["k"] == 4
    assert summary["activation_summary"] == activation_summary(F)
    work.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_array_equal(back.obsm["X_sae"].toarray(), F.toarray())
    assert back.uns["X_sae"]["activation_summary"]["l0"] == pytest.approx(summary["activation_summary"]["l0"])


def test_sae_key_added_and_missing_use_rep(adata):
    work = adata.copy()
    tl.sae(work, use_rep="X_dgd", max_epochs=1, key_added="X_sae_small", **SAE_OPTIONS)
    assert "X_sae_small" in work.obsm and "X_sae" not in work.obsm
    with pytest.raises(ValueError, match="not in adata.obsm"):
        tl.sae(work, use_rep="X_missing", **SAE_OPTIONS)
    with pytest.raises(TypeError, match="needs an AnnData"):
        tl.sae(np.zeros((10, 3)))


def test_steer_stores_the_tables_of_dl_steer(trained, tmp_path):
    work, model = trained
    decoder = LinearDecoder(8, work.var_names)
    feature = int(np.argmax(np.asarray((work.obsm["X_sae"] > 0).sum(axis=0)).ravel()))
    options = dict(mode="add", value=3.0, gene_sets="hallmark", random_control=True,
                   enrichment_kwargs={"min_size": 5})
    assert tl.steer(work, decoder, model, feature, use_rep="X_dgd", **options) is None
    stored = work.uns["dgdlens_steer"]
    direct = dl.steer(decoder, model, work.obsm["X_dgd"], feature=feature, **options)
    pd.testing.assert_frame_equal(stored["genes"], direct.genes)
    pd.testing.assert_frame_equal(stored["enrichment"], direct.enrichment)
    pd.testing.assert_frame_equal(stored["control"]["genes"], direct.control.genes)
    np.testing.assert_array_equal(stored["cells"], direct.cells)
    assert stored["params"] == {"feature": feature, "mode": "add", "value": 3.0, "use_rep": "X_dgd",
                                "layer": "None", "n_cells": work.n_obs}
    assert stored["genes"]["pval"].between(0, 1).all() and stored["n_controls"]["random"] >= 100
    if direct.gene_set_tests is not None:
        pd.testing.assert_frame_equal(stored["gene_set_tests"], direct.gene_set_tests)
    work.write_h5ad(tmp_path / "steer.h5ad")
    back = ad.read_h5ad(tmp_path / "steer.h5ad").uns["dgdlens_steer"]
    np.testing.assert_allclose(back["genes"]["log2fc"].to_numpy(), direct.genes["log2fc"].to_numpy())
    # pl reads what tl wrote
    fig = dl.pl.steering_lfc(work, n_up=3, n_down=3)
    assert len(fig.axes[0].patches) > 0


def test_steer_copy_leaves_the_input_alone(trained):
    work, model = trained
    decoder = LinearDecoder(8, work.var_names)
    before = set(work.uns)
    out = tl.steer(work, decoder, model, 0, use_rep="X_dgd", mode="ablate", gene_sets=None, copy=True,
                   key_added="ablated", cells=np.arange(20))
    assert set(work.uns) == before and out is not work
    assert out.uns["ablated"]["params"]["n_cells"] == 20 and out.uns["ablated"]["params"]["value"] == "None"
    with pytest.raises(ValueError, match="not in adata.obsm"):
        tl.steer(work, decoder, model, 0, use_rep="X_missing", mode="ablate")


def test_umap_on_anndata_equals_umap_of_the_array(adata):
    work = adata.copy()
    assert tl.umap(work, use_rep="X_dgd", n_neighbors=10, seed=3) is None
    coords = tl.umap(adata.obsm["X_dgd"], n_neighbors=10, seed=3)
    np.testing.assert_array_equal(work.obsm["X_umap"], coords)
    assert work.uns["X_umap"]["params"]["use_rep"] == "X_dgd"
    assert "connectivities" not in work.obsp  # the caller's kNN graph is not touched
    copied = tl.umap(work, use_rep="X_dgd", n_neighbors=10, seed=3, key_added="X_umap2", copy=True)
    assert "X_umap2" in copied.obsm and "X_umap2" not in work.obsm
    fig = dl.pl.embedding(work, basis="X_umap", color="bulk_labels")
    assert fig.axes[0].get_title() == "bulk_labels"
