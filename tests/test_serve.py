"""``vqad serve``: byte ranges, validators, path safety, concurrency and streaming against a real server.

Every test talks to a real uvicorn server on a loopback port (``BackgroundServer``) through real
HTTP clients (httpx, urllib, and raw sockets where a client library would tidy the request up).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from test_fileformat import make_field
from vqad import fileformat as F
from vqad.app.cli import main
from vqad.app.rates import format_rate, parse_rate
from vqad.app.serve import MAX_RANGES, BackgroundServer, Unsatisfiable, parse_range
from vqad.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BIG = 256 << 10  # bytes of the file the range / concurrency / throttling tests draw from


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A served folder: a real model, one in a subfolder (a space in its name), a big file of random bytes
    (not a valid .vqad: listed with its error), an empty one, and things that must never be served."""
    base = tmp_path_factory.mktemp("serve")
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    field = make_field(levels=(2, 5), k=4, hidden=8, n_points=300, surface=True)
    F.save(field, root / "model.vqad")
    shutil.copy(root / "model.vqad", root / "sub" / "deep model.vqad")
    (root / "big.vqad").write_bytes(random.Random(0).randbytes(BIG))
    (root / "empty.vqad").write_bytes(b"")
    (root / "notes.txt").write_text("not a model\n")
    (root / ".hidden.vqad").write_bytes(b"secret")
    (root / "folder.vqad").mkdir()
    (base / "secret.vqad").write_bytes(b"outside the served folder")
    (root / "escape.vqad").symlink_to(base / "secret.vqad")
    (root / "inside.vqad").symlink_to(root / "model.vqad")  # a link that stays inside: served
    return root, field


@pytest.fixture(scope="module")
def server(site):
    root, _ = site
    with BackgroundServer(root) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=20) as c:
        yield c


def raw_request(url: str, target: str, headers: dict[str, str] | None = None, method: str = "GET",
                timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request written byte for byte (no client tidies ``..`` or ``//`` away)."""
    u = urlsplit(url)
    headers = {"Host": f"{u.hostname}:{u.port}", "Connection": "close", **(headers or {})}
    lines = [f"{method} {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection((u.hostname, u.port), timeout=timeout) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    hdrs = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), hdrs, body


# -- ranges ------------------------------------------------------------------------------------------
def test_random_ranges_equal_the_files_bytes(site, client):
    root, _ = site
    data = (root / "big.vqad").read_bytes()
    rng = random.Random(1)
    for _ in range(150):
        form = rng.choice(["closed", "open", "suffix"])
        a = rng.randrange(BIG)
        if form == "closed":
            b = rng.randrange(a, BIG + 1000)  # past the end: clamped
            spec, want = f"{a}-{b}", (a, min(b, BIG - 1))
        elif form == "open":
            spec, want = f"{a}-", (a, BIG - 1)
        else:
            n = rng.randrange(1, BIG + 1000)
            spec, want = f"-{n}", (max(BIG - n, 0), BIG - 1)
        r = client.get("/big.vqad", headers={"Range": f"bytes={spec}"})
        assert r.status_code == 206, spec
        assert r.headers["content-range"] == f"bytes {want[0]}-{want[1]}/{BIG}"
        assert int(r.headers["content-length"]) == want[1] - want[0] + 1
        assert r.content == data[want[0]: want[1] + 1], spec
        assert r.headers["content-type"] == "application/x-vqad"


def test_whole_file_and_head(site, client):
    root, _ = site
    data = (root / "big.vqad").read_bytes()
    r = client.get("/big.vqad")
    assert r.status_code == 200 and r.content == data
    assert r.headers["accept-ranges"] == "bytes" and r.headers["content-length"] == str(BIG)
    assert r.headers["cache-control"] == "no-cache" and r.headers["last-modified"]
    assert re.fullmatch(r'"[0-9a-f-]+"', r.headers["etag"])  # strong
    for headers, status in [({}, 200), ({"Range": "bytes=10-19"}, 206), ({"Range": f"bytes={BIG}-"}, 416)]:
        got, head = client.get("/big.vqad", headers=headers), client.head("/big.vqad", headers=headers)
        assert head.status_code == got.status_code == status and head.content == b""
        drop = {"date"}
        assert {k: v for k, v in head.headers.items() if k not in drop} == \
               {k: v for k, v in got.headers.items() if k not in drop}


def _multipart(r: httpx.Response) -> list[tuple[str, bytes]]:
    boundary = re.fullmatch(r"multipart/byteranges; boundary=(\S+)", r.headers["content-type"]).group(1).encode()
    body = r.content
    assert body.endswith(b"--" + boundary + b"--\r\n")
    parts = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, _, payload = chunk.partition(b"\r\n\r\n")
        assert payload.endswith(b"\r\n")
        rng = re.search(rb"Content-Range: bytes (\S+)", head).group(1).decode()
        parts.append((rng, payload[:-2]))
    return parts


def test_several_ranges_come_back_as_multipart_byteranges(site, client):
    root, _ = site
    data = (root / "big.vqad").read_bytes()
    r = client.get("/big.vqad", headers={"Range": "bytes=0-9, 1000-1999,-50"})
    assert r.status_code == 206 and int(r.headers["content-length"]) == len(r.content)
    assert _multipart(r) == [(f"0-9/{BIG}", data[:10]), (f"1000-1999/{BIG}", data[1000:2000]),
                             (f"{BIG - 50}-{BIG - 1}/{BIG}", data[-50:])]
    # overlapping and unordered ranges are coalesced: here into one, so a plain 206
    r = client.get("/big.vqad", headers={"Range": "bytes=500-599,0-99,50-520"})
    assert r.status_code == 206 and r.headers["content-range"] == f"bytes 0-599/{BIG}" and r.content == data[:600]
    # too many ranges: the whole file (a server may ignore Range)
    many = ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(MAX_RANGES + 1))
    r = client.get("/big.vqad", headers={"Range": f"bytes={many}"})
    assert r.status_code == 200 and r.content == data


@pytest.mark.parametrize("spec", [f"bytes={BIG}-", f"bytes={BIG + 5}-{BIG + 10}", "bytes=-0", f"bytes={BIG}-,-0"])
def test_unsatisfiable_ranges_are_416_with_the_size(client, spec):
    r = client.get("/big.vqad", headers={"Range": spec})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{BIG}"


def test_range_numbers_longer_than_python_parses_are_positions_past_the_file(client):
    """int() refuses strings over 4,300 digits: such a position is past any file, not a server error."""
    r = client.get("/big.vqad", headers={"Range": "bytes=0-" + "9" * 5000})
    assert r.status_code == 206 and r.headers["content-range"] == f"bytes 0-{BIG - 1}/{BIG}"
    r = client.get("/big.vqad", headers={"Range": "bytes=" + "9" * 5000 + "-"})
    assert r.status_code == 416


def test_any_range_of_an_empty_file_is_416(client):
    assert client.get("/empty.vqad").content == b""
    r = client.get("/empty.vqad", headers={"Range": "bytes=0-"})
    assert r.status_code == 416 and r.headers["content-range"] == "bytes */0"


@pytest.mark.parametrize("spec", ["bytes=5-2", "bytes=abc", "items=0-1", "bytes=", "bytes=1-2-3", "bytes 0-1", "bytes=-",
                                  "bytes=0x10-20"])
def test_malformed_range_headers_are_ignored(site, client, spec):
    r = client.get("/big.vqad", headers={"Range": spec})
    assert r.status_code == 200 and len(r.content) == BIG and "content-range" not in r.headers


def test_parse_range_against_a_reference():
    """The parser against slicing: every well-formed single range on small files."""
    for size in range(0, 6):
        for a in range(0, 8):
            for b in range(a, 8):
                want = [(a, min(b, size - 1))] if a < size else None
                try:
                    got = parse_range(f"bytes={a}-{b}", size)
                except Unsatisfiable:
                    got = None
                assert got == want, (size, a, b)
        for n in range(0, 8):
            try:
                got = parse_range(f"bytes=-{n}", size)
            except Unsatisfiable:
                got = None
            assert got == ([(max(size - n, 0), size - 1)] if n > 0 and size > 0 else None)


def test_parse_range_coalesces_and_keeps_the_order_asked():
    """Several ranges against a reference: the parts cover exactly the bytes asked, none overlaps or
    touches another, and they come in the order their first range was asked in (RFC 9110 §14.6)."""
    rng = random.Random(0)
    size = 40
    for _ in range(3000):
        asked = [tuple(sorted(rng.sample(range(size + 5), 2))) for _ in range(rng.randint(2, 5))]
        header = "bytes=" + ",".join(f"{a}-{b}" for a, b in asked)
        inside = [(a, min(b, size - 1)) for a, b in asked if a < size]
        if not inside:
            with pytest.raises(Unsatisfiable):
                parse_range(header, size)
            continue
        got = parse_range(header, size)
        want = sorted({i for a, b in inside for i in range(a, b + 1)})
        assert sorted(i for a, b in got for i in range(a, b + 1)) == want, asked
        spans = sorted(got)
        assert all(q[0] > p[1] + 1 for p, q in zip(spans, spans[1:])), (asked, got)
        first_asked = [min(k for k, (a, b) in enumerate(inside) if p[0] <= a and b <= p[1]) for p in got]
        assert first_asked == sorted(first_asked), (asked, got)
    assert parse_range("bytes=50-59,0-9", 100) == [(50, 59), (0, 9)]
    assert parse_range("bytes=50-59,0-9,10-19", 100) == [(50, 59), (0, 19)]


# -- validators ------------------------------------------------------------------------------------------
def test_conditional_requests(client):
    first = client.get("/model.vqad")
    etag, modified = first.headers["etag"], first.headers["last-modified"]
    size = len(first.content)
    r = client.get("/model.vqad", headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    assert client.get("/model.vqad", headers={"If-None-Match": f'"other", W/{etag}'}).status_code == 304  # weak compare
    assert client.get("/model.vqad", headers={"If-None-Match": '"other"'}).status_code == 200
    assert client.get("/model.vqad", headers={"If-Modified-Since": modified}).status_code == 304
    old = formatdate(0, usegmt=True)
    assert client.get("/model.vqad", headers={"If-Modified-Since": old}).status_code == 200
    # If-Range: the range while the file is the version named, the whole file otherwise
    r = client.get("/model.vqad", headers={"Range": "bytes=0-99", "If-Range": etag})
    assert r.status_code == 206 and r.content == first.content[:100]
    r = client.get("/model.vqad", headers={"Range": "bytes=0-99", "If-Range": modified})
    assert r.status_code == 206
    for stale in ['"0-0-0"', f"W/{etag}", old]:
        r = client.get("/model.vqad", headers={"Range": "bytes=0-99", "If-Range": stale})
        assert r.status_code == 200 and len(r.content) == size, stale
    assert client.get("/model.vqad", headers={"If-Match": '"0-0-0"'}).status_code == 412
    assert client.get("/model.vqad", headers={"If-Match": etag}).status_code == 200
    assert client.get("/model.vqad", headers={"If-Unmodified-Since": old}).status_code == 412


def test_cors_lets_pages_of_this_machine_read_ranges_and_no_other_site(client):
    """On loopback a page from this machine (another port: the viewer) may read across origins; a page of any
    web site may not (its requests reach 127.0.0.1 with a loopback Host too, so only CORS keeps it out)."""
    r = client.get("/model.vqad", headers={"Origin": "http://127.0.0.1:8080", "Range": "bytes=0-9"})
    assert r.status_code == 206 and r.headers["access-control-allow-origin"] == "http://127.0.0.1:8080"
    for origin in ("http://localhost:3000", "https://[::1]"):
        assert client.get("/api/files", headers={"Origin": origin}).headers["access-control-allow-origin"] == origin
    for origin in ("https://evil.example", "http://localhost.evil.example", "http://127.0.0.1.evil.example:80"):
        r = client.get("/api/files", headers={"Origin": origin})
        assert "access-control-allow-origin" not in r.headers, origin
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    assert {"content-range", "accept-ranges", "etag", "content-length"} <= exposed
    pre = client.options("/model.vqad", headers={"Origin": "http://127.0.0.1:8080", "Access-Control-Request-Method": "GET",
                                                 "Access-Control-Request-Headers": "range, if-range"})
    assert pre.status_code == 200 and "GET" in pre.headers["access-control-allow-methods"]


# -- what is served, and what never is -------------------------------------------------------------------
@pytest.mark.parametrize("target", [
    "/../secret.vqad", "/%2e%2e/secret.vqad", "/%2E%2E/secret.vqad", "/sub/../../secret.vqad", "/sub/%2e%2e/model.vqad",
    "//etc/passwd", "/%2Fetc%2Fpasswd", "/./model.vqad", "/model.vqad%00.txt", "/sub%5c..%5cmodel.vqad",
    "/escape.vqad", "/.hidden.vqad", "/notes.txt", "/folder.vqad", "/missing.vqad", "/view/../secret.vqad",
    "/view/escape.vqad", "/view/notes.txt", "/sub/", "/view/",
])
def test_paths_outside_the_folder_and_other_files_are_refused(server, target):
    status, _, body = raw_request(server, target)
    assert status in (403, 404), target
    assert b"outside the served folder" not in body and b"secret" not in body and b"root:" not in body


def test_a_symlink_that_stays_inside_is_served(site, client):
    root, _ = site
    assert client.get("/inside.vqad").content == (root / "model.vqad").read_bytes()
    assert client.get("/sub/deep%20model.vqad").content == (root / "model.vqad").read_bytes()


def test_other_host_names_are_refused_on_loopback(server):
    """A page on another site that rebinds its name to 127.0.0.1 still sends its own name as Host."""
    for host in ["attacker.example", "attacker.example:80", "127.0.0.1.nip.io"]:
        status, _, body = raw_request(server, "/model.vqad", headers={"Host": host})
        assert status == 421 and b"--host" in body
    port = urlsplit(server).port
    for host in [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost"]:
        assert raw_request(server, "/model.vqad", headers={"Host": host})[0] == 200, host
    assert httpx.get(server.replace("127.0.0.1", "localhost") + "model.vqad").status_code == 200


# -- the listing -----------------------------------------------------------------------------------------
def test_json_listing_and_html_index(site, client):
    root, field = site
    files = client.get("/api/files").json()
    by_path = {e["path"]: e for e in files}
    assert sorted(by_path) == ["big.vqad", "empty.vqad", "inside.vqad", "model.vqad", "sub/deep model.vqad"]
    model = by_path["model.vqad"]
    prefix = F.lod_prefix_sizes(root / "model.vqad")
    assert model["kind"] == "sdf" and model["complete"] is True and model["error"] is None
    assert model["lods"] == [{"lod": lv, "prefix_bytes": prefix[lv]} for lv in field.lods]
    assert model["bytes"] == (root / "model.vqad").stat().st_size
    assert model["etag"] == client.head("/model.vqad").headers["etag"]
    assert by_path["sub/deep model.vqad"]["url"] == "/sub/deep%20model.vqad"
    assert by_path["big.vqad"]["error"] and by_path["big.vqad"]["lods"] == []  # unreadable: listed, with why
    assert by_path["empty.vqad"]["error"]
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'href="/sub/deep%20model.vqad"' in page.text and 'href="/view/model.vqad"' in page.text
    assert f"LOD {field.lods[0]}: {prefix[field.lods[0]]:,} B" in page.text
    assert "bad magic" in page.text  # big.vqad's error, shown in its row


# -- streaming into the decoder ----------------------------------------------------------------------------
def test_iter_lods_over_http_yields_every_lod(site, server):
    root, field = site
    prefix = F.lod_prefix_sizes(root / "model.vqad")
    with urllib.request.urlopen(server + "model.vqad", timeout=20) as response:
        steps = [(s.lod, s.nbytes) for s in F.iter_lods(response, block=256)]
    assert [lod for lod, _ in steps] == field.lods
    assert all(nbytes >= prefix[lod] for lod, nbytes in steps)
    # the first bytes alone decode to the coarsest LOD
    coarse = field.lods[0]
    r = httpx.get(server + "model.vqad", headers={"Range": f"bytes=0-{prefix[coarse] - 1}"})
    assert r.status_code == 206 and F.load(r.content, lod=coarse).lods == [coarse]


# -- load: many clients, clients that leave, files that change ---------------------------------------------
def test_100_concurrent_clients_all_get_exact_bytes(site, server):
    root, _ = site
    data = (root / "big.vqad").read_bytes()

    def fetch(i: int) -> bool:
        rng = random.Random(i)
        a = rng.randrange(BIG)
        headers = {} if i % 4 == 0 else {"Range": f"bytes={a}-"}
        with httpx.Client(timeout=30) as c:  # a connection each
            r = c.get(server + "big.vqad", headers=headers)
        return r.content == (data if i % 4 == 0 else data[a:])

    with ThreadPoolExecutor(max_workers=100) as pool:
        futures = [pool.submit(fetch, i) for i in range(100)]
        assert all(f.result(timeout=60) for f in futures)


def test_clients_that_disconnect_mid_stream_do_not_hurt_the_server(site):
    root, _ = site
    data = (root / "big.vqad").read_bytes()
    rate = 400e3  # the whole file takes ~0.65 s: long enough to leave in the middle
    with BackgroundServer(root, bandwidth=rate) as url:
        u = urlsplit(url)
        for cut in (0, 1024, 50_000):
            s = socket.create_connection((u.hostname, u.port), timeout=5)
            s.sendall(f"GET /big.vqad HTTP/1.1\r\nHost: 127.0.0.1:{u.port}\r\n\r\n".encode())
            got = b""
            while b"\r\n\r\n" not in got or len(got.partition(b"\r\n\r\n")[2]) < cut:
                got += s.recv(4096)
            s.close()
        t0 = time.monotonic()
        r = httpx.get(url + "big.vqad", headers={"Range": "bytes=0-99999"}, timeout=20)
        took = time.monotonic() - t0
        assert r.status_code == 206 and r.content == data[:100_000]
        assert took >= 0.8 * 100_000 / rate  # throttled, and not stuck behind the abandoned responses
        with httpx.stream("GET", url + "big.vqad", timeout=20) as r:  # one more that leaves after 1 KB
            next(r.iter_bytes(1024))
        assert httpx.get(url + "model.vqad", timeout=20).content == (root / "model.vqad").read_bytes()


def test_the_server_stops_reading_for_a_client_that_left(site, monkeypatch):
    """A throttled response to a client that closed its socket ends at once (no reading, no sleeping on)."""
    import vqad.app.serve as S

    root, _ = site
    reads = []
    real_read = S._read_exact
    monkeypatch.setattr(S, "_read_exact", lambda *a: reads.append(a[2]) or real_read(*a))
    with BackgroundServer(root, bandwidth=20e3) as url:  # the whole file would take 13 s
        port = urlsplit(url).port
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(f"GET /big.vqad HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
                s.recv(4096)
        time.sleep(0.5)
        n = len(reads)
        time.sleep(0.5)
        assert len(reads) == n <= 3 * 3  # a chunk or so each, then nothing
        t0 = time.monotonic()
    assert time.monotonic() - t0 < S.GRACEFUL_SECONDS  # nothing in flight held the shutdown up


def test_a_file_changed_in_place_mid_response_is_cut_short_not_mixed(tmp_path):
    path = tmp_path / "live.vqad"
    old = random.Random(2).randbytes(BIG)
    path.write_bytes(old)
    with BackgroundServer(tmp_path, bandwidth=400e3) as url:
        got = b""
        with pytest.raises(httpx.RemoteProtocolError):  # a body shorter than its Content-Length
            with httpx.stream("GET", url + "live.vqad", timeout=20) as r:
                for chunk in r.iter_bytes():
                    if not got:
                        with open(path, "r+b") as f:  # rewrite the file in place, same size
                            f.write(bytes(len(old)))
                            f.flush()
                            os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
                    got += chunk
        assert 0 < len(got) < BIG and got == old[: len(got)]  # only bytes of the version the headers named
        assert httpx.get(url + "live.vqad", timeout=20).content == bytes(BIG)  # the new version, whole


def test_a_file_replaced_by_rename_mid_response_still_sends_the_old_version(tmp_path):
    path = tmp_path / "live.vqad"
    old = random.Random(3).randbytes(BIG)
    path.write_bytes(old)
    with BackgroundServer(tmp_path, bandwidth=800e3) as url:
        with httpx.stream("GET", url + "live.vqad", timeout=20) as r:
            it = r.iter_bytes()
            got = next(it)
            (tmp_path / "new.tmp").write_bytes(b"x" * 100)
            os.replace(tmp_path / "new.tmp", path)  # how vqad (and most tools) rewrite a file
            got += b"".join(it)
        assert got == old
        assert httpx.get(url + "live.vqad", timeout=20).content == b"x" * 100


# -- the viewer pages -------------------------------------------------------------------------------------
class FakeViewer:
    def __init__(self, source: str, host: str, port: int, bandwidth: float | None) -> None:
        self.source, self.host, self.port, self.bandwidth = source, host, port, bandwidth
        self.url = "http://127.0.0.1:9999/"
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


def test_view_starts_one_viewer_per_file_on_this_servers_url_and_redirects(site):
    root, _ = site
    started: list[FakeViewer] = []

    def factory(source: str, host: str = "127.0.0.1", port: int = 0, bandwidth: float | None = None) -> FakeViewer:
        time.sleep(0.2)  # a slow start: concurrent first visits must still start one viewer
        started.append(FakeViewer(source, host, port, bandwidth))
        return started[-1]

    with BackgroundServer(root, viewer_factory=factory) as url:
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: httpx.get(url + "view/sub/deep%20model.vqad", timeout=20), range(4)))
        assert all(r.status_code == 303 and r.headers["location"] == "http://127.0.0.1:9999/" for r in replies)
        assert len(started) == 1 and started[0].source == url + "sub/deep%20model.vqad"
        assert started[0].host == "127.0.0.1" and started[0].port == 0
        assert httpx.get(url + "view/model.vqad").status_code == 303 and len(started) == 2
        assert httpx.get(url + "view/notes.txt").status_code == 404 and len(started) == 2
        head = httpx.head(url + "view/sub/other.vqad")  # a link checker's HEAD starts no viewer
        assert head.status_code in (404, 405) and len(started) == 2
        head = httpx.head(url + "view/model.vqad")
        assert head.status_code == 405 and head.headers["allow"] == "GET" and len(started) == 2
        # the source URL the viewer got serves the file
        assert httpx.get(started[0].source).content == (root / "model.vqad").read_bytes()
        assert not any(v.stopped for v in started)
    assert all(v.stopped for v in started)  # stopped with the server


def test_view_without_the_viewer_installed_is_501_with_the_command(site, monkeypatch):
    root, _ = site
    monkeypatch.setitem(sys.modules, "vqad.app.view", None)  # `import vqad.app.view` now fails
    with BackgroundServer(root) as url:
        r = httpx.get(url + "view/model.vqad", timeout=20)
    assert r.status_code == 501 and f"vqad view {url}model.vqad" in r.text


def test_a_viewer_that_fails_to_start_is_a_500_page_not_a_dead_server(site):
    root, _ = site

    def broken(source, host="127.0.0.1", port=0, bandwidth=None):
        raise RuntimeError("no display")

    with BackgroundServer(root, viewer_factory=broken) as url:
        r = httpx.get(url + "view/model.vqad", timeout=20)
        assert r.status_code == 500 and "no display" in r.text and f"vqad view {url}model.vqad" in r.text
        assert httpx.get(url + "model.vqad").status_code == 200


# -- rates ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [("1Mbit", 125e3), ("1 Mbit/s", 125e3), ("500kbit", 62.5e3), ("56kbps", 7e3),
                                       ("200kB/s", 200e3), ("2MB/s", 2e6), ("2 MB", 2e6), ("1MiB/s", 2**20),
                                       ("8bit/s", 1.0), ("1.5Gbit", 1.5e9 / 8), ("1MBps", 1e6)])
def test_parse_rate(text, want):
    assert parse_rate(text) == pytest.approx(want)


@pytest.mark.parametrize("text", ["", "fast", "100", "1Mb", "1 kb/s", "0kbit", "-1Mbit", "1 furlong/s", "infMbit", "1ps"])
def test_parse_rate_refuses_bad_text(text):
    with pytest.raises(InputError, match="bandwidth"):
        parse_rate(text)


def test_format_rate():
    assert format_rate(125e3) == "1 Mbit/s (125 kB/s)"


# -- the command line --------------------------------------------------------------------------------------
def test_cli_refuses_a_bad_folder_or_bandwidth(site, tmp_path, capsys):
    root, _ = site
    from vqad.app.cli import build_parser
    from vqad.app.serve import DEFAULT_PORT

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert f"default {DEFAULT_PORT}" in sub["serve"].format_help()  # the help says what an unset --port means
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", str(root / "model.vqad")]) == 2
    err = capsys.readouterr().err
    assert "not a directory" in err and f"vqad serve {root}" in err
    assert main(["serve", str(root), "--bandwidth", "fast"]) == 2
    assert "bandwidth" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main(["serve", str(empty), "--port", "70000"]) == 2
    cap = capsys.readouterr()  # refused before the folder is walked (which warns of an empty one)
    assert "--port must be in 0..65535" in cap.err and "holds no .vqad files" not in cap.out
    with socket.socket() as busy:  # a port in use: a one-line error, not a traceback
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        assert main(["serve", str(root), "--port", str(busy.getsockname()[1])]) == 2
        assert "--port 0" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_cli_serves_until_ctrl_c(site, host):
    root, _ = site
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vqad.app.cli", "serve", str(root), "--port", "0", "--quiet",
                             "--host", host], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        while not lines or "Ctrl-C" not in lines[-1]:
            lines.append(proc.stdout.readline())
            assert lines[-1], "".join(lines) + proc.stderr.read()
        m = re.search(r"at (http://127\.0\.0\.1:\d+/) \(Ctrl-C to stop\)", lines[-1])
        assert m, lines
        assert ("anyone who can reach this machine" in "".join(lines)) == (host == "0.0.0.0")
        url = m.group(1)
        deadline = time.monotonic() + 20
        while True:  # the URL is printed just before the server starts accepting
            try:
                r = httpx.get(url + "model.vqad", headers={"Range": "bytes=0-9"}, timeout=5)
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert r.status_code == 206 and r.content == (root / "model.vqad").read_bytes()[:10]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_names_no_url_can_reach_are_not_listed(tmp_path):
    """A name with a newline (or any control character) is listed by nothing: no route could serve it."""
    from vqad.app.serve import iter_files

    (tmp_path / "a.vqad").write_bytes(b"x")
    (tmp_path / "new\nline.vqad").write_bytes(b"x")
    (tmp_path / "tab\there.vqad").write_bytes(b"x")
    assert [rel for rel, _ in iter_files(tmp_path)] == ["a.vqad"]


# -- found by a hostile pass (2026-12-07) -------------------------------------------------------------------------
def test_a_folder_swapped_for_a_symlink_between_check_and_open_is_refused(tmp_path, monkeypatch):
    """The race that leaked a file outside the folder: the path is checked, a folder in it is then replaced by a
    symlink out of the root before the open (O_NOFOLLOW guards only the last name), and back. Driven here
    deterministically: the swap happens inside os.open."""
    from vqad.app import serve as S

    root = (tmp_path / "root").resolve()
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.vqad").write_bytes(b"inside")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "a.vqad").write_bytes(b"TOP SECRET")
    real_open = os.open

    def swapping_open(path, flags, *a, swap_back=True, **kw):
        (root / "sub").rename(root / "sub.real")
        (root / "sub").symlink_to(tmp_path / "outside")
        try:
            return real_open(path, flags, *a, **kw)
        finally:
            if swap_back:
                (root / "sub").unlink()
                (root / "sub.real").rename(root / "sub")

    fd, _ = S.open_servable(root, "sub/a.vqad")  # no race: served
    assert os.pread(fd, 100, 0) == b"inside"
    os.close(fd)
    monkeypatch.setattr(S.os, "open", swapping_open)
    with pytest.raises(S.Refused, match="moved while it was opened"):  # swapped back: another inode there now
        S.open_servable(root, "sub/a.vqad")
    monkeypatch.setattr(S.os, "open", lambda *a, **kw: swapping_open(*a, swap_back=False, **kw))
    with pytest.raises(S.Refused):  # left swapped: the path now leads out of the root
        S.open_servable(root, "sub/a.vqad")


def test_a_tree_deeper_than_pythons_recursion_limit_is_listed(tmp_path):
    """os.walk recursed once per folder: 1,100 nested folders crashed `vqad serve` at start-up."""
    from vqad.app.serve import iter_files

    root = tmp_path / "deep"
    d = root
    d.mkdir()
    for _ in range(sys.getrecursionlimit() + 100):  # one mkdir at a time (makedirs recurses too)
        d = d / "e"
        os.mkdir(d)
    (d / "y.vqad").write_bytes(b"y")
    (root / "top.vqad").write_bytes(b"t")
    try:
        rels = [rel for rel, _ in iter_files(root.resolve())]
        assert len(rels) == 2 and rels[1] == "top.vqad" and rels[0].endswith("/e/y.vqad")
    finally:  # one folder at a time from the bottom: shutil.rmtree (pytest's clean-up) recurses per level
        (d / "y.vqad").unlink()
        while d != root:
            d.rmdir()
            d = d.parent


def test_dates_past_year_9999_or_in_the_future_are_ignored(client):
    """A year of 11 digits made If-Modified-Since, If-Unmodified-Since and If-Range a 500 with a traceback; a
    date in the future made a 304 (RFC 9110: ignore it)."""
    first = client.get("/model.vqad")
    huge = "Mon, 07 Dec 99999999999 19:25:45 GMT"
    future = formatdate(time.time() + 10 * 365 * 86400, usegmt=True)
    for name in ("If-Modified-Since", "If-Unmodified-Since"):
        for date in (huge, future):
            r = client.get("/model.vqad", headers={name: date})
            assert r.status_code == 200 and r.content == first.content, (name, date)
    r = client.get("/model.vqad", headers={"Range": "bytes=0-9", "If-Range": huge})
    assert r.status_code == 200 and len(r.content) == len(first.content)


def test_a_file_dated_in_the_future_is_last_modified_now_and_revalidates(tmp_path):
    """A Last-Modified in the future is one the server itself ignores when a client sends it back (RFC 9110
    §8.8.2.1: send the time of the response instead)."""
    from email.utils import parsedate_to_datetime

    p = tmp_path / "a.vqad"
    p.write_bytes(b"x" * 10)
    future = time.time() + 10 * 365 * 86400
    os.utime(p, (future, future))
    with BackgroundServer(tmp_path) as url:
        r = httpx.get(url + "a.vqad")
        assert parsedate_to_datetime(r.headers["last-modified"]).timestamp() <= time.time() + 1
        # (now moves, so the date is no stable validator for such a file: the ETag is, as for every file)
        assert httpx.get(url + "a.vqad", headers={"If-None-Match": r.headers["etag"]}).status_code == 304
        listed = httpx.get(url + "api/files").json()[0]
        assert parsedate_to_datetime(listed["last_modified"]).timestamp() <= time.time() + 1
        assert listed["etag"] == r.headers["etag"]
        os.chmod(p, 0o600)  # a new ctime: a new ETag, in the listing too (its cache was keyed without ctime)
        again = httpx.get(url + "a.vqad").headers["etag"]
        assert again != r.headers["etag"] and httpx.get(url + "api/files").json()[0]["etag"] == again


def test_the_etag_changes_when_a_rewrite_restores_the_old_mtime(tmp_path):
    from vqad.app.serve import make_etag

    p = tmp_path / "a.vqad"
    p.write_bytes(b"a" * 100)
    st0 = p.stat()
    time.sleep(0.01)
    with open(p, "r+b") as f:  # in place, the same size
        f.write(b"b" * 100)
    os.utime(p, ns=(st0.st_atime_ns, st0.st_mtime_ns))  # `touch -r`, `rsync -t --inplace`
    st1 = p.stat()
    assert st1.st_mtime_ns == st0.st_mtime_ns and st1.st_size == st0.st_size
    assert make_etag(st1) != make_etag(st0)


def test_view_is_refused_to_other_sites_pages_and_keeps_at_most_max_viewers(site):
    """An <img src=http://127.0.0.1:8000/view/NAME.vqad> on any web page started a viewer per name, without
    bound (threads, ports and memory until the server stopped)."""
    from vqad.app.serve import MAX_VIEWERS

    root, _ = site
    extra = root / "many"
    extra.mkdir()
    for i in range(MAX_VIEWERS + 3):
        shutil.copy(root / "model.vqad", extra / f"m{i}.vqad")
    started: list[FakeViewer] = []

    def factory(source, host="127.0.0.1", port=0, bandwidth=None):
        started.append(FakeViewer(source, host, port, bandwidth))
        return started[-1]

    try:
        with BackgroundServer(root, viewer_factory=factory) as url:
            img = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}
            r = httpx.get(url + "view/model.vqad", headers=img)
            assert r.status_code == 403 and "another site" in r.text and not started
            fetch = {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"}
            assert httpx.get(url + "view/model.vqad", headers=fetch).status_code == 403 and not started
            script = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
            assert httpx.get(url + "view/model.vqad", headers=script).status_code == 403  # window.open, location = ...
            link = {**script, "Sec-Fetch-User": "?1"}
            assert httpx.get(url + "view/model.vqad", headers=link).status_code == 303  # a link the user followed
            typed = {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
            for i in range(MAX_VIEWERS + 3):
                assert httpx.get(url + f"view/many/m{i}.vqad", headers=typed).status_code == 303
            assert len(started) == MAX_VIEWERS + 4
            running = [v for v in started if not v.stopped]
            assert len(running) == MAX_VIEWERS and running == started[-MAX_VIEWERS:]  # the least recent stopped
            assert httpx.get(url + "view/many/m0.vqad").status_code == 303  # stopped, reopened: a fresh viewer
            assert len(started) == MAX_VIEWERS + 5 and sum(not v.stopped for v in started) == MAX_VIEWERS
    finally:
        shutil.rmtree(extra)


def test_view_of_a_damaged_file_is_one_log_line_and_a_422_page(tmp_path, caplog):
    (tmp_path / "bad.vqad").write_bytes(b"not a vqad file at all")

    def factory(source, host="127.0.0.1", port=0, bandwidth=None):
        raise InputError(f"{source} is not a readable .vqad file: bad magic")

    with BackgroundServer(tmp_path, viewer_factory=factory) as url:
        r = httpx.get(url + "view/bad.vqad", timeout=20)
    assert r.status_code == 422 and "bad magic" in r.text
    records = [rec for rec in caplog.records if rec.name == "vqad.serve"]
    assert records and all(rec.exc_info is None for rec in records)


def test_a_server_on_another_loopback_address_answers_its_own_url(tmp_path):
    """Debian maps the machine's name to 127.0.1.1: bound there, the printed URL itself was refused (421)."""
    (tmp_path / "a.vqad").write_bytes(b"x")
    try:
        s = socket.socket()
        s.bind(("127.0.1.1", 0))
        s.close()
    except OSError:
        pytest.skip("this machine cannot bind 127.0.1.1")
    with BackgroundServer(tmp_path, host="127.0.1.1") as url:
        assert url.startswith("http://127.0.1.1:")
        assert httpx.get(url + "a.vqad", timeout=20).content == b"x"
        assert raw_request(url, "/a.vqad", headers={"Host": "attacker.example"})[0] == 421
