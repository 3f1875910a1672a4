"""Screenshots of ``vqad view`` at successive byte counts of a streamed .vqad → docs/img/stream_strip.png.

A local HTTP server releases the file up to a byte limit; the limit is raised to each LOD's prefix
size in turn; after each, once the viewer has drawn that LOD's still frame, headless Chromium
(Debian's chromium + chromium-driver through selenium) takes a screenshot of the page. The tiles
are labelled with the bytes received and put side by side.

    python benchmarks/view_strip.py [--model out/demo/sdf/model.vqad] [--out docs/img/stream_strip.png]
"""

from __future__ import annotations

import argparse
import http.server
import io
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


class GatedServer:
    """Serves ``data`` at ``/model.vqad`` (one streamed GET, no ranges) but no byte at or past ``limit``
    until :meth:`release` raises it."""

    def __init__(self, data: bytes) -> None:
        self.data, self.limit, self.cond = data, 0, threading.Condition()
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(srv.data)))
                self.end_headers()
                self.wfile.flush()
                pos = 0
                try:
                    while pos < len(srv.data):
                        with srv.cond:
                            srv.cond.wait_for(lambda: srv.limit > pos, timeout=120)
                            end = min(srv.limit, len(srv.data))
                        self.wfile.write(srv.data[pos:end])
                        self.wfile.flush()
                        pos = end
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/model.vqad"

    def release(self, limit: int) -> None:
        with self.cond:
            self.limit = limit
            self.cond.notify_all()

    def close(self) -> None:
        self.release(len(self.data))
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=".vqad file (default: out/demo/sdf/model.vqad)")
    ap.add_argument("--out", default=str(REPO / "docs/img/stream_strip.png"))
    ap.add_argument("--tile", type=int, default=420, help="width of each screenshot in the strip")
    args = ap.parse_args()
    from PIL import Image, ImageDraw
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from vqad.app.view import open_viewer
    from vqad.fileformat import lod_prefix_sizes

    model = Path(args.model) if args.model else next(
        p for p in (REPO / "out/demo/sdf/model.vqad", REPO.parent / "main/out/demo/sdf/model.vqad") if p.exists())
    data = model.read_bytes()
    sizes = lod_prefix_sizes(data)
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--enable-unsafe-swiftshader",
                "--use-angle=swiftshader", "--window-size=960,640"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    srv = GatedServer(data)
    handle = open_viewer(srv.url, port=0, device="cpu")
    tiles = []
    try:
        drv.get(handle.url)
        if not handle.wait_for(lambda h: h.watching >= 1, timeout=30):
            raise SystemExit("the viewer page never sent its camera")
        for lod, nbytes in sorted(sizes.items()):
            srv.release(nbytes)
            if not handle.wait_for(lambda h: h.last_still_lod == lod, timeout=120):
                raise SystemExit(f"LOD {lod} was not drawn: {handle.error}")
            time.sleep(1.0)  # the browser paints the still frame
            # headless Chromium renders WebGL in software, and viser says so in a notification: not part of the picture
            drv.execute_script("document.querySelectorAll('[class*=Notification]').forEach(e => e.remove())")
            img = Image.open(io.BytesIO(drv.get_screenshot_as_png())).convert("RGB")
            img = img.resize((args.tile, round(img.height * args.tile / img.width)), Image.LANCZOS)
            label = Image.new("RGB", (img.width, 28), "white")
            ImageDraw.Draw(label).text((8, 8), f"after {nbytes / 1e3:.1f} kB of {len(data) / 1e3:.1f} kB: LOD {lod}",
                                       fill=(20, 20, 20))
            tile = Image.new("RGB", (img.width, img.height + 28), "white")
            tile.paste(label, (0, 0))
            tile.paste(img, (0, 28))
            tiles.append(tile)
            print(f"LOD {lod} after {nbytes:,} bytes", flush=True)
    finally:
        handle.stop()
        srv.close()
        drv.quit()
    strip = Image.new("RGB", (sum(t.width for t in tiles) + 6 * (len(tiles) - 1), tiles[0].height), (200, 200, 200))
    x = 0
    for t in tiles:
        strip.paste(t, (x, 0))
        x += t.width + 6
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    strip.save(args.out, optimize=True)
    print(f"wrote {args.out} ({len(tiles)} screenshots)")


if __name__ == "__main__":
    main()
