"""The TSDF field kind, its fit task, masked meshing and `vqad fit-tsdf` (fusion and readers: test_fusion / test_rgbd)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vqad import fileformat
from vqad.config import DecoderConfig, GridConfig
from vqad.errors import InputError
from vqad.tsdf.extract import extract_tsdf_mesh, masked_marching_cubes
from vqad.tsdf.field import TSDFField
from vqad.tsdf.fusion import FusedTSDF
from vqad.tsdf.fit import TSDFTrainConfig, fit_tsdf
from conftest import need_open3d

CENTER, RADIUS = np.array([0.1, 0.2, 1.0]), 0.3


class SphereFusion(FusedTSDF):
    """A FusedTSDF with exact values: a sphere's truncated distance in a band of voxels."""

    def __init__(self, voxel=0.02, trunc=0.06, color=False, units="m"):
        self.voxel, self.trunc, self.units, self.block = voxel, trunc, units, 8
        lo = np.floor((CENTER - RADIUS - 0.1) / voxel).astype(int)
        hi = np.ceil((CENTER + RADIUS + 0.1) / voxel).astype(int)
        g = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1).reshape(-1, 3)
        d = np.linalg.norm((g + 0.5) * voxel - CENTER, axis=1) - RADIUS
        keep = np.abs(d) < trunc + 2 * voxel
        self.ijk = g[keep].astype(np.int32)
        self.tsdf = np.clip(d[keep], -trunc, trunc).astype(np.float32)
        self.weight = np.full(keep.sum(), 4.0, np.float32)
        c = self.centers()
        self.color = (np.clip((c - CENTER + RADIUS) / (2 * RADIUS), 0, 1) * 255).astype(np.uint8) if color else None

    def centers(self):
        return (self.ijk + 0.5) * self.voxel

    def sample(self, p):
        d = np.linalg.norm(p - CENTER, axis=1) - RADIUS
        return np.clip(d, -self.trunc, self.trunc).astype(np.float32), np.abs(d) < self.trunc + 1.5 * self.voxel


def _fit(color=False, steps=100, storage="codebook"):
    fused = SphereFusion(color=color)
    return fused, fit_tsdf(fused, GridConfig(storage=storage, base_level=3, max_level=5), DecoderConfig(),
                           TSDFTrainConfig(steps=steps, batch=2048, refine=1, refine_samples=5000, pool_size=20000,
                                           color=color),
                           torch.device("cpu"), quiet=True)


def test_masked_marching_cubes_keeps_only_fully_observed_cubes():
    n = 12
    g = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).astype(float)
    vol = np.linalg.norm(g - 5.5, axis=-1) - 4.0  # a sphere of radius 4 lattice steps
    full = masked_marching_cubes(vol, np.ones_like(vol, bool), 1.0, (0, 0, 0))
    half = np.ones_like(vol, bool)
    half[:, :, :6] = False  # the lower half unobserved: cubes touching z < 6 are cut
    cut = masked_marching_cubes(vol, half, 1.0, (0, 0, 0))
    assert len(cut.faces) > 0 and len(cut.faces) < len(full.faces)
    assert cut.vertices[:, 2].min() >= 6 - 1e-9  # no triangle in a cube with an unobserved corner
    # brute force: every kept face's cube has all 8 corners observed, and every fully observed cube's faces are kept
    kept = {tuple(np.floor(cut.vertices[f].mean(0)).astype(int)) for f in cut.faces}
    want = {tuple(np.floor(full.vertices[f].mean(0)).astype(int)) for f in full.faces}
    want = {c for c in want if half[c[0]:c[0] + 2, c[1]:c[1] + 2, c[2]:c[2] + 2].all()}
    assert kept == want
    r = np.linalg.norm(cut.vertices - 5.5, axis=1)
    assert np.abs(r - 4.0).max() < 0.1
    # spacing and origin
    moved = masked_marching_cubes(vol, half, 0.5, (1, 2, 3))
    assert np.allclose(moved.vertices, cut.vertices * 0.5 + [1, 2, 3])
    assert len(masked_marching_cubes(vol, np.zeros_like(half), 1.0, (0, 0, 0)).faces) == 0


def test_fit_tsdf_recovers_the_sphere_and_round_trips_bit_exact():
    fused, res = _fit(color=True)
    field = res.field
    assert isinstance(field, TSDFField) and field.has_color
    m = extract_tsdf_mesh(field)
    err = np.abs(np.linalg.norm(m.vertices - CENTER, axis=1) - RADIUS)
    assert np.median(err) < 0.25 * fused.voxel * 4, np.median(err)  # within a voxel or so after a short fit
    field.bake()
    data = fileformat.to_bytes(field, entropy=True)
    x = torch.rand(4096, 3) * 2 - 1
    for lod in field.lods:
        got = fileformat.load(data, lod=lod)
        assert got.kind == "tsdf" and got.truncation == fused.trunc and got.units == "m"
        assert torch.equal(got(x, lod), field(x, lod)), lod
        assert torch.equal(got.color(x, lod), field.color(x, lod)), lod
    info = fileformat.read_info(data)
    assert info.config["kind"] == "tsdf" and info.config["tsdf"]["truncation"] == fused.trunc


def test_tsdf_header_values_are_checked():
    fused, res = _fit(steps=20)
    field = res.field
    field.bake()
    from vqad.field import field_config

    cfg = field_config(field)
    for bad in ({"truncation": -1.0}, {"voxel": float("nan")}, {"units": "furlong"}, {"color": 1},
                {"truncation": fused.voxel / 2}):
        rec = {**cfg["tsdf"], **bad}
        with pytest.raises(InputError):
            TSDFField.from_config({**cfg, "tsdf": rec}, field.grid)
    with pytest.raises(InputError):
        TSDFField.from_config({**cfg, "tsdf": {**cfg["tsdf"], "extra": 1}}, field.grid)
    with pytest.raises(InputError, match="no colour"):
        field.color(torch.zeros(1, 3))


def test_fit_tsdf_refuses_colour_the_fusion_lacks():
    with pytest.raises(InputError, match="no colour"):
        fit_tsdf(SphereFusion(), GridConfig(max_level=4), DecoderConfig(), TSDFTrainConfig(steps=5, color=True),
                 torch.device("cpu"), quiet=True)


# -- `vqad fit-tsdf` end to end ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A small noisy TUM-layout scan of a sphere (with its ground-truth mesh), written by `vqad synth-rgbd`."""
    need_open3d("vqad synth-rgbd of a mesh needs Open3D (pip install 'vqad[tsdf]')")
    import trimesh

    from vqad.app.cli import main

    d = tmp_path_factory.mktemp("scan")
    trimesh.creation.icosphere(subdivisions=4, radius=1.0).export(d / "sphere.ply")
    assert main(["synth-rgbd", str(d / "sphere.ply"), "--frames", "12", "--size", "96x72", "--object-size", "0.4",
                 "--out", str(d / "seq"), "--threads", "1"]) == 0
    return d / "seq"


@pytest.fixture(scope="module")
def procedural_scan(tmp_path_factory):
    """A small TUM-layout scan of the built-in procedural scene (no Open3D needed): for the tests of
    flags, which need a valid scan but not a mesh's."""
    from vqad.app.cli import main

    d = tmp_path_factory.mktemp("pscan")
    assert main(["synth-rgbd", "procedural", "--frames", "6", "--size", "48x36", "--out", str(d / "seq"),
                 "--threads", "1"]) == 0
    return d / "seq"


FAST = ["--levels", "2:4", "--steps", "40", "--batch", "2048", "--refine", "1", "--refine-samples", "4000",
        "--threads", "1", "--quiet"]


def test_cli_fit_tsdf_end_to_end(scan, tmp_path, capsys):
    import json

    from vqad.app.cli import main
    from vqad.sdf.mesh import load_mesh
    from vqad.tsdf.fusion import FusedTSDF

    out = tmp_path / "fit"
    assert main(["fit-tsdf", str(scan), "--gt", str(scan / "gt_mesh.ply"), "--voxel", "0.01", "--out", str(out)] + FAST) == 0
    text = capsys.readouterr().out
    assert "smaller than the fusion" in text
    m = json.loads((out / "metrics.json").read_text())
    fused = FusedTSDF.load(out / "fused.tsdf")
    assert m["fusion"]["bytes"] == fused.nbytes() == len(fused.to_bytes())  # measured: the stored form's length
    assert set(m["lods"]) == {"2", "3", "4"} and all("vs_gt" in v and "vs_fusion" in v for v in m["lods"].values())
    assert m["lod_bytes"]["4"] == (out / "model.vqad").stat().st_size
    # the fusion reproduces the ground-truth sphere within the noise (and voxel) scale
    assert m["fusion"]["vs_gt"]["chamfer_l1"] < 0.01, m["fusion"]["vs_gt"]
    # meshes and metrics are in the sequence's world frame: the finest mesh sits where the ground truth is
    gt, fine = load_mesh(scan / "gt_mesh.ply", closed=False), load_mesh(out / "mesh_lod4.ply", closed=False)
    assert np.linalg.norm(fine.vertices.mean(0) - gt.vertices.mean(0)) < 0.03
    for f in ("fusion_mesh.ply", "render_lod2.png", "render_lod4.png", "checkpoint/config.json"):
        assert (out / f).is_file(), f
    # the .vqad works with the generic commands
    assert main(["info", str(out / "model.vqad")]) == 0
    assert "TSDF: truncation" in capsys.readouterr().out
    assert main(["mesh", str(out / "model.vqad"), "--lod", "3", "-o", str(tmp_path / "m3.ply")]) == 0
    assert main(["render", str(out / "model.vqad"), "--size", "48", "-o", str(tmp_path / "r.png")]) == 0
    assert main(["mesh", str(out / "model.vqad"), "--resolution", "64", "-o", str(tmp_path / "x.ply")]) == 2
    # resume continues from the checkpoint and the stored fusion; fusion flags cannot apply then
    assert main(["fit-tsdf", str(scan), "--out", str(out), "--resume", "--voxel", "0.02"] + FAST) == 2
    assert main(["fit-tsdf", str(scan), "--out", str(out), "--resume", "--no-eval"] + FAST[:-5] + ["--steps", "60", "--threads", "1", "--quiet"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 60
    # a fused TSDF file is a source too (fusion flags refused there)
    assert main(["fit-tsdf", str(out / "fused.tsdf"), "--voxel", "0.01", "--out", str(tmp_path / "b")] + FAST) == 2
    assert main(["fit-tsdf", str(out / "fused.tsdf"), "--no-eval", "--out", str(tmp_path / "b")] + FAST) == 0


@pytest.mark.parametrize("argv,words", [
    (["--voxel", "0.02", "--trunc", "0.01"], "at least one --voxel"),
    (["--voxel", "-1"], "must be positive"),
    (["--voxel", "nan"], "finite"),
    (["--stride", "0"], "positive integer"),
    (["--no-eval", "--gt", "x.ply"], "cannot apply with --no-eval"),
    (["--grid", "dense", "--refine", "2"], "discrete indices"),
    (["--format", "redwood"], ""),
    (["--color"], "no colour"),
    (["--color-weight", "0.5"], "--color only"),
])
def test_cli_fit_tsdf_bad_inputs_exit_2(procedural_scan, tmp_path, capsys, argv, words):
    from vqad.app.cli import main

    source = str(procedural_scan)
    if argv == ["--color"]:  # a fusion without colour: a depth-only Redwood copy would do; a fused file is simpler
        from vqad.tsdf.fusion import FusedTSDF

        f = SphereFusion()
        FusedTSDF(f.voxel, f.trunc, "m", f.ijk, f.tsdf, f.weight).save(tmp_path / "nocolor.tsdf")
        source = str(tmp_path / "nocolor.tsdf")
    assert main(["fit-tsdf", source, "--out", str(tmp_path / "o")] + argv + FAST) == 2
    err = capsys.readouterr().err
    assert err.startswith("vqad: error:") and len(err.strip().splitlines()) == 1 and words in err


def test_cli_fit_tsdf_missing_source_exits_2(tmp_path, capsys):
    from vqad.app.cli import main

    assert main(["fit-tsdf", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")] + FAST) == 2
    assert "vqad: error:" in capsys.readouterr().err


# -- a hostile pass's findings (twenty-third session) ----------------------------------------------------
TINY_TSDF = ["--levels", "2:3", "--steps", "3", "--batch", "256", "--refine", "0", "--threads", "1", "--quiet"]


def test_a_sequence_without_colour_is_refused_before_fusion_and_a_failed_fusion_does_not_block_the_rerun(
        tmp_path, capsys):
    """--color on depth-only frames is refused before anything is fused or written; a folder an earlier
    fit-tsdf left with only fused.tsdf (a failure after fusion) takes the rerun; a new fit replacing an
    earlier one says so and removes its evaluation's files."""
    from vqad.app.cli import main
    from vqad.tsdf.rgbd import RGBDSequence
    from vqad.tsdf.synth import DepthNoise, procedural_sequence, write_redwood

    seq = procedural_sequence(n_frames=4, width=40, height=30, noise=DepthNoise.none())
    depth_only = write_redwood(RGBDSequence(seq.name, seq.intrinsics, seq.poses, seq.width, seq.height,
                                            seq.load_depth), tmp_path / "d")
    out = tmp_path / "o"
    assert main(["fit-tsdf", str(depth_only), "--color", "--out", str(out)] + TINY_TSDF) == 2
    assert "has no colour frames" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    (out / "fused.tsdf").write_bytes(b"left by a fit that failed after fusing")
    assert main(["fit-tsdf", str(depth_only), "--out", str(out), "--no-eval"] + TINY_TSDF) == 0
    (out / "mesh_lod3.ply").write_text("an earlier evaluation's mesh")
    (out / "render_lod2.png").write_text("and render")
    capsys.readouterr()
    assert main(["fit-tsdf", str(depth_only), "--out", str(out), "--no-eval"] + TINY_TSDF) == 0
    assert "replacing the earlier fit" in capsys.readouterr().err
    assert not (out / "mesh_lod3.ply").exists() and not (out / "render_lod2.png").exists()


def test_a_ground_truth_mesh_in_other_units_or_elsewhere_is_refused_before_the_fit(procedural_scan, tmp_path,
                                                                                 capsys):
    import trimesh

    from vqad.app.cli import main

    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    for name, scale, shift, words in [("mm", 1000.0, 0.0, "the size of the fused scene's"),
                                      ("far", 1.0, 50.0, "misses the fused scene's")]:
        m = sphere.copy()
        m.apply_scale(scale)
        m.apply_translation([shift, 0, 0])
        m.export(tmp_path / f"{name}.ply")
        out = tmp_path / f"o_{name}"
        assert main(["fit-tsdf", str(procedural_scan), "--gt", str(tmp_path / f"{name}.ply"),
                     "--out", str(out)] + TINY_TSDF) == 2
        err = capsys.readouterr().err
        assert words in err and "units (m) and world frame" in err and not (out / "checkpoint").exists()


def test_fusion_refuses_an_absurd_truncation_and_dense_grids_take_refine_0(procedural_scan, tmp_path, capsys):
    from vqad.app.cli import main
    from vqad.tsdf.fusion import MAX_TRUNC_VOXELS

    assert main(["fit-tsdf", str(procedural_scan), "--voxel", "0.01", "--trunc", str(0.01 * (MAX_TRUNC_VOXELS + 1)),
                 "--out", str(tmp_path / "t")] + TINY_TSDF) == 2
    assert "voxels of 0.01: every depth sample would carve" in capsys.readouterr().err
    assert main(["fit-tsdf", str(procedural_scan), "--grid", "dense", "--no-eval", "--out", str(tmp_path / "d")]
                + TINY_TSDF) == 0  # --refine 0 means none: it applies to any grid


def test_synth_rgbd_refuses_sequences_nothing_can_be_fitted_to(tmp_path, capsys):
    from vqad.app.cli import main

    assert main(["synth-rgbd", "procedural", "--out", str(tmp_path / "far"), "--frames", "3", "--size", "40x30",
                 "--object-size", "100", "--threads", "1"]) == 2
    assert "no frame has a depth sample" in capsys.readouterr().err and not (tmp_path / "far").exists()
    assert main(["synth-rgbd", "procedural", "--out", str(tmp_path / "coarse"), "--frames", "3", "--size", "40x30",
                 "--depth-scale", "0.5", "--threads", "1"]) == 2
    assert "steps of 2 m" in capsys.readouterr().err
    # every frame is held until written: a count past the memory limit is refused at once (it grew ~5 MB/s, unbounded)
    assert main(["synth-rgbd", "procedural", "--out", str(tmp_path / "many"), "--frames", "100000000", "--size",
                 "320x240", "--threads", "1"]) == 2
    assert "need 100,135.8 GiB while they are rendered" in capsys.readouterr().err and not (tmp_path / "many").exists()


def test_synth_rgbd_stopped_by_sigterm_leaves_nothing(tmp_path):
    """SIGTERM (a job scheduler's stop) left a folder of some frames and no lists, which the rerun refused; Ctrl-C
    already cleaned up."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "s"
    p = subprocess.Popen([sys.executable, "-m", "vqad.app.cli", "synth-rgbd", "procedural", "--out", str(out), "--frames",
                          "5000", "--size", "64x48", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while not out.exists() and p.poll() is None and time.monotonic() - t0 < 60:
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and b"terminated" in err and not out.exists(), err[-300:]


def test_mesh_of_a_tsdf_file_at_a_lod_is_the_fits_own_mesh_and_a_resumed_fit_counts_its_own_steps(
        procedural_scan, tmp_path, capsys):
    """vqad mesh FILE.vqad --lod L decodes the whole file (a TSDF is meshed on its finest cells' lattice), so it
    gives the checkpoint's mesh; a resumed fit's summary line counts the steps it ran."""
    import trimesh

    from vqad.app.cli import main

    out = tmp_path / "o"
    args = ["--levels", "2:4", "--batch", "256", "--refine", "0", "--threads", "1", "--quiet", "--no-eval"]
    assert main(["fit-tsdf", str(procedural_scan), "--steps", "20", "--out", str(out)] + args) == 0
    assert main(["mesh", str(out / "model.vqad"), "--lod", "3", "-o", str(tmp_path / "f.ply")]) == 0
    assert main(["mesh", str(out / "checkpoint"), "--lod", "3", "-o", str(tmp_path / "c.ply")]) == 0
    f, c = trimesh.load(tmp_path / "f.ply"), trimesh.load(tmp_path / "c.ply")
    from scipy.spatial import cKDTree

    assert len(f.vertices) == len(c.vertices)  # a prefix decoded to LOD 3 alone gave about a third of them
    gap = max(cKDTree(c.vertices).query(f.vertices)[0].max(), cKDTree(f.vertices).query(c.vertices)[0].max())
    assert gap < 0.005  # metres: the file's fp16 features against the checkpoint's fp32
    capsys.readouterr()
    assert main(["fit-tsdf", str(procedural_scan), "--steps", "30", "--resume", "--out", str(out)] + args) == 0
    assert "fit: 10 steps (steps 21..30, resumed)" in capsys.readouterr().out


def test_fit_tsdf_prints_the_median_depth_and_warns_of_levels_finer_than_the_fusion(procedural_scan, tmp_path,
                                                                                   capsys):
    """The median depth is printed (depth in the wrong units shows even where it stays plausible), and a finest
    level whose cells are under half a fused voxel is warned about."""
    from vqad.app.cli import main

    assert main(["fit-tsdf", str(procedural_scan), "--levels", "2:9", "--steps", "2", "--batch", "256", "--refine",
                 "0", "--no-eval", "--threads", "1", "--out", str(tmp_path / "o")]) == 0
    cap = capsys.readouterr()
    assert ", median depth " in cap.out and " m;" in cap.out.split(", median depth ")[1][:12]
    assert "finer than half the fused voxel" in cap.err
    # far finer (--levels 2:16 took 4.8 GB in 12 s): refused before anything is written, naming a level that fits
    assert main(["fit-tsdf", str(procedural_scan), "--levels", "2:16", "--steps", "2", "--no-eval", "--threads", "1",
                 "--out", str(tmp_path / "o16")]) == 2
    err = capsys.readouterr().err
    assert "times finer than the fused voxel" in err and "--levels 2:8" in err and not (tmp_path / "o16").exists()
    # a voxel near the scene's size (--voxel 100 on a 2 m scene fitted a model 11.6x the fusion, unsaid)
    assert main(["fit-tsdf", str(procedural_scan), "--voxel", "0.5", "--levels", "2:3", "--steps", "2", "--no-eval",
                 "--threads", "1", "--out", str(tmp_path / "coarse")]) == 0
    assert "the fused scene spans only" in capsys.readouterr().err


def test_a_fusion_with_no_surface_is_refused_and_one_without_a_mesh_is_still_evaluated(tmp_path, capsys):
    """Found by a hostile pass: a fused file of 0 voxels (FusedTSDF.save writes one) was a ValueError traceback with
    its fused.tsdf left behind; one voxel fitted, then the evaluation's empty fusion mesh was a traceback."""
    from vqad.app.cli import main
    from vqad.tsdf.fit import check_fusable
    from vqad.tsdf.fusion import FusedTSDF

    FusedTSDF(0.01, 0.04, "m", np.zeros((0, 3)), [], []).save(tmp_path / "none.tsdf")
    FusedTSDF(0.01, 0.04, "m", np.zeros((1, 3)), [0.04], [1.0]).save(tmp_path / "far.tsdf")  # at +τ: outside the band
    for name in ("none", "far"):
        with pytest.raises(InputError, match="none within its truncation band"):
            check_fusable(FusedTSDF.load(tmp_path / f"{name}.tsdf"))
        assert main(["fit-tsdf", str(tmp_path / f"{name}.tsdf"), "--out", str(tmp_path / name)] + TINY_TSDF) == 2
        assert "saw no surface to fit" in capsys.readouterr().err and not (tmp_path / name).exists()
    # two voxels in the band, apart, of one sign: nothing to mesh between them
    FusedTSDF(0.01, 0.04, "m", [[0, 0, 0], [20, 0, 0]], [0.01, 0.01], [1.0, 1.0]).save(tmp_path / "one.tsdf")
    assert main(["fit-tsdf", str(tmp_path / "one.tsdf"), "--out", str(tmp_path / "one")] + TINY_TSDF) == 0
    assert "the fusion's own mesh is empty" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert set(metrics["lods"]) == {"2", "3"} and not (tmp_path / "one" / "fusion_mesh.ply").exists()
