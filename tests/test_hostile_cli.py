"""Hostile command lines around captures: each ends in one line on stderr and exit 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import torch

from vqad.app.cli import main


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


def test_synth_capture_out_that_cannot_be_created(tmp_path, capsys):
    (tmp_path / "afile").write_text("hi")
    assert main(["synth-capture", "-o", str(tmp_path / "afile" / "sub"), "--size", "8x8", "--views", "2",
                 "--threads", "1"]) == 2
    assert "cannot create --out" in _err(capsys)


def test_synth_capture_object_alone_suggests_a_fit_that_runs(tmp_path, capsys):
    import shlex

    out = tmp_path / "my obj"  # the printed command is one to paste: quoted for the shell
    assert main(["synth-capture", "-o", str(out), "--size", "8x8", "--views", "2", "--no-background",
                 "--points", "0", "--threads", "1"]) == 0
    line = next(t for t in capsys.readouterr().out.splitlines() if t.startswith("next: "))
    assert shlex.split(line[len("next: "):]) == ["vqad", "fit-nerf", str(out), "--format", "ngp", "--octree", "density"]
    # with depth maps the default octree (from depth) applies: no density pass suggested
    assert main(["synth-capture", "-o", str(tmp_path / "d"), "--size", "8x8", "--views", "2", "--no-background",
                 "--points", "0", "--depth", "--threads", "1"]) == 0
    assert "--octree density" not in capsys.readouterr().out


def test_absurd_thread_counts_are_refused(capsys, monkeypatch, tmp_path):
    assert main(["synth-capture", "-o", "unused", "--threads", "99999"]) == 2
    assert "at most 1024" in _err(capsys)
    # more threads than cores: it runs, with a one-line warning (a fit ran 175x slower)
    monkeypatch.setattr("vqad.device.available_cores", lambda: 2)
    try:
        assert main(["info", str(tmp_path / "none.vqad"), "--threads", "8"]) == 2
        err = _err(capsys)
        assert "vqad: warning: 8 CPU threads on the 2 core(s)" in err and "give --threads 2 or fewer" in err
    finally:
        torch.set_num_threads(1)


def test_a_marching_step_out_of_range_is_refused_naming_the_flag(capsys):
    for bad in ("1e-9", "inf", "100"):
        assert main(["fit-nerf", "procedural", "--out", "unused", "--step-ratio", bad]) == 2
        assert "--step-ratio takes 'auto' or a number of finest cells in 0.03125..16" in _err(capsys)
    for extra in (["--lod-mode", "finest"], ["--levels", "5:5"]):
        assert main(["fit-nerf", "procedural", "--out", "unused", "--coarse-weight", "0.5", *extra]) == 2
        assert "--coarse-weight weighs the coarser LODs' loss: it cannot apply" in _err(capsys)
    for flag, says in ((["--per-lod-decoder"], "--per-lod-decoder gives each LOD its own MLPs"),
                       (["--lod-mode", "all"], "--lod-mode picks which LODs a step trains")):
        assert main(["fit-nerf", "procedural", "--out", "unused", "--levels", "5:5", *flag]) == 2
        assert says in _err(capsys)
    assert main(["fit-sdf", "m.obj", "--out", "unused", "--levels", "5:5", "--per-lod-decoder"]) == 2
    assert "--per-lod-decoder gives each LOD its own MLP" in _err(capsys)


def test_running_out_of_memory_is_one_line(monkeypatch, capsys):
    """An allocation failure (a legal but huge --levels, say) says what to lower; other runtime errors
    are bugs and keep their traceback."""
    import vqad.app.commands.nerf as nerf

    def huge(args):
        torch.empty(1)  # a real torch call first
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 157707927552 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(nerf, "cmd_fit_nerf", huge)
    assert main(["fit-nerf", "procedural", "--out", "unused", "--threads", "1"]) == 2
    err = _err(capsys)
    assert err.startswith("vqad: error: out of memory") and "157707927552" in err and "--batch-rays" in err
    monkeypatch.setattr(nerf, "cmd_synth_capture", huge)  # a command without its own hint: where to look
    assert main(["synth-capture", "-o", "unused", "--threads", "1"]) == 2
    assert "see vqad synth-capture --help" in _err(capsys)

    def bug(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(nerf, "cmd_synth_capture", bug)
    try:
        main(["synth-capture", "-o", "unused", "--threads", "1"])
    except RuntimeError as e:
        assert "shape mismatch" in str(e)
    else:
        raise AssertionError("a runtime error that is not about memory must not be swallowed")


def test_ssim_of_images_one_pixel_wide():
    from vqad.metrics import ssim

    for h, w in ((1, 8), (8, 1), (1, 1)):
        a = torch.rand(h, w, 3, generator=torch.Generator().manual_seed(h * 10 + w))
        assert ssim(a, a) == 1.0
        assert 0 < ssim(a, (a + 0.1).clamp(0, 1)) < 1.0


def test_synth_capture_says_when_a_render_will_take_minutes(tmp_path, monkeypatch, capsys):
    import vqad.nerf.scene_capture as sc

    monkeypatch.setattr(sc, "write_capture", lambda out, cfg, background=True, on_view=None, depth=False: out / "transforms.json")
    assert main(["synth-capture", "-o", str(tmp_path / "big"), "--size", "4000x4000", "--views", "200",
                 "--supersample", "4", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "rendering 51,200,000,000 rays" in out and "minutes on one core" in out
    assert main(["synth-capture", "-o", str(tmp_path / "small"), "--size", "8x8", "--views", "2", "--threads", "1"]) == 0
    assert "rendering" not in capsys.readouterr().out


def test_synth_capture_reports_its_views_as_it_goes_and_names_an_interrupted_capture(tmp_path, monkeypatch, capsys):
    import vqad.app.commands.nerf as nerf
    import vqad.nerf.scene_capture as sc

    monkeypatch.setattr(nerf, "PROGRESS_SECONDS", 0.0)  # every view, but the last (the summary follows it)
    out = tmp_path / "cap"
    assert main(["synth-capture", "-o", str(out), "--size", "8x8", "--views", "4", "--points", "0", "--threads", "1"]) == 0
    lines = [ln.strip() for ln in capsys.readouterr().out.splitlines() if "views in" in ln]
    assert [ln.split()[0] for ln in lines] == ["1/4", "2/4", "3/4"] and all("s left" in ln for ln in lines)

    def stop(out_dir, cfg, background=True, on_view=None, depth=False):  # killed after two views: images, no transforms.json
        (Path(out_dir) / "images").mkdir(parents=True)
        (Path(out_dir) / "images" / "0000.png").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(sc, "write_capture", stop)
    half = tmp_path / "half"
    assert main(["synth-capture", "-o", str(half), "--size", "8x8", "--views", "4", "--threads", "1"]) == 130
    assert capsys.readouterr().err.strip() == "vqad: interrupted"
    assert not half.exists()  # what the interrupted run wrote is gone: the retry is not refused
    (half / "images").mkdir(parents=True)  # what a killed one (SIGKILL: no clean-up) leaves
    (half / "images" / "0000.png").write_bytes(b"")
    assert main(["synth-capture", "-o", str(half), "--size", "8x8", "--views", "4", "--threads", "1"]) == 2
    assert "killed capture" in _err(capsys)
    assert main(["synth-capture", "-o", str(out), "--size", "8x8", "--views", "4", "--threads", "1"]) == 2
    assert "interrupted" not in _err(capsys)  # a finished capture is just not empty


def test_an_octree_too_fine_for_memory_is_refused_naming_the_levels_that_fit(tmp_path, capsys):
    """A legal but huge --levels on a capture whose octree comes from its sparse points: the points mark a
    coarse level and each of its cells would split into 8^(MAX − that level) finest cells; refused before
    any of them is built, with the finest level that fits."""
    import pytest

    from vqad.errors import InputError
    from vqad.nerf.octree_build import MAX_FINEST_CELLS, _dilate_and_subdivide

    cells = torch.tensor([[1, 1, 1], [2, 2, 2]])
    assert _dilate_and_subdivide(cells, 2, 4).shape[0] == (27 + 27 - 8) * 4 ** 3  # [0, 2]³ ∪ [1, 3]³, 64 each
    with pytest.raises(InputError, match=r"--levels BASE:\d+"):
        _dilate_and_subdivide(cells, 2, 16)
    cap = tmp_path / "cap"
    assert main(["synth-capture", "-o", str(cap), "--size", "24x40", "--views", "6", "--threads", "1"]) == 0
    capsys.readouterr()
    assert main(["fit-nerf", str(cap), "--format", "ngp", "--levels", "4:14", "--steps", "5", "--no-eval",
                 "--threads", "1", "--out", str(tmp_path / "fit")]) == 2
    err = _err(capsys)
    fits = int(err.rsplit("--levels BASE:", 1)[1].rstrip(")"))
    assert f"more than the {MAX_FINEST_CELLS:,} allowed" in err and 4 <= fits < 14


def test_divergence_names_the_extra_loss_weights_that_are_on():
    """A huge --depth-weight diverges as a huge learning rate does: the message names both."""
    import pytest

    from vqad.errors import TrainingDivergedError
    from vqad.fit import DivergenceGuard

    for weights, says, not_says in (({"--depth-weight": 1e30, "--distortion-weight": 0.0}, "--depth-weight now 1e+30",
                                     "--distortion-weight"), ({}, "--grid-lr-scale (now 30)", "extra loss")):
        guard = DivergenceGuard(0.005, 30.0, limit=2, loss_weights=weights)
        guard.after(0, False)
        with pytest.raises(TrainingDivergedError) as e:
            guard.after(1, False)
        assert says in str(e.value) and not_says not in str(e.value)


def test_fit_out_among_other_files_and_a_huge_dilation_are_refused(tmp_path, capsys):
    """--out a folder of other files (the capture's own images/) would get checkpoint/ and renders among
    them; an earlier fit's folder is reused. --dilate is bounded (a million cells asked (2·10⁶)³ shifts)."""
    cap = tmp_path / "cap"
    assert main(["synth-capture", "-o", str(cap), "--size", "16x24", "--views", "5", "--threads", "1"]) == 0
    opts = ["--format", "ngp", "--levels", "2:4", "--steps", "3", "--batch-rays", "64", "--no-eval", "--threads", "1",
            "--quiet"]
    capsys.readouterr()
    assert main(["fit-nerf", str(cap)] + opts + ["--out", str(cap / "images")]) == 2
    assert "already holds other files" in _err(capsys)
    assert not (cap / "images" / "checkpoint").exists()
    assert main(["fit-nerf", str(cap)] + opts + ["--out", str(tmp_path / "fit")]) == 0
    assert main(["fit-nerf", str(cap)] + opts + ["--out", str(tmp_path / "fit")]) == 0  # an earlier fit: replaced
    capsys.readouterr()
    assert main(["fit-nerf", str(cap)] + opts + ["--out", str(tmp_path / "d"), "--dilate", "1000000"]) == 2
    assert "--dilate must be 0..16" in _err(capsys)


def test_more_hostile_commands_are_one_line_errors(tmp_path, capsys):
    """The second hostile pass: faces indexing no vertex, a checkpoint of another format or a damaged
    step, a batch --out among other files or on a file, an image side past the limit, a directory
    given to info, a procedural model scored against another capture."""
    import json
    import shutil

    for faces, says in (("3 0 1 7", "index 7"), ("3 0 1 -1", "index -1")):
        mesh = tmp_path / f"bad{len(says)}.ply"
        mesh.write_text("ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
                        "element face 1\nproperty list uchar int vertex_indices\nend_header\n0 0 0\n1 0 0\n0 1 0\n"
                        f"{faces}\n")
        assert main(["fit-sdf", str(mesh), "--steps", "2", "--levels", "2:3", "--no-eval", "--quiet",
                     "--out", str(tmp_path / "f")]) == 2
        err = _err(capsys)
        assert "mesh faces must be triangles of vertex indices 0..2" in err and says in err
    mesh = tmp_path / "tet.obj"
    mesh.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf 1 3 2\nf 1 2 4\nf 1 4 3\nf 2 3 4\n")
    assert main(["fit-sdf", str(mesh), "--steps", "2", "--levels", "2:3", "--refine", "0", "--no-eval", "--quiet",
                 "--out", str(tmp_path / "sdf")]) == 0
    for change, says in ((lambda c: c.update(vqad_checkpoint=99), "written by a newer vqad"),
                         (lambda c: c.pop("vqad_checkpoint"), "checkpoint format None"),
                         (lambda c: c.update(step="x"), "step must be a whole number"),
                         (lambda c: c.update(step=-5), "step must be a whole number")):
        ck = tmp_path / "ck"
        shutil.rmtree(ck, ignore_errors=True)
        shutil.copytree(tmp_path / "sdf" / "checkpoint", ck)
        cfg = json.loads((ck / "config.json").read_text())
        change(cfg)
        (ck / "config.json").write_text(json.dumps(cfg))
        assert main(["mesh", str(ck), "--resolution", "16", "-o", str(tmp_path / "m.ply")]) == 2
        assert says in _err(capsys)
    assert main(["render", str(tmp_path / "sdf" / "checkpoint"), "--size", "100000", "-o", str(tmp_path / "r.png")]) == 2
    assert "--size must be 1..8192" in _err(capsys)
    assert main(["info", str(tmp_path)]) == 2
    assert "is a folder: vqad info reads .vqad files" in _err(capsys)
    job = tmp_path / "job.toml"
    job.write_text(f'assets = ["{mesh}"]\n')
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.md").write_text("my notes")
    for out, says in ((mine, "already holds other files (results.md)"), (job, "exists and is not a directory")):
        assert main(["batch", str(job), "--dry-run", "--local", "--out", str(out)]) == 2
        assert says in _err(capsys)
    assert (mine / "results.md").read_text() == "my notes"
    assert main(["fit-nerf", "procedural", "--steps", "2", "--levels", "2:3", "--no-eval", "--quiet",
                 "--out", str(tmp_path / "pn")]) == 0
    assert main(["eval", str(tmp_path / "pn" / "checkpoint"), "--dataset", str(tmp_path)]) == 2
    assert "fitted to the built-in procedural scene: --dataset" in _err(capsys)


def _tiny_sdf_file(tmp_path):
    import trimesh

    mesh = tmp_path / "ball.obj"
    trimesh.creation.icosphere(subdivisions=2, radius=0.7).export(mesh)
    assert main(["fit-sdf", str(mesh), "--levels", "3:4", "--steps", "10", "--refine", "0", "--batch", "2048",
                 "--no-eval", "--threads", "1", "--out", str(tmp_path / "fit")]) == 0
    assert main(["export", str(tmp_path / "fit" / "checkpoint"), "-o", str(tmp_path / "m.vqad"), "--threads", "1"]) == 0
    return tmp_path / "m.vqad"


def test_models_refuse_lods_they_lack_and_queries_they_cannot_take(tmp_path, capsys):
    import numpy as np
    import pytest

    import vqad
    from vqad.app.view import _check_local_model, check_host
    from vqad.errors import InputError
    from vqad.fileformat import lod_prefix_sizes

    model = _tiny_sdf_file(tmp_path)
    with pytest.raises(InputError, match="finer than this file's finest"):
        vqad.load(model, lod=9)  # was silently the whole file
    with pytest.raises(InputError, match="LODs 3..4"):
        _check_local_model(str(model), 9)  # vqad view --lod 9
    junk = tmp_path / "junk.vqad"
    junk.write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a readable .vqad file"):
        _check_local_model(str(junk), None)  # vqad view junk.vqad used to run forever
    with pytest.raises(InputError, match="cannot use --host"):
        check_host("999.1.1.1", 0)
    f = vqad.load(model)
    ref = f(torch.zeros(5, 3), 4)
    assert torch.equal(f(np.zeros((5, 3)), 4), ref) and torch.equal(f(torch.zeros(5, 3, dtype=torch.float64), 4), ref)
    for bad, why in ((torch.zeros(5, 3, dtype=torch.long), "floating-point"), (torch.zeros(5, 2), r"shape \(N, 3\)"),
                     ("abc", "must be")):
        with pytest.raises(InputError, match=why):
            f(bad)
    with pytest.raises(InputError, match=r"choose one of \[3, 4\]"):
        f(torch.zeros(5, 3), 9)
    # a cut file: one warning line (not Python's), and info says where the stream ends; an empty one is empty
    capsys.readouterr()
    cut = tmp_path / "cut.vqad"
    n = lod_prefix_sizes(model)[3] + 10
    cut.write_bytes(model.read_bytes()[:n])
    assert main(["render", str(cut), "-o", str(tmp_path / "r.png"), "--size", "32", "--threads", "1"]) == 0
    err = _err(capsys)
    assert err.startswith("vqad: warning: ") and "UserWarning" not in err and len(err.splitlines()) == 1
    assert main(["info", str(cut)]) == 0
    assert f"the stream's {n:,} bytes end in chunk" in capsys.readouterr().out
    (tmp_path / "empty.vqad").write_bytes(b"")
    assert main(["info", str(tmp_path / "empty.vqad")]) == 2
    assert "is empty" in _err(capsys)


def test_generators_clean_up_after_a_failure_and_refuse_bad_seeds_and_empty_paths(tmp_path, monkeypatch, capsys):
    import pytest

    import vqad.tsdf.synth as synth
    from vqad.app.cli import build_parser
    from vqad.errors import InputError

    out = tmp_path / "scan"
    base = ["synth-rgbd", "procedural", "-o", str(out), "--frames", "2", "--size", "16x12", "--threads", "1"]
    assert main([*base, "--seed", "-1"]) == 2
    assert "non-negative" in _err(capsys)

    def broken(seq, where, **kwargs):  # fails half-way, as --depth-scale 1e9 did
        (where / "depth").mkdir()
        raise InputError("depth does not fit in 16 bits")

    monkeypatch.setitem(synth.LAYOUTS, "tum", broken)
    assert main(base) == 2 and not out.exists()  # the retry is not refused for a non-empty folder
    out.mkdir()
    assert main(base) == 2 and out.is_dir() and not any(out.iterdir())  # an empty folder given: kept, emptied
    deep = tmp_path / "deep" / "a" / "b"
    assert main([*base[:3], str(deep), *base[4:]]) == 2 and not (tmp_path / "deep").exists()  # nor the parents it made
    for argv in (["demo", "--out", ""], ["fit-sdf", "x.obj", "--out", ""], ["serve", ".", "--bandwidth", "-1Mbit"]):
        with pytest.raises(SystemExit):
            main(argv)
    err = capsys.readouterr().err
    assert "an empty path" in err and "goes after '='" in err
    build_parser().parse_args(["sweep", "cap", "--format", "colmap", "--out", "o"])  # every layout fit-nerf reads


def test_an_sdf_octree_too_fine_for_this_machine_is_refused_before_sampling(tmp_path, monkeypatch, capsys):
    import trimesh

    import vqad.sdf.fit as sdf_fit

    mesh = tmp_path / "ball.obj"
    trimesh.creation.icosphere(subdivisions=2, radius=0.7).export(mesh)
    monkeypatch.setattr(sdf_fit, "available_memory", lambda: 100 << 20)  # 100 MB free
    assert main(["fit-sdf", str(mesh), "--levels", "3:9", "--steps", "1", "--out", str(tmp_path / "f"),
                 "--threads", "1"]) == 2
    err = _err(capsys)
    assert "--levels 3:9" in err and "GB free" in err and "lower the finest level" in err


def test_a_reader_that_goes_away_leaves_no_traceback(tmp_path):
    """``vqad ... | head -0``: stdout closes under the command; it stops with status 1 and nothing on stderr."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "vqad.app.cli", "synth-capture", "-o", str(tmp_path / "cap"),
                             "--size", "8x12", "--views", "3", "--supersample", "1", "--points", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1 and "Traceback" not in err, err
    assert "vqad: synth-capture stopped: its output's reader closed" in err


def test_sdf_fits_and_model_tools_against_a_hostile_user(tmp_path, capsys):
    """The SDF side's hostile pass: a fresh fit into an earlier fit's folder removes that fit's meshes and renders;
    the printed final loss is the last step's; flags that cannot apply or exceed what the grid has are refused;
    a ratio below 1 says how many times larger; the API refuses arguments of the wrong kind in one line."""
    import io
    import json

    import pytest
    import trimesh

    import vqad
    from vqad.errors import InputError
    from vqad.field import ratio_text
    from vqad.sdf.extract import extract_mesh

    mesh = tmp_path / "sphere.obj"
    trimesh.creation.icosphere(subdivisions=2, radius=0.6).export(mesh)
    out = tmp_path / "fit"
    common = ["--batch", "512", "--refine", "0", "--no-eval", "--threads", "1"]
    assert main(["fit-sdf", str(mesh), "--out", str(out), "--levels", "2:4", "--steps", "3", *common]) == 0
    for name in ("mesh_lod4.ply", "render_lod4.png", "render_lod3.png"):  # what its evaluation would have left
        (out / name).write_bytes(b"an earlier fit's")
    capsys.readouterr()
    assert main(["fit-sdf", str(mesh), "--out", str(out), "--levels", "2:3", "--steps", "12", *common]) == 0
    text = capsys.readouterr()
    assert "replacing the earlier fit" in text.err and sorted(p.name for p in out.iterdir()) == ["checkpoint",
                                                                                                 "metrics.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == [1]  # logged: the first step only (then every 50th)
    printed = float(text.out.split("final loss ")[1].split()[0])
    assert printed != float(f"{metrics['history'][-1]['loss']:.3g}")  # the 12th step's, not the logged first one's
    for argv, needle in ((["--layers", "0", "--hidden", "8"], "with --layers 0 it has none"),
                         (["--bits", "2", "--refine", "1", "--refine-candidates", "5"], "has 3 codewords besides")):
        assert main(["fit-sdf", str(mesh), "--out", str(tmp_path / "x"), "--steps", "2", *argv]) == 2
        assert needle in _err(capsys)
    assert main(["render", str(out / "checkpoint"), "--bytes", "-5", "-o", str(tmp_path / "r.png")]) == 2
    assert "--bytes must be a positive number" in _err(capsys)
    assert ratio_text(31.7) == "31.7x" and ratio_text(1 / 60) == "0.0167x (60.0 times larger)"
    field = vqad.load(out / "checkpoint")
    for bad in (0, 1, 7, 2.5, 4096):
        with pytest.raises(InputError, match="resolution must be an integer in 8..2048"):
            extract_mesh(field, 3, resolution=bad)
    for source, kw, needle in ((out / "checkpoint", {"lod": "3"}, "lod must be a whole number"),
                               (io.StringIO("x"), {}, "cannot load a StringIO"),
                               (b"", {"max_memory": -1}, "max_memory must be a whole number")):
        with pytest.raises(InputError, match=needle):
            vqad.load(source, **kw)


def test_two_fits_into_one_out_at_once_are_refused_in_one_line(tmp_path, capsys):
    """A second fit writing the same --out while the first runs is refused (the folder itself is locked: no
    file is added); the lock goes with the command, so the next fit there runs."""
    import trimesh

    from vqad.app.commands.common import hold_output_dir, release_output_dirs

    mesh = tmp_path / "sphere.obj"
    trimesh.creation.icosphere(subdivisions=2, radius=0.6).export(mesh)
    out = tmp_path / "fit"
    out.mkdir()
    argv = ["fit-sdf", str(mesh), "--out", str(out), "--levels", "2:3", "--steps", "2", "--batch", "512", "--no-eval",
            "--refine", "0", "--threads", "1"]
    hold_output_dir(out)  # the first fit, still running
    try:
        assert main(argv) == 2
        assert "another vqad fit is writing" in _err(capsys) and list(out.iterdir()) == []
    finally:
        release_output_dirs()
    assert main(argv) == 0 and main(argv) == 0  # one after the other: each lets go at its end
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "metrics.json"]


def test_ctrl_c_in_the_density_pass_says_nothing_is_saved_and_leaves_no_empty_folder(tmp_path, monkeypatch, capsys):
    import vqad.nerf.fit as nf

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(nf, "build_nerf_field", interrupted)
    out = tmp_path / "fit"
    assert main(["fit-nerf", "procedural", "--out", str(out), "--steps", "5", "--threads", "1"]) == 130
    err = _err(capsys)
    assert "interrupted while building the octree (a density pass is not saved): nothing to resume" in err
    assert not out.exists()  # the folder this run created, still empty, goes with it


def test_outputs_write_through_symlinks_and_never_replace_devices_or_pipes(tmp_path, capsys):
    import os
    import stat

    import pytest

    from vqad.atomicio import write_atomic, write_target
    from vqad.errors import InputError

    model = _tiny_sdf_file(tmp_path)
    ckpt = str(tmp_path / "fit" / "checkpoint")
    fifo = tmp_path / "pipe.vqad"
    os.mkfifo(fifo)
    assert main(["export", ckpt, "-o", str(fifo), "--threads", "1"]) == 2
    assert "not a regular file" in _err(capsys) and stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still a pipe (it was replaced)
    with pytest.raises(InputError, match="not a regular file"):
        write_atomic(fifo, b"x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    with pytest.raises(InputError, match="not a regular file"):
        write_target("/dev/null")  # (checked only: nothing is written there)
    # a symlink's target is written; the link stays a link
    (tmp_path / "models").mkdir()
    link = tmp_path / "latest.vqad"
    link.symlink_to(tmp_path / "models" / "v1.vqad")
    assert main(["export", ckpt, "-o", str(link), "--threads", "1"]) == 0
    assert link.is_symlink() and (tmp_path / "models" / "v1.vqad").read_bytes() == model.read_bytes()


def test_a_write_goes_through_a_temporary_file_of_its_own_never_a_users(tmp_path):
    """A hostile pass: every write went through the fixed name NAME.tmp.EXT, so a user's link of that name was
    written through (its target destroyed, the output left a link to it) and a user's file of that name
    consumed. Now each write creates its own temporary file (exclusively), with the permissions of a new file."""
    import os

    import numpy as np

    from vqad.atomicio import save_image, write_atomic

    (tmp_path / "notes.txt").write_text("notes")
    (tmp_path / "render.tmp.png").symlink_to(tmp_path / "notes.txt")
    (tmp_path / "model.tmp.vqad").write_text("keep")
    save_image(np.zeros((4, 4, 3), np.uint8), tmp_path / "render.png")
    write_atomic(tmp_path / "model.vqad", b"data")
    assert (tmp_path / "notes.txt").read_text() == "notes" and (tmp_path / "model.tmp.vqad").read_text() == "keep"
    assert not (tmp_path / "render.png").is_symlink() and (tmp_path / "model.vqad").read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.tmp.vqad", "model.vqad", "notes.txt", "render.png",
                                                         "render.tmp.png"]  # no temporary file left
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "model.vqad").stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


def test_a_path_the_file_system_refuses_is_one_line_naming_what_to_do(tmp_path, capsys):
    long = str(tmp_path / ("q" * 300))
    for argv in (["synth-capture", "-o", long], ["info", long + ".vqad"], ["synth-rgbd", "procedural", "-o", long]):
        assert main(argv + ["--threads", "1"]) == 2, argv
        err = _err(capsys)
        assert "File name too long; give a shorter path" in err and len(err.splitlines()) == 1 and len(err) < 300


def test_file_api_mistakes_are_one_clear_error(tmp_path):
    import io

    import numpy as np
    import pytest

    import vqad
    from vqad import fileformat
    from vqad.errors import InputError
    from vqad.sdf.extract import extract_mesh

    model = _tiny_sdf_file(tmp_path)
    field = vqad.load(model)
    data = model.read_bytes()

    class StrReader:  # a read() that gives text
        def read(self, n):
            return "abc"

    with open(model, "rb") as closed:
        pass
    with open(model, "r") as text_stream:
        for source, needle in ((np.frombuffer(data, np.uint8), "an array's .tobytes()"),
                               ([1, 2], "yields blocks of bytes, not int"),
                               (text_stream, "text stream.*binary"),
                               (closed, "is closed: read it inside"),
                               (StrReader(), r"read\(\) gives str, not bytes"),
                               (bytes(model), "is read as a .vqad file's contents")):
            with pytest.raises(InputError, match=needle):
                vqad.load(source)
            with pytest.raises(InputError, match=needle):
                next(fileformat.iter_lods(source))
    with pytest.raises(InputError, match="the first argument is the baked field to write, not a PosixPath"):
        fileformat.save(tmp_path / "x.vqad", field)
    with pytest.raises(InputError, match="entropy must be True or False, got 'no'"):
        fileformat.save(field, tmp_path / "x.vqad", entropy="no")  # ("no" is truthy: it wrote a coded file)
    with pytest.raises(InputError, match="dst is a path or a binary stream"):
        fileformat.save(field, "")
    text = tmp_path / "t.vqad"
    with open(text, "w") as f, pytest.raises(InputError, match="open it in binary mode"):
        fileformat.save(field, f)
    assert text.read_bytes() == b""
    with pytest.raises(InputError, match="meshes an SDF field .*, not a str"):
        extract_mesh(str(model), 4)
    assert fileformat.save(field, io.BytesIO()) == len(fileformat.to_bytes(field))
    with pytest.raises(InputError, match="NaN or infinite coordinates"):  # (inf gave nan, nan gave nan, silently)
        field(torch.tensor([[0.0, float("inf"), 0.0]]))


def test_demo_never_writes_among_other_files(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--quick", "--out", str(tmp_path), "--threads", "1"]) == 2
    assert "already holds other files (notes.txt) and no earlier vqad demo" in _err(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_info_names_what_it_was_given_instead_of_a_vqad_file(tmp_path, capsys):
    (tmp_path / "fit" / "checkpoint").mkdir(parents=True)
    (tmp_path / "fit" / "checkpoint" / "config.json").write_text("{}")
    for source, needle in (("http://127.0.0.1:1/x.vqad", "reads local .vqad files, not URLs: download "
                                                         "http://127.0.0.1:1/x.vqad first"),
                           (str(tmp_path / "fit"), "is a fit's folder: vqad info reads .vqad files (vqad export"),
                           (str(tmp_path / "fit" / "checkpoint"), "is a checkpoint folder")):
        assert main(["info", source]) == 2
        assert needle in _err(capsys)


def test_info_on_a_damaged_file_lists_the_intact_lods_then_fails(tmp_path, capsys):
    from vqad.fileformat import lod_prefix_sizes, read_info

    model = _tiny_sdf_file(tmp_path)
    data = bytearray(model.read_bytes())
    sizes = lod_prefix_sizes(bytes(data))
    data[(sizes[3] + sizes[4]) // 2] ^= 0xFF  # inside the finest LOD's chunks
    (tmp_path / "d.vqad").write_bytes(bytes(data))
    info = read_info(tmp_path / "d.vqad")
    assert [lv.level for lv in info.levels] == [3] and "CRC mismatch" in info.damage and not info.complete
    assert main(["info", str(tmp_path / "d.vqad")]) == 2
    out, err = capsys.readouterr()
    assert "DAMAGED: LODs up to 3 are intact" in out and "vqad: error: CRC mismatch" in err
    data = bytearray(model.read_bytes())
    data[100] ^= 0xFF  # the header: nothing is intact, one line as before
    (tmp_path / "h.vqad").write_bytes(bytes(data))
    assert main(["info", str(tmp_path / "h.vqad")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "CRC mismatch in chunk 'header'" in err


def test_checkpoints_keep_their_folder_their_tensors_finite_and_any_path(tmp_path, capsys):
    """A hostile pass: outputs written inside a checkpoint (compress, mesh, render) made its next --resume refuse
    the folder; a NaN in its tensors rendered a blank image (exit 0) or crashed compress with a LinAlgError; a
    checkpoint at a path that is not UTF-8 was called damaged ("delete it")."""
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    _tiny_sdf_file(tmp_path)
    ckpt = tmp_path / "fit" / "checkpoint"
    capsys.readouterr()
    for argv in (["mesh", str(ckpt), "-o", str(ckpt / "m.ply")], ["render", str(ckpt), "-o", str(ckpt / "r.png")],
                 ["export", str(ckpt), "-o", str(ckpt / "x.vqad")], ["compress", str(ckpt), "--to", "kmeans", "--out",
                                                                      str(ckpt / "km")]):
        assert main(argv + ["--threads", "1"]) == 2, argv
        err = _err(capsys)
        assert "is inside the checkpoint" in err and len(err.splitlines()) == 1, argv
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors", "optim.safetensors"]

    odd = Path(os.fsdecode(bytes(tmp_path) + b"/nu\xffck"))  # a name that is not UTF-8 (Linux takes any bytes)
    shutil.copytree(ckpt, odd)
    assert main(["mesh", str(odd), "--resolution", "16", "-o", str(tmp_path / "odd.ply"), "--threads", "1"]) == 0

    tensors = load_file(str(ckpt / "model.safetensors"))
    name = next(k for k, t in tensors.items() if t.is_floating_point())
    tensors[name].view(-1)[0] = float("nan")
    shutil.copytree(ckpt, tmp_path / "nan")
    save_file(tensors, str(tmp_path / "nan" / "model.safetensors"))
    capsys.readouterr()
    assert main(["render", str(tmp_path / "nan"), "--size", "16", "-o", str(tmp_path / "nan.png"), "--threads", "1"]) == 2
    err = _err(capsys)
    assert f"tensor {name} holds NaN or inf values: the checkpoint is damaged" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "nan.png").exists()


def test_small_things_a_hostile_pass_found(tmp_path, capsys):
    """vqad.load takes any os.PathLike and NumPy integers; --lod -1 is named as the flag; vqad eval on a TSDF
    points at fit-tsdf; compress's follow-up command can be pasted; a radiance field's render -o x.png is refused
    (it made a folder named x.png)."""
    from pathlib import PurePosixPath

    import numpy as np

    import vqad

    model = _tiny_sdf_file(tmp_path)
    assert vqad.load(PurePosixPath(str(model)), lod=np.int64(3)).lods == [3]  # (decoded up to LOD 3)
    assert vqad.load(PurePosixPath(str(tmp_path / "fit" / "checkpoint"))).kind == "sdf"
    capsys.readouterr()
    assert main(["mesh", str(model), "--lod", "-1", "-o", str(tmp_path / "x.ply")]) == 2
    assert "--lod must be a level of the model's octree (>= 0" in _err(capsys)
    assert main(["fit-sdf", str(tmp_path / "ball.obj"), "--grid", "dense", "--levels", "3:4", "--steps", "5",
                 "--no-eval", "--threads", "1", "--out", str(tmp_path / "dense")]) == 0
    capsys.readouterr()
    out = tmp_path / "a b"
    assert main(["compress", str(tmp_path / "dense" / "checkpoint"), "--to", "kmeans", "--bits", "2", "--out", str(out),
                 "--threads", "1"]) == 0
    assert f"vqad export '{out}' -o model.vqad" in capsys.readouterr().out
    assert main(["fit-nerf", "procedural", "--steps", "2", "--levels", "3:4", "--no-eval", "--threads", "1", "--quiet",
                 "--out", str(tmp_path / "nerf")]) == 0
    capsys.readouterr()
    assert main(["render", str(tmp_path / "nerf" / "checkpoint"), "-o", str(tmp_path / "n.png"), "--threads", "1"]) == 2
    assert "a radiance field's render writes a folder" in _err(capsys) and not (tmp_path / "n.png").exists()
    assert main(["eval", str(tmp_path / "fit" / "checkpoint")]) == 2
    assert "vqad eval measures radiance fields (fit-sdf reports an SDF's metrics)" in _err(capsys)


def test_every_public_query_checks_its_inputs_and_loads_are_for_inference(tmp_path, capsys):
    """all_lods / densities / density / TSDF colour check x, d and the LODs as forward does (they raised KeyError,
    IndexError or dtype errors, and a NaN point got the empty space's density); view directions are normalised, a
    zero one refused; a half-precision field or a float64 point beyond float32's range is refused; vqad.load of a
    checkpoint is an inference field, as a file's is; a prefix without the LOD asked for says so."""
    import warnings

    import numpy as np
    import pytest

    import vqad
    from vqad.errors import InputError

    model = _tiny_sdf_file(tmp_path)
    assert main(["fit-nerf", "procedural", "--steps", "2", "--levels", "2:3", "--no-eval", "--quiet", "--threads", "1",
                 "--out", str(tmp_path / "pn")]) == 0
    sdf, nerf = vqad.load(model), vqad.load(tmp_path / "pn" / "checkpoint")
    assert not nerf.training and not any(p.requires_grad for p in nerf.parameters())  # was train mode, with grads
    x = torch.rand(6, 3) * 2 - 1
    d = torch.nn.functional.normalize(torch.randn(6, 3), dim=-1)
    assert not nerf(x, d)[0].requires_grad
    torch.testing.assert_close(nerf(x, 3 * d)[1], nerf(x, d)[1])  # a longer direction is the same direction
    torch.testing.assert_close(nerf.all_lods(x, d)[1][-1], nerf(x, d)[1])
    torch.testing.assert_close(nerf.density(x), nerf.densities(x)[-1])
    torch.testing.assert_close(sdf.all_lods(np.asarray(x))[-1], sdf(x))
    nan = x.clone()
    nan[0, 0] = float("nan")
    for call, why in ((lambda: nerf.density(x, 9), r"LOD 9 is not in this model: choose one of \[2, 3\]"),
                      (lambda: nerf.density(x, True), "LOD True"),
                      (lambda: nerf.density(nan), "NaN or infinite"),
                      (lambda: nerf.densities(x, []), "lods is empty"),
                      (lambda: nerf.all_lods(nan, d), "NaN or infinite"),
                      (lambda: nerf.all_lods(x, d, [0]), "LOD 0"),
                      (lambda: nerf.all_lods(x, d[:2]), "as many rows"),
                      (lambda: nerf.all_lods(x, d, rows=[None]), "one entry per LOD"),
                      (lambda: nerf(x, 0 * d), "zero, NaN or infinite view direction"),
                      (lambda: nerf(x, d.long()), "floating-point view directions"),
                      (lambda: sdf.all_lods(x, [2]), "LOD 2"),
                      (lambda: sdf.all_lods(x.long()), "floating-point"),
                      (lambda: sdf(torch.tensor([[1e39, 0.0, 0.0]], dtype=torch.float64)), "NaN or infinite")):
        with pytest.raises(InputError, match=why):
            call()
    half = vqad.load(model).half()
    with pytest.raises(InputError, match=r"call field.float\(\)"):
        half(x.half())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        from vqad.fileformat import lod_prefix_sizes

        cut = vqad.load(model, lod=4, max_bytes=lod_prefix_sizes(model)[3] + 10)
    assert cut.lods == [3] and any("not the LOD 4 asked for" in str(w.message) for w in seen)


def test_outputs_never_replace_or_nest_in_a_checkpoint_and_cut_files_are_not_reexported(tmp_path, capsys):
    """compress --out refuses a fit's checkpoint (it replaced one, optimizer state and all); -o inside a checkpoint
    is refused (the fit's next save refused the folder); -o an existing folder says it is a folder; export refuses
    a cut .vqad (it wrote a whole-looking file without the missing LODs)."""
    model = _tiny_sdf_file(tmp_path)
    fit = tmp_path / "fit"
    assert main(["fit-sdf", str(tmp_path / "ball.obj"), "--grid", "dense", "--levels", "3:4", "--steps", "3", "--refine",
                 "0", "--batch", "1024", "--no-eval", "--threads", "1", "--quiet", "--out", str(tmp_path / "dense")]) == 0
    before = (fit / "checkpoint" / "config.json").read_text()
    argv = ["compress", str(tmp_path / "dense" / "checkpoint"), "--to", "lowrank", "--rank", "2", "--threads", "1"]
    assert main(argv + ["--out", str(fit / "checkpoint")]) == 2
    assert "holds a fit's checkpoint (step 10)" in _err(capsys)
    assert (fit / "checkpoint" / "config.json").read_text() == before
    assert main(argv + ["--out", str(tmp_path / "c")]) == 0 and main(argv + ["--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    for args, why in ((["mesh", str(model), "--resolution", "32", "-o", str(fit / "checkpoint" / "m.ply")],
                       "is inside the checkpoint"),
                      (["render", str(model), "--size", "16", "-o", str(fit / "checkpoint" / "sub" / "r.png")],
                       "is inside the checkpoint"),
                      (["mesh", str(model), "--resolution", "32", "-o", str(tmp_path)], "it is a folder; give a file name")):
        assert main(args + ["--threads", "1"]) == 2
        assert why in _err(capsys)
    assert sorted(p.name for p in (fit / "checkpoint").iterdir()) == ["config.json", "model.safetensors", "optim.safetensors"]
    cut = tmp_path / "cut.vqad"
    cut.write_bytes(model.read_bytes()[:-5])
    assert main(["export", str(cut), "-o", str(tmp_path / "again.vqad"), "--threads", "1"]) == 2
    assert "it holds LODs 3..3 of 3..4" in _err(capsys) and not (tmp_path / "again.vqad").exists()
    assert main(["export", str(model), "-o", str(tmp_path / "again.vqad"), "--threads", "1"]) == 0


def test_the_command_line_starts_without_pytorch_and_sigterm_is_one_line(tmp_path):
    """The CLI's module imports no PyTorch (Ctrl-C in the first second printed a traceback from inside its import);
    SIGTERM to any command prints one line and exits 143 (mesh and compress died silently)."""
    import subprocess
    import sys

    code = "import sys, vqad.app.cli, vqad; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
    script = ("import os, signal, sys, time\n"
              "import vqad.app.commands.format as f\n"
              "def slow(args):\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(30)\n"
              "f.cmd_info = slow\n"
              "from vqad.app.cli import main\n"
              "sys.exit(main(['info', 'x.vqad']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 143 and done.stderr.strip() == "vqad: terminated (SIGTERM)"


def test_render_keeps_other_lods_renders_and_eval_replaces_its_own(tmp_path, capsys):
    """vqad render --lod L into one folder keeps the other LODs' renders (a cleanup meant for eval deleted them);
    eval -o drops an earlier run's metrics.json and renders of LODs it leaves out; a fit's or compress's --out
    inside a checkpoint is refused, a Hugging Face model folder (config.json + model.safetensors) is no checkpoint."""
    fit = tmp_path / "pn"
    assert main(["fit-nerf", "procedural", "--steps", "2", "--levels", "2:3", "--no-eval", "--quiet", "--threads", "1",
                 "--out", str(fit)]) == 0
    r = tmp_path / "r"
    for lod in ("2", "3"):
        assert main(["render", str(fit / "checkpoint"), "--lod", lod, "--views", "val", "-o", str(r), "--threads", "1"]) == 0
    assert sorted(p.name for p in r.iterdir()) == ["val_lod2", "val_lod3"]
    (r / "metrics.json").write_text("{}")
    assert main(["eval", str(fit / "checkpoint"), "--lod", "3", "--views", "val", "-o", str(r), "--threads", "1"]) == 0
    assert sorted(p.name for p in r.iterdir()) == ["metrics.json", "val_lod3"]
    assert '"views": "val"' in (r / "metrics.json").read_text()
    capsys.readouterr()
    for argv in (["fit-nerf", "procedural", "--steps", "2", "--levels", "2:3", "--no-eval", "--quiet",
                  "--out", str(fit / "checkpoint" / "again")],
                 ["compress", str(fit / "checkpoint"), "--to", "lowrank", "--rank", "2", "--out",
                  str(fit / "checkpoint" / "c")]):
        assert main([*argv, "--threads", "1"]) == 2
        assert "is inside the checkpoint" in _err(capsys)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "bert"}')
    (hf / "model.safetensors").write_bytes(b"")
    model = _tiny_sdf_file(tmp_path)
    assert main(["mesh", str(model), "--resolution", "32", "-o", str(hf / "meshes" / "x.ply"), "--threads", "1"]) == 0
