"""The one training runner: epochs, validation, early stopping with restore-best, progress, checkpoints,
interruption and the distributed strategy, for every model through its :class:`~dgdlens.train.TrainingPlan`.

Per-step statistics are summed on the device and read once per epoch (one host synchronisation per
epoch, one all-reduce per epoch under ``torchrun``), so the same loop is fast on a GPU.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .checkpoint import read_checkpoint, write_checkpoint
from .plan import TrainingPlan
from .strategy import Strategy, make_strategy

__all__ = ["RunnerConfig", "Runner", "TrainingInterrupted"]


class TrainingInterrupted(KeyboardInterrupt):
    """Training was stopped with Ctrl-C; ``checkpoint_path`` (if not ``None``) resumes it exactly.

    A :class:`KeyboardInterrupt`, so an uncaught one ends a script as Ctrl-C does.

    Parameters
    ----------
    epoch
        The number of epochs completed (the epoch a resume starts from).
    checkpoint_path
        The checkpoint written at the interruption, or ``None`` when no checkpoint path was set or the
        write failed.
    """

    def __init__(self, epoch: int, checkpoint_path: str | None) -> None:
        self.epoch = epoch
        self.checkpoint_path = checkpoint_path
        where = (f"a checkpoint was written to {checkpoint_path}; resume with resume_from={checkpoint_path!r}"
                 if checkpoint_path else "no checkpoint_path was set, so nothing was saved")
        super().__init__(f"Training interrupted during epoch {epoch}; {where}.")


@dataclass
class RunnerConfig:
    """What the runner decides, the same for every model.

    Attributes
    ----------
    max_epochs
        Passes over the training data.
    early_stopping, patience, min_delta, min_rel_delta, min_epochs
        Stop once the monitored value (the plan's validation loss, or its training loss without a
        validation split) has not improved by ``min_delta + min_rel_delta * |best so far|`` for ``patience``
        epochs, never before ``min_epochs``. Labels are never used. ``min_rel_delta`` makes one setting
        mean the same on data whose losses differ by orders of magnitude (nats per cell grow with genes
        and depth).
    restore_best
        End with the weights of the best monitored epoch.
    checkpoint_path, checkpoint_every
        Write a resumable checkpoint (safetensors + JSON, no pickle) every ``checkpoint_every`` epochs,
        at the end, and on Ctrl-C. A checkpoint that cannot be written is a warning, never lost training.
    seed
        Seeds torch's random numbers inside training (dropout); the global generator is left untouched.
    progress
        A tqdm bar over epochs (rank 0 only).
    """

    max_epochs: int = 500
    early_stopping: bool = True
    patience: int = 20
    min_delta: float = 0.0
    min_rel_delta: float = 0.0
    min_epochs: int = 50
    restore_best: bool = True
    checkpoint_path: str | None = None
    checkpoint_every: int = 50
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("max_epochs", "checkpoint_every", "patience"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        if isinstance(self.min_epochs, bool) or int(self.min_epochs) != self.min_epochs or self.min_epochs < 0:
            raise ValueError(f"min_epochs must be a non-negative integer, got {self.min_epochs!r}")
        self.min_epochs = int(self.min_epochs)
        for name in ("min_delta", "min_rel_delta"):
            value = getattr(self, name)
            if isinstance(value, (bool, str)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
            setattr(self, name, float(value))
        if self.checkpoint_path is not None:
            self.checkpoint_path = str(self.checkpoint_path)

    def to_dict(self) -> dict:
        """The settings as a plain dict (for the saved model's ``train_config``).

        Returns
        -------
        dict
            ``{setting name: value}`` for every field.
        """
        return asdict(self)


class Runner:
    """Trains one plan.

    Parameters
    ----------
    plan
        The model's :class:`~dgdlens.train.TrainingPlan`.
    config
        A :class:`RunnerConfig`.
    device
        A resolved ``torch.device``.
    kind, fingerprint
        Recorded in checkpoints; resuming refuses a checkpoint of another kind or other data.
    strategy
        Default: :func:`~dgdlens.train.make_strategy` (data-parallel under ``torchrun``).
    callbacks
        Called as ``callback(row)`` with each epoch's history row (``epoch``, losses, ``time``) after the
        epoch's checkpoint; the plan's module holds that epoch's weights then. For logging and for
        benchmarks that snapshot the model as it trains (``benchmarks/time_to_quality.py``).
    """

    def __init__(self, plan: TrainingPlan, config: RunnerConfig, device: torch.device, *, kind: str,
                 fingerprint: dict, strategy: Strategy | None = None,
                 callbacks: Sequence[Callable[[dict], None]] = ()) -> None:
        self.plan, self.cfg, self.device = plan, config, device
        self.callbacks = list(callbacks)
        self.kind, self.fingerprint = kind, dict(fingerprint)
        self.strategy = make_strategy(device) if strategy is None else strategy
        self.history: list[dict] = []
        self.epoch = 0
        self.best = {"value": math.inf, "epoch": -1, "state": None}
        self.wait = 0
        self.stopped_early = False
        self.fit_time = 0.0
        self.checkpoint_failures = 0
        self._torch_rng: torch.Tensor | None = None
        self._cuda_rng: torch.Tensor | None = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything a bit-exact resume needs.

        Returns
        -------
        dict
            ``epoch`` (epochs completed), ``history`` (rows so far), ``best`` (best monitored value, its
            epoch and the plan's snapshot), ``wait`` (epochs since the last improvement),
            ``stopped_early``, ``torch_rng`` (torch's CPU generator state), on a GPU ``cuda_rng`` (its
            generator state: dropout draws there) and ``plan`` (the plan's
            :meth:`~dgdlens.train.TrainingPlan.state_dict`).
        """
        state = {"epoch": self.epoch, "history": self.history, "best": self.best, "wait": self.wait,
                 "stopped_early": self.stopped_early, "torch_rng": torch.get_rng_state(),
                 "plan": self.plan.state_dict()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (the plan must have been set up).

        Parameters
        ----------
        state
            A dict as returned by :meth:`state_dict`, e.g. read back from a checkpoint.
        """
        self.plan.load_state_dict(state["plan"])
        self.history = [dict(row) for row in state["history"]]
        self.best = dict(state["best"])
        self.wait = int(state["wait"])
        self.epoch = int(state["epoch"])
        self.stopped_early = bool(state.get("stopped_early", False))
        self._torch_rng = state["torch_rng"]
        self._cuda_rng = state.get("cuda_rng")  # absent when written on a CPU: the GPU's then starts at the seed

    def _checkpoint_file(self, path: str | None = None) -> str | None:
        path = self.cfg.checkpoint_path if path is None else path
        return None if path is None else self.strategy.checkpoint_path(path)

    def save_checkpoint(self) -> str | None:
        """Write the checkpoint; a failure (full disk, unwritable path) warns and training goes on.

        Under several processes every process writes its own shard file.

        Returns
        -------
        str or None
            The file written, or ``None`` when no ``checkpoint_path`` is configured or the write failed
            (a :class:`RuntimeWarning` is issued and ``checkpoint_failures`` is incremented).
        """
        path = self._checkpoint_file()
        if path is None:
            return None
        try:
            write_checkpoint(path, self.state_dict(), kind=self.kind, fingerprint=self._full_fingerprint())
        except Exception as err:  # noqa: BLE001 - whatever stopped the write, the training must not be lost
            self.checkpoint_failures += 1
            warnings.warn(f"Could not write the checkpoint {path} ({err}); training goes on without it.",
                          RuntimeWarning, stacklevel=3)
            return None
        return path

    def load_checkpoint(self, path) -> None:
        """Resume from a checkpoint of this kind of run on the same data (after the plan's set-up).

        Parameters
        ----------
        path
            The run's ``checkpoint_path``; under several processes each process reads its own shard of it.

        Raises
        ------
        FileNotFoundError
            If the checkpoint (or, under several processes, this process's shard) does not exist.
        ~dgdlens.train.CheckpointError
            If the file is not a checkpoint of this kind of run, or was written for other data, settings
            or number of processes.
        """
        file = self._checkpoint_file(str(path))
        if self.strategy.world_size > 1 and not Path(file).exists():
            raise FileNotFoundError(f"No checkpoint shard {file}: resume with the same number of processes "
                                    f"({self.strategy.world_size}) and the checkpoint_path of the run.")
        # read onto the CPU: the generator states must be CPU byte tensors, and Adam's step counters stay
        # on the CPU as in a fresh run (on the GPU every step would read them back); load_state_dict moves
        # weights and moments to the device
        state = read_checkpoint(file, kind=self.kind, fingerprint=self._full_fingerprint(), device="cpu")
        self.load_state_dict(state)
        self.strategy.agree([self.epoch], "the epoch of their checkpoint shards (resume from a complete checkpoint)")

    def _full_fingerprint(self) -> dict:
        return {**self.fingerprint, "world_size": self.strategy.world_size, "rank": self.strategy.rank}

    # ------------------------------------------------------------------ one epoch
    def _train_epoch(self) -> dict[str, torch.Tensor]:
        plan = self.plan
        sums: dict[str, torch.Tensor] = {}
        for batch in plan.train_batches():
            plan.zero_grad()
            loss, stats = plan.training_step(batch)
            loss.backward()
            self.strategy.sync_gradients(plan.shared_parameters())
            plan.optimizer_step()
            for name, value in stats.items():
                sums[name] = value.detach() if name not in sums else sums[name] + value.detach()
        plan.on_epoch_end()
        return sums

    def _reduce(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One host transfer (and one all-reduce) for every statistic of the epoch."""
        if not sums:
            return {}
        names = list(sums)
        shapes = [sums[n].shape for n in names]
        # gathered on the training device (a statistic a plan kept on the CPU moves there), then one copy
        flat = torch.cat([sums[n].reshape(-1).to(self.device, torch.float64) for n in names]).cpu()
        flat = self.strategy.reduce_sum(flat)
        out, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = int(torch.Size(shape).numel())
            out[name] = flat[offset:offset + size].reshape(shape)
            offset += size
        return out

    def _improved(self, value: float) -> bool:
        best = self.best["value"]
        if not math.isfinite(best):
            return value < best
        return value < best - (self.cfg.min_delta + self.cfg.min_rel_delta * abs(best))

    # ------------------------------------------------------------------ the loop
    def fit(self, *, resume_from=None) -> list[dict]:
        """Train from epoch 0, or from a checkpoint with ``resume_from``; returns the history rows.

        Runs epochs until ``max_epochs`` or early stopping, then restores the best epoch's weights (with
        ``restore_best``) and calls the plan's ``on_train_end``. Torch's global random state is left as
        it was.

        Parameters
        ----------
        resume_from
            Path of a checkpoint written by an earlier run with the same data and settings (``None``:
            start from epoch 0).

        Returns
        -------
        list of dict
            One row per epoch run so far (including those before a resume): ``epoch``, the plan's
            :meth:`~dgdlens.train.TrainingPlan.summarise` columns and ``time`` (seconds).

        Raises
        ------
        TrainingInterrupted
            After Ctrl-C: the current epoch is finished and a checkpoint written first.
        FloatingPointError
            When a loss column of the history becomes non-finite.
        """
        cfg, plan = self.cfg, self.plan
        plan.setup(self.strategy, self.device)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.seed)
            if self._torch_rng is not None:
                torch.set_rng_state(self._torch_rng)
            if self._cuda_rng is not None and devices:
                torch.cuda.set_rng_state(self._cuda_rng, self.device)
            self._loop()
        if cfg.restore_best and self.best["state"] is not None:
            plan.restore(self.best["state"])
        plan.on_train_end()
        return self.history

    def _loop(self) -> None:
        cfg, plan = self.cfg, self.plan
        monitor = plan.monitored()
        bar = tqdm(total=cfg.max_epochs, initial=min(self.epoch, cfg.max_epochs), desc=f"training {self.kind}",
                   disable=not (cfg.progress and self.strategy.is_main), dynamic_ncols=True)
        t0 = time.perf_counter()
        with _deferred_interrupt() as interrupt:
            while self.epoch < cfg.max_epochs and not self.stopped_early:
                epoch = self.epoch
                tic = time.perf_counter()
                plan.on_epoch_start(epoch)
                sums = self._train_epoch()
                sums.update({f"val::{k}": v for k, v in plan.validation_epoch().items()})
                # every process learns of a Ctrl-C on any of them in the epoch's one reduction
                sums["__interrupt__"] = torch.full((1,), float(interrupt.requested), device=self.device)
                reduced = self._reduce(sums)
                stop_now = float(reduced.pop("__interrupt__")[0]) > 0
                row = {"epoch": epoch, **plan.summarise(reduced), "time": time.perf_counter() - tic}
                self._check_finite(row, epoch)
                self.history.append(row)
                self.epoch = epoch + 1
                value = row.get(monitor, math.inf)
                if self._improved(value):
                    self.best = {"value": value, "epoch": epoch,
                                 "state": plan.snapshot() if cfg.restore_best else None}
                    self.wait = 0
                else:
                    self.wait += 1
                if cfg.early_stopping and self.epoch >= cfg.min_epochs and self.wait >= cfg.patience:
                    self.stopped_early = True
                bar.update(1)
                bar.set_postfix({k: f"{row[k]:.4g}" for k in (plan.monitor_without_validation, monitor) if k in row})
                if stop_now:
                    bar.close()
                    self.fit_time += time.perf_counter() - t0
                    raise TrainingInterrupted(self.epoch, self.save_checkpoint())
                if self.epoch % cfg.checkpoint_every == 0 and not self.stopped_early:
                    self.save_checkpoint()
                for callback in self.callbacks:
                    callback(row)
        bar.close()
        self.fit_time += time.perf_counter() - t0
        self.save_checkpoint()

    def _check_finite(self, row: dict, epoch: int) -> None:
        bad = [k for k, v in row.items() if isinstance(v, float) and k.endswith("loss") and not math.isfinite(v)]
        if bad:
            raise FloatingPointError(
                f"Training diverged at epoch {epoch} ({', '.join(f'{k}={row[k]}' for k in bad)}); lower the learning "
                "rate(s), check the input scale, or resume from an earlier checkpoint."
            )

    def summary(self) -> dict:
        """A summary of the fit.

        Returns
        -------
        dict
            ``best_epoch`` (-1 if no epoch improved the monitored value), ``stopped_early``,
            ``epochs_run``, ``fit_time_s`` (seconds in the epoch loop), ``strategy`` and ``world_size``.
        """
        return {"best_epoch": int(self.best["epoch"]), "stopped_early": bool(self.stopped_early),
                "epochs_run": len(self.history), "fit_time_s": float(self.fit_time),
                "strategy": self.strategy.name, "world_size": int(self.strategy.world_size)}


class _InterruptFlag:
    requested = False


@contextmanager
def _deferred_interrupt():
    """The first Ctrl-C finishes the current epoch, writes a checkpoint and stops (TrainingInterrupted);
    a second one stops at once. Outside the main thread (where signals cannot be caught) this is a no-op."""
    flag = _InterruptFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        print("\nInterrupted: finishing this epoch, then writing a checkpoint (Ctrl-C again stops at once).",
              flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
