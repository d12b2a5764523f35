"""Bad inputs and faults a hostile but realistic user meets, through the Python API and the CLI.

Each case asserts the error (or warning) type and that the message names the fix. Regression tests of
issue 12: nothing a user has is ever lost (``--overwrite`` refuses folders it did not write), every
output is written whole (a full disk leaves no partial file and no temporary file), an edited
``config.json`` is refused, and genes without counts are accepted with a warning.
"""

from __future__ import annotations

import errno
import json
import warnings
from pathlib import Path
from unittest import mock

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from dgdlens._io import ModelFormatError, OutputWriteError
from dgdlens.cli import main

TINY = ["--n-latent", "2", "--hidden", "8", "--epochs", "1", "--device", "cpu", "--no-progress",
        "--no-early-stopping"]


def tiny_adata(n_cells: int = 40, n_genes: int = 30, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    X = rng.poisson(3.0, size=(n_cells, n_genes)).astype(np.float32)
    X[:, 0] += 1  # no cell without counts
    adata = ad.AnnData(sp.csr_matrix(X))
    adata.obs_names = [f"c{i}" for i in range(n_cells)]
    adata.var_names = [f"g{j}" for j in range(n_genes)]
    adata.obs["cell_type"] = pd.Categorical(np.array(["a", "b", "c"])[np.arange(n_cells) % 3])
    adata.obs["score"] = rng.normal(size=n_cells)
    adata.obs["barcode"] = [f"bc{i}" for i in range(n_cells)]
    return adata


def run(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: a malformed command line
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    tiny_adata().write_h5ad(root / "data.h5ad")
    return root


@pytest.fixture(scope="module")
def model_dir(files) -> Path:
    assert main(["train", str(files / "data.h5ad"), "--out", str(files / "model"), *TINY]) == 0
    return files / "model"


# ------------------------------------------------------------------------------------------- Python API

def _object_x():
    adata = tiny_adata(8, 5)
    adata.X = np.asarray(adata.X.toarray(), dtype=object)
    return adata


def _dgd(adata, **kwargs):
    from dgdlens import DGD

    return DGD(adata, n_latent=2, hidden=[8], **kwargs)


def _no_count_cell():
    adata = tiny_adata()
    X = adata.X.toarray()
    X[3] = 0
    adata.X = sp.csr_matrix(X)
    return adata


def _validate_counts_of(X):
    from dgdlens.data.matrix import RowMatrix, validate_counts

    return validate_counts(RowMatrix(X), what="X")


API_ERRORS = [
    ("object dtype X", lambda: _dgd(_object_x()), TypeError, "convert it to a numeric dtype"),
    ("a cell without counts", lambda: _dgd(_no_count_cell()), ValueError, "sc.pp.filter_cells"),
    ("no cells", lambda: _validate_counts_of(np.zeros((0, 4))), ValueError, "Too few cells"),
    ("no cells (DGD)", lambda: _dgd(tiny_adata()[:0].copy()), ValueError, "Too few cells"),
    ("no genes", lambda: _validate_counts_of(np.zeros((3, 0))), ValueError, "has no genes"),
    ("n_latent not an integer", lambda: __import__("dgdlens").DGD(tiny_adata(), n_latent=2.5), ValueError,
     "n_latent must be a positive integer"),
    ("n_components a string", lambda: _dgd(tiny_adata(), n_components="8"), ValueError,
     "n_components must be a positive integer"),
    ("1-D activations", lambda: __import__("dgdlens.lens.groups", fromlist=["x"]).as_activation_matrix(np.ones(10)),
     ValueError, "2-D cells x features"),
]


@pytest.mark.parametrize("name, call, error, fix", API_ERRORS, ids=[c[0] for c in API_ERRORS])
def test_api_errors_name_the_fix(name, call, error, fix):
    with pytest.raises(error) as info:
        call()
    assert fix in str(info.value), str(info.value)


def _labels(key):
    from dgdlens.data.anndata import check_labels_key

    return check_labels_key(tiny_adata(), key)


def _negative_activations():
    from dgdlens.lens.groups import as_activation_matrix

    return as_activation_matrix(np.random.default_rng(0).normal(size=(20, 3)))


def _empty_gene_counts():
    X = tiny_adata().X.toarray()
    X[:, 5] = 0
    return _validate_counts_of(sp.csr_matrix(X))


API_WARNINGS = [
    ("continuous labels_key", lambda: _labels("score"), "continuous numbers"),
    ("high-cardinality labels_key", lambda: _labels("barcode"), "40 categories for 40 cells"),
    ("n_components > cells", lambda: _dgd(tiny_adata(), n_components=41), "is more than the 40 cells"),
    ("negative activations", _negative_activations, "pass sae.encode(Z)"),
    ("genes without counts", _empty_gene_counts, "1 of 30 gene(s) have no counts"),
]


@pytest.mark.parametrize("name, call, fix", API_WARNINGS, ids=[c[0] for c in API_WARNINGS])
def test_api_warnings_name_the_fix(name, call, fix):
    with pytest.warns(UserWarning) as record:
        call()
    assert any(fix in str(w.message) for w in record), [str(w.message) for w in record]


def test_categorical_labels_do_not_warn():
    from dgdlens.data.anndata import check_labels_key

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(check_labels_key(tiny_adata(), "cell_type").categories) == ["a", "b", "c"]
        adata = tiny_adata()
        adata.obs["cluster"] = np.arange(40) % 4  # integer cluster ids are categories, not continuous
        assert len(check_labels_key(adata, "cluster").categories) == 4


def test_an_edited_model_config_is_refused_with_the_fix(model_dir, tmp_path):
    import shutil

    from dgdlens import DGD

    edited = tmp_path / "edited"
    shutil.copytree(model_dir, edited)
    meta = json.loads((edited / "config.json").read_text())
    meta["config"]["var_names"][0] = "SOMETHING_ELSE"  # gene names changed by hand
    (edited / "config.json").write_text(json.dumps(meta, indent=2))
    with pytest.raises(ModelFormatError, match="edited or corrupted.*Restore the original config.json"):
        DGD.load(edited)


def _resigned_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of a model folder with an edited config whose checksum was recomputed (a careful forger):
    the parameter checks after the checksum must still refuse it."""
    import shutil

    from dgdlens._io import _config_sha256

    shutil.copytree(src, dst)
    meta = json.loads((dst / "config.json").read_text())
    edit(meta["config"])
    meta["config_sha256"] = _config_sha256(meta)
    (dst / "config.json").write_text(json.dumps(meta))
    return dst


@pytest.fixture(scope="module")
def sae_dir(files) -> Path:
    from dgdlens.sae import train_sae

    z = np.random.default_rng(0).normal(size=(30, 3)).astype(np.float32)
    train_sae(z, n_latents=8, k=2, max_epochs=1, progress=False, device="cpu").save(files / "sae_model")
    return files / "sae_model"


UNKNOWN_SETTINGS = [
    ("DGD", "params", "scaling", "median", "scaling='median'"),
    ("DGD", "params", "activation", "swish", "got 'swish'"),
    ("DGD", "params", "output_activation", "tanh", "got 'tanh'"),
    ("DGD", "params", "dispersion", "cell", "got 'cell'"),
    ("DGD", "params", "covariance", "weird", "got 'weird'"),
    ("SAE", "sae", "kind", "dense", "Unknown SAE kind 'dense'"),
    ("SAE", "sae", "bias", "weird", "got 'weird'"),
]


@pytest.mark.parametrize("cls, section, key, value, message", UNKNOWN_SETTINGS,
                         ids=[f"{c[0]}-{c[2]}" for c in UNKNOWN_SETTINGS])
def test_loading_refuses_unknown_settings_even_with_a_matching_checksum(model_dir, sae_dir, tmp_path, cls,
                                                                        section, key, value, message):
    from dgdlens import DGD
    from dgdlens.sae import SAE

    model, src = (DGD, model_dir) if cls == "DGD" else (SAE, sae_dir)
    edited = _resigned_copy(src, tmp_path / "edited", lambda c: c[section].__setitem__(key, value))
    with pytest.raises(ModelFormatError) as info:
        model.load(edited)
    assert message in str(info.value) and "save the model again" in str(info.value)


# ------------------------------------------------------------------------------------------- command line

def _write_npy(path: Path, array) -> Path:
    np.save(path, array)
    return path


def _dup_activations(root: Path) -> tuple[Path, Path]:
    adata = tiny_adata()
    adata.obs_names = ["c0"] * 2 + [f"c{i}" for i in range(2, adata.n_obs)]
    adata.write_h5ad(root / "dups.h5ad")
    frame = pd.DataFrame(np.abs(np.random.default_rng(0).normal(size=(adata.n_obs, 3))),
                         index=pd.Index(adata.obs_names, name="cell"))
    frame.to_csv(root / "dup_acts.csv")
    return root / "dup_acts.csv", root / "dups.h5ad"


def _cli_cases(root: Path):
    data = root / "data.h5ad"
    (root / "afile").write_text("not a folder")
    return [
        ("--device tpu", ["train", data, "--out", root / "m1", "--device", "tpu"], 2, "use auto, cpu, cuda"),
        ("--checkpoint-every 0", ["train", data, "--out", root / "m1", "--checkpoint", root / "ck",
                                  "--checkpoint-every", "0"], 2, "must be a positive integer"),
        ("--checkpoint-every without --checkpoint", ["train", data, "--out", root / "m1",
                                                     "--checkpoint-every", "5"], 1, "needs --checkpoint FILE"),
        ("--epochs 0", ["train", data, "--out", root / "m1", "--epochs", "0"], 2, "must be a positive integer"),
        ("--checkpoint under a file", ["train", data, "--out", root / "m1", "--checkpoint",
                                       root / "afile" / "ck.safetensors"], 1, "afile is a file, not a folder"),
        ("--latents under a file", ["train", data, "--out", root / "m1", "--latents",
                                    root / "afile" / "z.npy"], 1, "afile is a file, not a folder"),
        ("--latents is the input", ["train", data, "--out", root / "m1", "--latents", data], 1,
         "is the input file"),
        ("--checkpoint is the input", ["train", data, "--out", root / "m1", "--checkpoint", data,
                                       "--overwrite"], 1, "is the input file"),
        ("--latents inside --out", ["train", data, "--out", root / "m1", "--latents", root / "m1" / "z.npy"], 1,
         "write it next to the model folder"),
        ("--latents same as --checkpoint", ["train", data, "--out", root / "m1", "--latents", root / "z.npy",
                                            "--checkpoint", root / "z.npy"], 1, "give each output its own path"),
        ("1-D .npy embedding", ["sae", _write_npy(root / "one_d.npy", np.arange(10.0)), "--out", root / "s1",
                                "--device", "cpu", "--no-progress"], 1, "expected a 2-D matrix of cells x dims"),
        ("duplicated obs_names with CSV activations",
         ["annotate", "-a", _dup_activations(root)[0], "-e", root / "dups.h5ad", "--out", root / "f.csv",
          "--no-progress"], 1, "obs_names_make_unique()"),
    ]


def test_cli_faults_end_in_one_line_naming_the_fix_before_any_work(files, capsys):
    for name, argv, status, fix in _cli_cases(files):
        code, _, err = run(argv, capsys)
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("usage:")
                 and not line.startswith(" ") and not line.startswith("dgdlens: warning:")]
        assert code == status, (name, err)
        assert fix in err, (name, err)
        assert "Traceback" not in err, (name, err)
        if status == 1:
            assert len(lines) == 1 and lines[0].startswith(f"dgdlens {argv[0]}: error: "), (name, err)
        assert not (files / "m1").exists() and not (files / "s1").exists(), name  # nothing trained or written


@pytest.mark.parametrize("key, fix", [("score", "continuous numbers"), ("barcode", "40 categories")])
def test_cli_warns_on_a_label_column_that_is_not_a_cell_type(files, capsys, key, fix, tmp_path):
    code, _, err = run(["train", files / "data.h5ad", "--out", tmp_path / "m", "--labels-key", key, *TINY], capsys)
    assert code == 0, err
    assert f"dgdlens: warning: labels_key {key!r}" in err and fix in err


def test_cli_warns_when_n_components_exceeds_the_cells(files, capsys, tmp_path):
    code, _, err = run(["train", files / "data.h5ad", "--out", tmp_path / "m", "--n-components", "41", *TINY],
                       capsys)
    assert code == 0, err
    assert err.count("n_components=41 is more than the 40 cells") == 1


# ------------------------------------------------------------------------------------------- nothing is lost

def test_train_overwrite_refuses_a_folder_that_holds_the_input(tmp_path, capsys):
    proj = tmp_path / "proj"
    proj.mkdir()
    tiny_adata().write_h5ad(proj / "data.h5ad")
    before = (proj / "data.h5ad").read_bytes()
    code, _, err = run(["train", proj / "data.h5ad", "--out", proj, "--overwrite", *TINY], capsys)
    assert code == 1 and "contains the input" in err and "nothing was deleted" in err
    assert (proj / "data.h5ad").read_bytes() == before
    assert sorted(p.name for p in proj.iterdir()) == ["data.h5ad"]


def test_train_overwrite_refuses_foreign_files_and_replaces_its_own_model(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run(["train", files / "data.h5ad", "--out", out, "--overwrite", *TINY], capsys)
    assert code == 1 and "did not write (notes.txt)" in err
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert run(["train", files / "data.h5ad", "--out", out, *TINY], capsys)[0] == 0  # empty folder: fine
    first = (out / "weights.safetensors").read_bytes()
    code, _, err = run(["train", files / "data.h5ad", "--out", out, "--overwrite", "--seed", "1", *TINY], capsys)
    assert code == 0, err
    assert (out / "weights.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folders left


def test_sae_overwrite_refuses_a_folder_it_did_not_write(files, tmp_path, capsys):
    z = _write_npy(tmp_path / "z.npy", np.random.default_rng(0).normal(size=(30, 3)).astype(np.float32))
    out = tmp_path / "sae"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run(["sae", z, "--out", out, "--overwrite", "--epochs", "1", "--device", "cpu",
                        "--no-progress"], capsys)
    assert code == 1 and "did not write (keep.txt)" in err and (out / "keep.txt").exists()


def test_demo_refuses_a_non_empty_folder_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "features.csv").write_text("my own table")
    code, _, err = run(["demo", "--quick", "--out", out, "--device", "cpu", "--no-progress"], capsys)
    assert code == 1 and "was not written by the demo" in err and "--overwrite" in err
    assert (out / "features.csv").read_text() == "my own table"
    assert sorted(p.name for p in out.iterdir()) == ["features.csv"]
    (tmp_path / "afile").write_text("x")
    code, _, err = run(["demo", "--quick", "--out", tmp_path / "afile", "--device", "cpu"], capsys)
    assert code == 1 and "is a file" in err


def test_demo_recognises_its_own_folder_and_checks_its_model_folders(tmp_path):
    from dgdlens.demo import MARKER, _write_marker, prepare_output_folder

    own = tmp_path / "own"
    own.mkdir()
    _write_marker(own)
    (own / "report.html").write_text("old report")
    assert prepare_output_folder(own) == own  # the demo's own folder: no --overwrite needed
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("x")
    assert prepare_output_folder(foreign, overwrite=True) == foreign
    (foreign / "dgd").mkdir()
    (foreign / "dgd" / "data.h5ad").write_text("precious")
    with pytest.raises(FileExistsError, match="did not write"):
        prepare_output_folder(foreign, overwrite=True)
    assert json.loads((own / MARKER).read_text())["written_by"] == "dgdlens demo"


def test_resume_command_after_ctrl_c():
    from argparse import Namespace

    from dgdlens.cli import _resume_command

    argv = ["train", "d.h5ad", "--out", "m", "--checkpoint", "ck.st", "--resume", "old.st", "--epochs", "5"]
    assert _resume_command(Namespace(checkpoint_path="ck.st"), argv) == (
        "dgdlens train d.h5ad --out m --checkpoint ck.st --epochs 5 --resume ck.st")


# ------------------------------------------------------------------------------------------- full disk

def _full_disk(*args, **kwargs):
    target = Path(args[0] if args else kwargs["file"])
    if not str(target).endswith(".npy"):
        target = Path(str(target) + ".npy")
    target.write_bytes(b"\x93NUMPY half a file")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_embed_leaves_no_partial_file_and_one_line(files, model_dir, capsys, tmp_path):
    out = tmp_path / "z.npy"
    with mock.patch("numpy.save", _full_disk):
        code, _, err = run(["embed", model_dir, files / "data.h5ad", "--out", out, "--n-steps", "2",
                            "--device", "cpu", "--no-progress"], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, err
    assert f"No space left on device while writing {out}; nothing was written, free space and rerun" in lines[0]
    assert list(tmp_path.iterdir()) == []  # no z.npy, no temporary file


def test_a_full_disk_while_writing_an_h5ad_keeps_the_old_file(tmp_path):
    from dgdlens.data.matrix import write_h5ad_out_of_core

    dest = tmp_path / "out.h5ad"
    dest.write_bytes(b"the previous result")

    def failing_write(self, path, *args, **kwargs):
        Path(path).write_bytes(b"\x89HDF half")
        raise OSError("Can't write data (file write failed: errno = 28, error message = 'No space left on device')")

    with mock.patch.object(ad.AnnData, "write_h5ad", failing_write):
        with pytest.raises(OutputWriteError, match="No space left on device while writing .*out.h5ad"):
            write_h5ad_out_of_core(tiny_adata(), dest)
    assert dest.read_bytes() == b"the previous result"
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5ad"]


def test_a_full_disk_while_writing_the_report_keeps_no_temporary_file(tmp_path):
    from dgdlens.report.html import Report

    report = Report("t")
    with mock.patch("pathlib.Path.write_text", side_effect=OSError(errno.ENOSPC, "No space left on device")):
        with pytest.raises(OutputWriteError, match="No space left on device while writing"):
            report.write(tmp_path / "report.html")
    assert list(tmp_path.iterdir()) == []
