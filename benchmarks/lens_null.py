"""False terms of the lens on realistic nulls (every reported row is false there).

Two nulls from :mod:`dgdlens.lens.null`:

- ``cluster``: clustered negative binomial counts whose marker genes are random (no gene set is linked
  to anything), cluster-associated features permuted within clusters, and 5 gene sets 4x more expressed;
- ``shuffled``: each gene's counts permuted across cells, latents = top PCs of the log-normalised counts,
  a TopK SAE on them; the features are tested on the counts they were fitted to (double dipping), on the
  held-out binomial half with activations from all counts (the lens default), or on the held-out half
  with activations fitted to the other half (full count splitting).

For each setting and seed the lens runs at the nominal FDR 0.05 (``max_padj=None``; ``significant``
decides). Under a complete null the FDR is P(any row reported), estimated by the fraction of runs with a
false row (with its binomial 95 % interval); also reported: false rows per run, and DE genes per tested
feature (every one of them is a false DE call in the ``shuffled`` null).

    python benchmarks/lens_null.py                    # 20 cluster seeds, 10 shuffled seeds, hallmark
    python benchmarks/lens_null.py --seeds 5 --gene-sets go_bp
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
os.environ.setdefault("NUMBA_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

import dgdlens.lens as lens  # noqa: E402
from dgdlens.lens import null  # noqa: E402

CLUSTER_SETTINGS = {
    "global FDR (default: split, all genes)": {},
    "global FDR, matched background": {"background": "matched"},
    "global FDR, no count split": {"count_split": False},
    "per-feature FDR, no split (old default)": {"fdr": "per_feature", "count_split": False},
}


def _row(null_name, setting, runs):
    df = pd.DataFrame(runs)
    k, n = int(df["fdp"].sum()), len(df)
    lo, hi = stats.binomtest(k, n).proportion_ci(0.95) if n else (np.nan, np.nan)
    return {"null": null_name, "setting": setting, "runs": n, "runs with a false row": k,
            "FDR estimate": k / n, "95% CI": f"{lo:.2f}-{hi:.2f}",
            "false rows / run": df["false_rows"].mean(), "DE genes / feature": df["de_genes_per_feature"].mean(),
            "median min padj_global": df["min_padj_global"].median()}


def _run(A, X, names, sets, min_set_size, **kw):
    res, feats = lens.annotate(A, X, names, sets, min_set_size=min_set_size, max_padj=None,
                               return_features=True, **kw)
    out = null.null_summary(res, feats)
    ok = feats["status"] == "ok"
    out["de_genes_per_feature"] = float((feats.loc[ok, "n_up"] + feats.loc[ok, "n_down"]).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20, help="cluster-null seeds (shuffled: half as many)")
    parser.add_argument("--cells", type=int, default=1200)
    parser.add_argument("--genes", type=int, default=1500)
    parser.add_argument("--shuffled-genes", type=int, default=400)
    parser.add_argument("--gene-sets", default="hallmark")
    parser.add_argument("--min-set-size", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    t0 = time.time()
    rows = []
    runs = {s: [] for s in CLUSTER_SETTINGS}
    for seed in range(args.seeds):
        d = null.cluster_null(n_cells=args.cells, n_genes=args.genes, n_features=30, gene_sets=args.gene_sets,
                              seed=seed)
        for name, kw in CLUSTER_SETTINGS.items():
            runs[name].append(_run(d.activations, d.counts, d.gene_names, d.gene_sets, args.min_set_size, **kw))
    rows += [_row("cluster", s, r) for s, r in runs.items()]

    shuffled = {"double dipping (activations and DE on all counts)": [],
                "default split (activations from all counts, DE on X_b)": [],
                "full split (activations from X_a, DE on X_b)": []}
    for seed in range(max(args.seeds // 2, 1)):
        d = null.cluster_null(n_cells=args.cells, n_genes=args.shuffled_genes, n_features=2,
                              gene_sets=args.gene_sets, seed=seed)
        Xs = null.shuffle_genes(d.counts, seed=seed + 100)
        X_a, X_b = lens.split_counts(Xs, seed=seed + 200)
        kw = dict(n_latent=5, n_features=16, k=2, seed=seed)
        F = null.shuffled_gene_features(Xs, **kw)
        F_a = null.shuffled_gene_features(Xs, fit_on=X_a, **kw)
        keys = list(shuffled)
        shuffled[keys[0]].append(_run(F, Xs, d.gene_names, d.gene_sets, args.min_set_size, count_split=False))
        shuffled[keys[1]].append(_run(F, Xs, d.gene_names, d.gene_sets, args.min_set_size, split_seed=seed + 200))
        shuffled[keys[2]].append(_run(F_a, X_b, d.gene_names, d.gene_sets, args.min_set_size, count_split=False))
    rows += [_row("shuffled", s, r) for s, r in shuffled.items()]
    table = pd.DataFrame(rows)
    print(f"Lens on realistic nulls, nominal FDR 0.05, gene sets {args.gene_sets}; cluster null "
          f"{args.cells} cells x {args.genes} genes x 30 features, shuffled null {args.cells} x "
          f"{args.shuffled_genes} x 16 SAE features; {time.time() - t0:.0f} s.\n")
    print(table.to_markdown(index=False, floatfmt=".3g"))


if __name__ == "__main__":
    main()
