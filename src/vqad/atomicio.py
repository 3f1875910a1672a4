"""Atomic file writes: a reader (or a kill at any moment) sees the old file or the new one, never half.

Every output vqad writes (``.vqad`` files, checkpoints, metrics, meshes, images, reports) goes
through here: the data is written to a new temporary file beside the target (:func:`tmp_path`), flushed to disk, renamed over
the target, and the directory entry flushed too. Append-only logs (``vqad batch``'s results) add
one fsync'ed line at a time (:func:`append_record`).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from vqad.errors import InputError


def fsync_path(p: str | Path) -> None:
    """Flush a file's (or a directory's entries') data to disk; a file system without fsync is skipped."""
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tmp_path(path: str | Path) -> Path:
    """A new, empty temporary file beside ``path`` for a write of it to go through: ``NAME.XXXXXXXX.tmp.SUFFIX``
    (the suffix last, for tools that guess the type by it), created exclusively with a name no one else holds,
    so a user's file or link of a fixed name (``x.tmp.png``) is never written through nor consumed; its
    permissions are what a new file gets here (the umask), not ``mkstemp``'s 0600."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f"{path.stem if path.suffix else path.name}.",
                                suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


def _umask() -> int:
    """This process's umask: read where Linux states it (setting it to read it back races other threads' files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_target(path: str | Path, what: str = "output") -> Path:
    """The file a write of ``path`` replaces: ``path``, or a symlink's target (the link stays a link); a folder,
    a device, a FIFO or a socket there is refused (:class:`InputError`): a rename would put a plain file in its
    place (``/dev/null``, or a pipe a reader waits on, replaced by a file) while saying that all went well."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise InputError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"cannot write {what} {path}: it is a folder; give a file name")
    if not stat.S_ISREG(mode):
        raise InputError(f"cannot write {what} {path}: it is not a regular file (a device, a pipe or a socket); "
                         "give the path of a file")
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path, what: str = "output"):
    """Yield a temporary path to write ``path`` through; on success it is flushed and renamed over
    ``path``; on any error it is removed and ``path`` is left as it was.

    Use it for writers that take a file name (trimesh, PIL, matplotlib)::

        with atomic_path(out) as tmp:
            image.save(tmp)
    """
    path = write_target(path, what)
    try:
        tmp = tmp_path(path)
    except OSError as exc:
        raise InputError(f"cannot write {what} {path}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise InputError(f"cannot write {what} {path}: {exc.strerror or exc}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_path(path.parent)


def write_atomic(path: str | Path, data: bytes | str, what: str = "output") -> int:
    """Write ``data`` (str as UTF-8) to ``path`` atomically; returns the bytes written."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_path(path, what) as tmp:
        tmp.write_bytes(raw)
    return len(raw)


def save_image(img, path: str | Path) -> None:
    """Write an ``(H, W)`` or ``(H, W, 3)`` uint8 array as an image (format from the suffix: png, jpg, ...)
    atomically."""
    from PIL import Image

    path = Path(path)
    with atomic_path(path, "image") as tmp:
        Image.fromarray(img).save(str(tmp), format=Image.registered_extensions().get(path.suffix.lower()))


def save_mesh_file(mesh, path: str | Path) -> None:
    """Write a ``trimesh.Trimesh`` (format from the suffix: ply, obj, stl, off, glb) atomically."""
    path = Path(path)
    with atomic_path(path, "mesh") as tmp:
        mesh.export(str(tmp), file_type=path.suffix.lstrip(".").lower())


def append_record(path: str | Path, line: str, what: str = "output") -> None:
    """Append one record (a line of text, no newline inside) to the log ``path`` and flush it to disk.

    For append-only logs, where renaming a whole copy per record would cost O(n²): the record goes
    out in ONE ``write`` to a file opened with ``O_APPEND``, then ``fsync``; a new file's directory
    entry is flushed too. A kill can tear at most the last line, never an earlier one: readers skip
    a line that does not parse, and a record that follows a torn line starts on a line of its own.
    """
    path = Path(path)
    if "\n" in line:
        raise ValueError("a record is one line")
    created = not path.exists()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            torn = False
            if size:
                with open(path, "rb") as f:
                    f.seek(size - 1)
                    torn = f.read(1) != b"\n"
            os.write(fd, (("\n" if torn else "") + line + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise InputError(f"cannot append to {what} {path}: {exc.strerror or exc}") from exc
    if created:
        fsync_path(path.parent)


__all__ = ["atomic_path", "write_target", "write_atomic", "append_record", "fsync_path", "tmp_path", "save_image", "save_mesh_file"]
