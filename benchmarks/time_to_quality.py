"""Time to a good model: held-out NB NLL against wall time, DGD vs scVI, at growing cell numbers.

Data: simulated counts (:func:`simulate`): ``--types`` cell types with marker genes, three continuous
expression programs with per-cell activities on top, per-gene NB dispersion, log-normal library sizes.
Generated chunk by chunk and written once per size to ``--data-dir`` (h5ad), so both models read the
same cells.

Protocol, per size (``--cells``):

- ``--test-cells`` (default 2,000) seeded random cells are held out; the rest is the training pool. Each
  model trains on the pool with its package's defaults (``--dgd-config`` / ``--scvi-config`` to change
  them): the DGD 500 epochs with early stopping on its own 10 % validation split; scVI
  ``min(400, 400 x 20,000 / n_cells)`` epochs, ``train_size=0.9``, no early stopping.
- Each model trains in its own fresh process with ``--threads`` torch threads (default 1); with
  ``--side-by-side`` the two processes run at the same time (one core each). Peak RSS (VmHWM) is read in
  the worker right after training.
- While it trains, a copy of the model's weights (decoder, prior / encoder, dispersions) is kept after
  each epoch whose elapsed time passed the next point of a geometric grid (factor ``--grid``); nothing is
  scored during training. Afterwards every snapshot is scored on the test cells with the shared
  count-split protocol (:func:`dgdlens.evaluate.count_split_nll`: latent from a binomial half of each
  test cell, NB NLL of the other half, nats per cell): the DGD with its own held-out inference, scVI
  amortised and refined by the same 200 MAP steps (``benchmarks/dgd_vs_scvi.py``). The DGD's final
  point includes its end-of-training prior refit and latent polish in the time.
- "time to scVI" is the first snapshot time at which a model's held-out NLL is at or below scVI's final
  refined NLL (the curve is read at snapshots, so it is an upper bound up to one grid step).

``--tune`` scores on validation cells instead (another 2,000 cells of the pool, which then do not train),
and never touches the test cells: use it to choose settings.

Needs scvi-tools (``pip install 'dgdlens[benchmark]'`` in a separate environment).

Usage::

    python benchmarks/time_to_quality.py --cells 30000 100000 --side-by-side    # the docs' table
    python benchmarks/time_to_quality.py --cells 20000 --tune --models dgd \\
        --dgd-config '{"default": {}, "pca": {"train": {"latent_init": "pca"}}}'
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"

sys.path.insert(0, str(HERE.parent))
from scale import peak_rss_mb  # noqa: E402  (the process's peak RSS, as in the scale benchmark)


# ------------------------------------------------------------------------------------------ data

def simulate(n_cells: int, n_genes: int, *, n_types: int = 12, seed: int = 0, chunk: int = 20_000,
             type_weights=None):
    """Counts (CSR float32) and cell types: types with markers + continuous programs, NB noise. Types are
    drawn evenly, or with probabilities ``type_weights`` (``benchmarks/rare_types.py``)."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    base = np.log(rng.gamma(0.6, 1.0, n_genes) + 1e-3)
    type_shift = np.zeros((n_types, n_genes))
    for t in range(n_types):
        markers = rng.choice(n_genes, 25, replace=False)
        type_shift[t, markers] = rng.normal(1.8, 0.5, 25)
    programs = np.zeros((3, n_genes))
    for k in range(3):
        genes = rng.choice(n_genes, 40, replace=False)
        programs[k, genes] = rng.normal(0.0, 1.2, 40)
    r = np.exp(rng.normal(np.log(3.0), 0.5, n_genes))
    types = rng.integers(0, n_types, n_cells) if type_weights is None else rng.choice(n_types, n_cells, p=type_weights)
    blocks = []
    for start in range(0, n_cells, chunk):
        crng = np.random.default_rng([seed, start])
        t = types[start:start + chunk]
        activity = crng.uniform(0.0, 1.5, (len(t), 3))
        logits = base + type_shift[t] + activity @ programs
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        library = np.exp(crng.normal(np.log(2000.0), 0.5, len(t)))
        mu = p * library[:, None]
        counts = crng.poisson(crng.gamma(r, mu / r)).astype(np.float32)
        counts[np.arange(len(t)), crng.integers(0, n_genes, len(t))] += 1  # no cell without counts
        blocks.append(sp.csr_matrix(counts))
    return sp.vstack(blocks, format="csr"), types


def dataset_path(args, n_cells: int) -> Path:
    return Path(args.data_dir) / f"ttq_{n_cells}x{args.genes}_seed{args.seed}.h5ad"


def ensure_dataset(args, n_cells: int) -> Path:
    import anndata as ad
    import pandas as pd

    path = dataset_path(args, n_cells)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    X, types = simulate(n_cells, args.genes, seed=args.seed)
    a = ad.AnnData(X, obs=pd.DataFrame({"cell_type": pd.Categorical(types.astype(str))},
                                       index=[f"cell{i}" for i in range(n_cells)]),
                   var=pd.DataFrame(index=[f"gene{j}" for j in range(args.genes)]))
    tmp = path.with_name(path.name + ".partial")
    a.write_h5ad(tmp)
    os.replace(tmp, path)
    return path


def pool_path(args, n_cells: int) -> Path:
    return dataset_path(args, n_cells).with_suffix(f".{'tune' if args.tune else 'test'}_pool.h5ad")


def ensure_pool_file(args, n_cells: int) -> Path:
    """The training pool (every cell but the scored ones) as its own h5ad, for a DGD trained from disk;
    written once, in row chunks, never holding the matrix."""
    import anndata as ad

    from dgdlens.data.matrix import write_h5ad_in_chunks

    path = pool_path(args, n_cells)
    if path.exists():
        return path
    full = ad.read_h5ad(dataset_path(args, n_cells), backed="r")
    rows, _ = split(full.n_obs, args.test_cells, args.seed, args.tune)

    def chunks(step=50_000):
        for start in range(0, full.n_obs, step):
            block = full.X[start:start + step]
            keep = rows[(rows >= start) & (rows < start + step)] - start
            yield block[keep]

    write_h5ad_in_chunks(path, chunks(), full.var_names, obs_names=full.obs_names[rows])
    return path


def split(n_cells: int, n_held: int, seed: int, tune: bool):
    """(training pool, scored cells): test cells, or with tune validation cells taken from the pool."""
    order = np.random.default_rng(seed + 7).permutation(n_cells)
    test, pool = order[:n_held], order[n_held:]
    if tune:
        return np.sort(pool[n_held:]), np.sort(pool[:n_held])
    return np.sort(pool), np.sort(test)


# ------------------------------------------------------------------------------------------ snapshots

class Snapshots:
    """Copies of a module's weights at geometrically spaced elapsed times (plus the first epochs)."""

    def __init__(self, module, grid: float, t0: float, latents=None):
        self.module, self.grid, self.t0, self.latents = module, grid, t0, latents
        self.items: list[dict] = []
        self.next_time = 0.0

    def __call__(self, epoch: int) -> None:
        elapsed = time.perf_counter() - self.t0
        if elapsed >= self.next_time:
            state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
            item = {"epoch": int(epoch), "time_s": elapsed, "state": state}
            if self.latents is not None:
                item["latents"] = self.latents().detach().clone()
            self.items.append(item)
            self.next_time = max(elapsed * self.grid, elapsed + 1.0)


# ------------------------------------------------------------------------------------------ workers

def dgd_worker(adata, train_idx, scored, cfg: dict, args) -> dict:
    import dgdlens as dl
    from dgdlens.evaluate import count_split_nll, split_model

    cfg = copy.deepcopy(cfg)
    train_kwargs = cfg.pop("train", {})
    refit = train_kwargs.get("refit_prior_at_end", True)
    if args.backed:  # the DGD reads its training cells from disk (the pool file), as at atlas scale
        import anndata as ad

        train = ad.read_h5ad(pool_path(args, args.worker_cells), backed="r")
    else:
        train = adata[train_idx].copy()
    t0 = time.perf_counter()
    model = dl.DGD(train, seed=args.seed, **cfg)
    # the latents the epochs train (with decoder_subsample, the plan's copy of the subsample's rows)
    plans = []
    make_plan = model._make_plan
    model._make_plan = lambda **kw: plans.append(make_plan(**kw)) or plans[-1]
    snaps = Snapshots(model.module, args.grid, t0, latents=lambda: plans[-1].train_table.z)
    weights = {}  # a weighted decoder sample's weights, when the model's own refit uses them

    def on_epoch(row):
        snaps(row["epoch"])
        plan = plans[-1]
        weights.setdefault("w", plan._fit_weights if plan.cfg.refit_sample_weights else None)

    model.train(device=args.device, progress=False, callbacks=[on_epoch], **train_kwargs)
    total = time.perf_counter() - t0
    rss = peak_rss_mb()
    final_state = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    kw = {"p": 0.5, "seed": 10_000 + args.seed}
    curve = []
    for s in snaps.items:
        # as if training stopped here: the end-of-training EM refit of the mixture on the training latents,
        # as the model's own (its time is added; the polish of the training latents does not change
        # held-out scores)
        model.module.load_state_dict(s["state"])
        tic = time.perf_counter()
        if refit:
            model.module.prior.fit_to(s["latents"], seed=args.seed, sample_weight=weights.get("w"))
        refit_s = time.perf_counter() - tic
        curve.append({"epoch": s["epoch"], "time_s": s["time_s"] + refit_s, "refit_s": refit_s,
                      "nll": float(count_split_nll(split_model(model), scored, **kw).mean())})
    model.module.load_state_dict(final_state)
    final = float(count_split_nll(split_model(model), scored, **kw).mean())
    curve.append({"epoch": len(model.history_), "time_s": total, "nll": final, "final": True})
    return {"curve": curve, "final_nll": final, "train_s": total, "epochs": len(model.history_),
            "best_epoch": model.train_summary_.get("best_epoch"), "peak_rss_mb": rss,
            "history": model.history_.to_dict(orient="list")}


def scvi_worker(adata, train_idx, scored, cfg: dict, args) -> dict:
    import scvi
    from lightning.pytorch.callbacks import Callback

    from dgd_vs_scvi import scvi_split_models

    from dgdlens.evaluate import count_split_nll

    scvi.settings.seed = args.seed
    scvi.settings.dl_num_workers = 0
    train = adata[train_idx].copy()
    t0 = time.perf_counter()
    scvi.model.SCVI.setup_anndata(train)
    model = scvi.model.SCVI(train, gene_likelihood="nb", **cfg)
    snaps = Snapshots(model.module, args.grid, t0)

    class Snap(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snaps(trainer.current_epoch)

    accelerator = "gpu" if str(args.device).startswith("cuda") else "cpu"
    model.train(accelerator=accelerator, train_size=0.9, enable_progress_bar=False, callbacks=[Snap()])
    total = time.perf_counter() - t0
    rss = peak_rss_mb()
    epochs = len(model.history["elbo_train"])
    final_state = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    kw = {"p": 0.5, "seed": 10_000 + args.seed}
    model.module.to("cpu")
    curve = []
    points = [(s["epoch"], s["time_s"], s["state"], False) for s in snaps.items] + [(epochs, total, final_state, True)]
    for epoch, t, state, is_final in points:
        model.module.load_state_dict(state)
        scorers = scvi_split_models(model, adata.var_names)
        row = {"epoch": epoch, "time_s": t, "final": is_final}
        for name, scorer in scorers.items():
            row["nll" if name == "refined" else "nll_amortised"] = float(count_split_nll(scorer, scored, **kw).mean())
        curve.append(row)
    return {"curve": curve, "final_nll": curve[-1]["nll"], "final_nll_amortised": curve[-1]["nll_amortised"],
            "train_s": total, "epochs": epochs, "best_epoch": None, "peak_rss_mb": rss}


def worker(args) -> None:
    import anndata as ad
    import torch

    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)  # sklearn's EM refit and numpy too, not only torch
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # pay torch._dynamo's import outside the timings
    backed = args.backed and args.worker_model == "dgd"  # scVI is given its cells in memory
    adata = ad.read_h5ad(dataset_path(args, args.worker_cells), backed="r" if backed else None)
    train_idx, scored_idx = split(adata.n_obs, args.test_cells, args.seed, args.tune)
    scored = adata[scored_idx].to_memory() if backed else adata[scored_idx].copy()
    cfg = json.loads(args.worker_config)
    fn = dgd_worker if args.worker_model == "dgd" else scvi_worker
    out = fn(adata, train_idx, scored, cfg, args)
    out.update({"model": args.worker_name, "family": args.worker_model, "n_cells": int(adata.n_obs),
                "n_train": int(len(train_idx)), "n_scored": int(len(scored_idx)), "threads": args.threads,
                "device": args.device, "tune": bool(args.tune), "config": cfg, "backed": bool(backed)})
    tmp = Path(args.worker_out).with_suffix(".partial")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, args.worker_out)


# ------------------------------------------------------------------------------------------ driver

def launch(args, n_cells: int, family: str, name: str, cfg: dict, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(HERE), "worker", "--worker-cells", str(n_cells), "--worker-model", family,
           "--worker-name", name, "--worker-config", json.dumps(cfg), "--worker-out", str(out),
           "--genes", str(args.genes), "--seed", str(args.seed), "--test-cells", str(args.test_cells),
           "--threads", str(args.threads), "--grid", str(args.grid), "--device", args.device,
           "--data-dir", args.data_dir] + (["--tune"] if args.tune else []) + (["--backed"] if args.backed else [])
    return subprocess.Popen(cmd)


def time_to_reach(curve: list[dict], target: float) -> float | None:
    for point in curve:
        if point["nll"] <= target:
            return point["time_s"]
    return None


def scvi_final_nll(results: list[dict], n_cells: int) -> float | None:
    """The target at one size: the best final held-out NLL of the scVI runs there (None without one)."""
    finals = [r["final_nll"] for r in results if r["n_cells"] == n_cells and r["family"] == "scvi"]
    return min(finals) if finals else None


def table(results: list[dict]) -> str:
    lines = ["| cells | model | epochs | train s | peak RSS MB | final NLL (refined) | final NLL (amortised) | "
             "time to scVI's final NLL, s |", "|---|---|---|---|---|---|---|---|"]
    for n in sorted({r["n_cells"] for r in results}):
        rows = [r for r in results if r["n_cells"] == n]
        target = scvi_final_nll(results, n)
        for r in rows:
            reach = None if target is None else time_to_reach(r["curve"], target)
            amort = r.get("final_nll_amortised")
            lines.append(f"| {n:,} | {r['model']} | {r['epochs']} | {r['train_s']:.0f} | {r['peak_rss_mb']:.0f} | "
                         f"{r['final_nll']:.2f} | {'-' if amort is None else format(amort, '.2f')} | "
                         f"{'not reached' if reach is None and target is not None else ('-' if reach is None else format(reach, '.0f'))} |")
    return "\n".join(lines)


FAMILY_NAMES = {"dgd": "DGD", "scvi": "scVI"}


def plot_time_to_target(results: list[dict], ax) -> None:
    """Cells against wall time: each model's time to scVI's final NLL (solid) and its whole run (dashed)."""
    # one line per package when each size has one run of it (row names may differ, e.g. a capped run),
    # else one per row name (tuning runs compare several configurations of one package)
    per_size = [(r["n_cells"], r["family"]) for r in results]
    key = "family" if len(per_size) == len(set(per_size)) else "model"
    for name in sorted({r[key] for r in results}):
        reach, total = [], []
        for n in sorted({r["n_cells"] for r in results}):
            target = scvi_final_nll(results, n)
            run = [r for r in results if r["n_cells"] == n and r[key] == name]
            if not run or target is None:
                continue
            t = time_to_reach(run[0]["curve"], target)
            if t is not None:
                reach.append((n, t))
            total.append((n, run[0]["train_s"]))
        label = FAMILY_NAMES.get(name, name)
        line, = ax.plot(*zip(*reach), marker="o", label=f"{label}: to scVI's final NLL") if reach else (None,)
        if total:
            ax.plot(*zip(*total), ls="--", marker=".", color=None if line is None else line.get_color(),
                    label=f"{label}: whole run")
    sizes = sorted({r["n_cells"] for r in results})
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sizes, labels=[f"{n / 1000:g}k" for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("cells")
    ax.set_ylabel("wall time, s")
    ax.set_title("time to scVI's final held-out NLL")
    ax.legend(fontsize=7)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["n_cells"] for r in results})
    fig, axes = plt.subplots(1, len(sizes) + 1, figsize=(4.5 * (len(sizes) + 1), 3.6), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for r in [r for r in results if r["n_cells"] == n]:
            t = [p["time_s"] for p in r["curve"]]
            y = [p["nll"] for p in r["curve"]]
            ax.plot(t, y, marker=".", label=r["model"])
        finals = [r["final_nll"] for r in results if r["n_cells"] == n]
        ax.set_ylim(min(finals) - 0.02 * abs(min(finals)), min(finals) + 0.08 * abs(min(finals)))
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no crowded labels within a decade
        ax.set_xlabel("wall time, s (training only)")
        ax.set_title(f"{n:,} cells")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out NB NLL, nats/cell")
    plot_time_to_target(results, axes[0][-1])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", nargs="?", default="run", choices=["run", "worker", "table"])
    p.add_argument("--cells", nargs="+", type=int, default=[30_000, 100_000])
    p.add_argument("--genes", type=int, default=500)
    p.add_argument("--test-cells", type=int, default=2_000)
    p.add_argument("--models", nargs="+", default=["dgd", "scvi"], choices=["dgd", "scvi"])
    p.add_argument("--dgd-config", type=json.loads, default=None, help='JSON {"row name": {DGD kwargs, "train": {...}}}')
    p.add_argument("--scvi-config", type=json.loads, default=None, help='JSON {"row name": {SCVI kwargs}}')
    p.add_argument("--side-by-side", action="store_true", help="run the workers of one size at the same time")
    p.add_argument("--tune", action="store_true", help="score on validation cells of the pool, never on test cells")
    p.add_argument("--backed", action="store_true",
                   help="the DGD trains from a backed file of the training pool (scVI still in memory)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--grid", type=float, default=1.3, help="snapshot when elapsed time grew by this factor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="/tmp/dgdlens-ttq")
    p.add_argument("--tag", default=None)
    for name in ("cells", "model", "name", "config", "out"):
        p.add_argument(f"--worker-{name}", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.command == "worker":
        args.worker_cells = int(args.worker_cells)
        return worker(args)
    tag = args.tag or ("time_to_quality_tune" if args.tune else "time_to_quality")
    out_dir = RESULTS / tag
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.command == "run":
        configs = ([("dgd", n, c) for n, c in (args.dgd_config or {"DGD": {}}).items()] if "dgd" in args.models else []) + \
                  ([("scvi", n, c) for n, c in (args.scvi_config or {"scVI": {}}).items()] if "scvi" in args.models else [])
        for n_cells in args.cells:
            tic = time.perf_counter()
            ensure_dataset(args, n_cells)
            if args.backed:
                ensure_pool_file(args, n_cells)
            print(f"data {n_cells} x {args.genes}: {time.perf_counter() - tic:.0f} s", flush=True)
            procs = []
            for family, name, cfg in configs:
                out = out_dir / f"{n_cells}_{name.replace(' ', '_')}.json"
                proc = launch(args, n_cells, family, name, cfg, out)
                if args.side_by_side:
                    procs.append(proc)
                elif proc.wait() != 0:
                    raise SystemExit(f"worker {name} at {n_cells} cells failed")
            if any(proc.wait() != 0 for proc in procs):
                raise SystemExit(f"a worker at {n_cells} cells failed")
    results = [json.loads(f.read_text()) for f in sorted(out_dir.glob("*.json"))]
    header = (f"{len(results)} runs; {os.cpu_count()} cores, load average now {os.getloadavg()[0]:.2f}; "
              f"{'VALIDATION cells (tuning)' if args.tune else 'test cells'}")
    md = f"# Time to quality\n\n{header}\n\n{table(results)}\n"
    (out_dir / "table.md").write_text(md)
    plot(results, out_dir / "curves.png")
    print(md)


if __name__ == "__main__":
    main()
