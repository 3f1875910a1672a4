"""The CLI: bad input is one line on stderr, exit code 2, no traceback, nothing half-written."""

import os

import numpy as np
import pytest
import trimesh

from vqad.app.cli import main


@pytest.fixture
def good_mesh(tmp_path):
    p = tmp_path / "sphere.obj"
    trimesh.creation.icosphere(subdivisions=2, radius=0.5).export(p)
    return p


def _run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def _bad_files(tmp_path):
    empty = tmp_path / "empty.obj"
    empty.write_text("")
    garbage = tmp_path / "garbage.ply"
    garbage.write_bytes(b"\x00\x01not a ply at all" * 10)
    points = tmp_path / "points.obj"
    points.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    nan = tmp_path / "nan.obj"
    nan.write_text("v 0 0 0\nv nan 0 0\nv 0 1 0\nf 1 2 3\n")
    return {"missing": tmp_path / "nope.obj", "empty": empty, "garbage": garbage, "no faces": points, "non-finite": nan}


def test_bad_meshes(tmp_path, capsys):
    for what, path in _bad_files(tmp_path).items():
        out = tmp_path / f"out_{what.replace(' ', '_')}"
        code, err = _run(capsys, ["fit-sdf", str(path), "--steps", "2", "--out", str(out)])
        assert code == 2, what
        lines = [ln for ln in err.strip().splitlines() if ln]
        assert len(lines) == 1 and lines[0].startswith("vqad: error:"), (what, err)
        assert "Traceback" not in err
        assert not out.exists(), f"{what}: output directory written for a failed run"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--levels", "0:4"], "levels"),
        (["--levels", "5:3"], "levels"),
        (["--levels", "3-7"], "levels"),
        (["--levels", "3:40"], "levels"),
        (["--bits", "0"], "bits"),
        (["--bits", "13"], "bits"),
        (["--refine-candidates", "-1"], "--refine-candidates"),
        (["--rate-weight", "-1"], "--rate-weight"),
        (["--rate-weight", "0.01", "--grid", "dense"], "--rate-weight"),
        (["--rate-weight", "0.01", "--grid", "hash"], "--rate-weight"),
        (["--rate-context"], "--rate-context"),
    ],
)
def test_bad_arguments(tmp_path, capsys, good_mesh, args, needle):
    out = tmp_path / "out"
    code, err = _run(capsys, ["fit-sdf", str(good_mesh), "--steps", "2", "--out", str(out), *args])
    assert code == 2
    assert needle in err and "Traceback" not in err
    assert not out.exists()


def test_unwritable_output(tmp_path, capsys, good_mesh):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _run(capsys, ["fit-sdf", str(good_mesh), "--steps", "2", "--out", str(blocker / "sub")])
    assert code == 2 and "cannot create output directory" in err
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        code, err = _run(capsys, ["fit-sdf", str(good_mesh), "--steps", "2", "--out", str(ro / "x")])
        assert code == 2


def test_resume_without_checkpoint(tmp_path, capsys, good_mesh):
    code, err = _run(capsys, ["fit-sdf", str(good_mesh), "--steps", "2", "--out", str(tmp_path / "o"), "--resume"])
    assert code == 2 and "--resume" in err


def test_fit_mesh_render_end_to_end(tmp_path, capsys, good_mesh):
    out = tmp_path / "run"
    code = main(["fit-sdf", str(good_mesh), "--levels", "2:4", "--features", "4", "--steps", "60", "--batch", "2048", "--refine", "1",
                 "--out", str(out), "--mc-resolution", "64", "--quiet", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "dense fp16 grid" in printed and "ratio" in printed
    for name in ("metrics.json", "checkpoint/config.json", "checkpoint/model.safetensors", "mesh_lod4.ply", "render_lod2.png"):
        assert (out / name).exists(), name
    code = main(["mesh", str(out / "checkpoint"), "--lod", "3", "--resolution", "48", "-o", str(tmp_path / "m.ply")])
    assert code == 0 and len(trimesh.load(tmp_path / "m.ply").faces) > 0
    code = main(["render", str(out / "checkpoint"), "--lod", "4", "--size", "64", "-o", str(tmp_path / "r.png")])
    assert code == 0 and (tmp_path / "r.png").stat().st_size > 0
    code, err = _run(capsys, ["mesh", str(out / "checkpoint"), "--lod", "9"])
    assert code == 2 and "LOD 9" in err
    _ = np  # keep import for fixtures above
