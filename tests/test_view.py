"""vqad view without a browser: progressive fetching, the viewer's state on good and bad streams,
the camera, the CLI. (The browser test is tests/test_view_browser.py.)"""

from __future__ import annotations

import functools
import http.server
import math
import re
import socket
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("httpx", reason="vqad view needs httpx: pip install 'vqad[view]'")

from vqad.app.cli import main  # noqa: E402
from vqad.app.fetch import FetchError, TokenBucket, open_source  # noqa: E402
from vqad.app.view import open_viewer, orbit_view  # noqa: E402
from vqad.app.viewer.camera import ViewCamera, quat_to_matrix  # noqa: E402
from vqad.app.viewer.frames import render_frame  # noqa: E402
from vqad.errors import InputError  # noqa: E402
from vqad.sdf.render import OrbitCamera, render_sdf  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------------
# fixtures shared with tests/test_view_browser.py
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def tiny_vqad_bytes() -> bytes:
    """A real (briefly trained) 4-bit SDF of the demo shape, LODs 2..5, as .vqad bytes (~13 kB; ~6 s)."""
    from vqad import fileformat
    from vqad.config import DecoderConfig, GridConfig
    from vqad.sdf.fit import SDFTrainConfig, fit_sdf
    from vqad.sdf.shapes import demo_mesh

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        res = fit_sdf(demo_mesh(64), GridConfig(storage="codebook", features=8, bits=4, base_level=2, max_level=5),
                      DecoderConfig(hidden=16), SDFTrainConfig(steps=60, batch=4096, pool_size=40_000, refine=0,
                                                               resample_every=1000, seed=0),
                      torch.device("cpu"), quiet=True)
    res.field.bake(fp16=True)
    return fileformat.to_bytes(res.field)


class FileServer:
    """A local HTTP server of one file at ``/model.vqad`` (stdlib; a thread), for fetch and viewer tests.

    ``ranges``: answer Range requests with 206 (else always 200 with the whole file); ``rate``:
    bytes/s to throttle every response to; ``drop_after``: cut the first response's connection
    after that many body bytes (once); ``etag``: the validator (change it to simulate a new file);
    ``hold``: an event every body waits for (headers go at once), to start a transfer on cue, once
    it has sent the file's first ``hold_after`` bytes (the viewer reads a URL's header before it starts);
    ``die``: after the drop, hang up on every request (a server that went away).
    ``requests`` records each request's Range header.
    """

    def __init__(self, data: bytes, ranges: bool = True, rate: float | None = None, drop_after: int | None = None,
                 etag: str = '"v1"', hold: threading.Event | None = None, hold_after: int = 0,
                 die: bool = False) -> None:
        self.data, self.ranges, self.rate, self.drop_after, self.etag = data, ranges, rate, drop_after, etag
        self.hold, self.hold_after, self.die, self.dead = hold, hold_after, die, False
        self.requests: list[str | None] = []
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                try:
                    self._get()
                except (BrokenPipeError, ConnectionResetError):  # the client went away (a viewer that stopped)
                    self.close_connection = True

            def _get(self):
                if srv.dead:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if self.path in ("/loop.vqad", "/tofile.vqad"):  # a redirect to itself, or out of HTTP
                    self.send_response(302)
                    self.send_header("Location", "/loop.vqad" if self.path == "/loop.vqad" else "file:///m.vqad")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path != "/model.vqad":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                rng = self.headers.get("Range")
                srv.requests.append(rng)
                data, start = srv.data, 0
                m = re.match(r"bytes=(\d+)-(\d*)$", rng or "")
                if_range = self.headers.get("If-Range")
                if srv.ranges and m and (if_range is None or if_range == srv.etag):
                    start = int(m.group(1))
                    end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    body = data[start: end + 1]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    body = data
                    self.send_response(200)
                if srv.ranges:
                    self.send_header("Accept-Ranges", "bytes")
                if srv.etag is not None:
                    self.send_header("ETag", srv.etag)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.flush()
                if srv.hold is not None:
                    first = body[: max(srv.hold_after - start, 0)]
                    self.wfile.write(first)
                    self.wfile.flush()
                    body = body[len(first):]
                    srv.hold.wait(60)
                sent = 0
                for s in range(0, len(body), 1024):
                    part = body[s: s + 1024]
                    if srv.drop_after is not None and sent + len(part) > srv.drop_after:
                        self.wfile.write(part[: srv.drop_after - sent])
                        self.wfile.flush()
                        srv.drop_after = None
                        srv.dead = srv.die
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    self.wfile.write(part)
                    sent += len(part)
                    if srv.rate:
                        time.sleep(len(part) / srv.rate)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/model.vqad"

    def __enter__(self) -> "FileServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def vqad_bytes() -> bytes:
    return tiny_vqad_bytes()


def header_size(data: bytes) -> int:
    """Bytes of ``data`` (a ``.vqad`` file) up to the end of its header: what the viewer reads of a URL
    before it starts."""
    from vqad.fileformat import StreamDecoder

    dec = StreamDecoder()
    for n, byte in enumerate(data, 1):
        dec.feed(bytes([byte]))
        if dec.cfg is not None:
            return n
    raise AssertionError("no complete header")


@pytest.fixture
def vqad_file(tmp_path, vqad_bytes):
    p = tmp_path / "model.vqad"
    p.write_bytes(vqad_bytes)
    return p


def prefix_sizes(data: bytes) -> dict[int, int]:
    from vqad.fileformat import lod_prefix_sizes

    return lod_prefix_sizes(data)


# ------------------------------------------------------------------------------------------------
# rates and the throttle
# ------------------------------------------------------------------------------------------------
# parse_rate is vqad.app.rates.parse_rate, tested with the server (tests/test_serve.py)


def test_token_bucket_paces_bytes():
    bucket = TokenBucket(100_000, burst=1024)
    t = time.monotonic()
    for _ in range(20):
        bucket.take(1000)  # 20 kB at 100 kB/s
    assert 0.17 <= time.monotonic() - t <= 1.0


def test_local_file_throttled(vqad_file, vqad_bytes):
    src = open_source(vqad_file, bandwidth=len(vqad_bytes) / 0.4)  # the whole file in ~0.4 s
    t = time.monotonic()
    got = b"".join(src)
    assert got == vqad_bytes and src.total == len(vqad_bytes)
    assert time.monotonic() - t >= 0.3


# ------------------------------------------------------------------------------------------------
# HTTP
# ------------------------------------------------------------------------------------------------
def test_http_ranges_identical_bytes(vqad_bytes):
    with FileServer(vqad_bytes) as srv:
        src = open_source(srv.url, block=2048)
        assert src.ranges and src.total == len(vqad_bytes)
        assert b"".join(src) == vqad_bytes
    assert srv.requests[0] == "bytes=0-2047" and len(srv.requests) >= 3  # growing Range requests
    starts = [int(r.split("=")[1].split("-")[0]) for r in srv.requests]
    assert starts == sorted(starts) and starts[1] == 2048 and starts[2] == 2048 + 4096


def test_http_without_ranges_one_streamed_get(vqad_bytes):
    with FileServer(vqad_bytes, ranges=False, rate=len(vqad_bytes) / 0.3) as srv:
        src = open_source(srv.url, block=2048)
        assert not src.ranges and src.total == len(vqad_bytes)
        blocks = list(src)
    assert b"".join(blocks) == vqad_bytes and len(blocks) > 1  # streamed, not one read at the end
    assert len(srv.requests) == 1


@pytest.mark.parametrize("ranges", [True, False])
def test_http_resume_after_dropped_connection(vqad_bytes, ranges):
    with FileServer(vqad_bytes, ranges=ranges, drop_after=3000) as srv:
        src = open_source(srv.url, block=8192)
        assert b"".join(src) == vqad_bytes
        assert src.resumes == 1
    if ranges:
        assert srv.requests[1].startswith("bytes=3000-")  # resumed from the byte reached
    else:
        assert len(srv.requests) == 2  # the whole GET again, the first 3000 bytes skipped


def test_server_gone_viewer_keeps_best_lod(vqad_bytes):
    sizes = prefix_sizes(vqad_bytes)
    lods = sorted(sizes)
    cut = sizes[lods[-2]] + 50
    with FileServer(vqad_bytes, drop_after=cut, die=True) as srv:
        src = open_source(srv.url, block=len(vqad_bytes))
        with pytest.raises(FetchError, match=f"lost at byte {cut:,}.*retries failed"):
            list(src)
        srv.dead, srv.drop_after = False, cut
        h = _damaged_viewer(srv.url)
        try:
            assert h.lods_available == lods[:-1] and "lost at byte" in h.error and f"Showing LOD {lods[-2]}" in h.error
        finally:
            h.stop()


def test_http_file_changed_on_server(vqad_bytes):
    with FileServer(vqad_bytes) as srv:
        src = open_source(srv.url, block=2048)
        it = iter(src)
        next(it)
        srv.etag = '"v2"'  # a new file: If-Range no longer matches, the server sends the whole new file
        with pytest.raises(FetchError, match="changed on the server"):
            list(it)


def test_http_file_changed_on_a_server_without_validators(vqad_bytes):
    """A server that sends neither ETag nor Last-Modified: a file replaced mid-fetch is still caught when
    its size changes (each 206's Content-Range names the file's length), never spliced."""
    with FileServer(vqad_bytes, etag=None) as srv:
        src = open_source(srv.url, block=2048)
        it = iter(src)
        next(it)
        srv.data = vqad_bytes + b"more"
        with pytest.raises(FetchError, match=f"changed on the server.*from {len(vqad_bytes):,} to "):
            list(it)


def test_http_errors_are_clear(vqad_bytes):
    with FileServer(vqad_bytes) as srv:
        with pytest.raises(FetchError, match="HTTP 404"):
            open_source(srv.url.replace("model.vqad", "missing.vqad"))
        with pytest.raises(FetchError, match="redirects in a loop"):
            open_source(srv.url.replace("model.vqad", "loop.vqad"))
        with pytest.raises(FetchError, match="only http:// and https:// URLs, also after redirects"):
            open_source(srv.url.replace("model.vqad", "tofile.vqad"))
    with pytest.raises(FetchError, match="cannot fetch"):
        open_source(srv.url)  # the server is gone
    with pytest.raises(InputError, match="only http"):
        open_source("ftp://example.com/model.vqad")


# ------------------------------------------------------------------------------------------------
# the viewer's state (headless views: no browser, no web server)
# ------------------------------------------------------------------------------------------------
def _done(h):
    return h.loaded.is_set() and h.last_still_lod == (h.lods_available or [None])[-1]


def test_viewer_over_http_shows_every_lod(vqad_bytes):
    sizes = prefix_sizes(vqad_bytes)
    with FileServer(vqad_bytes, rate=len(vqad_bytes) / 1.0) as srv:
        h = open_viewer(srv.url, serve=False, device="cpu", still_size=64)
        try:
            h.add_view(orbit_view(64, 64))
            assert h.wait_for(_done, timeout=40)
            assert h.error is None
            assert h.lods_shown == sorted(sizes)  # every LOD in turn, coarsest first
            assert h.bytes_received == h.total_bytes == len(vqad_bytes)
            arrived, shown = h.event_times("lod_bytes"), h.event_times("lod_shown")
            assert all(shown[lv] >= arrived[lv] for lv in sizes)
            assert arrived[min(sizes)] < arrived[max(sizes)]  # the link was throttled: LODs came one by one
            assert (h.last_still != 255).any(-1).mean() > 0.05  # the object, not just background
        finally:
            h.stop()


def test_viewer_last_frame_matches_render(vqad_file, vqad_bytes):
    from vqad import fileformat

    h = open_viewer(str(vqad_file), serve=False, device="cpu", still_size=96)
    try:
        h.add_view(orbit_view(96, 80))
        assert h.wait_for(_done, timeout=40)
        ref = render_sdf(fileformat.load(vqad_bytes), None, OrbitCamera(width=96, height=80))
        mse = np.mean((h.last_still.astype(float) - ref.astype(float)) ** 2)
        assert mse == 0 or 10 * math.log10(255 ** 2 / mse) > 40
    finally:
        h.stop()


def _damaged_viewer(source: str):
    h = open_viewer(source, serve=False, device="cpu", still_size=48)
    h.add_view(orbit_view(48, 48))
    assert h.wait_for(lambda h: h.loaded.is_set() and h.error is not None and h.lods_shown
                      and h.current_lod == h.lods_available[-1] and h.last_still_lod == h.current_lod, timeout=40), \
        (h.error, h.lods_available, h.lods_shown, h.current_lod, h.last_still_lod, h.events)
    return h


def test_viewer_truncated_stream_keeps_best_lod(tmp_path, vqad_bytes):
    sizes = prefix_sizes(vqad_bytes)
    cut = sizes[max(sizes)] - 100  # inside the finest LOD's chunks
    p = tmp_path / "cut.vqad"
    p.write_bytes(vqad_bytes[:cut])
    h = _damaged_viewer(str(p))
    try:
        assert h.lods_available == sorted(sizes)[:-1]
        assert h.current_lod == sorted(sizes)[-2]
        assert "truncated" in h.error and f"LOD {sorted(sizes)[-2]}" in h.error
        assert any(e.kind == "error" for e in h.events)
    finally:
        h.stop()


def test_viewer_truncated_before_first_lod(tmp_path, vqad_bytes):
    from vqad.fileformat import StreamDecoder

    p = tmp_path / "cut.vqad"
    p.write_bytes(vqad_bytes[:200])  # inside the header: refused before the viewer starts, in the terminal
    with pytest.raises(InputError, match="is not a readable .vqad file: .*truncated"):
        open_viewer(str(p), serve=False, device="cpu")
    p.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        open_viewer(str(p), serve=False, device="cpu")
    dec = StreamDecoder()
    head = next(n for n in range(1, len(vqad_bytes)) if (dec.feed(vqad_bytes[n - 1:n]), dec.cfg)[1] is not None)
    p.write_bytes(vqad_bytes[:head + 50])  # the header whole, the first LOD not: the viewer starts and says so
    h = open_viewer(str(p), serve=False, device="cpu")
    try:
        assert h.wait_for(lambda h: h.error is not None, timeout=20)
        assert "truncated" in h.error and h.lods_available == [] and h.last_frame is None
    finally:
        h.stop()


def _damaged_finest_lod(vqad_bytes) -> tuple[bytes, list[int]]:
    """The file with a byte of its finest LOD's chunks flipped (its CRC fails), and its LODs."""
    sizes = prefix_sizes(vqad_bytes)
    lods = sorted(sizes)
    bad = bytearray(vqad_bytes)
    bad[sizes[lods[-2]] + 40] ^= 0xFF
    return bytes(bad), lods


def _assert_best_lod_and_error(source: str, lods: list[int]) -> None:
    """The viewer of a damaged ``source`` shows every LOD before the damage and says where it stopped."""
    h = _damaged_viewer(source)
    try:
        assert h.lods_available == lods[:-1] and h.current_lod == lods[-2]
        assert "damaged" in h.error and f"LOD {lods[-2]}" in h.error
    finally:
        h.stop()


def test_viewer_local_file_damaged_in_its_first_block_keeps_best_lod(tmp_path, vqad_bytes):
    """A local file whose damage lies in its first 64 kB (after the header) was refused in the terminal, when
    the same file over HTTP showed its best LOD and the error (found by a hostile pass)."""
    bad, lods = _damaged_finest_lod(vqad_bytes)
    assert prefix_sizes(vqad_bytes)[lods[-2]] + 40 < 1 << 16
    p = tmp_path / "bad.vqad"
    p.write_bytes(bad)
    _assert_best_lod_and_error(str(p), lods)


def test_viewer_refuses_a_fifo_at_once(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.vqad")  # reading it waited for a writer, with nothing said
    with pytest.raises(InputError, match="is not a regular file"):
        open_viewer(str(tmp_path / "pipe.vqad"), serve=False, device="cpu")


def test_viewer_corrupt_stream_over_http_keeps_best_lod(vqad_bytes):
    bad, lods = _damaged_finest_lod(vqad_bytes)
    with FileServer(bad) as srv:
        _assert_best_lod_and_error(srv.url, lods)


def test_viewer_lod_choice_and_mesh_export(vqad_file):
    h = open_viewer(str(vqad_file), serve=False, device="cpu", still_size=48)
    try:
        h.add_view(orbit_view(48, 48))
        assert h.wait_for(_done, timeout=40)
        coarse = h.lods_available[0]
        h.set_lod(coarse)
        assert h.wait_for(lambda h: h.last_still_lod == coarse, timeout=20)
        ply = h.export_mesh("ply", resolution=48)
        assert ply.startswith(b"ply")
        glb = h.export_mesh("glb", resolution=48)
        assert glb[:4] == b"glTF"
        with pytest.raises(InputError, match="ply or glb"):
            h.export_mesh("obj")
        h.set_mode("normals")
        assert h.wait_for(lambda h: h.last_still is not None and h.last_still[..., 2].max() > 200
                          and h.last_still_lod == coarse, timeout=20)
        with pytest.raises(InputError, match="view mode"):
            h.set_mode("colour")
    finally:
        h.stop()


def test_viewer_reads_metrics_beside_the_file(vqad_file):
    (vqad_file.parent / "metrics.json").write_text('{"lods": {"5": {"chamfer_l1": 0.01}}}')
    h = open_viewer(str(vqad_file), serve=False, device="cpu")
    try:
        assert h.metrics["lods"]["5"]["chamfer_l1"] == 0.01
    finally:
        h.stop()


# ------------------------------------------------------------------------------------------------
# camera
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("az,el,w,h", [(35.0, 20.0, 32, 24), (-120.0, 60.0, 17, 40), (200.0, -30.0, 25, 25)])
def test_view_camera_equals_orbit_camera(az, el, w, h):
    orbit = OrbitCamera(azimuth_deg=az, elevation_deg=el, distance=2.7, fov_deg=50.0, width=w, height=h)
    o1, d1 = orbit.rays("cpu")
    o2, d2 = ViewCamera.from_orbit(orbit).rays("cpu")
    assert torch.allclose(o1, o2, atol=1e-6) and torch.allclose(d1, d2, atol=1e-6)
    cam = ViewCamera.from_orbit(orbit)  # a band is the same rows of the whole image
    ob, db = cam.band(5, 7).rays("cpu")
    assert torch.equal(db, cam.rays("cpu")[1].reshape(h, w, 3)[5:12].reshape(-1, 3))


def test_view_camera_from_viser_pose_and_normalization():
    from vqad.field import Normalization

    orbit = OrbitCamera(width=20, height=20)
    ref = ViewCamera.from_orbit(orbit)
    rot = np.array(ref.rotation)
    # the quaternion viser would send for this rotation
    w = math.sqrt(max(1 + np.trace(rot), 0)) / 2
    q = np.array([w, (rot[2, 1] - rot[1, 2]) / (4 * w), (rot[0, 2] - rot[2, 0]) / (4 * w), (rot[1, 0] - rot[0, 1]) / (4 * w)])
    assert np.allclose(quat_to_matrix(q), rot, atol=1e-9)
    norm = Normalization(center=(1.0, 2.0, 3.0), scale=0.5)
    world_eye = np.array(ref.position) / 0.5 + np.array([1.0, 2.0, 3.0])
    cam = ViewCamera.from_world(world_eye, q, ref.fov_y, 20, 20, normalization=norm)
    o1, d1 = ref.rays("cpu")
    o2, d2 = cam.rays("cpu")
    assert torch.allclose(o1, o2, atol=1e-5) and torch.allclose(d1, d2, atol=1e-6)


def test_frame_shaded_equals_render_sdf(vqad_bytes):
    from vqad import fileformat

    field = fileformat.load(vqad_bytes)
    orbit = OrbitCamera(width=40, height=32)
    a = render_frame(field, field.lods[-1], ViewCamera.from_orbit(orbit), "shaded")
    b = render_sdf(field, field.lods[-1], orbit)
    assert a.shape == b.shape == (32, 40, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2  # rays equal to ~1e-7: at most a rounding step
    for mode in ("normals", "depth", "lod colour"):
        img = render_frame(field, field.lods[0], ViewCamera.from_orbit(orbit), mode)
        assert img.shape == (32, 40, 3) and (img != 255).any()


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def test_cli_bad_sources_exit_2(tmp_path, capsys):
    assert main(["view", str(tmp_path / "missing.vqad"), "--port", "0"]) == 2
    assert "no such model" in capsys.readouterr().err
    assert main(["view", str(tmp_path), "--port", "0"]) == 2  # a directory without config.json
    assert "not a vqad checkpoint" in capsys.readouterr().err
    assert main(["view", "http://127.0.0.1:9/model.vqad", "--port", "0"]) == 2
    assert "cannot fetch" in capsys.readouterr().err
    assert main(["view", str(tmp_path / "x.vqad"), "--bandwidth", "fast"]) == 2
    assert "rate" in capsys.readouterr().err


def test_viewer_checkpoint_directory(tmp_path, vqad_bytes):
    from vqad import fileformat
    from vqad.checkpoint import save_checkpoint

    field = fileformat.load(vqad_bytes)
    save_checkpoint(tmp_path / "run" / "checkpoint", field)
    (tmp_path / "run" / "metrics.json").write_text('{"lods": {"5": {"iou": 0.9}}}')
    h = open_viewer(str(tmp_path / "run" / "checkpoint"), serve=False, device="cpu", still_size=40)
    try:
        h.add_view(orbit_view(40, 40))
        assert h.wait_for(_done, timeout=30)
        assert h.lods_available == field.lods and h.current_lod == field.lods[-1] and h.error is None
        assert h.metrics["lods"]["5"]["iou"] == 0.9
    finally:
        h.stop()
    with pytest.raises(InputError, match="checkpoint directory is loaded whole"):
        open_viewer(str(tmp_path / "run" / "checkpoint"), serve=False, bandwidth=1000.0)


def test_viewer_radiance_field_modes(tmp_path):
    from vqad import fileformat
    from vqad.config import DecoderConfig, GridConfig
    from vqad.grid import OctreeGrid
    from vqad.nerf.field import NeRFConfig, NeRFField
    from vqad.octree import SparseOctree

    torch.manual_seed(0)
    p = torch.randn(300, 3)
    octree = SparseOctree.from_points(0.5 * p / p.norm(dim=1, keepdim=True), 2, 4, dilate=0)
    grid = OctreeGrid.from_octree(octree, GridConfig("codebook", 4, 4, 2, 4))
    field = NeRFField(grid, DecoderConfig(hidden=16), NeRFConfig(geo_features=3, color_hidden=8, sh_degree=1))
    field.bake(fp16=True)
    path = tmp_path / "nerf.vqad"
    fileformat.save(field, path)
    h = open_viewer(str(path), serve=False, device="cpu", still_size=32)
    try:
        h.add_view(orbit_view(32, 24))
        assert h.wait_for(_done, timeout=30) and h.kind == "nerf" and h.error is None
        assert h.last_still.shape == (24, 32, 3)
        frames = {"colour": h.last_still}
        for mode in ("depth", "opacity"):
            h.set_mode(mode)
            assert h.wait_for(lambda h: h.last_still_mode == mode, timeout=20)
            frames[mode] = h.last_still
        assert not np.array_equal(frames["colour"], frames["opacity"])
        with pytest.raises(InputError, match="radiance field"):
            h.export_mesh()
    finally:
        h.stop()


def test_serve_view_page_starts_the_real_viewer_on_the_servers_url(tmp_path, vqad_bytes):
    """`vqad serve`'s /view/<file> with the real open_viewer: a 303 to a viser page that streams the file
    from the server itself (the integration of the two halves of issue 17)."""
    import httpx

    from vqad.app.serve import BackgroundServer

    (tmp_path / "m.vqad").write_bytes(vqad_bytes)
    with BackgroundServer(tmp_path) as url:
        r = httpx.get(url + "view/m.vqad", follow_redirects=False, timeout=30)
        assert r.status_code == 303, r.text[:200]
        page = httpx.get(r.headers["location"], timeout=30)
        assert page.status_code == 200 and "<html" in page.text.lower()
        again = httpx.get(url + "view/m.vqad", follow_redirects=False, timeout=30)
        assert again.headers["location"] == r.headers["location"]  # one viewer per file, reused


def test_viewer_streams_a_tsdf_file(tmp_path):
    """A TSDF .vqad (vqad fit-tsdf) streams and renders like an SDF: every LOD shown, the object on screen.

    Streamed over HTTP at a second for the whole file, as the SDF test does: read from disk, a file this
    small can arrive whole before the view is added, and a viewer that nobody watched while it loaded
    rightly opens at the finest LOD (a race that once failed this test)."""
    from vqad import fileformat
    from vqad.config import DecoderConfig, GridConfig
    from vqad.tsdf.fit import TSDFTrainConfig, fit_tsdf
    from test_tsdf import SphereFusion

    res = fit_tsdf(SphereFusion(), GridConfig(base_level=2, max_level=4), DecoderConfig(hidden=16),
                   TSDFTrainConfig(steps=40, batch=2048, refine=0, pool_size=10_000), torch.device("cpu"), quiet=True)
    res.field.bake(fp16=True)
    path = tmp_path / "t.vqad"
    fileformat.save(res.field, path)
    data = path.read_bytes()
    with FileServer(data, rate=len(data) / 1.0) as srv:
        h = open_viewer(srv.url, serve=False, device="cpu", still_size=64)
        try:
            h.add_view(orbit_view(64, 64))
            assert h.wait_for(_done, timeout=40)
            assert h.error is None and h.lods_shown == res.field.lods
            assert (h.last_still != 255).any(-1).mean() > 0.05
            assert h.export_mesh("ply")[:3] == b"ply"  # cut at unobserved space, in world units
        finally:
            h.stop()


def test_viewer_refuses_a_lod_the_model_lacks(tmp_path, vqad_bytes):
    """A file's LODs are read from its header before the viewer starts, a local file's and a URL's alike."""
    p = tmp_path / "m.vqad"
    p.write_bytes(vqad_bytes)
    with pytest.raises(InputError, match="--lod 99: .* has LODs"):
        open_viewer(str(p), serve=False, device="cpu", lod=99)
    with FileServer(vqad_bytes) as srv:
        with pytest.raises(InputError, match="--lod 99: .* has LODs"):
            open_viewer(srv.url, serve=False, device="cpu", lod=99)


def test_viewer_refuses_a_url_that_is_not_a_vqad_file_before_it_starts(vqad_bytes):
    """A URL that answers with a web page (a wrong path on a server that serves HTML for everything) or a
    cut header is refused at once, as a local file is, not after the viewer has started; a good URL's
    header blocks are not lost to that check (every LOD still arrives)."""
    with FileServer(b"<!doctype html><html><body>not found</body></html>" * 40) as srv:
        with pytest.raises(InputError, match="is not a readable .vqad file: .*magic"):
            open_viewer(srv.url, serve=False, device="cpu")
    with FileServer(vqad_bytes[:20]) as srv:
        with pytest.raises(InputError, match="is not a readable .vqad file"):
            open_viewer(srv.url, serve=False, device="cpu")
    with FileServer(vqad_bytes) as srv:
        h = open_viewer(srv.url, serve=False, device="cpu")
        try:
            assert h.wait_for(lambda h: h.loaded.is_set(), timeout=30)
            assert h.error is None and h.bytes_received == len(vqad_bytes) and h.lods_available
        finally:
            h.stop()


def test_viewer_hostile_pass_findings(tmp_path, vqad_file, vqad_bytes):
    """A local file rewritten in place while it streams says so (it read as damaged or truncated, 114 % received);
    a checkpoint viewed with --lod stops there (every LOD was shown); set_mode before the header takes any kind's
    mode and falls back to the kind's own (decoding stopped with a ValueError); a camera without a picture (no
    field of view, no pixels) is an InputError; only http(s) URLs; --size under 16 names the flag."""
    from vqad import fileformat
    from vqad.app.cli import main
    from vqad.app.fetch import FetchError, FileSource
    from vqad.app.viewer.camera import ViewCamera
    from vqad.checkpoint import save_checkpoint
    from vqad.errors import InputError

    live = tmp_path / "live.vqad"
    live.write_bytes(vqad_bytes)
    src, got = FileSource(live, block=1024), []
    with pytest.raises(FetchError, match="changed on disk while it was being read"):
        for n, block in enumerate(src):
            got.append(block)
            if n == 2:
                with open(live, "r+b") as f:  # cp over it: the same inode, new bytes
                    f.write(b"\0" * 64)
    assert sum(map(len, got)) <= src.total
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, fileformat.load(vqad_bytes))
    h = open_viewer(str(ckpt), serve=False, device="cpu", lod=4, still_size=32)
    try:
        assert h.wait_for(lambda h: h.loaded.is_set(), timeout=40) and h.lods_available == [2, 3, 4]
    finally:
        h.stop()
    h = open_viewer(str(vqad_file), serve=False, device="cpu", still_size=32)
    try:
        with pytest.raises(InputError, match="unknown view mode 'bogus'"):
            h.set_mode("bogus")
        h.set_mode("colour")  # a radiance field's mode, before the header says this is an SDF
        h.add_view(orbit_view(32, 32))
        assert h.wait_for(_done, timeout=40) and h.error is None and h.mode == "shaded"
    finally:
        h.stop()
    for bad in (dict(fov_y=0.0), dict(width=0), dict(height=-5)):
        with pytest.raises(InputError, match="a view's"):
            ViewCamera(**{"position": (0.0, 0.0, 3.0), "rotation": ((1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)),
                          "fov_y": 0.8, "width": 8, "height": 8, **bad})
    with pytest.raises(InputError, match="only http:// and https:// URLs"):
        open_viewer("ftp://example.com/a.vqad", serve=False, device="cpu")
    partial = tmp_path / "partial"  # a checkpoint without its tensors: refused at start (it served an error page)
    partial.mkdir()
    (partial / "config.json").write_text((ckpt / "config.json").read_text())
    with pytest.raises(InputError, match="has no model.safetensors"):
        open_viewer(str(partial), serve=False, device="cpu")
    assert main(["view", str(vqad_file), "--size", "15"]) == 2
