"""Multi-process training under torchrun (CPU, gloo, 2 processes) against single-process training.

The test launches this file with ``torchrun --nproc_per_node=2``; the ``__main__`` block below is
what each process runs: train a DGD from a backed file (cells sharded over the two processes),
save it (rank 0), resume from sharded checkpoints, embed new cells (sharded), and dump what each
rank saw for the assertions.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from torchrun_helper import run_torchrun

from dgdlens.data.matrix import write_h5ad_in_chunks
from dgdlens.models.dgd import DGD
from dgdlens.sim.counts import simulate_count_chunks

N_CELLS, N_GENES, EPOCHS = 600, 100, 6
MODEL = dict(n_latent=3, n_components=3, seed=0)
SUBSAMPLE = 200
#: uniform samples: their training loss is comparable between one process and two (a residual sample ranks
#: the cells per process, so its sample, and the loss over it, differ by design)
SUB_BY = {"decoder_subsample_by": "random"}
TRAIN = dict(batch_size=64, early_stopping=True, patience=3, min_epochs=1, progress=False, prior_refit_epoch=2)


def _new_cells(adata) -> ad.AnnData:
    return ad.AnnData(adata.X[0:60], obs=pd.DataFrame(index=[f"new{i}" for i in range(60)]), var=adata.var.copy())


# ---------------------------------------------------------------------------------------------------
# what every torchrun process runs
# ---------------------------------------------------------------------------------------------------

def _worker(data_path: str, out: str) -> None:
    torch.set_num_threads(1)
    from dgdlens import _dist as distributed

    out = Path(out)
    rank = int(os.environ["RANK"])
    shards = []
    gather = distributed.gather_rows

    refits = []

    def recording_gather(local, n_total, sizes=None):  # see exactly which latents this rank owned and trained
        if sizes is None:  # a shard of a table (not the mixture refit's sample)
            shards.append(local.detach().cpu().numpy().copy())
        rows = gather(local, n_total, sizes)
        if sizes is not None:  # the mixture refit's sample (with a weighted decoder sample: weights last)
            refits.append(rows.detach().cpu().numpy().copy())
        return rows

    distributed.gather_rows = recording_gather
    backed = ad.read_h5ad(data_path, backed="r")
    model = DGD(backed, **MODEL)
    model.train(max_epochs=EPOCHS, checkpoint_path=str(out / "full.ckpt"), **TRAIN)
    lo, hi = distributed.shard_bounds(len(model.train_idx))
    owned = model.obs_names[model.train_idx[lo:hi]]
    model.save(out / "model")  # rank 0 writes, the others wait

    # checkpoints: 3 epochs, then resume to EPOCHS: must match the uninterrupted run
    first = DGD(backed, **MODEL)
    first.train(max_epochs=3, checkpoint_path=str(out / "half.ckpt"), **TRAIN)
    resumed = DGD(backed, **MODEL)
    resumed.train(max_epochs=EPOCHS, resume_from=str(out / "half.ckpt"), **TRAIN)

    # the epochs on a subsample of 200 cells (100 per rank), the other cells embedded at the end
    sub = DGD(backed, **MODEL)
    sub.train(max_epochs=EPOCHS, decoder_subsample=SUBSAMPLE, **SUB_BY, **TRAIN)
    np.save(out / f"sub_latent{rank}.npy", sub.get_latent_representation())
    # the residual sample with a weighted refit: every rank's rows reach the refit with their weights
    res = DGD(backed, **MODEL)
    res.train(max_epochs=EPOCHS, decoder_subsample=SUBSAMPLE, decoder_subsample_by="residual",
              refit_sample_weights=True, **TRAIN)
    np.save(out / f"refit{rank}.npy", refits[-1])
    prior = res.module.prior
    np.savez(out / f"res_prior{rank}.npz", mean=prior.mean.detach().numpy(),
             weights=prior.log_weights().exp().detach().numpy(), neglogvar=prior.neglogvar.detach().numpy())

    heldout = model.get_latent_representation(_new_cells(backed), n_steps=30, batch_size=30, progress=False)
    np.save(out / f"shard{rank}.npy", shards[0])
    np.save(out / f"latent{rank}.npy", model.get_latent_representation())
    np.save(out / f"heldout{rank}.npy", heldout)
    with open(out / f"rank{rank}.json", "w") as fh:
        json.dump({"owned": list(map(str, owned)), "history": model.history_.drop(columns="time").to_dict("list"),
                   "resumed": resumed.history_.drop(columns="time").to_dict("list"),
                   "sub": sub.history_.drop(columns="time").to_dict("list"),
                   "res_n_train": int(len(res.train_idx)), "res_prior": prior.config(),
                   "world_size": distributed.world_size()}, fh)


# ---------------------------------------------------------------------------------------------------
# the test
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("dist")
    data = tmp / "cells.h5ad"
    chunks = simulate_count_chunks(N_CELLS, N_GENES, n_types=3, chunk_size=128, mean_library=300, seed=11)
    write_h5ad_in_chunks(data, (c for c, _ in chunks), [f"g{j}" for j in range(N_GENES)])
    run_torchrun(__file__, data, tmp)
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    return tmp, data, ranks


def test_two_processes_reach_the_single_process_loss(run):
    tmp, data, ranks = run
    assert [r["world_size"] for r in ranks] == [2, 2]
    # early stopping, learning-rate and checkpoint decisions need identical numbers on every rank
    assert ranks[0]["history"] == ranks[1]["history"]
    single = DGD(ad.read_h5ad(data, backed="r"), **MODEL).train(max_epochs=EPOCHS, **TRAIN)
    other_order = DGD(ad.read_h5ad(data, backed="r"), **MODEL).train(max_epochs=EPOCHS, **{**TRAIN, "seed": 99})
    dist_loss = ranks[0]["history"]["train_loss"][-1]
    ref = single.history_["train_loss"].iloc[-1]
    noise = abs(other_order.history_["train_loss"].iloc[-1] - ref)  # what another batch order changes
    print(f"final train loss per cell: 2 processes {dist_loss:.4f}, 1 process {ref:.4f}, "
          f"1 process with another batch order {other_order.history_['train_loss'].iloc[-1]:.4f}")
    assert abs(dist_loss - ref) <= max(3 * noise, 0.01 * ref), (dist_loss, ref, noise)
    assert dist_loss < ranks[0]["history"]["train_loss"][0]  # and it learned


def test_two_processes_train_a_subsample_and_embed_the_rest(run):
    tmp, data, ranks = run
    assert ranks[0]["sub"] == ranks[1]["sub"]  # the same decisions on every rank
    z = np.load(tmp / "sub_latent0.npy")
    np.testing.assert_array_equal(np.load(tmp / "sub_latent1.npy"), z)  # every rank ends with every cell
    assert np.all(np.abs(z).sum(1) > 0)
    # one process trains another seeded sample of 200 cells: the same loss within the noise of the sample
    single = DGD(ad.read_h5ad(data, backed="r"), **MODEL).train(max_epochs=EPOCHS, decoder_subsample=SUBSAMPLE,
                                                                **SUB_BY, **TRAIN)
    other = DGD(ad.read_h5ad(data, backed="r"), **MODEL).train(max_epochs=EPOCHS, decoder_subsample=SUBSAMPLE,
                                                               **SUB_BY, **{**TRAIN, "seed": 99})
    dist_loss, ref = ranks[0]["sub"]["train_loss"][-1], single.history_["train_loss"].iloc[-1]
    noise = abs(other.history_["train_loss"].iloc[-1] - ref)
    assert abs(dist_loss - ref) <= max(3 * noise, 0.02 * ref), (dist_loss, ref, noise)
    assert ranks[0]["sub"]["train_loss"][-1] < ranks[0]["sub"]["train_loss"][0]


def test_two_processes_refit_the_mixture_to_every_ranks_weighted_sample(run):
    """The residual sample's Horvitz-Thompson weights reach the refit with their rows: the gathered weights
    sum to the training cells of both ranks, and the mixture both ranks hold is the weighted fit of them."""
    from dgdlens.nn.priors import make_prior

    tmp, _, ranks = run
    sample = np.load(tmp / "refit0.npy")
    np.testing.assert_array_equal(np.load(tmp / "refit1.npy"), sample)
    assert sample.shape == (SUBSAMPLE, MODEL["n_latent"] + 1)
    z, w = sample[:, :-1], sample[:, -1]
    assert w.sum() == pytest.approx(ranks[0]["res_n_train"], rel=1e-5)
    assert w.min() == 1.0 and w.max() > 1.0  # the residual tenth kept for certain, the rest weighted up
    expected = make_prior(ranks[0]["res_prior"], MODEL["n_latent"])
    expected.fit_to(torch.from_numpy(z), seed=MODEL["seed"], sample_weight=w)
    for r in range(2):
        held = np.load(tmp / f"res_prior{r}.npz")
        np.testing.assert_allclose(held["mean"], expected.mean.detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(held["weights"], expected.log_weights().exp().detach().numpy(), atol=1e-5)
        np.testing.assert_allclose(held["neglogvar"], expected.neglogvar.detach().numpy(), atol=1e-4)


def test_saved_model_loads_in_one_process_with_every_cell_once(run):
    tmp, data, ranks = run
    model = DGD.load(tmp / "model")
    z = pd.DataFrame(model.get_latent_representation(), index=model.obs_names)
    train_names = model.obs_names[model.train_idx]
    owned = ranks[0]["owned"] + ranks[1]["owned"]
    assert len(owned) == len(set(owned)) == len(train_names)  # the shards partition the training cells
    assert set(owned) == set(train_names)
    for r in range(2):  # each cell's saved latent is the one its owning rank trained
        np.testing.assert_array_equal(z.loc[ranks[r]["owned"]].to_numpy(), np.load(tmp / f"shard{r}.npy"))
        np.testing.assert_array_equal(np.load(tmp / f"latent{r}.npy"), z.to_numpy())  # complete on every rank
    assert np.all(np.abs(z.loc[train_names].to_numpy()).sum(1) > 0)  # no row left at its zero start
    assert model.is_trained_ and len(model.history_) == len(ranks[0]["history"]["epoch"])


def test_sharded_heldout_inference_matches_one_process(run):
    tmp, data, _ = run
    model = DGD.load(tmp / "model")
    # batches of 30 = the two ranks' shards: inference stops on the batch's mean loss, so the batches must match
    expected = model.get_latent_representation(_new_cells(ad.read_h5ad(data, backed="r")), n_steps=30,
                                               batch_size=30, progress=False)
    for r in range(2):
        np.testing.assert_allclose(np.load(tmp / f"heldout{r}.npy"), expected, atol=1e-4)


def test_resuming_from_sharded_checkpoints_continues_the_run(run):
    tmp, _, ranks = run
    for r in range(2):
        assert (tmp / f"full.ckpt.rank{r}-of-2").exists() and (tmp / f"half.ckpt.rank{r}-of-2").exists()
    full, resumed = ranks[0]["history"], ranks[0]["resumed"]
    assert resumed["epoch"] == full["epoch"]
    np.testing.assert_allclose(resumed["train_loss"], full["train_loss"], rtol=1e-6)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
