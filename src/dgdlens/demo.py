"""``dgdlens demo``: the whole pipeline on the bundled PBMC counts, written to one folder.

1. Load ``pbmc68k_reduced`` as raw counts (700 cells x 765 genes, 10 noisy cell-type labels) and keep
   15% of the cells aside as held-out cells.
2. Train a DGD on the rest (one mixture component per label category; labels are never used in training).
3. Embed the held-out cells with the trained model (decoder and mixture frozen).
4. Train a TopK sparse autoencoder on the training cells' latents and encode all cells.
5. Annotate every SAE feature with GO biological processes.
6. Steer the strongest annotated feature: switch it off in the cells where it is active.
7. Write ``adata.h5ad``, ``dgd/``, ``sae/``, ``features.csv``, ``steering_genes.csv``,
   ``steering_enrichment.csv``, ``summary.json`` and ``report.html``.

Every file is written whole (a temporary file renamed into place). The folder gets a marker,
``.dgdlens-output.json``, so that a later run recognises it as the demo's own and replaces only the
demo's files; a non-empty folder without the marker is refused unless ``overwrite=True``, and even
then only files with the demo's names are replaced: nothing else in it is touched.

:func:`run_demo` does all of it and returns a :class:`DemoResult`; ``quick=True`` is a rough run of
under a minute of compute, for checking that everything works.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["run_demo", "DemoResult", "DEMO_SETTINGS", "QUICK_SETTINGS", "MARKER", "DEMO_FILES"]

LABELS_KEY = "bulk_labels"
#: Written first into the output folder: it marks the folder as the demo's own.
MARKER = ".dgdlens-output.json"
#: Everything the demo writes into its folder (the only names it ever replaces).
DEMO_FILES = ("adata.h5ad", "dgd", "sae", "features.csv", "feature_summary.csv", "steering_genes.csv",
              "steering_enrichment.csv", "summary.json", "report.html", MARKER)
_MODEL_DIRS = ("dgd", "sae")

#: The full demo: model defaults; an SAE sized for 700 cells whose 20-d latents form about ten clusters
#: (64 features left two thirds of them dead, 32 about a third); DE groups sized for a small data set.
DEMO_SETTINGS = {
    "held_out_fraction": 0.15,
    "dgd_epochs": 500,
    "embed_steps": 200,
    "sae_kind": "topk",
    "sae_latents": 32,
    "sae_k": 4,
    "sae_epochs": 300,
    "annotate_percentile": 90.0,
    "annotate_min_active_cells": 20,
    "gene_sets": "go_bp",
}
#: ``quick=True``: the same steps with far fewer iterations (results are rough).
QUICK_SETTINGS = {**DEMO_SETTINGS, "dgd_epochs": 15, "embed_steps": 20, "sae_epochs": 20}


@dataclass
class DemoResult:
    """Where the demo wrote its files, the numbers it printed, and seconds per step."""

    out: Path
    files: dict[str, Path]
    summary: dict
    timings: dict[str, float] = field(default_factory=dict)


class _Steps:
    """Numbered step messages with the time each step took."""

    def __init__(self, total: int, echo: Callable[[str], None]):
        self.total, self.echo, self.n = total, echo, 0
        self.timings: dict[str, float] = {}
        self._name, self._t = None, time.perf_counter()

    def start(self, name: str, text: str) -> None:
        self.stop()
        self.n += 1
        self._name, self._t = name, time.perf_counter()
        self.echo(f"[{self.n}/{self.total}] {text}")

    def stop(self) -> None:
        if self._name is not None:
            self.timings[self._name] = time.perf_counter() - self._t
            self._name = None


def _split_cells(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_held = int(round(n * fraction))
    return np.sort(order[n_held:]), np.sort(order[:n_held])


def _choose_steering(activations, features: pd.DataFrame, alpha: float = 0.05) -> tuple[int, np.ndarray]:
    """The feature to steer and the cells where it is active.

    The demo switches one feature off where it is on: a consistency check a reader can follow (if the
    feature stands for the programme in its annotation, that programme's genes should go down). It uses
    the feature with the largest total activation among those whose best term is 'up' (genes higher in
    the active cells), so that the edit is large enough to matter; else among all annotated features,
    else among all features.
    """
    A = activations.tocsc()
    totals = np.asarray(A.sum(axis=0)).ravel()
    passed = features["significant"] if "significant" in features else features["padj_global"] <= alpha
    best = features[passed].sort_values("padj_global", kind="stable").drop_duplicates("feature")
    pools = (best.loc[best["direction"] == "up", "feature"], best["feature"], range(A.shape[1]))
    pool = [0]
    for candidates in pools:
        live = [int(f) for f in candidates if totals[int(f)] > 0]
        if live:
            pool = live
            break
    feature = max(pool, key=lambda f: (totals[f], -f))
    active = A[:, feature].toarray().ravel() > 0
    if not active.any():  # nothing is active anywhere (a degenerate SAE): ablation then changes nothing
        active[:] = True
    return feature, active


def _is_demo_folder(out: Path) -> bool:
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("written_by") == "dgdlens demo"


def prepare_output_folder(out, *, overwrite: bool = False) -> Path:
    """Check (before any work) that the demo may write into ``out``; raises, changing nothing, if not.

    Fine: a missing or empty folder, a folder with the demo's marker, or any folder with
    ``overwrite=True``, as long as the demo's ``dgd/`` and ``sae/`` there are dgdlens model folders
    (see :func:`dgdlens._io.check_model_dir_replaceable`) and none of its file names is a folder.
    """
    from ._io import OutputWriteError, check_model_dir_replaceable, check_output_location

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; the demo writes into a folder, choose another --out.")
    try:
        check_output_location(out / MARKER, what="--out")
    except OutputWriteError as err:
        raise FileExistsError(str(err)) from None
    if not out.exists():
        return out
    entries = sorted(p.name for p in out.iterdir())
    if entries and not _is_demo_folder(out) and not overwrite:
        foreign = [e for e in entries if e not in DEMO_FILES] or entries
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise FileExistsError(
            f"{out} is not empty ({shown}) and was not written by the demo; nothing was changed. Choose a new "
            "--out, or pass --overwrite to add the demo's files there (only files with the demo's names are "
            "replaced, nothing else is deleted).")
    for name in _MODEL_DIRS:
        try:
            check_model_dir_replaceable(out / name)
        except FileExistsError as err:
            raise FileExistsError(f"the demo would replace {out / name}, but: {err}") from None
    for name in DEMO_FILES:
        if name not in _MODEL_DIRS and (out / name).is_dir():
            raise FileExistsError(f"{out / name} is a folder; the demo writes a file there. Choose a new --out.")
    return out


def _write_marker(out: Path) -> None:
    from ._io import atomic_write_text
    from ._version import __version__

    atomic_write_text(out / MARKER, json.dumps({"written_by": "dgdlens demo", "dgdlens_version": __version__,
                                                "files": list(DEMO_FILES)}, indent=2))


def run_demo(
    out: str | Path = "dgdlens-demo",
    *,
    quick: bool = False,
    max_epochs: int | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool = True,
    num_threads: int | None = 1,
    echo: Callable[[str], None] = print,
    overwrite: bool = False,
) -> DemoResult:
    """Run the demo pipeline and write its outputs to ``out`` (created; the demo's own files are replaced).

    ``out`` may be missing, empty, or a folder an earlier demo wrote (it holds the marker
    :data:`MARKER`). A non-empty folder without the marker is refused (``FileExistsError``, before
    any work) unless ``overwrite=True``; only the files named in :data:`DEMO_FILES` are ever replaced.

    Parameters
    ----------
    out
        Output folder.
    quick
        Few epochs and steps everywhere (:data:`QUICK_SETTINGS`): for tests, not for conclusions.
    max_epochs
        Maximum DGD epochs (default 500 with early stopping; 15 with ``quick``).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ...
    seed
        Seeds the held-out split and every model.
    progress
        Progress bars for training, embedding and annotation.
    num_threads
        CPU threads for torch during the demo (restored afterwards; ``None`` keeps torch's setting). The
        demo's matrices are small: with one thread a DGD epoch is several times faster than with two
        when the cores are busy, and no slower when they are idle.
    echo
        Receives the step messages and the final summary (``print`` by default).
    overwrite
        Also write into a non-empty folder that the demo did not write.
    """
    import torch

    if max_epochs is not None and (isinstance(max_epochs, bool)
                                   or not isinstance(max_epochs, (int, np.integer)) or max_epochs < 1):
        raise ValueError(f"max_epochs must be a positive integer, got {max_epochs!r}.")
    prepare_output_folder(out, overwrite=overwrite)

    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        return _run(out, quick=quick, max_epochs=max_epochs, device=device, seed=seed, progress=progress,
                    echo=echo)
    finally:
        torch.set_num_threads(previous_threads)


def _run(out, *, quick, max_epochs, device, seed, progress, echo) -> DemoResult:
    import anndata as ad

    from . import lens
    from ._device import resolve_device
    from ._io import atomic_write_text, to_jsonable
    from .data.datasets import pbmc68k_counts
    from .models import DGD
    from .sae import metrics as sae_metrics
    from .sae import train_sae
    from .steer import steer

    settings = dict(QUICK_SETTINGS if quick else DEMO_SETTINGS)
    if max_epochs is not None:
        settings["dgd_epochs"] = int(max_epochs)
    out = Path(out)
    dev = resolve_device(device)
    _write_marker(out)
    t_start = time.perf_counter()
    steps = _Steps(7, echo)

    steps.start("data", "Loading the bundled PBMC counts (pbmc68k_reduced) ...")
    adata = pbmc68k_counts()
    train_idx, held_idx = _split_cells(adata.n_obs, settings["held_out_fraction"], seed)
    # A gene without a single count among the training cells cannot be modelled; drop it everywhere.
    adata = adata[:, np.asarray(adata.X[train_idx].sum(axis=0)).ravel() > 0].copy()
    train_data, held_data = adata[train_idx].copy(), adata[held_idx].copy()
    echo(f"      {adata.n_obs} cells x {adata.n_vars} genes; {len(train_idx)} for training, "
         f"{len(held_idx)} held out.")

    steps.start("dgd", f"Training the DGD (up to {settings['dgd_epochs']} epochs, on {dev}) ...")
    model = DGD(train_data, labels_key=LABELS_KEY, seed=seed)
    model.train(max_epochs=settings["dgd_epochs"], device=dev, progress=progress,
                early_stopping=not quick)

    steps.start("embed", f"Embedding the {len(held_idx)} held-out cells ...")
    # latents, mixture clusters and responsibilities: the learned ones of the training cells, and
    # held-out inference (decoder and mixture frozen) for the others
    model.add_to_adata()  # into train_data, the model's training AnnData
    model.add_to_adata(held_data, n_steps=settings["embed_steps"], progress=progress)
    recon_train = model.get_reconstruction_error()
    recon_held = model.get_reconstruction_error(held_data, z=held_data.obsm["X_dgd"])
    split = np.full(train_data.n_obs, "training", dtype=object)
    split[model.val_idx] = "validation"
    train_data.obs["dgd_split"] = split
    held_data.obs["dgd_split"] = "held-out"
    adata = ad.concat([train_data, held_data], merge="same", uns_merge="same")[adata.obs_names].copy()
    adata.obs["dgd_split"] = pd.Categorical(adata.obs["dgd_split"],
                                            categories=["training", "validation", "held-out"])

    steps.start("sae", f"Training a {settings['sae_kind']} SAE ({settings['sae_latents']} features, "
                       f"k={settings['sae_k']}) on the training cells' latents ...")
    sae = train_sae(train_data, use_rep="X_dgd", kind=settings["sae_kind"], n_latents=settings["sae_latents"],
                    k=settings["sae_k"], max_epochs=settings["sae_epochs"], device=dev, seed=seed,
                    progress=progress)
    activations = sae.encode(adata, use_rep="X_dgd")
    adata.obsm["X_sae"] = activations
    quality = sae_metrics(sae, adata.obsm["X_dgd"])

    steps.start("annotate", f"Annotating the SAE features with {settings['gene_sets']} ...")
    features, feature_summary = lens.annotate(
        activations, adata.X, np.asarray(adata.var_names), settings["gene_sets"],
        percentile=settings["annotate_percentile"], min_active_cells=settings["annotate_min_active_cells"],
        seed=seed, progress=progress, return_features=True)

    feature, active = _choose_steering(activations, features)
    steps.start("steer", f"Steering feature {feature}: switching it off in the {int(active.sum())} cells "
                         "where it is active ...")
    steering = steer(model, sae, adata, use_rep="X_dgd", feature=feature, mode="ablate", cells=active,
                     gene_sets=settings["gene_sets"], random_control=True, seed=seed)

    steps.start("write", f"Writing the results to {out}/ ...")
    files = _write_outputs(out, adata, model, sae, features, feature_summary, steering)
    summary = _summary(adata, model, quality, features, feature_summary, steering, recon_train, recon_held,
                       settings, dev)
    files["report"] = _write_report(out / "report.html", adata, model, quality, activations, features,
                                    steering, summary, settings)
    steps.stop()
    summary["time_s"] = round(time.perf_counter() - t_start, 1)
    files["summary"] = out / "summary.json"
    atomic_write_text(files["summary"],
                      json.dumps(to_jsonable({**summary, "timings_s": steps.timings}), indent=2))
    for line in summary_lines(summary, out):
        echo(line)
    return DemoResult(out=out, files=files, summary=summary, timings=steps.timings)


def _write_outputs(out: Path, adata, model, sae, features, feature_summary, steering) -> dict[str, Path]:
    files = {
        "adata": out / "adata.h5ad", "dgd": out / "dgd", "sae": out / "sae", "features": out / "features.csv",
        "feature_summary": out / "feature_summary.csv", "steering_genes": out / "steering_genes.csv",
        "steering_enrichment": out / "steering_enrichment.csv",
    }
    adata.uns["dgdlens_demo"] = {"labels_key": LABELS_KEY, "latent_rep": "X_dgd",
                                 "cluster_key": "dgd_cluster", "activations_rep": "X_sae",
                                 "steered_feature": int(steering.feature)}
    from ._io import atomic_path

    with atomic_path(files["adata"]) as tmp:
        adata.write_h5ad(tmp)
    model.save(files["dgd"], overwrite=True)  # replaces only a dgdlens model folder (checked up front)
    sae.save(files["sae"], overwrite=True)
    for key, table in (("features", features), ("feature_summary", feature_summary),
                       ("steering_genes", steering.genes), ("steering_enrichment", steering.enrichment)):
        with atomic_path(files[key]) as tmp:
            table.to_csv(tmp, index=False)
    return files


def _summary(adata, model, quality, features, feature_summary, steering, recon_train, recon_held,
             settings, dev) -> dict:
    from .evaluate import cluster_agreement
    from .steer import steering_summary

    agreement = cluster_agreement(adata.obs["dgd_cluster"], adata.obs[LABELS_KEY])
    s = model.train_summary_
    n_ok = int((feature_summary["status"] == "ok").sum())
    top = features.sort_values(["padj", "pval"], kind="stable").drop_duplicates("feature").head(3)
    return {
        "cells": int(adata.n_obs), "genes": int(adata.n_vars), "device": str(dev),
        "dgd": {"n_latent": model.n_latent, "n_components": model.n_components, "epochs_run": s["epochs_run"],
                "best_epoch": s["best_epoch"], "stopped_early": s["stopped_early"],
                "fit_time_s": round(s["fit_time_s"], 1),
                "recon_nll_training": round(float(recon_train), 2),
                "recon_nll_held_out": round(float(recon_held), 2),
                "ari_vs_labels": round(agreement["ari"], 3), "nmi_vs_labels": round(agreement["nmi"], 3)},
        "sae": {"kind": settings["sae_kind"], "n_features": settings["sae_latents"], "k": settings["sae_k"],
                "fvu": round(quality["fvu"], 4), "l0": round(quality["l0"], 2),
                "dead_fraction": round(quality["dead_fraction"], 3)},
        "annotation": {"gene_sets": settings["gene_sets"], "features_tested": n_ok,
                       "features_with_terms": int(features["feature"].nunique()) if len(features) else 0,
                       "rows": int(len(features)),
                       "top": [f"feature {r.feature}: {_term_name(r)} ({r.direction}, padj {r.padj:.2g})"
                               for r in top.itertuples()]},
        "steering": steering_summary(steering),
    }


def _term_name(row) -> str:
    description = getattr(row, "description", None)
    return f"{description} ({row.term})" if isinstance(description, str) and description else str(row.term)


def summary_lines(summary: dict, out: Path) -> list[str]:
    """The short summary printed at the end of the demo."""
    d, s, a, st = summary["dgd"], summary["sae"], summary["annotation"], summary["steering"]
    minutes, seconds = divmod(int(round(summary["time_s"])), 60)
    lines = [
        "",
        f"dgdlens demo finished in {minutes} min {seconds:02d} s. Results in {out}/",
        f"  DGD       {d['n_latent']}-d latent, {d['n_components']} mixture components, "
        f"{d['epochs_run']} epochs "
        f"(best {d['best_epoch']}); reconstruction NLL per cell: training {d['recon_nll_training']:.1f}, "
        f"held-out {d['recon_nll_held_out']:.1f}",
        f"            mixture components vs {LABELS_KEY}: ARI {d['ari_vs_labels']:.2f}, "
        f"NMI {d['nmi_vs_labels']:.2f}",
        f"  SAE       {s['n_features']} features (top-{s['k']}): FVU {s['fvu']:.3f}, L0 {s['l0']:.1f}, "
        f"dead {s['dead_fraction']:.0%}",
        f"  features  {a['features_with_terms']} of {a['features_tested']} tested features have a "
        f"{a['gene_sets'].upper().replace('_', ' ')} term (global FDR 0.05); best:",
        *[f"              {t}" for t in a["top"]],
        f"  steering  feature {st['feature']} switched off in its {st['n_cells']} active cells: "
        f"{st['genes_down']} genes down, {st['genes_up']} up"
        + (f" (random direction, same distances: {st['control_genes_changed']} changed)"
           if "control_genes_changed" in st else ""),
        "  files     adata.h5ad (obsm X_dgd, X_sae; obs dgd_cluster, dgd_split), dgd/, sae/, features.csv,",
        "            steering_genes.csv, steering_enrichment.csv, summary.json",
        f"  report    {out / 'report.html'} (open it in a browser)",
    ]
    return lines


def _write_report(path: Path, adata, model, quality, activations, features, steering, summary,
                  settings) -> Path:
    from .report import build_report

    d = summary["dgd"]
    labels = adata.obs[LABELS_KEY].rename("cell type (bulk_labels)")
    st = summary["steering"]
    steering_view = {
        "feature": steering.feature, "mode": "ablate", "value": None, "n_cells": len(steering.cells),
        "lfc": steering.genes[["gene", "log2fc"]], "enrichment": steering.enrichment,
        "description": (
            "These are the cells where it is active. Each of them moved back along the feature's direction "
            "by its own activation, and the model predicted its expression again. "
            f"{st['genes_down']} genes went down and {st['genes_up']} up: genes whose change is larger than "
            "under at least 95 % of 200 edits of the same size along random directions (empirical p, BH "
            "< 0.05) and |log2 fold change| >= 0.25. If the feature stands for the programme in its "
            "annotation, the genes of its top terms should be among those going down. One more random "
            f"direction, scored the same way, changed {st.get('control_genes_changed', 'n/a')} genes."),
    }
    notes = [
        "Data: scanpy's pbmc68k_reduced (a 700-cell subset of 10x Genomics' 68k PBMCs, Zheng et al. 2017), "
        f"with the raw counts recovered exactly; {adata.n_vars} genes. The labels (bulk_labels) are noisy "
        "cell-type calls from correlation with sorted bulk profiles; they were not used in training.",
        f"{len(model.train_idx) + len(model.val_idx)} cells trained the DGD ({len(model.val_idx)} of them as "
        f"its validation split); {int((adata.obs['dgd_split'] == 'held-out').sum())} held-out cells were "
        "embedded afterwards with the model frozen. Reconstruction NLL per cell (lower is better): "
        f"{d['recon_nll_training']:.1f} on training cells, {d['recon_nll_held_out']:.1f} on held-out cells. "
        "Both fit each cell's latent to the counts they then score, so they say how well the decoder can "
        "describe a cell, not how well it predicts unseen counts; for that, dl.evaluate scores held-out "
        "cells by count splitting (latent from one half of the counts, likelihood of the other half).",
    ]
    if settings["dgd_epochs"] < 100:
        notes.append(f"Quick run: the DGD trained for only {settings['dgd_epochs']} epochs and the SAE for "
                     f"{settings['sae_epochs']}; the results are rough.")
    source = features.attrs.get("gene_sets", {})
    attribution = None
    if source:
        attribution = (f"Gene sets: {source.get('title') or source.get('name')}, "
                       f"release {source.get('release')}; licence: {source.get('license')}; "
                       f"cite: {source.get('citation')}.")
    params = {"DGD": f"{model.n_latent}-d latent, {model.n_components} components, decoder "
                     f"{'-'.join(map(str, model.params['hidden']))}",
              "DGD epochs": f"{d['epochs_run']} of at most {settings['dgd_epochs']}",
              "SAE": f"{settings['sae_kind']}, {settings['sae_latents']} features, k = {settings['sae_k']}, "
                     f"{settings['sae_epochs']} epochs",
              "annotation": f"{settings['gene_sets']}, active group above the "
                            f"{settings['annotate_percentile']:g}th percentile",
              "seed": model.params["seed"]}
    return build_report(
        path, title="dgdlens demo: PBMC (pbmc68k_reduced)",
        summary={"cells": adata.n_obs, "genes": adata.n_vars, "held-out cells":
                 int((adata.obs["dgd_split"] == "held-out").sum()), "latent dimensions": model.n_latent,
                 "mixture components": model.n_components, "SAE features": activations.shape[1]},
        params=params, history=model.history_, best_epoch=d["best_epoch"], latent=adata.obsm["X_dgd"],
        clusters=adata.obs["dgd_cluster"], labels=labels, labels_name="cell type (bulk_labels)",
        sae_metrics=quality, activations=activations, features=features, steering=steering_view,
        attribution=attribution, notes=notes, seed=model.params["seed"])
