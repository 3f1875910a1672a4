"""``kill -9`` at random moments of a fit, of its checkpoint saves and of the sweeps after training:
``--resume`` always works and loses at most one checkpoint interval.

A fit runs in a child process, checkpointing every step (so saves are a large share of its time and
kills often land inside one); the parent polls the newest complete checkpoint it can see, kills the
child with SIGKILL at a seeded random moment, and checks that the checkpoint ``--resume`` recovers
is at least as new as the newest one seen before the kill (nothing that was saved is lost), then
that the resumed fit runs to its end.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trimesh

from vqad.checkpoint import _complete_step, read_config, recover_checkpoint

STEPS = 40
FIT = ["--levels", "2:4", "--features", "4", "--batch", "512", "--hidden", "16", "--no-eval", "--quiet",
       "--device", "cpu", "--threads", "1", "--grid", "codebook", "--bits", "2", "--refine", "3",
       "--refine-samples", "100000", "--checkpoint-every", "1"]


def _newest_step(ckpt: Path) -> int:
    steps = [_complete_step(d) for d in (ckpt, ckpt.with_name("checkpoint.tmp"), ckpt.with_name("checkpoint.old"))]
    return max([s for s in steps if s is not None], default=-1)


def _fit(mesh: Path, out: Path, resume: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vqad.app.cli", "fit-sdf", str(mesh), "--steps", str(STEPS), "--out", str(out)] + FIT
    return subprocess.Popen(cmd + (["--resume"] if resume else []), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_a_random_moment_then_resume(tmp_path, seed):
    mesh = tmp_path / "sphere.obj"
    trimesh.creation.icosphere(subdivisions=2, radius=0.5).export(mesh)
    out = tmp_path / "run"
    ckpt = out / "checkpoint"
    rng = random.Random(seed)
    proc = _fit(mesh, out)
    try:
        # wait for the first checkpoint (the fit has started), then kill at a random later moment:
        # seed 0 early in training, 1 late in it, 2 among the sweeps after the last step
        deadline = time.monotonic() + 120
        while _newest_step(ckpt) < 1:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the fit wrote no checkpoint within 2 minutes"
            time.sleep(0.01)
        # (the last periodic checkpoint is step STEPS - 1: the one of the last step follows the sweeps)
        target = {0: rng.randint(2, 10), 1: rng.randint(20, 35), 2: STEPS - 1}[seed]
        seen = _newest_step(ckpt)
        while seen < target and proc.poll() is None:
            seen = max(seen, _newest_step(ckpt))
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3) if seed < 2 else rng.uniform(0.5, 1.0))  # into a step, a save or a sweep
        seen = max(seen, _newest_step(ckpt))
        assert proc.poll() is None, "the fit ended before the kill: the test would prove nothing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    recovered = recover_checkpoint(ckpt)
    assert recovered is not None, "the kill left no complete checkpoint"
    step = read_config(ckpt)["step"]
    assert step >= seen, f"a checkpoint of step {seen} was seen before the kill, only {step} recovered"
    resumed = _fit(mesh, out, resume=True)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert read_config(ckpt)["step"] == STEPS
    assert not ckpt.with_name("checkpoint.tmp").exists() and not ckpt.with_name("checkpoint.old").exists()
