"""Radiance fields (NeRF) on the VQ-AD octree grid.

Modules, one idea each:

* :mod:`~vqad.nerf.data` — the dataset contract (:class:`Views`, :class:`SceneDataset`);
* :mod:`~vqad.nerf.formats` — readers (blender, LLFF, instant-ngp, nerfstudio, COLMAP, RTMV, procedural);
* :mod:`~vqad.nerf.rays`, :mod:`~vqad.nerf.lens` — camera rays, lens distortion, the training-ray sampler;
* :mod:`~vqad.nerf.contraction` — the contracted cube of large scenes;
* :mod:`~vqad.nerf.field` — :class:`NeRFField` (kind ``"nerf"``): grid → density MLP → colour MLP;
* :mod:`~vqad.nerf.render` — packed ray marching through occupied cells and volume rendering;
* :mod:`~vqad.nerf.octree_build` — the octree from depth maps, foreground masks or a density pass;
* :mod:`~vqad.nerf.task`, :mod:`~vqad.nerf.fit` — the training task and :func:`fit_nerf` (all storages, all
  LODs, checkpoints, ``--resume``); :mod:`~vqad.nerf.depth_prior`, :mod:`~vqad.nerf.appearance` — the depth
  loss and per-view appearance; :mod:`~vqad.nerf.recode` — indices no render reaches;
* :mod:`~vqad.nerf.evaluate` — PSNR / SSIM per LOD on held-out views, PNG renders;
* :mod:`~vqad.nerf.procedural`, :mod:`~vqad.nerf.scene_capture` — the built-in scene and the generated room.

Importing this package registers the ``"nerf"`` field kind for checkpoints and .vqad files.
"""

from vqad.nerf.field import NeRFConfig, NeRFField, sh_encode  # noqa: F401  (registers kind "nerf")

__all__ = ["NeRFConfig", "NeRFField", "sh_encode"]
