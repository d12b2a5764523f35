"""``dgdlens demo --quick`` end to end: every promised file exists and agrees with the saved models."""

from __future__ import annotations

import contextlib
import io
import json
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from dgdlens import DGD
from dgdlens.cli import main
from dgdlens.sae import SAE

SECTIONS = ["Training", "Latent space", "Mixture components and labels", "Sparse autoencoder quality",
            "Annotated features", "Feature activity on the map", "Steering a feature"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "dgdlens-demo"
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        code = main(["demo", "--quick", "--out", str(out), "--device", "cpu", "--no-progress"])
    assert code == 0, printed.getvalue() + errors.getvalue()
    return out, printed.getvalue()


def test_demo_writes_every_promised_file(demo):
    out, printed = demo
    for name in ("adata.h5ad", "dgd/config.json", "dgd/weights.safetensors", "sae/config.json",
                 "features.csv", "feature_summary.csv", "steering_genes.csv", "steering_enrichment.csv",
                 "summary.json", "report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    marker = json.loads((out / ".dgdlens-output.json").read_text())
    assert marker["written_by"] == "dgdlens demo" and "report.html" in marker["files"]
    leftovers = [p.name for p in out.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]
    assert leftovers == []  # every file was written whole, through a temporary file renamed into place
    for step in range(1, 8):
        assert f"[{step}/7]" in printed
    assert "dgdlens demo finished in" in printed and "report.html" in printed


def test_adata_holds_latents_clusters_and_activations_of_the_saved_models(demo):
    out, _ = demo
    adata = ad.read_h5ad(out / "adata.h5ad")
    model = DGD.load(out / "dgd")
    sae = SAE.load(out / "sae")
    assert adata.n_obs == 700 and list(adata.var_names) == list(model.var_names)
    z = adata.obsm["X_dgd"]
    assert z.shape == (700, model.n_latent) and np.isfinite(z).all()
    assert set(adata.obs["dgd_split"]) == {"training", "validation", "held-out"}
    assert (adata.obs["dgd_split"] == "held-out").sum() == 105
    # Training and validation cells carry the saved model's own latents, in the model's cell order.
    fitted = adata[adata.obs["dgd_split"] != "held-out"]
    np.testing.assert_array_equal(fitted.obsm["X_dgd"], model.get_latent_representation())
    # Clusters are the most responsible mixture component of each latent.
    np.testing.assert_array_equal(adata.obs["dgd_cluster"].astype(int), model.get_cluster_assignments(z=z))
    acts = adata.obsm["X_sae"]
    assert sp.issparse(acts) and acts.shape == (700, sae.n_latents)
    np.testing.assert_allclose(acts.toarray(), sae.encode(z).toarray(), rtol=1e-5, atol=1e-6)


def test_features_steering_and_summary_agree(demo):
    out, printed = demo
    features = pd.read_csv(out / "features.csv")
    for column in ("feature", "term", "direction", "overlap", "set_size", "pval", "padj", "genes"):
        assert column in features.columns
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells"] == 700 and summary["annotation"]["rows"] == len(features)
    genes = pd.read_csv(out / "steering_genes.csv")
    assert len(genes) == summary["genes"]
    assert summary["steering"]["genes_up"] == int((genes["direction"] == "up").sum())
    steered = summary["steering"]
    assert f"{steered['genes_down']} genes down, {steered['genes_up']} up" in printed
    # The demo switches the feature off in exactly the cells where it is active.
    acts = ad.read_h5ad(out / "adata.h5ad").obsm["X_sae"]
    assert steered["mode"] == "ablate" and steered["n_cells"] == int((acts[:, steered["feature"]] > 0).sum())
    assert summary["sae"]["fvu"] >= 0 and 0 <= summary["sae"]["dead_fraction"] <= 1


def test_report_is_self_contained_with_every_section(demo):
    out, _ = demo
    page = (out / "report.html").read_text(encoding="utf-8")
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    assert headings == SECTIONS
    assert page.count("<img ") >= 6
    assert 'class="note">Skipped' not in page  # every section had its inputs
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page)  # nothing loaded from elsewhere
    assert "Quick run" in page
