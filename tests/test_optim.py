"""The O(m)-state logit optimizer (codebooks above 6 bits) against a brute-force reference."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from vqad import fit as T
from vqad import kernels
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


@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "torch-ops"])
def test_rowwise_rmsprop_matches_reference(fused):
    if fused and not kernels.applies(torch.zeros(1)):
        pytest.skip(f"vqad's C kernels are not built here: {kernels.status()}")
    off = contextlib.nullcontext if fused else kernels.disabled
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
        with off():
            opt.step()
    ref = _reference(C0, dense_grads, 0.3, 0.9, 1e-8)
    torch.testing.assert_close(p.detach().double(), ref, rtol=1e-5, atol=1e-5)
    st = opt.state[p]
    assert st["v"].shape == (m,) and st["t"].shape == (m,)  # O(m), not O(m · 2^b)
    untouched = (torch.stack(dense_grads).abs().sum(dim=(0, 2)) == 0)
    assert torch.equal(p.detach()[untouched], C0[untouched])


def test_rowwise_rmsprop_kernel_is_the_torch_update(monkeypatch):
    """The fused pass against the PyTorch ops, many rows and steps: the same update up to the order in
    which a row's squares are added (and powf against torch.pow in the bias correction)."""
    if not kernels.applies(torch.zeros(1)):
        pytest.skip(f"vqad's C kernels are not built here: {kernels.status()}")
    calls = []
    fused = kernels.sparse_rmsprop
    monkeypatch.setattr(kernels, "sparse_rmsprop", lambda *a: calls.append(1) or fused(*a))
    gen = torch.Generator().manual_seed(3)
    m, n = 5000, 64
    C0 = torch.randn(m, n, generator=gen)
    ps = [torch.nn.Parameter(C0.clone()) for _ in range(2)]
    opts = [RowwiseSparseRMSprop([p], lr=0.05, beta=0.99) for p in ps]
    for step in range(6):
        ids = torch.randint(0, m, (3000,), generator=gen)
        w = torch.randn(3000, n, generator=gen)
        for p, opt, ctx in zip(ps, opts, (contextlib.nullcontext(), kernels.disabled())):
            opt.zero_grad()
            (F.embedding(ids, p, sparse=True) * w).sum().backward()
            with ctx:
                opt.step()
    torch.testing.assert_close(ps[0].detach(), ps[1].detach(), rtol=1e-5, atol=1e-6)
    for key in ("v", "t"):
        torch.testing.assert_close(opts[0].state[ps[0]][key], opts[1].state[ps[1]][key], rtol=1e-5, atol=0)
    assert torch.equal(opts[0].state[ps[0]]["t"], opts[1].state[ps[1]]["t"])
    assert len(calls) == 6  # the first optimizer's steps took the kernel, the second's the ops


def test_rowwise_rmsprop_kernel_refuses_bad_rows():
    if not kernels.applies(torch.zeros(1)):
        pytest.skip(f"vqad's C kernels are not built here: {kernels.status()}")
    p, v, t = torch.zeros(4, 3), torch.zeros(4), torch.zeros(4)
    for rows in ([0, 4], [2, 1], [1, 1], [-1, 2]):
        with pytest.raises(IndexError, match="strictly increasing"):
            kernels.sparse_rmsprop(p, v, t, torch.tensor(rows), torch.ones(2, 3), 0.1, 0.9, 1e-8)
        assert not p.any() and not v.any() and not t.any()  # nothing changed
    with pytest.raises(ValueError, match="values for a parameter"):
        kernels.sparse_rmsprop(p, v, t, torch.tensor([0]), torch.ones(1, 2), 0.1, 0.9, 1e-8)


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


@pytest.mark.parametrize("storage, bits", [("dense", 4), ("codebook", 4), ("codebook", 5), ("codebook", 6), ("codebook", 8),
                                           ("hash", 4), ("lowrank", 4)])
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
            want = {"sparse": ("SparseRowAdam", [(g, _grid_names(field, attr))]), "dense": ("Adam", [(lr, decoder)])}
        elif storage == "lowrank":
            want = {"sparse": ("SparseRowAdam", [(g, _grid_names(field, "A"))]),
                    "dense": ("Adam", [(lr, decoder), (g, _grid_names(field, "B", "mean"))])}
        else:
            Cs, Ds = _grid_names(field, "C"), _grid_names(field, "D")
            dense = [(lr, decoder)] + ([(g, Ds)] if codebook_scale is None else [(cb, Ds)])
            if bits >= 6:  # row-wise second moments: O(m) state, fewer passes
                want = {"logits": ("RowwiseSparseRMSprop", [(lg, Cs)]), "dense": ("Adam", dense)}
            else:
                want = {"sparse": ("SparseRowAdam", [(lg, Cs)]), "dense": ("Adam", dense)}
        assert got == want, (logit_scale, codebook_scale)
        assert list(got) == list(want)
    field.bake(fp16=False)  # nothing left to train in the grid or the decoders
    assert _grouping(field, make_optimizers(field, lr, 10.0)) == {"dense": ("Adam", [(lr, [])])}


def test_undeclared_trainable_grid_parameters_are_refused():
    field, _ = _small_field("dense")
    field.grid.storages[0].extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(RuntimeError, match="param_groups"):
        make_optimizers(field, 1e-2, 10.0)


@pytest.mark.parametrize("m", [40, 100_000])  # the sort-free sum, and the coalescing path for huge m
def test_sparse_row_adam_is_sparse_adam(m):
    """SparseRowAdam (no coalescing sort) makes SparseAdam's update: same parameters and moments after
    steps with repeated rows, rows named with zero gradient, and an exchanged state_dict."""
    from vqad.optim import SparseRowAdam

    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(m, 3))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1, o2 = torch.optim.SparseAdam([p1], lr=0.05), SparseRowAdam([p2], lr=0.05)
    for it in range(6):
        ids = torch.randint(0, min(m, 30), (200,))
        w = torch.randn(200, 3)
        w[:20] = 0.0  # some rows named with an all-zero gradient: still moved, as SparseAdam does
        for p, o in ((p1, o1), (p2, o2)):
            o.zero_grad()
            (torch.nn.functional.embedding(ids, p, sparse=True) * w).sum().backward()
            o.step()
    torch.testing.assert_close(p2, p1, rtol=0, atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(o2.state[p2][key], o1.state[p1][key], rtol=0, atol=1e-6)
    assert o2.state[p2]["step"] == o1.state[p1]["step"] == 6
    o1.load_state_dict(o2.state_dict())  # the same state layout: checkpoints of either load in the other


def test_sparse_row_adam_is_bit_exact_on_coalesced_gradients():
    """A gradient that arrives coalesced (the codebook and dense storages' gather_unique_rows) makes
    SparseRowAdam's step bit for bit SparseAdam's (its PyTorch ops; the fused CPU kernel's √ may round
    one ulp apart, test_kernels.py); a closure may call backward, as with SparseAdam."""
    from vqad import kernels
    from vqad.optim import SparseRowAdam
    from vqad.storages.base import gather_unique_rows, unique_rows

    torch.manual_seed(1)
    p1 = torch.nn.Parameter(torch.randn(500, 4))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1, o2 = torch.optim.SparseAdam([p1], lr=0.03), SparseRowAdam([p2], lr=0.03)
    for _ in range(5):
        ids = torch.randint(0, 500, (300,))
        uniq, inv = unique_rows(ids, 500)
        w = torch.randn(300, 4)
        o1.zero_grad()
        (torch.nn.functional.embedding(uniq, p1, sparse=True)[inv] * w).sum().backward()
        o1.step()

        def closure():
            o2.zero_grad()
            loss = (gather_unique_rows(p2, uniq).index_select(0, inv) * w).sum()
            loss.backward()
            return loss

        with kernels.disabled():
            o2.step(closure)
        rows = p2.grad._indices()[0]
        assert bool((rows[1:] > rows[:-1]).all())  # arrives with distinct sorted rows: no summing needed
    assert torch.equal(p1, p2)
    assert torch.equal(o1.state[p1]["exp_avg_sq"], o2.state[p2]["exp_avg_sq"])


def test_resuming_with_other_optimizers_is_a_clear_error(tmp_path, monkeypatch):
    """A checkpoint whose codebook logits trained with another optimizer (SparseAdam's 'sparse' state where
    this fit makes a row-wise 'logits' optimizer) is refused in one line, not reported as damaged."""
    import vqad.storages.codebook as CB

    field, _ = _small_field("codebook", bits=4)
    save_checkpoint(tmp_path / "ck", field, extra={"step": 0}, optimizers=make_optimizers(field, 1e-2, 10.0))
    f2, cfg = load_checkpoint(tmp_path / "ck", torch.device("cpu"))
    monkeypatch.setattr(CB, "ROWWISE_MIN_CODES", 2)  # this "version" trains 4-bit logits row-wise
    opts = make_optimizers(f2, 1e-2, 10.0)
    assert set(opts) == {"logits", "dense"}
    with pytest.raises(InputError, match=r"optimizers \['dense', 'sparse'\].*cannot be resumed"):
        load_optimizer_state(tmp_path / "ck", opts, cfg)
