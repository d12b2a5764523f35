"""Training curves: train / validation loss per epoch from a history table."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..evaluate import as_history, find_best_epoch, history_epochs, history_metrics

__all__ = ["training_curves"]

_SPLITS = {"train": ("#1f77b4", "training"), "val": ("#d62728", "validation")}


def _use_log(values: Sequence[np.ndarray]) -> bool:
    """Log scale helps when all values are positive and span more than a factor of 10."""
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.empty(0)
    return finite.size > 1 and bool((finite > 0).all()) and finite.max() / finite.min() >= 10.0


def training_curves(
    history,
    *,
    metrics: Sequence[str] | None = None,
    best_epoch="auto",
    log_scale: bool | str = "auto",
    ax: Axes | None = None,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Plot training and validation curves per epoch.

    Parameters
    ----------
    history
        DataFrame (``model.history_``), dict of columns or list of per-epoch dicts, one row per
        epoch: an optional ``epoch`` column and ``train_<metric>`` / ``val_<metric>`` columns (e.g. ``train_loss, val_loss, train_recon,
        val_recon``). NaN entries (epochs without validation) are skipped.
    metrics
        Metrics to draw, one panel each (default: all, ``loss`` first). With ``ax`` only the first
        metric is drawn.
    best_epoch
        Epoch to mark with a dashed line (e.g. the one early stopping kept). ``"auto"``: the epoch
        with the lowest ``val_loss`` when that column exists; ``None``: no mark.
    log_scale
        ``True``, ``False`` or ``"auto"`` (log when values are positive and span a factor >= 10).
    ax
        Draw on this axes instead of creating a figure.

    Returns
    -------
    matplotlib.figure.Figure
        The figure drawn on (``ax.figure`` when ``ax`` is given).
    """
    df = as_history(history)
    groups = history_metrics(df)
    if metrics is not None:
        missing = [m for m in metrics if m not in groups]
        if missing:
            raise ValueError(f"metrics {missing} not in history; available: {list(groups)}.")
        groups = {m: groups[m] for m in metrics}
    if ax is not None:
        groups = dict(list(groups.items())[:1])
    if best_epoch == "auto":
        best_epoch = find_best_epoch(df)
    if log_scale not in (True, False, "auto"):
        raise ValueError(f"log_scale must be True, False or 'auto', got {log_scale!r}.")
    epochs = history_epochs(df)

    if ax is None:
        n = len(groups)
        fig = Figure(figsize=figsize or (4.6 * n, 3.4), layout="constrained")
        axes = list(np.atleast_1d(fig.subplots(1, n, squeeze=False)).ravel())
    else:
        fig, axes = ax.figure, [ax]

    for axis, (metric, cols) in zip(axes, groups.items()):
        drawn = []
        for split, col in cols.items():
            color, label = _SPLITS[split]
            y = df[col].to_numpy(dtype=np.float64)
            keep = np.isfinite(y)
            if not keep.any():
                continue
            axis.plot(epochs[keep], y[keep], color=color, lw=1.6, label=label,
                      marker="o" if keep.sum() <= 30 else None, ms=3)
            drawn.append(y[keep])
        if (log_scale == "auto" and _use_log(drawn)) or log_scale is True:
            axis.set_yscale("log")
        if best_epoch is not None:
            axis.axvline(best_epoch, color="0.3", ls="--", lw=1.0, label=f"best epoch ({best_epoch})")
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric.replace("_", " "))
        axis.set_title(metric.replace("_", " "))
        axis.grid(alpha=0.3, which="both", lw=0.5)
        if drawn:
            axis.legend(frameon=False, fontsize="small")
    return fig
