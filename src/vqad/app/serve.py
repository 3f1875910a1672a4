"""``vqad serve DIR``: the .vqad files under a folder over HTTP, with byte ranges, for streaming.

A .vqad file is progressive: its first bytes decode to a coarse level of detail. This server hands
out the files so that any HTTP client can draw them as they arrive (``vqad view URL``,
``vqad.fileformat.iter_lods(urlopen(url))``, ``curl -r 0-9999 URL``, a browser's ``fetch``).

URL scheme (every path is relative to DIR, percent-encoded, ``/`` between folders):

==========================  =====================================================================
``GET /``                   an HTML index: each file with its size, kind and the bytes each LOD needs
``GET /api/files``          the same as JSON: ``[{path, url, view_url, bytes, etag, last_modified, kind,
                            complete, lods: [{lod, prefix_bytes}], error}]``
``GET /<path>.vqad``        the file itself (``Content-Type: application/x-vqad``), with ranges
``GET /view/<path>.vqad``   303 to a viewer (``vqad.app.view.open_viewer``) streaming that file
                            from this server, started on first use and reused; 501 with the
                            ``vqad view URL`` command when the viewer is not installed
==========================  =====================================================================

HTTP semantics (RFC 9110): ``Accept-Ranges: bytes``; one range (``bytes=a-b``, ``a-``, ``-n``) ->
206 with ``Content-Range``; several -> 206 ``multipart/byteranges``, the parts in the order asked
(overlapping or adjacent ones coalesced; more than :data:`MAX_RANGES` -> the whole file); none satisfiable -> 416 with
``Content-Range: bytes */SIZE``; a malformed Range header is ignored (200). A strong ``ETag``
(inode, mtime and ctime in ns, size) and ``Last-Modified``; a date in the future is ignored; ``If-Match`` / ``If-Unmodified-Since`` -> 412,
``If-None-Match`` / ``If-Modified-Since`` -> 304, ``If-Range`` (ETag or date) -> the range only while
the file is unchanged, else the whole file. HEAD answers with GET's headers and no body (``/view/``: 405,
so that a link checker starts no viewer; a request another web site's page makes, such as an ``<img>``
of it, is refused (403) unless it is the browser's own navigation, so a page cannot start viewers; at most
:data:`MAX_VIEWERS` run at once, the least recently opened stopped for a new one).
``Cache-Control: no-cache`` (clients keep a copy and revalidate it with the ETag). CORS: on loopback,
pages from this machine (``http(s)://localhost``, ``127.0.0.1``, ``[::1]``, any port) may read the files and
the listing, no other origin; bound to another address (public by design, with a warning), any origin
may. The headers a range client needs are exposed.

Safety: only regular ``*.vqad`` files whose real path (symlinks resolved) lies under DIR are served;
``..``, ``.``, empty or hidden (``.name``) segments, NUL and backslashes are refused (403), anything
else that is not such a file is 404. Bound to 127.0.0.1 by default, the server also refuses requests
whose ``Host`` is not a loopback name, so a web page cannot reach it through DNS rebinding. Each
response reads from one file descriptor opened once; if the file is changed in place while it is
being sent (size or mtime differ from the headers'), the connection is cut short rather than mixing
two versions' bytes (rewrite files with a rename, as ``vqad`` itself does, and readers never notice).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import errno
import html
import logging
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit, urlunsplit

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from vqad.app.rates import format_rate, parse_rate  # parse_rate: re-exported for --bandwidth users
from vqad.app.sockets import bind_socket, is_loopback  # re-exported: the servers' sockets
from vqad.errors import InputError, VqadError

log = logging.getLogger("vqad.serve")

CONTENT_TYPE = "application/x-vqad"
SUFFIX = ".vqad"
#: more ranges than this in one request (after coalescing) are answered with the whole file
MAX_RANGES = 64
#: bytes per read and per send without --bandwidth
CHUNK = 64 << 10
#: the Host names a server bound to a loopback address answers to
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
#: the origins whose pages may read a loopback server's files across origins (any port)
LOOPBACK_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"
DEFAULT_PORT = 8000
#: a server stopping (Ctrl-C) waits this long for responses in flight before cutting them
GRACEFUL_SECONDS = 2.0
#: viewers ``/view/`` keeps running at once (each a thread, a port and ~2 MB); a new one stops the least recent
MAX_VIEWERS = 8
EXPOSED_HEADERS = ("Content-Range", "Accept-Ranges", "ETag", "Content-Length", "Last-Modified", "Content-Type")


class ViewerHandle(Protocol):
    """What ``vqad.app.view.open_viewer`` returns."""

    url: str

    def stop(self) -> None: ...


#: ``open_viewer(source, host=..., port=..., bandwidth=...)``: starts a viewer streaming ``source``
ViewerFactory = Callable[..., ViewerHandle]


# ================================================================================================
# paths
# ================================================================================================
class Refused(Exception):
    """A request path that is not a servable file: ``status`` 403 (a forbidden form) or 404."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _check_segments(rel: str) -> list[str]:
    """The segments of a decoded URL path relative to the root, or :class:`Refused` (403)."""
    if not rel or rel.endswith("/"):
        raise Refused(404, "folders are not served: the index at / lists the files")
    if "\x00" in rel or "\\" in rel:
        raise Refused(403, "NUL and backslashes are not allowed in paths")
    if rel.startswith("/"):
        raise Refused(403, "absolute paths are not allowed: give the path relative to the served folder")
    parts = rel.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise Refused(403, "'.', '..' and empty path segments are not allowed")
        if part.startswith("."):
            raise Refused(403, "hidden files and folders are not served")
    return parts


def resolve_file(root: Path, rel: str) -> Path:
    """The real path of the servable file at URL path ``rel`` (decoded, relative) under ``root``.

    ``root`` must already be resolved. Raises :class:`Refused`: 403 for paths of a forbidden form
    (``..``, absolute, NUL, hidden), 404 for anything that is not a regular ``.vqad`` file whose real
    path (symlinks followed) lies under ``root``.
    """
    parts = _check_segments(rel)
    if not parts[-1].lower().endswith(SUFFIX):
        raise Refused(404, f"only {SUFFIX} files are served")
    try:
        real = root.joinpath(*parts).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        raise Refused(404, "no such file") from None
    if not real.is_relative_to(root):
        raise Refused(404, "no such file")  # a symlink out of the folder: not ours to show
    try:
        if not stat.S_ISREG(real.stat().st_mode):
            raise Refused(404, "not a regular file")
    except OSError:
        raise Refused(404, "no such file") from None
    return real


def open_servable(root: Path, rel: str) -> tuple[int, os.stat_result]:
    """An open descriptor (O_RDONLY) of the servable file at ``rel`` under ``root`` and its ``fstat``.

    :func:`resolve_file` checks the path, then the file is opened, then the descriptor must still be a file under
    ``root`` (:func:`_opened_under`): a folder swapped for a symlink out of ``root`` between the check and the
    open (which ``O_NOFOLLOW`` cannot see: it guards the last name only) would otherwise have this serve a file
    outside the folder. Raises :class:`Refused`.
    """
    real = resolve_file(root, rel)
    try:  # O_NONBLOCK: a FIFO swapped in after the check must not hang the server
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise Refused(404 if exc.errno in (errno.ENOENT, errno.ELOOP) else 403, "cannot open the file") from None
    try:
        st = os.fstat(fd)  # the headers describe exactly the version this descriptor reads
        if not stat.S_ISREG(st.st_mode):
            raise Refused(404, "not a regular file")
        if not _opened_under(root, fd, rel, st):
            raise Refused(404, "the file moved while it was opened: try again")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _opened_under(root: Path, fd: int, rel: str, st: os.stat_result) -> bool:
    """Whether descriptor ``fd`` (``fstat`` ``st``) is the file at ``rel`` under ``root``: on Linux the kernel's own
    path of the descriptor must lie under ``root``; elsewhere the path is resolved again and must lead to the
    very file opened (device and inode)."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(root)
    except OSError:  # no /proc (macOS, BSD)
        pass
    try:
        again = os.stat(resolve_file(root, rel))
    except (OSError, Refused):
        return False
    return (again.st_dev, again.st_ino) == (st.st_dev, st.st_ino)


def iter_files(root: Path) -> Iterator[tuple[str, Path]]:
    """``(relative URL path, real path)`` of every servable file under ``root``, sorted.

    Hidden files and folders are skipped, and symlinked folders are not entered (they may loop);
    a symlinked file is listed when its target is a servable file under ``root``.
    """
    found = []
    for base, name in _walk(root):
        rel = (base / name).as_posix()
        try:
            rel.encode("utf-8")  # a name that is not UTF-8 has no URL a client could send
        except UnicodeEncodeError:
            continue
        if any(ord(c) < 32 or ord(c) == 127 for c in rel):  # nor one with a control character: no route takes it
            continue
        try:
            found.append((rel, resolve_file(root, rel)))
        except Refused:
            continue
    return iter(sorted(found))


def _walk(root: Path) -> Iterator[tuple[Path, str]]:
    """``(folder relative to root, name)`` of every non-hidden entry under ``root`` that is not a folder,
    depth first with a stack of its own (``os.walk`` recurses once per level: a tree 1,000 folders deep
    overflowed Python's stack). Symlinked folders are not entered (they may loop); unreadable ones are skipped."""
    stack = [Path()]
    while stack:
        base = stack.pop()
        try:
            with os.scandir(root / base) as it:
                entries = list(it)
        except OSError:  # unreadable, gone, or a path too long
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                is_dir = e.is_dir()
            except OSError:
                continue
            if is_dir:
                if not e.is_symlink():
                    stack.append(base / e.name)
            else:
                yield base, e.name


# ================================================================================================
# validators and ranges (RFC 9110)
# ================================================================================================
def make_etag(st: os.stat_result) -> str:
    """A strong entity tag from inode, mtime and ctime (ns) and size: a rewrite (rename or in place) changes it,
    even one that restores the old mtime afterwards (``touch -r``, ``rsync -t --inplace``): no user can set ctime."""
    return f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_ctime_ns:x}-{st.st_size:x}"'


_ETAG = re.compile(r'\s*(W/)?("[^"]*")\s*(?:,|$)')


def _etags(header: str) -> list[tuple[bool, str]] | None:
    """``If-Match`` / ``If-None-Match`` -> ``[(weak, tag)]``; ``None`` for ``*``."""
    if header.strip() == "*":
        return None
    return [(bool(m.group(1)), m.group(2)) for m in _ETAG.finditer(header)]


def _http_date(header: str) -> float | None:
    """An HTTP date's seconds since the epoch; ``None`` (the header is ignored) for one that is not a date,
    has no zone, or lies in the future (RFC 9110 §13.1.3: such a date says nothing about this file)."""
    try:
        dt = email.utils.parsedate_to_datetime(header)
        t = None if dt is None or dt.tzinfo is None else dt.timestamp()
    except (TypeError, ValueError, IndexError, OverflowError, OSError):  # a year past 9999, or past the C library's
        return None
    return t if t is not None and t <= time.time() else None


class Unsatisfiable(Exception):
    """A well-formed Range header none of whose ranges overlaps the file (416)."""


_RANGE_SPEC = re.compile(r"^(\d*)-(\d*)$")


def _position(digits: str) -> int:
    """A byte position from a Range header's digits, at most 2^63 (a longer number means "past any file";
    Python's ``int`` refuses strings of more than 4,300 digits)."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else 1 << 63


def parse_range(header: str, size: int) -> list[tuple[int, int]] | None:
    """``Range`` header -> inclusive ``[(first, last)]`` within a file of ``size`` bytes.

    Returns ``None`` when the header is to be ignored (RFC 9110 §14.2: a unit other than ``bytes``,
    bad syntax, ``last < first``, or more than :data:`MAX_RANGES` ranges); raises
    :class:`Unsatisfiable` when it is well formed but no range overlaps the file. Overlapping or
    adjacent ranges are coalesced; the parts keep the order the ranges were asked in (RFC 9110 §14.6),
    a coalesced part where the first of its ranges was.

    >>> parse_range("bytes=0-9,-5", 100), parse_range("bytes=90-,0-0", 100), parse_range("items=1-2", 100)
    ([(0, 9), (95, 99)], [(90, 99), (0, 0)], None)
    """
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    ranges = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue  # the list rule allows empty elements
        m = _RANGE_SPEC.match(item)
        if m is None or (not m.group(1) and not m.group(2)):
            return None
        first, last = m.group(1), m.group(2)
        if first:
            a, b = _position(first), _position(last) if last else size - 1
            if last and b < a:
                return None  # syntactically invalid: the whole header is ignored
            if a < size:
                ranges.append((a, min(b, size - 1)))
        else:  # suffix: the last n bytes
            n = _position(last)
            if n > 0 and size > 0:
                ranges.append((max(size - n, 0), size - 1))
    if not spec.strip() or not any(i.strip() for i in spec.split(",")):
        return None
    if not ranges:
        raise Unsatisfiable()
    merged: list[list[int]] = []  # [first, last, the first asked of its ranges]
    for a, b, i in sorted((a, b, i) for i, (a, b) in enumerate(ranges)):
        if merged and a <= merged[-1][1] + 1:
            merged[-1][1:] = [max(merged[-1][1], b), min(merged[-1][2], i)]
        else:
            merged.append([a, b, i])
    ranges = [(a, b) for a, b, _ in sorted(merged, key=lambda m: m[2])]
    return None if len(ranges) > MAX_RANGES else ranges


@dataclass(frozen=True)
class Validators:
    """What a response says about the version of the file it carries."""

    etag: str
    last_modified: float  # seconds since the epoch
    size: int

    @property
    def http_date(self) -> str:
        return email.utils.formatdate(self.last_modified, usegmt=True)


def _last_modified(st: os.stat_result) -> float:
    """The file's modification time, but never later than now (RFC 9110 §8.8.2.1: a date in the future is one no
    client could send back, so its copy would never revalidate)."""
    return min(st.st_mtime, time.time())


def evaluate_preconditions(headers: Any, v: Validators) -> int | None:
    """RFC 9110 §13.2.2 for GET / HEAD: 412, 304 or ``None`` (go on)."""
    if (h := headers.get("if-match")) is not None:
        tags = _etags(h)
        if tags is not None and not any(not weak and tag == v.etag for weak, tag in tags):
            return 412
    elif (h := headers.get("if-unmodified-since")) is not None:
        t = _http_date(h)
        if t is not None and int(v.last_modified) > t:
            return 412
    if (h := headers.get("if-none-match")) is not None:
        tags = _etags(h)
        if tags is None or any(tag == v.etag for _, tag in tags):  # weak comparison
            return 304
    elif (h := headers.get("if-modified-since")) is not None:
        t = _http_date(h)
        if t is not None and int(v.last_modified) <= t:
            return 304
    return None


def if_range_allows(headers: Any, v: Validators) -> bool:
    """``If-Range``: the range applies only to the version the client names (strongly)."""
    h = headers.get("if-range")
    if h is None:
        return True
    h = h.strip()
    if h.startswith('"') or h.startswith("W/"):
        return h == v.etag  # a weak tag never matches
    t = _http_date(h)
    return t is not None and t == int(v.last_modified)


# ================================================================================================
# the file response
# ================================================================================================
class _FileChanged(Exception):
    pass


def _read_exact(fd: int, n: int, offset: int, st0: os.stat_result) -> bytes:
    """``n`` bytes at ``offset`` of the file as it was opened; :class:`_FileChanged` if it was modified."""
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise _FileChanged(f"it shrank to {offset + len(data):,} bytes")
    st = os.fstat(fd)  # after the read: a write before it shows here, one after it did not reach these bytes
    # (not ctime: a rename, a chmod or the file's unlinking moves it too, and the bytes read are still the version
    # opened; a rewrite that sets the old mtime back is seen by the next request, whose ETag holds ctime)
    if st.st_size != st0.st_size or st.st_mtime_ns != st0.st_mtime_ns:
        raise _FileChanged("it was modified")
    return data


#: responses this server cut short on purpose whose "returned without completing response" line uvicorn has still
#: to log (:class:`_ExpectedEnds` drops one line per cut, and no other)
_CUTS = [0]
_CUTS_LOCK = threading.Lock()


def _count_cut() -> None:
    with _CUTS_LOCK:
        _CUTS[0] += 1


class FileResponse:
    """Part(s) of an open file, streamed in chunks from its descriptor (which this closes).

    ``parts``: ``[(prefix, first, last, suffix)]``, each sent as ``prefix``, the file's bytes
    ``first..last`` (inclusive; ``last < first`` for none) and ``suffix``; ``headers`` must include
    the exact Content-Length. ``bandwidth`` (bytes/s) throttles the body.
    """

    def __init__(self, fd: int, st: os.stat_result, name: str, status: int, headers: dict[str, str],
                 parts: list[tuple[bytes, int, int, bytes]], bandwidth: float | None) -> None:
        self.fd, self.st, self.name, self.status, self.headers = fd, st, name, status, headers
        self.parts, self.bandwidth = parts, bandwidth

    def _chunks(self) -> Iterator[tuple[bytes, int, int]]:
        """``(literal, offset, n)``: send ``literal`` or, when it is empty, ``n`` file bytes at ``offset``."""
        step = CHUNK if self.bandwidth is None else int(min(CHUNK, max(256, self.bandwidth / 20)))
        for prefix, first, last, suffix in self.parts:
            if prefix:
                yield prefix, 0, 0
            for off in range(first, last + 1, step):
                yield b"", off, min(step, last + 1 - off)
            if suffix:
                yield suffix, 0, 0

    async def _body(self, send: Send) -> None:
        t0, sent = time.monotonic(), 0
        for literal, off, n in self._chunks():
            data = literal or await anyio.to_thread.run_sync(_read_exact, self.fd, n, off, self.st)
            await send({"type": "http.response.body", "body": data, "more_body": True})
            sent += len(data)
            if self.bandwidth is not None:
                await anyio.sleep(max(0.0, t0 + sent / self.bandwidth - time.monotonic()))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
            await send({"type": "http.response.start", "status": self.status, "headers": raw})
            if scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return

            async def watch_disconnect(cancel: anyio.CancelScope) -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                cancel.cancel()  # the client went away: stop reading and sleeping for it

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_disconnect, tg.cancel_scope)
                try:
                    await self._body(send)
                except _FileChanged as exc:
                    # Returning without the end of the body makes the server cut the connection: the
                    # client sees a short body (Content-Length), never a silent mix of two versions.
                    log.warning("vqad serve: %s changed while being sent (%s): response cut short", self.name, exc)
                    _count_cut()
                except OSError as exc:  # a read error (a disk, a network mount): cut short the same way
                    log.error("vqad serve: reading %s failed (%s): response cut short", self.name, exc)
                    _count_cut()
                tg.cancel_scope.cancel()
        finally:
            os.close(self.fd)


# ================================================================================================
# file information (the index), cached per version
# ================================================================================================
class InfoCache:
    """``read_info`` of each file, remembered per (path, inode, mtime, size)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[str, dict[str, Any]]] = {}

    def describe(self, rel: str, real: Path) -> dict[str, Any]:
        """The listing entry of one file (``error`` says why it could not be read, if so)."""
        try:
            st = real.stat()
        except OSError as exc:
            return {"path": rel, "error": f"cannot read: {exc.strerror}"}
        key = make_etag(st)  # the version the file route serves (ctime included)
        with self._lock:
            hit = self._cache.get(rel)
        if hit is not None and hit[0] == key:
            return hit[1]
        url = "/" + quote(rel)
        entry: dict[str, Any] = {
            "path": rel, "url": url, "view_url": "/view/" + quote(rel), "bytes": st.st_size, "etag": key,
            "last_modified": email.utils.formatdate(_last_modified(st), usegmt=True), "kind": None, "complete": None,
            "lods": [], "error": None,
        }
        from vqad.fileformat import read_info

        try:
            info = read_info(real)
        except (VqadError, OSError) as exc:
            entry["error"] = str(exc)
        except Exception as exc:  # a decoder bug must not take the whole listing down
            log.exception("vqad serve: reading %s failed", real)
            entry["error"] = f"internal error reading the file (a bug in vqad, please report it): {exc!r}"
        else:
            entry.update(kind=info.config.get("kind"), complete=info.complete, error=info.damage or None,  # (intact LODs listed)
                         lods=[{"lod": lv.level, "prefix_bytes": lv.prefix_bytes} for lv in info.levels])
        with self._lock:
            self._cache[rel] = (key, entry)
        return entry

    def listing(self, root: Path) -> list[dict[str, Any]]:
        entries = [self.describe(rel, real) for rel, real in iter_files(root)]
        with self._lock:  # forget files that are gone
            present = {e["path"] for e in entries}
            self._cache = {rel: hit for rel, hit in self._cache.items() if rel in present}
        return entries


def _index_html(root: Path, entries: list[dict[str, Any]]) -> str:
    rows = []
    for e in entries:
        name = html.escape(e["path"])
        if e.get("url") is None:
            rows.append(f"<tr><td>{name}</td><td colspan=4 class=err>{html.escape(e['error'])}</td></tr>")
            continue
        lods = " · ".join(f"LOD {lv['lod']}: {lv['prefix_bytes']:,} B" for lv in e["lods"])
        note = html.escape(e["error"]) if e["error"] else lods + ("" if e["complete"] else " (incomplete file)")
        rows.append(
            f"<tr><td><a href=\"{html.escape(e['url'])}\">{name}</a></td>"
            f"<td><a href=\"{html.escape(e['view_url'])}\">view</a></td><td class=num>{e['bytes']:,}</td>"
            f"<td>{html.escape(e['kind'] or '')}</td><td{' class=err' if e['error'] else ''}>{note}</td></tr>")
    body = "\n".join(rows) or "<tr><td colspan=5>no .vqad files here yet (the list is read afresh on each visit)</td></tr>"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>vqad serve: {html.escape(root.name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left}}.num{{text-align:right}}.err{{color:#b00}}
code{{background:#f4f4f4;padding:.1em .3em}}</style></head><body>
<h1>.vqad files in {html.escape(root.name or str(root))}</h1>
<table><tr><th>file</th><th></th><th class=num>bytes</th><th>kind</th><th>bytes needed per level of detail</th></tr>
{body}
</table>
<p>Each file streams progressively: the first bytes decode to a coarse LOD. Fetch any byte range
(<code>curl -r 0-9999 URL</code>), or open it in the viewer (<code>vqad view URL</code>).
JSON listing: <a href="/api/files">/api/files</a>.</p>
</body></html>
"""


# ================================================================================================
# the application
# ================================================================================================
class _HostCheck:
    """Refuse requests whose Host header is not one of ``allowed`` (421): blocks DNS rebinding."""

    def __init__(self, app: ASGIApp, allowed: Collection[str]) -> None:
        self.app, self.allowed = app, {h.lower() for h in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            try:
                name = urlsplit(f"//{host}").hostname or ""
            except ValueError:  # e.g. an unclosed IPv6 bracket
                name = ""
            if name.lower() not in self.allowed:
                resp = PlainTextResponse(
                    f"this server answers only to {', '.join(sorted(self.allowed))} (Host was {host!r}); "
                    "start it with --host to serve other names\n", status_code=421)
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _may_start_viewer(headers: Any) -> bool:
    """Whether a ``/view/`` request may start a viewer: not one another site's page made by itself (an
    ``<img>``, a ``fetch``, a script's navigation: ``Sec-Fetch-Site: cross-site`` or ``same-site`` without a
    top-level navigation the user made, ``Sec-Fetch-User: ?1``). Clients that send no ``Sec-Fetch-*`` headers
    (curl, scripts), same-origin requests and addresses typed in the browser may."""
    site = headers.get("sec-fetch-site")
    if site in (None, "same-origin", "none"):
        return True
    return (headers.get("sec-fetch-mode") == "navigate" and headers.get("sec-fetch-dest") == "document"
            and headers.get("sec-fetch-user") == "?1")  # a click, not a script's window.open or location change


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _Viewers:
    """One viewer per (file, interface), started on first use and stopped with the server; at most ``limit`` at
    once (the least recently opened is stopped to start another)."""

    def __init__(self, factory: ViewerFactory | None, limit: int = MAX_VIEWERS) -> None:
        self.factory, self.limit = factory, limit
        self._lock = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self.handles: dict[tuple[str, str], ViewerHandle] = {}  # in the order last opened

    def get(self, key: tuple[str, str], source: str) -> ViewerHandle:
        """Start (once) the viewer for ``key`` on ``source``; ImportError when there is no viewer."""
        factory = self.factory
        if factory is None:
            from vqad.app.view import open_viewer as factory  # optional: needs the viewer's extra
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                handle = self.handles.pop(key, None)
                if handle is not None:
                    self.handles[key] = handle  # the most recent now
                    return handle
            handle = factory(source, host=key[1], port=0, bandwidth=None)
            with self._lock:
                self.handles[key] = handle
                old = [self.handles.pop(k) for k in list(self.handles)[: max(0, len(self.handles) - self.limit)]]
            for h in old:
                self._stop(h)
            return handle

    @staticmethod
    def _stop(h: ViewerHandle) -> None:
        try:
            h.stop()
        except Exception:  # stopping one must not keep the others running
            log.exception("vqad serve: stopping the viewer at %s failed", getattr(h, "url", "?"))

    def stop_all(self) -> None:
        with self._lock:
            handles, self.handles = list(self.handles.values()), {}
        for h in handles:
            self._stop(h)


def create_app(root: Path, bandwidth: float | None = None, viewer_factory: ViewerFactory | None = None, *,
               allowed_hosts: Collection[str] | None = LOOPBACK_HOSTS) -> Starlette:
    """The ASGI application serving the ``.vqad`` files under ``root`` (see the module docstring).

    Args:
        root: the folder to serve (resolved here: symlinks out of it are refused).
        bandwidth: bytes per second that each file response is throttled to (None: as fast as it goes).
        viewer_factory: ``open_viewer(source, host=, port=, bandwidth=) -> handle`` used by
            ``/view/<path>`` (default: ``vqad.app.view.open_viewer``, imported on first use).
        allowed_hosts: the Host names answered (default the loopback names); None answers any, as a
            server bound to a public interface must.
    Raises:
        InputError: ``root`` is not a directory, or ``bandwidth`` is not a positive number.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root} is not a directory: give the folder that holds the .vqad files to serve")
    root = root.resolve()
    if bandwidth is not None and not (isinstance(bandwidth, (int, float)) and 0 < bandwidth < float("inf")):
        raise InputError(f"bandwidth must be a positive number of bytes per second, got {bandwidth!r}")
    infos = InfoCache()
    viewers = _Viewers(viewer_factory)

    def refused(exc: Refused) -> PlainTextResponse:
        return PlainTextResponse(f"{exc}\n", status_code=exc.status)

    async def index(request: Request) -> Response:
        entries = await run_in_threadpool(infos.listing, root)
        return HTMLResponse(_index_html(root, entries), headers={"Cache-Control": "no-store"})

    async def api_files(request: Request) -> Response:
        entries = await run_in_threadpool(infos.listing, root)
        return JSONResponse(entries, headers={"Cache-Control": "no-store"})

    async def view(request: Request) -> Response:
        rel = request.path_params["path"]
        try:
            resolve_file(root, rel)
        except Refused as exc:
            return refused(exc)
        if request.method == "HEAD":  # a link checker's or a preview's HEAD starts no viewer (threads, memory)
            return PlainTextResponse("", status_code=405, headers={"Allow": "GET"})
        if not _may_start_viewer(request.headers):
            return PlainTextResponse("a viewer opens only when you follow a link or enter its address (this request "
                                     "came from another site's page)\n", status_code=403)
        server_host, server_port = request.scope["server"]  # this connection's own address: reachable from here
        source = f"http://{_url_host(server_host)}:{server_port}/{quote(rel)}"
        public = f"{request.base_url}{quote(rel)}"
        try:
            handle = await run_in_threadpool(viewers.get, (rel, server_host), source)
        except ImportError as exc:
            cmd = f"vqad view {public}"
            page = (f"<!doctype html><meta charset=utf-8><title>no viewer</title><h1>The viewer is not installed</h1>"
                    f"<p>{html.escape(str(exc))}</p><p>Install it (<code>pip install 'vqad[view]'</code>) and reload "
                    f"this page, or run the viewer yourself:</p><pre>{html.escape(cmd)}</pre>")
            return HTMLResponse(page, status_code=501)
        except VqadError as exc:  # the file is not a readable model (damaged, cut short): say so, no traceback
            log.warning("vqad serve: no viewer for %s: %s", rel, exc)
            page = (f"<!doctype html><meta charset=utf-8><title>cannot view</title><h1>This file cannot be viewed</h1>"
                    f"<p>{html.escape(str(exc))}</p>")
            return HTMLResponse(page, status_code=422)
        except Exception as exc:
            log.exception("vqad serve: starting the viewer for %s failed", rel)
            page = (f"<!doctype html><meta charset=utf-8><title>viewer failed</title><h1>The viewer did not start</h1>"
                    f"<p>{html.escape(str(exc))}</p><p>Run it yourself:</p><pre>vqad view {html.escape(public)}</pre>")
            return HTMLResponse(page, status_code=500)
        target = urlsplit(handle.url)
        if target.hostname in ("0.0.0.0", "::", ""):  # a wildcard bind: send the client to the name it used
            port = f":{target.port}" if target.port else ""
            target = target._replace(netloc=f"{_url_host(request.url.hostname or 'localhost')}{port}")
        return RedirectResponse(urlunsplit(target), status_code=303)

    async def file(request: Request) -> Response:
        rel = request.path_params["path"]
        try:
            fd, st = await run_in_threadpool(open_servable, root, rel)
        except Refused as exc:
            return refused(exc)
        try:
            response = _file_response(request, fd, st, rel)
        except Refused as exc:
            os.close(fd)
            return refused(exc)
        except BaseException:
            os.close(fd)
            raise
        if not isinstance(response, FileResponse):
            os.close(fd)
        return response

    def _file_response(request: Request, fd: int, st: os.stat_result, rel: str) -> Response | FileResponse:
        v = Validators(make_etag(st), _last_modified(st), st.st_size)
        headers = {"Accept-Ranges": "bytes", "ETag": v.etag, "Last-Modified": v.http_date, "Cache-Control": "no-cache"}
        status = evaluate_preconditions(request.headers, v)
        if status is not None:
            return Response(status_code=status, headers=headers)
        ranges = None
        if (h := request.headers.get("range")) is not None and if_range_allows(request.headers, v):
            try:
                ranges = parse_range(h, v.size)
            except Unsatisfiable:
                return PlainTextResponse(f"none of the ranges {h!r} lies within the file's {v.size:,} bytes\n",
                                         status_code=416, headers={**headers, "Content-Range": f"bytes */{v.size}"})
        if ranges is None:
            parts, status = [(b"", 0, v.size - 1, b"")], 200
            headers.update({"Content-Type": CONTENT_TYPE, "Content-Length": str(v.size)})
        elif len(ranges) == 1:
            (a, b), status = ranges[0], 206
            parts = [(b"", a, b, b"")]
            headers.update({"Content-Type": CONTENT_TYPE, "Content-Length": str(b - a + 1),
                            "Content-Range": f"bytes {a}-{b}/{v.size}"})
        else:
            boundary, status = secrets.token_hex(16), 206
            parts = [(f"--{boundary}\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Range: bytes {a}-{b}/{v.size}\r\n\r\n"
                      .encode("ascii"), a, b, b"\r\n") for a, b in ranges]
            parts.append((f"--{boundary}--\r\n".encode("ascii"), 0, -1, b""))
            length = sum(len(p) + (b - a + 1) + len(s) for p, a, b, s in parts)
            headers.update({"Content-Type": f"multipart/byteranges; boundary={boundary}", "Content-Length": str(length)})
        return FileResponse(fd, st, rel, status, headers, parts, bandwidth)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await run_in_threadpool(viewers.stop_all)

    # on loopback, only pages served from this machine may read across origins (a page of any web site could
    # otherwise read every file: its requests' Host is 127.0.0.1 too); served to the network, the files are public
    origins = dict(allow_origins=["*"]) if allowed_hosts is None else dict(allow_origin_regex=LOOPBACK_ORIGINS)
    middleware = [Middleware(CORSMiddleware, **origins, allow_methods=["GET", "HEAD"],
                             allow_headers=["Range", "If-Range", "If-None-Match", "If-Match", "If-Modified-Since",
                                            "If-Unmodified-Since"],
                             expose_headers=list(EXPOSED_HEADERS), max_age=3600)]
    if allowed_hosts is not None:
        middleware.insert(0, Middleware(_HostCheck, allowed=allowed_hosts))
    app = Starlette(routes=[
        Route("/", index, methods=["GET"]),
        Route("/api/files", api_files, methods=["GET"]),
        Route("/view/{path:path}", view, methods=["GET"]),
        Route("/{path:path}", file, methods=["GET"]),
    ], middleware=middleware, lifespan=lifespan)
    app.state.root, app.state.viewers, app.state.bandwidth = root, viewers, bandwidth
    return app


# ================================================================================================
# running it
# ================================================================================================
def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return f"http://{_url_host(host)}:{port}/"


class _ExpectedEnds(logging.Filter):
    """Drops uvicorn's error lines for what this server means to do: a response it cut short on purpose (the file
    changed: :class:`FileResponse` logs why, and counts the cut in :data:`_CUTS`) and responses still in flight
    cancelled as Ctrl-C stops the server (uvicorn logs each as a 50-line traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("ASGI callable returned without completing response"):
            with _CUTS_LOCK:
                if _CUTS[0] > 0:
                    _CUTS[0] -= 1
                    return False
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return not (msg.startswith("Exception in ASGI application") and isinstance(exc, asyncio.CancelledError))


def _server(app: ASGIApp, quiet: bool):
    import uvicorn

    error_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _ExpectedEnds) for f in error_log.filters):
        error_log.addFilter(_ExpectedEnds())

    config = uvicorn.Config(app, log_level="warning", access_log=not quiet, lifespan="on",
                            timeout_graceful_shutdown=GRACEFUL_SECONDS, server_header=False)
    if not quiet:  # requests on stdout, uvicorn's own start-up chatter not
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    return uvicorn.Server(config)


def _allowed_hosts(host: str) -> tuple[str, ...] | None:
    """The Host names a server bound to ``host`` answers: the loopback names and ``host`` itself (127.0.1.1, which
    Debian maps the machine's name to, is loopback too), or any (None) when it is bound to another interface."""
    if not is_loopback(host):
        return None
    return tuple(dict.fromkeys((*LOOPBACK_HOSTS, host.strip("[]").lower())))


class BackgroundServer:
    """A server running in a daemon thread, for tests and for tools that embed one.

    >>> with BackgroundServer(folder) as url:          # "http://127.0.0.1:PORT/"
    ...     urllib.request.urlopen(url + "x.vqad").read()

    Args are :func:`create_app`'s, plus ``host`` / ``port`` (default a free loopback port).
    Leaving the block stops the server (viewers included) and waits for its thread.
    """

    def __init__(self, root: Path, bandwidth: float | None = None, viewer_factory: ViewerFactory | None = None, *,
                 host: str = "127.0.0.1", port: int = 0, start_timeout: float = 20.0) -> None:
        self.app = create_app(root, bandwidth, viewer_factory, allowed_hosts=_allowed_hosts(host))
        self.host, self.port, self.start_timeout = host, port, start_timeout
        self.url: str | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Start serving; returns the base URL (ending in ``/``)."""
        sock = bind_socket(self.host, self.port)
        self.url = _url(sock)
        self._server = _server(self.app, quiet=True)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="vqad-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server on {self.url} did not start (see the log above)")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        """Stop serving and wait (a few seconds at most) for the thread to end."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(GRACEFUL_SECONDS + 10)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(root: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT, bandwidth: float | None = None,
          viewer_factory: ViewerFactory | None = None, quiet: bool = False) -> None:
    """Serve ``root`` until Ctrl-C (or SIGTERM); prints where, and a warning when others can connect."""
    public = not is_loopback(host)
    app = create_app(root, bandwidth, viewer_factory, allowed_hosts=_allowed_hosts(host))
    root = app.state.root
    files = [rel for rel, _ in iter_files(root)]
    if not files:
        print(f"warning: {root} holds no .vqad files yet; files added later are served as they appear")
    shadowed = [rel for rel in files if rel.split("/", 1)[0] == "view"]  # /view/<file> opens the viewer on <file>
    if shadowed:
        print(f"warning: {len(shadowed)} file(s) under {root}/view/ cannot be fetched (/view/<file> opens the viewer "
              f"on <file>): move them, e.g. {shadowed[0]}")
    sock = bind_socket(host, port)
    url = _url(sock)
    if public:
        port = sock.getsockname()[1]
        print(f"warning: listening on {host}: anyone who can reach this machine on port {port} can download these "
              "files (there is no authentication); the default --host 127.0.0.1 keeps them private")
        print(f"  others connect to http://{_url_host(socket.gethostname())}:{port}/ (or this machine's address)")
    rate = f", throttled to {format_rate(bandwidth)} per response" if bandwidth is not None else ""
    print(f"Serving {root} at {url} (Ctrl-C to stop)\n  {len(files)} file(s){rate}; JSON listing {url}api/files; "
          f"viewer {url}view/<file>", flush=True)
    _server(app, quiet).run(sockets=[sock])


__all__ = ["create_app", "serve", "BackgroundServer", "parse_rate", "resolve_file", "iter_files", "parse_range", "make_etag",
           "Refused", "Unsatisfiable", "CONTENT_TYPE", "DEFAULT_PORT", "LOOPBACK_HOSTS", "MAX_RANGES"]
