"""``build_report``: one self-contained HTML page summarising a dgdlens run for a biologist.

Every section is optional: the caller passes the pieces it has, and a section whose inputs are
missing is replaced by a one-line note saying what was not given. Each section opens with a
plain-language paragraph on what is shown and how to read it.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from matplotlib.figure import Figure

from .. import evaluate as ev
from .. import plotting as pl
from .. import tl
from .._version import __version__
from ..sae.activations import activation_summary
from .html import Report, Section, format_value

__all__ = ["build_report", "rank_features", "REQUIRED_FEATURE_COLUMNS", "SAE_METRIC_DESCRIPTIONS"]

REQUIRED_FEATURE_COLUMNS = ("feature", "term")

SAE_METRIC_DESCRIPTIONS = {
    "fvu": "fraction of variance unexplained: how much of the latent vectors the SAE fails to "
           "reconstruct (0 = perfect)",
    "explained_variance": "fraction of variance explained (1 - FVU)",
    "mse": "mean squared reconstruction error",
    "cosine": "mean cosine similarity between a latent vector and its reconstruction (1 = same direction)",
    "l0": "average number of features active in a cell (smaller = sparser)",
    "dead_fraction": "share of features that are never active in any cell",
    "dense_fraction": "share of features active in a large share of cells (often less specific)",
    "n_features": "number of SAE features",
    "n_live": "number of features active in at least one cell",
    "n_cells": "number of cells the numbers were computed on",
}
_METRIC_ALIASES = {
    "cosine_similarity": "cosine", "cos": "cosine", "dead": "dead_fraction", "frac_dead": "dead_fraction",
    "fraction_dead": "dead_fraction", "dense": "dense_fraction", "frac_dense": "dense_fraction",
    "fraction_dense": "dense_fraction", "r2": "explained_variance", "n_latents": "n_features",
    "mean_l0": "l0",
}
_MODE_VERBS = {
    "clamp": "set (clamped) to {value}",
    "add": "increased by {value}",
    "scale": "multiplied by {value}",
    "ablate": "switched off (set to zero)",
}

_TEXT = {
    "training": (
        "The model learns by adjusting its parameters, epoch after epoch (one epoch is one pass over the "
        "training cells), to make the observed data more probable. The loss measures how improbable the "
        "data still are under the model: lower is better. The blue curve is computed on the cells the "
        "model trains on, the red curve on held-out validation cells, which show whether what was learnt "
        "carries over to cells the model has not fitted. Both curves should fall and then level off; a "
        "validation curve that turns upwards while the training curve keeps falling means the model "
        "starts to memorise the training cells (overfitting). The dashed line marks the best epoch "
        "(by default the lowest validation loss), whose parameters were kept. Further panels, if "
        "present, show parts of the loss, e.g. 'recon' for how well the expression itself is "
        "reconstructed. A logarithmic axis is used when the loss spans more than a factor of ten."
    ),
    "umap": (
        "Each dot is a cell. The model summarises every cell by a short list of numbers, its latent "
        "representation; UMAP draws these in two dimensions so that cells with similar representations "
        "lie close together. Which cells sit together is meaningful; distances between separate groups "
        "and the size of a group on the map are not. In the panel coloured by mixture component, colour "
        "shows the component of the model's latent mixture (its built-in clustering) each cell belongs "
        "to most. In the panel coloured by the given labels, colour shows the cell annotation supplied "
        "with the data. If the model has captured the biology, cells with the same label gather in the "
        "same region, and components line up with labels."
    ),
    "contingency": (
        "Each row is one mixture component, each column one label. The colour of a square is the share "
        "of the component's cells that carry that label (every row adds up to 1); the number is the count "
        "of cells. A component that captures a single cell type has one dark square in its row. Rows are "
        "sorted by their most common label, so good agreement looks like a diagonal, and a label spread "
        "over several rows was split into several components (which can be real sub-types). Two scores "
        "sum up the agreement: the adjusted Rand index (ARI) and normalised mutual information (NMI), "
        "both 1 for identical groupings and close to 0 for unrelated ones. Unless the labels were used "
        "in training, they measure how well the model's own, unsupervised structure matches the "
        "annotation, which itself can be noisy."
    ),
    "sae": (
        "A sparse autoencoder (SAE) re-describes each cell's latent representation as a combination of "
        "a larger set of 'features', only a few of which are active in any one cell; the aim is that "
        "each feature stands for one recognisable biological programme or cell state. The table gives "
        "its quality: how much of the latent representation it fails to reconstruct (FVU; below about "
        "0.1 is good), how many features are active per cell on average (L0), and the share of features "
        "that never switch on (dead; they carry nothing). The histogram shows how often each feature is "
        "active, on a logarithmic axis: features to the far left fire in a handful of cells, features "
        "right of the dashed line in a large share of all cells."
    ),
    "features": (
        "To suggest what a feature stands for, the cells where it is most strongly active are compared "
        "with cells where it is silent. Genes clearly higher (direction 'up') or lower ('down') in the "
        "active cells are then tested for over-representation in curated gene sets, such as GO "
        "biological processes. The table lists the features with the strongest results and their best "
        "terms. 'overlap' is the number of the feature's changed genes that belong to the set (out of "
        "the set's size among the measured genes), 'odds ratio' how much more often set genes are "
        "among the changed genes than expected by chance, 'pval' the one-sided hypergeometric p-value "
        "and 'padj' that p-value corrected (Benjamini-Hochberg) over every feature and set tested together "
        "(the table's 'padj_global'), so the threshold bounds the expected share of false rows in the "
        "whole table; 'genes' are the changed genes in the set. Terms of one feature that share most of "
        "these genes (nested GO terms) are shown once, under the most specific term, with the number of "
        "similar terms folded into it. A term is a hypothesis about the feature, not a proof. Grey rows "
        "do not pass the significance threshold."
    ),
    "feature_umap": (
        "Where are these features active? Each panel shows the same map of cells as above, coloured by "
        "one feature's activation: dark cells are silent, yellow cells strongly active. A feature that "
        "marks a cell type lights up one group of cells; a feature for a process shared by several cell "
        "types (for example cell division) lights up parts of several groups."
    ),
    "steering": (
        "Steering asks the model a 'what if' question: what would these cells look like if one feature "
        "were more (or less) active? The feature's activation is changed in each cell, the latent "
        "representation is moved by that change along the feature's direction (everything the SAE does "
        "not capture is kept), and the generative model turns the new representations into expected "
        "expression. The bars show the genes whose expected expression changed most between the "
        "steered and the original cells (red: up, blue: down, as log2 fold change). A gene counts as "
        "changed only when its change is larger than what the same edit along random directions of the "
        "same length typically does (an empirical p-value from at least 100 such control edits, corrected "
        "over genes); any move of the cells changes the decoded expression somewhat. The table lists "
        "gene sets over-represented among the changed genes. These are predictions of the model, a "
        "way to form hypotheses, not measurements."
    ),
}


# --------------------------------------------------------------------------------------------- inputs

def _short_list(items: Sequence, limit: int) -> str:
    """``"a, b, c (+4 more)"``: a readable, bounded rendering of a long list."""
    items = [str(i) for i in items]
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f" (+{len(items) - limit} more)"


def _as_umap(umap) -> np.ndarray:
    """The ``umap=`` coordinates: cells x 2, finite, as float64."""
    arr = _to_numpy(umap, "umap", ndim=2).astype(np.float64)
    if arr.shape[1] != 2 or arr.shape[0] == 0:
        raise ValueError(f"umap must have shape (n_cells, 2) with at least one cell, got {arr.shape}.")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise ValueError(f"umap contains NaN or infinite values in {bad} cells; remove or recompute them.")
    return arr


def _to_numpy(x, name: str, *, ndim: int | None = None) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, possibly on a GPU
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}.")
    return arr


def _as_activations(activations):
    if activations is None:
        return None
    if sp.issparse(activations):
        if activations.ndim != 2:
            raise ValueError(f"activations must be 2-D (cells x features), got shape {activations.shape}.")
        return activations
    arr = _to_numpy(activations, "activations", ndim=2)
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"activations must be numeric, got dtype {arr.dtype}.")
    return arr


def _map_sample(n_cells: int | None, max_cells: int | None, seed: int) -> np.ndarray | None:
    """Sorted seeded sample of cells for the maps, or ``None`` when every cell is shown."""
    if max_cells is not None and int(max_cells) < 1:
        raise ValueError(f"max_map_cells must be a positive integer or None, got {max_cells}.")
    if n_cells is None or max_cells is None or n_cells <= max_cells:
        return None
    return np.sort(np.random.default_rng([seed, 17]).choice(n_cells, int(max_cells), replace=False))


def _take(values, rows: np.ndarray | None):
    """``values`` restricted to ``rows`` (arrays, sparse matrices, Series, Categoricals); ``None`` stays."""
    if values is None or rows is None:
        return values
    if isinstance(values, pd.Series):
        return values.iloc[rows]
    return values[rows]


def _check_cell_counts(**inputs) -> int | None:
    """All per-cell inputs must describe the same cells; return their number."""
    sizes = {name: int(v.shape[0]) for name, v in inputs.items() if v is not None}
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(f"per-cell inputs disagree on the number of cells ({listing}); "
                         "pass them for the same cells in the same order.")
    return next(iter(sizes.values()), None)


def _get(obj, key: str, default=None):
    """Read a key from a mapping or an attribute from a result object."""
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _scalar(value):
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 0) == 0 else value


def _software_versions(used_scanpy: bool) -> dict[str, str]:
    from importlib import metadata

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"

    versions = {"dgdlens": __version__, "python": platform.python_version()}
    for dist in ("numpy", "pandas", "matplotlib"):
        versions[dist] = version(dist)
    # Only what this run actually loaded: listing torch or scanpy when they were not used would mislead.
    for dist in ("torch", "scanpy", "anndata"):
        if dist in sys.modules and (dist != "scanpy" or used_scanpy):
            versions[dist] = version(dist)
    versions["created (UTC)"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    return versions


def _lines(text) -> list[str]:
    if text is None:
        return []
    if isinstance(text, str):
        return [text]
    return [str(t) for t in text]


def _short(text, limit: int) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


# --------------------------------------------------------------------------------------------- sections

def _training_section(history, best_epoch, dpi: int) -> Section:
    section = Section("Training", _TEXT["training"])
    if history is None:
        return section.add_note("Skipped: no training history was given (history=).")
    df = history if isinstance(history, pd.DataFrame) else pd.DataFrame(dict(history))
    metrics = ev.history_metrics(df)
    if best_epoch == "auto":
        best_epoch = ev.find_best_epoch(df)
    fig = pl.training_curves(df, best_epoch=best_epoch)
    facts = []
    loss = metrics.get("loss", next(iter(metrics.values())))
    for split, label in (("train", "training"), ("val", "validation")):
        if split in loss:
            values = pd.to_numeric(df[loss[split]], errors="coerce").dropna()
            if len(values):
                facts.append(f"final {label} loss {format_value(float(values.iloc[-1]))}")
    n_epochs = len(df)
    if best_epoch is not None:
        facts.append(f"best epoch {best_epoch} of {n_epochs}")
    else:
        facts.append(f"{n_epochs} epochs")
    section.add_figure(fig, caption="Loss per epoch: " + "; ".join(facts) + ".", dpi=dpi)
    return section


def _umap_section(coords, umap_note, clusters, labels, labels_name, dpi) -> Section:
    section = Section("Latent space", _TEXT["umap"])
    if coords is None:
        return section.add_note("Skipped: neither a latent representation (latent=) nor UMAP "
                                "coordinates (umap=) were given.")
    panels = [(clusters, "mixture component")] if clusters is not None else []
    if labels is not None:
        panels.append((labels, labels_name))
    fig = Figure(figsize=(5.6 * max(len(panels), 1), 4.4), layout="constrained")
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False).ravel()
    if not panels:
        pl.embedding(coords, ax=axes[0], title="cells")
    for axis, (values, name) in zip(axes, panels):
        n_categories = pd.Series(np.asarray(values, dtype=object)).nunique(dropna=True)
        pl.embedding(coords, color=values, categorical=True, ax=axis, title=name,
                     legend_loc="right margin" if n_categories <= 40 else "on data")
    caption = f"{coords.shape[0]:,} cells. {umap_note}"
    section.add_figure(fig, caption=caption, dpi=dpi)
    missing = [n for v, n in ((clusters, "mixture components (clusters=)"), (labels, "labels (labels=)"))
               if v is None]
    if missing:
        section.add_note("Not shown: no " + " and no ".join(missing) + " given.")
    return section


def _contingency_section(clusters, labels, labels_name, dpi) -> Section:
    section = Section("Mixture components and labels", _TEXT["contingency"])
    if clusters is None or labels is None:
        missing = [n for v, n in ((clusters, "mixture components (clusters=)"), (labels, "labels (labels=)"))
                   if v is None]
        return section.add_note("Skipped: no " + " and no ".join(missing) + " given.")
    scores = ev.cluster_agreement(clusters, labels)
    fig = pl.contingency_heatmap(clusters, labels, label_name=labels_name)
    n_total = len(clusters)
    left_out = n_total - scores["n_cells"]
    caption = (f"ARI = {scores['ari']:.3f}, NMI = {scores['nmi']:.3f} over {scores['n_cells']:,} cells"
               + (f" ({left_out:,} cells without a label or component left out)." if left_out else "."))
    section.add_figure(fig, caption=caption, dpi=dpi)
    return section


def _sae_section(sae_metrics, activations, dpi) -> Section:
    section = Section("Sparse autoencoder quality", _TEXT["sae"])
    if sae_metrics is None and activations is None:
        return section.add_note("Skipped: neither SAE metrics (sae_metrics=) nor activations "
                                "(activations=) were given.")
    given = {}
    for key, value in dict(sae_metrics or {}).items():
        canonical = _METRIC_ALIASES.get(str(key).lower(), str(key).lower())
        given[canonical] = _scalar(value)
    derived = activation_summary(activations) if activations is not None else {}
    filled = [k for k in derived if k not in given]
    rows = []
    for key in list(SAE_METRIC_DESCRIPTIONS) + [k for k in given if k not in SAE_METRIC_DESCRIPTIONS]:
        if key in given or key in derived:
            value = given.get(key, derived.get(key))
            rows.append({"metric": key.replace("_", " "), "value": format_value(value),
                         "meaning": SAE_METRIC_DESCRIPTIONS.get(key, "")})
    caption = None
    if filled:
        caption = ("Computed here from the activations (activation > 0 counts as active; dense: active "
                   f"in more than 10% of cells): {', '.join(k.replace('_', ' ') for k in filled)}.")
    section.add_table(pd.DataFrame(rows), caption=caption, numeric_align=False)
    if "fvu" not in given:
        section.add_note("FVU not shown: it needs the SAE's reconstructions; pass it in sae_metrics=.")
    if activations is not None:
        fig = pl.activation_frequency(activations)
        section.add_figure(fig, caption=f"How often each of the {activations.shape[1]:,} features is active "
                                        f"across {activations.shape[0]:,} cells.", dpi=dpi)
    return section


def _check_features(features) -> pd.DataFrame:
    if not isinstance(features, pd.DataFrame):
        raise ValueError(f"features must be a pandas DataFrame (the annotation table), got {type(features).__name__}.")
    missing = [c for c in REQUIRED_FEATURE_COLUMNS if c not in features.columns]
    if missing or not ({"padj", "pval"} & set(features.columns)):
        raise ValueError(
            "features needs the columns 'feature', 'term' and 'padj' (or 'pval'); missing: "
            f"{missing + ([] if {'padj', 'pval'} & set(features.columns) else ['padj'])}. "
            f"Got {list(features.columns)}."
        )
    return features


def _score_column(df: pd.DataFrame) -> str:
    """The adjusted p-value the lens filters on: the global BH (``padj_global``) when present."""
    return next(c for c in ("padj_global", "padj", "pval") if c in df.columns)


def _collapse_redundant(features: pd.DataFrame) -> pd.DataFrame:
    """The annotation table without rows folded into a more specific term (``dgdlens.lens.collapse``);
    tables without the needed columns are returned unchanged."""
    if "collapsed_into" not in features.columns:
        if not {"genes", "significant", "set_size"} <= set(features.columns):
            return features
        from ..lens import mark_redundant

        features = mark_redundant(features)
    return features[features["collapsed_into"].fillna("").astype(str) == ""]


def rank_features(features: pd.DataFrame) -> pd.DataFrame:
    """One row per feature with its best (lowest) adjusted p-value, best first.

    Parameters
    ----------
    features
        The annotation table (e.g. from :func:`dgdlens.tl.annotate_features`): a ``feature`` column and one
        of ``padj_global``, ``padj`` or ``pval`` (the first present is used), any number of rows per
        feature.

    Returns
    -------
    pandas.DataFrame
        Columns ``feature`` and ``best`` (the feature's smallest p-value), sorted ascending (stable, so
        ties keep the table's order). Raises ``ValueError`` if the p-value column holds no numbers.
    """
    score = _score_column(features)
    df = features.assign(_score=pd.to_numeric(features[score], errors="coerce"))
    if df["_score"].isna().all():
        raise ValueError(f"features[{score!r}] holds no numbers.")
    best = df.groupby("feature", sort=False)["_score"].min()
    return best.sort_values(kind="stable").rename("best").reset_index()


def _term_label(row) -> str:
    """A term's readable name: ``"description (ID)"`` when the table has descriptions (GO IDs alone
    mean nothing to a reader), else the term as given."""
    term = str(row["term"])
    description = row.get("description") if hasattr(row, "get") else None
    if description is None or (isinstance(description, float) and np.isnan(description)):
        return term
    description = str(description).strip()
    return term if not description or description == term else f"{description} ({term})"


def _gene_text(genes, limit: int = 12) -> str:
    if genes is None or (isinstance(genes, float) and np.isnan(genes)):
        return ""
    if isinstance(genes, str):
        parts = [g for g in genes.replace(";", ",").replace("|", ",").split(",") if g.strip()]
        items = [g.strip() for g in parts] if len(parts) > 1 else genes.split()
    else:
        items = [str(g) for g in genes]
    return _short_list(items, limit)


def _features_section(features, alpha, n_top_features, terms_per_feature):
    section = Section("Annotated features", _TEXT["features"])
    if features is None:
        return section.add_note("Skipped: no feature annotation table was given (features=)."), []
    features = _check_features(features)
    if len(features) == 0:
        return section.add_note("No feature was annotated: the annotation table is empty."), []
    features = _collapse_redundant(features)
    score = _score_column(features)
    ranking = rank_features(features)
    top = ranking.head(n_top_features)["feature"].tolist()
    df = features.assign(_score=pd.to_numeric(features[score], errors="coerce"))
    sort_cols = ["_score"] + (["pval"] if "pval" in df.columns and score != "pval" else [])
    rows, classes = [], []
    for feat in top:
        block = df[df["feature"] == feat].sort_values(sort_cols, kind="stable").head(terms_per_feature)
        for i, (_, r) in enumerate(block.iterrows()):
            row = {"feature": r["feature"], "term": _term_label(r)}
            n_similar = int(_scalar(r["n_collapsed"])) if "n_collapsed" in df.columns else 0
            if n_similar:
                row["term"] += f" (+{n_similar} similar)"
            if "direction" in df.columns:
                row["direction"] = r["direction"]
            if "overlap" in df.columns:
                overlap = format_value(_scalar(r["overlap"]))
                row["overlap"] = (f"{overlap} / {format_value(_scalar(r['set_size']))}"
                                  if "set_size" in df.columns else overlap)
            if "odds_ratio" in df.columns:
                row["odds ratio"] = float(_scalar(r["odds_ratio"]))
            for col in ("pval", score if score != "pval" else "padj"):
                if col in df.columns:
                    row["padj" if col == "padj_global" else col] = r[col]
            if "genes" in df.columns:
                row["genes"] = _gene_text(r["genes"])
            rows.append(row)
            significant = bool(r["_score"] <= alpha) if np.isfinite(r["_score"]) else False
            classes.append(" ".join(c for c in ("group-start" if i == 0 else "",
                                                  "" if significant else "muted") if c))
    n_sig = int((ranking["best"] <= alpha).sum())
    section.add_table(
        pd.DataFrame(rows), row_classes=classes,
        caption=(f"{n_sig:,} of {len(ranking):,} annotated features have at least one term with "
                 f"{score} <= {alpha:g}. Showing the top {len(top)} features, up to {terms_per_feature} "
                 "terms each; long gene lists are shortened."),
    )
    return section, top


def _feature_columns(ids: Sequence, feature_names, n_columns: int) -> dict:
    """Map feature identifiers from the annotation table to activation columns (unmappable ones dropped)."""
    lookup = {str(name): i for i, name in enumerate(feature_names)} if feature_names is not None else None
    columns = {}
    for fid in ids:
        if lookup is not None:
            col = lookup.get(str(fid))
        else:
            try:
                col = int(fid)
                col = col if float(fid) == col else None
            except (TypeError, ValueError):
                col = None
        if col is not None and 0 <= col < n_columns:
            columns[fid] = col
    return columns


def _feature_umap_section(coords, activations, features, top_ids, feature_names, n_panels, dpi):
    section = Section("Feature activity on the map", _TEXT["feature_umap"])
    if coords is None or activations is None:
        missing = [n for v, n in ((coords, "latent=/umap="), (activations, "activations=")) if v is None]
        return section.add_note("Skipped: no " + " and no ".join(missing) + " given.")
    n_columns = activations.shape[1]
    if feature_names is not None and len(feature_names) != n_columns:
        raise ValueError(f"feature_names has {len(feature_names)} entries but activations has "
                         f"{n_columns} columns.")
    columns = _feature_columns(top_ids, feature_names, n_columns)
    chosen = list(columns.items())[:n_panels]
    if chosen:
        best_terms = {}
        score = _score_column(features)
        for fid, _ in chosen:
            rows = features[features["feature"] == fid]
            best = rows.iloc[int(np.argmin(pd.to_numeric(rows[score], errors="coerce").fillna(np.inf)))]
            direction = f" ({best['direction']})" if "direction" in features.columns else ""
            has_name = "description" in features.columns and pd.notna(best["description"])
            name = best["description"] if has_name else best["term"]
            # Two short lines: a long term on one line overflows its panel into the neighbours'.
            best_terms[fid] = (direction, _short(name, 34))
        titles = [f"feature {fid}{best_terms[fid][0]}\n{best_terms[fid][1]}" for fid, _ in chosen]
        caption = "The best-annotated features, each titled with its top term."
    else:
        # No usable annotation: show the features carrying the most total activation instead.
        totals = np.asarray(activations.sum(axis=0)).ravel()
        order = np.argsort(-totals, kind="stable")[:n_panels]
        order = [int(i) for i in order if totals[i] > 0]
        if not order:
            return section.add_note("No feature is active in any cell; nothing to show.")
        names = list(feature_names) if feature_names is not None else list(range(n_columns))
        chosen = [(names[i], i) for i in order]
        titles = [f"feature {fid}" for fid, _ in chosen]
        caption = ("The features with the largest total activation" +
                   (" (the annotation table's features could not be matched to activation columns)."
                    if features is not None else " (no annotation table was given)."))
    fig = pl.feature_activations(coords, activations, [c for _, c in chosen], titles=titles)
    section.add_figure(fig, caption=caption, dpi=dpi)
    return section


def _steering_section(steering, features, alpha, n_genes, n_terms, dpi) -> Section:
    section = Section("Steering a feature", _TEXT["steering"])
    if steering is None:
        return section.add_note("Skipped: no steering result was given (steering=).")
    lfc = _get(steering, "lfc")
    if lfc is None:  # a dgdlens.steer.SteerResult: per-gene table with 'gene' and 'log2fc' columns
        lfc = _get(steering, "genes")
    if lfc is None:
        raise ValueError("steering needs 'lfc': per-gene log fold changes (a pandas Series indexed by gene).")
    lfc = ev.as_lfc_series(lfc)
    feature, mode, value = _get(steering, "feature"), _get(steering, "mode"), _get(steering, "value")
    n_cells = _get(steering, "n_cells")
    if n_cells is None and _get(steering, "cells") is not None:
        n_cells = len(_get(steering, "cells"))
    what = f"Feature {feature}" if feature is not None else "The feature"
    if features is not None and feature is not None and "feature" in features.columns:
        rows = features[features["feature"].astype(str) == str(feature)]
        if len(rows):
            score = _score_column(rows)
            best = rows.iloc[int(np.argmin(pd.to_numeric(rows[score], errors="coerce").fillna(np.inf)))]
            what += f" (top term: {_term_label(best)})"
    verb = _MODE_VERBS.get(str(mode), f"changed ({mode} {value})" if mode else "changed")
    sentence = f"{what} was {verb.format(value=format_value(_scalar(value)))}"
    sentence += f" in {int(n_cells):,} cells." if n_cells is not None else "."
    section.add_paragraph(sentence)
    description = _get(steering, "description")
    if description:
        section.add_paragraph(str(description))
    fig = pl.steering_lfc(lfc, n_up=n_genes, n_down=n_genes)
    up, down = ev.top_changed_genes(lfc, n_up=n_genes, n_down=n_genes)
    section.add_figure(fig, dpi=dpi, caption=(
        f"The {len(up)} most increased and {len(down)} most decreased of {len(lfc):,} genes."))
    enrichment = _get(steering, "enrichment")
    if enrichment is None:
        section.add_note("No enrichment of the changed genes was given (steering['enrichment']).")
    elif not isinstance(enrichment, pd.DataFrame):
        raise ValueError(f"steering['enrichment'] must be a DataFrame, got {type(enrichment).__name__}.")
    elif len(enrichment) == 0:
        section.add_note("No gene set was tested for the changed genes (empty enrichment table).")
    else:
        score = next((c for c in ("padj", "pval") if c in enrichment.columns), None)
        table = enrichment.sort_values(score, kind="stable") if score else enrichment
        table = table.head(n_terms)
        keep = [c for c in ("term", "direction", "overlap", "set_size", "odds_ratio", "pval", "padj", "genes")
                if c in table.columns] or list(table.columns)
        shown = table[keep].copy()
        if "description" in table.columns and "term" in shown.columns:
            shown["term"] = [_term_label(r) for _, r in table.iterrows()]
        if "genes" in shown.columns:
            shown["genes"] = [_gene_text(g) for g in shown["genes"]]
        classes = None
        if score:
            vals = pd.to_numeric(table[score], errors="coerce").to_numpy()
            classes = ["" if np.isfinite(v) and v <= alpha else "muted" for v in vals]
            n_sig = int(np.sum(np.isfinite(vals) & (vals <= alpha)))
            caption = (f"Top {len(table)} gene sets by {score}; {n_sig} with {score} <= {alpha:g} among those "
                       "shown (grey rows do not pass).")
        else:
            caption = f"First {len(table)} rows of the enrichment table."
        section.add_table(shown, row_classes=classes, caption=caption)
    return section


# --------------------------------------------------------------------------------------------- API

def build_report(
    path: str | os.PathLike,
    *,
    title: str = "dgdlens report",
    summary: Mapping | None = None,
    params: Mapping | None = None,
    history=None,
    best_epoch="auto",
    latent=None,
    umap=None,
    clusters=None,
    labels=None,
    labels_name: str | None = None,
    sae_metrics: Mapping | None = None,
    activations=None,
    feature_names: Sequence | None = None,
    features: pd.DataFrame | None = None,
    steering=None,
    attribution: str | Sequence[str] | None = None,
    notes: str | Sequence[str] | None = None,
    extra_sections: Sequence[Section] = (),
    alpha: float = 0.05,
    n_top_features: int = 10,
    terms_per_feature: int = 3,
    n_feature_panels: int = 6,
    n_steering_genes: int = 15,
    n_steering_terms: int = 10,
    umap_kwargs: Mapping | None = None,
    max_map_cells: int | None = 50_000,
    seed: int = 0,
    dpi: int = 110,
    overwrite: bool = True,
) -> Path:
    """Write a self-contained HTML report (all figures embedded as PNG, no external resources).

    Pass what you have; a section whose inputs are missing shows a short note instead.

    Parameters
    ----------
    path
        Output file (parent folders are created; written atomically).
    title
        Page title.
    summary
        Dataset summary shown in the header, e.g. ``{"cells": 700, "genes": 765, "latent
        dimensions": 20, "mixture components": 8}``. Default: what can be read off the inputs.
    params
        Run parameters shown in the header (any ``name: value`` mapping).
    history
        Training history, one row per epoch: ``epoch, train_loss, val_loss[, train_recon, ...]``
        (DataFrame or dict of columns). See :func:`dgdlens.plotting.training_curves`.
    best_epoch
        Epoch to mark (e.g. the one early stopping kept); ``"auto"`` = lowest ``val_loss``; ``None``.
    latent
        Cells x latent dimensions (numpy or torch); a UMAP is computed from it (scanpy, ``seed``)
        unless ``umap`` is given.
    umap
        Precomputed cells x 2 coordinates (takes precedence over computing one from ``latent``).
    clusters, labels
        One value per cell: the mixture component of each cell and the given annotation
        (missing labels allowed; those cells are left out of the comparison).
    labels_name
        Name of the labels in the text (default: the Series name, else ``"label"``).
    sae_metrics
        SAE quality numbers, e.g. the dict of ``dgdlens.sae.metrics``: ``fvu, mse, cosine, l0,
        dead_fraction, dense_fraction``; L0 and dead / dense fractions are computed from
        ``activations`` where missing.
    activations
        SAE activations, cells x features (numpy, scipy sparse or torch), for the same cells as the
        other per-cell inputs. Only a few columns are ever densified.
    feature_names
        Names of the activation columns, when ``features["feature"]`` holds names instead of
        column indices.
    features
        Feature annotation table (``dgdlens.lens.annotate``): columns ``feature, term`` and ``padj``
        (or ``pval``), optionally ``direction, overlap, set_size, pval, odds_ratio, genes``
        (``genes`` as a list or a comma/semicolon separated string).
    steering
        A mapping (or result object with these attributes): ``lfc`` (per-gene log2 fold changes,
        a Series indexed by gene, or a DataFrame with an ``lfc`` column), and optionally
        ``feature, mode ("clamp" | "add" | "scale" | "ablate"), value, n_cells, description,
        enrichment`` (a DataFrame like ``features``). A :class:`dgdlens.steer.SteerResult` works
        as it is (fold changes from its ``genes`` table, cell count from ``cells``).
    attribution
        Footer text, e.g. gene-set licences and sources (one string or several lines).
    notes
        Free text shown in the header (one string or several).
    extra_sections
        Additional :class:`Section` objects appended after the built-in ones.
    alpha
        Significance threshold for adjusted p-values in the tables.
    n_top_features, terms_per_feature, n_feature_panels, n_steering_genes, n_steering_terms
        Sizes of the tables and figures.
    umap_kwargs
        Options for :func:`dgdlens.tl.umap` (``n_neighbors``, ``min_dist``, ``metric``).
    max_map_cells
        With more cells than this, the maps (the UMAP and the feature-activity panels) show a seeded
        random sample of this many cells, and the caption says so: a UMAP of a million cells takes
        longer than the rest of a report and a scatter of them shows no more. ``None``: every cell.
        Tables and the cluster/label comparison always use every cell.
    seed
        Seed of the UMAP computation and of the map's cell sample.
    dpi
        Resolution of the embedded figures.
    overwrite
        Replace an existing file (default) or raise ``FileExistsError``.

    Returns
    -------
    The path written.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}.")
    for name, value in (("n_top_features", n_top_features), ("terms_per_feature", terms_per_feature),
                        ("n_feature_panels", n_feature_panels), ("n_steering_genes", n_steering_genes),
                        ("n_steering_terms", n_steering_terms)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    for name, value in (("summary", summary), ("params", params), ("sae_metrics", sae_metrics)):
        if value is not None and not isinstance(value, Mapping):
            raise ValueError(f"{name} must be a dict (name -> value), got {type(value).__name__}.")
    for i, section in enumerate(extra_sections):
        if not isinstance(section, Section):
            raise ValueError(f"extra_sections[{i}] must be a dgdlens.report.Section, got {type(section).__name__}.")

    if labels_name is None:
        labels_name = str(labels.name) if isinstance(labels, pd.Series) and labels.name is not None else "label"
    latent_arr = _to_numpy(latent, "latent", ndim=2) if latent is not None else None
    umap_arr = _as_umap(umap) if umap is not None else None
    clusters_arr = ev.as_vector(clusters, "clusters") if clusters is not None else None
    labels_vec = labels if isinstance(labels, (pd.Series, pd.Categorical)) else (
        ev.as_vector(labels, "labels") if labels is not None else None)
    activations = _as_activations(activations)
    if features is not None:
        _check_features(features)
    n_cells = _check_cell_counts(latent=latent_arr, umap=umap_arr, clusters=clusters_arr,
                                 labels=np.empty(len(labels_vec)) if labels_vec is not None else None,
                                 activations=activations)

    shown = _map_sample(n_cells, max_map_cells, seed)
    used_scanpy = False
    if umap_arr is not None:
        coords, umap_note = _take(umap_arr, shown), "UMAP coordinates as supplied."
    elif latent_arr is not None:
        options = {"n_neighbors": 15, "min_dist": 0.5, **dict(umap_kwargs or {})}
        coords = tl.umap(_take(latent_arr, shown), seed=seed, **options)
        used_scanpy = True
        umap_note = (f"UMAP of the {latent_arr.shape[1]}-dimensional latent representation (scanpy; "
                     f"{options['n_neighbors']} neighbours, min_dist {options['min_dist']}, seed {seed}).")
    else:
        coords, umap_note = None, ""
    if shown is not None and coords is not None:
        umap_note += (f" Shown: a seeded random sample of {len(shown):,} of the {n_cells:,} cells "
                      "(max_map_cells).")

    report = Report(title)
    if summary is None:
        summary = {"cells": n_cells}
        if latent_arr is not None:
            summary["latent dimensions"] = latent_arr.shape[1]
        if clusters_arr is not None:
            summary["mixture components (with cells)"] = int(pd.Series(clusters_arr).nunique())
        if labels_vec is not None:
            summary[f"{labels_name} categories"] = int(pd.Series(np.asarray(labels_vec, dtype=object)).nunique())
        if activations is not None:
            summary["SAE features"] = activations.shape[1]
        summary = {k: v for k, v in summary.items() if v is not None}
    report.add_header_block("Dataset", summary)
    report.add_header_block("Run parameters", dict(params or {}))
    report.add_header_block("Software", _software_versions(used_scanpy))
    for note in _lines(notes):
        report.add_header_note(note)

    report.add_section(_training_section(history, best_epoch, dpi))
    report.add_section(_umap_section(coords, umap_note, _take(clusters_arr, shown), _take(labels_vec, shown),
                                     labels_name, dpi))
    report.add_section(_contingency_section(clusters_arr, labels_vec, labels_name, dpi))
    report.add_section(_sae_section(sae_metrics, activations, dpi))
    features_section, top_ids = _features_section(features, alpha, n_top_features, terms_per_feature)
    report.add_section(features_section)
    report.add_section(_feature_umap_section(coords, _take(activations, shown), features, top_ids, feature_names,
                                             n_feature_panels, dpi))
    report.add_section(_steering_section(steering, features, alpha, n_steering_genes, n_steering_terms, dpi))
    for section in extra_sections:
        report.add_section(section)

    for line in _lines(attribution):
        report.add_footer(line)

    report.add_footer(f"Made with dgdlens {__version__}. This file is "
                      "self-contained: every figure is embedded, and it opens without a network connection.")
    return report.write(path, overwrite=overwrite)
