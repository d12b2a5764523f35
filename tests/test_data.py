"""Data layer: count validation, row access on every storage kind, mini-batching, AnnData helpers."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from dgdlens.data import (
    BatchLoader,
    CountValidationError,
    GeneMismatchError,
    RowMatrix,
    align_genes,
    check_labels_key,
    get_matrix,
    validate_counts,
)


@pytest.fixture(scope="module")
def counts() -> np.ndarray:
    rng = np.random.default_rng(0)
    X = rng.negative_binomial(2, 0.6, size=(57, 13)).astype(np.float32)
    X[:, 0] += 1  # no empty cells
    return X


@pytest.fixture(scope="module")
def backed_adata(tmp_path_factory, counts):
    """The same counts as a CSR h5ad opened backed (on disk), and as a dense h5ad."""
    d = tmp_path_factory.mktemp("h5ad")
    ad.AnnData(sp.csr_matrix(counts)).write_h5ad(d / "csr.h5ad")
    ad.AnnData(counts.copy()).write_h5ad(d / "dense.h5ad")
    a = ad.read_h5ad(d / "csr.h5ad", backed="r")
    b = ad.read_h5ad(d / "dense.h5ad", backed="r")
    yield a, b
    a.file.close()
    b.file.close()


def _all_kinds(counts, backed_adata):
    a, b = backed_adata
    return {
        "csr": RowMatrix(sp.csr_matrix(counts)),
        "csc": RowMatrix(sp.csc_matrix(counts)),
        "dense": RowMatrix(counts),
        "torch": RowMatrix(torch.from_numpy(counts)),
        "backed_csr": RowMatrix(a.X),
        "backed_dense": RowMatrix(b.X),
    }


# ---------------------------------------------------------------------------------------------- RowMatrix
def test_row_matrix_gives_the_same_rows_for_every_storage(counts, backed_adata):
    idx = np.array([40, 3, 3, 56, 0, 17, 16])  # unsorted, with a repeat
    contiguous = np.arange(20, 31)[::-1]
    for kind, m in _all_kinds(counts, backed_adata).items():
        assert m.shape == counts.shape, kind
        assert m.backed == kind.startswith("backed"), kind
        got = m.rows(idx)
        assert got.dtype == np.float32 and got.shape == (len(idx), 13), kind
        np.testing.assert_array_equal(got, counts[idx], err_msg=kind)
        np.testing.assert_array_equal(m.rows(contiguous), counts[contiguous], err_msg=kind)
        np.testing.assert_allclose(m.row_sums(chunk_size=10), counts.sum(1), err_msg=kind)
        np.testing.assert_allclose(m.col_sums(chunk_size=10), counts.sum(0), err_msg=kind)


@pytest.mark.parametrize("store", ["h5ad", "zarr"])
def test_backed_csr_slices_are_anndatas_own(tmp_path, store):
    # integer counts with empty rows (first, middle, last): every slice as anndata reads it, dtype too
    rng = np.random.default_rng(1)
    X = sp.random(40, 9, density=0.3, format="csr", random_state=2, data_rvs=lambda n: rng.integers(1, 9, n))
    X = X.astype(np.int32)
    X[[0, 17, 39]] = 0
    X.eliminate_zeros()
    path = tmp_path / f"ints.{store}"
    if store == "h5ad":
        ad.AnnData(X).write_h5ad(path)
        backed = ad.read_h5ad(path, backed="r").X
    else:
        from dgdlens.data.matrix import read_zarr_backed

        ad.AnnData(X).write_zarr(path)
        backed = read_zarr_backed(path).X
    m = RowMatrix(backed)
    for start, stop in [(0, 40), (0, 1), (17, 18), (5, 23), (39, 40), (12, 12), (38, 40)]:
        got, want = m._slice(start, stop), backed[start:stop]
        assert sp.issparse(got) and got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got.toarray(), want.toarray())
        np.testing.assert_array_equal(got.toarray(), X[start:stop].toarray())


def test_row_matrix_chunks_cover_all_rows_in_order(counts, backed_adata):
    for kind, m in _all_kinds(counts, backed_adata).items():
        blocks = list(m.iter_chunks(chunk_size=20))
        assert [(s, e) for s, e, _ in blocks] == [(0, 20), (20, 40), (40, 57)], kind
        stacked = np.vstack([b.toarray() if sp.issparse(b) else np.asarray(b) for _, _, b in blocks])
        np.testing.assert_array_equal(stacked, counts, err_msg=kind)


def test_row_matrix_column_subset_in_memory_and_backed(counts, backed_adata):
    cols = np.array([5, 0, 12, 7])
    idx = np.array([9, 2, 50])
    for kind, m in _all_kinds(counts, backed_adata).items():
        sub = m.subset_columns(cols)
        assert sub.shape == (57, 4), kind
        np.testing.assert_array_equal(sub.rows(idx), counts[idx][:, cols], err_msg=kind)
        np.testing.assert_allclose(sub.row_sums(chunk_size=16), counts[:, cols].sum(1), err_msg=kind)


def test_row_matrix_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match="None"):
        RowMatrix(None)
    with pytest.raises(ValueError, match="2-D"):
        RowMatrix(np.zeros(5))
    with pytest.raises(TypeError, match="Unsupported matrix type"):
        RowMatrix({"a": 1})


def test_row_matrix_does_not_densify_sparse_data(counts):
    m = RowMatrix(sp.csr_matrix(counts))
    assert sp.issparse(m.X)
    assert all(sp.issparse(b) for _, _, b in m.iter_chunks(10))


# ---------------------------------------------------------------------------------------------- validate_counts
def test_validate_counts_accepts_counts_and_returns_sums(counts, backed_adata):
    for kind, m in _all_kinds(counts, backed_adata).items():
        stats = validate_counts(m, chunk_size=8)
        np.testing.assert_allclose(stats["row_sums"], counts.sum(1), err_msg=kind)
        np.testing.assert_allclose(stats["col_sums"], counts.sum(0), err_msg=kind)


@pytest.mark.parametrize("storage", [np.asarray, sp.csr_matrix])
@pytest.mark.parametrize("value, match, fix", [
    (-1.0, "negative values", "raw counts"),
    (np.nan, "NaN or infinite", "remove or fix"),
    (np.inf, "NaN or infinite", "remove or fix"),
    (2.5, "non-integer values", "layer='counts'"),
])
def test_validate_counts_names_the_problem_and_the_fix(counts, storage, value, match, fix):
    bad = counts.copy()
    bad[33, 4] = value
    with pytest.raises(CountValidationError, match=match) as err:
        validate_counts(RowMatrix(storage(bad)), chunk_size=10)
    assert fix in str(err.value)
    assert isinstance(err.value, ValueError)


def test_validate_counts_allows_non_integers_when_asked(counts):
    validate_counts(RowMatrix(counts + 0.5), require_integer=False)


def test_validate_counts_empty_cells_and_genes(counts):
    bad = counts.copy()
    bad[[4, 9]] = 0
    with pytest.raises(CountValidationError, match=r"2 cell\(s\) with no counts \(e.g. row 4\).*filter_cells"):
        validate_counts(RowMatrix(sp.csr_matrix(bad)))
    validate_counts(RowMatrix(bad), allow_empty_cells=True)
    bad = counts.copy()
    bad[:, 11] = 0
    # genes without counts are normal (issue 12): a warning, in memory and backed, never an error
    for setting in ({}, {"empty_genes": "warn"}):
        with pytest.warns(UserWarning, match=r"1 of 13 gene\(s\) have no counts.*learn to ~0"):
            validate_counts(RowMatrix(bad), **setting)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_counts(RowMatrix(bad), empty_genes="ignore")


def test_genes_without_counts_are_accepted_in_memory_and_backed(tmp_path):
    import anndata as ad

    from dgdlens import DGD

    rng = np.random.default_rng(0)
    X = rng.poisson(2.0, size=(30, 12)).astype(np.float32)
    X[:, 0] += 1
    X[:, [3, 7]] = 0
    adata = ad.AnnData(sp.csr_matrix(X))
    adata.var_names = [f"g{i}" for i in range(12)]
    adata.write_h5ad(tmp_path / "zero_genes.h5ad")
    backed = ad.read_h5ad(tmp_path / "zero_genes.h5ad", backed="r")
    for data in (adata, backed):
        with pytest.warns(UserWarning, match=r"2 of 12 gene\(s\) have no counts"):
            model = DGD(data, n_latent=2, hidden=[8], n_components=2)
        model.train(max_epochs=2, device="cpu", progress=False, early_stopping=False)
        mean = model.decode_latent(model.get_latent_representation()[:4])
        mean = mean.detach().cpu().numpy() if hasattr(mean, "detach") else np.asarray(mean)
        assert np.all(np.isfinite(mean)) and mean[:, [3, 7]].mean() < mean[:, [0]].mean()
    backed.file.close()


def test_object_dtype_and_no_cells_are_named():
    with pytest.raises(TypeError, match="convert it to a numeric dtype"):
        RowMatrix(np.array([[1, "a"], [2, 3]], dtype=object))
    with pytest.raises(CountValidationError, match="Too few cells"):
        validate_counts(RowMatrix(np.zeros((0, 3))))


def test_validate_counts_does_not_modify_the_input(counts):
    X = sp.csr_matrix(counts)
    before = X.copy()
    validate_counts(RowMatrix(X))
    assert (X != before).nnz == 0


# ---------------------------------------------------------------------------------------------- BatchLoader
@pytest.mark.parametrize("kind", ["csr", "dense", "backed_csr"])
def test_batch_loader_serves_every_row_once_per_epoch(counts, backed_adata, kind):
    m = _all_kinds(counts, backed_adata)[kind]
    rows = np.array([1, 5, 6, 8, 10, 13, 20, 21, 22, 30, 31, 40, 44, 50, 56])
    scale = counts[rows].sum(1)
    loader = BatchLoader(m, rows, scale, batch_size=4, shuffle=True, seed=3, block_size=5 if m.backed else None)
    assert len(loader) == 4 and loader.n == len(rows)
    orders = []
    for _ in range(3):
        seen = []
        for batch in loader:
            pos = batch.index.numpy()
            assert batch.x.dtype == torch.float32 and batch.x.shape == (len(pos), 13)
            np.testing.assert_array_equal(batch.x.numpy(), counts[rows[pos]])
            np.testing.assert_allclose(batch.scale.numpy(), scale[pos])
            seen.extend(pos.tolist())
        assert sorted(seen) == list(range(len(rows)))
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled each epoch


def test_batch_loader_is_seeded_and_unshuffled_order_is_sequential(counts):
    m = RowMatrix(counts)
    first = [b.index.tolist() for b in BatchLoader(m, batch_size=10, seed=5)]
    again = [b.index.tolist() for b in BatchLoader(m, batch_size=10, seed=5)]
    assert first == again
    plain = [b.index.tolist() for b in BatchLoader(m, batch_size=10, shuffle=False)]
    assert sum(plain, []) == list(range(57))
    dropped = [len(b.index) for b in BatchLoader(m, batch_size=10, drop_last=True)]
    assert dropped == [10] * 5
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(m, batch_size=0)
    with pytest.raises(ValueError, match="scale"):
        BatchLoader(m, np.arange(5), np.ones(4))


# ---------------------------------------------------------------------------------------------- AnnData helpers
def _adata(counts):
    a = ad.AnnData(sp.csr_matrix(counts), obs=pd.DataFrame({"cell_type": list("ab" * 28 + "a")},
                                                           index=[f"c{i}" for i in range(57)]),
                   var=pd.DataFrame(index=[f"g{j}" for j in range(13)]))
    a.layers["counts"] = a.X.copy()
    return a


def test_get_matrix_picks_x_layer_or_raw_and_explains_missing_ones(counts):
    a = _adata(counts)
    np.testing.assert_array_equal(get_matrix(a).rows([3]), counts[[3]])
    np.testing.assert_array_equal(get_matrix(a, "counts").rows([3]), counts[[3]])
    with pytest.raises(ValueError, match=r"Layer 'spliced' not found.*available: \['counts'\]"):
        get_matrix(a, "spliced")
    with pytest.raises(ValueError, match="adata.raw is None"):
        get_matrix(a, "raw")
    a.raw = a.copy()
    np.testing.assert_array_equal(get_matrix(a, "raw").rows([3]), counts[[3]])
    with pytest.raises(TypeError, match="Expected an AnnData"):
        get_matrix(counts)


def test_check_labels_key(counts):
    a = _adata(counts)
    assert check_labels_key(a, None) is None
    labels = check_labels_key(a, "cell_type")
    assert list(labels.categories) == ["a", "b"] and len(labels) == 57
    with pytest.raises(ValueError, match="'celltype' is not a column of adata.obs.*cell_type"):
        check_labels_key(a, "celltype")


def test_align_genes_reorders_and_drops_extra_genes_with_a_warning():
    model = pd.Index(["g1", "g2", "g3", "g4"])
    new = pd.Index(["x", "g3", "g1", "g4", "y", "g2"])
    with pytest.warns(UserWarning, match="2 genes the model does not know"):
        idx = align_genes(new, model)
    assert new[idx].tolist() == model.tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert align_genes(model[::-1], model).tolist() == [3, 2, 1, 0]


def test_align_genes_missing_or_duplicated_genes_raise():
    model = pd.Index(["g1", "g2", "g3", "g4"])
    with pytest.raises(GeneMismatchError, match=r"2 of the model's 4 genes are missing.*\['g2', 'g4'\]"):
        align_genes(["g1", "g3", "z"], model)
    with pytest.raises(ValueError, match="duplicated gene names.*var_names_make_unique"):
        align_genes(["g1", "g2", "g2", "g3", "g4"], model)
    assert issubclass(GeneMismatchError, ValueError)


def test_pbmc68k_counts_are_exact_integer_counts():
    from dgdlens.data.datasets import pbmc68k_counts

    a = pbmc68k_counts()
    assert a.shape == (700, 765) and sp.isspmatrix_csr(a.X)
    validate_counts(RowMatrix(a.X), allow_empty_cells=False)  # integers, non-negative, no empty cell
    assert a.obs["bulk_labels"].nunique() == 10
    assert (a.layers["counts"] != a.X).nnz == 0
