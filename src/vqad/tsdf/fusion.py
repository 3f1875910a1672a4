"""Sparse projective TSDF fusion of an :class:`~vqad.tsdf.rgbd.RGBDSequence` (PyTorch, CPU or CUDA).

The result, :class:`FusedTSDF`, is the uncompressed baseline that the compressed TSDF field is
measured against: the observed voxels with their truncated signed distance, fusion weight and
colour, its measured byte count (:meth:`FusedTSDF.nbytes`), its own mesh and trilinear queries.

Method (KinectFusion's projective update, on a sparse block grid as in voxel hashing):

1. **Allocate.** For each valid depth pixel ``(u, v)`` with depth ``d``, points along its ray between
   ``d − trunc`` and ``d + trunc`` (steps of at most one voxel) name the blocks of ``block³`` voxels
   the truncation band touches. Blocks are kept in a hash: packed int64 block keys, sorted, looked up
   with :func:`torch.searchsorted`; the voxel data lives in rows appended in allocation order. No
   dense volume over the scene bounds is ever built.
2. **Integrate.** Every allocated block whose bounding sphere is in the frame's view frustum (and not
   beyond the farthest depth + trunc) has its voxel centres ``x = (ijk + 0.5) · voxel`` projected to
   the nearest pixel. With ``z`` the voxel's depth along the optical axis,
   ``sdf = depth(pixel) − z`` (z-difference, "along the axis"); voxels with ``sdf < −trunc`` (hidden
   behind the surface) or without depth are skipped; the others get the running average
   ``tsdf ← (w·tsdf + min(sdf, trunc)) / (w + 1)``, ``w ← w + 1`` (a constant weight of 1 per
   observation), colour averaged the same way when the sequence has colour. Free space in front of
   the surface is carved (``+trunc``) in allocated blocks, as Open3D's ``UniformTSDFVolume`` does.

Defaults (defined once, below): ``voxel`` = the median valid depth / :data:`VOXELS_PER_MEDIAN_DEPTH`
(256: at 1.5 m this is 5.9 mm, about one pixel's footprint for a 320×240 sensor with fx ≈ 260, the
finest voxel the depth can support), rounded to two significant digits; ``trunc`` =
:data:`TRUNC_VOXELS` (4) voxels: wide enough for the ±3σ noise of a structured-light / ToF sensor at
that voxel size (σ(z) = 1.2 mm + 1.9 mm·(z − 0.4 m)²/m², so 3σ ≈ 10 mm at 1.5 m) and for marching
cubes to see both signs, narrow enough not to merge the two sides of thin structures (≥ 2·trunc
apart).

Open3D 0.20 (open3d-cpu wheel on this machine), tested 2026-12-03 with a wall at 1 m and a sphere,
depth given as float metres (``depth_scale=1``) and as uint16 millimetres (``depth_scale=1000``),
identity world-to-camera extrinsic:

- ``pipelines.integration.UniformTSDFVolume``: correct (the wall's points at z = 1; on a sphere
  seen from 3 views it agrees with :func:`fuse` to 1e-4 m, the test below);
  it stores ``tsdf / sdf_trunc`` in [-1, 1] with the ray distance (z-difference × the pixel's
  ``sqrt(1 + x'² + y'²)``), positive in front — the test compares against it.
- ``pipelines.integration.ScalableTSDFVolume``: really empty — ``extract_point_cloud``,
  ``extract_triangle_mesh`` and even ``extract_voxel_point_cloud`` return nothing for both scenes,
  with float and uint16 depth, with and without colour, after 1 and 3 integrations, volume units of
  8 and 16, ``depth_sampling_stride=1``, and with the reconstruction tutorial's own settings
  (PrimeSense intrinsics, voxel 4/512, ``sdf_trunc`` 0.04, uint16 mm depth), while
  ``PointCloud.create_from_depth_image`` of the same depth is right. Not a usage error we could
  find: a defect of this build.
- ``t.geometry.VoxelBlockGrid``: integration is right (tsdf in [-1, 1], weights set), but extraction
  is a usage trap: ``extract_point_cloud`` / ``extract_triangle_mesh`` default to
  ``weight_threshold=3.0``, so one or two frames give nothing, and with ``attr_dtypes`` float32
  weights and no colour attribute they crash (``SetPointColors``: "Tensor has shape {0}"). With the
  documented dtypes (tsdf float32, weight uint16, colour uint16, depth uint16 with
  ``depth_scale=1000``) and ``weight_threshold`` below the frame count both extractions work; with
  float weights and float colour the mesh works but the point cloud is still empty.

Speed (benchmarks/bench_fusion.py: a ray-cast 4 × 3 × 4 m room, 100 noisy frames of 320 × 240,
default voxel 6.1 mm, 25 k blocks, 9.4 M observed voxels; this 2-core machine shared with other
jobs, load average 2–4, so these are upper bounds): 17–26 s with 1 thread (170–260 ms a frame;
a single frame fused alone 220–460 ms, as it allocates all its blocks), 59 s with 2 threads (the
second thread only competes with the other jobs). The cost per frame grows with the allocated
blocks in view.

We fuse in PyTorch anyway: Open3D is not a dependency of vqad (the wheel is large and absent on
many platforms), the PyTorch path runs on the same CUDA device as the fit, and we need the voxels in
our own layout (indices, values, weights) rather than a mesh.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vqad.device import MAX_MEMORY_ENV, default_max_memory, resolve_device
from vqad.errors import InputError
from vqad.sdf.mesh import Mesh
from vqad.tsdf import UNITS, as_colour8, check_units, is_whole
from vqad.tsdf.rgbd import RGBDSequence

#: default voxel = median valid depth / this (see the module docstring)
VOXELS_PER_MEDIAN_DEPTH = 256
#: default truncation distance, in voxels
TRUNC_VOXELS = 4
#: default block edge, in voxels (block³ voxels per allocated block)
DEFAULT_BLOCK = 8
#: largest block edge: its occupancy bitmask is block³ bits
MAX_BLOCK = 16
#: frames sampled by :func:`default_voxel` for the median depth
VOXEL_SAMPLE_FRAMES = 8
#: voxel indices must lie in [-2^20, 2^20): three of them pack into one int64 key
_KEY_BITS = 21
_KEY_OFFSET = 1 << (_KEY_BITS - 1)
#: marching cubes runs on dense tiles of this many voxels per axis (+1 overlap): ≤ 65³ float32 = 1.1 MB
MESH_TILE = 64
#: voxels processed at once during integration (bounds the temporary memory to ~100 MB)
_CHUNK_VOXELS = 1 << 21

_F16_MAX = float(np.finfo(np.float16).max)
_MAGIC = b"VQTS"
_VERSION = 1
_FLAG_COLOR = 1
#: magic, version, flags, block, units length; voxel, trunc (float64); block count (uint32): 28 bytes
_HEAD = struct.Struct("<4sBBBBddI")


def _pack(ijk: np.ndarray | torch.Tensor):
    """int64 keys ``(N,)`` of integer coordinates ``(N, 3)`` in [-2^20, 2^20); x-major, so sorting
    keys sorts coordinates lexicographically."""
    if isinstance(ijk, torch.Tensor):
        q = ijk.long() + _KEY_OFFSET
    else:
        q = ijk.astype(np.int64) + _KEY_OFFSET
    return (q[:, 0] << (2 * _KEY_BITS)) | (q[:, 1] << _KEY_BITS) | q[:, 2]


def _unpack(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack`: ``(N, 3)`` int64."""
    m = (1 << _KEY_BITS) - 1
    return np.stack([(keys >> (2 * _KEY_BITS)) & m, (keys >> _KEY_BITS) & m, keys & m], -1) - _KEY_OFFSET


def _local_offsets(block: int) -> np.ndarray:
    """``(block³, 3)`` int64 voxel offsets inside a block, x-major (the bit order of the occupancy mask)."""
    r = np.arange(block)
    return np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)


def _check_range(ijk: np.ndarray, voxel: float) -> None:
    if ijk.size and (ijk.min() < -_KEY_OFFSET + 1 or ijk.max() >= _KEY_OFFSET - 1):
        raise InputError(f"the scene spans more than 2^20 voxels of {voxel:g} from the origin: pass a larger voxel (--voxel)")


@dataclass(eq=False)
class FusedTSDF:
    """Observed voxels of a fused TSDF (``M`` of them, weight > 0).

    ``ijk (M, 3) int32`` voxel indices, centre ``(ijk + 0.5) · voxel``; ``tsdf (M,) float32`` truncated
    signed distance in ``units``, in [-trunc, trunc], positive in front of the surface; ``weight (M,)
    float32 > 0``; ``color (M, 3) uint8`` or ``None``; ``block``: the edge of the blocks of the stored
    structure. :func:`fuse` and :meth:`from_bytes` give the voxels in canonical order (by block, then
    x-major inside the block); the arrays are treated as immutable (:meth:`sample` caches a lookup).
    """

    voxel: float
    trunc: float
    units: str
    ijk: np.ndarray
    tsdf: np.ndarray
    weight: np.ndarray
    color: np.ndarray | None = None
    block: int = DEFAULT_BLOCK
    _keys: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_geometry(self.voxel, self.trunc, self.block)
        check_units(self.units, "FusedTSDF")
        self.voxel, self.trunc, self.block = float(self.voxel), float(self.trunc), int(self.block)
        ijk = np.asarray(self.ijk)
        if ijk.size == 0 or ijk.shape == (3,):  # none, or one voxel given flat
            ijk = ijk.reshape(-1, 3).astype(np.int64)
        if ijk.ndim != 2 or ijk.shape[1] != 3:
            raise InputError(f"FusedTSDF ijk must have the shape (M, 3), got {list(ijk.shape)}")
        if not is_whole(ijk):
            flat = ijk.reshape(-1)
            such = f" values such as {flat[np.argmax(flat != np.round(flat))]}" if ijk.dtype.kind == "f" else ""
            raise InputError(f"FusedTSDF ijk must be whole voxel indices, got {ijk.dtype}{such}")
        _check_range(ijk, self.voxel)  # before the int32 cast, which would wrap 2^40 to 0
        self.ijk = np.ascontiguousarray(ijk, dtype=np.int32)
        m = self.ijk.shape[0]
        self.tsdf = np.ascontiguousarray(self.tsdf, dtype=np.float32).reshape(-1)
        self.weight = np.ascontiguousarray(self.weight, dtype=np.float32).reshape(-1)
        if self.tsdf.shape != (m,) or self.weight.shape != (m,):
            raise InputError(f"FusedTSDF needs tsdf and weight of shape ({m},) for {m} voxels, got {self.tsdf.shape} and {self.weight.shape}")
        # fp16 storage may round ±trunc up by half an fp16 step (2^-11 relative)
        if not np.isfinite(self.tsdf).all() or np.abs(self.tsdf).max(initial=0) > self.trunc * (1 + 2 ** -10):
            raise InputError(f"FusedTSDF values must be finite and within ±trunc = {self.trunc:g}")
        if not np.isfinite(self.weight).all() or (self.weight <= 0).any():
            raise InputError("FusedTSDF weights must be finite and positive (only observed voxels are kept)")
        if self.color is not None:
            self.color = as_colour8(self.color, (m, 3), "FusedTSDF")

    def __len__(self) -> int:
        return int(self.ijk.shape[0])

    def centers(self) -> np.ndarray:
        """``(M, 3) float64`` world coordinates of the voxel centres."""
        return (self.ijk.astype(np.float64) + 0.5) * self.voxel

    # -- the stored form -------------------------------------------------------------------------

    def to_bytes(self, color: bool = False) -> bytes:
        """The uncompressed baseline as stored (colour only when ``color`` and the TSDF has one).

        Layout, little-endian: header ``magic "VQTS", version u8, flags u8 (1 = colour), block u8,
        len(units) u8, voxel f64, trunc f64, blocks u32`` (28 bytes), ``units`` (UTF-8); per allocated
        block (sorted by coordinates) its block coordinates ``3 × int32``; per block an occupancy
        bitmask of its ``block³`` voxels (x-major, little bit order, ``ceil(block³ / 8)`` bytes); per
        observed voxel (block order, then bit order) ``tsdf`` fp16, then ``weight`` fp16 (capped at
        fp16's 65504), then ``colour`` 3 × u8; a CRC-32 of everything before it (4 bytes). So for
        ``B`` blocks and ``M`` voxels: ``32 + len(units) + B·(12 + ceil(block³/8)) + M·(4 + 3·colour)`` bytes.
        """
        with_color = bool(color) and self.color is not None
        if self.trunc > _F16_MAX:
            raise InputError(f"trunc {self.trunc:g} {self.units} is beyond fp16's range: store the TSDF in larger units (e.g. m, not mm)")
        b = self.block
        ijk = self.ijk.astype(np.int64)
        bc = np.floor_divide(ijk, b)
        loc = ijk - bc * b
        lidx = (loc[:, 0] * b + loc[:, 1]) * b + loc[:, 2]
        bkeys = _pack(bc)
        order = np.lexsort((lidx, bkeys))
        bkeys, lidx = bkeys[order], lidx[order]
        if len(order) > 1 and np.any((bkeys[1:] == bkeys[:-1]) & (lidx[1:] == lidx[:-1])):
            raise InputError("FusedTSDF has the same voxel twice in ijk: each observed voxel must appear once")
        ukeys, start = np.unique(bkeys, return_index=True)
        nb = len(ukeys)
        row = np.repeat(np.arange(nb), np.diff(np.append(start, len(bkeys))))
        bits = np.zeros((nb, b ** 3), dtype=bool)
        bits[row, lidx] = True
        units = self.units.encode("utf-8")
        if len(units) > 255:
            raise InputError(f"units name too long to store ({len(units)} bytes > 255): {self.units[:40]!r}...")
        parts = [
            _HEAD.pack(_MAGIC, _VERSION, _FLAG_COLOR if with_color else 0, b, len(units), self.voxel, self.trunc, nb),
            units,
            _unpack(ukeys).astype("<i4").tobytes(),
            np.packbits(bits, axis=1, bitorder="little").tobytes(),
            self.tsdf[order].astype("<f2").tobytes(),
            np.minimum(self.weight[order], _F16_MAX).astype("<f2").tobytes(),
        ]
        if with_color:
            parts.append(self.color[order].tobytes())
        body = b"".join(parts)
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> "FusedTSDF":
        """Inverse of :meth:`to_bytes`; every value read is checked (raises :class:`InputError`)."""
        data = bytes(data)
        if len(data) < _HEAD.size + 4:
            raise InputError(f"not a fused TSDF: {len(data)} bytes is shorter than its header")
        magic, version, flags, b, nu, voxel, trunc, nb = _HEAD.unpack_from(data)
        if magic != _MAGIC:
            raise InputError("not a fused TSDF (bad magic): expected a file written by FusedTSDF.save")
        if version != _VERSION:
            raise InputError(f"fused TSDF version {version} is not supported (this vqad reads version {_VERSION}): upgrade vqad")
        (crc,) = struct.unpack_from("<I", data, len(data) - 4)
        if zlib.crc32(data[:-4]) != crc:
            raise InputError("fused TSDF is damaged (CRC mismatch): fuse the sequence again")
        if flags & ~_FLAG_COLOR:
            raise InputError(f"fused TSDF has unknown flags {flags:#x}: written by a newer vqad?")
        _check_geometry(voxel, trunc, b)
        pos = _HEAD.size
        try:
            units = data[pos:pos + nu].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError("fused TSDF units are not UTF-8: the file is damaged") from exc
        if len(units) == 0 or len(data) < pos + nu:
            raise InputError("fused TSDF has no units name: the file is damaged")
        if units not in UNITS:  # (the CRC held: written so, not damaged)
            raise InputError(f"fused TSDF is in units {units!r:.40}, which vqad does not know ({', '.join(UNITS)}): "
                             "fuse the sequence again")
        pos += nu
        mask_bytes = -(-b ** 3 // 8)
        end = len(data) - 4
        if pos + nb * (12 + mask_bytes) > end:
            raise InputError(f"fused TSDF claims {nb} blocks but is only {len(data)} bytes long: the file is truncated or damaged")
        bcoords = np.frombuffer(data, "<i4", 3 * nb, pos).reshape(nb, 3).astype(np.int64)
        pos += 12 * nb
        bits = np.unpackbits(np.frombuffer(data, np.uint8, nb * mask_bytes, pos).reshape(nb, mask_bytes), axis=1, bitorder="little")
        pos += nb * mask_bytes
        if bits[:, b ** 3:].any():
            raise InputError("fused TSDF has occupancy bits beyond its blocks: the file is damaged")
        bits = bits[:, : b ** 3].astype(bool)
        if nb and not bits.any(1).all():
            raise InputError("fused TSDF stores a block without observed voxels: the file is damaged")
        _check_range(bcoords * b, voxel)
        _check_range(bcoords * b + b - 1, voxel)
        keys = _pack(bcoords)
        if nb > 1 and not np.all(keys[1:] > keys[:-1]):
            raise InputError("fused TSDF blocks are not in strictly increasing order: the file is damaged")
        m = int(bits.sum())
        per = 4 + (3 if flags & _FLAG_COLOR else 0)
        if end - pos != m * per:
            raise InputError(f"fused TSDF holds {end - pos} bytes of voxel data where its {m} observed voxels need {m * per}: the file is damaged")
        tsdf = np.frombuffer(data, "<f2", m, pos).astype(np.float32)
        weight = np.frombuffer(data, "<f2", m, pos + 2 * m).astype(np.float32)
        color = np.frombuffer(data, np.uint8, 3 * m, pos + 4 * m).reshape(m, 3).copy() if flags & _FLAG_COLOR else None
        row, lidx = np.nonzero(bits)
        ijk = bcoords[row] * b + _local_offsets(b)[lidx]
        try:  # the constructor checks the values and weights
            return cls(voxel, trunc, units, ijk.astype(np.int32), tsdf, weight, color, b)
        except InputError as exc:
            raise InputError(f"{exc}: the file is damaged") from exc

    def nbytes(self, color: bool = False) -> int:
        """Measured stored size: ``len(self.to_bytes(color))``."""
        return len(self.to_bytes(color))

    def save(self, path: str | Path) -> int:
        """Write :meth:`to_bytes` (with colour when present) to ``path`` atomically; returns the bytes."""
        from vqad.atomicio import write_atomic

        return write_atomic(path, self.to_bytes(color=True), what="fused TSDF")

    @classmethod
    def load(cls, path: str | Path) -> "FusedTSDF":
        """Read a file written by :meth:`save`, checking every value (raises :class:`InputError`)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"fused TSDF file not found: {path}")
        try:
            return cls.from_bytes(path.read_bytes())
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from exc

    # -- queries ---------------------------------------------------------------------------------

    def _lookup(self, ijk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row of each voxel ``ijk (N, 3)`` in this TSDF and whether it is observed: ``(N,), (N,) bool``."""
        if self._keys is None:
            keys = _pack(self.ijk)
            order = np.argsort(keys, kind="stable")
            self._keys = (keys[order], order)
        skeys, order = self._keys
        q = _pack(np.clip(ijk, -_KEY_OFFSET, _KEY_OFFSET - 1))
        pos = np.minimum(np.searchsorted(skeys, q), max(len(skeys) - 1, 0))
        if len(skeys) == 0:
            return np.zeros(len(q), np.int64), np.zeros(len(q), bool)
        inside = np.all((ijk >= -_KEY_OFFSET) & (ijk < _KEY_OFFSET), axis=1)
        return order[pos], (skeys[pos] == q) & inside

    def sample(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Trilinear interpolation of the TSDF at world ``points (N, 3)``: ``values (N,) float32`` and
        ``valid (N,) bool``, valid where all 8 surrounding voxel centres are observed (value 0 elsewhere)."""
        try:
            p = np.asarray(points, dtype=np.float64)
        except (TypeError, ValueError):
            p = np.zeros(1)  # refused below
        if p.ndim not in (1, 2) or p.shape[-1] != 3:
            raise InputError(f"FusedTSDF.sample takes world points of shape (N, 3) (or one (3,)), got {np.shape(points)}")
        p = p.reshape(-1, 3)
        g = p / self.voxel - 0.5
        finite = np.isfinite(g).all(1)
        g = np.clip(np.where(finite[:, None], g, 0.0), -2.0 * _KEY_OFFSET, 2.0 * _KEY_OFFSET)  # far points: invalid
        i0 = np.floor(g).astype(np.int64)
        f = g - i0
        values = np.zeros(len(p), np.float64)
        valid = finite.copy()
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    row, ok = self._lookup(i0 + (dx, dy, dz))
                    w = (f[:, 0] if dx else 1 - f[:, 0]) * (f[:, 1] if dy else 1 - f[:, 1]) * (f[:, 2] if dz else 1 - f[:, 2])
                    values += w * np.where(ok, self.tsdf[row] if len(self) else 0.0, 0.0)
                    valid &= ok
        return np.where(valid, values, 0.0).astype(np.float32), valid

    def mesh(self, level: float = 0.0) -> Mesh:
        """The ``level`` set as a triangle mesh in world units (empty when there is none).

        Marching cubes (:func:`vqad.tsdf.extract.masked_marching_cubes`) keeps only cubes whose 8 corner
        voxels are all observed, so no face crosses unobserved space. It works tile by tile over the
        tiles of ``MESH_TILE³`` cubes that hold observed voxels, one dense ``(MESH_TILE + 1)³`` tile
        at a time (values, mask: 1.4 MB), so memory is bounded by the voxel count (about 80 bytes per
        observed voxel for the tile index) plus the mesh, never by the scene's bounding box.
        Vertices shared by neighbouring tiles (or closer than 1/1024 voxel) are merged. Faces wind so
        that normals point to positive TSDF (towards the cameras). Measured: a 4 × 3 × 4 m room,
        9.4 M voxels → 1.7 M faces in 12 s on one core (benchmarks/bench_fusion.py).
        """
        from vqad.tsdf.extract import masked_marching_cubes

        if not math.isfinite(level) or abs(level) >= self.trunc:
            raise InputError(f"mesh level must be finite and inside (-trunc, trunc) = ±{self.trunc:g}, got {level}")
        S = MESH_TILE
        verts_all, faces_all, nv = [], [], 0
        for base, loc, rows in _tiles(self.ijk, S):
            ok = np.zeros((S + 1,) * 3, dtype=bool)
            ok[tuple(loc.T)] = True
            seen = self.tsdf[rows]
            if not ((seen > level).any() and (seen < level).any()):
                continue
            vals = np.full((S + 1,) * 3, self.trunc, dtype=np.float32)
            vals[tuple(loc.T)] = seen
            tile = masked_marching_cubes(vals, ok, 1.0, base, level, allow_degenerate=False)
            if not len(tile.faces):  # every crossing is in a cube with an unobserved corner
                continue
            verts_all.append(tile.vertices)
            faces_all.append(tile.faces + nv)
            nv += len(tile.vertices)
        if not faces_all:
            return Mesh(np.zeros((0, 3), np.float64), np.zeros((0, 3), np.int64))
        verts = np.concatenate(verts_all)
        # merge the copies of vertices on tile faces (same edge, same interpolation → same point)
        first, inverse = _merge_points(verts)
        faces = inverse[np.concatenate(faces_all)]
        keep = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
        return Mesh((verts[first] + 0.5) * self.voxel, faces[keep])


def _tiles(ijk: np.ndarray, S: int):
    """Yield ``(base (3,), loc (n, 3), rows (n,))`` per tile of ``S³`` voxel cubes that owns a voxel:
    ``base`` its first voxel index, ``loc`` in ``[0, S]³`` the tile-local indices of the voxels it
    needs (its own and, at local ``S``, the first layer of the next tiles), ``rows`` their rows in ``ijk``."""
    ijk = ijk.astype(np.int64)
    tile = np.floor_divide(ijk, S)
    loc = ijk - tile * S
    rows = np.arange(len(ijk))
    T, L, R = [tile], [loc], [rows]
    for shift in [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)]:
        e = np.array(shift)
        at = np.all((loc == 0) | (e == 0), axis=1)  # on the lower face(s) of its tile along every shifted axis
        T.append(tile[at] - e)
        L.append(loc[at] + S * e)
        R.append(rows[at])
    T, L, R = np.concatenate(T), np.concatenate(L), np.concatenate(R)
    keys = _pack(T)
    owned = np.isin(keys, keys[: len(ijk)])
    keys, T, L, R = keys[owned], T[owned], L[owned], R[owned]
    order = np.argsort(keys, kind="stable")
    keys, T, L, R = keys[order], T[order], L[order], R[order]
    _, start = np.unique(keys, return_index=True)
    stop = np.append(start[1:], len(keys))
    for a, b in zip(start, stop):
        yield T[a] * S, L[a:b], R[a:b]


def _merge_points(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group points ``(N, 3)`` equal to 1/1024: ``first (U,)`` one index per group, ``inverse (N,)``."""
    q = np.round((p - p.min(0)) * 1024).astype(np.int64)
    bits = int(q.max()).bit_length()
    if 3 * bits <= 63:
        key = (q[:, 0] << (2 * bits)) | (q[:, 1] << bits) | q[:, 2]
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        return first, inverse.reshape(-1)
    order = np.lexsort((q[:, 2], q[:, 1], q[:, 0]))
    qs = q[order]
    new = np.ones(len(q), dtype=bool)
    new[1:] = np.any(qs[1:] != qs[:-1], axis=1)
    group = np.cumsum(new) - 1
    inverse = np.empty(len(q), dtype=np.int64)
    inverse[order] = group
    return order[new], inverse


#: the widest truncation :func:`fuse` takes, in voxels (KinectFusion-style fusions use 3-10)
MAX_TRUNC_VOXELS = 64


def _check_geometry(voxel, trunc, block) -> tuple[float, float]:
    """``(voxel, trunc)`` as floats (``trunc=None``: :data:`TRUNC_VOXELS` voxels); raises
    :class:`InputError` unless voxel > 0 finite, trunc ≥ voxel finite, 1 ≤ block ≤ 16."""
    try:
        if isinstance(voxel, bool) or isinstance(trunc, bool):
            raise TypeError("a bool is not a length")
        voxel = float(voxel)
        trunc = TRUNC_VOXELS * voxel if trunc is None else float(trunc)
    except (TypeError, ValueError) as exc:
        raise InputError(f"voxel and trunc must be numbers, got {voxel!r} and {trunc!r} (e.g. --voxel 0.01 --trunc 0.04)") from exc
    if not (math.isfinite(voxel) and voxel > 0):
        raise InputError(f"voxel must be a positive finite length, got {voxel!r} (e.g. --voxel 0.01, or omit it for the default)")
    if not (math.isfinite(trunc) and trunc >= voxel):
        raise InputError(f"trunc must be finite and at least one voxel ({voxel:g}), got {trunc!r}: "
                         f"pass --trunc {TRUNC_VOXELS * voxel:g} ({TRUNC_VOXELS} voxels, the default) or omit it")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or not 1 <= block <= MAX_BLOCK:
        raise InputError(f"block must be a whole number of voxels in 1..{MAX_BLOCK}, got {block!r} (the default is {DEFAULT_BLOCK})")
    return voxel, trunc


def from_dense(values: np.ndarray, weight: np.ndarray, voxel: float, trunc: float, origin=(0, 0, 0),
               units: str = "m", color: np.ndarray | None = None, block: int = DEFAULT_BLOCK) -> FusedTSDF:
    """A :class:`FusedTSDF` from dense ``values (X, Y, Z)`` and ``weight (X, Y, Z)`` (observed where
    weight > 0); voxel ``(i, j, k)`` of the arrays has index ``origin + (i, j, k)``; ``color (X, Y, Z, 3)``."""
    values, weight = np.asarray(values), np.asarray(weight)
    if values.ndim != 3 or values.shape != weight.shape:
        raise InputError(f"from_dense needs values and weight of one (X, Y, Z) shape, got {values.shape} and {weight.shape}")
    idx = np.argwhere(weight > 0)
    ijk = idx + np.asarray(origin, dtype=np.int64)
    col = None if color is None else np.asarray(color)[tuple(idx.T)]
    return FusedTSDF(voxel, trunc, units, ijk, np.clip(values[tuple(idx.T)], -trunc, trunc), weight[tuple(idx.T)], col, block)


def _valid_depth(depth: np.ndarray, max_depth: float | None) -> np.ndarray:
    d = np.asarray(depth, dtype=np.float32)
    ok = np.isfinite(d) & (d > 0)
    if max_depth is not None:
        ok &= d <= max_depth
    return np.where(ok, d, 0.0).astype(np.float32)


def default_voxel(seq: RGBDSequence, frames=None, max_depth: float | None = None) -> float:
    """Default voxel edge: the median valid depth of up to :data:`VOXEL_SAMPLE_FRAMES` evenly spaced
    frames / :data:`VOXELS_PER_MEDIAN_DEPTH`, rounded to two significant digits."""
    frames = _frame_list(seq, frames)
    pick = [frames[int(i)] for i in np.unique(np.linspace(0, len(frames) - 1, min(VOXEL_SAMPLE_FRAMES, len(frames))).round())]
    vals = [d[d > 0] for d in (_valid_depth(seq.depth(i), max_depth) for i in pick)]
    vals = np.concatenate(vals) if vals else np.zeros(0, np.float32)
    if vals.size == 0:
        raise InputError(f"no valid depth in frames {pick} of {seq.name!r} (all 0, non-finite"
                         f"{'' if max_depth is None else f' or beyond max_depth={max_depth:g}'}): nothing to fuse")
    v = float(np.median(vals)) / VOXELS_PER_MEDIAN_DEPTH
    return float(f"{v:.2g}")


def _frame_list(seq: RGBDSequence, frames) -> list[int]:
    n = len(seq)
    if n == 0:
        raise InputError(f"sequence {seq.name!r} has no frames: nothing to fuse")
    if frames is None:
        return list(range(n))
    if isinstance(frames, (str, bytes)) or not hasattr(frames, "__iter__"):
        raise InputError(f"frames must be a list of frame indices (or None for all), got {frames!r:.40}")
    out = []
    for f in frames:
        if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or not 0 <= f < n:
            raise InputError(f"frame {f!r} is not a frame index of {seq.name!r}: use whole numbers in 0..{n - 1}")
        out.append(int(f))
    if not out:
        raise InputError("frames is empty: pass at least one frame index, or None for all")
    return out


def _check_sequence(seq: RGBDSequence) -> tuple[np.ndarray, np.ndarray]:
    K = np.asarray(seq.intrinsics, dtype=np.float64)
    if K.shape != (3, 3) or not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise InputError(f"sequence {seq.name!r}: intrinsics must be a finite (3, 3) pinhole matrix with fx, fy > 0, got {K.tolist()}")
    P = np.asarray(seq.poses, dtype=np.float64)
    if P.ndim != 3 or P.shape[1:] != (4, 4) or not np.isfinite(P).all():
        raise InputError(f"sequence {seq.name!r}: poses must be finite (N, 4, 4) camera-to-world matrices, got shape {P.shape}")
    if seq.width < 1 or seq.height < 1:
        raise InputError(f"sequence {seq.name!r}: image size {seq.width}×{seq.height} is empty")
    return K, P


class _BlockHash:
    """Allocated blocks: their int64 keys, sorted (to tell new blocks from known ones with
    :func:`torch.searchsorted`), and per block, in allocation order, its coordinates and voxel rows
    ``tsdf (cap, block³)``, ``weight (cap, block³)``, ``color (cap, block³, 3)`` (float32 running means)."""

    def __init__(self, block: int, color: bool, device: torch.device):
        self.block, self.b3 = block, block ** 3
        self.device = device
        # bytes a block costs: its key and coordinates, and its voxels' tsdf, weight (and colour) float32s
        self.block_bytes = 8 + 24 + self.b3 * (8 + (12 if color else 0))
        self.max_memory = default_max_memory()  # the host's limit, and on a GPU no more than most of its own memory
        if device.type == "cuda":
            self.max_memory = min(self.max_memory, int(0.8 * torch.cuda.get_device_properties(device).total_memory))
        self.sorted_keys = torch.zeros(0, dtype=torch.long, device=device)
        self.coords = torch.zeros(0, 3, dtype=torch.long, device=device)  # (cap, 3) block coordinates
        self.tsdf = torch.zeros(0, self.b3, device=device)
        self.weight = torch.zeros(0, self.b3, device=device)
        self.color = torch.zeros(0, self.b3, 3, device=device) if color else None
        self.n = 0

    def insert(self, keys: torch.Tensor, coords: torch.Tensor) -> None:
        """Allocate the blocks of unique ``keys (n,)`` (with ``coords (n, 3)``) not yet allocated."""
        if self.n:
            pos = torch.searchsorted(self.sorted_keys, keys).clamp_max(self.n - 1)
            new = self.sorted_keys[pos] != keys
            keys, coords = keys[new], coords[new]
        k = keys.shape[0]
        if k == 0:
            return
        if self.n + k > self.tsdf.shape[0]:  # grow by doubling: amortised O(1) copies per block
            cap = max(2 * self.tsdf.shape[0], self.n + k, 256)
            need = (self.tsdf.shape[0] + cap) * self.block_bytes  # the old tables and the new while they are copied
            if need > self.max_memory:
                raise InputError(
                    f"the fusion has allocated {self.n + k:,} blocks of {self.block}³ voxels and would need "
                    f"{need / 2 ** 30:.1f} GiB to grow, more than the limit of {self.max_memory / 2 ** 30:.1f} GiB "
                    f"(${MAX_MEMORY_ENV}, default half the memory, on a GPU at most 80 % of its own): pass a larger --voxel, or a --max-depth that "
                    "leaves out the far depth")
            self.coords = _grow(self.coords, cap)
            self.tsdf = _grow(self.tsdf, cap)
            self.weight = _grow(self.weight, cap)
            if self.color is not None:
                self.color = _grow(self.color, cap)
        self.coords[self.n:self.n + k] = coords
        self.n += k
        self.sorted_keys = torch.sort(torch.cat([self.sorted_keys, keys])).values


def _grow(t: torch.Tensor, cap: int) -> torch.Tensor:
    out = torch.zeros((cap,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


@torch.no_grad()
def fuse(seq: RGBDSequence, voxel: float | None = None, trunc: float | None = None, device=None, frames=None,
         max_depth: float | None = None, block: int = DEFAULT_BLOCK, progress: bool = False) -> FusedTSDF:
    """Fuse the depth (and colour) frames of ``seq`` into a sparse TSDF (see the module docstring).

    ``voxel``: voxel edge in ``seq.units`` (default :func:`default_voxel`); ``trunc``: truncation
    distance in ``seq.units``, at least one voxel (default ``TRUNC_VOXELS · voxel``); ``device``:
    ``"auto" | "cpu" | "cuda[:N]"`` or a :class:`torch.device` (:func:`vqad.device.resolve_device`);
    ``frames``: frame indices to fuse, in order (default all); ``max_depth``: depth beyond it is
    treated as missing (default: none); ``block``: block edge in voxels (1..16).
    Raises :class:`InputError` for bad arguments and when no voxel gets observed.
    """
    K, P = _check_sequence(seq)
    frames = _frame_list(seq, frames)
    if max_depth is not None:
        try:
            max_depth = float(max_depth)
        except (TypeError, ValueError):
            max_depth = float("nan")
        if not (math.isfinite(max_depth) and max_depth > 0):
            raise InputError(f"max_depth must be a positive finite depth in {seq.units}, or None for no limit")
    if voxel is None:
        voxel = default_voxel(seq, frames, max_depth)
    voxel, trunc = _check_geometry(voxel, trunc, block)
    if trunc > MAX_TRUNC_VOXELS * voxel:
        raise InputError(f"trunc {trunc:g} is {trunc / voxel:,.0f} voxels of {voxel:g}: every depth sample would carve "
                         f"{2 * trunc / voxel:,.0f} voxels along its ray, and the fusion's memory grows with them; use at "
                         f"most {MAX_TRUNC_VOXELS} voxels (--trunc {MAX_TRUNC_VOXELS * voxel:g}; {TRUNC_VOXELS}, the "
                         f"default, is usual) or a larger --voxel")
    dev = resolve_device(device)
    W, H = int(seq.width), int(seq.height)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    bsize = block * voxel
    hashmap = _BlockHash(block, seq.has_color, dev)
    local = torch.from_numpy(_local_offsets(block)).to(dev)
    local_m = (local.double() + 0.5) * voxel  # (b³, 3) voxel centres relative to the block corner
    # rays through pixel centres at z = 1, and their unit directions
    uu, vv = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    ray = torch.from_numpy(np.stack([(uu - cx) / fx, (vv - cy) / fy, np.ones_like(uu)], -1).reshape(-1, 3)).float().to(dev)
    ray_unit = ray / ray.norm(dim=1, keepdim=True)
    steps = torch.linspace(-trunc, trunc, int(math.ceil(2 * trunc / voxel)) + 1, device=dev)
    block_radius = 0.5 * math.sqrt(3) * bsize
    # inward normals of the frustum's side planes: pixel centres span [-0.5, W - 0.5] × [-0.5, H - 0.5]
    frustum = torch.tensor([[fx, 0, cx + 0.5], [-fx, 0, W - 0.5 - cx], [0, fy, cy + 0.5], [0, -fy, H - 0.5 - cy]],
                           dtype=torch.float64, device=dev)

    from tqdm.auto import tqdm

    for i in tqdm(frames, desc="fuse", unit="frame", disable=not progress):
        depth_np = _valid_depth(seq.depth(i), max_depth)  # (the sequence checks each frame's shape and type)
        col_np = seq.color(i)
        valid = depth_np > 0
        if not valid.any():
            continue
        c2w = P[i]
        Rcw = torch.from_numpy(c2w[:3, :3]).to(dev)  # camera → world rotation (float64)
        tcw = torch.from_numpy(c2w[:3, 3]).to(dev)
        depth = torch.from_numpy(depth_np).to(dev).reshape(-1)
        # 1. allocate the blocks the band d ± trunc of every valid pixel's ray passes through, in chunks of pixels
        # (pixels × band samples points at once: a megapixel frame with a 64-voxel band was a 3 GB tensor)
        pix = torch.from_numpy(valid.reshape(-1).nonzero()[0]).to(dev)
        per_px = max(1, _CHUNK_VOXELS // steps.numel())
        for s0 in range(0, pix.shape[0], per_px):
            pix_t = pix[s0:s0 + per_px]
            d = depth[pix_t]
            pts = ray[pix_t, None, :] * d[:, None, None] + ray_unit[pix_t, None, :] * steps[None, :, None]  # (n, s, 3) camera
            pts = pts.reshape(-1, 3).double() @ Rcw.T + tcw
            bcf = torch.floor(pts / bsize)  # (checked in float64: a coordinate past int64 wraps negative in .long())
            if not float(bcf.abs().max()) * block < _KEY_OFFSET - block:  # (NaN fails it too)
                raise InputError(f"frame {i}: the scene spans more than 2^20 voxels of {voxel:g} {seq.units} from the origin: pass a larger voxel (--voxel)")
            bc = bcf.long()
            keys, inv = torch.unique(_pack(bc), return_inverse=True)
            first = torch.zeros(keys.shape[0], dtype=torch.long, device=dev).scatter_(0, inv, torch.arange(inv.shape[0], device=dev))
            hashmap.insert(keys, bc[first])
        # 2. integrate into the allocated blocks in the view frustum
        n = hashmap.n
        Rwc = Rcw.T
        centre = (hashmap.coords[:n].double() * bsize + 0.5 * bsize - tcw) @ Rwc.T  # (n, 3) block centres, camera
        zc = centre[:, 2]
        # a block's bounding sphere meets the view frustum iff it reaches into the half-space of
        # each of the 4 side planes (through the camera centre, normals n) and the depth range
        vis = (zc > -block_radius) & (zc - block_radius <= float(depth_np.max()) + trunc)
        for plane in frustum:
            vis &= centre @ plane >= -block_radius * float(plane.norm())
        rows = vis.nonzero().squeeze(1)
        local_cam = (local_m @ Rwc.T).float()  # (b³, 3)
        color = None if col_np is None or hashmap.color is None else torch.from_numpy(np.array(col_np)).to(dev).reshape(-1, 3).float()
        per = max(1, _CHUNK_VOXELS // hashmap.b3)
        for s in range(0, rows.shape[0], per):
            rr = rows[s:s + per]
            corner = ((hashmap.coords[rr].double() * bsize - tcw) @ Rwc.T).float()  # (r, 3)
            cam = corner[:, None, :] + local_cam[None]  # (r, b³, 3)
            z = cam[..., 2]
            zs = z.clamp_min(1e-9)
            u = torch.round(cam[..., 0] / zs * fx + cx)
            v = torch.round(cam[..., 1] / zs * fy + cy)
            ok = (z > 0) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
            pidx = torch.where(ok, v * W + u, torch.zeros_like(u)).long()
            dz = depth[pidx]
            sdf = dz - z
            ok &= (dz > 0) & (sdf >= -trunc)
            sel = ok.reshape(-1).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            flat = (rr[:, None] * hashmap.b3 + torch.arange(hashmap.b3, device=dev)[None]).reshape(-1)[sel]
            tv = hashmap.tsdf.view(-1)
            wv = hashmap.weight.view(-1)
            w_old = wv[flat]
            w_new = w_old + 1.0
            tv[flat] = (tv[flat] * w_old + sdf.reshape(-1)[sel].clamp_max(trunc)) / w_new
            wv[flat] = w_new
            if color is not None:
                cv = hashmap.color.view(-1, 3)
                cv[flat] = (cv[flat] * w_old[:, None] + color[pidx.reshape(-1)[sel]]) / w_new[:, None]
    return _collect(hashmap, voxel, trunc, block, seq, frames, max_depth)


def _collect(hashmap: _BlockHash, voxel: float, trunc: float, block: int, seq: RGBDSequence, frames, max_depth) -> FusedTSDF:
    """The observed voxels of ``hashmap`` as a :class:`FusedTSDF`, in canonical order."""
    n = hashmap.n
    coords = hashmap.coords[:n].cpu().numpy()
    order = np.argsort(_pack(coords), kind="stable")
    weight = hashmap.weight[:n].cpu().numpy()[order]
    obs = weight > 0
    if not obs.any():
        raise InputError(f"no voxel of {seq.name!r} was observed in frames {frames[0]}..{frames[-1]}: no valid depth"
                         f"{'' if max_depth is None else f' within max_depth={max_depth:g}'} (all 0 or non-finite?)")
    row, lidx = np.nonzero(obs)
    ijk = coords[order][row] * block + _local_offsets(block)[lidx]
    tsdf = hashmap.tsdf[:n].cpu().numpy()[order][row, lidx]
    color = None
    if hashmap.color is not None:
        color = np.clip(np.round(hashmap.color[:n].cpu().numpy()[order][row, lidx]), 0, 255).astype(np.uint8)
    return FusedTSDF(voxel, trunc, seq.units, ijk.astype(np.int32), np.clip(tsdf, -trunc, trunc), weight[row, lidx], color, block)
