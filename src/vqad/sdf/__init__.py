"""Signed distance fields of meshes.

Modules, one idea each:

* :mod:`~vqad.sdf.mesh` — loading meshes, exact signed distances (:class:`SDFOracle`) and samples;
* :mod:`~vqad.sdf.field` — :class:`SDFField` (kind ``"sdf"``): grid → MLP → distance;
* :mod:`~vqad.sdf.fit` — :func:`fit_sdf`, the SDF task of the one fit loop (:mod:`vqad.fit`);
* :mod:`~vqad.sdf.extract` — marching cubes at any LOD; :mod:`~vqad.sdf.render` — sphere tracing;
* :mod:`~vqad.sdf.metrics`, :mod:`~vqad.sdf.evaluate` — Chamfer-L1, normal consistency, IoU per LOD;
* :mod:`~vqad.sdf.shapes` — the built-in procedural shape.
"""
