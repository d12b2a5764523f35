"""SAE variants: recovery of planted sparse codes, constraints, folding, save/load, encoding and errors."""

from __future__ import annotations

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from dgdlens import sae as S
from dgdlens._io import ModelFormatError
from dgdlens.sae.train import _Trainer
from dgdlens.sim.superposition import planted_sparse_codes

FAST = dict(progress=False, num_threads=1)


@pytest.fixture(scope="module")
def planted():
    return planted_sparse_codes(n_samples=6000, n_atoms=64, dim=32, k_active=2, offset_scale=1.0, seed=0)


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(1)
    return (rng.normal(size=(600, 8)) * np.linspace(0.5, 3, 8) + 5).astype(np.float32)


@pytest.fixture(scope="module")
def topk_small(small):
    return S.train_sae(small, kind="topk", n_latents=32, k=4, epochs=3, batch_size=64, seed=0, **FAST)


def test_topk_recovers_planted_atoms(planted):
    """More atoms (64) than dimensions (32), 2 active per sample: a TopK SAE finds the atoms."""
    train, test = planted.X[:5000], planted.X[5000:]
    sae = S.train_sae(train, kind="topk", n_latents=128, k=2, epochs=20, batch_size=64, seed=0, **FAST)
    quality = S.metrics(sae, test)
    assert quality["fvu"] < 0.05
    assert quality["l0"] == pytest.approx(2.0)
    rec = S.recovery(sae.encode(test), planted.codes[5000:], threshold=0.9)
    assert rec.summary["fraction_recovered"] >= 0.85
    assert rec.summary["fraction_recovered_matched"] >= 0.8  # one feature per atom
    # the matched features' decoder rows point along the true atoms
    W = sae.W_dec.detach().numpy()
    matched = rec.per_variable["matched_feature"].to_numpy()
    ok = matched >= 0
    cos = np.abs((W[matched[ok]] * planted.atoms[ok]).sum(1))
    assert np.mean(cos > 0.9) >= 0.8


@pytest.mark.parametrize("kind, extra", [
    ("relu", dict(l1_coef=1.0)),
    ("relu", dict(l1_coef=1.0, decoder_norm="scale_l1", bias="untied")),
    ("topk", dict(k=4)),
    ("batchtopk", dict(k=4)),
    ("jumprelu", dict(k=4)),
    ("jumprelu", dict(l1_coef=0.1)),
])
def test_variants_train_with_unit_norm_decoder(small, kind, extra):
    sae = S.train_sae(small, kind=kind, n_latents=32, epochs=3, batch_size=64, seed=0, **FAST, **extra)
    assert isinstance(sae, S.VARIANTS[kind])
    norms = sae.W_dec.detach().norm(dim=1).numpy()
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)  # in input units, after folding
    assert sae.folded
    F = sae.encode(small)
    assert sp.isspmatrix_csr(F) and F.shape == (600, 32) and F.dtype == np.float32
    assert np.all(F.data > 0)
    assert len(sae.history) == 3 and all(np.isfinite(h["loss"]) for h in sae.history)
    for key in ("fvu", "l0", "dead_fraction", "dense_fraction", "lr", "sparsity_coef"):
        assert key in sae.history[-1]
    if kind == "topk":
        np.testing.assert_array_equal(np.diff(F.indptr), 4)
    if kind == "batchtopk":  # the calibrated threshold keeps about k per sample on the training data
        assert 1.5 < F.nnz / F.shape[0] < 8


def test_paper_preset(small):
    cfg = S.paper_config(8)
    assert (cfg.kind, cfg.n_latents, cfg.l1_coef, cfg.lr, cfg.batch_size, cfg.epochs) == ("relu", 10_000, 1e-3, 1e-4, 128, 500)
    assert (cfg.bias, cfg.mse_convention, cfg.normalize, cfg.decoder_norm) == ("untied", "mean", "none", "none")
    assert (cfg.lr_warmup, cfg.l1_warmup, cfg.auxk_alpha) == (0.0, 0.0, 0.0)
    sae = S.train_sae(small, preset="paper", n_latents=64, epochs=2, **FAST)  # explicit arguments override
    assert sae.config.n_latents == 64 and sae.config.lr == 1e-4 and sae.config.bias == "untied"
    np.testing.assert_allclose(sae.W_dec.detach().norm(dim=1).numpy(), 1.0, atol=1e-5)  # norms folded


def _random_state(sae, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        sae.x_mean.copy_(torch.randn(sae.d_in, generator=gen) * 3)
        sae.x_scale.fill_(2.5)


@pytest.mark.parametrize("kind, extra", [
    ("relu", dict(bias="tied", decoder_norm="unit")),
    ("relu", dict(bias="untied", decoder_norm="none")),
    ("topk", dict(k=3)),
    ("batchtopk", dict(k=3, bias="untied")),
    ("jumprelu", dict(decoder_norm="scale_l1")),
])
def test_folding_normalisation_keeps_outputs(kind, extra):
    cfg = S.SAEConfig(kind=kind, d_in=6, n_latents=20, **extra)
    sae = S.make_sae(cfg).double()
    _random_state(sae, 3)
    if kind == "batchtopk":
        sae.threshold.fill_(0.2)
    if kind == "jumprelu":
        sae.log_threshold.data.fill_(np.log(0.2))
    x = torch.randn(50, 6, dtype=torch.float64) * 4 + 1
    x_hat, f = sae(x)
    sae.fold_()
    assert sae.folded
    x_hat2, f2 = sae(x)
    torch.testing.assert_close(x_hat2, x_hat)
    if cfg.decoder_norm == "unit":  # activations are already in input units
        torch.testing.assert_close(f2, f)
    else:  # the decoder norms moved into the activations
        torch.testing.assert_close((f2 > 0), (f > 0))
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(20, dtype=torch.float64))


def test_save_load_round_trip(tmp_path, topk_small, small):
    path = topk_small.save(tmp_path / "sae")
    loaded = S.SAE.load(path)
    assert type(loaded) is S.TopKSAE and loaded.config == topk_small.config
    assert loaded.history == topk_small.history
    a, b = topk_small.encode(small), loaded.encode(small)
    assert (a != b).nnz == 0
    np.testing.assert_array_equal(topk_small.decode(a), loaded.decode(b))
    with pytest.raises(FileExistsError):
        topk_small.save(tmp_path / "sae")
    with pytest.raises(ModelFormatError, match="topk"):
        S.ReLUSAE.load(path)


def test_save_load_keeps_variant_thresholds(tmp_path, small):
    sae = S.train_sae(small, kind="jumprelu", n_latents=16, k=3, epochs=2, seed=0, **FAST)
    loaded = S.SAE.load(sae.save(tmp_path / "j"))
    torch.testing.assert_close(loaded.log_threshold, sae.log_threshold)
    assert (sae.encode(small) != loaded.encode(small)).nnz == 0


def test_encode_is_batched_and_matches_dense(topk_small, small):
    dense = topk_small(torch.from_numpy(small))[1].detach().numpy()
    for batch_size in (7, 600, 5000):
        F = topk_small.encode(small, batch_size=batch_size)
        np.testing.assert_array_equal(F.toarray() > 0, dense > 0)
        np.testing.assert_allclose(F.toarray(), dense, rtol=1e-5, atol=1e-6)  # BLAS blocking differs by batch
    adata = anndata.AnnData(np.zeros((600, 3), np.float32), obsm={"X_emb": small})
    assert (topk_small.encode(adata, obsm_key="X_emb") != topk_small.encode(torch.from_numpy(small))).nnz == 0
    x_hat = topk_small.decode(topk_small.encode(small))
    np.testing.assert_allclose(x_hat, topk_small.reconstruct(small), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(topk_small.reconstruction_error(small), small - x_hat, rtol=1e-5, atol=1e-4)


def test_train_on_anndata_with_validation_and_early_stopping(small):
    adata = anndata.AnnData(np.zeros((600, 2), np.float32), obsm={"X_emb": small})
    sae = S.train_sae(adata, obsm_key="X_emb", kind="topk", n_latents=16, k=2, epochs=30, val_fraction=0.2,
                      patience=2, lr=0.05, seed=0, **FAST)
    assert "val_fvu" in sae.history[0]
    assert sae.training_info["n_val"] == 120 and sae.training_info["n_train"] == 480


def test_warmups_ramp_lr_and_sparsity(small):
    sae = S.train_sae(small, kind="relu", n_latents=16, epochs=4, batch_size=600, lr=1e-3, lr_warmup=0.5,
                      lr_decay=0.0, l1_coef=2.0, l1_warmup=0.75, **FAST)
    coefs = [h["sparsity_coef"] for h in sae.history]
    lrs = [h["lr"] for h in sae.history]
    assert coefs == pytest.approx([2 / 3, 4 / 3, 2.0, 2.0])  # one step per epoch: ramps over 3 steps
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])


def test_auxk_trains_dead_latents(small):
    """Latents that never fire get gradient only through the AuxK loss."""
    cfg = S.train.resolve_config(8, kind="topk", n_latents=16, k=2, epochs=1, batch_size=100, dead_after=1)
    moved = {}
    for alpha in (0.0, 1.0):
        sae = S.make_sae(cfg.replace(auxk_alpha=alpha))
        with torch.no_grad():
            sae.b_enc[:8] = 100.0  # the first 8 always win the top k, so the others never fire
        before = sae.W_enc[8:].detach().clone()
        data = S.EmbeddingRows(small)
        trainer = _Trainer(sae, data, np.arange(600), np.zeros(0, int), torch.zeros(8), seed=0, patience=None,
                           progress=False)
        trainer.since_fired[8:] = 10  # already known to be dead
        trainer.run()
        moved[alpha] = float((sae.W_enc[8:].detach() - before).abs().max())
    assert moved[0.0] == 0.0
    assert moved[1.0] > 0.0


@pytest.mark.parametrize("call, message", [
    (lambda X: S.train_sae(X, kind="nope", **FAST), "Unknown SAE kind"),
    (lambda X: S.train_sae(X, kind="topk", n_latents=16, **FAST), "needs k"),
    (lambda X: S.train_sae(X, kind="topk", n_latents=16, k=40, **FAST), "k must be"),
    (lambda X: S.train_sae(X, kind="topk", k=2, decoder_norm="none", **FAST), "decoder_norm='unit'"),
    (lambda X: S.train_sae(X, kind="relu", epochs=1, patience=3, **FAST), "val_fraction"),
    (lambda X: S.train_sae(X, kind="relu", epochs=1, learning_rate=1.0, **FAST), "Unknown SAE setting"),
    (lambda X: S.train_sae(X, preset="nope", **FAST), "Unknown preset"),
    (lambda X: S.train_sae(X[:, 0], kind="relu", **FAST), "2-D"),
    (lambda X: S.train_sae(anndata.AnnData(X), kind="relu", **FAST), "obsm_key"),
    (lambda X: S.train_sae(np.full((20, 3), 1.0), kind="relu", epochs=1, **FAST), "zero variance"),
])
def test_bad_training_inputs_raise(small, call, message):
    with pytest.raises(ValueError, match=message):
        call(small)


def test_nan_input_names_the_row(small):
    X = small.copy()
    X[17, 2] = np.nan
    with pytest.raises(ValueError, match="row 17"):
        S.train_sae(X, kind="relu", **FAST)


def test_bad_inference_inputs_raise(topk_small, small):
    with pytest.raises(ValueError, match="8"):
        topk_small.encode(small[:, :5])
    with pytest.raises(ValueError, match="activations of shape"):
        topk_small.decode(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="batch_size"):
        topk_small.encode(small, batch_size=0)


@pytest.mark.parametrize("kind, extra", [("relu", {}), ("topk", dict(k=16)), ("batchtopk", dict(k=16)),
                                         ("jumprelu", dict(k=16))])
def test_wide_dictionary_starts_at_the_right_scale(small, kind, extra):
    """Transpose init adds every active projection in full; the encoder is rescaled so that a 32x wide
    dictionary does not start by reconstructing the data many times too large."""
    from dgdlens.sae.train import _init_from_data

    cfg = S.train.resolve_config(8, kind=kind, n_latents=256, **extra)
    sae = S.make_sae(cfg)
    X = torch.from_numpy(small)
    mean = X.mean(0)
    with torch.no_grad():
        sae.x_mean.copy_(mean)
        sae.x_scale.fill_(float((X - mean).pow(2).sum(1).mean().sqrt()) / np.sqrt(8))
    _init_from_data(sae, S.EmbeddingRows(small), np.arange(600), seed=0)
    with torch.no_grad():
        x_n = sae.normalise(X)
        x_hat = sae.decode_normalised(sae.activate_train(sae.pre_activations(x_n)))
        fvu = float((x_hat - x_n).pow(2).sum() / (x_n - x_n.mean(0)).pow(2).sum())
    assert fvu < 1.0
