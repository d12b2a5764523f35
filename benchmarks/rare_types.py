"""Does training the decoder on a sample (``decoder_subsample``) lose rare cell types?

Past 100,000 training cells a DGD's epochs train on a seeded sample of 100,000 cells and the others are
embedded at the end with the decoder frozen (see ``docs/benchmarks/time_to_quality.md``). A type that
makes up 0.05 % of the cells has then only a third (at 300,000 cells) or a tenth (at 1M) of its cells
shaping the decoder. This benchmark measures what that costs, against the same model trained on every
cell (``decoder_subsample=None``), on the time-to-quality simulation with rare types added.

Data: ``benchmarks/time_to_quality.py``'s simulation (marker genes per type, three continuous programs,
NB noise, log-normal libraries) with ``--types`` common types sharing the cells evenly and one rare type
per ``--rare`` fraction (each with its own 25 markers, like the common ones).

Protocol: held out before training, never fitted: 2,000 random cells of the common types and
``--rare-held`` (30 %) of every rare type's cells. Both models train on the rest with every other default
(in their own processes, one thread each, side by side with ``--side-by-side``). Scored per group of
held-out cells (common, each rare type):

- held-out NB NLL by count splitting (:func:`dgdlens.evaluate.count_split_nll`), nats per cell;
- recall: the share of a group's held-out cells whose 15 nearest training cells in the latent space
  (the held-out cell embedded by the model's own inference) are mostly of its type;
- for the training cells of each rare type: the mean share of same-type cells among their 15 nearest
  training neighbours (how tight the type stays in the latent space), and the share of them whose
  mixture component holds mostly cells of their type.

Measured (two seeds, ``docs/benchmarks/time_to_quality.md``): the sample costs a 0.2 % type 15 and 102
nats per held-out cell; a 0.05 % type is lost with or without it; three more epochs on every cell after
the sample (``--configs "sample, then 3 epochs on every cell"``) recovered nothing.

Usage::

    python benchmarks/rare_types.py --cells 300000 --side-by-side            # seed 0; --seed 1 the second
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results" / "rare_types"
sys.path.insert(0, str(HERE.parent))

CONFIGS = {"sample (default)": {}, "every cell": {"decoder_subsample": None},
           "sample, then 3 epochs on every cell": {"then": {"max_epochs": 3, "decoder_subsample": None,
                                                            "early_stopping": False}},
           "sketch": {"decoder_subsample_by": "sketch"}, "residual": {"decoder_subsample_by": "residual"}}


def data_path(args) -> Path:
    rare = "_".join(f"{f:g}" for f in args.rare)
    return Path(args.data_dir) / f"rare_{args.cells}x{args.genes}_{args.types}types_rare{rare}_seed{args.seed}.h5ad"


def type_weights(n_common: int, rare: list[float]) -> np.ndarray:
    weights = np.r_[np.full(n_common, (1.0 - sum(rare)) / n_common), rare]
    return weights / weights.sum()


def ensure_data(args) -> Path:
    import anndata as ad
    import pandas as pd

    from time_to_quality import simulate

    path = data_path(args)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    n_types = args.types + len(args.rare)
    X, types = simulate(args.cells, args.genes, n_types=n_types, seed=args.seed,
                        type_weights=type_weights(args.types, args.rare))
    names = np.array([f"common{t}" for t in range(args.types)] + [f"rare{f:g}" for f in args.rare])
    a = ad.AnnData(X, obs=pd.DataFrame({"cell_type": pd.Categorical(names[types])},
                                       index=[f"cell{i}" for i in range(args.cells)]),
                   var=pd.DataFrame(index=[f"gene{j}" for j in range(args.genes)]))
    tmp = path.with_name(path.name + ".partial")
    a.write_h5ad(tmp)
    os.replace(tmp, path)
    return path


def split(labels: np.ndarray, n_common_held: int, rare_held: float, seed: int):
    """(training cells, held-out cells): random common cells and a share of every rare type's cells."""
    rng = np.random.default_rng(seed + 11)
    held = []
    for t in np.unique(labels):
        cells = np.flatnonzero(labels == t)
        if t.startswith("rare"):
            held.append(rng.choice(cells, max(1, round(rare_held * len(cells))), replace=False))
    common = np.flatnonzero(np.char.startswith(labels.astype(str), "common"))
    held.append(rng.choice(common, n_common_held, replace=False))
    held = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), held), held


def knn_majority(z_ref, labels_ref, z_query, k: int = 15, skip_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per query cell: the majority label of its k nearest reference cells and the same-label share."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k + int(skip_self)).fit(z_ref)
    idx = nn.kneighbors(z_query, return_distance=False)[:, int(skip_self):]
    neigh = labels_ref[idx]
    majority = np.array([max(set(row), key=list(row).count) for row in neigh])
    return majority, neigh


def worker(args) -> None:
    import anndata as ad
    import torch
    from threadpoolctl import threadpool_limits

    import dgdlens as dl
    from dgdlens.evaluate import count_split_nll

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    adata = ad.read_h5ad(data_path(args))
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    train_idx, held_idx = split(labels, args.common_held, args.rare_held, args.seed)
    train, held = adata[train_idx].copy(), adata[held_idx].copy()
    cfg = json.loads(args.worker_config)
    tic = time.perf_counter()
    then = cfg.pop("then", None)
    model = dl.DGD(train, seed=args.seed).train(device="cpu", progress=False, **cfg)
    if then is not None:  # a second call continues from the trained decoder and latents
        model.train(device="cpu", progress=False, **then)
    train_s = time.perf_counter() - tic
    nll = count_split_nll(model, held, p=0.5, seed=10_000 + args.seed).to_numpy()
    z_train = model.get_latent_representation()
    z_held = model.get_latent_representation(held, progress=False)
    clusters = model.get_cluster_assignments()
    y_train, y_held = labels[train_idx], labels[held_idx]
    majority, _ = knn_majority(z_train, y_train, z_held)
    groups = {"common": np.char.startswith(y_held.astype(str), "common")}
    groups |= {t: y_held == t for t in np.unique(y_held) if t.startswith("rare")}
    out = {"config": args.worker_name, "train_s": train_s, "epochs": len(model.history_),
           "n_train": int(len(train_idx)), "groups": {}}
    for name, mask in groups.items():
        correct = majority[mask] == y_held[mask] if name != "common" else \
            np.char.startswith(majority[mask].astype(str), "common") & (majority[mask] == y_held[mask])
        out["groups"][name] = {"n_held": int(mask.sum()), "nll": float(np.nanmean(nll[mask])),
                               "recall": float(correct.mean())}
    for t in [t for t in np.unique(y_train) if t.startswith("rare")]:
        cells = np.flatnonzero(y_train == t)
        _, neigh = knn_majority(z_train, y_train, z_train[cells], skip_self=True)
        comp_major = {c: (y_train[clusters == c] == t).mean() for c in np.unique(clusters[cells])}
        in_own = np.mean([comp_major[c] > 0.5 for c in clusters[cells]])
        out["groups"][t].update({"n_train": int(len(cells)), "train_knn_same": float((neigh == t).mean()),
                                 "train_in_own_component": float(in_own)})
    tmp = Path(args.worker_out).with_suffix(".partial")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, args.worker_out)


def coverage(args) -> str:
    """How many of each rare type's training cells each way of drawing a 100,000-cell sample keeps (one
    process, the same PCA as the model's start; drawn from all of the benchmark's training cells, where the
    model draws from the 90 % left after its validation split, so the shares are close, not identical)."""
    import anndata as ad

    from dgdlens.data.matrix import RowMatrix
    from dgdlens.train.latent_init import pca_latents
    from dgdlens.train.sketch import residual_sample, sketch_sample

    adata = ad.read_h5ad(data_path(args))
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    train_idx, _ = split(labels, args.common_held, args.rare_held, args.seed)
    y = labels[train_idx]
    matrix = RowMatrix(adata.X)
    (starts,), (scores,) = pca_latents(matrix, train_idx, [train_idx], 20, radius=2.0, seed=args.seed,
                                       residuals=True)
    n_take = min(100_000, len(train_idx))
    rng = lambda: np.random.default_rng([args.seed, 0, 1])  # noqa: E731
    samples = {"random": np.sort(rng().choice(len(train_idx), n_take, replace=False)),
               "sketch": sketch_sample(starts, n_take, rng())[0], "residual": residual_sample(scores, n_take, rng())[0]}
    rare = [t for t in np.unique(y) if t.startswith("rare")]
    lines = ["| sample | " + " | ".join(f"{t}: kept of {int((y == t).sum())}" for t in rare) + " |",
             "|---|" + "---|" * len(rare)]
    for name, pos in samples.items():
        kept = [np.isin(np.flatnonzero(y == t), pos).mean() for t in rare]
        lines.append(f"| {name} | " + " | ".join(f"{k:.0%}" for k in kept) + " |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    lines = ["| model | train s | epochs | group | held-out cells | held-out NLL | recall (15-NN) | "
             "training cells | same-type share of 15-NN | in own component |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name, g in r["groups"].items():
            extra = (f"{g['n_train']} | {g['train_knn_same']:.3f} | {g['train_in_own_component']:.2f}"
                     if "n_train" in g else "- | - | -")
            lines.append(f"| {r['config']} | {r['train_s']:.0f} | {r['epochs']} | {name} | {g['n_held']} | "
                         f"{g['nll']:.2f} | {g['recall']:.3f} | {extra} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="run", choices=["run", "worker", "table", "coverage"])
    p.add_argument("--cells", type=int, default=300_000)
    p.add_argument("--genes", type=int, default=500)
    p.add_argument("--types", type=int, default=12, help="common types")
    p.add_argument("--rare", type=float, nargs="+", default=[0.0005, 0.002], help="fraction of each rare type")
    p.add_argument("--common-held", type=int, default=2_000)
    p.add_argument("--rare-held", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--side-by-side", action="store_true")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS)[:2], choices=list(CONFIGS),
                   help="the models to train (default: the sample and every cell)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="/tmp/dgdlens-rare")
    for name in ("config", "name", "out"):
        p.add_argument(f"--worker-{name}", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.command == "worker":
        return worker(args)
    if args.command == "coverage":
        ensure_data(args)
        return print(coverage(args))
    out_dir = RESULTS / f"{args.cells}_seed{args.seed}"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.command == "run":
        ensure_data(args)
        procs = []
        for name in args.configs:
            cfg = CONFIGS[name]
            out = out_dir / f"{name.split(',')[0].split()[0]}{'_then' if 'then' in cfg else ''}.json"
            cmd = [sys.executable, str(HERE), "worker", "--worker-config", json.dumps(cfg), "--worker-name", name,
                   "--worker-out", str(out), "--cells", str(args.cells), "--genes", str(args.genes),
                   "--types", str(args.types), "--rare", *map(str, args.rare), "--common-held", str(args.common_held),
                   "--rare-held", str(args.rare_held), "--threads", str(args.threads), "--seed", str(args.seed),
                   "--data-dir", args.data_dir]
            proc = subprocess.Popen(cmd)
            if args.side_by_side:
                procs.append(proc)
            elif proc.wait() != 0:
                raise SystemExit(f"worker {name} failed")
        if any(proc.wait() != 0 for proc in procs):
            raise SystemExit("a worker failed")
    results = [json.loads(f.read_text()) for f in sorted(out_dir.glob("*.json"))]
    md = f"# Rare types and decoder_subsample ({args.cells:,} cells, seed {args.seed})\n\n{table(results)}\n"
    (out_dir / "table.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
