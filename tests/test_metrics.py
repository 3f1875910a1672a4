"""Exact point-to-mesh distances and Chamfer-L1 against brute force."""

import numpy as np
import trimesh
from trimesh.triangles import closest_point

from vqad.sdf.mesh import Mesh
from vqad.sdf.metrics import chamfer_and_normals, point_mesh_distance


def _brute(mesh: Mesh, pts: np.ndarray) -> np.ndarray:
    tris = mesh.vertices[mesh.faces]
    return np.array([np.linalg.norm(closest_point(tris, np.repeat(p[None], len(tris), 0)) - p, axis=1).min() for p in pts])


def _mixed_mesh() -> Mesh:
    """A box of 12 large triangles, a finely tessellated sphere and a zero-area face."""
    box = trimesh.creation.box(extents=(1.6, 1.2, 1.4))
    ball = trimesh.creation.icosphere(subdivisions=3, radius=0.25)
    v = np.concatenate([box.vertices, ball.vertices + [0.3, 0.2, 0.1]])
    f = np.concatenate([box.faces, ball.faces + len(box.vertices), [[0, 0, 1]]])
    return Mesh(v.astype(np.float64), f.astype(np.int64))


def test_point_mesh_distance_matches_brute_force():
    mesh = _mixed_mesh()
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.normal(scale=0.6, size=(300, 3)), rng.normal(scale=3.0, size=(50, 3)),
                          mesh.to_trimesh().sample(100)])
    keep = np.ones(len(mesh.faces), bool)
    keep[-1] = False  # the brute force must not see the degenerate face either
    np.testing.assert_allclose(point_mesh_distance(mesh, pts), _brute(Mesh(mesh.vertices, mesh.faces[keep]), pts),
                               rtol=0, atol=1e-12)


def test_chamfer_of_identical_meshes_is_zero_and_of_a_shift_is_the_shift():
    s = trimesh.creation.icosphere(subdivisions=4, radius=0.6)
    a = Mesh(np.asarray(s.vertices), np.asarray(s.faces))
    ch, nc = chamfer_and_normals(a, a, n=20000)
    assert ch < 1e-12 and nc > 0.98
    plane = Mesh(np.array([[-1.0, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]]), np.array([[0, 1, 2], [0, 2, 3]]))
    lifted = plane.transformed(lambda v: v + [0, 0, 0.01])
    ch, _ = chamfer_and_normals(plane, lifted, n=5000)
    assert abs(ch - 0.01) < 1e-9
