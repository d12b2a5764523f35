"""Time the feature lens end to end: annotate every SAE feature against all GO BP sets.

Default size (the issue's target: under 2 minutes on 2 cores): 50,000 cells x 13,000 genes (sparse counts),
10,000 SAE-like features, every GO BP set of the bundled collection (no size filter). The data are
simulated with planted feature -> GO term links (dgdlens.lens.planted_data), so the run also reports
how many planted terms come out on top.

    NUMBA_NUM_THREADS=2 OMP_NUM_THREADS=2 python benchmarks/lens_speed.py            # full size
    python benchmarks/lens_speed.py --cells 5000 --genes 4000 --features 1000        # quick look

Prints one table row per stage, wall-clock and CPU seconds (CPU = all threads of the process, the
steadier number when the machine is shared), and the load average at the start and end.

``--backed DIR`` measures the streaming lens on a file: the counts are simulated block by block into
``DIR/planted_<cells>x<genes>.h5ad`` (never held whole; kept for later runs) with the activations in an
``.npz`` beside it, then a fresh process annotates the file without loading it and reports wall time,
CPU time and its peak RSS (the issue's target: 1,000,000 x 13,000, 10,000 features x all GO BP sets,
under 5 minutes and 4 GB on 2 cores):

    python benchmarks/lens_speed.py --backed /tmp/lens_backed --cells 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "2")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")

import numpy as np  # noqa: E402

import dgdlens.lens as lens  # noqa: E402
from dgdlens._io import atomic_path, atomic_write_text  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import peak_rss_mb  # noqa: E402  (VmHWM, as every benchmark reads it)


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cells", type=int, default=50_000)
    parser.add_argument("--genes", type=int, default=13_000)
    parser.add_argument("--features", type=int, default=10_000)
    parser.add_argument("--planted", type=int, default=200)
    parser.add_argument("--features-per-cell", type=int, default=32)
    parser.add_argument("--gene-sets", default="go_bp")
    parser.add_argument("--min-set-size", type=int, default=1, help="1 with --max-set-size 0 = every set")
    parser.add_argument("--max-set-size", type=int, default=0, help="0 = no upper limit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backed", metavar="DIR", help="stream the counts from an .h5ad in DIR (see above)")
    parser.add_argument("--max-memory-gb", type=float, default=2.5,
                        help="with --backed: annotate(max_memory=...) for the group statistics")
    parser.add_argument("--stage", choices=["all", "run"], default="all", help=argparse.SUPPRESS)
    args = parser.parse_args()

    print(
        f"load average at start (1/5/15 min): {load()}   cpu count: {os.cpu_count()}   "
        f"NUMBA_NUM_THREADS={os.environ['NUMBA_NUM_THREADS']}"
    )
    if args.backed:
        backed(args)
        return
    t0 = time.perf_counter()
    data = lens.planted_data(**simulation_kwargs(args))
    t_sim = time.perf_counter() - t0
    print(
        f"simulated {args.cells:,} cells x {args.genes:,} genes ({data.counts.nnz:,} non-zeros), "
        f"{args.features:,} features ({data.activations.nnz:,} non-zeros), {args.planted} planted, "
        f"in {t_sim:.1f} s (not part of the timing)"
    )
    warm_up(data.activations[:2000], data.counts[:2000], data.gene_names)
    timings: dict[str, float] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    res, feats = lens.annotate(
        data.activations, data.counts, data.gene_names, args.gene_sets, min_set_size=args.min_set_size,
        max_set_size=args.max_set_size or None, return_features=True, timings=timings)
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    report(res, feats, timings, total, total_cpu, data.truth, data.gene_sets, data.gene_names)
    print(f"peak RSS of the process: {peak_rss_mb() / 1024:.2f} GB (simulation included)")


def simulation_kwargs(args) -> dict:
    return dict(n_cells=args.cells, n_genes=args.genes, n_features=args.features, n_planted=args.planted,
                gene_sets=args.gene_sets, features_per_cell=args.features_per_cell, planted_activity=0.01,
                set_size_range=(15, 300), seed=args.seed)


def warm_up(activations, counts, gene_names) -> None:
    """Compile the numba kernels outside the timing, as any second call in a session would find them."""
    lens.annotate(activations[:, :20], counts, gene_names, "hallmark", min_set_size=5, min_active_cells=2)


def backed(args) -> None:
    folder = Path(args.backed)
    stem = folder / f"planted_{args.cells}x{args.genes}_f{args.features}_s{args.seed}"
    h5ad, acts, meta = stem.with_suffix(".h5ad"), stem.with_suffix(".npz"), stem.with_suffix(".json")
    if args.stage == "all":
        if not (h5ad.exists() and acts.exists() and meta.exists()):
            import scipy.sparse as sp

            folder.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            data = lens.write_planted_h5ad(h5ad, **simulation_kwargs(args), block_cells=4096)
            # written whole or not at all: a later run reuses these files when all three exist
            with atomic_path(acts) as tmp:
                sp.save_npz(tmp, data.activations, compressed=False)
            atomic_write_text(meta, json.dumps({"truth": data.truth.to_dict(orient="list")}))
            print(f"wrote {h5ad} ({h5ad.stat().st_size / 1e9:.1f} GB) and {acts.name} in "
                  f"{time.perf_counter() - t0:.0f} s (not part of the timing)")
        cmd = [sys.executable, __file__, "--stage", "run", *sys.argv[1:]]
        raise SystemExit(subprocess.run(cmd, check=False).returncode)

    import anndata
    import pandas as pd

    adata = anndata.read_h5ad(h5ad, backed="r")
    print(f"streaming {h5ad} ({adata.n_obs:,} cells x {adata.n_vars:,} genes, "
          f"{adata.X.group['data'].shape[0]:,} non-zeros, {h5ad.stat().st_size / 1e9:.1f} GB); activations "
          f"from {acts.name}; max_memory {args.max_memory_gb:g} GB")
    genes = adata.var_names.to_numpy()
    warm_up(adata.X[:2000].tocsr(), adata.X[:2000], genes)  # a small in-memory call: compiles the kernels
    timings: dict[str, float] = {}
    rss_before = peak_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    res, feats = lens.annotate(
        str(acts), str(h5ad), None, args.gene_sets, min_set_size=args.min_set_size,
        max_set_size=args.max_set_size or None, return_features=True, timings=timings,
        max_memory=args.max_memory_gb * 1e9)
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = peak_rss_mb()
    truth = pd.DataFrame(json.loads(meta.read_text())["truth"])
    report(res, feats, timings, total, total_cpu, truth, lens.gene_sets(args.gene_sets), genes)
    print(f"peak RSS of the annotating process: {peak / 1024:.2f} GB (before the call: {rss_before / 1024:.2f} "
          f"GB, imports + warm-up)")


def report(res, feats, timings, total, total_cpu, truth, gene_sets, gene_names) -> None:
    settings = res.attrs["settings"]
    print()
    print("| stage | wall s | CPU s (all threads) |")
    print("|---|---|---|")
    labels = {
        "prepare": "validate + log-normalise expression", "groups": "high/low groups (all features)",
        "gene_sets": "load + align gene sets", "de": "DE: group sums + Welch t (all features)",
        "enrichment": "select genes + hypergeometric ORA", "table": "BH (per feature, global) + table"}
    if settings.get("streamed"):
        labels["prepare"] = "open the file, check the first chunk"
        labels["de"] = "stream: split, normalise, group sums + Welch t"
    for key, label in labels.items():
        print(f"| {label} | {timings.get(key, 0.0):.1f} | {timings.get(key + '_cpu', 0.0):.1f} |")
    print(f"| **end to end** | **{total:.1f}** | **{total_cpu:.1f}** |")
    print()
    ok = feats[feats.status == "ok"]
    truth = truth.set_index("feature")
    top = feats.set_index("feature").loc[truth.index, "top_term"]
    print(
        f"features analysed: {len(ok):,} of {len(feats):,}; gene sets tested: {settings['n_sets']:,}; "
        f"universe: {settings['universe_size']:,} genes; tests: {settings['n_tests']:,}; "
        f"rows with padj <= 0.05: {len(res):,}"
    )
    sig = res.set_index(["feature", "term"]).index
    found = np.mean([(f, t) in sig for f, t in zip(truth.index, truth["term"], strict=True)])
    genes = set(gene_names)

    def same_genes(a: str, b: str) -> bool:  # Jaccard >= 0.9 among the simulated genes
        if not isinstance(a, str) or not a:
            return False
        x, y = set(gene_sets[a]) & genes, set(gene_sets[b]) & genes
        return len(x & y) >= 0.9 * len(x | y)

    equivalent = np.mean([same_genes(a, b) for a, b in zip(top, truth["term"], strict=True)])
    null = ok[~ok.feature.isin(truth.index)]
    print(f"planted term is the top term: {(top == truth['term']).mean():.1%} of {len(truth)} planted features; "
          f"top term has >= 90% the same genes (Jaccard) as the planted one: {equivalent:.1%}; "
          f"planted term significant (padj <= 0.05): {found:.1%}; null features with any term: "
          f"{null.n_terms.gt(0).mean():.1%}")
    print(f"load average at end (1/5/15 min): {load()}")


if __name__ == "__main__":
    main()
