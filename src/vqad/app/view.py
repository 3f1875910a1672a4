"""``vqad view``: an interactive web viewer of a field, refined as its ``.vqad`` bytes arrive.

Built on `viser <https://viser.studio>`_ (its web client, camera controls, GUI panel and file
downloads; no protocol of our own). Three threads besides viser's:

* **fetch** reads the source block by block (:mod:`vqad.app.fetch`: a local file, HTTP Range
  requests or a streamed GET, optionally throttled) and stamps each block's arrival time;
* **decode** feeds the blocks to a :class:`~vqad.fileformat.StreamDecoder` and swaps in each LOD
  as soon as it is complete (a checkpoint directory is loaded whole instead);
* **render** draws frames for every view (a browser tab, or a headless view of a test) with
  vqad's own renderers (:mod:`vqad.app.viewer.frames`): a preview (long side ``preview_size``,
  adapted to stay near 8 frames/s) for each new camera or LOD, then, once the camera has been
  still for ``still_delay`` seconds, the full frame (long side ``still_size``) band by band, so a
  camera move or a new LOD interrupts it. viser's callbacks only record the camera: no frame is
  ever drawn on a callback thread.

The scene is in the field's **unit cube** (y up): the object spans [-1, 1]^3 whatever its world
size; depth is shown in unit-cube units; exported meshes are in world units.

A damaged or truncated stream keeps the finest complete LOD on screen and shows the error in the
panel (:attr:`ViewerHandle.error`).

Public API::

    open_viewer(source, host="127.0.0.1", port=0, bandwidth=None, device=None, lod=None) -> ViewerHandle
"""

from __future__ import annotations

import json
import math
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqad.app.fetch import FetchError, is_url, open_source
from vqad.app.viewer.camera import ViewCamera, look_at_rotation
from vqad.app.viewer.frames import DISTANCE_KINDS, NERF_MODES, SDF_MODES, modes_for, nerf_context, render_frame
from vqad.errors import InputError, StreamError, VqadError

#: the camera ``vqad render`` uses (azimuth 35°, elevation 20°, distance 3.2, vertical fov 40°)
DEFAULT_EYE = (3.2 * math.cos(math.radians(20)) * math.sin(math.radians(35)), 3.2 * math.sin(math.radians(20)),
               3.2 * math.cos(math.radians(20)) * math.cos(math.radians(35)))
DEFAULT_FOV = math.radians(40.0)
PREVIEW_SIZE = 128  # long side of a frame while the camera moves
STILL_SIZE = 512  # long side of the still frame
STILL_DELAY = 0.2  # seconds without a camera message before the still frame
BAND_ROWS = 64  # rows per band of a still frame (how often a render checks for a newer request)


@dataclass
class ViewerEvent:
    """Something that happened, ``t`` seconds after :func:`open_viewer`.

    ``kind``: ``lod_bytes`` (the last byte of a LOD arrived), ``lod_ready`` (decoded and swapped
    in), ``lod_shown`` (first frame drawn at that LOD), ``lod_still`` (first full-resolution frame
    at that LOD), ``first_picture``, ``error``, ``finished`` (every byte read).
    """

    t: float
    kind: str
    lod: int | None = None
    nbytes: int | None = None
    detail: str = ""


class _View:
    """One render target: a browser tab (``sink`` sends a frame to it) or a headless view (no sink)."""

    def __init__(self, vid: int, sink=None, owner: int | None = None) -> None:
        self.id, self.sink, self.owner = vid, sink, owner  # owner: the viser client id of a browser tab
        self.camera: ViewCamera | None = None  # at full resolution
        self.version = 0
        self.t_change = 0.0
        self.rendered: tuple | None = None  # (camera version, scene version) of the frame on screen
        self.quality = ""  # "preview" | "still"


class ViewerHandle:
    """A running viewer. Non-blocking: it serves, fetches and renders in background threads.

    Attributes (read them from tests and benchmarks; they change while the viewer runs):
        url: where a browser on this machine opens it; ``port``: the port it is served on.
        kind: ``"sdf"``, ``"tsdf"`` or ``"nerf"`` once known.
        lods_available: the complete LODs, coarsest first.
        lods_shown: the LODs drawn so far, in the order they were first drawn.
        current_lod: the LOD of the frames being drawn.
        error: the message of what went wrong with the source (the best LOD stays), else None.
        last_frame: the last frame drawn ``(H, W, 3)`` uint8; ``last_still`` the last full-resolution
            one, ``last_camera`` its camera, ``last_still_lod`` its LOD and ``last_still_mode`` its mode.
        bytes_received, total_bytes: of the source (``total_bytes`` None when unknown).
        events: :class:`ViewerEvent` log.
        render_ms: the last frame's render time.
        metrics: the field's metrics (``metrics.json`` beside a checkpoint or a local file), or None.
    """

    def __init__(self, source: str, device, lod: int | None, bandwidth: float | None,
                 preview_size: int = PREVIEW_SIZE, still_size: int = STILL_SIZE, still_delay: float = STILL_DELAY) -> None:
        self.source, self.device, self.stop_lod, self.bandwidth = source, device, lod, bandwidth
        self.preview_size, self.still_size, self.still_delay = preview_size, still_size, still_delay
        self._preview_cap = preview_size
        self.t0 = time.monotonic()
        self.url = ""
        self.port: int | None = None  # the port served on (build a URL for another host name with it)
        self.kind: str | None = None
        self.lods_available: list[int] = []
        self.lods_shown: list[int] = []
        self.current_lod: int | None = None
        self.error: str | None = None
        self._render_error = False  # self.error is a frame's fault (the next good frame clears it), not the stream's
        self.last_frame: np.ndarray | None = None
        self.last_still: np.ndarray | None = None
        self.last_camera: ViewCamera | None = None
        self.last_still_lod: int | None = None
        self.last_still_mode: str | None = None
        self.bytes_received = 0
        self.total_bytes: int | None = None
        self.events: list[ViewerEvent] = []
        self.render_ms: float | None = None
        self.metrics: dict | None = None
        self.mode: str | None = None
        self.loaded = threading.Event()  # the source has been read to its end (or failed)
        self._fields: dict[int, object] = {}  # lod -> field holding it (a checkpoint: one field for all)
        self._prefix: dict[int, int] = {}
        self._dense: dict[int, float] = {}
        self._nerf_ctx: dict[int, object] = {}
        self._lod_choice: int | None = None  # None: follow the finest LOD
        self._scene_version = 0
        self._views: dict[int, _View] = {}
        self._next_view = 0
        self._cond = threading.Condition()
        self._stopped = threading.Event()
        self._source_obj = None
        self._server = None
        self._gui: dict = {}
        self._threads: list[threading.Thread] = []
        self._arrivals: list[tuple[float, int]] = []  # (t, bytes so far) per block
        self._head: list[bytes] = []  # a URL's first blocks, read by _read_header before the viewer starts
        self._stream = None  # the iterator those blocks came from (the rest of the stream)
        self._slider_state: tuple | None = None

    # -- public -----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop fetching, rendering and serving (idempotent)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._source_obj is not None:
            self._source_obj.close()
        with self._cond:
            self._cond.notify_all()
        for th in self._threads:
            th.join(timeout=10)
        if self._server is not None:
            self._server.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`stop` (or ``timeout`` seconds); True once stopped."""
        return self._stopped.wait(timeout)

    def wait_for(self, predicate, timeout: float = 30.0, poll: float = 0.02) -> bool:
        """Poll ``predicate(handle)`` until true or ``timeout`` seconds pass; returns its last value."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate(self):
                return True
            time.sleep(poll)
        return bool(predicate(self))

    @property
    def watching(self) -> int:
        """How many views (browser tabs that have sent their camera, headless views) are drawn."""
        with self._cond:
            return sum(v.camera is not None for v in self._views.values())

    def add_view(self, camera: ViewCamera) -> int:
        """A headless view (no browser): frames of ``camera`` (unit cube, full resolution) are
        drawn as for a browser tab; returns its id for :meth:`move_view`."""
        with self._cond:
            v = self._new_view(None)
        self.move_view(v.id, camera)
        return v.id

    def move_view(self, view_id: int, camera: ViewCamera) -> None:
        with self._cond:
            v = self._views[view_id]
            if camera.same_pose(v.camera) and v.camera is not None and (v.camera.width, v.camera.height) == (camera.width, camera.height):
                return
            v.camera, v.version, v.t_change = camera, v.version + 1, time.monotonic()
            self._cond.notify_all()

    def set_lod(self, lod: int | None) -> None:
        """Draw ``lod`` (a complete one), or None: follow the finest LOD received."""
        with self._cond:
            self._lod_choice = lod
            self._update_current()
        self._refresh_panel()

    def _mode_for_kind(self) -> str:
        """The mode to draw once the kind is known: the one set (set_mode before the header may name another
        kind's), else the kind's first."""
        return self.mode if self.mode in modes_for(self.kind) else modes_for(self.kind)[0]

    def set_mode(self, mode: str) -> None:
        """Draw ``mode`` (one of the kind's modes; before the header has said the kind, one of any kind's)."""
        allowed = modes_for(self.kind) if self.kind is not None else tuple(dict.fromkeys(SDF_MODES + NERF_MODES))
        if mode not in allowed:
            raise InputError(f"unknown view mode {mode!r}: one of {list(allowed)}")
        with self._cond:
            self.mode = mode
            self._scene_version += 1
            self._cond.notify_all()

    def field(self, lod: int | None = None):
        """The field that holds ``lod`` (default: the current LOD)."""
        lod = self.current_lod if lod is None else lod
        if lod is None or lod not in self._fields:
            raise InputError(f"LOD {lod} has not arrived yet (complete: {self.lods_available})")
        return self._fields[lod]

    def export_mesh(self, fmt: str = "ply", resolution: int = 192, lod: int | None = None) -> bytes:
        """Marching cubes of the SDF at ``lod`` (default: the current one) as PLY or GLB bytes (world units)."""
        from vqad.sdf.extract import extract_mesh
        from vqad.tsdf.extract import extract_tsdf_mesh

        fmt = fmt.lower()
        if fmt not in ("ply", "glb"):
            raise InputError(f"mesh format must be ply or glb, got {fmt!r}")
        if self.kind not in DISTANCE_KINDS:
            raise InputError("mesh export needs a signed distance field; this is a radiance field")
        lod = self.current_lod if lod is None else lod
        if self.kind == "tsdf":  # its own lattice, cut at unobserved space (resolution does not apply)
            mesh = extract_tsdf_mesh(self.field(lod), lod)
        else:
            mesh = extract_mesh(self.field(lod), lod, resolution=resolution)
        return mesh.to_trimesh().export(file_type=fmt)

    def event_times(self, kind: str) -> dict[int, float]:
        """``{lod: t}`` of the first event of ``kind`` per LOD."""
        out: dict[int, float] = {}
        for e in list(self.events):
            if e.kind == kind and e.lod is not None and e.lod not in out:
                out[e.lod] = e.t
        return out

    # -- bookkeeping ------------------------------------------------------------------------------
    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _event(self, kind: str, lod: int | None = None, nbytes: int | None = None, detail: str = "", t: float | None = None):
        self.events.append(ViewerEvent(self._now() if t is None else t, kind, lod, nbytes, detail))

    def _new_view(self, sink, owner: int | None = None) -> _View:
        v = _View(self._next_view, sink, owner)
        self._next_view += 1
        self._views[v.id] = v
        return v

    def _update_current(self) -> None:
        """Under ``_cond``: the LOD to draw from the choice and what has arrived."""
        if not self.lods_available:
            return
        finest = self.lods_available[-1]
        want = finest if self._lod_choice is None else min(max(self._lod_choice, self.lods_available[0]), finest)
        watched = any(v.camera is not None for v in self._views.values())
        if self._lod_choice is None and watched and self.current_lod is not None:
            # following the stream with someone watching: step through every LOD in turn (each gets
            # at least a preview), so the refinement is seen even when LODs arrive faster than frames
            if self.current_lod not in self.lods_shown:
                want = self.current_lod
            else:
                want = min((lv for lv in self.lods_available if lv > self.current_lod), default=self.current_lod)
        if want not in self._fields:
            want = max(lv for lv in self._fields if lv <= want)
        if want != self.current_lod:
            self.current_lod = want
            self._scene_version += 1
            self._cond.notify_all()

    def _fail(self, message: str, best: bool = True) -> None:
        """Show ``message`` in the panel and on the terminal; ``best``: a stream's fault, so say which LOD is shown."""
        best = f" Showing LOD {self.lods_available[-1]}, the finest complete one." if best and self.lods_available else ""
        self.error = message.rstrip() + ("" if message.rstrip().endswith(".") else ".") + best
        print(f"vqad view: {self.error}", file=sys.stderr, flush=True)  # the terminal, not only the panel
        self._event("error", detail=self.error)
        self._refresh_panel()

    # -- fetch + decode -----------------------------------------------------------------------------
    def _read_header(self, src) -> None:
        """Read a URL's stream until its header is complete and check it (magic, version, ``--lod``) before
        the viewer starts, as a local file is checked; the blocks read are kept for the decode loop.

        Raises:
            InputError: the URL's bytes are not a ``.vqad`` file, or the model lacks ``--lod``.
        """
        from vqad.fileformat import StreamDecoder

        dec = StreamDecoder()
        self._stream = iter(src)
        try:
            while dec.cfg is None:
                block = next(self._stream, None)
                if block is None:
                    raise dec.truncation_error()
                self._head.append(block)
                self._arrivals.append((self._now(), dec.bytes_received + len(block)))
                dec.feed(block)
        except StreamError as exc:
            if dec.cfg is None:  # (damage past the header, in the same block, is the decode loop's to report)
                raise InputError(f"{self.source} is not a readable .vqad file: {exc}") from None
        _check_lod(self.stop_lod, dec.base_level, dec.max_level, self.source)

    def _fetch_loop(self, src, blocks: queue.Queue) -> None:
        n = 0
        try:
            for data in self._head:  # (their arrival times were recorded as they came)
                n += len(data)
                blocks.put(data)
            for data in self._stream if self._stream is not None else src:
                n += len(data)
                self._arrivals.append((self._now(), n))
                blocks.put(data)
                if self._stopped.is_set():
                    break
            blocks.put(None)
        except VqadError as exc:
            blocks.put(exc)
        except Exception as exc:  # an unexpected failure of the transport: shown, never a crash
            traceback.print_exc()
            blocks.put(FetchError(f"reading {self.source} failed: {type(exc).__name__}: {exc}"))

    def _arrival_time(self, nbytes: int) -> float:
        for t, n in self._arrivals:
            if n >= nbytes:
                return t
        return self._now()

    def _decode_loop(self, src) -> None:
        from vqad.fileformat import StreamDecoder

        blocks: queue.Queue = queue.Queue()
        fetcher = threading.Thread(target=self._fetch_loop, args=(src, blocks), name="vqad-view-fetch", daemon=True)
        fetcher.start()
        dec = StreamDecoder(stop_lod=self.stop_lod)
        try:
            while not self._stopped.is_set():
                try:
                    item = blocks.get(timeout=0.2)  # (so that stop() is never kept waiting by a stalled link)
                except queue.Empty:
                    continue
                if item is None:
                    break
                if isinstance(item, Exception):
                    raise item
                try:
                    dec.feed(item)
                finally:  # a block that completes LODs and then hits damage: those LODs are still good
                    self.bytes_received = dec.bytes_received
                    if dec.cfg is not None and self.kind is None:  # (--lod was checked against the header)
                        self.kind = dec.cfg.get("kind", "sdf")
                        self.mode = self._mode_for_kind()
                        self._build_gui_for_kind()
                    for lv in sorted(set(dec.prefix_sizes) - set(self._fields)):
                        self._lod_arrived(dec, lv)
                self._refresh_panel()
                if self.stop_lod is not None and dec.prefix_sizes and max(dec.prefix_sizes) >= self.stop_lod:
                    src.close()
                    break
            else:
                return
            if self._stopped.is_set():
                return
            self._event("finished", nbytes=dec.bytes_received)
            if not dec.prefix_sizes:
                self._fail(str(dec.truncation_error()))
            elif not dec.finished and (self.stop_lod is None or max(dec.prefix_sizes) < self.stop_lod):
                of = f" of {self.total_bytes:,}" if self.total_bytes else ""
                self._fail(f"The stream ended after {dec.bytes_received:,}{of} bytes {dec.where()}, before the finest "
                           f"LOD {dec.max_level}: the file is truncated (re-download or re-export it).")
        except (StreamError, FetchError) as exc:
            src.close()
            self._fail(str(exc))
        except VqadError as exc:
            src.close()
            self._fail(str(exc))
        except Exception as exc:  # a bug: shown in the panel and on stderr, the viewer keeps running
            src.close()
            traceback.print_exc()
            self._fail(f"internal error while decoding: {type(exc).__name__}: {exc}")
        finally:
            self.loaded.set()

    def _lod_arrived(self, dec, lod: int) -> None:
        nbytes = dec.prefix_sizes[lod]
        self._event("lod_bytes", lod, nbytes, t=self._arrival_time(nbytes))
        self._add_field(lod, dec.field(lod, device=self.device), nbytes)

    def _load_checkpoint(self) -> None:
        from vqad.checkpoint import load_checkpoint

        try:
            field, _ = load_checkpoint(self.source, self.device)
            field.eval()
            self.kind = field.kind
            self.mode = self._mode_for_kind()
            self._build_gui_for_kind()
            path = Path(self.source) / "model.safetensors"
            self.total_bytes = self.bytes_received = path.stat().st_size
            lods = [lv for lv in field.lods if self.stop_lod is None or lv <= self.stop_lod]  # --lod: no finer one
            for lv in lods:
                self._event("lod_bytes", lv, self.total_bytes)
            for lv in lods:
                self._add_field(lv, field, None)
            self._event("finished", nbytes=self.total_bytes)
        except VqadError as exc:
            self._fail(str(exc))
        except Exception as exc:
            traceback.print_exc()
            self._fail(f"internal error while loading: {type(exc).__name__}: {exc}")
        finally:
            self._refresh_panel()
            self.loaded.set()

    def _add_field(self, lod: int, field, nbytes: int | None) -> None:
        if self.kind is None:
            self.kind = field.kind
        self._dense[lod] = field.grid.dense_fp16_bits(lod) / 8
        if nbytes is None:  # a checkpoint: the stored grid up to this LOD plus the decoders
            nbytes = int(field.grid.stored_bits(lod) / 8 + field.decoder_bits() / 8)
        self._prefix[lod] = nbytes
        if field.kind == "nerf" and id(field) not in self._nerf_ctx:
            self._nerf_ctx[id(field)] = nerf_context(field)
        with self._cond:
            self._fields[lod] = field
            self.lods_available = sorted(self._fields)
            self._event("lod_ready", lod, nbytes)
            self._update_current()
        self._refresh_slider()

    # -- rendering ----------------------------------------------------------------------------------
    def _next_job(self):
        """Under ``_cond``: (view, key, quality) to draw next, or the seconds to wait for one."""
        now = time.monotonic()
        wait = None
        if self.current_lod is None:
            return None, None
        key_scene = self._scene_version
        for v in self._views.values():
            if v.camera is None:
                continue
            key = (v.version, key_scene)
            if v.rendered != key:
                return (v, key, "preview"), None
            if v.quality == "preview":
                left = v.t_change + self.still_delay - now
                if left <= 0:
                    return (v, key, "still"), None
                wait = left if wait is None else min(wait, left)
        return None, wait

    def _render_loop(self) -> None:
        while not self._stopped.is_set():
            with self._cond:
                job, wait = self._next_job()
                if job is None:
                    self._cond.wait(timeout=wait if wait is not None else 0.5)
                    continue
                v, key, quality = job
                lod, field, mode = self.current_lod, self._fields[self.current_lod], self.mode
                camera = v.camera
            try:
                self._draw(v, key, quality, lod, field, mode, camera)
            except Exception as exc:  # a bug in a frame (or a camera it cannot take): shown, the loop goes on
                traceback.print_exc()
                with self._cond:
                    v.rendered, v.quality = key, "still"
                if self.error is None or self._render_error:  # (never over the stream's own error)
                    self._render_error = True
                    self._fail(f"internal error while rendering: {type(exc).__name__}: {exc}", best=False)
            else:
                if self._render_error:  # the next good frame clears it
                    self.error, self._render_error = None, False
                    self._refresh_panel()

    def _size(self, camera: ViewCamera, long_side: int) -> tuple[int, int]:
        s = long_side / max(camera.width, camera.height)
        if s >= 1:
            return camera.width, camera.height
        return max(int(round(camera.width * s)), 8), max(int(round(camera.height * s)), 8)

    def _superseded(self, v: _View, key) -> bool:
        return self._stopped.is_set() or (v.version, self._scene_version) != key

    def _draw(self, v: _View, key, quality: str, lod: int, field, mode: str, camera: ViewCamera) -> None:
        ctx = self._nerf_ctx.get(id(field))
        t = time.perf_counter()
        if quality == "preview":
            cam = camera.resized(*self._size(camera, self._preview_cap))
            img = render_frame(field, lod, cam, mode, ctx)
        else:
            cam = camera
            bands = []
            for r in range(0, cam.height, BAND_ROWS):
                if self._superseded(v, key):
                    return  # a newer camera or LOD: the preview stays until its frame comes
                bands.append(render_frame(field, lod, cam.band(r, min(BAND_ROWS, cam.height - r)), mode, ctx))
            img = np.concatenate(bands, axis=0)
        ms = (time.perf_counter() - t) * 1e3
        if quality == "preview":  # keep previews near 8 frames/s: shrink when slow, grow back when fast
            scale = math.sqrt(125.0 / max(ms, 1.0))
            self._preview_cap = int(min(self.preview_size, max(64, self._preview_cap * min(max(scale, 0.7), 1.3))))
        if v.sink is not None and not self._stopped.is_set():
            try:
                v.sink(img, quality)
            except Exception:  # the tab closed while we drew
                pass
        with self._cond:
            v.rendered, v.quality = key, quality
            self.render_ms = ms
            self.last_frame = img
            first = not self.lods_shown
            if lod not in self.lods_shown:
                self.lods_shown.append(lod)
                self._event("lod_shown", lod, detail=f"{quality} {img.shape[1]}x{img.shape[0]}")
            if first:
                self._event("first_picture", lod, detail=f"{img.shape[1]}x{img.shape[0]}")
            self._update_current()  # following the stream: on to the next LOD
            if quality == "still":
                if lod not in self.event_times("lod_still"):
                    self._event("lod_still", lod, detail=f"{img.shape[1]}x{img.shape[0]}")
                self.last_still, self.last_camera, self.last_still_lod, self.last_still_mode = img, cam, lod, mode
        self._refresh_slider()
        self._refresh_panel(stats_only=True)

    # -- the browser side (viser) ------------------------------------------------------------------
    def _serve(self, host: str, port: int) -> None:
        try:
            import viser
        except ImportError as exc:
            raise InputError("vqad view needs viser: pip install 'vqad[view]'") from exc
        try:
            server = viser.ViserServer(host=host, port=port, label="vqad view", verbose=False)
        except OSError as exc:
            raise InputError(f"cannot serve the viewer on {host}:{port}: {exc.strerror or exc} (try another --port)") from exc
        self._server = server
        shown_host = "localhost" if host in ("0.0.0.0", "127.0.0.1", "::") else f"[{host}]" if ":" in host else host
        self.port = server.get_port()
        self.url = f"http://{shown_host}:{self.port}/"
        server.scene.set_up_direction("+y")
        server.initial_camera.position = DEFAULT_EYE
        server.initial_camera.look_at = (0.0, 0.0, 0.0)
        server.initial_camera.up = (0.0, 1.0, 0.0)
        server.initial_camera.fov = DEFAULT_FOV
        gui = server.gui
        g = self._gui
        g["title"] = gui.add_markdown(f"**{Path(self.source).name if not is_url(self.source) else self.source}**")
        g["lod"] = gui.add_slider("LOD", min=0, max=1, step=1, initial_value=0, disabled=True,
                                  hint="the level of detail drawn (up to the finest received)")
        g["follow"] = gui.add_checkbox("Follow finest LOD", True, hint="switch to each new LOD as it arrives")
        g["stats"] = gui.add_markdown("waiting for the first bytes…")
        g["error"] = gui.add_markdown("", visible=False)
        g["mode_folder"] = gui.add_folder("View")
        g["mesh_folder"] = gui.add_folder("Mesh export", visible=False)
        with g["mesh_folder"]:
            g["mesh_fmt"] = gui.add_dropdown("Format", ("PLY", "GLB"), initial_value="PLY")
            g["mesh_res"] = gui.add_slider("Resolution", min=64, max=384, step=32, initial_value=192,
                                           hint="marching cubes lattice per axis (256: ~30 s on 2 CPU cores)")
            g["mesh_btn"] = gui.add_button("Export mesh", hint="marching cubes of the current LOD, in world units")
            g["mesh_status"] = gui.add_markdown("")
        g["metrics"] = gui.add_markdown("", visible=False)

        # (an event without a client is our own assignment of the value: not the user's choice)
        @g["lod"].on_update
        def _(event) -> None:
            if event.client is None:
                return
            g["follow"].value = False
            self.set_lod(int(g["lod"].value))

        @g["follow"].on_update
        def _(event) -> None:
            if event.client is None:
                return
            self.set_lod(None if g["follow"].value else self.current_lod)
            self._refresh_slider()

        @g["mesh_btn"].on_click
        def _(event) -> None:
            client = event.client
            threading.Thread(target=self._send_mesh, args=(client,), name="vqad-view-mesh", daemon=True).start()

        @server.on_client_connect
        def _(client) -> None:
            with self._cond:
                view = self._new_view(lambda img, q: client.scene.set_background_image(
                    img, format="jpeg" if q == "preview" else "png", jpeg_quality=85 if q == "preview" else None),
                    client.client_id)

            @client.camera.on_update
            def _(cam) -> None:
                if not (0 < float(cam.fov) < math.pi and np.all(np.isfinite(cam.position))
                        and np.all(np.isfinite(cam.wxyz)) and float(np.linalg.norm(cam.wxyz)) > 0):
                    return  # a camera a browser cannot have (no field of view, no rotation): nothing to draw
                w, h = max(int(cam.image_width or 640), 1), max(int(cam.image_height or 480), 1)
                long_side = min(self.still_size, max(w, h)) if max(w, h) >= 256 else self.still_size
                s = long_side / max(w, h)
                camera = ViewCamera.from_world(cam.position, cam.wxyz, cam.fov, max(int(round(w * s)), 8),
                                               max(int(round(h * s)), 8))
                self.move_view(view.id, camera)

        @server.on_client_disconnect
        def _(client) -> None:
            with self._cond:
                self._views = {vid: v for vid, v in self._views.items() if v.owner != client.client_id}

    def _send_mesh(self, client) -> None:
        g = self._gui
        fmt = str(g["mesh_fmt"].value).lower()
        lod = self.current_lod
        if lod is None:
            g["mesh_status"].content = "**cannot export yet:** wait for the first level of detail to arrive"
            return
        g["mesh_btn"].disabled = True
        g["mesh_status"].content = f"meshing LOD {lod}…"
        try:
            data = self.export_mesh(fmt, int(g["mesh_res"].value), lod)
            src = Path(str(self.source).rstrip("/"))
            stem = src.parent.name if src.name == "checkpoint" and src.parent.name else src.stem  # (a fit's OUT/checkpoint)
            name = f"{stem or 'model'}_lod{lod}.{fmt}"
            client.send_file_download(name, data, save_immediately=True)
            g["mesh_status"].content = f"sent {name} ({len(data) / 1e3:,.0f} kB)"
        except VqadError as exc:
            g["mesh_status"].content = f"**cannot export:** {exc}"
        finally:
            g["mesh_btn"].disabled = False

    def _build_gui_for_kind(self) -> None:
        g = self._gui
        if not g or "mode" in g:
            return
        with g["mode_folder"]:
            g["mode"] = self._server.gui.add_dropdown("Mode", modes_for(self.kind), initial_value=self.mode)

        @g["mode"].on_update
        def _(event) -> None:
            if event.client is not None:
                self.set_mode(str(g["mode"].value))

        g["mesh_folder"].visible = self.kind in DISTANCE_KINDS
        g["mesh_res"].visible = self.kind != "tsdf"  # a TSDF is meshed on its own lattice: no resolution to choose

    def _refresh_slider(self) -> None:
        g = self._gui
        if not g or not self.lods_available:
            return
        lo, hi = self.lods_available[0], self.lods_available[-1]
        state = (lo, hi, self.current_lod)
        if state == self._slider_state:
            return
        self._slider_state = state
        slider = g["lod"]
        slider.min = lo
        slider.max = hi if hi > lo else lo + 1  # one LOD so far: a slider needs a range, it stays disabled
        slider.disabled = hi == lo
        if self.current_lod is not None:
            slider.value = self.current_lod

    def _refresh_panel(self, stats_only: bool = False) -> None:
        g = self._gui
        if not g:
            return
        lod = self.current_lod
        lines = []
        if self.total_bytes:
            lines.append(f"bytes received: **{self.bytes_received / 1e3:,.1f} / {self.total_bytes / 1e3:,.1f} kB** "
                         f"({100 * self.bytes_received / self.total_bytes:.0f} %)")
        else:
            lines.append(f"bytes received: **{self.bytes_received / 1e3:,.1f} kB**")
        if self.lods_available:
            lines.append(f"LOD in use: **{lod}** of {self.lods_available[0]}..{self.lods_available[-1]} received")
            if lod in self._prefix:
                nb, dense = self._prefix[lod], self._dense[lod]
                lines.append(f"LOD {lod}: {nb / 1e3:,.1f} kB, dense fp16 grid {dense / 1e3:,.1f} kB: **{dense / max(nb, 1):,.1f}×** smaller")
        if self.render_ms is not None:
            lines.append(f"render: {self.render_ms:,.0f} ms/frame on {self.device}")
        g["stats"].content = "  \n".join(lines)
        # the metrics of the LOD in use, on every refresh (following the stream steps LODs between full ones)
        text = ""
        if self.metrics and lod is not None:
            per = (self.metrics.get("lods") or {}).get(str(lod)) or (self.metrics.get("lods") or {}).get(lod)
            if isinstance(per, dict):
                vals = ", ".join(f"{k} {v:.4g}" for k, v in per.items() if isinstance(v, (int, float)) and k != "seconds")
                text = f"metrics at LOD {lod}: {vals}"
        if g["metrics"].content != text:
            g["metrics"].content, g["metrics"].visible = text, bool(text)
        if stats_only:
            return
        g["error"].content = f"**⚠ {self.error}**" if self.error else ""
        g["error"].visible = bool(self.error)


def _read_metrics(source: str) -> dict | None:
    """``metrics.json`` in a checkpoint directory, beside it, or beside a local ``.vqad`` file."""
    if is_url(source):
        return None
    p = Path(source)
    for cand in ([p / "metrics.json", p.parent / "metrics.json"] if p.is_dir() else [p.with_name("metrics.json")]):
        try:
            doc = json.loads(cand.read_text())
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("lods"), dict):
            return doc
    return None


def _check_lod(lod: int | None, base: int, top: int, what: str) -> None:
    if lod is not None and not base <= lod <= top:
        raise InputError(f"--lod {lod}: {what} has LODs {base}..{top}")


def _check_local_model(source: str, lod: int | None) -> None:
    """A local source checked before the viewer starts, so that the terminal says what is wrong: a
    checkpoint's config, or a ``.vqad`` file read up to its header (its LODs), and ``lod`` among them."""
    from vqad.checkpoint import read_config
    from vqad.fileformat import StreamDecoder

    path = Path(source)
    if path.is_dir():
        grid = read_config(source).get("grid") or {}  # not a checkpoint: an InputError now
        if not (path / "model.safetensors").is_file():
            raise InputError(f"the checkpoint {source} has no model.safetensors (a save was interrupted, or it was "
                             "copied in part): view another checkpoint or a .vqad file")
        if isinstance(grid.get("base_level"), int) and isinstance(grid.get("max_level"), int):
            _check_lod(lod, grid["base_level"], grid["max_level"], f"the checkpoint {source}")
        return
    if path.exists() and not path.is_file():  # a FIFO or a device: reading it would wait or never end
        raise InputError(f"{source} is not a regular file: give a .vqad file, a checkpoint directory or a URL")
    dec = StreamDecoder()
    try:
        with open(path, "rb") as f:
            while dec.cfg is None:
                block = f.read(1 << 16)
                if not block:
                    raise dec.truncation_error()
                dec.feed(block)
    except StreamError as exc:
        if dec.cfg is None:  # damage after the header: the viewer shows the LODs before it, and the error
            raise InputError(f"{source} is not a readable .vqad file: {exc}") from None
    except OSError as exc:
        raise InputError(f"cannot read {source}: {exc.strerror or exc}") from None
    _check_lod(lod, dec.base_level, dec.max_level, source)


def check_host(host: str, port: int) -> None:
    """Refuse an address the viewer cannot serve on, at once (viser binds in a thread of its own, so a bad
    ``--host`` used to leave the command waiting with nothing said)."""
    from vqad.app.sockets import bind_socket

    bind_socket(host, port).close()


def open_viewer(source: str, host: str = "127.0.0.1", port: int = 0, bandwidth: float | None = None, device=None,
                lod: int | None = None, serve: bool = True, still_size: int = STILL_SIZE) -> ViewerHandle:
    """Open the viewer of ``source`` and return at once; the handle's ``url`` is where to point a browser.

    Args:
        source: a ``.vqad`` file, a checkpoint directory or an ``http(s)://`` URL of a ``.vqad``.
        host, port: where to serve (``port=0``: any free port).
        bandwidth: bytes/s to throttle the source to (simulates a slow link; :func:`~vqad.app.fetch.parse_rate`).
        device: where the field lives and renders (``"auto"``, ``"cpu"``, ``"cuda"``; default auto).
        lod: stop at this LOD (a ``.vqad`` is read no further than it needs).
        serve: False: no web server, only headless views (:meth:`ViewerHandle.add_view`), for tests and benchmarks.
        still_size: long side of the still frame in pixels.
    Raises:
        InputError: the source does not exist or is not a model; the URL cannot be fetched (HTTP
            error, no server); the port is taken; viser is not installed.
    """
    from vqad.device import resolve_device

    source = str(source)
    dev = resolve_device(device or "auto")
    if still_size < 16:
        raise InputError(f"the still frame size must be at least 16 pixels, got {still_size}")
    if not is_url(source):
        if "://" in source:
            raise InputError(f"{source}: only http:// and https:// URLs are read (or pass a local .vqad file or "
                             "checkpoint directory)")
        if not Path(source).exists():
            raise InputError(f"no such model: {source} (pass a .vqad file, a checkpoint directory or an http(s):// URL)")
        _check_local_model(source, lod)
    if serve:
        check_host(host, port)
    handle = ViewerHandle(source, dev, lod, bandwidth, still_size=still_size)
    if not is_url(source) and Path(source).is_dir():
        if bandwidth is not None:
            raise InputError("--bandwidth simulates streaming a .vqad file; a checkpoint directory is loaded whole "
                             "(export it first: vqad export)")
        loader = threading.Thread(target=handle._load_checkpoint, name="vqad-view-load", daemon=True)
    else:
        src = open_source(source, bandwidth)
        handle._source_obj = src
        handle.total_bytes = src.total
        if is_url(source):
            try:
                handle._read_header(src)
            except BaseException:
                src.close()
                if handle._stream is not None and hasattr(handle._stream, "close"):
                    handle._stream.close()  # (the fetch generator: its client closes)
                raise
        loader = threading.Thread(target=handle._decode_loop, args=(src,), name="vqad-view-decode", daemon=True)
    handle.metrics = _read_metrics(source)
    if serve:
        try:
            handle._serve(host, port)
        except BaseException:
            if handle._source_obj is not None:
                handle._source_obj.close()
            raise
    renderer = threading.Thread(target=handle._render_loop, name="vqad-view-render", daemon=True)
    handle._threads = [loader, renderer]
    loader.start()
    renderer.start()
    return handle


def orbit_view(width: int = STILL_SIZE, height: int = STILL_SIZE, eye=DEFAULT_EYE, fov_y: float = DEFAULT_FOV) -> ViewCamera:
    """The ``vqad render`` camera as a :class:`ViewCamera` (unit cube), at ``width × height``."""
    return ViewCamera.from_world(eye, look_at_rotation(eye, (0.0, 0.0, 0.0)), fov_y, width, height)


__all__ = ["open_viewer", "ViewerHandle", "ViewerEvent", "orbit_view"]

