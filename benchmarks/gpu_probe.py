"""What a training step costs on a device, and where it still waits for the host.

For one lent GPU session (``benchmarks/gpu.sh check``), short by design (a minute or two on an H100):

- DGD: seconds per epoch (the mini-batch loop alone: ``decoder_subsample=None``, no early stopping, no
  end-of-training refit or polish) on ``--cells`` simulated cells (the time-to-quality simulation), at
  each of ``--batch-sizes``; then the end-of-training polish alone, in microseconds per cell-step.
- SAE: seconds per epoch of a TopK and a BatchTopK SAE (``--sae-latents`` features) on the DGD's latents
  tiled to ``--sae-rows`` rows.
- On CUDA each of these runs once more under ``torch.cuda.set_sync_debug_mode("warn")``: every operation
  that waits for the GPU warns, and the table lists where (file:line) and how often, per kind of run. A
  training epoch should wait once, at its end (the epoch's one reduction), not per mini-batch.

Results as JSON to ``--out`` (and a table on stdout). On the CPU it runs too (no sync check), to check
the script itself.

Usage::

    python benchmarks/gpu_probe.py --device cuda --out $OUT/probe.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))


def _simulated(n_cells: int, n_genes: int):
    import anndata as ad
    import pandas as pd

    from time_to_quality import simulate

    X, types = simulate(n_cells, n_genes, seed=0)
    return ad.AnnData(X, obs=pd.DataFrame({"cell_type": pd.Categorical(types.astype(str))},
                                          index=[f"cell{i}" for i in range(n_cells)]),
                      var=pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)]))


class SyncLog:
    """Counts the warnings of ``torch.cuda.set_sync_debug_mode("warn")`` by the Python line that waited."""

    def __init__(self, device: str):
        self.on = device.startswith("cuda")
        self.counts: collections.Counter = collections.Counter()

    def __enter__(self):
        if self.on:
            import torch

            self._catch = warnings.catch_warnings(record=True)
            self._records = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.on:
            import torch

            torch.cuda.set_sync_debug_mode("default")
            self._catch.__exit__(*exc)
            for w in self._records:
                if "synchroniz" in str(w.message).lower():
                    self.counts[f"{Path(w.filename).name}:{w.lineno}"] += 1
        return False


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def dgd_epochs(adata, batch_size: int, epochs: int, device: str, seed: int = 0):
    import dgdlens as dl

    model = dl.DGD(adata, seed=seed)
    model.train(max_epochs=epochs, batch_size=batch_size, early_stopping=False, decoder_subsample=None,
                refit_prior_at_end=False, polish_steps=0, device=device, progress=False)
    return model, model.history_["time"].to_numpy()


def polish_cost(model, adata, device: str, n_cells: int, steps: int) -> float:
    """Microseconds per cell-step of held-out inference (the polish's optimiser), tolerance off."""
    cells = adata[:n_cells].copy()
    _sync(device)
    tic = time.perf_counter()
    model.get_latent_representation(cells, n_steps=steps, device=device, progress=False, batch_size=2048)
    _sync(device)
    return (time.perf_counter() - tic) / (n_cells * steps) * 1e6


def sae_epochs(Z: np.ndarray, kind: str, n_latents: int, epochs: int, device: str) -> np.ndarray:
    from dgdlens import sae as S

    sae = S.train_sae(Z, kind=kind, n_latents=n_latents, k=32, max_epochs=epochs, batch_size=4096, seed=0,
                      device=device, progress=False)
    return sae.history_["time"].to_numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=500)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--epochs", type=int, default=3, help="epochs timed per batch size (the first is warm-up)")
    p.add_argument("--polish-cells", type=int, default=20_000)
    p.add_argument("--polish-steps", type=int, default=50)
    p.add_argument("--sae-rows", type=int, default=500_000)
    p.add_argument("--sae-latents", type=int, default=4096)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    out: dict = {"device": args.device, "cells": args.cells, "genes": args.genes, "torch": torch.__version__}
    if args.device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name(args.device)
    tic = time.perf_counter()
    adata = _simulated(args.cells, args.genes)
    out["simulate_s"] = round(time.perf_counter() - tic, 1)

    out["dgd_epoch_s"], syncs = {}, {}
    model = None
    for bs in args.batch_sizes:
        model, times = dgd_epochs(adata, bs, args.epochs, args.device)
        out["dgd_epoch_s"][bs] = round(float(np.median(times[1:] if len(times) > 1 else times)), 3)
        print(f"DGD epoch, batch {bs}: {out['dgd_epoch_s'][bs]} s", flush=True)
    with SyncLog(args.device) as log:
        dgd_epochs(adata[:20_000].copy(), args.batch_sizes[0], 1, args.device)
    syncs["dgd_epoch"] = dict(log.counts.most_common(12))

    out["polish_us_per_cell_step"] = round(polish_cost(model, adata, args.device, args.polish_cells,
                                                       args.polish_steps), 2)
    print(f"polish: {out['polish_us_per_cell_step']} us per cell-step", flush=True)
    with SyncLog(args.device) as log:
        polish_cost(model, adata, args.device, 2048, 20)
    syncs["polish"] = dict(log.counts.most_common(12))

    z = model.get_latent_representation()
    Z = np.tile(z, (int(np.ceil(args.sae_rows / len(z))), 1))[: args.sae_rows]
    Z = (Z + np.random.default_rng(0).normal(scale=0.01, size=Z.shape)).astype(np.float32)
    out["sae_epoch_s"] = {}
    for kind in ("topk", "batchtopk"):
        times = sae_epochs(Z, kind, args.sae_latents, 3, args.device)
        out["sae_epoch_s"][kind] = round(float(np.median(times[1:])), 3)
        print(f"SAE {kind} epoch ({args.sae_rows} rows, {args.sae_latents} latents): "
              f"{out['sae_epoch_s'][kind]} s", flush=True)
    with SyncLog(args.device) as log:
        sae_epochs(Z[:50_000], "batchtopk", args.sae_latents, 1, args.device)
    syncs["sae_epoch"] = dict(log.counts.most_common(12))
    out["host_waits"] = syncs
    for kind, counts in syncs.items():
        print(f"host waits in {kind}: " + (", ".join(f"{k} x{v}" for k, v in counts.items()) or "none recorded"))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
