"""bench-fuzz: the campaign's --quick mode runs end to end, so benchmarks/fuzz_campaign.py cannot rot."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_campaign_meets_its_targets(tmp_path):
    """A few hundred inputs over a quickly-fitted corpus: every family runs, nothing escapes, the report is written."""
    out = tmp_path / "fuzz.md"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "fuzz_campaign.py"), "--quick", "--inputs", "200", "--workers", "1",
         "--corpus", str(tmp_path / "corpus"), "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    for family in ("truncate", "bytes", "payload", "frame", "header", "sequence", "bomb", "**all** | 200 |"):
        assert f"| {family}" in report, family
    assert "❌" not in report and "0 escapes other than StreamError" in report
    # a reproducer replays the same input in-process
    case = "header:nerf-codebook-entropy:7"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "fuzz_campaign.py"), "--quick", "--corpus", str(tmp_path / "corpus"),
         "--replay", case], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.startswith(case), proc.stdout + proc.stderr
