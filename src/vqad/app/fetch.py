"""Progressive fetching of a ``.vqad`` file: a local path or an ``http(s)://`` URL, block by block.

The viewer decodes each level of detail as soon as its bytes have arrived, so the bytes must come
as they arrive, not after the whole download:

* **HTTP with ranges** (the server answers ``Range: bytes=0-N`` with ``206 Partial Content``):
  successive Range requests of growing size (16 kB, 32 kB, ... up to 1 MiB), each body streamed.
  A dropped connection is resumed from the byte reached (``Range: bytes=K-``) with ``If-Range``
  set to the first answer's validator (ETag, else Last-Modified), so a file that changed on the
  server in the meantime is detected instead of spliced.
* **HTTP without ranges** (``200 OK`` to the probe): one streamed GET. A dropped connection is
  retried from the start, skipping the bytes already delivered.
* **A local file**: read in blocks.

``bandwidth`` (bytes/s, :func:`parse_rate` turns ``"1Mbit"`` into 125000) throttles any of them
through a token bucket, to simulate a slow link.

Public API::

    parse_rate(text) -> float                                   bytes per second
    open_source(source, bandwidth=None, block=16384) -> ProgressiveSource
    iter_source_blocks(source, bandwidth=None, block=16384) -> Iterator[bytes]
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import Iterator

from vqad.app.rates import parse_rate  # noqa: F401 (re-exported: --bandwidth of vqad view)
from vqad.errors import InputError

#: the first Range request's size, doubled per request up to MAX_RANGE
FIRST_RANGE = 16 * 1024
MAX_RANGE = 1 << 20
#: consecutive failed attempts on one byte offset before giving up
RETRIES = 3
TIMEOUT_S = 15.0


class FetchError(InputError):
    """The source cannot be fetched (HTTP error, connection lost for good, file changed on the server)."""




class TokenBucket:
    """Releases ``rate`` bytes per second: :meth:`take` sleeps until ``n`` more bytes may pass.

    The bucket starts empty and holds at most ``burst`` bytes, so byte ``i`` of a transfer passes
    no earlier than ``i / rate`` seconds after the first :meth:`take` (up to ``burst``).
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if not rate > 0:
            raise InputError(f"bandwidth must be positive, got {rate!r} bytes/s")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1024.0, rate / 50))
        self._tokens = 0.0
        self._t = None
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            if self._t is None:
                self._t = now
            self._tokens = min(self._tokens + (now - self._t) * self.rate, self.burst)
            self._t = now
            self._tokens -= n
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for s in range(0, len(data), size):
        yield data[s : s + size]


# ------------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------------
def is_url(source) -> bool:
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


class ProgressiveSource:
    """The bytes of a ``.vqad`` source in arrival order: iterate it for ``bytes`` blocks.

    Attributes:
        name: the path or URL.
        total: the file's size in bytes when known (local file, ``Content-Length`` or
            ``Content-Range``), else None.
        ranges: whether the bytes come from HTTP Range requests.
        resumes: how many times a dropped connection was resumed.
    """

    name: str
    total: int | None = None
    ranges: bool = False
    resumes: int = 0

    def __iter__(self) -> Iterator[bytes]:
        raise NotImplementedError

    def close(self) -> None:
        """Stop: a blocked read returns soon, iteration ends."""


class FileSource(ProgressiveSource):
    def __init__(self, path: str | Path, bandwidth: float | None = None, block: int = FIRST_RANGE) -> None:
        p = Path(path)
        if not p.is_file():
            raise InputError(f"no such file: {p} (pass a .vqad file, a checkpoint directory or an http(s):// URL)")
        st = p.stat()
        self.name, self.path, self.total = str(p), p, st.st_size
        self._stamp = (st.st_ino, st.st_size, st.st_mtime_ns)  # the file as it was opened: a change is noticed
        self.block = max(int(block), 1)
        self.bucket = TokenBucket(bandwidth, burst=min(self.block, max(bandwidth / 50, 512))) if bandwidth else None
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        piece = min(self.block, 4096) if self.bucket else self.block
        try:
            f = open(self.path, "rb")
        except OSError as exc:
            raise InputError(f"cannot read {self.path}: {exc.strerror}") from exc
        with f:
            while not self._closed:
                data = f.read(piece)
                st = os.fstat(f.fileno())  # after the read: a block read while the file was rewritten is not passed on
                if (st.st_ino, st.st_size, st.st_mtime_ns) != self._stamp:
                    raise FetchError(f"{self.name} changed on disk while it was being read (rewritten in place): open "
                                     "it again")
                if not data:
                    return
                if self.bucket:
                    self.bucket.take(len(data))
                yield data

    def close(self) -> None:
        self._closed = True


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class HttpSource(ProgressiveSource):
    """An ``http(s)://`` URL fetched as described in the module docstring (httpx)."""

    def __init__(self, url: str, bandwidth: float | None = None, block: int = FIRST_RANGE,
                 timeout: float = TIMEOUT_S, retries: int = RETRIES) -> None:
        try:
            import httpx
        except ImportError as exc:
            raise InputError("fetching a URL needs httpx: pip install 'vqad[view]'") from exc
        self._httpx = httpx
        self.name, self.block, self.retries = url, max(int(block), 1024), retries
        self.bucket = TokenBucket(bandwidth, burst=min(4096, max(bandwidth / 50, 512))) if bandwidth else None
        self.client = httpx.Client(timeout=timeout, follow_redirects=True, headers={"Accept-Encoding": "identity"})
        self._closed = False
        self.validator: str | None = None
        # the probe: its answer says whether ranges work and how large the file is; its body is the first block
        self._first = self._request(0, self.block - 1, probe=True)

    # -- requests ---------------------------------------------------------------------------------
    def _request(self, start: int, end: int | None, probe: bool = False):
        """Send a GET for bytes ``start..end`` (``end`` None: to the end) and return the open response."""
        httpx = self._httpx
        headers = {"Range": f"bytes={start}-{'' if end is None else end}"}
        if self.validator and not probe:
            headers["If-Range"] = self.validator
        try:
            resp = self.client.send(self.client.build_request("GET", self.name, headers=headers), stream=True)
        except httpx.InvalidURL as exc:
            raise FetchError(f"{self.name} is not a valid URL ({exc})") from exc
        except httpx.TooManyRedirects as exc:
            raise FetchError(f"cannot fetch {self.name}: the server redirects in a loop ({exc})") from exc
        except httpx.UnsupportedProtocol as exc:
            raise FetchError(f"cannot fetch {self.name}: {exc} (only http:// and https:// URLs, also after "
                             "redirects)") from exc
        except httpx.TransportError as exc:
            if probe:
                raise FetchError(f"cannot fetch {self.name}: {type(exc).__name__}: {exc or 'no answer'} "
                                 "(is the server running and the address right?)") from exc
            raise
        if resp.status_code == 416 and start > 0 and self.total is not None and start >= self.total:
            resp.close()
            return None
        if resp.status_code not in (200, 206):
            resp.close()
            hint = {404: "check the path", 403: "the server refuses access", 401: "the server wants credentials"}
            raise FetchError(f"cannot fetch {self.name}: HTTP {resp.status_code} {resp.reason_phrase}"
                             + (f" ({hint[resp.status_code]})" if resp.status_code in hint else ""))
        if probe:
            self.validator = resp.headers.get("etag") or resp.headers.get("last-modified")
            if resp.status_code == 206:
                self.ranges = True
                m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
                self.total = int(m.group(3)) if m and m.group(3) != "*" else None
            else:
                length = resp.headers.get("content-length")
                self.total = int(length) if length and length.isdigit() else None
            return resp
        if self.ranges and resp.status_code == 200:
            # If-Range failed (or the server forgot ranges): the file changed under us
            resp.close()
            raise FetchError(f"{self.name} changed on the server while it was being fetched (its validator is no "
                             f"longer {self.validator}): open it again to view the new file")
        if self.ranges:
            m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
            if m is None or int(m.group(1)) != start:
                resp.close()
                raise FetchError(f"{self.name}: the server answered a Range request for byte {start:,} with "
                                 f"{resp.headers.get('content-range')!r}; it cannot be fetched progressively")
            new = resp.headers.get("etag") or resp.headers.get("last-modified")
            total = None if m.group(3) == "*" else int(m.group(3))
            if (self.validator and new and new != self.validator) or (
                    self.total is not None and total is not None and total != self.total):
                resp.close()
                size = "" if total in (None, self.total) else f" (its size went from {self.total:,} to {total:,} bytes)"
                raise FetchError(f"{self.name} changed on the server while it was being fetched{size}: open it again")
        return resp

    def _body(self, resp) -> Iterator[bytes]:
        piece = 4096 if self.bucket else 1 << 16
        try:
            for data in resp.iter_raw():  # as the bytes arrive (a chunk size would make httpx wait to fill it)
                if self._closed:
                    return
                for part in (_pieces(data, piece) if len(data) > piece else (data,)):
                    if self.bucket:
                        self.bucket.take(len(part))
                    yield part
        finally:
            resp.close()

    # -- iteration --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[bytes]:
        httpx = self._httpx
        pos, resp, size, failures = 0, self._first, 2 * self.block, 0
        self._first = None
        try:
            while not self._closed:
                skip = 0 if self.ranges else pos
                got = 0
                try:  # (a failed request and a body cut short are retried alike)
                    if resp is None:  # the next request: a growing Range, or a resume
                        if self.ranges:
                            if self.total is not None and pos >= self.total:
                                return
                            end = pos + size - 1
                            if self.total is not None:
                                end = min(end, self.total - 1)
                            resp = self._request(pos, end)
                            if resp is None:
                                return
                            size = min(size * 2, MAX_RANGE)
                        else:  # no ranges: the whole GET again, skipping what was delivered
                            resp = self._request(0, None)
                    for data in self._body(resp):
                        if skip:
                            cut = min(skip, len(data))
                            data, skip = data[cut:], skip - cut
                            if not data:
                                continue
                        got += len(data)
                        pos += len(data)
                        failures = 0
                        yield data
                except (httpx.TransportError, httpx.StreamError) as exc:
                    failures += 1
                    if failures > self.retries:
                        raise FetchError(f"the connection to {self.name} was lost at byte {pos:,} "
                                         f"({type(exc).__name__}) and {self.retries} retries failed") from exc
                    self.resumes += 1
                    time.sleep(0.1 * failures)
                    resp = None
                    continue
                resp = None
                if not self.ranges:
                    return  # the one GET has ended
                if got == 0:  # an empty 206: the end of the file (total unknown)
                    return
        finally:
            self.client.close()

    def close(self) -> None:
        self._closed = True


def open_source(source: str | Path, bandwidth: float | None = None, block: int = FIRST_RANGE) -> ProgressiveSource:
    """A local ``.vqad`` file or an ``http(s)://`` URL as a :class:`ProgressiveSource`.

    For a URL the first request is sent here (so a wrong address or an HTTP error is raised at once,
    as :class:`FetchError`); its body is read by the iteration.
    """
    if bandwidth is not None and not bandwidth > 0:
        raise InputError(f"bandwidth must be positive, got {bandwidth!r} bytes/s")
    if is_url(source):
        return HttpSource(str(source), bandwidth, block)
    if isinstance(source, str) and "://" in source:
        raise InputError(f"cannot open {source!r}: only http:// and https:// URLs are supported")
    return FileSource(source, bandwidth, block)


def iter_source_blocks(source: str | Path, bandwidth: float | None = None, block: int = FIRST_RANGE) -> Iterator[bytes]:
    """The bytes of ``source`` (path or URL) block by block as they arrive (see :func:`open_source`)."""
    yield from open_source(source, bandwidth, block)


__all__ = ["FetchError", "ProgressiveSource", "FileSource", "HttpSource", "TokenBucket", "parse_rate", "open_source",
           "iter_source_blocks", "is_url"]
