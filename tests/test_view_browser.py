"""vqad view in a real headless Chromium (Debian's chromium + chromium-driver, through selenium).

A throttled HTTP server streams a small SDF .vqad; the viewer opens its URL; the browser loads the
viewer page. Asserted: the object is on screen after the first LOD, every LOD is drawn in turn up
to the finest, the last still frame matches ``vqad render`` of the whole file, and a truncated or
corrupted stream keeps the best LOD on screen with the error in the panel. Screenshots are saved
under ``$VQAD_TEST_ARTIFACTS`` (default ``tests/artifacts/view``). No browser is downloaded: the
test skips when chromium or chromedriver is absent.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from test_view import FileServer, header_size, prefix_sizes, tiny_vqad_bytes

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
    pytest.skip("headless browser test: chromium and chromedriver not installed (apt-get install chromium "
                "chromium-driver)", allow_module_level=True)
selenium = pytest.importorskip("selenium", reason="headless browser test: selenium not installed (pip install 'vqad[test]')")
pytest.importorskip("viser", reason="vqad view needs viser: pip install 'vqad[view]'")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402

from vqad.app.view import open_viewer  # noqa: E402

WINDOW = (900, 640)
ARTIFACTS = Path(os.environ.get("VQAD_TEST_ARTIFACTS", Path(__file__).resolve().parent / "artifacts" / "view"))


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--enable-unsafe-swiftshader",
                "--use-angle=swiftshader", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(30)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield drv
    drv.quit()
    print(f"\nviewer screenshots: {ARTIFACTS}")


def screenshot(drv, name: str) -> np.ndarray:
    from PIL import Image

    png = drv.get_screenshot_as_png()
    (ARTIFACTS / name).write_bytes(png)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def scene_region(img: np.ndarray) -> np.ndarray:
    """The part of the page where the 3D scene shows and no panel or notification lies: left 60 %, lower 70 %."""
    h, w = img.shape[:2]
    return img[int(0.3 * h): int(0.92 * h), int(0.08 * w): int(0.6 * w)]


def changed_fraction(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.abs(scene_region(a).astype(int) - scene_region(b).astype(int)).max(-1) > 30).mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(float) - b.astype(float)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def open_page(drv, handle) -> np.ndarray:
    """Load the viewer page, wait until it has sent its camera; returns the blank page's screenshot."""
    drv.get(handle.url)
    assert handle.wait_for(lambda h: h.watching >= 1, timeout=30), "the page never sent its camera"
    time.sleep(0.3)
    return np.asarray(screenshot(drv, "blank.png"))


def page_text(drv) -> str:
    from selenium.webdriver.common.by import By

    return drv.find_element(By.TAG_NAME, "body").text


def test_stream_refines_to_the_finest_lod(browser):
    from vqad import fileformat
    from vqad.sdf.render import OrbitCamera, render_sdf

    data = tiny_vqad_bytes()
    sizes = prefix_sizes(data)
    lods = sorted(sizes)
    go = threading.Event()
    with FileServer(data, rate=len(data) / 3.0, hold=go, hold_after=header_size(data)) as srv:  # ~3 s for the whole file
        handle = open_viewer(srv.url, port=0, device="cpu")
        try:
            blank = open_page(browser, handle)
            go.set()  # the browser is watching: start the transfer
            assert handle.wait_for(lambda h: h.lods_shown, timeout=30)
            first = handle.lods_shown[0]
            assert first == lods[0]  # the first picture is the coarsest LOD, drawn before the rest arrived
            assert handle.bytes_received < len(data)
            assert handle.wait_for(lambda h: changed_fraction(screenshot(browser, f"lod{first}_first.png"), blank) > 0.05,
                                   timeout=10, poll=0.3), "the object did not appear on the page after the first LOD"
            assert handle.wait_for(lambda h: h.loaded.is_set() and h.last_still_lod == lods[-1], timeout=40)
            time.sleep(0.5)  # let the browser paint the last still frame
            final = screenshot(browser, f"lod{lods[-1]}_final.png")
            assert changed_fraction(final, blank) > 0.05
            assert handle.lods_shown == lods  # every LOD in turn, up to the finest
            assert handle.error is None and f"LOD in use: {lods[-1]}" in page_text(browser)
            # the last still frame is `vqad render` of the whole file: same pose (the page kept the initial
            # camera), same renderer; the browser's float32 camera makes it equal up to rounding
            still = handle.last_still
            h, w = still.shape[:2]
            ref = render_sdf(fileformat.load(data), None, OrbitCamera(width=w, height=h))
            from PIL import Image

            Image.fromarray(still).save(ARTIFACTS / "last_still.png")
            Image.fromarray(ref).save(ARTIFACTS / "vqad_render.png")
            assert max(w, h) >= 512
            assert psnr(still, ref) > 40, f"last still frame vs vqad render: {psnr(still, ref):.1f} dB"
            # the mesh export button: marching cubes of the current LOD, downloaded by the page
            from selenium.webdriver.common.by import By

            handle._gui["mesh_res"].value = 64  # (white box: a small lattice keeps the test short)
            next(b for b in browser.find_elements(By.TAG_NAME, "button") if "Export mesh" in b.text).click()
            assert handle.wait_for(lambda h: f"Received model_lod{lods[-1]}.ply" in page_text(browser), timeout=30,
                                   poll=0.3), page_text(browser)
            arrived, shown = handle.event_times("lod_bytes"), handle.event_times("lod_shown")
            print("\n" + "\n".join(f"LOD {lv}: bytes at {arrived[lv]:.2f} s, drawn at {shown[lv]:.2f} s" for lv in lods))
        finally:
            handle.stop()


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_damaged_stream_keeps_best_lod_and_says_so(browser, damage):
    data = tiny_vqad_bytes()
    sizes = prefix_sizes(data)
    lods = sorted(sizes)
    if damage == "truncated":
        bad = data[: sizes[lods[-1]] - 100]
        word = "truncated"
    else:
        b = bytearray(data)
        b[sizes[lods[-2]] + 40] ^= 0xFF
        bad = bytes(b)
        word = "damaged"
    go = threading.Event()
    with FileServer(bad, rate=len(data) / 1.5, hold=go, hold_after=header_size(data)) as srv:
        handle = open_viewer(srv.url, port=0, device="cpu", still_size=256)
        try:
            blank = open_page(browser, handle)
            go.set()
            assert handle.wait_for(lambda h: h.error is not None and h.last_still_lod == lods[-2], timeout=40)
            time.sleep(0.5)
            shot = screenshot(browser, f"{damage}.png")
            assert changed_fraction(shot, blank) > 0.05  # the best LOD stays on screen
            text = page_text(browser)
            assert word in text and f"Showing LOD {lods[-2]}" in text, text
            assert handle.current_lod == lods[-2]
        finally:
            handle.stop()
