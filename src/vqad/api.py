"""Loading any saved model: a checkpoint directory or a .vqad file (path, bytes or stream)."""

from __future__ import annotations

import io
import numbers
import os
from pathlib import Path

import torch

from vqad.device import resolve_device
from vqad.errors import InputError


def load(source, device: str | torch.device = "cpu", lod: int | None = None, max_bytes: int | None = None,
         max_memory: int | None = None, whole: bool = False):
    """Load a field from a checkpoint directory, a ``.vqad`` file, ``bytes`` or a binary stream.

    For a .vqad source, ``max_bytes`` uses only the first N bytes, ``lod`` stops decoding at that
    level of detail (one of the file's LODs: an :class:`InputError` otherwise) and ``max_memory`` bounds
    what decoding a LOD may take (:func:`vqad.fileformat.load`); the field returned holds
    the largest complete LOD available (with ``whole``, a stream cut before its last LOD is an error). A checkpoint
    directory always holds every LOD: there ``lod`` must be one of them (an :class:`InputError`
    otherwise) and the field is returned whole (evaluate a LOD with ``field(x, lod)``).

    The field is for inference, wherever it comes from: in eval mode, its parameters without gradients
    (training goes on with ``vqad fit-* --resume``, or :func:`vqad.checkpoint.load_checkpoint`).
    """
    for name, value in (("lod", lod), ("max_bytes", max_bytes), ("max_memory", max_memory)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0):
            raise InputError(f"{name} must be a whole number >= 0 (or None), got {value!r}")
    lod, max_bytes, max_memory = (None if v is None else int(v) for v in (lod, max_bytes, max_memory))  # NumPy's too
    if isinstance(source, io.TextIOBase):  # (other sources that are not a model: vqad.fileformat.load says so)
        raise InputError(f"cannot load a {type(source).__name__}: a text stream; pass a checkpoint directory, a .vqad "
                         "path, its bytes or a binary stream (open(path, 'rb'))")
    device = resolve_device(device)
    if isinstance(source, (str, os.PathLike)):
        source = path = Path(os.fsdecode(os.fspath(source)))
        if not path.exists():
            raise InputError(f"no such model: {path} (pass a checkpoint directory or a .vqad file)")
        if path.is_dir():
            if max_bytes is not None:
                raise InputError("--bytes applies to .vqad files only: export the checkpoint first (vqad export)")
            if max_memory is not None:
                raise InputError("max_memory bounds the decoding of .vqad files: a checkpoint directory is read whole")
            from vqad.checkpoint import load_checkpoint

            field = load_checkpoint(path, device)[0]
            if lod is not None:
                field.check_lod(lod)
            field.eval().requires_grad_(False)  # for inference, as a file's field: queries build no autograd graph
            return field
    from vqad import fileformat

    return fileformat.load(source, device=device, lod=lod, max_bytes=max_bytes, max_memory=max_memory, whole=whole)


__all__ = ["load", "io"]
