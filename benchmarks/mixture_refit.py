"""How the end-of-training mixture refit should read a weighted decoder sample.

Past 100,000 training cells the DGD's epochs train a sample of the cells; with the residual sample (the
default) a tenth of it are cells kept for certain and the rest carry Horvitz-Thompson weights. At the end
the Gaussian mixture is refitted by EM to the sample's latents. Three ways to do that, on the same trained
decoder and latents (one training run; only the refit differs, so any difference is the refit's):

- ``weighted EM`` (now the default): EM maximising the weighted likelihood (``fit_to(sample_weight=)``);
- ``draw by weight`` (the former default): as many latents drawn with replacement, by weight, then plain EM;
- ``no weights``: plain EM on the sample as it is (over-representing the cells kept for certain);
- ``no weights, then weighted EM``: components placed by the plain fit, then weighted EM from there
  (``fit_to(sample_weight=, weighted_start="unweighted")``).

Each is repeated with ``--refit-seeds`` seeds (EM's k-means starts, and the draw) and scored on held-out
cells by count splitting (:func:`dgdlens.evaluate.count_split_nll`, nats per cell) per group of cells:

- ``--source rare`` (default): ``benchmarks/rare_types.py``'s data and split (common cells and each rare
  type's held-out cells); ``--seed 2`` is that benchmark's validation seed;
- ``--source ttq``: ``benchmarks/time_to_quality.py``'s data (12 common types) with its ``--tune`` split
  (validation cells of the training pool; the test cells are never read).

Usage::

    python benchmarks/mixture_refit.py --cells 300000 --seed 2
    python benchmarks/mixture_refit.py --source ttq --cells 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results" / "mixture_refit"
sys.path.insert(0, str(HERE.parent))

METHODS = ("weighted EM", "draw by weight", "no weights", "no weights, then weighted EM")


def load(args):
    """(training AnnData, held-out AnnData, {group: mask over the held-out cells})."""
    import anndata as ad

    if args.source == "rare":
        import rare_types

        rare_args = argparse.Namespace(cells=args.cells, genes=args.genes, types=12, rare=[0.0005, 0.002],
                                       seed=args.seed, data_dir=args.data_dir or "/tmp/dgdlens-rare")
        adata = ad.read_h5ad(rare_types.ensure_data(rare_args))
        labels = adata.obs["cell_type"].astype(str).to_numpy()
        train_idx, held_idx = rare_types.split(labels, 2_000, 0.3, args.seed)
        y = labels[held_idx]
        groups = {"common": np.char.startswith(y.astype(str), "common")}
        groups |= {t: y == t for t in sorted(set(y)) if t.startswith("rare")}
    else:
        import time_to_quality as ttq

        ttq_args = argparse.Namespace(genes=args.genes, seed=args.seed, data_dir=args.data_dir or "/tmp/dgdlens-ttq")
        adata = ad.read_h5ad(ttq.ensure_dataset(ttq_args, args.cells))
        train_idx, held_idx = ttq.split(adata.n_obs, 2_000, args.seed, tune=True)  # validation cells
        groups = {"common": np.ones(len(held_idx), bool)}
    return adata[train_idx].copy(), adata[held_idx].copy(), groups


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def refit(prior, z, w, method: str, seed: int) -> None:
    import torch

    from dgdlens.train.decoder_only_plan import REFIT_SAMPLE

    if method == "weighted EM":
        prior.fit_to(z, seed=seed, sample_weight=w)
    elif method == "no weights, then weighted EM":
        prior.fit_to(z, seed=seed, sample_weight=w, weighted_start="unweighted")
    elif method == "draw by weight":  # the former refit, as _refit_prior drew it on one process
        rng = np.random.default_rng([seed, 0])
        pick = np.sort(rng.choice(len(z), min(len(z), REFIT_SAMPLE), replace=True, p=w / w.sum()))
        prior.fit_to(z[torch.from_numpy(pick)], seed=seed)
    else:
        prior.fit_to(z, seed=seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["rare", "ttq"], default="rare")
    p.add_argument("--cells", type=int, default=300_000)
    p.add_argument("--genes", type=int, default=500)
    p.add_argument("--seed", type=int, default=2, help="data and training seed (rare_types: 2 is validation)")
    p.add_argument("--refit-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-config", type=json.loads, default={}, help="JSON of DGD.train options (default: none)")
    args = p.parse_args()

    import torch
    from threadpoolctl import threadpool_limits

    import dgdlens as dl
    from dgdlens.evaluate import count_split_nll

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    train, held, groups = load(args)
    model = dl.DGD(train, seed=args.seed)
    sample = {}
    make_plan = model._make_plan

    def watched_plan(**kw):  # what the model's own refit reads: the sample's (best epoch's) latents and weights
        plan = make_plan(**kw)
        end = plan.on_train_end

        def on_train_end():
            sample.update(z=plan.train_table.z.detach().clone(), w=plan._fit_weights)
            end()

        plan.on_train_end = on_train_end
        return plan

    model._make_plan = watched_plan
    tic = time.perf_counter()
    model.train(device="cpu", progress=False, **args.train_config)
    train_s = time.perf_counter() - tic
    if sample.get("w") is None:
        raise SystemExit("this run drew no weighted sample (fewer training cells than decoder_subsample?)")
    z, w = sample["z"], np.asarray(sample["w"], dtype=np.float64)
    final_state = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    rows = []
    for method in METHODS:
        for seed in args.refit_seeds:
            model.module.load_state_dict(final_state)
            tic = time.perf_counter()
            refit(model.module.prior, z, w, method, seed)
            refit_s = time.perf_counter() - tic
            nll = count_split_nll(model, held, p=0.5, seed=10_000 + args.seed).to_numpy()
            rows.append({"method": method, "refit_seed": seed, "refit_s": refit_s,
                         "nll": {g: float(np.nanmean(nll[m])) for g, m in groups.items()},
                         "weights": sorted(model.module.prior.log_weights().exp().tolist())})
            print(json.dumps(rows[-1]), flush=True)
    out = {"source": args.source, "cells": args.cells, "seed": args.seed, "train_config": args.train_config,
           "train_s": train_s,
           "epochs": len(model.history_), "sample": len(z), "certain": int((w == 1).sum()), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.source}_{args.cells}_seed{args.seed}.json"
    write_atomically(path, json.dumps(out, indent=1))
    names = list(groups)
    lines = [f"# Mixture refit of a weighted sample ({args.source}, {args.cells:,} cells, seed {args.seed}; "
             f"{out['epochs']} epochs, {train_s:.0f} s)", "",
             "| refit | " + " | ".join(f"{g}: mean NLL (min-max over seeds)" for g in names) + " | refit s |",
             "|---|" + "---|" * (len(names) + 1)]
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        cells = []
        for g in names:
            v = np.array([r["nll"][g] for r in mine])
            cells.append(f"{v.mean():.2f} ({v.min():.2f}-{v.max():.2f})")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {np.mean([r['refit_s'] for r in mine]):.1f} |")
    md = "\n".join(lines) + "\n"
    write_atomically(path.with_suffix(".md"), md)
    print(md)


if __name__ == "__main__":
    main()
