"""make bench-speed: how far each hot path is from the bound of its decoder alone, measured in one run.

Every figure is a ratio to a bound measured in the same process, on the same device and threads:

1. **Training step ÷ decoder-only step**, SDF (armadillo, levels 3..7, k = 16, 16384 points, every
   LOD jointly: :class:`vqad.sdf.fit.SDFTask`) and radiance field (lego at 200×200, or the
   procedural scene with ``--quick``: :class:`vqad.nerf.task.RadianceTask`), each for a ``dense`` and
   a ``codebook`` 4-bit grid. The step is the real task's ``before_step`` / ``step`` / backward /
   ``after_backward`` / :func:`vqad.fit.safe_step`, as :func:`vqad.fit.run_fit` runs it. The bound:
   the same decoder MLPs evaluated as often (SDF: B points × every LOD; radiance: the step's
   samples × its LODs through ψ_σ then ψ_c), forward + backward on random inputs of the right width
   (``requires_grad=True``) plus Adam on the decoders, and no grid.
2. **Inference**: evaluations per second of the baked SDF field at its finest LOD (no gradients,
   65536 points) ÷ those of its decoder alone on random features.
3. **Rendering**: a 256×256 sphere-traced SDF frame at every LOD (:func:`vqad.sdf.render.render_sdf`)
   and a 200×200 radiance-field frame at the finest LOD (what ``vqad render`` runs:
   :func:`vqad.nerf.evaluate.render_views`), with the field evaluations per pixel each needed —
   counted at the decoder's MLPs and at the field's ``forward`` / ``all_lods`` / ``query*`` (the larger count),
   so the count holds whatever the renderer does inside.
4. **Decoding** a .vqad file: seconds per MB for the whole file (bytes → field), and the time from
   the arrival of the last byte the coarsest LOD needs (fed to :class:`vqad.fileformat.StreamDecoder`)
   until that LOD's field is built.
5. ``--device cuda`` adds a GPU column: results are merged by device into OUT's JSON.
6. ``--profile``: the torch.profiler top-10 self-CPU entries of the SDF codebook training step.

The SDF and radiance fields that are rendered, evaluated and written are trained by this script for
a short run (see "What was trained" in the report); the fields whose steps are timed are untrained
(a step costs the same whatever the weights).

    python benchmarks/bench_speed.py --out docs/benchmarks/speed.md [--device cuda] [--profile] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, also when loaded by path
import common  # noqa: E402

#: the issue's targets (each figure must be at most its bound)
TARGET_SDF_STEP_RATIO = 1.6
TARGET_NERF_STEP_RATIO = 2.0
TARGET_SDF_FRAME_SECONDS = 0.4
TARGET_SDF_FRAME_EVALS = 4.0  # field evaluations per pixel
TARGET_NERF_FRAME_SECONDS = 1.5
TARGET_DECODE_S_PER_MB = 0.1
TARGET_FIRST_LOD_MS = 20.0
NOTES_HEADING = "## Notes"


@dataclass(frozen=True)
class Sizes:
    """What one run measures at (``--quick`` shrinks everything)."""

    sdf_levels: tuple[int, int] = (3, 7)
    features: int = 16  # k of the SDF grids
    batch: int = 16384  # SDF points per training step
    sdf_fit_steps: int = 300  # the trained SDF (rendered, evaluated, written)
    pool_size: int = 200_000
    nerf_scene: str = "lego"  # lego (200x200) | procedural (64x64)
    nerf_levels: tuple[int, int] = (4, 7)
    nerf_features: int = 8
    batch_rays: int = 4096
    nerf_fit_steps: int = 300
    wide_bits: int = 8  # the radiance step is also timed with a codebook of this b (no target: issue 20's wide codebooks)
    frame: int = 256  # SDF frame side
    infer_batch: int = 65536
    warmup: int = 3  # untimed steps before the timed ones
    steps: int = 5  # steps per timed repeat
    # timed repeats (median; a step's and its bound's alternate). Within one run the 5-step blocks' ratios
    # spread over ±0.1 (SDF codebook 1.44–1.63): 15 pairs put the median's own spread near ±0.03, where 7 left ±0.05
    repeats: int = 15
    render_repeats: int = 3
    # single loads of a ~10 ms decode: 21 span ~0.2 s, so one slow stretch of the host moves the median less
    # than 7 did (entropy-coded: 7.5–8.8 ms alone; 10–12 ms in two runs of seven with 7 repeats)
    decode_repeats: int = 21


QUICK = Sizes(sdf_levels=(3, 5), batch=2048, sdf_fit_steps=120, pool_size=50_000, nerf_scene="procedural",
              nerf_levels=(3, 5), batch_rays=512, nerf_fit_steps=60, frame=64, infer_batch=8192, warmup=1, steps=2,
              repeats=3, render_repeats=1, decode_repeats=3)


# -- timing ---------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so wall time measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def block_seconds(fn: Callable[[], object], device: torch.device, n: int) -> float:
    """Mean wall time of ``n`` calls of ``fn``, the device's queued work included."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, n: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean wall time of ``n`` calls of ``fn``, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(block_seconds(fn, device, n) for _ in range(repeats))


def paired_seconds(fa: Callable[[], object], fb: Callable[[], object], device: torch.device, n: int,
                   repeats: int) -> tuple[float, float, float]:
    """Blocks of ``n`` calls of ``fa`` and of ``fb``, alternating, ``repeats`` of each (both warmed up by
    the caller): the median seconds per call of each, and the median over the pairs of block ratios
    ``a / b``. A ratio of two blocks a few hundred ms apart follows the host's drift in both, where a
    ratio of two medians taken one after the other did not: the decoder-only bound alone moved
    20.8–29.1 ms between runs on this host (docs/benchmarks/speed.md)."""
    a, b = [], []
    for _ in range(repeats):
        a.append(block_seconds(fa, device, n))
        b.append(block_seconds(fb, device, n))
    return statistics.median(a), statistics.median(b), statistics.median(x / y for x, y in zip(a, b))


def fit_step_fn(task, opts: dict, gen: torch.Generator) -> Callable[[], object]:
    """One training step of ``task`` exactly as :func:`vqad.fit.run_fit` runs it (without the lr
    schedule, logging and checkpoints): hooks, zeroed gradients, loss, backward, guarded step."""
    from vqad.fit import safe_step, zero_grad

    it = [0]

    def step():
        task.before_step(it[0], 0.0, gen)
        zero_grad(opts)
        out = task.step(it[0], 0.0, gen)
        if out.loss is None:
            raise RuntimeError("a timed training step found no sample: the scene's octree or camera setup is broken")
        out.loss.backward()
        task.after_backward(0.0)
        safe_step(opts, out.loss)
        it[0] += 1
        return out

    return step


def decoder_bound_fn(chain: list, inputs: list[tuple[int, torch.Tensor, torch.Tensor | None]], lr: float) -> Callable[[], object]:
    """The decoder-only step: copies of the field's decoders, evaluated on random inputs, backward, Adam.

    Args:
        chain: the decoders in evaluation order: ``[ψ]`` (SDF) or ``[ψ_σ, ψ_c]`` (radiance field,
            whose ψ_c input is ψ_σ's geometry outputs ``h[:, 1:]`` followed by the SH terms).
        inputs: per evaluated LOD, ``(lod, h (N, in_dim) requires_grad, sh (N, sh_dim) or None)``.
    """
    decs = [copy.deepcopy(d) for d in chain]
    for d in decs:
        d.requires_grad_(True)
    opt = torch.optim.Adam([p for d in decs for p in d.parameters()], lr=lr)

    def step():
        opt.zero_grad(set_to_none=True)
        for _, h, _ in inputs:
            h.grad = None
        loss = 0.0
        for lod, h, sh in inputs:
            out = decs[0](h, lod)
            if len(decs) > 1:
                out = decs[1](torch.cat([out[:, 1:], sh], dim=-1), lod)
            loss = loss + (out ** 2).mean()
        loss.backward()
        opt.step()
        return loss

    return step


def step_figures(task, opts: dict, bound_inputs: Callable[[], tuple[list, list]], lr: float, device: torch.device,
                 sz: Sizes, gen: torch.Generator) -> dict:
    """``step_ms``, ``decoder_ms`` and their ratio for one task, timed in alternating blocks
    (:func:`paired_seconds`); ``bound_inputs()`` (called after the warm-up steps) gives the decoder
    chain and inputs that match what the steps evaluate."""
    step = fit_step_fn(task, opts, gen)
    for _ in range(sz.warmup):
        step()
    chain, inputs = bound_inputs()
    res = against_bound(step, chain, inputs, lr, device, sz)
    res["decoder_evaluations"] = sum(h.shape[0] for _, h, _ in inputs)
    return res


def against_bound(step: Callable[[], object], chain: list, inputs: list, lr: float, device: torch.device,
                  sz: Sizes) -> dict:
    """``step_ms``, ``decoder_ms`` and their ratio: the (warmed-up) ``step`` against the decoder-only
    step of ``chain`` on ``inputs`` (:func:`decoder_bound_fn`), in alternating blocks (:func:`paired_seconds`)."""
    bound = decoder_bound_fn(chain, inputs, lr)
    for _ in range(sz.warmup):
        bound()
    step_s, dec_s, ratio = paired_seconds(step, bound, device, sz.steps, sz.repeats)
    return {"step_ms": 1e3 * step_s, "decoder_ms": 1e3 * dec_s, "ratio": ratio}


# -- counting field evaluations -------------------------------------------------------------------
@contextmanager
def count_evaluations(field) -> Iterator[Callable[[], int]]:
    """Count the points at which ``field`` is evaluated (one per point per LOD), whatever path a caller takes.

    Two counts, each a lower bound when a caller bypasses the other: rows through the first decoder's
    MLPs (ψ, or ψ_σ of a radiance field: forward hooks), and points passed to the field's
    ``forward`` / ``__call__``, ``all_lods`` and the unchecked ``query`` / ``query_lods`` / ``query_densities`` the
    library's loops call (times their LODs; nested calls count once). Yields a
    function returning the larger of the two.
    """
    counts = {"mlp": 0, "calls": 0}
    depth = [0]
    hooks = [mlp.register_forward_hook(lambda m, args, out: counts.__setitem__("mlp", counts["mlp"] + args[0].shape[0]))
             for mlp in field.decoders()[0].mlps]

    def wrap(name: str, n_lods: Callable[..., int]):
        orig = getattr(field, name)

        def wrapped(x, *args, **kwargs):
            if depth[0] == 0:
                counts["calls"] += x.shape[0] * n_lods(*args, **kwargs)
            depth[0] += 1
            try:
                return orig(x, *args, **kwargs)
            finally:
                depth[0] -= 1

        setattr(field, name, wrapped)  # an instance attribute: Module.__call__ reaches it through self.forward

    def lods_arg(*args, **kwargs) -> int:
        lods = kwargs.get("lods", next((a for a in args if isinstance(a, (list, tuple))), None))
        return len(field.lods) if lods is None else len(lods)

    # the public, checked entries and the library's unchecked ones (renders, sphere tracing, pruning)
    wrapped = [name for name in ("forward", "all_lods", "query", "query_lods", "query_densities") if hasattr(field, name)]
    for name in wrapped:
        wrap(name, (lambda *a, **k: 1) if name in ("forward", "query") else lods_arg)
    try:
        yield lambda: max(counts.values())
    finally:
        for h in hooks:
            h.remove()
        for name in wrapped:
            field.__dict__.pop(name, None)


# -- the SDF --------------------------------------------------------------------------------------
def sdf_grid(sz: Sizes, storage: str):
    from vqad.config import GridConfig

    return GridConfig(storage=storage, features=sz.features, bits=4, base_level=sz.sdf_levels[0], max_level=sz.sdf_levels[1])


def sdf_train_cfg(sz: Sizes, grid_cfg, steps: int):
    from vqad.sdf.fit import SDFTrainConfig

    # no index sweeps: the rendered / written field needs a surface, not the last bit of quality
    return SDFTrainConfig(steps=steps, batch=sz.batch, pool_size=sz.pool_size, resample_every=10 ** 9, refine=0,
                          seed=0).resolved(grid_cfg)


def sdf_step(mesh, oracle, storage: str, sz: Sizes, device: torch.device) -> dict:
    """Training step vs decoder-only step of an untrained SDF field (the pool is drawn once, in the warm-up)."""
    from vqad.config import DecoderConfig
    from vqad.optim import make_optimizers
    from vqad.sdf.fit import SDFTask, build_sdf_field

    grid_cfg = sdf_grid(sz, storage)
    field = build_sdf_field(mesh, grid_cfg, DecoderConfig(), device)
    cfg = sdf_train_cfg(sz, grid_cfg, steps=10 ** 6)
    task = SDFTask(field, oracle, cfg, rng_seed=0, device=device)
    opts = make_optimizers(field, cfg.lr, cfg.grid_lr_scale, cfg.logit_lr_scale, cfg.codebook_lr_scale)
    gen = torch.Generator().manual_seed(0)

    def bound_inputs():
        width = field.decoder.mlps[0].in_dim
        return [field.decoder], [(lod, torch.rand(cfg.batch, width, device=device, requires_grad=True), None)
                                 for lod in field.lods]

    res = step_figures(task, opts, bound_inputs, cfg.lr, device, sz, gen)
    res["vertices"] = sum(field.grid.vertex_counts().values())
    return res


def sdf_profile(mesh, oracle, sz: Sizes, device: torch.device) -> str:
    """torch.profiler's top-10 self-CPU table over ``sz.steps`` codebook SDF training steps."""
    from torch.profiler import ProfilerActivity, profile

    from vqad.config import DecoderConfig
    from vqad.optim import make_optimizers
    from vqad.sdf.fit import SDFTask, build_sdf_field

    grid_cfg = sdf_grid(sz, "codebook")
    field = build_sdf_field(mesh, grid_cfg, DecoderConfig(), device)
    cfg = sdf_train_cfg(sz, grid_cfg, steps=10 ** 6)
    task = SDFTask(field, oracle, cfg, rng_seed=0, device=device)
    opts = make_optimizers(field, cfg.lr, cfg.grid_lr_scale, cfg.logit_lr_scale, cfg.codebook_lr_scale)
    step = fit_step_fn(task, opts, torch.Generator().manual_seed(0))
    for _ in range(sz.warmup + 1):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(sz.steps):
            step()
        sync(device)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)


def train_sdf(mesh, sz: Sizes, device: torch.device):
    """The codebook 4-bit SDF that is rendered, evaluated and written (baked, fp16), and how it was trained."""
    from vqad.config import DecoderConfig
    from vqad.sdf.fit import fit_sdf

    grid_cfg = sdf_grid(sz, "codebook")
    t0 = time.perf_counter()
    res = fit_sdf(mesh, grid_cfg, DecoderConfig(), sdf_train_cfg(sz, grid_cfg, sz.sdf_fit_steps), device, quiet=True)
    field = res.field
    field.bake(fp16=True)
    what = (f"SDF: armadillo, codebook 4-bit, k = {sz.features}, levels {sz.sdf_levels[0]}..{sz.sdf_levels[1]}, "
            f"{res.steps} steps × {sz.batch:,} points, no index sweeps ({time.perf_counter() - t0:.0f} s, final loss "
            f"{res.final_loss:.3g}), baked fp16")
    return field, what


def inference(field, sz: Sizes, device: torch.device) -> dict:
    """Evaluations per second of the baked field at its finest LOD vs its decoder alone."""
    n, top = sz.infer_batch, field.lods[-1]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.rand(n, 3, generator=g) * 2 - 1).to(device)
    h = torch.rand(n, field.decoder.mlps[0].in_dim, generator=g).to(device)
    with torch.no_grad():
        f_s = median_seconds(lambda: field(x, top), device, sz.warmup, sz.steps, sz.repeats)
        d_s = median_seconds(lambda: field.decoder(h, top), device, sz.warmup, sz.steps, sz.repeats)
    return {"batch": n, "lod": top, "field_evals_per_s": n / f_s, "decoder_evals_per_s": n / d_s, "ratio": d_s / f_s}


def sdf_frames(field, sz: Sizes, device: torch.device, work: Path) -> dict:
    """Seconds and field evaluations per pixel of one sphere-traced frame at every LOD (PNGs in ``work``)."""
    from vqad.atomicio import save_image
    from vqad.sdf.render import OrbitCamera, render_sdf

    cam = OrbitCamera(width=sz.frame, height=sz.frame)
    render_sdf(field, field.lods[0], cam)  # warm-up
    out = {}
    for lod in field.lods:
        with count_evaluations(field) as evaluations:
            img = render_sdf(field, lod, cam)
        n = evaluations()
        if n == 0:
            raise RuntimeError("render_sdf evaluated the field at no point that could be counted (neither through its "
                               "decoder's MLPs nor its forward / all_lods): update count_evaluations")
        save_image(img, work / f"sdf_lod{lod}.png")
        sec = median_seconds(lambda: render_sdf(field, lod, cam), device, 0, 1, sz.render_repeats)
        surface = float((img < 255).any(-1).mean())  # the background is white
        out[str(lod)] = {"seconds": sec, "evals_per_pixel": n / (sz.frame * sz.frame), "surface_fraction": surface}
    return out


# -- the radiance field ---------------------------------------------------------------------------
def nerf_dataset(sz: Sizes):
    from vqad.nerf.formats import load_dataset

    if sz.nerf_scene == "procedural":
        return load_dataset("procedural", split_limit={"train": 20, "val": 1, "test": 1}), "test"
    path = common.data_dir("bench-speed", "nerf_synthetic/lego") / "nerf_synthetic" / "lego"
    return load_dataset(path, format="blender", downscale=4, split_limit={"val": 1, "test": 1}), "val"


def nerf_grid(sz: Sizes, storage: str, bits: int = 4):
    from vqad.nerf.fit import NERF_GRID

    return replace(NERF_GRID, storage=storage, bits=bits, features=sz.nerf_features, base_level=sz.nerf_levels[0],
                   max_level=sz.nerf_levels[1])


def nerf_step(dataset, storage: str, sz: Sizes, device: torch.device, bits: int = 4) -> dict:
    """Training step vs decoder-only step of an untrained radiance field (octree as ``fit-nerf`` builds it,
    occupancy unpruned: the periodic pruning is left out of the timed steps); ``bits``: a codebook's b."""
    from vqad.nerf.fit import NERF_DECODER, NERF_FIELD, build_nerf_field
    from vqad.nerf.rays import RayBatcher
    from vqad.nerf.render import make_sampler
    from vqad.nerf.task import NeRFTrainConfig, RadianceTask
    from vqad.optim import make_optimizers

    cfg = NeRFTrainConfig(batch_rays=sz.batch_rays, prune_warmup=10 ** 9, seed=0)
    grid_cfg = nerf_grid(sz, storage, bits)
    field, _ = build_nerf_field(dataset, grid_cfg, NERF_DECODER, NERF_FIELD, cfg, device)
    task = RadianceTask(field, make_sampler(field), RayBatcher(dataset.splits["train"], dataset, device), cfg)
    opts = make_optimizers(field, cfg.lr, cfg.grid_lr_scale, cfg.logit_lr_scale, cfg.codebook_lr_scale)
    gen = torch.Generator().manual_seed(0)
    lods_per_step = []
    step = fit_step_fn(task, opts, gen)

    def counted_step():
        step()
        lods_per_step.append(len(task.lods))

    before = task.total_samples
    for _ in range(sz.warmup + sz.steps):  # untimed: the samples and LODs the bound must match
        counted_step()
    samples = (task.total_samples - before) / len(lods_per_step)  # per step
    n_lods = round(statistics.mean(lods_per_step))
    S = max(1, round(samples))
    width = field.decoder.mlps[0].in_dim
    finest = field.lods[-1]
    inputs = [(lod, torch.rand(S, width, device=device, requires_grad=True), torch.rand(S, field.sh_dim, device=device))
              for lod in [field.lods[0]] * (n_lods - 1) + [finest]]
    res = against_bound(step, [field.decoder, field.color], inputs, cfg.lr, device, sz)
    return res | {"samples_per_step": samples, "samples_per_ray": samples / sz.batch_rays, "lods_per_step": n_lods,
                  "decoder_evaluations": S * n_lods}


def train_nerf(dataset, sz: Sizes, device: torch.device):
    """The codebook 4-bit radiance field that is rendered (occupancy pruned by its own densities)."""
    from vqad.nerf.fit import NERF_DECODER, fit_nerf
    from vqad.nerf.task import NeRFTrainConfig

    t0 = time.perf_counter()
    cfg = NeRFTrainConfig(steps=sz.nerf_fit_steps, batch_rays=sz.batch_rays, seed=0)
    res = fit_nerf(dataset, nerf_grid(sz, "codebook"), NERF_DECODER, cfg, device, quiet=True)
    h, w = dataset.splits["train"].hw
    what = (f"radiance field: {dataset.name} at {w}×{h}, codebook 4-bit, k = {sz.nerf_features}, levels "
            f"{sz.nerf_levels[0]}..{sz.nerf_levels[1]}, octree from {res.octree_method}, {res.steps} steps × "
            f"{sz.batch_rays:,} rays ({time.perf_counter() - t0:.0f} s, training PSNR {res.final_psnr:.1f} dB)")
    return res.field, res.sampler, what


#: early ray termination of the radiance frame's second timing: samples behind T < this are dropped
EARLY_STOP_EPS = 1e-4


def nerf_frame(field, sampler, dataset, split: str, sz: Sizes, device: torch.device, work: Path) -> dict:
    """One view of ``split`` at the finest LOD as ``vqad render`` renders it (the model's pruned sampler,
    built once before timing), with the samples per pixel (evaluations of ψ_σ)."""
    from vqad.metrics import psnr
    from vqad.atomicio import save_image
    from vqad.nerf.evaluate import render_views, to_png_rgb

    finest = field.lods[-1]
    h, w = dataset.splits[split].hw
    res = {"lod": finest, "width": w, "height": h}
    for eps, key in ((0.0, ""), (EARLY_STOP_EPS, "_early_stop")):  # all samples; rays stopped once T < eps

        def frame():
            return list(render_views(field, dataset, split, [finest], sampler=sampler, max_views=1,
                                     early_stop_eps=eps))[0]

        frame()  # warm-up
        with count_evaluations(field) as evaluations:
            _, _, rgb, _, _, gt = frame()
        if not key:
            save_image(to_png_rgb(rgb[0]), work / f"nerf_lod{finest}.png")
        res.update({"seconds" + key: median_seconds(frame, device, 0, 1, sz.render_repeats),
                    "samples_per_pixel" + key: evaluations() / (h * w), "psnr" + key: float(psnr(rgb[0], gt))})
    return res


# -- the file -------------------------------------------------------------------------------------
def decoding(field, sz: Sizes, device: torch.device, work: Path) -> dict:
    """Whole-file decode time per MB, and the time from the coarsest LOD's last byte to its field."""
    from vqad import fileformat as F

    data = F.to_bytes(field)
    (work / "model.vqad").write_bytes(data)
    whole = median_seconds(lambda: F.load(data, device=device), device, 1, 1, sz.decode_repeats)
    coded = F.to_bytes(field, entropy=True)  # issue 20: context-coded indices and octree, lossless
    (work / "model-entropy.vqad").write_bytes(coded)
    whole_coded = median_seconds(lambda: F.load(coded, device=device), device, 1, 1, sz.decode_repeats)
    first = field.lods[0]
    prefix = F.lod_prefix_sizes(data)[first]
    times = []
    for _ in range(sz.decode_repeats + 1):  # the first is a warm-up
        dec = F.StreamDecoder()
        for a in range(0, prefix - 1, 1 << 16):
            dec.feed(data[a:min(a + (1 << 16), prefix - 1)])
        sync(device)
        t0 = time.perf_counter()
        done = dec.feed(data[prefix - 1:prefix])
        f = dec.field(first, device=device)
        sync(device)
        times.append(time.perf_counter() - t0)
        if done != [first] or f.lods[-1] != first:
            raise RuntimeError(f"StreamDecoder completed {done} on byte {prefix:,}, expected LOD {first}")
    return {"file_bytes": len(data), "seconds": whole, "seconds_per_mb": whole / (len(data) / 1e6),
            "coded_bytes": len(coded), "coded_seconds": whole_coded,
            "coded_seconds_per_mb": whole_coded / (len(coded) / 1e6),
            "first_lod": first, "first_lod_bytes": prefix, "first_lod_ms": 1e3 * statistics.median(times[1:])}


# -- report ---------------------------------------------------------------------------------------
def verdict(value: float, limit: float) -> str:
    return "met" if value <= limit else "**missed**"


def rows(run: dict) -> list[tuple[str, str, str]]:
    """(figure, target, this run's value) rows of one device's results."""
    out = []
    for kind, target in (("sdf", TARGET_SDF_STEP_RATIO), ("nerf", TARGET_NERF_STEP_RATIO)):
        name = "SDF" if kind == "sdf" else "radiance"
        for storage, r in run[f"{kind}_step"].items():
            extra = (f", {r['samples_per_ray']:.1f} samples/ray × {r['lods_per_step']} LODs" if kind == "nerf" else "")
            out += [
                (f"{name} training step, {storage}: ms", "", f"{r['step_ms']:.1f}"),
                (f"{name} decoder-only step, {storage}: ms", "", f"{r['decoder_ms']:.1f} ({r['decoder_evaluations']:,} "
                                                                 f"evaluations{extra})"),
                (f"**{name} step ÷ decoder-only, {storage}**", f"≤ {target}",
                 f"{r['ratio']:.2f} — {verdict(r['ratio'], target)}") if storage in ("dense", "codebook") else
                (f"{name} step ÷ decoder-only, {storage}", "", f"{r['ratio']:.2f}"),
            ]
    inf = run["inference"]
    out += [
        ("SDF inference, finest LOD: field evaluations/s", "", f"{inf['field_evals_per_s']:,.0f}"),
        ("SDF inference: decoder-only evaluations/s", "", f"{inf['decoder_evals_per_s']:,.0f}"),
        ("**SDF inference: field ÷ decoder-only throughput**", "", f"{inf['ratio']:.2f}"),
    ]
    frames = run["sdf_frame"]
    top = max(frames, key=int)
    for lod in sorted(frames, key=int):
        f = frames[lod]
        finest = lod == top
        out.append((f"{'**' if finest else ''}SDF frame, LOD {lod}: s{'**' if finest else ''}",
                    f"≤ {TARGET_SDF_FRAME_SECONDS}" if finest else "",
                    f"{f['seconds']:.3f}" + (f" — {verdict(f['seconds'], TARGET_SDF_FRAME_SECONDS)}" if finest else "")))
        out.append((f"SDF frame, LOD {lod}: field evaluations per pixel", f"≤ {TARGET_SDF_FRAME_EVALS:g}" if finest else "",
                    f"{f['evals_per_pixel']:.1f}" + (f" — {verdict(f['evals_per_pixel'], TARGET_SDF_FRAME_EVALS)}"
                                                     if finest else "") + f" ({100 * f['surface_fraction']:.0f}% on the surface)"))
    nf = run["nerf_frame"]
    out += [
        (f"**radiance frame, LOD {nf['lod']}: s**", f"≤ {TARGET_NERF_FRAME_SECONDS}",
         f"{nf['seconds']:.3f} — {verdict(nf['seconds'], TARGET_NERF_FRAME_SECONDS)}"),
        ("radiance frame: samples per pixel", "", f"{nf['samples_per_pixel']:.1f} (PSNR {nf['psnr']:.1f} dB)"),
        *([(f"radiance frame, rays stopped at T < {EARLY_STOP_EPS:g}: s", "",
            f"{nf['seconds_early_stop']:.3f} ({nf['samples_per_pixel_early_stop']:.1f} density + colour samples per "
            f"pixel counted; PSNR {nf['psnr_early_stop']:.2f} dB)")] if "seconds_early_stop" in nf else []),
    ]
    dc = run["decode"]
    out += [
        ("**decoding, whole file: s per MB**", f"≤ {TARGET_DECODE_S_PER_MB}",
         f"{dc['seconds_per_mb']:.3f} — {verdict(dc['seconds_per_mb'], TARGET_DECODE_S_PER_MB)} "
         f"({dc['seconds'] * 1e3:.1f} ms for {dc['file_bytes']:,} bytes)"),
        *([("**decoding, entropy-coded file: s per MB of the file**", f"≤ {TARGET_DECODE_S_PER_MB}",
            f"{dc['coded_seconds_per_mb']:.3f} — {verdict(dc['coded_seconds_per_mb'], TARGET_DECODE_S_PER_MB)} "
            f"({dc['coded_seconds'] * 1e3:.1f} ms for {dc['coded_bytes']:,} bytes; "
            f"{dc['coded_seconds'] / (dc['file_bytes'] / 1e6):.3f} s per MB of the raw file)")]
          if "coded_seconds" in dc else []),  # runs recorded before this row existed
        ("**first LOD: ms from its last byte to its field**", f"≤ {TARGET_FIRST_LOD_MS:g}",
         f"{dc['first_lod_ms']:.2f} — {verdict(dc['first_lod_ms'], TARGET_FIRST_LOD_MS)} "
         f"(LOD {dc['first_lod']}, {dc['first_lod_bytes']:,} bytes)"),
    ]
    return out


def write_report(runs: dict, out: Path) -> str:
    keys = list(runs)
    table = {}
    targets = {}
    for key in keys:
        for label, target, value in rows(runs[key]):
            table.setdefault(label, {})[key] = value
            targets[label] = targets.get(label) or target
    L = [
        "# Speed benchmark (`make bench-speed`)",
        "",
        "Every figure is a ratio to a bound measured in the same run (see `benchmarks/bench_speed.py`): a training "
        "step against the same decoder MLPs evaluated as often on random inputs (forward, backward, Adam; no grid); "
        "field inference against its decoder alone; frames with the field evaluations per pixel they needed "
        "(counted at the decoder's MLPs and the field's forward / all_lods, the larger count); file decoding per MB "
        "and from the coarsest LOD's last byte to its field. Times are medians of repeats after a warm-up; a "
        "training step and its bound are timed in alternating blocks, and their ratio is the median of the "
        "blocks' ratios. CPU "
        "runs keep freed memory for reuse as the vqad CLI does (`vqad.device.keep_freed_memory`), unless "
        "labelled *malloc defaults* (`VQAD_MALLOC=default`), and take vqad's fused CPU kernels (`vqad.kernels`) "
        "unless labelled *PyTorch ops* (`VQAD_KERNELS=off`).",
        "",
        "| figure | target | " + " | ".join(runs[k]["label"] for k in keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for label, vals in table.items():
        L.append(f"| {label} | {targets[label] or '–'} | " + " | ".join(vals.get(k, "–") for k in keys) + " |")
    L += ["", "## Runs", ""]
    for key in keys:
        r = runs[key]
        L += [f"**{r['label']}** — `{r['command']}`, {r['date']}, {r['machine']}, {r['seconds']:.0f} s in all"
              + (f"; {r['kernels']}" if r.get("kernels") else "") + ".  ",
              "Sizes: " + ", ".join(f"{k} {v}" for k, v in r["sizes"].items()) + ".  ",
              "What was trained: " + "; ".join(r["trained"]) + ".  ",
              "Timed steps: untrained fields (a step costs the same whatever the weights); SDF pool drawn once in "
              "the warm-up; radiance occupancy unpruned, pruning left out of the timed steps. The radiance frame "
              "uses the trained model's pruned sampler, built once before timing.", ""]
    for key in keys:
        if runs[key].get("profile"):
            L += [f"## Profile: SDF codebook training step, {runs[key]['label']} (top 10 by self CPU time)", "", "```",
                  runs[key]["profile"].rstrip(), "```", ""]
    text = "\n".join(L)
    if out.exists() and NOTES_HEADING in out.read_text():
        text += "\n" + NOTES_HEADING + out.read_text().split(NOTES_HEADING, 1)[1]  # hand-written notes survive
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/benchmarks/speed.md")
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N]: a run adds (or replaces) its device's column")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads); default one core")
    ap.add_argument("--quick", action="store_true",
                    help="smallest sizes (levels 3..5, batch 2048, 64×64 frames, the procedural scene, few steps)")
    ap.add_argument("--profile", action="store_true", help="add the profiler's top 10 of the SDF codebook step")
    ap.add_argument("--work", default="out/bench-speed", help="frames (PNG) and the .vqad file go here")
    args = ap.parse_args(argv)
    if args.threads < 1:
        sys.exit("bench-speed: --threads must be >= 1")
    torch.set_num_threads(args.threads)
    from vqad.device import keep_freed_memory, resolve_device

    kept = keep_freed_memory()  # as the vqad CLI does; $VQAD_MALLOC=default measures malloc's defaults
    from vqad.errors import InputError
    from vqad.sdf.mesh import SDFOracle, load_mesh

    try:
        device = resolve_device(args.device)
    except InputError as exc:
        sys.exit(f"bench-speed: {exc}")
    sz = QUICK if args.quick else Sizes()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    torch.manual_seed(0)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_all:6.1f} s] {msg}", flush=True)

    mesh = load_mesh(common.data_dir("bench-speed", "meshes") / "meshes" / "armadillo.obj")
    oracle = SDFOracle(mesh)
    run: dict = {"sdf_step": {}, "nerf_step": {}}
    for storage in ("dense", "codebook"):
        log(f"SDF training step, {storage}")
        run["sdf_step"][storage] = sdf_step(mesh, oracle, storage, sz, device)
    if args.profile:
        log("profiling the SDF codebook step")
        run["profile"] = sdf_profile(mesh, oracle, sz, device)
    log(f"training the SDF ({sz.sdf_fit_steps} steps)")
    sdf, sdf_what = train_sdf(mesh, sz, device)
    log("SDF inference")
    run["inference"] = inference(sdf, sz, device)
    log(f"SDF frames, {sz.frame}×{sz.frame}")
    run["sdf_frame"] = sdf_frames(sdf, sz, device, work)
    log("decoding the .vqad file")
    run["decode"] = decoding(sdf, sz, device, work)
    dataset, split = nerf_dataset(sz)
    for storage in ("dense", "codebook"):
        log(f"radiance training step, {storage}")
        run["nerf_step"][storage] = nerf_step(dataset, storage, sz, device)
    log(f"radiance training step, codebook, b = {sz.wide_bits}")
    run["nerf_step"][f"codebook, b = {sz.wide_bits}"] = nerf_step(dataset, "codebook", sz, device, bits=sz.wide_bits)
    log(f"training the radiance field ({sz.nerf_fit_steps} steps)")
    nerf, sampler, nerf_what = train_nerf(dataset, sz, device)
    log("radiance frame")
    run["nerf_frame"] = nerf_frame(nerf, sampler, dataset, split, sz, device, work)

    from vqad import kernels

    fused = device.type == "cpu" and kernels.applies(torch.zeros(1))
    label = f"{device.type}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
                                else f" ({args.threads} thread{'s' if args.threads > 1 else ''}"
                                     + ("" if kept else ", malloc defaults") + ("" if fused else ", PyTorch ops") + ")")
    run.update({
        "label": label + (" --quick" if args.quick else ""),
        "command": f"python benchmarks/bench_speed.py {' '.join(sys.argv[1:] if argv is None else argv)}",
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPU threads",
        "threads": args.threads, "seconds": time.perf_counter() - t_all,
        "kernels": kernels.status() if device.type == "cpu" else "PyTorch ops (CUDA)", "trained": [sdf_what, nerf_what],
        "sizes": {k: (f"{v[0]}..{v[1]}" if isinstance(v, tuple) else v) for k, v in asdict(sz).items()},
    })
    out = Path(args.out)
    js = out.with_suffix(".json")
    runs = json.loads(js.read_text()).get("runs", {}) if js.exists() else {}
    runs[device.type + (" quick" if args.quick else "") + ("" if kept or device.type == "cuda" else " malloc")
         + ("" if fused or device.type == "cuda" else " torch-ops")] = run
    text = write_report(runs, out)
    js.write_text(json.dumps({"runs": runs}, indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
