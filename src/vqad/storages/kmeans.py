"""k-means of a trained dense grid into 2^b centroids (the paper's post-hoc kmVQ baseline), stored as a baked codebook."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vqad.errors import InputError
from vqad.storages.base import check_bits, is_int, round_fp16
from vqad.storages.codebook import CodebookStorage
from vqad.storages.dense import DenseStorage, check_dense

KMEANS_ITERS = 50  # Lloyd iterations at most (k-means stops earlier once no assignment changes)
_CHUNK_ELEMENTS = 1 << 22  # distance-matrix elements per chunk in k-means (16 MiB in fp32)


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
    if not is_int(n_clusters) or n_clusters < 1:
        raise InputError(f"k-means needs n_clusters >= 1, got {n_clusters!r}")
    if not is_int(iters) or iters < 0:
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


def codebook_from_dense(dense: DenseStorage, bits: int, seed: int = 0, iters: int = KMEANS_ITERS,
                        fp16: bool = True) -> CodebookStorage:
    """Post-hoc vector quantization (kmVQ): the baked codebook ``Z[i] = D[V[i]]`` of a trained dense grid.

    D holds the 2^b k-means centroids of ``dense.Z (m, k)`` (:func:`kmeans`, k-means++ seeded with
    ``seed``, at most ``iters`` Lloyd rounds), V each vertex's nearest centroid; no fine-tuning. It is
    stored exactly as a trained VQ-AD codebook is: ``D (2^b, k)`` fp16 and ``V (m,)`` at b bits.
    With ``fp16`` the centroids are rounded to fp16 (as stored) and every vertex is then assigned to
    its nearest rounded centroid, so V is optimal for the stored codebook. The result's
    ``reconstruction_error`` is ``||Z − D[V]||² / ||Z||²``.
    """
    check_dense(dense)
    check_bits(bits)
    Z = dense.Z.detach().float()
    res = kmeans(Z, 1 << bits, seed=seed, iters=iters)
    D, V = res.centroids, res.labels
    if fp16:
        D = round_fp16(D)
        V = nearest_centroid(Z, D)
    s = CodebookStorage.from_indices(D, V)
    s.reconstruction_error = _sq_error(Z, D, V) / max(float(Z.double().pow(2).sum()), 1e-300)
    return s
