"""``train_sae``: train a sparse autoencoder on a cell embedding, through the shared training runner.

What happens, in order (see :class:`~dgdlens.sae.config.SAEConfig` for every knob):

1. The input is checked (2-D, finite) and split into training and validation cells by the one split
   policy of every model (:func:`dgdlens.data.split.train_validation_split`).
2. :class:`~dgdlens.train.Runner` trains :class:`~dgdlens.train.sae_plan.SAEPlan`: normalisation statistics
   (mean vector, one scale) and the data-dependent initialisation from the training cells, then Adam with
   learning-rate and sparsity-coefficient schedules, unit-norm decoder rows, the variant's auxiliary loss
   (AuxK for TopK variants), dead/dense tracking; early stopping with restore-best, checkpoints and resume,
   and ``torchrun`` data parallelism all come from the runner.
3. BatchTopK's inference threshold is calibrated on the training cells with the final weights.
4. The normalisation is folded into the weights, so the returned SAE works in input units.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from .. import _dist
from .._device import resolve_device
from ..data.split import train_validation_split
from ..train import Runner, RunnerConfig
from ..train.sae_plan import SAEPlan
from .config import PRESETS, SAEConfig
from .init import geometric_median  # noqa: F401  (re-exported: dgdlens.sae.train.geometric_median)
from .io import as_rows
from .variants import SAE, make_sae

__all__ = ["train_sae", "resolve_config", "geometric_median", "torch_threads", "DEFAULT_PATIENCE"]

#: epochs without improvement before early stopping ends training (``early_stopping=True``)
DEFAULT_PATIENCE = 10
#: the runner's own options that ``train_sae`` also accepts through ``**settings``
_RUNNER_SETTINGS = ("min_delta", "min_epochs", "restore_best")
#: arguments renamed in the move to one dialect: old name -> new name
RENAMED = {"epochs": "max_epochs", "val_fraction": "validation_fraction", "obsm_key": "use_rep"}


def train_sae(
    X,
    kind: str | None = None,
    *,
    use_rep: str | None = None,
    n_latents: int | None = None,
    k: int | None = None,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    l1_coef: float | None = None,
    preset: str | None = None,
    config: SAEConfig | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    validation_fraction: float = 0.0,
    early_stopping: bool = False,
    patience: int | None = None,
    checkpoint_path: str | None = None,
    checkpoint_every: int = 50,
    resume_from: str | None = None,
    progress: bool = True,
    num_threads: int | None = None,
    **settings,
) -> SAE:
    """Train a sparse autoencoder on a cell embedding.

    Parameters
    ----------
    X
        Cells x dimensions: numpy array, torch tensor, scipy sparse matrix, or AnnData with ``use_rep``.
        Never modified.
    kind
        ``"topk"`` (default), ``"batchtopk"``, ``"jumprelu"`` or ``"relu"`` (ReLU + L1).
    use_rep
        For AnnData input, the ``obsm`` key of the embedding (``"X"`` for ``adata.X``), as in scanpy.
    n_latents
        Dictionary width (default ``16 * d_in``; the ``paper`` preset uses 10,000).
    k
        Active latents per sample for TopK/BatchTopK; target L0 for JumpReLU (optional).
    max_epochs, batch_size, lr, l1_coef
        Shortcuts for the same-named :class:`SAEConfig` fields. The learning-rate and sparsity schedules
        span ``max_epochs`` also when early stopping ends training sooner. Under ``torchrun``,
        ``batch_size`` is the global batch (each process takes ``ceil(batch_size / world_size)`` rows).
    preset
        ``"paper"``: the reference's settings (:func:`~dgdlens.sae.config.paper_config`); explicit
        arguments still override them.
    config
        A full :class:`SAEConfig` to start from (not together with ``preset``).
    device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
    seed
        Seeds the initialisation, the validation split and the batch order.
    validation_fraction
        Hold out this fraction of cells (the split every dgdlens model uses; fewer than 2 held-out cells
        means none). The history then has ``val_loss``, ``val_fvu`` and ``val_l0``.
    early_stopping, patience
        Stop once the validation loss (the training loss without validation cells, with a warning) has not
        improved for ``patience`` epochs (default :data:`DEFAULT_PATIENCE`), and end with the best epoch's
        weights.
    checkpoint_path, checkpoint_every, resume_from
        Write a resumable checkpoint (safetensors + JSON, never a pickle) every ``checkpoint_every`` epochs,
        at the end and on Ctrl-C; ``resume_from`` continues such a run exactly (same data and settings). A
        checkpoint of other data or another SAE is refused.
    progress
        Show a tqdm bar over epochs.
    num_threads
        CPU threads for torch during training (restored afterwards; ``None`` leaves torch's setting). SAE
        steps are small matrix products, and on a busy machine one thread is often much faster than several.
    **settings
        Any other :class:`SAEConfig` field (e.g. ``bias="untied"``, ``auxk_alpha=0``), and the runner's
        ``min_delta``, ``min_epochs`` (default 0) and ``restore_best`` (default ``early_stopping``).

    Returns
    -------
    SAE
        The trained variant, in eval mode, normalisation folded into the weights (``W_dec`` rows are unit
        directions in input units), with ``is_trained_``, ``history_`` (a DataFrame, one row per epoch:
        ``train_loss``, ``train_fvu``, ``train_l0``, ``dead_fraction``, ``dense_fraction``, ``lr``,
        ``sparsity_coef``, ``time`` and the ``val_`` columns), ``train_summary_`` and ``train_config_``.
    """
    for old, new in RENAMED.items():
        if old in settings:
            raise TypeError(f"train_sae() got {old}=, which is now called {new}= (the name every dgdlens model "
                            "uses); see the migration table in the README.")
    runner_settings = {name: settings.pop(name) for name in _RUNNER_SETTINGS if name in settings}
    if patience is not None and not early_stopping:
        raise ValueError("patience applies to early stopping; pass early_stopping=True as well (and "
                         "validation_fraction > 0 to monitor held-out cells).")
    rows = as_rows(X, use_rep)
    rows.check_finite()
    if rows.n_obs < 2:
        raise ValueError(f"X has {rows.n_obs} cell(s); an SAE needs at least 2 (and realistically thousands).")
    cfg = resolve_config(
        rows.n_vars, kind=kind, preset=preset, config=config,
        n_latents=n_latents, k=k, max_epochs=max_epochs, batch_size=batch_size, lr=lr, l1_coef=l1_coef, **settings,
    )
    train_idx, val_idx = train_validation_split(rows.n_obs, validation_fraction, seed)
    runner_cfg = RunnerConfig(
        max_epochs=cfg.max_epochs, early_stopping=bool(early_stopping),
        patience=DEFAULT_PATIENCE if patience is None else patience,
        min_epochs=runner_settings.pop("min_epochs", 0),
        restore_best=runner_settings.pop("restore_best", bool(early_stopping)),
        checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every, seed=seed, progress=bool(progress),
        **runner_settings,
    )
    dev = _dist.local_device(device) if _dist.is_distributed() else resolve_device(device)

    model = make_sae(cfg)
    model.reset_parameters(seed)
    plan = SAEPlan(model, rows, train_idx, val_idx, seed=seed)
    if early_stopping and not plan.has_validation:
        warnings.warn("No validation split (validation_fraction=0 or too few cells): early stopping monitors the "
                      "training loss instead.", stacklevel=2)
    runner = Runner(plan, runner_cfg, dev, kind="sae", fingerprint=checkpoint_fingerprint(rows, cfg, seed,
                                                                                            validation_fraction))
    with torch_threads(num_threads):
        runner.fit(resume_from=resume_from)
    model.eval()
    model.fold_()
    model._record_training(runner, {**runner_cfg.to_dict(), "device": str(dev),
                                    "validation_fraction": float(validation_fraction), **plan.describe()})
    model.train_summary_.update({"steps": int(plan.step), "n_train": plan.n_train, "n_val": plan.n_val})
    return model


def checkpoint_fingerprint(rows, cfg: SAEConfig, seed: int, validation_fraction: float) -> dict:
    """What a checkpoint must match to be resumed: the data (shape and a hash of its first and last rows),
    the split and the SAE's shape."""
    return {**rows.fingerprint(), "seed": int(seed), "validation_fraction": float(validation_fraction),
            "sae_kind": cfg.kind, "n_latents": cfg.n_latents, "k": cfg.k, "bias": cfg.bias,
            "normalize": cfg.normalize, "batch_size": cfg.batch_size}


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Temporarily set torch's intra-op thread count (``None``: leave it)."""
    if n is None:
        yield
        return
    if int(n) != n or n < 1:
        raise ValueError(f"num_threads must be a positive integer or None, got {n!r}.")
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------- configuration
def resolve_config(d_in: int, *, kind: str | None = None, preset: str | None = None,
                   config: SAEConfig | None = None, **fields) -> SAEConfig:
    """The validated config from a preset or base config plus explicit settings (``None`` = keep)."""
    if preset is not None and config is not None:
        raise ValueError("Pass either preset= or config=, not both.")
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; available presets: {sorted(PRESETS)}.")
        base = PRESETS[preset](d_in)
    elif config is not None:
        if not isinstance(config, SAEConfig):
            raise ValueError(f"config must be an SAEConfig, got {type(config).__name__}.")
        base = SAEConfig.from_dict(config.to_dict())
        if base.d_in is not None and base.d_in != d_in:
            raise ValueError(f"config.d_in={base.d_in} but X has {d_in} dimensions; pass d_in=None or matching data.")
    else:
        base = SAEConfig()
    changes = {name: value for name, value in fields.items() if value is not None}
    if kind is not None:
        changes["kind"] = kind
    cfg = base.replace(d_in=d_in, **changes)
    if cfg.n_latents is None:
        cfg.n_latents = 16 * d_in
    return cfg.validate()
