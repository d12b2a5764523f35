"""SAE variants: recovery of planted sparse codes, constraints, folding, save/load, encoding and errors; training
through the shared runner (early stopping with restore-best, bit-exact checkpoint/resume, refusal of pickles and of
checkpoints of other data)."""

from __future__ import annotations

import os
import pickle
import signal

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from dgdlens import sae as S
from dgdlens._io import ModelFormatError
from dgdlens.sae.init import init_from_data
from dgdlens.sim.superposition import planted_sparse_codes
from dgdlens.train import CheckpointError, SingleProcess, TrainingInterrupted
from dgdlens.train.sae_plan import SAEPlan

FAST = dict(progress=False, num_threads=1, device="cpu")


@pytest.fixture(scope="module")
def planted():
    return planted_sparse_codes(n_samples=6000, n_atoms=64, dim=32, k_active=2, offset_scale=1.0, seed=0)


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(1)
    return (rng.normal(size=(600, 8)) * np.linspace(0.5, 3, 8) + 5).astype(np.float32)


@pytest.fixture(scope="module")
def topk_small(small):
    return S.train_sae(small, kind="topk", n_latents=32, k=4, max_epochs=3, batch_size=64, seed=0, **FAST)


def test_topk_recovers_planted_atoms(planted):
    """More atoms (64) than dimensions (32), 2 active per sample: a TopK SAE finds the atoms."""
    train, test = planted.X[:5000], planted.X[5000:]
    sae = S.train_sae(train, kind="topk", n_latents=128, k=2, max_epochs=20, batch_size=64, seed=0, **FAST)
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
    sae = S.train_sae(small, kind=kind, n_latents=32, max_epochs=3, batch_size=64, seed=0, **FAST, **extra)
    assert isinstance(sae, S.VARIANTS[kind])
    norms = sae.W_dec.detach().norm(dim=1).numpy()
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)  # in input units, after folding
    assert sae.folded
    F = sae.encode(small)
    assert sp.isspmatrix_csr(F) and F.shape == (600, 32) and F.dtype == np.float32
    assert np.all(F.data > 0)
    h = sae.history_
    assert isinstance(h, pd.DataFrame) and len(h) == 3 and np.isfinite(h["train_loss"]).all()
    for key in ("epoch", "train_fvu", "train_l0", "dead_fraction", "dense_fraction", "lr", "sparsity_coef", "time"):
        assert key in h.columns
    assert sae.is_trained_ and sae.train_summary_["epochs_run"] == 3 and not sae.train_summary_["stopped_early"]
    if kind == "topk":
        np.testing.assert_array_equal(np.diff(F.indptr), 4)
    if kind == "batchtopk":  # the calibrated threshold keeps about k per sample on the training data
        assert 1.5 < F.nnz / F.shape[0] < 8


def test_paper_preset(small):
    cfg = S.paper_config(8)
    assert (cfg.kind, cfg.n_latents, cfg.l1_coef, cfg.lr, cfg.batch_size, cfg.max_epochs) == (
        "relu", 10_000, 1e-3, 1e-4, 128, 500)
    assert (cfg.bias, cfg.mse_convention, cfg.normalize, cfg.decoder_norm) == ("untied", "mean", "none", "none")
    assert (cfg.lr_warmup, cfg.l1_warmup, cfg.auxk_alpha) == (0.0, 0.0, 0.0)
    sae = S.train_sae(small, preset="paper", n_latents=64, max_epochs=2, **FAST)  # explicit arguments override
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
    pd.testing.assert_frame_equal(loaded.history_, topk_small.history_)
    assert loaded.is_trained_ and loaded.train_summary_ == topk_small.train_summary_
    assert loaded.train_config_ == topk_small.train_config_
    a, b = topk_small.encode(small), loaded.encode(small)
    assert (a != b).nnz == 0
    np.testing.assert_array_equal(topk_small.decode(a), loaded.decode(b))
    with pytest.raises(FileExistsError):
        topk_small.save(tmp_path / "sae")
    with pytest.raises(ModelFormatError, match="topk"):
        S.ReLUSAE.load(path)


def test_save_load_keeps_variant_thresholds(tmp_path, small):
    sae = S.train_sae(small, kind="jumprelu", n_latents=16, k=3, max_epochs=2, seed=0, **FAST)
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
    assert (topk_small.encode(adata, use_rep="X_emb") != topk_small.encode(torch.from_numpy(small))).nnz == 0
    x_hat = topk_small.decode(topk_small.encode(small))
    np.testing.assert_allclose(x_hat, topk_small.reconstruct(small), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(topk_small.reconstruction_error(small), small - x_hat, rtol=1e-5, atol=1e-4)


def test_train_on_anndata_with_validation_and_early_stopping(small):
    adata = anndata.AnnData(np.zeros((600, 2), np.float32), obsm={"X_emb": small})
    sae = S.train_sae(adata, use_rep="X_emb", kind="topk", n_latents=16, k=2, max_epochs=30, validation_fraction=0.2,
                      early_stopping=True, patience=2, lr=0.05, seed=0, **FAST)
    assert {"val_loss", "val_fvu", "val_l0"} <= set(sae.history_.columns)
    assert sae.train_summary_["n_val"] == 120 and sae.train_summary_["n_train"] == 480


def test_warmups_ramp_lr_and_sparsity(small):
    sae = S.train_sae(small, kind="relu", n_latents=16, max_epochs=4, batch_size=600, lr=1e-3, lr_warmup=0.5,
                      lr_decay=0.0, l1_coef=2.0, l1_warmup=0.75, **FAST)
    coefs = list(sae.history_["sparsity_coef"])
    lrs = list(sae.history_["lr"])
    assert coefs == pytest.approx([2 / 3, 4 / 3, 2.0, 2.0])  # one step per epoch: ramps over 3 steps
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])


def test_auxk_trains_dead_latents(small):
    """Latents that never fire get gradient only through the AuxK loss (the plan's steps, run by hand)."""
    cfg = S.train.resolve_config(8, kind="topk", n_latents=16, k=2, max_epochs=1, batch_size=100, dead_after=1)
    moved = {}
    for alpha in (0.0, 1.0):
        sae = S.make_sae(cfg.replace(auxk_alpha=alpha))
        with torch.no_grad():
            sae.b_enc[:8] = 100.0  # the first 8 always win the top k, so the others never fire
        before = sae.W_enc[8:].detach().clone()
        plan = SAEPlan(sae, S.EmbeddingRows(small), np.arange(600), np.zeros(0, int), seed=0, prepare=False)
        plan.setup(SingleProcess(), torch.device("cpu"))
        plan.since_fired[8:] = 10  # already known to be dead
        for batch in plan.train_batches():
            plan.zero_grad()
            loss, _ = plan.training_step(batch)
            loss.backward()
            plan.optimizer_step()
        moved[alpha] = float((sae.W_enc[8:].detach() - before).abs().max())
    assert moved[0.0] == 0.0
    assert moved[1.0] > 0.0


def test_auxk_has_no_host_sync_and_weighs_by_the_dead_count():
    """AuxK from a dead mask alone: zero (not skipped) with nothing dead, the top ``k_aux`` dead latents otherwise,
    weighted by ``min(n_dead / k_aux, 1)``; written without ``int()`` of a tensor."""
    cfg = S.SAEConfig(kind="topk", d_in=6, n_latents=12, k=2, k_aux=4, auxk_alpha=0.5)
    sae = S.make_sae(cfg)
    gen = torch.Generator().manual_seed(0)
    x_n = torch.randn(9, 6, generator=gen)
    pre = sae.pre_activations(x_n)
    x_hat = sae.decode_normalised(sae.activate_train(pre))
    none_dead = torch.zeros(12, dtype=torch.bool)
    assert sae.auxiliary_loss(pre, x_n, x_hat, none_dead) is None  # on the CPU: skipped
    meta = sae.auxiliary_loss(pre.to("meta"), x_n.to("meta"), x_hat.to("meta"), none_dead.to("meta"))
    assert meta is not None and meta.shape == ()  # elsewhere: computed with weight 0, no host read
    for n_dead in (2, 4, 9):
        dead = torch.zeros(12, dtype=torch.bool)
        dead[:n_dead] = True
        got = sae.auxiliary_loss(pre, x_n, x_hat, dead)
        # the direct computation: top min(k_aux, n_dead) of the dead latents only
        sub = pre[:, :n_dead]
        values, index = sub.topk(min(4, n_dead), dim=1)
        f_aux = torch.zeros_like(sub).scatter(1, index, torch.relu(values))
        residual = (x_n - x_hat).detach()
        aux = ((f_aux @ sae.W_dec[:n_dead] - residual).pow(2).sum(1).mean()
               / (residual - residual.mean(0)).pow(2).sum(1).mean())
        torch.testing.assert_close(got, 0.5 * min(n_dead / 4, 1.0) * aux)
    assert S.make_sae(cfg.replace(auxk_alpha=0.0)).auxiliary_loss(pre, x_n, x_hat, dead) is None
    assert S.make_sae(cfg.replace(kind="relu", k=None)).auxiliary_loss(pre, x_n, x_hat, dead) is None


@pytest.mark.parametrize("kind, extra", [("topk", dict(k=2)), ("batchtopk", dict(k=2)), ("relu", {}),
                                         ("jumprelu", dict(k=2))])
def test_training_steps_never_read_the_device(small, kind, extra):
    """The hot path (step, backward, clipping, decoder projection, AuxK, dead-latent counters, statistics) runs on
    the meta device, where any host read (``int()``, ``float()``, ``bool()`` of a tensor) raises: so on a GPU it
    never waits for the device; the runner reads the summed statistics once per epoch."""
    with pytest.raises(RuntimeError):
        bool(torch.zeros(1, device="meta").any())
    cfg = S.train.resolve_config(8, kind=kind, n_latents=16, max_epochs=2, batch_size=64, grad_clip=1.0,
                                 dead_after=1, **extra)
    plan = SAEPlan(S.make_sae(cfg), S.EmbeddingRows(small), np.arange(600), np.zeros(0, int), prepare=False)
    plan.setup(SingleProcess(), torch.device("meta"))
    for _ in range(2):  # off the CPU AuxK never skips, so it runs here too
        for batch in plan.train_batches():
            plan.zero_grad()
            loss, stats = plan.training_step(batch)
            loss.backward()
            plan.optimizer_step()
    assert plan.step == 2 * 10 and all(v.device.type == "meta" for v in stats.values())


@pytest.mark.parametrize("call, message", [
    (lambda X: S.train_sae(X, kind="nope", **FAST), "Unknown SAE kind"),
    (lambda X: S.train_sae(X, kind="topk", n_latents=16, **FAST), "needs k"),
    (lambda X: S.train_sae(X, kind="topk", n_latents=16, k=40, **FAST), "k must be"),
    (lambda X: S.train_sae(X, kind="topk", k=2, decoder_norm="none", **FAST), "decoder_norm='unit'"),
    (lambda X: S.train_sae(X, kind="relu", max_epochs=1, patience=3, **FAST), "early_stopping=True"),
    (lambda X: S.train_sae(X, kind="relu", max_epochs=1, validation_fraction=1.0, **FAST), "validation_fraction"),
    (lambda X: S.train_sae(X, kind="relu", max_epochs=1, learning_rate=1.0, **FAST), "Unknown SAE setting"),
    (lambda X: S.train_sae(X, preset="nope", **FAST), "Unknown preset"),
    (lambda X: S.train_sae(X[:, 0], kind="relu", **FAST), "2-D"),
    (lambda X: S.train_sae(anndata.AnnData(X), kind="relu", **FAST), "use_rep"),
    (lambda X: S.train_sae(np.full((20, 3), 1.0), kind="relu", max_epochs=1, **FAST), "zero variance"),
])
def test_bad_training_inputs_raise(small, call, message):
    with pytest.raises(ValueError, match=message):
        call(small)


@pytest.mark.parametrize("old, new", [("epochs", "max_epochs"), ("val_fraction", "validation_fraction"),
                                      ("obsm_key", "use_rep")])
def test_renamed_arguments_name_their_new_names(small, old, new):
    with pytest.raises(TypeError, match=f"now called {new}="):
        S.train_sae(small, kind="relu", **{old: 1}, **FAST)


def test_early_stopping_without_validation_monitors_the_training_loss(small):
    with pytest.warns(UserWarning, match="monitors the training loss"):
        sae = S.train_sae(small, kind="topk", n_latents=16, k=2, max_epochs=2, early_stopping=True, **FAST)
    assert "val_loss" not in sae.history_.columns


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
    cfg = S.train.resolve_config(8, kind=kind, n_latents=256, **extra)
    sae = S.make_sae(cfg)
    X = torch.from_numpy(small)
    mean = X.mean(0)
    with torch.no_grad():
        sae.x_mean.copy_(mean)
        sae.x_scale.fill_(float((X - mean).pow(2).sum(1).mean().sqrt()) / np.sqrt(8))
    init_from_data(sae, S.EmbeddingRows(small), np.arange(600), seed=0)
    with torch.no_grad():
        x_n = sae.normalise(X)
        x_hat = sae.decode_normalised(sae.activate_train(sae.pre_activations(x_n)))
        fvu = float((x_hat - x_n).pow(2).sum() / (x_n - x_n.mean(0)).pow(2).sum())
    assert fvu < 1.0


# ---------------------------------------------------------------------- the shared runner: stop, restore, resume
def test_early_stopping_restores_the_best_epoch(planted):
    X = planted.X[:2000]
    sae = S.train_sae(X, kind="topk", n_latents=64, k=2, max_epochs=40, batch_size=64, lr=0.05, lr_decay=0.0,
                      validation_fraction=0.2, early_stopping=True, patience=2, seed=0, **FAST)
    h, summary = sae.history_, sae.train_summary_
    assert summary["stopped_early"] and len(h) < 40
    best = int(h["val_loss"].idxmin())
    assert summary["best_epoch"] == best and best < len(h) - 1  # the last epochs were worse
    # the returned weights are the best epoch's: its validation loss, recomputed in input units
    from dgdlens.data.split import train_validation_split

    _, val_idx = train_validation_split(len(X), 0.2, 0)
    err = ((X[val_idx] - sae.reconstruct(X[val_idx])) ** 2).sum(1).mean()
    scale = sae.train_config_["normalize_scale"]
    assert err / scale**2 == pytest.approx(h["val_loss"].iloc[best], rel=1e-4)
    assert err / scale**2 < h["val_loss"].iloc[-1]


def _interrupt_at_epoch(monkeypatch, epoch: int):
    """Ctrl-C during ``epoch``: the runner finishes it, writes the checkpoint and raises TrainingInterrupted."""
    original = SAEPlan.on_epoch_start

    def on_epoch_start(plan, e):
        if e == epoch:
            os.kill(os.getpid(), signal.SIGINT)
        original(plan, e)

    monkeypatch.setattr(SAEPlan, "on_epoch_start", on_epoch_start)
    return original


@pytest.mark.parametrize("kind", ["topk", "batchtopk"])
def test_checkpoint_and_resume_is_bit_exact(planted, tmp_path, monkeypatch, kind):
    X = planted.X[:1500]
    opts = dict(kind=kind, n_latents=96, k=2, max_epochs=6, batch_size=128, dead_after=300, validation_fraction=0.1,
                seed=3, **FAST)
    straight = S.train_sae(X, **opts)
    assert straight.history_["dead_fraction"].max() > 0  # AuxK was active: its state must resume too
    ckpt = tmp_path / "sae.ckpt"
    original = _interrupt_at_epoch(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted) as info:
        S.train_sae(X, checkpoint_path=str(ckpt), **opts)
    assert info.value.epoch == 3 and ckpt.exists()
    monkeypatch.setattr(SAEPlan, "on_epoch_start", original)
    resumed = S.train_sae(X, resume_from=str(ckpt), **opts)
    cols = [c for c in straight.history_.columns if c != "time"]
    pd.testing.assert_frame_equal(resumed.history_[cols], straight.history_[cols], check_exact=True)
    for name, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    # a checkpoint of other data (one value changed) or of another SAE is refused
    other = X.copy()
    other[-1, 0] += 1.0
    with pytest.raises(CheckpointError, match="other data"):
        S.train_sae(other, resume_from=str(ckpt), **opts)
    with pytest.raises(CheckpointError, match="other data"):
        S.train_sae(X, resume_from=str(ckpt), **{**opts, "n_latents": 64})


def test_checkpoint_written_during_training_resumes_to_the_same_model(small, tmp_path):
    opts = dict(kind="relu", n_latents=16, max_epochs=4, batch_size=64, seed=0, **FAST)
    ckpt = tmp_path / "relu.ckpt"
    done = S.train_sae(small, checkpoint_path=str(ckpt), checkpoint_every=2, **opts)
    again = S.train_sae(small, resume_from=str(ckpt), **opts)  # the final checkpoint: nothing left to train
    assert len(again.history_) == 4
    for name, value in done.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name


def test_a_crafted_pickle_checkpoint_is_refused_without_running(small, tmp_path):
    from test_train_runner import _Payload  # unpickling it would create the marker file

    marker = tmp_path / "pwned"
    (tmp_path / "crafted.ckpt").write_bytes(pickle.dumps({"epoch": 1, "payload": _Payload(marker)}))
    torch.save({"payload": _Payload(marker)}, tmp_path / "crafted.pt")  # torch's zip-pickle format too
    for name in ("crafted.ckpt", "crafted.pt"):
        with pytest.raises(CheckpointError, match="never loaded"):
            S.train_sae(small, kind="topk", n_latents=16, k=2, max_epochs=2, resume_from=str(tmp_path / name), **FAST)
    assert not marker.exists()


def test_history_plots_with_training_curves(small):
    import matplotlib.pyplot as plt  # the Agg backend: tests/conftest.py

    import dgdlens as dl

    sae = S.train_sae(small, kind="topk", n_latents=16, k=2, max_epochs=3, validation_fraction=0.2, **FAST)
    fig = dl.pl.training_curves(sae.history_)  # the list of dicts of before raised here
    assert fig is not None
    plt.close("all")


def test_old_saved_sae_still_loads(tmp_path, topk_small, small):
    """A directory saved before the fitted state (config with "history" as a list and "training"; "epochs")."""
    from dgdlens._io import load_model_dir, save_model_dir

    tensors, meta = load_model_dir(topk_small.save(tmp_path / "new"), kind="sae")
    for key in ("is_trained", "train_config", "train_summary", "saved_at"):
        meta.pop(key)
    meta["sae"]["epochs"] = meta["sae"].pop("max_epochs")
    meta["history"] = [{"epoch": 1, "loss": 0.5, "fvu": 0.2}, {"epoch": 2, "loss": 0.4, "fvu": 0.1}]
    meta["training"] = {"epochs_run": 2, "n_train": 600}
    save_model_dir(tmp_path / "old", tensors, meta, kind="sae")
    loaded = S.SAE.load(tmp_path / "old")
    assert loaded.config.max_epochs == topk_small.config.max_epochs
    assert loaded.is_trained_ and list(loaded.history_["loss"]) == [0.5, 0.4]
    assert loaded.train_summary_ == {"epochs_run": 2, "n_train": 600}
    assert (loaded.encode(small) != topk_small.encode(small)).nnz == 0
