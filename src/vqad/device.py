"""The one device policy of vqad.

The device is chosen once, at the top (the CLI's ``--device`` or :func:`resolve_device`), and every
tensor of a model, a dataset and a trainer is created on it. Nothing below silently moves tensors to
another device or falls back from CUDA to the CPU.
"""

from __future__ import annotations

import os

import torch

from vqad.errors import InputError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N"`` (or a :class:`torch.device` of those) into a :class:`torch.device`.

    ``auto`` picks CUDA when a GPU is present, else the CPU. Asking for CUDA on a machine without
    one, a GPU index it lacks or another kind of device (mps, xpu, meta, ...: vqad runs on CPUs and CUDA
    GPUs) is an :class:`InputError`, never a silent fallback nor an error deep inside PyTorch.
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(name, torch.device):
        dev = name
    elif isinstance(name, str):
        try:
            dev = torch.device(name)
        except RuntimeError as exc:
            raise InputError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from exc
    else:
        raise InputError(f"a device is 'auto', 'cpu', 'cuda[:N]' or a torch.device, got {type(name).__name__} {name!r:.40}")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device {str(name)!r}: vqad runs on cpu or cuda[:N], not {dev.type}; use cpu (--device cpu)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {str(name)!r} asked for, but PyTorch sees no CUDA GPU: use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"device {str(name)!r} asked for, but PyTorch sees {torch.cuda.device_count()} CUDA GPU(s): "
                         f"use cuda:0..{torch.cuda.device_count() - 1}")
    return dev


#: ``--mlp-precision``: the number format of the decoders' matrix products while a radiance field trains
MLP_PRECISIONS = ("fp32", "bf16")


def native_bf16_matmul(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CPU with AMX tiles (Intel Xeon from
    Sapphire Rapids on, through oneDNN) or a CUDA GPU of compute capability 8.0 or more. Elsewhere the
    products are emulated, slower than fp32 itself."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != "cpu":
        return False
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # PyTorch's own check, private but long-lived
    try:
        return bool(probe()) if probe is not None else False
    except (RuntimeError, AttributeError):
        return False


def resolve_mlp_precision(name: str, device: torch.device) -> torch.dtype | None:
    """``--mlp-precision`` on ``device``: the dtype the decoders' products autocast to, None for fp32.

    ``bf16`` is bfloat16 on any device (native or not: :func:`native_bf16_matmul` says which); ``fp32``,
    the default, turns it off. The weights, the grid and everything outside the matrix products stay fp32
    either way. Measured on a 2-core AMX CPU (docs/benchmarks/nerf.md): bf16 steps 1.28× faster on the
    generated room alone on one thread, 1.18× on two, 1.03–1.08× beside a second fit, and lego's steps 7 %
    slower (fewer samples per step: the conversions cost more than the products save), hence off by default.
    """
    if name not in MLP_PRECISIONS:
        raise InputError(f"unknown MLP precision {name!r}: choose one of {', '.join(MLP_PRECISIONS)}")
    return torch.bfloat16 if name == "bf16" else None


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: CUDA allocator peak on a GPU, max RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def available_memory() -> int | None:
    """Bytes of host memory a new allocation can get without swapping: Linux's ``MemAvailable``, else the
    physical memory (None where neither is known)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, so a container's or ``taskset``'s limit)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


def resolve_threads(threads: int | None = None) -> int:
    """The CPU threads a job uses: ``threads``, else ``$VQAD_THREADS``, else ``$OMP_NUM_THREADS``, else
    every core this process may use (one job per machine: more threads than cores only adds
    contention; for several jobs at once give each ``cores / jobs``, see docs/benchmarks/speed.md)."""
    source = "--threads"
    if threads is None and os.environ.get("VQAD_THREADS", "").strip():
        source, threads = "$VQAD_THREADS", os.environ["VQAD_THREADS"].strip()
    if threads is None:
        omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()  # OpenMP's: "4" or nested "4,2"
        return int(omp) if omp.isdigit() and int(omp) > 0 else available_cores()
    try:
        n = int(threads)
    except ValueError:
        n = 0
    if n < 1 or str(threads).strip() != str(n):
        raise InputError(f"{source} must be a positive whole number of CPU threads, got {threads!r} (e.g. --threads 2)")
    if n > MAX_THREADS:
        raise InputError(f"{source} {n} is more CPU threads than vqad starts (at most {MAX_THREADS}; this machine has "
                         f"{available_cores()} cores): give at most the cores the job may use")
    return n


#: the most threads a job may ask for: far more than any CPU's cores (OpenMP crashed here at ~100,000)
MAX_THREADS = 1024


def set_threads(threads: int | None = None, warn: bool = True) -> int:
    """Apply :func:`resolve_threads` to PyTorch's intra-op pool; returns the number set. ``warn``: say so
    when that is more threads than cores."""
    n = resolve_threads(threads)
    cores = available_cores()
    if warn and n > cores:
        import warnings

        warnings.warn(f"{n} CPU threads on the {cores} core(s) this process may use: threads beyond the cores only "
                      f"wait for each other (a fit ran 175x slower); give --threads {cores} or fewer", stacklevel=2)
    torch.set_num_threads(n)
    return n


#: glibc's malloc: serve allocations up to this size from the heap (not fresh ``mmap`` pages) ...
KEEP_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
#: ... and larger ones too: no ``mmap`` at all for the main thread's arena (glibc still maps memory when
#: the heap cannot grow, and for other threads' arenas past their 64 MB heaps)
KEEP_MMAP_MAX = 0
#: ... and return free heap memory to the system only past this much at its top
KEEP_TRIM_THRESHOLD = 256 << 20
#: set to ``default`` (or ``0``) to leave the C allocator as it is
ALLOCATOR_ENV = "VQAD_MALLOC"


def keep_freed_memory() -> bool:
    """Ask the C allocator (glibc's malloc, through ``mallopt``) to keep freed memory for reuse.

    PyTorch's CPU tensors come straight from malloc, and glibc hands a freed multi-MB block back to the
    system, so the next tensor of that size starts on fresh pages and page-faults on every 4 KiB of
    them (~1 µs each on a virtual machine). vqad's hot paths free and re-allocate such tensors all the
    time: decoding a 105 kB file faulted ~4,500 pages per load (~30 % of its time), and a 16,384-point
    codebook SDF step ran ~15 % faster without the faults (docs/benchmarks/speed.md). glibc maps every
    block over 32 MB (its largest threshold) afresh unless ``M_MMAP_MAX`` is 0, so that is set too: a
    lego codebook step's logit rows are 46 MB at b = 6 and 184 MB at b = 8, and their faults took ~25 %
    and ~45 % of the softmax's gradient (2026-12-05). With freed memory kept, the process's RSS stays at
    its peak instead of shrinking (:func:`release_freed_memory` gives it back between jobs). The CLI calls
    this once; library users may too.

    Returns whether the setting took (glibc only; False elsewhere or with ``$VQAD_MALLOC=default``).
    """
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4  # <malloc.h>
    return (bool(mallopt(m_mmap_threshold, KEEP_MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, KEEP_TRIM_THRESHOLD))
            and bool(mallopt(m_mmap_max, KEEP_MMAP_MAX)))


def release_freed_memory() -> bool:
    """Give back to the system the freed memory :func:`keep_freed_memory` keeps (glibc's ``malloc_trim(0)``:
    every free page of the heap, not only its top, which is all glibc trims by itself).

    For a process that runs several jobs one after the other (``vqad sweep``'s points, ``vqad batch``'s
    assets): without it a later job starts from the earlier jobs' peak, a large freed block pinned in
    place by any small allocation made after it. Returns whether it ran (glibc only).
    """
    trim = _glibc("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


def _glibc(name: str):
    """The C library's function ``name`` where the allocator policy applies (glibc, and
    ``$VQAD_MALLOC`` not ``default``), else None."""
    if os.environ.get(ALLOCATOR_ENV, "").strip().lower() in ("default", "0", "off"):
        return None
    try:
        import ctypes

        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError, TypeError):  # not glibc: macOS, musl, Windows (no CDLL(None))
        return None


#: the environment variable that sets :func:`default_max_memory`
MAX_MEMORY_ENV = "VQAD_MAX_MEMORY"


def default_max_memory() -> int:
    """The memory limit in bytes of what vqad sizes before it allocates (decoding a .vqad file, fusing a TSDF,
    rendering a synthetic scan): ``$VQAD_MAX_MEMORY`` (e.g. ``4G``, ``512M``, ``1000000``), else half of this
    machine's physical memory."""
    text = os.environ.get(MAX_MEMORY_ENV, "").strip()
    if text:
        return parse_bytes(text, MAX_MEMORY_ENV)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): a conservative 4 GiB
        return 4 << 30


def parse_bytes(text: str, what: str) -> int:
    """``"4G"`` / ``"512M"`` / ``"64k"`` / ``"1000"`` -> bytes (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = float(num) * units[unit]
    except ValueError:
        value = float("nan")
    if not (value >= 1 and value < float(1 << 62)):
        raise InputError(f"{what} must be a size such as 4G, 512M or 1000000 (bytes), got {text!r}")
    return int(value)
