"""Loss masks: the pixels a capture says to train on and score (nerfstudio's ``mask_path``, instant-ngp's
``dynamic_mask_*.png``), from the reader through the ray sampler to the held-out scores."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqad.errors import InputError
from vqad.metrics import psnr, ssim, ssim_map
from vqad.nerf.data import Views, mask_summary
from vqad.nerf.formats import load_dataset
from vqad.nerf.formats.common import HOLD_EVERY


def _capture(tmp_path, name="cap", views=9, w=8, h=12, depth=False, transients=0):
    from vqad.nerf.scene_capture import SceneCaptureConfig, write_capture

    path = write_capture(tmp_path / name, SceneCaptureConfig(width=w, height=h, views=views, points=200, supersample=1,
                                                              transients=transients), depth=depth)
    return path.parent, path, json.loads(path.read_text())


def _pattern(h, w, seed):
    """A mask with some pixels off: ``(h, w) bool``, True = on."""
    return np.random.default_rng(seed).random((h, w)) > 0.3


def _white_masks(root, meta, h=12, w=8):
    """Every frame a mask that keeps every pixel (nerfstudio: a mask on every frame or none)."""
    Image.fromarray(np.full((h, w), 255, np.uint8), "L").save(root / "white.png")
    for fr in meta["frames"]:
        fr["mask_path"] = "white.png"


def _train_rows(meta):
    """The frame indices of the training split, in its order (every HOLD_EVERY-th frame is held out)."""
    return [i for i in range(len(meta["frames"])) if i % HOLD_EVERY != 0]


# -- readers --------------------------------------------------------------------------------------------
def test_mask_path_white_is_kept_black_left_out(tmp_path):
    """nerfstudio's mask_path: a non-zero pixel is trained on, 0 is left out; a frame without one keeps every
    pixel; a mask that keeps everything leaves the split without masks."""
    root, path, meta = _capture(tmp_path)
    _white_masks(root, meta)  # every frame keeps every pixel, but these:
    (root / "m").mkdir()
    want = {}
    for i in (1, 3, 4):
        on = _pattern(12, 8, i)
        want[i] = on
        Image.fromarray(np.where(on, 200, 0).astype(np.uint8), "L").save(root / f"m/{i}.png")
        meta["frames"][i]["mask_path"] = f"m/{i}.png"
    path.write_text(json.dumps(meta))
    ds = load_dataset(root, format="ngp")
    train = ds.splits["train"]
    for row, i in enumerate(_train_rows(meta)):
        expect = want.get(i, np.ones((12, 8), bool))
        assert np.array_equal(train.valid[row].numpy(), expect), i
    assert ds.splits["test"].valid is None
    assert mask_summary(train) == f", loss masks: 3 views ({1 - train.valid.float().mean():.1%} of the pixels left out)"
    assert mask_summary(ds.splits["test"]) == ""
    del meta["frames"][2]["mask_path"]  # a frame without: a typo more often than a choice, as nerfstudio takes it
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="8 of its 9 frames name a mask_path"):
        load_dataset(root, format="ngp")
    for fr in meta["frames"]:
        fr.pop("mask_path", None)
    meta["mask_path"] = "white.png"
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="mask_path is a frame's key"):
        load_dataset(root, format="ngp")


def test_dynamic_masks_mark_what_to_leave_out(tmp_path):
    """instant-ngp's dynamic_mask_<stem>.png beside the image: a pixel with any non-zero colour channel is left
    out (the reverse of mask_path); a smaller mask is resized by nearest neighbour."""
    root, path, meta = _capture(tmp_path)
    i = 2
    image = root / meta["frames"][i]["file_path"]
    off = ~_pattern(6, 4, 7)  # half the image's size
    rgb = np.zeros((6, 4, 3), np.uint8)
    rgb[off, 1] = 3  # any channel counts
    Image.fromarray(rgb, "RGB").save(image.parent / f"dynamic_mask_{image.stem}.png")
    ds = load_dataset(root, format="ngp")
    row = _train_rows(meta).index(i)
    expect = ~np.repeat(np.repeat(off, 2, 0), 2, 1)
    assert np.array_equal(ds.splits["train"].valid[row].numpy(), expect)
    # both conventions on one frame mean opposite things: refused
    Image.fromarray(np.full((12, 8), 255, np.uint8), "L").save(root / "keep.png")
    meta["frames"][i]["mask_path"] = "keep.png"
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="both mask_path keep.png .*opposite things"):
        load_dataset(root, format="ngp")


def test_masks_downscale_keep_only_whole_blocks_and_clean_depth(tmp_path):
    """--downscale 2 keeps a pixel only where all four of its pixels are kept (brute force); a left-out pixel's
    depth is dropped, and the depth a depth sensor saw of a passer-by with it."""
    root, path, meta = _capture(tmp_path, views=9, w=8, h=12, depth=True, transients=2)
    for d in (1, 2):
        ds = load_dataset(root, format="ngp", downscale=d)
        train = ds.splits["train"]
        for row, i in enumerate(_train_rows(meta)):
            on = np.asarray(Image.open(root / meta["frames"][i]["mask_path"])) != 0
            expect = on.reshape(12 // d, d, 8 // d, d).min(axis=(1, 3)).astype(bool)
            assert np.array_equal(train.valid[row].numpy(), expect), (d, i)
        assert bool((train.depth[~train.valid] == 0).all())
        assert bool((train.depth[train.valid] > 0).any())


def test_jpeg_masks_threshold_at_half(tmp_path):
    """A JPEG mask's noise lifts black to a few grey levels: such a mask is on from 128 up."""
    root, path, meta = _capture(tmp_path)
    on = np.zeros((12, 8), bool)
    on[:, :4] = True
    Image.fromarray(np.where(on, 250, 0).astype(np.uint8), "L").save(root / "m.jpg", quality=60)
    assert (np.asarray(Image.open(root / "m.jpg"))[~on] > 0).any()  # ringing: "non-zero" would keep those
    _white_masks(root, meta)
    meta["frames"][1]["mask_path"] = "m.jpg"
    path.write_text(json.dumps(meta))
    ds = load_dataset(root, format="ngp")
    assert np.array_equal(ds.splits["train"].valid[0].numpy(), on)


@pytest.mark.parametrize("value,make,match", [
    ("nowhere.png", None, "mask_path 'nowhere.png' not found"),
    (7, None, "mask_path must be a path"),
    ("../outside.png", None, "points outside the capture folder"),
    ("big.png", (30, 17), "must be the image.s size, smaller with its aspect ratio, or a whole factor"),
    ("wide.png", (6, 6), "must be the image.s size, smaller with its aspect ratio, or a whole factor"),
    ("text.png", "text", "cannot read the mask"),
])
def test_bad_masks_are_refused(tmp_path, value, make, match):
    root, path, meta = _capture(tmp_path)
    _white_masks(root, meta)
    if isinstance(make, tuple):
        Image.fromarray(np.full(make, 255, np.uint8), "L").save(root / value)
    elif make == "text":
        (root / value).write_text("not a picture")
    meta["frames"][1]["mask_path"] = value
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match=match):
        load_dataset(root, format="ngp")


def test_a_mask_that_leaves_out_everything_is_warned_and_a_split_of_them_refused(tmp_path):
    from vqad.nerf.rays import RayBatcher

    root, path, meta = _capture(tmp_path, views=3)
    Image.fromarray(np.zeros((12, 8), np.uint8), "L").save(root / "black.png")
    _white_masks(root, meta)
    meta["frames"][1]["mask_path"] = "black.png"
    path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="masks leave out every pixel .*polarity"):
        ds = load_dataset(root, format="ngp")
    RayBatcher(ds.splits["train"], ds, torch.device("cpu"))  # the other view still trains
    for fr in meta["frames"]:
        fr["mask_path"] = "black.png"
    path.write_text(json.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = load_dataset(root, format="ngp")
    batcher = RayBatcher(ds.splits["train"], ds, torch.device("cpu"))  # rendering such views is fine
    assert batcher.view(0)[0].shape == (96, 3)
    with pytest.raises(InputError, match="leave out every pixel of these views"):
        batcher.sample_ids(4, torch.Generator())
    from vqad.nerf.data import require_training_pixels

    with pytest.raises(InputError, match="leave out every pixel of the training views"):
        require_training_pixels(ds.splits["train"])


def test_masked_pixels_count_as_foreground_for_carving(tmp_path):
    """An RGBA capture's alpha carves empty space; a pixel its loss mask leaves out is no evidence of it."""
    root, path, meta = _capture(tmp_path, views=3)
    image = root / meta["frames"][1]["file_path"]
    rgba = np.zeros((12, 8, 4), np.uint8)  # transparent everywhere
    Image.fromarray(rgba, "RGBA").save(image)
    on = _pattern(12, 8, 3)
    Image.fromarray(np.where(on, 255, 0).astype(np.uint8), "L").save(root / "m.png")
    _white_masks(root, meta)
    meta["frames"][1]["mask_path"] = "m.png"
    path.write_text(json.dumps(meta))
    ds = load_dataset(root, format="ngp")
    alpha = ds.splits["train"].masks[0].numpy()
    assert (alpha[~on] == 255).all() and (alpha[on] == 0).all()


def test_views_check_their_masks():
    with pytest.raises(ValueError, match="loss masks must be bool of shape"):
        Views(images=torch.zeros(2, 3, 4, 3, dtype=torch.uint8), c2w=torch.eye(4).repeat(2, 1, 1),
              intrinsics=torch.ones(2, 4), valid=torch.ones(2, 4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="loss masks must be bool"):
        Views(images=torch.zeros(2, 3, 4, 3, dtype=torch.uint8), c2w=torch.eye(4).repeat(2, 1, 1),
              intrinsics=torch.ones(2, 4), valid=torch.ones(2, 3, 4, dtype=torch.uint8))


# -- training: the sampler draws kept pixels only, uniformly -------------------------------------------------
def test_the_ray_sampler_draws_only_kept_pixels_uniformly(tmp_path):
    from vqad.nerf.rays import RayBatcher

    root, path, meta = _capture(tmp_path, views=9, transients=2)
    ds = load_dataset(root, format="ngp")
    train = ds.splits["train"]
    b = RayBatcher(train, ds, torch.device("cpu"))
    kept = torch.nonzero(train.valid.reshape(-1))[:, 0]
    assert b.num_valid == kept.numel() < b.num_rays
    ids = b.sample_ids(200_000, torch.Generator().manual_seed(0))
    assert bool(train.valid.reshape(-1)[ids].all())
    counts = torch.bincount(ids, minlength=b.num_rays)[kept].float()
    expect = 200_000 / kept.numel()
    assert bool((counts > 0).all())
    chi2 = float(((counts - expect) ** 2 / expect).sum())  # uniform: chi² ≈ its degrees of freedom
    assert chi2 < 1.2 * kept.numel()
    o, d, rgb, near, far = b.sample(64, torch.Generator().manual_seed(1))
    assert o.shape == (64, 3) and rgb.shape == (64, 3)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (2, 8, 8), (4, 9, 13), (1, 1, 200)])
def test_kept_pixels_find_the_kth_kept_pixel_as_a_sorted_list_would(shape):
    """KeptPixels against the list of kept ids it replaces (brute force): every rank, in words that straddle
    views and in a last word cut short, at random shares kept, with the counts as int32 and as int64."""
    from vqad.nerf.rays import KeptPixels

    gen = torch.Generator().manual_seed(sum(shape))
    for share in (0.0, 0.03, 0.5, 0.97, 1.0):
        valid = torch.rand(shape, generator=gen) < share
        listed = torch.nonzero(valid.reshape(-1))[:, 0]
        kept = KeptPixels(valid, torch.device("cpu"))
        assert kept.count == listed.numel() and kept.starts.dtype == torch.int32
        k = torch.arange(kept.count)
        assert torch.equal(kept.nth(k), listed) and kept.nth(k).dtype == torch.int64
        kept.starts = kept.starts.long()  # as past 2^31 kept pixels
        assert torch.equal(kept.nth(k.flip(0)), listed.flip(0))


def test_kept_pixels_draw_what_the_list_of_ids_drew():
    """The same generator draws the same pixels as the sorted-list sampler before KeptPixels: fits reproduce."""
    from vqad.nerf.rays import KeptPixels

    valid = torch.rand(6, 31, 45, generator=torch.Generator().manual_seed(5)) < 0.8
    ids = torch.nonzero(valid.reshape(-1))[:, 0]
    kept = KeptPixels(valid, torch.device("cpu"))
    k = torch.randint(0, kept.count, (5000,), generator=torch.Generator().manual_seed(9))
    assert torch.equal(kept.nth(k), ids[k])


# -- scores ---------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Skipping Gaussian Smoothing")
def test_masked_psnr_and_ssim_against_brute_force():
    from pytorch_msssim import ssim as reference

    g = torch.Generator().manual_seed(0)
    for h, w in [(40, 30), (5, 30), (1, 20), (12, 1), (11, 11)]:
        a = torch.rand(h, w, 3, generator=g)
        b = (a + 0.1 * torch.randn(h, w, 3, generator=g)).clamp(0, 1)
        m, (oy, ox) = ssim_map(a, b)
        assert m.mean().item() == pytest.approx(ssim(a, b), abs=1e-6)
        keep = torch.rand(h, w, generator=g) > 0.4
        keep[0, 0] = True
        mse = sum(float(((a[r, c] - b[r, c]) ** 2).sum()) for r in range(h) for c in range(w) if keep[r, c]) / (3 * int(keep.sum()))
        assert psnr(a, b, keep) == pytest.approx(-10 * math.log10(mse), abs=1e-4)
        assert psnr(a, b, torch.ones(h, w, dtype=torch.bool)) == pytest.approx(psnr(a, b), abs=1e-5)
        assert ssim(a, b, torch.ones(h, w, dtype=torch.bool)) == pytest.approx(ssim(a, b), abs=1e-5)
        centres = [m[r - oy, c - ox].item() for r in range(oy, oy + m.shape[0]) for c in range(ox, ox + m.shape[1]) if keep[r, c]]
        if centres:
            assert ssim(a, b, keep) == pytest.approx(sum(centres) / len(centres), abs=1e-5)
        border = torch.zeros(h, w, dtype=torch.bool)  # kept pixels where no window is centred: the nearest windows
        border[0, 0] = border[-1, -1] = True
        if oy + ox:
            assert ssim(a, b, border) == pytest.approx(0.5 * (m[0, 0].item() + m[-1, -1].item()), abs=1e-5)
        assert math.isnan(psnr(a, b, torch.zeros(h, w, dtype=torch.bool)))
        assert math.isnan(ssim(a, b, torch.zeros(h, w, dtype=torch.bool)))
        # pytorch-msssim, the reference (which refuses a 1-px side: repeated, the score is the same)
        reps = (1, 1, 2 if h == 1 else 1, 2 if w == 1 else 1)
        ref = reference(a.permute(2, 0, 1)[None].repeat(reps), b.permute(2, 0, 1)[None].repeat(reps), data_range=1.0,
                        win_size=11, win_sigma=1.5)
        assert ssim(a, b) == pytest.approx(float(ref), abs=1e-6)


def _window_ssim(a, b, r0, c0):
    """SSIM of the window at map position (r0, c0), from its Gaussian-weighted statistics written out (the
    window spans 11 pixels along a side of 11 or more, one pixel along a shorter side)."""
    x = np.arange(11) - 5
    g = np.exp(-x * x / (2 * 1.5 ** 2))
    g /= g.sum()
    h, w = a.shape[:2]
    rows, wr = (range(r0, r0 + 11), g) if h >= 11 else ([r0], np.ones(1))
    cols, wc = (range(c0, c0 + 11), g) if w >= 11 else ([c0], np.ones(1))
    out = []
    for ch in range(3):
        pa = np.array([[float(a[r, c, ch]) for c in cols] for r in rows])
        pb = np.array([[float(b[r, c, ch]) for c in cols] for r in rows])
        wt = np.outer(wr, wc)
        ma, mb = (wt * pa).sum(), (wt * pb).sum()
        va, vb = (wt * pa * pa).sum() - ma * ma, (wt * pb * pb).sum() - mb * mb
        cov = (wt * pa * pb).sum() - ma * mb
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        out.append((2 * ma * mb + c1) / (ma * ma + mb * mb + c1) * (2 * cov + c2) / (va + vb + c2))
    return float(np.mean(out))


def test_the_ssim_map_window_by_window():
    """Every few windows of the map against the statistics written out, on sides longer and shorter than the
    window: a shifted or transposed map would keep its mean and fail here."""
    g = torch.Generator().manual_seed(3)
    for h, w in [(20, 17), (7, 30), (30, 4)]:
        a = torch.rand(h, w, 3, generator=g)
        b = (a + 0.2 * torch.randn(h, w, 3, generator=g)).clamp(0, 1)
        m, (oy, ox) = ssim_map(a, b)
        assert (oy, ox) == ((5 if h >= 11 else 0), (5 if w >= 11 else 0))
        for r0 in range(0, m.shape[0], 3):
            for c0 in range(0, m.shape[1], 4):
                assert m[r0, c0].item() == pytest.approx(_window_ssim(a, b, r0, c0), abs=2e-5)


def test_evaluation_scores_the_kept_pixels_and_skips_a_view_with_none(monkeypatch):
    """evaluate_nerf with loss masks on the held-out views: PSNR over the kept pixels (brute force), and a view
    whose mask keeps nothing is not scored."""
    import vqad.nerf.evaluate as ev
    from vqad.nerf.procedural import ProceduralConfig, procedural_dataset

    ds = procedural_dataset(ProceduralConfig(resolution=16, n_train=2, n_test=3))
    test = ds.splits["test"]
    g = torch.Generator().manual_seed(0)
    valid = torch.rand(3, 16, 16, generator=g) > 0.5
    valid[1] = False
    valid[1, :, :3] = True  # kept pixels only in the border no SSIM window is centred on: still a number
    valid[2] = False
    test.valid = valid
    renders = [torch.rand(16, 16, 3, generator=g) for _ in range(3)]
    truth = [test.images[i].float() / 255 for i in range(3)]

    rendered = []

    def fake_render_views(field, dataset, split, lods, sampler=None, max_views=None, indices=None, **kw):
        for i in (range(3) if indices is None else indices):
            rendered.append(i)
            yield i, f"{i}", renders[i][None], torch.zeros(1, 16, 16), torch.ones(1, 16, 16), truth[i]

    class Field:
        lods = [4]

        def check_lod(self, lod):
            assert lod in self.lods
            return lod

    monkeypatch.setattr(ev, "render_views", fake_render_views)
    out = ev.evaluate_nerf(Field(), ds, "test", sampler=object(), save_images=False)
    want = [-10 * math.log10(float(((renders[i] - truth[i]) ** 2)[valid[i]].mean())) for i in range(2)]
    assert out[4]["views"] == 2 and out[4]["masked"]
    assert out[4]["psnr"] == pytest.approx(sum(want) / 2, abs=1e-4)
    assert "the pixels their loss masks keep" in ev.metric_lines(out)[0] and math.isfinite(out[4]["ssim"])
    assert rendered == [0, 1] and out[4]["rendered"] == 2  # nothing saved: the view it cannot score is not rendered

    class Spent:  # a job whose time cap is already spent still scores one view, past those it cannot score
        def left(self):
            return 0.0

    valid[0] = False
    rendered.clear()
    out = ev.evaluate_nerf(Field(), ds, "test", sampler=object(), save_images=False, deadline=Spent())
    assert rendered == [1] and out[4]["views"] == 1 and "left_out_by_time_cap" not in out[4]
    test.valid = torch.ones(3, 16, 16, dtype=torch.bool)  # three scorable views, the cap spent after the first
    out = ev.evaluate_nerf(Field(), ds, "test", sampler=object(), save_images=False, deadline=Spent())
    assert out[4]["views"] == 1 and out[4]["left_out_by_time_cap"] == 2
    assert "(1 view, the pixels their loss masks keep; 2 more left out by the time cap)" in ev.metric_lines(out)[0]
    line = ev.metric_lines({4: {"psnr": 20.0, "ssim": 0.5, "views": 1, "rendered": 2, "masked": True}})[0]
    assert "(1 of 2 views, the pixels their loss masks keep)" in line
    test.valid = torch.zeros(3, 16, 16, dtype=torch.bool)
    with pytest.raises(InputError, match="keep no pixel"):
        ev.evaluate_nerf(Field(), ds, "test", sampler=object(), save_images=False)


# -- the generated capture's passers-by -------------------------------------------------------------------
def test_generated_passers_by_are_exactly_what_the_masks_leave_out(tmp_path):
    from vqad.nerf.scene_capture import SceneCaptureConfig, passers_by, render_capture

    cfg = SceneCaptureConfig(width=16, height=24, views=10, points=0, supersample=1, transients=3)
    root, path, meta = _capture(tmp_path, views=10, w=16, h=24, transients=3, depth=True)
    clean, _, _ = render_capture(cfg)
    for i, fr in enumerate(meta["frames"]):
        img = np.asarray(Image.open(root / fr["file_path"]).convert("RGB"))
        keep = np.asarray(Image.open(root / fr["mask_path"])) != 0
        people, rgb, z = passers_by(cfg, i)
        assert np.array_equal(keep, ~people)
        assert np.array_equal(img[keep], clean[i, ..., :3].numpy()[keep])  # elsewhere the static scene
        assert np.array_equal(img[people], rgb[people])
        depth = np.asarray(Image.open(root / fr["depth_file_path"])).astype(np.float64) * 1e-3
        assert np.allclose(depth[people], z[people], atol=1e-3)
        if i % HOLD_EVERY == 0:
            assert keep.all()  # the frames the readers hold out are clean
        else:
            assert 0.01 < people.mean() < 0.9
    with pytest.raises(InputError, match="transients must be a whole number"):
        SceneCaptureConfig(transients=9).validate()


def test_a_capture_with_passers_by_fits_from_the_command_line(tmp_path, capsys):
    from vqad.app.cli import main as cli_main

    cap = tmp_path / "street"
    assert cli_main(["synth-capture", "-o", str(cap), "--size", "16x24", "--views", "9", "--supersample", "1",
                     "--transients", "2"]) == 0
    assert "2 passers-by a training view with loss masks" in capsys.readouterr().out
    assert cli_main(["fit-nerf", str(cap), "--format", "ngp", "--levels", "3:5", "--features", "4", "--steps", "20",
                     "--batch-rays", "256", "--out", str(tmp_path / "fit"), "--device", "cpu", "--quiet",
                     "--eval-max-views", "1"]) == 0
    text = capsys.readouterr().out
    assert "loss masks: 7 views (" in text and "LOD 5: PSNR" in text
    assert cli_main(["synth-capture", "-o", str(tmp_path / "crowd"), "--transients", "9"]) != 0
    assert "transients must be a whole number" in capsys.readouterr().err


# -- a hostile pass's findings ------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_mask_files_of_every_kind_and_the_odd_ones(tmp_path, monkeypatch):
    """A palette mask_path is read by index (as nerfstudio), a dynamic mask by colour (as instant-ngp); a mask
    whose alpha alone varies is refused; lossy WebP thresholds at 128; NaN is refused; a folder, a name too
    long and a decompression bomb are refused in words."""
    from PIL import Image as PILImage

    root, path, meta = _capture(tmp_path)
    _white_masks(root, meta)
    on = _pattern(12, 8, 5)
    pal = PILImage.fromarray(np.where(on, 1, 0).astype(np.uint8), "P")
    pal.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)  # index 0 white, 1 black: the index decides
    pal.save(root / "pal.png")
    meta["frames"][1]["mask_path"] = "pal.png"
    path.write_text(json.dumps(meta))
    assert np.array_equal(load_dataset(root, format="ngp").splits["train"].valid[0].numpy(), on)

    rgba = np.zeros((12, 8, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = np.where(on, 255, 0)
    PILImage.fromarray(rgba, "RGBA").save(root / "alpha.png")
    meta["frames"][1]["mask_path"] = "alpha.png"
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="one colour with a varying alpha channel"):
        load_dataset(root, format="ngp")

    PILImage.fromarray(np.where(on, 250, 0).astype(np.uint8), "L").save(root / "m.webp", quality=30)
    meta["frames"][1]["mask_path"] = "m.webp"
    path.write_text(json.dumps(meta))
    assert np.array_equal(load_dataset(root, format="ngp").splits["train"].valid[0].numpy(), on)

    PILImage.fromarray(np.where(on, 1.0, np.nan).astype(np.float32), "F").save(root / "nan.tiff")
    meta["frames"][1]["mask_path"] = "nan.tiff"
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="not numbers"):
        load_dataset(root, format="ngp")

    (root / "folder.png").mkdir()
    meta["frames"][1]["mask_path"] = "folder.png"
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="mask_path 'folder.png' is not a regular file"):
        load_dataset(root, format="ngp")
    meta["frames"][1]["mask_path"] = "x" * 5000 + ".png"
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="cannot be looked up"):
        load_dataset(root, format="ngp")

    PILImage.fromarray(np.full((24, 16), 255, np.uint8), "L").save(root / "bomb.png")
    meta["frames"][1]["mask_path"] = "bomb.png"
    path.write_text(json.dumps(meta))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 48)  # the photos (96 px) pass, a mask of 384 px is a "bomb"
    with pytest.raises(InputError, match="cannot read the mask .*bomb.png.*decompression bomb"):
        load_dataset(root, format="ngp")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 40)  # and a photo too
    with pytest.raises(InputError, match="cannot read the image .*decompression bomb"):
        load_dataset(root, format="ngp")


def test_messages_name_what_emptied_a_mask(tmp_path):
    """A mask emptied by --downscale says so (not "check the polarity"); splits that share their frames are
    named together; a share too close to 100 % is said in pixels."""
    root, path, meta = _capture(tmp_path, views=9, w=8, h=12)
    _white_masks(root, meta)
    sparse = np.zeros((12, 8), np.uint8)
    sparse[::2, ::2] = 255  # keeps pixels, but no whole 2×2 block
    Image.fromarray(sparse, "L").save(root / "sparse.png")
    Image.fromarray(np.zeros((12, 8), np.uint8), "L").save(root / "black.png")
    meta["frames"][0]["mask_path"] = "sparse.png"  # held out: in 'val' and 'test'
    meta["frames"][1]["mask_path"] = "black.png"
    path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning) as caught:
        ds = load_dataset(root, format="ngp", downscale=2)
    said = " | ".join(str(w.message) for w in caught)
    assert "1 of the 'val' and 'test' views' masks leave out every pixel" in said and "(up to 2×2 here: --downscale 2" in said
    assert "1 of the 'train' views' masks leave out every pixel" in said and "polarity" in said
    one = torch.zeros(2, 40, 50, dtype=torch.bool)
    one[0, 0, 0] = True
    views = Views(images=torch.zeros(2, 40, 50, 3, dtype=torch.uint8), c2w=torch.eye(4).repeat(2, 1, 1),
                  intrinsics=torch.ones(2, 4), valid=one)
    assert mask_summary(views) == ", loss masks: 2 views (all but 1 of 4,000 of the pixels left out)"
    assert ds.splits["test"].valid is not None


def test_sparse_point_targets_skip_left_out_pixels(tmp_path):
    from vqad.nerf.depth_prior import points_depth_targets

    root, path, meta = _capture(tmp_path, views=9, w=16, h=24, transients=2)
    ds = load_dataset(root, format="ngp")
    train = ds.splits["train"]
    with_masks = points_depth_targets(ds.points, train)
    valid, train.valid = train.valid, None
    without = points_depth_targets(ds.points, train)
    flat = valid.reshape(-1)
    assert bool(flat[with_masks.ids].all()) and not bool(flat[without.ids].all())
    assert set(with_masks.ids.tolist()) == {i for i in without.ids.tolist() if flat[i]}


def test_fit_refuses_masks_that_leave_nothing_before_training(tmp_path, capsys):
    """Held-out masks that keep nothing are refused before the fit (not after it); training masks that keep
    nothing are named as such, even where they emptied the depth maps the octree would come from."""
    from vqad.app.cli import main as cli_main

    root, path, meta = _capture(tmp_path, views=9, w=16, h=24, transients=2, depth=True)
    Image.fromarray(np.zeros((24, 16), np.uint8), "L").save(root / "black.png")
    args = ["fit-nerf", str(root), "--format", "ngp", "--levels", "3:5", "--features", "4", "--steps", "5",
            "--batch-rays", "64", "--device", "cpu", "--quiet", "--threads", "1"]
    for i in (0, 8):
        meta["frames"][i]["mask_path"] = "black.png"
    path.write_text(json.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli_main(args + ["--out", str(tmp_path / "a")]) != 0
    assert "the loss masks of the 'test' views keep no pixel to score; evaluate other views" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli_main(args + ["--out", str(tmp_path / "b"), "--no-eval"]) == 0
        assert cli_main(["render", str(tmp_path / "b" / "checkpoint"), "--views", "test", "-o", str(tmp_path / "r"),
                         "--device", "cpu"]) == 0  # rendering needs no mask
    capsys.readouterr()
    for fr in meta["frames"]:
        fr["mask_path"] = "black.png"
    path.write_text(json.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli_main(args + ["--out", str(tmp_path / "c")]) != 0
    assert "leave out every pixel of the training views" in capsys.readouterr().err


def test_dynamic_masks_beside_colmap_and_llff_photos(tmp_path):
    """colmap2nerf leaves its dynamic masks beside the photos: a COLMAP model or an LLFF capture of the same
    folder reads them too (and LLFF does not take them for photos)."""
    from test_datasets import _colmap_txt, _write_llff

    root, _ = _colmap_txt(tmp_path, "colmap", views=4)
    ds = load_dataset(root, format="colmap")
    image = next(p for p in (root / "images").iterdir() if p.name == ds.splits["train"].names[0])
    off = np.zeros((8, 8), np.uint8)
    off[:3] = 255
    Image.fromarray(off, "L").save(image.parent / f"dynamic_mask_{image.stem}.png")
    train = load_dataset(root, format="colmap").splits["train"]
    assert np.array_equal(train.valid[0].numpy(), off == 0) and bool(train.valid[1:].all())

    llff = _write_llff(tmp_path / "llff", n=9, h=12, w=16, factor=2)
    first = llff / "images_2" / "IMG_001.png"  # the first training view (IMG_000 is held out)
    off = np.zeros((12, 16), np.uint8)
    off[:, :5] = 255
    Image.fromarray(off, "L").save(first.parent / "dynamic_mask_IMG_001.png")
    train = load_dataset(llff, format="llff").splits["train"]
    assert len(train) == 7 and np.array_equal(train.valid[0].numpy(), off == 0)


def test_lossy_masks_of_zero_and_one_are_refused(tmp_path):
    root, path, meta = _capture(tmp_path)
    _white_masks(root, meta)
    Image.fromarray(_pattern(12, 8, 2).astype(np.uint8), "L").save(root / "01.jpg", quality=95)
    meta["frames"][1]["mask_path"] = "01.jpg"
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="values stay below 128 .*save the mask as PNG"):
        load_dataset(root, format="ngp")
    Image.fromarray(_pattern(12, 8, 2).astype(np.uint8), "L").save(root / "01.png")  # lossless 0 / 1: fine
    meta["frames"][1]["mask_path"] = "01.png"
    path.write_text(json.dumps(meta))
    assert np.array_equal(load_dataset(root, format="ngp").splits["train"].valid[0].numpy(), _pattern(12, 8, 2))


def test_a_mask_that_keeps_everything_costs_the_sampler_nothing(tmp_path):
    from vqad.nerf.rays import RayBatcher

    root, path, meta = _capture(tmp_path, views=3)
    ds = load_dataset(root, format="ngp")
    train = ds.splits["train"]
    train.valid = torch.ones(len(train), *train.hw, dtype=torch.bool)  # through the API, not the readers
    b = RayBatcher(train, ds, torch.device("cpu"))
    assert b.kept is None and b.num_valid == b.num_rays


def test_colmap_masks_folder_as_colmap_and_nerfstudio_name_it(tmp_path):
    """A COLMAP project's masks/ (its feature extraction's: black = leave the pixel out), named
    <image name>.png (COLMAP) or <stem>.png (nerfstudio); optional per image; against a dynamic mask, refused."""
    from test_datasets import _colmap_txt

    root, _ = _colmap_txt(tmp_path, "colmap", views=5)
    names = load_dataset(root, format="colmap").splits["train"].names
    (root / "masks").mkdir()
    a, b = _pattern(8, 8, 1), _pattern(8, 8, 2)
    Image.fromarray(np.where(a, 255, 0).astype(np.uint8), "L").save(root / "masks" / f"{names[0]}.png")
    Image.fromarray(np.where(b, 255, 0).astype(np.uint8), "L").save(root / "masks" / f"{Path(names[1]).stem}.png")
    train = load_dataset(root, format="colmap").splits["train"]
    assert np.array_equal(train.valid[0].numpy(), a) and np.array_equal(train.valid[1].numpy(), b)
    assert bool(train.valid[2:].all())
    image = root / "images" / names[0]
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(image.parent / f"dynamic_mask_{image.stem}.png")
    with pytest.raises(InputError, match="both the mask masks/.* opposite things"):
        load_dataset(root, format="colmap")


# -- a second hostile pass's findings -------------------------------------------------------------------------
def test_llff_downscaled_photos_take_the_full_size_photos_masks(tmp_path):
    """LLFF's images_N copies are made after the masks: a dynamic mask beside the full-size photo stands for
    its downscaled copy, a pixel kept only where its whole block is (brute force)."""
    from test_datasets import _write_llff

    llff = _write_llff(tmp_path / "llff", n=9, h=12, w=16, factor=2)
    (llff / "images").mkdir()
    rng = np.random.default_rng(4)
    for i in range(9):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(llff / "images" / f"IMG_{i:03d}.png")
    off = np.zeros((24, 32), np.uint8)
    off[5:17, 3:20] = 255
    Image.fromarray(off, "L").save(llff / "images" / "dynamic_mask_IMG_001.png")
    train = load_dataset(llff, format="llff", downscale=2).splits["train"]  # images_2: the 12×16 copies
    assert train.hw == (12, 16)
    expect = (off == 0).reshape(12, 2, 16, 2).all(axis=(1, 3))
    assert np.array_equal(train.valid[0].numpy(), expect) and bool(train.valid[1:].all())


def test_masks_a_whole_factor_larger_and_the_same_file_named_twice(tmp_path):
    root, path, meta = _capture(tmp_path)
    _white_masks(root, meta)
    big = _pattern(36, 24, 9)  # 3× the 12×8 photos
    Image.fromarray(np.where(big, 255, 0).astype(np.uint8), "L").save(root / "big.png")
    meta["frames"][1]["mask_path"] = "big.png"
    path.write_text(json.dumps(meta))
    assert np.array_equal(load_dataset(root, format="ngp").splits["train"].valid[0].numpy(),
                          big.reshape(12, 3, 8, 3).all(axis=(1, 3)))
    image = root / meta["frames"][1]["file_path"]
    Image.fromarray(np.zeros((12, 8), np.uint8), "L").save(image.parent / f"dynamic_mask_{image.stem}.png")
    meta["frames"][1]["mask_path"] = f"images/dynamic_mask_{image.stem}.png"
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="is instant-ngp's dynamic mask of its photo, which means the opposite"):
        load_dataset(root, format="ngp")


def test_a_colmap_masks_folder_that_masks_nothing_is_said(tmp_path):
    from test_datasets import _colmap_txt

    root, _ = _colmap_txt(tmp_path, "colmap", views=4)
    (root / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(root / "masks" / "mask_of_nothing.png")
    with pytest.warns(UserWarning, match="holds 1 entries, none named after an image"):
        load_dataset(root, format="colmap")
    (root / "masks" / "mask_of_nothing.png").unlink()
    (root / "masks").rmdir()
    (root / "masks").write_text("not a folder")
    with pytest.warns(UserWarning, match="is not a folder"):
        load_dataset(root, format="colmap")


def test_a_view_its_mask_empties_is_not_blamed_on_its_depth_map(tmp_path):
    root, path, meta = _capture(tmp_path, views=9, depth=True)
    _white_masks(root, meta)
    Image.fromarray(np.zeros((12, 8), np.uint8), "L").save(root / "black.png")
    meta["frames"][1]["mask_path"] = "black.png"
    path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning) as caught:
        load_dataset(root, format="ngp")
    said = " | ".join(str(w.message) for w in caught)
    assert "masks leave out every pixel" in said and "depth maps hold no valid depth" not in said


def test_a_sweep_of_a_contracted_capture_with_masks(tmp_path, capsys):
    """A sweep fits a contracted capture as fit-nerf does (its outer scale), scores the kept pixels, and
    eval_views 'train' with eval_max_views does not cut the training views."""
    from test_sweep import _csv
    from vqad.app.cli import main as cli_main
    from vqad.app.sweep import NeRFTask, SweepConfig

    cap = tmp_path / "street"
    assert cli_main(["synth-capture", "-o", str(cap), "--size", "16x24", "--views", "9", "--supersample", "1",
                     "--transients", "2"]) == 0
    out = tmp_path / "rd"
    assert cli_main(["sweep", str(cap), "--format", "ngp", "--out", str(out), "--methods", "dense", "--levels", "3:5",
                     "--features", "4", "--steps", "10", "--batch", "256", "--hidden", "16", "--eval-max-views", "1",
                     "--stream-bits", "0", "--no-entropy", "--device", "cpu", "--quiet", "--threads", "1"]) == 0
    assert 0 < float(next(iter(_csv(out / "results.csv")))["psnr"]) < 60
    task = NeRFTask(SweepConfig(dataset=str(cap), format="ngp", eval_views="train", eval_max_views=1), torch.device("cpu"))
    assert len(task.dataset.splits["train"]) == 7



# -- a review of those fixes ------------------------------------------------------------------------------------
def test_colmap_masks_from_a_relative_path_warn_nothing(tmp_path, monkeypatch):
    from test_datasets import _colmap_txt

    root, _ = _colmap_txt(tmp_path, "colmap", views=4)
    name = load_dataset(root, format="colmap").splits["train"].names[0]
    (root / "masks").mkdir()
    Image.fromarray(np.where(_pattern(8, 8, 1), 255, 0).astype(np.uint8), "L").save(root / "masks" / f"{name}.png")
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the mask is found: no "none named after an image"
        train = load_dataset("colmap", format="colmap").splits["train"]
    assert np.array_equal(train.valid[0].numpy(), _pattern(8, 8, 1))


def test_llff_copies_of_rounded_size_and_masks_beside_the_largest_copy(tmp_path):
    """mip-NeRF 360's copies round their size (4946 px → 1237 at images_4): the full-size mask, edge-padded to
    the whole factor, still stands for its copy; where the largest folder is an images_N, its masks do."""
    from test_datasets import _write_llff

    llff = _write_llff(tmp_path / "llff", n=9, h=11, w=17, factor=2)  # images_2: 17×11 copies
    (llff / "images").mkdir()
    rng = np.random.default_rng(5)
    for i in range(9):  # full size 33×22: 2 × 17 = 34 across, rounded down to 33
        Image.fromarray(rng.integers(0, 256, (22, 33, 3), dtype=np.uint8)).save(llff / "images" / f"IMG_{i:03d}.png")
    off = np.zeros((22, 33), np.uint8)
    off[4:12, 6:15] = 255
    Image.fromarray(off, "L").save(llff / "images" / "dynamic_mask_IMG_001.png")
    train = load_dataset(llff, format="llff", downscale=2).splits["train"]
    keep = np.pad(off == 0, ((0, 0), (0, 1)), mode="edge").reshape(11, 2, 17, 2).all(axis=(1, 3))
    assert train.hw == (11, 17) and np.array_equal(train.valid[0].numpy(), keep)

    llff = _write_llff(tmp_path / "llff4", n=9, h=6, w=8, factor=4)  # images_4 read from the largest, images_2
    (llff / "images_2").mkdir()
    for i in range(9):
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(llff / "images_2" / f"IMG_{i:03d}.png")
    off = np.zeros((12, 16), np.uint8)
    off[:4] = 255
    Image.fromarray(off, "L").save(llff / "images_2" / "dynamic_mask_IMG_001.png")
    train = load_dataset(llff, format="llff", downscale=2).splits["train"]
    assert train.hw == (6, 8) and np.array_equal(train.valid[0].numpy(), (off == 0).reshape(6, 2, 8, 2).all(axis=(1, 3)))


def test_colmap_mask_names_the_file_system_refuses_are_said(tmp_path):
    from test_datasets import _colmap_txt

    from vqad.nerf.formats.colmap import colmap_mask_of

    root, _ = _colmap_txt(tmp_path, "colmap", views=4)
    (root / "masks").mkdir()
    photo = next((root / "images").iterdir())
    with pytest.raises(InputError, match="cannot be looked up"):  # an image name of 300 characters
        colmap_mask_of(root, "x" * 300 + ".png", photo, "an image")
    assert colmap_mask_of(root, "scan.001", photo, "an image") == {}  # no extension: no <stem>.png rule
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(root / "masks" / "scan.png")
    assert colmap_mask_of(root, "scan.001", photo, "an image") == {}  # scan.png is not scan.001's
