"""vqad: Variable Bitrate Neural Fields (VQ-AD) — compact, streamable neural SDFs and radiance fields.

Library entry points::

    import vqad
    field = vqad.load("model.vqad")          # or a checkpoint directory, bytes, a stream
    d = field(x, lod=5)                       # SDF at LOD 5, x: (N, 3) in the unit cube
"""


from vqad.api import load
from vqad.errors import CorruptStreamError, InputError, StreamError, TruncatedStreamError, VqadError

__version__ = "0.1.0"
__all__ = ["load", "VqadError", "InputError", "StreamError", "TruncatedStreamError", "CorruptStreamError"]
