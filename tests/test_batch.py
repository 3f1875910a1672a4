"""vqad batch: bad jobs refused before anything is written; the same files bit for bit with Ray and
--local; a Ray worker killed mid-fit, a driver killed mid-job, Ctrl-C, a corrupt mesh, changed
settings, a directory job, and the append-only results log."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trimesh

from vqad import fit as trainer
from vqad.app import batch as B
from vqad.app.cli import main
from vqad.app.outputs import input_stamp
from vqad.atomicio import append_record
from vqad.errors import InputError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install 'vqad[ray]'; make test installs it)")

#: every fit of these tests: a few steps on levels 2..4, a cheap evaluation
TINY = {"levels": "2:4", "steps": 20, "hidden": 16, "refine": 0, "renders": False, "checkpoint_every": 10,
        "batch": 512, "mc_resolution": 32, "chamfer_samples": 2000, "iou_samples": 20000}
#: a fit long enough to be killed in the middle (about 7 s), checkpointed every 10 steps
LONG = {"steps": 500}
WAIT_S = 150  # a test that waits for a subprocess gives up after this long


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Generated meshes: a sphere, a box, a torus, and vqad's demo shape."""
    from vqad.sdf.extract import save_mesh
    from vqad.sdf.shapes import demo_mesh

    d = tmp_path_factory.mktemp("shapes")
    trimesh.creation.icosphere(subdivisions=2, radius=0.6).export(d / "sphere.obj")
    trimesh.creation.box(extents=(0.8, 0.5, 0.6)).export(d / "box.ply")
    trimesh.creation.torus(0.5, 0.15).export(d / "torus.obj")
    save_mesh(demo_mesh(resolution=40), d / "demo.ply")
    return d


def write_job(path: Path, assets, root: Path, **top) -> Path:
    """A JSON job of ``assets`` with the :data:`TINY` settings; outputs mirror ``root``."""
    path.write_text(json.dumps({**top, "root": str(root), "defaults": TINY, "assets": assets}))
    return path


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / B.RESULTS).read_text().splitlines()]


def attempts(out: Path, key: str) -> int:
    """Fits started for an asset, from its log."""
    return (out / key / "log.txt").read_text().count(": attempt ")


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def start_batch(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vqad.app.cli", "batch", *map(str, argv)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, what: str, proc: subprocess.Popen | None = None) -> None:
    t0 = time.monotonic()
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the batch ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() - t0 > WAIT_S:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def checkpointed(out: Path, key: str) -> bool:
    return (out / key / "checkpoint" / "config.json").is_file()


def n_records(out: Path) -> int:
    return len(records(out)) if (out / B.RESULTS).is_file() else 0


# -- bad jobs: one line, exit 2, nothing written ---------------------------------------------------
def assert_refused(argv, out: Path, message: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not out.exists()


BAD_JOBS = {
    "unknown top-level key": ({"assets": ["sphere.obj"], "output": "x"}, "unknown key(s) 'output'"),
    "unknown setting": ({"assets": [{"path": "sphere.obj", "stepz": 3}]}, "unknown setting 'stepz'"),
    "wrong type": ({"assets": [{"path": "sphere.obj", "steps": "many"}]}, "steps must be an integer"),
    "out of range": ({"assets": [{"path": "sphere.obj", "bits": 40}]}, "1..12"),
    "cannot apply": ({"assets": [{"path": "sphere.obj", "grid": "dense", "bits": 4}]}, "--bits does not apply to --grid dense"),
    "radiance setting on a mesh": ({"assets": [{"path": "sphere.obj", "downscale": 2}]}, "does not apply to the mesh"),
    "bad levels": ({"assets": [{"path": "sphere.obj", "levels": "7:3"}]}, "levels 7:3 out of range"),
    "missing file": ({"assets": ["nothere.obj"]}, "not found"),
    "empty glob": ({"assets": ["*.stl"]}, "matches nothing"),
    "one output twice": ({"assets": ["sphere.obj", {"path": "box.ply", "name": "sphere"}]}, "output folder 'sphere'"),
    "listed twice": ({"assets": ["sphere.obj", "sphere.obj"]}, "is listed twice"),
    "outputs nest": ({"assets": ["sphere.obj", {"path": "box.ply", "name": "sphere/in"}]}, "would be inside that of"),
    "outputs nest in another case": ({"assets": ["sphere.obj", {"path": "box.ply", "name": "Sphere/in"}]},
                                     "would be inside that of"),
    "names differing only in case": ({"assets": ["sphere.obj", {"path": "box.ply", "name": "SPHERE"}]},
                                     "map to the output folders 'sphere' and 'SPHERE', one folder on macOS and Windows"),
    "names differing only in Unicode form": ({"assets": [{"path": "sphere.obj", "name": "caf\u00e9"},
                                                         {"path": "box.ply", "name": "cafe\u0301"}]},
                                             "differ only in case or in Unicode form"),
    "one name, many files": ({"assets": [{"path": "*.obj", "name": "x"}]}, "the pattern matches 2"),
    "no assets": ({"assets": []}, "no assets"),
    "bad option": ({"assets": [{"path": "sphere.obj", "entropy": "yes"}]}, "entropy must be true or false"),
    "wrong application": ({"assets": [{"path": "sphere.obj", "application": "nerf"}]}, "a mesh file is an sdf asset"),
    "name escapes": ({"assets": [{"path": "sphere.obj", "name": "../x"}]}, "name must be a relative path"),
    "a list for a value": ({"assets": [{"path": "sphere.obj", "steps": [1, 2]}]}, "steps must be a single value"),
    "a name the output root takes": ({"assets": [{"path": "sphere.obj", "name": "results.jsonl"}]},
                                     "is a file of the output folder itself"),
    "the lock's name": ({"assets": [{"path": "sphere.obj", "name": ".batch.lock/x"}]}, "is a file of the output folder"),
    "a control character": ({"assets": [{"path": "sphere.obj", "name": "a\u0000b"}]}, "holds the control character"),
    "a newline": ({"assets": [{"path": "sphere.obj", "name": "new\nline"}]}, "holds the control character"),
    "a name too long": ({"assets": [{"path": "sphere.obj", "name": "x" * 201}]}, "folder names stop at 200"),
    "metric samples out of range": ({"assets": [{"path": "sphere.obj", "chamfer_samples": 10 ** 12}]},
                                    "chamfer_samples must be an integer in 1..10,000,000"),
    "evaluation setting without evaluation": ({"assets": [{"path": "sphere.obj", "eval": False, "renders": True,
                                                           "mc_resolution": None}]},
                                              "does not apply with eval = false (nothing is evaluated)"),
}


@pytest.mark.parametrize("case", list(BAD_JOBS))
def test_bad_job_is_one_line_exit_2_and_writes_nothing(case, shapes, tmp_path, capsys):
    data, message = BAD_JOBS[case]
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"defaults": TINY, "root": str(shapes), **data}).replace('"sphere.obj"', json.dumps(str(shapes / "sphere.obj")))
                   .replace('"box.ply"', json.dumps(str(shapes / "box.ply"))).replace('"*.stl"', json.dumps(str(shapes / "*.stl")))
                   .replace('"*.obj"', json.dumps(str(shapes / "*.obj"))))
    assert_refused(["batch", str(job), "--out", str(tmp_path / "out"), "--local"], tmp_path / "out", message, capsys)


@pytest.mark.parametrize("argv, message", [
    (["--set", "stepz=3"], "unknown setting 'stepz'"),
    (["--set", "downscale=2"], "does not apply to the mesh"),
    (["--set", "steps"], "--set takes KEY=VALUE"),
    (["--bits", "0"], "1..12"),
    (["--threads", "0"], "--threads must be a positive whole number"),
    (["--retries", "-1"], "--retries must be >= 0"),
    (["--retries", "2"], "--retries applies to Ray tasks"),
    (["--steps", "5", "--set", "steps=7"], "--steps 5 and --set steps=7 both set steps: give one"),
    (["--set", "steps=5", "--set", "steps=7"], "--set steps is given twice (--set steps=5 and --set steps=7)"),
    (["--bits", "04"], "--bits 04: bits must be an integer, got '04'"),
    (["--set", "renders=1"], "--set renders=1: renders must be true or false"),
])
def test_bad_flags_are_one_line_exit_2(argv, message, shapes, tmp_path, capsys):
    job = write_job(tmp_path / "job.json", [str(shapes / "sphere.obj")], shapes)
    assert_refused(["batch", str(job), "--out", str(tmp_path / "out"), "--local", *argv], tmp_path / "out", message, capsys)


def test_toml_job_defaults_per_application_and_overrides(shapes, tmp_path):
    """TOML jobs: [defaults], [defaults.sdf] / [defaults.nerf], asset values over them, --set over all;
    relative paths resolve against the job file."""
    (tmp_path / "meshes").mkdir()
    for name in ("sphere.obj", "box.ply"):
        (tmp_path / "meshes" / name).write_bytes((shapes / name).read_bytes())
    job = tmp_path / "job.toml"
    job.write_text('out = "runs"\n[defaults]\nsteps = 30\nbits = 2\n[defaults.sdf]\nbatch = 1024\n'
                   '[defaults.nerf]\ndownscale = 2\n'
                   '[[assets]]\npath = "meshes/*.obj"\n[[assets]]\npath = "meshes/box.ply"\nbits = 6\nname = "x/box"\n'
                   '[[assets]]\npath = "procedural"\n')
    j = B.load_job(job, overrides={"steps": 40})
    assert j.out == (tmp_path / "runs").resolve()
    by_key = {s.key: s for s in j.assets}
    assert sorted(by_key) == ["meshes/sphere", "procedural", "x/box"]
    assert by_key["meshes/sphere"].args["bits"] == 2 and by_key["x/box"].args["bits"] == 6
    assert all(s.args["steps"] == 40 for s in j.assets)  # --set wins
    assert by_key["meshes/sphere"].args["batch"] == 1024 and by_key["procedural"].args["downscale"] == 2
    assert by_key["procedural"].application == "nerf" and "batch" not in by_key["procedural"].settings
    # a setting of the results changes the fingerprint; the checkpoint cadence does not
    again = {s.key: s.fingerprint for s in B.load_job(job, overrides={"steps": 40, "checkpoint_every": 5}).assets}
    assert again == {k: s.fingerprint for k, s in by_key.items()}
    other = {s.key: s.fingerprint for s in B.load_job(job, overrides={"steps": 41}).assets}
    assert all(other[k] != s.fingerprint for k, s in by_key.items())


# -- running --------------------------------------------------------------------------------------
def job_assets(shapes, data):
    """4 tiny assets: generated shapes, and the shared watertight mesh (spot) when it is there. Not the
    bunny: it has holes, and pysdf's robust inside test casts its rays in a frame drawn from the clock
    for every oracle, so near its holes the signs, and the fit, differ between any two runs (README)."""
    assets = [str(shapes / "sphere.obj"), {"path": str(shapes / "box.ply"), "bits": 2},
              {"path": str(shapes / "demo.ply"), "grid": "dense", "refine": None}]
    return assets + [str(data / "meshes" / "spot.obj") if data is not None else str(shapes / "torus.obj")]


@pytest.mark.slow
@needs_ray
def test_ray_and_local_write_the_same_files(shapes, tmp_path, capsys):
    from conftest import shared_data_dir

    job = write_job(tmp_path / "job.json", job_assets(shapes, shared_data_dir()), shapes)
    assert main(["batch", str(job), "--out", str(tmp_path / "local"), "--local", "--threads", "1", "--quiet"]) == 0
    assert main(["batch", str(job), "--out", str(tmp_path / "ray"), "--ray", "auto", "--threads", "1", "--quiet"]) == 0
    summary = capsys.readouterr().out
    local, ray = records(tmp_path / "local"), records(tmp_path / "ray")
    assert len(local) == len(ray) == len(job_assets(shapes, shared_data_dir())) and "0 failed" in summary
    for a, b in zip(sorted(local, key=lambda r: r["asset"]), sorted(ray, key=lambda r: r["asset"])):
        assert a["status"] == b["status"] == "done"
        assert a["quality"] == b["quality"] and a["bytes"] == b["bytes"]
        assert (tmp_path / "local" / a["file"]).read_bytes() == (tmp_path / "ray" / b["file"]).read_bytes(), a["asset"]
    assert len({r["worker"] for r in ray}) >= 1 and (tmp_path / "ray" / "sphere" / "sphere.vqad").is_file()
    assert (tmp_path / "ray" / "results.md").read_text().count("| sdf |") == len(ray)


@pytest.mark.slow
@needs_ray
def test_killed_ray_worker_resumes_from_its_checkpoint(shapes, tmp_path):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.json", [{"path": str(shapes / "sphere.obj"), **LONG}, str(shapes / "box.ply"),
                                            str(shapes / "torus.obj")], shapes)
    proc = start_batch(job, "--out", out, "--ray", "auto", "--threads", "1", "--quiet")
    try:
        wait_for(lambda: n_records(out) >= 1 and checkpointed(out, "sphere"), "a finished asset and a checkpoint", proc)
        worker = json.loads((out / "sphere" / "worker.json").read_text())
        os.kill(worker["pid"], signal.SIGKILL)  # the Ray worker process fitting the sphere
        stdout, stderr = proc.communicate(timeout=WAIT_S)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-2000:]
    assert "raylet" not in stdout + stderr and "will be retried" not in stdout + stderr  # --quiet: Ray's lines too
    recs = {r["asset"]: r for r in records(out)}
    assert len(records(out)) == 3 and all(r["status"] == "done" for r in recs.values())
    assert recs["sphere"]["resumed_from"] >= 10 and recs["sphere"]["attempt"] == 2
    assert recs["sphere"]["worker"] != f"{worker['host']}:{worker['pid']}"
    assert attempts(out, "sphere") == 2 and attempts(out, "box") == 1 and attempts(out, "torus") == 1


@pytest.mark.slow
def test_killed_driver_rerun_skips_finished_and_completes(shapes, tmp_path, capsys):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.json", [str(shapes / "box.ply"), {"path": str(shapes / "sphere.obj"), **LONG},
                                            str(shapes / "torus.obj")], shapes)
    proc = start_batch(job, "--out", out, "--local", "--threads", "1", "--quiet")
    try:
        wait_for(lambda: n_records(out) >= 1 and checkpointed(out, "sphere"), "a finished asset and a checkpoint", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=WAIT_S)
    finally:
        proc.kill()
    assert [r["asset"] for r in records(out)] == ["box"]
    assert main(["batch", str(job), "--out", str(out), "--local", "--threads", "1", "--quiet"]) == 0
    assert "1 finished earlier, skipped" in capsys.readouterr().out
    recs = records(out)
    assert [r["asset"] for r in recs] == ["box", "sphere", "torus"] and all(r["status"] == "done" for r in recs)
    assert recs[1]["resumed_from"] >= 10 and attempts(out, "box") == 1


def test_ctrl_c_saves_checkpoint_says_how_to_resume(shapes, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.json", [str(shapes / "box.ply"), {"path": str(shapes / "sphere.obj"), "steps": 60}],
                    shapes)
    real_step, n = trainer.step, {"steps": 0}

    def step(opts):  # Ctrl-C at the sphere's 30th step (the box took 20)
        n["steps"] += 1
        if n["steps"] == 50:
            raise KeyboardInterrupt
        real_step(opts)

    monkeypatch.setattr(trainer, "step", step)
    assert main(["batch", str(job), "--out", str(out), "--local", "--threads", "1", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert f"to resume, run: vqad batch {job} --out {out} --local --threads 1" in err
    assert json.loads((out / "sphere" / "checkpoint" / "config.json").read_text())["step"] == 29
    assert "the fit's checkpoint (step 29) is saved" in (out / "sphere" / "log.txt").read_text()
    assert [r["asset"] for r in records(out)] == ["box"]
    monkeypatch.setattr(trainer, "step", real_step)
    assert main(["batch", str(job), "--out", str(out), "--local", "--threads", "1", "--quiet"]) == 0
    sphere = records(out)[-1]
    assert sphere["asset"] == "sphere" and sphere["resumed_from"] == 29 and sphere["steps"] == 60


def test_ctrl_c_before_a_fits_first_checkpoint_says_the_asset_starts_again(shapes, tmp_path, monkeypatch):
    from vqad.app import batch

    def stopped(*a, **k):  # e.g. in a radiance field's octree pass, which saves nothing
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "_process_asset", stopped)
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.json", [str(shapes / "box.ply")], shapes)
    assert main(["batch", str(job), "--out", str(out), "--local", "--threads", "1", "--quiet"]) == 130
    log = (out / "box" / "log.txt").read_text()
    assert "before the fit saved a checkpoint" in log and "checkpoint (step" not in log


def test_corrupt_mesh_is_reported_and_the_others_written(shapes, tmp_path, capsys):
    out = tmp_path / "out"
    bad = tmp_path / "broken.obj"
    bad.write_text("v 0 0 0\nf 1 2 9\nnot a mesh at all\n")
    job = write_job(tmp_path / "job.json", ["sphere.obj", "broken.obj", "box.ply"], tmp_path)
    for name in ("sphere.obj", "box.ply"):
        (tmp_path / name).write_bytes((shapes / name).read_bytes())
    assert main(["batch", str(job), "--out", str(out), "--local", "--threads", "1", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "1 failed" in captured.out and f"failed: broken: cannot read mesh {bad}" in captured.err
    recs = {r["asset"]: r for r in records(out)}
    assert recs["broken"]["status"] == "failed" and "\n" not in recs["broken"]["error"]
    assert (out / "sphere" / "sphere.vqad").is_file() and (out / "box" / "box.vqad").is_file()
    assert "broken | cannot read mesh" in (out / "results.md").read_text()
    # mended: only it runs again
    trimesh.creation.icosphere(subdivisions=1, radius=0.5).export(bad)
    assert main(["batch", str(job), "--out", str(out), "--local", "--threads", "1", "--quiet"]) == 0
    assert "2 finished earlier, skipped" in capsys.readouterr().out
    assert [r["asset"] for r in records(out)][-1] == "broken" and len(records(out)) == 4


def test_changed_setting_refits_only_that_asset(shapes, tmp_path, capsys):
    out = tmp_path / "out"
    assets = [str(shapes / "sphere.obj"), {"path": str(shapes / "box.ply"), "bits": 2}]
    job = write_job(tmp_path / "job.json", assets, shapes)
    assert main(["batch", str(job), "--out", str(out), "--local", "--threads", "1", "--quiet"]) == 0
    first = (out / "box" / "box.vqad").read_bytes()
    assets[1]["bits"] = 3
    write_job(job, assets, shapes)
    assert main(["batch", str(job), "--out", str(out), "--local", "--threads", "1", "--dry-run"]) == 0
    assert "box: settings changed (bits: 2 → 3)" in capsys.readouterr().out
    assert main(["batch", str(job), "--out", str(out), "--local", "--threads", "1", "--quiet"]) == 0
    recs = records(out)
    assert [r["asset"] for r in recs] == ["sphere", "box", "box"] and recs[-1]["resumed_from"] is None
    assert (out / "box" / "box.vqad").read_bytes() != first and attempts(out, "sphere") == 1


def test_changed_evaluation_settings_keep_the_fit_and_evaluate_it_again(shapes, tmp_path, capsys):
    from vqad.app.batch import EVAL_ARGS, fit_flags

    assert all(set(names) <= set(fit_flags(app)) for app, names in EVAL_ARGS.items())  # settings that exist
    from vqad.app.batch import fit_fingerprint, resolve_settings

    def fit_fp(**settings):
        args, options, configs = resolve_settings("sdf", tuple(sorted(settings.items())))
        return fit_fingerprint("sdf", ["x"], args, options, configs)

    assert fit_fp(eval=True) == fit_fp(eval=False) == fit_fp(mc_resolution=24, chamfer_samples=5)
    # under a time cap the evaluation's share is not the fit's: turning it on or off refits
    assert fit_fp(minutes=2.0, eval=True) != fit_fp(minutes=2.0, eval=False)
    out = tmp_path / "out"
    assets = [{"path": str(shapes / "box.ply"), "bits": 2}]
    job = write_job(tmp_path / "job.json", assets, shapes)
    assert main(["batch", str(job), "--out", str(out), "--local", "--threads", "1", "--quiet"]) == 0
    model = (out / "box" / "checkpoint" / "model.safetensors").read_bytes()
    first = (out / "box" / "box.vqad").read_bytes()
    capsys.readouterr()
    assets[0].update(chamfer_samples=3000, mc_resolution=24)  # what only the evaluation reads
    write_job(job, assets, shapes)
    assert main(["batch", str(job), "--out", str(out), "--local", "--threads", "1", "--dry-run"]) == 0
    assert "box: only export or evaluation settings changed (" in capsys.readouterr().out
    assert main(["batch", str(job), "--out", str(out), "--local", "--threads", "1", "--quiet"]) == 0
    rec = records(out)[-1]
    assert rec["status"] == "done" and rec["resumed_from"] == TINY["steps"] and rec["settings"]["chamfer_samples"] == 3000
    assert (out / "box" / "checkpoint" / "model.safetensors").read_bytes() == model  # not fitted again
    assert (out / "box" / "box.vqad").read_bytes() == first
    assert "evaluating box again, its fit is kept" in (out / "box" / "log.txt").read_text()
    # the export too: the same fit, written without entropy coding
    assets[0]["entropy"] = False
    write_job(job, assets, shapes)
    assert main(["batch", str(job), "--out", str(out), "--local", "--threads", "1", "--quiet"]) == 0
    assert records(out)[-1]["resumed_from"] == TINY["steps"] and (out / "box" / "box.vqad").read_bytes() != first
    # a fit setting refits from scratch
    assets[0]["seed"] = 7
    write_job(job, assets, shapes)
    assert main(["batch", str(job), "--out", str(out), "--local", "--threads", "1", "--quiet"]) == 0
    assert records(out)[-1]["resumed_from"] is None


def test_directory_job_mirrors_the_tree(shapes, tmp_path):
    src = tmp_path / "catalogue"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "sphere.obj").write_bytes((shapes / "sphere.obj").read_bytes())
    (src / "a" / "b" / "box.ply").write_bytes((shapes / "box.ply").read_bytes())
    (src / "notes.txt").write_text("not an asset")
    out = src / "runs"  # inside the input: never taken for assets
    argv = ["batch", str(src), "--out", str(out), "--local", "--threads", "1", "--quiet", "--steps", "10",
            *[f"--set={k}={json.dumps(v) if isinstance(v, str) else v}".lower() for k, v in TINY.items() if k != "steps"]]
    assert main(argv) == 0
    assert (out / "a" / "sphere" / "sphere.vqad").is_file() and (out / "a" / "b" / "box" / "box.vqad").is_file()
    assert {r["steps"] for r in records(out)} == {10}
    assert main(argv) == 0 and len(records(out)) == 2  # the outputs' meshes are not new assets


@pytest.mark.parametrize("argv, message", [
    (["--ray", "notahost"], "--ray takes auto or a cluster's address host:port"),
    (["--ray", ""], "--ray takes auto or a cluster's address"),
    (["--ray", "auto", "--threads", "64"], "--threads 64 per fit, but this machine has"),
])
def test_run_settings_that_cannot_work_are_refused_before_the_output_folder_exists(argv, message, shapes, tmp_path,
                                                                                    capsys, monkeypatch):
    monkeypatch.setattr("vqad.device.available_cores", lambda: 2)
    job = write_job(tmp_path / "job.json", [str(shapes / "sphere.obj")], shapes)
    if "auto" in argv and importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed: --ray auto runs --local")
    assert_refused(["batch", str(job), "--out", str(tmp_path / "out"), *argv], tmp_path / "out", message, capsys)


def test_a_folder_replaced_by_a_stopped_run_with_other_settings_is_fitted_again(shapes, tmp_path, capsys):
    """The latest record says done with these settings, but a later run with other settings, stopped before
    it recorded anything, has started to replace the folder (its settings.json): the file there is not this
    record's, so the asset is fitted again instead of skipped."""
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.json", [str(shapes / "sphere.obj")], shapes)
    assert main(["batch", str(job), "--out", str(out), "--local", "--threads", "1", "--quiet"]) == 0
    settings = out / "sphere" / "settings.json"
    assert B.plan(B.load_job(job, out)).skipped == ["sphere"]
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "fingerprint": "another-run"}))
    p = B.plan(B.load_job(job, out))
    assert [s.key for s in p.run] == ["sphere"] and "a run with other settings that was stopped" in p.reasons["sphere"]
    settings.unlink()  # lost by hand: the record and the file are all there is, as before settings.json was read
    assert B.plan(B.load_job(job, out)).skipped == ["sphere"]


def test_a_recursive_pattern_that_would_search_too_many_folders_is_refused(tmp_path, monkeypatch):
    """A job's "/**/*" walked the whole file system (454 s, then out of memory, even with --dry-run): a '**'
    pattern's fixed folder is counted first, up to MAX_WALK_FOLDERS, and one beyond it is refused."""
    for i in range(6):
        (tmp_path / "data" / f"d{i}").mkdir(parents=True)
    (tmp_path / "data" / "d3" / "x.obj").write_text("")
    monkeypatch.setattr(B, "MAX_WALK_FOLDERS", 10)
    assert B._expand("data/**/x.obj", tmp_path, tmp_path / "out", "test") == [str((tmp_path / "data/d3/x.obj").resolve())]
    monkeypatch.setattr(B, "MAX_WALK_FOLDERS", 5)
    with pytest.raises(InputError, match=f"test: the pattern's '\\*\\*' would search more than 5 folders under {tmp_path / 'data'}"):
        B._expand("data/**/x.obj", tmp_path, tmp_path / "out", "test")
    assert B._expand("data/d3/*.obj", tmp_path, tmp_path / "out", "test")  # no '**': one folder's listing


def test_output_folders_inside_the_input_are_neither_assets_nor_input(shapes, tmp_path):
    """A directory job or a glob never takes the meshes of a batch's, a sweep's or a fit's output for assets,
    and a capture's stamp ignores the job's own output written inside it (it would refit forever)."""
    src = tmp_path / "assets"
    src.mkdir()
    (src / "sphere.obj").write_bytes((shapes / "sphere.obj").read_bytes())
    for folder, marker in (("run1", B.RESULTS), ("sw", "sweep.json"), ("fit", "checkpoint/config.json")):
        (src / folder / "sphere").mkdir(parents=True)
        (src / folder / "sphere" / "mesh_lod4.ply").write_bytes((shapes / "box.ply").read_bytes())
        (src / folder / marker).parent.mkdir(parents=True, exist_ok=True)
        (src / folder / marker).write_text("{}")
    assert B.discover(src) == [src / "sphere.obj"]
    with pytest.raises(InputError, match="matches nothing"):
        B._expand("**/*.ply", src, tmp_path / "elsewhere", "test")
    capture = tmp_path / "capture"
    (capture / "images").mkdir(parents=True)
    (capture / "images" / "a.png").write_bytes(b"x")
    stamp = input_stamp(str(capture), capture / "runs")
    (capture / "runs" / "a").mkdir(parents=True)
    (capture / "runs" / "results.jsonl").write_text("{}")
    (capture / "runs" / "a" / "a.vqad").write_bytes(b"y")
    (capture / "sweep1").mkdir()
    (capture / "sweep1" / "sweep.json").write_text("{}")
    assert input_stamp(str(capture), (capture / "runs").resolve()) == stamp
    (capture / "images" / "b.png").write_bytes(b"z")
    assert input_stamp(str(capture), (capture / "runs").resolve()) != stamp


def test_reports_show_evaluation_errors_and_escape_names(tmp_path):
    rec = {"asset": "a|b", "status": "done", "application": "sdf", "bytes": 1000, "ratio": 2.0,
           "quality": {"3": None, "4": 0.01}, "lods": {"3": {"error": "no zero crossing"}, "4": {"chamfer_l1": 0.01}},
           "fit_seconds": 1.0, "worker": "h:1"}
    B.write_reports(tmp_path, [rec])
    md = (tmp_path / B.RESULTS_MD).read_text()
    assert "| a\\|b | sdf |" in md and "## Evaluation errors" in md and "| a\\|b | LOD 3: no zero crossing |" in md
    row = (tmp_path / B.RESULTS_CSV).read_text().splitlines()[1]
    assert row.endswith(",LOD 3: no zero crossing") and ",chamfer_l1," in row
    line = B.summary_line(B.BatchResult([rec], 1, 0, 0, 1.0, ""), tmp_path)
    assert "1 with LODs the evaluation could not measure" in line


def test_directory_job_given_as_a_relative_path(shapes, tmp_path, monkeypatch):
    """README's ``vqad batch meshes/ --out runs/meshes``: a relative folder's assets are found where they are
    (they used to be looked for under meshes/meshes/)."""
    (tmp_path / "meshes").mkdir()
    (tmp_path / "meshes" / "sphere.obj").write_bytes((shapes / "sphere.obj").read_bytes())
    monkeypatch.chdir(tmp_path)
    job = B.load_job("meshes/", out="runs/meshes")
    assert [s.key for s in job.assets] == ["sphere"]
    assert Path(job.assets[0].source) == (tmp_path / "meshes" / "sphere.obj").resolve()


def test_one_run_at_a_time_per_output_folder(shapes, tmp_path, capsys):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    job = write_job(tmp_path / "job.json", [str(shapes / "sphere.obj")], shapes)
    with open(out / ".batch.lock", "a+") as f:  # another driver's lock
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["batch", str(job), "--out", str(out), "--local", "--quiet"]) == 2
        assert "another vqad batch is running with the output folder" in capsys.readouterr().err
        assert main(["batch", str(job), "--out", str(out), "--local", "--dry-run"]) == 0  # says so (it did not)
        assert "note: another vqad batch is running on" in capsys.readouterr().out
    assert not (out / B.RESULTS).exists()
    assert main(["batch", str(job), "--out", str(out), "--local", "--dry-run"]) == 0
    assert "another vqad batch" not in capsys.readouterr().out


def test_results_log_survives_a_torn_record(tmp_path):
    log = tmp_path / B.RESULTS
    append_record(log, json.dumps({"asset": "a", "status": "done"}))
    with open(log, "a") as f:
        f.write('{"asset": "b", "sta')  # a write cut short by a crash
    append_record(log, json.dumps({"asset": "c", "status": "failed"}))
    for bad in ({"asset": ["x"], "status": "done"}, {"asset": "d", "status": 1}, {"asset": "e"}):  # was a TypeError
        append_record(log, json.dumps(bad))
    assert {k: r["status"] for k, r in B.read_results(tmp_path).items()} == {"a": "done", "c": "failed"}
    with pytest.raises(ValueError):
        append_record(log, "two\nlines")


def test_without_ray_local_with_a_note_or_an_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *a, **kw):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    notes = []
    assert B.RunConfig().executor(notes.append) == "local" and "Ray is not installed" in notes[0]
    assert B.RunConfig(ray="auto").executor(notes.append) == "local" and len(notes) == 2
    with pytest.raises(InputError, match="needs Ray on this machine"):
        B.RunConfig(ray="10.0.0.5:6379").executor(notes.append)
    assert B.RunConfig(local=True).executor(notes.append) == "local" and len(notes) == 2


def test_thread_rule():
    """--local: every core unless --threads; Ray: --threads, else $VQAD_THREADS, else 1 per fit."""
    from vqad.device import resolve_threads

    assert B.RunConfig().fit_threads("local") == resolve_threads(None)
    assert B.RunConfig(threads=2).fit_threads("ray") == 2
    os.environ.pop("VQAD_THREADS", None)
    assert B.RunConfig().fit_threads("ray") == 1


def test_switch_flags_take_their_constants_in_jobs():
    """Flags that store a constant (--no-recode, --per-lod-decoder, --shared-decoder) take true / false in a job,
    like --entropy; anything else is refused with the key's name."""
    args, _, configs = B.resolve_settings("nerf", (("no_recode", True), ("per_lod_decoder", True), ("steps", 5)))
    assert args["recode"] is False and args["per_lod"] is True
    assert configs[3]["recode"] is False
    args, _, configs = B.resolve_settings("nerf", (("no_recode", False), ("shared_decoder", True)))
    assert args["recode"] is None and args["per_lod"] is False and configs[3]["recode"] is True
    for key in ("no_recode", "shared_decoder"):
        with pytest.raises(InputError, match=f"{key} must be true or false"):
            B.resolve_settings("nerf", ((key, "true"),))


@needs_ray
def test_a_ray_address_with_no_cluster_is_refused_at_once_and_writes_nothing(shapes, tmp_path, capsys):
    """--ray 127.0.0.1:1 (nothing listening) hung without end in ray.init, printing Ray's warnings, after the
    output folder and its lock were made (found by a hostile pass)."""
    job = write_job(tmp_path / "job.json", [str(shapes / "sphere.obj")], shapes)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    for extra in ([], ["--dry-run"]):
        assert main(["batch", str(job), "--out", str(tmp_path / "out"), "--ray", f"127.0.0.1:{port}", "--quiet", *extra]) == 2
        err = capsys.readouterr().err
        assert f"cannot join the Ray cluster at 127.0.0.1:{port}: no connection" in err
    assert time.monotonic() - t0 < 3 * B.RAY_CONNECT_TIMEOUT_S and not (tmp_path / "out").exists()


def test_directory_jobs_take_odd_names_and_links_as_they_are(shapes, tmp_path):
    """Found by a hostile pass: a file named scan[1].obj was read as a glob (matching nothing, or scan1.obj); a
    linked folder made every asset under it appear twice ("listed twice: give one a name", which a directory job
    cannot); a link to itself was a RuntimeError traceback; a dangling link was named by its missing target."""
    src = tmp_path / "cat"
    (src / "sub").mkdir(parents=True)
    sphere = (shapes / "sphere.obj").read_bytes()
    (src / "scan[1].obj").write_bytes(sphere)
    (src / "scan1.obj").write_bytes(sphere)
    (src / "sub" / "box*.obj").write_bytes(sphere)
    (src / "loop").symlink_to(src)  # a link back up the tree: searched once, as the folder itself
    (src / "alias.obj").symlink_to(src / "scan1.obj")  # the same file twice: one asset, the file itself
    (src / "notes.txt").symlink_to(tmp_path / "gone.txt")  # a dangling link that is no mesh: not an asset
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "cone.obj").write_bytes(sphere)
    (src / "linked").symlink_to(tmp_path / "elsewhere")  # a linked folder of meshes: searched
    (src / "again").symlink_to(tmp_path / "elsewhere")  # ... once
    job = B.load_job(src, out=tmp_path / "out")
    assert sorted(s.key for s in job.assets) == ["again/cone", "scan1", "scan[1]", "sub/box*"]
    assert all(Path(s.source).read_bytes() == sphere for s in job.assets)
    (src / "self.obj").symlink_to(src / "self.obj")
    with pytest.raises(InputError, match="self.obj: cannot follow it"):
        B.load_job(src, out=tmp_path / "out")
    (src / "self.obj").unlink()
    (src / "gone.obj").symlink_to(tmp_path / "nowhere.obj")
    with pytest.raises(InputError, match="gone.obj is a symbolic link to .*nowhere.obj, which does not exist"):
        B.load_job(src, out=tmp_path / "out")


@pytest.mark.parametrize("name, words", [
    ("a\udc80b", "is not valid UTF-8 text"), ("a\u0085b", "control character"), ("a\u202eb", "control character"),
    ("Results.JSONL", "is a file of the output folder itself"),
])
def test_asset_names_that_break_folders_or_their_display_are_refused(shapes, tmp_path, name, words):
    job = write_job(tmp_path / "job.json", [{"path": str(shapes / "sphere.obj"), "name": name}], shapes)
    with pytest.raises(InputError, match=words):
        B.load_job(job, out=tmp_path / "out")


def test_application_inside_a_kinds_defaults_is_refused(shapes, tmp_path):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"defaults": {"sdf": {"application": "nerf"}}, "assets": [str(shapes / "sphere.obj")]}))
    with pytest.raises(InputError, match=r"\[defaults.sdf\] .* application has no place"):
        B.load_job(job, out=tmp_path / "out")


def test_special_files_as_a_job_or_an_asset_are_named_as_such(shapes, tmp_path):
    """A FIFO job file was "job not found", a FIFO mesh "mesh not found", /dev/null "Not a directory"."""
    os.mkfifo(tmp_path / "job.toml")
    with pytest.raises(InputError, match="is not a job file or folder \\(a device, pipe or socket\\)"):
        B.load_job(tmp_path / "job.toml", out=tmp_path / "out")
    os.mkfifo(tmp_path / "pipe.obj")
    for path in (str(tmp_path / "pipe.obj"), "/dev/null"):
        job = write_job(tmp_path / "job.json", [path], shapes)
        with pytest.raises(InputError, match="is not a mesh file or a capture folder"):
            B.load_job(job, out=tmp_path / "out")


@needs_ray
def test_rays_raylet_messages_go_to_stderr_or_nowhere_with_quiet(capsys):
    """Ray's driver printed "A worker died ..." and "... will be retried" on stdout, --quiet or not."""
    from ray._private import worker as ray_worker

    original = ray_worker.print_to_stdstream
    msg = {"lines": ["A worker died or was killed while executing a task"], "pid": "raylet", "is_err": False}
    with B._ray_messages(quiet=True):
        ray_worker.print_to_stdstream(msg, ignore_prefix=False)
    assert capsys.readouterr() == ("", "")
    with B._ray_messages(quiet=False):
        ray_worker.print_to_stdstream(msg, ignore_prefix=False)
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == "ray: A worker died or was killed while executing a task\n"
    assert ray_worker.print_to_stdstream is original  # restored



def test_an_asset_that_is_a_link_is_named_by_its_path_in_the_job(shapes, tmp_path):
    """captures/lego -> the shared data was named work/shared/data/...: the output tree mirrors the job's paths."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.obj").write_bytes((shapes / "sphere.obj").read_bytes())
    (tmp_path / "meshes").mkdir()
    (tmp_path / "meshes" / "a.obj").symlink_to(tmp_path / "elsewhere" / "b.obj")
    job = write_job(tmp_path / "job.json", ["meshes/a.obj", "meshes/*.obj"], tmp_path)
    with pytest.raises(InputError, match="listed twice"):  # the same path twice, by name and by pattern
        B.load_job(job, out=tmp_path / "out")
    job = write_job(tmp_path / "job.json", ["meshes/a.obj"], tmp_path)
    assert [s.key for s in B.load_job(job, out=tmp_path / "out").assets] == ["meshes/a"]
