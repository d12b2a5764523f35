"""The shared save format: round trips, and every broken directory refused with a useful message."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dgdlens._io import FORMAT_VERSION, ModelFormatError, load_model_dir, save_model_dir, to_jsonable


@pytest.fixture
def saved(tmp_path):
    tensors = {"w": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "scalar": torch.tensor(2.5)}
    config = {"n": np.int64(3), "alpha": np.float32(0.5), "shape": (3, 4), "flag": np.bool_(True),
              "arr": np.arange(3), "nan": float("nan"), "nested": {"t": torch.tensor([1.0, 2.0])}}
    path = save_model_dir(tmp_path / "model", tensors, config, kind="Toy")
    return path, tensors


def _meta(path):
    return json.loads((path / "config.json").read_text())


def _write_meta(path, meta):
    """Write an edited config.json with a matching checksum (what a careful forger would do), so the
    checks after the checksum are reached."""
    from dgdlens._io import _config_sha256

    meta["config_sha256"] = _config_sha256(meta)
    (path / "config.json").write_text(json.dumps(meta))


def test_round_trip_gives_identical_tensors_and_jsonable_config(saved):
    path, tensors = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "weights.safetensors"]
    loaded, config = load_model_dir(path, kind="Toy")
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v)
    assert config == {"n": 3, "alpha": 0.5, "shape": [3, 4], "flag": True, "arr": [0, 1, 2], "nan": None,
                      "nested": {"t": [1.0, 2.0]}}
    meta = _meta(path)
    assert meta["format_version"] == FORMAT_VERSION and meta["kind"] == "Toy"
    assert meta["tensors"] == {"w": [3, 4], "b": [5], "scalar": []}


def test_save_refuses_to_overwrite_unless_asked(saved):
    path, _ = saved
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_model_dir(path, {"x": torch.zeros(2)}, {}, kind="Toy")
    save_model_dir(path, {"x": torch.ones(2)}, {"v": 2}, kind="Toy", overwrite=True)
    tensors, config = load_model_dir(path, kind="Toy")
    assert list(tensors) == ["x"] and config == {"v": 2}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_save_refuses_a_file_path(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        save_model_dir(f, {"x": torch.zeros(1)}, {}, kind="Toy", overwrite=True)


def test_missing_path_file_path_and_missing_files(saved, tmp_path):
    path, _ = saved
    with pytest.raises(ModelFormatError, match="No model directory"):
        load_model_dir(tmp_path / "nope", kind="Toy")
    with pytest.raises(ModelFormatError, match="is a file"):
        load_model_dir(path / "config.json", kind="Toy")
    (path / "weights.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="missing weights.safetensors.*model.save"):
        load_model_dir(path, kind="Toy")


def test_corrupted_json_is_refused(saved):
    path, _ = saved
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON.*corrupted"):
        load_model_dir(path, kind="Toy")
    (path / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ModelFormatError, match="not written by dgdlens"):
        load_model_dir(path, kind="Toy")


def test_newer_format_and_wrong_kind_are_refused(saved):
    path, _ = saved
    with pytest.raises(ModelFormatError, match="holds a 'Toy' model, not a 'DGD'"):
        load_model_dir(path, kind="DGD")
    meta = _meta(path)
    meta["format_version"] = FORMAT_VERSION + 1
    _write_meta(path, meta)
    with pytest.raises(ModelFormatError, match="upgrade dgdlens"):
        load_model_dir(path, kind="Toy")


def test_corrupted_or_replaced_weights_fail_the_checksum(saved):
    path, _ = saved
    w = path / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last tensor's bytes
    w.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="checksum.*corrupted or were replaced"):
        load_model_dir(path, kind="Toy")


def test_unreadable_weights_with_matching_checksum(saved):
    path, _ = saved
    w = path / "weights.safetensors"
    w.write_bytes(b"garbage that is not safetensors")
    meta = _meta(path)
    import hashlib

    meta["weights_sha256"] = hashlib.sha256(w.read_bytes()).hexdigest()
    _write_meta(path, meta)
    with pytest.raises(ModelFormatError, match="Could not read .*corrupted"):
        load_model_dir(path, kind="Toy")


def test_shapes_that_disagree_with_the_config_are_refused(saved):
    path, _ = saved
    meta = _meta(path)
    meta["tensors"]["w"] = [4, 3]
    _write_meta(path, meta)
    with pytest.raises(ModelFormatError, match=r"'w' has shape \[3, 4\] but config.json says \[4, 3\]"):
        load_model_dir(path, kind="Toy")
    meta["tensors"] = {"w": [3, 4], "ghost": [1]}
    _write_meta(path, meta)
    with pytest.raises(ModelFormatError, match="lacks tensor 'ghost'"):
        load_model_dir(path, kind="Toy")


def test_model_format_error_is_a_value_error():
    assert issubclass(ModelFormatError, ValueError)


def test_to_jsonable_handles_numpy_torch_and_non_finite():
    from pathlib import Path

    out = to_jsonable({1: np.float64(math.inf), "p": Path("/a/b"), "t": torch.tensor(3), "l": [np.int8(2), (1, 2)]})
    assert out == {"1": None, "p": "/a/b", "t": 3, "l": [2, [1, 2]]}
    json.dumps(out)


# ------------------------------------------------------------------ config checksum, old format, validation

def test_an_edited_config_is_refused_by_the_checksum(saved):
    path, _ = saved
    meta = _meta(path)
    assert meta["format_version"] == 2 and len(meta["config_sha256"]) == 64
    meta["config"]["n"] = 4  # e.g. gene names or the SAE kind changed by hand
    (path / "config.json").write_text(json.dumps(meta, indent=2))
    with pytest.raises(ModelFormatError, match="edited or corrupted.*Restore the original config.json"):
        load_model_dir(path, kind="Toy")


def test_reformatting_the_json_alone_is_not_an_edit(saved):
    path, tensors = saved
    meta = _meta(path)
    (path / "config.json").write_text(json.dumps(dict(reversed(list(meta.items())))))  # other order, no indent
    loaded, _ = load_model_dir(path, kind="Toy")
    assert torch.equal(loaded["w"], tensors["w"])


def test_format_1_directories_without_a_config_checksum_still_load(saved):
    path, tensors = saved
    meta = _meta(path)
    del meta["config_sha256"]
    meta["format_version"] = 1
    (path / "config.json").write_text(json.dumps(meta))
    loaded, config = load_model_dir(path, kind="Toy")
    assert torch.equal(loaded["w"], tensors["w"]) and config["n"] == 3


def test_validate_hook_and_validate_choice_turn_unknown_settings_into_model_format_errors(tmp_path):
    from dgdlens._io import validate_choice

    path = save_model_dir(tmp_path / "m", {"x": torch.zeros(1)}, {"params": {"scaling": "median"}}, kind="Toy")
    with pytest.raises(ModelFormatError, match="scaling = 'median' is not one of 'sum', 'max'"):
        load_model_dir(path, kind="Toy",
                       validate=lambda c: validate_choice(c, "params.scaling", ["sum", "max", "mean", "none"]))
    with pytest.raises(ModelFormatError, match="invalid setting .*save the model again"):
        load_model_dir(path, kind="Toy", validate=lambda c: c["params"]["activation"])
    assert validate_choice({"a": {"b": "relu"}}, "a.b", ["relu"]) == "relu"
    with pytest.raises(ModelFormatError, match="has no 'a.c'"):
        validate_choice({"a": {"b": "relu"}}, "a.c", ["relu"])


# ------------------------------------------------------------------ overwrite never deletes what dgdlens did not write

def test_overwrite_refuses_a_folder_with_foreign_files_and_deletes_nothing(saved):
    path, _ = saved
    (path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="did not write \\(notes.txt\\); nothing was deleted"):
        save_model_dir(path, {"x": torch.ones(2)}, {}, kind="Toy", overwrite=True)
    assert (path / "notes.txt").read_text() == "mine" and (path / "weights.safetensors").exists()


def test_overwrite_refuses_a_folder_that_holds_the_input(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "data.h5ad").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="contains the input .*nothing was deleted"):
        save_model_dir(proj, {"x": torch.ones(2)}, {}, kind="Toy", overwrite=True, inputs=[proj / "data.h5ad"])
    with pytest.raises(FileExistsError, match="did not write"):
        save_model_dir(proj, {"x": torch.ones(2)}, {}, kind="Toy", overwrite=True)
    assert (proj / "data.h5ad").read_bytes() == b"precious"


def test_overwrite_refuses_a_config_json_that_dgdlens_did_not_write(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"some": "tool"}')
    with pytest.raises(FileExistsError, match="not a dgdlens model folder"):
        save_model_dir(other, {"x": torch.ones(2)}, {}, kind="Toy", overwrite=True)
    assert (other / "config.json").read_text() == '{"some": "tool"}'


def test_an_empty_folder_needs_no_overwrite_and_a_replacement_leaves_nothing_behind(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    save_model_dir(empty, {"x": torch.ones(2)}, {"v": 1}, kind="Toy")
    save_model_dir(empty, {"x": torch.zeros(3)}, {"v": 2}, kind="Toy", overwrite=True)
    tensors, config = load_model_dir(empty, kind="Toy")
    assert config == {"v": 2} and tensors["x"].shape == (3,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no .tmp / .old folders
    (tmp_path / "plain").mkdir()
    assert empty.stat().st_mode == (tmp_path / "plain").stat().st_mode  # umask permissions, not mkdtemp's 0700


def test_a_failed_save_keeps_the_old_model(saved):
    import errno
    from unittest import mock

    path, tensors = saved
    with mock.patch("safetensors.torch.save_file", side_effect=OSError(errno.ENOSPC, "No space left on device")):
        with pytest.raises(OSError, match="No space left on device while writing .*nothing was written"):
            save_model_dir(path, {"x": torch.ones(2)}, {}, kind="Toy", overwrite=True)
    loaded, _ = load_model_dir(path, kind="Toy")
    assert torch.equal(loaded["w"], tensors["w"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["model"]


# ------------------------------------------------------------------ atomic outputs

def test_atomic_path_on_a_full_disk_leaves_the_destination_untouched_and_no_temp_file(tmp_path):
    import errno

    from dgdlens._io import OutputWriteError, atomic_path

    dest = tmp_path / "latents.npy"
    dest.write_bytes(b"old")

    def full_disk_writer(target):
        with open(target, "wb") as fh:
            fh.write(b"half a fi")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputWriteError) as info:
        with atomic_path(dest) as tmp:
            assert tmp.parent == dest.parent and tmp.name.endswith(".npy")
            full_disk_writer(tmp)
    assert str(info.value) == (f"No space left on device while writing {dest}; nothing was written, free space "
                               "and rerun (or write to another disk).")
    assert info.value.errno == errno.ENOSPC
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["latents.npy"]


def test_atomic_path_writes_whole_files_and_removes_the_temp_on_any_error(tmp_path):
    from dgdlens._io import atomic_path, atomic_write_text

    dest = tmp_path / "sub" / "table.csv"
    with pytest.raises(KeyError):
        with atomic_path(dest) as tmp:
            tmp.write_text("partial")
            raise KeyError("boom")
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    atomic_write_text(dest, "a,b\n1,2\n")
    assert dest.read_text() == "a,b\n1,2\n" and [p.name for p in dest.parent.iterdir()] == ["table.csv"]
    np.save(tmp_path / "x.npy", np.zeros(1))
    with atomic_path(tmp_path / "y.npy") as tmp:
        np.save(tmp, np.arange(3))  # np.save would append .npy to a name without it
    assert np.load(tmp_path / "y.npy").tolist() == [0, 1, 2]


def test_atomic_path_with_a_file_as_parent_says_so(tmp_path):
    from dgdlens._io import OutputWriteError, atomic_path, check_output_location

    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputWriteError, match="afile is a file, not a folder"):
        with atomic_path(tmp_path / "afile" / "out.csv"):
            pass
    with pytest.raises(OutputWriteError, match="afile is a file, not a folder"):
        check_output_location(tmp_path / "afile" / "deeper" / "out.csv")
    with pytest.raises(OutputWriteError, match="is the input file"):
        check_output_location(tmp_path / "afile", inputs=[tmp_path / "afile"])
    assert check_output_location(tmp_path / "new" / "dir" / "out.csv") == tmp_path / "new" / "dir" / "out.csv"
    assert not (tmp_path / "new").exists()  # checking creates nothing
