"""NeRF-synthetic / Blender captures: ``transforms_{train,val,test}.json`` with ``camera_angle_x``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vqad.errors import InputError
from vqad.nerf.data import SceneDataset
from vqad.nerf.formats.common import _dataset, _holdout, _read_json, _transforms_frames


def read_blender(path, downscale: int = 1, background=(1.0, 1.0, 1.0), split_limit=None) -> SceneDataset:
    """A NeRF-synthetic (Blender) scene: ``transforms_{train,val,test}.json`` + RGBA images.

    Masks are the images' alpha. The unit cube is the object box [-1.5, 1.5]^3.
    """
    root = Path(path)
    found = {s: root / f"transforms_{s}.json" for s in ("train", "val", "test") if (root / f"transforms_{s}.json").is_file()}
    if "train" not in found:
        raise InputError(f"{root} has no transforms_train.json: not a Blender (NeRF-synthetic) scene")
    frames = {s: _transforms_frames(_read_json(p), root, p) for s, p in found.items()}
    sources = {s: p.name for s, p in found.items()}
    if "val" not in frames and "test" not in frames:
        frames["train"], held = _holdout(frames["train"])
        frames["val"] = frames["test"] = held
        sources = {"train": "transforms_train.json minus every 8th frame",
                   "val": "every 8th frame of transforms_train.json (no transforms_val.json or transforms_test.json)",
                   "test": "every 8th frame of transforms_train.json (no transforms_val.json or transforms_test.json)"}
    elif "test" not in frames:
        frames["test"] = frames["val"]
        sources["test"] = "transforms_val.json (no transforms_test.json: test = val)"
    elif "val" not in frames:
        frames["val"] = frames["test"]
        sources["val"] = "transforms_test.json (no transforms_val.json: val = test)"
    frames = {s: frames[s] for s in ("train", "val", "test")}
    return _dataset(root.name, "blender", frames, sources, downscale, background, split_limit, root,
                    lambda splits: (np.full(3, -1.5), np.full(3, 1.5), None, None))
