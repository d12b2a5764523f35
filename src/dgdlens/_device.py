"""Devices are arguments, never globals: one resolver every model, plan and verb uses."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]

_KNOWN = ("cpu", "cuda", "mps")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` picks CUDA when available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:1"`` as torch.

    Raises a ValueError naming the choices for anything torch does not know or this machine lacks.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"Unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from err
    if device.type not in _KNOWN:
        raise ValueError(f"Device {device.type!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA device is available; use device='cpu'.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device={str(device)!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s).")
    return device
