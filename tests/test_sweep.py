"""vqad sweep: a tiny SDF sweep (fits, post hoc, Draco, stream) with an interruption and resume, a
tiny radiance-field sweep, config files, bad input, and bench-rd's target checks."""

import csv
import dataclasses
import functools
import importlib.util
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import trimesh

import vqad.sdf.metrics
import vqad.sdf.fit
from vqad.app import sweep as S
from vqad import fit as trainer
from vqad.app.cli import build_parser, main as cli_main
from vqad.app.commands.sweep import sweep_config
from vqad.errors import InputError

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--levels", "2:4", "--features", "8", "--steps", "30", "--batch", "2048", "--hidden", "32",
         "--mc-resolution", "40", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def sphere(tmp_path_factory):
    p = tmp_path_factory.mktemp("mesh") / "sphere.obj"
    trimesh.creation.icosphere(subdivisions=3, radius=0.6).export(p)
    return p


@dataclasses.dataclass
class _SmallSweeps(vqad.sdf.fit.SDFTrainConfig):
    refine_samples: int = 20_000  # a level-4 sphere's index sweeps: a tenth of a real mesh's samples (most of the time)


@pytest.fixture(autouse=True)
def small_samples(monkeypatch):
    """A level-4 sphere needs far fewer samples (octree, Chamfer, IoU, index sweeps) than the defaults made for
    real meshes."""
    monkeypatch.setattr(vqad.sdf.fit, "SDFTrainConfig", _SmallSweeps)
    monkeypatch.setattr(vqad.sdf.fit, "build_sdf_field", functools.partial(vqad.sdf.fit.build_sdf_field, octree_samples=50_000))
    monkeypatch.setattr(vqad.sdf.metrics, "chamfer_and_normals", functools.partial(vqad.sdf.metrics.chamfer_and_normals, n=20_000))
    monkeypatch.setattr(vqad.sdf.metrics, "geometry_metrics", functools.partial(vqad.sdf.metrics.geometry_metrics, chamfer_samples=20_000))
    monkeypatch.setattr(vqad.sdf.metrics, "volumetric_iou", functools.partial(vqad.sdf.metrics.volumetric_iou, n=100_000))


def _config(dataset, out, methods, extra=()):
    small = [*SMALL, "--draco-mc-resolution", "40"] if any(m.startswith("draco-mc") for m in methods) else SMALL
    return sweep_config(build_parser().parse_args(["sweep", str(dataset), "--out", str(out), "--methods", *methods,
                                                   *small, *extra]))


def _count_fits(monkeypatch, task_cls=S.SDFTask):
    """Record each fit as (storage, resume) and pass it through."""
    calls, real = [], task_cls.fit

    def fit(self, grid_cfg, work, resume, **kw):
        calls.append((grid_cfg.storage, resume))
        return real(self, grid_cfg, work, resume, **kw)

    monkeypatch.setattr(task_cls, "fit", fit)
    return calls


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sdf_sweep_interrupted_resumes_and_reports(sphere, tmp_path, monkeypatch):
    out = tmp_path / "rd"
    methods = ["draco-input:8", "dense", "kmeans:4", "draco-mc:8", "codebook:4", "hash:8"]
    cfg = _config(sphere, out, methods)
    calls = _count_fits(monkeypatch)

    # Ctrl-C in the middle of the VQ-AD fit: fit_sdf saves its checkpoint and re-raises
    real_step, n = trainer.step, {"steps": 0}

    def step(opts):
        n["steps"] += 1
        if calls[-1][0] == "codebook" and n["steps"] == 40:  # dense took 30 steps
            raise KeyboardInterrupt
        real_step(opts)

    monkeypatch.setattr(trainer, "step", step)
    with pytest.raises(KeyboardInterrupt):
        S.Sweep(cfg, log=lambda *a, **k: None).run()
    done = {p.stem for p in (out / "points").glob("*.json")}
    assert done == {"draco-input-q8", "dense", "kmeans-b4", "draco-mc-q8"}
    md = (out / "results.md").read_text()  # a stopped sweep's tables say they are not the whole sweep
    assert ("**Incomplete:** 3 points of this sweep are not finished: VQ-AD (learned indices), b = 4; VQ-AD, per-LOD "
            "file prefixes, b = 4; hash (random indices), T = 8. Run the same command again") in md
    assert not list((out / "points").glob("*.tmp*"))
    assert (out / "work" / "codebook-b4" / "checkpoint" / "config.json").is_file()
    assert {r["point"] for r in _csv(out / "results.csv")} == done  # only finished points are reported
    stamps = {p: (out / "points" / f"{p}.json").stat().st_mtime_ns for p in done}

    # the same sweep again: finished points are skipped, the VQ-AD fit continues from its checkpoint, with what
    # its first run trained taken off the per-fit cap
    monkeypatch.setattr(trainer, "step", real_step)
    calls.clear()
    spent, real_left = [], S.minutes_left
    monkeypatch.setattr(S, "minutes_left", lambda minutes, s: spent.append(s) or real_left(minutes, s))
    rows = S.Sweep(cfg, log=lambda *a, **k: None).run()
    assert calls == [("codebook", True), ("hash", False)]
    assert spent[0] > 0 and spent[1] == 0.0  # the resumed codebook fit, then the fresh hash fit
    assert all((out / "points" / f"{p}.json").stat().st_mtime_ns == t for p, t in stamps.items())
    assert not (out / "work" / "codebook-b4").exists()  # a finished fit's checkpoint is removed

    table = _csv(out / "results.csv")
    assert len(table) == len(rows) == 6 + 3  # six points and the 4-bit stream curve at LODs 2, 3, 4
    by = {r["point"]: r for r in table if r["method"] != "codebook-stream"}
    for r in by.values():
        assert float(r["chamfer_l1"]) > 0 and float(r["normal_consistency"]) > 0.5 and int(r["bytes"]) > 0
    for p in ("dense", "kmeans-b4", "codebook-b4", "hash-T8"):  # real files, measured by their bytes
        assert (out / by[p]["file"]).stat().st_size == int(by[p]["bytes"])
        assert int(by[p]["bytes"]) <= int(by[p]["file_bytes"]) and float(by[p]["iou"]) > 0.5
        assert int(by[p]["grid_bytes"]) < int(by[p]["file_bytes"])
    assert (out / by["draco-input-q8"]["file"]).stat().st_size == int(by["draco-input-q8"]["bytes"])
    assert by["draco-input-q8"]["iou"] == ""  # a Draco mesh has no field to test insideness on
    assert "continued from the checkpoint of an interrupted run (fit s: both runs)" in by["codebook-b4"]["note"]
    assert "Incomplete" not in (out / "results.md").read_text()
    assert int(by["codebook-b4"]["steps"]) == 30
    assert float(by["dense"]["dense_ratio"]) == 1.0 and float(by["codebook-b4"]["dense_ratio"]) > 5
    stream = [r for r in table if r["method"] == "codebook-stream"]
    assert [int(r["lod"]) for r in stream] == [2, 3, 4]
    assert [int(r["bytes"]) for r in stream][-1] == int(by["codebook-b4"]["bytes"])
    assert float(stream[-1]["chamfer_l1"]) == pytest.approx(float(by["codebook-b4"]["chamfer_l1"]))
    md = (out / "results.md").read_text()
    for label in ("dense fp16", "VQ-AD (learned indices) | b = 4", "hash (random indices) | T = 8",
                  "k-means VQ (post hoc) | b = 4", "Draco, input mesh | q = 8", "Draco, marching cubes of dense | q = 8",
                  "## Streaming"):
        assert label in md, label
    png = (out / "rd.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # a third run does nothing; other settings in the same directory are refused
    calls.clear()
    S.Sweep(cfg, log=lambda *a, **k: None).run()
    assert calls == []
    # a point record emptied (a disk full, a hand edit): set aside and that point alone is redone
    (out / "points" / "hash-T8.json").write_text("")
    logged = []
    S.Sweep(cfg, log=lambda *a, **k: logged.append(" ".join(map(str, a)))).run()
    assert calls == [("hash", False)]
    assert any("hash-T8.json is damaged" in line for line in logged)
    assert (out / "points" / "hash-T8.json.damaged").exists() and S.read_point(out / "points" / "hash-T8.json")
    calls.clear()
    with pytest.raises(InputError, match="other settings.*steps"):
        S.Sweep(_config(sphere, out, methods, ["--steps", "31"]))


def test_sdf_sweep_with_and_without_index_refinement(sphere, tmp_path, monkeypatch):
    """codebook and codebook-norefine: the same fit but for its refinement sweeps, two series everywhere."""
    runs = []  # (grid config, train config) of every fit
    real_fit = vqad.sdf.fit.fit_sdf

    def fit_sdf(mesh, grid_cfg, dec_cfg, train_cfg, *a, **kw):
        runs.append((grid_cfg, train_cfg))  # as the sweep made it; run on fewer samples, for speed
        return real_fit(mesh, grid_cfg, dec_cfg, replace(train_cfg, pool_size=20_000, refine_samples=5_000), *a, **kw)

    monkeypatch.setattr(vqad.sdf.fit, "fit_sdf", fit_sdf)
    out = tmp_path / "rd"
    cfg = _config(sphere, out, ["codebook:2", "codebook-norefine:2"], ["--steps", "10", "--no-entropy"])
    S.Sweep(cfg, log=lambda *a, **k: None).run()

    (g_ref, t_ref), (g_no, t_no) = runs
    assert (t_ref.refine, t_no.refine) == (S.default_refine("sdf"), 0) == (10, 0)
    assert g_ref == g_no and g_no.storage == "codebook" and g_no.bits == 2
    assert replace(t_ref, refine=0) == t_no  # nothing else differs
    table = {r["point"]: r for r in _csv(out / "results.csv")}
    assert set(table) == {"codebook-b2", "codebook-norefine-b2"}  # no stream curve for the b = 2 pair
    assert (table["codebook-b2"]["refine"], table["codebook-norefine-b2"]["refine"]) == ("10", "0")
    for r in table.values():
        assert (out / r["file"]).is_file() and float(r["chamfer_l1"]) > 0
    md = (out / "results.md").read_text()
    assert "| VQ-AD (learned indices) | b = 2 |" in md and "| VQ-AD, no index refinement | b = 2 |" in md
    assert "ends with 10 Gauss–Newton index-refinement sweeps" in md and "No baseline gets a comparable step" in md
    assert (out / "rd.png").stat().st_size > 10_000
    assert "codebook-norefine:b" in S.METHOD_SPEC_HELP  # the --methods help documents it


def test_sweeps_sharing_a_directory_skip_what_the_other_finished(sphere, tmp_path, monkeypatch):
    """Two processes on one OUT (each its --methods): a point the other finished while this one was
    fitting is skipped, not fitted twice."""
    out = tmp_path / "rd"
    cfg = _config(sphere, out, ["dense", "hash:8"])
    calls, real = [], S.SDFTask.fit

    def fit(self, grid_cfg, work, resume, **kw):
        calls.append(grid_cfg.storage)
        if grid_cfg.storage == "dense":  # meanwhile, another process finishes hash:8
            rec = {"point": "hash-T8", "method": "hash", "setting": 8, "rate_weight": None,
                   "rows": [{"point": "hash-T8", "method": "hash", "setting": 8, "lod": 4, "bytes": 1}],
                   "finished_at": "2026-12-04T00:00:00+00:00"}
            (out / "points").mkdir(parents=True, exist_ok=True)
            (out / "points" / "hash-T8.json").write_text(json.dumps(rec))
        return real(self, grid_cfg, work, resume, **kw)

    monkeypatch.setattr(S.SDFTask, "fit", fit)
    logs = []
    S.Sweep(cfg, log=lambda *a, **k: logs.append(" ".join(map(str, a)))).run()
    assert calls == ["dense"]
    assert any("T = 8: finished earlier, skipped" in line for line in logs)


def test_sdf_sweep_rate_aware_points_resume_and_report(sphere, tmp_path, monkeypatch):
    """codebook-rate: one fit per (b, λ), with λ in its train config and no refinement; resumable; λ recorded."""
    runs = []  # train config of every fit
    real_fit = vqad.sdf.fit.fit_sdf

    def fit_sdf(mesh, grid_cfg, dec_cfg, train_cfg, *a, **kw):
        runs.append((grid_cfg.bits, train_cfg))
        return real_fit(mesh, grid_cfg, dec_cfg, replace(train_cfg, pool_size=20_000, refine_samples=5_000), *a, **kw)

    monkeypatch.setattr(vqad.sdf.fit, "fit_sdf", fit_sdf)
    out = tmp_path / "rd"
    methods = ["codebook:2", "codebook-rate:2,3"]
    extra = ["--steps", "10", "--rate-weights", "3e-2,1e-3"]
    S.Sweep(_config(sphere, out, methods, extra), log=lambda *a, **k: None).run()
    # rate-aware fits end with the same (rate-aware) index refinement as codebook:b, their λ = 0 end
    r = S.default_refine("sdf")
    assert r == 10
    assert [(b, t.rate_weight, t.rate_context, t.refine) for b, t in runs] == [
        (2, 0.0, False, r), (2, 1e-3, False, r), (2, 3e-2, False, r), (3, 1e-3, False, r), (3, 3e-2, False, r)]
    plain, rated = runs[0][1], runs[1][1]
    assert replace(rated, rate_weight=0.0) == plain  # nothing else differs from the λ = 0 reference

    keys = ["codebook-b2", "codebook-rate-b2-lambda0.001", "codebook-rate-b2-lambda0.03",
            "codebook-rate-b3-lambda0.001", "codebook-rate-b3-lambda0.03"]
    table = _csv(out / "results.csv")
    assert [r["point"] for r in table] == keys
    by = {r["point"]: r for r in table}
    assert by["codebook-b2"]["rate_weight"] == "" and by["codebook-rate-b3-lambda0.03"]["rate_weight"] == "0.03"
    for r in table:
        assert (out / r["file"]).stat().st_size == int(r["bytes"]) and float(r["chamfer_l1"]) > 0
        assert r["refine"] == str(S.default_refine("sdf")) and float(r["index_bits"]) == int(r["setting"])
        # the shipped (entropy-coded) file's index chunks, models included: at most b plus a little
        assert 0 < float(r["coded_index_bits"]) <= int(r["setting"]) + 0.5
    md = (out / "results.md").read_text()
    assert "| VQ-AD + rate term | b = 3, λ = 0.03 |" in md and "**Rate-aware points**" in md
    assert "at λ = 0.001, 0.03" in md and "order-0" in md
    assert "*VQ-AD + rate term* points end with 10 rate-aware sweeps" in md and "ending with 10 index-refinement sweeps" in md
    assert (out / "rd.png").stat().st_size > 10_000
    assert "rate_weights" not in json.loads((out / "sweep.json").read_text())["settings"]  # they choose points

    # resumed after a lost point: only that (b, λ) is refitted; another λ adds its points; the context estimate is refused
    (out / "points" / "codebook-rate-b3-lambda0.001.json").unlink()
    runs.clear()
    S.Sweep(_config(sphere, out, methods, extra), log=lambda *a, **k: None).run()
    assert [(b, t.rate_weight) for b, t in runs] == [(3, 1e-3)]
    assert [r["point"] for r in _csv(out / "results.csv")] == keys
    # a record of an older sweep, when rate-aware points were not refined: set aside and refitted
    rec_path = out / "points" / "codebook-rate-b2-lambda0.03.json"
    rec = json.loads(rec_path.read_text())
    rec["rows"][-1]["refine"] = 0
    rec_path.write_text(json.dumps(rec))
    runs.clear()
    S.Sweep(_config(sphere, out, methods, extra), log=lambda *a, **k: None).run()
    assert [(b, t.rate_weight) for b, t in runs] == [(2, 3e-2)]
    assert (out / "points" / "codebook-rate-b2-lambda0.03.json.stale").is_file()
    assert json.loads(rec_path.read_text())["rows"][-1]["refine"] == S.default_refine("sdf")
    runs.clear()
    S.Sweep(_config(sphere, out, methods, ["--steps", "10", "--rate-weights", "0.001,0.03,1e-3"]),
            log=lambda *a, **k: None).run()  # the same set, written otherwise: nothing to do
    assert runs == []
    S.Sweep(_config(sphere, out, methods, ["--steps", "10", "--rate-weights", "1e-3"]),
            log=lambda *a, **k: None).run()  # a subset: nothing to do
    assert runs == []
    S.Sweep(_config(sphere, out, ["codebook-rate:3"], ["--steps", "10", "--rate-weights", "0.1"]),
            log=lambda *a, **k: None).run()  # a new λ: one more point beside the others
    assert [(b, t.rate_weight) for b, t in runs] == [(3, 0.1)]
    assert [r["point"] for r in _csv(out / "results.csv")] == keys + ["codebook-rate-b3-lambda0.1"]
    with pytest.raises(InputError, match="other settings.*rate_context"):
        S.Sweep(_config(sphere, out, methods, [*extra, "--rate-context"]))


def test_rate_settings_of_older_sweeps_and_the_context_flag(sphere, tmp_path, monkeypatch):
    """A sweep.json written before the λ values were recorded resumes with the defaults; --rate-context reaches
    the fit."""
    out = tmp_path / "rd"
    cfg = _config(sphere, out, ["codebook-rate:2"], ["--steps", "5", "--rate-weights", "1e-2", "--rate-context"])
    seen = []
    monkeypatch.setattr(S.SDFTask, "fit", lambda self, g, work, resume, **kw: seen.append(kw) or (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        S.Sweep(cfg, log=lambda *a, **k: None).run()
    assert seen == [{"refine": None, "spent": 0.0, "rate_weight": 1e-2}]  # None: the fit's default sweeps
    train = vqad.sdf.fit.SDFTrainConfig()
    S._set_rate(train, 1e-2, True)
    assert (train.rate_weight, train.rate_context) == (1e-2, True)
    S._set_rate(train := vqad.sdf.fit.SDFTrainConfig(), 0.0, True)  # λ = 0: no rate term, no context
    assert (train.rate_weight, train.rate_context) == (0.0, False)

    old = tmp_path / "old"
    cfg = _config(sphere, old, ["dense"])
    S.Sweep(cfg)._prepare_out()
    record = json.loads((old / "sweep.json").read_text())
    assert "rate_weights" not in record["settings"]
    del record["settings"]["rate_context"]
    (old / "sweep.json").write_text(json.dumps(record))
    S.Sweep(cfg)  # the defaults: resumable
    S.Sweep(_config(sphere, old, ["dense", "codebook-rate:4"]))  # adding rate points at the default λ values
    record["settings"]["rate_weights"] = [3e-4, 1e-3, 3e-3]  # as sweeps recorded them before λ chose points
    (old / "sweep.json").write_text(json.dumps(record))
    S.Sweep(_config(sphere, old, ["dense", "codebook-rate:4"], ["--rate-weights", "1e-2"]))  # other λ: resumable
    with pytest.raises(InputError, match="other settings.*steps"):
        S.Sweep(_config(sphere, old, ["dense"], ["--steps", "11"]))
    # its format: a newer one is named as such, another value is not a sweep record, none is the first format's
    for version, words in ((2, "sweep format 2, written by a newer vqad"), ("1", "is not a vqad sweep record"),
                           (True, "is not a vqad sweep record")):
        (old / "sweep.json").write_text(json.dumps({**record, "vqad_sweep": version}))
        with pytest.raises(InputError, match=words):
            S.Sweep(_config(sphere, old, ["dense", "codebook-rate:4"], ["--rate-weights", "1e-2"]))
    (old / "sweep.json").write_text(json.dumps({k: v for k, v in record.items() if k != "vqad_sweep"}))
    S.Sweep(_config(sphere, old, ["dense", "codebook-rate:4"], ["--rate-weights", "1e-2"]))


def test_nerf_sweep_on_the_procedural_scene(tmp_path, capsys):
    out = tmp_path / "rd"
    rc = cli_main(["sweep", "procedural", "--out", str(out), "--methods", "dense", "codebook:2", "kmeans:2", "lowrank:2",
                   "codebook-rate:2", "--rate-weights", "1e-2", "--levels", "2:4", "--features", "4", "--steps", "15", "--batch", "256", "--hidden", "16",
                   "--octree", "mask", "--eval-max-views", "2", "--stream-bits", "2", "--device", "cpu", "--quiet"])
    assert rc == 0
    table = _csv(out / "results.csv")
    assert [r["point"] for r in table] == ["dense", "codebook-b2", "codebook-stream-b2", "codebook-stream-b2",
                                           "codebook-stream-b2", "codebook-rate-b2-lambda0.01", "kmeans-b2", "lowrank-r2"]
    assert "chamfer_l1" not in table[0]
    assert {r["point"]: r["refine"] for r in table if r["method"] in ("dense", "codebook")} == {"dense": "", "codebook-b2": "0"}
    assert [(r["point"], r["rate_weight"], r["index_bits"]) for r in table if r["rate_weight"]] == [
        ("codebook-rate-b2-lambda0.01", "0.01", "2")]
    for r in table:
        assert 5 < float(r["psnr"]) < 60 and 0 < float(r["ssim"]) <= 1
    md = (out / "results.md").read_text()
    assert "PSNR (dB)" in md and "'test' views (first 2)" in md and "**Index refinement**: none" in md
    assert (out / "rd.png").stat().st_size > 10_000
    assert "wrote" in capsys.readouterr().out


def test_methods_defaults_and_order():
    pts = S.parse_methods([], "sdf", 16)
    keys = [p.key for p in pts]
    assert keys[:5] == ["draco-input-q8", "draco-input-q10", "draco-input-q12", "draco-input-q14", "dense"]
    assert {"lowrank-r4", "lowrank-r8", "kmeans-b4", "kmeans-b6", "hash-T16", "codebook-b8", "draco-mc-q14"} <= set(keys)
    assert "codebook-b10" not in keys  # 10 bits only when asked for
    assert not any(p.method.startswith("draco") for p in S.parse_methods([], "nerf", 8))
    assert [p.setting for p in S.parse_methods(["lowrank"], "nerf", 8)] == [2, 4]  # k/4, k/2
    # dense is added before what is made from it; the stream curve follows its VQ-AD point
    plan = S.plan(S.parse_methods(["codebook:2,4", "kmeans:4"], "sdf", 8), None)
    assert [p.key for p in plan] == ["dense", "codebook-b2", "codebook-b4", "codebook-stream-b4", "kmeans-b4"]
    assert [p.key for p in S.plan(S.parse_methods(["codebook:4"], "sdf", 8), 0)] == ["codebook-b4"]
    # VQ-AD without index refinement: its own points (codebook's settings), never in the default set
    assert [p.key for p in S.parse_methods(["codebook-norefine"], "sdf", 16)] == [
        f"codebook-norefine-b{b}" for b in S.METHODS["codebook"].defaults]
    assert not any(p.method == "codebook-norefine" for p in S.parse_methods([], "sdf", 16))
    plan = S.plan(S.parse_methods(["codebook-norefine:4", "codebook:4"], "sdf", 8), None)
    assert [p.key for p in plan] == ["codebook-norefine-b4", "codebook-b4", "codebook-stream-b4"]


def test_config_file_with_flags_overriding(sphere, tmp_path):
    toml = tmp_path / "sweep.toml"
    toml.write_text(f'dataset = "{sphere}"\nout = "{tmp_path / "o"}"\nmethods = ["codebook:2", "dense"]\n'
                    'steps = 12\nlevels = "2:5"\nmc-resolution = 64\n')
    cfg = sweep_config(build_parser().parse_args(["sweep", "--config", str(toml), "--steps", "7"]))
    assert (cfg.steps, cfg.levels, cfg.mc_resolution, cfg.methods) == (7, "2:5", 64, ["codebook:2", "dense"])
    js = tmp_path / "sweep.json"
    js.write_text(json.dumps({"dataset": str(sphere), "out": "x", "methods": "hash:12 dense", "entropy": False}))
    cfg = sweep_config(build_parser().parse_args(["sweep", "--config", str(js)])).resolved()
    assert cfg.methods == ["hash:12", "dense"] and cfg.entropy is False and cfg.steps == 3000 and cfg.features == 16


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vqad: error:"), err
    return err[0]


@pytest.mark.parametrize("args, needle", [
    (["--methods", "foo"], "unknown method 'foo'"),
    (["--methods", "codebook:x"], "integer b values"),
    (["--methods", "codebook:20"], "bits must be"),
    (["--methods", "hash:40"], "hash:40"),
    (["--methods", "lowrank:16"], "rank"),
    (["--methods", "dense:3"], "takes no setting"),
    (["--methods", "codebook:4_0"], "bad settings in 'codebook:4_0'"),  # (int() read it as 40)
    (["--methods", "codebook-norefine:13"], "bits must be"),
    (["--methods", "dense", "--stream-bits", "4"], "no codebook:4 point"),
    (["--methods", "codebook-rate:4@3e-3"], "with --rate-weights 3e-4,3e-3"),
    (["--methods", "codebook-rate:13"], "bits must be"),
    (["--methods", "codebook-rate:4", "--rate-weights", "0"], "λ = 0 is plain VQ-AD"),
    (["--methods", "codebook-rate:4", "--rate-weights", "1e-3,x"], "bad --rate-weights value 'x'"),
    (["--methods", "codebook-rate:4", "--rate-weights", "1e-3,-1"], "λ must be a finite number > 0"),
    (["--methods", "codebook-rate:4", "--rate-weights", ","], "bad --rate-weights"),
    (["--methods", "codebook:4", "--rate-weights", "1e-3"], "--rate-weights applies to rate-aware points"),
    (["--methods", "codebook:4", "--rate-context"], "--rate-context applies to rate-aware points"),
    (["--methods", "dense", "--draco-level", "3"], "--draco-level applies to the draco-input / draco-mc points"),
    (["--methods", "draco-input:8", "--draco-mc-resolution", "64"], "--draco-mc-resolution applies to the draco-mc"),
    (["--downscale", "2"], "--downscale: not an option for a mesh"),
    (["--minutes", "0"], "positive"),
    (["--levels", "5:2"], "level"),
    (["--steps", "0"], "positive"),
    (["--seed", "-3"], "--seed must be an integer in 0..2^63-1"),  # the fits' own checks, before sweep.json
    (["--hidden", "100000000"], "--hidden (decoder width) must be an integer in 1..4096"),
    (["--batch", "1000000000000"], "a step draws its points from a pool"),
    (["--methods", "lowrank", "--features", "1"], "gives no point to fit at k = 1"),
    (["--methods", "codebook-rate:4", "--rate-weights", "1e-3,1.0000001e-3"], "agree to 6 significant digits"),
])
def test_bad_arguments_are_one_line_errors(sphere, tmp_path, capsys, args, needle):
    out = tmp_path / "o"
    assert cli_main(["sweep", str(sphere), "--out", str(out), *args]) == 2
    assert needle in _err(capsys)
    assert not out.exists()  # nothing written for a bad sweep


def test_bad_datasets_and_configs(sphere, tmp_path, capsys):
    out = tmp_path / "o"
    cases = [
        (["sweep", str(tmp_path / "missing.obj"), "--out", str(out)], "mesh not found"),
        (["sweep", str(tmp_path / "missing_dir"), "--out", str(out)], "dataset not found"),
        (["sweep", "procedural", "--out", str(out), "--methods", "draco-input"], "applies to SDF sweeps"),
        (["sweep", "procedural", "--out", str(out), "--methods", "codebook-norefine:4"], "do not refine their indices"),
        (["sweep", "procedural", "--out", str(out), "--mc-resolution", "64"], "not an option for a radiance-field"),
        (["sweep", "procedural", "--out", str(out), "--background", "pink"], "background"),
        (["sweep", str(sphere)], "--out"),
        (["sweep", "--out", str(out)], "needs a dataset"),
        (["sweep", "--config", str(tmp_path / "none.toml")], "config not found"),
    ]
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3")
    cases.append((["sweep", "--config", str(bad)], "cannot parse"))
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"dataset": str(sphere), "out": str(out), "stepz": 3}))
    cases.append((["sweep", "--config", str(unknown)], "unknown sweep option(s): stepz"))
    typed = tmp_path / "typed.json"
    typed.write_text(json.dumps({"dataset": str(sphere), "out": str(out), "steps": "many"}))
    cases.append((["sweep", "--config", str(typed)], "steps must be int"))
    twice = tmp_path / "twice.toml"
    twice.write_text(f"dataset = {json.dumps(str(sphere))}\nout = {json.dumps(str(out))}\nmc_resolution = 64\n"
                     "mc-resolution = 32\n")
    cases.append((["sweep", "--config", str(twice)], "gives one option twice, as mc_resolution and as mc-resolution"))
    empty = tmp_path / "empty.toml"
    empty.write_text(f"dataset = {json.dumps(str(sphere))}\nout = {json.dumps(str(out))}\nmethods = []\n")
    cases.append((["sweep", "--config", str(empty)], "methods is empty"))
    for argv, needle in cases:
        assert cli_main(argv) == 2, argv
        assert needle in _err(capsys), argv
    assert not out.exists()


def test_a_sweep_never_writes_among_other_files_nor_resumes_on_another_input(sphere, tmp_path, capsys):
    """--out a folder of other files (a user's, a batch's) is refused before anything is written; a sweep
    resumed after its mesh changed is refused (its points would mix two inputs in one table)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.csv").write_text("my precious data")
    args = ["--methods", "draco-input:8", "--threads", "1", "--quiet"]
    assert cli_main(["sweep", str(sphere), "--out", str(mine), *args]) == 2
    assert "already holds other files (results.csv) and no earlier vqad sweep" in _err(capsys)
    assert (mine / "results.csv").read_text() == "my precious data"
    mesh = tmp_path / "m.obj"
    mesh.write_bytes(sphere.read_bytes())
    out = tmp_path / "o"
    assert cli_main(["sweep", str(mesh), "--out", str(out), *args]) == 0
    capsys.readouterr()
    import trimesh

    trimesh.creation.box(extents=(0.8, 0.5, 0.6)).export(mesh)
    assert cli_main(["sweep", str(mesh), "--out", str(out), "--methods", "draco-input:10", "--threads", "1"]) == 2
    assert f"holds a sweep made with other settings (its input changed since the sweep began: a file of {mesh}" \
        in _err(capsys)


def test_a_capture_given_by_its_transforms_json_is_stamped_whole(tmp_path):
    """A radiance-field sweep of CAPTURE/transforms.json stamps the capture folder (it stamped the json alone, so
    a sweep resumed after the photos changed mixed two captures in one table)."""
    import os

    cap = tmp_path / "cap"
    assert cli_main(["synth-capture", "-o", str(cap), "--size", "8x8", "--views", "3", "--supersample", "1",
                     "--threads", "1"]) == 0
    args = build_parser().parse_args(["sweep", str(cap / "transforms.json"), "--out", str(tmp_path / "o"),
                                      "--methods", "dense", "--steps", "2"])
    before = sweep_config(args).resolved().settings()["input"]
    # a sweep recorded when the json alone was stamped resumes (its stamp re-recorded whole)
    from vqad.app.outputs import input_stamp

    S.Sweep(sweep_config(args))._prepare_out()
    manifest = tmp_path / "o" / "sweep.json"
    doc = json.loads(manifest.read_text())
    doc["settings"]["input"] = input_stamp(str(cap / "transforms.json"))
    manifest.write_text(json.dumps(doc))
    S.Sweep(sweep_config(args))
    assert json.loads(manifest.read_text())["settings"]["input"] == before
    photo = next(p for p in sorted(cap.rglob("*.png")))
    os.utime(photo, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns + 10**9))
    assert sweep_config(args).resolved().settings()["input"] != before
    with pytest.raises(InputError, match=f"its input changed since the sweep began: a file of {cap}"):
        S.Sweep(sweep_config(args))


def test_a_resumed_point_keeps_its_cap_and_its_schedule(sphere, tmp_path):
    """A sweep's --minutes caps each point, across an interrupt too (a resumed point got its whole cap again),
    and a time-capped fit resumed goes on with its learning-rate schedule (it restarted from the top)."""
    assert S.minutes_left(None, 30.0) is None and S.minutes_left(1.0, 30.0) == pytest.approx(0.5)
    assert S.minutes_left(0.25, 60.0) == S.MIN_CAP_MINUTES  # spent: the fit stops at once
    assert trainer.progress_or_stop(10, 10_000, 0.0, 100.0, resumed_at=0.6) == pytest.approx(0.6)
    assert trainer.progress_or_stop(10, 10_000, 50.0, 100.0, resumed_at=0.6) == pytest.approx(0.8)
    assert trainer.progress_or_stop(10, 10_000, 100.0, 100.0, resumed_at=0.6) is None
    capped = {"steps": 100, "max_minutes": 2.0}
    assert trainer.resumed_progress({"progress": 0.4, "train": capped}, 100) == 0.4
    assert trainer.resumed_progress({"progress": 0.4, "train": capped}, 200) == 0.0  # other steps: another schedule
    assert trainer.resumed_progress({"progress": 0.4, "train": {**capped, "max_minutes": None}}, 100) == 0.0
    assert trainer.resumed_progress({"progress": "x", "train": capped}, 100) == trainer.resumed_progress(None, 1) == 0.0


def test_a_point_another_process_is_making_is_left_to_it(sphere, tmp_path):
    """Two sweeps on one OUT: a point the other process holds (it is fitting it) is skipped, not fitted twice
    into the same checkpoint; results.md says it is not finished."""
    import fcntl
    import os

    out = tmp_path / "rd"
    logs = []
    sweep = S.Sweep(_config(sphere, out, ["draco-input:8", "hash:8"]),
                    log=lambda *a, **k: logs.append(" ".join(map(str, a))))
    (out / "work" / "hash-T8").mkdir(parents=True)
    fd = os.open(out / "work" / "hash-T8", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the other process, fitting hash:8
        sweep.run()
    finally:
        os.close(fd)
    assert any("T = 8: another process sharing" in line and "skipped" in line for line in logs)
    assert not (out / "points" / "hash-T8.json").exists() and (out / "points" / "draco-input-q8.json").exists()
    assert "**Incomplete:** 1 point of this sweep is not finished" in (out / "results.md").read_text()
    # a point made from one the other process holds waits for it; that process stopping unfinished: skipped
    import threading

    out2, logs = tmp_path / "rd2", []
    sweep = S.Sweep(_config(sphere, out2, ["dense", "kmeans:4"]), log=lambda *a, **k: logs.append(" ".join(map(str, a))))
    (out2 / "work" / "dense").mkdir(parents=True)
    fd = os.open(out2 / "work" / "dense", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    threading.Timer(1.0, os.close, (fd,)).start()  # the other process stops without finishing dense
    sweep.run()
    assert any("waiting for another process to finish dense" in line for line in logs)
    assert any("b = 4: skipped: dense fp16" in line and "is not finished" in line for line in logs), logs
    assert not list((out2 / "points").glob("*.json"))


# -- bench-rd's target checks, on hand-made rows --------------------------------------------------------
def _bench():
    spec = importlib.util.spec_from_file_location("bench_rd", REPO / "benchmarks" / "bench_rd.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _r(method, setting, nbytes, **q):
    return {"method": method, "setting": setting, "bytes": nbytes, "lod": None, **q}


def test_bench_rd_target_checks():
    B = _bench()
    lego = [_r("codebook", 4, 100_000, psnr=29.0), _r("kmeans", 4, 99_000, psnr=25.5), _r("codebook", 6, 150_000, psnr=29.5),
            _r("codebook", 8, 250_000, psnr=29.4), _r("hash", 12, 150_000, psnr=27.0), _r("hash", 10, 100_000, psnr=30.0)]
    ok, text = B.check_kmeans_margin(lego)
    assert ok and "+3.50 dB" in text
    ok, text = B.check_beats_hash(lego)  # pairs: (b4, T12), (b4, T10), (b6, T12); b=8 has no larger hash point
    assert not ok and "2 of 3" in text and "lost: b=4" in text and "T=10" in text
    ok, _ = B.check_8_vs_6(lego)
    assert ok is False
    assert B.check_kmeans_margin([])[0] is None
    arm = [_r("draco-input", 8, 50_000, chamfer_l1=0.004), _r("draco-input", 12, 200_000, chamfer_l1=0.0001),
           _r("codebook", 4, 100_000, chamfer_l1=0.003), _r("codebook", 1, 20_000, chamfer_l1=0.01),
           _r("codebook", 6, 150_000, chamfer_l1=0.0029), _r("codebook", 8, 300_000, chamfer_l1=0.0028)]
    # Draco at 100 kB, linear in log(bytes): 0.004 + 0.5 (0.0001 - 0.004) = 0.00205 < 0.003
    assert B.interp_log_bytes(B.points(arm, "draco-input"), 100_000, "chamfer_l1") == pytest.approx(0.00205)
    ok, lines = B.check_draco(arm)
    assert ok is False and "0.00205" in lines[0]
    assert any("b=1 (not measured)" in ln and "below Draco's smallest" in ln for ln in lines)
    assert any("b=8 (**missed**)" in ln and "larger and worse" in ln for ln in lines)
    assert B.check_8_vs_6(arm)[0] is True
    mem = [dict(_r("codebook", 8, 1, psnr=1.0), peak_memory_bytes=3 * 2**30, vertices=1_000_000)]
    ok, text = B.check_memory(mem)
    assert ok and "0.95 GiB" in text  # naive C: 4 bytes × 10^6 × 2^8
    summary = B.targets({"lego": lego, "armadillo": arm})
    assert sum("| met |" in s or "**missed**" in s for s in summary) >= 5
    # rd.md says which points were refined (rows without a refine column: the fit's default)
    text = B.refinement_text({"lego": lego, "armadillo": arm + [dict(_r("codebook-norefine", 4, 100_000, chamfer_l1=0.005))]})
    assert "lego's VQ-AD points have no index refinement" in text
    assert f"armadillo's VQ-AD points have {S.default_refine('sdf')} Gauss–Newton index-refinement sweeps" in text
    assert "no index refinement* points are the same fits" in text and "baseline on armadillo compares refined" in text
    text = B.refinement_text({"lego": lego + [dict(_r("codebook-rate", 6, 90_000, psnr=29.1), rate_weight=1e-3)]})
    assert "*VQ-AD + rate term* points (`codebook-rate`, one series per b, λ in the CSV) have none" in text
    text = B.refinement_text({"armadillo": arm + [dict(_r("codebook-rate", 6, 90_000, chamfer_l1=0.002), rate_weight=3e-7,
                                                       refine=3)]})
    assert "*VQ-AD + rate term* points (`codebook-rate`, one series per b, λ in the CSV) have 3 (rate-aware" in text


def test_bench_rd_rate_targets():
    """Issue 20's targets: the rate-aware series (λ = 0 end: codebook:b) interpolated in log(bytes) at plain 4-bit's bytes; b = 6's cheap points."""
    B = _bench()

    def rate(b, nbytes, lam, **q):
        return dict(_r("codebook-rate", b, nbytes, **q), rate_weight=lam)

    lego = [dict(_r("codebook", 4, 100_000, psnr=26.0), coded_index_bits=3.99),
            dict(_r("codebook", 6, 150_000, psnr=27.0), coded_index_bits=5.98),
            rate(6, 120_000, 1e-4, psnr=26.8, coded_index_bits=4.6), rate(6, 80_000, 1e-3, psnr=26.2, coded_index_bits=3.1)]
    ok, lines = B.check_rate_at_plain_bytes(lego)
    # b = 6 at 100 kB: between 80 kB (26.2) and 120 kB (26.8), t = log(100/80) / log(120/80) = 0.5503
    t = math.log(100 / 80) / math.log(120 / 80)
    assert ok is False and f"{26.2 + t * 0.6:.2f} dB ({26.2 + t * 0.6 - 26.0:+.2f})" in lines[1]
    assert "wanted there: ≥ 27.00 dB" in lines[0]
    lego.append(rate(6, 95_000, 3e-4, psnr=27.5, coded_index_bits=3.7))
    ok, lines = B.check_rate_at_plain_bytes(lego)
    assert ok is True and "b=6 (met)" in lines[1]
    ok, text = B.check_rate_b6(lego)  # cheap (≤ 4.2 bits): λ = 1e-3 (26.2) and 3e-4 (27.5): 0.5 dB better than λ = 0
    assert ok is True and "λ = 0.0003" in text and "-0.50 dB below" in text
    ok, text = B.check_rate_b6([r for r in lego if r.get("rate_weight") in (None, 1e-4)])
    assert ok is False and "no b=6 point at ≤ 4.2 bits/index" in text
    assert B.check_rate_b6(lego[:1])[0] is None and B.check_rate_at_plain_bytes(lego[:2])[0] is None
    # a series whose bytes all lie below plain 4-bit's: not measured, said why
    ok, lines = B.check_rate_at_plain_bytes([lego[0], rate(8, 60_000, 1e-3, psnr=25.0), rate(8, 70_000, 1e-4, psnr=25.5)])
    assert ok is None and "is above its points' range" in lines[1]
    # a mesh: the λ = 0 end is the refined fit too, and the target is a Chamfer ratio
    arm = [_r("codebook", 4, 100_000, chamfer_l1=0.0010), _r("codebook-norefine", 6, 150_000, chamfer_l1=0.0002),
           _r("codebook", 6, 150_000, chamfer_l1=0.0009), rate(6, 90_000, 1e-3, chamfer_l1=0.00085)]
    assert [r["method"] for r in B.rate_series(arm, 6)] == ["codebook-rate", "codebook"]
    ok, lines = B.check_rate_at_plain_bytes(arm)
    assert ok is False and "Chamfer ≤ 0.00080 (×0.8)" in lines[0] and "(×0." in lines[1]
    summary = "\n".join(B.targets({"lego": lego, "armadillo": arm}))
    assert "≥ 1 dB better than plain 4-bit" in summary and "≥ 20 % lower Chamfer-L1" in summary
    assert "coded indices ≤ 0.7·b bits" in summary


def test_threads_is_the_process_setting_not_a_sweep_option(sphere, tmp_path):
    """Every command takes --threads (vqad.app.cli); the sweep must not read it as one of its settings
    (it once refused `vqad sweep ... --threads 1` as an unknown sweep option)."""
    from vqad.app.cli import build_parser
    from vqad.app.commands.sweep import sweep_config

    args = build_parser().parse_args(["sweep", str(sphere), "--out", str(tmp_path / "o"), "--threads", "1",
                                      "--methods", "codebook:2", "--steps", "5"])
    assert args.threads == "1"
    cfg = sweep_config(args)
    assert cfg.steps == 5 and not hasattr(cfg, "threads")
    # a config file's threads (the help: a config holds the options by their long names) sets the process's,
    # unless the flag is given too
    import torch

    conf = tmp_path / "c.toml"
    conf.write_text(f"dataset = {json.dumps(str(sphere))}\nout = {json.dumps(str(tmp_path / 'o'))}\nthreads = 1\n")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        cfg = sweep_config(build_parser().parse_args(["sweep", "--config", str(conf)]))
        assert torch.get_num_threads() == 1 and not hasattr(cfg, "threads")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("change", [
    {"method": "zzz"}, {"method": 5}, {"bytes": 0}, {"bytes": "abc"}, {"bytes": -5}, {"bytes": float("nan")},
    {"grid_bytes": "12"}, {"dense_fp16_grid_bytes": None}, {"chamfer_l1": "0.1"}, {"rate_weight": "x"},
    {"lod": "3"}, {"note": 5}, {"setting": [1]},
])
def test_a_point_record_whose_rows_are_not_numbers_is_damaged(tmp_path, change):
    """A second fuzz pass: rows with a string, 0 or NaN for a number (or another method) passed read_point and
    made collect_rows, the table or the plot fail with a traceback; such a record is now damaged (set aside and
    the point redone, as a record that is not JSON)."""
    row = {"point": "dense", "method": "dense", "param": "", "setting": None, "rate_weight": None, "lod": 3,
           "chamfer_l1": 0.4, "normal_consistency": 0.5, "iou": 0.4, "bytes": 7665, "grid_bytes": 6824,
           "dense_fp16_grid_bytes": 6824.0, "file": "points/dense.vqad", "note": None, "ssim": -0.01,
           "psnr": float("nan")}  # (a metric not measured is NaN: a Draco mesh's IoU)
    rec = {"point": "dense", "method": "dense", "setting": None, "rate_weight": None,
           "finished_at": "2026-12-07T17:25:09+00:00", "rows": [row]}
    path = tmp_path / "dense.json"
    path.write_text(json.dumps(rec))
    assert S.read_point(path) is not None
    path.write_text(json.dumps({**rec, "rows": [{**row, **change}]}))
    assert S.read_point(path) is None
    del row["lod"]
    path.write_text(json.dumps(rec))
    assert S.read_point(path) is None


def test_draco_points_without_dracopy_are_refused_before_any_fit(sphere, tmp_path, monkeypatch):
    """The draco-* points imported DracoPy at their turn: a missing one was a ModuleNotFoundError after the fits
    before them had run (found following the README with only its view extra)."""
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "DracoPy" else real_find(name, *a))
    with pytest.raises(InputError, match="the draco-input points need DracoPy: pip install 'vqad\\[bench\\]'"):
        S.Sweep(_config(sphere, tmp_path / "out", ["dense", "draco-input:8"]))
    assert not (tmp_path / "out").exists()
    S.Sweep(_config(sphere, tmp_path / "out2", ["dense"]))  # no draco point: DracoPy not needed
