"""One save format for every model: a directory with ``weights.safetensors`` and ``config.json``.

``config.json`` holds the format version, the kind of model, the package version, a SHA-256 of the
weights file, and whatever the model needs to rebuild itself. Loading validates all of that before
anything is built, and every failure says what is wrong and what to do.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["FORMAT_VERSION", "ModelFormatError", "save_model_dir", "load_model_dir", "to_jsonable"]

FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
CONFIG = "config.json"


class ModelFormatError(ValueError):
    """A model directory is missing, corrupted, or was written by something else."""


def to_jsonable(obj):
    """Make numpy/torch scalars and arrays, tuples and paths JSON-friendly (NaN becomes None)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_model_dir(path, tensors: dict[str, torch.Tensor], config: dict, *, kind: str, overwrite: bool = False) -> Path:
    """Write ``tensors`` (safetensors) and ``config`` (JSON) to the directory ``path``, atomically.

    The files are written to a temporary directory first and moved into place, so an interrupted
    save never leaves a half-written model behind.
    """
    from safetensors.torch import save_file

    from . import __version__

    path = Path(path)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
        if path.is_file():
            raise FileExistsError(f"{path} is a file, not a model directory; choose another path.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(flat, str(tmp / WEIGHTS))
        meta = {
            "format": "dgdlens",
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "dgdlens_version": __version__,
            "weights_sha256": _sha256(tmp / WEIGHTS),
            "tensors": {k: list(v.shape) for k, v in flat.items()},
            "config": to_jsonable(config),
        }
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_model_dir(path, *, kind: str, map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read and validate a model directory written by :func:`save_model_dir`.

    Returns ``(tensors, config)``. Raises :class:`ModelFormatError` when the directory is missing
    files, the JSON is unreadable, the kind or format version does not match, the weights fail their
    checksum, or the stored tensor shapes differ from the ones recorded.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"No model directory at {path}.")
    if not path.is_dir():
        raise ModelFormatError(f"{path} is a file; a saved model is a directory with {CONFIG} and {WEIGHTS}.")
    cfg_file, w_file = path / CONFIG, path / WEIGHTS
    missing = [p.name for p in (cfg_file, w_file) if not p.exists()]
    if missing:
        raise ModelFormatError(
            f"{path} is not a dgdlens model directory: missing {', '.join(missing)}. "
            "Point to the directory that model.save() wrote."
        )
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFormatError(f"{cfg_file} is not valid JSON ({err}); the model directory is corrupted, save it again.") from err
    if not isinstance(meta, dict) or meta.get("format") != "dgdlens":
        raise ModelFormatError(f"{cfg_file} was not written by dgdlens; point to a directory saved with model.save().")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFormatError(
            f"{path} uses save format {version!r}, but this dgdlens reads formats up to {FORMAT_VERSION}; "
            "upgrade dgdlens to load it."
        )
    if meta.get("kind") != kind:
        raise ModelFormatError(
            f"{path} holds a {meta.get('kind')!r} model, not a {kind!r}; load it with the matching class."
        )
    if meta.get("weights_sha256") != _sha256(w_file):
        raise ModelFormatError(
            f"{w_file} does not match the checksum in {CONFIG}: the weights are corrupted or were replaced. "
            "Restore the directory from a good copy or save the model again."
        )
    try:
        tensors = load_file(str(w_file), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ModelFormatError(f"Could not read {w_file}: {err}. The file is corrupted; save the model again.") from err
    expected = meta.get("tensors", {})
    for name, shape in expected.items():
        if name not in tensors:
            raise ModelFormatError(f"{w_file} lacks tensor {name!r}; the model directory is incomplete.")
        if list(tensors[name].shape) != list(shape):
            raise ModelFormatError(
                f"Tensor {name!r} has shape {list(tensors[name].shape)} but {CONFIG} says {shape}; "
                "the directory mixes files from different models."
            )
    return tensors, meta["config"]
