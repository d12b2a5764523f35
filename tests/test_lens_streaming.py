"""The lens streamed over a backed file equals the lens in memory, in bounded memory and across processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats
from torchrun_helper import run_torchrun

import dgdlens as dl
import dgdlens.lens as lens
from dgdlens import cli
from dgdlens.data.matrix import write_h5ad_in_chunks
from dgdlens.lens.splitting import SPLIT_BLOCK_ROWS, split_counts, split_rows

KEY = ["feature", "term", "direction"]


@pytest.fixture(scope="module")
def planted():
    return lens.planted_data(5000, 1500, 120, 12, gene_sets="hallmark", features_per_cell=8, seed=3)


@pytest.fixture(scope="module")
def backed_file(planted, tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "counts.h5ad"
    chunks = (planted.counts[i:i + 1000] for i in range(0, planted.counts.shape[0], 1000))
    write_h5ad_in_chunks(path, chunks, planted.gene_names)
    return path


def _annotate(planted, expression, **kw):
    kw = {"min_set_size": 5, "max_padj": None, **kw}
    return lens.annotate(planted.activations, expression, planted.gene_names, "hallmark", **kw)


def _assert_same_table(a: pd.DataFrame, b: pd.DataFrame, min_rows: int = 50):
    a = a.sort_values(KEY, ignore_index=True)
    b = b.sort_values(KEY, ignore_index=True)
    assert len(a) >= min_rows
    pd.testing.assert_frame_equal(a[KEY + ["overlap", "n_selected", "universe_size", "genes"]],
                                  b[KEY + ["overlap", "n_selected", "universe_size", "genes"]])
    for col in ("pval", "padj", "padj_global"):
        np.testing.assert_allclose(b[col].to_numpy(), a[col].to_numpy(), rtol=1e-9, atol=0)
    assert (a["significant"].to_numpy() == b["significant"].to_numpy()).all()


def test_split_by_row_blocks_equals_the_whole_split(planted):
    X = planted.counts
    _, whole_b = split_counts(X, 0.5, seed=7)
    start = 2 * SPLIT_BLOCK_ROWS if X.shape[0] > 2 * SPLIT_BLOCK_ROWS else SPLIT_BLOCK_ROWS
    _, part_b = split_rows(sp.csr_matrix(X[start:], dtype=np.float64), start, 0.5, seed=7)
    assert (part_b != whole_b[start:]).nnz == 0
    with pytest.raises(ValueError, match="multiple"):
        split_rows(sp.csr_matrix(X[1:]), 1, 0.5, seed=7)
    # a binomial half: never more than the count, about half of it
    assert (whole_b.data <= X[whole_b.nonzero()].A1).all()
    assert abs(whole_b.sum() / X.sum() - 0.5) < 0.01


@pytest.mark.parametrize("count", [1, 2, 3, 10, 63, 64, 100])
def test_split_half_is_binomial(count):
    # the lens draws Binomial(c, 1/2) as the popcount of c random bits (and rng.binomial from 64 on)
    X = sp.csr_matrix(np.full((SPLIT_BLOCK_ROWS, 20), count, dtype=np.float64))
    x_a, _ = split_counts(X, 0.5, seed=count)
    draws = x_a.toarray().ravel().astype(int)
    expected = stats.binom.pmf(np.arange(count + 1), count, 0.5) * draws.size
    keep = expected >= 5  # pool the thin tails into the neighbouring cells
    observed = np.bincount(draws, minlength=count + 1)
    obs = np.r_[observed[keep], observed[~keep].sum()]
    exp = np.r_[expected[keep], expected[~keep].sum()]
    obs, exp = obs[exp > 0], exp[exp > 0]
    assert stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3


@pytest.mark.parametrize("settings", [
    {},                                                   # counts, count split, explicit low groups
    {"max_low_cells": None, "background": "matched"},     # low = every silent cell (prefix - excluded)
    {"count_split": False, "fdr": "per_feature", "low": "rest"},
    {"compat": "paper"},
])
def test_streaming_a_backed_file_gives_the_in_memory_table(planted, backed_file, settings):
    in_memory = _annotate(planted, planted.counts, **settings)
    # one block of features and several blocks (one pass over the file per block) give the same table
    streamed = _annotate(planted, str(backed_file), chunk_cells=SPLIT_BLOCK_ROWS, **settings)
    blocks = _annotate(planted, anndata.read_h5ad(backed_file, backed="r").X, chunk_cells=SPLIT_BLOCK_ROWS,
                       max_memory=32 * 1500 * 25, **settings)
    assert streamed.attrs["settings"]["streamed"] is True
    assert in_memory.attrs["settings"]["streamed"] is False
    _assert_same_table(in_memory, streamed)
    _assert_same_table(in_memory, blocks)


def test_a_zarr_store_streams_like_an_h5ad(planted, tmp_path):
    import warnings

    adata = anndata.AnnData(X=planted.counts, var=pd.DataFrame(index=pd.Index(planted.gene_names)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata's notice about the zarr v2 -> v3 default
        adata.write_zarr(tmp_path / "cells.zarr")
    _assert_same_table(_annotate(planted, planted.counts), _annotate(planted, tmp_path / "cells.zarr"))


def test_streaming_with_groupby_and_a_feature_subset(planted, backed_file):
    labels = np.where(np.arange(planted.counts.shape[0]) % 3 == 0, "b1", "b2")
    kw = {"groupby": labels, "features": np.arange(0, 120, 2)}
    _assert_same_table(_annotate(planted, planted.counts, **kw), _annotate(planted, backed_file, **kw))


def test_activations_read_from_disk_in_chunks(planted, backed_file, tmp_path):
    dense = tmp_path / "acts.npy"
    np.save(dense, planted.activations.toarray())
    sparse = tmp_path / "acts.npz"
    sp.save_npz(sparse, planted.activations)
    ref = _annotate(planted, backed_file)
    for source in (str(dense), sparse, np.load(dense, mmap_mode="r")):
        got = lens.annotate(source, backed_file, planted.gene_names, "hallmark", min_set_size=5, max_padj=None)
        _assert_same_table(ref, got)


def test_streaming_refuses_what_it_cannot_do_and_bad_input(planted, backed_file, tmp_path):
    with pytest.raises(ValueError, match="cannot stream"):
        _annotate(planted, backed_file, test="wilcoxon")
    with pytest.raises(ValueError, match="same cells"):
        lens.annotate(planted.activations[:-10], backed_file, planted.gene_names, "hallmark")
    with pytest.raises(ValueError, match="gene names"):
        lens.annotate(planted.activations, backed_file, planted.gene_names[:-1], "hallmark")
    bad = planted.counts.copy().astype(np.float32)
    bad.data[5] = -1.0
    path = tmp_path / "negative.h5ad"
    write_h5ad_in_chunks(path, [bad], planted.gene_names)
    with pytest.raises(ValueError, match="negative"):
        lens.annotate(planted.activations, path, None, "hallmark")
    bad.data[5] = np.nan
    write_h5ad_in_chunks(path, [bad], planted.gene_names)
    with pytest.raises(ValueError, match="NaN"):
        lens.annotate(planted.activations, path, None, "hallmark")
    with pytest.raises(FileNotFoundError):
        lens.annotate(planted.activations, tmp_path / "missing.h5ad", None, "hallmark")


def test_tl_and_cli_stream_a_backed_anndata(planted, backed_file, tmp_path):
    ref = _annotate(planted, planted.counts, max_padj=0.05)
    adata = anndata.read_h5ad(backed_file, backed="r")
    adata.obsm["X_sae"] = planted.activations
    dl.tl.annotate_features(adata, gene_sets="hallmark", min_set_size=5)
    _assert_same_table(ref, adata.uns["dgdlens_lens"]["results"], min_rows=10)

    acts = tmp_path / "acts.npz"
    sp.save_npz(acts, planted.activations)
    out = tmp_path / "features.csv"
    cli.main(["annotate", "-a", str(acts), "-e", str(backed_file), "-o", str(out), "--backed",
                 "--gene-sets", "hallmark", "--min-set-size", "5"])
    _assert_same_table(ref, pd.read_csv(out, keep_default_na=False), min_rows=10)


# ------------------------------------------------------------------------------------------------ memory
_MEMORY_SCRIPT = r"""
import json, sys
from pathlib import Path
import numpy as np, scipy.sparse as sp
import dgdlens.lens as lens
from dgdlens.data.matrix import write_h5ad_in_chunks

n_cells, path, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
rng = np.random.default_rng(0)
genes = np.array([f"G{i}" for i in range(2000)])
def chunks():
    for start in range(0, n_cells, 5000):
        n = min(5000, n_cells - start)
        yield sp.random(n, 2000, density=0.15, format="csr", random_state=rng,
                        data_rvs=lambda k: rng.integers(1, 6, k)).astype(np.float32)
write_h5ad_in_chunks(path, chunks(), genes)
acts = sp.random(n_cells, 50, density=0.1, format="csr", random_state=rng)
sets = {f"S{i}": list(genes[rng.choice(2000, 30, replace=False)]) for i in range(40)}
lens.annotate(acts[:300], np.ones((300, 5)), genes[:5], {"S": list(genes[:5])}, min_active_cells=2, min_set_size=1)
def peak_mb():  # VmHWM: this process's own peak (ru_maxrss carries the parent's peak over exec on Linux)
    line = [l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:")][0]
    return int(line.split()[1]) / 1024
before = peak_mb()
res = lens.annotate(acts, path, genes, sets, stream=(mode == "stream"), chunk_cells=8192, min_set_size=5)
after = peak_mb()
print(json.dumps({"before_mb": before, "after_mb": after, "rows": len(res)}))
"""


def _peak_growth(tmp_path: Path, n_cells: int, mode: str) -> float:
    script = tmp_path / "mem.py"
    script.write_text(_MEMORY_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(n_cells), str(tmp_path / f"x{n_cells}.h5ad"), mode],
                          check=False, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["after_mb"] - out["before_mb"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory read from /proc (Linux)")
def test_streaming_memory_does_not_grow_with_cells(tmp_path):
    # 16k -> 64k cells x 2,000 genes at 15 % density: the matrix grows by ~700 MB as CSR (float32 + int32
    # indices, plus the split and normalised copies in memory). Streaming holds one chunk of 8,192 cells,
    # the activations and the statistics, so its peak may grow only by what scales with the activations.
    small, large = 16_000, 64_000
    streamed = _peak_growth(tmp_path, large, "stream") - max(_peak_growth(tmp_path, small, "stream"), 0.0)
    in_memory = _peak_growth(tmp_path, large, "memory")
    assert streamed < 60, f"streaming peak grew by {streamed:.0f} MB from {small} to {large} cells"
    assert in_memory > 300, f"the in-memory path should need the matrix ({in_memory:.0f} MB)"


# ------------------------------------------------------------------------------------------------ torchrun
_TORCHRUN_SCRIPT = r"""
import sys
import numpy as np
import dgdlens._dist as dist
import dgdlens.lens as lens

path, out = sys.argv[1], sys.argv[2]
dist.init(backend="gloo", device="cpu")
d = lens.planted_data(5000, 1500, 120, 12, gene_sets="hallmark", features_per_cell=8, seed=3)
res = lens.annotate(d.activations, path, None, "hallmark", min_set_size=5, max_padj=None, chunk_cells=4096)
res.sort_values(["feature", "term", "direction"], ignore_index=True)[
    ["feature", "term", "direction", "pval", "padj_global"]].to_csv(f"{out}.{dist.rank()}.csv", index=False)
"""


def test_torchrun_ranks_share_the_passes_and_agree(planted, backed_file, tmp_path):
    script = tmp_path / "stream_dist.py"
    script.write_text(_TORCHRUN_SCRIPT)
    run_torchrun(str(script), str(backed_file), str(tmp_path / "res"))
    ref = _annotate(planted, planted.counts).sort_values(KEY, ignore_index=True)
    tables = [pd.read_csv(tmp_path / f"res.{r}.csv") for r in (0, 1)]
    pd.testing.assert_frame_equal(tables[0], tables[1])
    got = tables[0]
    assert (got[KEY].astype(str).to_numpy() == ref[KEY].astype(str).to_numpy()).all()
    np.testing.assert_allclose(got["pval"], ref["pval"], rtol=1e-9)


def test_a_misleading_first_chunk_costs_a_pass_not_a_wrong_table(planted, tmp_path):
    # the first 4,096 cells hold integer counts, the rest are scaled (non-integer): the stream guesses
    # "counts + split" from the first chunk, learns otherwise on the first pass and passes again
    X = planted.counts.astype(np.float64).tolil()
    X[SPLIT_BLOCK_ROWS:] = X[SPLIT_BLOCK_ROWS:] * 1.5
    X = sp.csr_matrix(X)
    path = tmp_path / "mixed.h5ad"
    write_h5ad_in_chunks(path, [X], planted.gene_names)
    stream = lens.StreamedExpression(path, chunk_cells=SPLIT_BLOCK_ROWS)
    assert (stream.kind, stream.split_applied) == ("counts", True)  # the guess from the first chunk
    res = _annotate(planted, path, chunk_cells=SPLIT_BLOCK_ROWS)
    assert res.attrs["settings"]["count_split_applied"] is False
    assert res.attrs["settings"]["expression_kind_detected"] == "means"
    _assert_same_table(_annotate(planted, X), res, min_rows=10)


def test_differential_expression_streams_a_backed_file(planted, backed_file):
    features = planted.truth["feature"].to_numpy()[:3]
    a = lens.differential_expression(planted.activations, planted.counts, features, gene_names=planted.gene_names)
    b = lens.differential_expression(planted.activations, backed_file, features)
    key = ["feature", "gene"]
    a, b = a.sort_values(key, ignore_index=True), b.sort_values(key, ignore_index=True)
    assert (a[key + ["direction"]].to_numpy() == b[key + ["direction"]].to_numpy()).all()
    np.testing.assert_allclose(b["pval"], a["pval"], rtol=1e-9)
    np.testing.assert_allclose(b["statistic"], a["statistic"], rtol=1e-9)


def test_streaming_checks_the_de_options_like_the_in_memory_path(planted, backed_file):
    for kw, match in (({"variance_guard": "nope"}, "variance_guard"), ({"pseudocount": 0}, "pseudocount"),
                      ({"test": "anova"}, "test must be")):
        with pytest.raises(ValueError, match=match):
            _annotate(planted, planted.counts, **kw)
        with pytest.raises(ValueError, match=match):
            _annotate(planted, backed_file, **kw)
