"""The host allocator policy (vqad.device.keep_freed_memory): a freed multi-MB tensor's memory stays in
the process for the next one (no fresh pages to fault in); $VQAD_MALLOC=default leaves malloc alone."""

import os
import subprocess
import sys

import pytest

#: prints whether the policy took and how many bytes of live 16 MiB and 64 MiB tensors glibc serves from mmap'd blocks
#: (mallinfo2().hblkhd; such a block is unmapped when freed, so the next tensor starts on fresh pages).
#: Counted by the allocator itself: unlike page-fault counts it does not depend on what the kernel reclaims.
PROBE = r"""
import ctypes, torch
from vqad.device import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
if not hasattr(libc, "mallinfo2"):
    print("skip", 0)
    raise SystemExit
libc.mallinfo2.restype = MallInfo2
took = keep_freed_memory()
before = libc.mallinfo2().hblkhd
x = torch.ones(4 << 20)
y = torch.ones(16 << 20)  # 64 MiB: past glibc's largest mmap threshold (32 MiB)
print(int(took), libc.mallinfo2().hblkhd - before)
"""


def _probe(env_value: str | None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "VQAD_MALLOC"}
    if env_value is not None:
        env["VQAD_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    took, mapped = out.stdout.split()
    return took, int(mapped)


def test_large_tensors_come_from_the_heap_unless_told_not_to():
    took, kept_mapped = _probe(None)
    if took != "1":
        pytest.skip("this C library has no glibc mallopt / mallinfo2: the allocator policy does not apply here")
    default_took, default_mapped = _probe("default")
    assert default_took == "0"
    assert default_mapped >= 80 << 20  # malloc's defaults: blocks of their own, unmapped when freed
    assert kept_mapped == 0  # from the heap, which keeps them when freed (up to KEEP_TRIM_THRESHOLD)


def test_cli_sets_the_policy(monkeypatch, tmp_path):
    """The vqad command applies the policy before it runs a command (here one that fails on its input)."""
    import vqad.app.cli as cli

    calls = []
    monkeypatch.setattr("vqad.device.keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["info", str(tmp_path / "missing.vqad")]) == 2
    assert calls == [1]


RELEASE = r"""
import torch
from vqad.device import keep_freed_memory, release_freed_memory

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))

took = keep_freed_memory()
big = torch.ones(1 << 26)  # 256 MiB, from the heap where glibc can extend it
small = torch.ones(1000)   # allocated after it: the heap's top stays in use
peak = rss()
del big
kept = rss()
released = release_freed_memory()
after = rss()
print(int(took), int(released), peak - after, kept - after)
"""


def test_freed_memory_goes_back_between_jobs():
    """A large freed block pinned under a later small one stays in the process until
    release_freed_memory (called between vqad sweep's points and vqad batch's assets)."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux's /proc to read the resident set")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "VQAD_MALLOC"}
    out = subprocess.run([sys.executable, "-c", RELEASE], env=env, capture_output=True, text=True, check=True)
    took, released, back, _ = out.stdout.split()  # the last: what release_freed_memory itself returned
    if took != "1" or released != "1":
        pytest.skip("this C library has no glibc mallopt / malloc_trim: the allocator policy does not apply here")
    # the 256 MiB are back once the next job would start; where glibc could not extend its heap it
    # mapped the block on its own and `del` returned it (a quarter to a third of runs here), else
    # release_freed_memory did
    assert int(back) >= 200 << 20
