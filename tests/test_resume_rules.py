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
    """Ctrl-C while a fit evaluates: the fit is complete in its checkpoint and the message says so; the last
    result stays until a --resume evaluates the fit again without training it. (The evaluation itself is
    stood in for: test_sdf measures it.)"""
    import vqad.app.commands.sdf as sdf_cmd

    a, _ = meshes
    out = tmp_path / "fit"
    monkeypatch.setattr(sdf_cmd, "evaluate_sdf", lambda *a, **k: {"4": {"chamfer_l1": 0.01}})
    assert main(["fit-sdf", str(a), "--out", str(out), *SDF]) == 0
    before = (out / "metrics.json").read_text()

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sdf_cmd, "evaluate_sdf", stop)  # Ctrl-C while the resumed fit evaluates again
    capsys.readouterr()
    assert main(["fit-sdf", str(a), "--out", str(out), "--resume", "--threads", "1"]) == 130
    assert (out / "metrics.json").read_text() == before
    err = capsys.readouterr().err
    assert "interrupted during the evaluation: the fit is saved in" in err and "--resume evaluates it again" in err
    monkeypatch.setattr(sdf_cmd, "evaluate_sdf", lambda *a, **k: {"4": {"chamfer_l1": 0.02}})
    assert main(["fit-sdf", str(a), "--out", str(out), "--resume", "--threads", "1"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["lods"]["4"]["chamfer_l1"] == 0.02 and m["steps"] == 20
    assert m["points_per_second"] is None and m["fit_seconds"] > m["fit_seconds_this_run"]  # nothing trained again


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


def test_a_capture_regenerated_at_the_same_path_is_not_the_one_a_model_was_fitted_to(tmp_path, capsys, monkeypatch):
    """The model records its capture's absolute path and its training views' count and size: a capture
    regenerated there (other views, another box) is refused by --resume and by eval (which used to score
    the new images), a relative path works from any folder, a moved capture is named with the fix."""
    monkeypatch.chdir(tmp_path)
    synth = ["--points", "2000", "--supersample", "1", "--threads", "1"]
    assert main(["synth-capture", "-o", "cap", "--size", "24x16", "--views", "8", *synth]) == 0
    out = tmp_path / "fit"
    assert main(["fit-nerf", "cap", "--format", "ngp", "--levels", "3:5", "--batch-rays", "256", "--steps", "10",
                 "--no-eval", "--threads", "1", "--out", str(out)]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["eval", str(out / "checkpoint"), "--max-views", "1", "--threads", "1"]) == 0  # found from here
    capsys.readouterr()
    for cmd, target, needle in (("eval", out, "is a fit's folder"), ("eval", out / "checkpoint", "is the input model"),
                                ("render", out / "checkpoint", "is the input model"),
                                ("render", out / "checkpoint" / "views", "is inside the checkpoint")):
        assert main([cmd, str(out / "checkpoint"), "-o", str(target), "--threads", "1"]) == 2
        assert needle in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["config.json", "model.safetensors",
                                                                       "optim.safetensors"]
    monkeypatch.chdir(tmp_path)
    import shutil

    shutil.rmtree("cap")
    assert main(["eval", str(out / "checkpoint"), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert f"is no longer at {tmp_path / 'cap'}: pass --dataset PATH where it is now" in err, err
    assert main(["synth-capture", "-o", "cap", "--size", "32x24", "--views", "12", "--aabb-scale", "16", *synth]) == 0
    capsys.readouterr()
    assert main(["fit-nerf", "cap", "--format", "ngp", "--resume", "--steps", "20", "--no-eval", "--threads", "1",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not the capture this fit was trained on (7 views then, 10 views now; 24×16 px then, 32×24 px now; " \
           "a scene box 4 times the central one then, 16 now)" in err, err
    assert main(["eval", str(out / "checkpoint"), "--threads", "1"]) == 2
    assert "is not the one this model was fitted to" in capsys.readouterr().err


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
