"""DecoderOnly under torchrun (CPU, gloo, 2 processes) against one process.

The test launches this file with ``python -m torch.distributed.run --nproc_per_node=2``; the
``__main__`` block is what each process runs: train a DecoderOnly (latents sharded over the two
processes, the decoder replicated), resume a shorter run from its sharded checkpoints, embed new
samples (sharded), save the model (rank 0), and dump what each rank saw for the assertions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrun_helper import run_torchrun

from dgdlens.models.decoder_only import DecoderOnly
from dgdlens.nn.decoders import mlp_decoder

N, M, P, EPOCHS = 160, 2, 12, 6
MODEL = dict(likelihood="gaussian", validation_fraction=0.1, seed=0)
TRAIN = dict(max_epochs=EPOCHS, batch_size=32, lr=3e-3, lr_rep=0.02, early_stopping=True, patience=3, min_epochs=1,
             polish_steps=10, progress=False, device="cpu")
HELDOUT = dict(n_steps=20, batch_size=10, progress=False)  # 20 new samples: one batch of 10 per rank

pytestmark = pytest.mark.slow


def planted(seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((N, M)).astype(np.float32)
    X = np.tanh(Z @ rng.standard_normal((M, P))) + 0.05 * rng.standard_normal((N, P))
    return X.astype(np.float32)


def make_model(X):
    torch.manual_seed(0)
    return DecoderOnly(X, mlp_decoder(M, P, (16,)), **MODEL)


# ---------------------------------------------------------------------------------------------------
# what every torchrun process runs
# ---------------------------------------------------------------------------------------------------

def _worker(data_path: str, out: str) -> None:
    torch.set_num_threads(1)
    from dgdlens import _dist

    out = Path(out)
    rank = _dist.rank()
    shards = []
    gather = _dist.gather_rows

    def recording_gather(local, n_total, sizes=None):  # the latents this rank owned and trained
        shards.append(local.detach().cpu().numpy().copy())
        return gather(local, n_total, sizes)

    _dist.gather_rows = recording_gather
    X = np.load(data_path)
    model = make_model(X).train(checkpoint_path=str(out / "full.ckpt"), **TRAIN)
    lo, hi = _dist.shard_bounds(len(model.train_idx))
    train_shard = shards[0]  # the first gather of training is the training table's
    model.save(out / "model")  # rank 0 writes, the others wait

    first = make_model(X).train(checkpoint_path=str(out / "half.ckpt"), **(TRAIN | {"max_epochs": 3}))
    resumed = make_model(X).train(resume_from=str(out / "half.ckpt"), **TRAIN)
    heldout = model.get_latent_representation(X[:20] + 0.01, **HELDOUT)

    np.save(out / f"shard{rank}.npy", train_shard)
    np.save(out / f"latent{rank}.npy", model.get_latent_representation())
    np.save(out / f"resumed{rank}.npy", resumed.get_latent_representation())
    np.save(out / f"heldout{rank}.npy", heldout)
    with open(out / f"rank{rank}.json", "w") as fh:
        json.dump({"owned": model.train_idx[lo:hi].tolist(), "world_size": _dist.world_size(),
                   "history": model.history_.drop(columns="time").to_dict("list"),
                   "resumed": resumed.history_.drop(columns="time").to_dict("list"),
                   "first_epochs": len(first.history_), "summary": model.train_summary_}, fh)


# ---------------------------------------------------------------------------------------------------
# the test
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("dist_do")
    X = planted()
    np.save(tmp / "X.npy", X)
    run_torchrun(__file__, tmp / "X.npy", tmp)
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    return tmp, X, ranks


def test_two_processes_match_one_process(run):
    tmp, X, ranks = run
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["summary"]["strategy"] == "data_parallel"
    # early stopping and checkpoint decisions need identical numbers on every rank
    assert ranks[0]["history"] == ranks[1]["history"]
    single = make_model(X).train(**TRAIN)
    other_order = make_model(X).train(**(TRAIN | {"seed": 99}))
    dist_loss = ranks[0]["history"]["val_recon"][-1]
    ref = single.history_["val_recon"].iloc[-1]
    noise = abs(other_order.history_["val_recon"].iloc[-1] - ref)  # what another batch order changes
    print(f"final validation NLL per sample: 2 processes {dist_loss:.4f}, 1 process {ref:.4f}, "
          f"1 process with another batch order {other_order.history_['val_recon'].iloc[-1]:.4f}")
    # stated tolerance: within 3x the batch-order noise of one process, or 1% of the loss
    assert abs(dist_loss - ref) <= max(3 * noise, 0.01 * abs(ref)), (dist_loss, ref, noise)
    assert ranks[0]["history"]["train_recon"][-1] < ranks[0]["history"]["train_recon"][0]  # and it learned
    # held-out inference sharded over the ranks equals one process (same batches of 10)
    expected = DecoderOnly.load(tmp / "model").get_latent_representation(X[:20] + 0.01, **HELDOUT)
    for r in range(2):
        np.testing.assert_allclose(np.load(tmp / f"heldout{r}.npy"), expected, atol=1e-5)


def test_every_training_latent_is_trained_once_by_its_owner(run):
    tmp, X, ranks = run
    model = DecoderOnly.load(tmp / "model")
    z = model.get_latent_representation()
    owned = ranks[0]["owned"] + ranks[1]["owned"]
    train_idx = model.train_idx.tolist()
    assert len(owned) == len(set(owned)) == len(train_idx) and sorted(owned) == train_idx  # a partition
    for r in range(2):
        # each training sample's latent is the one its owning rank trained; every rank ends with all of them
        np.testing.assert_array_equal(z[ranks[r]["owned"]], np.load(tmp / f"shard{r}.npy"))
        np.testing.assert_array_equal(np.load(tmp / f"latent{r}.npy"), z)
    assert np.all(np.abs(z[train_idx]).sum(1) > 0)  # no row left at its zero start
    assert model.is_trained_ and len(model.history_) == len(ranks[0]["history"]["epoch"])


def test_resuming_from_sharded_checkpoints_is_exact(run):
    tmp, _, ranks = run
    for r in range(2):
        assert (tmp / f"full.ckpt.rank{r}-of-2").exists() and (tmp / f"half.ckpt.rank{r}-of-2").exists()
        np.testing.assert_array_equal(np.load(tmp / f"resumed{r}.npy"), np.load(tmp / f"latent{r}.npy"))
    assert ranks[0]["first_epochs"] == 3
    assert ranks[0]["resumed"] == ranks[0]["history"]


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
