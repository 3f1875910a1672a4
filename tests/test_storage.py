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


def test_unique_vertex_softmax_equals_full_softmax():
    torch.manual_seed(1)
    s = CodebookStorage(m=40, k=5, bits=4)
    ids = torch.randint(0, 40, (64, 8))
    w = torch.randn(64, 8, 5)
    (s(ids) * w).sum().backward()
    gC, gD = s.C.grad.to_dense().clone(), s.D.grad.clone()
    # reference: softmax over all m rows, then index (no unique, no sparse)
    C = s.C.detach().clone().requires_grad_(True)
    D = s.D.detach().clone().requires_grad_(True)
    soft = torch.softmax(C, -1) @ D  # (m, k)
    hard = D[C.argmax(-1)]
    ref = (hard + (soft - soft.detach()))[ids]
    (ref * w).sum().backward()
    torch.testing.assert_close(gC, C.grad)
    torch.testing.assert_close(gD, D.grad)


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


@pytest.mark.parametrize("bits", [0, 13])
def test_bits_out_of_range(bits):
    with pytest.raises(InputError, match="bits"):
        CodebookStorage(10, 4, bits=bits)
