"""RGB-D sequences: depth (and colour) frames with intrinsics and camera poses.

:class:`RGBDSequence` loads frames lazily, so a long capture never sits in memory whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class RGBDSequence:
    """Posed depth frames of one scene.

    ``intrinsics`` ``K (3, 3)`` in pixels; ``poses (N, 4, 4)`` camera-to-world, OpenCV axes (x right,
    y down, z forward), in ``units``; ``load_depth(i) -> (H, W) float32`` depth in ``units`` along the
    optical axis (z-depth), 0 where missing; ``load_color(i) -> (H, W, 3) uint8`` or ``None`` when the
    sequence has no colour.
    """

    name: str
    intrinsics: np.ndarray
    poses: np.ndarray
    width: int
    height: int
    load_depth: Callable[[int], np.ndarray]
    load_color: Callable[[int], np.ndarray] | None = None
    units: str = "m"

    def __len__(self) -> int:
        return int(self.poses.shape[0])

    @property
    def has_color(self) -> bool:
        return self.load_color is not None

    def depth(self, i: int) -> np.ndarray:
        """``(H, W) float32`` z-depth of frame ``i``, 0 where missing."""
        return self.load_depth(i)

    def color(self, i: int) -> np.ndarray | None:
        """``(H, W, 3) uint8`` colour of frame ``i``, or ``None``."""
        return None if self.load_color is None else self.load_color(i)
