"""Sparse 3-D points that come with a capture (structure from motion): PLY files and COLMAP's points3D.

A COLMAP reconstruction triangulates tens of thousands of surface points while it poses the
cameras; nerfstudio's converters keep them as ``sparse_pc.ply`` (``"ply_file_path"`` in
``transforms.json``) and COLMAP itself as ``points3D.bin`` / ``points3D.txt`` beside the cameras.
They tell where the surfaces are, background included, at no cost: ``--octree points`` builds the
radiance field's octree from them (:func:`vqad.nerf.octree_build.octree_from_points`).

* PLY: the ``vertex`` element's ``x y z`` properties (any numeric type), ``ascii``,
  ``binary_little_endian`` or ``binary_big_endian``; other elements and properties are skipped.
* points3D.txt: ``POINT3D_ID X Y Z R G B ERROR TRACK[]``; points3D.bin: ``uint64 n`` then per point
  ``uint64 id, float64 xyz[3], uint8 rgb[3], float64 error, uint64 track_length,
  track_length × (int32 image_id, int32 point2d_idx)``, little-endian (colmap.github.io/format.html).

Every value is checked: counts against the file's size, coordinates finite.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from vqad.errors import InputError

MAX_POINTS = 50_000_000  # more than any SfM model of a capture; guards the counts a header claims

_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


def _check_points(xyz: np.ndarray, what: str) -> np.ndarray:
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    if not np.isfinite(xyz).all():
        raise InputError(f"{what}: non-finite point coordinates")
    return xyz


def read_ply_points(path) -> np.ndarray:
    """The ``x y z`` of a PLY file's vertices: ``(N, 3)`` float64."""
    path = Path(path)
    data = path.read_bytes()
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise InputError(f"{path}: not a PLY file (no 'ply' magic or no end_header)")
    body_start = data.find(b"\n", end) + 1
    if body_start == 0:
        raise InputError(f"{path}: the header's end_header line has no line end")
    header = data[:end].decode("ascii", errors="replace").splitlines()
    fmt, elements = None, []  # elements: [name, count, [(prop, dtype | None for lists)]]
    for line in header[1:]:
        tok = line.split()
        if not tok or tok[0] in ("comment", "obj_info"):
            continue
        if tok[0] == "format" and len(tok) >= 2:
            fmt = tok[1]
        elif tok[0] == "element" and len(tok) == 3:
            try:
                count = int(tok[2])
            except ValueError:
                raise InputError(f"{path}: bad element count {tok[2]!r}") from None
            if not 0 <= count <= MAX_POINTS:
                raise InputError(f"{path}: element {tok[1]!r} claims {count} items (at most {MAX_POINTS:,} are read)")
            elements.append([tok[1], count, []])
        elif tok[0] == "property" and elements:
            if len(tok) == 5 and tok[1] == "list":
                elements[-1][2].append((tok[4], None))
            elif len(tok) == 3 and tok[1] in _PLY_TYPES:
                elements[-1][2].append((tok[2], _PLY_TYPES[tok[1]]))
            else:
                raise InputError(f"{path}: unsupported property line {line!r}")
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise InputError(f"{path}: unsupported PLY format {fmt!r}")
    vertex = next((e for e in elements if e[0] == "vertex"), None)
    if vertex is None:
        raise InputError(f"{path}: no vertex element")
    names = [p for p, _ in vertex[2]]
    dup = sorted({a for a in names if names.count(a) > 1})
    if dup:
        raise InputError(f"{path}: the vertex property {dup[0]!r} is declared more than once; fix the header")
    if not {"x", "y", "z"} <= set(names):
        raise InputError(f"{path}: the vertices have no x y z properties")
    if any(t is None for _, t in vertex[2]) or any(e[1] for e in elements[:elements.index(vertex)]):
        raise InputError(f"{path}: list properties on the vertices, or non-empty elements before them, are not supported")
    n = vertex[1]
    if fmt == "ascii":
        lines = data[body_start:].decode("ascii", errors="replace").split("\n")
        rows = [r.split() for r in lines[:n]]
        if len(rows) < n or any(len(r) < len(names) for r in rows):
            raise InputError(f"{path}: fewer vertex rows than the {n:,} the header claims")
        if vertex is elements[-1] and any(r.strip() for r in lines[n:]):
            raise InputError(f"{path}: more vertex rows than the {n:,} the header claims; fix the count")
        try:
            table = np.array([[float(v) for v in r[:len(names)]] for r in rows], dtype=np.float64).reshape(n, len(names))
        except ValueError:
            raise InputError(f"{path}: a vertex row is not numbers") from None
        xyz = table[:, [names.index(a) for a in "xyz"]]
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        dtype = np.dtype([(p, order + t) for p, t in vertex[2]])
        if len(data) - body_start < n * dtype.itemsize:
            raise InputError(f"{path}: the file ends before its {n:,} vertices")
        if vertex is elements[-1] and len(data) - body_start > n * dtype.itemsize:
            raise InputError(f"{path}: {len(data) - body_start - n * dtype.itemsize:,} bytes follow the {n:,} vertices "
                             f"the header claims; fix the count")
        rec = np.frombuffer(data, dtype=dtype, count=n, offset=body_start)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite values are refused just below
            xyz = np.stack([rec[a].astype(np.float64) for a in "xyz"], -1)
    return _check_points(xyz, str(path))


def write_ply_points(path, xyz: np.ndarray) -> None:
    """Write ``xyz (N, 3)`` as a binary little-endian PLY of float32 vertices."""
    xyz = np.ascontiguousarray(np.asarray(xyz, dtype="<f4").reshape(-1, 3))
    header = (f"ply\nformat binary_little_endian 1.0\nelement vertex {xyz.shape[0]}\n"
              "property float x\nproperty float y\nproperty float z\nend_header\n")
    Path(path).write_bytes(header.encode("ascii") + xyz.tobytes())


def read_points3d_txt(path) -> np.ndarray:
    path = Path(path)
    pts = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines()):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tok = line.split()
        if len(tok) < 8:
            raise InputError(f"{path} line {i + 1}: expected POINT3D_ID X Y Z R G B ERROR ..., got {line[:80]!r}")
        try:
            pts.append([float(t) for t in tok[1:4]])
        except ValueError:
            raise InputError(f"{path} line {i + 1}: the coordinates are not numbers") from None
        if len(pts) > MAX_POINTS:
            raise InputError(f"{path}: more than {MAX_POINTS:,} points")
    return _check_points(np.array(pts, dtype=np.float64).reshape(-1, 3), str(path))


def read_points3d_bin(path) -> np.ndarray:
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise InputError(f"{path}: too short for a points3D.bin")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > MAX_POINTS or n * 51 > len(data):  # 51 bytes: a point with an empty track
        raise InputError(f"{path}: claims {n:,} points, more than its {len(data):,} bytes hold")
    xyz = np.empty((n, 3), dtype=np.float64)
    off = 8
    for i in range(n):
        if off + 51 > len(data):
            raise InputError(f"{path}: the file ends inside point {i}")
        xyz[i] = struct.unpack_from("<3d", data, off + 8)
        (track,) = struct.unpack_from("<Q", data, off + 43)
        off += 51 + 8 * track
        if off > len(data):
            raise InputError(f"{path}: point {i}'s track runs past the end of the file")
    if off != len(data):
        raise InputError(f"{path}: {len(data) - off:,} bytes follow the {n:,} points its header claims; the file is "
                         f"damaged or its count is wrong")
    return _check_points(xyz, str(path))


def read_colmap_points(model_dir) -> np.ndarray | None:
    """The points of the COLMAP model in ``model_dir`` (``points3D.bin`` or ``.txt``), or None."""
    d = Path(model_dir)
    for name, read in (("points3D.bin", read_points3d_bin), ("points3D.txt", read_points3d_txt)):
        if (d / name).is_file():
            return read(d / name)
        if (d / name).exists():
            raise InputError(f"{d / name} is not a file; remove it, or put COLMAP's {name} there")
    return None
