"""The VQ-AD codebook storage: straight-through estimator, sparse softmax, bake."""

import pytest
import torch

from vqad.config import DecoderConfig, GridConfig
from vqad.errors import InputError
from vqad.sdf.field import SDFField
from vqad.grid import OctreeGrid
from vqad.octree import SparseOctree
from vqad.storages.codebook import CodebookStorage
from vqad.storages.dense import DenseStorage
from vqad.storages import make_storage


def test_straight_through_forward_is_hard_lookup_and_grads_reach_C_and_D():
    torch.manual_seed(0)
    s = CodebookStorage(m=50, k=4, bits=3)
    ids = torch.randint(0, 50, (20, 8))
    out = s(ids)
    hard = s.D[s.C.argmax(-1)][ids]
    assert torch.equal(out, hard)  # exactly the hard feature
    out.sum().backward()
    assert s.C.grad is not None and s.D.grad is not None
    gC = s.C.grad.to_dense()
    touched = torch.zeros(50, dtype=torch.bool)
    touched[ids.unique()] = True
    assert gC[touched].abs().sum() > 0 and gC[~touched].abs().sum() == 0


@pytest.mark.parametrize("fused", [True, False])  # the C kernels where built (the hard lookup's ∂D), or PyTorch's ops
@pytest.mark.parametrize("m,n,k", [(40, 64, 5), (20000, 30000, 8)])  # the second large enough for two threads
def test_unique_vertex_softmax_equals_full_softmax(monkeypatch, fused, m, n, k):
    from vqad import kernels

    if not fused:
        monkeypatch.setattr(kernels, "_forced_off", 1)
    torch.manual_seed(1)
    s = CodebookStorage(m=m, k=k, bits=4)
    ids = torch.randint(0, m, (n, 8))
    w = torch.randn(n, 8, k)
    (s(ids) * w).sum().backward()
    gC, gD = s.C.grad.to_dense().clone(), s.D.grad.clone()
    # reference: softmax over all m rows, then index (no unique, no sparse), in float64: ∂D sums up to
    # 240,000 float32 terms, whose order alone moves it by ~1e-4 relative
    C = s.C.detach().double().requires_grad_(True)
    D = s.D.detach().double().requires_grad_(True)
    soft = torch.softmax(C, -1) @ D  # (m, k)
    hard = D[C.argmax(-1)]
    ref = (hard + (soft - soft.detach()))[ids]
    (ref * w.double()).sum().backward()
    torch.testing.assert_close(gC.double(), C.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gD.double(), D.grad, rtol=1e-5, atol=1e-5 * float(D.grad.abs().max()))


def _small_field(storage="codebook", bits=4):
    torch.manual_seed(2)
    pts = torch.rand(300, 3) * 1.6 - 0.8
    octree = SparseOctree.from_points(pts, 2, 4)
    grid = OctreeGrid.from_octree(octree, GridConfig(storage=storage, features=8, bits=bits, base_level=2, max_level=4))
    return SDFField(grid, DecoderConfig(hidden=32)), pts


@pytest.mark.parametrize("storage", ["codebook", "dense"])
def test_bake_gives_identical_outputs(storage):
    field, pts = _small_field(storage)
    x = pts + torch.randn_like(pts) * 0.02
    field.eval()
    with torch.no_grad():
        before = field.all_lods(x)
    field.bake(fp16=False)
    with torch.no_grad():
        after = field.all_lods(x)
    assert torch.equal(before, after)
    if storage == "codebook":
        assert all(s.C is None and s.V.shape == (s.m,) for s in field.grid.storages)


def test_training_forward_equals_baked_forward():
    field, pts = _small_field("codebook")
    field.train()
    x = pts[:64]
    train_out = field.all_lods(x).detach()  # STE path, grad enabled
    field.bake(fp16=False)
    with torch.no_grad():
        assert torch.equal(train_out, field.all_lods(x))


def test_size_accounting_matches_formula():
    s = make_storage("codebook", 1000, 16, bits=4)
    assert s.stored_bits() == 1000 * 4 + 16 * 16 * 16
    assert s.dense_fp16_bits() == 16 * 1000 * 16
    assert DenseStorage(10, 3).stored_bits() == 16 * 30


@pytest.mark.parametrize("bits, std", [(2, 0.01), (4, 0.01), (5, 0.01), (6, 0.1), (8, 0.1)])
def test_default_init_scales_with_the_codebook(bits, std):
    """D starts at ten times the logits' scale from 64 codes on; C at 0.01 at every b; explicit stds win."""
    torch.manual_seed(0)
    s = make_storage("codebook", 4000, 64, bits=bits)
    assert abs(s.D.detach().std().item() / std - 1) < 0.2  # 2^b · 64 ≥ 256 draws
    assert abs(s.C.detach().std().item() / 0.01 - 1) < 0.05  # 4000 · 2^b ≥ 16,000 draws
    assert CodebookStorage(10, 4, bits=bits, codebook_std=0.0).D.abs().max().item() == 0.0


@pytest.mark.parametrize("bits", [0, 13])
def test_bits_out_of_range(bits):
    with pytest.raises(InputError, match="bits"):
        CodebookStorage(10, 4, bits=bits)


# -- what each kind declares ---------------------------------------------------------------------
def test_each_kind_declares_its_options():
    from vqad.storages import STORAGES, options_of

    assert {kind: options_of(kind) for kind in STORAGES} == {
        "dense": (), "codebook": ("bits",), "lowrank": ("rank",), "hash": ("table_bits",)}
    assert STORAGES["hash"].create_args == ("table_bits", "vertices")  # vertices come from the octree
    assert [kind for kind, cls in STORAGES.items() if cls.discrete] == ["codebook"]
    with pytest.raises(InputError, match="post-hoc"):
        options_of("kmeans")  # made post hoc, stored as a baked codebook
    with pytest.raises(InputError, match="choose one of"):
        options_of("nope")


def test_grid_config_validates_only_the_options_its_kind_uses():
    GridConfig(storage="dense", bits=0).validate()  # dense has no b
    with pytest.raises(InputError, match="bits"):
        GridConfig(storage="codebook", bits=0).validate()
    with pytest.raises(InputError, match="bits"):
        GridConfig(storage="codebook", bits=True).validate()
    with pytest.raises(InputError, match="unknown grid storage"):
        GridConfig(storage="nope").validate()


def test_set_indices_moves_the_argmax_by_swapping_two_logits():
    torch.manual_seed(3)
    s = CodebookStorage(m=30, k=3, bits=3)
    C0 = s.C.detach().clone()
    rows = torch.tensor([0, 4, 7, 9, 29])
    new = torch.tensor([5, 5, 0, 7, int(C0[29].argmax())])  # the last one already holds its index
    s.set_indices(rows, new)
    assert torch.equal(s.indices()[rows], new)
    ref = C0.clone()
    for i, j in zip(rows.tolist(), new.tolist()):  # a loop: swap the row's max logit with logit j
        a = int(ref[i].argmax())
        ref[i, a], ref[i, j] = C0[i, j], C0[i, a]
    assert torch.equal(s.C.detach(), ref)
    # baked: V itself
    s.bake(fp16=False)
    V = s.indices().clone()
    s.set_indices(torch.tensor([1, 2]), torch.tensor([6, 3]))
    V[1], V[2] = 6, 3
    assert torch.equal(s.indices(), V) and torch.equal(s(torch.arange(30)), s.codebook()[V])


def test_only_discrete_kinds_have_indices():
    s = DenseStorage(5, 2)
    for call in (s.indices, s.codebook, lambda: s.set_indices(torch.tensor([0]), torch.tensor([1]))):
        with pytest.raises(NotImplementedError, match="discrete"):
            call()


def test_baked_codebook_from_indices():
    D = torch.randn(8, 3).half().float()
    V = torch.tensor([0, 7, 3, 3, 1])
    rng = torch.random.get_rng_state()
    s = CodebookStorage.from_indices(D, V)
    assert torch.equal(rng, torch.random.get_rng_state())  # draws no random numbers
    assert s.baked and s.discrete and s.b == 3 and s.m == 5 and s.k == 3 and s.C is None
    assert s.params() == {"bits": 3} and s.param_groups() == [] and s.logit_parameters() == []
    assert torch.equal(s(torch.tensor([[1, 2]])), D[V[[1, 2]]][None])
    back = CodebookStorage.from_export(5, 3, s.export_tensors(), bits=3)
    assert torch.equal(back.indices(), V) and torch.equal(back.codebook(), D)
    for bad_D, bad_V, needle in [(torch.zeros(6, 3), V, "2\\^b rows"), (torch.zeros(8), V, "shape"),
                                 (D, torch.tensor([0, 8]), "0..7"), (D, torch.zeros(0, dtype=torch.long), "non-empty"),
                                 (torch.zeros(1 << 13, 2), V, "bits")]:
        with pytest.raises(InputError, match=needle):
            CodebookStorage.from_indices(bad_D, bad_V)


def test_fused_interpolation_matches_brute_force_and_gradcheck():
    """The grid's embedding_bag interpolation Σ_c w_c T[ids_c] equals a loop over the corners, and its
    hand-written backward (for both the weights and the table) passes gradcheck."""
    from vqad.grid import _Interpolate, _interpolate

    g = torch.Generator().manual_seed(0)
    w = torch.rand(6, 8, dtype=torch.float64, generator=g, requires_grad=True)
    T = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.randint(0, 9, (6, 8), generator=g)
    brute = sum(w[:, c:c + 1] * T[ids[:, c]] for c in range(8))
    torch.testing.assert_close(_interpolate(w, T, ids), brute)
    assert torch.autograd.gradcheck(lambda a, b: _Interpolate.apply(a, b, ids), (w, T))
    # float64 weights on a float32 table: the plain gather, same values
    torch.testing.assert_close(_interpolate(w.detach(), T.detach().float(), ids), brute.detach(), rtol=1e-6, atol=1e-6)
