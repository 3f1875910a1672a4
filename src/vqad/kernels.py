"""Fused CPU kernels for the hot loops of a training step, with PyTorch ops as the fallback.

The hot loops of a CPU training step cost several times their arithmetic as PyTorch ops, each being
several passes over memory plus a large temporary (docs/benchmarks/speed.md):

* the table gradient of the grid's interpolation, ``∂T[r] = Σ w[n,c] g[n]`` over the entries naming
  row r (:func:`interp_backward`): ``index_add_`` of an ``(8 N, k)`` product, ~10× slower than one
  fused pass; with unit weights it is also the codebook's hard-lookup gradient ``Σ_u e_{best_u} g_u``,
  where ``index_add_`` into 2^b rows runs as a slow scatter;
* SparseAdam's update of the touched rows (:func:`sparse_adam`): two gathers, two scatters and an
  ``index_add_`` with six temporaries, against one pass over the rows;
* ``argmax`` over a codebook's ``(U, 2^b)`` logits (:func:`argmax_rows`), slow on short rows;
* from b = 6, the codebook lookups' soft assignments (:func:`soft_assign_forward`,
  :func:`soft_assign_backward`: the gather, softmax, two products and softmax backward of the
  ``(U, 2^b)`` rows in one pass each way) and the row-wise RMSprop of their logits
  (:func:`sparse_rmsprop`: seven passes over the rows in PyTorch ops);
* the octree query of a level (:func:`level_query`: cell, corners and trilinear weights of each point,
  ~15 PyTorch ops) and the numbering of the distinct rows a batch touches (:func:`unique_rows`);
* the ray march (:func:`march_uniform`, :func:`march_contracted`): a pass over memory per op and
  candidate; through a contracted scene ~25 small ops per interval of every ray, one Python iteration
  per interval, 85 of a dense room step's 223 ms on one thread.

Six more serve decoding a .vqad file (:mod:`vqad.fileformat`), where NumPy needed sorts, scatters and
tables of all ``8^L`` cells: the corner tables of a level (:func:`corner_tables`: a bitmap of the
vertices ranked by bit counts), the octree coder's neighbour contexts (:func:`octree_contexts`, or from
the level's corner table, :func:`octree_contexts_from_corners`), each vertex's coarser vertex
(:func:`coarser_vertices`, the index coder's context), the
children named by child masks (:func:`children`), the inverse of the coders' grouping by context
(:func:`ungroup`, :func:`ungroup_bits`), and the range decoding itself (:class:`RangeDecoder`:
constriction's decoder for the coders' models, where constriction took one Python call per context).

They live in ``_kernels.c`` (plain C99 and OpenMP, no PyTorch headers), compiled the first time a
process needs them with the system's C compiler (``$CC``, else ``cc``/``gcc``/``clang``; ~0.3 s) into
a cache (``$VQAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/vqad``, else ``~/.cache/vqad``) named by a hash of
the source, the flags and the compiler, and loaded with :mod:`ctypes`. OpenMP, when the compiler has
it, resolves to the runtime PyTorch already loaded, so both share one thread pool.

``$VQAD_KERNELS`` chooses: ``auto`` (the default: use them when they build, else the PyTorch ops, with
one warning saying why), ``off`` (PyTorch ops only) or ``on`` (an error if they cannot be built). Only
CPU tensors take the kernels; CUDA tensors always take the PyTorch ops. Each kernel computes what its
PyTorch form computes, in the same order of additions on one thread; the tests compare every kernel
with it. The exceptions, compared with tolerances: the soft assignments (their own ``e^x``, sums in
8 or 16 lanes) and the RMSprop's row means (summed in double). Indices are checked inside the kernels: a bad one is an error, never a write out of bounds.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from vqad.errors import InputError

MODE_ENV = "VQAD_KERNELS"
CACHE_ENV = "VQAD_CACHE_DIR"
MODES = ("auto", "on", "off")
_SOURCE = Path(__file__).with_name("_kernels.c")
_ABI = 8  # vqad_kernels_abi() of the source this module calls
# -fno-trapping-math: no kernel reads the FP exception flags, and it lets conditionals on floats (a clamp,
# a max) vectorise; it changes no value (unlike -ffast-math)
_BASE_FLAGS = ["-O3", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
#: below this many multiply-adds an interpolation backward runs on one thread (forking costs more)
_PARALLEL_MIN_WORK = 1 << 16

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason = "not loaded yet"
_loaded = False
_forced_off = 0  # depth of active disabled() blocks


def mode() -> str:
    """``$VQAD_KERNELS``: ``auto`` (default), ``on`` or ``off`` (also ``1`` / ``0``)."""
    raw = os.environ.get(MODE_ENV, "").strip().lower()
    value = {"": "auto", "1": "on", "0": "off", "true": "on", "false": "off"}.get(raw, raw)
    if value not in MODES:
        raise InputError(f"${MODE_ENV} must be auto, on or off, got {raw!r}")
    return value


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$VQAD_CACHE_DIR``, ``$XDG_CACHE_HOME/vqad`` or ``~/.cache/vqad``."""
    if os.environ.get(CACHE_ENV, "").strip():
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "vqad"


def _compiler() -> str | None:
    cc = os.environ.get("CC", "").strip()
    if cc:
        return shutil.which(cc.split()[0]) and cc
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def _isa_flags() -> list[str]:
    """``-mpopcnt`` and ``-mavx2`` on an x86 CPU that reports them (Linux's ``/proc/cpuinfo``; elsewhere
    none): the octree tables' bit counts take one instruction instead of a dozen, and the loops over a
    row of logits run 8 floats wide instead of 4 (no FMA: products and sums still round separately).
    The flags are part of the cached library's key, so a cache shared with a CPU without them never
    hands that CPU this build."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return []
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [f"-m{isa}" for isa in ("popcnt", "avx2") if isa in flags]


def _compile(cc: str, source: bytes, out_dir: Path) -> tuple[Path | None, str]:
    """Build the library into ``out_dir`` (OpenMP and :func:`_isa_flags` if the compiler takes them);
    ``(path, "")`` or ``(None, why)``."""
    try:
        version = subprocess.run(cc.split() + ["--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"the C compiler {cc!r} does not run ({exc})"
    errors = []
    isa = _isa_flags()
    for extra in ([["-fopenmp"] + isa, isa] + ([["-fopenmp"], []] if isa else [])):
        flags = _BASE_FLAGS + extra
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(), cc.encode(),
                                         platform.machine().encode(), sys.platform.encode()])).hexdigest()[:20]
        target = out_dir / f"vqad_kernels_{key}.so"
        if target.exists():
            return target, ""
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            src = Path(tmp) / "vqad_kernels.c"
            src.write_bytes(source)
            built = Path(tmp) / target.name
            try:
                proc = subprocess.run(cc.split() + flags + [str(src), "-o", str(built), "-lm"], capture_output=True,
                                      text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as exc:
                return None, f"the C compiler {cc!r} failed to run ({exc})"
            if proc.returncode == 0 and built.exists():
                os.replace(built, target)  # atomic: concurrent processes each build, one file wins
                return target, ""
            errors.append((proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no message"])
    return None, f"{cc} could not compile {_SOURCE.name}: {errors[-1][0]}"


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.vqad_kernels_abi() != _ABI:
        raise OSError(f"{path} is version {lib.vqad_kernels_abi()}, not {_ABI}")
    P, I, F, N = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.vqad_interp_backward.argtypes = [P, P, P, P, P, I, I, I, I, N]
    lib.vqad_interp_backward.restype = ctypes.c_int
    lib.vqad_sparse_adam.argtypes = [P, P, P, P, P, I, I, I, F, F, F, F, N]
    lib.vqad_sparse_adam.restype = ctypes.c_int
    lib.vqad_sparse_rmsprop.argtypes = [P, P, P, P, P, I, I, I, F, F, F, N]
    lib.vqad_sparse_rmsprop.restype = ctypes.c_int
    lib.vqad_soft_assign_forward.argtypes = [P, P, I, I, I, P, P, N]
    lib.vqad_soft_assign_forward.restype = ctypes.c_int
    lib.vqad_soft_assign_backward.argtypes = [P, P, P, P, P, P, I, I, I, I, P, P, N]
    lib.vqad_soft_assign_backward.restype = ctypes.c_int
    lib.vqad_argmax_rows.argtypes = [P, P, I, I, N]
    lib.vqad_argmax_rows.restype = None
    lib.vqad_level_query.argtypes = [P, I, N, P, I, P, P, P, P, P, P, N]
    lib.vqad_level_query.restype = ctypes.c_int64
    lib.vqad_unique_rows.argtypes = [P, I, I, P, P, P]
    lib.vqad_unique_rows.restype = ctypes.c_int64
    lib.vqad_corner_tables.argtypes = [P, I, N, P, P, P, N]
    lib.vqad_corner_tables.restype = ctypes.c_int64
    lib.vqad_octree_contexts.argtypes = [P, I, N, P, P, N]
    lib.vqad_octree_contexts.restype = ctypes.c_int
    lib.vqad_octree_contexts_from_corners.argtypes = [P, I, I, P, P]
    lib.vqad_octree_contexts_from_corners.restype = ctypes.c_int
    lib.vqad_coarser_vertices.argtypes = [P, I, P, I, P]
    lib.vqad_coarser_vertices.restype = ctypes.c_int
    lib.vqad_children.argtypes = [P, P, I, P]
    lib.vqad_children.restype = ctypes.c_int64
    lib.vqad_ungroup.argtypes = [P, I, I, P, P, P]
    lib.vqad_ungroup.restype = ctypes.c_int
    lib.vqad_ungroup_bits.argtypes = [P, I, I, P, P, P]
    lib.vqad_ungroup_bits.restype = ctypes.c_int
    lib.vqad_range_start.argtypes = [P, I, P]
    lib.vqad_range_start.restype = None
    lib.vqad_range_decode_bits.argtypes = [P, P, I, P, P, I, P]
    lib.vqad_range_decode_bits.restype = ctypes.c_int
    lib.vqad_range_decode_symbols.argtypes = [P, P, I, P, I, P, P, I, P]
    lib.vqad_range_decode_symbols.restype = ctypes.c_int
    lib.vqad_march_contracted.argtypes = [P, P, P, P, P, I, P, N, ctypes.c_double, ctypes.c_double, I, P, P, P, N]
    lib.vqad_march_contracted.restype = ctypes.c_int64
    lib.vqad_march_uniform.argtypes = [P, P, P, P, P, P, P, I, P, N, F, P, P, P, N]
    lib.vqad_march_uniform.restype = ctypes.c_int64
    return lib


def _load() -> ctypes.CDLL | None:
    """The library, built and loaded once per process (None, with :data:`_reason`, if it cannot be)."""
    global _lib, _reason, _loaded
    if _loaded:
        return _lib
    with _lock:
        if _loaded:
            return _lib
        want = mode()
        if want == "off":
            _reason = f"${MODE_ENV}=off"
        else:
            cc = _compiler()
            if cc is None:
                _reason = "no C compiler (cc, gcc or clang) on PATH"
            else:
                source = _SOURCE.read_bytes()
                path, why = None, ""
                for where in ("cache", None):  # the cache, else a per-process directory
                    try:
                        target = cache_dir() / "kernels" if where else Path(tempfile.mkdtemp(prefix="vqad-kernels-"))
                        path, why = _compile(cc, source, target)
                        if path is not None:
                            _lib = _open(path)
                        break  # built, or the compiler refused: another directory would not help
                    except (OSError, RuntimeError) as exc:  # RuntimeError: Path.home() without a home
                        path, why = None, f"cannot build or load the kernels in {'the cache' if where else 'a temporary directory'} ({exc})"
                _reason = "" if _lib is not None else why
            if _lib is None:
                if want == "on":  # not marked loaded: every later call fails the same way
                    raise InputError(f"${MODE_ENV}=on, but vqad's C kernels are unavailable: {_reason} "
                                     f"(install a C compiler, or unset ${MODE_ENV})")
                warnings.warn(f"vqad: fused CPU kernels unavailable ({_reason}); using PyTorch ops, which make "
                              f"CPU training steps slower. Set ${MODE_ENV}=off to silence this.", RuntimeWarning,
                              stacklevel=3)
        _loaded = True
        return _lib


def status() -> str:
    """One line: whether the kernels are in use, and why not if they are not."""
    lib = _load()
    if lib is None:
        return f"PyTorch ops ({_reason})"
    return f"C kernels ({'OpenMP' if lib.vqad_kernels_openmp() else 'one thread'}, {_compiler()})"


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the kernels serve these tensors: all on the CPU, the floating ones float32, the kernels
    built and not disabled (``$VQAD_KERNELS=on`` and unbuildable: an :class:`InputError`)."""
    if _forced_off or any(t.device.type != "cpu" or (t.is_floating_point() and t.dtype != torch.float32)
                          for t in tensors):
        return False
    return _load() is not None


@contextmanager
def disabled() -> Iterator[None]:
    """Within the block, every caller takes its PyTorch ops (to compare the two, or to measure them)."""
    global _forced_off
    _forced_off += 1
    try:
        yield
    finally:
        _forced_off -= 1


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _cpu(name: str, *tensors: torch.Tensor) -> None:
    """The kernels read raw host memory: a tensor on another device is refused, never dereferenced."""
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError(f"{name}: every tensor must be on the CPU, got {sorted({str(t.device) for t in tensors})}")


def _threads(work: int) -> int:
    """The threads a kernel of ``work`` element operations uses: PyTorch's intra-op count, or one below
    :data:`_PARALLEL_MIN_WORK` (where starting the team costs more than it saves)."""
    return torch.get_num_threads() if work >= _PARALLEL_MIN_WORK else 1


def interp_backward(w: torch.Tensor, ids: torch.Tensor, g: torch.Tensor, rows: int) -> torch.Tensor:
    """``∂T (rows, k)``: ``Σ_{n,c: ids[n,c] = r} w[n,c] · g[n]`` for ``w (N, C)`` float32, ``ids (N, C)``,
    ``g (N, k)`` float32 (the backward of ``Σ_c w_c T[ids_c]``). Call only where :func:`applies`."""
    lib = _load()
    _cpu("interp_backward", w, ids, g)
    w, g = w.detach().float().contiguous(), g.detach().float().contiguous()
    ids = ids.long().contiguous()
    N, C = ids.shape
    k = g.shape[1]
    if w.shape != ids.shape or g.shape[0] != N:
        raise ValueError(f"interp_backward: w {tuple(w.shape)}, ids {tuple(ids.shape)}, g {tuple(g.shape)} do not match")
    threads = _threads(N * C * k) if N * C >= 2 * rows else 1  # else the buffers' sum costs what it saves
    out = torch.empty(rows, k)
    scratch = torch.empty((threads - 1) * rows * k) if threads > 1 else None
    if lib.vqad_interp_backward(_ptr(w), _ptr(ids), _ptr(g), _ptr(out), _ptr(scratch) if scratch is not None else None,
                                N, C, k, rows, threads):
        raise IndexError(f"interp_backward: an index lies outside [0, {rows})")
    return out


def sparse_adam(p: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, rows: torch.Tensor,
                g: torch.Tensor, beta1: float, beta2: float, eps: float, step_size: float) -> None:
    """SparseAdam's update of ``rows`` (``(U,)`` strictly increasing) of ``p``, ``exp_avg``, ``exp_avg_sq``
    (each ``(M, n)`` float32, contiguous) with the summed gradient ``g (U, n)``, in place. Call only where
    :func:`applies` and the tensors are float32 and contiguous."""
    lib = _load()
    _cpu("sparse_adam", p, exp_avg, exp_avg_sq, rows, g)
    if not all(t.dtype == torch.float32 and t.is_contiguous() and t.shape == p.shape for t in (exp_avg, exp_avg_sq)) \
            or p.dtype != torch.float32 or not p.is_contiguous():
        raise ValueError("sparse_adam: the parameter and its two moments must be float32, contiguous, of one shape")
    if rows.numel() == 0:
        return
    g = g.detach().float().contiguous().reshape(rows.numel(), -1)
    rows = rows.long().contiguous()
    M, n = p.shape[0], p[0].numel() if p.shape[0] else 0
    if g.shape[1] != n:
        raise ValueError(f"sparse_adam: gradient rows of {g.shape[1]} values for a parameter with {n} per row")
    threads = _threads(rows.numel() * n)
    if lib.vqad_sparse_adam(_ptr(p), _ptr(exp_avg), _ptr(exp_avg_sq), _ptr(rows), _ptr(g), rows.numel(), n, M,
                            1 - beta1, 1 - beta2, eps, -step_size, threads):
        raise IndexError(f"sparse_adam: rows must be strictly increasing in [0, {M})")


def sparse_rmsprop(p: torch.Tensor, v: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, g: torch.Tensor,
                   lr: float, beta: float, eps: float) -> None:
    """:class:`vqad.optim.RowwiseSparseRMSprop`'s update of ``rows`` (``(U,)`` strictly increasing) of
    ``p (M, n)`` and its per-row state ``v, t (M,)`` (all float32, contiguous) with the summed gradient
    ``g (U, n)``, in place. Call only where :func:`applies` and the tensors are float32 and contiguous."""
    lib = _load()
    _cpu("sparse_rmsprop", p, v, t, rows, g)
    if not all(x.dtype == torch.float32 and x.is_contiguous() for x in (p, v, t)) or p.dim() != 2 \
            or v.shape != (p.shape[0],) or t.shape != (p.shape[0],):
        raise ValueError("sparse_rmsprop: needs p (M, n) and v, t (M,), float32 and contiguous")
    if rows.numel() == 0:
        return
    g = g.detach().float().contiguous().reshape(rows.numel(), -1)
    rows = rows.long().contiguous()
    M, n = p.shape
    if g.shape[1] != n:
        raise ValueError(f"sparse_rmsprop: gradient rows of {g.shape[1]} values for a parameter with {n} per row")
    if lib.vqad_sparse_rmsprop(_ptr(p), _ptr(v), _ptr(t), _ptr(rows), _ptr(g), rows.numel(), n, M, beta, eps, -lr,
                               _threads(rows.numel() * n)):
        raise IndexError(f"sparse_rmsprop: rows must be strictly increasing in [0, {M})")


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=1)`` of ``x (U, n)`` float32 (first maximum; first NaN if any), as int64 ``(U,)``.
    Call only where :func:`applies`."""
    lib = _load()
    _cpu("argmax_rows", x)
    x = x.detach().float().contiguous()
    U, n = x.shape
    out = torch.empty(U, dtype=torch.long)
    if U and n:
        threads = _threads(U * n)
        lib.vqad_argmax_rows(_ptr(x), _ptr(out), U, n, threads)
    elif U:
        raise ValueError("argmax_rows: rows of length 0")
    return out


def _logit_rows(name: str, C: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if C.dtype != torch.float32 or C.dim() != 2 or not C.is_contiguous() or C.shape[1] < 1:
        raise ValueError(f"{name}: the logits C must be (M, n) float32 and contiguous, n >= 1")
    return C.detach(), rows.reshape(-1).long().contiguous()


def soft_assign_forward(C: torch.Tensor, rows: torch.Tensor, pbar: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The hard assignments ``best (U,)`` int64 (each row's first argmax) of the rows ``rows (U,)``
    (strictly increasing) of the logits ``C (M, n)``, and with ``pbar`` the mean soft assignment
    ``p̄ = mean_u softmax(C[rows[u]]) (n,)``: no ``(U, n)`` tensor is made. Call only where :func:`applies`."""
    lib = _load()
    _cpu("soft_assign_forward", C, rows)
    C, rows = _logit_rows("soft_assign_forward", C, rows)
    U, (M, n) = rows.numel(), C.shape
    best = torch.empty(U, dtype=torch.long)
    out = torch.empty(n) if pbar else None
    err = lib.vqad_soft_assign_forward(_ptr(C), _ptr(rows), U, n, M, _ptr(best), _ptr(out) if pbar else None,
                                       _threads(U * n * (8 if pbar else 1)))
    if err == -2:
        raise MemoryError("soft_assign_forward: no memory for the per-thread sums")
    if err:
        raise IndexError(f"soft_assign_forward: rows must be strictly increasing in [0, {M})")
    return best, out


def soft_assign_backward(C: torch.Tensor, rows: torch.Tensor, best: torch.Tensor, D: torch.Tensor, g: torch.Tensor,
                         extra: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of the straight-through features ``D[best] (U, k)`` whose gradient is that of
    ``s_u · D``, ``s_u = softmax(C[rows[u]])``, given ``g (U, k)`` and ``extra (n,)`` (or None) added to
    every ``∂s_u``: the logit rows' ``dC (U, n)`` and ``∂D (n, k)`` (the soft product's and the hard
    lookup's), in one pass that recomputes ``s_u``. Call only where :func:`applies`."""
    lib = _load()
    _cpu("soft_assign_backward", C, rows, best, D, g)
    C, rows = _logit_rows("soft_assign_backward", C, rows)
    U, (M, n) = rows.numel(), C.shape
    if D.dim() != 2 or D.shape[0] != n:
        raise ValueError(f"soft_assign_backward: D must be ({n}, k), got {tuple(D.shape)}")
    k = D.shape[1]
    if g.numel() != U * k:
        raise ValueError(f"soft_assign_backward: the features' gradient must be ({U}, {k}), got {tuple(g.shape)}")
    g = g.detach().float().contiguous().reshape(U, k)
    best = best.reshape(-1).long().contiguous()
    if best.numel() != U:
        raise ValueError(f"soft_assign_backward: {U} rows but {best.numel()} hard assignments")
    DT = D.detach().float().t().contiguous()  # (k, n)
    if extra is not None:
        extra = extra.detach().float().contiguous().reshape(n)
    dC, gD = torch.empty(U, n), torch.empty(n, k)
    err = lib.vqad_soft_assign_backward(_ptr(C), _ptr(rows), _ptr(best), _ptr(DT), _ptr(g),
                                        _ptr(extra) if extra is not None else None, U, n, k, M, _ptr(dC), _ptr(gD),
                                        _threads(U * n * k))
    if err == -2:
        raise MemoryError("soft_assign_backward: no memory for the per-thread sums")
    if err:
        raise IndexError(f"soft_assign_backward: rows must be strictly increasing in [0, {M}) and each hard "
                         f"assignment in [0, {n})")
    return dC, gD


def level_query(x: torch.Tensor, level: int, table: torch.Tensor, corners: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The compact query of ``x (N, 3)`` float32 at ``level``, given the level's dense cell table
    ``(8^L,)`` int32 (-1: empty) and ``corners (n, 8)`` int64: ``valid (N,)`` bool, ``rows (N_valid,)``,
    ``vertex_ids (N_valid, 8)``, ``weights (N_valid, 8)`` (:meth:`vqad.octree.SparseOctree.interpolation`).
    Call only where :func:`applies`; no gradient flows to ``x``."""
    lib = _load()
    _cpu("level_query", x, table, corners)
    x = x.detach().contiguous()
    N = x.shape[0]
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != 3:
        raise ValueError(f"level_query: x must be (N, 3) float32, got {tuple(x.shape)} {x.dtype}")
    if table.dtype != torch.int32 or table.numel() != 8 ** level or corners.dtype != torch.long or corners.shape[1:] != (8,):
        raise ValueError("level_query: needs the level's (8^L,) int32 cell table and (n, 8) int64 corners")
    table, corners = table.contiguous(), corners.contiguous()
    valid = torch.empty(N, dtype=torch.uint8)
    rows, cell = torch.empty(N, dtype=torch.long), torch.empty(N, dtype=torch.long)
    vid, w = torch.empty(N, 8, dtype=torch.long), torch.empty(N, 8)
    threads = _threads(16 * N)
    n = lib.vqad_level_query(_ptr(x), N, level, _ptr(table), corners.shape[0], _ptr(corners), _ptr(valid), _ptr(rows),
                             _ptr(vid), _ptr(w), _ptr(cell), threads)
    if n < 0:
        raise IndexError(f"level_query: the cell table of level {level} names a cell outside [0, {corners.shape[0]})")
    return valid.view(torch.bool), rows[:n], vid[:n], w[:n]


def unique_rows(ids: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(ids, return_inverse=True)`` for ids in ``[0, m)``: sorted ``(U,)`` and ``(E,)``
    positions, in ``O(E + m)``. Call only where :func:`applies`."""
    lib = _load()
    _cpu("unique_rows", ids)
    flat = ids.reshape(-1).long().contiguous()
    E = flat.numel()
    rank = torch.empty(m, dtype=torch.long)
    uniq, inv = torch.empty(min(E, m), dtype=torch.long), torch.empty(E, dtype=torch.long)
    U = lib.vqad_unique_rows(_ptr(flat), E, m, _ptr(rank), _ptr(uniq), _ptr(inv))
    if U < 0:
        raise IndexError(f"unique_rows: an id lies outside [0, {m})")
    return uniq[:U], inv.reshape(ids.shape)


def march_contracted(o: torch.Tensor, d: torch.Tensor, t_in: torch.Tensor, t_out: torch.Tensor, u: torch.Tensor,
                     occupancy: torch.Tensor, level: int, step: float, outer_scale: float, max_iter: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The samples of rays ``o + t d`` marched through a contracted scene
    (:meth:`vqad.nerf.render.OccupancySampler._march_contracted`, whose loop this is): ``o, d (R, 3)``
    float32, ``t_in, t_out, u (R,)`` float32, ``occupancy (8^level,)`` bool, at most ``max_iter``
    intervals per ray. Returns ``t_starts, t_ends (S,)`` float32 and ``ray_indices (S,)`` int64, ray after
    ray, front to back. Computed in double: the PyTorch form run on float64 tensors gives the same
    samples up to rounding (a midpoint on a cell boundary may flip) and the float32 outputs; its
    float32 run (CUDA's) drifts by ~1e-5 along a ray, so CPU and CUDA samples differ by that much.
    Call only where :func:`applies`."""
    lib = _load()
    _cpu("march_contracted", o, d, t_in, t_out, u, occupancy)
    R = o.shape[0]
    if o.shape != (R, 3) or d.shape != (R, 3) or any(t.shape != (R,) for t in (t_in, t_out, u)):
        raise ValueError(f"march_contracted: o, d (R, 3) and t_in, t_out, u (R,), got {tuple(o.shape)}, {tuple(d.shape)}")
    if occupancy.dtype != torch.bool or occupancy.numel() != 8 ** level or not outer_scale > 1.0 or max_iter < 1:
        raise ValueError("march_contracted: needs the (8^level,) bool occupancy, an outer scale > 1 and max_iter >= 1")
    o, d, t_in, t_out, u = (t.detach().float().contiguous() for t in (o, d, t_in, t_out, u))
    occupancy = occupancy.contiguous()
    cap = R * max_iter
    ts, te, ri = torch.empty(cap), torch.empty(cap), torch.empty(cap, dtype=torch.long)
    n = lib.vqad_march_contracted(_ptr(o), _ptr(d), _ptr(t_in), _ptr(t_out), _ptr(u), R, _ptr(occupancy), level,
                                  float(step), float(outer_scale), max_iter, _ptr(ts), _ptr(te), _ptr(ri),
                                  _threads(64 * R))
    if n < 0:
        raise MemoryError(f"march_contracted: no memory for the march's scratch ({max_iter} intervals a ray)")
    return ts[:n].clone(), te[:n].clone(), ri[:n].clone()  # not views: the buffers hold R · max_iter


def march_uniform(o: torch.Tensor, d: torch.Tensor, t_in: torch.Tensor, t_out: torch.Tensor, u: torch.Tensor,
                  counts: torch.Tensor, occupancy: torch.Tensor, level: int, step: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The samples of rays ``o + t d`` in the unit cube (:meth:`vqad.nerf.render.OccupancySampler.march`'s
    candidates and occupancy test, bit for bit): ``o, d (R, 3)``, ``t_in, t_out, u (R,)`` float32,
    ``counts (R,)`` int64 candidates per ray, ``occupancy (8^level,)`` bool. Returns ``t_starts, t_ends
    (S,)`` float32 and ``ray_indices (S,)`` int64 (ray indices within this batch). Call only where
    :func:`applies`."""
    lib = _load()
    _cpu("march_uniform", o, d, t_in, t_out, u, counts, occupancy)
    R = o.shape[0]
    if o.shape != (R, 3) or d.shape != (R, 3) or any(t.shape != (R,) for t in (t_in, t_out, u, counts)):
        raise ValueError(f"march_uniform: o, d (R, 3) and t_in, t_out, u, counts (R,), got {tuple(o.shape)}, {tuple(d.shape)}")
    if occupancy.dtype != torch.bool or occupancy.numel() != 8 ** level:
        raise ValueError("march_uniform: needs the (8^level,) bool occupancy")
    o, d, t_in, t_out, u = (t.detach().float().contiguous() for t in (o, d, t_in, t_out, u))
    counts = counts.long().contiguous()
    if R and int(counts.min()) < 0:  # the buffers' size and offsets come from the counts
        raise ValueError("march_uniform: a candidate count is negative")
    starts = torch.cumsum(counts, 0) - counts
    cap = int(starts[-1] + counts[-1]) if R else 0
    ts, te, ri = torch.empty(cap), torch.empty(cap), torch.empty(cap, dtype=torch.long)
    n = lib.vqad_march_uniform(_ptr(o), _ptr(d), _ptr(t_in), _ptr(t_out), _ptr(u), _ptr(counts), _ptr(starts), R,
                               _ptr(occupancy.contiguous()), level, float(step), _ptr(ts), _ptr(te), _ptr(ri),
                               _threads(4 * cap))
    if n < 0:
        raise ValueError("march_uniform: the candidate counts and their offsets disagree")
    return ts[:n].clone(), te[:n].clone(), ri[:n].clone()  # not views: the buffers hold every candidate


def corner_tables(codes: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`vqad.octree.corner_tables` of the cells ``codes (n,)`` of ``level <= 8``: corner vertex ids
    ``(n, 8)`` and vertex keys ``(m,)``, both int64, in ``O(n + T · 8^L / 64)`` for T threads (at most 8;
    a bitmap of the keys per thread, ORed and ranked by bit counts: no sort). Call only where
    :func:`applies`."""
    lib = _load()
    _cpu("corner_tables", codes)
    codes = codes.reshape(-1).long().contiguous()
    n = codes.numel()
    corners = torch.empty(n, 8, dtype=torch.long)
    keys = torch.empty(min(8 * n, 8 ** level), dtype=torch.long)
    n_far = ctypes.c_int64(0)
    m = lib.vqad_corner_tables(_ptr(codes), n, level, _ptr(corners), _ptr(keys), ctypes.byref(n_far),
                               _threads(8 * n))
    if m == -2:
        raise MemoryError(f"corner_tables: no memory for the {8 ** level:,}-bit table of level {level}")
    if m < 0:
        raise IndexError(f"corner_tables: a cell code lies outside [0, 8^{level}), or level {level} is outside 0..8")
    if n_far.value:  # vertices on the cube's far faces: keys >= 8^L (stored as -1 - key), numbered after the others
        at = (corners.reshape(-1) < 0).nonzero().squeeze(1)
        uniq, inv = torch.unique(-1 - corners.reshape(-1).index_select(0, at), return_inverse=True)
        corners.view(-1).index_copy_(0, at, inv + m)
        return corners, torch.cat([keys[:m], uniq])
    return corners, (keys[:m].clone() if m < keys.numel() else keys)  # a slice would keep min(8n, 8^L) alive


def _check_counts(name: str, counts: torch.Tensor | None) -> None:
    """The octree contexts' optional ``counts`` output: None, or a contiguous ``(128,)`` int64 CPU tensor."""
    if counts is not None and (counts.dtype != torch.long or counts.shape != (128,) or not counts.is_contiguous()
                               or counts.device.type != "cpu"):
        raise ValueError(f"{name}: counts must be a contiguous (128,) int64 CPU tensor, got "
                         f"{tuple(counts.shape)} {counts.dtype} on {counts.device}")


def octree_contexts(codes: torch.Tensor, level: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`vqad.entropy.octree_contexts`: the 7-bit context of each child bit of the cells ``codes (n,)``
    of ``level`` (strictly increasing above level 8), ``(n, 8)`` uint8; ``counts``, a ``(128,)`` int64
    tensor if given, receives how many bits have each context. Call only where :func:`applies`."""
    lib = _load()
    _cpu("octree_contexts", codes)
    codes = codes.reshape(-1).long().contiguous()
    ctx = torch.empty(codes.numel(), 8, dtype=torch.uint8)
    _check_counts("octree_contexts", counts)
    err = lib.vqad_octree_contexts(_ptr(codes), codes.numel(), level, _ptr(ctx),
                                   None if counts is None else _ptr(counts), _threads(26 * codes.numel()))
    if err == -2:
        raise MemoryError(f"octree_contexts: no memory for the {8 ** level:,}-bit table of level {level}")
    if err == -3:
        raise ValueError(f"octree_contexts: the cell codes of level {level} must be strictly increasing")
    if err:
        raise IndexError(f"octree_contexts: a cell code lies outside [0, 8^{level}), or level {level} is outside 0..20")
    return ctx


def octree_contexts_from_corners(corners: torch.Tensor, m: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`octree_contexts` of a level's cells from their corner table ``corners (n, 8)`` (vertex ids in
    ``[0, m)``, :func:`vqad.octree.corner_tables`): the same ``(n, 8)`` uint8 contexts, from a byte per
    vertex (the occupancy of the 8 cells around it) instead of 26 neighbour lookups per cell. ``counts``
    as in :func:`octree_contexts`. Call only where :func:`applies`."""
    lib = _load()
    _cpu("octree_contexts_from_corners", corners)
    corners = corners.long().contiguous()
    if corners.dim() != 2 or corners.shape[1] != 8:
        raise ValueError(f"octree_contexts_from_corners: corners must be (n, 8), got {tuple(corners.shape)}")
    _check_counts("octree_contexts_from_corners", counts)
    ctx = torch.empty(corners.shape[0], 8, dtype=torch.uint8)
    err = lib.vqad_octree_contexts_from_corners(_ptr(corners), corners.shape[0], int(m), _ptr(ctx),
                                                None if counts is None else _ptr(counts))
    if err == -2:
        raise MemoryError(f"octree_contexts_from_corners: no memory for {m:,} vertex bytes")
    if err:
        raise IndexError(f"octree_contexts_from_corners: a vertex id lies outside [0, {m})")
    return ctx


def coarser_vertices(fine_keys: torch.Tensor, coarse_keys: torch.Tensor) -> torch.Tensor:
    """:meth:`vqad.octree.SparseOctree.coarser_vertices`: for the vertex keys ``fine_keys (m,)`` of a level
    (Morton order) and ``coarse_keys (n,)`` of the level above (strictly increasing), the id of the coarse
    vertex whose key is ``fine >> 3``, ``(m,)`` int64, by one merge of the sorted keys. Call only where
    :func:`applies`; a key without its coarse vertex is a :class:`ValueError`."""
    lib = _load()
    _cpu("coarser_vertices", fine_keys, coarse_keys)
    fine_keys = fine_keys.reshape(-1).long().contiguous()
    coarse_keys = coarse_keys.reshape(-1).long().contiguous()
    out = torch.empty(fine_keys.numel(), dtype=torch.long)
    if lib.vqad_coarser_vertices(_ptr(fine_keys), fine_keys.numel(), _ptr(coarse_keys), coarse_keys.numel(), _ptr(out)):
        raise ValueError("coarser_vertices: a vertex has no coarser vertex at floor(v / 2) (or the keys are not sorted)")
    return out


def children(parents: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """:meth:`vqad.octree.SparseOctree.codes_from_child_masks`: the children's codes ``(Σ popcount,)`` int64
    of ``parents (n,)`` int64 and their child ``masks (n,)`` uint8. Call only where :func:`applies`."""
    lib = _load()
    _cpu("children", parents, masks)
    parents = parents.reshape(-1).long().contiguous()
    masks = masks.reshape(-1).to(torch.uint8).contiguous()
    if parents.numel() != masks.numel():
        raise ValueError(f"children: {parents.numel()} parents but {masks.numel()} masks")
    out = torch.empty(8 * parents.numel(), dtype=torch.long)
    m = lib.vqad_children(_ptr(parents), _ptr(masks), parents.numel(), _ptr(out))
    if m < 0:
        raise IndexError("children: a parent code is negative or too large for its children's codes")
    return out[:m].clone() if m < out.numel() else out  # a slice would keep all 8n entries alive


def _starts(sizes, n: int, name: str) -> torch.Tensor:
    """The groups' first positions (an exclusive prefix sum of ``sizes (K,)``), after checking that the
    ``K >= 1`` sizes are non-negative and add up to ``n``."""
    sizes = torch.as_tensor(sizes, dtype=torch.long).reshape(-1)
    if sizes.numel() == 0 or bool((sizes < 0).any()) or int(sizes.sum()) != n:
        raise ValueError(f"{name}: the group sizes must be K >= 1 non-negative counts adding up to {n:,}")
    return torch.cumsum(sizes, 0) - sizes


class RangeDecoder:
    """constriction's ``stream.queue.RangeDecoder`` (32-bit words, a 64-bit state) over one payload, for
    models quantized as ``Categorical(p, perfect=False)`` quantizes them (24-bit cumulative tables), in C:
    a group of symbols under one model costs no Python call and no division per symbol (the symbol is
    found by comparing ``point − lower`` with ``scale · cdf``). Each call goes on where the last stopped.
    Construct only where :func:`applies`; decoding invalid data raises :class:`ValueError`."""

    def __init__(self, words: torch.Tensor):
        """``words (W,)`` int32: the payload's little-endian 32-bit words, bit for bit."""
        self._lib = _load()
        _cpu("RangeDecoder", words)
        self._words = words.reshape(-1).to(torch.int32).contiguous()
        self._state = torch.empty(4, dtype=torch.long)  # lower, range, point (uint64 bits), next word
        self._lib.vqad_range_start(_ptr(self._words), self._words.numel(), _ptr(self._state))

    @staticmethod
    def _sizes(sizes) -> torch.Tensor:
        sizes = torch.as_tensor(sizes, dtype=torch.long).reshape(-1).contiguous()
        if sizes.numel() and int(sizes.min()) < 0:
            raise ValueError("RangeDecoder: group sizes must be non-negative")
        return sizes

    def decode_bits(self, cut, sizes) -> torch.Tensor:
        """Binary groups: ``sizes[j]`` symbols under the model whose cumulative table is ``(0, cut[j],
        2^24)``, for ``cut (K,)`` int64 in ``[1, 2^24)``; returns the bits ``(Σ sizes,)`` uint8, group after group."""
        cut = torch.as_tensor(cut, dtype=torch.long).reshape(-1).contiguous()
        sizes = self._sizes(sizes)
        if cut.numel() != sizes.numel() or (cut.numel() and (int(cut.min()) < 1 or int(cut.max()) >= 1 << 24)):
            raise ValueError(f"RangeDecoder.decode_bits: need one cut in [1, 2^24) per group ({sizes.numel()})")
        out = torch.empty(int(sizes.sum()), dtype=torch.uint8)
        if self._lib.vqad_range_decode_bits(_ptr(self._state), _ptr(self._words), self._words.numel(), _ptr(cut),
                                            _ptr(sizes), sizes.numel(), _ptr(out)):
            raise ValueError("invalid compressed data (a quantile beyond the model's range)")
        return out

    def decode_symbols(self, cdf: torch.Tensor, table, sizes) -> torch.Tensor:
        """Groups over an alphabet of A symbols: ``sizes[j]`` symbols under the cumulative table
        ``cdf[table[j]]`` of ``cdf (T, A + 1)`` int32 (0 first, 2^24 last, strictly increasing); returns
        ``(Σ sizes,)`` int64, group after group."""
        cdf = cdf.to(torch.int32).contiguous()
        table = torch.as_tensor(table, dtype=torch.long).reshape(-1).contiguous()
        sizes = self._sizes(sizes)
        if cdf.dim() != 2 or cdf.shape[1] < 3 or table.numel() != sizes.numel():
            raise ValueError(f"RangeDecoder.decode_symbols: cdf {tuple(cdf.shape)} must be (T, A + 1) with A >= 2, "
                             f"and table {table.numel()} one entry per group ({sizes.numel()})")
        used = table[sizes > 0]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= cdf.shape[0]):
            raise ValueError(f"RangeDecoder.decode_symbols: a group with symbols names a table outside [0, {cdf.shape[0]})")
        out = torch.empty(int(sizes.sum()), dtype=torch.long)
        if self._lib.vqad_range_decode_symbols(_ptr(self._state), _ptr(self._words), self._words.numel(), _ptr(cdf),
                                               cdf.shape[1] - 1, _ptr(table), _ptr(sizes), sizes.numel(), _ptr(out)):
            raise ValueError("invalid compressed data (a quantile beyond the model's range)")
        return out


def ungroup(contexts: torch.Tensor, grouped: torch.Tensor, sizes) -> torch.Tensor:
    """Undo the coders' grouping by context: ``grouped (n,)`` int64 holds the values of context 0's
    positions, then context 1's, ... (``sizes (K,)`` of them each, positions in order within a group);
    returns ``(n,)`` int64 in position order, given ``contexts (n,)`` in ``[0, K)``. Call only where
    :func:`applies`."""
    lib = _load()
    _cpu("ungroup", contexts, grouped)
    contexts = contexts.reshape(-1).long().contiguous()
    grouped = grouped.reshape(-1).long().contiguous()
    n = contexts.numel()
    if grouped.numel() != n:
        raise ValueError(f"ungroup: {n} contexts but {grouped.numel()} values")
    start = _starts(sizes, n, "ungroup")
    out = torch.empty(n, dtype=torch.long)
    err = lib.vqad_ungroup(_ptr(contexts), n, start.numel(), _ptr(grouped), _ptr(start), _ptr(out))
    if err == -2:
        raise MemoryError(f"ungroup: no memory for {start.numel():,} groups")
    if err:
        raise IndexError(f"ungroup: a context lies outside [0, {start.numel()}) or its group is too small")
    return out


def ungroup_bits(contexts: torch.Tensor, grouped: torch.Tensor, sizes) -> torch.Tensor:
    """:func:`ungroup` of the octree coder's child bits, packed: ``contexts (n, 8)`` uint8 and the grouped
    bits ``(8 n,)`` uint8 give the child masks ``(n,)`` uint8 (bit c: child c). Call only where
    :func:`applies`."""
    lib = _load()
    _cpu("ungroup_bits", contexts, grouped)
    contexts = contexts.reshape(-1).to(torch.uint8).contiguous()
    grouped = grouped.reshape(-1).to(torch.uint8).contiguous()
    n8 = contexts.numel()
    start = _starts(sizes, n8, "ungroup_bits")
    if grouped.numel() != n8 or n8 % 8 or start.numel() > 256:
        raise ValueError(f"ungroup_bits: {n8} contexts (8 a cell), {grouped.numel()} bits, {start.numel()} groups (<= 256)")
    masks = torch.empty(n8 // 8, dtype=torch.uint8)
    if lib.vqad_ungroup_bits(_ptr(contexts), n8, start.numel(), _ptr(grouped), _ptr(start), _ptr(masks)):
        raise IndexError(f"ungroup_bits: a context lies outside [0, {start.numel()}) or its group is too small")
    return masks
