"""The rate term (--rate-weight): its estimate, its effect on the indices, and that λ = 0 changes nothing."""

import numpy as np
import pytest
import torch
import trimesh

from vqad import fileformat as F
from vqad.config import DecoderConfig, GridConfig
from vqad.errors import InputError
from vqad.fit import rate_storages, rate_term
from vqad.grid import OctreeGrid
from vqad.octree import SparseOctree
from vqad.sdf.field import SDFField
from vqad.sdf.fit import SDFTrainConfig, fit_sdf
from vqad.sdf.mesh import Mesh
from vqad.storages.codebook import CodebookStorage

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def entropy_bits(V: np.ndarray, A: int) -> float:
    p = np.bincount(V, minlength=A) / len(V)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def test_rate_bits_is_the_entropy_of_the_mean_soft_assignment():
    torch.manual_seed(0)
    s = CodebookStorage(50, 3, bits=3)
    s.C.data.normal_(0, 2.0)
    s.train()
    ids = torch.tensor([[0, 1, 2], [2, 7, 9]])
    s.track_rate(True)
    s(ids)
    r = s.rate_bits()
    p = torch.softmax(s.C[[0, 1, 2, 7, 9]], dim=-1)  # the unique touched rows
    # brute force: mean over vertices of the cross-entropy of s_u under p̄ = mean_u s_u
    pbar = p.mean(0)
    want = -(p * torch.log2(pbar)).sum(1).mean()
    assert torch.allclose(r, want, atol=1e-6)
    r.backward()
    assert s.C.grad is not None and s.C.grad.coalesce().values().abs().sum() > 0
    # the gradient is the brute-force formula's (each vertex's cross-entropy under the marginal, both moving)
    C = s.C.detach().clone().requires_grad_(True)
    q = torch.softmax(C[[0, 1, 2, 7, 9]], dim=-1)
    (-(q * torch.log2(q.mean(0))).sum(1).mean()).backward()
    assert torch.allclose(s.C.grad.to_dense(), C.grad, atol=1e-6)
    assert s.rate_bits() is None  # the record is cleared: nothing touched since
    s.track_rate(False)
    s(ids)
    assert s._soft is None


def test_rate_bits_given_contexts_is_the_conditional_cross_entropy():
    torch.manual_seed(0)
    s = CodebookStorage(30, 3, bits=2)
    s.C.data.normal_(0, 2.0)
    s.train()
    ctx = torch.randint(0, 3, (30,))
    ids = torch.arange(0, 30, 2)
    s.track_rate(True, contexts=True)
    s(ids)
    r = s.rate_bits(ctx, 3)
    p = torch.softmax(s.C[ids], dim=-1)
    want = 0.0
    for u, i in enumerate(ids.tolist()):  # brute force, vertex by vertex
        same = [v for v, jv in enumerate(ids.tolist()) if ctx[jv] == ctx[i]]
        model = p[same].mean(0)
        want = want - (p[u] * torch.log2(model)).sum()
    assert torch.allclose(r, want / len(ids), atol=1e-5)
    s.track_rate(True, contexts=True)
    s(ids)
    conditional = float(s.rate_bits(ctx, 3).detach())
    s(ids)
    assert conditional <= float(s.rate_bits().detach()) + 1e-6  # conditioning never raises the entropy estimate
    with pytest.raises(InputError, match="--rate-weight"):
        SDFTrainConfig(rate_context=True).validate()


@pytest.mark.parametrize("bits", [4, 6])  # 6: the fused CPU lookups (storages.codebook._SoftAssign)
def test_tracking_the_rate_changes_neither_outputs_nor_gradients(bits):
    torch.manual_seed(0)
    a = CodebookStorage(40, 4, bits=bits)
    b = CodebookStorage(40, 4, bits=bits)
    b.load_state_dict(a.state_dict())
    a.train(), b.train()
    b.track_rate(True)
    ids = torch.randint(0, 40, (30, 8))
    ya, yb = a(ids), b(ids)
    assert torch.equal(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    assert torch.equal(a.D.grad, b.D.grad) and torch.equal(a.C.grad.to_dense(), b.C.grad.to_dense())


def _fused_and_unfused(monkeypatch, rate: bool, lookups: int = 2, bits: int = 6):
    """C's and D's gradients of one loss (features of several lookups, plus the order-0 rate term when
    ``rate``) through the fused lookups and through the PyTorch ops."""
    from vqad import kernels
    import vqad.storages.codebook as CB

    if not kernels.applies(torch.zeros(1)):
        pytest.skip(f"vqad's C kernels are not built here: {kernels.status()}")
    gen = torch.Generator().manual_seed(7)
    ids = [torch.randint(0, 300, (200, 8), generator=gen) for _ in range(lookups)]
    w = [torch.randn(200, 8, 5, generator=gen) for _ in range(lookups)]
    grads = []
    for fused in (True, False):
        monkeypatch.setattr(CB, "FUSED_MIN_CODES", 64 if fused else 1 << 30)
        torch.manual_seed(0)
        s = CodebookStorage(300, 5, bits=bits)
        s.C.data.normal_(0, 1.5, generator=torch.Generator().manual_seed(1))
        s.train()
        assert s._fuses() == fused
        s.track_rate(rate)
        loss = sum((s(i) * wi).sum() for i, wi in zip(ids, w))
        if rate:
            loss = loss + 50.0 * s.rate_bits()
        loss.backward()
        grads.append((s.C.grad.coalesce().to_dense(), s.D.grad, float(loss.detach())))
    return grads


@pytest.mark.parametrize("rate", [False, True])
def test_fused_lookups_give_the_pytorch_gradients(monkeypatch, rate):
    """From b = 6 on the CPU a training lookup runs fused (one pass forward, one backward); its gradients
    for C (sparse, those rows) and D, and with the rate term its value too, are the unfused path's."""
    (gc, gd, lf), (rc, rd, lr) = _fused_and_unfused(monkeypatch, rate)
    torch.testing.assert_close(gc, rc, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gd, rd, rtol=1e-4, atol=1e-4)
    assert gc.abs().sum() > 0 and abs(lf - lr) <= 1e-4 * abs(lr)


@pytest.mark.parametrize("bits", [2, 6])
def test_the_rate_by_context_needs_a_record_that_keeps_it(bits):
    """The rate by context needs every row's soft assignment: track_rate(True, contexts=True) keeps them
    (and the unfused lookups, from b = 6 on the CPU); asking for it from another record is a clear error,
    whatever b and the device."""
    s = CodebookStorage(50, 3, bits=bits)
    s.train()
    ctx = torch.randint(0, 4, (50,))
    s.track_rate(True, contexts=True)
    assert not s._fuses()
    s(torch.arange(10))
    assert s.rate_bits(ctx, 4) is not None
    s.track_rate(True)
    s(torch.arange(10))
    with pytest.raises(RuntimeError, match="contexts=True"):
        s.rate_bits(ctx, 4)


@pytest.mark.parametrize("bits", [4, 6])
def test_empty_lookups_add_nothing_to_the_rate(bits):
    s = CodebookStorage(100, 4, bits=bits)
    s.train()
    s.track_rate(True)
    s(torch.zeros(0, dtype=torch.long))
    assert s.rate_bits() is None  # nothing touched
    s(torch.zeros(0, dtype=torch.long))
    s(torch.arange(50))
    r = s.rate_bits()
    s(torch.arange(50))
    assert torch.isfinite(r) and torch.allclose(r, s.rate_bits())


def test_rate_needs_learned_indices():
    octree = SparseOctree.dense(1, 2)
    field = SDFField(OctreeGrid.from_octree(octree, GridConfig("dense", 2, 4, 1, 2)), DecoderConfig(hidden=4))
    with pytest.raises(InputError, match="--rate-weight"):
        rate_storages(field)
    with pytest.raises(InputError, match="--rate-weight"):
        SDFTrainConfig(rate_weight=-0.1).validate()
    codebook = SDFField(OctreeGrid.from_octree(octree, GridConfig("codebook", 2, 4, 1, 2)), DecoderConfig(hidden=4))
    assert rate_term(rate_storages(codebook)) is None  # nothing touched yet


def _sphere():
    s = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    return Mesh(np.asarray(s.vertices, dtype=np.float64), np.asarray(s.faces, dtype=np.int64))


def _fit(rate_weight, seed):
    grid = GridConfig(storage="codebook", features=4, bits=4, base_level=2, max_level=4)
    train = SDFTrainConfig(steps=80, batch=1024, pool_size=20000, resample_every=40, refine=0, seed=seed,
                           rate_weight=rate_weight)
    return fit_sdf(_sphere(), grid, DecoderConfig(hidden=16), train, torch.device("cpu"), quiet=True)


def test_rate_weight_lowers_the_index_entropy_on_paired_seeds():
    for seed in (0, 1):
        plain, rated = _fit(0.0, seed), _fit(1e-2, seed)
        s0, s1 = plain.field.grid.storage(4), rated.field.grid.storage(4)
        h0, h1 = entropy_bits(s0.indices().numpy(), 16), entropy_bits(s1.indices().numpy(), 16)
        assert h1 < h0 - 0.5, (seed, h0, h1)
        assert "rate_bits" in rated.history[-1] and "rate_bits" not in plain.history[-1]
        # and the coded file shrinks accordingly, decoding bit for bit
        rated.field.bake(fp16=True)
        data = F.to_bytes(rated.field, entropy=True)
        back = F.load(data)
        assert torch.equal(back.grid.storage(4).indices(), rated.field.grid.storage(4).indices())


def test_rate_context_fit_runs_and_logs_the_conditional_estimate():
    grid = GridConfig(storage="codebook", features=4, bits=4, base_level=2, max_level=4)
    train = SDFTrainConfig(steps=30, batch=1024, pool_size=20000, resample_every=30, refine=0, rate_weight=1e-2,
                           rate_context=True, log_every=10)
    res = fit_sdf(_sphere(), grid, DecoderConfig(hidden=16), train, torch.device("cpu"), quiet=True)
    assert all(0 <= h["rate_bits"] <= 4 for h in res.history)


def test_rate_weight_zero_tracks_nothing(monkeypatch):
    def boom(self, on):
        raise AssertionError("a fit with rate_weight = 0 must not track the rate")

    monkeypatch.setattr(CodebookStorage, "track_rate", boom)
    res = _fit(0.0, 0)
    assert res.steps == 80
