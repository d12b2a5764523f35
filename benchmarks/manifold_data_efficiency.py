"""Data efficiency of decoder-only learning vs an autoencoder (Schuster & Krogh 2021, "manifold" paper).

The paper's claim: with few training samples a decoder trained with free per-sample representations
(no encoder) generalises better than an autoencoder with the same decoder; the gap shrinks as the
training set grows. This script measures it on two data sets, offline and on CPU:

- **digits**: scikit-learn's 8x8 handwritten digits, pixels / 16 in [0, 1], Bernoulli (BCE) loss.
  One fixed held-out test set (``--n-test`` images); training subsets of growing size drawn from the
  rest, nested within a seed.
- **grn**: :func:`dgdlens.sim.grn.simulate_grn` counts with known regulator activities, NB loss.

For every training size and seed both models get the same decoder architecture *and the same initial
decoder weights*, the same optimiser for the weights (Adam, weight decay), the same number of gradient
steps, and no early stopping (as in the paper: a fixed training budget, so overfitting shows). Then, on
the fixed test set:

- ``test_err``: reconstruction loss per entry (BCE per pixel / NB NLL per gene). Decoder-only test
  latents are found by optimisation with the decoder frozen (a fixed number of steps, printed);
  autoencoder test latents come from its encoder. ``ae_refined`` also reports the autoencoder's
  decoder with its encoder's latents refined by the same optimisation: a control that separates a
  worse decoder from a worse encoder (amortisation gap).
- ``knn`` / ``probe``: label accuracy (digit / cell type) of a 5-nearest-neighbour classifier and a
  logistic regression trained on the (standardised) training latents and scored on the test latents.
- grn only, ``r2_activity`` / ``r2_response``: R^2 on held-out cells of a linear map (ridge, fitted on
  training latents) from latents to the true log regulator activities / Hill responses, averaged
  over regulators.

Run: ``python benchmarks/manifold_data_efficiency.py`` (about 10 minutes of CPU time per data set;
``--quick`` for a smoke run). Prints tables (mean +- sd over seeds) and writes a CSV, a text table
and a PNG plot to ``--out`` (default ``benchmarks/results/manifold_data_efficiency``).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dgdlens.data.images import load_digits_images
from dgdlens.models.autoencoder import Autoencoder
from dgdlens.models.decoder_only import DecoderOnly
from dgdlens.models.sample_count import sample_counts
from dgdlens.nn.decoders import mlp_decoder, mlp_encoder
from dgdlens.sim.grn import simulate_grn


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["digits", "grn"], choices=["digits", "grn"])
    p.add_argument("--sizes", nargs="+", type=int, default=[50, 100, 200, 400, 800, 1200])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--n-test", type=int, default=400, help="fixed held-out test set size")
    p.add_argument("--n-latent", type=int, default=None, help="latent size (default: digits 5, grn = regulators)")
    p.add_argument("--hidden", nargs="+", type=int, default=[64, 64], help="decoder hidden layers (encoder mirrors)")
    p.add_argument("--steps", type=int, default=1500, help="gradient steps per training run (at least --min-epochs)")
    p.add_argument("--min-epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--infer-steps", type=int, default=200, help="optimisation steps for test latents")
    p.add_argument("--lr-rep", type=float, default=None,
                   help="SGD (momentum 0.9) learning rate of the training representations (default: digits 0.05, "
                        "the paper's order; grn 5e-4, because NB gradients grow with the counts and 0.05 blows the "
                        "latents up)")
    p.add_argument("--grn-genes", type=int, default=200)
    p.add_argument("--grn-regulators", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (2 sizes, 1 seed, few steps)")
    p.add_argument("--out", default="benchmarks/results/manifold_data_efficiency")
    p.add_argument("--from-csv", action="store_true", help="only summarise and plot the CSVs already in --out")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.seeds, args.steps, args.infer_steps = [50, 200], [0], 300, 100
    return args


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------

def digits_data(n_test: int):
    data = load_digits_images()
    order = np.random.default_rng(12345).permutation(len(data))  # fixed test set for every seed
    test, pool = order[:n_test], order[n_test:]
    return {"X": data.X, "labels": data.labels, "test": test, "pool": pool, "likelihood": "bernoulli",
            "truth": None, "lr_rep": 0.05}


def grn_data(n_test: int, max_train: int, n_genes: int, n_regulators: int):
    sim = simulate_grn(n_test + max_train, n_genes, n_regulators=n_regulators, n_cell_types=6,
                       library_size=1500, seed=2021)
    X = sim.counts
    keep = np.asarray(X.sum(1)).ravel() > 0
    if not keep.all():
        raise RuntimeError("the simulation produced empty cells; raise library_size")
    idx = np.arange(X.shape[0])
    truth = {"log_activity": np.log(sim.activity), "response": sim.response}
    return {"X": X, "labels": sim.cell_type, "test": idx[:n_test], "pool": idx[n_test:], "likelihood": "nb",
            "truth": truth, "lr_rep": 5e-4}


# ---------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------

def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = train.mean(0), train.std(0) + 1e-8
    return (train - mu) / sd, (test - mu) / sd


def label_scores(z_train, y_train, z_test, y_test) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    a, b = _standardise(z_train, z_test)
    knn = KNeighborsClassifier(n_neighbors=min(5, len(a))).fit(a, y_train).score(b, y_test)
    probe = LogisticRegression(max_iter=2000).fit(a, y_train).score(b, y_test)
    return {"knn": knn, "probe": probe}


def r2_scores(z_train, z_test, truth: dict, train_idx, test_idx) -> dict:
    """Held-out R^2 of a ridge map latents -> truth, averaged over the truth's columns."""
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score

    a, b = _standardise(z_train, z_test)
    out = {}
    for name, values in truth.items():
        reg = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(a, values[train_idx])
        out[f"r2_{name.removeprefix('log_')}"] = r2_score(values[test_idx], reg.predict(b),
                                                          multioutput="uniform_average")
    return out


# ---------------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------------

def make_modules(n_features: int, n_latent: int, hidden, seed: int):
    """The decoder (seeded) and an encoder; the decoder-only model gets an exact copy of the decoder."""
    import copy

    torch.manual_seed(seed)
    dec = mlp_decoder(n_latent, n_features, hidden)
    enc = mlp_encoder(n_features, n_latent, hidden)
    return copy.deepcopy(dec), dec, enc


def run_one(data: dict, n_train: int, seed: int, args, n_latent: int) -> list[dict]:
    X, labels, truth = data["X"], data["labels"], data["truth"]
    rng = np.random.default_rng(seed)
    train_idx = np.sort(rng.permutation(data["pool"])[:n_train])
    test_idx = data["test"]
    Xtr, Xte = X[train_idx], X[test_idx]
    n_features = X.shape[1]
    dec_do, dec_ae, enc = make_modules(n_features, n_latent, args.hidden, seed)
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    epochs = max(args.min_epochs, math.ceil(args.steps / steps_per_epoch))
    build = dict(validation_fraction=0.0, seed=seed)
    common = dict(max_epochs=epochs, batch_size=args.batch_size, lr=1e-3, weight_decay=1e-4, early_stopping=False,
                  device=args.device, progress=False)
    rows = []

    t0 = time.perf_counter()
    do = DecoderOnly(Xtr, dec_do, data["likelihood"], n_latent, **build)
    do.train(lr_rep=args.lr_rep or data["lr_rep"], rep_optimizer="sgd", rep_momentum=0.9, **common)
    z_do_test = do.get_latent_representation(Xte, n_steps=args.infer_steps, lr=0.05, tol=0.0, progress=False)
    t_do = time.perf_counter() - t0

    t0 = time.perf_counter()
    ae = Autoencoder(Xtr, enc, dec_ae, data["likelihood"], **build)
    ae.train(**common)
    z_ae_train, z_ae_test = ae.get_latent_representation(), ae.get_latent_representation(Xte)
    t_ae = time.perf_counter() - t0
    z_ae_ref = ae.get_latent_representation(Xte, refine_steps=args.infer_steps, lr=0.05)

    runs = [("decoder_only", do, do.get_latent_representation(), z_do_test, t_do),
            ("autoencoder", ae, z_ae_train, z_ae_test, t_ae), ("ae_refined", ae, z_ae_train, z_ae_ref, float("nan"))]
    for name, model, z_tr, z_te, fit_s in runs:
        # per_feature: the loss per entry (BCE per pixel, NB NLL per gene), the unit of the paper's figures
        row = {"n_train": n_train, "seed": seed, "model": name, "epochs": epochs,
               "train_err": model.get_reconstruction_error(z=z_tr, per_feature=True),
               "test_err": model.get_reconstruction_error(Xte, z=z_te, per_feature=True), "fit_s": fit_s}
        row |= label_scores(z_tr, labels[train_idx], z_te, labels[test_idx])
        if truth is not None:
            row |= r2_scores(z_tr, z_te, truth, train_idx, test_idx)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------------

def summarise(df: pd.DataFrame) -> pd.DataFrame:
    metrics = [c for c in ("train_err", "test_err", "knn", "probe", "r2_activity", "r2_response") if c in df]
    g = df.groupby(["n_train", "model"])[metrics]
    table = g.mean().round(4).astype(str) + " ± " + g.std(ddof=1).fillna(0).round(4).astype(str)
    wide = df.pivot_table(index=["n_train", "seed"], columns="model", values="test_err")
    gap = (wide["autoencoder"] - wide["decoder_only"]).groupby("n_train")
    gap_table = pd.DataFrame({"gap_mean": gap.mean(), "gap_sd": gap.std(ddof=1),
                              "do_wins": (wide["autoencoder"] > wide["decoder_only"]).groupby("n_train").sum(),
                              "n_seeds": gap.size()})
    return table.unstack("model"), gap_table


def plot(df: pd.DataFrame, dataset: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [c for c in ("test_err", "knn", "probe", "r2_activity") if c in df]
    labels = {"test_err": "test reconstruction error per entry", "knn": "5-NN accuracy (test latents)",
              "probe": "linear probe accuracy", "r2_activity": "R² latents → log activity (test)"}
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(4.2 * (len(metrics) + 1), 3.6))
    styles = {"decoder_only": ("C0", "-o"), "autoencoder": ("C3", "-s"), "ae_refined": ("C1", ":^")}
    for ax, metric in zip(axes, metrics):
        for model, (color, style) in styles.items():
            sub = df[df.model == model].groupby("n_train")[metric]
            mean, sd = sub.mean(), sub.std(ddof=1).fillna(0)
            ax.errorbar(mean.index, mean.values, yerr=sd.values, fmt=style, color=color, label=model, capsize=2)
        ax.set_xscale("log")
        ax.set_xlabel("training samples")
        ax.set_title(labels[metric], fontsize=9)
    for model, (color, style) in styles.items():
        sub = df[df.model == model].groupby("n_train")["train_err"].mean()
        axes[-1].plot(sub.index, sub.values, style, color=color, label=model)
    axes[-1].set_xscale("log")
    axes[-1].set_title("training reconstruction error", fontsize=9)
    axes[-1].set_xlabel("training samples")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"decoder-only vs autoencoder, {dataset}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets:
        if args.from_csv:
            report(pd.read_csv(out / f"{dataset}.csv"), dataset, args, out)
            continue
        if dataset == "digits":
            data = digits_data(args.n_test)
            n_latent = args.n_latent or 5
        else:
            data = grn_data(args.n_test, max(args.sizes), args.grn_genes, args.grn_regulators)
            n_latent = args.n_latent or args.grn_regulators
        n_features = data["X"].shape[1]
        if max(args.sizes) > len(data["pool"]):
            raise SystemExit(f"{dataset}: largest training size {max(args.sizes)} exceeds the {len(data['pool'])} "
                             "samples outside the test set; lower --sizes or --n-test.")
        _, dec, enc = make_modules(n_features, n_latent, args.hidden, 0)
        counts = sample_counts(enc, dec, n_features=n_features)
        print(f"\n=== {dataset}: n={n_features} features, m={n_latent}, hidden={args.hidden}, test set {args.n_test}, "
              f"batch {args.batch_size}, >= {args.steps} steps and >= {args.min_epochs} epochs per run, "
              f"{args.infer_steps} inference steps, representation SGD lr {args.lr_rep or data['lr_rep']} ===")
        print(f"sample-count argument: {counts}  (encoder needs {counts.ratio:.1f}x more)")
        rows = []
        t0 = time.perf_counter()
        # seeds outermost: a run cut short still holds whole curves for the first seeds
        for seed in args.seeds:
            for n_train in args.sizes:
                rows += run_one(data, n_train, seed, args, n_latent)
                pd.DataFrame(rows).to_csv(out / f"{dataset}.csv", index=False)  # partial results survive a kill
                print(f"  n_train={n_train:5d} seed={seed}  done ({time.perf_counter() - t0:.0f}s)", flush=True)
        report(pd.DataFrame(rows), dataset, args, out)
    print(f"results in {out}/")


def report(df: pd.DataFrame, dataset: str, args, out: Path) -> None:
    table, gap = summarise(df)
    seeds = sorted(df.seed.unique().tolist())
    text = (f"{dataset}: mean ± sd over seeds {seeds}\n{table.to_string()}\n\n"
            f"test-error gap (autoencoder - decoder_only; > 0 means decoder-only is better)\n{gap.to_string()}\n")
    print(text)
    (out / f"{dataset}_table.txt").write_text(text)
    plot(df, dataset, out / f"{dataset}.png")


if __name__ == "__main__":
    main()
