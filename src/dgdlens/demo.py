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

``multiome=True`` (``dgdlens demo --multiome``) runs the same pipeline on simulated paired RNA + ATAC
counts (:func:`dgdlens.sim.multiome.simulate_multiome`, two batches, offline): a two-modality DGD with a
batch covariate, held-out cells embedded from both modalities and predicted across modalities (RNA ->
ATAC, ATAC -> RNA, against per-feature mean baselines), an SAE on the latent, the feature lens on genes
(the planted programmes as gene sets) and on peaks (peak sets from the planted peak-gene links and the
ATAC marker blocks), and one feature steered and read out in both modalities. It writes
:data:`MULTIOME_FILES` (``mdata.h5mu`` instead of ``adata.h5ad``).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["run_demo", "DemoResult", "DEMO_SETTINGS", "QUICK_SETTINGS", "MARKER", "DEMO_FILES",
           "MULTIOME_SETTINGS", "MULTIOME_QUICK_SETTINGS", "MULTIOME_FILES"]

LABELS_KEY = "bulk_labels"
#: Written first into the output folder: it marks the folder as the demo's own.
MARKER = ".dgdlens-output.json"
#: Everything the demo writes into its folder (the only names it ever replaces).
DEMO_FILES = ("adata.h5ad", "dgd", "sae", "features.csv", "feature_summary.csv", "steering_genes.csv",
              "steering_enrichment.csv", "summary.json", "report.html", MARKER)
_MODEL_DIRS = ("dgd", "sae")

#: The full demo: model defaults; an SAE sized for 700 cells whose 20-d latents form about ten clusters
#: (64 features left two thirds of them dead, 32 about a third); DE groups sized for a small data set.
#: 250 DGD epochs: on the demo's training cells the validation cells' count-split NLL after 250 epochs
#: equals that after 500 within 0.1 nats (459.3 / 458.8 vs 459.6 / 458.6, seeds 0 / 1; 150 epochs: 460.3 /
#: 460.0) at half the time; the demo's held-out cells played no part in the choice.
DEMO_SETTINGS = {
    "held_out_fraction": 0.15,
    "dgd_epochs": 250,
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

#: What ``multiome=True`` writes into its folder (the only names it ever replaces).
MULTIOME_FILES = ("mdata.h5mu", "dgd", "sae", "features_rna.csv", "features_peaks.csv", "feature_summary.csv",
                  "steering_genes.csv", "steering_peaks.csv", "cross_modal.csv", "summary.json", "report.html",
                  MARKER)

#: ``multiome=True``: the simulation (2 batches, cell types = 3 RNA groups x 2 ATAC groups), a DGD with a
#: batch covariate trained for a fixed number of epochs (its validation loss stays flat for tens of epochs
#: while the latents separate, which would stop early stopping too soon), with per-batch latent steps and
#: faster learning rates than the defaults so that a short run gets somewhere; the lens on both modalities.
MULTIOME_SETTINGS = {
    "n_cells": 1500, "n_genes": 500, "n_peaks": 2500, "n_batches": 2,
    "held_out_fraction": 0.15,
    "n_latent": 10,
    "dgd_epochs": 100,
    "dgd_train": {"batch_size": 128, "rep_step": "batch", "lr_rep": 0.05, "lr_decoder": 3e-3},
    "embed_steps": 100,
    "sae_kind": "topk",
    "sae_latents": 24,
    "sae_k": 3,
    "sae_epochs": 300,
    "annotate_percentile": 90.0,
    "annotate_min_active_cells": 20,
    "min_set_size": 5,
    "steer_max_cells": 150,
    "steer_controls": 100,
}
#: ``multiome=True, quick=True``: smaller data and far fewer iterations (results are rough).
MULTIOME_QUICK_SETTINGS = {**MULTIOME_SETTINGS, "n_cells": 600, "n_genes": 300, "n_peaks": 1500,
                           "dgd_epochs": 25, "embed_steps": 30, "sae_epochs": 60, "sae_latents": 16,
                           "steer_max_cells": 80, "steer_controls": 40}


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


def prepare_output_folder(out, *, overwrite: bool = False, multiome: bool = False) -> Path:
    """Check (before any work) that the demo may write into ``out``; raises, changing nothing, if not.

    Fine: a missing or empty folder, a folder with the demo's marker, or any folder with
    ``overwrite=True``, as long as the demo's ``dgd/`` and ``sae/`` there are dgdlens model folders
    (see :func:`dgdlens._io.check_model_dir_replaceable`) and none of its file names is a folder.

    Parameters
    ----------
    out
        The output folder.
    overwrite
        Also accept a non-empty folder the demo did not write.
    multiome
        Check the names the multiome demo writes (:data:`MULTIOME_FILES`) instead of :data:`DEMO_FILES`.

    Returns
    -------
    pathlib.Path
        ``out``.
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
        foreign = [e for e in entries if e not in DEMO_FILES + MULTIOME_FILES] or entries
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
    for name in MULTIOME_FILES if multiome else DEMO_FILES:
        if name not in _MODEL_DIRS and (out / name).is_dir():
            raise FileExistsError(f"{out / name} is a folder; the demo writes a file there. Choose a new --out.")
    return out


def _write_marker(out: Path, files=DEMO_FILES) -> None:
    from ._io import atomic_write_text
    from ._version import __version__

    atomic_write_text(out / MARKER, json.dumps({"written_by": "dgdlens demo", "dgdlens_version": __version__,
                                                "files": list(files)}, indent=2))


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
    multiome: bool = False,
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
        Maximum DGD epochs (default 250 with early stopping; 15 with ``quick``).
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
    multiome
        Run the multiome demo instead (simulated paired RNA + ATAC, see the module docstring;
        :data:`MULTIOME_SETTINGS`, with ``quick`` :data:`MULTIOME_QUICK_SETTINGS`; ``max_epochs`` default
        100, 25 with ``quick``, always run in full: no early stopping).

    Returns
    -------
    DemoResult
        The output folder, the files written, the summary (also in ``summary.json``) and seconds per step.
    """
    import torch

    if max_epochs is not None and (isinstance(max_epochs, bool)
                                   or not isinstance(max_epochs, (int, np.integer)) or max_epochs < 1):
        raise ValueError(f"max_epochs must be a positive integer, got {max_epochs!r}.")
    prepare_output_folder(out, overwrite=overwrite, multiome=multiome)

    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        run = _run_multiome if multiome else _run
        return run(out, quick=quick, max_epochs=max_epochs, device=device, seed=seed, progress=progress,
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


# ============================================================================================ multiome

def _simulate_multiome(**kwargs):
    """The colleague's simulator, wherever the sim package exports it from."""
    try:
        from .sim import simulate_multiome
    except ImportError:
        from .sim.multiome import simulate_multiome
    return simulate_multiome(**kwargs)


def _subset_mudata(mdata, cells=None, features: dict | None = None, *, keep_uns: bool = False):
    """A new MuData of some cells (index array) and, per modality, some features (boolean mask), with the
    shared ``obs`` columns carried over (no ``rna:``/``atac:`` copies)."""
    import copy

    import mudata as md
    from .data.modalities import mudata_without_pull

    rows = np.arange(mdata.n_obs) if cells is None else np.asarray(cells)
    mods = {}
    for name, mod in mdata.mod.items():
        sub = mod[rows]
        if features is not None:
            sub = sub[:, features[name]]
        mods[name] = sub.copy()
    with mudata_without_pull():
        out = md.MuData(mods)
        obs = mdata.obs.iloc[rows]
        if not pd.Index(out.obs_names).equals(pd.Index(obs.index)):
            raise ValueError("the modalities' cells are not the MuData's cells in the same order.")
        for column in obs.columns:
            out.obs[column] = obs[column].to_numpy()
        out.update()
    if keep_uns:
        out.uns.update(copy.deepcopy(dict(mdata.uns)))
    return out


def _programme_sets(truth: dict, genes, peaks):
    """The planted programmes as gene sets (RNA groups' marker genes) and as peak sets (peaks linked to those
    genes, and the ATAC groups' marker peaks), restricted to the measured genes and peaks."""
    from .lens import GeneSets, peak_sets

    programs = {str(k): list(v) for k, v in truth["programs_rna"].items()}
    rna_sets = GeneSets(programs, descriptions={k: f"marker genes of RNA group {k}" for k in programs},
                        name="planted programmes", title="Planted programmes of the simulation")
    linked = peak_sets(rna_sets, dict(truth["peak_gene_links"]), peaks=peaks)
    sets = {k: list(v) for k, v in linked.items()}
    descriptions = {k: f"peaks linked to RNA group {k}'s marker genes" for k in sets}
    keep = set(map(str, peaks))
    for group, members in truth["programs_atac"].items():
        sets[str(group)] = [p for p in members if p in keep]
        descriptions[str(group)] = f"marker peaks of ATAC group {group}"
    peak_collection = GeneSets(sets, descriptions=descriptions, name="planted peak sets",
                               title="Planted peak sets of the simulation")
    return rna_sets.restrict(genes), peak_collection


def _best_terms(features: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """One row per feature: its significant term with the lowest global adjusted p (empty table if none)."""
    if features is None or len(features) == 0:
        return pd.DataFrame(columns=["feature", "term", "description", "direction", "padj_global"])
    passed = features["significant"] if "significant" in features else features["padj_global"] <= alpha
    best = features[passed].sort_values(["padj_global", "pval"], kind="stable").drop_duplicates("feature")
    return best[["feature", "term", "description", "direction", "padj_global"]].reset_index(drop=True)


def _choose_multiome_steering(activations, rna_features, peak_features) -> tuple[int, np.ndarray]:
    """The feature to steer and the (training) cells where it is active.

    Largest total activation among the features whose best RNA term and best peak term are the same
    programme, both 'up'; else among those with an 'up' RNA term and any peak term; else as the RNA demo
    chooses (:func:`_choose_steering` on the RNA annotation).
    """
    A = activations.tocsc()
    totals = np.asarray(A.sum(axis=0)).ravel()
    rna, peaks = _best_terms(rna_features), _best_terms(peak_features)
    both = rna.merge(peaks, on="feature", suffixes=("_rna", "_peaks"))
    up = both[both["direction_rna"] == "up"]
    pools = (up.loc[(up["term_rna"] == up["term_peaks"]) & (up["direction_peaks"] == "up"), "feature"],
             up["feature"])
    for candidates in pools:
        live = [int(f) for f in candidates if totals[int(f)] > 0]
        if live:
            feature = max(live, key=lambda f: (totals[f], -f))
            return feature, A[:, feature].toarray().ravel() > 0
    return _choose_steering(activations, rna_features)


def _log_normalised(X) -> np.ndarray:
    import scipy.sparse as sp

    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    X = X.astype(np.float64)
    total = X.sum(axis=1, keepdims=True)
    return np.log1p(1e4 * X / np.where(total > 0, total, 1.0))


def _rowwise_pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows (cells) of the Pearson correlation between ``a`` and ``b`` across columns."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    r = np.divide((a * b).sum(axis=1), denom, out=np.full(len(a), np.nan), where=denom > 0)
    return float(np.nanmean(r))


def _per_batch_means(values: np.ndarray, batch_train: np.ndarray, batch_held: np.ndarray) -> np.ndarray:
    """Each held-out cell gets the per-feature mean of the training cells of its batch (the overall mean for a
    batch without training cells)."""
    overall = values.mean(axis=0)
    means = {b: values[batch_train == b].mean(axis=0) if (batch_train == b).any() else overall
             for b in np.unique(batch_held)}
    return np.stack([means[b] for b in batch_held]) if len(batch_held) else np.zeros((0, values.shape[1]))


def _cross_modal_scores(p_atac, atac_held, atac_train, p_rna, rna_held, rna_train, batch_train, batch_held,
                        peak_groups: dict, gene_groups: dict) -> pd.DataFrame:
    """Cross-modal prediction on held-out cells against per-feature mean baselines (overall and per batch).

    RNA -> ATAC: AUROC of the predicted probabilities for the observed open (count > 0) peaks, pooled over
    cells x peaks; baselines: each peak's fraction of open cells among the training cells. ATAC -> RNA: mean
    over cells of the Pearson correlation across genes between predicted and observed log(1 + counts per
    10k); baselines: each gene's mean of that among the training cells.
    """
    import scipy.sparse as sp
    from sklearn.metrics import roc_auc_score

    open_held = (atac_held.toarray() if sp.issparse(atac_held) else np.asarray(atac_held)) > 0
    open_train = (atac_train.toarray() if sp.issparse(atac_train) else np.asarray(atac_train)) > 0
    open_train = open_train.astype(np.float64)
    peak_mean = np.broadcast_to(open_train.mean(axis=0), open_held.shape)
    peak_batch = _per_batch_means(open_train, batch_train, batch_held)
    rows = []

    def auroc(score, cols):
        y = open_held[:, cols].ravel()
        return float(roc_auc_score(y, np.asarray(score)[:, cols].ravel())) if 0 < y.sum() < y.size else np.nan

    for label, cols in (("all peaks", np.ones(open_held.shape[1], bool)), *peak_groups.items()):
        if cols.sum() == 0:
            continue
        rows.append({"prediction": "RNA -> ATAC", "features": f"{label} ({int(cols.sum()):,})", "metric": "AUROC",
                     "model": auroc(p_atac, cols), "baseline_feature_mean": auroc(peak_mean, cols),
                     "baseline_feature_mean_by_batch": auroc(peak_batch, cols)})
    obs = _log_normalised(rna_held)
    pred = _log_normalised(p_rna)
    train = _log_normalised(rna_train)
    gene_mean = np.broadcast_to(train.mean(axis=0), obs.shape)
    gene_batch = _per_batch_means(train, batch_train, batch_held)
    for label, cols in (("all genes", np.ones(obs.shape[1], bool)), *gene_groups.items()):
        if cols.sum() < 2:
            continue
        rows.append({"prediction": "ATAC -> RNA", "features": f"{label} ({int(cols.sum()):,})",
                     "metric": "Pearson r per cell", "model": _rowwise_pearson(pred[:, cols], obs[:, cols]),
                     "baseline_feature_mean": _rowwise_pearson(gene_mean[:, cols], obs[:, cols]),
                     "baseline_feature_mean_by_batch": _rowwise_pearson(gene_batch[:, cols], obs[:, cols])})
    return pd.DataFrame(rows)


def _feature_activity(activations, cell_types: pd.Series) -> pd.DataFrame:
    """Per feature: cells where it is active and the cell types most of them have."""
    A = activations.tocsc()
    types = np.asarray(cell_types.astype(str))
    rows = []
    for f in range(A.shape[1]):
        active = A[:, f].toarray().ravel() > 0
        n = int(active.sum())
        shares = pd.Series(types[active]).value_counts(normalize=True) if n else pd.Series(dtype=float)
        top = ", ".join(f"{t} {v:.0%}" for t, v in shares.head(2).items() if v >= 0.1)
        rows.append({"feature": f, "active_cells": n, "cell_types": top})
    return pd.DataFrame(rows)


def _run_multiome(out, *, quick, max_epochs, device, seed, progress, echo) -> DemoResult:
    from . import lens
    from ._device import resolve_device
    from ._io import atomic_write_text, to_jsonable
    from .models import DGD
    from .sae import metrics as sae_metrics
    from .sae import train_sae
    from .steer import steer

    s = dict(MULTIOME_QUICK_SETTINGS if quick else MULTIOME_SETTINGS)
    if max_epochs is not None:
        s["dgd_epochs"] = int(max_epochs)
    out = Path(out)
    dev = resolve_device(device)
    _write_marker(out, MULTIOME_FILES)
    t_start = time.perf_counter()
    steps = _Steps(8, echo)

    steps.start("data", f"Simulating paired RNA + ATAC counts ({s['n_cells']} cells, {s['n_batches']} batches) ...")
    mdata = _simulate_multiome(n_cells=s["n_cells"], n_genes=s["n_genes"], n_peaks=s["n_peaks"],
                               n_batches=s["n_batches"], seed=seed)
    truth = mdata.uns["truth"]
    train_idx, held_idx = _split_cells(mdata.n_obs, s["held_out_fraction"], seed)
    # a feature without a single count among the training cells cannot be modelled; drop it everywhere
    keep = {name: np.asarray(mod.X[train_idx].sum(axis=0)).ravel() > 0 for name, mod in mdata.mod.items()}
    mdata = _subset_mudata(mdata, features=keep, keep_uns=True)
    train_md, held_md = _subset_mudata(mdata, train_idx), _subset_mudata(mdata, held_idx)
    rna_var, atac_var = mdata.mod["rna"].var, mdata.mod["atac"].var
    echo(f"      {mdata.n_obs} cells x ({mdata.mod['rna'].n_vars} genes + {mdata.mod['atac'].n_vars} peaks); "
         f"{len(train_idx)} for training, {len(held_idx)} held out.")

    steps.start("dgd", f"Training the two-modality DGD with a batch covariate ({s['dgd_epochs']} epochs, "
                       f"on {dev}) ...")
    model = DGD(train_md, n_latent=s["n_latent"], labels_key="cell_type", batch_key="batch", seed=seed)
    model.train(max_epochs=s["dgd_epochs"], device=dev, progress=progress, early_stopping=False,
                **s["dgd_train"])

    steps.start("embed", f"Embedding the {len(held_idx)} held-out cells from both modalities ...")
    model.add_to_adata()  # into train_md, the model's training data
    model.add_to_adata(held_md, n_steps=s["embed_steps"], progress=progress)
    reconstruction = {}
    for name in model.modality_names:
        reconstruction[name] = {
            "training": model.get_reconstruction_error(modality=name),
            "held_out": model.get_reconstruction_error(held_md, z=held_md.obsm["X_dgd"], modality=name,
                                                       n_steps=s["embed_steps"], progress=False)}
    split = np.full(train_md.n_obs, "training", dtype=object)
    split[model.val_idx] = "validation"
    full_split = np.empty(mdata.n_obs, dtype=object)
    full_split[train_idx], full_split[held_idx] = split, "held-out"
    mdata.obs["dgd_split"] = pd.Categorical(full_split, categories=["training", "validation", "held-out"])
    for key in ("X_dgd", "X_dgd_batch", "dgd_responsibilities"):
        block = np.zeros((mdata.n_obs, train_md.obsm[key].shape[1]), dtype=np.asarray(train_md.obsm[key]).dtype)
        block[train_idx], block[held_idx] = train_md.obsm[key], held_md.obsm[key]
        mdata.obsm[key] = block
    clusters = np.empty(mdata.n_obs, dtype=object)
    clusters[train_idx] = train_md.obs["dgd_cluster"].astype(str).to_numpy()
    clusters[held_idx] = held_md.obs["dgd_cluster"].astype(str).to_numpy()
    mdata.obs["dgd_cluster"] = pd.Categorical(clusters, categories=[str(k) for k in range(model.n_components)])

    steps.start("cross", "Predicting each modality of the held-out cells from the other ...")
    rna_only, atac_only = held_md.mod["rna"].copy(), held_md.mod["atac"].copy()
    for one in (rna_only, atac_only):
        one.obs["batch"] = held_md.obs["batch"].to_numpy()
    p_atac = model.predict_modality(rna_only, "atac", n_steps=s["embed_steps"], progress=False)
    p_rna = model.predict_modality(atac_only, "rna", n_steps=s["embed_steps"], progress=False)
    linked = atac_var.index.isin(list(truth["peak_gene_links"]["peak"]))
    atac_markers = atac_var.index.isin([p for peaks in truth["programs_atac"].values() for p in peaks])
    cross = _cross_modal_scores(
        p_atac, atac_only.X, train_md.mod["atac"].X, p_rna, rna_only.X, train_md.mod["rna"].X,
        train_md.obs["batch"].astype(str).to_numpy(), held_md.obs["batch"].astype(str).to_numpy(),
        peak_groups={"peaks linked to genes": linked, "ATAC-group marker peaks": atac_markers & ~linked,
                     "other peaks": ~linked & ~atac_markers},
        gene_groups={"marker genes": rna_var.index.isin([g for genes in truth["programs_rna"].values()
                                                         for g in genes])})

    steps.start("sae", f"Training a {s['sae_kind']} SAE ({s['sae_latents']} features, k={s['sae_k']}) on the "
                       "training cells' latents ...")
    sae = train_sae(train_md.obsm["X_dgd"], kind=s["sae_kind"], n_latents=s["sae_latents"], k=s["sae_k"],
                    max_epochs=s["sae_epochs"], device=dev, seed=seed, progress=progress)
    activations = sae.encode(mdata.obsm["X_dgd"])
    mdata.obsm["X_sae"] = activations
    quality = sae_metrics(sae, mdata.obsm["X_dgd"])

    steps.start("annotate", "Annotating the SAE features with the planted programmes: genes, then peaks ...")
    gene_collection, peak_collection = _programme_sets(truth, rna_var.index, atac_var.index)
    lens_kw = dict(percentile=s["annotate_percentile"], min_active_cells=s["annotate_min_active_cells"],
                   min_set_size=s["min_set_size"], use_aliases=False, groupby=mdata.obs["batch"].to_numpy(),
                   seed=seed, progress=progress, return_features=True)
    features_rna, summary_rna = lens.annotate(activations, mdata.mod["rna"].X, np.asarray(rna_var.index),
                                              gene_collection, **lens_kw)
    features_peaks, summary_peaks = lens.annotate(activations, mdata.mod["atac"].X, np.asarray(atac_var.index),
                                                  peak_collection, **lens_kw)

    train_acts = activations[train_idx]
    feature, active = _choose_multiome_steering(train_acts, features_rna, features_peaks)
    n_steer = min(int(active.sum()), s["steer_max_cells"])
    steps.start("steer", f"Steering feature {feature}: switching it off in {n_steer} training cells where it is "
                         "active, read out in RNA and in ATAC ...")
    steer_kw = dict(use_rep="X_dgd", feature=feature, mode="ablate", cells=active, random_control=True, seed=seed,
                    max_cells=s["steer_max_cells"], n_controls=s["steer_controls"],
                    enrichment_kwargs={"min_size": s["min_set_size"], "use_aliases": False})
    steering = {"rna": steer(model, sae, train_md, gene_sets=gene_collection, modality="rna", **steer_kw)}
    with warnings.catch_warnings():  # the same latents again: the manifold warning was given once already
        warnings.filterwarnings("ignore", message="The edit moves", category=UserWarning)
        steering["atac"] = steer(model, sae, train_md, gene_sets=peak_collection, modality="atac", **steer_kw)

    steps.start("write", f"Writing the results to {out}/ ...")
    activity = _feature_activity(activations, mdata.obs["cell_type"])
    feature_table = _multiome_feature_table(activity, features_rna, features_peaks)
    files = _write_multiome_outputs(out, mdata, model, sae, features_rna, features_peaks, feature_table,
                                    steering, cross)
    summary = _multiome_summary(mdata, model, quality, reconstruction, cross, features_rna, summary_rna,
                                features_peaks, summary_peaks, steering, s, dev, len(held_idx))
    files["report"] = _write_multiome_report(out / "report.html", mdata, model, quality, activations,
                                             features_rna, features_peaks, feature_table, steering, cross,
                                             reconstruction, summary, s)
    steps.stop()
    summary["time_s"] = round(time.perf_counter() - t_start, 1)
    files["summary"] = out / "summary.json"
    atomic_write_text(files["summary"],
                      json.dumps(to_jsonable({**summary, "timings_s": steps.timings}), indent=2))
    for line in multiome_summary_lines(summary, out, steps.timings):
        echo(line)
    return DemoResult(out=out, files=files, summary=summary, timings=steps.timings)


def _multiome_feature_table(activity: pd.DataFrame, features_rna, features_peaks) -> pd.DataFrame:
    """Per feature: activity, the best RNA term and the best peak term (significant ones only)."""
    table = activity.copy()
    for label, features in (("rna", features_rna), ("peaks", features_peaks)):
        best = _best_terms(features).set_index("feature")
        table[f"{label}_term"] = table["feature"].map(best["term"]).fillna("")
        table[f"{label}_description"] = table["feature"].map(best["description"]).fillna("")
        table[f"{label}_direction"] = table["feature"].map(best["direction"]).fillna("")
        table[f"{label}_padj"] = table["feature"].map(best["padj_global"])
    return table


def _write_multiome_outputs(out: Path, mdata, model, sae, features_rna, features_peaks, feature_table, steering,
                            cross) -> dict[str, Path]:
    from ._io import atomic_path

    files = {
        "mdata": out / "mdata.h5mu", "dgd": out / "dgd", "sae": out / "sae",
        "features_rna": out / "features_rna.csv", "features_peaks": out / "features_peaks.csv",
        "feature_summary": out / "feature_summary.csv", "steering_genes": out / "steering_genes.csv",
        "steering_peaks": out / "steering_peaks.csv", "cross_modal": out / "cross_modal.csv",
    }
    mdata.uns["dgd"] = dict(model.adata.uns["dgd"])  # the model summary add_to_adata wrote (h5mu-writable)
    mdata.uns["dgdlens_demo"] = {"labels_key": "cell_type", "latent_rep": "X_dgd", "cluster_key": "dgd_cluster",
                                 "activations_rep": "X_sae", "steered_feature": int(steering["rna"].feature),
                                 "modalities": list(model.modality_names)}
    with atomic_path(files["mdata"]) as tmp:
        mdata.write(tmp)
    model.save(files["dgd"], overwrite=True)  # replaces only a dgdlens model folder (checked up front)
    sae.save(files["sae"], overwrite=True)
    tables = {"features_rna": features_rna, "features_peaks": features_peaks, "feature_summary": feature_table,
              "steering_genes": steering["rna"].genes, "steering_peaks": steering["atac"].genes.rename(
                  columns={"gene": "peak"}), "cross_modal": cross}
    for key, table in tables.items():
        with atomic_path(files[key]) as tmp:
            table.to_csv(tmp, index=False)
    return files


def _annotation_summary(features, feature_summary, collection: str) -> dict:
    n_ok = int((feature_summary["status"] == "ok").sum())
    top = features.sort_values(["padj_global", "pval"], kind="stable").drop_duplicates("feature").head(3)
    return {"gene_sets": collection, "features_tested": n_ok,
            "features_with_terms": int(features["feature"].nunique()) if len(features) else 0,
            "rows": int(len(features)),
            "top": [f"feature {r.feature}: {_term_name(r)} ({r.direction}, padj {r.padj_global:.2g})"
                    for r in top.itertuples()]}


def _multiome_summary(mdata, model, quality, reconstruction, cross, features_rna, summary_rna, features_peaks,
                      summary_peaks, steering, settings, dev, n_held) -> dict:
    from .evaluate import cluster_agreement
    from .steer import steering_summary

    agreement = {key: cluster_agreement(mdata.obs["dgd_cluster"], mdata.obs[key])
                 for key in ("cell_type", "rna_group", "atac_group")}
    t = model.train_summary_
    modalities = {m["name"]: {"features": m["n_features"], "likelihood": m["likelihood"], "weight": m["weight"]}
                  for m in model.params["modalities"]}
    cross_rows = {}
    for r in cross.itertuples():
        key = "rna_to_atac" if r.prediction == "RNA -> ATAC" else "atac_to_rna"
        cross_rows.setdefault(key, []).append({
            "features": r.features, "metric": r.metric, "model": round(float(r.model), 4),
            "baseline_feature_mean": round(float(r.baseline_feature_mean), 4),
            "baseline_feature_mean_by_batch": round(float(r.baseline_feature_mean_by_batch), 4)})
    return {
        "multiome": True, "cells": int(mdata.n_obs), "held_out_cells": int(n_held), "device": str(dev),
        "modalities": modalities, "batches": int(mdata.obs["batch"].nunique()),
        "dgd": {"n_latent": model.n_latent, "n_components": model.n_components, "batch_key": "batch",
                "epochs_run": t["epochs_run"], "best_epoch": t["best_epoch"], "fit_time_s": round(t["fit_time_s"], 1),
                "reconstruction_nll": {m: {k: round(float(v), 2) for k, v in r.items()}
                                       for m, r in reconstruction.items()},
                **{f"ari_vs_{key}": round(a["ari"], 3) for key, a in agreement.items()},
                "nmi_vs_cell_type": round(agreement["cell_type"]["nmi"], 3)},
        "cross_modal": cross_rows,
        "sae": {"kind": settings["sae_kind"], "n_features": settings["sae_latents"], "k": settings["sae_k"],
                "fvu": round(quality["fvu"], 4), "l0": round(quality["l0"], 2),
                "dead_fraction": round(quality["dead_fraction"], 3)},
        "annotation": {"rna": _annotation_summary(features_rna, summary_rna, "planted programmes (genes)"),
                       "peaks": _annotation_summary(features_peaks, summary_peaks, "planted peak sets")},
        "steering": {"feature": int(steering["rna"].feature),
                     **{m: steering_summary(r) for m, r in steering.items()}},
    }


def multiome_summary_lines(summary: dict, out: Path, timings: dict | None = None) -> list[str]:
    """The short summary printed at the end of the multiome demo.

    Parameters
    ----------
    summary
        The demo's summary (``summary.json`` without the timings).
    out
        The output folder.
    timings
        Seconds per step, printed on one line when given.

    Returns
    -------
    list of str
        The lines to print.
    """
    d, s, c = summary["dgd"], summary["sae"], summary["cross_modal"]
    a_rna, a_peaks, st = summary["annotation"]["rna"], summary["annotation"]["peaks"], summary["steering"]
    minutes, seconds = divmod(int(round(summary["time_s"])), 60)
    mods = ", ".join(f"{name} {m['features']} ({m['likelihood']})" for name, m in summary["modalities"].items())
    recon = "; ".join(f"{m} {r['training']:.1f} / {r['held_out']:.1f}" for m, r in d["reconstruction_nll"].items())
    lines = [
        "",
        f"dgdlens demo --multiome finished in {minutes} min {seconds:02d} s. Results in {out}/",
        f"  data      {summary['cells']} simulated cells, {summary['batches']} batches; {mods}",
        f"  DGD       {d['n_latent']}-d latent + batch covariate, {d['n_components']} mixture components, "
        f"{d['epochs_run']} epochs; NLL per cell training / held-out: {recon}",
        f"            mixture components vs cell type: ARI {d['ari_vs_cell_type']:.2f} (RNA groups "
        f"{d['ari_vs_rna_group']:.2f}, ATAC groups {d['ari_vs_atac_group']:.2f})",
    ]
    for key, label in (("rna_to_atac", "RNA->ATAC"), ("atac_to_rna", "ATAC->RNA")):
        for i, r in enumerate(c.get(key, [])):
            lines.append(f"  {label if i == 0 else '':<9} {r['metric']}, {r['features']}: model {r['model']:.3f}, "
                         f"per-feature mean {r['baseline_feature_mean']:.3f}, "
                         f"same within batch {r['baseline_feature_mean_by_batch']:.3f}")
    lines += [
        f"  SAE       {s['n_features']} features (top-{s['k']}): FVU {s['fvu']:.3f}, L0 {s['l0']:.1f}, "
        f"dead {s['dead_fraction']:.0%}",
        f"  features  genes: {a_rna['features_with_terms']} of {a_rna['features_tested']} tested features have a "
        f"programme; peaks: {a_peaks['features_with_terms']} of {a_peaks['features_tested']} have a peak set",
        *[f"              genes  {t}" for t in a_rna["top"][:2]],
        *[f"              peaks  {t}" for t in a_peaks["top"][:2]],
        f"  steering  feature {st['feature']} switched off in {st['rna']['n_cells']} cells: "
        f"{st['rna']['genes_down']} genes down, {st['rna']['genes_up']} up; "
        f"{st['atac']['genes_down']} peaks down, {st['atac']['genes_up']} up",
        "  files     mdata.h5mu (obsm X_dgd, X_dgd_batch, X_sae; obs dgd_cluster, dgd_split), dgd/, sae/,",
        "            features_rna.csv, features_peaks.csv, feature_summary.csv, steering_genes.csv,",
        "            steering_peaks.csv, cross_modal.csv, summary.json",
        f"  report    {out / 'report.html'} (open it in a browser)",
    ]
    if timings:
        lines.insert(2, "  timings   " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return lines


def _write_multiome_report(path: Path, mdata, model, quality, activations, features_rna, features_peaks,
                           feature_table, steering, cross, reconstruction, summary, settings) -> Path:
    from .report import build_report, multiome_sections

    d, st = summary["dgd"], summary["steering"]
    rna_steer, atac_steer = steering["rna"], steering["atac"]
    n_held = int((mdata.obs["dgd_split"] == "held-out").sum())
    truth = mdata.uns["truth"]["settings"]
    steering_view = {
        "feature": rna_steer.feature, "mode": "ablate", "value": None, "n_cells": len(rna_steer.cells),
        "lfc": rna_steer.genes[["gene", "log2fc"]], "enrichment": rna_steer.enrichment,
        "description": (
            f"These are training cells where the feature is active (at most {settings['steer_max_cells']}, a seeded "
            "random subsample). Each of them moved back along the feature's direction by its own activation, and "
            "the model's RNA head predicted its expression again, with the cell's own batch covariate. "
            f"{st['rna']['genes_down']} genes went down and {st['rna']['genes_up']} up: genes whose change is "
            f"larger than under at least 95 % of {st['rna'].get('n_controls_random', settings['steer_controls'])} "
            "edits of the same size along random directions (empirical p, BH < 0.05) and |log2 fold change| >= "
            "0.25. One more random direction, scored the same way, changed "
            f"{st['rna'].get('control_genes_changed', 'n/a')} genes. The same edit read out in the peaks is in "
            "'Steering in both modalities' below."),
    }
    notes = [
        f"Data: simulated paired RNA + ATAC counts (dgdlens.sim.multiome.simulate_multiome, seed "
        f"{truth['seed']}): {mdata.n_obs} cells in {truth['n_batches']} batches, {mdata.mod['rna'].n_vars} genes and "
        f"{mdata.mod['atac'].n_vars} peaks. The cell types are the {truth['n_rna_groups']} x "
        f"{truth['n_atac_groups']} combinations of an RNA group (its marker genes, the planted programmes, are "
        "up) and an ATAC group (its marker peaks are open); peaks linked to marker genes follow their gene. "
        "Gene and peak names are synthetic, so the gene sets are the planted programmes, not GO.",
        f"{len(model.train_idx) + len(model.val_idx)} cells trained the DGD ({len(model.val_idx)} of them as its "
        f"validation split, for {d['epochs_run']} epochs without early stopping); {n_held} held-out cells were "
        "embedded afterwards with the model frozen, from both modalities, and once more from each modality "
        "alone for the cross-modal prediction. The batch is a covariate of the decoder; the latent shown and "
        "used by the SAE is the biological one.",
    ]
    if settings["dgd_epochs"] < 60:
        notes.append(f"Quick run: the DGD trained for only {settings['dgd_epochs']} epochs and the SAE for "
                     f"{settings['sae_epochs']} on a small simulation; the results are rough.")
    trunk, heads = ("-".join(map(str, model.params[k])) for k in ("hidden", "head_hidden"))
    params = {"DGD": f"{model.n_latent}-d latent + batch covariate, {model.n_components} components, trunk "
                     f"{trunk}, heads {heads}",
              "modalities": ", ".join(f"{m['name']} ({m['likelihood']})" for m in model.params["modalities"]),
              "DGD epochs": f"{d['epochs_run']} (" + ", ".join(f"{k} {v}" for k, v in settings["dgd_train"].items())
                            + ")",
              "SAE": f"{settings['sae_kind']}, {settings['sae_latents']} features, k = {settings['sae_k']}, "
                     f"{settings['sae_epochs']} epochs",
              "annotation": f"planted programmes / peak sets, active group above the "
                            f"{settings['annotate_percentile']:g}th percentile, silent cells matched by batch",
              "seed": model.params["seed"]}
    modalities = {m["name"]: {"features": m["n_features"], "likelihood": m["likelihood"], "weight": m["weight"]}
                  for m in model.params["modalities"]}
    extra = multiome_sections(
        modalities=modalities, reconstruction=reconstruction, cross_modal=cross, feature_table=feature_table,
        annotations={"rna": "gene", "peaks": "peak"}, steering={"rna": rna_steer, "atac": atac_steer},
        steering_description=(
            "Peak sets: the peaks linked to each RNA group's marker genes (IDs r0, r1, ...) and the marker peaks "
            "of each ATAC group (a0, a1, ...). Gene sets: the RNA groups' marker genes (r0, r1, ...)."),
        cross_modal_description=(
            "In this simulation a cell's RNA depends on its RNA group (and batch) only. Of the peaks, those "
            "linked to marker genes follow the RNA group, the ATAC-group marker peaks follow the ATAC group, "
            "which RNA does not reflect, and the other peaks follow neither (batch aside). The rows split the "
            "peaks into these classes."))
    return build_report(
        path, title="dgdlens demo: simulated multiome (RNA + ATAC)",
        summary={"cells": mdata.n_obs, "genes": mdata.mod["rna"].n_vars, "peaks": mdata.mod["atac"].n_vars,
                 "batches": int(mdata.obs["batch"].nunique()), "held-out cells": n_held,
                 "latent dimensions": model.n_latent, "mixture components": model.n_components,
                 "SAE features": activations.shape[1]},
        params=params, history=model.history_, best_epoch=None, latent=mdata.obsm["X_dgd"],
        clusters=mdata.obs["dgd_cluster"], labels=mdata.obs["cell_type"].rename("cell type"),
        labels_name="cell type", sae_metrics=quality, activations=activations, features=features_rna,
        steering=steering_view, notes=notes, extra_sections=extra, seed=model.params["seed"])
