"""Every fit flag acts or is refused with a one-line reason; defaults live once, in the configs;
--resume takes the checkpoint's settings and refuses flags that contradict them; metrics.json
records the configuration that actually ran."""

import json
from dataclasses import asdict

import pytest
import torch
import trimesh

from vqad.app.cli import build_parser, main
from vqad.config import DecoderConfig, GridConfig
from vqad.errors import InputError
from vqad.fit import LR_FLOOR, LR_FLOOR_DISCRETE
from vqad.nerf.fit import NERF_DECODER, NERF_GRID
from vqad.nerf.task import NeRFTrainConfig
from vqad.sdf.fit import SDF_LR, SDF_LR_DISCRETE, SDFTrainConfig
from vqad.tsdf.fit import TSDFTrainConfig


@pytest.fixture
def mesh(tmp_path):
    p = tmp_path / "sphere.obj"
    trimesh.creation.icosphere(subdivisions=2, radius=0.5).export(p)
    return p


def _err(capsys) -> str:
    return capsys.readouterr().err


TINY = ["--levels", "2:3", "--features", "4", "--batch", "512", "--hidden", "16", "--no-eval", "--quiet",
        "--device", "cpu"]


@pytest.mark.parametrize("args, message", [
    (["--grid", "dense", "--bits", "6"], "--bits does not apply to --grid dense"),
    (["--grid", "codebook", "--table-bits", "10"], "--table-bits does not apply to --grid codebook"),
    (["--grid", "dense", "--refine", "2"], "--refine applies to grids with discrete indices"),
    (["--grid", "hash", "--refine-samples", "1000"], "--refine-samples applies to grids with discrete indices"),
    (["--grid", "dense", "--logit-lr-scale", "100"], "--logit-lr-scale applies to grids with discrete indices"),
    (["--refine", "0", "--refine-samples", "5000"], "--refine-samples sizes the index-refinement sweeps after training, "
                                                    "which --refine 0 turns off: give --refine N"),
    (["--refine", "0", "--refine-samples", "5000", "--refine-candidates", "3"],
     "--refine-samples and --refine-candidates size the index-refinement sweeps"),
])
def test_fit_sdf_refuses_flags_that_cannot_apply(tmp_path, capsys, mesh, args, message):
    out = tmp_path / "run"
    assert main(["fit-sdf", str(mesh), "--steps", "2", "--out", str(out)] + TINY + args) == 2
    err = _err(capsys)
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--grid", "dense", "--bits", "6"], "--bits does not apply to --grid dense"),
    (["--grid", "dense", "--refine", "1"], "--refine applies to grids with discrete indices"),
    (["--grid", "hash", "--codebook-lr-scale", "100"], "--codebook-lr-scale applies to grids with discrete indices"),
    (["--octree-from", "x", "--dilate", "2"], "--octree-from reuses an earlier fit's octree"),
    (["--octree", "depth", "--density-steps", "5"], "--density-steps / --density-minutes bound the density pass"),
    (["--density-steps", "5"], "this capture's octree comes from its depth maps"),
    (["--refine-rays", "100"], "--refine-rays sizes the index-refinement sweeps after training, which --refine 0 "
                               "(the default here) turns off: give --refine N"),
])
def test_fit_nerf_refuses_flags_that_cannot_apply(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["fit-nerf", "procedural", "--steps", "2", "--out", str(out), "--device", "cpu"] + args) == 2
    assert message in _err(capsys)
    assert not (out / "checkpoint").exists()


@pytest.mark.parametrize("cls, setting, value", [
    (SDFTrainConfig, "refine", 5), (SDFTrainConfig, "rate_weight", 0.1), (SDFTrainConfig, "refine_during", 4),
    (SDFTrainConfig, "logit_lr_scale", 50.0), (NeRFTrainConfig, "refine", 2), (NeRFTrainConfig, "codebook_lr_scale", 3.0),
    (TSDFTrainConfig, "refine", 1),
])
def test_the_python_api_refuses_index_settings_for_a_grid_without_indices(tmp_path, mesh, cls, setting, value):
    """What the command line refuses as a flag (--refine with --grid dense) the Python configs refuse as a value,
    before any work; their defaults and "off" stay accepted, so ``fit_sdf(mesh, GridConfig(storage="dense"),
    DecoderConfig(), SDFTrainConfig())`` works as it is."""
    for storage in ("dense", "hash", "lowrank"):
        with pytest.raises(InputError, match=f"{setting}={value!r} acts on discrete indices.*{storage!r} grid has none"):
            cls(**{setting: value}).resolved(GridConfig(storage=storage))
        cls(**{setting: 0}).resolved(GridConfig(storage=storage))
        cls().resolved(GridConfig(storage=storage))
        size = "refine_rays" if cls is NeRFTrainConfig else "refine_samples"
        cls(refine=0, **{size: 5000}).resolved(GridConfig(storage=storage))  # the size of what is off: inert
    assert getattr(cls(**{setting: value}).resolved(GridConfig(storage="codebook")), setting) == value
    if cls is SDFTrainConfig:  # the fit call itself refuses it before building anything
        from vqad.sdf.fit import fit_sdf
        from vqad.sdf.mesh import load_mesh

        with pytest.raises(InputError, match="acts on discrete indices"):
            fit_sdf(load_mesh(mesh), GridConfig(storage="dense", base_level=2, max_level=3), DecoderConfig(),
                    cls(steps=2, **{setting: value}), "cpu", out_dir=tmp_path / "fit")
        assert not (tmp_path / "fit").exists()


def test_every_index_setting_with_a_flag_is_refused_by_the_command_line_too():
    """What the configs refuse without discrete indices, the command line refuses as a flag."""
    from vqad.app.commands import nerf as nerf_cmd, sdf as sdf_cmd, tsdf as tsdf_cmd

    assert set(SDFTrainConfig.INDEX_SETTINGS) & set(sdf_cmd.SDF_TRAIN_FLAGS) <= set(sdf_cmd.INDEX_FLAGS)
    assert set(NeRFTrainConfig.INDEX_SETTINGS) & set(nerf_cmd.NERF_TRAIN_FLAGS) <= set(nerf_cmd.INDEX_FLAGS)
    # fit-tsdf checks its flags with fit-sdf's list
    assert set(TSDFTrainConfig.INDEX_SETTINGS) & set(tsdf_cmd.TSDF_TRAIN_FLAGS) <= set(sdf_cmd.INDEX_FLAGS)


def test_cli_defaults_are_the_configs_defaults():
    """The help shows, and an unset flag means, the dataclass default: nothing is typed twice."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    sdf_help = sub["fit-sdf"].format_help()
    assert f"(default: {SDFTrainConfig.steps})" in sdf_help and f"(default: {SDFTrainConfig.refine})" in sdf_help
    assert f"(default: {GridConfig.features})" in sdf_help
    nerf_help = sub["fit-nerf"].format_help()
    assert f"(default: {NeRFTrainConfig.batch_rays})" in nerf_help and f"(default: {NERF_GRID.features})" in nerf_help
    assert f"(default: {NERF_DECODER.hidden})" in nerf_help
    # the Python API and the CLI train a codebook SDF with the same decoder learning rate
    assert SDFTrainConfig().resolved(GridConfig(storage="codebook")).lr == SDF_LR_DISCRETE
    assert SDFTrainConfig().resolved(GridConfig(storage="dense")).lr == SDF_LR
    assert SDFTrainConfig(lr=1e-3).resolved(GridConfig(storage="codebook")).lr == 1e-3
    # and the same learning-rate floor, chosen by the grid's kind unless given
    for cls in (SDFTrainConfig, NeRFTrainConfig):
        assert cls().resolved(GridConfig(storage="codebook")).lr_floor == LR_FLOOR_DISCRETE
        assert cls().resolved(GridConfig(storage="dense")).lr_floor == LR_FLOOR
        assert cls(lr_floor=0.5).resolved(GridConfig(storage="codebook")).lr_floor == 0.5
    assert LR_FLOOR_DISCRETE < LR_FLOOR


def test_metrics_record_what_ran_and_resume_refuses_contradictions(tmp_path, capsys, mesh):
    out = tmp_path / "run"
    assert main(["fit-sdf", str(mesh), "--steps", "4", "--refine", "0", "--out", str(out)] + TINY) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["train"]["lr"] == SDF_LR_DISCRETE and m["train"]["refine"] == 0 and m["train"]["steps"] == 4
    first_seconds = m["fit_seconds"]
    assert "fit_seconds_this_run" not in m  # a fresh fit's time is all this run's
    assert m["grid"]["features"] == 4 and m["grid"]["max_level"] == 3 and m["decoder"]["hidden"] == 16
    capsys.readouterr()
    # contradicting flags are refused, naming the setting
    for args, what in [(["--features", "8"], "features"), (["--hidden", "32"], "hidden"),
                       (["--lr", "1e-2"], "lr"), (["--grid", "dense"], "storage")]:
        assert main(["fit-sdf", str(mesh), "--steps", "6", "--out", str(out), "--resume", "--quiet", "--no-eval"]
                    + args) == 2, args
        err = _err(capsys)
        assert "--resume" in err and what in err, (args, err)
    # no flags at all: the checkpoint's settings (not the CLI defaults: k = 16, levels 3:7) continue
    assert main(["fit-sdf", str(mesh), "--steps", "6", "--out", str(out), "--resume", "--quiet", "--no-eval"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 6 and m["grid"]["features"] == 4 and m["grid"]["max_level"] == 3
    # the fit's time is the whole fit's, across the resume; the resumed call's own is beside it
    assert m["fit_seconds"] == pytest.approx(first_seconds + m["fit_seconds_this_run"], abs=0.5)  # (less the last save)
    assert "s in all)" in capsys.readouterr().out
    assert m["decoder"]["hidden"] == 16 and m["train"]["steps"] == 6 and m["train"]["refine"] == 0


def test_a_checkpoint_from_before_lr_floor_resumes_with_the_floor_it_was_trained_with(tmp_path, capsys, mesh):
    """Checkpoints written before ``lr_floor`` existed were trained to 0.1 × the rate: resuming one keeps
    that schedule (not today's default) and refuses a contradicting --lr-floor."""
    out = tmp_path / "run"
    assert main(["fit-sdf", str(mesh), "--steps", "4", "--refine", "0", "--out", str(out)] + TINY) == 0
    cfg_path = out / "checkpoint" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["train"]["lr_floor"] == LR_FLOOR_DISCRETE != 0.1  # TINY's grid: the default codebook
    del cfg["train"]["lr_floor"]
    cfg_path.write_text(json.dumps(cfg))
    capsys.readouterr()
    assert main(["fit-sdf", str(mesh), "--steps", "6", "--out", str(out), "--resume", "--quiet", "--no-eval",
                 "--lr-floor", "0.01"]) == 2
    assert "lr_floor: checkpoint 0.1, now 0.01" in _err(capsys)
    assert main(["fit-sdf", str(mesh), "--steps", "6", "--out", str(out), "--resume", "--quiet", "--no-eval"]) == 0
    assert json.loads((out / "metrics.json").read_text())["train"]["lr_floor"] == 0.1


def test_load_checks_the_lod_of_a_checkpoint(tmp_path, mesh):
    import vqad

    out = tmp_path / "run"
    assert main(["fit-sdf", str(mesh), "--steps", "2", "--refine", "0", "--out", str(out)] + TINY) == 0
    field = vqad.load(out / "checkpoint", lod=3)
    assert field.lods == [2, 3]
    with pytest.raises(InputError, match="LOD 7 is not in this model"):
        vqad.load(out / "checkpoint", lod=7)
    # vqad render: a radiance field's flags do not apply to an SDF model
    assert main(["render", str(out / "checkpoint"), "--views", "val", "-o", str(tmp_path / "r.png")]) == 2
    assert not (tmp_path / "r.png").exists()


def test_evaluation_flags_are_refused_without_evaluation(tmp_path, capsys, mesh):
    assert main(["fit-sdf", str(mesh), "--out", str(tmp_path / "a"), "--mc-resolution", "64"] + TINY) == 2
    assert "--mc-resolution" in _err(capsys)
    assert main(["fit-nerf", "procedural", "--out", str(tmp_path / "b"), "--no-eval", "--eval-views", "val"]) == 2
    assert "--eval-views" in _err(capsys)


def test_resume_refuses_another_configuration_in_python(tmp_path, mesh):
    from vqad.sdf.fit import fit_sdf
    from vqad.sdf.mesh import load_mesh

    m = load_mesh(mesh)
    grid = GridConfig(storage="codebook", features=4, bits=2, base_level=2, max_level=3)
    train = SDFTrainConfig(steps=3, batch=256, pool_size=4000, refine=0)
    fit_sdf(m, grid, DecoderConfig(hidden=8), train, torch.device("cpu"), out_dir=tmp_path, quiet=True)
    with pytest.raises(InputError, match="other grid settings"):
        fit_sdf(m, GridConfig(**{**asdict(grid), "bits": 3}), DecoderConfig(hidden=8), train, torch.device("cpu"),
                out_dir=tmp_path, resume=True, quiet=True)
    with pytest.raises(InputError, match="other training settings"):
        fit_sdf(m, grid, DecoderConfig(hidden=8), SDFTrainConfig(**{**asdict(train), "batch": 128}),
                torch.device("cpu"), out_dir=tmp_path, resume=True, quiet=True)
    res = fit_sdf(m, grid, DecoderConfig(hidden=8), SDFTrainConfig(**{**asdict(train), "steps": 5}),
                  torch.device("cpu"), out_dir=tmp_path, resume=True, quiet=True)
    assert res.steps == 5 and res.steps_done == 2


def test_fit_nerf_resume_keeps_the_checkpoints_field_and_octree(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["fit-nerf", "procedural", "--out", str(out), "--device", "cpu", "--no-eval", "--quiet"]
    assert main(base + ["--steps", "3", "--levels", "2:4", "--features", "4", "--hidden", "16",
                        "--batch-rays", "256"]) == 0
    capsys.readouterr()
    assert json.loads((out / "metrics.json").read_text())["train"]["early_stop_eps"] == 0.0  # auto: a bounded scene
    for args, message in [(["--step-ratio", "2"], "--step-ratio cannot apply"),
                          (["--octree", "mask"], "--octree cannot apply"),
                          (["--batch-rays", "512"], "batch_rays: checkpoint 256, now 512"),
                          (["--early-stop-eps", "1e-4"], "early_stop_eps: checkpoint 0.0, now 0.0001")]:
        assert main(base + ["--resume", "--steps", "5"] + args) == 2, args
        assert message in _err(capsys)
    assert main(base + ["--resume", "--steps", "5"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 5 and m["grid"]["features"] == 4 and m["grid"]["max_level"] == 4
    assert m["decoder"]["hidden"] == 16 and m["train"]["batch_rays"] == 256
    # the early-stop threshold's 'auto' continues with what the checkpoint resolved it to, whatever the scene
    cfg_path = out / "checkpoint" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["train"]["early_stop_eps"] = 1e-3
    cfg_path.write_text(json.dumps(cfg))
    assert main(base + ["--resume", "--steps", "6"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 6 and m["train"]["early_stop_eps"] == 1e-3 and m["rays_per_second"] > 0
    # a resume with no step left measures no throughput: none is recorded (it read 0 rays/s)
    assert main(base + ["--resume", "--steps", "6"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 6 and m["rays_per_second"] is None and m["samples_per_ray"] is None
    assert m["fit_seconds"] > m["fit_seconds_this_run"] >= 0


def test_threads_flag_and_environment(monkeypatch, capsys):
    """--threads wins over $VQAD_THREADS, which wins over $OMP_NUM_THREADS; bad values exit 2 on one line."""
    from vqad.app.cli import main
    from vqad.device import available_cores, resolve_threads

    monkeypatch.delenv("VQAD_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert resolve_threads() == available_cores() >= 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3,1")
    assert resolve_threads() == 3
    monkeypatch.setenv("VQAD_THREADS", "1")
    assert resolve_threads() == 1 and resolve_threads("2") == 2
    for bad in ["0", "-1", "1.5", "two"]:
        assert main(["info", "--threads", bad, "nothing.vqad"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--threads must be a positive whole number" in err[0]
    monkeypatch.setenv("VQAD_THREADS", "zero")
    assert main(["info", "nothing.vqad"]) == 2
    assert "$VQAD_THREADS" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--hidden", "0"], "--hidden (decoder width) must be an integer in 1..4096"),
    (["--layers", "-1"], "--layers (decoder hidden layers) must be an integer in 0..16"),
    (["--layers", "17"], "--layers (decoder hidden layers) must be an integer in 0..16"),
    (["--lr", "-1"], "learning rates must be positive"),
    (["--lr", "nan"], "learning rates must be positive"),
    (["--lr", "inf"], "learning rates must be positive finite numbers"),
    (["--grid-lr-scale", "1e400"], "learning rates must be positive finite numbers"),
    (["--lr-floor", "0"], "--lr-floor is the final lr as a share of the initial one: 0 < floor <= 1"),
    (["--lr-floor", "1.5"], "--lr-floor is the final lr as a share of the initial one: 0 < floor <= 1"),
    (["--lr-floor", "nan"], "--lr-floor is the final lr as a share of the initial one: 0 < floor <= 1"),
    (["--minutes", "inf"], "--minutes must be a positive finite number"),
    (["--minutes", "nan"], "--minutes must be a positive finite number"),
    (["--truncation", "nan"], "--truncation must be a finite distance >= 0"),
    (["--truncation", "inf"], "--truncation must be a finite distance >= 0"),
    (["--seed", "-1"], "--seed must be an integer in 0..2^63-1"),
    (["--mc-resolution", "1"], "--mc-resolution must be an integer in 8..2048"),
    (["--mc-resolution", "-5"], "--mc-resolution must be an integer in 8..2048"),
])
def test_fit_sdf_bad_values_exit_2_before_anything_is_written(tmp_path, capsys, mesh, args, message):
    out = tmp_path / "run"
    tiny = [a for a in TINY if a != "--no-eval"]
    assert main(["fit-sdf", str(mesh), "--steps", "2", "--out", str(out)] + tiny + args) == 2
    err = _err(capsys)
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    m = d / "sphere.obj"
    trimesh.creation.icosphere(subdivisions=2, radius=0.5).export(m)
    assert main(["fit-sdf", str(m), "--steps", "2", "--refine", "0", "--out", str(d / "run")] + TINY) == 0
    return d / "run" / "checkpoint"


@pytest.mark.parametrize("command, args, message", [
    ("mesh", ["--resolution", "0"], "--resolution must be an integer in 8..2048"),
    ("mesh", ["--resolution", "-5"], "--resolution must be an integer in 8..2048"),
    ("mesh", ["-o", "{tmp}/x.banana"], "unsupported file type '.banana'"),
    ("mesh", ["-o", "/proc/x.ply"], "/proc"),  # root may pass access() there: creating a file is tried
    ("render", ["--size", "0"], "--size must be 1..8192 pixels"),
    ("render", ["--size", "-3"], "--size must be 1..8192 pixels"),
    ("render", ["--azimuth", "nan"], "--azimuth must be a finite number"),
    ("render", ["--elevation", "inf"], "--elevation must be a finite number"),
    ("render", ["-o", "{tmp}/x.banana"], "unsupported file type '.banana'"),
])
def test_mesh_and_render_bad_values_exit_2_with_one_line(tmp_path, capsys, tiny_checkpoint, command, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / ("out.ply" if command == "mesh" else "out.png"))]
    assert main([command, str(tiny_checkpoint)] + args) == 2
    err = _err(capsys)
    assert message in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("text, want", [
    ("500", {"checkpoint_every": 500, "checkpoint_minutes": None}),
    ("2m", {"checkpoint_minutes": 2.0}),
    ("90s", {"checkpoint_minutes": 1.5}),
    (None, {}),
])
def test_checkpoint_every_forms(text, want):
    from types import SimpleNamespace

    from vqad.app.commands.common import checkpoint_overrides

    assert checkpoint_overrides(SimpleNamespace(checkpoint_every=text)) == want


@pytest.mark.parametrize("bad", ["0", "-3", "x", "0m", "nanm", "infs", "1.5"])
def test_checkpoint_every_bad_values_exit_2(tmp_path, capsys, mesh, bad):
    out = tmp_path / "run"
    assert main(["fit-sdf", str(mesh), "--steps", "2", "--out", str(out), "--checkpoint-every", bad] + TINY) == 2
    err = _err(capsys)
    assert "--checkpoint-every takes a positive number" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_time_cadence_checkpoints_and_ctrl_c_in_the_sweeps_saves(tmp_path, capsys, mesh, monkeypatch):
    """A time cadence writes checkpoints between the step cadence's; Ctrl-C during the index sweeps after
    training saves a checkpoint holding every step, and --resume then finds nothing left to train."""
    import vqad.checkpoint
    import vqad.sdf.fit

    saves = []
    real_save = vqad.checkpoint.save_checkpoint
    monkeypatch.setattr(vqad.checkpoint, "save_checkpoint",
                        lambda path, field, extra=None, **kw: saves.append(extra["step"]) or
                        real_save(path, field, extra=extra, **kw))
    out = tmp_path / "run"
    assert main(["fit-sdf", str(mesh), "--steps", "4", "--refine", "0", "--out", str(out),
                 "--checkpoint-every", "0.0001s"] + TINY) == 0
    assert saves == [1, 2, 3, 4]  # after every step (time due), then the final save
    saves.clear()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(vqad.sdf.fit, "refine_sdf", interrupted)
    out2 = tmp_path / "run2"
    assert main(["fit-sdf", str(mesh), "--steps", "3", "--refine", "1", "--out", str(out2)] + TINY) == 130
    assert saves == [3]
    assert vqad.checkpoint.read_config(out2 / "checkpoint")["step"] == 3


def test_a_closed_output_pipe_during_training_saves_the_checkpoint(tmp_path, capsys, mesh, monkeypatch):
    """stdout's reader going away (``| head``) mid-fit raises BrokenPipeError where the fit prints: the loop
    saves the steps done, as on Ctrl-C, says so on stderr, and lets the error go on to the CLI's handler."""
    import vqad.fit
    import vqad.sdf.fit

    real_step = vqad.sdf.fit.SDFTask.step

    def step(self, it, progress, gen):
        if it == 2:
            raise BrokenPipeError(32, "Broken pipe")
        return real_step(self, it, progress, gen)

    monkeypatch.setattr(vqad.sdf.fit.SDFTask, "step", step)
    monkeypatch.setattr(vqad.fit, "stdout_reader_gone", lambda: True)  # as under | head (here stdout is captured)
    out = tmp_path / "run"
    with pytest.raises(BrokenPipeError):  # stdout is captured here: not a pipe whose reader left, so not swallowed
        main(["fit-sdf", str(mesh), "--steps", "5", "--refine", "0", "--out", str(out)]
             + [a for a in TINY if a != "--quiet"])
    from vqad.checkpoint import read_config

    assert read_config(out / "checkpoint")["step"] == 2
    assert read_config(out / "checkpoint")["progress"] == pytest.approx(2 / 5)  # where the lr schedule goes on from
    assert "stdout's reader closed at step 2: checkpoint saved" in capsys.readouterr().err
    monkeypatch.setattr(vqad.sdf.fit.SDFTask, "step", real_step)
    assert main(["fit-sdf", str(mesh), "--steps", "5", "--refine", "0", "--out", str(out), "--resume", "--quiet",
                 "--no-eval"]) == 0
    assert read_config(out / "checkpoint")["step"] == 5


def test_resume_finds_the_newest_complete_checkpoint_after_a_killed_save(tmp_path, capsys, mesh):
    """A save killed between its two renames leaves only checkpoint.old (or a complete, newer
    checkpoint.tmp beside the old checkpoint): --resume puts the newest complete one back and goes on."""
    import json
    import os
    import shutil

    from vqad.checkpoint import read_config, recover_checkpoint

    out = tmp_path / "run"
    assert main(["fit-sdf", str(mesh), "--steps", "2", "--refine", "0", "--out", str(out)] + TINY) == 0
    ckpt = out / "checkpoint"
    os.replace(ckpt, out / "checkpoint.old")  # killed after the first rename
    assert main(["fit-sdf", str(mesh), "--steps", "3", "--out", str(out), "--resume", "--quiet", "--no-eval"]) == 0
    assert read_config(ckpt)["step"] == 3 and not (out / "checkpoint.old").exists()
    # killed before the renames: a complete, newer checkpoint.tmp beside the checkpoint
    shutil.copytree(ckpt, out / "checkpoint.tmp")
    cfg = json.loads((out / "checkpoint.tmp" / "config.json").read_text())
    (out / "checkpoint.tmp" / "config.json").write_text(json.dumps({**cfg, "step": 4}))
    assert recover_checkpoint(ckpt) == ckpt and read_config(ckpt)["step"] == 4
    assert not (out / "checkpoint.tmp").exists()
    # an incomplete tmp (no config.json yet) is dropped, the checkpoint kept
    (out / "checkpoint.tmp").mkdir()
    assert recover_checkpoint(ckpt) == ckpt and read_config(ckpt)["step"] == 4
    assert recover_checkpoint(tmp_path / "nothing") is None


def test_a_save_interrupted_while_writing_leaves_no_tmp_folder(tmp_path, capsys, mesh, monkeypatch):
    """Ctrl-C (or SIGTERM, or a full disk) while save_checkpoint writes its tensors removes its half-written
    CKPT.tmp/ (compress --out OUT left OUT.tmp/ beside a user's files) and keeps the checkpoint in place."""
    import vqad
    import vqad.checkpoint
    from vqad.checkpoint import read_config

    out = tmp_path / "run"
    assert main(["fit-sdf", str(mesh), "--steps", "2", "--refine", "0", "--grid", "dense", "--out", str(out)] + TINY) == 0
    real = vqad.checkpoint.save_file

    def save_file(tensors, path):
        real(tensors, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(vqad.checkpoint, "save_file", save_file)
    field = vqad.load(out / "checkpoint")
    for target in (out / "checkpoint", tmp_path / "new"):
        with pytest.raises(KeyboardInterrupt):
            vqad.checkpoint.save_checkpoint(target, field)
        assert not target.with_name(target.name + ".tmp").exists()
    assert read_config(out / "checkpoint")["step"] == 2 and not (tmp_path / "new").exists()
    assert main(["compress", str(out / "checkpoint"), "--to", "lowrank", "--rank", "2", "--out",
                 str(tmp_path / "c")]) == 130
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.tmp").exists()


# -- inputs that used to mislead: one line saying what is wrong, nothing written -------------------------
def _write_mesh(path, vertices, faces):
    trimesh.Trimesh(vertices, faces, process=False).export(path)
    return path


@pytest.mark.parametrize("name, message", [
    ("triangle", "encloses no volume"),
    ("plane", "encloses no volume"),
    ("half-sphere", "neither inside nor outside"),
    ("binary", "is it really a OBJ triangle mesh"),
])
def test_meshes_without_an_inside_are_refused(tmp_path, capsys, name, message):
    import numpy as np

    p = tmp_path / f"{name}.obj"
    if name == "triangle":
        _write_mesh(p, [[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]])
    elif name == "plane":
        _write_mesh(p, [[-1, -1, 0], [1, -1, 0], [1, 1, 0], [-1, 1, 0]], [[0, 1, 2], [0, 2, 3]])
    elif name == "half-sphere":
        s = trimesh.creation.icosphere(subdivisions=3)
        keep = s.vertices[s.faces].mean(1)[:, 2] > 0
        _write_mesh(p, s.vertices, s.faces[keep])
    else:
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    out = tmp_path / "run"
    assert main(["fit-sdf", str(p), "--steps", "2", "--out", str(out)] + TINY) == 2
    err = _err(capsys)
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_scan_with_small_holes_is_accepted(tmp_path):
    """An open mesh whose holes are small (two faces off a sphere) still has a clear inside."""
    from vqad.sdf.mesh import load_mesh

    s = trimesh.creation.icosphere(subdivisions=3)
    p = _write_mesh(tmp_path / "holes.obj", s.vertices, s.faces[2:])
    assert not trimesh.load(p, process=False).is_watertight
    assert len(load_mesh(p).faces) == len(s.faces) - 2


def test_winding_numbers_match_a_sphere():
    import numpy as np

    from vqad.sdf.mesh import winding_numbers

    s = trimesh.creation.icosphere(subdivisions=3, radius=1.0)
    pts = np.random.default_rng(0).uniform(-1.5, 1.5, (400, 3))
    r = np.linalg.norm(pts, axis=1)
    pts = pts[np.abs(r - 1) > 0.05]  # the icosphere is within 0.02 of the unit sphere
    w = winding_numbers(s.vertices, s.faces, pts)
    np.testing.assert_allclose(w, (np.linalg.norm(pts, axis=1) < 1).astype(float), atol=1e-6)
    # an inward-oriented sphere counts −1 inside; half of it, about ½ at the centre
    assert winding_numbers(s.vertices, s.faces[:, ::-1], np.zeros((1, 3)))[0] == pytest.approx(-1.0)
    top = s.faces[s.vertices[s.faces].mean(1)[:, 2] > 0]
    assert winding_numbers(s.vertices, top, np.zeros((1, 3)))[0] == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("content, message", [
    (b"hello\n", "is not a NumPy .npy file"),
    (None, "holds <U1 values, not numbers"),
])
def test_a_poses_bounds_that_is_not_an_array_is_one_line(tmp_path, capsys, content, message):
    import numpy as np

    cap = tmp_path / "llff"
    cap.mkdir()
    if content is None:
        np.save(cap / "poses_bounds.npy", np.array(["a", "b"]))
    else:
        (cap / "poses_bounds.npy").write_bytes(content)
    assert main(["fit-nerf", str(cap), "--steps", "2", "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    err = _err(capsys)
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("victim", ["optim.safetensors", "model.safetensors"])
def test_resume_from_a_truncated_checkpoint_file_is_one_line(tmp_path, capsys, mesh, victim):
    out = tmp_path / "run"
    assert main(["fit-sdf", str(mesh), "--steps", "3", "--refine", "0", "--out", str(out)] + TINY) == 0
    f = out / "checkpoint" / victim
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    capsys.readouterr()
    assert main(["fit-sdf", str(mesh), "--steps", "6", "--out", str(out), "--resume", "--quiet"]) == 2
    err = _err(capsys)
    assert f"cannot read {f}" in err and "the checkpoint is damaged" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("value,expected", [(12.5, 12.5), (0, 0.0), (None, None), ("12", None), (True, None),
                                            (-3.0, None), (float("inf"), None), (float("nan"), None), ([1], None)])
def test_a_checkpoints_training_time_is_read_only_when_it_is_a_time(value, expected):
    from vqad.fit import earlier_train_seconds
    assert earlier_train_seconds({"train_seconds": value}) == expected
    # a fresh fit has none before it; a checkpoint from before the time was recorded: not known (not 0)
    assert earlier_train_seconds(None) == 0.0 and earlier_train_seconds({}) is None


def test_a_resumed_checkpoint_that_never_recorded_its_time_reports_the_whole_fits_as_unknown(tmp_path, capsys, mesh):
    out = tmp_path / "run"
    assert main(["fit-sdf", str(mesh), "--steps", "3", "--refine", "0", "--out", str(out)] + TINY) == 0
    cfg_path = out / "checkpoint" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["train_seconds"]  # as written before it was
    cfg_path.write_text(json.dumps(cfg))
    assert main(["fit-sdf", str(mesh), "--steps", "5", "--out", str(out), "--resume", "--quiet", "--no-eval"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["fit_seconds"] is None and m["fit_seconds_this_run"] > 0
    assert json.loads(cfg_path.read_text())["train_seconds"] is None  # stays unknown, not this run's alone


@pytest.fixture(scope="module")
def trained_run(tiny_checkpoint):
    """(mesh, fit folder) of a 2-step codebook fit of a sphere, to copy and damage."""
    return tiny_checkpoint.parent.parent / "sphere.obj", tiny_checkpoint.parent


def _edit_config(run, edit) -> None:
    p = run / "checkpoint" / "config.json"
    cfg = json.loads(p.read_text())
    edit(cfg)
    p.write_text(json.dumps(cfg))


def _group(cfg, name="dense", i=0) -> dict:
    return cfg["optimizers"][name]["param_groups"][i]


@pytest.mark.parametrize("edit, message", [
    # each found by a fuzz pass: a traceback, or a resume that trained with the file's hyperparameters
    (lambda c: c["optimizers"]["dense"].update(param_groups=True), "optimizer state of 'dense' is malformed"),
    (lambda c: _group(c).update(params=[{}]), "parameter groups are not lists of parameter numbers"),
    (lambda c: _group(c).pop("params"), "parameter groups are not lists of parameter numbers"),
    (lambda c: _group(c).update(lr="x"), "lr = 'x' is not a learning rate"),
    (lambda c: _group(c, "sparse").update(initial_lr=float("inf")), "initial_lr = inf is not a learning rate"),
    (lambda c: c["optimizers"]["sparse"]["scalars"].update({"0.step": {}}), "0.step = {} is not a count"),
    (lambda c: c["optimizers"]["sparse"]["scalars"].update({"0.step": float("nan")}), "is not a count"),
    (lambda c: c["optimizers"]["sparse"]["scalars"].update({"99.step": 3}), "state for parameter 99, of "),
    (lambda c: c.update(mesh=10 ** 30), "the checkpoint records the mesh as 1000000000000000000000000000000, not a path"),
])
def test_a_damaged_optimizer_record_is_one_line_on_resume(tmp_path, capsys, trained_run, edit, message):
    import shutil

    mesh, run = trained_run
    shutil.copytree(run, tmp_path / "run")
    _edit_config(tmp_path / "run", edit)
    capsys.readouterr()
    assert main(["fit-sdf", str(mesh), "--steps", "5", "--out", str(tmp_path / "run"), "--resume", "--quiet",
                 "--no-eval"]) == 2
    err = _err(capsys)
    assert message in err and "the checkpoint is damaged" in err and len(err.strip().splitlines()) == 1


def test_a_resume_trains_with_its_own_hyperparameters_not_the_files(tmp_path, capsys, trained_run):
    """What an optimizer does is this fit's configuration: a file's maximize, capturable or betas are not taken
    (maximize: true made Adam climb the loss; capturable: 0.5 failed at the first step on a CPU)."""
    import shutil

    mesh, run = trained_run
    shutil.copytree(run, tmp_path / "run")
    _edit_config(tmp_path / "run", lambda c: _group(c).update(maximize=True, capturable=0.5, betas=[-1, 2]))
    assert main(["fit-sdf", str(mesh), "--steps", "5", "--out", str(tmp_path / "run"), "--resume", "--quiet",
                 "--no-eval"]) == 0
    group = _group(json.loads((tmp_path / "run" / "checkpoint" / "config.json").read_text()))
    assert group["maximize"] is False and group["capturable"] is False and group["betas"] == [0.9, 0.999]


def test_a_checkpoint_config_with_an_integer_of_5000_digits_is_one_line(tmp_path, capsys, trained_run):
    """Python's JSON raises a bare ValueError (not a JSONDecodeError) for it: export and mesh gave tracebacks."""
    import shutil

    _, run = trained_run
    shutil.copytree(run, tmp_path / "run")
    p = tmp_path / "run" / "checkpoint" / "config.json"
    p.write_text(p.read_text().replace('"step":', '"x": ' + "9" * 5000 + ', "step":', 1))
    capsys.readouterr()
    assert main(["export", str(p.parent), "-o", str(tmp_path / "x.vqad")]) == 2
    err = _err(capsys)
    assert f"cannot read {p}" in err and "the checkpoint is damaged" in err and len(err.strip().splitlines()) == 1


def _bool_step(t):
    k = next(k for k in t if k.endswith(".step"))
    t[k] = torch.tensor(True)


def _negative_second_moment(t):
    k = next(k for k in t if k.endswith(".exp_avg_sq"))
    t[k] = -torch.ones_like(t[k])


def _missing_first_moment(t):
    del t[next(k for k in t if k.endswith(".exp_avg"))]


@pytest.mark.parametrize("file, damage, message", [
    # a second fuzz pass: each was a traceback at the first step, or a resume that wrote NaN weights (exit 0)
    ("optim.safetensors", _bool_step, "is torch.bool of shape ()"),
    ("optim.safetensors", _negative_second_moment, "holds values that are not finite, or negative ones"),
    ("optim.safetensors", _missing_first_moment, "holds ['exp_avg_sq', 'step'] for a parameter, not"),
    # ... a silent cast into another model, or a float64 1e300 that became inf in float32 (a blank render)
    ("model.safetensors", lambda t: t.update({"octree.codes": t["octree.codes"].to(torch.uint8)}),
     "tensor octree.codes is torch.uint8, not the octree's int64 codes"),
    ("model.safetensors", lambda t: t.update({k: t[k].double() * 0 + 1e300 for k in t if k.endswith("weight")}),
     "is torch.float64, not float32 or float16"),
])
def test_damaged_checkpoint_tensors_are_one_line_on_resume(tmp_path, capsys, trained_run, file, damage, message):
    import shutil

    from safetensors.torch import load_file, save_file

    mesh, run = trained_run
    shutil.copytree(run, tmp_path / "run")
    f = tmp_path / "run" / "checkpoint" / file
    tensors = load_file(str(f))
    damage(tensors)
    save_file(tensors, str(f))
    capsys.readouterr()
    assert main(["fit-sdf", str(mesh), "--steps", "5", "--out", str(tmp_path / "run"), "--resume", "--quiet",
                 "--no-eval"]) == 2
    err = _err(capsys)
    assert message in err and "the checkpoint is damaged" in err and len(err.strip().splitlines()) == 1
