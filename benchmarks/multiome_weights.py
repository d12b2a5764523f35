"""How the multi-modal DGD weights its modalities: equal weights vs ``modality_weights="balanced"``.

Chosen without labels, on validation cells: the cross-modal held-out NLL (each modality's likelihood
with the latent inferred from the other modality alone), summed. The 15-NN accuracy of the cell types is
printed beside it for information only (labels are never used to choose).

    python benchmarks/multiome_weights.py            # 3 seeds, 80 epochs, about 2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import time
import warnings

import mudata as md
import numpy as np
import torch
from sklearn.neighbors import KNeighborsClassifier

import dgdlens as dl

FAST = {"batch_size": 64, "rep_step": "batch", "lr_rep": 0.05, "hyperprior": "per_cell", "early_stopping": False,
        "progress": False}


def run(seed: int, weights, epochs: int) -> dict:
    sim = dl.sim.simulate_multiome(n_cells=700, n_genes=300, n_peaks=2000, seed=seed)
    train, val = sim[:560].copy(), sim[560:].copy()
    start = time.perf_counter()
    model = dl.DGD(train, n_latent=8, n_components=6, seed=0, hidden=(64, 64), head_hidden=(64,),
                   modality_weights=weights).train(max_epochs=epochs, **FAST)
    z_rna = model.get_latent_representation(md.MuData({"rna": val.mod["rna"]}), progress=False)
    z_atac = model.get_latent_representation(md.MuData({"atac": val.mod["atac"]}), progress=False)
    z = model.get_latent_representation(val, progress=False)
    knn = KNeighborsClassifier(15).fit(model.get_latent_representation(), train.obs["cell_type"].astype(str))
    return {"seed": seed, "weights": str(weights), "atac_weight": model.params["modalities"][1]["weight"],
            "atac_from_rna": model.get_reconstruction_error(val, z=z_rna, modality="atac"),
            "rna_from_atac": model.get_reconstruction_error(val, z=z_atac, modality="rna"),
            "knn_accuracy": knn.score(z, val.obs["cell_type"].astype(str)), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print("seed  weights   w_atac  NLL(ATAC|RNA)  NLL(RNA|ATAC)  sum     15-NN acc  s")
    for seed in args.seeds:
        for weights in (None, "balanced"):
            r = run(seed, weights, args.epochs)
            print(f"{r['seed']:<5} {r['weights']:<9} {r['atac_weight']:<7.2f} {r['atac_from_rna']:<14.1f} "
                  f"{r['rna_from_atac']:<14.1f} {r['atac_from_rna'] + r['rna_from_atac']:<7.1f} "
                  f"{r['knn_accuracy']:<10.3f} {r['seconds']:.0f}", flush=True)


if __name__ == "__main__":
    main()
