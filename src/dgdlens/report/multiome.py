"""Report sections for a model of several modalities (RNA + chromatin accessibility of the same cells).

:func:`multiome_sections` returns :class:`~dgdlens.report.Section` objects to append to the standard report
(``build_report(..., extra_sections=multiome_sections(...))``): the modalities and how well held-out cells
are reconstructed in each, cross-modal prediction against baselines, the features annotated in both
modalities, and one steering edit read out in both. Every sentence is computed from the numbers shown.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .. import evaluate as ev
from .. import plotting as pl
from .html import Section, format_value

__all__ = ["multiome_sections", "LIKELIHOOD_DESCRIPTIONS"]

#: How each modality likelihood reads the counts, in words.
LIKELIHOOD_DESCRIPTIONS = {
    "nb": "negative binomial on the counts, scaled by the cell's total counts in the modality",
    "poisson": "Poisson on the counts, scaled by the cell's total counts in the modality",
    "binary": "Bernoulli on 'count > 0': P(open) = 1 - exp(-depth x predicted share), depth = the cell's total "
              "counts in the modality",
}

_TEXT = {
    "modalities": (
        "The model reads each cell's RNA and chromatin accessibility (ATAC) through one shared latent "
        "representation: a common decoder trunk feeds one output head per modality, and each head has its "
        "own likelihood. The table lists the modalities and the negative log-likelihood (NLL) per cell "
        "in each, summed over its features (lower is better), for the training cells and for held-out "
        "cells embedded afterwards with the model frozen. A held-out cell's latent is fitted to the same "
        "counts that are then scored, so these numbers say how well the decoder can describe a cell of "
        "each modality; they are not predictions of unseen counts. NLLs of different modalities are on "
        "different scales (many features, counts vs open/closed) and are not comparable with each other."
    ),
    "cross": (
        "Cross-modal prediction asks the model for a modality it was not shown: each held-out cell is "
        "embedded from one modality alone (its batch known), and the other modality's head is decoded. "
        "RNA -> ATAC scores the predicted probability that a peak is open against the observed open "
        "(count > 0) peaks, by the area under the ROC curve (AUROC, pooled over cells and peaks; 0.5 is "
        "chance). ATAC -> RNA scores the predicted expression against the observed log(1 + counts per "
        "10,000), by the Pearson correlation across genes within each cell, averaged over cells. Each "
        "number is next to two baselines that use no information from the other modality: every "
        "feature's mean over the training cells, and the same mean taken within the cell's batch (the "
        "model is told the batch too)."
    ),
    "features": (
        "Each SAE feature was annotated twice by the feature lens: once with its differentially expressed "
        "genes against gene sets, once with its differentially accessible peaks against peak sets. The "
        "table lists the features with the strongest annotations, the cells where each is active (and "
        "the cell types most of them belong to), and its best significant term in each modality with the "
        "direction ('up': higher where the feature is active) and the adjusted p-value (BH over every test "
        "of that modality's annotation). An empty cell means no term passed the threshold."
    ),
    "steering": (
        "The same steering edit, decoded by each modality's head: the feature's activation was changed in "
        "the listed cells, the latents moved along its direction, and the model's expected expression "
        "(RNA) and peak-open probabilities (ATAC) compared before and after. A gene or peak counts as "
        "changed only when its change exceeds what the same edit along random directions of the same "
        "length typically does (empirical p-value, BH over the features of the modality). The set-level "
        "table tests the mean log2 fold change of each set's members against the same controls. These "
        "are predictions of the model, not measurements."
    ),
}


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _modalities_section(modalities: Mapping, reconstruction: Mapping | None) -> Section:
    section = Section("Modalities and held-out reconstruction", _TEXT["modalities"])
    rows = []
    for name, spec in modalities.items():
        likelihood = str(spec.get("likelihood", ""))
        row = {"modality": name, "features": int(spec.get("features", 0)), "likelihood": likelihood,
               "reads the data as": LIKELIHOOD_DESCRIPTIONS.get(likelihood, likelihood),
               "loss weight": _num(spec.get("weight", 1.0))}
        if reconstruction is not None and name in reconstruction:
            row["NLL per cell, training"] = _num(reconstruction[name].get("training"))
            row["NLL per cell, held-out"] = _num(reconstruction[name].get("held_out"))
        rows.append(row)
    section.add_table(pd.DataFrame(rows),
                      caption="Modalities, likelihoods and reconstruction NLL (nats per cell).")
    if reconstruction:
        parts = []
        for name, r in reconstruction.items():
            train, held = _num(r.get("training")), _num(r.get("held_out"))
            if np.isfinite(train) and np.isfinite(held) and train != 0:
                parts.append(f"{name}: held-out {format_value(held)} vs training {format_value(train)} nats per cell "
                             f"({(held - train) / abs(train):+.1%})")
        if parts:
            section.add_paragraph("Held-out cells compared with training cells, per modality: "
                                  + "; ".join(parts) + ".")
    else:
        section.add_note("No reconstruction numbers were given (reconstruction=).")
    return section


def _cross_modal_section(cross: pd.DataFrame | None, description: str | None) -> Section:
    section = Section("Cross-modal prediction", _TEXT["cross"])
    if description:
        section.add_paragraph(description)
    if cross is None or len(cross) == 0:
        return section.add_note("Skipped: no cross-modal prediction was given (cross_modal=).")
    required = {"prediction", "features", "metric", "model", "baseline_feature_mean"}
    missing = sorted(required - set(cross.columns))
    if missing:
        raise ValueError(f"cross_modal needs the columns {sorted(required)}; missing {missing}.")
    table = cross.rename(columns={"baseline_feature_mean": "baseline: feature mean",
                                  "baseline_feature_mean_by_batch": "baseline: feature mean in batch"})
    section.add_table(table, caption="Held-out cells, each embedded from the other modality only.",
                      formatters={c: (lambda v: f"{_num(v):.3f}") for c in table.columns
                                  if c in ("model", "baseline: feature mean", "baseline: feature mean in batch")})
    sentences = []
    for r in cross.itertuples():
        model, base = _num(r.model), _num(r.baseline_feature_mean)
        text = (f"{r.prediction} on {r.features}: {r.metric} {model:.3f} for the model, "
                f"{base:.3f} for the feature mean ({model - base:+.3f})")
        by_batch = _num(getattr(r, "baseline_feature_mean_by_batch", np.nan))
        if np.isfinite(by_batch):
            text += f", {by_batch:.3f} for the feature mean within the batch ({model - by_batch:+.3f})"
        sentences.append(text + ".")
    section.add_paragraph(" ".join(sentences))
    return section


def _term_text(row, prefix: str) -> str:
    term = str(row.get(f"{prefix}_term", "") or "")
    if not term:
        return ""
    description = str(row.get(f"{prefix}_description", "") or "")
    label = term if not description or description == term else f"{description} ({term})"
    direction = str(row.get(f"{prefix}_direction", "") or "")
    padj = _num(row.get(f"{prefix}_padj"))
    details = ", ".join(x for x in (direction, f"padj {format_value(padj, pvalue=True)}" if np.isfinite(padj) else "")
                        if x)
    return f"{label} [{details}]" if details else label


def _features_section(feature_table: pd.DataFrame | None, annotations: Mapping[str, str], alpha: float,
                      n_top: int) -> Section:
    section = Section("Features in both modalities", _TEXT["features"])
    if feature_table is None or len(feature_table) == 0:
        return section.add_note("Skipped: no per-feature table was given (feature_table=).")
    if "feature" not in feature_table.columns:
        raise ValueError("feature_table needs a 'feature' column.")
    df = feature_table.copy()
    pcols = [f"{p}_padj" for p in annotations if f"{p}_padj" in df.columns]
    if not pcols:
        raise ValueError(f"feature_table has none of the columns {[f'{p}_padj' for p in annotations]}.")
    scores = df[pcols].apply(pd.to_numeric, errors="coerce")
    df["_best"] = scores.min(axis=1)
    n_each = {annotations[c[:-5]]: int((scores[c] <= alpha).sum()) for c in pcols}
    shown = df[df["_best"] <= alpha].sort_values(["_best", "feature"], kind="stable").head(n_top)
    if shown.empty:
        section.add_note(f"No feature has a term with adjusted p <= {alpha:g} in any modality.")
        return section
    rows = []
    for _, r in shown.iterrows():
        row = {"feature": r["feature"]}
        if "active_cells" in df.columns:
            row["active cells"] = int(r["active_cells"])
        if "cell_types" in df.columns:
            row["mostly in"] = r["cell_types"]
        for prefix, label in annotations.items():
            row[f"best {label} term"] = _term_text(r, prefix)
        rows.append(row)
    section.add_table(pd.DataFrame(rows), caption=(
        f"The {len(rows)} features with the smallest adjusted p-value in either modality "
        f"(threshold {alpha:g})."))
    counts = ", ".join(f"{n} of {len(df)} features have a {label} term" for label, n in n_each.items())
    prefixes = [p for p in annotations if f"{p}_term" in df.columns]
    agree = ""
    if len(prefixes) == 2:
        a, b = (df[f"{p}_term"].fillna("").astype(str) for p in prefixes)
        same = int(((a == b) & (a != "")).sum())
        agree = (f"; for {same} feature(s) the best {annotations[prefixes[0]]} term and the best "
                 f"{annotations[prefixes[1]]} term have the same ID")
    section.add_paragraph(counts[:1].upper() + counts[1:] + agree + ".")
    return section


def _changed(genes: pd.DataFrame) -> tuple[int, int]:
    direction = genes["direction"] if "direction" in genes.columns else pd.Series(dtype=object)
    return int((direction == "up").sum()), int((direction == "down").sum())


def _steering_section(steering: Mapping | None, names: Mapping[str, str], description: str | None,
                      feature_table: pd.DataFrame | None, annotations: Mapping[str, str], n_features: int,
                      alpha: float, dpi: int) -> Section:
    section = Section("Steering in both modalities", _TEXT["steering"])
    if not steering:
        return section.add_note("Skipped: no steering results were given (steering=).")
    results = dict(steering)
    first = next(iter(results.values()))
    feature = getattr(first, "feature", None)
    n_cells = len(getattr(first, "cells", []))
    mode = getattr(first, "mode", "")
    verb = "switched off" if mode == "ablate" else f"changed ({mode})"
    parts = []
    for modality, r in results.items():
        up, down = _changed(r.genes)
        label = names.get(modality, "features")
        text = f"{modality}: {down} {label} down and {up} up of {len(r.genes):,}"
        control = getattr(r, "control", None)
        if control is not None:
            c_up, c_down = _changed(control.genes)
            text += f" (one random direction of the same length: {c_up + c_down} changed)"
        parts.append(text)
    what = f"Feature {feature}"
    if feature_table is not None and "feature" in feature_table.columns:
        rows = feature_table[feature_table["feature"].astype(str) == str(feature)]
        if len(rows):
            terms = [f"{label} term {_term_text(rows.iloc[0], prefix)}" for prefix, label in annotations.items()
                     if str(rows.iloc[0].get(f"{prefix}_term", "") or "")]
            if terms:
                what += " (best " + "; best ".join(terms) + ")"
    section.add_paragraph(f"{what} was {verb} in {n_cells:,} cells. " + "; ".join(parts) + ".")
    if description:
        section.add_paragraph(description)
    fig = Figure(figsize=(5.4 * len(results), 1.0 + 0.22 * 2 * n_features), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(results)))
    for ax, (modality, r) in zip(axes, results.items()):
        pl.steering_lfc(ev.as_lfc_series(r.genes), n_up=n_features, n_down=n_features, ax=ax,
                        title=f"{modality}: {names.get(modality, 'features')}")
    kinds = " and ".join(names.get(m, "features") for m in results)
    section.add_figure(fig, dpi=dpi, caption=(
        f"The {n_features} most increased and most decreased {kinds} (log2 fold change of the expected values, "
        "steered / original, averaged over the cells)."))
    tables = []
    for modality, r in results.items():
        tests = getattr(r, "gene_set_tests", None)
        if tests is None or len(tests) == 0:
            continue
        t = tests.copy()
        t.insert(0, "modality", modality)
        tables.append(t)
    if tables:
        t = pd.concat(tables, ignore_index=True)
        keep = [c for c in ("modality", "term", "description", "set_size", "mean_log2fc", "pval", "padj", "direction")
                if c in t.columns]
        classes = None
        if "padj" in t.columns:
            vals = pd.to_numeric(t["padj"], errors="coerce").to_numpy()
            classes = ["" if np.isfinite(v) and v <= alpha else "muted" for v in vals]
        section.add_table(t[keep], row_classes=classes, caption=(
            "Each set's mean log2 fold change against the control edits (empirical p, BH over the sets of the "
            f"modality); grey rows have padj > {alpha:g}."))
    else:
        section.add_note("No set-level tests were given (the steering results have no gene_set_tests).")
    return section


def multiome_sections(
    *,
    modalities: Mapping[str, Mapping],
    reconstruction: Mapping[str, Mapping] | None = None,
    cross_modal: pd.DataFrame | None = None,
    feature_table: pd.DataFrame | None = None,
    annotations: Mapping[str, str] | None = None,
    steering: Mapping | None = None,
    steering_names: Mapping[str, str] | None = None,
    steering_description: str | None = None,
    cross_modal_description: str | None = None,
    alpha: float = 0.05,
    n_top_features: int = 10,
    n_steering_features: int = 10,
    dpi: int = 110,
) -> list[Section]:
    """The report sections of a run on several modalities, to pass as ``extra_sections`` to
    :func:`~dgdlens.report.build_report`.

    Parameters
    ----------
    modalities
        ``{modality: {"features": n, "likelihood": "nb" | "poisson" | "binary", "weight": w}}`` in model
        order (e.g. from ``model.params["modalities"]``).
    reconstruction
        ``{modality: {"training": nll, "held_out": nll}}``: NLL per cell in each modality (e.g.
        ``model.get_reconstruction_error(..., modality=...)``).
    cross_modal
        One row per score: ``prediction`` (e.g. ``"RNA -> ATAC"``), ``features`` (which features were scored),
        ``metric``, ``model``, ``baseline_feature_mean`` and optionally ``baseline_feature_mean_by_batch``.
    feature_table
        One row per SAE feature: ``feature``, optionally ``active_cells`` and ``cell_types``, and for every
        prefix of ``annotations`` the best significant term as ``{prefix}_term``, ``{prefix}_description``,
        ``{prefix}_direction``, ``{prefix}_padj`` (empty / NaN when none).
    annotations
        ``{column prefix: name in the text}``; default ``{"rna": "gene", "peaks": "peak"}``.
    steering
        ``{modality: dgdlens.steer.SteerResult}`` of one edit decoded by each modality's head.
    steering_names
        ``{modality: what its features are called}``; default ``{"rna": "genes", "atac": "peaks"}``.
    steering_description
        An extra paragraph for the steering section (e.g. which cells and why).
    cross_modal_description
        An extra paragraph for the cross-modal section (e.g. what the other modality can tell in these data).
    alpha
        Threshold for adjusted p-values.
    n_top_features, n_steering_features
        Rows of the feature table; bars per direction in each steering panel.
    dpi
        Resolution of the figure.

    Returns
    -------
    list of Section
        "Modalities and held-out reconstruction", "Cross-modal prediction", "Features in both modalities"
        and "Steering in both modalities" (a section whose input is missing holds a note saying so).
    """
    if not modalities:
        raise ValueError("modalities is empty; pass {modality: {'features': ..., 'likelihood': ...}}.")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}.")
    annotations = dict(annotations or {"rna": "gene", "peaks": "peak"})
    names = {"rna": "genes", "atac": "peaks", **dict(steering_names or {})}
    return [
        _modalities_section(modalities, reconstruction),
        _cross_modal_section(cross_modal, cross_modal_description),
        _features_section(feature_table, annotations, alpha, int(n_top_features)),
        _steering_section(steering, names, steering_description, feature_table, annotations,
                          int(n_steering_features), alpha, dpi),
    ]
