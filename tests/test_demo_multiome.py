"""``dgdlens demo --multiome --quick`` end to end: files, the saved model and data agree, the report has its
multiome sections, and RNA -> ATAC prediction beats the per-peak mean where RNA carries information."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from dgdlens import DGD
from dgdlens.demo import MULTIOME_FILES, MULTIOME_QUICK_SETTINGS, run_demo
from dgdlens.sae import SAE

pytestmark = pytest.mark.usefixtures("one_thread")

STANDARD = ["Training", "Latent space", "Mixture components and labels", "Sparse autoencoder quality",
            "Annotated features", "Feature activity on the map", "Steering a feature"]
MULTIOME = ["Modalities and held-out reconstruction", "Cross-modal prediction", "Features in both modalities",
            "Steering in both modalities"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("multiome") / "demo"
    printed: list[str] = []
    result = run_demo(out, multiome=True, quick=True, device="cpu", progress=False, echo=printed.append)
    return out, "\n".join(printed), result


def test_every_promised_file_is_written(demo):
    out, printed, result = demo
    for name in ("mdata.h5mu", "dgd/config.json", "dgd/weights.safetensors", "sae/config.json", "features_rna.csv",
                 "features_peaks.csv", "feature_summary.csv", "steering_genes.csv", "steering_peaks.csv",
                 "cross_modal.csv", "summary.json", "report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    marker = json.loads((out / ".dgdlens-output.json").read_text())
    assert marker["written_by"] == "dgdlens demo" and marker["files"] == list(MULTIOME_FILES)
    assert not (out / "adata.h5ad").exists()
    assert [p.name for p in out.rglob("*") if ".tmp" in p.name] == []
    for step in range(1, 9):
        assert f"[{step}/8]" in printed
    assert "dgdlens demo --multiome finished in" in printed and "timings" in printed
    assert set(result.timings) == {"data", "dgd", "embed", "cross", "sae", "annotate", "steer", "write"}


def test_mdata_holds_the_saved_models_latents_and_activations(demo):
    mudata = pytest.importorskip("mudata")
    out, _, _ = demo
    mdata = mudata.read_h5mu(out / "mdata.h5mu")
    model, sae = DGD.load(out / "dgd"), SAE.load(out / "sae")
    s = MULTIOME_QUICK_SETTINGS
    assert set(mdata.mod) == {"rna", "atac"} and mdata.n_obs == s["n_cells"]
    assert model.modality_names == ["rna", "atac"]
    assert [m["likelihood"] for m in model.params["modalities"]] == ["nb", "binary"]
    assert list(model.modality_var_names("atac")) == list(mdata.mod["atac"].var_names)
    assert model.has_covariates and model.params["batch_key"] == "batch"
    split = mdata.obs["dgd_split"]
    assert (split == "held-out").sum() == round(s["n_cells"] * s["held_out_fraction"])
    fitted = (split != "held-out").to_numpy()
    np.testing.assert_array_equal(mdata.obsm["X_dgd"][fitted], model.get_latent_representation())
    assert mdata.obsm["X_dgd_batch"].shape == (mdata.n_obs, model.params["n_latent_covariate"])
    acts = mdata.obsm["X_sae"]
    np.testing.assert_allclose(acts.toarray(), sae.encode(mdata.obsm["X_dgd"]).toarray(), rtol=1e-5, atol=1e-6)
    # the truth of the simulation travels with the data; the model summary is stored in writable form
    assert set(mdata.uns["truth"]["peak_gene_links"]) == {"peak", "gene"}
    assert set(mdata.uns["dgd"]["params"]["modalities"]) == {"rna", "atac"}


def test_cross_modal_prediction_beats_the_per_peak_mean_on_linked_peaks(demo):
    out, printed, result = demo
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(json.dumps({**result.summary, "timings_s": summary["timings_s"]}))
    rows = {r["features"].split(" (")[0]: r for r in summary["cross_modal"]["rna_to_atac"]}
    assert set(rows) == {"all peaks", "peaks linked to genes", "ATAC-group marker peaks", "other peaks"}
    for r in rows.values():
        assert 0.5 < r["model"] < 1 and 0.5 < r["baseline_feature_mean"] < 1
    # RNA carries the RNA group; the peaks linked to marker genes follow it, so there the model must win
    linked = rows["peaks linked to genes"]
    assert linked["model"] > linked["baseline_feature_mean"]
    assert (f"AUROC, {linked['features']}: model {linked['model']:.3f}, per-feature mean "
            f"{linked['baseline_feature_mean']:.3f}") in printed
    rna = {r["features"].split(" (")[0]: r for r in summary["cross_modal"]["atac_to_rna"]}
    assert set(rna) == {"all genes", "marker genes"}
    assert all(-1 <= r["model"] <= 1 for r in rna.values())
    table = pd.read_csv(out / "cross_modal.csv")
    assert len(table) == 6 and set(table["prediction"]) == {"RNA -> ATAC", "ATAC -> RNA"}


def test_features_and_steering_in_both_modalities(demo):
    out, _, _ = demo
    genes = pd.read_csv(out / "features_rna.csv")
    peaks = pd.read_csv(out / "features_peaks.csv")
    assert len(genes) > 0 and set(genes["term"]) <= {"r0", "r1", "r2"}
    assert set(peaks["term"]) <= {"r0", "r1", "r2", "a0", "a1"}
    for members in peaks["genes"].dropna():  # the lens reports the overlapping peaks by name
        assert all(re.fullmatch(r"chr\d+:\d+-\d+", p.strip()) for p in members.split(",") if p.strip())
    summary = json.loads((out / "summary.json").read_text())
    st = summary["steering"]
    steered_genes, steered_peaks = pd.read_csv(out / "steering_genes.csv"), pd.read_csv(out / "steering_peaks.csv")
    assert "peak" in steered_peaks.columns and len(steered_peaks) == summary["modalities"]["atac"]["features"]
    assert len(steered_genes) == summary["modalities"]["rna"]["features"]
    assert st["rna"]["feature"] == st["atac"]["feature"] == st["feature"]
    assert st["rna"]["n_cells"] == st["atac"]["n_cells"] <= MULTIOME_QUICK_SETTINGS["steer_max_cells"]
    assert st["atac"]["genes_up"] == int((steered_peaks["direction"] == "up").sum())
    # peak-open probabilities stay probabilities after the edit
    assert steered_peaks["mean_after"].between(0, 1).all() and steered_peaks["mean_before"].between(0, 1).all()
    table = pd.read_csv(out / "feature_summary.csv")
    assert {"feature", "active_cells", "rna_term", "peaks_term"} <= set(table.columns)


def test_report_has_the_multiome_sections(demo):
    out, _, _ = demo
    page = (out / "report.html").read_text(encoding="utf-8")
    assert re.findall(r"<h2>(.*?)</h2>", page) == STANDARD + MULTIOME
    assert 'class="note">Skipped' not in page
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page)
    summary = json.loads((out / "summary.json").read_text())
    cross = page[page.index('id="cross-modal-prediction"'):page.index('id="features-in-both-modalities"')]
    for r in summary["cross_modal"]["rna_to_atac"]:
        assert f"{r['model']:.3f}" in cross and f"{r['baseline_feature_mean']:.3f}" in cross
    start = page.index('id="modalities-and-held-out-reconstruction"')
    modalities = page[start:page.index('id="cross-modal-prediction"')]
    assert "binary" in modalities and "negative binomial" in modalities
    steering = page[page.index('id="steering-in-both-modalities"'):]
    feature = summary["steering"]["feature"]
    assert re.search(rf"Feature {feature} (\(best gene term [^<]*\) )?was switched off", steering)
    assert "<img " in steering
    assert "Quick run" in page


def test_a_foreign_folder_is_refused_before_any_work(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by the demo"):
        run_demo(tmp_path, multiome=True, quick=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_cli_passes_multiome(monkeypatch):
    import dgdlens.demo
    from dgdlens.cli import main, parse_args

    args = parse_args(["demo", "--multiome", "--quick", "--out", "x"])
    assert args.multiome and args.quick and args.out == "x"
    assert not parse_args(["demo"]).multiome
    seen = {}
    monkeypatch.setattr(dgdlens.demo, "run_demo", lambda out, **kw: seen.update(out=out, **kw))
    assert main(["demo", "--multiome", "--quick", "--out", "x", "--no-progress"]) == 0
    assert seen["multiome"] is True and seen["quick"] is True and seen["out"] == "x"
