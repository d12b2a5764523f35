"""Out-of-core data: a backed .h5ad trains, embeds and evaluates exactly like the same data in memory."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from dgdlens.data.loader import BatchLoader, batch_indices
from dgdlens.data.matrix import RowMatrix, read_zarr_backed, write_h5ad_in_chunks, write_h5ad_out_of_core
from dgdlens.models.dgd import DGD
from dgdlens.sim.counts import simulate_count_chunks

N_CELLS, N_GENES = 480, 120


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same counts in memory and in a backed file written chunk by chunk."""
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("backed") / "cells.h5ad"
    chunks = list(simulate_count_chunks(N_CELLS, N_GENES, n_types=3, chunk_size=100, mean_library=300, seed=3))
    write_h5ad_in_chunks(path, (c for c, _ in chunks), [f"g{j}" for j in range(N_GENES)])
    X = sp.vstack([c for c, _ in chunks], format="csr")
    memory = ad.AnnData(X, obs=pd.DataFrame(index=[f"cell{i}" for i in range(N_CELLS)]),
                        var=pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)]))
    return memory, path


def _no_whole_reads(monkeypatch, backed):
    """Make any attempt to load the backed matrix whole fail loudly."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the backed matrix was loaded whole")
    monkeypatch.setattr(type(backed.X), "to_memory", refuse)


def test_backed_training_equals_in_memory(data, monkeypatch):
    memory, path = data
    backed = ad.read_h5ad(path, backed="r")
    _no_whole_reads(monkeypatch, backed)
    results = []
    for adata in (memory, backed):
        model = DGD(adata, n_latent=3, n_components=3, seed=1)
        # the same block-shuffling settings give the same batches wherever the rows live
        model.train(max_epochs=4, batch_size=64, early_stopping=False, progress=False, shuffle_block_size=50)
        results.append({"history": model.history_.drop(columns="time"), "z": model.get_latent_representation(),
                        "recon": model.get_reconstruction_error(per_sample=True),
                        "heldout": model.get_latent_representation(adata, n_steps=20, progress=False),
                        "model": model})
    mem, bk = results
    pd.testing.assert_frame_equal(mem["history"], bk["history"], check_exact=True)
    np.testing.assert_array_equal(mem["z"], bk["z"])
    np.testing.assert_array_equal(mem["recon"], bk["recon"])
    np.testing.assert_array_equal(mem["heldout"], bk["heldout"])
    assert np.abs(bk["z"]).sum() > 0  # it did train
    # the library sizes came from the file, chunk by chunk, and match the in-memory row sums
    np.testing.assert_allclose(bk["model"].library_size, np.asarray(memory.X.sum(1)).ravel())


def test_backed_default_settings_train_and_save(data, tmp_path):
    _, path = data
    backed = ad.read_h5ad(path, backed="r")
    model = DGD(backed, n_latent=3, n_components=3, seed=0)
    model.train(max_epochs=2, batch_size=64, early_stopping=False, progress=False)  # default block shuffle
    assert np.all(np.isfinite(model.history_["train_loss"]))
    model.save(tmp_path / "m")
    loaded = DGD.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())


def test_zarr_store_trains_like_memory_and_results_write_without_loading_x(data, tmp_path, monkeypatch):
    memory, path = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata's notice about the zarr v2 -> v3 default
        memory.write_zarr(tmp_path / "cells.zarr")
    lazy = read_zarr_backed(tmp_path / "cells.zarr")
    assert RowMatrix(lazy.X).backed
    histories = []
    for adata in (memory, lazy):
        model = DGD(adata, n_latent=3, n_components=3, seed=2)
        model.train(max_epochs=2, batch_size=64, early_stopping=False, progress=False, shuffle_block_size=50)
        histories.append(model.history_.drop(columns="time"))
    pd.testing.assert_frame_equal(*histories, check_exact=True)

    backed = ad.read_h5ad(path, backed="r")
    _no_whole_reads(monkeypatch, backed)
    model.add_to_adata(backed, n_steps=5, progress=False)  # embedded as new cells, from disk
    write_h5ad_out_of_core(backed, tmp_path / "out.h5ad")
    monkeypatch.undo()
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_array_equal(out.obsm["X_dgd"], backed.obsm["X_dgd"])
    np.testing.assert_array_equal(out.X.toarray(), memory.X.toarray())
    assert list(out.obs["dgd_cluster"]) == list(backed.obs["dgd_cluster"])


def test_block_shuffle_is_a_permutation_with_local_batches():
    rng = np.random.default_rng(0)
    n, block, buffer_blocks, batch = 1000, 40, 3, 32
    batches = batch_indices(n, batch, shuffle=True, rng=rng, block_size=block, buffer_blocks=buffer_blocks)
    order = np.concatenate(batches)
    assert np.array_equal(np.sort(order), np.arange(n))
    assert all(len(b) == batch for b in batches[:-1])
    # a batch draws from at most the blocks of two consecutive buffers
    assert max(len(np.unique(b // block)) for b in batches) <= 2 * buffer_blocks
    # cells of one buffer are mixed: the order is not block-sorted
    assert not np.array_equal(order[:block], np.sort(order[:block]))
    split = batch_indices(n, batch, shuffle=True, rng=np.random.default_rng(0), block_size=block, n_batches=7)
    assert len(split) == 7 and max(map(len, split)) - min(map(len, split)) <= 1


def test_loader_reads_each_block_once_and_prefetch_changes_nothing(data):
    _, path = data
    backed = ad.read_h5ad(path, backed="r")
    matrix = RowMatrix(backed.X)
    rows = np.arange(0, N_CELLS, 3)[:150]  # a sorted split with gaps, like a train split
    epochs = {}
    for prefetch in (0, 3):
        loader = BatchLoader(matrix, rows, batch_size=16, seed=5, block_size=32, buffer_blocks=2, prefetch=prefetch)
        epochs[prefetch] = [(b.index.numpy().copy(), b.x.numpy().copy()) for _ in range(2) for b in loader]
        assert loader.stats.n_blocks_read == 2 * -(-len(rows) // 32)
    reference = backed.X[0:N_CELLS].toarray()  # the file is tiny; the truth, read in one go
    for (i0, x0), (i1, x1) in zip(epochs[0], epochs[3]):
        np.testing.assert_array_equal(i0, i1)
        np.testing.assert_array_equal(x0, x1)
        np.testing.assert_array_equal(x0, reference[rows[i0]])


def test_reading_errors_reach_the_training_loop(data):
    _, path = data
    matrix = RowMatrix(ad.read_h5ad(path, backed="r").X)

    def broken(*_args, **_kwargs):
        raise OSError("disk went away")

    matrix.read_rows = broken
    loader = BatchLoader(matrix, batch_size=16, prefetch=2)
    with pytest.raises(OSError, match="disk went away"):
        next(iter(loader))
