"""Tests for dgdlens.report: a self-contained page, sections skipped cleanly, tables faithful to the data."""

from __future__ import annotations

import base64
import copy
import re
from html.parser import HTMLParser

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from matplotlib.figure import Figure
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

import dgdlens
from dgdlens.report import Report, Section, build_report, format_value, rank_features, table_html

SECTIONS = ["Training", "Latent space", "Mixture components and labels", "Sparse autoencoder quality",
            "Annotated features", "Feature activity on the map", "Steering a feature"]


class _Page(HTMLParser):
    """Collects tags with attributes, section headings, notes and visible text of a report."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.headings: list[str] = []
        self.notes: list[str] = []
        self.text: list[str] = []
        self.styles: list[str] = []
        self._stack: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag not in ("img", "meta", "br"):
            self._stack.append((tag, attrs))

    def handle_endtag(self, tag):
        while self._stack and self._stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        if not self._stack:
            return
        tag, attrs = self._stack[-1]
        if tag == "style":
            self.styles.append(data)
            return
        self.text.append(data)
        if tag == "h2":
            self.headings.append(data)
        if tag == "p" and "note" in (attrs.get("class") or ""):
            self.notes.append(data)

    def images(self) -> list[dict]:
        return [a for t, a in self.tags if t == "img"]

    @property
    def visible(self) -> str:
        return " ".join(self.text)


def _inputs(seed: int = 0, n_cells: int = 150) -> dict:
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 3, n_cells)
    latent = rng.normal(0.0, 8.0, (3, 6))[types] + rng.normal(size=(n_cells, 6))
    clusters = np.where(rng.random(n_cells) < 0.8, types, rng.integers(0, 5, n_cells))
    labels = pd.Series(np.array(["T cell", "B cell", "Mono"], dtype=object)[types], name="bulk_labels")
    epochs = np.arange(1, 21)
    history = pd.DataFrame({"epoch": epochs, "train_loss": 900 / epochs + 10, "val_loss": 900 / epochs + 12})
    dense = np.where(rng.random((n_cells, 30)) < 0.2, rng.gamma(2.0, 1.0, (n_cells, 30)), 0.0)
    dense[:, 25:] = 0.0
    features = pd.DataFrame({
        "feature": np.repeat(np.arange(8), 2),
        "term": [f"term {f}.{t}" for f in range(8) for t in range(2)],
        "direction": ["up", "down"] * 8,
        "overlap": 4, "set_size": 30,
        "pval": np.linspace(1e-6, 0.2, 16), "padj": np.linspace(1e-5, 0.5, 16)[rng.permutation(16)],
        "odds_ratio": 5.0,
        "genes": [[f"G{g}" for g in range(15)]] * 16,
    })
    genes = [f"G{g}" for g in range(60)]
    steering = {"feature": 2, "mode": "add", "value": 3.0, "n_cells": n_cells,
                "lfc": pd.Series(rng.normal(size=60), index=genes),
                "enrichment": features.head(4).drop(columns="feature")}
    return dict(history=history, latent=latent, clusters=clusters, labels=labels,
                sae_metrics={"fvu": 0.031, "frac_dead": np.float64(0.2)}, activations=sp.csr_matrix(dense),
                features=features, steering=steering)


@pytest.fixture(autouse=True)
def _no_pyplot_figures():
    before = set(plt.get_fignums())
    yield
    assert set(plt.get_fignums()) == before


def test_full_report_is_self_contained_and_complete(tmp_path):
    inputs = _inputs()
    before = copy.deepcopy(inputs)
    path = build_report(tmp_path / "sub" / "report.html", title="Run <1>", params={"epochs": 20},
                        summary={"cells": 150, "genes": 60}, attribution=["GO: CC BY 4.0", "Hallmark"],
                        notes="A note & more", **inputs)
    text = path.read_text(encoding="utf-8")
    page = _Page(text)

    # Nothing outside the file is referenced: no scripts, stylesheets, frames, fonts or remote links.
    tag_names = {t for t, _ in page.tags}
    assert not tag_names & {"script", "link", "iframe", "object", "embed", "base"}
    for tag, attrs in page.tags:
        for key in ("src", "href", "srcset", "poster", "data"):
            value = attrs.get(key)
            if value is not None:
                assert value.startswith(("data:image/png;base64,", "#")), (tag, key, value[:60])
    css = " ".join(page.styles)
    assert "url(" not in css and "@import" not in css and "@font-face" not in css

    # Every figure is a valid PNG whose size matches the attributes written next to it.
    images = page.images()
    assert len(images) == 6
    for attrs in images:
        png = base64.b64decode(attrs["src"].split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert int.from_bytes(png[16:20], "big") == int(attrs["data-width"]) > 100
        assert int.from_bytes(png[20:24], "big") == int(attrs["data-height"]) > 100
        assert attrs["alt"]

    assert page.headings == SECTIONS
    assert page.notes == ["A note & more"]  # no section was skipped
    visible = page.visible
    assert "Run <1>" in visible and "GO: CC BY 4.0" in visible and "Hallmark" in visible
    assert f"dgdlens {dgdlens.__version__}" in visible
    assert "UMAP of the 6-dimensional latent representation" in visible
    # ARI / NMI in the caption are the scikit-learn values.
    ari = adjusted_rand_score(inputs["labels"], inputs["clusters"])
    nmi = normalized_mutual_info_score(inputs["labels"], inputs["clusters"])
    assert f"ARI = {ari:.3f}, NMI = {nmi:.3f} over 150 cells." in visible
    # Each section opens with a plain-language explanation.
    assert text.count('<p class="intro">') == len(SECTIONS)
    assert "Feature 2 (top term: term 2." in visible and "was increased by 3 in 150 cells." in visible
    # Inputs are untouched.
    for key, value in before.items():
        if isinstance(value, (pd.DataFrame, pd.Series)):
            pd.testing.assert_frame_equal(pd.DataFrame(inputs[key]), pd.DataFrame(value))
        elif isinstance(value, np.ndarray):
            np.testing.assert_array_equal(inputs[key], value)
    pd.testing.assert_series_equal(inputs["steering"]["lfc"], before["steering"]["lfc"])
    assert not [p for p in path.parent.iterdir() if p.name != "report.html"]  # no temporary left over


def test_missing_inputs_are_skipped_with_notes(tmp_path):
    page = _Page(build_report(tmp_path / "empty.html").read_text(encoding="utf-8"))
    assert page.headings == SECTIONS
    assert page.images() == []
    assert len(page.notes) == len(SECTIONS) and all(n.startswith("Skipped") for n in page.notes)

    inputs = _inputs()
    partial = build_report(tmp_path / "partial.html", history=inputs["history"],
                           umap=np.random.default_rng(0).normal(size=(150, 2)), clusters=inputs["clusters"])
    page = _Page(partial.read_text(encoding="utf-8"))
    assert len(page.images()) == 2  # training curves and the map coloured by component
    assert "Skipped: no labels (labels=) given." in page.notes
    assert "Not shown: no labels (labels=) given." in page.notes


def test_user_text_is_escaped(tmp_path):
    inputs = _inputs()
    inputs["labels"] = inputs["labels"].replace("Mono", "<script>alert(1)</script>")
    inputs["features"] = inputs["features"].assign(term="<img src=x onerror=alert(2)>")
    path = build_report(tmp_path / "r.html", title="<b>bold</b>", summary={"<i>k</i>": "v & w"},
                        umap=np.random.default_rng(0).normal(size=(150, 2)),
                        **{k: v for k, v in inputs.items() if k not in ("latent",)})
    text = path.read_text(encoding="utf-8")
    assert "<script" not in text and "<img src=x" not in text and "<b>bold" not in text and "<i>k" not in text
    assert "&lt;img src=x onerror=alert(2)&gt;" in text and "&lt;b&gt;bold&lt;/b&gt;" in text
    assert "v &amp; w" in text


def test_feature_table_ranks_features_and_marks_non_significant_terms(tmp_path):
    inputs = _inputs()
    features = inputs["features"]
    best = features.groupby("feature")["padj"].min().sort_values()
    ranking = rank_features(features)
    assert ranking["feature"].tolist() == best.index.tolist()
    np.testing.assert_allclose(ranking["best"], best.to_numpy())

    path = build_report(tmp_path / "r.html", features=features, n_top_features=3, terms_per_feature=1,
                        alpha=0.1)
    text = path.read_text(encoding="utf-8")
    table = text.split('id="annotated-features"')[1].split("</table>")[0]
    rows = re.findall(r"<tr( class=\"[^\"]*\")?><td[^>]*>([^<]*)</td><td>([^<]*)</td>", table)
    assert [int(r[1]) for r in rows] == best.index[:3].tolist()
    for cls, feat, term in rows:
        padj = features.loc[features["term"] == term, "padj"].item()
        assert ("muted" in cls) == (padj > 0.1)
        assert features.loc[features["term"] == term, "feature"].item() == int(feat)
    assert "G0, G1, G2, G3, G4, G5, G6, G7, G8, G9, G10, G11 (+3 more)" in table
    n_sig = int((best <= 0.1).sum())
    assert f"{n_sig} of 8 annotated features have at least one term with padj &lt;= 0.1." in text


def test_feature_panels_follow_annotation_and_names(tmp_path):
    inputs = _inputs()
    names = [f"f{i}" for i in range(30)]
    features = inputs["features"].assign(feature=lambda d: "f" + d["feature"].astype(str))
    path = build_report(tmp_path / "r.html", umap=np.random.default_rng(1).normal(size=(150, 2)),
                        activations=inputs["activations"], features=features, feature_names=names,
                        n_feature_panels=2)
    page = _Page(path.read_text(encoding="utf-8"))
    assert "The best-annotated features, each titled with its top term." in page.visible
    # Without an annotation table the panels fall back to the most active features.
    path = build_report(tmp_path / "r2.html", umap=np.random.default_rng(1).normal(size=(150, 2)),
                        activations=inputs["activations"])
    assert "The features with the largest total activation (no annotation table was given)." in \
        _Page(path.read_text(encoding="utf-8")).visible
    with pytest.raises(ValueError, match="feature_names has 3 entries"):
        build_report(tmp_path / "r3.html", umap=np.zeros((150, 2)), activations=inputs["activations"],
                     features=features, feature_names=names[:3])


def test_sae_metrics_table_fills_in_from_activations(tmp_path):
    inputs = _inputs()
    acts = inputs["activations"].toarray()
    path = build_report(tmp_path / "r.html", sae_metrics={"fvu": 0.031, "frac_dead": np.array(0.2)},
                        activations=inputs["activations"])
    text = path.read_text(encoding="utf-8")
    section = text.split('id="sparse-autoencoder-quality"')[1].split("</section>")[0]
    cells = dict(re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td>", section))
    assert cells["fvu"] == "0.031"
    assert cells["dead fraction"] == "0.2"  # the given value wins over the one computed (5/30)
    assert cells["l0"] == format_value((acts > 0).sum(axis=1).mean())
    assert cells["n features"] == "30"
    page = _Page(build_report(tmp_path / "r2.html", activations=acts).read_text(encoding="utf-8"))
    assert any("FVU not shown" in n for n in page.notes)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(umap=np.zeros((10, 2)), clusters=np.zeros(11)), ValueError, "disagree on the number of cells"),
    (dict(features=pd.DataFrame({"feature": [1], "term": ["x"]})), ValueError, "padj"),
    (dict(features=[1, 2]), ValueError, "DataFrame"),
    (dict(steering={"feature": 1}), ValueError, "lfc"),
    (dict(steering={"lfc": pd.Series([1.0], index=["A"]), "enrichment": [1]}), ValueError, "enrichment"),
    (dict(alpha=1.5), ValueError, "alpha"),
    (dict(extra_sections=["not a section"]), ValueError, "extra_sections"),
    (dict(summary=[1, 2]), ValueError, "summary"),
    (dict(umap=np.full((5, 2), np.nan)), ValueError, "NaN"),
    (dict(history=pd.DataFrame({"epoch": [1]})), ValueError, "no loss columns"),
])
def test_bad_inputs_raise_clear_errors(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        build_report(tmp_path / "r.html", **kwargs)
    assert not (tmp_path / "r.html").exists()


def test_write_refuses_to_overwrite_when_asked_and_rejects_directories(tmp_path):
    path = build_report(tmp_path / "r.html")
    with pytest.raises(FileExistsError, match="overwrite"):
        build_report(path, overwrite=False)
    with pytest.raises(ValueError, match="is a directory"):
        build_report(tmp_path)


def test_report_and_section_api_for_custom_pages(tmp_path):
    fig = Figure(figsize=(3, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    extra = Section("Training", "Custom <intro>.")  # same title as a built-in section
    extra.add_figure(fig, caption="a line").add_table(pd.DataFrame({"a_b": [1, 2], "p": ["x", "<y>"]}))
    path = build_report(tmp_path / "r.html", extra_sections=[extra])
    text = path.read_text(encoding="utf-8")
    assert 'id="training"' in text and 'id="training-2"' in text  # anchors stay unique
    assert 'href="#training-2"' in text and "Custom &lt;intro&gt;." in text and "&lt;y&gt;" in text
    assert len(_Page(text).images()) == 1

    report = Report("Solo")
    report.add_section("One", "intro").add_note("n")
    assert "<h2>One</h2>" in report.to_html()


def test_table_html_and_format_value():
    df = pd.DataFrame({"name": ["<a>"], "count": [12345], "padj": [1.234e-7], "ratio": [0.123456],
                       "genes": [["A", "B"]]})
    html_text = table_html(df, row_classes=["muted"])
    assert '<tr class="muted"><td>&lt;a&gt;</td><td class="num">12,345</td>' in html_text
    assert "1.2e-07" in html_text and "0.123" in html_text and "A, B" in html_text
    assert format_value(np.nan) == "" and format_value(True) == "yes" and format_value(0.0004) == "4.00e-04"
    assert format_value(0.02, pvalue=True) == "0.02" and format_value(float("inf")) == "inf"
    with pytest.raises(ValueError, match="row_classes"):
        table_html(df, row_classes=["a", "b"])


def test_steer_result_and_term_descriptions_are_shown(tmp_path):
    """A dgdlens.steer.SteerResult is accepted as it is, and GO-style IDs are shown with their names."""
    from dgdlens.steer import SteerResult

    rng = np.random.default_rng(5)
    genes = pd.DataFrame({"gene": [f"G{g}" for g in range(40)], "log2fc": np.linspace(-2, 2, 40),
                          "padj": 0.01, "direction": "up"})
    features = pd.DataFrame({"feature": [0, 0, 1], "term": ["GO:0000001", "GO:0000002", "GO:0000003"],
                             "description": ["first process", "second process", "GO:0000003"],
                             "direction": "up", "pval": [1e-5, 1e-3, 1e-4], "padj": [1e-4, 1e-2, 1e-3]})
    n = 12
    result = SteerResult(feature=0, mode="clamp", value=2.5, cells=np.arange(n), z=rng.normal(size=(n, 3)),
                         z_steered=rng.normal(size=(n, 3)), activation=np.zeros(n),
                         activation_steered=np.full(n, 2.5),
                         expression=np.ones((n, 40)), expression_steered=np.ones((n, 40)), genes=genes,
                         enrichment=features.drop(columns="feature"))
    path = build_report(tmp_path / "r.html", features=features, steering=result)
    page = _Page(path.read_text(encoding="utf-8"))
    visible = page.visible
    assert "first process (GO:0000001)" in visible and "second process (GO:0000002)" in visible
    assert "GO:0000003 (" not in visible  # a description equal to the ID is not repeated
    assert "Feature 0 (top term: first process (GO:0000001)) was set (clamped) to 2.5 in 12 cells." in visible
    assert "The 15 most increased and 15 most decreased of 40 genes." in visible


def test_maps_show_a_sample_above_max_map_cells_and_say_so(tmp_path, monkeypatch):
    from dgdlens import tl

    rng = np.random.default_rng(0)
    latent = rng.normal(size=(300, 4))
    clusters = rng.integers(0, 3, 300)
    seen = []
    real_umap = tl.umap
    monkeypatch.setattr(tl, "umap", lambda x, **kw: seen.append(len(x)) or real_umap(x, **kw))
    page = build_report(tmp_path / "r.html", latent=latent, clusters=clusters, labels=clusters.astype(str),
                        activations=sp.random(300, 5, density=0.3, format="csr", random_state=0),
                        max_map_cells=100).read_text(encoding="utf-8")
    assert seen == [100]  # the UMAP itself ran on the sample only
    assert "sample of 100 of the 300 cells" in page
    whole = build_report(tmp_path / "w.html", latent=latent, clusters=clusters).read_text(encoding="utf-8")
    assert "sample of" not in whole and seen[-1] == 300
    with pytest.raises(ValueError, match="max_map_cells"):
        build_report(tmp_path / "x.html", latent=latent, max_map_cells=0)
