"""The end-of-training polish: its learning rate (and batch) against its time and the objective it reaches.

The polish re-fits every training latent under the refitted mixture with the decoder frozen, and past
``decoder_subsample`` training cells it is what embeds the cells the epochs did not train. Training is
seeded, so two runs that differ only in the polish settings end their epochs identically; what differs is
the time after the last epoch and the polished latents' MAP objective (per cell: reconstruction NB NLL +
the mixture's negative log density; lower is better; these are the cells' own objective, not a held-out
score, because the polish optimises exactly it).

    python benchmarks/polish_lr.py                       # pbmc68k and 60,000 simulated cells, lr 0.01 vs 0.03
    python benchmarks/polish_lr.py --data sim60k --polish-lr 0.01 --polish-batch 2048 8192

Each setting trains in its own process with one thread; the settings of one data set run side by side.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def load(name: str):
    import anndata as ad

    import dgdlens as dl

    if name == "pbmc68k":
        return dl.data.pbmc68k_counts(), {}, None
    sys.path.insert(0, str(HERE.parent))
    from time_to_quality import simulate

    counts, types = simulate(60_000, 500, seed=3)
    adata = ad.AnnData(counts)
    adata.obs["cell_type"] = types.astype(str)
    return adata, {"decoder_subsample": 10_000}, "cell_type"


def worker(args) -> None:
    import numpy as np
    import torch
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score
    from threadpoolctl import threadpool_limits

    import dgdlens as dl
    import dgdlens.train.decoder_only_plan as plan_module

    torch.set_num_threads(1)
    threadpool_limits(1)
    plan_module.POLISH_BATCH = args.worker_batch
    adata, train_kwargs, label_key = load(args.worker_data)
    model = dl.DGD(adata, seed=args.seed)
    epoch_ends = []
    t0 = time.perf_counter()
    model.train(progress=False, polish_lr=args.worker_lr, **train_kwargs,
                callbacks=[lambda row: epoch_ends.append(time.perf_counter() - t0)])
    total = time.perf_counter() - t0
    cells = model.train_idx
    z = model.get_latent_representation()[cells]
    recon = model.get_reconstruction_error(per_sample=True)[cells]
    with torch.no_grad():
        prior = -model.module.prior.log_prob(torch.as_tensor(z)).numpy()
    out = {"data": args.worker_data, "polish_lr": args.worker_lr, "polish_batch": args.worker_batch,
           "epochs": len(epoch_ends), "train_s": total, "after_last_epoch_s": total - epoch_ends[-1],
           "recon": float(recon.mean()), "prior": float(prior.mean()), "objective": float(np.mean(recon + prior))}
    if label_key is not None:
        labels = adata.obs[label_key].to_numpy()[cells]
        k = len(set(labels))
        out["kmeans_ari"] = adjusted_rand_score(labels, KMeans(k, n_init=3, random_state=0).fit_predict(z))
    print(json.dumps(out), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["pbmc68k", "sim60k"], choices=["pbmc68k", "sim60k"])
    p.add_argument("--polish-lr", nargs="+", type=float, default=[0.01, 0.03])
    p.add_argument("--polish-batch", nargs="+", type=int, default=[2048])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker-data", help=argparse.SUPPRESS)
    p.add_argument("--worker-lr", type=float, help=argparse.SUPPRESS)
    p.add_argument("--worker-batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_data:
        return worker(args)
    print("data     lr      batch  epochs  train s  after last epoch s  objective  (recon + prior)  k-means ARI")
    for data in args.data:
        procs = [subprocess.Popen([sys.executable, str(HERE), "--worker-data", data, "--worker-lr", str(lr),
                                   "--worker-batch", str(batch), "--seed", str(args.seed)],
                                  stdout=subprocess.PIPE, text=True)
                 for lr, batch in itertools.product(args.polish_lr, args.polish_batch)]
        for proc in procs:
            stdout, _ = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"worker failed ({proc.returncode})")
            r = json.loads(stdout.strip().splitlines()[-1])
            ari = f"{r['kmeans_ari']:.3f}" if "kmeans_ari" in r else "-"
            print(f"{r['data']:8s} {r['polish_lr']:<7g} {r['polish_batch']:<6d} {r['epochs']:<7d} {r['train_s']:<8.1f} "
                  f"{r['after_last_epoch_s']:<19.1f} {r['objective']:<10.2f} ({r['recon']:.2f} {r['prior']:+.2f})  {ari}",
                  flush=True)


if __name__ == "__main__":
    main()
