"""bench-scene's split of the held-out PSNR into the object's pixels and the rest (region_psnr): exact
on the object alone (its alpha mask), and on the room its ray-cast object pixels agree with that mask
(the two captures share their cameras)."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scene", REPO / "benchmarks" / "bench_scene.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _capture(path: Path, aabb: int, background: bool) -> Path:
    from vqad.app.cli import main as cli

    args = ["synth-capture", "-o", str(path), "--aabb-scale", str(aabb), "--size", "48x80", "--views", "16"]
    assert cli(args + ([] if background else ["--no-background"])) == 0
    return path


def _shifted_renders(cap: Path, fit: Path, lod: int, on: np.ndarray, e_object: int, e_rest: int) -> None:
    """Test renders that differ from the ground truth by exactly ``e_object`` grey levels on the pixels
    ``on`` and ``e_rest`` elsewhere, in every channel (down, or up where a value is too dark to go down)."""
    from vqad.nerf.formats import load_dataset

    views = load_dataset(str(cap), format="ngp").splits["test"]
    (fit / f"test_lod{lod}").mkdir(parents=True)
    for i, name in enumerate(views.names):
        gt = views.images[i].numpy().astype(np.int64)
        e = np.where(on[i][..., None], e_object, e_rest)
        img = np.where(gt >= e, gt - e, gt + e)
        assert img.min() >= 0 and img.max() <= 255
        Image.fromarray(img.astype(np.uint8)).save(fit / f"test_lod{lod}" / f"{Path(name).stem}.png")


def test_region_psnr_against_known_errors(tmp_path):
    from vqad.nerf.formats import load_dataset

    bench = _bench()
    obj = _capture(tmp_path / "object", 1, False)
    room = _capture(tmp_path / "room", 4, True)
    views = load_dataset(str(obj), format="ngp").splits["test"]
    mask = (views.masks > 127).numpy()  # the object's pixels, from its alpha
    assert 0.05 < mask.mean() < 0.95
    # the object alone: errors of exactly 8 and 2 grey levels
    fit = tmp_path / "fit-object"
    _shifted_renders(obj, fit, 5, mask, 8, 2)
    got = bench.region_psnr(obj, fit, 5)
    assert math.isclose(got["object"], 20 * math.log10(255 / 8), abs_tol=1e-6)
    assert math.isclose(got["rest"], 20 * math.log10(255 / 2), abs_tol=1e-6)
    assert math.isclose(got["object_pixels"], float(mask.mean()), abs_tol=1e-12)
    # the room: its ray-cast object pixels are the object alone's alpha mask, up to a few edge pixels
    fit = tmp_path / "fit-room"
    _shifted_renders(room, fit, 5, mask, 8, 0)
    got = bench.region_psnr(room, fit, 5)
    assert abs(got["object_pixels"] - float(mask.mean())) < 0.02  # same cameras, same object
    assert abs(got["object"] - 20 * math.log10(255 / 8)) < 0.5  # the object's pixels carry the error ...
    assert got["rest"] > 35  # ... the rest nearly none (edge pixels where the mask and the ray cast differ)
