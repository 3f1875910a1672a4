"""The O(m)-state logit optimizer (codebooks above 6 bits) against a brute-force reference."""

import pytest
import torch
import torch.nn.functional as F

from vqad import fit as T
from vqad.optim import make_optimizers
from vqad.errors import InputError
from vqad.checkpoint import load_optimizer_state, save_checkpoint, load_checkpoint
from vqad.optim import RowwiseSparseRMSprop

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
    Cs = [s.C for s in field.grid.storages]
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


def _grouping(field, opts):
    """{optimizer: (class, [(lr, [parameter names])])}: what a checkpoint's optimizer state is keyed by."""
    names = {id(p): n for n, p in field.named_parameters()}
    return {o: (type(opt).__name__, [(g["lr"], [names[id(p)] for p in g["params"]]) for g in opt.param_groups])
            for o, opt in opts.items()}


def _grid_names(field, *attrs):
    return [f"grid.storages.{i}.{a}" for i in range(len(field.grid.storages)) for a in attrs]


@pytest.mark.parametrize("storage, bits", [("dense", 4), ("codebook", 4), ("codebook", 8), ("hash", 4), ("lowrank", 4)])
def test_grouping_is_pinned(storage, bits):
    """The optimizers, groups, group order and parameter order of every kind (checkpoints' optimizer
    state is keyed by them, and a fit's numbers depend on them)."""
    field, _ = _small_field(storage, bits=bits)
    decoder = [n for n, p in field.named_parameters() if not n.startswith("grid.")]
    lr, g = 1e-2, 1e-2 * 10.0
    for logit_scale, codebook_scale in [(None, None), (100.0, 300.0)]:
        got = _grouping(field, make_optimizers(field, lr, 10.0, logit_scale, codebook_scale))
        lg = g if logit_scale is None else lr * logit_scale
        cb = g if codebook_scale is None else lr * codebook_scale
        if storage in ("dense", "hash"):
            attr = {"dense": "Z", "hash": "table"}[storage]
            want = {"sparse": ("SparseAdam", [(g, _grid_names(field, attr))]), "dense": ("Adam", [(lr, decoder)])}
        elif storage == "lowrank":
            want = {"sparse": ("SparseAdam", [(g, _grid_names(field, "A"))]),
                    "dense": ("Adam", [(lr, decoder), (g, _grid_names(field, "B", "mean"))])}
        else:
            Cs, Ds = _grid_names(field, "C"), _grid_names(field, "D")
            dense = [(lr, decoder)] + ([(g, Ds)] if codebook_scale is None else [(cb, Ds)])
            if bits >= 8:  # row-wise second moments: O(m) state
                want = {"logits": ("RowwiseSparseRMSprop", [(lg, Cs)]), "dense": ("Adam", dense)}
            else:
                want = {"sparse": ("SparseAdam", [(lg, Cs)]), "dense": ("Adam", dense)}
        assert got == want, (logit_scale, codebook_scale)
        assert list(got) == list(want)
    field.bake(fp16=False)  # nothing left to train in the grid or the decoders
    assert _grouping(field, make_optimizers(field, lr, 10.0)) == {"dense": ("Adam", [(lr, [])])}


def test_undeclared_trainable_grid_parameters_are_refused():
    field, _ = _small_field("dense")
    field.grid.storages[0].extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(RuntimeError, match="param_groups"):
        make_optimizers(field, 1e-2, 10.0)
