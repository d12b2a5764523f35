"""A small SAE hyperparameter landscape on the superposition simulation, and SAE training speed.

1. Landscape: simulate the reference's large simulation (fewer genes, so it fits a CPU), embed the
   genes with an MLP autoencoder (dgdlens.sim.embed_superposition), then train one SAE per
   (variant x width x sparsity) on the training cells' latents and score it on held-out cells:
   fraction of masked programs X'' recovered at best |r| >= 0.9 (plus the Hungarian one-to-one version),
   mean best |r| for X, X' and X'', mean best one-vs-rest AUROC for cell type and covariate, the
   fraction of programs identified by the structure test, L0, FVU and dead / dense fractions.
   Writes landscape.csv and landscape.png.
2. Speed: seconds per epoch of a 10,000-latent SAE on 50,000 x 20 inputs (the reference's single-cell
   setting: 10,000 latents on a 20-d DGD latent), for the paper preset (ReLU + L1, batch 128) and TopK.

    python benchmarks/sae_landscape.py            # the real run (~30 min on 2 busy cores)
    python benchmarks/sae_landscape.py --quick    # small sizes, a few minutes

Times are wall-clock and CPU seconds of this process (CPU is the steadier number on a shared machine).
Every SAE trains on one CPU thread by default (``--threads``): SAE steps are small matrix products,
and on a shared machine one thread is usually as fast as two.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

import dgdlens.sae as sae_lib
from dgdlens.sim.superposition import embed_superposition, planted_sparse_codes, simulate_superposition

SIZES = {
    "full": dict(n_cells=8_000, n_genes=1_000, n_programs=100, n_cell_types=40, n_covariates=3, n_latent=100,
                 ae_epochs=25, sae_epochs=25, width_factors=(5, 20), timing_cells=50_000, timing_epochs=2),
    "quick": dict(n_cells=3_000, n_genes=400, n_programs=30, n_cell_types=10, n_covariates=3, n_latent=30,
                  ae_epochs=15, sae_epochs=15, width_factors=(4, 16), timing_cells=5_000, timing_epochs=1),
}

#: Three sparsity levels per variant (low -> high L0): k for TopK / BatchTopK / JumpReLU (target L0),
#: the L1 coefficient for ReLU (sum convention, normalised inputs; larger = sparser).
SPARSITY = {
    "topk": [("k", 5), ("k", 20), ("k", 50)],
    "batchtopk": [("k", 5), ("k", 20), ("k", 50)],
    "jumprelu": [("k", 5), ("k", 20), ("k", 50)],
    "relu": [("l1_coef", 3.0), ("l1_coef", 1.0), ("l1_coef", 0.3)],
}


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def landscape(size: dict, args) -> pd.DataFrame:
    t0 = time.perf_counter()
    sim = simulate_superposition(size["n_cells"], n_genes=size["n_genes"], n_programs=size["n_programs"],
                                 n_cell_types=size["n_cell_types"], n_covariates=size["n_covariates"], seed=args.seed)
    train, test = sim.split(0.2, seed=args.seed)
    print(f"simulated {sim.n_cells:,} cells x {size['n_genes']:,} genes, {size['n_programs']} programs, "
          f"{size['n_cell_types']} cell types, {size['n_covariates']} covariates in {time.perf_counter() - t0:.1f} s; "
          f"{train.n_cells:,} train / {test.n_cells:,} held-out cells")
    t0 = time.perf_counter()
    emb = embed_superposition(train, n_latent=size["n_latent"], max_epochs=size["ae_epochs"], patience=10,
                              device=args.device, seed=args.seed, num_threads=args.threads)
    Z_train, Z_test = emb.latent, emb.transform(test)
    ae_fvu = _ae_fvu(emb, test)
    print(f"autoencoder {size['n_genes']} -> {size['n_latent']}: {emb.model.train_summary_['epochs_run']} epochs in "
          f"{time.perf_counter() - t0:.1f} s, held-out FVU of the genes {ae_fvu:.3f}")
    print(f"linear read-out of X'' from the latent (held-out R^2, median over programs): "
          f"{_linear_r2(Z_train, train.X_ct, Z_test, test.X_ct):.3f}")
    truth = test.ground_truth()

    rows = []
    for kind, levels in SPARSITY.items():
        for factor in size["width_factors"]:
            n_latents = factor * size["n_latent"]
            for name, value in levels:
                if name == "k" and value > n_latents:
                    continue
                t0, cpu0 = time.perf_counter(), time.process_time()
                model = sae_lib.train_sae(Z_train, kind=kind, n_latents=n_latents, max_epochs=size["sae_epochs"],
                                          batch_size=128, device=args.device, seed=args.seed, progress=False,
                                          num_threads=args.threads, **{name: value})
                seconds = time.perf_counter() - t0
                cpu_seconds = time.process_time() - cpu0
                report = sae_lib.recovery_report(model, Z_test, continuous=truth["continuous"],
                                                 categorical=truth["categorical"], threshold=0.9)
                _, structure = sae_lib.structure_identification(model.encode(Z_test), test.Y, test.programs,
                                                                percentile=90)
                summary = report["summary"].set_index("group")
                q = report["quality"]
                row = {
                    "variant": kind, "n_latents": n_latents, "width": f"x{factor}", "sparsity": f"{name}={value:g}",
                    "frac_X''_r>=0.9": summary.loc["X''", "fraction_recovered"],
                    "frac_X''_matched": summary.loc["X''", "fraction_recovered_matched"],
                    "best_r_X": summary.loc["X", "mean_best"], "best_r_X'": summary.loc["X'", "mean_best"],
                    "best_r_X''": summary.loc["X''", "mean_best"],
                    "auroc_celltype": summary.loc["cell type", "mean_best"],
                    "auroc_covariate": summary.loc["covariate", "mean_best"],
                    "programs_identified": structure["fraction_identified"],
                    "program_coverage": structure["mean_coverage"],
                    "L0": q["l0"], "FVU": q["fvu"], "dead": q["dead_fraction"], "dense": q["dense_fraction"],
                    "train_wall_s": seconds, "train_cpu_s": cpu_seconds,
                }
                rows.append(row)
                print("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
    return pd.DataFrame(rows)


def _ae_fvu(emb, test) -> float:
    Y_hat = emb.model.decode(emb.transform(test)) * emb.scale + emb.gene_mean
    return float(((test.Y - Y_hat) ** 2).sum() / ((test.Y - test.Y.mean(0)) ** 2).sum())


def _linear_r2(Z_train, V_train, Z_test, V_test) -> float:
    coef = np.linalg.lstsq(np.c_[Z_train, np.ones(len(Z_train))], V_train, rcond=None)[0]
    pred = np.c_[Z_test, np.ones(len(Z_test))] @ coef
    var = ((V_test - V_test.mean(0)) ** 2).sum(0)
    ok = var > 0
    return float(np.median(1 - ((pred - V_test) ** 2).sum(0)[ok] / var[ok]))


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("frac_X''_r>=0.9", "fraction of X'' recovered (|r| >= 0.9)"), ("best_r_X''", "mean best |r|, X''"),
              ("auroc_celltype", "mean best AUROC, cell type"), ("FVU", "FVU (held-out)"),
              ("dead", "dead fraction"), ("programs_identified", "programs identified (structure test)")]
    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    markers = {w: m for w, m in zip(sorted(table["width"].unique()), "os^D")}
    colors = {k: c for k, c in zip(SPARSITY, ("tab:blue", "tab:orange", "tab:green", "tab:red"))}
    for ax, (col, title) in zip(axes.ravel(), panels):
        for (kind, width), part in table.groupby(["variant", "width"]):
            part = part.sort_values("L0")
            ax.plot(part["L0"], part[col], marker=markers[width], color=colors[kind], label=f"{kind} {width}")
        ax.set_xscale("log")
        ax.ticklabel_format(axis="y", useOffset=False)  # AUROCs of 0.99990-1.0 otherwise get an offset axis
        ax.set_xlabel("L0 (held-out)")
        ax.set_title(title)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def timing(size: dict, args) -> pd.DataFrame:
    """Seconds per epoch of a 10,000-latent SAE on cells x 20 inputs."""
    X = planted_sparse_codes(n_samples=size["timing_cells"], n_atoms=200, dim=20, k_active=5, offset_scale=1.0,
                             noise_sd=0.05, seed=args.seed).X
    rows = []
    for label, kwargs in [("paper preset (ReLU+L1, batch 128)", dict(preset="paper")),
                          ("TopK k=32, batch 256", dict(kind="topk", k=32)),
                          ("BatchTopK k=32, batch 256", dict(kind="batchtopk", k=32))]:
        cpu0 = time.process_time()
        model = sae_lib.train_sae(X, n_latents=10_000, max_epochs=size["timing_epochs"], device=args.device,
                                  seed=args.seed, progress=False, num_threads=args.threads, **kwargs)
        cpu_train = time.process_time() - cpu0  # includes the (small) initialisation
        per_epoch = list(model.history_["time"])
        n_enc = min(5_000, X.shape[0])  # a dense-ish ReLU code of all cells would need GBs of CSR
        t0, cpu0 = time.perf_counter(), time.process_time()
        F = model.encode(X[:n_enc])
        encode_s, encode_cpu = time.perf_counter() - t0, time.process_time() - cpu0
        rows.append({"model": label, "cells": X.shape[0], "d_in": X.shape[1], "n_latents": 10_000,
                     "batch": model.config.batch_size, "wall_s_per_epoch": float(np.mean(per_epoch)),
                     "cpu_s_per_epoch": cpu_train / len(per_epoch), "epochs_timed": len(per_epoch),
                     "encode_cells": n_enc, "encode_wall_s": encode_s, "encode_cpu_s": encode_cpu,
                     "encode_l0": F.nnz / n_enc})
        print("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in rows[-1].items()), flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    parser.add_argument("--out", default="benchmarks/results/sae_landscape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per SAE (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-landscape", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    size = SIZES["quick" if args.quick else "full"]
    out = Path(args.out) / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    print(f"load average at start (1/5/15 min): {load()}   cpu count: {os.cpu_count()}   threads: {args.threads}   "
          f"device: {args.device}   sizes: {'quick' if args.quick else 'full'}")
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 30)
    if not args.skip_landscape:
        t0 = time.perf_counter()
        table = landscape(size, args)
        table.to_csv(out / "landscape.csv", index=False)
        plot(table, out / "landscape.png")
        print(f"\nLandscape ({len(table)} SAEs, {time.perf_counter() - t0:.0f} s); held-out cells:")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        print(f"wrote {out / 'landscape.csv'} and {out / 'landscape.png'}")
    if not args.skip_timing:
        print(f"\nTime per epoch, 10,000 latents on {size['timing_cells']:,} x 20 inputs:")
        speed = timing(size, args)
        speed.to_csv(out / "timing.csv", index=False)
        print(speed.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"load average at end (1/5/15 min): {load()}")


if __name__ == "__main__":
    main()
