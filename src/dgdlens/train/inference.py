"""Held-out inference for decoder-only models: latents of new samples by optimisation, model frozen.

1. Candidates: every sample starts from each candidate (default: each mixture mean).
2. Selection: the candidate with the lowest loss.
3. Optimisation: Adam on the chosen latents, batched and vectorised over samples.

Under ``torchrun`` (:func:`infer_latents_sharded`) each process embeds a contiguous slice of the samples
and the latents are gathered on every process.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import _dist
from ..data.loader import BatchLoader
from ..nn.module import DecoderOnlyModule, frozen
from ..nn.priors import GaussianMixture

__all__ = ["infer_latents", "infer_latents_sharded", "optimise_latents", "default_candidates"]


def default_candidates(module: DecoderOnlyModule, n_latent: int, device) -> torch.Tensor:
    """Starting points for new samples: the mixture means for a GMM prior, else the origin."""
    if isinstance(module.prior, GaussianMixture):
        return module.prior.mean.detach().to(device)
    return torch.zeros(1, n_latent, device=device)


def _score_candidates(module, x, scale, cand, select_by: str) -> torch.Tensor:
    """Loss of every (sample, candidate) pair, shape (n, K); one decoder pass per candidate set."""
    out = module.decode(cand)  # (K, G)
    scores = torch.stack([module.likelihood.nll(x, out[k].expand(x.shape[0], -1), scale)
                          for k in range(cand.shape[0])], dim=1)
    if select_by == "recon+prior":
        scores = scores + module.prior_nll(cand).unsqueeze(0)
    return scores


def infer_latents(
    module: DecoderOnlyModule,
    loader: BatchLoader,
    n_latent: int,
    *,
    n_steps: int = 200,
    lr: float = 1e-2,
    betas: tuple[float, float] = (0.5, 0.7),
    candidates: torch.Tensor | None = None,
    select_by: str = "recon+prior",
    candidate_steps: int = 0,
    tol: float = 1e-5,
    use_prior: bool = True,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """MAP latents for new samples with the model frozen, batched and vectorised over samples.

    1. Candidates: every sample starts from each candidate (default: each mixture mean).
    2. Selection: the candidate with the lowest reconstruction NLL (+ prior NLL with
       ``select_by="recon+prior"``, the paper; ``"recon"`` is multiDGD's). With ``candidate_steps > 0``
       every candidate is optimised that many steps before the choice (the paper's 10 epochs).
    3. Optimisation: Adam on the chosen latents for up to ``n_steps`` steps (stops early when the
       mean loss changes by less than ``tol`` relative). Adam is elementwise, so optimising a batch
       jointly is the same as optimising each sample alone.

    Returns ``(z, loss)``: latents (n, n_latent) and each sample's final NLL + prior NLL.
    """
    if select_by not in {"recon", "recon+prior"}:
        raise ValueError(f"select_by must be 'recon' or 'recon+prior', got {select_by!r}")
    device = torch.device(device)
    module.eval()
    cand = default_candidates(module, n_latent, device) if candidates is None else candidates.to(device).float()
    z_out = np.empty((loader.n, n_latent), dtype=np.float32)
    loss_out = np.empty(loader.n, dtype=np.float32)
    bar = tqdm(total=loader.n, desc="embedding", disable=not progress, dynamic_ncols=True)

    def objective(x, z, scale):
        nll = module.recon_nll(x, z, scale)
        return nll + module.prior_nll(z) if use_prior else nll

    with frozen(module):
        for batch in loader:
            x, scale = batch.x, batch.scale
            n, k = x.shape[0], cand.shape[0]
            if candidate_steps > 0 and k > 1:
                xr = x.repeat_interleave(k, 0)
                sr = None if scale is None else scale.repeat_interleave(k, 0)
                zc = optimise_latents(objective, xr, sr, cand.repeat(n, 1), candidate_steps, lr, betas, tol=0.0)
                with torch.no_grad():
                    scores = objective(xr, zc, sr).reshape(n, k)
                    z0 = zc.reshape(n, k, -1)[torch.arange(n), scores.argmin(1)]
            else:
                with torch.no_grad():
                    scores = _score_candidates(module, x, scale, cand, select_by if use_prior else "recon")
                    z0 = cand[scores.argmin(1)]
            z = optimise_latents(objective, x, scale, z0, n_steps, lr, betas, tol)
            with torch.no_grad():
                final = objective(x, z, scale)
            pos = batch.index.cpu().numpy()
            z_out[pos] = z.cpu().numpy()
            loss_out[pos] = final.cpu().numpy()
            bar.update(n)
    bar.close()
    return z_out, loss_out


def optimise_latents(objective, x, scale, z0, n_steps, lr, betas, tol) -> torch.Tensor:
    """Adam on latents ``z0`` (a batch, jointly: Adam is elementwise, so this equals one run per sample) for
    up to ``n_steps`` steps of ``objective(x, z, scale).sum()``; stops when it changes by less than ``tol``
    (relative). The stopping check reads the loss on the host; it is off the training hot path."""
    z = z0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr, betas=betas)
    prev = None
    for _ in range(n_steps):
        opt.zero_grad(set_to_none=True)
        loss = objective(x, z, scale).sum()
        loss.backward()
        opt.step()
        value = float(loss.detach())
        if tol > 0 and prev is not None and abs(prev - value) <= tol * abs(prev):
            break
        prev = value
    return z.detach()


def infer_latents_sharded(module, matrix, scale: np.ndarray | None, n_latent: int, *, batch_size: int,
                          device, progress: bool = True, **infer_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """:func:`infer_latents` for every row of ``matrix``; under several processes each embeds a contiguous
    slice of the rows and the results are gathered on every process."""
    if not _dist.is_distributed():
        loader = BatchLoader(matrix, None, scale, batch_size=batch_size, shuffle=False, device=device)
        return infer_latents(module, loader, n_latent, progress=progress, device=device, **infer_kwargs)
    _dist.init(device=device)
    lo, hi = _dist.shard_bounds(matrix.n_obs)
    rows = np.arange(lo, hi)
    loader = BatchLoader(matrix, rows, None if scale is None else scale[lo:hi], batch_size=batch_size,
                         shuffle=False, device=device)
    z, loss = infer_latents(module, loader, n_latent, progress=progress and _dist.is_main_process(),
                            device=device, **infer_kwargs)
    z = _dist.gather_rows(torch.from_numpy(z), matrix.n_obs).numpy()
    loss = _dist.gather_rows(torch.from_numpy(loss), matrix.n_obs).numpy()
    return z, loss
