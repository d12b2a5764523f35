"""Cost of one mini-batch gradient into a per-cell latent table, against the number of cells.

The DGD's latents take one dense Adam step per epoch from gradients accumulated over the epoch's
mini-batches. Accumulated through ``F.embedding``'s dense backward, every mini-batch allocates a zero
gradient the size of the whole table and adds it to ``.grad``: O(cells) per step, O(cells^2) per epoch.
``RepresentationTable`` adds the batch's rows into ``.grad`` in place. This times both (forward through
a small decoder layer, backward, accumulation) at growing table sizes, one thread.

Usage::

    python benchmarks/latent_table_step.py                      # 30k, 300k, 1M cells
    python benchmarks/latent_table_step.py --cells 100000 --steps 500
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F

from dgdlens.nn import RepresentationTable


def time_steps(table: RepresentationTable, layer: torch.nn.Module, batches: list[torch.Tensor],
               through_embedding: bool) -> float:
    """Seconds per step: gather the batch's latents, decode, backward (gradients accumulate)."""
    table.z.grad = None
    tic = time.perf_counter()
    for index in batches:
        rows = F.embedding(index, table.z) if through_embedding else table(index)
        layer(rows).square().sum().backward()
    return (time.perf_counter() - tic) / len(batches)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, nargs="+", default=[30_000, 300_000, 1_000_000])
    p.add_argument("--dim", type=int, default=20, help="latent dimensions (the DGD default)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--genes", type=int, default=500)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = torch.nn.Linear(args.dim, args.genes)
    print(f"| cells | F.embedding, ms/step | RepresentationTable, ms/step | per epoch of {args.batch_size}-cell "
          "batches, s (embedding / table) |\n|---|---|---|---|")
    for n in args.cells:
        table = RepresentationTable(n, args.dim, init="normal")
        batches = [torch.randperm(n)[:args.batch_size] for _ in range(args.steps)]
        time_steps(table, layer, batches[:10], True)  # warm-up
        dense = time_steps(table, layer, batches, True)
        inplace = time_steps(table, layer, batches, False)
        steps = n / args.batch_size
        print(f"| {n:,} | {dense * 1e3:.2f} | {inplace * 1e3:.2f} | {dense * steps:.1f} / {inplace * steps:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
