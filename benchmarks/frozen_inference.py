"""Fitting latents with the model frozen: the likelihood's data-only terms once per batch, not per step.

The end-of-training polish, held-out embedding and count-split scoring all run Adam on latents with the
decoder and the dispersion frozen. The negative binomial's log-pmf has three ``lgamma`` per entry that
depend only on the counts and the dispersion (:meth:`dgdlens.nn.Likelihood.nll_constant`); they are now
computed once per batch and reused in every step. This measures what that saves, against the same code
with those terms recomputed in every step (``--mode every-step`` patches them back in: the constant is
zero and each step evaluates the whole log-pmf, as before), on one simulation:

- training: a DGD on 50,000 simulated cells (500 genes; the decoder trained on a 10,000-cell sample,
  ``--epochs`` epochs, no early stopping), timed after its last epoch: the mixture refit and the polish
  that embeds all 50,000 cells;
- held-out embedding of 10,000 other cells (``get_latent_representation``), with its mean objective;
- count-split NLL of 2,000 of them (:func:`dgdlens.evaluate.count_split_nll`).

Both modes train identically (seeded; the epochs do not use the constant), each in its own process with
one thread, side by side on two cores.

    python benchmarks/frozen_inference.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
MODES = ("once", "every-step")


def recompute_every_step() -> None:
    """The code as it was: no data-only terms split off (zero constant), the whole log-pmf every step."""
    import torch

    from dgdlens.nn import likelihoods

    likelihoods._nb_constant_terms = lambda x, log_r: torch.zeros_like(x)
    likelihoods._nb_mean_terms = likelihoods.nb_log_prob


def worker(args) -> None:
    import anndata as ad
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    import dgdlens as dl
    from dgdlens.evaluate import count_split_nll

    sys.path.insert(0, str(HERE.parent))
    from time_to_quality import simulate

    torch.set_num_threads(1)
    threadpool_limits(1)
    if args.worker_mode == "every-step":
        recompute_every_step()
    counts, _ = simulate(args.cells + args.held_out, 500, seed=3)
    train, held = ad.AnnData(counts[:args.cells]), ad.AnnData(counts[args.cells:])
    model = dl.DGD(train, seed=0)
    epoch_ends = []
    tic = time.perf_counter()
    model.train(progress=False, max_epochs=args.epochs, early_stopping=False, decoder_subsample=args.sample,
                callbacks=[lambda row: epoch_ends.append(time.perf_counter() - tic)])
    end_s = time.perf_counter() - tic - epoch_ends[-1]
    tic = time.perf_counter()
    z = model.get_latent_representation(held, progress=False)
    embed_s = time.perf_counter() - tic
    embed_objective = float(np.mean(model._last_inference_loss))
    tic = time.perf_counter()
    split = count_split_nll(model, held[:args.scored], p=0.5, seed=1)
    split_s = time.perf_counter() - tic
    out = {"mode": args.worker_mode, "epochs_s": epoch_ends[-1], "after_last_epoch_s": end_s,
           "train_recon": float(model.get_reconstruction_error()), "embed_s": embed_s,
           "embed_objective": embed_objective, "z_checksum": float(np.abs(z).sum()),
           "count_split_s": split_s, "count_split_nll": float(split.mean())}
    print(json.dumps(out), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=50_000)
    p.add_argument("--held-out", type=int, default=10_000)
    p.add_argument("--scored", type=int, default=2_000, help="held-out cells scored by count splitting")
    p.add_argument("--sample", type=int, default=10_000, help="decoder_subsample")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--worker-mode", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker_mode:
        return worker(args)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "worker_mode"]
    procs = [subprocess.Popen([sys.executable, str(HERE), f"--worker-mode={mode}", *flags], stdout=subprocess.PIPE,
                              text=True) for mode in MODES]
    rows = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"worker failed ({proc.returncode})")
        rows.append(json.loads(stdout.strip().splitlines()[-1]))
    print("| lgamma terms | epochs s | after the last epoch s | training recon | embed s | embed objective | "
          "count split s | count-split NLL |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['epochs_s']:.1f} | {r['after_last_epoch_s']:.1f} | {r['train_recon']:.3f} | "
              f"{r['embed_s']:.1f} | {r['embed_objective']:.3f} | {r['count_split_s']:.1f} | "
              f"{r['count_split_nll']:.3f} |")


if __name__ == "__main__":
    main()
