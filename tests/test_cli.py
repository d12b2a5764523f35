"""The ``dgdlens`` command line end to end on small data: every subcommand's outputs equal what the Python
API gives for the same inputs, config files work, and user mistakes end in one line and exit status 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from dgdlens import DGD
from dgdlens.cli import build_parser, main, read_matrix, split_spec
from dgdlens.data.datasets import pbmc68k_counts
from dgdlens.sae import SAE

SMALL_DGD = ["--n-latent", "4", "--hidden", "16", "--epochs", "3", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """pbmc68k counts: 160 cells to train on and 40 new cells, as .h5ad files; and a small GMT file."""
    root = tmp_path_factory.mktemp("cli")
    adata = pbmc68k_counts()[:200].copy()
    adata = adata[:, np.asarray(adata.X[:160].sum(axis=0)).ravel() > 0].copy()  # the DGD rejects empty genes
    adata[:160].copy().write_h5ad(root / "train.h5ad")
    adata[160:].copy().write_h5ad(root / "new.h5ad")
    genes = list(adata.var_names)
    # Two gene sets with real gene names, so the annotation has something to test.
    (root / "sets.gmt").write_text(f"SET_A\tfirst set\t{chr(9).join(genes[:40])}\n"
                                   f"SET_B\tsecond set\t{chr(9).join(genes[40:90])}\n")
    return root


def run(argv, capsys) -> tuple[int, str, str]:
    """Run the command in this process; returns (exit status, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: --help, or a malformed command line
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(work) -> Path:
    code = main(["train", str(work / "train.h5ad"), "--out", str(work / "model"),
                 "--labels-key", "bulk_labels", "--latents", str(work / "train_latents.h5ad"), *SMALL_DGD])
    assert code == 0
    return work / "model"


@pytest.fixture(scope="module")
def embedded(work, trained) -> Path:
    assert main(["embed", str(trained), str(work / "new.h5ad"), "--out", str(work / "embedded.h5ad"),
                 "--n-steps", "10", "--device", "cpu", "--no-progress"]) == 0
    return work / "embedded.h5ad"


@pytest.fixture(scope="module")
def sae_dir(work, embedded) -> Path:
    assert main(["sae", f"{embedded}:X_dgd", "--out", str(work / "sae"), "--n-latents", "12", "--k", "2",
                 "--epochs", "5", "--device", "cpu", "--activations", str(work / "acts.npz"),
                 "--no-progress"]) == 0
    return work / "sae"


# ------------------------------------------------------------------------------------------- subcommands

def test_train_saves_a_model_that_loads_and_matches_the_latents_file(work, trained):
    model = DGD.load(trained)
    assert model.is_trained_ and model.n_latent == 4 and model.n_components == 10  # one per bulk label
    assert model.params["hidden"] == [16]
    assert len(model.history_) == 3
    written = ad.read_h5ad(work / "train_latents.h5ad")
    np.testing.assert_array_equal(written.obsm["X_dgd"], model.get_latent_representation())
    np.testing.assert_array_equal(written.obs["dgd_cluster"].astype(int), model.get_cluster_assignments())


def test_embed_writes_the_same_latents_as_the_api(work, trained, embedded):
    out = ad.read_h5ad(embedded)
    new = ad.read_h5ad(work / "new.h5ad")
    assert out.n_obs == 40 and list(out.obs_names) == list(new.obs_names)
    assert (out.X != new.X).nnz == 0  # the counts travel along unchanged
    expected = DGD.load(trained).get_latent_representation(new, n_steps=10, progress=False)
    np.testing.assert_allclose(out.obsm["X_dgd"], expected, rtol=1e-5, atol=1e-6)
    responsibilities = out.obsm["dgd_responsibilities"]
    np.testing.assert_array_equal(out.obs["dgd_cluster"].astype(int), responsibilities.argmax(1))


def test_embed_to_csv_and_npy_round_trip(work, trained, embedded, capsys):
    reference = ad.read_h5ad(embedded).obsm["X_dgd"]
    for name in ("z.csv", "z.npy"):
        code, _, err = run(["embed", trained, work / "new.h5ad", "--out", work / name, "--n-steps", "10",
                            "--device", "cpu", "--no-progress"], capsys)
        assert code == 0, err
        matrix, cells = read_matrix(str(work / name), "latents")
        np.testing.assert_allclose(matrix, reference, rtol=1e-5, atol=1e-6)
        if name.endswith(".csv"):
            assert list(cells) == list(ad.read_h5ad(embedded).obs_names)


def test_train_backed_reads_from_disk(work, capsys):
    code, out, err = run(["train", work / "train.h5ad", "--out", work / "model_backed", "--backed",
                          "--n-components", "3", *SMALL_DGD], capsys)
    assert code == 0, err
    assert "(backed)" in out
    model = DGD.load(work / "model_backed")
    assert model.n_components == 3 and np.isfinite(model.get_latent_representation()).all()


def test_sae_model_and_activations_file(work, embedded, sae_dir):
    sae = SAE.load(sae_dir)
    assert sae.n_latents == 12
    z = ad.read_h5ad(embedded).obsm["X_dgd"]
    activations = sp.load_npz(work / "acts.npz")
    assert activations.shape == (40, 12)
    np.testing.assert_allclose(activations.toarray(), sae.encode(z).toarray(), rtol=1e-5, atol=1e-6)
    assert (np.diff(activations.indptr) <= 2).all()  # top-2


@pytest.fixture(scope="module")
def planted(work) -> Path:
    """Activations with a planted answer: feature 0 follows the cells' expression of SET_A's genes,
    feature 1 is noise, feature 2 is never active."""
    adata = ad.read_h5ad(work / "train.h5ad")
    counts = adata.X.toarray()
    share = counts[:, :40].sum(1) / counts.sum(1)
    acts = np.zeros((adata.n_obs, 3))
    acts[:, 0] = np.maximum(share - np.median(share), 0)
    acts[:, 1] = np.random.default_rng(0).random(adata.n_obs) * (np.arange(adata.n_obs) % 2)
    sp.save_npz(work / "planted.npz", sp.csr_matrix(acts))
    return work / "planted.npz"


# the planted feature is built from the same counts it is tested on: no count split, so the test asks
# whether the CLI reproduces the API, not whether splitting keeps the signal (tests/test_lens_fdr.py)
ANNOTATE_OPTIONS = ["--gene-sets", "sets.gmt", "--percentile", "75", "--min-active-cells", "5",
                    "--min-set-size", "2", "--max-padj", "1", "--no-count-split"]


def test_annotate_finds_the_planted_set_and_equals_the_api(work, planted, capsys):
    from dgdlens.lens import annotate

    options = [str(work / o) if o.endswith(".gmt") else o for o in ANNOTATE_OPTIONS]
    code, out, err = run(["annotate", "--activations", planted, "--expression", work / "train.h5ad",
                          "--out", work / "features.csv", "--features-summary", work / "per_feature.csv",
                          "--no-progress", *options], capsys)
    assert code == 0, err
    table = pd.read_csv(work / "features.csv")
    best = table[table["feature"] == 0].sort_values("pval").iloc[0]
    assert (best["term"], best["direction"]) == ("SET_A", "up") and best["pval"] < 0.05
    assert "feature 0: SET_A (up" in out
    adata = ad.read_h5ad(work / "train.h5ad")
    expected = annotate(sp.load_npz(planted), adata.X, np.asarray(adata.var_names), str(work / "sets.gmt"),
                        percentile=75.0, min_active_cells=5, min_set_size=2, max_padj=1.0, count_split=False)
    assert list(table["term"]) == list(expected["term"])
    assert list(table["feature"]) == list(expected["feature"])
    np.testing.assert_allclose(table["pval"], expected["pval"], rtol=1e-9)
    summary = pd.read_csv(work / "per_feature.csv").set_index("feature")
    assert summary.loc[2, "status"] == "dead"
    assert f"of {int((summary['status'] == 'ok').sum())} tested features" in out


def test_annotate_aligns_named_activations_to_the_expression_cells(work, planted, embedded, capsys):
    acts = sp.load_npz(planted).toarray()
    names = ad.read_h5ad(work / "train.h5ad").obs_names
    shuffled = np.random.default_rng(0).permutation(len(names))
    pd.DataFrame(acts[shuffled], index=names[shuffled]).to_csv(work / "acts_shuffled.csv")
    options = [str(work / o) if o.endswith(".gmt") else o for o in ANNOTATE_OPTIONS]
    args = ["--expression", work / "train.h5ad", "--no-progress", "--overwrite", *options]
    code, _, err = run(["annotate", "--activations", work / "acts_shuffled.csv", "--out", work / "f2.csv",
                        *args], capsys)
    assert code == 0, err
    pd.testing.assert_frame_equal(pd.read_csv(work / "f2.csv"), pd.read_csv(work / "features.csv"))
    pd.DataFrame(acts[:150], index=names[:150]).to_csv(work / "acts_partial.csv")
    code, _, err = run(["annotate", "--activations", work / "acts_partial.csv", "--out", work / "f3.csv",
                        *args], capsys)
    assert code == 1 and "10 of the expression's 160 cells have no activations" in err
    code, _, err = run(["annotate", "--activations", f"{work / 'embedded.h5ad'}:X_sae",
                        "--out", work / "f4.csv", *args], capsys)
    assert code == 1 and "no obsm['X_sae']; available: X_dgd" in err


def test_steer_writes_the_api_result(work, trained, embedded, sae_dir, capsys):
    from dgdlens.steer import steer

    code, out, err = run(["steer", trained, sae_dir, embedded, "--feature", "0", "--mode", "add", "--value",
                          "2", "--gene-sets", work / "sets.gmt", "--random-control", "--device", "cpu",
                          "--out", work / "steer"], capsys)
    assert code == 0, err
    genes = pd.read_csv(work / "steer" / "genes.csv")
    adata = ad.read_h5ad(embedded)
    expected = steer(DGD.load(trained), SAE.load(sae_dir), adata, feature=0, mode="add", value=2.0,
                     use_rep="X_dgd", gene_sets=str(work / "sets.gmt"))
    assert list(genes["gene"]) == list(expected.genes["gene"])
    np.testing.assert_allclose(genes["log2fc"], expected.genes["log2fc"], rtol=1e-5, atol=1e-7)
    summary = json.loads((work / "steer" / "summary.json").read_text())
    assert summary["feature"] == 0 and summary["n_cells"] == 40 and "control_genes_changed" in summary
    assert (work / "steer" / "control_genes.csv").exists() and (work / "steer" / "enrichment.csv").exists()
    # --cells restricts the edit to one label
    code, _, err = run(["steer", trained, sae_dir, embedded, "--feature", "0", "--mode", "add",
                        "--value", "2",
                        "--gene-sets", "none", "--cells", f"bulk_labels={adata.obs['bulk_labels'].iloc[0]}",
                        "--out", work / "steer_one", "--device", "cpu"], capsys)
    assert code == 0, err
    n_label = int((adata.obs["bulk_labels"] == adata.obs["bulk_labels"].iloc[0]).sum())
    assert json.loads((work / "steer_one" / "summary.json").read_text())["n_cells"] == n_label


# ------------------------------------------------------------------------------------------- config file

def test_config_file_supplies_options_and_the_command_line_wins(work, capsys):
    config = work / "run.toml"
    config.write_text(
        'device = "cpu"\nseed = 3\nprogress = false\n'
        f'[train]\ndata = "{work / "train.h5ad"}"\nout = "{work / "model_cfg"}"\n'
        'n-latent = 3\nn_components = 2\nhidden = [8]\nepochs = 2\n')
    code, _, err = run(["train", "--config", config, "--n-components", "4"], capsys)
    assert code == 0, err
    model = DGD.load(work / "model_cfg")
    got = (model.n_latent, model.n_components, model.params["hidden"], model.params["seed"])
    assert got == (3, 4, [8], 3)
    assert len(model.history_) == 2


@pytest.mark.parametrize("text, message", [
    ("[train]\nn-latnt = 3\n", "unknown option 'n-latnt'"),
    ("[train]\nepochs = 2.5\n", "whole number"),
    ("[train]\nbacked = 1\n", "true or false"),
    ("[sae]\nkind = 'dense'\n", None),  # another command's table is not checked against train
    ("n_latents_typo = 3\n", "no command has it"),
    ("[train\n", "not valid TOML"),
])
def test_config_file_mistakes_are_named(work, capsys, text, message):
    config = work / "bad.toml"
    config.write_text(text)
    if message is None:  # accepted: the run goes on to the next check (the output folder already exists)
        code, _, err = run(["train", work / "train.h5ad", "--out", work, "--config", config], capsys)
        assert code == 1 and "already exists" in err
        return
    code, _, err = run(["train", work / "train.h5ad", "--out", work / "never", "--config", config,
                        "--epochs", "1", "--no-progress"], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (work / "never").exists()


# ------------------------------------------------------------------------------------------- user mistakes

def _mistakes(work: Path, trained: Path, sae_dir: Path) -> list[tuple[list, str]]:
    renamed = ad.read_h5ad(work / "new.h5ad")
    renamed.var_names = [f"ENSG{i:011d}" for i in range(renamed.n_vars)]
    renamed.write_h5ad(work / "other_genes.h5ad")
    (work / "not_h5ad.h5ad").write_text("plain text")
    return [
        (["train", work / "missing.h5ad", "--out", work / "m"], "data file"),
        (["train", work / "not_h5ad.h5ad", "--out", work / "m"], "could not read"),
        (["train", work / "train.h5ad", "--out", work / "m", "--labels-key", "celltype", "--epochs", "1"],
         "'celltype' is not a column of adata.obs"),
        (["train", work / "train.h5ad", "--out", work / "m", "--layer", "spliced", "--epochs", "1"],
         "Layer 'spliced' not found"),
        (["train", work / "train.h5ad", "--out", trained], "already exists; pass --overwrite"),
        (["embed", trained, work / "other_genes.h5ad", "--out", work / "o.h5ad", "--device", "cpu"],
         "genes are missing from the new data"),
        (["embed", sae_dir, work / "new.h5ad", "--out", work / "o.h5ad"], "not a 'DGD'"),
        (["embed", work / "nowhere", work / "new.h5ad", "--out", work / "o.h5ad"], "does not exist"),
        (["embed", trained, work / "new.h5ad", "--out", work / "o.txt"], "unsupported file type"),
        (["sae", work / "new.h5ad", "--out", work / "s"], "say which obsm entry"),
        (["sae", f"{work / 'new.h5ad'}:X_pca", "--out", work / "s"], "no obsm['X_pca']"),
        (["steer", trained, trained, work / "new.h5ad", "--feature", "0", "--value", "1",
          "--out", work / "st"],
         "not a 'sae'"),
        (["steer", trained, sae_dir, work / "embedded.h5ad", "--feature", "99", "--value", "1",
          "--out", work / "st"], "out of range"),
        (["steer", trained, sae_dir, work / "embedded.h5ad", "--feature", "0", "--cells", "bulk_labels",
          "--value", "1", "--out", work / "st"], "OBS_KEY=VALUE"),
    ]


def test_user_mistakes_end_in_one_line_and_status_1(work, trained, embedded, sae_dir, capsys):
    for argv, message in _mistakes(work, trained, sae_dir):
        code, _, err = run([*argv, "--no-progress"] if argv[0] != "steer" else argv, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 1, (argv, err)
        assert len(lines) == 1 and lines[0].startswith(f"dgdlens {argv[0]}: error: "), (argv, err)
        assert message in lines[0], (argv, lines[0])


@pytest.mark.parametrize("argv, message", [
    (["train"], "missing DATA.h5ad, --out"),
    (["embed", "m"], "missing NEW.h5ad, --out"),
    (["sae", "x.npy", "--kind", "dense"], "invalid choice"),
    (["train", "x.h5ad", "--epochs", "many"], "invalid int value"),
    ([], "no command given"),
])
def test_malformed_command_lines_exit_2(capsys, argv, message):
    code, _, err = run(argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_every_option_is_explained_in_help(capsys):
    parser = build_parser()
    for name, sub in parser.subcommands.items():
        for action in sub._actions:
            assert action.help and len(action.help) > 10, (name, action.dest)
        code, out, _ = run([name, "--help"], capsys)
        assert code == 0 and f"usage: dgdlens {name}" in out


def test_spec_parsing():
    assert split_spec("out.h5ad:X_dgd") == ("out.h5ad", "X_dgd")
    assert split_spec("dir/z.npz:arr_0") == ("dir/z.npz", "arr_0")
    assert split_spec("h5ad:out.h5ad:X_dgd") == ("out.h5ad", "X_dgd")
    assert split_spec("z.npy") == ("z.npy", None)
    assert split_spec("C:/data/z.csv") == ("C:/data/z.csv", None)


def test_python_dash_m_entry_point_reports_errors_without_traceback(tmp_path):
    """The real process: ``python -m dgdlens`` (what torchrun runs) exits 1 with one line on stderr."""
    proc = subprocess.run([sys.executable, "-m", "dgdlens", "embed", str(tmp_path / "no_model"),
                           str(tmp_path / "no.h5ad"), "--out", str(tmp_path / "o.h5ad")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    expected = f"dgdlens embed: error: model directory {tmp_path / 'no_model'} does not exist."
    assert proc.stderr.strip().splitlines() == [expected]


def test_no_temporary_files_are_left_behind(work, trained, embedded, sae_dir):
    leftovers = [str(p) for p in work.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]
    assert leftovers == []
