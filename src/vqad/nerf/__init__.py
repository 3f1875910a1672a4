"""Radiance fields (NeRF) on the VQ-AD octree grid.

Modules, one idea each:

* :mod:`~vqad.nerf.data` — the dataset contract (:class:`Views`, :class:`SceneDataset`);
* :mod:`~vqad.nerf.datasets`, :mod:`~vqad.nerf.rays` — readers and camera rays;
* :mod:`~vqad.nerf.field` — :class:`NeRFField` (kind ``"nerf"``): grid → density MLP → colour MLP;
* :mod:`~vqad.nerf.render` — packed ray marching through occupied cells and volume rendering;
* :mod:`~vqad.nerf.octree_build` — the octree from depth maps, foreground masks or a density pass;
* :mod:`~vqad.nerf.train` — :func:`fit_nerf` (all storages, all LODs, checkpoints, ``--resume``);
* :mod:`~vqad.nerf.evaluate` — PSNR / SSIM per LOD on held-out views, PNG renders;
* :mod:`~vqad.nerf.demo` — the built-in demo.

Importing this package registers the ``"nerf"`` field kind for checkpoints and .vqad files.
"""

from vqad.nerf.field import NeRFConfig, NeRFField, sh_encode  # noqa: F401  (registers kind "nerf")

__all__ = ["NeRFConfig", "NeRFField", "sh_encode"]
