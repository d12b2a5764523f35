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
  latents are found by optimisation with the decoder frozen (a fixed number of steps, printed): each
  test sample starts from the best of the origin and 32 learned training latents, then Adam.
  Autoencoder test latents come from its encoder. ``ae_refined`` is the autoencoder's decoder with
  test latents found by the *same* procedure (the same number of candidate starts: the origin and 32
  of its own training latents, plus the encoder's guess; the same Adam steps, learning rate and
  betas): a control that separates a worse decoder from a worse encoder (amortisation gap); it
  reports ``test_err`` only (its test latents and its encoder's training latents come from different
  procedures, so the latent probes below would measure that mismatch). Note
  that the test latents of ``decoder_only`` and ``ae_refined`` are fitted to the very test samples
  they are scored on (for both models alike), so ``test_err`` measures how well each decoder's
  manifold can fit new samples, not a likelihood of unseen data.

Hyperparameters are chosen on validation data, never on the test set (``--select``, on by default):
a seeded validation set (``--n-val`` samples) is taken out of the training pool before any training
subset is drawn, and at one training size (``--select-size``) and seed 0 each model's learning rate is
picked from a small grid by its validation reconstruction error (validation latents found by the
same inference as the test latents): the decoder-only model's representation learning rate
(``--lr-rep-grid``) and the autoencoder's Adam learning rate (``--ae-lr-grid``); the decoder-only
weights keep Adam lr 1e-3. The chosen values are printed and written with the tables. The
decoder-only training-latent polishing (the runner's ``polish_steps``, extra optimisation of the
training latents after the last epoch) is off (``polish_steps=0``), so both models get the same
number of gradient steps; ``refit_prior_at_end`` has no effect here (no prior).
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
import json
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
                   help="SGD (momentum 0.9) learning rate of the training representations; given, it skips the "
                        "validation search for the decoder-only model")
    p.add_argument("--ae-lr", type=float, default=None,
                   help="autoencoder Adam learning rate; given, it skips the validation search for the autoencoder")
    p.add_argument("--no-select", action="store_true",
                   help="no validation search: lr-rep digits 0.05 / grn 5e-4 and AE lr 1e-3 unless given")
    p.add_argument("--lr-rep-grid", nargs="+", type=float, default=[5e-4, 5e-3, 5e-2])
    p.add_argument("--ae-lr-grid", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3])
    p.add_argument("--n-val", type=int, default=150, help="validation samples taken out of the training pool")
    p.add_argument("--select-size", type=int, default=200, help="training size of the validation search")
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
        args.n_val, args.select_size = 100, 100
    return args


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------

def digits_data(n_test: int):
    data = load_digits_images()
    order = np.random.default_rng(12345).permutation(len(data))  # fixed test set for every seed
    test, pool = order[:n_test], order[n_test:]
    return {"X": data.X, "labels": data.labels, "test": test, "pool": pool, "likelihood": "bernoulli",
            "truth": None, "lr_rep": 0.05}  # lr_rep: the fixed value with --no-select (the paper's order)


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
            "truth": truth, "lr_rep": 5e-4}  # the fixed value with --no-select (it was chosen on test metrics)


def carve_validation(data: dict, n_val: int) -> dict:
    """Take a seeded validation set out of the training pool (before any training subset is drawn)."""
    order = np.random.default_rng(777).permutation(data["pool"])
    return data | {"val": np.sort(order[:n_val]), "pool": np.sort(order[n_val:])}


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


def refine_from_candidates(ae: Autoencoder, X, z_enc: np.ndarray, n_candidates: int, seed: int, n_steps: int,
                           lr: float) -> np.ndarray:
    """The decoder-only model's test-time inference on the autoencoder's decoder: each sample starts from
    the best (lowest NLL) of its encoder latent, the origin and ``n_candidates`` of the autoencoder's own
    training latents (seeded, as DecoderOnly picks its candidates), then Adam (betas (0.5, 0.7), no
    early stop) on the reconstruction NLL with the decoder frozen."""
    import scipy.sparse as sp

    from dgdlens.nn.module import frozen
    from dgdlens.train.inference import optimise_latents

    z_train = ae.get_latent_representation()
    pick = np.random.default_rng(seed).choice(len(z_train), size=min(n_candidates, len(z_train)), replace=False)
    cand = torch.from_numpy(np.concatenate([np.zeros((1, z_train.shape[1]), np.float32), z_train[np.sort(pick)]]))
    x = torch.as_tensor(X.toarray() if sp.issparse(X) else np.asarray(X), dtype=torch.float32)
    scale = x.sum(1) if ae.likelihood.name == "nb" else None
    dec, lik = ae.decoder, ae.likelihood

    def objective(xb, zb, s):
        return lik.nll(xb, dec(zb), s)

    ae.module.eval()
    with frozen(ae.module), torch.no_grad():
        z0 = torch.from_numpy(z_enc)
        best = objective(x, z0, scale)
        for c in cand:
            score = objective(x, c.expand_as(z0), scale)
            better = score < best
            z0 = torch.where(better[:, None], c.expand_as(z0), z0)
            best = torch.minimum(best, score)
    with frozen(ae.module):
        return optimise_latents(objective, x, scale, z0, n_steps, lr, (0.5, 0.7), 0.0).numpy()


def fit_pair(Xtr, Xev, likelihood: str, n_latent: int, seed: int, args, lr_rep: float, ae_lr: float):
    """Train both models on Xtr (same initial decoder); latents of Xev by each model's inference."""
    n_train = Xtr.shape[0]
    n_features = Xtr.shape[1]
    dec_do, dec_ae, enc = make_modules(n_features, n_latent, args.hidden, seed)
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    epochs = max(args.min_epochs, math.ceil(args.steps / steps_per_epoch))
    build = {"validation_fraction": 0.0, "seed": seed}
    common = {"max_epochs": epochs, "batch_size": args.batch_size, "weight_decay": 1e-4, "early_stopping": False,
              "device": args.device, "progress": False}
    t0 = time.perf_counter()
    do = DecoderOnly(Xtr, dec_do, likelihood, n_latent, **build)
    # polish_steps=0: no extra optimisation of the training latents after the last epoch (fixed budget)
    do.train(lr=1e-3, lr_rep=lr_rep, rep_optimizer="sgd", rep_momentum=0.9, polish_steps=0, **common)
    z_do_ev = do.get_latent_representation(Xev, n_steps=args.infer_steps, lr=0.05, tol=0.0, n_candidates=32,
                                           progress=False)
    t_do = time.perf_counter() - t0
    t0 = time.perf_counter()
    ae = Autoencoder(Xtr, enc, dec_ae, likelihood, **build)
    ae.train(lr=ae_lr, **common)
    z_ae_ev = ae.get_latent_representation(Xev)
    t_ae = time.perf_counter() - t0
    z_ae_ref = refine_from_candidates(ae, Xev, z_ae_ev, 32, seed, args.infer_steps, 0.05)
    return epochs, [("decoder_only", do, do.get_latent_representation(), z_do_ev, t_do),
                    ("autoencoder", ae, ae.get_latent_representation(), z_ae_ev, t_ae),
                    ("ae_refined", ae, ae.get_latent_representation(), z_ae_ref, float("nan"))]


def select_hyperparameters(data: dict, n_latent: int, args) -> dict:
    """Validation-only choice of the decoder-only lr_rep and the autoencoder lr (seed 0, one size)."""
    fixed = {"lr_rep": args.lr_rep or data["lr_rep"], "ae_lr": args.ae_lr or 1e-3}
    if args.no_select:
        return fixed | {"selected_on": "fixed (no validation search)"}
    X = data["X"]
    train_idx = np.sort(np.random.default_rng(0).permutation(data["pool"])[:args.select_size])
    Xtr, Xval = X[train_idx], X[data["val"]]
    scores = []
    do_grid = [args.lr_rep] if args.lr_rep else args.lr_rep_grid
    ae_grid = [args.ae_lr] if args.ae_lr else args.ae_lr_grid
    # the two models train independently: vary each one's learning rate with the other's fixed
    for lr_rep in do_grid:
        _, runs = fit_pair(Xtr, Xval, data["likelihood"], n_latent, 0, args, lr_rep, ae_grid[0])
        do = runs[0]
        err = do[1].get_reconstruction_error(Xval, z=do[3], per_feature=True)
        scores.append({"model": "decoder_only", "lr": lr_rep, "val_err": err})
        if lr_rep == do_grid[0]:
            ae = runs[1]
            scores.append({"model": "autoencoder", "lr": ae_grid[0],
                           "val_err": ae[1].get_reconstruction_error(Xval, z=ae[3], per_feature=True)})
    for ae_lr in ae_grid[1:]:
        _, runs = fit_pair(Xtr, Xval, data["likelihood"], n_latent, 0, args, do_grid[0], ae_lr)
        ae = runs[1]
        scores.append({"model": "autoencoder", "lr": ae_lr,
                       "val_err": ae[1].get_reconstruction_error(Xval, z=ae[3], per_feature=True)})
    df = pd.DataFrame(scores)
    df["val_err"] = df["val_err"].where(np.isfinite(df["val_err"]), np.inf)
    print(f"validation search (seed 0, n_train={args.select_size}, {len(data['val'])} validation samples):\n"
          f"{df.to_string(index=False)}")
    best = df.loc[df.groupby("model")["val_err"].idxmin()].set_index("model")["lr"]
    return {"lr_rep": float(best["decoder_only"]), "ae_lr": float(best["autoencoder"]),
            "selected_on": f"validation ({len(data['val'])} samples from the training pool, seed 0, "
                           f"n_train={args.select_size})", "search": df.to_dict("records")}


def run_one(data: dict, n_train: int, seed: int, args, n_latent: int, hp: dict) -> list[dict]:
    X, labels, truth = data["X"], data["labels"], data["truth"]
    rng = np.random.default_rng(seed)
    train_idx = np.sort(rng.permutation(data["pool"])[:n_train])
    test_idx = data["test"]
    Xtr, Xte = X[train_idx], X[test_idx]
    epochs, runs = fit_pair(Xtr, Xte, data["likelihood"], n_latent, seed, args, hp["lr_rep"], hp["ae_lr"])
    rows = []
    for name, model, z_tr, z_te, fit_s in runs:
        # per_feature: the loss per entry (BCE per pixel, NB NLL per gene), the unit of the paper's figures
        row = {"n_train": n_train, "seed": seed, "model": name, "epochs": epochs,
               "train_err": model.get_reconstruction_error(z=z_tr, per_feature=True),
               "test_err": model.get_reconstruction_error(Xte, z=z_te, per_feature=True), "fit_s": fit_s}
        if name == "ae_refined":
            # only test_err: its test latents (refined) and training latents (encoder) come from different
            # procedures, so probes fitted on one and scored on the other would measure that mismatch
            row["train_err"] = np.nan
        else:
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
    if "ae_refined" in wide:  # the same inference on both decoders: the decoders' own difference
        ref = (wide["ae_refined"] - wide["decoder_only"]).groupby("n_train")
        gap_table["refined_gap_mean"] = ref.mean()
        gap_table["refined_gap_sd"] = ref.std(ddof=1)
        gap_table["do_wins_vs_refined"] = (wide["ae_refined"] > wide["decoder_only"]).groupby("n_train").sum()
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
            data = grn_data(args.n_test, max(args.sizes) + args.n_val, args.grn_genes, args.grn_regulators)
            n_latent = args.n_latent or args.grn_regulators
        n_features = data["X"].shape[1]
        data = carve_validation(data, args.n_val)
        if max(args.sizes) > len(data["pool"]):
            raise SystemExit(f"{dataset}: largest training size {max(args.sizes)} exceeds the {len(data['pool'])} "
                             "samples outside the test and validation sets; lower --sizes or --n-test.")
        _, dec, enc = make_modules(n_features, n_latent, args.hidden, 0)
        counts = sample_counts(enc, dec, n_features=n_features)
        print(f"\n=== {dataset}: n={n_features} features, m={n_latent}, hidden={args.hidden}, test set {args.n_test}, "
              f"batch {args.batch_size}, >= {args.steps} steps and >= {args.min_epochs} epochs per run, "
              f"{args.infer_steps} inference steps ===")
        print(f"sample-count argument: {counts}  (encoder needs {counts.ratio:.1f}x more)")
        hp = select_hyperparameters(data, n_latent, args)
        print(f"hyperparameters: decoder-only representation SGD lr {hp['lr_rep']}, autoencoder Adam lr {hp['ae_lr']} "
              f"(chosen on {hp['selected_on']}); decoder-only weights Adam lr 1e-3; polish_steps=0")
        (out / f"{dataset}_hyperparameters.json").write_text(json.dumps(hp, indent=1, default=str))
        rows = []
        t0 = time.perf_counter()
        # seeds outermost: a run cut short still holds whole curves for the first seeds
        for seed in args.seeds:
            for n_train in args.sizes:
                rows += run_one(data, n_train, seed, args, n_latent, hp)
                pd.DataFrame(rows).to_csv(out / f"{dataset}.csv", index=False)  # partial results survive a kill
                print(f"  n_train={n_train:5d} seed={seed}  done ({time.perf_counter() - t0:.0f}s)", flush=True)
        report(pd.DataFrame(rows), dataset, args, out)
    print(f"results in {out}/")


def report(df: pd.DataFrame, dataset: str, args, out: Path) -> None:
    table, gap = summarise(df)
    seeds = sorted(df.seed.unique().tolist())
    hp_path = out / f"{dataset}_hyperparameters.json"
    hp = json.loads(hp_path.read_text()) if hp_path.exists() else {}
    text = (f"{dataset}: mean ± sd over seeds {seeds}; lr_rep {hp.get('lr_rep')}, ae_lr {hp.get('ae_lr')} "
            f"(chosen on {hp.get('selected_on')}); polish_steps=0\n{table.to_string()}\n\n"
            f"test-error gap (autoencoder - decoder_only and ae_refined - decoder_only; > 0 means decoder-only "
            f"is better)\n{gap.to_string()}\n")
    print(text)
    (out / f"{dataset}_table.txt").write_text(text)
    plot(df, dataset, out / f"{dataset}.png")


if __name__ == "__main__":
    main()
