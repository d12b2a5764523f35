"""One base for every user-facing model: training through the runner, fitted state, save and load.

A model holds a torch module (the maths) and builds a :class:`~dgdlens.train.TrainingPlan` when asked to
train; :class:`~dgdlens.train.Runner` does the epochs, early stopping, checkpoints and processes. Every
model therefore has the same ``train(max_epochs=..., batch_size=..., early_stopping=..., device=...,
checkpoint_path=..., resume_from=...)``, the same ``is_trained_``, ``history_`` (a DataFrame) and
``train_summary_``, and the same ``save``/``load`` over :mod:`dgdlens._io` (safetensors + JSON).

Subclasses implement ``_make_plan``, ``_collect_training`` (read results back from the plan),
``_fingerprint`` (what a checkpoint must match), ``_payload`` (tensors and config to save) and
``_from_payload`` (rebuild from them).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from .. import _dist
from .._device import resolve_device
from .._io import ModelFormatError, load_model_dir, save_model_dir
from ..train import Runner, RunnerConfig, TrainingPlan
from ..train.fitted import FittedState

__all__ = ["BaseModel", "RUNNER_OPTIONS", "names_digest"]

#: training options the runner owns; everything else given to ``train`` goes to the model's plan
RUNNER_OPTIONS = ("patience", "min_delta", "min_rel_delta", "min_epochs", "restore_best", "checkpoint_every",
                  "seed")


class BaseModel(FittedState):
    """Base of the DGD, DecoderOnly and Autoencoder (see the module docstring)."""

    _model_kind: ClassVar[str] = "base"
    #: default number of epochs of ``train`` for this model
    _default_max_epochs: ClassVar[int] = 500
    _default_batch_size: ClassVar[int] = 256

    module: torch.nn.Module
    device: torch.device

    # ------------------------------------------------------------------ training
    def train(self, max_epochs: int | None = None, batch_size: int | None = None, early_stopping: bool = True, *,
              device: str | torch.device = "auto", checkpoint_path: str | None = None, checkpoint_every: int = 50,
              resume_from: str | None = None, progress: bool = True, callbacks: Sequence[Callable[[dict], None]] = (),
              **plan_kwargs):
        """Train the model; returns ``self``.

        Parameters
        ----------
        max_epochs, batch_size
            Passes over the data and mini-batch size (the model's defaults when ``None``).
        early_stopping
            Stop when the validation loss (the training loss without a validation split) has not improved
            for ``patience`` epochs (never before ``min_epochs``), and restore the best epoch.
        device
            ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
        checkpoint_path, checkpoint_every, resume_from
            Write a resumable checkpoint (safetensors + JSON) every ``checkpoint_every`` epochs, at the end
            and on Ctrl-C; ``resume_from`` continues such a run exactly (pass the same settings).
        progress
            Show a progress bar.
        callbacks
            Functions called as ``callback(row)`` after every epoch with its history row; ``self.module``
            holds that epoch's weights at the time (e.g. to log, or to snapshot the model as it trains).
        **plan_kwargs
            ``patience``, ``min_delta``, ``min_rel_delta``, ``min_epochs``, ``restore_best``, ``seed`` (the
            runner's), and the model's own training options (learning rates, schedules; see the model's
            documentation).
        """
        runner_kwargs = {k: plan_kwargs.pop(k) for k in RUNNER_OPTIONS if k in plan_kwargs}
        runner_kwargs.setdefault("seed", self._default_seed())
        max_epochs = self._default_max_epochs if max_epochs is None else max_epochs
        batch_size = self._default_batch_size if batch_size is None else batch_size
        runner_kwargs = {**self._default_runner_options(max_epochs, batch_size, plan_kwargs), **runner_kwargs}
        config = RunnerConfig(max_epochs=max_epochs, early_stopping=bool(early_stopping),
                              checkpoint_path=checkpoint_path, checkpoint_every=checkpoint_every,
                              progress=bool(progress), **runner_kwargs)
        dev = _dist.local_device(device) if _dist.is_distributed() else resolve_device(device)
        plan = self._make_plan(batch_size=batch_size, seed=config.seed, **plan_kwargs)
        if early_stopping and not plan.has_validation:
            warnings.warn("No validation split (validation_fraction=0 or too few samples): early stopping "
                          "monitors the training loss instead.", stacklevel=2)
        runner = Runner(plan, config, dev, kind=self._model_kind, fingerprint=self._fingerprint(),
                        callbacks=callbacks)
        runner.fit(resume_from=resume_from)
        self.device = dev
        self._collect_training(plan)
        self._record_training(runner, {**config.to_dict(), **plan.describe()})
        return self

    def _default_seed(self) -> int:
        return int(getattr(self, "seed", 0))

    def _default_runner_options(self, max_epochs: int, batch_size: int, plan_kwargs: dict) -> dict:
        """The runner settings this model trains with unless ``train`` is given others (its stopping rule)."""
        return {"min_epochs": min(50, int(max_epochs))}

    def _make_plan(self, *, batch_size: int, seed: int, **plan_kwargs) -> TrainingPlan:
        raise NotImplementedError

    def _collect_training(self, plan: TrainingPlan) -> None:
        raise NotImplementedError

    def _fingerprint(self) -> dict:
        raise NotImplementedError

    def _to(self, device: torch.device) -> None:
        self.module.to(device)
        self.device = device

    # ------------------------------------------------------------------ save / load
    def _payload(self) -> tuple[dict[str, torch.Tensor], dict]:
        raise NotImplementedError

    @classmethod
    def _from_payload(cls, tensors: dict[str, torch.Tensor], config: dict, **load_kwargs):
        raise NotImplementedError

    def save(self, path, overwrite: bool = False) -> None:
        """Save to a directory: ``weights.safetensors`` + ``config.json`` (format, kind, checksums,
        parameters, training history). Under ``torchrun`` rank 0 writes and the others wait."""
        tensors, config = self._payload()
        config = {**config, **self._fitted_config()}
        _dist.run_on_main(save_model_dir, path, tensors, config, kind=self._model_kind, overwrite=overwrite)

    @classmethod
    def load(cls, path, *, device: str | torch.device = "cpu", **load_kwargs):
        """Load a model written by :meth:`save`; everything is validated before anything is built."""
        tensors, config = load_model_dir(path, kind=cls._model_kind)
        try:
            obj = cls._from_payload(tensors, config, **load_kwargs)
        except (KeyError, RuntimeError, TypeError, ValueError) as err:
            if isinstance(err, ModelFormatError):
                raise
            raise ModelFormatError(f"{path} does not hold a complete {cls.__name__} ({err}); pass the modules it "
                                   "was saved with, or save the model again.") from err
        obj._restore_fitted_config(config)
        obj._to(resolve_device(device))
        return obj


def names_digest(names) -> str:
    """A short SHA-256 of an ordered list of names (genes, cells): checkpoints record it, so resuming on
    data with other names (but the same shapes) is refused."""
    import hashlib

    h = hashlib.sha256()
    for name in names:
        h.update(str(name).encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]
