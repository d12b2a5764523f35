"""Quality and recovery metrics against direct numpy / scipy computations."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from dgdlens import sae as S
from dgdlens.sim.superposition import simulate_superposition


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(700, 10)) @ rng.normal(size=(10, 10)) + 2).astype(np.float32)


@pytest.fixture(scope="module")
def relu_sae(data):
    return S.train_sae(data, kind="relu", n_latents=40, l1_coef=0.5, max_epochs=3, seed=0, device="cpu",
                       progress=False, num_threads=1, dense_threshold=0.3)


def test_metrics_match_numpy(relu_sae, data):
    got = S.metrics(relu_sae, data, batch_size=97)
    F = relu_sae.encode(data).toarray().astype(np.float64)
    W = relu_sae.W_dec.detach().double().numpy()
    b = relu_sae.b_dec.detach().double().numpy()
    X = data.astype(np.float64)
    X_hat = F @ W + b
    err = ((X - X_hat) ** 2).sum()
    fvu = err / ((X - X.mean(0)) ** 2).sum()
    cos = (X * X_hat).sum(1) / np.linalg.norm(X, axis=1) / np.linalg.norm(X_hat, axis=1)
    rate = (F > 0).mean(0)
    assert got["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert got["explained_variance"] == pytest.approx(1 - fvu, rel=1e-4)
    assert got["mse"] == pytest.approx(err / X.size, rel=1e-4)
    assert got["cosine"] == pytest.approx(cos.mean(), rel=1e-5)
    assert got["l0"] == pytest.approx((F > 0).sum(1).mean())
    assert got["dead_fraction"] == pytest.approx((rate == 0).mean())
    assert got["dense_fraction"] == pytest.approx((rate > 0.3).mean())
    assert got["n_live"] == int((rate > 0).sum()) and got["n_cells"] == 700


def _activations(seed=0, n=400, m=30):
    rng = np.random.default_rng(seed)
    A = rng.exponential(size=(n, m)) * (rng.random((n, m)) < 0.2)
    A[:, 3] = 0.0  # dead
    A[:, 5] = 1.5  # constant
    return A


def test_correlation_matrix_matches_corrcoef():
    A = _activations()
    rng = np.random.default_rng(1)
    V = np.c_[A[:, :4] @ rng.normal(size=(4, 5)) + rng.normal(size=(400, 5)), np.full(400, 2.0)]
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.corrcoef(A.T, V.T)[:30, 30:]
    expected[~np.isfinite(expected)] = 0.0  # constant columns have no correlation
    for act in (A, sp.csr_matrix(A), sp.csc_matrix(A)):
        np.testing.assert_allclose(S.correlation_matrix(act, V, chunk_size=7), expected, atol=1e-10)


def test_recovery_best_and_hungarian_against_brute_force():
    rng = np.random.default_rng(2)
    n = 300
    V = rng.normal(size=(n, 4))
    # features 0 and 1 both track variable 0 best; feature 1 tracks variable 1 nearly as well
    A = np.maximum(np.c_[V[:, 0], 0.9 * V[:, 0] + 0.45 * V[:, 1], V[:, 2] + 0.3 * rng.normal(size=n),
                         rng.normal(size=n), V[:, 3] + rng.normal(size=n), np.zeros(n)] + 3, 0)
    res = S.recovery(sp.csr_matrix(A), V, threshold=0.9, names=list("abcd"), keep_matrix=True)
    R = np.corrcoef(A[:, :5].T, V.T)[:5, 5:]
    absR = np.abs(R)
    np.testing.assert_array_equal(res.live, np.arange(5))  # the all-zero feature is dead
    np.testing.assert_allclose(res.per_variable["best_abs_r"], absR.max(0), atol=1e-10)
    np.testing.assert_array_equal(res.per_variable["best_feature"], absR.argmax(0))
    best_total, best_perm = -1.0, None
    for perm in itertools.permutations(range(5), 4):  # brute-force one-to-one matching
        total = absR[list(perm), range(4)].sum()
        if total > best_total:
            best_total, best_perm = total, perm
    np.testing.assert_array_equal(res.per_variable["matched_feature"], best_perm)
    assert res.per_variable["matched_abs_r"].sum() == pytest.approx(best_total)
    assert res.summary["fraction_recovered"] == pytest.approx((absR.max(0) >= 0.9).mean())
    assert res.summary["fraction_recovered_matched"] <= res.summary["fraction_recovered"]


def test_match_features_candidate_reduction_is_exact():
    rng = np.random.default_rng(3)
    from scipy.optimize import linear_sum_assignment

    for _ in range(20):
        M = rng.random((60, 6)) ** 3
        rows, cols = linear_sum_assignment(M, maximize=True)
        feature, score = S.match_features(M)
        assert score.sum() == pytest.approx(M[rows, cols].sum())
        assert len(set(feature.tolist())) == 6


def test_categorical_auroc_matches_mann_whitney():
    A = _activations(seed=4, n=200, m=8)
    labels = np.random.default_rng(5).choice(["a", "b", "c"], size=200)
    A[labels == "b", 0] += 2.0
    table, M = S.categorical_auroc(sp.csr_matrix(A), labels, chunk_size=3, return_matrix=True)
    for j in range(8):
        for c, cls in enumerate(["a", "b", "c"]):
            pos, neg = A[labels == cls, j], A[labels != cls, j]
            u = stats.mannwhitneyu(pos, neg).statistic
            assert M[j, c] == pytest.approx(u / (len(pos) * len(neg)))
    assert table.set_index("class").loc["b", "best_feature"] == 0
    assert table.set_index("class").loc["b", "best_auroc"] > 0.9


def test_structure_identification_finds_true_programs():
    sim = simulate_superposition(1500, n_programs=12, n_genes=400, n_cell_types=20, seed=0)
    used = sim.cell_type_programs.any(0)
    assert used.all()  # every program is active in some cell type, so each can be found
    # features that are exactly the masked program activities link to their programs' genes
    table, summary = S.structure_identification(sp.csr_matrix(np.maximum(sim.X_ct, 0)), sim.Y, sim.programs,
                                                percentile=90, scope="feature")
    assert summary["n_programs_identified"] >= 11
    ident = table[table["identified"]]
    assert (ident["feature"].to_numpy() == ident["program"].to_numpy()).mean() >= 0.9
    _, cos = S.structure_identification(np.maximum(sim.X_ct, 0), sim.Y, sim.programs, score="cosine", min_score=0)
    assert cos["n_programs_identified"] >= 11  # the reference's link score finds them too
    # random features identify (almost) nothing
    for seed in range(2):
        noise = np.random.default_rng(seed).exponential(size=(1500, 12))
        _, null = S.structure_identification(noise, sim.Y, sim.programs, percentile=90)
        assert null["n_programs_identified"] <= 1 and null["mean_coverage"] < 0.05


def test_recovery_report_on_sae(relu_sae, data):
    rng = np.random.default_rng(6)
    V = data[:, :3] + rng.normal(size=(700, 3))
    labels = (data[:, 0] > np.median(data[:, 0])).astype(int)
    rep = S.recovery_report(relu_sae, data, continuous={"v": V}, categorical={"half": labels})
    assert list(rep["summary"]["group"]) == ["v", "half"]
    assert rep["quality"]["n_cells"] == 700
    assert isinstance(rep["continuous"]["v"], S.RecoveryResult)
    assert isinstance(rep["categorical"]["half"], pd.DataFrame)
    with pytest.raises(ValueError, match="held-out"):
        S.recovery_report(relu_sae, continuous={"v": V})


@pytest.mark.parametrize("call, message", [
    (lambda: S.correlation_matrix(np.ones((5, 2)), np.ones((4, 1))), "same"),
    (lambda: S.correlation_matrix(np.full((5, 2), np.nan), np.ones((5, 1))), "NaN"),
    (lambda: S.correlation_matrix(np.ones((5, 2, 1)), np.ones((5, 1))), "2-D"),
    (lambda: S.categorical_auroc(np.ones((5, 2)), [1] * 5), "single class"),
    (lambda: S.categorical_auroc(np.ones((5, 2)), [1, 2, None, 1, 2]), "missing"),
    (lambda: S.recovery(np.ones((5, 2)), np.ones((5, 3)), names=["a"]), "names"),
    (lambda: S.structure_identification(np.ones((5, 2)), np.ones((5, 3)), np.ones((2, 4))), "genes"),
    (lambda: S.structure_identification(np.ones((5, 2)), np.ones((5, 3)), np.ones((2, 3)), percentile=100),
     "percentile"),
    (lambda: S.structure_identification(np.ones((5, 2)), np.ones((5, 3)), np.ones((2, 3)), score="dot"), "score"),
])
def test_bad_metric_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
