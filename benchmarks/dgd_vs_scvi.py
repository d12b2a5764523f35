"""DGD vs scVI on pbmc68k counts, side by side in one run, on one fixed train / held-out split.

For each model:

- held-out reconstruction error: mean over held-out cells of the negative-binomial NLL summed over
  genes (nats per cell), computed with the same function (:func:`dgdlens.nn.nb_log_prob`) from each
  model's NB mean and dispersion. DGD: latents of the held-out cells found by MAP with the decoder
  frozen (``get_latent_representation(new)``). scVI: the encoder's posterior mean, decoded once, with
  ``gene_likelihood="nb"`` so both models have the same output distribution and unit;
- ARI / NMI against ``obs["bulk_labels"]`` (10 noisy cell types) of the DGD mixture clusters and of
  KMeans (k = number of labels) on each latent space, over all cells (training latents for training
  cells, inferred latents for held-out cells);
- fit time, epochs run and time per epoch (wall clock on this machine; CPU unless ``--device``).

Labels are never used for training or model selection (DGD uses their number of categories as K).
scVI is optional: without scvi-tools the DGD rows are printed and scVI is skipped with a message.

Usage::

    python benchmarks/dgd_vs_scvi.py                       # defaults of both models
    python benchmarks/dgd_vs_scvi.py --dgd-epochs 100 --scvi-epochs 100 --threads 1   # quicker
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

import dgdlens as dl
from dgdlens.data.datasets import pbmc68k_counts
from dgdlens.nn import nb_log_prob

LABELS = "bulk_labels"


def fixed_split(n: int, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_out = int(round(n * heldout_fraction))
    return np.sort(order[n_out:]), np.sort(order[:n_out])


def nb_nll_per_cell(x: np.ndarray, mean: np.ndarray, r: np.ndarray) -> np.ndarray:
    """NB negative log-likelihood summed over genes, per cell (the unit of DGD.get_reconstruction_error)."""
    x_t = torch.as_tensor(x, dtype=torch.float64)
    log_m = torch.as_tensor(mean, dtype=torch.float64).clamp_min(1e-30).log()
    log_r = torch.as_tensor(r, dtype=torch.float64).log().expand_as(log_m)
    return (-nb_log_prob(x_t, log_m, log_r).sum(1)).numpy()


def cluster_scores(labels, pred) -> dict:
    return {"ari": adjusted_rand_score(labels, pred), "nmi": normalized_mutual_info_score(labels, pred)}


def kmeans(z: np.ndarray, k: int, seed: int) -> np.ndarray:
    return KMeans(k, n_init=10, random_state=seed).fit_predict(z)


def run_dgd(adata, train_idx, test_idx, args) -> dict:
    train, test = adata[train_idx].copy(), adata[test_idx].copy()
    model = dl.DGD(train, labels_key=LABELS, seed=args.seed)
    kwargs = {"max_epochs": args.dgd_epochs} if args.dgd_epochs else {}
    tic = time.perf_counter()
    model.train(device=args.device, progress=False, **kwargs)
    fit = time.perf_counter() - tic
    tic = time.perf_counter()
    z_test = model.get_latent_representation(test, progress=False)
    infer = time.perf_counter() - tic
    heldout = model.get_reconstruction_error(test, z=z_test)
    z = np.empty((adata.n_obs, model.n_latent), dtype=np.float32)
    z[train_idx], z[test_idx] = model.get_latent_representation(), z_test
    clusters = model.get_cluster_assignments(z=z)
    cfg = model.train_config
    print(f"DGD settings: K={model.n_components}, sd_init={model.gmm.sd_init:.3g}, rep_step={cfg['rep_step']}, "
          f"hyperprior={cfg['hyperprior']}, batch_size={cfg['batch_size']}, max_epochs={cfg['max_epochs']}, "
          f"early_stopping={cfg['early_stopping']} (best epoch {model.train_summary['best_epoch']})")
    return {"model": "DGD", "heldout_nll": heldout, "train_nll": model.get_reconstruction_error(),
            "z": z, "mixture": clusters, "fit_s": fit, "epochs": len(model.history_),
            "s_per_epoch": float(model.history_["time"].mean()), "heldout_infer_s": infer,
            "n_mixture_clusters_used": int(len(np.unique(clusters))), "n_components": model.n_components}


def run_scvi(adata, train_idx, test_idx, args) -> dict | None:
    try:
        import scvi
    except ImportError as err:
        print(f"scVI skipped: scvi-tools is not installed ({err}). Install the benchmark extra "
              "(pip install 'dgdlens[benchmark]') in a separate environment to compare.")
        return None
    scvi.settings.seed = args.seed
    scvi.settings.dl_num_workers = 0
    train, test = adata[train_idx].copy(), adata[test_idx].copy()
    scvi.model.SCVI.setup_anndata(train)
    model = scvi.model.SCVI(train, gene_likelihood="nb")
    kwargs = {"max_epochs": args.scvi_epochs} if args.scvi_epochs else {}
    accelerator = "gpu" if str(args.device).startswith("cuda") else "cpu"
    tic = time.perf_counter()
    model.train(accelerator=accelerator, enable_progress_bar=False, **kwargs)
    fit = time.perf_counter() - tic
    epochs = len(model.history["elbo_train"])

    tic = time.perf_counter()
    z_test = model.get_latent_representation(test)
    infer = time.perf_counter() - tic
    x_test = test.X.toarray()
    mean, theta = _scvi_nb_params(model, z_test, x_test.sum(1))
    heldout = float(nb_nll_per_cell(x_test, mean, theta).mean())
    own = model.get_reconstruction_error(test)["reconstruction_loss"]
    print(f"scVI held-out NB NLL/cell: {heldout:.1f} from the posterior mean (table); scVI's own "
          f"get_reconstruction_error (one sampled z): {float(own):.1f}")
    x_train = train.X.toarray()
    mean_tr, _ = _scvi_nb_params(model, model.get_latent_representation(), x_train.sum(1))
    z = np.empty((adata.n_obs, z_test.shape[1]), dtype=np.float32)
    z[train_idx], z[test_idx] = model.get_latent_representation(), z_test
    return {"model": f"scVI {scvi.__version__}", "heldout_nll": heldout,
            "train_nll": float(nb_nll_per_cell(x_train, mean_tr, theta).mean()), "z": z, "mixture": None,
            "fit_s": fit, "epochs": epochs, "s_per_epoch": fit / max(epochs, 1), "heldout_infer_s": infer}


def _scvi_nb_params(model, z: np.ndarray, library: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode scVI latents (posterior means) with the observed library size: NB mean and theta."""
    module = model.module
    module.eval()
    dev = next(module.parameters()).device
    with torch.no_grad():
        out = module.generative(z=torch.as_tensor(z, device=dev),
                                library=torch.as_tensor(np.log(library), dtype=torch.float32, device=dev)[:, None],
                                batch_index=torch.zeros(len(z), 1, dtype=torch.long, device=dev))
        px = out["px"]
        # gene-level dispersion (dispersion="gene"): one theta per gene, shape (1, n_genes)
        return px.mu.cpu().numpy(), px.theta.expand_as(px.mu)[:1].cpu().numpy()


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dgd-epochs", type=int, default=None, help="max epochs for the DGD (default: its own)")
    p.add_argument("--scvi-epochs", type=int, default=None, help="max epochs for scVI (default: its own)")
    p.add_argument("--heldout", type=float, default=0.2, help="share of cells held out (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seeds the split and both models")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-scvi", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # torch's first optimiser imports torch._dynamo (seconds): pay that once here, outside the timings
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])

    adata = pbmc68k_counts()
    labels = adata.obs[LABELS].to_numpy()
    k = adata.obs[LABELS].nunique()
    train_idx, test_idx = fixed_split(adata.n_obs, args.heldout, args.seed)
    print(f"pbmc68k_reduced counts: {adata.n_obs} cells x {adata.n_vars} genes; {len(train_idx)} train, "
          f"{len(test_idx)} held out (seed {args.seed}); {k} bulk_labels; torch threads {torch.get_num_threads()}")

    results = [run_dgd(adata, train_idx, test_idx, args)]
    if not args.no_scvi:
        res = run_scvi(adata, train_idx, test_idx, args)
        if res is not None:
            results.append(res)

    rows = []
    for res in results:
        km = cluster_scores(labels, kmeans(res["z"], k, args.seed))
        mix = cluster_scores(labels, res["mixture"]) if res["mixture"] is not None else None
        rows.append({
            "model": res["model"], "heldout_nll": res["heldout_nll"], "train_nll": res["train_nll"],
            "ari_mixture": None if mix is None else mix["ari"], "nmi_mixture": None if mix is None else mix["nmi"],
            "ari_kmeans": km["ari"], "nmi_kmeans": km["nmi"], "fit_s": res["fit_s"], "epochs": res["epochs"],
            "s_per_epoch": res["s_per_epoch"], "heldout_infer_s": res["heldout_infer_s"],
        })
        if "n_components" in res:
            print(f"DGD mixture: {res['n_mixture_clusters_used']} of {res['n_components']} components hold cells")
    print_table(rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))
    return rows


def print_table(rows: list[dict]) -> None:
    cols = [("model", "model", "{}"), ("heldout_nll", "held-out NB NLL/cell", "{:.1f}"),
            ("train_nll", "train NB NLL/cell", "{:.1f}"), ("ari_mixture", "ARI mixture", "{:.3f}"),
            ("nmi_mixture", "NMI mixture", "{:.3f}"), ("ari_kmeans", "ARI KMeans", "{:.3f}"),
            ("nmi_kmeans", "NMI KMeans", "{:.3f}"), ("fit_s", "fit s", "{:.1f}"), ("epochs", "epochs", "{}"),
            ("s_per_epoch", "s/epoch", "{:.3f}"), ("heldout_infer_s", "held-out embed s", "{:.2f}")]
    cells = [[("-" if r[key] is None else fmt.format(r[key])) for key, _, fmt in cols] for r in rows]
    widths = [max(len(head), *(len(c[i]) for c in cells)) for i, (_, head, _) in enumerate(cols)]
    print(" | ".join(head.ljust(w) for (_, head, _), w in zip(cols, widths)))
    print("-+-".join("-" * w for w in widths))
    for c in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(c, widths)))
    print("NB NLL: nats per cell summed over genes, lower is better; same function for both models.")


if __name__ == "__main__":
    main()
