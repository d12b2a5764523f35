"""A multi-modal DGD under torchrun (CPU, gloo, 2 processes): RNA + ATAC from a backed .h5mu, cells
sharded over the processes, against one process.

The test launches this file with ``torchrun --nproc_per_node=2``; the ``__main__`` block is what each
process runs.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import mudata as md
import numpy as np
import pytest
import torch
from torchrun_helper import run_torchrun

MODEL = dict(n_latent=3, n_components=3, seed=0, hidden=(16,), head_hidden=(8,))
TRAIN = dict(batch_size=64, early_stopping=False, progress=False, prior_refit_epoch=2, restore_best=False)
EPOCHS = 4


def _rna_only(mdata) -> md.MuData:
    return md.MuData({"rna": mdata.mod["rna"][:60].to_memory()})


def _worker(data_path: str, out: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from dgdlens import _dist as distributed
    from dgdlens.models.dgd import DGD

    out = Path(out)
    rank = int(os.environ["RANK"])
    backed = md.read_h5mu(data_path, backed="r")
    model = DGD(backed, **MODEL).train(max_epochs=EPOCHS, **TRAIN)
    model.save(out / "model")
    held = model.get_latent_representation(_rna_only(backed), n_steps=30, batch_size=30, progress=False)
    np.save(out / f"heldout{rank}.npy", held)
    np.save(out / f"latent{rank}.npy", model.get_latent_representation())
    with open(out / f"rank{rank}.json", "w") as fh:
        json.dump({"history": model.history_.drop(columns="time").to_dict("list"),
                   "world_size": distributed.world_size()}, fh)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import dgdlens as dl

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("dist_mm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = dl.sim.simulate_multiome(n_cells=400, n_genes=150, n_peaks=800, markers_per_group=20, seed=2)
        sim.write(tmp / "cells.h5mu")
    run_torchrun(__file__, tmp / "cells.h5mu", tmp)
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    return tmp, ranks


def test_two_processes_train_a_multimodal_model_like_one(run):
    from dgdlens.models.dgd import DGD

    tmp, ranks = run
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["history"] == ranks[1]["history"]  # every rank saw the same reduced numbers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = DGD(md.read_h5mu(tmp / "cells.h5mu", backed="r"), **MODEL).train(max_epochs=EPOCHS, **TRAIN)
    first, last = ranks[0]["history"]["train_loss"][0], ranks[0]["history"]["train_loss"][-1]
    assert last < first
    assert abs(last - single.history_["train_loss"].iloc[-1]) < 0.02 * last
    model = DGD.load(tmp / "model")
    assert model.modality_names == ["rna", "atac"]
    np.testing.assert_array_equal(np.load(tmp / "latent0.npy"), np.load(tmp / "latent1.npy"))
    np.testing.assert_array_equal(np.load(tmp / "latent0.npy"), model.get_latent_representation())


def test_sharded_inference_of_rna_only_cells_matches_one_process(run):
    from dgdlens.models.dgd import DGD

    tmp, _ = run
    model = DGD.load(tmp / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = model.get_latent_representation(_rna_only(md.read_h5mu(tmp / "cells.h5mu", backed="r")),
                                                   n_steps=30, batch_size=30, progress=False)
    for r in range(2):
        np.testing.assert_allclose(np.load(tmp / f"heldout{r}.npy"), expected, atol=1e-4)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
