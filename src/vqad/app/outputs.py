"""What vqad's applications write and how an input is recognised without reading it: the marker files
of an output folder (a batch's, a sweep's, a fit's) and the stamp of an input (size and modification
time), shared by ``vqad batch`` and ``vqad sweep``.

Public API::

    is_output_folder(d) -> bool
    input_stamp(source, out_dir=None) -> list
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

#: vqad batch's append-only results log and its run lock, in the output root
BATCH_RESULTS, BATCH_LOCK = "results.jsonl", ".batch.lock"
#: vqad sweep's record of the settings every point was made with
SWEEP_MANIFEST = "sweep.json"

#: a folder holding one of these is an output of vqad batch, vqad sweep or a fit: never searched for assets
OUTPUT_MARKERS = (BATCH_RESULTS, BATCH_LOCK, SWEEP_MANIFEST, "checkpoint/config.json")


def is_output_folder(d: Path) -> bool:
    """``d`` is the output folder of a ``vqad batch``, a ``vqad sweep`` or a fit (its meshes are results,
    not assets)."""
    return any((d / m).exists() for m in OUTPUT_MARKERS)


def _input_files(top: Path, out_dir: Path | None) -> list[Path]:
    """The files under the folder ``top``, sorted, but those in ``out_dir`` or in an output folder
    (:func:`is_output_folder`) below it: each folder is judged once, as the walk reaches it."""
    files = []
    for dirpath, dirnames, filenames in os.walk(top):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames
                       if not ((out_dir is not None and (d / n).resolve() == out_dir) or is_output_folder(d / n))]
        files += [d / f for f in filenames if (d / f).is_file()]
    return sorted(files)


def capture_folder(source: Path, kind: str = "nerf") -> Path:
    """What an input stamp of ``source`` must cover: for a radiance-field capture (``kind`` "nerf") given by one of
    its files (``transforms.json``, ``poses_bounds.npy``, COLMAP's ``sparse/0/cameras.bin``), its folder, images
    included; a folder, or another kind's file (a mesh), is itself."""
    if kind != "nerf" or not source.is_file():
        return source
    folder = source.parent
    if folder.name.isdigit() and folder.parent.name == "sparse":  # COLMAP's sparse/N/
        return folder.parent.parent
    return folder.parent if folder.name == "sparse" else folder


def input_stamp(source: str, out_dir: Path | None = None) -> list:
    """What identifies an asset's input without reading it: size and modification time of the file,
    or of every file of a capture folder (but those of vqad's output folders in it, ``out_dir`` and
    :func:`is_output_folder`: a job writing into its capture must not see its input change); a
    built-in scene's name."""
    p = Path(source)
    if not p.exists():
        return [source]
    if p.is_file():
        st = p.stat()
        return [st.st_size, st.st_mtime_ns]
    h = hashlib.sha256()
    for f in _input_files(p, out_dir):
        st = f.stat()
        h.update(f"{f.relative_to(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return [h.hexdigest()[:16]]


__all__ = ["BATCH_RESULTS", "BATCH_LOCK", "SWEEP_MANIFEST", "OUTPUT_MARKERS", "is_output_folder", "capture_folder",
           "input_stamp"]
