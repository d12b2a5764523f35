"""The shared training runner and its checkpoints, independent of any one model's maths.

Truths used: a structure packed into safetensors + JSON and unpacked again is equal to the original
(round trip); a pickle whose payload would create a file is refused and the file never appears; a
checkpoint write that fails leaves training (and the trained model) intact; Ctrl-C ends the epoch,
writes a checkpoint, and resuming from it equals the uninterrupted run.
"""

from __future__ import annotations

import os
import pickle
import signal
import warnings

import numpy as np
import pytest
import torch

import dgdlens as dl
from test_dgd import simulate_nb_mixture
from dgdlens.train import CheckpointError, RunnerConfig, TrainingInterrupted, read_checkpoint, write_checkpoint
from dgdlens.train.checkpoint import pack_state, unpack_state
from dgdlens.train.decoder_only_plan import DecoderOnlyPlan

SMALL = {"n_latent": 3, "hidden": (16,)}
FAST = {"batch_size": 32, "early_stopping": False, "device": "cpu", "progress": False, "polish_steps": 5}


@pytest.fixture(scope="module")
def tiny():
    return simulate_nb_mixture(n_cells=80, n_genes=20, seed=3)


def test_state_round_trip_keeps_types_and_values():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.randn(3, 2))], lr=0.1, betas=(0.5, 0.7))
    opt.param_groups[0]["params"][0].grad = torch.ones(3, 2)
    opt.step()
    state = {"opt": opt.state_dict(), "rng": np.random.default_rng(7).bit_generator.state, "best": float("inf"),
             "tuple": (1, 2.5, "x"), "none": None, "array": np.arange(5, dtype=np.int32), "nested": [{"a": True}]}
    tree, tensors = pack_state(state)
    back = unpack_state(tree, tensors)
    assert back["rng"] == state["rng"] and back["best"] == float("inf") and back["tuple"] == (1, 2.5, "x")
    assert back["none"] is None and back["nested"] == [{"a": True}]
    np.testing.assert_array_equal(back["array"], state["array"])
    assert set(back["opt"]["state"]) == {0}  # integer keys stay integers
    torch.testing.assert_close(back["opt"]["state"][0]["exp_avg"], state["opt"]["state"][0]["exp_avg"])
    assert back["opt"]["param_groups"][0]["betas"] == (0.5, 0.7)


def test_checkpoint_file_round_trip_and_fingerprint(tmp_path):
    path = write_checkpoint(tmp_path / "c.ckpt", {"x": torch.arange(4)}, kind="K", fingerprint={"n": 4})
    assert torch.equal(read_checkpoint(path, kind="K", fingerprint={"n": 4})["x"], torch.arange(4))
    with pytest.raises(CheckpointError, match="other data"):
        read_checkpoint(path, kind="K", fingerprint={"n": 5})
    with pytest.raises(CheckpointError, match="not of a 'L'"):
        read_checkpoint(path, kind="L", fingerprint={"n": 4})
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]  # no temporary file left behind


class _Payload:
    """Unpickling this creates the marker file: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_pickle_checkpoint_is_refused_without_running(tiny, tmp_path):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.ckpt"
    crafted.write_bytes(pickle.dumps({"epoch": 1, "payload": _Payload(marker)}))
    torch.save({"payload": _Payload(marker)}, tmp_path / "crafted.pt")  # torch's zip-pickle format too
    for path in (crafted, tmp_path / "crafted.pt"):
        with pytest.raises(CheckpointError, match="never loaded"):
            dl.DGD(tiny, seed=0, **SMALL).train(max_epochs=2, resume_from=str(path), **FAST)
    assert not marker.exists()


def test_an_unwritable_checkpoint_warns_and_training_goes_on(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    model = dl.DGD(tiny, seed=0, **SMALL)
    with pytest.warns(RuntimeWarning, match="Could not write the checkpoint"):
        model.train(max_epochs=3, checkpoint_path=str(blocker / "run.ckpt"), checkpoint_every=1, **FAST)
    assert model.is_trained_ and len(model.history_) == 3 and model.train_summary_["epochs_run"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_ctrl_c_finishes_the_epoch_writes_a_checkpoint_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    straight = dl.DGD(tiny, seed=1, **SMALL).train(max_epochs=5, **FAST)

    original = DecoderOnlyPlan.on_epoch_end
    calls = {"n": 0}

    def interrupt_in_epoch_two(plan):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does
        original(plan)

    monkeypatch.setattr(DecoderOnlyPlan, "on_epoch_end", interrupt_in_epoch_two)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(TrainingInterrupted) as info:
        dl.DGD(tiny, seed=1, **SMALL).train(max_epochs=5, checkpoint_path=str(ckpt), **FAST)
    assert info.value.epoch == 2 and info.value.checkpoint_path == str(ckpt) and ckpt.exists()
    assert "resume_from" in str(info.value)
    monkeypatch.setattr(DecoderOnlyPlan, "on_epoch_end", original)

    resumed = dl.DGD(tiny, seed=1, **SMALL).train(max_epochs=5, resume_from=str(ckpt), **FAST)
    np.testing.assert_array_equal(resumed.history_["train_loss"], straight.history_["train_loss"])
    np.testing.assert_array_equal(resumed.get_latent_representation(), straight.get_latent_representation())


@pytest.mark.parametrize("bad", [{"max_epochs": 0}, {"checkpoint_every": 0}, {"patience": -1},
                                 {"min_epochs": 1.5}, {"min_delta": -1.0}])
def test_runner_settings_are_validated(bad):
    with pytest.raises(ValueError, match="must be"):
        RunnerConfig(**bad)


def test_unknown_training_options_name_the_valid_ones(tiny):
    with pytest.raises(TypeError, match="valid options"):
        dl.DGD(tiny, **SMALL).train(max_epochs=1, learning_rate=0.1, **FAST)


def test_a_diverging_run_raises_a_clear_error(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FloatingPointError, match="diverged"):
            dl.DGD(tiny, seed=0, **SMALL).train(max_epochs=3, lr_decoder=float("inf"), **FAST)


def test_latent_optimisation_stops_each_sample_on_its_own():
    """A sample's result must not depend on its batch-mates: optimised alone or in any batch, the same
    latent (quadratic bowls of very different curvature converge after very different step counts)."""
    from dgdlens.train.inference import optimise_latents

    gen = torch.Generator().manual_seed(0)
    target = torch.randn(6, 3, generator=gen)
    weight = torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0, 0.5])[:, None]

    def objective(x, z, scale):
        return ((z - x) ** 2 * scale).sum(1) + 1.0  # an offset, as NB losses have: relative changes get small

    z0 = torch.zeros(6, 3)
    together = optimise_latents(objective, target, weight, z0, 300, 0.05, (0.5, 0.7), 1e-4)
    for i in range(6):
        alone = optimise_latents(objective, target[i:i + 1], weight[i:i + 1], z0[i:i + 1], 300, 0.05, (0.5, 0.7), 1e-4)
        torch.testing.assert_close(together[i:i + 1], alone, rtol=0, atol=0)
    everything = optimise_latents(objective, target, weight, z0, 300, 0.05, (0.5, 0.7), 0.0)
    # without a tolerance the stiff bowls reach their targets (within Adam's step); with it some samples stopped early
    torch.testing.assert_close(everything[3:5], target[3:5], atol=0.1, rtol=0)
    assert not torch.equal(together, everything)


class _ScriptedPlan(dl.train.TrainingPlan):
    """A plan whose monitored loss follows a given sequence, one value per epoch (nothing is learned)."""

    monitor_without_validation = "train_loss"

    def __init__(self, losses):
        super().__init__()
        self.losses, self.epoch = list(losses), 0
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def train_batches(self):
        return [None]

    def zero_grad(self):
        self.weight.grad = None

    def training_step(self, batch):
        value = torch.tensor(self.losses[min(self.epoch, len(self.losses) - 1)], dtype=torch.float64)
        return self.weight * 0.0, {"loss": value}

    def optimizer_step(self):
        pass

    def on_epoch_end(self):
        self.epoch += 1

    def summarise(self, sums):
        return {"train_loss": float(sums["loss"])}

    def snapshot(self):
        return {"epoch": self.epoch}

    def restore(self, snapshot):
        self.restored = snapshot["epoch"]


def _run_scripted(losses, **settings):
    from dgdlens.train import Runner

    plan = _ScriptedPlan(losses)
    cfg = RunnerConfig(**{"max_epochs": len(losses), "min_epochs": 0, "progress": False, **settings})
    return Runner(plan, cfg, torch.device("cpu"), kind="scripted", fingerprint={}).fit(), plan


def test_relative_min_delta_means_the_same_at_any_loss_scale():
    # improvements of 0.02 % per epoch after epoch 3 (0.06 % over the patience of 3): below a 0.1 % bar,
    # above a 0.01 % one, at every scale
    shape = [1.0, 0.9, 0.8, 0.7] + [0.7 * 0.9998 ** k for k in range(1, 12)]
    for scale in (1.0, 1e3, 1e6):
        losses = [scale * v for v in shape]
        history, plan = _run_scripted(losses, patience=3, min_rel_delta=1e-3)
        assert len(history) == 7 and plan.restored == 4  # epoch 3 (0-based) was the last to count; 3 waited
        history, _ = _run_scripted(losses, patience=3, min_rel_delta=1e-4)
        assert len(history) == len(losses)  # every step counts
    # an absolute bar fitted to one scale means nothing at another
    history, _ = _run_scripted([1e6 * v for v in shape], patience=3, min_delta=1e-3 * 0.7)
    assert len(history) == len(shape)


def test_compacted_latent_optimisation_equals_the_full_batch():
    """Computing only on the still-running samples (per-sample inputs through x as a tuple) gives the same
    latents as computing on every sample each step, with far fewer sample evaluations."""
    from dgdlens.train.inference import optimise_latents

    gen = torch.Generator().manual_seed(1)
    n = 64
    target = torch.randn(n, 3, generator=gen)
    weight = 10.0 ** torch.empty(n, 1).uniform_(-2, 2, generator=gen)  # very different stopping steps
    offset = torch.rand(n, generator=gen) + 0.5
    evaluated = {"rows": 0}

    def objective(data, z, scale):
        t, off = data
        evaluated["rows"] += len(z)
        return ((z - t) ** 2 * scale).sum(1) + off

    z0 = torch.zeros(n, 3)
    full = optimise_latents(objective, (target, offset), weight, z0, 300, 0.05, (0.5, 0.7), 1e-4)
    full_rows = evaluated["rows"]
    evaluated["rows"] = 0
    compact = optimise_latents(objective, (target, offset), weight, z0, 300, 0.05, (0.5, 0.7), 1e-4, compact=True)
    torch.testing.assert_close(compact, full, rtol=0, atol=1e-6)
    assert evaluated["rows"] < 0.6 * full_rows
    for i in (0, 17, 63):  # and each sample as if optimised alone
        alone = optimise_latents(objective, (target[i:i + 1], offset[i:i + 1]), weight[i:i + 1], z0[i:i + 1], 300,
                                 0.05, (0.5, 0.7), 1e-4)
        torch.testing.assert_close(compact[i:i + 1], alone, rtol=0, atol=1e-6)


def test_dgd_stopping_rule_and_latent_rate_defaults(tiny, monkeypatch):
    """The DGD's defaults with the PCA start: a 0.1 % relative bar over 10 epochs, no stop before 1,000
    decoder steps, latent learning rate 0.03; from the origin the reference's 0.01 and the former rule
    (patience 20, at least 50 epochs); a user's values win."""
    import math

    def settings(model):
        cfg = model.train_config_
        return cfg["min_rel_delta"], cfg["patience"], cfg["min_epochs"], cfg["lr_rep"]

    import dgdlens.models.dgd as dgd_module

    assert dgd_module.MIN_DECODER_STEPS == 1000
    monkeypatch.setattr(dgd_module, "MIN_DECODER_STEPS", 100)  # the same rule, 10x fewer steps to train
    model = dl.DGD(tiny, seed=0, **SMALL)
    floor = math.ceil(100 / math.ceil(len(model.train_idx) / 8))  # epochs of 100 steps of batches of 8
    model.train(max_epochs=500, **{**FAST, "batch_size": 8, "early_stopping": True})
    assert model.train_config_["min_epochs"] == floor and len(model.history_) >= floor
    model = dl.DGD(tiny, seed=0, **SMALL).train(max_epochs=2, **FAST)
    assert settings(model) == (1e-3, 10, 2, 0.03) and model.train_config_["latent_init"] == "pca"
    mine = dl.DGD(tiny, seed=0, **SMALL).train(max_epochs=2, patience=3, min_rel_delta=0.0, lr_rep=0.01, **FAST)
    assert settings(mine) == (0.0, 3, 2, 0.01)
    origin = dl.DGD(tiny, seed=0, **SMALL).train(max_epochs=60, latent_init="zeros", **FAST)
    assert settings(origin) == (0.0, 20, 50, 0.01)
