"""The one device policy of vqad.

The device is chosen once, at the top (the CLI's ``--device`` or :func:`resolve_device`), and every
tensor of a model, a dataset and a trainer is created on it. Nothing below silently moves tensors to
another device or falls back from CUDA to the CPU.
"""

from __future__ import annotations

import torch

from vqad.errors import InputError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N"`` into a :class:`torch.device`.

    ``auto`` picks CUDA when a GPU is present, else the CPU. Asking for CUDA on a machine without
    one is an error, never a silent fallback.
    """
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise InputError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU: use --device cpu")
    return dev


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: CUDA allocator peak on a GPU, max RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
