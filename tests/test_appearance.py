"""Per-view appearance (vqad.nerf.appearance): each training photo's exposure and white balance, learned
beside the field; and the generated capture whose photos are metered anew (SceneCaptureConfig.exposure)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vqad.errors import InputError
from vqad.nerf.appearance import ViewAppearance
from vqad.nerf.formats.common import HOLD_EVERY
from vqad.nerf.scene_capture import SceneCaptureConfig, photo_gains, write_capture


def test_the_transforms_start_at_identity_and_keep_their_gauge():
    app = ViewAppearance(5)
    rgb = torch.rand(2, 7, 3)
    views = torch.tensor([0, 4, 4, 1, 2, 3, 0])
    assert torch.equal(app(rgb, views), rgb)
    with torch.no_grad():
        app.log_gain.normal_()
        app.offset.normal_()
        app.log_gain += 3.0  # a shift every view shares is the gauge: it changes nothing
        app.offset -= 0.5
    gain, offset = app.transforms()
    assert torch.allclose(gain.log().mean(0), torch.zeros(3), atol=1e-6)  # geometric mean 1 per channel
    assert torch.allclose(offset.mean(0), torch.zeros(3), atol=1e-6)
    lg, b = app.log_gain.detach(), app.offset.detach()
    for j, v in enumerate(views.tolist()):  # brute force, one ray at a time
        want = rgb[:, j] * torch.exp(lg[v] - lg.mean(0)) + (b[v] - b.mean(0))
        assert torch.allclose(app(rgb, views)[:, j], want, atol=1e-6)


def test_loading_a_checkpoints_transforms_is_validated():
    app = ViewAppearance(4)
    good = {"log_gain": torch.full((4, 3), 0.1), "offset": torch.zeros(4, 3)}
    app.load(good, "ckpt")
    assert torch.equal(app.log_gain.detach(), good["log_gain"])
    with pytest.raises(InputError, match="for 6 training views, this capture has 4"):
        app.load({**good, "log_gain": torch.zeros(6, 3)}, "ckpt")
    with pytest.raises(InputError, match="no per-view appearance"):
        app.load({"offset": torch.zeros(4, 3)}, "ckpt")
    with pytest.raises(InputError, match="not finite"):
        app.load({**good, "offset": torch.full((4, 3), float("nan"))}, "ckpt")
    with pytest.raises(InputError, match="not floating-point"):
        app.load({**good, "offset": torch.zeros(4, 3, dtype=torch.int64)}, "ckpt")
    with pytest.raises(InputError, match=r"shape \(4, 4\), not \(views, 3\)"):
        app.load({**good, "offset": torch.zeros(4, 4)}, "ckpt")
    with pytest.raises(InputError, match="within ±10"):  # finite, but exp() of it overflows every render
        app.load({**good, "log_gain": torch.full((4, 3), 80.0)}, "ckpt")
    app.load({**good, "offset": torch.zeros(4, 3, dtype=torch.float16)}, "ckpt")  # any float type
    with pytest.raises(ValueError):
        ViewAppearance(0)


def test_a_view_without_pixels_stays_the_identity_and_out_of_the_gauge():
    active = torch.tensor([True, False, True, True])
    app = ViewAppearance(4, active=active)
    with torch.no_grad():
        app.log_gain.normal_()
        app.offset.normal_()
    gain, offset = app.transforms()
    assert torch.equal(gain[1], torch.ones(3)) and torch.equal(offset[1], torch.zeros(3))
    assert torch.allclose(gain[active].log().mean(0), torch.zeros(3), atol=1e-6)
    assert torch.allclose(offset[active].mean(0), torch.zeros(3), atol=1e-6)
    rgb = torch.rand(5, 3, requires_grad=True)
    app(rgb, torch.tensor([0, 2, 3, 0, 2])).sum().backward()  # rays of the active views only
    assert float(app.log_gain.grad[1].abs().sum()) == 0 and float(app.offset.grad[1].abs().sum()) == 0


def test_photos_composited_on_a_background_have_it_untouched_by_their_exposure():
    """An object capture's photos were composited on the background by the reader: the camera saw the object
    alone, so its gain and offset act on the field's colour before compositing (brute force per ray)."""
    from vqad.nerf.appearance import apply_look

    g = torch.Generator().manual_seed(1)
    fg, a = torch.rand(6, 3, generator=g), torch.rand(6, generator=g)
    bg = torch.tensor([1.0, 0.5, 0.0])
    rgb = a[:, None] * fg + (1 - a[:, None]) * bg  # volume rendering's premultiplied colour, composited
    gain, offset = torch.rand(6, 3, generator=g) + 0.5, torch.rand(6, 3, generator=g) * 0.1
    got = apply_look(rgb, gain, offset, a, bg)
    for i in range(6):
        photo = a[i] * (gain[i] * fg[i] + offset[i]) + (1 - a[i]) * bg  # the object exposed, then composited
        assert torch.allclose(got[i], photo, atol=1e-6)
    assert torch.allclose(apply_look(bg.expand(6, 3), gain, offset, torch.zeros(6), bg), bg.expand(6, 3))
    assert torch.allclose(apply_look(rgb, gain, offset), rgb * gain + offset)  # photographed everywhere


def test_generated_photos_are_metered_anew_around_the_held_out_photos_appearance():
    cfg = SceneCaptureConfig(views=40, exposure=0.4)
    gains = photo_gains(cfg)
    held = np.arange(40) % HOLD_EVERY == 0
    assert np.all(gains[held] == 1.0)
    stops = np.log2(gains[~held])
    assert np.allclose(stops.mean(0), 0.0, atol=1e-12)  # geometric mean 1: the held-out photos show the average
    shared = stops.mean(1)  # exposure, the same in every channel, and white balance, per channel
    assert 0.25 < shared.std() < 0.6 and 0.1 < (stops - shared[:, None]).std() < 0.35
    assert np.array_equal(gains, photo_gains(cfg))  # deterministic
    assert not np.array_equal(gains, photo_gains(SceneCaptureConfig(views=40, exposure=0.4, seed=1)))
    assert np.all(photo_gains(SceneCaptureConfig(views=40)) == 1.0)
    for bad in (-0.1, 2.5, float("nan"), True):
        with pytest.raises(InputError, match="exposure"):
            SceneCaptureConfig(exposure=bad).validate()


def test_written_photos_carry_their_gain_and_clip_at_white(tmp_path):
    kw = dict(width=16, height=24, views=9, points=0, supersample=1)
    clean = write_capture(tmp_path / "clean", SceneCaptureConfig(**kw)).parent
    cfg = SceneCaptureConfig(**kw, exposure=0.5)
    metered = write_capture(tmp_path / "metered", cfg).parent
    gains = photo_gains(cfg)
    for i in range(9):
        a = np.asarray(Image.open(clean / f"images/{i:04d}.png")).astype(float)
        b = np.asarray(Image.open(metered / f"images/{i:04d}.png")).astype(float)
        assert np.abs(b - np.clip(np.rint(a * gains[i]), 0, 255)).max() == 0
    assert json.loads((metered / "transforms.json").read_text())["vqad_scene"]["exposure"] == 0.5


def _fit(cap, out, *extra, steps="150"):
    from vqad.app.cli import main as cli_main

    return cli_main(["fit-nerf", str(cap), "--format", "ngp", "--grid", "dense", "--levels", "3:5", "--features", "4",
                     "--steps", steps, "--batch-rays", "512", "--out", str(out), "--device", "cpu", "--quiet",
                     "--eval-max-views", "1", "--checkpoint-every", "100", *extra])


def test_a_fit_learns_each_photos_gain_and_resumes_with_it(tmp_path, capsys):
    """The learned gains follow the photos' true gains (a fit that learned nothing, or the wrong views'
    transforms, fails), the checkpoint keeps them, and a resumed fit continues from them."""
    from vqad.app.cli import main as cli_main

    cap = tmp_path / "cap"
    assert cli_main(["synth-capture", "-o", str(cap), "--size", "16x24", "--views", "17", "--supersample", "1",
                     "--points", "300", "--exposure", "0.5"]) == 0
    assert "exposure varying by 0.5 stops" in capsys.readouterr().out
    assert _fit(cap, tmp_path / "fit", "--appearance", "affine", "--steps", "100") == 0
    ckpt = tmp_path / "fit" / "checkpoint"
    first = load_file(str(ckpt / "model.safetensors"))
    assert first["task.appearance.log_gain"].shape == (14, 3)  # 17 frames: 0, 8 and 16 held out
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["train"]["appearance"] == "affine" and "appearance" in cfg["optimizers"]
    assert "with each photo's exposure matched" in capsys.readouterr().out  # held-out photos: their own exposure
    metrics = json.loads((tmp_path / "fit" / "metrics.json").read_text())
    assert metrics["appearance"].startswith("per-view appearance: gains R ")
    lods = metrics["lods"]
    assert all(r["psnr_matched"] >= r["psnr"] - 0.05 for r in lods.values())

    assert _fit(cap, tmp_path / "fit", "--steps", "300", "--resume") == 0  # the checkpoint's --appearance
    t = load_file(str(ckpt / "model.safetensors"))
    learned = t["task.appearance.log_gain"] - t["task.appearance.log_gain"].mean(0)
    true = np.log(photo_gains(SceneCaptureConfig(width=16, height=24, views=17, exposure=0.5))[np.arange(17) % HOLD_EVERY != 0])
    corr = np.corrcoef(true.ravel(), learned.numpy().ravel())[0, 1]
    assert corr > 0.7, corr  # 0.87 here; views mixed up or nothing learned: about 0
    assert not torch.equal(first["task.appearance.log_gain"], t["task.appearance.log_gain"])

    # the checkpoint still loads as a model (render, compress), its transforms beside it
    from vqad.checkpoint import load_checkpoint

    field, _ = load_checkpoint(ckpt)
    assert field.lods == [3, 4, 5]

    # the training photos scored as they were exposed score higher than in the average appearance
    capsys.readouterr()
    assert cli_main(["eval", str(ckpt), "--views", "train", "--max-views", "6", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "as their photos were exposed" in text
    exposed = float(text.split("LOD 5: PSNR ")[1].split(" dB")[0])
    from vqad.nerf.evaluate import evaluate_nerf, load_scene

    dataset = load_scene(field.dataset)
    average = evaluate_nerf(field, dataset, "train", max_views=6)[5]["psnr"]
    assert exposed > average + 1.0, (exposed, average)

    # held-out views: the average appearance, and matched to each photo (on by default for such a checkpoint)
    assert cli_main(["eval", str(ckpt), "--max-views", "1", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "as their photos were exposed" not in text and "with each photo's exposure matched" in text
    assert cli_main(["eval", str(ckpt), "--views", "train", "--max-views", "1", "--device", "cpu",
                     "--match-exposure"]) == 0
    assert "with each photo's exposure matched" in capsys.readouterr().out

    # resuming with --appearance none, or with damaged or another capture's transforms, is refused
    capsys.readouterr()
    assert _fit(cap, tmp_path / "fit", "--appearance", "none", "--steps", "400", "--resume") != 0
    assert "appearance: checkpoint 'affine', now 'none'" in capsys.readouterr().err
    bad = dict(t)
    bad["task.appearance.offset"] = torch.full_like(t["task.appearance.offset"], math.inf)
    save_file(bad, str(ckpt / "model.safetensors"))
    assert _fit(cap, tmp_path / "fit", "--appearance", "affine", "--steps", "400", "--resume") != 0
    assert "tensor task.appearance.offset holds NaN or inf values" in capsys.readouterr().err
    bad["task.appearance.offset"] = torch.zeros(3, 3)
    bad["task.appearance.log_gain"] = torch.zeros(3, 3)
    save_file(bad, str(ckpt / "model.safetensors"))
    assert _fit(cap, tmp_path / "fit", "--appearance", "affine", "--steps", "400", "--resume") != 0
    assert "for 3 training views, this capture has 14" in capsys.readouterr().err
    # held-out views never use the transforms: a damaged set does not stop their evaluation
    assert cli_main(["eval", str(ckpt), "--max-views", "1", "--device", "cpu"]) == 0
    assert "with each photo's exposure matched" in capsys.readouterr().out
    save_file(t, str(ckpt / "model.safetensors"))  # intact again

    # the transforms belong to the photos they were learned from, in their order
    config = json.loads((ckpt / "config.json").read_text())
    assert config["appearance_views"][:2] == ["images/0001.png", "images/0002.png"]
    shuffled = {**config, "appearance_views": config["appearance_views"][::-1]}
    (ckpt / "config.json").write_text(json.dumps(shuffled))
    assert cli_main(["eval", str(ckpt), "--views", "train", "--max-views", "1", "--device", "cpu"]) != 0
    assert "the per-view appearance is for the training photos images/0015.png" in capsys.readouterr().err
    assert _fit(cap, tmp_path / "fit", "--steps", "400", "--resume") != 0
    assert "the per-view appearance is for the training photos images/0015.png" in capsys.readouterr().err

    # a checkpoint whose own settings are damaged is said to be, not the flag the user never gave
    (ckpt / "config.json").write_text(json.dumps({**config, "train": {**config["train"], "appearance": "projective"}}))
    assert _fit(cap, tmp_path / "fit", "--steps", "400", "--resume") != 0
    assert "the checkpoint's training settings are not valid (unknown --appearance 'projective'" in capsys.readouterr().err
    (ckpt / "config.json").write_text(json.dumps(config))

    # optimizer state of another shape is refused when it is read, not deep inside the first step
    optim = load_file(str(ckpt / "optim.safetensors"))
    key = next(k for k in optim if k.startswith("appearance.") and k.endswith("exp_avg"))
    save_file({**optim, key: torch.zeros(3, 3)}, str(ckpt / "optim.safetensors"))
    assert _fit(cap, tmp_path / "fit", "--steps", "400", "--resume") != 0
    assert f"the optimizer state {key.replace('.0.', '.', 1)} is torch.float32 of shape (3, 3)" in capsys.readouterr().err


def test_an_unknown_appearance_is_refused(tmp_path, capsys):
    from vqad.nerf.task import NeRFTrainConfig

    with pytest.raises(InputError, match="unknown --appearance 'per-view'"):
        NeRFTrainConfig(appearance="per-view").validate()
    with pytest.raises(SystemExit):
        _fit(tmp_path, tmp_path / "fit", "--appearance", "gain")
    assert "invalid choice: 'gain'" in capsys.readouterr().err


def test_index_sweeps_compare_the_photos_through_their_views_transforms(one_thread, monkeypatch):
    """A refinement sweep's residuals are what training minimises: the rendering through the ray's
    view's gain and offset, minus the photo (brute force, ray by ray)."""
    from vqad.config import DecoderConfig, GridConfig
    from vqad.nerf.field import NeRFConfig
    from vqad.nerf.fit import NeRFTrainConfig, fit_nerf
    from vqad.nerf.formats import load_dataset
    from vqad.nerf.rays import RayBatcher
    from vqad.nerf.appearance import as_photographed
    from vqad.nerf.task import nerf_refine_chunks
    from vqad.refine import summed_features

    ds = load_dataset("procedural")
    grid = GridConfig(storage="codebook", features=4, bits=3, base_level=2, max_level=4)
    train = NeRFTrainConfig(steps=10, batch_rays=256, octree="depth", appearance="affine")
    res = fit_nerf(ds, grid, DecoderConfig(hidden=16, position_input=False), train, torch.device("cpu"), quiet=True,
                   nerf_cfg=NeRFConfig(color_hidden=16))
    assert res.appearance is not None and res.appearance.n_views == len(ds.splits["train"])
    app = ViewAppearance(res.appearance.n_views)
    with torch.no_grad():
        app.log_gain.uniform_(-0.5, 0.5)
        app.offset.uniform_(-0.1, 0.1)
    batcher = RayBatcher(ds.splits["train"], ds, torch.device("cpu"))
    bg = torch.ones(3)
    assert batcher.composited  # the procedural scene's photos are composited on its background ...
    import vqad.nerf.task as task_mod

    calls = []
    monkeypatch.setattr(task_mod, "as_photographed", lambda *a: calls.append(a) or as_photographed(*a))
    (chunk,) = nerf_refine_chunks(res.field, res.sampler, batcher, 300, bg, torch.Generator().manual_seed(3),
                                  appearance=app)
    chunk.residuals(summed_features(res.field.grid, chunk.x, res.field.lods[-1]))
    assert calls and all(c[3].shape == (300,) and torch.equal(c[4], bg) for c in calls)  # ... so opacity goes along
    batcher.composited = False  # as if the camera had recorded every pixel: the plain transform, checked by hand
    (plain,) = nerf_refine_chunks(res.field, res.sampler, batcher, 300, bg, torch.Generator().manual_seed(3))
    (seen,) = nerf_refine_chunks(res.field, res.sampler, batcher, 300, bg, torch.Generator().manual_seed(3),
                                 appearance=app)
    flat = batcher.sample_ids(300, torch.Generator().manual_seed(3))
    photo = batcher.rays_for(flat)[2]
    view = batcher.view_of(flat)
    gain, offset = app.transforms()
    with torch.no_grad():
        every = summed_features(res.field.grid, plain.x, res.field.lods[0])
        for lod in res.field.lods:
            F = {lod: every[lod]}
            rendered = plain.residuals(F)[lod] + photo
            got = seen.residuals(F)[lod]
            for i in range(0, 300, 37):
                want = rendered[i] * gain[view[i]] + offset[view[i]]
                over = ((photo[i] >= 1) & (want > 1)) | ((photo[i] <= 0) & (want < 0))  # where the camera clipped
                want = torch.where(over, photo[i], want) - photo[i]
                assert torch.allclose(got[i], want, atol=1e-5)

    # scoring training views through their transforms, brute force view by view (composited: before the background)
    from vqad.metrics import psnr
    from vqad.nerf.evaluate import evaluate_nerf, render_views

    lod = res.field.lods[-1]
    r = evaluate_nerf(res.field, ds, "train", lods=[lod], max_views=2, appearance=app, sampler=res.sampler)[lod]
    assert r["appearance"] == "each training photo's learned exposure"
    want = []
    for i, _, rgb, _, opa, gt in render_views(res.field, ds, "train", [lod], res.sampler, max_views=2):
        a = opa[0][..., None]
        seen = ((rgb[0] - (1 - a) * bg) * gain[i].detach() + a * offset[i].detach() + (1 - a) * bg).clamp(0, 1)
        want.append(psnr(seen, gt))
    assert r["psnr"] == pytest.approx(float(np.mean(want)), abs=1e-4)
    plain = evaluate_nerf(res.field, ds, "train", lods=[lod], max_views=2, sampler=res.sampler)[lod]["psnr"]
    assert abs(plain - r["psnr"]) > 0.1  # the transforms were applied


def test_a_sweep_learns_the_photos_appearance_and_records_it(tmp_path, capsys, monkeypatch):
    from test_sweep import _csv
    from vqad.app.cli import main as cli_main
    from vqad.app.sweep import SweepConfig
    import vqad.nerf.fit as nerf_fit

    cap = tmp_path / "cap"
    assert cli_main(["synth-capture", "-o", str(cap), "--size", "16x24", "--views", "9", "--supersample", "1",
                     "--points", "200", "--exposure", "0.3"]) == 0
    seen = []
    real = nerf_fit.fit_nerf
    monkeypatch.setattr(nerf_fit, "fit_nerf", lambda *a, **k: seen.append(a[3].appearance) or real(*a, **k))
    out = tmp_path / "rd"
    flags = ["sweep", str(cap), "--format", "ngp", "--out", str(out), "--methods", "dense", "--levels", "3:5",
             "--features", "4", "--steps", "10", "--batch", "256", "--hidden", "16", "--eval-max-views", "1",
             "--stream-bits", "0", "--no-entropy", "--device", "cpu", "--quiet", "--threads", "1"]
    assert cli_main(flags + ["--appearance", "affine"]) == 0
    assert seen == ["affine"]
    row = next(iter(_csv(out / "results.csv")))
    assert float(row["psnr_matched"]) >= float(row["psnr"]) - 1e-6  # held-out photos: their exposure matched too
    assert json.loads((out / "sweep.json").read_text())["settings"]["appearance"] == "affine"
    capsys.readouterr()
    assert cli_main(flags) != 0  # another appearance is another sweep
    assert "appearance: 'affine' there, 'none' now" in capsys.readouterr().err
    with pytest.raises(InputError, match="sweep's files do not keep"):  # a .vqad holds the average appearance
        SweepConfig.from_mapping({"dataset": str(cap), "appearance": "affine", "eval_views": "train",
                                  "out": str(out)}).resolved()
    with pytest.raises(InputError, match="--appearance must be one of"):
        SweepConfig.from_mapping({"dataset": str(cap), "appearance": "gain", "out": str(out)}).resolved()
    mesh = tmp_path / "m.obj"
    mesh.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(InputError, match="--appearance: not an option for a mesh"):  # a mesh has no photos
        SweepConfig.from_mapping({"dataset": str(mesh), "appearance": "affine"})


def test_exposure_matching_is_a_least_squares_gain_and_offset_per_channel():
    from vqad.metrics import psnr
    from vqad.nerf.appearance import exposure_matched

    g = torch.Generator().manual_seed(0)
    pred = torch.rand(12, 10, 3, generator=g) * 0.6 + 0.2
    keep = torch.rand(12, 10, generator=g) > 0.3
    gain, offset = torch.tensor([0.7, 1.2, 0.9]), torch.tensor([0.05, -0.1, 0.02])
    photo = pred * gain + offset
    assert torch.allclose(exposure_matched(pred, photo), photo, atol=1e-5)  # an exact transform is undone
    noisy = (photo + 0.05 * torch.randn(12, 10, 3, generator=g)).clamp(0, 1)
    got = exposure_matched(pred, noisy, keep)
    for c in range(3):  # brute force: numpy's least squares over the kept pixels
        A = np.stack([pred[..., c][keep].numpy(), np.ones(int(keep.sum()))], 1)
        (a, b), *_ = np.linalg.lstsq(A, noisy[..., c][keep].numpy(), rcond=None)
        assert torch.allclose(got[..., c], (pred[..., c] * float(a) + float(b)).clamp(0, 1), atol=1e-5)
    assert psnr(got, noisy, keep) >= psnr(pred, noisy, keep)  # the identity is one of the transforms it tried
    flat = torch.full((8, 8, 3), 0.5)
    assert torch.allclose(exposure_matched(flat, flat * 0 + 0.8), flat * 0 + 0.8)  # constant: gain 1, offset moves it
    assert torch.equal(exposure_matched(pred, photo, torch.zeros(12, 10, dtype=torch.bool)), pred)  # nothing kept


def test_a_brighter_colour_than_a_blown_highlight_costs_nothing():
    from vqad.nerf.appearance import clipped_like

    photo = torch.tensor([[1.0, 0.5, 0.0], [0.98, 1.0, 0.02]])
    pred = torch.tensor([[[1.3, 0.7, -0.2], [1.1, 0.9, -0.1]], [[0.9, 0.4, 0.1], [0.97, 1.2, 0.03]]])  # (2 LODs, 2, 3)
    got = clipped_like(pred, photo)
    for lod in range(2):
        for r in range(2):
            for c in range(3):  # brute force: the camera records min(max(x, 0), 1) where the photo is clipped
                p, x = float(photo[r, c]), float(pred[lod, r, c])
                want = 1.0 if p >= 1 and x > 1 else 0.0 if p <= 0 and x < 0 else x
                assert float(got[lod, r, c]) == pytest.approx(want)
    g = pred.clone().requires_grad_()
    clipped_like(g, photo).sum().backward()
    assert g.grad[0, 0, 0] == 0 and g.grad[0, 0, 1] == 1 and g.grad[0, 1, 0] == 1  # over a clipped 1: no pull


def test_composited_photos_are_not_clipped_and_plain_ones_are():
    """Where the reader composited a photo on white, its 1.0 is the background's, not a blown highlight: a
    floater brightened over it must cost what it costs; a photo the camera recorded whole clips as it did."""
    from vqad.nerf.appearance import as_photographed

    photo = torch.ones(1, 3)
    rgb, a = torch.full((1, 3), 0.3 * 0.9 + 0.7), torch.full((1,), 0.3)  # a faint floater over the white background
    gain, offset = torch.full((1, 3), 1.3), torch.zeros(1, 3)
    seen = as_photographed(rgb, gain, offset, a, torch.ones(3), photo)
    assert torch.allclose(seen, 0.3 * 0.9 * 1.3 + 0.7 * torch.ones(1, 3))  # > 1: the floater costs
    assert float(((seen - photo) ** 2).sum()) > 0.005
    plain = as_photographed(torch.full((1, 3), 0.9), gain, offset, a, None, photo)
    assert torch.equal(plain, photo)  # 1.17 over a blown 1.0: the camera would have recorded 1.0


def test_saved_transforms_read_the_same_whichever_views_a_reader_counts():
    """A checkpoint keeps gauge-fixed transforms: read back with every view active (vqad eval does not know
    which views a fit's masks emptied), after the raw parameters drifted by a shared shift, they are the
    same as training's."""
    active = torch.tensor([True, True, False, True])
    app = ViewAppearance(4, active=active)
    with torch.no_grad():
        app.log_gain.copy_(torch.tensor([[0.3] * 3, [0.5] * 3, [0.1] * 3, [0.0] * 3]) + 12.0)  # drifted past ±10
        app.offset.normal_(generator=torch.Generator().manual_seed(0))
    back = ViewAppearance(4)
    back.load(app.state(), "ckpt")
    for a, b in zip(app.transforms(), back.transforms()):
        assert torch.allclose(a, b, atol=1e-6)


def test_one_training_view_has_no_appearance_to_learn(tmp_path, capsys):
    from vqad.app.cli import main as cli_main

    cap = tmp_path / "cap"
    assert cli_main(["synth-capture", "-o", str(cap), "--size", "8x12", "--views", "2", "--supersample", "1",
                     "--points", "100", "--exposure", "0.5"]) == 0  # frame 0 held out: one training view
    capsys.readouterr()
    assert _fit(cap, tmp_path / "fit", "--appearance", "affine") == 2
    assert "this capture has 1 training view with pixels to learn from: leave --appearance out" in capsys.readouterr().err
    assert not (tmp_path / "fit").exists()  # refused before anything was written


def test_exposure_matching_of_composited_photos_fits_the_object_and_skips_blown_pixels():
    from vqad.nerf.appearance import exposure_matched

    g = torch.Generator().manual_seed(2)
    fg = torch.rand(16, 16, 3, generator=g) * 0.5 + 0.25
    a = (torch.rand(16, 16, generator=g) > 0.4).float()  # object pixels (1) and background (0)
    bg = torch.ones(3)
    rgb = a[..., None] * fg + (1 - a[..., None]) * bg
    gain, offset = torch.tensor([1.4, 0.8, 1.1]), torch.tensor([0.02, 0.05, -0.03])
    photo = (a[..., None] * (fg * gain + offset) + (1 - a[..., None]) * bg).clamp(0, 1)  # the object exposed
    got = exposure_matched(rgb, photo, None, a, bg)
    assert torch.allclose(got, photo, atol=1e-5)  # the background does not pin g + o to 1
    assert not torch.allclose(exposure_matched(rgb, photo), photo, atol=1e-3)  # as a plain photo: it does
    blown = photo.clone()
    blown[:2, :, 0] = 1.0  # highlights the camera clipped: not evidence of the gain
    assert torch.allclose(exposure_matched(rgb, blown, None, a, bg)[2:], blown[2:], atol=1e-5)


def test_batch_learns_the_appearance_and_old_fingerprints_still_hold(tmp_path, capsys):
    import vqad.app.batch as B
    from vqad.app.cli import main as cli_main

    assert cli_main(["synth-capture", "-o", str(tmp_path / "cap"), "--size", "16x24", "--views", "9",
                     "--supersample", "1", "--points", "200", "--exposure", "0.3"]) == 0
    job = tmp_path / "job.toml"
    body = ('out = "runs"\n[defaults]\nsteps = 20\nlevels = "3:5"\nfeatures = 4\nbatch_rays = 256\n'
            'eval_max_views = 1\n[[assets]]\npath = "cap"\nformat = "ngp"\n')
    job.write_text(body)
    plain = B.load_job(job).assets[0].fingerprint
    # a job from before the setting hashes its configs as it did then (their repr had no appearance): no refit
    from vqad.nerf.task import NeRFTrainConfig

    cfg = NeRFTrainConfig()
    assert B._config_text(cfg) == repr(cfg).replace(", appearance='none'", "")
    assert "appearance='affine'" in B._config_text(NeRFTrainConfig(appearance="affine"))
    job.write_text(body + 'appearance = "affine"\n')
    assert B.load_job(job).assets[0].fingerprint != plain
    assert cli_main(["batch", str(job), "--local", "--threads", "1", "--quiet"]) == 0
    (rec,) = [json.loads(line) for line in (tmp_path / "runs" / B.RESULTS).read_text().splitlines()]
    assert rec["status"] == "done" and all(r["psnr_matched"] >= r["psnr"] - 1e-6 for r in rec["lods"].values())
    import csv

    (row,) = csv.DictReader((tmp_path / "runs" / B.RESULTS_CSV).open())  # the table shows it beside each LOD's PSNR
    for lod, r in rec["lods"].items():
        assert float(row[f"lod{lod}_psnr_matched"]) == pytest.approx(r["psnr_matched"], rel=1e-5)
        assert float(row[f"lod{lod}"]) == pytest.approx(r["psnr"], rel=1e-5)
    md = (tmp_path / "runs" / B.RESULTS_MD).read_text()
    assert "in brackets: with each held-out photo's exposure matched" in md
    assert f"L{max(rec['lods'], key=int)} {rec['quality'][max(rec['lods'], key=int)]:.2f} (" in md
    saved = load_file(str(tmp_path / "runs" / "cap" / "checkpoint" / "model.safetensors"))
    assert saved["task.appearance.log_gain"].shape == (7, 3)


def test_matched_psnr_needs_pixels_to_fit_and_never_scores_below_plain():
    from vqad.metrics import psnr
    from vqad.nerf.appearance import MIN_MATCH_PIXELS, exposure_matched, psnr_matched

    g = torch.Generator().manual_seed(4)
    pred, photo = torch.rand(12, 12, 3, generator=g) * 0.8 + 0.1, torch.rand(12, 12, 3, generator=g) * 0.8 + 0.1
    few = torch.zeros(12, 12, dtype=torch.bool)
    few[0, :MIN_MATCH_PIXELS // 8] = True  # a held-out mask that keeps a handful of pixels
    assert torch.equal(exposure_matched(pred, photo, few), pred.clamp(0, 1))  # no fit: it would match them exactly
    assert psnr_matched(pred, photo, few) == pytest.approx(psnr(pred, photo, few))
    # a composited photo: fitted on its opaque pixels, a transform can lose on the others; the identity is kept
    a = torch.zeros(12, 12)
    a[:9] = 1.0
    bg = torch.ones(3)
    truth = photo.clone()
    truth[9:] = bg * 0.2 + pred[9:] * 0.8  # the half-transparent rows disagree with any transform of the opaque ones
    assert psnr_matched(pred, truth, None, a, bg) >= psnr(pred, truth) - 1e-9


def test_damaged_training_settings_and_photo_lists_are_said_to_be(tmp_path):
    from vqad.checkpoint import read_config
    from vqad.nerf.appearance import check_appearance_views

    (tmp_path / "config.json").write_text(json.dumps({"vqad_checkpoint": 1, "kind": "nerf", "train": None}))
    with pytest.raises(InputError, match="its training settings are NoneType, not a JSON object"):
        read_config(tmp_path)
    names = ["a.png", "b.png"]
    check_appearance_views({}, names, "ckpt")  # a checkpoint from before the list: nothing to compare
    check_appearance_views({"appearance_views": names}, names, "ckpt")
    for bad in ([], None, "a.png", [1, 2]):
        with pytest.raises(InputError, match="not a list of photo names"):
            check_appearance_views({"appearance_views": bad}, names, "ckpt")
    with pytest.raises(InputError, match="for the training photos b.png, a.png, this capture's are a.png, b.png"):
        check_appearance_views({"appearance_views": names[::-1]}, names, "ckpt")
