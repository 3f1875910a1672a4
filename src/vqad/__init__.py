"""vqad: Variable Bitrate Neural Fields (VQ-AD) — compact, streamable neural SDFs and radiance fields.

Library entry points::

    import vqad
    field = vqad.load("model.vqad")          # or a checkpoint directory, bytes, a stream
    d = field(x, lod=5)                       # SDF at LOD 5, x: (N, 3) in the unit cube
"""

from vqad.errors import CorruptStreamError, InputError, StreamError, TruncatedStreamError, VqadError

__version__ = "0.1.0"
__all__ = ["load", "VqadError", "InputError", "StreamError", "TruncatedStreamError", "CorruptStreamError"]


def __getattr__(name: str):
    """``vqad.load`` imports PyTorch when first used, not with the package: the command line starts (and
    answers Ctrl-C) before that import."""
    if name == "load":
        from vqad.api import load

        return load
    raise AttributeError(f"module 'vqad' has no attribute {name!r}")
