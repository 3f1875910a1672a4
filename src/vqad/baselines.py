"""The baseline feature storages of the paper's comparisons, behind the same interface as VQ-AD.

Three kinds, registered in :data:`vqad.storage.STORAGES` when this module is imported (``import
vqad`` does it), so ``GridConfig(storage="hash")`` validates, :func:`~vqad.storage.make_storage`
builds them, and checkpoints and ``.vqad`` files hold them like ``dense`` and ``codebook``:

======== ====================================================== ============================= =================
kind     per level                                              stored                        bits
======== ====================================================== ============================= =================
lowrank  ``Z ≈ A·B + μ`` (PCA of the dense features to r < k)   ``A (m, r)``, ``B (r, k)``,   ``16·(m·r + r·k + k)``
                                                                ``μ (k,)``, all fp16
kmeans   ``Z ≈ D[V]``: k-means of the dense features into 2^b   ``D (2^b, k)`` fp16,          ``m·b + 16·k·2^b``
         centroids, no fine-tuning (the paper's kmVQ)           ``V (m,)`` at b bits
hash     ``Z = θ[h(x_i)]``: Instant-NGP random indices, each    ``θ (2^T, k)`` fp16 only      ``16·k·2^T``
         vertex's integer coordinates hashed into a trained
         table of 2^T rows
======== ====================================================== ============================= =================

How each is obtained:

* **Trained from scratch**: ``hash`` (``vqad fit-sdf|fit-nerf --grid hash --table-bits T``, or
  ``GridConfig(storage="hash", table_bits=T)``): the table θ gets sparse gradients (SparseAdam,
  like the dense Z). ``lowrank`` is trainable too (``GridConfig(storage="lowrank", rank=r)``: A
  sparse, B and μ dense), though the paper's low-rank baseline is the post-hoc one below.
* **Post hoc, from a trained dense field** (the paper's low-rank and kmVQ baselines):
  :func:`posthoc` ``(field, "lowrank", rank=r)`` or ``(field, "kmeans", bits=b)`` converts every
  level of a ``dense`` grid and returns a new baked field with the same decoder, untouched (no
  fine-tuning). On the command line, ``vqad compress CKPT --to kmeans --bits 4 --out DIR`` writes
  the result as a (baked) checkpoint, which ``vqad export DIR -o model.vqad`` turns into a file.
  ``kmeans`` storages cannot be created for training (:meth:`KMeansStorage.create` says so).

The hash indices are never stored: ``h(x) = (x_0·π_0 ⊕ x_1·π_1 ⊕ x_2·π_2) mod 2^T`` with
``π = (1, 2654435761, 805459861)`` (Instant-NGP), computed from the level's integer vertex
coordinates ``x ∈ [0, 2^L]^3``, which the octree derives (``octree.vertices[level]``); checkpoints
and the ``.vqad`` reader pass them to :meth:`HashStorage.from_export`. A vertex's row depends only
on its position, not on which other cells are occupied. When ``2^T ≥ m`` nothing changes: the
vertices are still hashed (a few may still share a row, and most rows are then never used), and the
stored table is then larger than the fp16 dense grid it replaces (``16·k·2^T ≥ 16·m·k``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .storage import STORAGES, DenseStorage, FeatureStorage, TensorLayout, check_bits

MIN_TABLE_BITS, MAX_TABLE_BITS = 1, 24
DEFAULT_TABLE_BITS = 14
HASH_PRIMES = (1, 2654435761, 805459861)  # π of Instant-NGP's spatial hash
KMEANS_ITERS = 50  # Lloyd iterations at most (k-means stops earlier once no assignment changes)
POSTHOC_KINDS = ("lowrank", "kmeans")
_CHUNK_ELEMENTS = 1 << 22  # distance-matrix elements per chunk in k-means (16 MiB in fp32)


# ================================================================================================
# parameter checks (also used by GridConfig.validate and by the .vqad header reader)
# ================================================================================================
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def default_rank(k: int) -> int:
    """r used when a low-rank grid is configured without one: ``max(1, k // 2)``."""
    return max(1, k // 2)


def check_rank(rank, k: int) -> None:
    """Raise :class:`InputError` unless ``1 <= rank < k`` (a low-rank grid has fewer dims than k)."""
    if k < 2:
        raise InputError(f"a low-rank grid needs k >= 2 features to project to r < k dimensions, got k={k}")
    if not _is_int(rank) or not 1 <= rank < k:
        raise InputError(
            f"rank (r) must be an integer in 1..{k - 1}, fewer dimensions than the k={k} features; got {rank!r} "
            f"(e.g. --rank {default_rank(k)})"
        )


def check_table_bits(table_bits) -> None:
    """Raise :class:`InputError` unless T is an integer in ``MIN_TABLE_BITS..MAX_TABLE_BITS``."""
    if not _is_int(table_bits) or not MIN_TABLE_BITS <= table_bits <= MAX_TABLE_BITS:
        raise InputError(
            f"table_bits (T, a hash table of 2^T rows per level) must be an integer in "
            f"{MIN_TABLE_BITS}..{MAX_TABLE_BITS}, got {table_bits!r} (e.g. --table-bits {DEFAULT_TABLE_BITS})"
        )


def _check_dense(dense) -> None:
    if not isinstance(dense, DenseStorage):
        raise InputError(
            f"post-hoc baselines compress a trained dense grid, got a {type(dense).__name__}: "
            "fit with --grid dense first"
        )


def _round_fp16(t: torch.Tensor) -> torch.Tensor:
    return t.detach().half().to(t.dtype)


# ================================================================================================
# low rank
# ================================================================================================
def pca(Z: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-r affine approximation ``Z ≈ A·B + μ`` (principal component analysis), in float64.

    ``μ`` is the mean row; B's rows are the r leading right singular vectors of the centred
    ``Z − μ`` (eigenvectors of the k×k scatter matrix, so memory stays O(m·k)), each with its
    largest-magnitude entry positive; ``A = (Z − μ)·Bᵀ``. The squared Frobenius error equals the sum
    of the discarded squared singular values of ``Z − μ`` (Eckart–Young).

    Args:
        Z: ``(m, k)`` features.
        rank: r, ``1 <= r < k``.
    Returns:
        ``A (m, r)``, ``B (r, k)``, ``μ (k,)``, float64, on Z's device.
    """
    check_rank(rank, Z.shape[1])
    Z = Z.detach().double()
    mean = Z.mean(dim=0)
    Zc = Z - mean
    evals, evecs = torch.linalg.eigh(Zc.T @ Zc)  # ascending
    B = evecs[:, torch.argsort(evals, descending=True)[:rank]].T.contiguous()  # (r, k)
    sign = torch.sign(B.gather(1, B.abs().argmax(dim=1, keepdim=True)))
    B = B * torch.where(sign == 0, torch.ones_like(sign), sign)
    return Zc @ B.T, B, mean


class LowRankStorage(FeatureStorage):
    """Low-rank features: ``Z[i] = A[i]·B + μ``, coefficients ``A (m, r)``, basis ``B (r, k)``, mean ``μ (k,)``.

    The paper's low-rank baseline is :meth:`from_dense` (PCA of a trained dense grid); the storage
    is also trainable (A with sparse gradients, B and μ dense). Stored in fp16:
    ``16·(m·r + r·k + k)`` bits.
    """

    kind = "lowrank"
    create_args = ("rank",)

    def __init__(self, m: int, k: int, rank: int | None = None, init_std: float = 0.01):
        super().__init__(m, k)
        rank = default_rank(k) if rank is None else rank
        check_rank(rank, k)
        self.r = int(rank)
        self.reconstruction_error: float | None = None  # ||Z − Ẑ||² / ||Z||², set by from_dense
        if init_std > 0:
            basis, _ = torch.linalg.qr(torch.randn(k, self.r))  # orthonormal rows: A·B keeps A's scale
            self.A = nn.Parameter(torch.randn(m, self.r) * init_std)
            self.B = nn.Parameter(basis.T.contiguous())
        else:  # overwritten at once (from_export, from_dense): consume no random numbers
            self.A = nn.Parameter(torch.zeros(m, self.r))
            self.B = nn.Parameter(torch.zeros(self.r, k))
        self.mean = nn.Parameter(torch.zeros(k))

    @classmethod
    def create(cls, m: int, k: int, rank: int | None = None) -> "LowRankStorage":
        return cls(m, k, rank=rank)

    @classmethod
    def from_dense(cls, dense: DenseStorage, rank: int, fp16: bool = True) -> "LowRankStorage":
        """PCA of a trained dense storage's ``Z (m, k)`` to r dimensions (:func:`pca`), baked.

        With ``fp16``, B and μ are rounded first and A is then refitted by least squares against
        the rounded basis (``A = (Z − μ)·Bᵀ(B·Bᵀ)⁻¹``) before its own rounding, so the stored
        coefficients are the best ones for the stored basis.
        """
        _check_dense(dense)
        check_rank(rank, dense.k)
        Z = dense.Z.detach().double()
        A, B, mean = pca(Z, rank)
        if fp16:
            B, mean = _round_fp16(B), _round_fp16(mean)
            A = torch.linalg.solve(B @ B.T, B @ (Z - mean).T).T  # (m, r)
            A = _round_fp16(A)
        s = cls(dense.m, dense.k, rank=rank, init_std=0.0).to(dense.Z.device)
        s.A.data, s.B.data, s.mean.data = A.float(), B.float(), mean.float()
        s.bake(fp16=fp16)
        err = ((A @ B + mean) - Z).pow(2).sum()
        s.reconstruction_error = float(err / Z.pow(2).sum().clamp_min(1e-300))
        return s

    def params(self) -> dict:
        return {"rank": self.r}

    def forward(self, vertex_ids: torch.Tensor) -> torch.Tensor:
        """``(...,) int64 -> (..., k)``."""
        a = F.embedding(vertex_ids, self.A, sparse=not self.baked)  # (..., r)
        return a @ self.B + self.mean

    def bake(self, fp16: bool = True) -> None:
        for p in (self.A, self.B, self.mean):
            if fp16:
                p.data = _round_fp16(p)
            p.requires_grad_(False)
        self.baked = True

    def stored_bits(self) -> int:
        """fp16 coefficients, basis and mean: ``16·(m·r + r·k + k)``."""
        return 16 * (self.m * self.r + self.r * self.k + self.k)

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"A": self.A.detach().half(), "B": self.B.detach().half(), "mean": self.mean.detach().half()}

    @classmethod
    def from_export(cls, m, k, tensors, rank: int | None = None, **params):
        s = cls(1, k, rank=rank, init_std=0.0)
        s.m = int(m)
        s.A = nn.Parameter(tensors["A"].float().reshape(m, s.r), requires_grad=False)
        s.B.data = tensors["B"].float().reshape(s.r, k).to(s.A.device)
        s.mean.data = tensors["mean"].float().reshape(k).to(s.A.device)
        s.bake(fp16=False)
        return s

    def sparse_parameters(self):
        return [] if self.baked else [self.A]

    @classmethod
    def stored_layout(cls, m, k, rank: int | None = None, **params):
        """Coefficients ``A (m, r)``, basis ``B (r, k)`` and mean ``μ (k,)``, fp16."""
        check_rank(rank, k)
        return [TensorLayout("A", (m, rank), "f16"), TensorLayout("B", (rank, k), "f16"), TensorLayout("mean", (k,), "f16")]


# ================================================================================================
# k-means
# ================================================================================================
@dataclass
class KMeansResult:
    """Output of :func:`kmeans`: ``centroids (K, k)``, ``labels (m,)`` int64 (each row's nearest
    centroid), ``inertia = Σ_i ||x_i − centroids[labels_i]||²``, the Lloyd iterations run, and
    whether the assignments stopped changing."""

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: float
    iterations: int
    converged: bool


def _row_chunk(n_centroids: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(n_centroids, 1))


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor, chunk_elements: int = _CHUNK_ELEMENTS) -> torch.Tensor:
    """Index of each row's nearest centroid (the first on ties): ``(m, k), (K, k) -> (m,)`` int64.

    ``argmin_j ||c_j||² − 2 x·c_j``, in ``x``'s dtype, over chunks of rows so that at most
    ``chunk_elements`` distances exist at once.
    """
    c = centroids.to(x.dtype)
    cc = (c * c).sum(dim=1)  # (K,)
    rows = _row_chunk(c.shape[0], chunk_elements)
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for i in range(0, x.shape[0], rows):
        xi = x[i:i + rows]
        out[i:i + rows] = torch.addmm(cc[None], xi, c.T, alpha=-2.0).argmin(dim=1)
    return out


def _sq_error(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, chunk_elements: int = _CHUNK_ELEMENTS) -> float:
    """``Σ_i ||x_i − centroids[labels_i]||²`` in float64."""
    rows = _row_chunk(x.shape[1], chunk_elements)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], rows):
        d = x[i:i + rows].double() - centroids.double()[labels[i:i + rows]]
        total += (d * d).sum()
    return float(total)


def _cluster_means(x: torch.Tensor, labels: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Mean of each cluster's rows; an empty cluster keeps its previous centroid. ``-> (K, k)``.

    Sums are taken in float64 over rows sorted by cluster (prefix sums differenced at the cluster
    boundaries), which is deterministic on CUDA too, unlike atomic ``index_add``.
    """
    K = previous.shape[0]
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=K)  # (K,)
    # (k, m+1) prefix sums along the last dim: a scan along a leading dim runs one thread per column on CUDA
    xt = x[order].double().T
    csum = torch.cat([xt.new_zeros(x.shape[1], 1), xt.contiguous().cumsum(dim=1)], dim=1)
    ends = counts.cumsum(dim=0)
    sums = (csum[:, ends] - csum[:, ends - counts]).T  # (K, k)
    means = sums / counts.clamp_min(1)[:, None]
    return torch.where((counts > 0)[:, None], means, previous.double()).to(x.dtype)


def kmeans_plus_plus(x: torch.Tensor, n_clusters: int, seed: int = 0) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): ``(m, k) -> (n_clusters, k)`` rows of x.

    The first centroid is a uniformly random row, each next one a row drawn with probability
    proportional to its squared distance to the nearest centroid so far. Random numbers come from a
    CPU generator seeded with ``seed``, so the result is deterministic. When every row already
    coincides with a centroid (``m < n_clusters``, or fewer distinct rows than that), the remaining
    centroids repeat the first one: they never win an assignment (ties go to the lower index).
    """
    m = x.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    first = int(torch.randint(m, (1,), generator=gen))
    C = x.new_empty(n_clusters, x.shape[1])
    C[0] = x[first]
    d2 = (x - x[first]).double().pow(2).sum(dim=1)  # (m,) squared distance to the nearest centroid
    for j in range(1, n_clusters):
        cum = d2.cumsum(dim=0)
        total = float(cum[-1])
        if total <= 0.0:
            C[j:] = C[0]
            break
        u = float(torch.rand((), dtype=torch.float64, generator=gen)) * total
        idx = int(torch.searchsorted(cum, torch.tensor([u], dtype=torch.float64, device=x.device), right=True).clamp_(max=m - 1))
        C[j] = x[idx]
        d2 = torch.minimum(d2, (x - x[idx]).double().pow(2).sum(dim=1))
    return C


def kmeans(x: torch.Tensor, n_clusters: int, seed: int = 0, iters: int = KMEANS_ITERS, init: torch.Tensor | None = None,
           chunk_elements: int = _CHUNK_ELEMENTS) -> KMeansResult:
    """Lloyd's k-means from a k-means++ seeding (or ``init``), in torch (CPU or CUDA).

    Alternates "update every centroid to the mean of its rows (an empty cluster keeps its
    centroid)" and "assign every row to its nearest centroid", at most ``iters`` times, stopping as
    soon as no assignment changes. Memory: O(m·k) plus ``chunk_elements`` distances.

    Args:
        x: ``(m, k)`` float rows (distances are computed in this dtype).
        n_clusters: K (2^b for a codebook); may exceed m.
        seed: seeds :func:`kmeans_plus_plus`; same seed, same input, same device → same result.
        iters: at most this many update/assign rounds.
        init: ``(K, k)`` starting centroids instead of k-means++.
    """
    if not x.is_floating_point() or x.dim() != 2 or x.shape[0] == 0:
        raise InputError(f"k-means needs a non-empty (m, k) float tensor, got {tuple(x.shape)} {x.dtype}")
    if not _is_int(n_clusters) or n_clusters < 1:
        raise InputError(f"k-means needs n_clusters >= 1, got {n_clusters!r}")
    if not _is_int(iters) or iters < 0:
        raise InputError(f"k-means iterations must be a non-negative integer, got {iters!r}")
    C = kmeans_plus_plus(x, n_clusters, seed) if init is None else init.to(device=x.device, dtype=x.dtype).clone()
    if C.shape != (n_clusters, x.shape[1]):
        raise InputError(f"k-means init must have shape {(n_clusters, x.shape[1])}, got {tuple(C.shape)}")
    labels = nearest_centroid(x, C, chunk_elements)
    it, converged = 0, False
    while it < iters:
        C = _cluster_means(x, labels, C)
        it += 1
        new = nearest_centroid(x, C, chunk_elements)
        same = torch.equal(new, labels)
        labels = new
        if same:
            converged = True
            break
    return KMeansResult(C, labels, _sq_error(x, C, labels, chunk_elements), it, converged)


class KMeansStorage(FeatureStorage):
    """Post-hoc vector quantization (kmVQ): ``Z[i] = D[V[i]]`` with D the k-means centroids of a
    trained dense grid's features and V each vertex's nearest centroid, no fine-tuning.

    Stored exactly like the VQ-AD codebook: ``D (2^b, k)`` fp16 and ``V (m,)`` at b bits,
    ``m·b + 16·k·2^b`` bits. Always baked: built by :meth:`from_dense` or :meth:`from_export`.
    """

    kind = "kmeans"

    def __init__(self, D: torch.Tensor, V: torch.Tensor, bits: int):
        check_bits(bits)
        if D.dim() != 2 or D.shape[0] != 1 << bits:
            raise InputError(f"a {bits}-bit k-means codebook has shape (2^{bits}, k), got {tuple(D.shape)}")
        super().__init__(V.numel(), D.shape[1])
        self.b = int(bits)
        self.register_buffer("D", D.detach().float().clone())  # (2^b, k)
        self.register_buffer("V", V.detach().long().reshape(-1).clone())  # (m,)
        self.reconstruction_error: float | None = None  # ||Z − D[V]||² / ||Z||², set by from_dense
        self.baked = True

    @classmethod
    def create(cls, m: int, k: int, bits: int = 4) -> "KMeansStorage":
        raise InputError(
            "the kmeans storage is fitted after training to a trained dense grid, it is not trained itself: "
            f"fit with --grid dense, then run vqad compress CKPT --to kmeans --bits {bits} --out DIR "
            "(vqad.baselines.posthoc in Python)"
        )

    @classmethod
    def from_dense(cls, dense: DenseStorage, bits: int, seed: int = 0, iters: int = KMEANS_ITERS,
                   fp16: bool = True) -> "KMeansStorage":
        """k-means of ``dense.Z (m, k)`` into 2^b centroids (:func:`kmeans`, k-means++ seeded).

        With ``fp16`` the centroids are rounded to fp16 (as stored) and every vertex is then
        assigned to its nearest rounded centroid, so V is optimal for the stored codebook.
        """
        _check_dense(dense)
        check_bits(bits)
        Z = dense.Z.detach().float()
        res = kmeans(Z, 1 << bits, seed=seed, iters=iters)
        D, V = res.centroids, res.labels
        if fp16:
            D = _round_fp16(D)
            V = nearest_centroid(Z, D)
        s = cls(D, V, bits)
        s.reconstruction_error = _sq_error(Z, D, V) / max(float(Z.double().pow(2).sum()), 1e-300)
        return s

    def params(self) -> dict:
        return {"bits": self.b}

    def forward(self, vertex_ids: torch.Tensor) -> torch.Tensor:
        """``(...,) int64 -> (..., k)``: ``D[V[ids]]``."""
        return self.D[self.V[vertex_ids]]

    def indices(self) -> torch.Tensor:
        """V, shape (m,)."""
        return self.V

    def bake(self, fp16: bool = True) -> None:
        if fp16:
            self.D = _round_fp16(self.D)
        self.baked = True

    def stored_bits(self) -> int:
        """m·b index bits + the fp16 codebook 16·k·2^b."""
        return self.m * self.b + 16 * self.k * (1 << self.b)

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"D": self.D.half(), "V": self.V.to(torch.int32)}

    @classmethod
    def from_export(cls, m, k, tensors, bits: int = 4, **params):
        check_bits(bits)
        return cls(tensors["D"].float().reshape(1 << bits, k), tensors["V"].long().reshape(m), bits)

    @classmethod
    def stored_layout(cls, m, k, bits: int = 4, **params):
        """Codebook ``D (2^b, k)`` in fp16, then indices ``V (m,)`` at b bits each (as ``codebook``)."""
        check_bits(bits)
        return [TensorLayout("D", (1 << bits, k), "f16"), TensorLayout("V", (m,), "uint", bits)]


# ================================================================================================
# hash
# ================================================================================================
def spatial_hash(coords: torch.Tensor, table_bits: int) -> torch.Tensor:
    """Instant-NGP's spatial hash of integer coordinates: ``(..., 3) -> (...,)`` int64 in ``[0, 2^T)``.

    ``h(x) = (x_0·π_0 ⊕ x_1·π_1 ⊕ x_2·π_2) mod 2^T``, ``π = (1, 2654435761, 805459861)``. Products are
    exact in int64 for coordinates below 2^31, and their low T ≤ 32 bits equal those of Instant-NGP's
    wrapping uint32 arithmetic, so the rows are Instant-NGP's.

    >>> spatial_hash(torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0]]), 8)
    tensor([  0,   1, 177])
    """
    check_table_bits(table_bits)
    c = coords.long()
    if c.shape[-1] != 3:
        raise InputError(f"spatial_hash needs (..., 3) integer coordinates, got shape {tuple(coords.shape)}")
    h = (c[..., 0] * HASH_PRIMES[0]) ^ (c[..., 1] * HASH_PRIMES[1]) ^ (c[..., 2] * HASH_PRIMES[2])
    return h & ((1 << table_bits) - 1)


class HashStorage(FeatureStorage):
    """Random (hash) indices: ``Z[i] = θ[h(x_i)]``, a trained table ``θ (2^T, k)`` per level.

    ``h`` is :func:`spatial_hash` of vertex i's integer coordinates ``x_i`` at this level, recomputed
    from the octree whenever the storage is built (never stored): only θ is, in fp16,
    ``16·k·2^T`` bits. Vertices that collide share a row. θ's gradient is sparse (the rows a batch
    touches), so it trains with SparseAdam like the dense Z.
    """

    kind = "hash"
    create_args = ("table_bits", "vertices")

    def __init__(self, m: int, k: int, vertices: torch.Tensor | None, table_bits: int = DEFAULT_TABLE_BITS,
                 init_std: float = 0.01):
        super().__init__(m, k)
        check_table_bits(table_bits)
        if vertices is None:
            raise InputError(
                "the hash storage hashes each vertex's integer coordinates: pass vertices=octree.vertices[level] "
                "(OctreeGrid.from_octree, checkpoints and the .vqad reader do)"
            )
        if tuple(vertices.shape) != (m, 3) or vertices.is_floating_point():
            raise InputError(f"hash storage vertices must be ({m}, 3) integer coordinates, got {tuple(vertices.shape)} {vertices.dtype}")
        self.T = int(table_bits)
        rows = 1 << self.T
        table = torch.randn(rows, k) * init_std if init_std > 0 else torch.zeros(rows, k)
        self.table = nn.Parameter(table.to(vertices.device))
        self.register_buffer("h", spatial_hash(vertices, self.T), persistent=False)  # (m,) rows of θ

    @classmethod
    def create(cls, m: int, k: int, table_bits: int = DEFAULT_TABLE_BITS, vertices: torch.Tensor | None = None) -> "HashStorage":
        return cls(m, k, vertices, table_bits)

    def params(self) -> dict:
        return {"table_bits": self.T}

    def forward(self, vertex_ids: torch.Tensor) -> torch.Tensor:
        """``(...,) int64 -> (..., k)``: ``θ[h[ids]]``."""
        return F.embedding(self.h[vertex_ids], self.table, sparse=not self.baked)

    def bake(self, fp16: bool = True) -> None:
        if fp16:
            self.table.data = _round_fp16(self.table)
        self.table.requires_grad_(False)
        self.baked = True

    def stored_bits(self) -> int:
        """The fp16 table only: ``16·k·2^T``."""
        return 16 * self.k * (1 << self.T)

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {"table": self.table.detach().half()}

    @classmethod
    def from_export(cls, m, k, tensors, table_bits: int = DEFAULT_TABLE_BITS, vertices: torch.Tensor | None = None, **params):
        s = cls(m, k, vertices, table_bits, init_std=0.0)
        s.table.data = tensors["table"].float().reshape(1 << s.T, k).to(s.table.device)
        s.bake(fp16=False)
        return s

    def sparse_parameters(self):
        return [] if self.baked else [self.table]

    @classmethod
    def stored_layout(cls, m, k, table_bits: int = DEFAULT_TABLE_BITS, **params):
        """The table ``θ (2^T, k)`` in fp16 (indices are recomputed from the octree)."""
        check_table_bits(table_bits)
        return [TensorLayout("table", (1 << table_bits, k), "f16")]


STORAGES.update({"lowrank": LowRankStorage, "kmeans": KMeansStorage, "hash": HashStorage})


# ================================================================================================
# post-hoc compression of a trained dense field
# ================================================================================================
def posthoc(field, kind: str, *, bits: int | None = None, rank: int | None = None, seed: int = 0,
            iters: int = KMEANS_ITERS, fp16: bool = True):
    """A trained dense field compressed after training: every level's ``Z`` → ``kind``, decoder kept.

    Args:
        field: a field (sdf, nerf, ...) whose grid storage is ``dense``, baked or not; it is not
            modified (the new field shares its octree).
        kind: ``"kmeans"`` (kmVQ: ``bits`` b, default 4; ``seed``; at most ``iters`` Lloyd rounds) or
            ``"lowrank"`` (PCA: ``rank`` r, required, ``1 <= r < k``).
        fp16: round every stored float to fp16 (as a .vqad file stores it) and fit around that.
    Returns:
        a new baked field, whose ``grid.cfg.storage`` is ``kind``; each storage's
        ``reconstruction_error`` holds its relative squared feature error ``||Z − Ẑ||² / ||Z||²``.
    """
    from .fields import field_config, field_from_config
    from .grid import OctreeGrid

    if kind not in POSTHOC_KINDS:
        raise InputError(f"post-hoc compression makes one of {', '.join(POSTHOC_KINDS)}, not {kind!r}")
    grid = field.grid
    if grid.cfg.storage != "dense":
        raise InputError(
            f"post-hoc {kind} compresses a dense grid, but this field's grid is {grid.cfg.storage!r}: "
            "fit with --grid dense first"
        )
    if kind == "kmeans":
        if rank is not None:
            raise InputError("rank applies to post-hoc lowrank, not kmeans: pass bits instead")
        bits = 4 if bits is None else bits
        check_bits(bits)
        storages = [KMeansStorage.from_dense(s, bits, seed=seed, iters=iters, fp16=fp16) for s in grid.storages]
        cfg = replace(grid.cfg, storage=kind, bits=bits)
    else:
        if bits is not None:
            raise InputError("bits applies to post-hoc kmeans, not lowrank: pass rank instead")
        if rank is None:
            raise InputError(f"post-hoc lowrank needs rank=r, fewer dimensions than k={grid.cfg.features} (e.g. rank=8)")
        check_rank(rank, grid.cfg.features)
        storages = [LowRankStorage.from_dense(s, rank, fp16=fp16) for s in grid.storages]
        cfg = replace(grid.cfg, storage=kind, rank=rank)
    new_grid = OctreeGrid(grid.octree, storages, cfg)
    with torch.random.fork_rng(devices=[]):  # the new decoder's random init is overwritten: keep the caller's RNG
        new = field_from_config(field_config(field), new_grid).to(grid.octree.device)
    new.load_decoder_state({k: v.detach().clone() for k, v in field.decoder_state().items()})
    new.bake(fp16=fp16)
    return new


__all__ = [
    "LowRankStorage", "KMeansStorage", "HashStorage", "posthoc", "pca", "kmeans", "kmeans_plus_plus",
    "nearest_centroid", "KMeansResult", "spatial_hash", "check_rank", "check_table_bits", "default_rank",
    "HASH_PRIMES", "MIN_TABLE_BITS", "MAX_TABLE_BITS", "DEFAULT_TABLE_BITS", "POSTHOC_KINDS",
]
