"""VQ-AD: a b-bit index per vertex into a learned codebook, trained with a straight-through estimator."""

from __future__ import annotations


import torch
from torch import nn

from vqad import kernels
from vqad.errors import InputError
from vqad.storages.base import FeatureStorage, ParamGroup, TensorLayout, check_bits, gather_unique_rows, round_fp16, unique_rows

#: logits with 2^b ≥ this many columns (b ≥ 6) train with the O(m)-state RowwiseSparseRMSprop
#: (:mod:`vqad.optim`) instead of SparseAdam, whose state would be two more ``(m, 2^b)`` tensors and whose
#: update makes ~16 passes over the touched rows' ``2^b`` logits. Measured at b = 6 (2026-12-05, paired,
#: docs/benchmarks/rd-rate.md): lego, 5 minutes, one thread: 28.04 dB at 181.0 kB in 1,928 steps against
#: SparseAdam's 28.00 dB at 192.6 kB in 1,590; armadillo, 3,000 steps, two seeds: the same Chamfer-L1 or
#: lower in 12 % less time. At b = 4 the two measured alike (27.65 / 27.61 dB), so 4-bit keeps SparseAdam.
ROWWISE_MIN_CODES = 64
#: logits with 2^b ≥ this many columns train through the fused CPU kernels (:class:`_SoftAssign`) where
#: they apply. One-thread lego steps (2026-12-05, docs/method.md §5): b = 8 ~630 → ~400 ms, b = 6
#: ~220 → ~200 ms; at b = 4 the two measured alike (166 ms), so narrower codebooks keep the PyTorch ops.
FUSED_MIN_CODES = 64


#: initial std of the logits C, and of the codebooks D below :data:`WIDE_CODEBOOK_CODES` codes: the
#: reference's ``feature_std``. Until 2026-12-05 both were 0.1, ten times the dense grid's features: at
#: 4 bits that left a random codeword of that size at every vertex, and a contracted room at --levels 4:8
#: stayed in a fog for all its steps (0.01, with the points octree's level fixed too: out of it by step
#: ~450); on lego (+0.11 / +0.06 dB, 5-minute fits, seeds 0 / 1) and armadillo (Chamfer-L1 −21 % /
#: −18 %) the smaller init was better too (docs/method.md §10, row 6)
INIT_STD = 0.01

#: initial std of the codebook D from 2^b ≥ this many codes on (b ≥ 6): ten times :data:`INIT_STD`. Measured
#: (2026-12-06, docs/benchmarks/rd-rate.md): armadillo, b = 6 with the rate term (λ = 2e-7, 3,000 steps,
#: paired, seeds 0 / 1), Chamfer-L1 at LOD 7: D and C at 0.01 0.000511 / 0.000550; D at 0.1, C at 0.01
#: 0.000482 / 0.000482 at 2–4 % fewer bytes; D at 0.01, C at 0.1 0.000506 / 0.000511 at more bytes. It is
#: D's scale, and b rather than the rate term: plain 6-bit, D 0.1 against 0.01, 0.000430 / 0.000436 against
#: 0.000478 / 0.000539; 4-bit with the rate term, 0.01 wins (0.000512 / 0.000741 against 0.000589 /
#: 0.000805), as it does for plain 4-bit grids (and a 4-bit room's fog at --levels 4:8 came from D at 0.1:
#: docs/benchmarks/scene.md). b = 5 split one seed each way: the switch stays at 64 codes. Plain 8-bit
#: lego: alike (27.82 / 27.91 dB against 27.68 / 27.95).
WIDE_CODEBOOK_CODES = 64
WIDE_CODEBOOK_STD = 0.1


def codebook_init_std(bits: int) -> float:
    """The default initial std of a b-bit codebook D (2^b, k): :data:`WIDE_CODEBOOK_STD` from
    :data:`WIDE_CODEBOOK_CODES` codes on, :data:`INIT_STD` below."""
    return WIDE_CODEBOOK_STD if (1 << int(bits)) >= WIDE_CODEBOOK_CODES else INIT_STD


def _normal(shape: tuple[int, ...], std: float) -> torch.Tensor:
    """N(0, std²) entries; zeros without drawing random numbers when ``std == 0``."""
    return torch.randn(shape) * std if std else torch.zeros(shape)


class _StraightThrough(torch.autograd.Function):
    """The straight-through feature ``D[best]`` whose gradient is that of the soft feature ``s · D``, for
    soft assignments ``s = softmax(logits) (U, 2^b)``: what ``hard + (soft − soft.detach())`` computes,
    without the soft product and two passes in the forward (its value is never used there).

    Backward, for ``g (U, k)``: ``∂s = g Dᵀ`` (autograd carries it through the softmax to the logits) and
    ``∂D = sᵀ g + Σ_u e_{best_u} g_u`` (the soft product's and the hard lookup's gradients).
    """

    @staticmethod
    def forward(ctx, probs: torch.Tensor, D: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(probs, D, best)
        return D.index_select(0, best)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        probs, D, best = ctx.saved_tensors
        g_probs = g @ D.t() if ctx.needs_input_grad[0] else None  # (U, 2^b)
        g_D = None
        if ctx.needs_input_grad[1]:
            if kernels.applies(g, D):  # Σ_u e_{best_u} g_u: one pass, a partial table per thread (vqad.kernels)
                g_D = kernels.interp_backward(torch.ones(best.numel(), 1), best.unsqueeze(1), g, D.shape[0])
            else:  # CPU index_add_ into 2^b rows is a scatter_add, ~4x slower on (U, k) = (147,000, 8)
                g_D = torch.zeros_like(D).index_add_(0, best, g)
            g_D.add_(probs.t() @ g)
        return g_probs, g_D, None


class _SoftAssign(torch.autograd.Function):
    """:class:`_StraightThrough` of the rows ``rows (U,)`` of the logits ``C (m, 2^b)``, fused on the CPU
    (:func:`vqad.kernels.soft_assign_forward` / ``_backward``): the forward finds each row's argmax
    (and, for the rate term, the mean soft assignment ``p̄ (2^b,)``) without making the ``(U, 2^b)``
    rows or their softmax; the backward recomputes ``s_u = softmax(C[rows[u]])`` row by row and gives
    C's sparse gradient (those rows, coalesced, as :func:`~vqad.storages.base.gather_unique_rows`
    does) and D's. The same gradients as the unfused path up to float rounding (the sums run in
    another order, e^x to ~2 ulp).

    Outputs ``D[best] (U, k)`` and ``p̄ (2^b,)`` (empty without ``pbar``); ``∂p̄`` enters as ``∂p̄ / U``
    added to every ``∂s_u``.
    """

    @staticmethod
    def forward(ctx, C: torch.Tensor, D: torch.Tensor, rows: torch.Tensor, pbar: bool):
        best, mean = kernels.soft_assign_forward(C, rows, pbar)
        ctx.save_for_backward(C, D, rows, best)
        ctx.pbar = pbar
        return D.index_select(0, best), (mean if pbar else C.new_zeros(0))

    @staticmethod
    def backward(ctx, g: torch.Tensor, g_pbar: torch.Tensor):
        C, D, rows, best = ctx.saved_tensors
        extra = g_pbar / max(rows.numel(), 1) if ctx.pbar and g_pbar is not None else None
        dC, gD = kernels.soft_assign_backward(C, rows, best, D, g, extra)
        g_C = torch.sparse_coo_tensor(rows[None], dC, C.shape, is_coalesced=True,
                                      check_invariants=False) if ctx.needs_input_grad[0] else None
        return g_C, (gD if ctx.needs_input_grad[1] else None), None, None


class CodebookStorage(FeatureStorage):
    """VQ-AD: each vertex's feature is ``D[V[i]]``, a b-bit index into a learned codebook.

    Training holds logits ``C (m, 2^b)``. The forward pass uses the hard feature
    ``D[argmax C[i]]``; the backward pass the gradient of the soft one ``softmax(C[i]) · D``
    (straight-through). Only the unique vertices a batch touches get a softmax: the cost is
    ``U × 2^b`` per step for U touched vertices, never ``m × 2^b``, and C's gradient is sparse.
    After :meth:`bake`, C is dropped and only ``V = argmax C`` (m,) and D remain.

    The baked form ``D[V]`` is also what post-hoc k-means of a dense grid produces
    (:func:`vqad.storages.kmeans.codebook_from_dense`, through :meth:`from_indices`).
    """

    kind = "codebook"
    create_args = ("bits",)
    discrete = True
    learns_rate = True

    def __init__(self, m: int, k: int, bits: int = 4, codebook_std: float | None = None, logit_std: float = INIT_STD):
        super().__init__(m, k)
        check_bits(bits)
        self.b = int(bits)
        std = codebook_init_std(self.b) if codebook_std is None else codebook_std
        self.D = nn.Parameter(_normal((1 << self.b, k), std))
        self.C = nn.Parameter(_normal((m, 1 << self.b), logit_std))
        self.register_buffer("V", torch.zeros(0, dtype=torch.long), persistent=False)
        # (rows, softmax (U, 2^b) or, fused, its mean p̄ (2^b,)) of training forwards, while tracked
        self._soft: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._rate_contexts = False

    @classmethod
    def check_options(cls, cfg) -> None:
        check_bits(cfg.bits)

    @classmethod
    def create(cls, m: int, k: int, bits: int = 4) -> "CodebookStorage":
        return cls(m, k, bits=bits)

    @classmethod
    def from_indices(cls, D: torch.Tensor, V: torch.Tensor) -> "CodebookStorage":
        """The baked storage ``Z[i] = D[V[i]]`` of a codebook ``D (2^b, k)`` and indices ``V (m,)``.

        b is read from D's rows (a power of two, ``2^1..2^12``); D and V are copied (D as float32)
        onto D's device. Draws no random numbers.
        """
        if D.dim() != 2 or D.shape[0] < 1 or D.shape[1] < 1:
            raise InputError(f"a codebook D has shape (2^b, k), got {tuple(D.shape)}")
        bits = D.shape[0].bit_length() - 1
        if D.shape[0] != 1 << bits:
            raise InputError(f"a codebook D has 2^b rows, got {D.shape[0]}")
        check_bits(bits)
        V = V.detach().reshape(-1)
        if V.numel() == 0 or V.is_floating_point():
            raise InputError(f"indices V must be a non-empty integer tensor, got {tuple(V.shape)} {V.dtype}")
        lo, hi = torch.aminmax(V)  # one pass
        if int(lo) < 0 or int(hi) >= D.shape[0]:
            raise InputError(f"indices V must lie in 0..{D.shape[0] - 1} for a {bits}-bit codebook")
        s = cls(1, D.shape[1], bits=bits, codebook_std=0.0, logit_std=0.0)
        s.m = V.numel()
        s.D = nn.Parameter(D.detach().float().clone(), requires_grad=False)
        s.C = None
        s.V = V.to(device=D.device, dtype=torch.long, copy=True)  # one copy, whatever V's dtype
        s.baked = True
        return s

    def params(self) -> dict:
        return {"bits": self.b}

    def forward(self, vertex_ids: torch.Tensor) -> torch.Tensor:
        """``(...,) int64 -> (..., k)``: ``D[V[ids]]`` (training: the straight-through feature, below)."""
        table, ids = self.rows(vertex_ids)
        return table.index_select(0, ids.reshape(-1)).reshape(*vertex_ids.shape, self.k)

    def rows(self, vertex_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Baked: the codebook ``D (2^b, k)`` and ``V[ids]``. Training: the straight-through features of
        the ``U`` distinct vertices, ``(U, k)``, and each id's row among them."""
        if self.baked:  # index_select: a third of advanced indexing's time on the CPU
            return self.D, self.V.index_select(0, vertex_ids.reshape(-1)).reshape(vertex_ids.shape)
        flat = vertex_ids.reshape(-1)
        uniq, inv = unique_rows(flat, self.m)
        training = torch.is_grad_enabled() and self.training
        if training and self._fuses():  # one pass forward, one backward; no (U, 2^b) tensor but C's gradient
            feat, pbar = _SoftAssign.apply(self.C, self.D, uniq, self._soft is not None)
            if self._soft is not None:
                self._soft.append((uniq, pbar))
            return feat, inv.reshape(vertex_ids.shape)
        logits = gather_unique_rows(self.C, uniq)  # (U, 2^b): only the touched rows; C's gradient sparse
        best = kernels.argmax_rows(logits) if kernels.applies(logits) else logits.argmax(dim=-1)  # (U,)
        if not training:
            return self.D.index_select(0, best), inv.reshape(vertex_ids.shape)  # (U, k)
        probs = torch.softmax(logits, dim=-1)  # (U, 2^b): s_u
        if self._soft is not None:  # the rate term differentiates the soft assignments s_u themselves
            self._soft.append((uniq, probs))
        feat = _StraightThrough.apply(probs, self.D, best)  # D[best], with s · D's gradient
        return feat, inv.reshape(vertex_ids.shape)

    def indices(self) -> torch.Tensor:
        """V = argmax C, shape (m,)."""
        return self.V if self.baked else self.C.detach().argmax(dim=-1)

    def codebook(self) -> torch.Tensor:
        """D, shape (2^b, k), detached."""
        return self.D.detach()

    @torch.no_grad()
    def set_indices(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """``V[rows] = values``. Training form: each row's max logit swaps places with the logit of
        its new index, so ``argmax C[rows] = values`` and the row's logits keep their values."""
        if self.baked:
            self.V[rows] = values
            return
        C = self.C.data
        old = C[rows].argmax(dim=-1)
        c_old = C[rows, old].clone()
        C[rows, old] = C[rows, values]
        C[rows, values] = c_old

    def _fuses(self) -> bool:
        """Whether a training lookup takes :class:`_SoftAssign`: logits of ``2^b >= FUSED_MIN_CODES``
        columns, float32 and contiguous, where the CPU kernels apply, and no rate term by context (it
        needs every row's soft assignment)."""
        C = self.C
        return (C.shape[1] >= FUSED_MIN_CODES and not self._rate_contexts and C.is_contiguous()
                and kernels.applies(C, self.D))

    def track_rate(self, on: bool, contexts: bool = False) -> None:
        """Start (clearing the record) or stop recording the soft assignments :meth:`rate_bits` needs;
        ``contexts``: it will be asked for the rate by context (every row's soft assignment kept)."""
        self._soft = [] if on else None
        self._rate_contexts = bool(on and contexts)

    def rate_bits(self, contexts: torch.Tensor | None = None, n_contexts: int = 1) -> torch.Tensor | None:
        """The entropy of the soft assignments, in bits per index, of the vertices training touched since
        :meth:`track_rate` (a differentiable estimate of what the coder spends on V):

        ``R = −(1/U) Σ_u Σ_c s_uc · log2 p_c(j_u)``,  ``s_u = softmax(C[u]) (U, 2^b)``,
        ``p(j) = Σ_{u: j_u = j} s_u / |{u: j_u = j}|``

        the cross-entropy of each vertex's soft assignment under the coder's model, itself the marginal of
        the same soft assignments (so the gradient also moves the model). Without ``contexts`` every vertex
        has context 0 and ``R = H(p̄)`` (order-0); with ``contexts (m,)`` long in ``[0, n_contexts)`` (each
        vertex's context, e.g. the coarser level's index at ``floor(v/2)``) it is the conditional entropy
        the CONTEXT codec can reach; that needs every row's soft assignment, so a record started with
        ``track_rate(True, contexts=True)`` (else a RuntimeError). Clears the record; None if no vertex was
        touched.
        """
        if contexts is not None and self._soft is not None and not self._rate_contexts:
            raise RuntimeError("rate_bits by context needs every row's soft assignment: start the record with "
                               "track_rate(True, contexts=True)")
        soft = [(rows, p) for rows, p in (self._soft or []) if rows.numel()]  # an empty lookup adds nothing
        if self._soft is not None:
            self._soft = []
        if not soft:
            return None
        if contexts is None:  # one context: R = −(1/U) Σ_u s_u · log2 p̄ = H(p̄), p̄ the mean over every lookup's rows
            means = [(p.mean(dim=0) if p.dim() == 2 else p, rows.numel()) for rows, p in soft]
            total = sum(n for _, n in means)
            pbar = means[0][0] if len(means) == 1 else sum(m * (n / total) for m, n in means)  # (2^b,)
            return -(pbar * torch.log2(pbar.clamp_min(1e-30))).sum()
        probs = soft[0][1] if len(soft) == 1 else torch.cat([p for _, p in soft])  # (U, 2^b)
        rows = soft[0][0] if len(soft) == 1 else torch.cat([r for r, _ in soft])  # (U,)
        j = contexts.index_select(0, rows)
        mass = probs.new_zeros(n_contexts, probs.shape[1]).index_add(0, j, probs)  # (K, 2^b)
        count = torch.bincount(j, minlength=n_contexts).clamp_min(1).to(probs.dtype)  # (K,)
        logp = torch.log2((mass / count[:, None]).clamp_min(1e-30))  # (K, 2^b)
        return -(probs * logp.index_select(0, j)).sum(dim=1).mean()

    def bake(self, fp16: bool = True) -> None:
        self._soft = None
        if not self.baked:  # a baked storage already owns its V (from_indices copies it)
            self.V = self.indices().clone()
        if fp16:
            self.D.data = round_fp16(self.D)
        self.D.requires_grad_(False)
        self.C = None  # the m × 2^b logits are training-only
        self.baked = True

    def param_groups(self) -> list[ParamGroup]:
        """C (sparse gradients; row-wise RMSprop from b = 6 on) at the logit rate, D at the codebook rate."""
        if self.baked:
            return []
        wide = self.C.shape[1] >= ROWWISE_MIN_CODES
        return [ParamGroup((self.C,), "rowwise" if wide else "sparse", "logit"),
                ParamGroup((self.D,), "dense", "codebook")]

    def stored_bits(self) -> int:
        """m·b index bits + the fp16 codebook 16·k·2^b."""
        return self.m * self.b + 16 * self.k * (1 << self.b)

    def size_label(self) -> str:
        return f"compressed grid (m·b + 16·k·2^b bits, b={self.b}, k={self.k})"

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"D": self.D.detach().half(), "V": self.indices().to(torch.int32)}

    @classmethod
    def from_export(cls, m, k, tensors, bits: int = 4, **params):
        check_bits(bits)
        return cls.from_indices(tensors["D"].float().reshape(1 << bits, k), tensors["V"].reshape(m))

    @classmethod
    def stored_layout(cls, m, k, bits: int = 4, **params):
        """Codebook ``D (2^b, k)`` in fp16, then indices ``V (m,)`` at b bits each."""
        check_bits(bits)
        return [TensorLayout("D", (1 << bits, k), "f16"), TensorLayout("V", (m,), "uint", bits)]
