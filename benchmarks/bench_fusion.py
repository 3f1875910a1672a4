"""Sparse TSDF fusion speed (vqad.tsdf.fusion.fuse) on a ray-cast room, and the baseline's size.

The scene: the inside of a 4 × 3 × 4 m room with a sphere and a box in it, seen by a camera that
circles the room's centre (radius 1 m) looking outwards and across it, ``--frames`` frames of
``--width × --height`` depth, with a Kinect-like noise ``σ(z) = 0.0012 + 0.0019 (z − 0.4)²`` m
unless ``--noise 0``. Reports the time of one frame (fused alone, after a warm-up) and of the whole
sequence, the allocated blocks, observed voxels, stored bytes and the mesh time.

    PYTHONPATH=src python benchmarks/bench_fusion.py --frames 100 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from vqad.device import resolve_device
from vqad.tsdf.fusion import fuse
from vqad.tsdf.rgbd import RGBDSequence
from vqad.tsdf.synth import look_at_cv

ROOM_LO, ROOM_HI = np.array([-2.0, -1.5, -2.0]), np.array([2.0, 1.5, 2.0])
SPHERE_C, SPHERE_R = np.array([0.9, -0.8, 0.4]), 0.4
BOX_LO, BOX_HI = np.array([-1.2, -1.5, -0.9]), np.array([-0.6, -0.7, -0.3])


def look_at(eye, target=(0.0, 0.0, 0.0)):
    """Camera-to-world pose (OpenCV axes) at ``eye`` looking at ``target``, world y up in the image."""
    return look_at_cv(eye, target, up=(0.0, -1.0, 0.0))  # x = z × (0, -1, 0)


def room_depth(K, W, H, pose):
    """``(H, W) float32`` z-depth of the room scene (rays through pixel centres, z = 1 in the camera)."""
    u, v = np.meshgrid(np.arange(W, dtype=np.float64), np.arange(H, dtype=np.float64))
    d = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1) @ pose[:3, :3].T
    o = pose[:3, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        walls = np.where(d > 0, (ROOM_HI - o) / d, (ROOM_LO - o) / d)
        t = np.nanmin(np.where(np.isfinite(walls) & (walls > 0), walls, np.inf), -1)  # exit through a wall
        a = (d * d).sum(-1)
        b = 2 * (d * (o - SPHERE_C)).sum(-1)
        disc = b * b - 4 * a * ((o - SPHERE_C) @ (o - SPHERE_C) - SPHERE_R ** 2)
        ts = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a)
        t = np.where((disc > 0) & (ts > 0), np.minimum(t, ts), t)
        t0, t1 = (BOX_LO - o) / d, (BOX_HI - o) / d
        tn = np.minimum(t0, t1).max(-1)
        tf = np.maximum(t0, t1).min(-1)
        t = np.where((tn <= tf) & (tn > 0), np.minimum(t, tn), t)
    return np.where(np.isfinite(t), t, 0).astype(np.float32)


def room_sequence(frames: int, W: int, H: int, noise: bool, seed: int = 0) -> RGBDSequence:
    f = 0.81 * W  # the 320 × 240 TUM-like field of view (fx ≈ 260)
    K = np.array([[f, 0, (W - 1) / 2], [0, f, (H - 1) / 2], [0, 0, 1.0]])
    ang = np.linspace(0, 2 * np.pi, frames, endpoint=False)
    poses = np.stack([look_at(np.array([np.cos(a), 0.2 * np.sin(3 * a), np.sin(a)]),
                              np.array([3 * np.cos(a + 0.8), -0.4, 3 * np.sin(a + 0.8)])) for a in ang])
    rng = np.random.default_rng(seed)
    depths = []
    for p in poses:
        d = room_depth(K, W, H, p)
        if noise:
            sigma = 0.0012 + 0.0019 * (d - 0.4) ** 2
            d = np.where(d > 0, d + rng.normal(size=d.shape) * sigma, 0).astype(np.float32)
        depths.append(d)
    return RGBDSequence("room", K, poses, W, H, lambda i: depths[i])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--voxel", type=float, default=None, help="default: vqad.tsdf.fusion.default_voxel")
    ap.add_argument("--noise", type=int, default=1, help="1: Kinect-like depth noise, 0: exact depth")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    seq = room_sequence(args.frames, args.width, args.height, bool(args.noise))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fuse(seq, voxel=args.voxel, device=dev, frames=[0])  # warm-up
    sync()
    t0 = time.perf_counter()
    one = fuse(seq, voxel=args.voxel, device=dev, frames=[0])
    sync()
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    fused = fuse(seq, voxel=args.voxel, device=dev)
    sync()
    t_all = time.perf_counter() - t0
    t0 = time.perf_counter()
    mesh = fused.mesh()
    t_mesh = time.perf_counter() - t0
    blocks = len(np.unique(np.floor_divide(fused.ijk, fused.block), axis=0))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load avg (1 min) {load:.2f}, "
          f"torch {torch.__version__}, device {dev}, {args.threads} thread(s)")
    print(f"room: {args.frames} frames {args.width}×{args.height}, noise {'on' if args.noise else 'off'}, "
          f"voxel {fused.voxel:g} m, trunc {fused.trunc:g} m, block {fused.block}")
    print(f"one frame: {1000 * t_one:.0f} ms ({len(one)} voxels)")
    print(f"all frames: {t_all:.1f} s ({1000 * t_all / args.frames:.0f} ms/frame), {blocks} blocks, {len(fused)} observed voxels")
    print(f"stored: {fused.nbytes() / 1e6:.2f} MB without colour ({8 * fused.nbytes() / len(fused):.1f} bits/voxel)")
    print(f"mesh: {t_mesh:.1f} s, {len(mesh.vertices)} vertices, {len(mesh.faces)} faces")


if __name__ == "__main__":
    main()
