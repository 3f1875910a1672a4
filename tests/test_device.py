"""One ``.to(device)`` moves a whole model: the octree's tables are buffers of the field (CPU check),
and a field built on the CPU trains, bakes, saves and decodes on a GPU like on the CPU (CUDA check)."""

import math

import pytest
import torch

import vqad
from vqad import fileformat
from vqad.config import DecoderConfig, GridConfig
from vqad.grid import OctreeGrid
from vqad.nerf.field import NeRFConfig, NeRFField
from vqad.nerf.render import OccupancySampler, render_rays_chunked
from vqad.octree import SparseOctree
from vqad.sdf.field import SDFField

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _sphere_octree(levels=(2, 5), n=4000, seed=0) -> SparseOctree:
    g = torch.Generator().manual_seed(seed)
    pts = 0.6 * torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=1)
    return SparseOctree.from_points(pts, *levels, dilate=1)


def _sdf_field(storage="codebook", levels=(2, 5)) -> SDFField:
    torch.manual_seed(0)
    grid = OctreeGrid.from_octree(_sphere_octree(levels), GridConfig(storage=storage, features=4, bits=3,
                                                                     base_level=levels[0], max_level=levels[1]))
    return SDFField(grid, DecoderConfig(hidden=16))


def _octree_tensors(octree: SparseOctree) -> list[torch.Tensor]:
    """Every table; the vertex coordinates are decoded from the keys on first use (and kept as buffers)."""
    return [t for table in (octree.codes, octree.corners, octree.vertex_keys, octree.vertices) for t in table.values()]


# -- CPU ----------------------------------------------------------------------------------------------
def test_every_octree_table_is_a_buffer_of_the_field_and_no_state():
    field = _sdf_field("codebook", (2, 3))
    octree = field.grid.octree
    names = dict(octree.named_buffers())
    assert not [n for n in names if n.startswith("vertices_")]  # a codebook grid never decoded them
    assert {f"{t}_{lv}" for t in ("codes", "corners", "keys") for lv in octree.levels} == set(names)
    tables = _octree_tensors(octree)  # decodes the vertex coordinates: buffers from now on
    assert {f"vertices_{lv}" for lv in octree.levels} <= set(dict(octree.named_buffers()))
    buffers = list(field.buffers())
    assert len(tables) == 4 * len(octree.levels)
    assert all(any(t is b for b in buffers) for t in tables)
    assert not [k for k, v in vars(octree).items() if torch.is_tensor(v)]  # no tensor outside the buffers
    # nothing of the octree enters a state_dict: checkpoints and .vqad files are unchanged
    assert octree.state_dict() == {}
    assert sorted(field.state_dict()) == [
        "decoder.mlps.0.net.0.bias", "decoder.mlps.0.net.0.weight", "decoder.mlps.0.net.2.bias",
        "decoder.mlps.0.net.2.weight", "grid.storages.0.C", "grid.storages.0.D", "grid.storages.1.C",
        "grid.storages.1.D",
    ]
    assert set(field.decoder_state()) == {k for k in field.state_dict() if not k.startswith("grid.")}


def test_to_moves_every_octree_table_and_the_sampler_follows():
    """The ``meta`` device stands in for a GPU: one ``field.to`` moves the octree, the sampler follows."""
    field = _sdf_field("hash", (2, 4))
    sampler = OccupancySampler(field.grid.octree)
    assert {f"vertices_{lv}" for lv in field.grid.octree.levels} <= set(dict(field.grid.octree.named_buffers()))
    field.to("meta")
    octree = field.grid.octree
    # every buffer moved, the hash storage's decoded vertex coordinates too (looked at before the
    # property, which would decode them anew on a device mismatch)
    assert all(t.device.type == "meta" for t in dict(octree.named_buffers()).values())
    assert octree.device.type == "meta" and field.device.type == "meta"
    assert all(t.device.type == "meta" for t in _octree_tensors(octree))
    assert all(t.device.type == "meta" for t in field.buffers())  # the hash storage's rows too
    assert sampler.device.type == "meta"
    sampler._follow_octree()  # what march / prune do first
    assert sampler.occupancy.device.type == "meta" and all(t.device.type == "meta" for t in sampler.bbox)


# -- CUDA (each test also runs on the CPU, so the test itself is checked where there is no GPU) ----
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


@pytest.mark.parametrize("dev", DEVICES)
def test_sdf_field_built_on_cpu_trains_and_decodes_on_cuda(tmp_path, dev):
    """Built on the CPU, moved once, trained through the one fit loop (vqad.fit.run_fit with the SDF
    task), baked, written, and decoded alike on the device and on the CPU."""
    import numpy as np
    import trimesh

    from vqad.fit import run_fit
    from vqad.sdf.fit import SDFTask, SDFTrainConfig
    from vqad.sdf.mesh import Mesh, SDFOracle

    device = torch.device(dev)
    field = _sdf_field("codebook", (2, 5)).to(device)
    assert all(t.device.type == dev for t in list(field.buffers()) + list(field.parameters()))
    s = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    mesh = Mesh(np.asarray(s.vertices, dtype=np.float64), np.asarray(s.faces, dtype=np.int64))
    cfg = SDFTrainConfig(steps=20, batch=4096, pool_size=20_000, refine=1, refine_samples=8192, log_every=1)
    cfg = cfg.resolved(field.grid_cfg)
    res = run_fit(SDFTask(field, SDFOracle(mesh), cfg, 0, device), cfg, device, quiet=True)
    losses = [h["loss"] for h in res.history]
    assert res.steps == 20 and res.skipped_steps == 0 and res.extra_seconds > 0  # the refinement sweep ran
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    # inference: the sync-free padded lookup equals the compact one bit for bit
    x = torch.rand(8192, 3, device=device) * 2.2 - 1.1
    with torch.no_grad():
        for level in field.lods:
            assert torch.equal(field.grid._padded_level_features(x, level),
                               field.grid._compact_level_features(x, level))
    field.bake()
    path = tmp_path / "sphere.vqad"
    fileformat.save(field, path)
    on_dev, on_cpu = vqad.load(path, device=dev), vqad.load(path, device="cpu")
    assert on_dev.grid.octree.device.type == dev and on_cpu.grid.octree.device.type == "cpu"
    with torch.no_grad():
        want = field.all_lods(x)
        got_dev = on_dev.all_lods(x)
        got_cpu = on_cpu.all_lods(x.cpu())
    torch.testing.assert_close(got_dev, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_cpu, got_dev.cpu(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dev", DEVICES)
def test_radiance_field_built_on_cpu_trains_renders_and_decodes_on_cuda(tmp_path, dev):
    """The same for a radiance field, trained with the radiance task (occupancy pruning included)."""
    from vqad.fit import run_fit
    from vqad.nerf.formats import load_dataset
    from vqad.nerf.octree_build import octree_from_depth
    from vqad.nerf.rays import RayBatcher
    from vqad.nerf.render import model_sampler
    from vqad.nerf.task import NeRFTrainConfig, RadianceTask

    cuda = torch.device(dev)
    scene = load_dataset("procedural", downscale=4)
    torch.manual_seed(0)
    octree = octree_from_depth(scene, 2, 5, "cpu")
    grid = OctreeGrid.from_octree(octree, GridConfig(storage="codebook", features=4, bits=3, base_level=2,
                                                     max_level=5))
    field = NeRFField(grid, DecoderConfig(hidden=16, position_input=False), NeRFConfig(color_hidden=16),
                      scene.normalization)
    sampler = OccupancySampler(field.grid.octree)  # built on the CPU; follows the octree
    field.to(cuda)
    batcher = RayBatcher(scene.splits["train"], scene, cuda)
    bg = torch.tensor(batcher.background, device=cuda)
    cfg = NeRFTrainConfig(steps=20, batch_rays=512, lr=5e-3, grid_lr_scale=10.0, lod_mode="all", prune_every=5,
                          prune_warmup=10, log_every=1)
    res = run_fit(RadianceTask(field, sampler, batcher, cfg), cfg, cuda, quiet=True)
    assert res.steps == 20 and res.skipped_steps == 0 and res.empty_steps == 0
    assert all(math.isfinite(h["psnr"]) for h in res.history)
    assert sampler.occupancy.device.type == dev
    field.bake()
    path = tmp_path / "scene.vqad"
    fileformat.save(field, path)
    on_gpu, on_cpu = vqad.load(path, device=dev), vqad.load(path, device="cpu")
    x = torch.rand(4096, 3, device=cuda) * 1.6 - 0.8
    d = torch.nn.functional.normalize(torch.randn(4096, 3, device=cuda), dim=-1)
    with torch.no_grad():
        sig_gpu, rgb_gpu = on_gpu.all_lods(x, d, on_gpu.lods)
        sig_cpu, rgb_cpu = on_cpu.all_lods(x.cpu(), d.cpu(), on_cpu.lods)
    torch.testing.assert_close(sig_cpu, sig_gpu.cpu(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rgb_cpu, rgb_gpu.cpu(), atol=1e-4, rtol=1e-4)
    # rendering: the decoded fields on both devices agree pixel by pixel on average (a sample on a
    # cell face may be kept on one device and not the other, so not everywhere to 1e-4)
    test_rays = RayBatcher(scene.splits["test"], scene, cuda)
    flat = torch.arange(0, test_rays.num_rays, max(1, test_rays.num_rays // 512), device=cuda)
    o, dirs, _, near, far = test_rays.rays_for(flat)
    img = {}
    for name, f, where in (("gpu", on_gpu, cuda), ("cpu", on_cpu, torch.device("cpu"))):
        rgb, depth, opacity = render_rays_chunked(f, model_sampler(f), o.to(where), dirs.to(where), [f.lods[-1]],
                                                  bg.to(where), near=near.to(where), far=far.to(where), chunk=256)
        assert torch.isfinite(rgb).all() and rgb.device.type == where.type
        img[name] = rgb.cpu()
    assert (img["gpu"] - img["cpu"]).abs().mean() < 1e-3


# -- devices vqad cannot use, and the Python fit calls' arguments -----------------------------------------------
@pytest.mark.parametrize("device, message", [
    ("mps", "vqad runs on cpu or cuda[:N], not mps"), ("meta", "not meta"), (torch.device("meta"), "not meta"),
    ("xpu:0", "not xpu"), ("gpu", "unknown device 'gpu'"), (3, "got int 3"), (["cpu"], "got list"),
])
def test_devices_vqad_cannot_use_are_one_clear_error(device, message):
    from vqad.device import resolve_device
    from vqad.errors import InputError

    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        resolve_device(device)
    assert resolve_device(torch.device("cpu")) == torch.device("cpu") == resolve_device("cpu")
    if not torch.cuda.is_available():
        for cuda in ("cuda", torch.device("cuda"), "cuda:0"):  # a torch.device is checked like a name
            with pytest.raises(InputError, match="PyTorch sees no CUDA GPU"):
                resolve_device(cuda)
    else:
        with pytest.raises(InputError, match="CUDA GPU\\(s\\)"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_a_file_or_checkpoint_loaded_onto_a_device_vqad_cannot_use_is_refused_not_called_damaged(tmp_path):
    from vqad.errors import InputError

    field = _sdf_field(levels=(2, 3))
    field.bake(fp16=True)
    path = tmp_path / "m.vqad"
    fileformat.save(field, path)
    for device in ("mps", torch.device("meta")):
        with pytest.raises(InputError, match="vqad runs on cpu or cuda") as info:
            vqad.load(path, device=device)
        assert "damaged" not in str(info.value)
        with pytest.raises(InputError, match="vqad runs on cpu or cuda"):
            next(fileformat.iter_lods(path, device=device))


def test_fit_sdf_checks_its_arguments_before_it_trains():
    import trimesh

    from vqad.errors import InputError
    from vqad.sdf.fit import SDFTrainConfig, fit_sdf
    from vqad.sdf.mesh import Mesh

    tm = trimesh.creation.icosphere(subdivisions=1, radius=0.5)
    mesh = Mesh(tm.vertices, tm.faces)
    grid, dec = GridConfig(storage="codebook", features=4, bits=2, base_level=2, max_level=3), DecoderConfig(hidden=8)
    train = SDFTrainConfig(steps=2, batch=256, pool_size=2000, refine=0)
    for args, message in [
        (("mesh.obj", grid, dec, train, "cpu"), "the data must be a Mesh \\(vqad.sdf.mesh.load_mesh\\(path\\)\\), got a str"),
        ((mesh, dec, grid, train, "cpu"), "grid_cfg must be a GridConfig, got a DecoderConfig"),
        ((mesh, grid, dec, SDFTrainConfig(steps=True), "cpu"), "train.steps must be an integer, got True"),
        ((mesh, grid, dec, SDFTrainConfig(steps=2.5), "cpu"), "train.steps must be an integer, got 2.5"),
        ((mesh, grid, dec, SDFTrainConfig(lr="0.01"), "cpu"), "train.lr must be a number or None"),
        ((mesh, GridConfig(features=8.0), dec, train, "cpu"), "grid.features must be an integer"),
        ((mesh, grid, dec, train, "mps"), "not mps"),
    ]:
        with pytest.raises(InputError, match=message):
            fit_sdf(*args, quiet=True)
    # a device given as a string, as vqad.load takes it (it failed after the whole fit, in the memory report)
    res = fit_sdf(mesh, grid, dec, train, "cpu", quiet=True)
    assert res.steps == 2 and res.field.device == torch.device("cpu")
