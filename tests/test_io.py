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
    (path / "config.json").write_text(json.dumps(meta))
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
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match="Could not read .*corrupted"):
        load_model_dir(path, kind="Toy")


def test_shapes_that_disagree_with_the_config_are_refused(saved):
    path, _ = saved
    meta = _meta(path)
    meta["tensors"]["w"] = [4, 3]
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match=r"'w' has shape \[3, 4\] but config.json says \[4, 3\]"):
        load_model_dir(path, kind="Toy")
    meta["tensors"] = {"w": [3, 4], "ghost": [1]}
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match="lacks tensor 'ghost'"):
        load_model_dir(path, kind="Toy")


def test_model_format_error_is_a_value_error():
    assert issubclass(ModelFormatError, ValueError)


def test_to_jsonable_handles_numpy_torch_and_non_finite():
    from pathlib import Path

    out = to_jsonable({1: np.float64(math.inf), "p": Path("/a/b"), "t": torch.tensor(3), "l": [np.int8(2), (1, 2)]})
    assert out == {"1": None, "p": "/a/b", "t": 3, "l": [2, [1, 2]]}
    json.dumps(out)
