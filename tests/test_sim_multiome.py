"""The multiome simulator: its counts, its ground truth, and the design that each modality alone sees only
part of the cell types while both together see all of them."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.sparse as sp

from dgdlens.sim import simulate_multiome
from dgdlens.sim.multiome import _atac_counts, _pick

pytest.importorskip("mudata")  # the simulator returns a MuData (imported lazily by dgdlens.sim.multiome)

# The sizes of the design check (small enough for seconds, large enough for stable clusters).
SIZES = {"n_cells": 1500, "n_genes": 500, "n_peaks": 4000}


@pytest.fixture(scope="module")
def mdata():
    return simulate_multiome(**SIZES, seed=0)


def _log_norm(x) -> np.ndarray:
    """Dense log1p(counts / library * 1e4)."""
    x = sp.csr_matrix(x, dtype=np.float64)
    y = sp.diags(1e4 / np.asarray(x.sum(1)).ravel()) @ x
    y.data = np.log1p(y.data)
    return y.toarray()


def _pcs(x, n: int = 20) -> np.ndarray:
    """The first ``n`` PCs of the log-normalised counts, scaled to unit total variance so that two
    modalities weigh alike when concatenated."""
    from sklearn.decomposition import PCA

    z = PCA(n, random_state=0).fit_transform(_log_norm(x))
    return z / np.sqrt(z.var(0).sum())


def _kmeans_ari(z: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    k = len(np.unique(labels))
    return adjusted_rand_score(labels, KMeans(k, n_init=10, random_state=0).fit_predict(z))


def _type_means(x, types: np.ndarray) -> np.ndarray:
    """Types x features: the mean log-normalised value per cell type."""
    y = _log_norm(x)
    return np.stack([y[types == t].mean(0) for t in np.unique(types)])


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0) + 1e-300)


# --------------------------------------------------------------------------- structure and counts

def test_shapes_columns_and_dtypes(mdata):
    import mudata as md

    assert isinstance(mdata, md.MuData)
    rna, atac = mdata.mod["rna"], mdata.mod["atac"]
    assert rna.shape == (1500, 500) and atac.shape == (1500, 4000) and mdata.n_obs == 1500
    assert list(rna.var_names[:2]) == ["gene0", "gene1"]
    assert atac.var_names.is_unique and all(re.fullmatch(r"chr\d+:\d+-\d+", p) for p in atac.var_names)
    assert (atac.var["end"] > atac.var["start"]).all()
    for x in (rna.X, atac.X):
        assert sp.isspmatrix_csr(x) and x.dtype == np.float32 and x.has_canonical_format
        assert np.all(x.data == np.round(x.data)) and x.data.min() > 0  # integer, positive where stored
        assert np.asarray(x.sum(1)).min() > 0  # no empty cell
    assert {"program"} <= set(rna.var.columns)
    assert {"linked_gene", "program"} <= set(atac.var.columns)
    for obs in (mdata.obs, rna.obs, atac.obs):
        for key in ("cell_type", "rna_group", "atac_group", "batch"):
            assert obs[key].dtype == "category", key
    assert list(mdata.obs["cell_type"].cat.categories) == [f"T{t}" for t in range(6)]
    assert list(mdata.obs["batch"].cat.categories) == ["b0"]
    # the type is the (rna group, atac group) pair, the same in every obs
    types = mdata.obs["cell_type"].cat.codes.to_numpy()
    r = mdata.obs["rna_group"].cat.codes.to_numpy()
    a = mdata.obs["atac_group"].cat.codes.to_numpy()
    np.testing.assert_array_equal(types, r * 2 + a)
    np.testing.assert_array_equal(rna.obs["cell_type"].to_numpy(), mdata.obs["cell_type"].to_numpy())
    np.testing.assert_array_equal(atac.obs["cell_type"].to_numpy(), mdata.obs["cell_type"].to_numpy())
    assert np.bincount(types).tolist() == [250] * 6


def test_atac_density_and_count_values(mdata):
    x = mdata.mod["atac"].X
    density = x.nnz / np.prod(x.shape)
    assert 0.7 * 0.03 <= density <= 1.3 * 0.03
    assert abs(density / 0.03 - 1) < 0.1  # calibrated, not just within the tolerance
    # fragments-in-peaks: mostly ones, some twos, few more
    assert np.mean(x.data == 1) > 0.8 and np.mean(x.data <= 2) > 0.97
    for target in (0.01, 0.08):
        y = simulate_multiome(300, 200, 2000, peak_density=target, seed=1).mod["atac"].X
        assert 0.7 * target <= y.nnz / np.prod(y.shape) <= 1.3 * target


def test_truth_programs_and_links_agree_with_var(mdata):
    truth = mdata.uns["truth"]
    rna_var, atac_var = mdata.mod["rna"].var, mdata.mod["atac"].var
    programs_rna, programs_atac = truth["programs_rna"], truth["programs_atac"]
    assert sorted(programs_rna) == ["r0", "r1", "r2"] and sorted(programs_atac) == ["a0", "a1"]
    for group, genes in programs_rna.items():
        assert len(genes) == 40 and (rna_var.loc[list(genes), "program"] == group).all()
    for group, peaks in programs_atac.items():
        assert len(peaks) == 120 and (atac_var.loc[list(peaks), "program"] == group).all()
    assert (rna_var["program"] != "").sum() == 120
    links = truth["peak_gene_links"]
    peaks, genes = list(links["peak"]), list(links["gene"])
    settings = truth["settings"]
    assert len(peaks) == settings["n_linked_peaks"] == 3 * settings["n_linked_genes"] > 0
    assert len(set(peaks)) == len(peaks)
    np.testing.assert_array_equal(atac_var.loc[peaks, "linked_gene"].to_numpy(), np.asarray(genes))
    assert (atac_var["linked_gene"] != "").sum() == len(peaks)
    assert set(genes) <= set(rna_var.index)
    # every linked gene here is a marker gene, and its peaks carry its program
    np.testing.assert_array_equal(atac_var.loc[peaks, "program"].to_numpy(),
                                  rna_var.loc[genes, "program"].to_numpy())
    assert (rna_var.loc[genes, "program"] != "").all()
    # the three programs share the linked genes equally
    counts = rna_var.loc[sorted(set(genes)), "program"].value_counts()
    assert counts.max() - counts.min() <= 1
    # linked, marker and background peaks are disjoint
    marker_peaks = {p for ps in programs_atac.values() for p in ps}
    assert not marker_peaks & set(peaks)


def test_more_links_than_marker_genes_fall_back_to_other_genes():
    m = simulate_multiome(300, 500, 4000, linked_fraction=0.2, seed=0)
    s = m.uns["truth"]["settings"]
    assert s["n_linked_genes"] == round(0.2 * 4000 / 3) and s["n_linked_marker_genes"] == 120
    rna_var, atac_var = m.mod["rna"].var, m.mod["atac"].var
    genes = np.asarray(m.uns["truth"]["peak_gene_links"]["gene"])
    assert set(rna_var.index[rna_var["program"] != ""]) <= set(genes)  # all markers linked
    linked = atac_var[atac_var["linked_gene"] != ""]
    background = linked[rna_var.loc[linked["linked_gene"], "program"].to_numpy() == ""]
    assert len(background) == 3 * (s["n_linked_genes"] - 120) and (background["program"] == "").all()


def test_linked_peaks_follow_their_genes_across_types(mdata):
    """Per cell type, a linked peak's accessibility goes with its gene's expression; random pairs don't."""
    types = mdata.obs["cell_type"].cat.codes.to_numpy()
    rna_means = _type_means(mdata.mod["rna"].X, types)
    atac_means = _type_means(mdata.mod["atac"].X, types)
    links = mdata.uns["truth"]["peak_gene_links"]
    p = mdata.mod["atac"].var_names.get_indexer(list(links["peak"]))
    g = mdata.mod["rna"].var_names.get_indexer(list(links["gene"]))
    r_linked = _row_pearson(atac_means[:, p], rna_means[:, g])
    rng = np.random.default_rng(0)
    unlinked = np.flatnonzero(mdata.mod["atac"].var["linked_gene"].to_numpy() == "")
    r_random = _row_pearson(atac_means[:, rng.choice(unlinked, 2000)],
                            rna_means[:, rng.integers(0, 500, 2000)])
    assert r_linked.mean() > 0.6 and abs(r_random.mean()) < 0.15
    assert r_linked.mean() > r_random.mean() + 0.5


def test_each_modality_sees_its_own_groups(mdata):
    """RNA markers separate rna groups only; ATAC marker peaks separate atac groups only."""
    obs = mdata.obs
    truth = mdata.uns["truth"]
    rna_var = mdata.mod["rna"].var
    y = _log_norm(mdata.mod["rna"].X)
    r, a = obs["rna_group"].cat.codes.to_numpy(), obs["atac_group"].cat.codes.to_numpy()
    g0 = rna_var.index.get_indexer(list(truth["programs_rna"]["r0"]))
    score = y[:, g0].mean(1)
    assert score[r == 0].mean() > score[r != 0].mean() + 1.0
    assert abs(score[(r == 0) & (a == 0)].mean() - score[(r == 0) & (a == 1)].mean()) < 0.1
    z = _log_norm(mdata.mod["atac"].X)
    p0 = mdata.mod["atac"].var_names.get_indexer(list(truth["programs_atac"]["a0"]))
    score = z[:, p0].sum(1)
    assert score[a == 0].mean() > 2 * score[a == 1].mean()
    by_rna = [score[(a == 0) & (r == k)].mean() for k in range(3)]
    assert max(by_rna) < 1.2 * min(by_rna)


# --------------------------------------------------------------------------- the design check

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_joint_modalities_separate_types_that_each_alone_cannot(seed, mdata):
    from threadpoolctl import threadpool_limits

    m = mdata if seed == 0 else simulate_multiome(**SIZES, seed=seed)
    labels = m.obs["cell_type"].cat.codes.to_numpy()
    with threadpool_limits(1):  # small problems: threads only fight over the shared cores
        z_rna, z_atac = _pcs(m.mod["rna"].X), _pcs(m.mod["atac"].X)
        ari_rna, ari_atac = _kmeans_ari(z_rna, labels), _kmeans_ari(z_atac, labels)
        ari_joint = _kmeans_ari(np.hstack([z_rna, z_atac]), labels)
    assert ari_rna <= 0.7 and ari_atac <= 0.7, (ari_rna, ari_atac)
    assert ari_joint >= 0.85, ari_joint
    assert ari_joint >= max(ari_rna, ari_atac) + 0.25


# --------------------------------------------------------------------------- batches, determinism, I/O

def test_batches_spread_evenly_and_shift_both_modalities():
    m = simulate_multiome(601, 200, 1500, n_batches=3, batch_effect_sd=0.5, seed=0)
    batches = m.obs["batch"]
    assert list(batches.cat.categories) == ["b0", "b1", "b2"]
    sizes = batches.value_counts().to_numpy()
    assert sizes.max() - sizes.min() <= 1
    # every type in every batch
    assert (m.obs.groupby(["batch", "cell_type"], observed=False).size() > 0).all()
    truth = m.uns["truth"]
    assert truth["gene_shift"].shape == (3, 200) and truth["peak_shift"].shape == (3, 1500)
    assert 0.4 < truth["gene_shift"].std() < 0.6 and 0.4 < truth["peak_shift"].std() < 0.6
    one = simulate_multiome(300, 200, 1500, seed=0).uns["truth"]
    assert not one["gene_shift"].any() and not one["peak_shift"].any()


def test_same_seed_same_data_other_seed_other_data():
    kw = {"n_cells": 200, "n_genes": 200, "n_peaks": 1500}
    a, b = simulate_multiome(**kw, seed=3), simulate_multiome(**kw, seed=3)
    c = simulate_multiome(**kw, seed=4)
    for mod in ("rna", "atac"):
        assert (a.mod[mod].X != b.mod[mod].X).nnz == 0
        assert list(a.mod[mod].var_names) == list(b.mod[mod].var_names)
        assert (a.mod[mod].X != c.mod[mod].X).nnz > 0
    assert a.obs.equals(b.obs)
    assert a.uns["truth"]["peak_gene_links"] == b.uns["truth"]["peak_gene_links"]
    assert a.uns["truth"]["peak_gene_links"] != c.uns["truth"]["peak_gene_links"]
    # chunking: RNA identical, ATAC the same distribution (other draws)
    d = simulate_multiome(**kw, seed=3, chunk_cells=37)
    assert (a.mod["rna"].X != d.mod["rna"].X).nnz == 0
    assert abs(d.mod["atac"].X.sum() / a.mod["atac"].X.sum() - 1) < 0.02


def test_writes_and_reads_back_as_h5mu(tmp_path, mdata):
    import mudata as md

    small = simulate_multiome(100, 150, 1000, n_batches=2, seed=0)
    path = tmp_path / "multiome.h5mu"
    small.write(path)
    back = md.read_h5mu(path)
    for mod in ("rna", "atac"):
        assert (back.mod[mod].X != small.mod[mod].X).nnz == 0
    assert list(back.obs["cell_type"]) == list(small.obs["cell_type"])
    truth = back.uns["truth"]
    assert list(truth["peak_gene_links"]["peak"]) == list(small.uns["truth"]["peak_gene_links"]["peak"])
    assert list(truth["programs_rna"]["r1"]) == list(small.uns["truth"]["programs_rna"]["r1"])
    assert truth["settings"]["n_batches"] == 2
    np.testing.assert_allclose(truth["peak_shift"], small.uns["truth"]["peak_shift"])


def test_sparse_cells_are_never_empty():
    m = simulate_multiome(200, 60, 40, markers_per_group=2, peaks_per_gene=3, linked_fraction=0.1,
                          peak_density=0.01, seed=0)
    x = m.mod["atac"].X
    assert np.asarray(x.sum(1)).min() >= 1 and x.has_canonical_format


# --------------------------------------------------------------------------- the samplers

def test_pick_is_the_inverse_cdf():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 300):
        w = rng.lognormal(0.0, 2.0, n)
        w[rng.random(n) < 0.2] = 0.0  # empty categories are never picked
        if w.sum() == 0:
            w[0] = 1.0
        cum = np.cumsum(w) / w.sum()
        cum[-1] = 1.0
        u = rng.random(5000)
        np.testing.assert_array_equal(_pick(cum, u), np.minimum(np.searchsorted(cum, u, side="right"), n - 1))


def test_atac_sampler_is_poisson_with_the_given_means():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.full(300, 0.5), size=2)
    combo = rng.integers(0, 2, 3000)
    expected = rng.lognormal(np.log(40.0), 0.5, 3000)
    x = _atac_counts(probs, combo, expected, 250, np.random.default_rng(2), capacity=1000).toarray()
    # per cell: Poisson totals; per (combination, peak): Poisson sums over the cells
    z_cells = (x.sum(1) - expected) / np.sqrt(expected)
    assert abs(z_cells.mean()) < 0.1 and 0.85 < z_cells.var() < 1.15
    for k in range(2):
        mean = expected[combo == k].sum() * probs[k]
        z = (x[combo == k].sum(0) - mean) / np.sqrt(mean)
        assert 0.8 < np.mean(z**2) < 1.2
    # independent Poisson per entry: a peak's counts over equal-depth cells have variance = mean
    big = np.argmax(probs[0])
    mean = expected[combo == 0] * probs[0, big]
    assert np.mean((x[combo == 0, big] - mean) ** 2 / mean) == pytest.approx(1.0, abs=0.15)


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_cells": 5}, "fewer than the 6 cell types"),
    ({"peak_density": 0.0}, "peak_density"),
    ({"peak_density": 1.0}, "peak_density"),
    ({"linked_fraction": 1.5}, "linked_fraction"),
    ({"linked_fraction": 0.9}, "more than n_genes"),
    ({"n_peaks": 300, "linked_fraction": 0.5}, "more than n_peaks"),
    ({"markers_per_group": 200}, "marker genes need"),
    ({"n_genes": 0}, "n_genes must be a positive integer"),
    ({"n_cells": 10.5}, "n_cells must be a positive integer"),
    ({"chunk_cells": 0}, "chunk_cells"),
    ({"n_batches": 0}, "n_batches"),
    ({"rna_dispersion": 0.0}, "rna_dispersion"),
    ({"mean_rna_library": -1.0}, "mean_rna_library"),
    ({"type_effect": float("nan")}, "type_effect"),
    ({"batch_effect_sd": -0.1}, "batch_effect_sd"),
])
def test_bad_arguments_raise(kwargs, match):
    args = {"n_cells": 100, "n_genes": 500, "n_peaks": 4000} | kwargs
    with pytest.raises(ValueError, match=match):
        simulate_multiome(**args)
