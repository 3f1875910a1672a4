"""Depth targets from sparse points and depth maps, and the depth loss (vqad.nerf.depth_prior)."""

from __future__ import annotations

import json

import pytest
import torch

from vqad.app.cli import main as cli_main
from vqad.errors import InputError
from vqad.nerf.data import Views
from vqad.nerf.depth_prior import (DepthTargets, capture_depth_targets, depth_source, depth_spread_loss,
                                   depth_targets, points_depth_targets)
from vqad.nerf.formats import load_dataset
from vqad.nerf.rays import backproject, pixel_centers


def _one_view(H=6, W=8, f=10.0, distortion=None) -> Views:
    """A camera at the origin looking down −z (OpenGL), principal point at the image centre."""
    return Views(images=torch.zeros(1, H, W, 3, dtype=torch.uint8), c2w=torch.eye(4)[None],
                 intrinsics=torch.tensor([[f, f, W / 2, H / 2]]), distortion=distortion)


def _at_pixel(col: float, row: float, dist: float, f=10.0, H=6, W=8) -> torch.Tensor:
    """The world point at ray distance ``dist`` behind pixel coordinates (col, row)."""
    d = torch.tensor([(col - W / 2) / f, -(row - H / 2) / f, -1.0])
    return d / d.norm() * dist


def test_points_give_their_distance_to_the_pixel_they_fall_in_and_nan_elsewhere():
    views = _one_view()
    pts = torch.stack([_at_pixel(1.5, 1.5, 4.0), _at_pixel(1.2, 1.7, 3.0),  # two in pixel (1, 1): the nearer
                       _at_pixel(6.5, 4.5, 5.0),  # pixel (6, 4)
                       torch.tensor([0.0, 0.0, 2.0]),  # behind the camera
                       _at_pixel(40.0, 2.0, 5.0)])  # outside the image
    t = points_depth_targets(pts, views, window=0).dense()
    assert t.shape == (1, 6, 8)
    assert t[0, 1, 1] == pytest.approx(3.0) and t[0, 4, 6] == pytest.approx(5.0)
    assert int(torch.isfinite(t).sum()) == 2


def test_a_point_next_to_a_clearly_nearer_or_farther_one_is_dropped_but_a_smooth_surface_kept():
    views = _one_view()
    # (2, 2) and (3, 2): 4.0 beside 2.0, a depth edge (the farther may be hidden, the nearer an occluder's rim);
    # (5, 4) and (6, 4): 5.0 beside 5.2, within the margin: a surface seen at an angle
    pts = torch.stack([_at_pixel(2.5, 2.5, 4.0), _at_pixel(3.5, 2.5, 2.0),
                       _at_pixel(5.5, 4.5, 5.0), _at_pixel(6.5, 4.5, 5.2)])
    t = points_depth_targets(pts, views, margin=0.1, window=1).dense()
    assert torch.isnan(t[0, 2, 2]) and torch.isnan(t[0, 2, 3])
    assert t[0, 4, 5] == pytest.approx(5.0) and t[0, 4, 6] == pytest.approx(5.2)
    # with both tests off, both edge points stay; with the hidden test alone, the nearer one
    t0 = points_depth_targets(pts, views, window=0, rim=0).dense()
    assert t0[0, 2, 2] == pytest.approx(4.0) and t0[0, 2, 3] == pytest.approx(2.0)
    t1 = points_depth_targets(pts, views, window=1, rim=0).dense()
    assert torch.isnan(t1[0, 2, 2]) and t1[0, 2, 3] == pytest.approx(2.0)


def test_points_are_projected_through_the_lens_distortion():
    dist = torch.tensor([[0.2, 0.0, 0.0, 0.0]])  # barrel: a point off-axis lands farther out
    views = _one_view(H=20, W=20, distortion=dist)
    # the undistorted ray through pixel (16.5, 10.5) meets the image, distorted, at 16.5 + ...: project by hand
    p = _at_pixel(16.5, 10.5, 3.0, H=20, W=20)
    t = points_depth_targets(p[None], views, window=0).dense()
    x = (16.5 - 10) / 10.0
    u = 10 + 10.0 * x * (1 + 0.2 * x * x)
    assert torch.isfinite(t[0, 10, int(u)]) and t[0, 10, int(u)] == pytest.approx(3.0)


def test_capture_depth_becomes_the_ray_distance_of_the_back_projected_point():
    views = _one_view()
    z = torch.rand(1, 6, 8) * 3 + 1
    z[0, 0, 0] = 0  # no hit
    views.depth = z.half()
    t = capture_depth_targets(views).dense()
    assert torch.isnan(t[0, 0, 0]) and torch.isfinite(t).sum() == 47
    uv = pixel_centers(6, 8)
    x = backproject(views.c2w[0], views.intrinsics[0], uv, views.depth[0].float().reshape(-1))
    ok = torch.isfinite(t[0].reshape(-1))
    assert torch.allclose(t[0].reshape(-1)[ok], x.norm(dim=-1)[ok], rtol=1e-5)


def _brute_force_loss(weights, t_mid, ray_indices, target, s):
    total, n = 0.0, 0
    for r in range(target.shape[0]):
        if not torch.isfinite(target[r]):
            continue
        n += 1
        for i in range(weights.shape[0]):
            if ray_indices[i] == r:
                x2 = float(((t_mid[i] - target[r]) / (s * target[r])) ** 2)
                total += float(weights[i]) * x2 / (1 + x2)
    return total / max(n, 1)


def test_depth_loss_matches_brute_force_and_is_zero_at_the_target():
    g = torch.Generator().manual_seed(0)
    R, S = 5, 40
    ray_indices = torch.sort(torch.randint(0, R, (S,), generator=g)).values
    weights = torch.rand(S, generator=g)
    t_mid = torch.rand(S, generator=g) * 4 + 0.5
    target = torch.tensor([1.0, float("nan"), 2.5, 3.0, float("nan")])
    got = depth_spread_loss(weights, t_mid, ray_indices, target, scale=0.1)
    assert float(got) == pytest.approx(_brute_force_loss(weights, t_mid, ray_indices, target, 0.1), rel=1e-5)
    # all the weight at each ray's target: nothing; no targets at all: 0 with a gradient path
    at = torch.tensor([1.0, 2.5, 3.0])
    assert float(depth_spread_loss(torch.ones(3), at, torch.tensor([0, 2, 3]), target)) == 0.0
    w = torch.rand(S, requires_grad=True)
    z = depth_spread_loss(w, t_mid, ray_indices, torch.full((R,), float("nan")))
    z.backward()
    assert float(z.detach()) == 0.0 and torch.equal(w.grad, torch.zeros(S))
    # bounded: a unit of weight anywhere costs at most 1, half of that at the tolerance
    far = torch.tensor([1e6, 1.05])
    assert float(depth_spread_loss(torch.ones(1), far[:1], torch.tensor([0]), torch.tensor([1.0]))) <= 1
    assert float(depth_spread_loss(torch.ones(1), far[1:], torch.tensor([0]), torch.tensor([1.0]), scale=0.05)) == \
        pytest.approx(0.5, rel=1e-4)


def test_the_batcher_keeps_only_the_pixels_with_a_target_and_looks_them_up():
    from vqad.nerf.rays import RayBatcher

    ds = load_dataset("procedural")
    batcher = RayBatcher(ds.splits["train"], ds, "cpu")
    dense = torch.rand(batcher.N, batcher.H, batcher.W) * 3 + 1
    dense[torch.rand(dense.shape) < 0.9] = float("nan")
    sparse = DepthTargets.from_dense(dense)
    assert len(sparse) == int(torch.isfinite(dense).sum()) and bool((sparse.ids[1:] > sparse.ids[:-1]).all())
    assert torch.equal(torch.isnan(sparse.dense()), torch.isnan(dense))
    assert torch.equal(sparse.dense()[torch.isfinite(dense)], dense[torch.isfinite(dense)])
    assert sparse.pixel_map is None  # 10 % of the pixels: the list is the smaller form
    sparse.give_to(batcher)
    flat = torch.randint(0, batcher.num_rays, (5000,), generator=torch.Generator().manual_seed(1))
    got, want = batcher.depth_targets_for(flat), dense.reshape(-1)[flat] * ds.normalization.scale
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.allclose(got[torch.isfinite(got)], want[torch.isfinite(want)])
    none = DepthTargets.from_dense(torch.full_like(dense, float("nan")))  # no target anywhere
    batcher.set_depth_targets(none.ids, none.distances)
    assert torch.isnan(batcher.depth_targets_for(flat)).all()
    with pytest.raises(ValueError, match="ascending"):  # out of range, or not sorted
        batcher.set_depth_targets(torch.tensor([batcher.num_rays]), torch.ones(1))
    with pytest.raises(ValueError, match="ascending"):
        batcher.set_depth_targets(torch.tensor([5, 3]), torch.ones(2))
    with pytest.raises(ValueError, match="2 pixel ids for 1"):
        batcher.set_depth_targets(torch.tensor([3, 5]), torch.ones(1))


@pytest.mark.parametrize("share", [0.0, 0.2, 0.34, 0.6, 1.0])
def test_depth_targets_keep_the_smaller_form_and_both_forms_look_up_alike(share):
    """A map of every pixel from a third of them with a target (4 bytes a pixel against 12 a target),
    the list below; built from either form, looked up by the batcher in either, against brute force."""
    from vqad.nerf.depth_prior import DENSE_SHARE
    from vqad.nerf.rays import RayBatcher

    ds = load_dataset("procedural")
    batcher = RayBatcher(ds.splits["train"], ds, "cpu")
    gen = torch.Generator().manual_seed(int(share * 100))
    dense = torch.rand(batcher.N, batcher.H, batcher.W, generator=gen) * 3 + 1
    dense[torch.rand(dense.shape, generator=gen) >= share] = float("nan")
    dense.view(-1)[:7] = torch.tensor([float("inf"), -float("inf"), float("nan"), 2.0, 2.5, float("nan"), 1.5])
    finite = torch.isfinite(dense)
    from_map = DepthTargets.from_dense(dense)
    ids = torch.nonzero(finite.reshape(-1))[:, 0]
    from_list = DepthTargets.of(tuple(dense.shape), ids, dense.reshape(-1)[ids])
    as_map = int(finite.sum()) >= DENSE_SHARE * dense.numel()
    flat = torch.randint(0, batcher.num_rays, (4000,), generator=gen)
    want = torch.where(finite.reshape(-1), dense.reshape(-1), float("nan"))[flat] * ds.normalization.scale
    for t in (from_map, from_list):
        assert len(t) == int(finite.sum()) and (t.pixel_map is not None) == as_map and (t.ids is None) == as_map
        assert torch.equal(torch.isnan(t.dense()), ~finite)
        assert torch.equal(t.dense()[finite], dense[finite])
        t.give_to(batcher)
        assert batcher.has_depth_targets
        got = batcher.depth_targets_for(flat)
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.equal(got[~torch.isnan(got)], want[~torch.isnan(want)])
    with pytest.raises(ValueError, match="depth map of shape"):
        batcher.set_depth_map(dense[:1])
    with pytest.raises(ValueError, match="a map of"):
        DepthTargets.of((2, 3, 4), pixel_map=torch.zeros(23))


def test_depth_maps_give_each_pixel_with_a_hit_its_ray_distance():
    """Depth maps' targets (z-depth times each pixel's ray length per unit z), in the form their share
    picks, against brute force view by view."""
    from vqad.nerf.depth_prior import DENSE_SHARE
    from vqad.nerf.rays import camera_directions, pixel_centers

    proc = load_dataset("procedural")
    t = depth_targets(proc, "capture")
    views = proc.splits["train"]
    H, W = views.hw
    assert (t.pixel_map is not None) == (len(t) >= DENSE_SHARE * len(views) * H * W)
    assert len(t) == int((views.depth > 0).sum())
    for n in (0, len(views) - 1):
        per_z = camera_directions(views.intrinsics[n].float(), pixel_centers(H, W)).norm(dim=-1).view(H, W)
        z = views.depth[n].float()
        want = torch.where(z > 0, z * per_z, float("nan"))
        assert torch.equal(torch.isnan(t.dense()[n]), torch.isnan(want))
        assert torch.allclose(t.dense()[n][z > 0], want[z > 0])


def test_depth_source_resolves_and_says_what_a_capture_lacks():
    proc = load_dataset("procedural")  # depth maps, no sparse points
    assert depth_source(proc, "auto") == "capture"
    with pytest.raises(InputError, match="has no sparse points .*, but it has depth maps: use --depth-from capture"):
        depth_source(proc, "points")  # (it said the scene had no depth maps)
    proc.splits["train"].depth, maps = None, proc.splits["train"].depth
    try:
        for source in ("auto", "points"):
            with pytest.raises(InputError, match="no depth maps and no sparse points"):
                depth_source(proc, source)
    finally:
        proc.splits["train"].depth = maps
    t = depth_targets(proc, "auto")
    assert t.shape == (len(proc.splits["train"]), *proc.splits["train"].hw) and len(t) > 0


def test_in_a_contracted_scene_only_the_shells_points_give_targets(tmp_path):
    """Every target's point (its pixel's centre ray at the target distance) lies outside the central box,
    up to a pixel's footprint; without contraction (the object alone) the central box's points count."""
    from vqad.nerf.rays import RayBatcher

    for aabb, outside in [(4, True), (1, False)]:
        cap = tmp_path / f"cap{aabb}"
        assert cli_main(["synth-capture", "-o", str(cap), "--aabb-scale", str(aabb), "--size", "24x40",
                         "--views", "8"] + ([] if outside else ["--no-background"])) == 0
        ds = load_dataset(str(cap), format="ngp")
        t = depth_targets(ds, "points").dense().reshape(-1)
        ok = torch.isfinite(t)
        assert ok.sum() > 50
        o, d, _, _, _ = RayBatcher(ds.splits["train"], ds, "cpu").rays_for(torch.nonzero(ok)[:, 0])
        x = o + d * (t[ok] * ds.normalization.scale)[:, None]  # unit-cube points
        far = x.abs().amax(-1) > 1.0
        if outside:
            assert ds.outer_scale > 1 and far.float().mean() > 0.95 and x.abs().amax(-1).min() > 0.9
        else:
            assert ds.outer_scale == 1 and not far.any()


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vqad: error:"), err
    return err[0]


def test_fit_nerf_depth_loss_is_on_by_default_in_a_room_with_sparse_points(tmp_path, capsys):
    """auto: a contracted capture with sparse points trains with DEPTH_WEIGHT_CONTRACTED and records it; a bounded one
    (the object alone) with 0; flags that cannot apply, and a capture without targets, are one-line errors
    before anything is written."""
    from vqad.nerf.task import DEPTH_WEIGHT_CONTRACTED

    cap = tmp_path / "cap"
    assert cli_main(["synth-capture", "-o", str(cap), "--aabb-scale", "4", "--size", "24x40", "--views", "10"]) == 0
    obj = tmp_path / "obj"
    assert cli_main(["synth-capture", "-o", str(obj), "--aabb-scale", "1", "--size", "24x40", "--views", "6",
                     "--no-background"]) == 0
    bare = tmp_path / "bare"
    assert cli_main(["synth-capture", "-o", str(bare), "--size", "24x40", "--views", "6", "--points", "0"]) == 0
    opts = ["--format", "ngp", "--levels", "3:5", "--steps", "20", "--batch-rays", "256", "--device", "cpu", "--no-eval"]
    capsys.readouterr()
    assert cli_main(["fit-nerf", str(cap), "--out", str(tmp_path / "a")] + opts) == 0
    assert f"depth loss: λ = {DEPTH_WEIGHT_CONTRACTED:g} on" in capsys.readouterr().out
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["train"]["depth_weight"] == DEPTH_WEIGHT_CONTRACTED and m["train"]["depth_from"] == "auto"
    assert cli_main(["fit-nerf", str(obj), "--out", str(tmp_path / "o"), "--quiet"] + opts) == 0
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["train"]["depth_weight"] == 0.0
    # the object alone in a contracted box: its points all lie in the central box, so auto has no target
    # and turns the loss off (recorded as off); asked for explicitly, it cannot apply: a one-line error
    obj4 = tmp_path / "obj4"
    assert cli_main(["synth-capture", "-o", str(obj4), "--aabb-scale", "4", "--size", "24x40", "--views", "6",
                     "--no-background"]) == 0
    capsys.readouterr()
    fine = opts[:2] + ["--levels", "4:7"] + opts[4:]  # at 3:5 the coarse cells keep a few outliers outside the box
    assert cli_main(["fit-nerf", str(obj4), "--out", str(tmp_path / "o4"), "--octree", "points"] + fine) == 0
    assert "depth loss: off (auto: no sparse point outside the central box" in capsys.readouterr().out
    assert json.loads((tmp_path / "o4" / "metrics.json").read_text())["train"]["depth_weight"] == 0.0
    # a resumed 'auto' fit keeps the λ its checkpoint recorded, targets or not (as one from before the
    # turn-off would have): it is no explicit --depth-weight to refuse
    ck = tmp_path / "o4" / "checkpoint" / "config.json"
    cfg = json.loads(ck.read_text())
    cfg["train"]["depth_weight"] = 0.01
    ck.write_text(json.dumps(cfg))
    steps = fine.index("--steps") + 1
    assert cli_main(["fit-nerf", str(obj4), "--out", str(tmp_path / "o4"), "--resume"]
                    + fine[:steps] + ["25"] + fine[steps + 1:]) == 0
    capsys.readouterr()
    assert cli_main(["fit-nerf", str(obj4), "--out", str(tmp_path / "o4b"), "--octree", "points",
                     "--depth-weight", "0.01"] + fine) == 2
    assert "--depth-weight 0.01: no training pixel gets a depth target" in _err(capsys)
    assert not (tmp_path / "o4b" / "checkpoint" / "config.json").exists()
    for src, extra, message in [(cap, ["--depth-weight", "0", "--depth-from", "points"], "--depth-from"),
                                (obj, ["--depth-from", "points"], "which is off here"),
                                (cap, ["--depth-from", "capture"], "has no depth maps"),
                                (cap, ["--depth-weight", "-1"], "--depth-weight"),
                                (bare, ["--depth-weight", "0.01", "--octree", "density"], "no sparse points")]:
        out = tmp_path / "refused"
        assert cli_main(["fit-nerf", str(src), "--out", str(out)] + opts + extra) == 2, extra
        assert message in _err(capsys), extra
        assert not out.exists()


def test_auto_depth_weight_is_off_where_depth_maps_would_give_the_targets(tmp_path):
    """'auto' (λ = 0.03) was measured with the sparse points' targets on a contracted room; a capture with
    depth maps as well would give the loss dense targets on every pixel, never measured: it stays off
    there unless the points are asked for."""
    from dataclasses import replace

    from vqad.nerf.fit import resolve_depth_weight
    from vqad.nerf.formats import load_dataset
    from vqad.nerf.scene_capture import SceneCaptureConfig, write_capture
    from vqad.nerf.task import DEPTH_WEIGHT_CONTRACTED, NeRFTrainConfig

    path = write_capture(tmp_path / "cap", SceneCaptureConfig(width=24, height=40, views=10, points=2000,
                                                              supersample=1), depth=True)
    ds = load_dataset(path.parent, format="ngp")
    assert ds.outer_scale > 1 and ds.points is not None and ds.splits["train"].depth is not None
    cfg = NeRFTrainConfig()
    assert resolve_depth_weight(cfg, ds).depth_weight == 0.0
    assert resolve_depth_weight(replace(cfg, depth_from="points"), ds).depth_weight == DEPTH_WEIGHT_CONTRACTED
    assert resolve_depth_weight(replace(cfg, depth_weight=0.05), ds).depth_weight == 0.05  # given: as given
