"""One save format for every model, and the rules every output file follows.

A model is a directory with ``weights.safetensors`` and ``config.json``. ``config.json`` holds the
format version, the kind of model, the package version, a SHA-256 of the weights file, a SHA-256 of
its own canonical JSON (so an edited config is refused, not silently used), and whatever the model
needs to rebuild itself. Loading validates all of that before anything is built, and every failure
says what is wrong and what to do.

Outputs are written whole or not at all: :func:`atomic_path` gives a writer a temporary path in the
destination's folder and renames it into place only when the writer finished; on any failure the
temporary file is removed, the destination is left as it was, and one line says why.
:func:`save_model_dir` replaces only a directory that is recognisably a dgdlens model, and removes
only the files it wrote itself.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

__all__ = ["FORMAT_VERSION", "ModelFormatError", "OutputWriteError", "save_model_dir", "load_model_dir",
           "to_jsonable", "atomic_path", "atomic_write_text", "check_model_dir_replaceable",
           "check_output_location", "validate_choice", "canonical_json", "is_model_dir", "MODEL_FILES"]

FORMAT_VERSION = 2
WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
#: The only files :func:`save_model_dir` writes, hence the only ones it ever removes.
MODEL_FILES = (WEIGHTS, CONFIG)


class ModelFormatError(ValueError):
    """A model directory is missing, corrupted, or was written by something else."""


class OutputWriteError(OSError):
    """An output could not be written; nothing was left behind (the destination is unchanged)."""

    def __init__(self, message: str, *, errno_: int | None = None, filename=None):
        super().__init__(message)
        self.errno = errno_
        self.filename = None if filename is None else str(filename)

    def __str__(self) -> str:  # one line, no "[Errno N]" prefix
        return self.args[0]


# ------------------------------------------------------------------------------------------ atomic outputs

_NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _errno_of(err: BaseException) -> int | None:
    """The errno behind ``err``, also when a library (h5py) buried it in the message."""
    code = getattr(err, "errno", None)
    if isinstance(code, int):
        return code
    text = str(err)
    if "No space left on device" in text or "errno = 28" in text:
        return errno.ENOSPC
    if "Disk quota exceeded" in text:
        return getattr(errno, "EDQUOT", errno.ENOSPC)
    if "Read-only file system" in text:
        return errno.EROFS
    if "Permission denied" in text:
        return errno.EACCES
    return None


def _write_error(path: Path, err: BaseException) -> OutputWriteError:
    code = _errno_of(err)
    if code in _NO_SPACE:
        text = (f"No space left on device while writing {path}; nothing was written, free space and rerun "
                "(or write to another disk).")
    elif code in (errno.EACCES, errno.EPERM):
        text = f"Permission denied while writing {path}; nothing was written, choose a folder you can write to."
    elif code == errno.EROFS:
        text = f"{path.parent} is on a read-only file system; nothing was written, choose another folder."
    else:
        reason = " ".join(str(getattr(err, "strerror", None) or err).split()) or type(err).__name__
        text = f"Could not write {path} ({reason}); nothing was written, fix the cause and rerun."
    return OutputWriteError(text, errno_=code, filename=path)


def _ensure_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:
        raise OutputWriteError(f"Cannot write {path}: {err.filename or path.parent} is a file, not a folder; "
                               "choose another path.", errno_=errno.ENOTDIR, filename=path) from None
    except OSError as err:
        raise _write_error(path, err) from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _fsync(path: Path) -> None:
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path`` (``os.replace``).

    The temporary name keeps the destination's suffix (``.h5ad``, ``.npy``, ...) because several
    writers look at it. When the block raises, the temporary file is removed and ``path`` is untouched; an ``OSError`` (a full disk, no
    permission) becomes one :class:`OutputWriteError` line that says why and what to do. Nothing
    named ``*.tmp*`` is ever left behind.

    >>> with atomic_path("out/latents.npy") as tmp:     # doctest: +SKIP
    ...     np.save(tmp, z)
    """
    path = Path(path)
    _ensure_parent(path)
    if path.is_dir():
        raise OutputWriteError(f"{path} is a folder; give a file name.", errno_=errno.EISDIR, filename=path)
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield tmp
        if not tmp.exists():
            raise OutputWriteError(f"Could not write {path}: the writer produced no file; nothing was written.",
                                   filename=path)
        _fsync(tmp)
        os.replace(tmp, path)
    except OutputWriteError:
        _remove(tmp)
        raise
    except OSError as err:
        _remove(tmp)
        raise _write_error(path, err) from err
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_path`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return path


def check_output_location(path, *, what: str = "output", inputs: Iterable = ()) -> Path:
    """Check, without creating anything, that ``path`` can be written: it is none of ``inputs``, no
    file stands where a parent folder should be, and the nearest existing folder is writable.

    Raises :class:`OutputWriteError` (an ``OSError``) with one line naming the fix.
    """
    path = Path(path)
    resolved = path.resolve()
    for source in inputs:
        if source is not None and resolved == Path(source).resolve():
            raise OutputWriteError(f"{what} {path} is the input file {source}; write to a new path so the input "
                                   "is kept.", errno_=errno.EEXIST, filename=path)
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputWriteError(f"{what} {path} cannot be written: {ancestor} is a file, not a folder; choose "
                               "another path.", errno_=errno.ENOTDIR, filename=path)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputWriteError(f"{what} {path} cannot be written: no permission to write in {ancestor}; "
                               "choose a folder you can write to.", errno_=errno.EACCES, filename=path)
    return path


# ------------------------------------------------------------------------------------------ JSON helpers

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


def canonical_json(obj) -> str:
    """The one JSON text of ``obj`` that checksums are taken over (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _config_sha256(meta: dict) -> str:
    """SHA-256 of everything in config.json except this checksum itself (kind, tensors, config, ...)."""
    body = {k: v for k, v in meta.items() if k != "config_sha256"}
    return hashlib.sha256(canonical_json(body).encode("ascii")).hexdigest()


def _read_meta(cfg_file: Path):
    try:
        return json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def is_model_dir(path) -> bool:
    """True when ``path`` is a directory whose config.json says it was written by dgdlens."""
    path = Path(path)
    meta = _read_meta(path / CONFIG) if path.is_dir() else None
    return isinstance(meta, dict) and meta.get("format") == "dgdlens"


def check_model_dir_replaceable(path, *, inputs: Iterable = ()) -> None:
    """Raise unless saving a model to ``path`` with ``overwrite=True`` loses nothing the user has.

    Fine: ``path`` does not exist, is an empty folder, or is a dgdlens model folder holding only
    ``weights.safetensors`` and ``config.json``. Refused (``FileExistsError``, nothing is touched):
    a file, a folder that contains any of ``inputs``, a folder with anything else in it.
    """
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a model directory; choose another path.")
    resolved = path.resolve()
    for source in inputs:
        if source is None:
            continue
        src = Path(source).resolve()
        if src == resolved or resolved in src.parents:
            raise FileExistsError(f"{path} contains the input {source}; nothing was deleted. Save the model to a "
                                  "new folder (e.g. a 'model' folder next to the data).")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    foreign = [name for name in entries if name not in MODEL_FILES]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise FileExistsError(f"{path} holds files dgdlens did not write ({shown}); nothing was deleted. Save "
                              "the model to a new or empty folder, or move those files away first.")
    if not is_model_dir(path):
        raise FileExistsError(f"{path} is not a dgdlens model folder ({CONFIG} was not written by dgdlens); "
                              "nothing was deleted. Save the model to a new or empty folder.")


def save_model_dir(path, tensors: dict[str, torch.Tensor], config: dict, *, kind: str, overwrite: bool = False,
                   inputs: Iterable = ()) -> Path:
    """Write ``tensors`` (safetensors) and ``config`` (JSON) to the directory ``path``, atomically.

    The files are written to a temporary directory next to ``path`` and renamed into place, so an
    interrupted save never leaves a half-written model behind. A non-empty ``path`` needs
    ``overwrite=True`` and is replaced only if it is a dgdlens model folder holding nothing else
    (see :func:`check_model_dir_replaceable`); the old model's two files are the only ones removed,
    never a whole tree. ``inputs``: files that must not be inside ``path`` (the training data).
    """
    from safetensors.torch import save_file

    from ._version import __version__

    path = Path(path)
    if path.exists():
        if path.is_file():
            raise FileExistsError(f"{path} is a file, not a model directory; choose another path.")
        if any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
    check_model_dir_replaceable(path, inputs=inputs)
    _ensure_parent(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.mkdir(mode=0o777)  # the usual umask permissions (mkdtemp would make it private)
    except OSError as err:
        raise _write_error(path, err) from err
    old = None
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
        meta["config_sha256"] = _config_sha256(meta)
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2, allow_nan=False))
        _fsync(tmp / WEIGHTS)
        _fsync(tmp / CONFIG)
        if path.exists() and any(path.iterdir()):
            # move the old model aside (one rename), put the new one in place (one rename), then delete
            # only the old model's own files; if the second rename fails, the old model goes back
            old = path.with_name(f".{path.name}.{secrets.token_hex(4)}.old")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                old = None
                raise
        else:
            os.replace(tmp, path)  # rename(2) replaces a missing or empty directory
    except OSError as err:
        raise _write_error(path, err) from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            for name in MODEL_FILES:
                with contextlib.suppress(OSError):
                    (old / name).unlink()
            with contextlib.suppress(OSError):
                old.rmdir()  # never rmtree: anything unexpected stays where it is
    return path


def validate_choice(config: dict, key: str, allowed: Iterable, *, where: str = "config.json"):
    """``config[key]`` if it is one of ``allowed``, else a :class:`ModelFormatError` naming the choices.

    ``key`` may be dotted (``"params.scaling"``) to reach into nested dicts. For model ``load()``
    methods (or a ``validate=`` hook of :func:`load_model_dir`): a config naming an unknown scaling,
    activation or likelihood is refused before anything is built.
    """
    value = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ModelFormatError(f"{where} has no {key!r}; the model directory is incomplete or was edited. "
                                   "Restore it from a good copy or save the model again.")
        value = value[part]
    allowed = list(allowed)
    if value not in allowed:
        raise ModelFormatError(f"{where}: {key} = {value!r} is not one of {', '.join(map(repr, allowed))}; the "
                               "file was edited or written by a newer dgdlens. Restore it or upgrade dgdlens.")
    return value


def load_model_dir(path, *, kind: str, map_location: str | torch.device = "cpu",
                   validate: Callable[[dict], None] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and validate a model directory written by :func:`save_model_dir`.

    Returns ``(tensors, config)``. Raises :class:`ModelFormatError` when the directory is missing
    files, the JSON is unreadable, the kind or format version does not match, the weights or the
    config fail their checksum (format 2; format-1 directories have a weights checksum only and
    still load), the stored tensor shapes differ from the ones recorded, or ``validate(config)``
    (the model's own check of its parameters, e.g. with :func:`validate_choice`) raises.
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
    if (version >= 2 or "config_sha256" in meta) and meta.get("config_sha256") != _config_sha256(meta):
        raise ModelFormatError(
            f"{cfg_file} was edited or corrupted: it no longer matches the checksum saved with the model "
            "(gene names, model settings and SAE kind are all covered). Restore the original config.json "
            "from a good copy, or retrain and save the model again."
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
    config = meta.get("config")
    if not isinstance(config, dict):
        raise ModelFormatError(f"{cfg_file} has no model config; the model directory is incomplete, save it again.")
    if validate is not None:
        try:
            validate(config)
        except ModelFormatError:
            raise
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFormatError(f"{cfg_file} holds an invalid setting ({err}); the file was edited or is "
                                   "corrupted. Restore it from a good copy or save the model again.") from err
    return tensors, config
