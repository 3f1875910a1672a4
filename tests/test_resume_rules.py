"""--resume continues the fit it finds, on the data it was trained on, and never loses a result; and a
killed fit says how it was stopped. Each case was found by a hostile-user pass."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import trimesh

from vqad.app.cli import main
from vqad.errors import Terminated

SDF = ["--levels", "3:4", "--steps", "20", "--refine", "0", "--batch", "2048", "--threads", "1"]


@pytest.fixture
def meshes(tmp_path):
    a, b = tmp_path / "a.obj", tmp_path / "b.obj"
    trimesh.creation.icosphere(subdivisions=2, radius=0.7).export(a)
    trimesh.creation.box(extents=(1.0, 0.8, 0.6)).export(b)
    return a, b


def test_sdf_resume_on_another_mesh_or_fewer_steps_is_refused(meshes, tmp_path, capsys):
    a, b = meshes
    out = tmp_path / "fit"
    assert main(["fit-sdf", str(a), "--out", str(out), "--no-eval", *SDF]) == 0
    capsys.readouterr()
    assert main(["fit-sdf", str(b), "--out", str(out), "--resume", "--no-eval", "--threads", "1"]) == 2
    assert "this fit was trained on the mesh" in capsys.readouterr().err
    copy = tmp_path / "moved.obj"  # the same bytes somewhere else: the same mesh
    copy.write_bytes(a.read_bytes())
    assert main(["fit-sdf", str(copy), "--out", str(out), "--resume", "--no-eval", "--threads", "1"]) == 0
    assert "fit: already complete at 20 steps" in capsys.readouterr().out  # not "0 points/s, final loss nan"
    assert main(["fit-sdf", str(a), "--out", str(out), "--resume", "--steps", "10", "--no-eval", "--threads", "1"]) == 2
    assert "has trained 20 steps already" in capsys.readouterr().err
    assert json.loads((out / "checkpoint" / "config.json").read_text())["step"] == 20  # not rewritten to 10


def test_an_interrupted_re_evaluation_keeps_the_last_result(meshes, tmp_path, monkeypatch, capsys):
    import vqad.app.commands.sdf as sdf_cmd

    a, _ = meshes
    out = tmp_path / "fit"
    assert main(["fit-sdf", str(a), "--out", str(out), "--mc-resolution", "32", *SDF]) == 0
    before = (out / "metrics.json").read_text()

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sdf_cmd, "evaluate_sdf", stop)  # Ctrl-C while the resumed fit evaluates again
    assert main(["fit-sdf", str(a), "--out", str(out), "--resume", "--threads", "1"]) == 130
    assert (out / "metrics.json").read_text() == before


def test_sigterm_is_reported_as_such_with_its_exit_status(meshes, tmp_path, monkeypatch, capsys):
    from vqad.fit import interrupt_guard
    import vqad.sdf.fit as sdf_fit

    with pytest.raises(Terminated):  # the signal itself: raised where Ctrl-C's KeyboardInterrupt is
        with interrupt_guard():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

    def killed(*args, **kwargs):
        raise Terminated

    monkeypatch.setattr(sdf_fit, "fit_sdf", killed)
    assert main(["fit-sdf", str(meshes[0]), "--out", str(tmp_path / "fit"), *SDF]) == 143
    assert capsys.readouterr().err.strip() == "vqad: terminated (SIGTERM)"


def test_nerf_resume_on_another_capture_or_scale_is_refused_and_eval_lod_scores_the_whole_model(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for cap, extra in ((a, []), (b, ["--aabb-scale", "2"])):
        assert main(["synth-capture", "-o", str(cap), "--size", "24x16", "--views", "8", "--points", "2000",
                     "--supersample", "1", "--threads", "1", *extra]) == 0
    out = tmp_path / "fit"
    assert main(["fit-nerf", str(a), "--format", "ngp", "--levels", "3:5", "--batch-rays", "256", "--steps", "30",
                 "--no-eval", "--threads", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    again = ["--resume", "--steps", "40", "--no-eval", "--threads", "1", "--out", str(out)]
    assert main(["fit-nerf", str(b), "--format", "ngp", *again]) == 2
    assert "this fit was trained on the capture" in capsys.readouterr().err
    assert main(["fit-nerf", str(a), "--format", "ngp", "--downscale", "2", *again]) == 2
    assert "with downscale 1, not 2" in capsys.readouterr().err
    model = tmp_path / "m.vqad"
    assert main(["export", str(out / "checkpoint"), "-o", str(model), "--threads", "1"]) == 0
    capsys.readouterr()
    # --lod 4 alone is LOD 4 of the whole file (the finest LOD's occupancy), the line eval prints for every LOD
    assert main(["eval", str(model), "--threads", "1"]) == 0
    every = {ln.split(":")[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("LOD")}
    assert main(["eval", str(model), "--lod", "4", "--threads", "1"]) == 0
    assert [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("LOD")] == [every["LOD 4"]]


def test_tsdf_resume_on_other_frames_is_refused_and_the_fusion_bytes_are_the_files(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    for scan, size in ((a, "0.5"), (b, "0.8")):
        assert main(["synth-rgbd", "procedural", "-o", str(scan), "--frames", "4", "--size", "32x24",
                     "--object-size", size, "--threads", "1"]) == 0
    out = tmp_path / "fit"
    assert main(["fit-tsdf", str(a), "--levels", "3:4", "--steps", "10", "--refine", "0", "--no-eval",
                 "--threads", "1", "--out", str(out)]) == 0
    fusion = json.loads((out / "metrics.json").read_text())["fusion"]
    assert fusion["file_bytes"] == (out / "fused.tsdf").stat().st_size >= fusion["bytes"]
    capsys.readouterr()
    assert main(["fit-tsdf", str(b), "--resume", "--no-eval", "--threads", "1", "--out", str(out)]) == 2
    assert "this fit was trained on the frames of" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["source"] == str(a.resolve())
