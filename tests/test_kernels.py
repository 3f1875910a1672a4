"""The fused CPU kernels (vqad.kernels) against the PyTorch ops they replace, and their fallbacks."""

import inspect
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from vqad import kernels
from vqad import fit as T
from vqad.optim import SparseRowAdam, make_optimizers

from conftest import REPO
from test_storage import _small_field


@pytest.fixture
def need_kernels():
    if not kernels.applies(torch.zeros(1)):
        pytest.skip(f"vqad's C kernels are not built here: {kernels.status()}")


def _torch_interp_backward(w, ids, g, R):
    rows = (g.unsqueeze(1) * w.unsqueeze(-1)).reshape(-1, g.shape[1])
    return torch.zeros(R, g.shape[1]).index_add_(0, ids.reshape(-1), rows)


@pytest.mark.parametrize("N,C,k,R", [(1, 8, 1, 1), (37, 8, 3, 5), (5000, 8, 16, 900), (20000, 8, 8, 30000),
                                     (3000, 4, 32, 7)])
def test_interp_backward_matches_index_add(need_kernels, N, C, k, R):
    gen = torch.Generator().manual_seed(N + R)
    w = torch.rand(N, C, generator=gen)
    ids = torch.randint(0, R, (N, C), generator=gen)
    g = torch.randn(N, k, generator=gen)
    ref = _torch_interp_backward(w, ids, g, R)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one thread adds in index_add_'s order: the same bits
        assert torch.equal(kernels.interp_backward(w, ids, g, R), ref)
        torch.set_num_threads(2)  # two partial sums, then their sum: the same values to rounding
        torch.testing.assert_close(kernels.interp_backward(w, ids, g, R), ref, rtol=1e-4, atol=1e-4)  # float32 sums of ~2,000 terms
        again = kernels.interp_backward(w, ids, g, R)
        assert torch.equal(again, kernels.interp_backward(w, ids, g, R))  # deterministic
    finally:
        torch.set_num_threads(threads)


def test_interp_backward_accepts_int32_ids_and_views(need_kernels):
    w = torch.rand(64, 16)[:, ::2]  # a strided view
    ids = torch.randint(0, 10, (64, 8), dtype=torch.int32)
    g = torch.randn(64, 4)
    torch.testing.assert_close(kernels.interp_backward(w, ids, g, 10), _torch_interp_backward(w, ids.long(), g, 10))


@pytest.mark.parametrize("bad", [-1, 10, 2 ** 40])
def test_interp_backward_refuses_indices_out_of_range(need_kernels, bad):
    ids = torch.randint(0, 10, (300, 8))
    ids[123, 5] = bad
    with pytest.raises(IndexError, match=r"outside \[0, 10\)"):
        kernels.interp_backward(torch.rand(300, 8), ids, torch.randn(300, 4), 10)
    with pytest.raises(ValueError, match="do not match"):
        kernels.interp_backward(torch.rand(300, 7), ids, torch.randn(300, 4), 10)


def _adam_run(fused: bool, steps: int = 4):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(200, 16))
    opt = SparseRowAdam([p], lr=0.05)
    for s in range(steps):
        ids = torch.randint(0, 200, (150,))
        opt.zero_grad()
        (F.embedding(ids, p, sparse=True) * torch.randn(150, 16)).sum().backward()
        if fused:
            opt.step()
        else:
            with kernels.disabled():
                opt.step()
    return p.detach(), opt.state[p]


def test_sparse_adam_kernel_matches_the_torch_update(need_kernels):
    p1, s1 = _adam_run(True)
    p0, s0 = _adam_run(False)
    # same operations in the same order; only PyTorch's vectorised sqrt may round differently (1 ulp)
    torch.testing.assert_close(p1, p0, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s1["exp_avg"], s0["exp_avg"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s1["exp_avg_sq"], s0["exp_avg_sq"], rtol=1e-6, atol=1e-7)
    assert s1["step"] == s0["step"] == 4


def test_sparse_adam_matches_torch_sparse_adam(need_kernels):
    """Against PyTorch's own SparseAdam (coalescing and all), rows touched repeatedly included."""
    torch.manual_seed(1)
    init = torch.randn(50, 8)
    ps = [torch.nn.Parameter(init.clone()) for _ in range(2)]
    opts = [SparseRowAdam([ps[0]], lr=0.01), torch.optim.SparseAdam([ps[1]], lr=0.01)]
    for _ in range(5):
        ids, scale = torch.randint(0, 50, (80,)), torch.randn(80, 8)
        for p, o in zip(ps, opts):
            o.zero_grad()
            (F.embedding(ids, p, sparse=True) * scale).sum().backward()
            o.step()
    torch.testing.assert_close(ps[0].detach(), ps[1].detach(), rtol=1e-5, atol=1e-6)


def test_sparse_adam_kernel_refuses_bad_rows(need_kernels):
    p, m, v = torch.zeros(10, 4), torch.zeros(10, 4), torch.zeros(10, 4)
    for rows in ([3, 3], [4, 2], [-1, 2], [2, 10]):
        with pytest.raises(IndexError, match="strictly increasing"):
            kernels.sparse_adam(p, m, v, torch.tensor(rows), torch.ones(2, 4), 0.9, 0.999, 1e-8, 0.1)
    assert not p.any() and not m.any() and not v.any()  # refused before any write
    with pytest.raises(ValueError, match="values for a parameter"):
        kernels.sparse_adam(p, m, v, torch.tensor([1, 2]), torch.ones(2, 3), 0.9, 0.999, 1e-8, 0.1)


def test_argmax_rows_matches_torch_argmax(need_kernels):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5000, 16, generator=gen)
    x[10] = 1.0  # all equal: the first
    x[11, [2, 9]] = 50.0  # a tie: the first
    x[12, 7] = float("nan")  # a NaN wins, the first one
    x[12, 11] = float("nan")
    x[13] = float("-inf")
    x[14, 0] = float("nan")
    x[15, 15] = float("inf")
    assert torch.equal(kernels.argmax_rows(x), x.argmax(dim=1))
    for n in (1, 2, 64, 256):
        y = torch.randn(33, n, generator=gen)
        assert torch.equal(kernels.argmax_rows(y), y.argmax(dim=1))
    assert kernels.argmax_rows(torch.zeros(0, 16)).shape == (0,)


def test_training_steps_agree_with_and_without_kernels(need_kernels):
    """A few codebook training steps: the same losses and parameters, to rounding, either way."""
    results = []
    for use in (True, False):
        torch.manual_seed(0)
        field, _ = _small_field("codebook", bits=4)
        opts = make_optimizers(field, 1e-2, 10.0)
        gen = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(4):
            x = torch.rand(2048, 3, generator=gen) * 1.6 - 0.8
            T.zero_grad(opts)
            with (kernels.disabled() if not use else torch.enable_grad()):
                loss = sum((f ** 2).mean() for f in field.all_lods(x, field.lods))
                loss.backward()
                T.safe_step(opts, loss)
            losses.append(float(loss.detach()))
        results.append((losses, [p.detach().clone() for p in field.parameters()]))
    (l1, p1), (l0, p0) = results
    assert l1 == pytest.approx(l0, rel=1e-4)
    for a, b in zip(p1, p0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO / "src"), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


STATUS = "import torch, vqad.kernels as K; print(K.applies(torch.zeros(1))); print(K.status())"


def test_off_mode_uses_torch_ops_without_a_word(tmp_path):
    r = _run(STATUS, VQAD_KERNELS="off", VQAD_CACHE_DIR=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["False", "PyTorch ops ($VQAD_KERNELS=off)"]
    assert "Warning" not in r.stderr and not any(tmp_path.iterdir())


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    r = _run(STATUS + "; K.applies(torch.zeros(1))", CC="/nonexistent/cc", VQAD_CACHE_DIR=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "False"
    assert r.stderr.count("fused CPU kernels unavailable") == 1 and "VQAD_KERNELS=off" in r.stderr


def test_a_failing_compiler_falls_back_and_on_mode_refuses(tmp_path):
    r = _run(STATUS, CC="false", VQAD_CACHE_DIR=str(tmp_path))
    assert r.returncode == 0 and r.stdout.splitlines()[0] == "False", r.stderr
    assert "could not compile" in r.stderr
    r = _run(STATUS, CC="false", VQAD_CACHE_DIR=str(tmp_path), VQAD_KERNELS="on")
    assert r.returncode != 0 and "VQAD_KERNELS=on, but vqad's C kernels are unavailable" in r.stderr
    r = _run(STATUS, VQAD_KERNELS="sometimes")
    assert r.returncode != 0 and "must be auto, on or off" in r.stderr


def test_unwritable_cache_builds_in_a_temporary_directory(need_kernels, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    r = _run(STATUS, VQAD_CACHE_DIR=str(blocked))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "True" and "Warning" not in r.stderr


def test_cache_is_reused_and_keyed_by_source(need_kernels, tmp_path):
    r = _run(STATUS, VQAD_CACHE_DIR=str(tmp_path))
    assert r.returncode == 0 and r.stdout.startswith("True"), r.stderr
    built = sorted((tmp_path / "kernels").glob("*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    r = _run(STATUS, VQAD_CACHE_DIR=str(tmp_path))
    assert r.stdout.startswith("True") and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert not [p for p in (tmp_path / "kernels").iterdir() if p.suffix != ".so"]  # no build leftovers


def test_level_query_matches_the_torch_query(need_kernels):
    from vqad.octree import SparseOctree

    gen = torch.Generator().manual_seed(5)
    octree = SparseOctree.from_points(torch.rand(3000, 3, generator=gen) * 1.6 - 0.8, 2, 6, dilate=1)
    x = torch.rand(20000, 3, generator=gen) * 2.2 - 1.1  # some outside the cube
    x[:6] = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [1.0, -1.0, 0.0], [float("nan"), 0.0, 0.0],
                          [0.0, float("inf"), 0.0], [0.5, 0.5, -float("inf")]])
    x[6:1000] = octree.vertices[6][:994].float() / 32 - 1  # exactly on vertices and cell faces
    lo = torch.nextafter(torch.tensor(-1.0), torch.tensor(0.0)).item()  # the cell index is a truncation of (x + 1)·2^L/2
    hi = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()
    x[1000:1005] = torch.tensor([[-0.0, -0.0, -0.0], [lo, 0.0, -0.0], [hi, lo, 0.25], [lo, lo, lo], [hi, hi, hi]])
    for level in octree.levels:
        fused = octree.interpolation(x, level)
        with kernels.disabled():
            ref = octree.interpolation(x, level)
        assert torch.equal(fused.valid, ref.valid) and torch.equal(fused.rows, ref.rows)
        assert torch.equal(fused.vertex_ids, ref.vertex_ids)
        assert torch.equal(fused.weights, ref.weights)  # the same arithmetic: the same bits
    assert not octree.interpolation(x[3:6], 6).valid.any()
    xg = x[:100].clone().requires_grad_(True)  # a gradient to the points takes the PyTorch ops
    assert octree.interpolation(xg, 6).weights.requires_grad


def test_level_query_refuses_a_corrupt_table(need_kernels):
    table = torch.full((8 ** 2,), -1, dtype=torch.int32)
    table[5] = 7  # only 2 cells
    corners = torch.zeros(2, 8, dtype=torch.long)
    x = torch.rand(50, 3) * 2 - 1
    with pytest.raises(IndexError, match="outside"):
        kernels.level_query(torch.tensor([[-0.75, -0.25, -0.25]]), 2, table, corners)  # cell (0, 1, 1): 5
    valid, rows, vid, w = kernels.level_query(x, 2, torch.full((64,), -1, dtype=torch.int32), corners)
    assert not valid.any() and rows.numel() == 0 and vid.shape == (0, 8) and w.shape == (0, 8)
    with pytest.raises(ValueError):
        kernels.level_query(x.double(), 2, table, corners)


@pytest.mark.parametrize("E,m", [(1, 1), (100, 7), (5000, 60000), (40000, 300)])
def test_unique_rows_matches_torch_unique(need_kernels, E, m):
    ids = torch.randint(0, m, (E,), generator=torch.Generator().manual_seed(E))
    uniq, inv = kernels.unique_rows(ids, m)
    ref_u, ref_inv = torch.unique(ids, return_inverse=True)
    assert torch.equal(uniq, ref_u) and torch.equal(inv, ref_inv)
    with pytest.raises(IndexError):
        kernels.unique_rows(torch.tensor([0, m]), m)


def _cells(level: int, n: int, seed: int) -> torch.Tensor:
    """Sorted distinct random cell codes of ``level``, with every corner cell of the cube among them
    (their vertices lie on the far faces, which the bitmap does not hold)."""
    B = 8 ** level
    far = torch.tensor([B - 1, (B - 1) & 0o1111111111111111, (B - 1) & 0o2222222222222222,
                        (B - 1) & 0o4444444444444444, 0])
    return torch.unique(torch.cat([torch.randint(0, B, (min(n, B),), generator=torch.Generator().manual_seed(seed)),
                                   far[far < B]]))


@pytest.mark.parametrize("level,n", [(0, 1), (1, 3), (2, 64), (3, 40), (5, 2000), (7, 30000), (8, 5)])
def test_corner_tables_kernel_matches_the_sorted_reference(need_kernels, level, n):
    """The bitmap's ranks are the vertices' Morton order: the same ids and keys as sorting every
    corner's key (the brute-force definition), far-face vertices after the others."""
    from vqad import octree as O

    codes = _cells(level, n, seed=level)
    corners, keys = kernels.corner_tables(codes, level)
    ref_keys, inv = torch.unique(O._corner_codes(codes), return_inverse=True)  # brute force: sort them all
    inner = ref_keys < 8 ** level
    order = torch.cat([ref_keys[inner], ref_keys[~inner]])
    rank = torch.empty_like(ref_keys)
    rank[torch.cat([inner.nonzero(), (~inner).nonzero()]).squeeze(1)] = torch.arange(ref_keys.numel())
    assert torch.equal(keys, order) and torch.equal(corners, rank[inv].reshape(-1, 8))
    with kernels.disabled():
        assert all(torch.equal(a, b) for a, b in zip(O.corner_tables(codes, level), (corners, keys)))
    if level <= O.DENSE_TABLE_MAX_LEVEL:
        assert all(torch.equal(a, b) for a, b in zip(O._corner_tables_dense(codes, level), (corners, keys)))


def _soft_inputs():
    """Logits C (500, 64), rows (167,), D (64, 5) and g (167, 5), the same in any process."""
    gen = torch.Generator().manual_seed(3)
    return torch.randn(500, 64, generator=gen) * 4, torch.arange(0, 500, 3), torch.randn(64, 5, generator=gen), \
        torch.randn(167, 5, generator=gen)


PORTABLE_BITS = """
import torch, vqad.kernels as K
from vqad.octree import SparseOctree, _corner_tables_dense
K._isa_flags = lambda: []  # the build a CPU without popcnt and AVX2 gets: the portable loops
codes = torch.unique(torch.randint(0, 8 ** 6, (20000,), generator=torch.Generator().manual_seed(1)))
assert K.applies(codes), K.status()
got, ref = K.corner_tables(codes, 6), _corner_tables_dense(codes, 6)
assert all(torch.equal(a, b) for a, b in zip(got, ref))
masks = torch.randint(0, 256, (codes.numel(),), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
with K.disabled():
    want = SparseOctree.codes_from_child_masks(codes, masks)
assert torch.equal(K.children(codes, masks), want)
C, rows, D, g = SOFT_INPUTS()
best, pbar = K.soft_assign_forward(C, rows, True)
dC, gD = K.soft_assign_backward(C, rows, best, D, g, torch.full((64,), 0.01))
torch.save({"best": best, "pbar": pbar, "dC": dC, "gD": gD}, OUT)
print("ok")
"""


def test_kernels_built_without_the_isa_flags_give_the_same_tables(need_kernels, tmp_path):
    """Both paths of the bit counts and of the soft assignments: the built library's (-mpopcnt, -mavx2
    where the CPU has them) is checked against references in this file; this builds the portable one in
    a cache of its own and compares the two (the soft assignments' sums run in other lanes: rounding)."""
    out = tmp_path / "portable.pt"
    r = _run(f"OUT = {str(out)!r}\n" + inspect.getsource(_soft_inputs) + "SOFT_INPUTS = _soft_inputs\n" + PORTABLE_BITS,
             VQAD_CACHE_DIR=str(tmp_path / "cache"))
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    got = torch.load(out)
    C, rows, D, g = _soft_inputs()
    best, pbar = kernels.soft_assign_forward(C, rows, True)
    dC, gD = kernels.soft_assign_backward(C, rows, best, D, g, torch.full((64,), 0.01))
    assert torch.equal(best, got["best"])
    torch.testing.assert_close(pbar, got["pbar"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dC, got["dC"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gD, got["gD"], rtol=1e-5, atol=1e-5)
    assert set(kernels._isa_flags()) <= {"-mpopcnt", "-mavx2"}


@pytest.mark.parametrize("n,k,U", [(2, 3, 7), (16, 4, 40), (64, 8, 300), (256, 8, 100), (4096, 2, 9), (24, 3, 11)])
def test_soft_assignments_match_softmax_and_autograd(need_kernels, n, k, U):
    """The fused soft assignments against the brute-force definition: argmax, p̄ = mean softmax, and the
    gradients of Σ_u (s_u · D) · g_u + Σ_u s_u · e (autograd) plus the hard lookup's ∂D."""
    gen = torch.Generator().manual_seed(n + U)
    C = torch.randn(3 * U, n, generator=gen) * 3
    rows = torch.randperm(3 * U, generator=gen)[:U].sort().values
    D, g, e = torch.randn(n, k, generator=gen), torch.randn(U, k, generator=gen), torch.randn(n, generator=gen) * 0.1
    best, pbar = kernels.soft_assign_forward(C, rows, True)
    assert torch.equal(kernels.soft_assign_forward(C, rows, False)[0], best) and kernels.soft_assign_forward(C, rows, False)[1] is None
    Cr, Dr = C[rows].clone().requires_grad_(True), D.clone().requires_grad_(True)
    s = torch.softmax(Cr, dim=-1)
    assert torch.equal(best, Cr.argmax(dim=-1))
    torch.testing.assert_close(pbar, s.mean(0), rtol=1e-5, atol=1e-7)
    ((s @ Dr) * g).sum().add((s * e).sum()).backward()
    dC, gD = kernels.soft_assign_backward(C, rows, best, D, g, e)
    torch.testing.assert_close(dC, Cr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gD, Dr.grad + torch.zeros(n, k).index_add_(0, best, g), rtol=1e-4, atol=1e-5)
    dC0, _ = kernels.soft_assign_backward(C, rows, best, D, g, None)
    torch.testing.assert_close(dC0, dC - (torch.softmax(C[rows], -1) * (e - (torch.softmax(C[rows], -1) * e).sum(1, keepdim=True))),
                               rtol=1e-4, atol=1e-6)


def test_soft_assignments_of_rows_with_nan_or_infinity(need_kernels):
    """torch.argmax's rule (the first NaN; else the first maximum, +inf included) and a NaN softmax row."""
    C = torch.randn(5, 64)
    C[0, 5], C[0, 40] = float("nan"), 1e9
    C[1, 9], C[1, 30] = float("inf"), float("inf")
    C[2, 3] = float("-inf")
    C[3] = 0.5  # ties: the first
    C[4] = float("-inf")
    rows = torch.arange(5)
    best, pbar = kernels.soft_assign_forward(C, rows, False)
    assert best.tolist() == C.argmax(dim=-1).tolist() == [5, 9, int(C[2].argmax()), 0, 0]
    dC, _ = kernels.soft_assign_backward(C, rows, best, torch.randn(64, 2), torch.randn(5, 2), None)
    nan_rows = torch.softmax(C, dim=-1).isnan().all(dim=1)  # PyTorch's softmax: NaN for rows 0, 1 and 4
    assert nan_rows.tolist() == [True, True, False, False, True]
    assert dC[nan_rows].isnan().all() and dC[~nan_rows].isfinite().all()
    assert kernels.soft_assign_forward(C, rows, True)[1].isnan().all()  # p̄ of NaN rows: NaN, as PyTorch's mean
    with pytest.raises(IndexError, match="strictly increasing"):
        kernels.soft_assign_forward(C, torch.tensor([1, 1]), False)
    with pytest.raises(IndexError, match="hard assignment"):
        kernels.soft_assign_backward(C, rows, torch.tensor([0, 0, 0, 0, 64]), torch.randn(64, 2), torch.randn(5, 2), None)
    with pytest.raises(ValueError, match="gradient"):
        kernels.soft_assign_backward(C, rows, best, torch.randn(64, 2), torch.randn(4, 2), None)


@pytest.mark.parametrize("threads", [1, 2, 3, 7, 64])
def test_corner_tables_kernel_is_the_same_on_any_thread_count(need_kernels, threads):
    """The per-thread bitmaps, their merge and the ranks' prefix sum, whatever OpenMP grants (the
    kernel caps the team at 8; a build without OpenMP runs one thread)."""
    import ctypes

    codes = _cells(6, 9000, seed=threads)
    ref_c, ref_k = kernels.corner_tables(codes, 6)
    lib = kernels._load()
    corners = torch.empty(codes.numel(), 8, dtype=torch.long)
    keys = torch.empty(8 * codes.numel(), dtype=torch.long)
    n_far = ctypes.c_int64(-1)
    m = lib.vqad_corner_tables(codes.data_ptr(), codes.numel(), 6, corners.data_ptr(), keys.data_ptr(),
                               ctypes.byref(n_far), threads)
    far = corners < 0
    assert n_far.value == int(far.sum()) > 0  # _cells puts cells on the far faces
    assert torch.equal(keys[:m], ref_k[:m]) and torch.equal(corners[~far], ref_c[~far])
    assert bool((ref_c[far] >= m).all())  # numbered after the inner vertices by the caller


def test_corner_tables_kernel_refuses_bad_codes(need_kernels):
    for bad in (torch.tensor([0, 64]), torch.tensor([-1])):
        with pytest.raises(IndexError, match="outside"):
            kernels.corner_tables(bad, 2)
    with pytest.raises(IndexError):
        kernels.corner_tables(torch.tensor([0]), 9)  # the bitmap stops at level 8
    corners, keys = kernels.corner_tables(torch.zeros(0, dtype=torch.long), 3)
    assert corners.shape == (0, 8) and keys.numel() == 0


@pytest.mark.parametrize("level,n", [(0, 1), (1, 8), (2, 30), (4, 900), (6, 20000), (9, 3000), (12, 500)])
def test_octree_contexts_kernel_matches_numpy(need_kernels, level, n):
    """Bitmap (levels up to 8) and binary search (finer) against the NumPy lattice lookups."""
    import numpy as np

    from vqad import entropy as E

    codes = _cells(level, n, seed=level)
    if level >= 9:  # codes near others (+1, +4 in Morton order), so that some neighbours exist
        codes = torch.unique(torch.cat([codes, codes[:100] + 1, codes[:100] + 4]).clamp(max=8 ** level - 1))
    ctx = kernels.octree_contexts(codes, level).numpy()
    with kernels.disabled():
        ref = E.octree_contexts(codes.numpy(), level)
        ref_search = E.octree_contexts(codes.numpy(), level, dense_max_res=0)
    assert np.array_equal(ctx, ref) and np.array_equal(ctx, ref_search)
    assert np.array_equal(E.octree_contexts(codes.numpy(), level), ref)  # what the coder calls
    if level >= 2:
        assert ctx.any()


def test_octree_contexts_kernel_refuses_bad_codes(need_kernels):
    with pytest.raises(IndexError, match="outside"):
        kernels.octree_contexts(torch.tensor([0, 64]), 2)
    with pytest.raises(ValueError, match="strictly increasing"):
        kernels.octree_contexts(torch.tensor([5, 3]), 9)  # the search needs sorted codes
    assert kernels.octree_contexts(torch.tensor([5, 3]), 2).shape == (2, 8)  # the bitmap does not


def test_octree_contexts_kernel_counts_its_contexts(need_kernels):
    import numpy as np

    codes = _cells(5, 3000, seed=3)
    counts = torch.full((128,), 7, dtype=torch.long)  # overwritten, not added to
    ctx = kernels.octree_contexts(codes, 5, counts)
    assert torch.equal(counts, torch.bincount(ctx.reshape(-1).long(), minlength=128))
    assert int(counts.sum()) == 8 * codes.numel() and np.count_nonzero(counts.numpy()) > 10
    with pytest.raises(ValueError, match="counts"):
        kernels.octree_contexts(codes, 5, torch.zeros(127, dtype=torch.long))


@pytest.mark.parametrize("level,n", [(0, 1), (1, 8), (2, 30), (4, 900), (6, 20000), (9, 3000)])
def test_octree_contexts_from_corners_are_the_neighbour_contexts(need_kernels, level, n):
    """The contexts read from a byte per vertex (the 2×2×2 block around it) are the 26-neighbour ones."""
    from vqad.octree import corner_tables

    codes = _cells(level, n, seed=level + 1)
    if level >= 9:
        codes = torch.unique(torch.cat([codes, codes[:100] + 1, codes[:100] + 4]).clamp(max=8 ** level - 1))
    corners, keys = corner_tables(codes, level)
    counts = torch.zeros(128, dtype=torch.long)
    ctx = kernels.octree_contexts_from_corners(corners, keys.numel(), counts)
    assert torch.equal(ctx, kernels.octree_contexts(codes, level))
    assert torch.equal(counts, torch.bincount(ctx.reshape(-1).long(), minlength=128))
    with pytest.raises(IndexError, match="outside"):
        kernels.octree_contexts_from_corners(corners, int(corners.max()))  # one vertex too few
    with pytest.raises(ValueError, match="n, 8"):
        kernels.octree_contexts_from_corners(corners[:, :4], keys.numel())


def test_coarser_vertices_kernel_matches_the_torch_lookup(need_kernels):
    from vqad.octree import SparseOctree

    torch.manual_seed(3)
    pts = 0.8 * torch.nn.functional.normalize(torch.randn(30000, 3), dim=1)
    octree = SparseOctree.from_points(pts, 2, 7, dilate=0)
    for L in range(3, 8):
        got = octree.coarser_vertices(L)
        with kernels.disabled():
            want = octree.coarser_vertices(L)
        assert torch.equal(got, want)
        assert torch.equal(octree.vertices[L - 1][got], octree.vertices[L] // 2)
    keys = octree.vertex_keys[5]
    with pytest.raises(ValueError, match="no coarser vertex"):
        kernels.coarser_vertices(keys, octree.vertex_keys[4][1:])  # the first coarse vertex missing
    with pytest.raises(ValueError, match="no coarser vertex"):
        kernels.coarser_vertices(keys.flip(0), octree.vertex_keys[4])  # out of order


def _range_stream(rng, tables, sizes):
    """constriction's encoding of ``sizes[j]`` symbols under each model ``tables[j] = (precision, freqs)``
    (the symbols drawn mostly from the model, sometimes a zero-frequency one: the models are leaky)."""
    import numpy as np

    from vqad import entropy as E

    enc = E._constriction().stream.queue.RangeEncoder()
    symbols = []
    for (p, f), n in zip(tables, sizes):
        w = f + 1e-3
        s = rng.choice(f.size, size=int(n), p=w / w.sum()).astype(np.int32)
        if n:
            enc.encode(s, E._model(f, p))
        symbols.append(s)
    return np.asarray(enc.get_compressed(), dtype=np.uint32), np.concatenate(symbols).astype(np.int64)


def _random_table(rng, A):
    import numpy as np

    from vqad import entropy as E

    w = rng.random(A) ** rng.uniform(1, 8)
    w[rng.random(A) < 0.3] = 0
    w[rng.integers(A)] += 0.5
    counts = np.rint(w / w.sum() * 5000).astype(np.int64)
    counts[np.argmax(w)] += 1
    p = int(rng.integers(max(E.MIN_TABLE_PRECISION, int((counts > 0).sum() - 1).bit_length()), E.FREQ_PRECISION + 1))
    return p, E.quantize_counts(counts, p)


@pytest.mark.parametrize("A", [2, 3, 16, 33, 256, 4096])
def test_range_decoder_decodes_what_constriction_encodes(need_kernels, A):
    """Random tables (zeros, every precision), several groups, a stream decoded in two calls: the C
    decoder gives constriction's symbols, from the cumulative tables vqad.entropy builds."""
    import numpy as np

    from vqad import entropy as E

    rng = np.random.default_rng(A)
    for trial in range(12):
        K = int(rng.integers(1, 6))
        tables = [_random_table(rng, A) for _ in range(K)]
        sizes = rng.integers(0, 600, K) * (rng.random(K) < 0.8)
        words, want = _range_stream(rng, tables, sizes)
        cdf = torch.from_numpy(E._cdf(np.stack([f for _, f in tables]), np.array([p for p, _ in tables])))
        dec = kernels.RangeDecoder(torch.from_numpy(words.view(np.int32)))
        half = K // 2
        got = torch.cat([dec.decode_symbols(cdf, torch.arange(half), torch.from_numpy(sizes[:half])),
                         dec.decode_symbols(cdf, torch.arange(half, K), torch.from_numpy(sizes[half:]))])
        assert np.array_equal(got.numpy(), want), (A, trial)


def test_range_decoder_decodes_binary_groups_as_constriction_does(need_kernels):
    import numpy as np

    from vqad import entropy as E

    rng = np.random.default_rng(5)
    for _ in range(20):
        q = rng.integers(1, 1 << 16, 128)
        q[:2] = (1, (1 << 16) - 1)  # the extremes
        sizes = rng.integers(0, 400, 128) * (rng.random(128) < 0.7)
        enc = E._constriction().stream.queue.RangeEncoder()
        want = []
        for j in range(128):
            bits = (rng.random(sizes[j]) < q[j] / 65536).astype(np.int32)
            if sizes[j]:
                enc.encode(bits, E._binary_model(int(q[j])))
            want.append(bits)
        words = np.asarray(enc.get_compressed(), dtype=np.uint32)
        got = kernels.RangeDecoder(torch.from_numpy(words.view(np.int32))).decode_bits(
            torch.from_numpy(E._binary_cut(q)), torch.from_numpy(sizes))
        assert np.array_equal(got.numpy(), np.concatenate(want).astype(np.uint8))


def test_range_decoder_on_garbage_fails_where_constriction_does(need_kernels):
    """Random words: the same symbols as constriction, or an error exactly where constriction raises one."""
    import numpy as np

    from vqad import entropy as E

    rng = np.random.default_rng(9)
    outcomes = set()
    for trial in range(200):
        A = int(rng.choice([2, 16, 300]))
        p, f = _random_table(rng, A)
        words = rng.integers(0, 1 << 32, int(rng.integers(0, 6)), dtype=np.uint64).astype(np.uint32)
        if trial % 4 == 0:  # a point at the top of the range: no encoder writes it
            words = np.concatenate([np.full(2, 0xFFFFFFFF, dtype=np.uint32), words])
        n = int(rng.integers(1, 60))
        try:
            want = np.asarray(E._constriction().stream.queue.RangeDecoder(words).decode(E._model(f, p), n), dtype=np.int64)
        except Exception:
            want = None
        dec = kernels.RangeDecoder(torch.from_numpy(words.view(np.int32)))
        try:
            got = dec.decode_symbols(torch.from_numpy(E._cdf(f[None], p)), [0], [n]).numpy()
        except ValueError:
            got = None
        assert (got is None) == (want is None) and (got is None or np.array_equal(got, want)), trial
        outcomes.add(got is None)
    assert outcomes == {True, False}  # both cases were met


def test_range_decoder_refuses_bad_arguments(need_kernels):
    dec = kernels.RangeDecoder(torch.zeros(4, dtype=torch.int32))
    cdf = torch.tensor([[0, 1 << 23, 1 << 24]], dtype=torch.int32)
    with pytest.raises(ValueError, match="non-negative"):
        dec.decode_symbols(cdf, [0], [-1])
    with pytest.raises(ValueError, match="table outside"):
        dec.decode_symbols(cdf, [1], [3])
    with pytest.raises(ValueError, match="A >= 2"):
        dec.decode_symbols(cdf[:, :2], [0], [3])
    with pytest.raises(ValueError, match="cut"):
        dec.decode_bits([0], [3])
    with pytest.raises(ValueError, match="cut"):
        dec.decode_bits([1 << 24], [3])
    assert dec.decode_symbols(cdf, [5], [0]).numel() == 0  # an empty group's table is never read


def test_children_kernel_matches_the_torch_form(need_kernels):
    from vqad.octree import SparseOctree

    gen = torch.Generator().manual_seed(3)
    parents = torch.unique(torch.randint(0, 8 ** 5, (3000,), generator=gen))
    masks = torch.randint(0, 256, (parents.numel(),), generator=gen, dtype=torch.int64).to(torch.uint8)
    masks[:3] = torch.tensor([0, 255, 1], dtype=torch.uint8)  # none, all, one
    with kernels.disabled():
        ref = SparseOctree.codes_from_child_masks(parents, masks)
    assert torch.equal(kernels.children(parents, masks), ref)
    assert torch.equal(SparseOctree.codes_from_child_masks(parents, masks), ref)
    assert kernels.children(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.uint8)).numel() == 0
    for bad in (-1, 1 << 60):  # negative, or too large to shift by 3 within int64
        with pytest.raises(IndexError):
            kernels.children(torch.tensor([bad]), torch.tensor([1], dtype=torch.uint8))
    full = kernels.children(parents, torch.full_like(masks, 255))
    assert full.numel() == 8 * parents.numel() and full.untyped_storage().nbytes() == 8 * full.numel()
    few = kernels.children(parents, torch.ones_like(masks))  # one child each: no 8n-entry buffer kept
    assert few.untyped_storage().nbytes() == 8 * parents.numel()
    with pytest.raises(ValueError, match="masks"):
        kernels.children(torch.tensor([1, 2]), torch.tensor([1], dtype=torch.uint8))


@pytest.mark.parametrize("n,K", [(1, 2), (5000, 16), (20000, 256), (300, 4096)])
def test_ungroup_inverts_a_stable_sort_by_context(need_kernels, n, K):
    import numpy as np

    gen = torch.Generator().manual_seed(n)
    ctx = torch.randint(0, K, (n,), generator=gen)
    values = torch.randint(0, 1 << 40, (n,), generator=gen)
    order = torch.from_numpy(np.argsort(ctx.numpy(), kind="stable"))
    sizes = torch.bincount(ctx, minlength=K)
    assert torch.equal(kernels.ungroup(ctx, values[order], sizes), values)
    bad = ctx.clone()
    bad[-1] = K  # a context outside [0, K)
    with pytest.raises(IndexError):
        kernels.ungroup(bad, values[order], sizes)
    if n > 1:  # the right total, the wrong split: the first position's group runs out
        short = sizes.clone()
        short[ctx[0]] = 0
        short[(ctx[0] + 1) % K] += sizes[ctx[0]]
        with pytest.raises(IndexError):
            kernels.ungroup(ctx, values[order], short)
        negative = sizes.clone()  # the right total with a negative size: refused before any read
        negative[0] = -1
        negative[1] += sizes[0] + 1
        with pytest.raises(ValueError, match="non-negative"):
            kernels.ungroup(ctx, values[order], negative)
    with pytest.raises(ValueError, match="adding up"):
        kernels.ungroup(ctx, values[order], sizes + 1)


def test_ungroup_bits_packs_child_masks(need_kernels):
    import numpy as np

    from vqad import entropy as E

    gen = torch.Generator().manual_seed(1)
    n = 4000
    ctx = torch.randint(0, 128, (n, 8), generator=gen, dtype=torch.int64).to(torch.uint8)
    masks = torch.randint(1, 256, (n,), generator=gen, dtype=torch.int64).to(torch.uint8)
    bits = ((masks.long()[:, None] >> torch.arange(8)) & 1).to(torch.uint8).reshape(-1)
    order = torch.from_numpy(np.argsort(ctx.reshape(-1).numpy(), kind="stable"))
    sizes = torch.bincount(ctx.reshape(-1).long(), minlength=128)
    assert torch.equal(kernels.ungroup_bits(ctx, bits[order], sizes), masks)
    assert torch.equal(kernels.ungroup_bits(ctx, 7 * bits[order], sizes), masks)  # non-zero is set, as for packbits
    with kernels.disabled():
        ref = E._ungroup_bits(ctx.reshape(-1).numpy(), bits[order].numpy(), sizes.numpy())
    assert np.array_equal(ref, masks.numpy())
    with pytest.raises(IndexError):
        kernels.ungroup_bits(ctx, bits[order], torch.bincount(ctx.reshape(-1).long(), minlength=128)[:100].clone()
                             .index_add_(0, torch.tensor([99]), torch.tensor([int(sizes[100:].sum())])))
    with pytest.raises(ValueError):
        kernels.ungroup_bits(ctx[:, :7], bits[:7 * n], sizes)


def test_kernels_refuse_tensors_off_the_cpu(need_kernels):
    """They read raw host memory: another device's tensor is an error, never dereferenced."""
    meta = torch.empty(4, 8, device="meta")
    with pytest.raises(ValueError, match="on the CPU"):
        kernels.interp_backward(meta, torch.zeros(4, 8, dtype=torch.long), torch.zeros(4, 2), 3)
    with pytest.raises(ValueError, match="on the CPU"):
        kernels.level_query(torch.zeros(4, 3), 1, torch.zeros(8, dtype=torch.int32, device="meta"),
                            torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="on the CPU"):
        kernels.argmax_rows(meta)
    with pytest.raises(ValueError, match="on the CPU"):
        kernels.unique_rows(torch.zeros(3, dtype=torch.long, device="meta"), 5)
    with pytest.raises(ValueError, match="on the CPU"):
        kernels.corner_tables(torch.zeros(3, dtype=torch.long, device="meta"), 2)
    with pytest.raises(ValueError, match="on the CPU"):
        kernels.octree_contexts(torch.zeros(3, dtype=torch.long, device="meta"), 2)
    with pytest.raises(ValueError, match="on the CPU"):
        kernels.children(torch.zeros(3, dtype=torch.long, device="meta"), torch.ones(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="on the CPU"):
        kernels.ungroup(torch.zeros(3, dtype=torch.long, device="meta"), torch.zeros(3, dtype=torch.long), [3])
    with pytest.raises(ValueError, match="on the CPU"):
        kernels.ungroup_bits(torch.zeros(1, 8, dtype=torch.uint8), torch.zeros(8, dtype=torch.uint8, device="meta"), [8])
    p = torch.zeros(5, 2)
    with pytest.raises(ValueError, match="on the CPU"):
        kernels.sparse_adam(p, p.clone(), p.clone(), torch.tensor([1]), torch.ones(1, 2, device="meta"), 0.9, 0.99, 1e-8, 0.1)
    with pytest.raises(ValueError, match="one shape"):
        kernels.sparse_adam(p, p.clone(), torch.zeros(5, 3), torch.tensor([1]), torch.ones(1, 2), 0.9, 0.99, 1e-8, 0.1)
    kernels.sparse_adam(p, p.clone(), p.clone(), torch.zeros(0, dtype=torch.long), torch.ones(0, 2), 0.9, 0.99, 1e-8, 0.1)
    assert not p.any()  # no rows: nothing to do


def test_no_home_directory_builds_in_a_temporary_directory(need_kernels, tmp_path):
    """Without $HOME (nor $VQAD_CACHE_DIR, nor $XDG_CACHE_HOME) there is no cache: build per process."""
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "VQAD_CACHE_DIR", "XDG_CACHE_HOME")}
    code = ("import pathlib; pathlib.Path.home = classmethod(lambda cls: (_ for _ in ()).throw(RuntimeError('no home')))\n"
            + STATUS)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**env, "PYTHONPATH": str(REPO / "src")}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "True" and not any(tmp_path.iterdir())  # nothing left in the cwd
