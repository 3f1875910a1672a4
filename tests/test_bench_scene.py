"""bench-scene's split of the held-out PSNR into the object's pixels and the rest (region_psnr): exact
on the object alone (its alpha mask), and on the room its ray-cast object pixels agree with that mask
(the two captures share their cameras)."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
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
    assert set(got["share"]) == {"object"}
    share = (64 * mask.mean()) / (64 * mask.mean() + 4 * (1 - mask.mean()))  # the object's share of the error
    assert math.isclose(got["share"]["object"]["error"], float(share), abs_tol=1e-9)
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


def test_region_psnr_splits_the_room_by_what_each_pixel_sees(tmp_path):
    """The room's rest is split into near ground, far ground and dome: the cameras look at the object
    from above it, so every view's top row shows the dome and its bottom row the ground nearby; an
    error put on the top row alone is all the dome's, and the shares of pixels and of error add up."""
    from vqad.nerf.formats import load_dataset

    bench = _bench()
    room = _capture(tmp_path / "room", 4, True)
    views = load_dataset(str(room), format="ngp").splits["test"]
    top = np.zeros((len(views), *views.hw), dtype=bool)
    top[:, 0, :] = True
    fit = tmp_path / "fit-room"
    _shifted_renders(room, fit, 5, top, 8, 0)
    got = bench.region_psnr(room, fit, 5)
    share = got["share"]
    assert set(share) == {"object", "ground_near", "ground_far", "dome"}
    assert math.isclose(sum(s["pixels"] for s in share.values()), 1.0, abs_tol=1e-9)
    assert math.isclose(sum(s["error"] for s in share.values()), 1.0, abs_tol=1e-9)
    assert math.isclose(share["dome"]["error"], 1.0, abs_tol=1e-12)  # the top rows: dome only
    assert all(share[r]["pixels"] > 0.01 for r in share)  # each region is seen
    assert got["ground_near"] == got["ground_far"] == got["object"] == float("inf")  # no error there
    # the dome's PSNR is that of the top rows' error spread over all the dome's pixels
    n_top, n_all = top.sum(), top.size
    expect = -10 * math.log10((8 / 255) ** 2 * n_top / (share["dome"]["pixels"] * n_all))
    assert math.isclose(got["dome"], expect, abs_tol=1e-6)
    # the report shows the split
    args = type("A", (), {"quick": False, "size": "48x80", "views": 16, "supersample": 4, "minutes": 1.0,
                          "steps": 400, "density_minutes": 2.0})()
    report = tmp_path / "scene.md"
    bench.write_report({"room": {"fits": {"dense": {"psnr": {"5": 30.0}, "wall_seconds": 1, "cap_seconds": 60,
                                                     "octree_seconds": 0.1, "steps": 10, "regions": got}}}},
                       args, report)
    text = report.read_text()
    assert "## Where the error is" in text
    row = [line for line in text.splitlines() if line.startswith("| room | dense | inf")][0]
    assert row.count("dB") == 4 and row.rstrip().endswith("| – |")  # object, near, far, dome; no plain background


def test_generating_a_capture_leaves_the_benchmarks_one_thread(tmp_path):
    """synth-capture sets the process's threads to every core; the fits the benchmark runs after it in the
    same process must still get its own one thread (two of them side by side on two cores, not three)."""
    import torch

    bench = _bench()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cap = bench.make_capture(tmp_path, "room, aabb_scale 4", 4, True, "16x24", 4, 1)
        assert (cap / "transforms.json").is_file() and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_rest_needed_brings_the_whole_image_to_the_target():
    """Brute force: an image whose object pixels have the object alone's error and whose rest has the error
    rest_needed asks for scores exactly the target, alone − margin; where the object's pixels alone exceed
    the allowed error there is no such rest."""
    bench = _bench()
    rng = np.random.default_rng(0)
    for alone, alone_object, share in ((32.4, 30.2, 0.29), (36.5, 35.1, 0.29), (30.0, 28.0, 0.6)):
        need = bench.rest_needed(alone, alone_object, share)
        n = 100_000
        on = rng.random(n) < share
        f = on.mean()
        se = np.where(on, 10 ** (-alone_object / 10), 10 ** (-bench.rest_needed(alone, alone_object, f) / 10))
        assert -10 * math.log10(se.mean()) == pytest.approx(alone - bench.TARGET_GAP_DB, abs=1e-9)
        assert need is not None
    # the object's pixels 3 dB worse than the whole target allows, on 60 % of the image: unreachable
    assert bench.rest_needed(30.0, 26.0, 0.6) is None
    with pytest.raises(ValueError):
        bench.rest_needed(30.0, 30.0, 1.0)


def test_target_rows_pair_each_room_fit_with_the_object_alone_of_its_grid_and_seed():
    bench = _bench()
    reg = {"lod": 7, "object_pixels": 0.3, "object": 30.0, "rest": 28.0}
    results = {
        "room, aabb_scale 4": {"fits": {
            "dense": {"psnr": {"6": 30.0, "7": 35.6}, "regions": reg},
            "4-bit, seed 1": {"psnr": {"7": 27.0}},
            "hash": {"psnr": {"7": 20.0}},  # no object-alone fit of this grid: no row
        }},
        "object alone": {"fits": {
            "dense": {"psnr": {"6": 33.0, "7": 36.5}, "regions": {"lod": 7, "object_pixels": 0.3, "object": 35.0,
                                                             "rest": 37.0}},
            "4-bit, seed 1": {"psnr": {"7": 29.5}},
        }},
    }
    rows = bench.target_rows(results)
    assert [(r["capture"], r["fit"]) for r in rows] == [("room, aabb_scale 4", "dense"), ("room, aabb_scale 4", "4-bit, seed 1")]
    dense, cb = rows
    assert dense["gaps"] == pytest.approx({"6": -3.0, "7": -0.9}) and dense["met"]
    assert dense["needed"] == pytest.approx(bench.rest_needed(36.5, 35.0, 0.3)) and dense["alone_rest"] == 37.0
    assert not cb["met"] and "needed" not in cb  # no region split: no budget
