"""Out-of-core and multi-process DGD training at a million cells.

1. Simulates a 1,000,000-cell x 5,000-gene count matrix chunk by chunk and appends it to a backed
   ``.h5ad`` (never whole in memory).
2. Trains one epoch from disk with 1 process and with P processes (``torchrun``, gloo on CPU).
3. Trains one epoch on 100,000 cells held in memory, for comparison.

Each run is a fresh process (or ``torchrun`` group), so peak RSS is per process. Before each
backed run the data file is dropped from the page cache (``posix_fadvise(DONTNEED)``, this file
only), so the epoch really reads from disk. Prints a table: cells/s, epoch time, peak RSS per
process, and where the time went (data reading in the prefetch thread, the training loop waiting
for data, all-reduce, the rest = compute).

With ``worker --defaults`` one process trains ``DGD(adata)`` with its default settings (validation split,
end-of-training mixture refit and latent polish included) for ``--epochs`` epochs from the backed file
and prints its peak RSS and where the time went (the numbers in docs/scaling.md's "with the defaults").

Usage::

    nice -n 10 python benchmarks/scale.py --data /tmp/scale/cells1M.h5ad            # everything
    python benchmarks/scale.py --n-cells 20000 --n-genes 2000 --mem-cells 5000 --data /tmp/s.h5ad  # quick
    python benchmarks/scale.py generate --n-cells 1000000 --n-genes 1000 --data /tmp/s1M.h5ad
    python benchmarks/scale.py worker --defaults --data /tmp/s1M.h5ad   # defaults, 1 epoch, peak RSS
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: VmHWM. Not ``ru_maxrss``: Linux carries the parent's peak
    over a fork and exec into it, so a worker launched by a parent that simulated a million cells reported
    the parent's 5 GB as its own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM), so the training phase is measured apart
    from loading the data (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def generate(path: Path, n_cells: int, n_genes: int, seed: int, mean_library: float) -> dict:
    from dgdlens.data.matrix import write_h5ad_in_chunks
    from dgdlens.sim.counts import simulate_count_chunks

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    t0 = time.perf_counter()
    chunks = (c for c, _ in simulate_count_chunks(n_cells, n_genes, chunk_size=10_000, seed=seed,
                                                  mean_library=mean_library))
    write_h5ad_in_chunks(tmp, chunks, [f"gene{j}" for j in range(n_genes)])
    os.replace(tmp, path)
    return {"generate_s": time.perf_counter() - t0, "file_gb": path.stat().st_size / 1e9,
            "generate_peak_rss_mb": peak_rss_mb()}


def drop_from_page_cache(path: Path) -> None:
    """Evict this one file from the OS page cache (affects nothing else), so reads hit the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------
# one run (a single process, or one rank of a torchrun group)
# ---------------------------------------------------------------------------------------------------

def worker(args) -> None:
    import anndata as ad
    import scipy.sparse as sp
    import torch

    torch.set_num_threads(args.threads)
    from dgdlens import _dist as distributed
    from dgdlens.models.dgd import DGD
    from dgdlens.train import Runner, RunnerConfig

    t0 = time.perf_counter()
    if args.mode == "memory":  # the first n cells of the same file, loaded into memory
        adata = ad.read_h5ad(args.data, backed="r")[: args.n_cells].to_memory()
        assert sp.issparse(adata.X)
    else:
        adata = ad.read_h5ad(args.data, backed="r")
    load_s = time.perf_counter() - t0
    rss_after_load = peak_rss_mb()
    has_reset = reset_peak_rss()

    if args.defaults:
        return defaults_worker(args, adata, load_s, rss_after_load, has_reset)
    t0 = time.perf_counter()
    model = DGD(adata, n_latent=20, validation_fraction=0.0, seed=args.seed)
    init_s = time.perf_counter() - t0  # includes one validation pass over every count (library sizes)
    if args.mode == "backed":
        drop_from_page_cache(Path(args.data))  # that pass cached the file; make the epoch read from disk

    # the runner directly (what DGD.train does), to read the plan's loader statistics afterwards; one
    # epoch without the end-of-training mixture refit, the quantity docs/scaling.md reports per epoch
    plan = model._make_plan(batch_size=args.batch_size, seed=args.seed, lr_decay_epoch=None,
                            max_batches=args.max_batches, refit_prior_at_end=False)
    runner = Runner(plan, RunnerConfig(max_epochs=1, early_stopping=False, progress=False, seed=args.seed,
                                       restore_best=False), torch.device("cpu"), kind="DGD",
                    fingerprint=model._fingerprint())
    t0 = time.perf_counter()
    runner.fit()
    train_s = time.perf_counter() - t0
    epoch_s = runner.history[-1]["time"]
    stats = plan.train_loader.stats
    out = {
        "mode": args.mode, "rank": distributed.rank(), "world_size": distributed.world_size(),
        "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars), "cells_local": int(plan.train_loader.n),
        "load_s": load_s, "init_s": init_s, "train_call_s": train_s, "epoch_s": epoch_s,
        "read_s": stats.read_s, "densify_s": stats.densify_s, "wait_s": stats.wait_s,
        "comm_s": float(getattr(runner.strategy, "comm_s", 0.0)), "n_batches": stats.n_batches,
        "cells_trained": stats.n_rows,
        "train_loss": runner.history[-1]["train_loss"], "peak_rss_mb": max(rss_after_load, peak_rss_mb()),
        "rss_after_load_mb": rss_after_load,
        "peak_rss_after_load_mb": peak_rss_mb() if has_reset else float("nan"),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / f"{args.mode}-{out['world_size']}-rank{out['rank']}.json", "w") as fh:
        json.dump(out, fh, indent=1)


def defaults_worker(args, adata, load_s: float, rss_after_load: float, has_reset: bool) -> None:
    """``DGD(adata).train(max_epochs=--epochs)`` with every other setting at its default: validation split,
    early-stopping bookkeeping, the end-of-training mixture refit and latent polish included. Where the
    time went comes from the history (epochs) and the remainder (refit + polish + gathering)."""
    from dgdlens import _dist as distributed
    from dgdlens.models.dgd import DGD

    t0 = time.perf_counter()
    model = DGD(adata, seed=args.seed)
    init_s = time.perf_counter() - t0
    drop_from_page_cache(Path(args.data))
    t0 = time.perf_counter()
    model.train(max_epochs=args.epochs, device="cpu", progress=False)
    train_s = time.perf_counter() - t0
    epochs_s = float(sum(row["time"] for row in model.history_.to_dict("records")))
    out = {
        "mode": "backed-defaults", "rank": distributed.rank(), "world_size": distributed.world_size(),
        "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars), "epochs": args.epochs,
        "load_s": load_s, "init_s": init_s, "train_call_s": train_s, "epoch_s": epochs_s / args.epochs,
        "end_of_training_s": train_s - epochs_s, "peak_rss_mb": max(rss_after_load, peak_rss_mb()),
        "rss_after_load_mb": rss_after_load,
        "peak_rss_after_load_mb": peak_rss_mb() if has_reset else float("nan"),
    }
    print(json.dumps(out), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / f"defaults-{out['n_cells']}-{out['world_size']}-rank{out['rank']}.json", "w") as fh:
        json.dump(out, fh, indent=1)


# ---------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------

def launch(args, mode: str, procs: int) -> list[dict]:
    common = ["--mode", mode, "--out", str(args.out), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
              *([] if args.max_batches is None else ["--max-batches", str(args.max_batches)]),
              "--threads", str(args.threads), "--n-genes", str(args.n_genes), "--mean-library", str(args.mean_library)]
    if mode == "memory":
        common += ["--n-cells", str(args.mem_cells)]
    common += ["--data", str(args.data)]
    drop_from_page_cache(Path(args.data))
    if procs == 1:
        cmd = [sys.executable, str(HERE), "worker", *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               str(HERE), "worker", *common]
    print("running:", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    wall = time.perf_counter() - t0
    rows = []
    for r in range(procs):
        with open(Path(args.out) / f"{mode}-{procs}-rank{r}.json") as fh:
            row = json.load(fh)
        row["process_wall_s"] = wall
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> dict:
    measured = max(r["epoch_s"] for r in rows)
    n = rows[0]["n_cells"]
    trained = sum(r["cells_trained"] for r in rows)
    return {
        "run": f"{rows[0]['mode']} x{len(rows)}", "cells": n, "cells_trained": trained, "measured_s": measured,
        "cells_per_s": trained / measured, "epoch_s": n * measured / trained,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rows), "init_s": max(r["init_s"] for r in rows),
        "train_peak_rss_mb": max(r.get("peak_rss_after_load_mb", float("nan")) for r in rows),
        "read_s": np.mean([r["read_s"] + r["densify_s"] for r in rows]),
        "wait_s": np.mean([r["wait_s"] for r in rows]), "comm_s": np.mean([r["comm_s"] for r in rows]),
        "compute_s": np.mean([r["epoch_s"] - r["wait_s"] - r["comm_s"] for r in rows]),
        # the history's loss is summed over the trained cells and divided by all training cells
        "loss_per_cell": rows[0]["train_loss"] * n / trained,
    }


def print_table(summaries: list[dict]) -> None:
    head = (f"{'run':<12}{'cells':>10}{'trained':>10}{'measured s':>11}{'epoch s':>10}{'cells/s':>10}"
            f"{'peak RSS MB':>13}{'after load':>11}{'init s':>9}{'read s*':>9}{'wait s':>9}{'allred s':>10}{'compute s':>11}"
            f"{'loss/cell':>11}")
    print(head)
    print("-" * len(head))
    for s in summaries:
        print(f"{s['run']:<12}{s['cells']:>10,}{s['cells_trained']:>10,}{s['measured_s']:>11.1f}{s['epoch_s']:>10.1f}"
              f"{s['cells_per_s']:>10.0f}{s['peak_rss_mb']:>13.0f}{s['train_peak_rss_mb']:>11.0f}"
              f"{s['init_s']:>9.1f}{s['read_s']:>9.1f}{s['wait_s']:>9.1f}{s['comm_s']:>10.1f}{s['compute_s']:>11.1f}"
              f"{s['loss_per_cell']:>11.1f}")
    print("epoch s = cells / cells per s: the full epoch, extrapolated when --max-batches cut it short "
          "(measured s covers the trained cells plus the end-of-epoch representation step).")
    print("* read s: time the prefetch thread spent reading + densifying (overlaps compute); wait s: time the "
          "training loop was blocked on data; compute s = epoch - wait - all-reduce. Per-process means; "
          "peak RSS is the largest process (after load: the peak from DGD() construction on, data loading excluded); init s is DGD() construction incl. one validation pass over the file.")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", nargs="?", default="all", choices=["all", "generate", "worker", "table"],
                   help="all: generate if needed, run, print; table: print the results already in --out")
    p.add_argument("--data", default="/tmp/dgdlens-scale/cells1M.h5ad")
    p.add_argument("--out", default="/tmp/dgdlens-scale/results")
    p.add_argument("--n-cells", type=int, default=1_000_000)
    p.add_argument("--n-genes", type=int, default=5_000)
    p.add_argument("--mem-cells", type=int, default=100_000)
    p.add_argument("--mean-library", type=float, default=800.0)
    p.add_argument("--procs", type=int, nargs="*", default=[1, 2], help="backed runs to make (none: only memory)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", default="backed", choices=["backed", "memory"])
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--max-batches", type=int, default=None,
                   help="stop each epoch after this many (global) batches and extrapolate the epoch time")
    p.add_argument("--defaults", action="store_true",
                   help="worker: train with the DGD's defaults (validation, refit, polish) for --epochs epochs")
    p.add_argument("--epochs", type=int, default=1, help="epochs of a --defaults worker")
    args = p.parse_args(argv)

    if args.command == "worker":
        worker(args)
        return
    if args.command == "table":
        runs = [("memory", 1)] + [("backed", p) for p in args.procs]
        print_table([summarise([json.load(open(Path(args.out) / f"{m}-{p}-rank{r}.json")) for r in range(p)])
                     for m, p in runs if (Path(args.out) / f"{m}-{p}-rank0.json").exists()])
        return
    data = Path(args.data)
    if not data.exists():
        info = generate(data, args.n_cells, args.n_genes, args.seed, args.mean_library)
        print(f"generated {data}: {info['file_gb']:.2f} GB in {info['generate_s']:.0f} s, "
              f"peak RSS {info['generate_peak_rss_mb']:.0f} MB", flush=True)
    if args.command == "generate":
        return
    print("load average before:", os.getloadavg(), flush=True)
    summaries = []
    if not args.skip_memory:
        summaries.append(summarise(launch(args, "memory", 1)))
    for procs in args.procs:
        summaries.append(summarise(launch(args, "backed", procs)))
        print_table(summaries)
    print("load average after:", os.getloadavg())
    print_table(summaries)
    with open(Path(args.out) / "summary.json", "w") as fh:
        json.dump(summaries, fh, indent=1, default=float)


if __name__ == "__main__":
    main()
