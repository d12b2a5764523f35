"""What every trained object records the same way: models and SAEs alike."""

from __future__ import annotations

import time
import warnings

import pandas as pd

from .runner import Runner

__all__ = ["FittedState"]


class FittedState:
    """``is_trained_``, ``history_``, ``train_summary_`` and ``train_config_``: what every trained object
    (models and SAEs) records, saves and restores the same way."""

    is_trained_: bool = False

    def _init_fitted_state(self) -> None:
        self.is_trained_ = False
        self.history_ = pd.DataFrame()
        self.train_summary_: dict = {}
        self.train_config_: dict | None = None

    def _record_training(self, runner: Runner, train_config: dict) -> None:
        new = pd.DataFrame(runner.history)
        if self.is_trained_ and len(self.history_) and len(new) and int(new["epoch"].iloc[0]) == 0:
            # a second train() call continues the model: keep the earlier epochs, number on from them
            new["epoch"] += int(self.history_["epoch"].iloc[-1]) + 1
            new = pd.concat([self.history_, new], ignore_index=True)
        self.history_ = new
        self.train_summary_ = runner.summary()
        self.train_config_ = train_config
        self.is_trained_ = True

    def _fitted_config(self) -> dict:
        return {"is_trained": bool(self.is_trained_), "train_config": self.train_config_,
                "train_summary": self.train_summary_, "history": self.history_.to_dict(orient="list"),
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def _restore_fitted_config(self, cfg: dict) -> None:
        self.is_trained_ = bool(cfg.get("is_trained"))
        self.train_config_ = cfg.get("train_config")
        self.train_summary_ = cfg.get("train_summary") or {}
        self.history_ = pd.DataFrame(cfg.get("history") or {})

    def _warn_if_untrained(self) -> None:
        if not self.is_trained_:
            warnings.warn(f"The {type(self).__name__} has not been trained; results come from its initial weights.",
                          stacklevel=3)
