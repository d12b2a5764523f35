"""Batch integration: the DGD with covariates vs scVI with ``batch_key`` (and the DGD without covariates as
a floor), side by side in one run, on simulated batches with known cell types (``dl.sim.simulate_batches``:
per-batch gene-wise log shifts and library shifts, one batch lacking a cell type).

Metrics:

- scib-metrics (``Benchmarker``): bio conservation (isolated labels, KMeans NMI and ARI, silhouette of labels,
  cLISI) and batch correction (silhouette of batches, iLISI, kBET, graph connectivity, PCR
  comparison), their aggregates and the total (0.6 bio + 0.4 batch), on the training cells' latents;
- held-out likelihood by count splitting (``dgdlens.evaluate.binomial_split``, p = 0.5) on cells of the
  same batches that no model trained on: each model embeds part A of a cell's counts (with its batch
  label) and part B is scored under the model's NB at that latent with part B's library size (nats per
  cell, summed over genes; the same ``dgdlens.evaluate.nb_nll`` for every model; scVI: encoder posterior
  mean, decoded with the cell's batch);
- cells of an unseen batch: kNN (k=15) cell-type accuracy of their inferred latents against the training
  latents (DGD: the new batch's component is learned from its cells with the model frozen; scVI: NA, a
  new batch needs scArches surgery and retraining, not compared here);
- fit time (wall clock, this machine).

Needs scvi-tools and scib-metrics (``pip install 'dgdlens[benchmark]'``, best in a separate environment).

Usage::

    python benchmarks/integration.py                  # defaults (about 10 minutes on 2 CPU cores)
    python benchmarks/integration.py --cells 300 --dgd-epochs 100 --scvi-epochs 100   # a quick look
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA
from sklearn.neighbors import KNeighborsClassifier

import dgdlens as dl
from dgdlens.evaluate import binomial_split, nb_nll


def split_cells(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    k = int(round(n * fraction))
    return np.sort(order[k:]), np.sort(order[:k])


def thinned(adata, seed: int):
    """(AnnData holding part A of the counts with the cells' obs, part B as CSR)."""
    import anndata as ad

    x_a, x_b = binomial_split(adata.X, 0.5, seed)
    keep = (np.asarray(x_a.sum(1)).ravel() > 0) & (np.asarray(x_b.sum(1)).ravel() > 0)
    a = ad.AnnData(x_a[keep], obs=adata.obs.iloc[np.flatnonzero(keep)].copy(), var=adata.var.copy())
    return a, x_b[keep]


def run_dgd(train, held, unseen, args, batch_key):
    model = dl.DGD(train, n_latent=args.n_latent, n_components=args.n_components, batch_key=batch_key,
                   seed=args.seed)
    tic = time.perf_counter()
    model.train(max_epochs=args.dgd_epochs, progress=False, device="cpu")
    fit = time.perf_counter() - tic
    a, x_b = thinned(held, args.seed)
    comp = model.get_normalized_expression(a, progress=False)
    lib_b = np.asarray(x_b.sum(1)).ravel()
    r = model.module.likelihood.r.detach().cpu().numpy().reshape(1, -1)
    nll = float(nb_nll(x_b, comp * lib_b[:, None], r).mean())
    z_new = model.get_latent_representation(unseen, progress=False)
    return {"z": model.get_latent_representation(), "heldout_nll": nll, "fit_s": fit,
            "epochs": len(model.history_), "z_unseen": z_new}


def run_scvi(train, held, args):
    import scvi

    scvi.settings.seed = args.seed
    scvi.settings.dl_num_workers = 0
    train = train.copy()
    scvi.model.SCVI.setup_anndata(train, batch_key="batch")
    model = scvi.model.SCVI(train, n_latent=args.n_latent, gene_likelihood="nb")
    tic = time.perf_counter()
    model.train(max_epochs=args.scvi_epochs, accelerator="cpu", enable_progress_bar=False,
                early_stopping=True)
    fit = time.perf_counter() - tic
    a, x_b = thinned(held, args.seed)
    z = model.get_latent_representation(a)  # posterior means
    cats = list(model.adata_manager.get_state_registry("batch").categorical_mapping)
    codes = pd.Categorical(a.obs["batch"].astype(str), categories=cats).codes
    module = model.module
    module.eval()
    lib_b = np.asarray(x_b.sum(1)).ravel()
    with torch.no_grad():
        out = module.generative(z=torch.as_tensor(z), library=torch.as_tensor(np.log(lib_b), dtype=torch.float32)[:, None],
                                batch_index=torch.as_tensor(codes, dtype=torch.long)[:, None])
        mean = out["px"].mu.numpy()
        theta = out["px"].theta.expand_as(out["px"].mu)[:1].numpy()
    nll = float(nb_nll(x_b, mean, theta).mean())
    return {"z": model.get_latent_representation(), "heldout_nll": nll, "fit_s": fit,
            "epochs": len(model.history["elbo_train"]), "z_unseen": None}


def scib_scores(adata, keys: list[str], n_jobs: int) -> pd.DataFrame:
    from scib_metrics.benchmark import Benchmarker

    bm = Benchmarker(adata, batch_key="batch", label_key="cell_type", embedding_obsm_keys=keys,
                     pre_integrated_embedding_obsm_key="X_pca", n_jobs=n_jobs)
    bm.benchmark()
    return bm.get_results(min_max_scale=False)


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=500, help="cells per batch")
    parser.add_argument("--genes", type=int, default=300)
    parser.add_argument("--types", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--n-latent", type=int, default=10)
    parser.add_argument("--n-components", type=int, default=None)
    parser.add_argument("--dgd-epochs", type=int, default=300)
    parser.add_argument("--scvi-epochs", type=int, default=300)
    parser.add_argument("--heldout", type=float, default=0.15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)

    sim = dl.sim.simulate_batches(args.cells, args.genes, n_types=args.types, n_batches=args.batches,
                                  n_unseen_batches=1, seed=args.seed)
    seen, unseen = sim[~sim.obs["unseen"].values].copy(), sim[sim.obs["unseen"].values].copy()
    seen.obs["batch"] = seen.obs["batch"].cat.remove_unused_categories()
    tr, ho = split_cells(seen.n_obs, args.heldout, args.seed)
    train, held = seen[tr].copy(), seen[ho].copy()
    print(f"simulated {sim.n_obs} cells x {sim.n_vars} genes: {args.batches} batches for training "
          f"({train.n_obs} training + {held.n_obs} held-out cells) + 1 unseen batch ({unseen.n_obs} cells)")

    results = {}
    results["DGD (no covariates)"] = run_dgd(train, held, unseen, args, None)
    print("DGD without covariates done", round(results["DGD (no covariates)"]["fit_s"], 1), "s")
    results["DGD (batch_key)"] = run_dgd(train, held, unseen, args, "batch")
    print("DGD with covariates done", round(results["DGD (batch_key)"]["fit_s"], 1), "s")
    try:
        results["scVI (batch_key)"] = run_scvi(train, held, args)
        print("scVI done", round(results["scVI (batch_key)"]["fit_s"], 1), "s")
    except ImportError as err:
        print(f"scVI skipped ({err}); install the benchmark extra in a separate environment.")

    logn = np.log1p(train.X.toarray() / train.X.sum(1).A * 1e4)
    train.obsm["X_pca"] = PCA(30, random_state=args.seed).fit_transform(logn)
    keys = {}
    for i, (name, res) in enumerate(results.items()):
        keys[name] = f"X_m{i}"
        train.obsm[keys[name]] = np.asarray(res["z"], dtype=np.float32)
    scores = scib_scores(train, list(keys.values()), n_jobs=args.threads)

    labels = train.obs["cell_type"].astype(str).values
    rows = []
    for name, res in results.items():
        s = scores.loc[keys[name]]
        unseen_acc = (np.nan if res["z_unseen"] is None else
                      float((KNeighborsClassifier(15).fit(res["z"], labels).predict(res["z_unseen"])
                             == unseen.obs["cell_type"].astype(str).values).mean()))
        rows.append({"model": name, "bio_conservation": float(s["Bio conservation"]),
                     "batch_correction": float(s["Batch correction"]), "total": float(s["Total"]),
                     **{m: float(s[m]) for m in scores.columns
                        if m not in ("Bio conservation", "Batch correction", "Total")},
                     "heldout_nll": res["heldout_nll"], "unseen_batch_type_acc": unseen_acc,
                     "fit_s": res["fit_s"], "epochs": res["epochs"]})
    table = pd.DataFrame(rows).set_index("model")
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.precision", 3):
        print(table.T)
    if args.json:
        table.reset_index().to_json(args.json, orient="records", indent=1)
    return table


if __name__ == "__main__":
    main()
