"""bench-speed: the --quick run reports every figure, finite and positive, and columns merge by device."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_speed", REPO / "benchmarks" / "bench_speed.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _numbers(d, path=""):
    """Every number in a nested dict, with its path."""
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _numbers(v, f"{path}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield f"{path}{k}", v


def test_count_evaluations_counts_each_point_once_per_lod(one_thread):
    from vqad.config import DecoderConfig, GridConfig
    from vqad.grid import OctreeGrid
    from vqad.octree import SparseOctree
    from vqad.sdf.field import SDFField

    B = _bench()
    torch.manual_seed(0)
    octree = SparseOctree.from_points(torch.rand(500, 3) * 2 - 1, 2, 3)
    field = SDFField(OctreeGrid.from_octree(octree, GridConfig(features=4, base_level=2, max_level=3)), DecoderConfig())
    x = torch.rand(100, 3) * 2 - 1
    with torch.no_grad(), B.count_evaluations(field) as n:
        field(x, 3)
        field.all_lods(x, [2, 3])
        field._decode(x, field.grid.features(x, 2), 2)  # bypasses forward: seen by the MLP hook only
    assert n() == 100 + 200 + 100
    assert "forward" not in field.__dict__ and "all_lods" not in field.__dict__  # the wrappers are gone


def test_bench_speed_quick(tmp_path, data_dir, one_thread):
    B = _bench()
    out = tmp_path / "speed.md"
    B.main(["--quick", "--threads", "1", "--profile", "--out", str(out), "--work", str(tmp_path / "work")])
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert list(runs) == ["cpu quick"]
    run = runs["cpu quick"]
    for key in ("sdf_step", "nerf_step"):
        for storage in ("dense", "codebook"):
            r = run[key][storage]
            assert {"step_ms", "decoder_ms", "ratio"} <= set(r)
    assert {"field_evals_per_s", "decoder_evals_per_s", "ratio"} <= set(run["inference"])
    assert sorted(run["sdf_frame"], key=int) == ["3", "4", "5"]
    assert all(f["evals_per_pixel"] >= 1 and f["surface_fraction"] > 0.05 for f in run["sdf_frame"].values())
    assert {"seconds", "samples_per_pixel"} <= set(run["nerf_frame"])
    assert {"seconds_per_mb", "first_lod_ms"} <= set(run["decode"])
    numbers = dict(_numbers({k: run[k] for k in ("sdf_step", "nerf_step", "inference", "sdf_frame", "nerf_frame", "decode")}))
    bad = {k: v for k, v in numbers.items() if not (math.isfinite(v) and v > 0)}
    assert not bad, bad
    text = out.read_text()
    for label in ("SDF step ÷ decoder-only, dense", "SDF step ÷ decoder-only, codebook",
                  "radiance step ÷ decoder-only, dense", "radiance step ÷ decoder-only, codebook",
                  "SDF inference: field ÷ decoder-only throughput", "SDF frame, LOD 5: s",
                  "SDF frame, LOD 5: field evaluations per pixel", "radiance frame, LOD 5: s",
                  "radiance frame: samples per pixel", "decoding, whole file: s per MB",
                  "first LOD: ms from its last byte to its field", "Profile: SDF codebook training step"):
        assert label in text, label
    for target in ("≤ 1.6", "≤ 2.0", "≤ 0.4", "≤ 4", "≤ 1.5", "≤ 0.1", "≤ 20"):
        assert f"| {target} |" in text, target
    assert (tmp_path / "work" / "model.vqad").is_file() and (tmp_path / "work" / "sdf_lod5.png").is_file()
    # a later run on another device adds its column
    runs["cuda"] = dict(run, label="cuda (a GPU)")
    merged = B.write_report(runs, out)
    assert "| figure | target | cpu (1 thread) --quick | cuda (a GPU) |" in merged
