"""Training checkpoints as one safetensors file: tensors as tensors, everything else as JSON.

A training state is a nested structure of dicts, lists, tuples, numbers, strings, tensors and numpy
arrays (module and optimiser state dicts, numpy random-generator states, the history). It is split
into a flat ``{key: tensor}`` map stored as safetensors and a JSON tree with ``{"__tensor__": key}``
placeholders, stored in the safetensors header's metadata. Reading it back never runs code: there is
no pickle anywhere, so a crafted file can at worst fail to parse.

The file also records what it was written for (model kind, data fingerprint: shapes and hashes of
gene and cell names); :func:`read_checkpoint` refuses a checkpoint of other data instead of silently
resuming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_path

__all__ = ["CheckpointError", "write_checkpoint", "read_checkpoint", "pack_state", "unpack_state"]

CHECKPOINT_FORMAT = "dgdlens-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be read, was written by something else, or belongs to other data."""


# ------------------------------------------------------------------ nested state <-> tensors + JSON
def pack_state(obj, tensors: dict[str, torch.Tensor] | None = None, prefix: str = "s"):
    """Split ``obj`` into JSON-safe structure and a flat tensor map; returns ``(tree, tensors)``."""
    tensors = {} if tensors is None else tensors

    def walk(value, key: str):
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(value, np.ndarray):
            tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
            return {"__ndarray__": key}
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value) and not any(k.startswith("__") for k in value):
                return {k: walk(v, f"{key}.{k}") for k, v in value.items()}
            # non-string keys (optimiser state is keyed by parameter index) keep their type
            return {"__items__": [[walk(k, f"{key}.k{i}"), walk(v, f"{key}.{i}")] for i, (k, v) in enumerate(value.items())]}
        if isinstance(value, tuple):
            return {"__tuple__": [walk(v, f"{key}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(value)]
        if isinstance(value, (np.integer,)):
            return int(value)
        if isinstance(value, (np.floating,)):
            return float(value)
        if isinstance(value, (np.bool_,)):
            return bool(value)
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"Cannot store a {type(value).__name__} in a checkpoint (at {key}).")

    return walk(obj, prefix), tensors


def unpack_state(tree, tensors: dict[str, torch.Tensor]):
    """Inverse of :func:`pack_state`."""
    if isinstance(tree, list):
        return [unpack_state(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__ndarray__" in tree:
            return tensors[tree["__ndarray__"]].numpy()
        if "__tuple__" in tree:
            return tuple(unpack_state(v, tensors) for v in tree["__tuple__"])
        if "__items__" in tree:
            return {unpack_state(k, tensors): unpack_state(v, tensors) for k, v in tree["__items__"]}
        return {k: unpack_state(v, tensors) for k, v in tree.items()}
    return tree


# ------------------------------------------------------------------ files
def write_checkpoint(path, state: dict, *, kind: str, fingerprint: dict) -> Path:
    """Write ``state`` atomically to ``path`` (a temporary file in the same folder, then renamed).

    A failure leaves the previous checkpoint intact and no temporary file behind.

    Parameters
    ----------
    path
        Destination file (str or path-like); its folder must exist.
    state
        The training state: nested dicts (string keys not starting with ``__``, or any JSON-storable keys),
        lists, tuples, numbers, strings, ``None``, torch tensors and numpy arrays. Tensors are stored on
        the CPU.
    kind
        What was trained (e.g. the model class); :func:`read_checkpoint` refuses other kinds.
    fingerprint
        JSON-serialisable description of the data and settings (shapes, name hashes, world size, rank);
        :func:`read_checkpoint` refuses a checkpoint whose fingerprint differs.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    TypeError
        If ``state`` holds a value that cannot be stored.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tree, tensors = pack_state(state)
    meta = {"format": CHECKPOINT_FORMAT, "version": str(CHECKPOINT_VERSION), "kind": kind,
            "fingerprint": json.dumps(fingerprint, sort_keys=True), "state": json.dumps(tree)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_checkpoint(path, *, kind: str, fingerprint: dict, device: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`write_checkpoint` for this ``kind`` and data.

    Raises :class:`FileNotFoundError` for a missing file and :class:`CheckpointError` for a damaged or
    foreign one (a pickle included: it is never unpickled) and for a checkpoint of other data (different
    shapes, genes or cells).

    Parameters
    ----------
    path
        The checkpoint file (str or path-like).
    kind
        The kind the checkpoint must have been written for.
    fingerprint
        The fingerprint of the current data and settings; every key must match the saved one (compared
        after a JSON round trip, so tuples and lists compare equal).
    device
        Where the tensors are loaded (a device string or :class:`torch.device`).

    Returns
    -------
    dict
        The state as given to :func:`write_checkpoint`: tensors on ``device``, numpy arrays as arrays,
        tuples as tuples.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        If ``path`` is a directory, not a dgdlens safetensors checkpoint, of another ``kind``, damaged or
        incomplete, or written for another fingerprint.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}; pass the checkpoint_path of the run to resume.")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; a checkpoint is the single file written to checkpoint_path.")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a dgdlens checkpoint ({err}). Checkpoints are safetensors files written by "
            "train(checkpoint_path=...); older pickle checkpoints are never loaded. Start the run again."
        ) from err
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a dgdlens checkpoint; pass the file written "
                              "by train(checkpoint_path=...).")
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path} is a checkpoint of a {meta.get('kind')!r} run, not of a {kind!r}; resume it "
                              "with the matching model.")
    try:
        saved = json.loads(meta["fingerprint"])
        tree = json.loads(meta["state"])
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} has a damaged header ({err}); start the run again.") from err
    expected = json.loads(json.dumps(fingerprint, sort_keys=True))
    differs = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
    if differs:
        raise CheckpointError(
            f"{path} was written for other data or another model ({', '.join(differs)} differ); it cannot be "
            "resumed here. Resume with the same data and settings, or start without resume_from."
        )
    try:
        return unpack_state(tree, tensors)
    except KeyError as err:
        raise CheckpointError(f"{path} lacks tensor {err}; the file is incomplete, start the run again.") from err
