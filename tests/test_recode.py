"""Recoding the indices no render reaches (vqad.nerf.recode): the reachable set against a brute-force
reference and against every sample the marcher draws, renders bit for bit unchanged (the whole model at
every LOD and every prefix of the file), fewer bits, the put-back rounds, and the CLI."""

import copy
import io
import json

import pytest
import torch

from vqad import fileformat
from vqad.app.cli import main as cli_main
from vqad.config import DecoderConfig, GridConfig
from vqad.nerf import recode as rc
from vqad.nerf import render as rnd
from vqad.nerf.field import NeRFConfig
from vqad.nerf.fit import NeRFTrainConfig, fit_nerf
from vqad.nerf.formats import load_dataset
from vqad.nerf.render import model_sampler, render_rays_chunked
from vqad.refine import level_bits

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def fitted():
    """A short 4-bit fit of the procedural scene on its masks' octree (the visual hull: empty space inside it), not recoded."""
    scene = load_dataset("procedural")
    grid = GridConfig(storage="codebook", features=4, bits=4, base_level=2, max_level=5)
    train = NeRFTrainConfig(steps=120, batch_rays=1024, octree="mask", prune_warmup=40,
                            prune_every=20, recode=False)
    res = fit_nerf(scene, grid, DecoderConfig(hidden=32, position_input=False), train, CPU, quiet=True,
                   nerf_cfg=NeRFConfig(step_ratio=1.0))
    assert res.recode is None
    return scene, res.field


def _rays(scene, n=3000):
    from vqad.nerf.rays import RayBatcher

    batcher = RayBatcher(scene.splits["test"], scene, CPU)
    o, d = zip(*[batcher.view(i)[:2] for i in range(2)])
    o, d = torch.cat(o), torch.cat(d)
    pick = torch.randperm(o.shape[0], generator=torch.Generator().manual_seed(0))[:n]
    return o[pick], d[pick]


def _render(field, o, d):
    with torch.no_grad():
        return render_rays_chunked(field, model_sampler(field), o, d, field.lods, torch.ones(3), near=0.0, far=10.0)


def _brute_reachable(field, occupancies):
    """Python sets: every corner of every level-L cell overlapping an occupied cell of some LOD's occupancy."""
    octree = field.grid.octree
    out = [set() for _ in octree.levels]
    for lod, (lo, codes) in occupancies.items():
        occ = set(codes.tolist())
        for i, L in enumerate(octree.levels):
            if L > lod:
                continue
            for cell, code in enumerate(octree.codes[L].tolist()):
                if L >= lo:
                    hit = (code >> (3 * (L - lo))) in occ
                else:
                    hit = any((o >> (3 * (lo - L))) == code for o in occ)
                if hit:
                    out[i].update(octree.corners[L][cell].tolist())
    return out


@pytest.fixture(params=[None, 4], ids=["occupancy-at-finest", "occupancy-coarser-than-octree"])
def occupancy_cap(request, monkeypatch):
    """The sampler's occupancy at the octree's finest level, or at a coarser one (as octrees finer than 8 have),
    where the marcher checks its survivors against the octree itself."""
    if request.param is not None:
        monkeypatch.setattr(rnd, "MAX_DENSE_OCCUPANCY_LEVEL", request.param)
    return request.param


def test_reachable_set_matches_brute_force_and_covers_every_sample(fitted, occupancy_cap):
    scene, field = fitted
    field = copy.deepcopy(field).eval()
    occ = {lod: rc.occupied_cells(field, lod) for lod in field.lods}
    if occupancy_cap is not None:
        assert occ[5][0] == occupancy_cap and occ[3][0] == 3
    live = rc.reachable_vertices(field, occ)
    ref = _brute_reachable(field, occ)
    for i, L in enumerate(field.grid.octree.levels):
        assert set(live[i].nonzero().squeeze(1).tolist()) == ref[i], L
    assert sum(int((~r).sum()) for r in live) > 0  # the test scene has vertices no render reaches
    # every corner the marcher's samples interpolate, for the whole model at every LOD and for every prefix
    o, d = _rays(scene)
    for lod in field.lods:
        sampler = rnd.make_sampler(field, rc._prefix_octree(field.grid.octree, lod))
        sampler.prune(lambda x: field.density(x, lod=lod), rnd.prune_threshold(field, sampler))
        samples = sampler.march(o, d, near=0.0, far=10.0)
        x = samples.points(o, d)
        assert x.shape[0] > 1000
        assert x is samples.known[2] and torch.equal(x, samples.points(o.clone(), d.clone()))  # kept, not stale
        for i, L in enumerate(field.grid.octree.levels):
            if L > lod:
                break
            q = field.grid.octree.interpolation(x, L)
            assert bool(q.valid.all())
            assert bool(live[i][q.vertex_ids.reshape(-1)].all()), (lod, L)


def test_recoding_keeps_every_render_and_prefix_bit_for_bit_and_saves_bits(fitted, occupancy_cap):
    scene, original = fitted
    field = copy.deepcopy(original).eval()
    o, d = _rays(scene)
    before = _render(field, o, d)
    V0 = [s.indices().clone() for s in field.grid.storages]
    file0 = fileformat.to_bytes(_baked(field), entropy=True)
    stats = rc.recode_unreachable(field)
    assert sum(stats.recoded) > 0 and stats.rounds >= 1 and not stats.notes
    assert all(r <= u for r, u in zip(stats.recoded, stats.unreachable))
    V1 = [s.indices() for s in field.grid.storages]
    bits0 = sum(level_bits(v, 16) for v in V0)
    bits1 = sum(level_bits(v, 16) for v in V1)
    assert bits1 < bits0 and stats.bits_after == pytest.approx(bits1 / sum(v.numel() for v in V1))
    after = _render(field, o, d)
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    file1 = fileformat.to_bytes(_baked(field), entropy=True)
    assert len(file1) < len(file0)
    for lod in field.lods:  # every prefix the stream can stop at renders as it did
        pa = fileformat.load(io.BytesIO(file0), lod=lod)
        pb = fileformat.load(io.BytesIO(file1), lod=lod)
        for a, b in zip(_render(pa, o, d), _render(pb, o, d)):
            assert torch.equal(a, b), lod
    # idempotent: a second pass finds nothing left to move
    again = rc.recode_unreachable(field)
    assert sum(again.recoded) == 0 and again.bits_after == again.bits_before == stats.bits_after
    assert all(torch.equal(a, s.indices()) for a, s in zip(V1, field.grid.storages))


def _baked(field):
    f = copy.deepcopy(field)
    f.bake()
    return f


def test_recoding_a_baked_file_model_keeps_its_renders(fitted):
    scene, original = fitted
    field = fileformat.load(io.BytesIO(fileformat.to_bytes(_baked(original))))
    o, d = _rays(scene, 1000)
    before = _render(field, o, d)
    stats = rc.recode_unreachable(field)
    assert sum(stats.recoded) > 0
    for a, b in zip(before, _render(field, o, d)):
        assert torch.equal(a, b)


def _dense_codewords(field):
    """Per level, a feature ``f_L (k,)`` such that every LOD ``l`` decodes ``Σ_{L ≤ l} f_L`` (every corner at
    every level holding it) to a large density: grown along the density MLP's gradient."""
    k = field.grid.storages[0].k
    f = torch.zeros(len(field.lods), k, requires_grad=True)
    opt = torch.optim.Adam([f], lr=0.2)
    for _ in range(200):
        raw = torch.stack([field.decoder(f[: i + 1].sum(0, keepdim=True), lod)[0, 0] for i, lod in enumerate(field.lods)])
        opt.zero_grad()
        (-raw.clamp(max=8.0).sum()).backward()
        opt.step()
    return f.detach()


def test_cells_that_become_occupied_get_their_corners_back(fitted, monkeypatch):
    """Codeword 0 of every level made dense, and empty space recoded to it: cells become occupied, and the
    rounds put their corners back until the occupancy, and so every render, is what it was."""
    scene, original = fitted
    field = copy.deepcopy(original).eval()
    for s, f in zip(field.grid.storages, _dense_codewords(field)):
        s.D.data[0] = f
    monkeypatch.setattr(rc, "target_codewords", lambda V, live, n_codes: [torch.tensor(0) for _ in V])
    o, d = _rays(scene, 2000)
    before = _render(field, o, d)
    V0 = [s.indices().clone() for s in field.grid.storages]
    stats = rc.recode_unreachable(field)
    assert stats.put_back > 0 and stats.rounds >= 2 and not stats.notes
    for a, b in zip(before, _render(field, o, d)):
        assert torch.equal(a, b)
    # with one round only, the cells that grew leave no round to check the put-back: every index goes back
    for s, v in zip(field.grid.storages, V0):
        s.set_indices(torch.arange(v.numel()), v)
    monkeypatch.setattr(rc, "MAX_ROUNDS", 1)
    stats = rc.recode_unreachable(field)
    assert stats.notes and sum(stats.recoded) == 0
    assert all(torch.equal(v, s.indices()) for v, s in zip(V0, field.grid.storages))


def test_an_interrupt_puts_every_index_back(fitted, monkeypatch):
    _, original = fitted
    field = copy.deepcopy(original).eval()
    V0 = [s.indices().clone() for s in field.grid.storages]
    calls = {"n": 0}
    real = rc.occupied_cells

    def flaky(f, lod):
        calls["n"] += 1
        if calls["n"] > len(f.lods):  # after the recoding was applied
            raise KeyboardInterrupt
        return real(f, lod)

    monkeypatch.setattr(rc, "occupied_cells", flaky)
    with pytest.raises(KeyboardInterrupt):
        rc.recode_unreachable(field)
    assert all(torch.equal(v, s.indices()) for v, s in zip(V0, field.grid.storages))


def test_only_codebook_radiance_fields_are_recoded(fitted):
    from vqad.grid import OctreeGrid
    from vqad.nerf.field import NeRFField

    _, original = fitted
    assert rc.applies(original)
    dense = NeRFField(OctreeGrid.from_octree(original.grid.octree, GridConfig(storage="dense", features=4, base_level=2,
                                                                               max_level=5)),
                      DecoderConfig(hidden=16, position_input=False), NeRFConfig(step_ratio=1.0))
    assert not rc.applies(dense)
    with pytest.raises(ValueError, match="discrete indices"):
        rc.recode_unreachable(dense)


def test_fit_nerf_recodes_by_default_and_no_recode_is_refused_for_dense(tmp_path, capsys):
    base = ["fit-nerf", "procedural", "--levels", "2:4", "--steps", "15", "--batch-rays", "256", "--octree", "mask",
            "--features", "4", "--device", "cpu", "--quiet", "--no-eval"]
    assert cli_main(base + ["--out", str(tmp_path / "a")]) == 0
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["train"]["recode"] is True and m["recode"]["rounds"] >= 1
    assert m["recode"]["bits_after"] <= m["recode"]["bits_before"]
    assert cli_main(base + ["--out", str(tmp_path / "b"), "--no-recode"]) == 0
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["train"]["recode"] is False and m["recode"] is None
    # a setting of the work after training: a resumed fit may change it
    resume = [a for a in base if a not in ("--octree", "mask", "--steps", "15")]
    assert cli_main(resume + ["--out", str(tmp_path / "a"), "--resume", "--steps", "20", "--no-recode"]) == 0
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["steps"] == 20 and m["recode"] is None
    capsys.readouterr()
    assert cli_main(base + ["--out", str(tmp_path / "c"), "--no-recode", "--grid", "dense"]) == 2
    err = capsys.readouterr().err
    assert "--no-recode applies to grids with discrete indices" in err
    assert not (tmp_path / "c").exists()


def test_export_recode_shrinks_a_file_and_keeps_its_renders(fitted, tmp_path, capsys):
    scene, original = fitted
    src = tmp_path / "plain.vqad"
    fileformat.save(_baked(original), src)
    out = tmp_path / "recoded.vqad"
    assert cli_main(["export", str(src), "-o", str(out), "--entropy", "--recode"]) == 0
    assert "no render reaches" in capsys.readouterr().out
    assert cli_main(["export", str(src), "-o", str(tmp_path / "coded.vqad"), "--entropy"]) == 0
    capsys.readouterr()
    assert cli_main(["export", str(src), "-o", str(tmp_path / "raw.vqad"), "--recode"]) == 2  # raw: b bits whatever
    assert "add --entropy" in capsys.readouterr().err and not (tmp_path / "raw.vqad").exists()
    assert out.stat().st_size < (tmp_path / "coded.vqad").stat().st_size
    o, d = _rays(scene, 1000)
    for lod in (3, 5):
        a = fileformat.load(src, lod=lod)
        b = fileformat.load(out, lod=lod)
        for x, y in zip(_render(a, o, d), _render(b, o, d)):
            assert torch.equal(x, y)
    # a model without indices to recode is refused, with what it holds
    dense = tmp_path / "dense"
    assert cli_main(["fit-nerf", "procedural", "--levels", "2:3", "--steps", "3", "--batch-rays", "64", "--octree", "mask",
                     "--features", "2", "--grid", "dense", "--device", "cpu", "--quiet", "--no-eval", "--out", str(dense)]) == 0
    capsys.readouterr()
    assert cli_main(["export", str(dense / "checkpoint"), "-o", str(tmp_path / "d.vqad"), "--recode", "--entropy"]) == 2
    assert "--recode applies to radiance fields with a codebook grid" in capsys.readouterr().err
    assert not (tmp_path / "d.vqad").exists()


def test_a_recoding_failure_keeps_the_trained_model(tmp_path, monkeypatch, capsys):
    """Recoding is work after training: if it fails, the fit still ends, saves its last step and says so."""
    from vqad.nerf import task

    def broken(field):
        raise RuntimeError("simulated: out of memory")

    monkeypatch.setattr(task, "recode_unreachable", broken)
    scene = load_dataset("procedural")
    grid = GridConfig(storage="codebook", features=2, bits=2, base_level=2, max_level=3)
    train = NeRFTrainConfig(steps=12, batch_rays=128, octree="mask")
    res = fit_nerf(scene, grid, DecoderConfig(hidden=8, position_input=False), train, CPU, out_dir=tmp_path, quiet=True)
    assert res.steps == 12 and res.recode is None
    assert any("recoding the unreachable indices failed" in n and "--no-recode" in n for n in res.notes)
    assert "WARNING: recoding" in capsys.readouterr().err
    assert json.loads((tmp_path / "checkpoint" / "config.json").read_text())["step"] == 12
