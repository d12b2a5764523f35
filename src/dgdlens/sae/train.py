"""Training loop shared by every SAE variant.

What happens, in order (see :class:`~dgdlens.sae.config.SAEConfig` for every knob):

1. The input is checked (2-D, finite) and optionally split into training and validation cells.
2. Normalisation statistics (mean vector, one scale) come from the training cells.
3. Weights are initialised (``W_enc = W_dec^T`` by default), ``b_dec`` from the data (geometric median).
4. Adam with linear learning-rate warm-up/decay and a linear sparsity-coefficient warm-up; decoder rows are
   kept at unit norm (gradient projected, rows renormalised) unless the config says otherwise.
5. TopK variants add the AuxK loss on latents that have not fired for ``dead_after`` samples.
6. Dead and dense latents, L0 and FVU are tracked per epoch in ``sae.history``.
7. BatchTopK's inference threshold is calibrated on the training cells with the final weights.
8. The normalisation is folded into the weights, so the returned SAE works in input units.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import PRESETS, SAEConfig
from .io import EmbeddingRows, as_rows
from .variants import SAE, BatchTopKSAE, JumpReLUSAE, make_sae

__all__ = ["train_sae", "resolve_config", "geometric_median"]


def train_sae(
    X,
    kind: str | None = None,
    *,
    n_latents: int | None = None,
    k: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    l1_coef: float | None = None,
    preset: str | None = None,
    config: SAEConfig | None = None,
    obsm_key: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    val_fraction: float = 0.0,
    patience: int | None = None,
    progress: bool = True,
    num_threads: int | None = None,
    **settings,
) -> SAE:
    """Train a sparse autoencoder on a cell embedding.

    Parameters
    ----------
    X
        Cells x dimensions: numpy array, torch tensor, scipy sparse matrix, or AnnData with ``obsm_key``.
        Never modified.
    kind
        ``"topk"`` (default), ``"batchtopk"``, ``"jumprelu"`` or ``"relu"`` (ReLU + L1).
    n_latents
        Dictionary width (default ``16 * d_in``; the ``paper`` preset uses 10,000).
    k
        Active latents per sample for TopK/BatchTopK; target L0 for JumpReLU (optional).
    epochs, batch_size, lr, l1_coef
        Shortcuts for the same-named :class:`SAEConfig` fields.
    preset
        ``"paper"``: the reference's settings (:func:`~dgdlens.sae.config.paper_config`); explicit
        arguments still override them.
    config
        A full :class:`SAEConfig` to start from (not together with ``preset``).
    obsm_key
        For AnnData input, the ``obsm`` key of the embedding (``"X"`` for ``adata.X``).
    device, seed
        Where to train, and the seed for initialisation, the validation split and batch order.
    val_fraction, patience
        Hold out this fraction of cells; with ``patience``, stop when the validation loss has not improved
        for that many epochs and restore the best weights.
    progress
        Show a tqdm bar over epochs.
    num_threads
        CPU threads for torch during training (restored afterwards; ``None`` leaves torch's setting). SAE
        steps are small matrix products, and on a busy machine one thread is often much faster than several.
    **settings
        Any other :class:`SAEConfig` field (e.g. ``bias="untied"``, ``auxk_alpha=0``).

    Returns
    -------
    SAE
        The trained variant, in eval mode, normalisation folded into the weights (``W_dec`` rows are unit
        directions in input space). ``sae.history`` has one dict per epoch.
    """
    rows = as_rows(X, obsm_key)
    rows.check_finite()
    if rows.n_obs < 2:
        raise ValueError(f"X has {rows.n_obs} cell(s); an SAE needs at least 2 (and realistically thousands).")
    cfg = resolve_config(
        rows.n_vars, kind=kind, preset=preset, config=config,
        n_latents=n_latents, k=k, epochs=epochs, batch_size=batch_size, lr=lr, l1_coef=l1_coef, **settings,
    )
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction!r}.")
    if patience is not None and (int(patience) != patience or patience < 1):
        raise ValueError(f"patience must be a positive integer or None, got {patience!r}.")
    if patience is not None and val_fraction == 0:
        raise ValueError("patience needs validation cells; pass val_fraction > 0 (e.g. 0.1) as well.")
    from ..models._engine import resolve_device  # local: sae does not otherwise need the models package

    dev = resolve_device(device)
    train_idx, val_idx = _split(rows.n_obs, val_fraction, seed)
    data = rows.to_device(dev)

    model = make_sae(cfg)
    model.reset_parameters(seed)
    model.to(dev)
    mean, scale = _normalisation(data, train_idx, cfg.normalize)
    with torch.no_grad():
        model.x_mean.copy_(torch.as_tensor(mean if cfg.normalize in ("center", "center_scale") else 0.0,
                                           dtype=torch.float32, device=dev).expand_as(model.x_mean))
        model.x_scale.fill_(scale)
    _init_from_data(model, data, train_idx, seed)
    data_mean_n = model.normalise(torch.as_tensor(mean, dtype=torch.float32, device=dev)).detach()

    trainer = _Trainer(model, data, train_idx, val_idx, data_mean_n, seed=seed, patience=patience, progress=progress)
    with torch_threads(num_threads):
        trainer.run()
        model.eval()
        if isinstance(model, BatchTopKSAE):
            _calibrate_batchtopk_threshold(model, data, train_idx)
    model.fold_()
    model.training_info.update({
        "seed": int(seed), "device": str(dev), "n_train": int(len(train_idx)), "n_val": int(len(val_idx)),
        "normalize_mean": np.asarray(mean).tolist(), "normalize_scale": float(scale),
    })
    return model


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


def _split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if val_fraction == 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise ValueError(f"val_fraction={val_fraction} leaves no training cells out of {n}.")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


# ---------------------------------------------------------------------- data statistics and init
@torch.no_grad()
def _normalisation(data: EmbeddingRows, idx: np.ndarray, mode: str, chunk: int = 65_536) -> tuple[np.ndarray, float]:
    """Mean vector of the training cells and the scalar of ``SAEConfig.normalize`` (float64 sums)."""
    total = torch.zeros(data.n_vars, dtype=torch.float64)
    sq_norm = 0.0
    for start in range(0, len(idx), chunk):
        x = data.rows(idx[start:start + chunk]).double()
        total += x.sum(0).cpu()
        sq_norm += float(x.pow(2).sum())
    n, d = len(idx), data.n_vars
    mean = (total / n).numpy()
    if mode in ("none", "center"):
        return mean, 1.0
    mean_sq = sq_norm / n
    if mode == "center_scale":
        mean_sq -= float((mean**2).sum())  # E||x - mu||^2 = E||x||^2 - ||mu||^2
    scale = math.sqrt(max(mean_sq, 0.0) / d)
    if not scale > 1e-12 * (1.0 + float(np.abs(mean).max())):
        raise ValueError(
            "X has (numerically) zero variance across cells, so it cannot be normalised; check the embedding, "
            "or pass normalize='none'."
        )
    return mean, scale


def geometric_median(points: torch.Tensor, *, max_iter: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """Geometric median of the rows of ``points`` (Weiszfeld's algorithm, float64)."""
    pts = points.double()
    median = pts.mean(0)
    for _ in range(max_iter):
        dist = (pts - median).norm(dim=1).clamp_min(1e-12)
        weights = 1.0 / dist
        new = (weights[:, None] * pts).sum(0) / weights.sum()
        shift = float((new - median).norm())
        median = new
        if shift <= tol * (1.0 + float(median.norm())):
            break
    return median.to(points.dtype)


@torch.no_grad()
def _init_from_data(model: SAE, data: EmbeddingRows, idx: np.ndarray, seed: int, n_sample: int = 8192) -> None:
    """Data-dependent initialisation on a sample of training cells: ``b_dec`` (geometric median or mean), the
    encoder scale (transpose init) and, for JumpReLU with a target L0 ``k``, thresholds at each latent's
    ``1 - k / n_latents`` quantile so training starts at the target sparsity instead of as a dense ReLU."""
    cfg = model.config
    rng = np.random.default_rng(seed + 1)
    sample = idx if len(idx) <= n_sample else np.sort(rng.choice(idx, n_sample, replace=False))
    x_n = model.normalise(data.rows(sample, model.device))
    if cfg.b_dec_init == "zeros":
        model.b_dec.zero_()
    elif cfg.b_dec_init == "geometric_median":
        model.b_dec.copy_(geometric_median(x_n))
    elif cfg.b_dec_init == "mean":
        model.b_dec.copy_(x_n.mean(0))
    if isinstance(model, JumpReLUSAE) and cfg.k is not None:
        rank = min(len(sample), max(1, int(math.ceil((1.0 - cfg.k / cfg.n_latents) * len(sample)))))
        x_in = x_n - model.b_dec if cfg.bias == "tied" else x_n
        for start in range(0, cfg.n_latents, 1024):  # latent chunks keep (sample x chunk) small
            sl = slice(start, start + 1024)
            pre = x_in @ model.W_enc[sl].T + model.b_enc[sl]
            q = pre.kthvalue(rank, dim=0).values
            model.log_threshold[sl] = q.clamp_min(cfg.jumprelu_threshold_init).log()
    if cfg.init == "transpose":
        _scale_encoder_to_data(model, x_n[:2048])


@torch.no_grad()
def _scale_encoder_to_data(model: SAE, x_n: torch.Tensor) -> None:
    """Scale the transpose-initialised encoder so the first reconstruction has the least-squares magnitude.

    With ``W_enc = W_dec^T`` every active latent adds its full projection, so ``m`` random unit directions
    reconstruct ``x`` about ``m / (2 d)`` times too large (ReLU) and wide dictionaries start with FVU >> 1
    and spend many steps shrinking the encoder. ReLU and TopK are positively homogeneous (and ``b_enc`` is
    zero here), so scaling the encoder by ``s`` scales the reconstruction by exactly ``s``; JumpReLU is too
    when its thresholds are scaled along.
    """
    target = x_n - model.b_dec
    pre = model.pre_activations(x_n)
    recon = model.activate_train(pre) @ model.W_dec
    denom = float((recon * recon).sum())
    if denom > 0:
        scale = float((recon * target).sum()) / denom
        if scale > 0:
            model.W_enc.mul_(scale)
            model.b_enc.mul_(scale)
            if isinstance(model, JumpReLUSAE):
                model.log_threshold.add_(math.log(scale))


# ---------------------------------------------------------------------- the loop
class _Trainer:
    def __init__(self, model: SAE, data: EmbeddingRows, train_idx: np.ndarray, val_idx: np.ndarray,
                 data_mean_n: torch.Tensor, *, seed: int, patience: int | None, progress: bool):
        self.model, self.data, self.cfg = model, data, model.config
        self.train_idx, self.val_idx = train_idx, val_idx
        self.data_mean_n = data_mean_n
        self.rng = np.random.default_rng(seed + 2)
        self.patience, self.progress = patience, progress
        self.device = model.device
        cfg = self.cfg
        self.steps_per_epoch = -(-len(train_idx) // cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.lr_warm = int(round(cfg.lr_warmup * self.total_steps))
        self.lr_decay = int(round(cfg.lr_decay * self.total_steps))
        self.l1_warm = int(round(cfg.l1_warmup * self.total_steps))
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.effective_lr(), betas=cfg.adam_betas,
                                          eps=cfg.adam_eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.dead_after = cfg.dead_after if cfg.dead_after is not None else len(train_idx)
        self.since_fired = torch.zeros(cfg.n_latents, dtype=torch.long, device=self.device)
        self.use_auxk = cfg.kind in ("topk", "batchtopk") and cfg.auxk_alpha > 0
        self.step = 0

    # schedules ------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        factor = 1.0
        if self.lr_warm > 0 and step < self.lr_warm:
            factor = (step + 1) / self.lr_warm
        if self.lr_decay > 0 and step >= self.total_steps - self.lr_decay:
            factor = min(factor, max(self.total_steps - step, 0) / self.lr_decay)
        return factor

    def _sparsity_coef(self) -> float:
        if self.l1_warm > 0 and self.step < self.l1_warm:
            return self.cfg.l1_coef * (self.step + 1) / self.l1_warm
        return self.cfg.l1_coef

    # one batch --------------------------------------------------------------
    def _losses(self, x: torch.Tensor, coef: float, *, train: bool) -> dict[str, torch.Tensor]:
        model, cfg = self.model, self.cfg
        x_n = model.normalise(x)
        pre = model.pre_activations(x_n)
        f = model.activate_train(pre)
        x_hat = model.decode_normalised(f)
        err = x_hat - x_n
        sq_err = err.pow(2).sum(1)
        mse = sq_err.mean() if cfg.mse_convention == "sum" else sq_err.mean() / cfg.d_in
        loss = mse + coef * model.sparsity_loss(f, pre) if coef > 0 else mse
        out = {"loss": loss, "sq_err": sq_err.detach().sum(), "f": f.detach(),
               "var": (x_n - self.data_mean_n).pow(2).sum().detach()}
        if train and self.use_auxk:
            aux = self._auxk_loss(pre, x_n, x_hat)
            if aux is not None:
                out["loss"] = out["loss"] + aux
        return out

    def _auxk_loss(self, pre: torch.Tensor, x_n: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor | None:
        """Reconstruct the residual with the top dead latents (Gao et al. 2024), normalised by its variance."""
        dead = self.since_fired >= self.dead_after
        n_dead = int(dead.sum())
        if n_dead == 0:
            return None
        k_aux_cfg = self.cfg.effective_k_aux()
        k_aux = min(k_aux_cfg, n_dead)
        masked = pre.masked_fill(~dead, float("-inf"))
        values, index = masked.topk(k_aux, dim=1, sorted=False)
        f_aux = torch.zeros_like(pre).scatter(1, index, torch.relu(values))
        residual = (x_n - x_hat).detach()  # the aux latents fit what the live ones miss, not the reverse
        residual_hat = f_aux @ self.model.W_dec
        denom = (residual - residual.mean(0)).pow(2).sum(1).mean().clamp_min(1e-12)
        aux = (residual_hat - residual).pow(2).sum(1).mean() / denom
        return self.cfg.auxk_alpha * min(n_dead / k_aux_cfg, 1.0) * aux

    @torch.no_grad()
    def _project_decoder_grad(self) -> None:
        """Remove the gradient component along each unit decoder row (it would only change the norm)."""
        W, grad = self.model.W_dec, self.model.W_dec.grad
        if grad is not None:
            grad -= (grad * W).sum(1, keepdim=True) * W

    @torch.no_grad()
    def _renormalise_decoder(self) -> None:
        W = self.model.W_dec
        W /= W.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # epochs -------------------------------------------------------------------
    def _train_epoch(self) -> dict:
        model, cfg = self.model, self.cfg
        model.train()
        order = self.rng.permutation(self.train_idx)
        fires = torch.zeros(cfg.n_latents, device=self.device)
        totals = {"loss": 0.0, "sq_err": 0.0, "var": 0.0, "active": 0.0}
        min_kept = []
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            x = self.data.rows(idx, self.device)
            coef, lr = self._sparsity_coef(), self.optimizer.param_groups[0]["lr"]  # used by this step
            out = self._losses(x, coef, train=True)
            self.optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            if cfg.decoder_norm == "unit":
                self._project_decoder_grad()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            if cfg.decoder_norm == "unit":
                self._renormalise_decoder()
            with torch.no_grad():
                active = out["f"] > 0
                batch_fires = active.sum(0)
                fires += batch_fires
                self.since_fired += len(idx)
                self.since_fired[batch_fires > 0] = 0
                totals["loss"] += float(out["loss"]) * len(idx)
                totals["sq_err"] += float(out["sq_err"])
                totals["var"] += float(out["var"])
                totals["active"] += float(active.sum())
                if isinstance(model, BatchTopKSAE):
                    kept = out["f"][active]
                    if kept.numel():
                        min_kept.append(float(kept.min()))
            self.step += 1
        if min_kept:  # running estimate of the inference threshold, recalibrated at the end
            model.threshold.fill_(float(np.mean(min_kept)))
        n = len(order)
        rate = fires / n
        return {
            "loss": totals["loss"] / n,
            "fvu": totals["sq_err"] / max(totals["var"], 1e-12),
            "l0": totals["active"] / n,
            "dead_fraction": float((fires == 0).float().mean()),
            "dense_fraction": float((rate > cfg.dense_threshold).float().mean()),
            "lr": lr,  # of the epoch's last step
            "sparsity_coef": coef,
        }

    @torch.no_grad()
    def _validate(self) -> dict:
        self.model.eval()
        coef = self.cfg.l1_coef
        totals = {"loss": 0.0, "sq_err": 0.0, "var": 0.0}
        for start in range(0, len(self.val_idx), self.cfg.batch_size):
            idx = self.val_idx[start:start + self.cfg.batch_size]
            out = self._losses(self.data.rows(idx, self.device), coef, train=False)
            totals["loss"] += float(out["loss"]) * len(idx)
            totals["sq_err"] += float(out["sq_err"])
            totals["var"] += float(out["var"])
        return {"val_loss": totals["loss"] / len(self.val_idx),
                "val_fvu": totals["sq_err"] / max(totals["var"], 1e-12)}

    def run(self) -> None:
        cfg, model = self.cfg, self.model
        best_loss, best_state, bad_epochs, stopped = math.inf, None, 0, False
        started = time.perf_counter()
        bar = tqdm(range(cfg.epochs), disable=not self.progress, desc=f"SAE ({cfg.kind})")
        for epoch in bar:
            t0 = time.perf_counter()
            record = {"epoch": epoch + 1, **self._train_epoch()}
            if len(self.val_idx):
                record.update(self._validate())
            record["seconds"] = time.perf_counter() - t0
            model.history.append(record)
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(
                    f"SAE training diverged at epoch {epoch + 1} (loss {record['loss']}); lower lr (now "
                    f"{cfg.effective_lr():g}) or the sparsity coefficient, or check the input scale."
                )
            bar.set_postfix(loss=f"{record['loss']:.4g}", fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}",
                            dead=f"{record['dead_fraction']:.2f}")
            if self.patience is not None:
                if record["val_loss"] < best_loss - 1e-12:
                    best_loss, bad_epochs = record["val_loss"], 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    bad_epochs += 1
                    if bad_epochs >= self.patience:
                        stopped = True
                        break
        if best_state is not None:
            model.load_state_dict(best_state)
        model.training_info.update({
            "epochs_run": len(model.history), "steps": self.step, "train_seconds": time.perf_counter() - started,
            "stopped_early": stopped, "lr": cfg.effective_lr(),
        })


@torch.no_grad()
def _calibrate_batchtopk_threshold(model: BatchTopKSAE, data: EmbeddingRows, idx: np.ndarray) -> None:
    """Set the inference threshold to the mean, over training batches, of the smallest activation BatchTopK
    keeps, using the final weights (so inference L0 matches training L0 on average)."""
    batch = model.config.batch_size
    order = np.random.default_rng(0).permutation(idx)
    values, weights = [], []
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        if len(rows) < batch and values:
            break  # a short last batch keeps fewer activations and would bias the threshold upward
        pre = model.pre_activations(model.normalise(data.rows(rows, model.device)))
        kept = model.activate_train(pre)
        kept = kept[kept > 0]
        if kept.numel():
            values.append(float(kept.min()))
            weights.append(len(rows))
    if values:
        model.threshold.fill_(float(np.average(values, weights=weights)))
