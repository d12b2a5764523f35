"""DGD vs scVI on one shared held-out protocol (count splitting), several seeds, two real data sets.

Data (offline, from registry wheels):

- ``pbmc68k``: scanpy's ``pbmc68k_reduced`` as exact integer counts (:func:`dgdlens.data.pbmc68k_counts`),
  700 cells x 765 genes, ``obs["bulk_labels"]`` (10 noisy cell types). The DGD defaults were chosen on
  this data set.
- ``celltypist``: celltypist's bundled sample ``celltypist/data/samples/sample_cell_by_gene.csv``
  (559 immune cells, raw integer counts, no labels), genes detected in >= 3 cells kept. Not used to
  choose any default.

Protocol, per data set and seed (``--seeds``, default 0 1 2):

- held-out test cells: a seeded 20 % of the cells; the rest is the training pool. Both models train
  on the pool with early stopping on a validation split of the pool (DGD: its ``validation_fraction``
  0.1; scVI: ``train_size=0.9``, ``early_stopping=True``), up to ``--max-epochs`` (same for both).
- held-out likelihood: :func:`dgdlens.evaluate.count_split_nll` (binomial thinning p = 0.5 of each
  test cell: latent inferred from part A only, NB NLL of part B with part B's library size, nats per
  cell summed over genes) and :func:`dgdlens.evaluate.gene_split_nll` (latent from a random half of
  the genes, NLL of the other half). The split of the counts/genes is the same for every model.
  Rows: DGD (its own held-out inference: best mixture mean, then 200 Adam steps on part A, decoder and
  mixture frozen); scVI ``amortised`` (encoder posterior mean of part A); scVI ``refined`` (the encoder
  mean refined by the same 200 Adam steps, lr 1e-2, betas (0.5, 0.7), on part A's NB likelihood plus
  scVI's N(0, I) prior, decoder frozen). For the gene split the scVI encoder sees the observed genes
  with the others set to 0 (a start point only; there is no amortised gene-split row).
  scVI uses ``gene_likelihood="nb"`` so both models share the output distribution and the unit.
- clustering (data sets with labels): every cell's latent (training cells: the learned / encoded
  latents; test cells: inferred from their full counts), ARI / NMI against the labels of: DGD mixture
  argmax, Leiden (scanpy neighbours on the latent, 15 neighbours, resolution 1) on each latent, and
  KMeans with k = number of labels. The DGD's K is its no-label default (``labels_key=None``), so the
  labels never reach a model.
- timings: fit seconds and epochs, from the seed-0 run of this same invocation, with the load average.

``--tune`` runs the validation-only search instead: the training pool of each seed is split again
(a seeded 15 % validation part), every candidate configuration trains on the rest and is scored by the
count-split NLL of the validation cells. The test cells are never touched. Pass the chosen
configuration to the main run with ``--dgd-config`` / ``--scvi-config`` (JSON).

Needs scvi-tools and celltypist (``pip install 'dgdlens[benchmark]'``, in a separate environment).

Usage::

    python benchmarks/dgd_vs_scvi.py --max-epochs 100 --threads 1   # both data sets, 3 seeds
    python benchmarks/dgd_vs_scvi.py --datasets pbmc68k --seeds 0 --max-epochs 100   # quicker
    python benchmarks/dgd_vs_scvi.py --tune               # validation-only configuration search
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

import dgdlens as dl
from dgdlens.data.datasets import pbmc68k_counts
from dgdlens.evaluate import (
    cluster_agreement,
    composition_split_model,
    count_split_nll,
    gene_split_nll,
    split_model,
)

RESULTS = Path(__file__).parent / "results"
INFER = {"n_steps": 200, "lr": 1e-2, "betas": (0.5, 0.7)}  # the DGD's held-out defaults, used for scVI too


# ------------------------------------------------------------------------------------------ data

def load_pbmc68k() -> tuple[ad.AnnData, str | None]:
    a = pbmc68k_counts()
    return ad.AnnData(a.X.copy(), obs=a.obs[["bulk_labels"]].copy(), var=pd.DataFrame(index=a.var_names)), "bulk_labels"


def load_celltypist() -> tuple[ad.AnnData, str | None]:
    from importlib.resources import files

    path = files("celltypist") / "data" / "samples" / "sample_cell_by_gene.csv"
    df = pd.read_csv(path, index_col=0)
    X = sp.csr_matrix(df.to_numpy(dtype=np.float32))
    keep = np.asarray((X > 0).sum(0)).ravel() >= 3
    a = ad.AnnData(X[:, keep], obs=pd.DataFrame(index=df.index.astype(str)),
                   var=pd.DataFrame(index=df.columns[keep].astype(str)))
    a.var_names_make_unique()
    return a, None


DATASETS = {"pbmc68k": load_pbmc68k, "celltypist": load_celltypist}


def split_cells(n: int, seed: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_out = round(n * fraction)
    return np.sort(order[n_out:]), np.sort(order[:n_out])


# ------------------------------------------------------------------------------------------ models

def fit_dgd(train: ad.AnnData, seed: int, cfg: dict, max_epochs: int):
    cfg = dict(cfg)
    train_kwargs = cfg.pop("train", {})
    model = dl.DGD(train, seed=seed, **cfg)
    tic = time.perf_counter()
    model.train(max_epochs=max_epochs, device="cpu", progress=False, **train_kwargs)
    return model, time.perf_counter() - tic, len(model.history_)


def fit_scvi(train: ad.AnnData, seed: int, cfg: dict, max_epochs: int):
    import scvi

    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    train = train.copy()
    scvi.model.SCVI.setup_anndata(train)
    model = scvi.model.SCVI(train, gene_likelihood="nb", **cfg)
    tic = time.perf_counter()
    model.train(max_epochs=max_epochs, accelerator="cpu", train_size=0.9, early_stopping=True,
                enable_progress_bar=False)
    return model, time.perf_counter() - tic, len(model.history["elbo_train"])


def scvi_split_models(model, var_names: pd.Index) -> dict:
    """NBSplitModels of a trained scVI: amortised (encoder mean) and refined (+ 200 MAP steps)."""
    module = model.module
    module.eval()
    n_genes = len(var_names)

    def encode(x, library, genes):
        full = x if len(genes) == n_genes else _embed_columns(x, genes, n_genes)
        return model.get_latent_representation(ad.AnnData(sp.csr_matrix(full), var=pd.DataFrame(index=var_names)))

    def log_composition(z):
        out = module.generative(z=z, library=torch.zeros(len(z), 1),
                                batch_index=torch.zeros(len(z), 1, dtype=torch.long))
        return torch.log(out["px"].scale.clamp_min(1e-30))

    def prior_nll(z):  # scVI's prior is N(0, I)
        return 0.5 * (z ** 2).sum(1)

    common = {"log_r": module.px_r, "freeze": module, "n_latent": module.n_latent}
    return {
        "amortised": composition_split_model(log_composition, start=encode, n_steps=0, **common),
        "refined": composition_split_model(log_composition, prior_nll=prior_nll, start=encode, **INFER, **common),
    }


def _embed_columns(x, genes, n_genes):
    x = sp.csr_matrix(x).tocoo()
    return sp.csr_matrix((x.data, (x.row, np.asarray(genes)[x.col])), shape=(x.shape[0], n_genes))


# ------------------------------------------------------------------------------------------ clustering

def leiden(z: np.ndarray, seed: int) -> np.ndarray:
    import scanpy as sc

    a = ad.AnnData(np.asarray(z, dtype=np.float32))
    sc.pp.neighbors(a, use_rep="X", n_neighbors=15, random_state=seed)
    sc.tl.leiden(a, resolution=1.0, flavor="igraph", n_iterations=2, directed=False, random_state=seed)
    return a.obs["leiden"].to_numpy()


def kmeans(z: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    return KMeans(k, n_init=10, random_state=seed).fit_predict(z)


def cluster_rows(name: str, z: np.ndarray, labels, seed: int, mixture=None) -> list[dict]:
    k = pd.Series(labels).nunique()
    rows = []
    methods = ([("mixture argmax", mixture)] if mixture is not None else []) + [
        ("Leiden", leiden(z, seed)), (f"KMeans k={k}", kmeans(z, k, seed))]
    for method, pred in methods:
        s = cluster_agreement(pred, labels)
        rows.append({"model": name, "clustering": method, "ari": s["ari"], "nmi": s["nmi"],
                     "n_clusters": int(pd.Series(pred).nunique())})
    return rows


# ------------------------------------------------------------------------------------------ one seed

def run_seed(adata, labels_key, seed: int, args, dgd_cfg: dict, scvi_cfg: dict) -> tuple[list[dict], list[dict], list[dict]]:
    train_idx, test_idx = split_cells(adata.n_obs, seed, args.heldout)
    train, test = adata[train_idx].copy(), adata[test_idx].copy()
    if args.tune:  # validation only: the test cells are dropped, the pool is split again
        tr, va = split_cells(train.n_obs, seed + 1000, args.val_fraction)
        train, test = train[tr].copy(), train[va].copy()
    nll_rows, cl_rows, time_rows = [], [], []
    split_kw = {"p": 0.5, "seed": 10_000 + seed}
    gene_kw = {"fraction": 0.5, "seed": 20_000 + seed}

    def record(model_name, inference, scorer, **kw):
        tic = time.perf_counter()
        cs = count_split_nll(scorer, test, **split_kw, **kw)
        infer_s = time.perf_counter() - tic
        gs = gene_split_nll(scorer, test, **gene_kw, **kw) if inference != "amortised" else None
        nll_rows.append({"model": model_name, "inference": inference, "seed": seed,
                         "count_split_nll": float(cs.mean()), "gene_split_nll": None if gs is None else float(gs.mean()),
                         "n_test": int(cs.notna().sum()), "infer_s": infer_s})

    # DGD
    for name, cfg in dgd_cfg.items():
        model, fit_s, epochs = fit_dgd(train, seed, cfg, args.max_epochs)
        record(name, "own MAP (200 steps)", split_model(model))
        time_rows.append({"model": name, "seed": seed, "fit_s": fit_s, "epochs": epochs,
                          "best_epoch": (model.train_summary_ or {}).get("best_epoch"), "s_per_epoch": fit_s / max(epochs, 1)})
        if labels_key is not None and not args.tune:
            z = np.empty((adata.n_obs, model.n_latent), dtype=np.float32)
            z[train_idx] = model.get_latent_representation()
            z[test_idx] = model.get_latent_representation(test, progress=False)
            cl_rows += [r | {"seed": seed} for r in cluster_rows(name, z, adata.obs[labels_key].to_numpy(), seed,
                                                                mixture=model.get_cluster_assignments(z=z))]
    # scVI
    if not args.no_scvi:
        for name, cfg in scvi_cfg.items():
            model, fit_s, epochs = fit_scvi(train, seed, cfg, args.max_epochs)
            scorers = scvi_split_models(model, adata.var_names)
            for inference, scorer in scorers.items():
                record(name, inference if inference == "amortised" else "encoder + MAP (200 steps)", scorer)
            time_rows.append({"model": name, "seed": seed, "fit_s": fit_s, "epochs": epochs, "best_epoch": None,
                              "s_per_epoch": fit_s / max(epochs, 1)})
            if labels_key is not None and not args.tune:
                z = np.empty((adata.n_obs, model.module.n_latent), dtype=np.float32)
                z[train_idx] = model.get_latent_representation()
                z[test_idx] = model.get_latent_representation(test)
                cl_rows += [r | {"seed": seed} for r in cluster_rows(name, z, adata.obs[labels_key].to_numpy(), seed)]
    return nll_rows, cl_rows, time_rows


# ------------------------------------------------------------------------------------------ tables

def mean_sd(df: pd.DataFrame, keys: list[str], cols: list[str]) -> pd.DataFrame:
    g = df.groupby(keys, sort=False)[cols]
    out = g.mean().round(3).astype(str)
    sd = g.std(ddof=1)
    for c in cols:
        out[c] = [("-" if pd.isna(m) else f"{m:.{1 if 'nll' in c else 3}f}") +
                  ("" if pd.isna(s) else f" ± {s:.{1 if 'nll' in c else 3}f}")
                  for m, s in zip(g.mean()[c], sd[c])]
    out["seeds"] = g.size()
    return out.reset_index()


def to_markdown(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


DEFAULT_DGD = {"DGD": {}}
DEFAULT_SCVI = {"scVI n_latent=10": {"n_latent": 10}, "scVI n_latent=20": {"n_latent": 20}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["pbmc68k", "celltypist"], choices=list(DATASETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max-epochs", type=int, default=400, help="for both models, early stopping on validation")
    p.add_argument("--heldout", type=float, default=0.2, help="share of test cells (default 0.2)")
    p.add_argument("--dgd-config", type=json.loads, default=None,
                   help='JSON {"row name": {DGD kwargs, "train": {train kwargs}}} (default: the DGD defaults)')
    p.add_argument("--scvi-config", type=json.loads, default=None, help='JSON {"row name": {SCVI kwargs}}')
    p.add_argument("--tune", action="store_true", help="validation-only search: no test cell is used")
    p.add_argument("--val-fraction", type=float, default=0.15, help="validation share of the pool with --tune")
    p.add_argument("--no-scvi", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tag", default=None, help="name of the result files (default dgd_vs_scvi[_tune])")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # pay torch._dynamo's import outside the timings
    dgd_cfg = args.dgd_config or DEFAULT_DGD
    scvi_cfg = args.scvi_config or DEFAULT_SCVI
    tag = args.tag or ("dgd_vs_scvi_tune" if args.tune else "dgd_vs_scvi")
    import scvi

    header = (f"dgdlens {dl.__version__}, scvi-tools {scvi.__version__}, torch {torch.__version__} "
              f"({torch.get_num_threads()} threads); load average at start {os.getloadavg()[0]:.2f} on "
              f"{os.cpu_count()} cores; seeds {args.seeds}; max_epochs {args.max_epochs} (early stopping for both)"
              + ("; VALIDATION-ONLY TUNING RUN (no test cell used)" if args.tune else ""))
    print(header)
    sections = [f"# DGD vs scVI{' (validation tuning)' if args.tune else ''}\n\n{header}\n"]
    all_nll, all_cl, all_time = [], [], []
    for ds in args.datasets:
        adata, labels_key = DATASETS[ds]()
        print(f"\n== {ds}: {adata.n_obs} cells x {adata.n_vars} genes, labels: {labels_key}")
        for seed in args.seeds:
            tic = time.perf_counter()
            nll, cl, tm = run_seed(adata, labels_key, seed, args, dgd_cfg, scvi_cfg)
            for rows in (nll, cl, tm):
                for r in rows:
                    r["dataset"] = ds
            all_nll += nll
            all_cl += cl
            all_time += tm
            print(f"  seed {seed}: {time.perf_counter() - tic:.0f} s; load {os.getloadavg()[0]:.2f}")
            for r in nll:
                print(f"    {r['model']:<22} {r['inference']:<26} count-split {r['count_split_nll']:9.2f}  gene-split "
                      f"{'-' if r['gene_split_nll'] is None else format(r['gene_split_nll'], '9.2f')}")
        nll_df = pd.DataFrame([r for r in all_nll if r["dataset"] == ds])
        table = mean_sd(nll_df, ["model", "inference"], ["count_split_nll", "gene_split_nll"])
        what = "validation" if args.tune else "test"
        title = (f"## {ds} ({adata.n_obs} cells x {adata.n_vars} genes): held-out NB NLL per {what} cell "
                 f"(nats, mean ± sd over seeds; lower is better)")
        print("\n" + title + "\n" + to_markdown(table))
        sections += [title, "", to_markdown(table), ""]
        if all_cl and any(r["dataset"] == ds for r in all_cl):
            cl = mean_sd(pd.DataFrame([r for r in all_cl if r["dataset"] == ds]), ["model", "clustering"],
                         ["ari", "nmi", "n_clusters"])
            title = f"## {ds}: clusters vs {labels_key} (all cells; mean ± sd over seeds)"
            print("\n" + title + "\n" + to_markdown(cl))
            sections += [title, "", to_markdown(cl), ""]
        tm = pd.DataFrame([r for r in all_time if r["dataset"] == ds and r["seed"] == args.seeds[0]])
        tm["stopped_early"] = tm["epochs"] < args.max_epochs
        tm = tm[["model", "fit_s", "epochs", "best_epoch", "stopped_early", "s_per_epoch"]].round(3)
        title = f"## {ds}: training time, seed {args.seeds[0]} (one run, same machine, see load above)"
        print("\n" + title + "\n" + to_markdown(tm))
        sections += [title, "", to_markdown(tm), ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{tag}.md").write_text("\n".join(sections))
    (RESULTS / f"{tag}.json").write_text(json.dumps({"nll": all_nll, "clusters": all_cl, "time": all_time,
                                                     "args": {k: v for k, v in vars(args).items()}}, indent=1,
                                                    default=str))
    print(f"\nwrote {RESULTS / (tag + '.md')}")


if __name__ == "__main__":
    main()
