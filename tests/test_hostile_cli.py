"""Hostile command lines around captures: each ends in one line on stderr and exit 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import torch

from vqad.app.cli import main


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


def test_synth_capture_out_that_cannot_be_created(tmp_path, capsys):
    (tmp_path / "afile").write_text("hi")
    assert main(["synth-capture", "-o", str(tmp_path / "afile" / "sub"), "--size", "8x8", "--views", "2",
                 "--threads", "1"]) == 2
    assert "cannot create --out" in _err(capsys)


def test_synth_capture_object_alone_suggests_a_fit_that_runs(tmp_path, capsys):
    out = tmp_path / "obj"
    assert main(["synth-capture", "-o", str(out), "--size", "8x8", "--views", "2", "--no-background",
                 "--points", "0", "--threads", "1"]) == 0
    assert f"next: vqad fit-nerf {out} --format ngp --octree density" in capsys.readouterr().out


def test_absurd_thread_counts_are_refused(capsys):
    assert main(["synth-capture", "-o", "unused", "--threads", "99999"]) == 2
    assert "at most 1024" in _err(capsys)


def test_running_out_of_memory_is_one_line(monkeypatch, capsys):
    """An allocation failure (a legal but huge --levels, say) says what to lower; other runtime errors
    are bugs and keep their traceback."""
    import vqad.app.commands.nerf as nerf

    def huge(args):
        torch.empty(1)  # a real torch call first
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 157707927552 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(nerf, "cmd_synth_capture", huge)
    assert main(["synth-capture", "-o", "unused", "--threads", "1"]) == 2
    err = _err(capsys)
    assert err.startswith("vqad: error: out of memory") and "157707927552" in err and "--levels" in err

    def bug(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(nerf, "cmd_synth_capture", bug)
    try:
        main(["synth-capture", "-o", "unused", "--threads", "1"])
    except RuntimeError as e:
        assert "shape mismatch" in str(e)
    else:
        raise AssertionError("a runtime error that is not about memory must not be swallowed")


def test_ssim_of_images_one_pixel_wide():
    from vqad.metrics import ssim

    for h, w in ((1, 8), (8, 1), (1, 1)):
        a = torch.rand(h, w, 3, generator=torch.Generator().manual_seed(h * 10 + w))
        assert ssim(a, a) == 1.0
        assert 0 < ssim(a, (a + 0.1).clamp(0, 1)) < 1.0


def test_synth_capture_says_when_a_render_will_take_minutes(tmp_path, monkeypatch, capsys):
    import vqad.nerf.scene_capture as sc

    monkeypatch.setattr(sc, "write_capture", lambda out, cfg, background=True, on_view=None: out / "transforms.json")
    assert main(["synth-capture", "-o", str(tmp_path / "big"), "--size", "4000x4000", "--views", "200",
                 "--supersample", "4", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "rendering 51,200,000,000 rays" in out and "minutes on one core" in out
    assert main(["synth-capture", "-o", str(tmp_path / "small"), "--size", "8x8", "--views", "2", "--threads", "1"]) == 0
    assert "rendering" not in capsys.readouterr().out


def test_synth_capture_reports_its_views_as_it_goes_and_names_an_interrupted_capture(tmp_path, monkeypatch, capsys):
    import vqad.app.commands.nerf as nerf
    import vqad.nerf.scene_capture as sc

    monkeypatch.setattr(nerf, "PROGRESS_SECONDS", 0.0)  # every view, but the last (the summary follows it)
    out = tmp_path / "cap"
    assert main(["synth-capture", "-o", str(out), "--size", "8x8", "--views", "4", "--points", "0", "--threads", "1"]) == 0
    lines = [ln.strip() for ln in capsys.readouterr().out.splitlines() if "views in" in ln]
    assert [ln.split()[0] for ln in lines] == ["1/4", "2/4", "3/4"] and all("s left" in ln for ln in lines)

    def stop(out_dir, cfg, background=True, on_view=None):  # killed after two views: images, no transforms.json
        (Path(out_dir) / "images").mkdir(parents=True)
        (Path(out_dir) / "images" / "0000.png").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(sc, "write_capture", stop)
    half = tmp_path / "half"
    assert main(["synth-capture", "-o", str(half), "--size", "8x8", "--views", "4", "--threads", "1"]) == 130
    assert capsys.readouterr().err.strip() == "vqad: interrupted"
    assert main(["synth-capture", "-o", str(half), "--size", "8x8", "--views", "4", "--threads", "1"]) == 2
    assert "interrupted capture" in _err(capsys)
    assert main(["synth-capture", "-o", str(out), "--size", "8x8", "--views", "4", "--threads", "1"]) == 2
    assert "interrupted" not in _err(capsys)  # a finished capture is just not empty


def test_an_octree_too_fine_for_memory_is_refused_naming_the_levels_that_fit(tmp_path, capsys):
    """A legal but huge --levels on a capture whose octree comes from its sparse points: the points mark a
    coarse level and each of its cells would split into 8^(MAX − that level) finest cells; refused before
    any of them is built, with the finest level that fits."""
    import pytest

    from vqad.errors import InputError
    from vqad.nerf.octree_build import MAX_FINEST_CELLS, _dilate_and_subdivide

    cells = torch.tensor([[1, 1, 1], [2, 2, 2]])
    assert _dilate_and_subdivide(cells, 2, 4).shape[0] == (27 + 27 - 8) * 4 ** 3  # [0, 2]³ ∪ [1, 3]³, 64 each
    with pytest.raises(InputError, match=r"--levels BASE:\d+"):
        _dilate_and_subdivide(cells, 2, 16)
    cap = tmp_path / "cap"
    assert main(["synth-capture", "-o", str(cap), "--size", "24x40", "--views", "6", "--threads", "1"]) == 0
    capsys.readouterr()
    assert main(["fit-nerf", str(cap), "--format", "ngp", "--levels", "4:14", "--steps", "5", "--no-eval",
                 "--threads", "1", "--out", str(tmp_path / "fit")]) == 2
    err = _err(capsys)
    fits = int(err.rsplit("--levels BASE:", 1)[1].rstrip(")"))
    assert f"more than the {MAX_FINEST_CELLS:,} allowed" in err and 4 <= fits < 14


def test_divergence_names_the_extra_loss_weights_that_are_on():
    """A huge --depth-weight diverges as a huge learning rate does: the message names both."""
    import pytest

    from vqad.errors import TrainingDivergedError
    from vqad.fit import DivergenceGuard

    for weights, says, not_says in (({"--depth-weight": 1e30, "--distortion-weight": 0.0}, "--depth-weight now 1e+30",
                                     "--distortion-weight"), ({}, "--grid-lr-scale (now 30)", "extra loss")):
        guard = DivergenceGuard(0.005, 30.0, limit=2, loss_weights=weights)
        guard.after(0, False)
        with pytest.raises(TrainingDivergedError) as e:
            guard.after(1, False)
        assert says in str(e.value) and not_says not in str(e.value)


def test_fit_out_among_other_files_and_a_huge_dilation_are_refused(tmp_path, capsys):
    """--out a folder of other files (the capture's own images/) would get checkpoint/ and renders among
    them; an earlier fit's folder is reused. --dilate is bounded (a million cells asked (2·10⁶)³ shifts)."""
    cap = tmp_path / "cap"
    assert main(["synth-capture", "-o", str(cap), "--size", "16x24", "--views", "5", "--threads", "1"]) == 0
    opts = ["--format", "ngp", "--levels", "2:4", "--steps", "3", "--batch-rays", "64", "--no-eval", "--threads", "1",
            "--quiet"]
    capsys.readouterr()
    assert main(["fit-nerf", str(cap)] + opts + ["--out", str(cap / "images")]) == 2
    assert "already holds other files" in _err(capsys)
    assert not (cap / "images" / "checkpoint").exists()
    assert main(["fit-nerf", str(cap)] + opts + ["--out", str(tmp_path / "fit")]) == 0
    assert main(["fit-nerf", str(cap)] + opts + ["--out", str(tmp_path / "fit")]) == 0  # an earlier fit: replaced
    capsys.readouterr()
    assert main(["fit-nerf", str(cap)] + opts + ["--out", str(tmp_path / "d"), "--dilate", "1000000"]) == 2
    assert "--dilate must be 0..16" in _err(capsys)
