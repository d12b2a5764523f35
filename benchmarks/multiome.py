"""Multimodal DGD vs MultiVI on simulated paired RNA + ATAC, one run, the models side by side.

Data: :func:`dgdlens.sim.simulate_multiome` (paired RNA and ATAC counts of the same cells, known cell types
``obs["cell_type"]``, batches ``obs["batch"]``, and the true peak-gene links in
``uns["truth"]["peak_gene_links"]``). Each seed draws its own data set (simulation seed = seed), its own
split and its own model initialisations, so the spread over seeds covers all three.

Models:

- ``DGD``: ``dl.models.DGD(mudata, n_latent=20, seed=seed)`` with its defaults (RNA negative binomial; ATAC
  ``"binary"``: Bernoulli on the binarised peaks with P(open) = 1 - exp(-library x softmax(decoder output)),
  library = the cell's total ATAC count), trained with its defaults (up to 500 epochs, early stopping on
  the validation cells, patience 20, the best epoch restored).
- ``MultiVI``: ``scvi.model.MULTIVI`` (scvi-tools) with its defaults (RNA zero-inflated NB, ATAC Bernoulli
  with P(open) = p(z) x cell factor x sigmoid(region factor); ``n_hidden`` = sqrt(n_peaks)) except
  ``n_latent=20`` (the same latent dimension as the DGD); trained with its defaults (up to 500 epochs,
  lr 1e-4, KL warm-up 50 epochs, early stopping on the validation reconstruction loss, patience 50; the
  weights of the last epoch are kept, as scvi-tools does).

Protocol, per seed (``--seeds``, default 0 1 2):

- split: a seeded 20 % of the cells (``--heldout``) are test cells; the rest is the training pool. Both models
  train on the same pool with the same validation cells (``dgdlens.data.split.train_validation_split`` of
  the pool, 10 %: the DGD's own ``validation_fraction=0.1`` split, handed to MultiVI as
  ``datasplitter_kwargs={"external_indexing": [train, validation]}``). Nothing is chosen on test cells; no
  setting is tuned (``--max-epochs`` caps both models equally when given).
- latent quality (test cells, full counts of both modalities): the DGD embeds them by its held-out inference
  (decoder and prior frozen), MultiVI by its encoder (posterior mean of the joint latent). Against
  ``cell_type``: ARI / NMI of KMeans (k = number of cell types, 10 inits) and of Leiden (scanpy, 15
  neighbours, resolution 1.0; no resolution is chosen, since choosing one needs the labels), and the
  scib-metrics bio-conservation metrics (isolated labels, KMeans NMI / ARI, silhouette of labels, cLISI on
  exact 90-nearest-neighbour graphs, each in [0, 1]; "bio" is their mean, as scib-metrics' Benchmarker
  aggregates them). A PCA row (10 PCs of log1p-CP10k RNA + 10 of log1p-CP10k ATAC, fitted on the training
  pool) is a floor.
- held-out likelihood by count splitting (:func:`dgdlens.evaluate.binomial_split`, p = 0.5, same split for
  both models): each test cell's RNA and ATAC counts are thinned into halves A and B (cells with an empty
  half are dropped, for both models). The latent comes from half A of both modalities (DGD: its own
  inference on A; MultiVI: encoder mean of A, amortised). Half B is scored per modality, nats per cell
  summed over features, mean over test cells:

  * RNA: DGD NB NLL with mean = B's RNA total x composition(z) (``get_reconstruction_error(B, z=z_A,
    modality="rna")``); MultiVI's own gene likelihood (ZINB by default) with mean = B's RNA total x
    ``px_scale``(z), its dispersion and its zero-inflation logits at z (``module.get_reconstruction_loss_expression``).
  * ATAC: Bernoulli NLL of B's binarised peaks. DGD: P(open) at B's ATAC total. MultiVI: P(open) = p(z) x
    the cell factor its library encoder gives for B x sigmoid(region factors)
    (``module.get_reconstruction_loss_accessibility``, the term MultiVI trains on; ``d_B`` from
    ``get_library_size_factors(B)``). Each model thus reads one scalar per cell from B, its library. The JSON
    also has MultiVI's ATAC NLL with the cell factor of A (``atac_nll_lib_from_a``).
- cross-modal prediction on the test cells: RNA -> ATAC (each model sees the test cells' RNA only; DGD: a
  MuData with only ``"rna"``, P(open) at the training cells' median ATAC library; MultiVI: the ATAC matrix
  set to zeros, its marker of an RNA-only cell, so the latent comes from the expression encoder alone;
  P(open) = ``get_normalized_accessibility`` x sigmoid(region factors) x the median training cell factor).
  AUROC against the binarised true peaks: the mean over cells of the per-cell AUROC and the pooled AUROC;
  baseline: each peak's fraction of open training cells. ATAC -> RNA (each model sees the ATAC only; MultiVI
  with RNA zeros): Pearson correlation between the predicted normalised expression log1p(1e4 x composition)
  and the true log1p(CP10k), per cell (mean over cells) and per gene (mean over genes with variance);
  baseline: each gene's mean log1p(CP10k) over the training cells.
- peak-gene links (the RNA -> ATAC predictions): Pearson correlation over test cells between a linked peak's
  predicted accessibility and its gene's true log1p(CP10k), mean over the true links, against as many
  random unlinked peak-gene pairs (and the AUROC separating the two sets); the observed binarised peaks
  give the data's own row.
- time: wall-clock seconds of ``train()``, epochs, seconds per epoch (median of the epochs' own times),
  and the process's peak RSS during the fit (VmHWM reset before each fit; in-process, so it includes what
  the process already held). Same ``--threads`` for both models.

``--scale`` measures speed and memory at 100k peaks instead (5,000 cells x 2,000 genes x 100,000 peaks by
default): the data are simulated once in a subprocess and written to an ``.h5mu``; each model is fitted in
its own fresh subprocess for ``--scale-epochs`` epochs (no early stopping; both with a 10 % validation pass
each epoch) and reports seconds per epoch and its peak RSS (VmHWM of that process: overall, and since the
data were loaded).

Needs scvi-tools, mudata, scanpy and scib-metrics (``pip install 'dgdlens[benchmark]'``, a separate
environment).

Usage::

    python benchmarks/multiome.py                        # 3 seeds, 2,000 cells x 1,000 genes x 5,000 peaks
    python benchmarks/multiome.py --quick                # smoke run: tiny data, 1 seed, 30 epochs
    python benchmarks/multiome.py --scale --threads 2    # seconds per epoch and peak RSS at 100k peaks
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import peak_rss_mb, reset_peak_rss  # noqa: E402  (VmHWM, as every benchmark reads it)

HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results" / "multiome"
LABEL_KEY, BATCH_KEY = "cell_type", "batch"
MODALITIES = ("rna", "atac")

warnings.filterwarnings("ignore", category=FutureWarning, module=r"mudata.*")
warnings.filterwarnings("ignore", message=r".*pull_on_update.*")


def command_line() -> str:
    return "python benchmarks/multiome.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:])


# ------------------------------------------------------------------------------------------ data

def simulate(args, seed: int, **overrides):
    import dgdlens as dl

    kw = {"n_cells": args.cells, "n_genes": args.genes, "n_peaks": args.peaks, "n_rna_groups": args.rna_groups,
          "n_atac_groups": args.atac_groups, "n_batches": args.batches, "linked_fraction": args.linked_fraction,
          "type_effect": args.type_effect, "seed": seed} | overrides
    sim = getattr(dl.sim, "simulate_multiome", None)
    if sim is None:  # not exported (yet)
        from dgdlens.sim.multiome import simulate_multiome as sim
    mdata = sim(**kw)
    for key in (LABEL_KEY, BATCH_KEY):  # the labels and batches in the global obs, whatever the simulator did
        if key not in mdata.obs.columns:
            mdata.obs[key] = obs_column(mdata, key)
    return mdata


def obs_column(mdata, key: str) -> np.ndarray:
    if key in mdata.obs.columns:
        return mdata.obs[key].to_numpy()
    for mod in MODALITIES:
        if key in mdata.mod[mod].obs.columns:
            return mdata.mod[mod].obs[key].to_numpy()
        if f"{mod}:{key}" in mdata.obs.columns:
            return mdata.obs[f"{mod}:{key}"].to_numpy()
    raise KeyError(f"{key!r} is in no obs of the MuData")


def counts(mdata, mod: str) -> sp.csr_matrix:
    return sp.csr_matrix(mdata.mod[mod].X, dtype=np.float32)


def make_mudata(mods: dict, template, obs: pd.DataFrame):
    """A MuData of the given count matrices (``{modality: CSR}``) with ``template``'s var and the cells' obs
    (in the global obs and in every modality's, plus ``_indices``, which MultiVI reads from new data)."""
    import anndata as ad
    import mudata as md

    obs = obs.copy()
    obs["_indices"] = np.arange(len(obs))
    mdata = md.MuData({k: ad.AnnData(sp.csr_matrix(x, dtype=np.float32), obs=obs.copy(),
                                      var=template.mod[k].var.copy()) for k, x in mods.items()})
    for c in obs.columns:
        mdata.obs[c] = obs[c].values
    return mdata


def subset(mdata, idx: np.ndarray):
    obs = pd.DataFrame({LABEL_KEY: obs_column(mdata, LABEL_KEY), BATCH_KEY: obs_column(mdata, BATCH_KEY)},
                       index=mdata.obs_names).iloc[idx]
    for c in obs.columns:
        obs[c] = pd.Categorical(obs[c].astype(str))
    return make_mudata({m: counts(mdata, m)[idx] for m in MODALITIES}, mdata, obs)


def split_cells(n: int, seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_out = round(n * fraction)
    return np.sort(order[n_out:]), np.sort(order[:n_out])


def count_split(test, seed: int):
    """Halves A and B (MuData each, the same cells) of every test cell's counts, both modalities split
    independently (p = 0.5); cells with an empty half in either modality are dropped."""
    from dgdlens.evaluate import binomial_split

    parts = {m: binomial_split(counts(test, m), 0.5, seed=10_000 * (i + 1) + seed) for i, m in enumerate(MODALITIES)}
    keep = np.ones(test.n_obs, dtype=bool)
    for a, b in parts.values():
        keep &= (np.asarray(a.sum(1)).ravel() > 0) & (np.asarray(b.sum(1)).ravel() > 0)
    obs = test.obs[[LABEL_KEY, BATCH_KEY]].iloc[np.flatnonzero(keep)]
    half_a = make_mudata({m: parts[m][0][keep] for m in MODALITIES}, test, obs)
    half_b = make_mudata({m: parts[m][1][keep] for m in MODALITIES}, test, obs)
    return half_a, half_b, keep


def log_cp10k(x) -> np.ndarray:
    x = sp.csr_matrix(x, dtype=np.float64)
    lib = np.asarray(x.sum(1)).ravel()
    return np.log1p(np.asarray(sp.diags(1e4 / np.maximum(lib, 1e-12)) @ x.todense()))


# ------------------------------------------------------------------------------------------ metrics

def auroc_per_row(score: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Rank AUROC of every row (ties averaged); NaN where a row is all positive or all negative."""
    from scipy.stats import rankdata

    ranks = rankdata(score, axis=1)
    n_pos = truth.sum(1).astype(np.float64)
    n_neg = truth.shape[1] - n_pos
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (np.where(truth, ranks, 0.0).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def auroc_pooled(score: np.ndarray, truth: np.ndarray) -> float:
    return float(auroc_per_row(score.reshape(1, -1), truth.reshape(1, -1))[0])


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (a * b).sum(1) / den
    r[den == 0] = np.nan
    return r


def leiden(z: np.ndarray, seed: int) -> np.ndarray:
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(np.asarray(z, dtype=np.float32))
    sc.pp.neighbors(a, use_rep="X", n_neighbors=15, random_state=seed)
    sc.tl.leiden(a, resolution=1.0, flavor="igraph", n_iterations=2, directed=False, random_state=seed)
    return a.obs["leiden"].to_numpy()


def kmeans(z: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    return KMeans(k, n_init=10, random_state=seed).fit_predict(z)


def latent_metrics(z: np.ndarray, labels: np.ndarray, batches: np.ndarray, seed: int) -> dict:
    """Clustering agreement and scib-metrics bio conservation of one embedding of the test cells."""
    from scib_metrics import clisi_knn, isolated_labels, nmi_ari_cluster_labels_kmeans, silhouette_label
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    from dgdlens.evaluate import cluster_agreement

    z = np.asarray(z, dtype=np.float32)
    labels = np.asarray(labels).astype(str)
    k = len(np.unique(labels))
    out = {}
    for name, pred in (("leiden", leiden(z, seed)), ("kmeans", kmeans(z, k, seed))):
        s = cluster_agreement(pred, labels)
        out |= {f"{name}_ari": s["ari"], f"{name}_nmi": s["nmi"], f"{name}_n_clusters": int(pd.Series(pred).nunique())}
    n_neighbors = min(90, len(z) - 1)  # scib-metrics' Benchmarker uses 90 for cLISI (self included)
    dist, idx = NearestNeighbors(n_neighbors=n_neighbors).fit(z).kneighbors(z)
    knn = NeighborsResults(indices=idx, distances=dist)
    km = nmi_ari_cluster_labels_kmeans(z, labels)
    scib = {"isolated_labels": float(isolated_labels(z, labels, np.asarray(batches).astype(str))),
            "kmeans_nmi_scib": float(km["nmi"]), "kmeans_ari_scib": float(km["ari"]),
            "silhouette_label": float(silhouette_label(z, labels)), "clisi": float(clisi_knn(knn, labels))}
    out |= scib
    out["bio_conservation"] = float(np.mean(list(scib.values())))
    return out


def pca_baseline(pool, test, n_components: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    blocks = []
    for m in MODALITIES:
        pca = PCA(n_components // 2, random_state=seed).fit(log_cp10k(counts(pool, m)))
        zt = pca.transform(log_cp10k(counts(test, m)))
        blocks.append(zt / np.sqrt(pca.explained_variance_.sum()))
    return np.hstack(blocks)


def link_pairs(mdata, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(linked peak indices, their gene indices, random unlinked peak indices, random gene indices)."""
    truth = (mdata.uns.get("truth") or {}).get("peak_gene_links")
    if not truth:
        return None
    peaks, genes = np.asarray(truth["peak"]), np.asarray(truth["gene"])
    if len(peaks) == 0:
        return None
    peak_names, gene_names = mdata.mod["atac"].var_names, mdata.mod["rna"].var_names
    p = peaks.astype(int) if np.issubdtype(peaks.dtype, np.integer) else peak_names.get_indexer(peaks.astype(str))
    g = genes.astype(int) if np.issubdtype(genes.dtype, np.integer) else gene_names.get_indexer(genes.astype(str))
    ok = (p >= 0) & (g >= 0)
    p, g = p[ok], g[ok]
    linked = set(zip(p.tolist(), g.tolist()))
    rp, rg = [], []
    while len(rp) < len(p):
        a, b = int(rng.integers(len(peak_names))), int(rng.integers(len(gene_names)))
        if (a, b) not in linked:
            rp.append(a)
            rg.append(b)
    return p, g, np.asarray(rp), np.asarray(rg)


def link_scores(acc: np.ndarray, expr: np.ndarray, pairs) -> dict:
    """Pearson r over cells of accessibility (cells x peaks) with expression (cells x genes) for the
    linked pairs and for random unlinked pairs."""
    p, g, rp, rg = pairs
    r_link = pearson_rows(acc[:, p].T, expr[:, g].T)
    r_rand = pearson_rows(acc[:, rp].T, expr[:, rg].T)
    a, b = r_link[np.isfinite(r_link)], r_rand[np.isfinite(r_rand)]
    auc = np.nan
    if len(a) and len(b):
        s = np.concatenate([a, b])
        auc = auroc_pooled(s, np.r_[np.ones(len(a), bool), np.zeros(len(b), bool)])
    return {"r_linked": float(np.mean(a)) if len(a) else np.nan, "r_random": float(np.mean(b)) if len(b) else np.nan,
            "auroc_linked_vs_random": auc, "n_links": len(p)}


# ------------------------------------------------------------------------------------------ DGD

class DGDRunner:
    name = "DGD"

    def __init__(self, label: str, cfg: dict):
        self.label, self.cfg = label, dict(cfg)

    def fit(self, pool, train_idx, val_idx, seed: int, args) -> dict:
        import dgdlens as dl

        cfg = dict(self.cfg)
        train_kwargs = cfg.pop("train", {})
        if args.batches > 1:
            cfg.setdefault("batch_key", BATCH_KEY)
        cfg.setdefault("n_latent", args.n_latent)
        model = dl.models.DGD(pool, seed=seed, **cfg)
        if hasattr(model, "val_idx") and not np.array_equal(np.sort(model.val_idx), val_idx):
            raise RuntimeError("the DGD's validation cells differ from the ones handed to MultiVI")
        if args.max_epochs is not None:
            train_kwargs.setdefault("max_epochs", args.max_epochs)
        has_reset = reset_peak_rss()
        tic = time.perf_counter()
        model.train(**({"device": "cpu", "progress": False} | train_kwargs))
        fit_s = time.perf_counter() - tic
        self.model = model
        hist = model.history_
        epochs = len(hist)
        summary = getattr(model, "train_summary_", None) or {}
        self.likelihoods = {m["name"]: m["likelihood"] for m in model.params.get("modalities", [])}
        return {"fit_s": fit_s, "epochs": epochs, "best_epoch": summary.get("best_epoch"),
                "s_per_epoch": float(np.median(hist["time"])) if "time" in hist else fit_s / max(epochs, 1),
                "fit_peak_rss_mb": peak_rss_mb() if has_reset else np.nan}

    def latent(self, mdata) -> np.ndarray:
        return self.model.get_latent_representation(mdata, progress=False)

    def split_nll(self, half_a, half_b) -> dict:
        z = self.latent(half_a)
        out = {}
        for m in MODALITIES:
            out[f"{m}_nll"] = np.asarray(self.model.get_reconstruction_error(half_b, z=z, per_sample=True, modality=m,
                                                                             progress=False))
        return out

    def rna_to_atac(self, test) -> np.ndarray:
        only = make_mudata({"rna": counts(test, "rna")}, test, test.obs[[LABEL_KEY, BATCH_KEY]])
        return np.asarray(self.model.predict_modality(only, "atac", progress=False), dtype=np.float64)

    def atac_to_rna(self, test) -> np.ndarray:
        only = make_mudata({"atac": counts(test, "atac")}, test, test.obs[[LABEL_KEY, BATCH_KEY]])
        mean = np.asarray(self.model.predict_modality(only, "rna", progress=False), dtype=np.float64)
        return mean / mean.sum(1, keepdims=True)

    def scored_as(self) -> str:
        name = {"binary": "Bernoulli", "nb": "NB", "poisson": "Poisson"}
        return ", ".join(f"{m.upper()} {name.get(self.likelihoods.get(m), self.likelihoods.get(m))}" for m in MODALITIES)


# ------------------------------------------------------------------------------------------ MultiVI

class MultiVIRunner:
    name = "MultiVI"

    def __init__(self, label: str, cfg: dict):
        self.label, self.cfg = label, dict(cfg)

    def fit(self, pool, train_idx, val_idx, seed: int, args) -> dict:
        import scvi
        from lightning.pytorch.callbacks import Callback

        class EpochTimer(Callback):
            def __init__(self):
                self.starts = []

            def on_train_epoch_start(self, trainer, pl_module):
                self.starts.append(time.perf_counter())

            def on_train_end(self, trainer, pl_module):
                self.starts.append(time.perf_counter())

        scvi.settings.seed = seed
        scvi.settings.dl_num_workers = 0
        data = pool.copy()
        scvi.model.MULTIVI.setup_mudata(data, batch_key=BATCH_KEY if args.batches > 1 else None,
                                        modalities={"rna_layer": "rna", "atac_layer": "atac"})
        cfg = dict(self.cfg)
        train_kwargs = cfg.pop("train", {})
        cfg.setdefault("n_latent", args.n_latent)
        model = scvi.model.MULTIVI(data, **cfg)
        if args.max_epochs is not None:
            train_kwargs.setdefault("max_epochs", args.max_epochs)
        timer = EpochTimer()
        has_reset = reset_peak_rss()
        tic = time.perf_counter()
        model.train(**({"accelerator": "cpu", "enable_progress_bar": False, "early_stopping": True,
                        "datasplitter_kwargs": {"external_indexing": [np.asarray(train_idx), np.asarray(val_idx)]}}
                       | train_kwargs), callbacks=[timer])
        fit_s = time.perf_counter() - tic
        self.model = model
        epochs = len(model.history["elbo_train"])
        val = model.history.get("reconstruction_loss_validation")
        best = int(np.argmin(val.to_numpy().ravel())) + 1 if val is not None and len(val) else None
        module = model.module
        self.gene_likelihood = module.gene_likelihood
        self.region_factor = (torch_sigmoid(module.region_factors) if module.region_factors is not None
                              else np.ones(module.n_input_regions))
        self.median_cell_factor = float(np.median(model.get_library_size_factors()["accessibility"]))
        return {"fit_s": fit_s, "epochs": epochs, "best_epoch": best,
                "s_per_epoch": float(np.median(np.diff(timer.starts))) if len(timer.starts) > 1 else fit_s / max(epochs, 1),
                "fit_peak_rss_mb": peak_rss_mb() if has_reset else np.nan}

    def latent(self, mdata) -> np.ndarray:
        return self.model.get_latent_representation(mdata)

    def split_nll(self, half_a, half_b) -> dict:
        """MultiVI's reconstruction terms of half B at the encoder mean of half A (see the module docstring)."""
        import torch

        model, module = self.model, self.model.module
        module.eval()
        x_b = {m: counts(half_b, m) for m in MODALITIES}
        lib_b = np.asarray(x_b["rna"].sum(1)).ravel()
        lib_factors_b = model.get_library_size_factors(half_b)
        d_b = np.asarray(lib_factors_b["accessibility"]).reshape(-1)
        log_lib_enc_b = np.asarray(lib_factors_b["expression"]).reshape(-1)  # MultiVI's RNA library encoder on B
        a = model._validate_anndata(half_a)
        loader = model._make_data_loader(adata=a, batch_size=256, shuffle=False)
        rna, rna_enc, atac, atac_lib_a = [], [], [], []
        i = 0
        with torch.inference_mode():
            for tensors in loader:
                inf = module.inference(**module._get_inference_input(tensors))
                n = inf["qz_m"].shape[0]
                gen_in = module._get_generative_input(tensors, inf)
                gen_in["libsize_expr"] = torch.log(torch.as_tensor(lib_b[i:i + n], dtype=torch.float32))[:, None]
                gen = module.generative(**gen_in, use_z_mean=True)  # decoded at the posterior mean of A
                xr = torch.as_tensor(x_b["rna"][i:i + n].toarray())
                xa = torch.as_tensor(x_b["atac"][i:i + n].toarray())
                rna.append(module.get_reconstruction_loss_expression(xr, gen["px_rate"], gen["px_r"], gen["px_dropout"]))
                rate_enc = gen["px_scale"] * torch.exp(torch.as_tensor(log_lib_enc_b[i:i + n], dtype=torch.float32))[:, None]
                rna_enc.append(module.get_reconstruction_loss_expression(xr, rate_enc, gen["px_r"], gen["px_dropout"]))
                d = torch.as_tensor(d_b[i:i + n], dtype=torch.float32)[:, None]
                atac.append(module.get_reconstruction_loss_accessibility(xa, gen["p"], d))
                atac_lib_a.append(module.get_reconstruction_loss_accessibility(xa, gen["p"], inf["libsize_acc"]))
                i += n
        assert i == half_a.n_obs
        return {"rna_nll": torch.cat(rna).double().numpy(), "atac_nll": torch.cat(atac).double().numpy(),
                "rna_nll_encoder_lib_b": torch.cat(rna_enc).double().numpy(),
                "atac_nll_lib_from_a": torch.cat(atac_lib_a).double().numpy()}

    def _without(self, test, mod: str):
        obs = test.obs[[LABEL_KEY, BATCH_KEY]]
        mods = {m: (sp.csr_matrix(counts(test, m).shape, dtype=np.float32) if m == mod else counts(test, m))
                for m in MODALITIES}
        return make_mudata(mods, test, obs)

    def rna_to_atac(self, test) -> np.ndarray:
        p = self.model.get_normalized_accessibility(self._without(test, "atac"), return_numpy=True)
        self.last_p = np.asarray(p, dtype=np.float64)
        return self.last_p * self.region_factor[None, :] * self.median_cell_factor

    def atac_to_rna(self, test) -> np.ndarray:
        return np.asarray(self.model.get_normalized_expression(self._without(test, "rna"), return_numpy=True),
                          dtype=np.float64)

    def scored_as(self) -> str:
        return f"RNA {self.gene_likelihood.upper()}, ATAC Bernoulli"


def torch_sigmoid(t) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.sigmoid(t).cpu().numpy().astype(np.float64)


# ------------------------------------------------------------------------------------------ one seed

def run_seed(seed: int, args, runners) -> dict:
    rows = {"latent": [], "nll": [], "cross": [], "links": [], "time": []}
    tic = time.perf_counter()
    mdata = simulate(args, seed)
    sim_s = time.perf_counter() - tic
    pool_idx, test_idx = split_cells(mdata.n_obs, seed, args.heldout)
    pool, test = subset(mdata, pool_idx), subset(mdata, test_idx)
    from dgdlens.data.split import train_validation_split

    train_idx, val_idx = train_validation_split(pool.n_obs, 0.1, seed)
    half_a, half_b, kept = count_split(test, seed)
    labels, batches = obs_column(test, LABEL_KEY), obs_column(test, BATCH_KEY)
    rna_true = log_cp10k(counts(test, "rna"))
    atac_true = counts(test, "atac").toarray() > 0
    pairs = link_pairs(mdata, np.random.default_rng(30_000 + seed))
    common = {"seed": seed}
    print(f"  seed {seed}: {mdata.n_obs} cells ({len(pool_idx)} pool = {len(train_idx)} train + {len(val_idx)} "
          f"validation, {len(test_idx)} test, {int(kept.sum())} with both halves non-empty), "
          f"{len(np.unique(labels))} cell types; simulated in {sim_s:.1f} s", flush=True)

    # floors and baselines (no model)
    z = pca_baseline(pool, test, args.n_latent, seed)
    rows["latent"].append(common | {"model": "PCA (RNA+ATAC)"} | latent_metrics(z, labels, batches, seed))
    frac_open = np.asarray((counts(pool, "atac") > 0).mean(0)).ravel()
    base_atac = np.broadcast_to(frac_open, atac_true.shape)
    base_rna = np.broadcast_to(log_cp10k(counts(pool, "rna")).mean(0), rna_true.shape)
    rows["cross"].append(common | {"model": "baseline: per-peak / per-gene mean"}
                         | cross_scores(base_atac, atac_true, base_rna, rna_true, constant=True))
    if pairs is not None:
        rows["links"].append(common | {"model": "data (observed peaks)"} | link_scores(atac_true.astype(float), rna_true, pairs))

    for runner in runners:
        t0 = time.perf_counter()
        fit = runner.fit(pool, train_idx, val_idx, seed, args)
        rows["time"].append(common | {"model": runner.label} | fit)
        z = runner.latent(test)
        rows["latent"].append(common | {"model": runner.label} | latent_metrics(z, labels, batches, seed))
        nll = runner.split_nll(half_a, half_b)
        row = common | {"model": runner.label,
                        "inference": "own MAP on A" if runner.name == "DGD" else "encoder mean of A (amortised)",
                        "scored_as": runner.scored_as(), "n_test": int(kept.sum())}
        for k, v in nll.items():
            row[k] = float(np.mean(v))
        row["total_nll"] = row["rna_nll"] + row["atac_nll"]
        rows["nll"].append(row)
        acc = runner.rna_to_atac(test)
        expr = runner.atac_to_rna(test)
        pred_rna = np.log1p(1e4 * expr)
        cross = common | {"model": runner.label} | cross_scores(acc, atac_true, pred_rna, rna_true)
        if runner.name == "MultiVI":  # get_normalized_accessibility's own output (no region / cell factors)
            cross["pooled_auroc_p_only"] = auroc_pooled(runner.last_p, atac_true)
            cross["cell_auroc_p_only"] = float(np.nanmean(auroc_per_row(runner.last_p, atac_true)))
        rows["cross"].append(cross)
        if pairs is not None:
            rows["links"].append(common | {"model": runner.label} | link_scores(acc, rna_true, pairs))
        print(f"    {runner.label:<10} fit {fit['fit_s']:6.1f} s ({fit['epochs']} epochs)  RNA NLL {row['rna_nll']:9.2f}  "
              f"ATAC NLL {row['atac_nll']:9.2f}  ARI(KMeans) {rows['latent'][-1]['kmeans_ari']:.3f}  "
              f"AUROC(cell) {cross['cell_auroc']:.3f}  r(cell) {cross['cell_pearson']:.3f}  "
              f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    return rows


def cross_scores(acc, atac_true, pred_rna, rna_true, constant: bool = False) -> dict:
    out = {"cell_auroc": float(np.nanmean(auroc_per_row(np.asarray(acc), atac_true))),
           "pooled_auroc": auroc_pooled(np.asarray(acc), atac_true),
           "cell_pearson": float(np.nanmean(pearson_rows(np.asarray(pred_rna), rna_true)))}
    out["gene_pearson"] = np.nan if constant else float(np.nanmean(pearson_rows(np.asarray(pred_rna).T, rna_true.T)))
    return out


# ------------------------------------------------------------------------------------------ tables

def mean_sd(df: pd.DataFrame, keys: list[str], cols: dict[str, int]) -> pd.DataFrame:
    """Mean ± sd over seeds of ``cols`` (``{column: decimals}``) per group, as strings."""
    g = df.groupby(keys, sort=False)
    out = g.size().rename("seeds").reset_index()
    mean, sd = g[list(cols)].mean(), g[list(cols)].std(ddof=1)
    for c, d in cols.items():
        out[c] = [("-" if pd.isna(m) else f"{m:.{d}f}") + ("" if pd.isna(s) else f" ± {s:.{d}f}")
                  for m, s in zip(mean[c], sd[c])]
    return out[keys + list(cols) + ["seeds"]]


def to_markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def tables(rows: dict, args) -> list[tuple[str, pd.DataFrame]]:
    out = []
    lat = pd.DataFrame(rows["latent"])
    out.append((("Latent of the test cells vs cell types (higher is better; bio = mean of the five scib-metrics "
                "columns isolated, KMeans NMI/ARI (scib), silhouette, cLISI)"),
                mean_sd(lat, ["model"], {"leiden_ari": 3, "leiden_nmi": 3, "kmeans_ari": 3, "kmeans_nmi": 3,
                                         "isolated_labels": 3, "silhouette_label": 3, "clisi": 3,
                                         "bio_conservation": 3})))
    if rows["nll"]:
        nll = pd.DataFrame(rows["nll"])
        out.append((("Held-out NLL by count splitting: latent from half A, half B scored (nats per test cell; "
                    "lower is better)"),
                    mean_sd(nll, ["model", "inference", "scored_as"], {"rna_nll": 1, "atac_nll": 1, "total_nll": 1})))
    cross = pd.DataFrame(rows["cross"])
    out.append((("Cross-modal prediction on the test cells: RNA -> ATAC AUROC against the binarised peaks; "
                "ATAC -> RNA Pearson r with log1p(CP10k) (higher is better)"),
                mean_sd(cross, ["model"], {"cell_auroc": 3, "pooled_auroc": 3, "cell_pearson": 3, "gene_pearson": 3})))
    if rows["links"]:
        links = pd.DataFrame(rows["links"])
        out.append((("Peak-gene links: Pearson r over test cells of (predicted) accessibility with the gene's "
                    "log1p(CP10k), true links vs random unlinked pairs"),
                    mean_sd(links, ["model"], {"r_linked": 3, "r_random": 3, "auroc_linked_vs_random": 3})))
    if rows["time"]:
        tm = pd.DataFrame(rows["time"])
        cap = "each model's default (500)" if args.max_epochs is None else str(args.max_epochs)
        out.append(((f"Training (max epochs: {cap}; early stopping on the shared validation cells; {args.threads} "
                    "thread(s); peak RSS is this process's high-water mark during the fit)"),
                    mean_sd(tm, ["model"], {"fit_s": 1, "epochs": 0, "best_epoch": 0, "s_per_epoch": 3,
                                            "fit_peak_rss_mb": 0})))
    return out


def header(args) -> str:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    import dgdlens as dl

    versions = [f"dgdlens {dl.__version__}", f"torch {torch.__version__}"]
    for pkg in ("scvi-tools", "scib-metrics", "mudata", "scanpy"):
        try:
            versions.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            versions.append(f"{pkg} missing")
    return (f"{', '.join(versions)}; {torch.get_num_threads()} torch thread(s); load average at start "
            f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


def write_outputs(out_dir: Path, tag: str, text: str, payload: dict) -> None:
    from dgdlens._io import atomic_write_text, to_jsonable

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / f"{tag}.md", text)
    atomic_write_text(out_dir / f"{tag}.json", json.dumps(to_jsonable(payload), indent=1, default=str))
    print(f"\nwrote {out_dir / (tag + '.md')} and {tag}.json")


# ------------------------------------------------------------------------------------------ --scale

def scale_worker(args) -> None:
    """One fit in this fresh process: ``--scale-worker generate|dgd|multivi``; writes ``--scale-result``."""
    import torch

    torch.set_num_threads(args.threads)
    from dgdlens._io import atomic_path, atomic_write_text

    path = Path(args.scale_data)
    if args.scale_worker == "generate":
        tic = time.perf_counter()
        mdata = simulate(args, 0, n_cells=args.scale_cells, n_genes=args.scale_genes, n_peaks=args.scale_peaks)
        sim_s = time.perf_counter() - tic
        for m in MODALITIES:
            mdata.mod[m].X = sp.csr_matrix(mdata.mod[m].X, dtype=np.float32)
        with atomic_path(path) as tmp:
            mdata.write(tmp)
        atomic_write_text(Path(args.scale_result), json.dumps({"simulate_s": sim_s, "peak_rss_mb": peak_rss_mb(),
                                                               "nnz_atac": int(mdata.mod["atac"].X.nnz)}))
        return
    import mudata as md

    tic = time.perf_counter()
    mdata = md.read_h5mu(path)
    load_s = time.perf_counter() - tic
    rss_load = peak_rss_mb()
    has_reset = reset_peak_rss()
    args.batches = 1
    epochs = args.scale_epochs
    row = {"model": {"dgd": "DGD", "multivi": "MultiVI"}[args.scale_worker], "cells": mdata.n_obs,
           "genes": mdata.mod["rna"].n_vars, "peaks": mdata.mod["atac"].n_vars, "epochs": epochs,
           "threads": args.threads, "load_s": load_s, "rss_after_load_mb": rss_load}
    from dgdlens.data.split import train_validation_split

    train_idx, val_idx = train_validation_split(mdata.n_obs, 0.1, 0)
    if args.scale_worker == "dgd":
        import dgdlens as dl

        tic = time.perf_counter()
        model = dl.models.DGD(mdata, n_latent=args.n_latent, seed=0)
        row["init_s"] = time.perf_counter() - tic
        tic = time.perf_counter()
        model.train(max_epochs=epochs, early_stopping=False, device="cpu", progress=False)
        row["train_s"] = time.perf_counter() - tic
        row["s_per_epoch"] = float(np.median(model.history_["time"])) if "time" in model.history_ else row["train_s"] / epochs
    else:
        import scvi
        from lightning.pytorch.callbacks import Callback

        class EpochTimer(Callback):
            def __init__(self):
                self.starts = []

            def on_train_epoch_start(self, trainer, pl_module):
                self.starts.append(time.perf_counter())

            def on_train_end(self, trainer, pl_module):
                self.starts.append(time.perf_counter())

        scvi.settings.seed = 0
        scvi.settings.dl_num_workers = 0
        tic = time.perf_counter()
        scvi.model.MULTIVI.setup_mudata(mdata, modalities={"rna_layer": "rna", "atac_layer": "atac"})
        model = scvi.model.MULTIVI(mdata, n_latent=args.n_latent)
        row["init_s"] = time.perf_counter() - tic
        timer = EpochTimer()
        tic = time.perf_counter()
        model.train(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False, early_stopping=False,
                    check_val_every_n_epoch=1, callbacks=[timer],
                    datasplitter_kwargs={"external_indexing": [train_idx, val_idx]})
        row["train_s"] = time.perf_counter() - tic
        row["s_per_epoch"] = float(np.median(np.diff(timer.starts))) if len(timer.starts) > 1 else row["train_s"] / epochs
    row["peak_rss_mb"] = peak_rss_mb() if not has_reset else max(rss_load, peak_rss_mb())
    row["fit_peak_rss_mb"] = peak_rss_mb() if has_reset else np.nan
    row["n_params"] = int(sum(p.numel() for p in model.module.parameters()))
    from dgdlens._io import to_jsonable

    atomic_write_text(Path(args.scale_result), json.dumps(to_jsonable(row)))


def run_scale(args) -> None:
    data = Path(args.scale_data or Path(tempfile.gettempdir()) / "dgdlens-multiome-scale" /
                f"multiome_{args.scale_cells}x{args.scale_genes}x{args.scale_peaks}.h5mu")
    tmpdir = Path(tempfile.mkdtemp(prefix="multiome-scale-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    base = [sys.executable, str(HERE), "--scale-data", str(data), "--threads", str(args.threads),
            "--scale-cells", str(args.scale_cells), "--scale-genes", str(args.scale_genes),
            "--scale-peaks", str(args.scale_peaks), "--scale-epochs", str(args.scale_epochs),
            "--n-latent", str(args.n_latent), "--rna-groups", str(args.rna_groups),
            "--atac-groups", str(args.atac_groups)]
    head = header(args)
    print(head)
    print(command_line(), flush=True)
    gen = None
    if not data.exists():
        res = tmpdir / "generate.json"
        print(f"simulating {args.scale_cells} cells x {args.scale_genes} genes x {args.scale_peaks} peaks -> {data}", flush=True)
        subprocess.run(base + ["--scale-worker", "generate", "--scale-result", str(res)], check=True, env=env)
        gen = json.loads(res.read_text())
        print(f"  simulated in {gen['simulate_s']:.0f} s (peak RSS {gen['peak_rss_mb']:.0f} MB, "
              f"{gen['nnz_atac']:,} ATAC non-zeros)", flush=True)
    else:
        print(f"reusing {data}")
    rows = []
    for model in args.scale_models:
        res = tmpdir / f"{model}.json"
        print(f"fitting {model} for {args.scale_epochs} epochs in a fresh process ...", flush=True)
        subprocess.run(base + ["--scale-worker", model, "--scale-result", str(res)], check=True, env=env)
        rows.append(json.loads(res.read_text()))
        print(f"  {rows[-1]['s_per_epoch']:.1f} s per epoch, peak RSS {rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
    df = pd.DataFrame(rows)
    cols = ["model", "cells", "genes", "peaks", "epochs", "threads", "n_params", "init_s", "train_s", "s_per_epoch",
            "rss_after_load_mb", "fit_peak_rss_mb", "peak_rss_mb"]
    df = df[[c for c in cols if c in df.columns]].round(2)
    title = (f"## Scale: {args.scale_cells:,} cells x {args.scale_genes:,} genes x {args.scale_peaks:,} peaks, "
             f"{args.scale_epochs} epochs per model, each in a fresh process ({args.threads} thread(s))")
    note = ("s_per_epoch: median over epochs of one epoch's wall time (training + the 10 % validation pass); "
            "peak_rss_mb: the process's VmHWM (includes the loaded data); fit_peak_rss_mb: VmHWM after a reset "
            "once the data were loaded (the data still count, they are resident).")
    text = "\n".join(["# Multiome scale: DGD vs MultiVI", "", head, "", "```", command_line(), "```", "", title, "",
                      to_markdown(df), "", note, ""])
    print("\n" + title + "\n" + to_markdown(df) + "\n" + note)
    write_outputs(Path(args.out), args.tag or "multiome_scale", text,
                  {"command": command_line(), "header": head, "generate": gen, "scale": rows, "args": vars(args)})


# ------------------------------------------------------------------------------------------ main

DEFAULT_DGD = {"DGD": {}}
DEFAULT_MULTIVI = {"MultiVI": {}}
QUICK = {"cells": 400, "genes": 200, "peaks": 1000, "seeds": [0], "max_epochs": 30}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 400 cells x 200 genes x 1,000 peaks, seed 0, 30 epochs (unless given)")
    p.add_argument("--cells", type=int, default=2000)
    p.add_argument("--genes", type=int, default=1000)
    p.add_argument("--peaks", type=int, default=5000)
    p.add_argument("--rna-groups", type=int, default=3)
    p.add_argument("--atac-groups", type=int, default=2)
    p.add_argument("--linked-fraction", type=float, default=0.03,
                   help="share of peaks linked to a gene (opened by its program): how much RNA says about ATAC")
    p.add_argument("--type-effect", type=float, default=2.0, help="log-fold of marker genes and peaks")
    p.add_argument("--batches", type=int, default=1, help="simulated batches (> 1: both models get batch_key)")
    p.add_argument("--n-latent", type=int, default=20, help="latent dimension of both models")
    p.add_argument("--heldout", type=float, default=0.2, help="share of test cells")
    p.add_argument("--max-epochs", type=int, default=None,
                   help="cap for both models (default: each model's own default, 500, with early stopping)")
    p.add_argument("--dgd-config", type=json.loads, default=None,
                   help='JSON {"row name": {DGD kwargs, "train": {train kwargs}}} (default: the DGD defaults)')
    p.add_argument("--multivi-config", type=json.loads, default=None,
                   help='JSON {"row name": {MULTIVI kwargs, "train": {train kwargs}}} (default: MultiVI defaults)')
    p.add_argument("--no-dgd", action="store_true")
    p.add_argument("--no-multivi", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for both models")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="folder of the .md and .json results")
    p.add_argument("--tag", default=None, help="result file names (default multiome[_quick] / multiome_scale)")
    p.add_argument("--scale", action="store_true", help="speed and peak memory at 100k peaks instead")
    p.add_argument("--scale-cells", type=int, default=5000)
    p.add_argument("--scale-genes", type=int, default=2000)
    p.add_argument("--scale-peaks", type=int, default=100_000)
    p.add_argument("--scale-epochs", type=int, default=3)
    p.add_argument("--scale-models", nargs="+", default=["dgd", "multivi"], choices=["dgd", "multivi"])
    p.add_argument("--scale-data", default=None, help="the .h5mu of the scale data (simulated when missing)")
    p.add_argument("--scale-worker", default=None, choices=["generate", "dgd", "multivi"], help=argparse.SUPPRESS)
    p.add_argument("--scale-result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        for k, v in QUICK.items():
            if "--" + k.replace("_", "-") not in given:
                setattr(args, k, v)
    return args


def main(argv=None) -> dict | None:
    args = parse(argv)
    os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={args.threads}")
    import torch

    torch.set_num_threads(args.threads)
    if args.scale_worker:
        return scale_worker(args)
    if args.scale:
        return run_scale(args)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # pay torch._dynamo's import outside the timings
    runners = []
    if not args.no_dgd:
        runners += [DGDRunner(k, v) for k, v in (args.dgd_config or DEFAULT_DGD).items()]
    if not args.no_multivi:
        runners += [MultiVIRunner(k, v) for k, v in (args.multivi_config or DEFAULT_MULTIVI).items()]
    tag = args.tag or ("multiome_quick" if args.quick else "multiome")
    head = (header(args) + f"; seeds {args.seeds}; {args.cells} cells x {args.genes} genes x {args.peaks} peaks, "
            f"{args.rna_groups} RNA x {args.atac_groups} ATAC groups, {args.linked_fraction:g} of peaks linked, "
            f"type effect {args.type_effect:g}, {args.batches} batch(es); n_latent "
            f"{args.n_latent}; max epochs "
            + ("each model's default (500)" if args.max_epochs is None else str(args.max_epochs))
            + ", early stopping on the same validation cells")
    print(head)
    print(command_line(), flush=True)
    rows = {"latent": [], "nll": [], "cross": [], "links": [], "time": []}
    for seed in args.seeds:
        tic = time.perf_counter()
        got = run_seed(seed, args, runners)
        for k in rows:
            rows[k] += got[k]
        print(f"  seed {seed} done in {time.perf_counter() - tic:.0f} s; load {os.getloadavg()[0]:.2f}", flush=True)
    sections = ["# Multiome: DGD vs MultiVI", "", head, "", "```", command_line(), "```", ""]
    print()
    for title, df in tables(rows, args):
        print(f"## {title}\n{to_markdown(df)}\n")
        sections += [f"## {title}", "", to_markdown(df), ""]
    print(command_line())
    write_outputs(Path(args.out), tag, "\n".join(sections),
                  {"command": command_line(), "header": head, **rows, "args": vars(args)})
    return rows


if __name__ == "__main__":
    main()
