"""Training plan of every sparse autoencoder variant (:mod:`dgdlens.sae`).

One step: Adam with a linear learning-rate warm-up and decay, a linear warm-up of the sparsity
coefficient, the decoder rows kept at unit norm (gradient projected, rows renormalised) unless the config
says otherwise, optional gradient clipping, and dead-latent tracking. Whatever differs between variants
is a method of the variant (``auxiliary_loss``: AuxK; ``training_statistics``/``end_training_epoch``:
BatchTopK's running threshold; ``after_training``: its calibration), so the plan has no type checks.

The hot path never waits for the device: per-step statistics (loss x n, squared error, variance, active
count and the per-latent fire counts) stay device tensors that the runner sums and reads once per epoch,
and the learning rate and sparsity coefficient follow from the step counter on the host.

Under ``torchrun`` (:class:`~dgdlens.train.DataParallel`) every process takes a contiguous shard of the
training (and validation) rows, with a local batch of ``ceil(batch_size / world_size)`` rows and the same
number of steps per epoch on every process; each local loss is weighted by its share of the global batch,
so the all-reduced gradients of the SAE's parameters are those of the global batch. The per-step fire
counts ride in the same all-reduce as the gradients (one extra row of a "parameter" that is never
optimised), so the dead-latent mask, and with it AuxK, is computed from the *global* counts, exactly as
in one process, without a second collective per step.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from .plan import TrainingPlan

__all__ = ["SAEPlan"]


class SAEPlan(TrainingPlan):
    """Trains an SAE variant on the rows of an embedding (see the module docstring).

    Parameters
    ----------
    model
        The SAE variant (its ``config`` holds every training hyperparameter), freshly initialised.
    rows
        The data (:class:`~dgdlens.sae.EmbeddingRows`).
    train_idx, val_idx
        Sorted rows of each split.
    seed
        Seeds the data-dependent initialisation and the batch order.
    prepare
        Set the normalisation and initialise from the data in :meth:`setup` (``False``: train the weights
        as given, normalisation included).
    """

    monitor = "val_loss"
    monitor_without_validation = "train_loss"

    def __init__(self, model, rows, train_idx: np.ndarray, val_idx: np.ndarray, *, seed: int = 0,
                 prepare: bool = True) -> None:
        super().__init__()
        self.model, self.cfg, self.rows = model, model.config, rows
        self.train_idx = np.asarray(train_idx, dtype=np.int64)
        self.val_idx = np.asarray(val_idx, dtype=np.int64)
        self.n_train, self.n_val = len(self.train_idx), len(self.val_idx)
        self.seed, self.prepare = int(seed), bool(prepare)
        self.step = 0
        self.last_lr = self.last_coef = 0.0
        self.normalize_mean: np.ndarray | None = None
        self.normalize_scale: float | None = None

    # ------------------------------------------------------------------ set-up
    @property
    def has_validation(self) -> bool:
        """Whether ``val_idx`` is non-empty (then early stopping watches ``val_loss``)."""
        return self.n_val > 0

    def setup(self, strategy, device) -> None:
        """Check the processes agree, move the model and the data to ``device``, fit the normalisation and
        the data-dependent initialisation (with ``prepare``), broadcast rank 0's weights, fix the batch
        layout and the learning-rate and sparsity schedules, and build the Adam optimiser.

        Parameters
        ----------
        strategy
            The runner's :class:`~dgdlens.train.Strategy`.
        device
            The resolved training device.
        """
        super().setup(strategy, device)
        model, cfg, size = self.model, self.cfg, strategy.world_size
        self.check_same_everywhere(self.rows.n_obs, self.rows.n_vars, self.train_idx, self.n_val, cfg.batch_size,
                                   self.seed, cfg.n_latents, cfg.max_epochs, what="the data, split or SAE settings")
        model.to(device)
        self.data = self.rows.to_device(device)
        lo, hi = strategy.shard(self.n_train)
        self.local_train = self.train_idx[lo:hi]
        vlo, vhi = strategy.shard(self.n_val)
        self.local_val = self.val_idx[vlo:vhi]
        # with the data on the device, its validation rows are indexed by a tensor there, copied once:
        # a numpy index becomes a host-to-GPU copy that waits for the GPU in every validation batch
        self._val_index = (self.local_val if self.data.tensor is None else
                           torch.as_tensor(np.asarray(self.local_val, np.int64), device=self.data.tensor.device))
        if self.prepare:
            reduce = strategy.reduce_sum if size > 1 else None
            self.normalize_mean, self.normalize_scale = model.prepare_for_training(
                self.data, self.train_idx, self.local_train, self.seed, reduce_sum=reduce)
            mean = self.normalize_mean
        else:
            mean = np.zeros(model.d_in)
        with torch.no_grad():
            self.data_mean_n = model.normalise(torch.as_tensor(mean, dtype=torch.float32, device=device)).detach()
        strategy.broadcast_module(model)

        # batches: the same number of steps on every process; the last local batch takes the remainder
        self.local_batch = math.ceil(cfg.batch_size / size)
        shard_sizes = [self.n_train * (r + 1) // size - self.n_train * r // size for r in range(size)]
        self.steps_per_epoch = max(1, math.ceil(min(shard_sizes) / self.local_batch))
        self.last_global = self.n_train - (self.steps_per_epoch - 1) * self.local_batch * size
        self.total_steps = cfg.max_epochs * self.steps_per_epoch
        self.lr_warm = int(round(cfg.lr_warmup * self.total_steps))
        self.lr_decay = int(round(cfg.lr_decay * self.total_steps))
        self.l1_warm = int(round(cfg.l1_warmup * self.total_steps))
        self.base_lr = cfg.effective_lr()

        self.dead_after = cfg.dead_after if cfg.dead_after is not None else self.n_train
        self.since_fired = torch.zeros(cfg.n_latents, dtype=torch.long, device=device)
        # not optimised: its "gradient" carries the step's fire counts through the gradient all-reduce
        self.fire_counts = torch.nn.Parameter(torch.zeros(cfg.n_latents, device=device))
        self.rng = np.random.default_rng(self.seed + 2 if size == 1 else [self.seed + 2, strategy.rank])
        self.optimizer = torch.optim.Adam(model.parameters(), lr=self.base_lr * self._lr_factor(0),
                                          betas=cfg.adam_betas, eps=cfg.adam_eps)
        self.step = 0

    # ------------------------------------------------------------------ schedules (host arithmetic, no sync)
    def _lr_factor(self, step: int) -> float:
        factor = 1.0
        if self.lr_warm > 0 and step < self.lr_warm:
            factor = (step + 1) / self.lr_warm
        if self.lr_decay > 0 and step >= self.total_steps - self.lr_decay:
            factor = min(factor, max(self.total_steps - step, 0) / self.lr_decay)
        return factor

    def _sparsity_coef(self, step: int) -> float:
        if self.l1_warm > 0 and step < self.l1_warm:
            return self.cfg.l1_coef * (step + 1) / self.l1_warm
        return self.cfg.l1_coef

    # ------------------------------------------------------------------ steps
    def on_epoch_start(self, epoch: int) -> None:
        """Put the model in training mode (the schedules follow the step counter, not the epoch).

        Parameters
        ----------
        epoch
            The 0-based epoch about to start (unused).
        """
        self.model.train()

    def train_batches(self):
        """One epoch of this process's training rows in a fresh random order.

        Yields
        ------
        index : torch.Tensor or numpy.ndarray
            Rows of the embedding in this local batch (a device tensor when the data live on the device).
        n : int
            Rows in this local batch (the last batch of the epoch takes the remainder).
        n_global : int
            Rows in the matching global batch over all processes.
        """
        order = self.rng.permutation(self.local_train)
        on_device = self.data.on_device
        index = torch.from_numpy(order).to(on_device) if on_device is not None else order  # one upload per epoch
        size, last = self.strategy.world_size, self.steps_per_epoch - 1
        for j in range(self.steps_per_epoch):
            start = j * self.local_batch
            stop = start + self.local_batch if j < last else len(order)
            yield index[start:stop], stop - start, (self.local_batch * size if j < last else self.last_global)

    def zero_grad(self) -> None:
        """Clear the optimiser's gradients and the step's fire counts."""
        self.optimizer.zero_grad(set_to_none=True)
        self.fire_counts.grad = None

    def _forward(self, x: torch.Tensor, coef: float):
        model, cfg = self.model, self.cfg
        x_n = model.normalise(x)
        pre = model.pre_activations(x_n)
        f = model.activate_train(pre)
        x_hat = model.decode_normalised(f)
        sq_err = (x_hat - x_n).pow(2).sum(1)
        mse = sq_err.mean() if cfg.mse_convention == "sum" else sq_err.mean() / cfg.d_in
        loss = mse + coef * model.sparsity_loss(f, pre) if coef > 0 else mse
        return loss, x_n, pre, f, x_hat, sq_err

    def training_step(self, batch):
        """Loss and statistics of one batch at the current step's learning rate and sparsity coefficient.

        The loss is the reconstruction MSE (per sample, or per sample and feature with
        ``mse_convention="mean"``) plus the sparsity coefficient times the variant's sparsity loss plus its
        auxiliary loss (AuxK) on the dead latents; under several processes it is weighted by
        ``n / n_global``. The per-latent fire counts are stored as the gradient of ``fire_counts``.

        Parameters
        ----------
        batch
            ``(index, n, n_global)`` from :meth:`train_batches`.

        Returns
        -------
        loss : torch.Tensor
            Scalar loss to backpropagate.
        sums : dict of str to torch.Tensor
            Float64 sums over the batch: ``loss`` (loss x n), ``sq_err`` (squared error of the normalised
            reconstruction), ``var`` (squared deviation of the normalised inputs from the data mean),
            ``active`` (active latents), ``fires`` (``(n_latents,)`` rows each latent fired on), plus the
            variant's ``training_statistics``.
        """
        index, n, n_global = batch
        self.last_coef, self.last_lr = self._sparsity_coef(self.step), self.base_lr * self._lr_factor(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = self.last_lr
        self._n_global = n_global
        loss, x_n, pre, f, x_hat, sq_err = self._forward(self.data.rows(index, self.device), self.last_coef)
        aux = self.model.auxiliary_loss(pre, x_n, x_hat, self.since_fired >= self.dead_after)
        if aux is not None:
            loss = loss + aux
        f = f.detach()
        active = f > 0
        fires = active.sum(0)
        self.fire_counts.grad = fires.to(self.fire_counts.dtype)
        stats = {"loss": loss.detach().double() * n, "sq_err": sq_err.detach().sum().double(),
                 "var": (x_n.detach() - self.data_mean_n).pow(2).sum().double(), "active": active.sum().double(),
                 "fires": fires.double(), **self.model.training_statistics(f)}
        if self.strategy.world_size > 1:  # summed over processes, the gradients are the global batch's
            loss = loss * (n / n_global)
        return loss, stats

    def shared_parameters(self):
        """The SAE's parameters plus the fire-count carrier, whose gradient all-reduce sums the step's
        per-latent fire counts over processes.

        Returns
        -------
        list of torch.nn.Parameter
            ``[*model.parameters(), fire_counts]``.
        """
        return [*self.model.parameters(), self.fire_counts]

    @torch.no_grad()
    def optimizer_step(self) -> None:
        """Project out the decoder rows' radial gradient (``decoder_norm="unit"``), clip the gradient norm
        (``grad_clip``), take the Adam step, renormalise the decoder rows, update the steps-since-fired
        counters from the global fire counts, and advance the step counter."""
        model, cfg = self.model, self.cfg
        if cfg.decoder_norm == "unit" and model.W_dec.grad is not None:
            # remove the gradient component along each unit decoder row (it would only change the norm)
            W, grad = model.W_dec, model.W_dec.grad
            grad -= (grad * W).sum(1, keepdim=True) * W
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        if cfg.decoder_norm == "unit":
            W = model.W_dec
            W /= W.norm(dim=1, keepdim=True).clamp_min(1e-12)
        fired = self.fire_counts.grad > 0  # summed over processes: the global batch's fires
        self.since_fired.add_(self._n_global).masked_fill_(fired, 0)
        self.step += 1

    @torch.no_grad()
    def validation_epoch(self) -> dict[str, torch.Tensor]:
        """Loss statistics of this process's validation rows (eval mode, full sparsity coefficient, no AuxK).

        Returns
        -------
        dict of str to torch.Tensor
            Float64 scalar sums ``loss``, ``sq_err``, ``var`` and ``active`` as in :meth:`training_step`;
            ``{}`` without a validation split.
        """
        if not self.has_validation:
            return {}
        self.model.eval()
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        sums = {"loss": zero, "sq_err": zero, "var": zero, "active": zero}
        for start in range(0, len(self.local_val), self.local_batch):
            index = self._val_index[start:start + self.local_batch]
            loss, x_n, pre, f, x_hat, sq_err = self._forward(self.data.rows(index, self.device), self.cfg.l1_coef)
            sums["loss"] = sums["loss"] + loss.double() * len(index)
            sums["sq_err"] = sums["sq_err"] + sq_err.sum().double()
            sums["var"] = sums["var"] + (x_n - self.data_mean_n).pow(2).sum().double()
            sums["active"] = sums["active"] + (f > 0).sum().double()
        return sums

    def summarise(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """The epoch's history row; first hands the sums to the variant's ``end_training_epoch`` (BatchTopK's
        running threshold).

        Parameters
        ----------
        sums
            Process-summed statistics of :meth:`training_step` and (``val::``-prefixed)
            :meth:`validation_epoch`.

        Returns
        -------
        dict of str to float
            ``train_loss`` (per sample), ``train_fvu`` (fraction of variance unexplained), ``train_l0``
            (active latents per sample), ``dead_fraction`` (latents that never fired this epoch),
            ``dense_fraction`` (latents firing on more than ``dense_threshold`` of the samples), ``lr`` and
            ``sparsity_coef`` (of the epoch's last step); with validation also ``val_loss``, ``val_fvu``
            and ``val_l0``.
        """
        self.model.end_training_epoch(sums)
        n, fires = self.n_train, sums["fires"]
        row = {"train_loss": float(sums["loss"]) / n,
               "train_fvu": float(sums["sq_err"]) / max(float(sums["var"]), 1e-12),
               "train_l0": float(sums["active"]) / n,
               "dead_fraction": float((fires == 0).float().mean()),
               "dense_fraction": float((fires.float() / n > self.cfg.dense_threshold).float().mean()),
               "lr": self.last_lr,  # of the epoch's last step
               "sparsity_coef": self.last_coef}
        if "val::loss" in sums:
            row.update({"val_loss": float(sums["val::loss"]) / self.n_val,
                        "val_fvu": float(sums["val::sq_err"]) / max(float(sums["val::var"]), 1e-12),
                        "val_l0": float(sums["val::active"]) / self.n_val})
        return row

    # ------------------------------------------------------------------ end of training
    def _calibration_batches(self):
        """This process's share of seeded full-size batches of all training rows (a short last batch is left
        out unless it is the only one: it would keep fewer activations)."""
        order = np.random.default_rng(0).permutation(self.train_idx)
        size = self.cfg.batch_size
        starts = [s for s in range(0, len(order), size) if s == 0 or s + size <= len(order)]
        lo, hi = self.strategy.shard(len(starts))
        for s in starts[lo:hi]:
            yield self.data.rows(order[s:s + size], self.device)

    def on_train_end(self) -> None:
        """Put the model in eval mode and run the variant's ``after_training`` (BatchTopK's threshold
        calibration) on seeded full-size batches of all training rows, shared over the processes."""
        self.model.eval()
        self.model.after_training(self._calibration_batches(), self.strategy.reduce_sum)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The resumable state.

        Returns
        -------
        dict
            ``model`` (weights), ``optimizer`` (Adam state), ``since_fired`` (``(n_latents,)`` samples since
            each latent last fired), ``step`` and ``rng`` (the batch order's generator state).
        """
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "since_fired": self.since_fired, "step": self.step, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (after :meth:`setup`).

        Parameters
        ----------
        state
            A dict as returned by :meth:`state_dict`.
        """
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            self.since_fired.copy_(state["since_fired"])
        self.step = int(state["step"])
        self.rng.bit_generator.state = state["rng"]

    def snapshot(self) -> dict:
        """A deep copy of the model's weights.

        Returns
        -------
        dict
            ``{"model": copied state dict}``.
        """
        return {"model": copy.deepcopy(self.model.state_dict())}

    def restore(self, snapshot: dict) -> None:
        """Load the model's weights from a :meth:`snapshot`.

        Parameters
        ----------
        snapshot
            A dict returned by :meth:`snapshot`.
        """
        self.model.load_state_dict(snapshot["model"])

    def describe(self) -> dict:
        """The settings derived at set-up (the hyperparameters themselves live in the model's config).

        Returns
        -------
        dict
            ``n_train``, ``n_val``, ``steps_per_epoch``, ``local_batch_size``, ``lr`` (base learning rate),
            ``dead_after`` (samples without firing before a latent counts as dead), ``normalize_mean``
            (list or ``None``) and ``normalize_scale``.
        """
        return {"n_train": self.n_train, "n_val": self.n_val, "steps_per_epoch": self.steps_per_epoch,
                "local_batch_size": self.local_batch, "lr": self.base_lr, "dead_after": int(self.dead_after),
                "normalize_mean": None if self.normalize_mean is None else np.asarray(self.normalize_mean).tolist(),
                "normalize_scale": self.normalize_scale}
