"""Radiance-field evaluation: PSNR and SSIM per LOD on held-out views, and PNG renders.

* PSNR ``= −10 log10(MSE)`` over all pixels and channels of a view, in [0, 1]; averaged over views.
* SSIM with a Gaussian window of 11 pixels, σ = 1.5 (as pytorch-msssim computes it, :func:`vqad.metrics.ssim`).
* A capture's loss masks (:attr:`vqad.nerf.data.Views.valid`) hold on the held-out views too: PSNR over
  the pixels they keep, SSIM over the windows centred on one; a view whose mask keeps none is not scored.
* With ``match_exposure``, PSNR also after fitting each photo's exposure and white balance to the render
  (``"psnr_matched"``, :func:`vqad.nerf.appearance.psnr_matched`), for captures metered anew in every photo.
* LPIPS is **not** reported: it needs pretrained network weights (AlexNet / VGG) that cannot be
  downloaded on an offline machine, and vqad ships none. Compare LPIPS elsewhere from the saved PNGs.

Renders are written per LOD as ``<split>_lod<L>/<view>.png`` (colour composited on the dataset's
background), ``<view>_depth.png`` (expected ray distance ``Σ w_i t_i / Σ w_i`` in world units, near =
bright, scaled per image; black where opacity < 0.5) and ``<view>_opacity.png`` (``Σ w_i``).
"""

from __future__ import annotations

import glob
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from vqad.atomicio import save_image
from vqad.errors import InputError
from vqad.metrics import psnr, ssim
from vqad.nerf.appearance import apply_look, composited_background, psnr_matched
from vqad.nerf.data import SceneDataset, kept_views
from vqad.nerf.render import OccupancySampler, render_rays_chunked


def load_scene(info: dict, source: str | None = None) -> SceneDataset:
    """The dataset a model was trained on, from the ``dataset`` record stored with it.

    ``source`` overrides the stored path (the data moved, or another capture of the same scene).
    """
    from vqad.nerf.formats import load_dataset

    if not info:
        raise InputError("this model does not record its dataset: pass --dataset PATH")
    fmt = info.get("format", "auto")
    if source and fmt == "procedural" and source != "procedural":
        raise InputError(f"this model was fitted to the built-in procedural scene: --dataset {source} cannot apply "
                         f"(it renders and scores against that scene; leave --dataset out)")
    from vqad.nerf.data import capture_changes

    src = source or info.get("source") or ("procedural" if fmt == "procedural" else "")
    if not src:
        raise InputError("this model does not record where its dataset is: pass --dataset PATH")
    if not source and fmt != "procedural" and not Path(src).exists():
        raise InputError(f"the capture this model was fitted to is no longer at {src}: pass --dataset PATH where it is now")
    kwargs = {"format": fmt, "downscale": int(info.get("downscale", 1))}
    if "background" in info:
        kwargs["background"] = tuple(info["background"])
    dataset = load_dataset(src, **kwargs)
    changed = capture_changes(info, dataset)
    if changed and not source:  # replaced or regenerated where the model's record points: not what it was fitted to
        raise InputError(f"the capture at {src} is not the one this model was fitted to ({'; '.join(changed)}): pass "
                         "--dataset with that capture")
    if changed:
        warnings.warn(f"--dataset {source}: its training views differ from the capture this model was fitted to "
                      f"({'; '.join(changed)}); scoring it anyway, as asked", stacklevel=2)
    return dataset


def pick_split(dataset: SceneDataset, split: str):
    if split not in dataset.splits or len(dataset.splits[split]) == 0:
        have = ", ".join(k for k, v in dataset.splits.items() if len(v))
        raise InputError(f"dataset {dataset.name!r} has no {split!r} views (it has: {have})")
    return dataset.splits[split]


def to_png_rgb(img: torch.Tensor) -> np.ndarray:
    """``(H, W, 3)`` float in [0, 1] → uint8."""
    return (img.clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def depth_png(depth: torch.Tensor, opacity: torch.Tensor) -> np.ndarray:
    """``(H, W)`` expected depth (world units, already divided by opacity) → uint8, near = bright."""
    valid = opacity > 0.5
    out = torch.zeros_like(depth)
    if valid.any():
        lo, hi = depth[valid].min(), depth[valid].max()
        out[valid] = 1.0 - 0.8 * (depth[valid] - lo) / (hi - lo).clamp_min(1e-8)
    return (out.clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)




def require_scorable(dataset: SceneDataset, split: str, max_views: int | None = None,
                     fix: str = "score other views, or check the masks"):
    """``split``'s views (:func:`pick_split`), refused where the loss masks of its first ``max_views`` (or all)
    keep no pixel: nothing could be scored (say so before anything is fitted or rendered)."""
    views = pick_split(dataset, split)
    if kept_views(views, max_views) == 0:
        n = len(views) if max_views is None else min(max_views, len(views))
        which = f"the first {n} {split!r} views" if n < len(views) else f"the {split!r} views"
        raise InputError(f"the loss masks of {which} keep no pixel to score; {fix}")
    return views


RENDER_SUFFIXES = ("", "_depth", "_opacity")  # the PNGs of one view: colour, depth, opacity


def view_stems(views) -> list[str]:
    """The file stem of each view's renders: its image's stem, or its index where it has no name; views whose
    stems collide (``a/001.png``, ``b/001.png``; ``IMG`` and ``img`` too) get their index in front, so no render
    overwrites another's."""
    stems = [(Path(str(views.names[i])).stem if i < len(views.names) else "") or f"{i:03d}" for i in range(len(views))]
    seen = Counter(s.casefold() for s in stems)  # IMG and img are one file on macOS and Windows
    return [f"{i:03d}_{s}" if seen[s.casefold()] > 1 else s for i, s in enumerate(stems)]


def clear_stale_renders(folder: Path, stems: list[str]) -> None:
    """Remove the renders an earlier run left in ``folder`` for any of these views (and nothing else), so a run
    of the same views stopped part-way (Ctrl-C, a time cap, fewer --max-views) leaves no other model's renders of
    them beside its own (renders of other views, another capture's, are left as they are)."""
    for stem in stems:
        for suffix in RENDER_SUFFIXES:
            p = folder / f"{stem}{suffix}.png"
            if p.is_symlink() or p.is_file():
                p.unlink()


def clear_other_lods(out_dir: Path, dataset: SceneDataset, split: str, lods: list[int]) -> None:
    """Remove the renders of ``split``'s views that an earlier run left in ``out_dir`` for LODs other than ``lods``
    (and their folders, when that empties them): ``vqad eval -o`` writes a metrics.json of ``lods`` alone, which
    must not stand beside another model's renders. (``vqad render --lod L`` keeps the other LODs' renders.)"""
    stems = view_stems(pick_split(dataset, split))
    prefix = f"{split}_lod"
    for other in Path(out_dir).glob(f"{glob.escape(prefix)}*"):
        level = other.name.removeprefix(prefix)
        if level.isdigit() and int(level) not in lods and other.is_dir() and not other.is_symlink():
            clear_stale_renders(other, stems)
            if not any(other.iterdir()):
                other.rmdir()


@torch.no_grad()
def render_views(field, dataset: SceneDataset, split: str, lods: list[int], sampler: OccupancySampler | None = None,
                 max_views: int | None = None, chunk: int = 1 << 13, early_stop_eps: float = 0.0,
                 indices: list[int] | None = None):
    """Yield ``(index, name, rgb (B, H, W, 3), depth (B, H, W) world units, opacity (B, H, W), gt (H, W, 3))``
    for each view of ``split`` (the first ``max_views``, or those of ``indices``), every LOD of ``lods``
    rendered at once."""
    from vqad.nerf.rays import RayBatcher
    from vqad.nerf.render import model_sampler

    views = pick_split(dataset, split)
    sampler = sampler or model_sampler(field)
    device = field.device
    batcher = RayBatcher(views, dataset, device)
    background = torch.tensor(dataset.background, dtype=torch.float32, device=device)
    H, W = views.hw
    n = len(views) if max_views is None else min(max_views, len(views))
    stems = view_stems(views)
    was_training = field.training
    field.eval()
    try:
        for i in (range(n) if indices is None else indices):
            o, d, gt, near, far = batcher.view(i)
            rgb, depth, opa = render_rays_chunked(field, sampler, o, d, lods, background, near, far, chunk=chunk,
                                                  early_stop_eps=early_stop_eps)
            depth = depth / opa.clamp_min(1e-6) / dataset.normalization.scale
            yield (i, stems[i], rgb.reshape(len(lods), H, W, 3),
                   depth.reshape(len(lods), H, W), opa.reshape(len(lods), H, W), gt.reshape(H, W, 3))
    finally:
        field.train(was_training)


def evaluate_nerf(field, dataset: SceneDataset, split: str = "test", lods: list[int] | None = None,
                  out_dir: str | Path | None = None, max_views: int | None = None, save_images: bool = True,
                  sampler: OccupancySampler | None = None, quiet: bool = True, deadline=None,
                  require_scores: bool = True, appearance=None, match_exposure: bool = False) -> dict:
    """PSNR / SSIM per LOD (means over the views), and PNGs under ``out_dir`` when given.

    ``appearance`` (a :class:`vqad.nerf.appearance.ViewAppearance` of ``split``'s views: the training
    views' learned exposure and white balance) renders each view as its photo recorded it, scored and
    saved so; without it every view has the field's own (the training photos' average) appearance.
    ``match_exposure`` also scores each render after fitting its photo's exposure and white balance
    (:func:`vqad.nerf.appearance.psnr_matched`: a gain and an offset per channel, least squares), as
    ``"psnr_matched"``: the held-out photos of a capture whose camera metered every photo anew have
    exposures no fit can know.

    With a ``deadline`` (:class:`vqad.fit.Deadline`), views stop once its time is spent (at least one
    is always scored); ``"views"`` says how many were scored, ``"rendered"`` how many were rendered
    (more where a view's loss mask keeps no pixel: such a view is rendered only to be saved). Where no
    view can be scored, ``require_scores`` makes that an :class:`InputError` before anything is
    rendered (:func:`require_scorable`); without it PSNR and SSIM are None (the renders are written).

    Returns ``{lod: {"psnr", "ssim", "views", "rendered", "seconds"}}`` (LPIPS: see the module docstring).
    """
    lods = field.lods if lods is None else list(lods)
    for lod in lods:
        field.check_lod(lod)
    views = require_scorable(dataset, split, max_views) if require_scores else pick_split(dataset, split)
    valid = views.valid
    looks = None
    look_bg = (composited_background(views, dataset.background, field.device)  # vqad.nerf.appearance.apply_look
               if appearance is not None or match_exposure else None)
    if appearance is not None:
        if appearance.n_views != len(views):
            raise InputError(f"the per-view appearance is for {appearance.n_views} views, the {split!r} split has "
                             f"{len(views)}: it applies to the views it was trained on")
        with torch.no_grad():
            looks = tuple(t.to(field.device) for t in appearance.transforms())  # gain, offset (V, 3)
    dirs = {}
    if out_dir is not None and save_images:
        stems = view_stems(views)
        for lod in lods:
            dirs[lod] = Path(out_dir) / f"{split}_lod{lod}"
            dirs[lod].mkdir(parents=True, exist_ok=True)
            clear_stale_renders(dirs[lod], stems)
    scores = {lod: {"psnr": [], "ssim": [], "psnr_matched": []} for lod in lods}
    order = range(len(views) if max_views is None else min(max_views, len(views)))
    if valid is not None and not dirs:  # nothing is saved: a view that cannot be scored is not rendered
        order = [i for i in order if bool(valid[i].any())]
    t0 = time.perf_counter()
    n_seen = 0
    for i, name, rgb, depth, opa, gt in render_views(field, dataset, split, lods, sampler, indices=list(order)):
        n_seen += 1
        keep = None if valid is None else valid[i]
        if looks is not None:  # clamped as the camera clips at white, so the scores and the PNGs agree
            rgb = apply_look(rgb, looks[0][i], looks[1][i], opa, look_bg).clamp(0, 1)
        for b, lod in enumerate(lods):
            if keep is None or bool(keep.any()):
                scores[lod]["psnr"].append(psnr(rgb[b], gt, keep))
                scores[lod]["ssim"].append(ssim(rgb[b], gt, keep))
                if match_exposure:
                    scores[lod]["psnr_matched"].append(psnr_matched(rgb[b], gt, keep, opa[b], look_bg))
            if lod in dirs:
                colour, dep, op = (dirs[lod] / f"{name}{suffix}.png" for suffix in RENDER_SUFFIXES)
                save_image(to_png_rgb(rgb[b]), colour)
                save_image(depth_png(depth[b], opa[b]), dep)
                save_image((opa[b].clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8), op)
        if not quiet:
            print(f"  view {name}: " + ("not scored (its mask keeps no pixel)" if keep is not None and not bool(keep.any())
                                        else "  ".join(f"LOD {lod} {scores[lod]['psnr'][-1]:.2f} dB" for lod in lods)),
                  flush=True)
        if deadline is not None and deadline.left() <= 0 and scores[lods[0]]["psnr"]:
            break  # the job's time cap: the views so far are the evaluation (one scored, at least)
    seconds = time.perf_counter() - t0
    cut = len(order) - n_seen  # views the time cap left out (said with the scores and in metrics.json)
    out = {}
    for lod in lods:
        p, s = scores[lod]["psnr"], scores[lod]["ssim"]
        out[lod] = {"psnr": float(np.mean(p)) if p else None, "ssim": float(np.mean(s)) if s else None,
                    "views": len(p), "rendered": n_seen, "seconds": seconds,
                    **({"left_out_by_time_cap": cut} if cut else {})}
        if match_exposure:
            m = scores[lod]["psnr_matched"]
            out[lod]["psnr_matched"] = float(np.mean(m)) if m else None
        if looks is not None:
            out[lod]["appearance"] = "each training photo's learned exposure"
        if valid is not None:
            out[lod]["masked"] = True
    return out


def metric_lines(results: dict) -> list[str]:
    return [(f"LOD {lod}: PSNR {r['psnr']:.2f} dB"
             + (f" ({r['psnr_matched']:.2f} with each photo's exposure matched)" if r.get("psnr_matched") is not None else "")
             + f"  SSIM {r['ssim']:.4f}  ("
             + (f"{r['views']} of {r['rendered']}" if r.get("rendered", r["views"]) > r["views"] else f"{r['views']}")
             + (" view" if r["views"] == 1 and r.get("rendered", 1) <= 1 else " views") + (", the pixels their loss masks keep" if r.get("masked") else "")
             + (f"; {r['left_out_by_time_cap']} more left out by the time cap)" if r.get("left_out_by_time_cap") else ")"))
            if r["psnr"] is not None else f"LOD {lod}: not scored (the loss masks of its views keep no pixel)"
            for lod, r in results.items()]
