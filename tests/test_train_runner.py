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
