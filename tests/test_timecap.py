"""A time cap is a cap for the whole job: training, the sweeps after it and the evaluation.

The job is slowed on a fake clock (a "slow oracle": every training step and every sweep advances
it), so the policy is tested exactly and without timing anything: training gets its share, sweeps
that no longer fit are shortened or skipped and say so, and a fit cut below its useful minimum
warns loudly.
"""

import math

import numpy as np
import pytest
import torch

import vqad.sdf.fit as sdf_fit
from vqad.config import DecoderConfig, GridConfig
from vqad.fit import (EVAL_SHARE, LR_FLOOR, LR_FLOOR_DISCRETE, MIN_SWEEP_SHARE, MIN_TRAIN_SHARE, Deadline, capped_sweeps, cosine_lr, initial_lrs,
                      training_budget)
from vqad.sdf.fit import SDFTask, SDFTrainConfig, fit_sdf
from vqad.sdf.shapes import demo_mesh


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


STEP_S, SWEEP_S = 1.0, 30.0  # fake seconds per training step and per full sweep


@pytest.fixture
def slow_job(monkeypatch):
    """Each training step costs STEP_S and each sweep SWEEP_S × its share of samples, on a fake clock."""
    clock = FakeClock()
    real_step, real_refine = SDFTask.step, sdf_fit.refine_sdf
    sweeps = []

    def slow_step(self, it, progress, gen):
        clock.advance(STEP_S)
        return real_step(self, it, progress, gen)

    def slow_refine(field, x, d, quiet=True, measured=0, rate_weight=0.0):
        share = x.shape[0] / CFG.refine_samples
        sweeps.append(share)
        clock.advance(SWEEP_S * share)
        return real_refine(field, x, d, quiet, measured, rate_weight)

    monkeypatch.setattr(SDFTask, "step", slow_step)
    monkeypatch.setattr(sdf_fit, "refine_sdf", slow_refine)
    return clock, sweeps


# batch 1,000 and 5,000 sweep samples over 3 LODs: a sweep is predicted at 2·3·5 = 30 step times
CFG = SDFTrainConfig(steps=100_000, batch=1000, pool_size=20_000, resample_every=1000, refine=3,
                     refine_samples=5000, refine_candidates=0, max_minutes=2.0)
GRID = GridConfig(storage="codebook", features=4, bits=2, base_level=2, max_level=4)


def test_training_gets_its_share_and_sweeps_that_do_not_fit_are_cut(slow_job, capsys):
    clock, sweeps = slow_job
    deadline = Deadline.for_job(CFG.max_minutes, evaluation=True, clock=clock)
    res = fit_sdf(demo_mesh(48), GRID, DecoderConfig(hidden=8), CFG, torch.device("cpu"), quiet=True,
                  deadline=deadline)
    cap, reserve = 120.0, EVAL_SHARE * 120.0
    # predicted sweeps 3 × 30 s would leave training 18 s of 108: it gets its floor, 60 % of 108 s
    assert res.steps == math.ceil(MIN_TRAIN_SHARE * (cap - reserve) / STEP_S)
    # after 65 s of training, 43 s are left: one whole sweep (30 s), one on 13/30 of its samples, one skipped
    assert sweeps[0] == 1.0 and len(sweeps) == 2
    assert sweeps[1] == pytest.approx((cap - reserve - res.steps * STEP_S - SWEEP_S) / SWEEP_S, abs=1e-3)
    assert deadline.elapsed() <= cap - reserve + 1e-6  # the fit kept the evaluation's reserve
    text = " | ".join(res.notes)
    assert "1 of 3 index sweeps after training skipped" in text and "shortened to 43%" in text
    assert "fewer than the 500 a useful fit needs" in text  # 65 steps: the loud warning
    assert "WARNING: the time cap stopped training after 65 steps" in capsys.readouterr().err


def test_without_a_cap_nothing_is_cut(slow_job, capsys):
    clock, sweeps = slow_job
    cfg = SDFTrainConfig(**{**CFG.__dict__, "steps": 20, "max_minutes": None})
    res = fit_sdf(demo_mesh(48), GRID, DecoderConfig(hidden=8), cfg, torch.device("cpu"), quiet=True,
                  deadline=Deadline.for_job(None, evaluation=True, clock=clock))
    assert res.steps == 20 and sweeps == [1.0, 1.0, 1.0] and res.notes == []
    assert "WARNING" not in capsys.readouterr().err  # the user asked for 20 steps: no warning


def test_training_budget_rule():
    assert training_budget(math.inf, 50.0) is None
    assert training_budget(100.0, 10.0) == 90.0  # the sweeps fit: training gets the rest
    assert training_budget(100.0, 90.0) == MIN_TRAIN_SHARE * 100.0  # they do not: training keeps its floor
    assert training_budget(-5.0, 0.0) == 0.0


def test_capped_sweeps_shorten_then_skip():
    clock = FakeClock()
    deadline = Deadline(100.0, reserve=10.0, clock=clock)
    clock.advance(40.0)  # 50 s left for the fit
    ran, notes = [], []

    def sweep(share):
        ran.append(share)
        clock.advance(20.0 * share)

    assert capped_sweeps(deadline, 4, 20.0, sweep, notes) == 3
    # 50 → 30 → 10 s left: two whole sweeps, then one on half its samples, then 0 s left: skipped
    assert ran == [1.0, 1.0, 0.5]
    assert notes == ["1 of 4 index sweeps after training shortened to 50% of their samples to keep the time cap",
                     "1 of 4 index sweeps after training skipped: the time cap left 0 s and a sweep takes about 20 s"]
    ran.clear()
    notes.clear()  # a fresh 100 s cap, a sweep predicted at 100 / MIN_SWEEP_SHARE × 1.01: even its smallest share is too long
    assert capped_sweeps(Deadline(100.0, clock=clock), 1, 101.0 / MIN_SWEEP_SHARE, sweep, notes) == 0 and ran == []
    assert notes[0].startswith("1 of 1 index sweeps after training skipped")


def test_evaluation_under_a_spent_cap_keeps_the_finest_lod(tmp_path):
    from vqad.sdf.evaluate import evaluate_sdf

    clock = FakeClock()
    mesh = demo_mesh(48)
    res = fit_sdf(mesh, GRID, DecoderConfig(hidden=8), SDFTrainConfig(steps=3, batch=256, pool_size=2000, refine=0),
                  torch.device("cpu"), quiet=True)
    deadline = Deadline(10.0, clock=clock)
    clock.advance(11.0)  # already spent: the finest LOD is still evaluated, the others are skipped
    out = evaluate_sdf(res.field, mesh, tmp_path, 32, torch.device("cpu"), quiet=True, deadline=deadline,
                       chamfer_samples=20_000, iou_samples=50_000)  # (a level-4 field: the defaults are for real meshes)
    assert list(out) == [2, 3, 4]
    assert "chamfer_l1" in out[4] and np.isfinite(out[4]["chamfer_l1"])
    assert out[2] == out[3] == {"skipped": "the job's time cap (--minutes) was spent"}
    assert (tmp_path / "mesh_lod4.ply").exists()


@pytest.mark.parametrize("floor", [0.1, 0.01, 1.0])
def test_cosine_schedule_starts_at_the_rate_and_ends_at_its_floor(floor):
    p = torch.nn.Parameter(torch.zeros(3))
    opts = {"decoder": torch.optim.Adam([p], lr=2e-3)}
    base = initial_lrs(opts)
    seen = []
    for it in range(0, 101, 10):
        cosine_lr(opts, base, it, 100, floor=floor)
        seen.append(opts["decoder"].param_groups[0]["lr"])
    assert seen[0] == pytest.approx(2e-3) and seen[-1] == pytest.approx(floor * 2e-3)
    assert all(a >= b for a, b in zip(seen, seen[1:]))  # never rises
    cosine_lr(opts, base, 500, 100, floor=floor)  # past the end: stays at the floor
    assert opts["decoder"].param_groups[0]["lr"] == pytest.approx(floor * 2e-3)


@pytest.mark.parametrize("storage, given, want", [("codebook", 0.03, 0.03), ("codebook", None, LR_FLOOR_DISCRETE),
                                                   ("dense", None, LR_FLOOR)])
def test_a_fit_decays_every_rate_to_its_lr_floor(monkeypatch, storage, given, want):
    """The fit loop passes ``lr_floor`` to the schedule: the last step runs at floor × each initial rate;
    left unset (as the density pass leaves it) the floor follows the grid's kind."""
    import vqad.fit as fit_mod
    seen = []
    real = fit_mod.cosine_lr

    def spy(opts, base, it, total, *, floor):
        real(opts, base, it, total, floor=floor)
        seen.append({name: [g["lr"] / b for g, b in zip(o.param_groups, base[name])] for name, o in opts.items()})

    monkeypatch.setattr(fit_mod, "cosine_lr", spy)
    cfg = SDFTrainConfig(**{**CFG.__dict__, "steps": 30, "max_minutes": None, "refine": 0, "lr_floor": given})
    grid = GridConfig(**{**GRID.__dict__, "storage": storage})
    res = fit_sdf(demo_mesh(48), grid, DecoderConfig(hidden=8), cfg, torch.device("cpu"), quiet=True)
    assert res.train_cfg.lr_floor == want  # what ran is what is recorded
    assert len(seen) == 30 and all(r == pytest.approx(1.0) for rs in seen[0].values() for r in rs)
    last = want + (1 - want) * 0.5 * (1 + math.cos(math.pi * 29 / 30))  # step 29 of 30: just above the floor
    assert all(r == pytest.approx(last, rel=1e-4) for rs in seen[-1].values() for r in rs)


def test_sweeps_resumed_after_an_interrupt_run_only_those_left():
    from vqad.fit import resumed_sweeps

    ran, done_seen, notes = [], [], []
    assert capped_sweeps(Deadline(None), 4, 1.0, ran.append, notes, done=1, on_done=done_seen.append) == 4
    assert ran == [1.0, 1.0, 1.0] and done_seen == [2, 3, 4] and notes == []
    assert capped_sweeps(Deadline(None), 2, 1.0, ran.append, notes, done=2) == 2 and len(ran) == 3
    # the count is read from a checkpoint: anything but a non-negative integer means none was done
    for bad in (None, -1, "2", 2.0, True, [1]):
        assert resumed_sweeps({"sweeps_done": bad}) == 0
    assert resumed_sweeps({"sweeps_done": 3}) == 3 and resumed_sweeps({}) == 0


def test_a_time_capped_fit_resumed_goes_on_with_its_lr_schedule(slow_job, tmp_path, monkeypatch):
    """An interrupted time-capped fit saves how far its lr schedule had got (``progress``); resumed, it goes on
    from there over its new cap (it started the cosine again from the top: a high learning rate late in a fit)."""
    from vqad.checkpoint import read_config

    clock, _ = slow_job
    seen, slow = [], SDFTask.step

    def step(self, it, progress, gen):
        seen.append(progress)
        if it == 30 and len(seen) == 31:  # the first run, at step 30: Ctrl-C
            raise KeyboardInterrupt
        return slow(self, it, progress, gen)

    monkeypatch.setattr(SDFTask, "step", step)
    cfg = SDFTrainConfig(**{**CFG.__dict__, "refine": 0})
    run = dict(quiet=True, out_dir=tmp_path / "fit")
    with pytest.raises(KeyboardInterrupt):
        fit_sdf(demo_mesh(48), GRID, DecoderConfig(hidden=8), cfg, torch.device("cpu"),
                deadline=Deadline.for_job(cfg.max_minutes, clock=clock), **run)
    saved = read_config(tmp_path / "fit" / "checkpoint")["progress"]
    assert saved == pytest.approx(30 / 120, abs=0.01)  # 30 fake seconds of a 120-s training budget
    del seen[:]
    fit_sdf(demo_mesh(48), GRID, DecoderConfig(hidden=8), cfg, torch.device("cpu"), resume=True,
            deadline=Deadline.for_job(1.0, clock=clock), **run)
    assert seen[0] == pytest.approx(saved) and seen[-1] > 0.95 and seen == sorted(seen)
    assert len(seen) == pytest.approx(60, abs=1)  # the new cap's minute, at 1 fake second a step
