"""What the benchmark scripts share: where the real data is."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def data_dir(tag: str, sub: str = "") -> Path:
    """``$VQAD_DATA`` or ``../shared/data``; exits with a one-line message when it (or ``sub``) is missing."""
    env = os.environ.get("VQAD_DATA")
    d = Path(env) if env else REPO.parent / "shared" / "data"
    if not (d / sub).is_dir():
        sys.exit(f"{tag}: data not found at {d / sub}: set VQAD_DATA to the shared data directory")
    return d
