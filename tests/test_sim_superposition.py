"""The superposition simulation: generative story, per-seed saving, count noise, embedding, planted codes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from dgdlens.sim.superposition import (
    embed_superposition,
    load_superposition,
    planted_sparse_codes,
    reference_hidden_sizes,
    simulate_superposition,
    simulate_superposition_runs,
)


@pytest.fixture(scope="module")
def sim():
    return simulate_superposition(4000, n_programs=30, n_genes=300, n_cell_types=8, n_covariates=3, seed=1)


def test_every_level_follows_the_generative_story(sim):
    n, P, G = 4000, 30, 300
    assert sim.Y.shape == (n, G) and sim.X.shape == sim.X_cov.shape == sim.X_ct.shape == (n, P)
    assert sim.programs.shape == (P, G) and sim.cell_type_programs.shape == (8, P)
    # programs: Poisson with rate 1 + 0.1 i (mean and variance)
    np.testing.assert_allclose(sim.rates, 1 + 0.1 * np.arange(P), rtol=1e-6)
    assert np.all(sim.X == np.round(sim.X)) and sim.X.min() >= 0
    z_mean = (sim.X.mean(0) - sim.rates) / np.sqrt(sim.rates / n)
    assert np.abs(z_mean).max() < 4.5
    # covariate offset: one scalar per cell, N(b, 0.1)
    np.testing.assert_allclose(sim.X_cov - sim.X, np.repeat(sim.offset[:, None], P, 1), atol=1e-5)
    for b in range(3):
        off = sim.offset[sim.covariate == b]
        assert abs(off.mean() - b) < 0.01 and abs(off.std() - 0.1) < 0.01
    assert set(np.unique(sim.covariate)) == {0, 1, 2} and set(np.unique(sim.cell_type)) == set(range(8))
    # cell-type mask and genes
    np.testing.assert_array_equal(sim.X_ct, sim.X_cov * sim.cell_type_programs[sim.cell_type])
    np.testing.assert_allclose(sim.Y, sim.X_ct @ sim.programs.astype(np.float64), rtol=1e-5, atol=1e-4)
    assert abs(sim.programs.mean() - 0.1) < 0.02 and abs(sim.cell_type_programs.mean() - 0.3) < 0.1
    assert sim.counts is None
    truth = sim.ground_truth()
    assert set(truth["continuous"]) == {"X", "X'", "X''"} and set(truth["categorical"]) == {"cell type", "covariate"}


def test_one_covariate_has_no_offset_and_denser_masks():
    s = simulate_superposition(500, n_programs=20, n_genes=50, n_cell_types=10, n_covariates=1, seed=0)
    np.testing.assert_array_equal(s.X_cov, s.X)
    assert s.params["cell_type_program_density"] == 0.7
    assert "covariate" not in s.ground_truth()["categorical"]


def test_seeds_vary_cells_but_not_structure():
    kw = dict(n_programs=10, n_genes=40, n_cell_types=5)
    a, a2, b = (simulate_superposition(200, seed=s, **kw) for s in (0, 0, 1))
    np.testing.assert_array_equal(a.Y, a2.Y)
    assert not np.array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.programs, b.programs)
    np.testing.assert_array_equal(a.cell_type_programs, b.cell_type_programs)
    c = simulate_superposition(200, seed=0, structure_seed=5, **kw)
    assert not np.array_equal(a.programs, c.programs)


def test_runs_write_one_file_per_seed(tmp_path):
    """The reference saved every seed under the same name; each seed must get its own file and cells."""
    paths = simulate_superposition_runs([0, 1, 2], out_dir=tmp_path, n_cells=100, n_programs=10, n_genes=30,
                                        n_cell_types=4)
    assert len({p.name for p in paths}) == 3 and all(p.exists() for p in paths)
    loaded = [load_superposition(p) for p in paths]
    assert [d.params["seed"] for d in loaded] == [0, 1, 2]
    assert not np.array_equal(loaded[0].X, loaded[1].X) and not np.array_equal(loaded[1].X, loaded[2].X)
    fresh = simulate_superposition(100, n_programs=10, n_genes=30, n_cell_types=4, seed=2)
    for name in ("Y", "X", "X_cov", "X_ct", "cell_type", "covariate", "programs"):
        np.testing.assert_array_equal(getattr(loaded[2], name), getattr(fresh, name))
    with pytest.raises(FileExistsError):
        simulate_superposition_runs([0], out_dir=tmp_path, n_cells=100, n_programs=10, n_genes=30, n_cell_types=4)
    with pytest.raises(ValueError, match="distinct"):
        simulate_superposition_runs([1, 1])


def test_count_noise_knob():
    kw = dict(n_programs=10, n_genes=20, n_cell_types=3, seed=0)
    pois = simulate_superposition(3000, count_noise="poisson", library_scale=2.0, **kw)
    nb = simulate_superposition(3000, count_noise="nb", nb_dispersion=2.0, **kw)
    np.testing.assert_array_equal(pois.Y, nb.Y)  # the noise does not change the ground truth
    assert pois.counts.dtype.kind == "i" and pois.counts.min() >= 0
    mu = 2.0 * np.maximum(pois.Y, 0)
    resid = (pois.counts - mu) / np.sqrt(np.maximum(mu, 1e-9))
    ok = mu > 1
    assert abs(resid[ok].mean()) < 0.05 and abs(resid[ok].var() - 1) < 0.1  # Poisson: variance = mean
    mu1 = np.maximum(nb.Y, 0)
    excess = ((nb.counts - mu1) ** 2 - mu1)[mu1 > 1].mean() / (mu1[mu1 > 1] ** 2).mean()
    assert excess == pytest.approx(1 / 2.0, rel=0.15)  # NB: variance = mu + mu^2 / r
    adata = pois.to_anndata()
    np.testing.assert_array_equal(adata.X, pois.counts)
    np.testing.assert_array_equal(adata.layers["Y"], pois.Y)
    assert adata.obsm["X_programs_ct"].shape == (3000, 10) and adata.varm["programs"].shape == (20, 10)


def test_split_is_disjoint_and_seeded(sim):
    train, test = sim.split(0.25, seed=3)
    assert (train.n_cells, test.n_cells) == (3000, 1000)
    train2, _ = sim.split(0.25, seed=3)
    np.testing.assert_array_equal(train.Y, train2.Y)
    # the offset and the program activities identify a cell: the parts are disjoint and cover every cell

    def cells(d):
        return {(o, x.tobytes()) for o, x in zip(d.offset.tolist(), d.X)}

    assert len(cells(sim)) == 4000
    assert not cells(train) & cells(test)
    assert cells(train) | cells(test) == cells(sim)


def test_embedding_autoencoder_encodes_the_masked_programs(sim):
    train, test = sim.split(0.2, seed=0)
    emb = embed_superposition(train, n_latent=30, max_epochs=15, batch_size=128, patience=5, seed=0, num_threads=1)
    assert emb.latent.shape == (3200, 30)
    Z = emb.transform(test)
    assert Z.shape == (800, 30) and np.isfinite(Z).all()
    # the latent stores the masked programs X'': a linear read-out recovers most of their variance
    A = np.c_[emb.latent, np.ones(3200)]
    coef = np.linalg.lstsq(A, train.X_ct, rcond=None)[0]
    pred = np.c_[Z, np.ones(800)] @ coef
    r2 = 1 - ((pred - test.X_ct) ** 2).sum(0) / ((test.X_ct - test.X_ct.mean(0)) ** 2).sum(0)
    assert np.median(r2) > 0.5
    with pytest.raises(ValueError, match="genes"):
        emb.transform(np.zeros((3, 7)))


def test_reference_hidden_sizes():
    assert reference_hidden_sizes(20_000, 150, 2, "narrow") == [300]
    assert reference_hidden_sizes(20_000, 20, 4, "narrow") == [1000, 150, 150]
    assert reference_hidden_sizes(20_000, 150, 3, "wide") == [int(x) for x in np.linspace(150, 10_000, 4)[::-1][1:-1]]
    assert reference_hidden_sizes(100, 10, 1) == []


def test_planted_sparse_codes():
    d = planted_sparse_codes(n_samples=500, n_atoms=40, dim=10, k_active=3, offset_scale=1.0, max_coherence=0.9,
                             seed=0)
    assert d.X.shape == (500, 10) and d.codes.shape == (500, 40)
    np.testing.assert_array_equal((d.codes > 0).sum(1), 3)
    np.testing.assert_allclose(np.linalg.norm(d.atoms, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(d.X, d.codes @ d.atoms + d.offset, rtol=1e-5, atol=1e-5)
    assert stats.kstest(d.codes[d.codes > 0], stats.uniform(0.5, 1.0).cdf).pvalue > 1e-3


@pytest.mark.parametrize("call, message", [
    (lambda: simulate_superposition(0), "n_cells"),
    (lambda: simulate_superposition(10, n_genes=2.5), "n_genes"),
    (lambda: simulate_superposition(10, program_gene_density=1.5), "probability"),
    (lambda: simulate_superposition(10, count_noise="gauss"), "count_noise"),
    (lambda: simulate_superposition(10, offset_sd=-1), "offset_sd"),
    (lambda: planted_sparse_codes(k_active=100, n_atoms=10), "k_active"),
    (lambda: planted_sparse_codes(n_atoms=50, dim=2, max_coherence=0.01), "coherence"),
    (lambda: simulate_superposition(10, n_genes=5).split(1.5), "test_fraction"),
    (lambda: simulate_superposition(10, n_genes=5).to_anndata(use_counts=True), "count_noise"),
    (lambda: embed_superposition(np.ones((10, 5))), "constant"),
    (lambda: reference_hidden_sizes(100, 10, 2, "huge"), "width"),
])
def test_bad_simulation_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_load_rejects_other_files(tmp_path):
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a saved superposition"):
        load_superposition(tmp_path / "other.npz")
