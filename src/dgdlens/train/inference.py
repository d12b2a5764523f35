"""Held-out inference for decoder-only models: latents of new samples by optimisation, model frozen.

1. Candidates: every sample starts from each candidate (default: each mixture mean).
2. Selection: the candidate with the lowest loss.
3. Optimisation: Adam on the chosen latents, batched and vectorised over samples.

Models with covariate latents use :func:`infer_covariate_latents` (known, unknown and new categories).

Under ``torchrun`` (:func:`infer_latents_sharded`) each process embeds a contiguous slice of the samples
and the latents are gathered on every process.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import _dist
from ..data.loader import BatchLoader
from ..nn.module import DecoderOnlyModule, frozen, likelihood_nll
from ..nn.priors import GaussianMixture

__all__ = ["infer_latents", "infer_latents_sharded", "optimise_latents", "default_candidates",
           "infer_covariate_latents", "infer_covariate_latents_sharded", "CovariateInference"]


def default_candidates(module: DecoderOnlyModule, n_latent: int, device) -> torch.Tensor:
    """Starting points for new samples: the mixture means for a GMM prior, else the origin."""
    if isinstance(module.prior, GaussianMixture):
        return module.prior.mean.detach().to(device)
    return torch.zeros(1, n_latent, device=device)


def _score_candidates(module, x, scale, cand, select_by: str, constant=None) -> torch.Tensor:
    """Loss of every (sample, candidate) pair, shape (n, K); one decoder pass per candidate set.
    ``constant``: the module's ``recon_constant(x, scale)``, computed once for every candidate."""
    out = module.decode(cand)  # (K, G)
    scores = torch.stack([likelihood_nll(module.likelihood, x, out[k].expand(x.shape[0], -1), scale, constant)
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

    Parameters
    ----------
    module
        The trained decoder-only module (decoder, likelihood, prior); put in eval mode and frozen while
        the latents are fitted.
    loader
        The samples to embed, usually unshuffled (``samples x features`` counts, with per-sample scale
        factors if the model uses them); batch ``index`` values place the results.
    n_latent
        Dimension of the latent space.
    n_steps
        Most Adam steps per batch after the candidate selection.
    lr, betas
        Adam learning rate and betas of the latent optimisation.
    candidates
        ``K x n_latent`` starting points (default: the mixture means for a Gaussian-mixture prior, else
        the origin).
    select_by
        ``"recon+prior"`` or ``"recon"``: the score that picks each sample's candidate when
        ``candidate_steps == 0``.
    candidate_steps
        Adam steps on every (sample, candidate) pair before choosing (``0``: choose at the candidates
        themselves). Costs ``K`` times the memory and compute of a batch.
    tol
        Relative change of a batch's summed loss below which its optimisation stops early (``0``: never).
    use_prior
        Include the prior NLL in the objective (and the selection); ``False`` fits by reconstruction only.
    progress
        Show a tqdm bar over samples.
    device
        Device of the module and the loader's batches.

    Returns
    -------
    z : numpy.ndarray
        ``samples x n_latent`` float32 latents, in the loader's sample order.
    loss : numpy.ndarray
        ``(samples,)`` float32 final objective per sample: reconstruction NLL (summed over features) plus
        prior NLL (reconstruction only with ``use_prior=False``).

    Raises
    ------
    ValueError
        If ``select_by`` is not ``"recon"`` or ``"recon+prior"``.
    """
    if select_by not in {"recon", "recon+prior"}:
        raise ValueError(f"select_by must be 'recon' or 'recon+prior', got {select_by!r}")
    device = torch.device(device)
    module.eval()
    cand = default_candidates(module, n_latent, device) if candidates is None else candidates.to(device).float()
    z_out = np.empty((loader.n, n_latent), dtype=np.float32)
    loss_out = np.empty(loader.n, dtype=np.float32)
    bar = tqdm(total=loader.n, desc="embedding", disable=not progress, dynamic_ncols=True)

    def objective(data, z, scale):  # data: (counts, their recon_constant), gathered together (see compact)
        x, constant = data
        nll = module.recon_nll(x, z, scale, constant)
        return nll + module.prior_nll(z) if use_prior else nll

    with frozen(module):
        for batch in loader:
            x, scale = batch.x, batch.scale
            n, k = x.shape[0], cand.shape[0]
            # the likelihood's terms that do not depend on the latent, once per batch rather than per step
            data = (x, module.recon_constant(x, scale))
            if candidate_steps > 0 and k > 1:
                xr = _take_rows(data, torch.arange(n, device=x.device).repeat_interleave(k))
                sr = None if scale is None else scale.repeat_interleave(k, 0)
                zc = optimise_latents(objective, xr, sr, cand.repeat(n, 1), candidate_steps, lr, betas, tol=0.0)
                with torch.no_grad():
                    scores = objective(xr, zc, sr).reshape(n, k)
                    z0 = zc.reshape(n, k, -1)[torch.arange(n), scores.argmin(1)]
            else:
                with torch.no_grad():
                    scores = _score_candidates(module, x, scale, cand, select_by if use_prior else "recon", data[1])
                    z0 = cand[scores.argmin(1)]
            z = optimise_latents(objective, data, scale, z0, n_steps, lr, betas, tol, compact=True)
            with torch.no_grad():
                final = objective(data, z, scale)
            pos = batch.index.cpu().numpy()
            z_out[pos] = z.cpu().numpy()
            loss_out[pos] = final.cpu().numpy()
            bar.update(n)
    bar.close()
    return z_out, loss_out


def _take_rows(data, rows: torch.Tensor):
    """``data`` (a tensor, ``None``, or a tuple / list of them) restricted to ``rows`` along dimension 0."""
    if data is None:
        return None
    if isinstance(data, (tuple, list)):
        return type(data)(_take_rows(part, rows) for part in data)
    return data.index_select(0, rows)


#: Re-gather the still-running samples once they are fewer than this share of those gathered last:
#: copies stay rare, and most steps compute on running samples only.
_COMPACT_BELOW = 0.8
#: On a GPU, read back which samples have stopped (to end early or compact) once every this many steps.
_DEVICE_CHECK_EVERY = 8


def optimise_latents(objective, x, scale, z0, n_steps, lr, betas, tol, *, compact: bool = False) -> torch.Tensor:
    """Adam on latents ``z0`` (a batch, jointly: Adam is elementwise, so this equals one run per sample) for
    up to ``n_steps`` steps of ``objective(x, z, scale).sum()``. Each sample stops on its own once its loss
    changes by at most ``tol`` (relative): its latent is kept from that step on, so a sample's result
    never depends on which other samples share its batch (batch size, shards, order). Ending early and
    compacting read the stopped samples on the host: every step on the CPU, every few on a GPU.

    Parameters
    ----------
    objective
        Callable ``objective(x, z, scale)`` returning the per-sample loss, shape ``(n,)`` (other shapes
        are summed per sample; a scalar makes the whole batch stop together). Whatever it uses besides
        ``z`` should be frozen.
    x
        Data of the batch, e.g. ``cells x genes`` counts (a tensor, or a tuple of per-sample tensors,
        e.g. counts and covariate codes); passed through to ``objective``.
    scale
        Per-sample scale factors (e.g. library sizes, ``(n,)``) or ``None``; passed through.
    z0
        ``n x d`` starting latents (not modified).
    n_steps
        Most Adam steps.
    lr, betas
        Adam learning rate and betas.
    tol
        A sample stops once its loss changes by at most ``tol`` times its previous value (``0``: every
        sample runs all ``n_steps``).
    compact
        Evaluate ``objective`` on the samples still running only (``x``, ``z`` and ``scale`` restricted to
        their rows). A batch otherwise costs as many steps as its slowest sample takes: a DGD polish of
        10,000 cells took 15.6 steps per cell on average but 65.6 per batch of 256. Only for objectives
        whose samples are independent and that get every per-sample input through ``x``, ``z`` or
        ``scale`` (not from a closure). The result is the same up to floating-point reordering.
        On a GPU the stopped samples are read back every ``_DEVICE_CHECK_EVERY`` steps only (a read
        waits for the device); each sample's latent is still the one of its own stopping step.

    Returns
    -------
    torch.Tensor
        The optimised latents, ``n x d``, detached, on ``z0``'s device.
    """
    z = z0.detach().clone().requires_grad_(True)
    n = z.shape[0]
    opt = torch.optim.Adam([z], lr=lr, betas=betas)
    done = torch.zeros(n, dtype=torch.bool, device=z.device)
    kept = z.detach().clone()  # latents of the samples that have stopped, frozen at their stopping step
    prev = None
    rows = None  # the samples gathered into x_run / scale_run (None: all, no copy)
    x_run, scale_run = x, scale
    on_cpu = z.device.type == "cpu"
    for step in range(n_steps):
        opt.zero_grad(set_to_none=True)
        per_sample = objective(x_run, z if rows is None else z.index_select(0, rows), scale_run)
        m = n if rows is None else len(rows)
        separable = per_sample.dim() > 0
        per_sample = per_sample.reshape(m, -1).sum(1) if separable else per_sample.expand(m)
        per_sample.sum().backward()
        opt.step()  # samples outside ``rows`` have stopped: whatever Adam does to them is never read
        if tol <= 0:
            continue
        if rows is None:
            value = per_sample.detach()
        else:  # the stopped samples keep their last value, so they never count as newly stopped
            value = prev.clone()
            value[rows] = per_sample.detach()
        if prev is not None:
            newly = ~done & ((prev - value).abs() <= tol * prev.abs())
            kept = torch.where(newly[:, None], z.detach(), kept)
            done |= newly
            # the host reads whether anything stopped: free on the CPU, so every step; on a GPU it waits for
            # the device, so every few steps (each sample still stops, and is kept, at its own step)
            if bool(newly.any()) if on_cpu else (step + 1) % _DEVICE_CHECK_EVERY == 0:
                running = int((~done).sum())
                if running == 0:
                    return kept
                if compact and separable and running < _COMPACT_BELOW * m:
                    rows = (~done).nonzero().squeeze(1)
                    x_run, scale_run = _take_rows(x, rows), _take_rows(scale, rows)
        prev = value
    return torch.where(done[:, None], kept, z.detach())


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


# ---------------------------------------------------------------------- covariates
@dataclass
class CovariateInference:
    """Result of :func:`infer_covariate_latents`.

    Attributes
    ----------
    z
        Biological latents (n, n_latent).
    covariate_z
        One array (n, d_j) per categorical covariate.
    codes
        (n, n_categorical) final category codes: as given; for cells given as unknown (``-1``) the most
        probable trained category of the fitted covariate latent (argmax of ``log pi_k + log N``); new
        categories keep their codes ``>= n_trained``.
    new_means
        Per covariate, the learned component means of its new categories (n_new_j, d_j).
    loss
        Each sample's final reconstruction NLL + prior NLL (all blocks).
    """

    z: np.ndarray
    covariate_z: list[np.ndarray]
    codes: np.ndarray
    new_means: list[np.ndarray]
    loss: np.ndarray


def infer_covariate_latents(
    module,
    loader: BatchLoader,
    n_latent: int,
    codes: np.ndarray,
    continuous: np.ndarray | None,
    n_new: list[int] | None = None,
    *,
    n_steps: int = 200,
    lr: float = 1e-2,
    betas: tuple[float, float] = (0.5, 0.7),
    select_by: str = "recon+prior",
    tol: float = 1e-5,
    new_category_rounds: int = 5,
    progress: bool = True,
    device: torch.device | str = "cpu",
    reduce_sum=None,
) -> CovariateInference:
    """Held-out inference for a :class:`~dgdlens.nn.covariates.CovariateDecoderModule` (the DGD with
    covariates), with everything trained frozen, batched and vectorised over cells.

    Per cell and categorical covariate ``j``, ``codes[:, j]`` says what is known:

    - a trained category ``0 <= k < C_j``: the covariate latent starts at component ``k``'s mean and is
      optimised under that component's prior (a known batch);
    - ``-1`` (unknown, e.g. the column is absent from the new ``obs``): the candidates are every trained
      component mean; the best (biological candidate, covariate component) pair by reconstruction (+ prior
      with ``select_by="recon+prior"``) is the start, the latent is optimised under the mixture's marginal
      density, and the returned code is the component with the highest ``log pi_k + log N``;
    - ``C_j + m`` (the ``m``-th *new* category, e.g. an unseen batch; ``n_new[j]`` of them): a new
      component whose mean is learned from its cells while the trained model stays frozen. Its mean starts
      at the trained component most often chosen by its cells (all cells scored as unknown), then
      ``new_category_rounds`` rounds alternate (a) optimising every cell's latents given the means and (b)
      setting each new mean to the average covariate latent of its cells (the exact maximiser of the
      Gaussian term; block-coordinate ascent on the joint MAP objective). Several new categories of several
      covariates are learned at once. A new category with one cell gets its mean at that cell's covariate
      latent: the covariate latent is then fitted to that cell alone (only the decoder's structure and the
      biological prior separate batch from biology), so one-cell batches are embedded but their batch
      effect is not separable from the cell's own state.

    The new components share the trained components' average precision (frozen). ``reduce_sum`` (under
    several processes: a summing all-reduce) makes the new means use every process's cells.
    """
    if select_by not in {"recon", "recon+prior"}:
        raise ValueError(f"select_by must be 'recon' or 'recon+prior', got {select_by!r}")
    device = torch.device(device)
    module.eval()
    priors = list(module.covariate_priors)
    n_cat = len(priors)
    dims = [n_latent] + [p.dim for p in priors]
    n_trained = [p.n_components for p in priors]
    n_new = [0] * n_cat if n_new is None else [int(m) for m in n_new]
    codes = np.asarray(codes, dtype=np.int64).reshape(loader.n, n_cat)
    codes_t = torch.as_tensor(codes, device=device)
    cont_t = None if continuous is None else torch.as_tensor(np.asarray(continuous, np.float32), device=device)
    cand = default_candidates(module, n_latent, device)
    reduce_sum = (lambda t: t) if reduce_sum is None else reduce_sum
    new_means: list[torch.Tensor | None] = [None] * n_cat
    state = torch.zeros(loader.n, sum(dims), device=device)
    loss_out = torch.zeros(loader.n, device=device)
    any_new = any(n_new)
    rounds = max(1, int(new_category_rounds)) if any_new else 1
    bar = tqdm(total=loader.n * rounds, desc="embedding", disable=not progress, dynamic_ncols=True)

    def batch_codes(index, hide_new: bool):
        c = codes_t[index]
        if hide_new:
            c = c.clone()
            for j in range(n_cat):
                c[:, j] = torch.where(c[:, j] >= n_trained[j], torch.full_like(c[:, j], -1), c[:, j])
        return c

    def select(x, scale, c, cont, means):
        """Best (biological candidate, component of each unknown covariate) per cell; returns the start
        latents (n, sum(dims)) and, per covariate, the chosen trained component of unknown cells (-1 else)."""
        n = x.shape[0]
        constant = module.recon_constant(x, scale)  # the same for every combination
        unknown = [j for j in range(n_cat) if bool((c[:, j] < 0).any())]
        all_means = [priors[j].mean.detach() if means[j] is None else torch.cat([priors[j].mean.detach(), means[j]])
                     for j in range(n_cat)]
        own = [all_means[j][c[:, j].clamp_min(0)] for j in range(n_cat)]
        best = torch.full((n,), float("inf"), device=device)
        start = torch.zeros(n, sum(dims), device=device)
        chosen = torch.full((n, n_cat), -1, dtype=torch.int64, device=device)
        for combo in itertools.product(range(cand.shape[0]), *[range(n_trained[j]) for j in unknown]):
            z = cand[combo[0]].expand(n, -1)
            covs, pick = list(own), {}
            for j, comp in zip(unknown, combo[1:]):
                covs[j] = torch.where((c[:, j] < 0).unsqueeze(1), priors[j].mean.detach()[comp].expand(n, -1), own[j])
                pick[j] = comp
            recon, prior = module.batch_nll(x, [z, *covs], scale, c, cont, means, constant)
            score = recon + prior if select_by == "recon+prior" else recon
            better = score < best
            best = torch.where(better, score, best)
            start[better] = torch.cat([z, *covs], dim=1)[better]
            for j, comp in pick.items():
                chosen[better, j] = comp
        return start, chosen

    with frozen(module):
        if any_new:  # initial new means: the trained component most chosen by each new category's cells
            votes = [torch.zeros(max(n_new[j], 1), n_trained[j], device=device) for j in range(n_cat)]
            with torch.no_grad():
                for batch in loader:
                    c_true = codes_t[batch.index]
                    cont = None if cont_t is None else cont_t[batch.index]
                    _, chosen = select(batch.x, batch.scale, batch_codes(batch.index, True), cont, [None] * n_cat)
                    for j in range(n_cat):
                        is_new = c_true[:, j] >= n_trained[j]
                        if n_new[j] and bool(is_new.any()):
                            m = c_true[is_new, j] - n_trained[j]
                            votes[j].index_put_((m, chosen[is_new, j]), torch.ones_like(m, dtype=torch.float32),
                                                accumulate=True)
            for j in range(n_cat):
                if n_new[j]:
                    v = reduce_sum(votes[j])
                    new_means[j] = priors[j].mean.detach()[v.argmax(1)].clone()

        for r in range(rounds):
            for batch in loader:
                x, scale, index = batch.x, batch.scale, batch.index
                c = codes_t[index]
                cont = None if cont_t is None else cont_t[index]
                if r == 0:
                    with torch.no_grad():
                        z0, _ = select(x, scale, c, cont, new_means)
                else:
                    z0 = state[index]

                def objective(data, zc, scale):  # codes travel with the counts, so the running cells can be gathered
                    x_, c_, cont_, constant_ = data
                    recon, prior = module.batch_nll(x_, list(torch.split(zc, dims, dim=1)), scale, c_, cont_, new_means,
                                                    constant_)
                    return recon + prior

                data = (x, c, cont, module.recon_constant(x, scale))  # computed once, not in every step
                zc = optimise_latents(objective, data, scale, z0, n_steps, lr, betas, tol, compact=True)
                with torch.no_grad():
                    state[index] = zc
                    loss_out[index] = objective(data, zc, scale)
                bar.update(x.shape[0])
            if any_new and r < rounds - 1:  # M-step: each new mean = the mean covariate latent of its cells
                blocks = torch.split(state, dims, dim=1)
                for j in range(n_cat):
                    if not n_new[j]:
                        continue
                    is_new = codes_t[:, j] >= n_trained[j]
                    m = codes_t[is_new, j] - n_trained[j]
                    sums = torch.zeros(n_new[j], dims[j + 1], device=device).index_add_(0, m, blocks[j + 1][is_new])
                    counts = torch.zeros(n_new[j], device=device).index_add_(0, m, torch.ones_like(m, dtype=torch.float32))
                    sums, counts = reduce_sum(sums), reduce_sum(counts)
                    new_means[j] = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], new_means[j])
    bar.close()
    blocks = [b.cpu().numpy() for b in torch.split(state, dims, dim=1)]
    out_codes = codes.copy()
    with torch.no_grad():
        for j in range(n_cat):
            unknown = out_codes[:, j] < 0
            if unknown.any():
                assigned = priors[j].assign(torch.from_numpy(blocks[j + 1][unknown]).to(device)).cpu().numpy()
                out_codes[unknown, j] = assigned
    means_out = [np.zeros((0, dims[j + 1]), np.float32) if new_means[j] is None else new_means[j].cpu().numpy()
                 for j in range(n_cat)]
    return CovariateInference(z=blocks[0], covariate_z=blocks[1:], codes=out_codes, new_means=means_out,
                              loss=loss_out.cpu().numpy())


def infer_covariate_latents_sharded(module, matrix, scale: np.ndarray | None, n_latent: int, codes: np.ndarray,
                                    continuous: np.ndarray | None, n_new: list[int] | None = None, *,
                                    batch_size: int, device, progress: bool = True,
                                    **infer_kwargs) -> CovariateInference:
    """:func:`infer_covariate_latents` for every row of ``matrix``; under several processes each embeds a
    contiguous slice (new categories' means are averaged over all processes' cells) and the results are
    gathered on every process."""
    if not _dist.is_distributed():
        loader = BatchLoader(matrix, None, scale, batch_size=batch_size, shuffle=False, device=device)
        return infer_covariate_latents(module, loader, n_latent, codes, continuous, n_new, progress=progress,
                                       device=device, **infer_kwargs)
    _dist.init(device=device)
    lo, hi = _dist.shard_bounds(matrix.n_obs)
    loader = BatchLoader(matrix, np.arange(lo, hi), None if scale is None else scale[lo:hi], batch_size=batch_size,
                         shuffle=False, device=device)
    res = infer_covariate_latents(module, loader, n_latent, codes[lo:hi],
                                  None if continuous is None else continuous[lo:hi], n_new,
                                  progress=progress and _dist.is_main_process(), device=device,
                                  reduce_sum=_dist.all_reduce_sum, **infer_kwargs)

    def gather(a):
        return _dist.gather_rows(torch.from_numpy(np.ascontiguousarray(a)), matrix.n_obs).numpy()

    return CovariateInference(z=gather(res.z), covariate_z=[gather(c) for c in res.covariate_z],
                              codes=gather(res.codes), new_means=res.new_means, loss=gather(res.loss))
