import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``$VQAD_DATA`` or ``../shared/data`` beside the repository; None when absent."""
    env = os.environ.get("VQAD_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if cand.is_dir():
            return cand
    return None


@pytest.fixture
def data_dir() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("real data not found: set VQAD_DATA or put shared/data beside the repository")
    return d


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is fastest, and far faster on a shared, busy machine (a second only spins)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def need_open3d(why: str):
    """Open3D, or a skip with a one-line reason: not installed, or installed but unable to load (a
    system library it links against, such as libusb-1.0, missing: ``ImportError``, which
    ``pytest.importorskip`` does not skip on since pytest 9)."""
    try:
        import open3d
    except ImportError as e:
        lines = str(e).splitlines() or [type(e).__name__]
        pytest.skip(f"{why}: open3d cannot be imported ({lines[0]})")
    return open3d
