"""Tests for dgdlens.plotting: what is drawn matches the data, computed helpers match direct formulas."""

from __future__ import annotations

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from matplotlib.collections import PathCollection
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from sklearn.metrics import adjusted_rand_score

from dgdlens import evaluate as ev
from dgdlens import plotting as pl
from dgdlens import tl
from dgdlens.plotting.embedding import _activation_columns
from dgdlens.sae import activations as sae_activations


@pytest.fixture(autouse=True)
def _no_pyplot_figures():
    """Library code must never register figures with pyplot (no global state, nothing to show)."""
    before = set(plt.get_fignums())
    yield
    assert set(plt.get_fignums()) == before


def _history(n_epochs=30, *, with_recon=True):
    epochs = np.arange(1, n_epochs + 1)
    df = pd.DataFrame({"epoch": epochs, "train_loss": 5000.0 / epochs + 100.0,
                       "val_loss": 5000.0 / epochs + 120.0 + 2.0 * np.clip(epochs - 20, 0, None) ** 2})
    if with_recon:
        df["train_recon"] = 3000.0 / epochs + 50.0
        df["val_recon"] = 3000.0 / epochs + 60.0
    return df


# ----------------------------------------------------------------------------------------- training

def test_training_curves_panels_best_epoch_and_log_scale():
    hist = _history()
    fig = pl.training_curves(hist)
    assert isinstance(fig, Figure)
    axes = fig.axes
    assert [a.get_title() for a in axes] == ["loss", "recon"]
    expected_best = int(hist["epoch"][hist["val_loss"].idxmin()])
    assert ev.find_best_epoch(hist) == expected_best
    for ax in axes:
        assert ax.get_yscale() == "log"  # values span more than a factor of 10
        curves = {line.get_label(): line for line in ax.get_lines()}
        assert set(curves) == {"training", "validation", f"best epoch ({expected_best})"}
        assert np.allclose(curves[f"best epoch ({expected_best})"].get_xdata(), expected_best)
    np.testing.assert_allclose(axes[0].get_lines()[0].get_ydata(), hist["train_loss"])


def test_training_curves_skips_missing_validation_and_linear_scale():
    hist = _history(with_recon=False)
    hist.loc[hist.index % 5 != 0, "val_loss"] = np.nan  # validation every 5th epoch only
    hist["train_loss"] = hist["train_loss"] * 0 + np.linspace(2.0, 1.5, len(hist))
    hist["val_loss"] = hist["val_loss"] * 0 + 1.8
    fig = pl.training_curves(hist, best_epoch=None)
    ax = fig.axes[0]
    assert ax.get_yscale() == "linear"
    val = next(line for line in ax.get_lines() if line.get_label() == "validation")
    np.testing.assert_array_equal(val.get_xdata(), hist["epoch"][hist.index % 5 == 0])


def test_training_curves_on_given_axes_and_dict_input():
    fig = Figure()
    ax = fig.add_subplot()
    out = pl.training_curves(_history().to_dict(orient="list"), ax=ax, log_scale=False)
    assert out is fig and len(fig.axes) == 1 and ax.get_yscale() == "linear"


def test_training_curves_accepts_a_list_of_epoch_dicts():
    """SAE histories are per-epoch dicts: the same plot and best epoch as the DataFrame."""
    hist = _history(with_recon=False)
    records = hist.to_dict(orient="records")
    assert ev.find_best_epoch(records) == ev.find_best_epoch(hist)
    fig = pl.training_curves(records)
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), hist["train_loss"])


@pytest.mark.parametrize("bad, message", [
    (pd.DataFrame({"epoch": [1, 2], "accuracy": [0.1, 0.2]}), "no loss columns"),
    (pd.DataFrame({"epoch": [], "train_loss": []}), "empty"),
    (pd.DataFrame({"train_loss": ["a", "b"]}), "numeric"),
    ([1, 2, 3], "DataFrame"),
])
def test_training_curves_rejects_bad_history(bad, message):
    with pytest.raises(ValueError, match=message):
        pl.training_curves(bad)


# ----------------------------------------------------------------------------------------- embedding

def test_embedding_categorical_colours_follow_categories():
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(60, 2))
    labels = np.array(["b", "a", "c"], dtype=object)[rng.integers(0, 3, 60)]
    labels[:4] = None
    fig = pl.embedding(coords, color=labels, title="labels")
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["a", "b", "c", "NA"]
    palette = pl._utils.categorical_palette(3)
    scatter = next(c for c in ax.collections if isinstance(c, PathCollection))
    drawn = scatter.get_offsets()
    colours = [to_hex(c) for c in scatter.get_facecolors()]
    # Every drawn point carries the colour of its own category (points are reordered for drawing).
    lookup = {tuple(np.round(p, 9)): lab for p, lab in zip(coords, labels)}
    for point, colour in zip(drawn, colours):
        lab = lookup[tuple(np.round(point, 9))]
        expected = pl._utils.MISSING_COLOR if lab is None else palette[["a", "b", "c"].index(lab)]
        assert colour == expected


def test_embedding_continuous_draws_high_values_last_with_colorbar():
    rng = np.random.default_rng(1)
    coords = rng.normal(size=(50, 2))
    values = rng.random(50)
    fig = pl.embedding(coords, color=values)
    scatter = next(c for c in fig.axes[0].collections if isinstance(c, PathCollection))
    np.testing.assert_allclose(scatter.get_array(), np.sort(values))
    assert len(fig.axes) == 2  # the plot and its colour bar


def test_embedding_reads_anndata():
    rng = np.random.default_rng(2)
    adata = ad.AnnData(np.zeros((30, 3), dtype=np.float32))
    adata.obsm["X_umap"] = rng.normal(size=(30, 2))
    adata.obs["cell_type"] = pd.Categorical(rng.choice(["x", "y"], 30), categories=["y", "x"])
    fig = pl.embedding(adata, color="cell_type")
    assert fig.axes[0].get_title() == "cell_type"
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["y", "x"]  # categorical order kept
    with pytest.raises(ValueError, match="not a column"):
        pl.embedding(adata, color="missing")
    with pytest.raises(ValueError, match="obsm has no"):
        pl.embedding(adata, basis="X_tsne")


@pytest.mark.parametrize("coords, color, message", [
    (np.zeros((5, 3)), None, r"shape \(n_cells, 2\)"),
    (np.array([[0.0, 1.0], [np.nan, 1.0]]), None, "NaN"),
    (np.zeros((5, 2)), np.arange(4), "4 values but there are 5 cells"),
])
def test_embedding_rejects_bad_input(coords, color, message):
    with pytest.raises(ValueError, match=message):
        pl.embedding(coords, color=color)


def test_tl_umap_is_seeded_and_keeps_planted_groups_apart():
    rng = np.random.default_rng(3)
    groups = np.repeat([0, 1, 2], 60)
    latent = rng.normal(0, 10, (3, 8))[groups] + rng.normal(size=(180, 8))
    first = tl.umap(latent, seed=7)
    again = tl.umap(latent, seed=7)
    assert first.shape == (180, 2)
    np.testing.assert_array_equal(first, again)
    # Each cell's nearest UMAP neighbour belongs to the same planted group.
    d = np.linalg.norm(first[:, None] - first[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    assert (groups[d.argmin(axis=1)] == groups).mean() > 0.98
    with pytest.raises(ValueError, match="NaN"):
        tl.umap(np.full((10, 3), np.nan))


def test_feature_activations_only_densifies_requested_columns():
    rng = np.random.default_rng(4)
    coords = rng.normal(size=(40, 2))
    acts = sp.random(40, 500, density=0.05, random_state=4, format="csr")
    fig = pl.feature_activations(coords, acts, [3, 10, 499], titles=["a", "b", "c"], ncols=2)
    visible = [a for a in fig.axes if a.get_visible() and a.get_title()]
    assert [a.get_title() for a in visible] == ["a", "b", "c"]
    np.testing.assert_allclose(_activation_columns(acts, [10, 3]), acts[:, [10, 3]].toarray())
    with pytest.raises(ValueError, match="out of range"):
        pl.feature_activations(coords, acts, [500])
    with pytest.raises(ValueError, match="rows but coords"):
        pl.feature_activations(coords[:10], acts, [0])


def test_plots_read_anndata_keys():
    """pl reads what tl wrote: coordinates from obsm[basis], activations from an obsm key, steering from uns."""
    rng = np.random.default_rng(9)
    adata = ad.AnnData(np.zeros((40, 3), dtype=np.float32))
    adata.obsm["X_umap"] = rng.normal(size=(40, 2))
    adata.obsm["X_sae"] = sp.random(40, 30, density=0.1, random_state=9, format="csr")
    fig = pl.feature_activations(adata, "X_sae", [2, 5])
    direct = pl.feature_activations(adata.obsm["X_umap"], adata.obsm["X_sae"], [2, 5])
    for got, want in zip(fig.axes, direct.axes):
        assert len(got.collections) == len(want.collections)
        for g, w in zip(got.collections, want.collections):
            np.testing.assert_allclose(g.get_offsets(), w.get_offsets())
            if w.get_array() is not None:
                np.testing.assert_allclose(g.get_array(), w.get_array())
    freq = pl.activation_frequency(adata)
    assert freq.axes[0].get_title() == pl.activation_frequency(adata.obsm["X_sae"]).axes[0].get_title()
    with pytest.raises(ValueError, match="obsm has no 'X_other'"):
        pl.activation_frequency(adata, basis="X_other")
    genes = pd.DataFrame({"gene": ["A", "B", "C"], "log2fc": [1.0, -2.0, 0.5]})
    adata.uns["dgdlens_steer"] = {"genes": genes}
    labels = [t.get_text() for t in pl.steering_lfc(adata).axes[0].get_yticklabels()]
    assert labels == [t.get_text() for t in pl.steering_lfc(genes).axes[0].get_yticklabels()]
    with pytest.raises(ValueError, match="dl.tl.steer"):
        pl.steering_lfc(adata, key="missing")


# ----------------------------------------------------------------------------------------- clusters

def test_contingency_table_matches_crosstab_and_normalises_rows():
    rng = np.random.default_rng(5)
    clusters = rng.integers(0, 4, 200)
    labels = rng.choice(["T", "B", "NK"], 200).astype(object)
    labels[:7] = np.nan
    keep = ~pd.isna(labels)
    expected = pd.crosstab(clusters[keep], labels[keep].astype(str))
    table = ev.contingency_table(clusters, labels)
    np.testing.assert_array_equal(table.to_numpy(), expected.to_numpy())
    assert list(table.columns) == list(expected.columns) and list(table.index) == list(expected.index)
    rows = ev.contingency_table(clusters, labels, normalize="rows")
    np.testing.assert_allclose(rows.sum(axis=1), 1.0)


def test_cluster_agreement_known_values():
    labels = np.repeat(["a", "b", "c"], 50)
    renamed = np.repeat([7, 3, 5], 50)  # same partition, other names
    perfect = ev.cluster_agreement(renamed, labels)
    assert perfect["ari"] == pytest.approx(1.0) and perfect["nmi"] == pytest.approx(1.0)
    assert perfect["n_cells"] == 150
    # By hand, table [[2, 0], [1, 2]] (n = 5): index = sum C(n_ij, 2) = 2; rows C(2,2)+C(3,2) = 4;
    # columns C(3,2)+C(2,2) = 4; expected = 4*4/C(5,2) = 1.6; max = 4 -> ARI = 0.4 / 2.4 = 1/6.
    small = ev.cluster_agreement([0, 0, 1, 1, 1], ["x", "x", "x", "y", "y"])
    assert small["ari"] == pytest.approx(1 / 6)
    rng = np.random.default_rng(6)
    noise = ev.cluster_agreement(rng.integers(0, 5, 3000), rng.integers(0, 5, 3000))
    assert abs(noise["ari"]) < 0.02 and noise["nmi"] < 0.02


def test_contingency_heatmap_annotates_counts_and_orders_diagonal():
    clusters = np.array([2] * 30 + [0] * 20 + [1] * 10 + [1] * 2)
    labels = np.array(["A"] * 30 + ["B"] * 20 + ["C"] * 10 + ["A"] * 2)
    fig = pl.contingency_heatmap(clusters, labels)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["2", "0", "1"]  # dominant label A, B, C
    texts = sorted(int(t.get_text()) for t in ax.texts)
    assert texts == sorted([30, 20, 10, 2])
    ari = adjusted_rand_score(labels, clusters)
    assert ax.get_title() == f"ARI {ari:.2f}, NMI {ev.cluster_agreement(clusters, labels)['nmi']:.2f}"


def test_contingency_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="3 values but there are 4 cells"):
        ev.contingency_table([0, 1, 1, 0], ["a", "b", "c"])


# ----------------------------------------------------------------------------------------- SAE

def test_firing_rates_and_summary_match_numpy_for_dense_and_sparse():
    rng = np.random.default_rng(7)
    dense = np.where(rng.random((300, 50)) < 0.08, rng.gamma(2.0, 1.0, (300, 50)), 0.0)
    dense[:, :4] = 0.0  # dead
    dense[:, 4] = 1.0  # dense
    expected_rates = (dense > 0.5).mean(axis=0)
    for form in (dense, sp.csr_matrix(dense), sp.coo_matrix(dense)):
        np.testing.assert_allclose(sae_activations.firing_rates(form, threshold=0.5, chunk_size=37), expected_rates)
    summary = sae_activations.activation_summary(sp.csc_matrix(dense))
    assert summary["l0"] == pytest.approx((dense > 0).sum(axis=1).mean())
    assert summary["dead_fraction"] == pytest.approx(4 / 50)
    assert summary["dense_fraction"] == pytest.approx(((dense > 0).mean(axis=0) > 0.1).mean())
    assert sae_activations.activation_summary(dense, chunk_size=11) == summary
    with pytest.raises(ValueError, match="threshold"):
        sae_activations.firing_rates(dense, threshold=-1.0)
    with pytest.raises(ValueError, match="2-D"):
        sae_activations.firing_rates(np.zeros(5))


def test_activation_frequency_reports_dead_features():
    acts = np.zeros((100, 20))
    acts[:10, :15] = 1.0
    fig = pl.activation_frequency(acts)
    assert fig.axes[0].get_title() == "20 features; dead (never active): 5 (25.0%)"
    fig2 = pl.activation_frequency(rates=np.zeros(3), n_cells=10)
    assert "no feature is ever active" in [t.get_text() for t in fig2.axes[0].texts]
    with pytest.raises(ValueError, match="exactly one"):
        pl.activation_frequency()


# ----------------------------------------------------------------------------------------- steering

def test_steering_lfc_shows_the_extreme_genes_in_order():
    rng = np.random.default_rng(8)
    genes = [f"G{i}" for i in range(200)]
    lfc = pd.Series(rng.normal(size=200), index=genes)
    lfc.iloc[5] = np.nan  # dropped, not plotted
    fig = pl.steering_lfc(lfc, n_up=4, n_down=3)
    ax = fig.axes[0]
    ticks = sorted(zip(ax.get_yticks(), (t.get_text() for t in ax.get_yticklabels())))
    labels = [name for _, name in ticks]
    clean = lfc.dropna()
    top_up = clean.sort_values(ascending=False).index[:4].tolist()
    top_down = clean.sort_values().index[:3].tolist()
    # Tick labels run bottom to top: strongest decrease first, strongest increase last.
    assert labels == top_down + top_up[::-1]
    bars = [p.get_width() for p in fig.axes[0].patches]
    np.testing.assert_allclose(sorted(bars), sorted(clean[top_up + top_down]))


def test_as_lfc_series_accepts_tables_and_rejects_junk():
    df = pd.DataFrame({"gene": ["A", "B"], "log2fc": [1.0, -2.0]})
    pd.testing.assert_series_equal(ev.as_lfc_series(df), pd.Series([1.0, -2.0], index=["A", "B"]),
                                   check_names=False)
    with pytest.raises(ValueError, match="one of the columns"):
        ev.as_lfc_series(pd.DataFrame({"x": [1.0]}))
    with pytest.raises(ValueError, match="numbers"):
        ev.as_lfc_series(pd.Series(["up"], index=["A"]))
    with pytest.raises(ValueError, match="Series"):
        ev.as_lfc_series([1.0, 2.0])
