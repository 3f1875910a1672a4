"""The O(m)-state logit optimizer (codebooks above 6 bits) against a brute-force reference."""

import pytest
import torch
import torch.nn.functional as F

from vqad import fit as T
from vqad.optim import make_optimizers
from vqad.errors import InputError
from vqad.checkpoint import load_optimizer_state, save_checkpoint, load_checkpoint
from vqad.optim import RowwiseSparseRMSprop
from vqad.storages.codebook import CodebookStorage

from test_storage import _small_field


def _reference(C0, grads, lr, beta, eps):
    """Loop over steps and rows: v_i, t_i per row, only touched rows change."""
    C = C0.clone().double()
    m = C.shape[0]
    v, t = [0.0] * m, [0] * m
    for g in grads:  # dense (m, n) with zero rows for untouched vertices
        for i in range(m):
            if not torch.any(g[i] != 0):
                continue
            v[i] = beta * v[i] + (1 - beta) * float((g[i].double() ** 2).mean())
            t[i] += 1
            denom = (v[i] / (1 - beta ** t[i])) ** 0.5 + eps
            C[i] -= lr * g[i].double() / denom
    return C


def test_rowwise_rmsprop_matches_reference():
    torch.manual_seed(0)
    m, n = 12, 256
    C0 = torch.randn(m, n)
    p = torch.nn.Parameter(C0.clone())
    opt = RowwiseSparseRMSprop([p], lr=0.3, beta=0.9)
    dense_grads = []
    for step in range(5):
        ids = torch.randint(0, m, (7,))  # repeats: the sparse gradient has duplicate rows
        w = torch.randn(7, n)
        opt.zero_grad()
        (F.embedding(ids, p, sparse=True) * w).sum().backward()
        dense_grads.append(p.grad.to_dense().clone())
        opt.step()
    ref = _reference(C0, dense_grads, 0.3, 0.9, 1e-8)
    torch.testing.assert_close(p.detach().double(), ref, rtol=1e-5, atol=1e-5)
    st = opt.state[p]
    assert st["v"].shape == (m,) and st["t"].shape == (m,)  # O(m), not O(m · 2^b)
    untouched = (torch.stack(dense_grads).abs().sum(dim=(0, 2)) == 0)
    assert torch.equal(p.detach()[untouched], C0[untouched])


def test_wide_codebooks_get_bounded_state_and_resume(tmp_path):
    field, _ = _small_field("codebook", bits=8)
    opts = make_optimizers(field, 1e-2, 10.0, logit_lr_scale=100.0)
    assert set(opts) == {"logits", "dense"}
    x = torch.rand(512, 3) * 1.6 - 0.8
    for _ in range(3):
        T.zero_grad(opts)
        field.all_lods(x, field.lods).pow(2).mean().backward()
        T.step(opts)
    Cs = [s.C for s in field.grid.storages if isinstance(s, CodebookStorage)]
    state_numel = sum(t.numel() for st in opts["logits"].state.values() for t in st.values())
    assert state_numel == 2 * sum(C.shape[0] for C in Cs)
    assert opts["logits"].param_groups[0]["lr"] == 1.0
    save_checkpoint(tmp_path / "ck", field, extra={"step": 3}, optimizers=opts)
    f2, cfg = load_checkpoint(tmp_path / "ck", torch.device("cpu"))
    o2 = make_optimizers(f2, 1e-2, 10.0, logit_lr_scale=100.0)
    load_optimizer_state(tmp_path / "ck", o2, cfg)
    for a, b in zip(opts["logits"].state.values(), o2["logits"].state.values()):
        torch.testing.assert_close(a["v"], b["v"])


def test_narrow_codebooks_keep_sparse_adam_with_logit_group():
    field, _ = _small_field("codebook", bits=4)
    opts = make_optimizers(field, 1e-2, 10.0, logit_lr_scale=100.0)
    assert set(opts) == {"sparse", "dense"}
    lrs = sorted(g["lr"] for g in opts["sparse"].param_groups)
    assert lrs == [1.0]  # the codebook has no other sparse parameter
    opts = make_optimizers(field, 1e-2, 10.0)
    assert [g["lr"] for g in opts["sparse"].param_groups] == [0.1]


def test_codebooks_can_train_at_their_own_rate():
    field, _ = _small_field("codebook", bits=4)
    D_ids = {id(s.D) for s in field.grid.storages}
    opts = make_optimizers(field, 1e-2, 10.0, codebook_lr_scale=300.0)
    groups = {g["lr"]: {id(p) for p in g["params"]} for g in opts["dense"].param_groups}
    assert groups[3.0] == D_ids  # every level's D, nothing else
    assert 0.1 not in groups  # no other dense grid parameter in this field
    assert not D_ids & groups[1e-2]  # the decoder group holds no codebook
    # without the option, D trains at the grid's rate
    plain = make_optimizers(field, 1e-2, 10.0)
    groups = {g["lr"]: {id(p) for p in g["params"]} for g in plain["dense"].param_groups}
    assert groups[0.1] == D_ids


def test_resuming_with_other_parameter_groups_is_a_clear_error(tmp_path):
    field, _ = _small_field("codebook", bits=4)
    save_checkpoint(tmp_path / "ck", field, extra={"step": 0}, optimizers=make_optimizers(field, 1e-2, 10.0))
    f2, cfg = load_checkpoint(tmp_path / "ck", torch.device("cpu"))
    opts = make_optimizers(f2, 1e-2, 10.0)
    dense = [p for g in opts["dense"].param_groups for p in g["params"]]
    opts["dense"] = torch.optim.Adam([{"params": dense[:1]}, {"params": dense[1:2]}, {"params": dense[2:]}])
    with pytest.raises(InputError, match="resume with the options"):
        load_optimizer_state(tmp_path / "ck", opts, cfg)
