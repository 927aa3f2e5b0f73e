"""The web demo end to end in a real headless Chromium: `python app.py` serving on 127.0.0.1, a slice uploaded
through the page, the predicted class read back from it, the overlay checked, a text file refused.

Needs Debian's `chromium` (`apt-get install -y chromium chromium-driver`; .ci/run installs it) and the
`playwright` package; it skips without them. With EMTNET_APP_SCREENSHOT=<path> the page's screenshot is also
saved there, and EMTNET_APP_CHECKPOINT=<best.pth> serves that checkpoint instead of the test's own (the
README's screenshot: see "Web demo" there).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from prediction import demo
from prediction.folder import predict_image
from model.loading import load_model_from_checkpoint
from tests.helpers import REPO
from tests.test_app import save_test_checkpoint

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
SCREENSHOT_ENV, CHECKPOINT_ENV = "EMTNET_APP_SCREENSHOT", "EMTNET_APP_CHECKPOINT"

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(),
                                reason=f"no Chromium at {CHROMIUM}: apt-get install -y chromium chromium-driver")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, seconds: float = 90) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        if process.poll() is not None:
            raise AssertionError(f"app.py exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                if reply.read().strip() == b"ok":
                    return time.perf_counter() - start
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"app.py did not answer within {seconds} s:\n{log.read_text()}")


@pytest.fixture()
def served(tmp_path):
    """(url, checkpoint, examples) of `python app.py` on a free port; the server is always stopped afterwards."""
    checkpoint = Path(os.environ[CHECKPOINT_ENV]) if os.environ.get(CHECKPOINT_ENV) else \
        save_test_checkpoint(tmp_path / "runs" / "demo" / "latest" / "best.pth", steps=30)
    examples_dir = tmp_path / "examples"
    port, log = _free_port(), tmp_path / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "app.py"), "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
             "--port", str(port), "--runs", str(tmp_path / "runs"), "--examples-dir", str(examples_dir)],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        startup = _wait_healthy(url, process, log)
        print(f"app.py answered after {startup:.1f} s")
        yield url, checkpoint, demo.ensure_examples(examples_dir)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _not_blank(png: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 20, "the overlay image is blank"
    return image


def test_upload_predict_screenshot_and_refuse_a_text_file(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing: "
                                   "pip install -r requirements.txt")
    url, checkpoint, examples = served
    model, cfg, _ = load_model_from_checkpoint(checkpoint, "cpu")
    expected = predict_image(model, cfg, examples["glioma"])

    with sync_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1120})
            page.goto(url)
            page.get_by_text("Research tool, not a medical device.").wait_for(timeout=60_000)
            uploader = page.locator("input[type=file]")
            uploader.set_input_files(str(examples["glioma"]))
            verdict = page.get_by_text(re.compile(r"^Predicted class: "))
            verdict.wait_for(timeout=60_000)
            assert verdict.inner_text().strip() == f"Predicted class: {expected.predicted_class}"

            overlay = page.locator(".st-key-overlay img")
            overlay.wait_for(timeout=30_000)
            page.get_by_text("Grad-CAM: where the evidence").wait_for(timeout=60_000)
            page.locator("[data-testid='stVegaLiteChart'] canvas, [data-testid='stVegaLiteChart'] svg") \
                .first.wait_for(timeout=30_000)
            page.wait_for_timeout(500)  # let the images finish painting before the screenshot
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot))
            _not_blank(shot.read_bytes())
            if os.environ.get(SCREENSHOT_ENV):
                shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])
            drawn = _not_blank(overlay.screenshot())
            if (expected.mask() > 0).any():  # the tumour is painted red over the grey slice
                blue, green, red = (drawn[..., c].astype(int) for c in range(3))
                assert ((red - green > 60) & (red - blue > 60)).any()

            notes = tmp_path / "notes.txt"
            notes.write_text("clinical notes, not an MRI slice\n")
            uploader.set_input_files(str(notes))
            refusal = page.get_by_text("'notes.txt' is not an image")
            refusal.wait_for(timeout=30_000)
            assert "upload a JPEG or PNG slice" in refusal.inner_text()

            uploader.set_input_files(str(examples["meningioma"]))  # and it keeps serving
            other = predict_image(model, cfg, examples["meningioma"]).predicted_class
            page.get_by_text(f"Predicted class: {other}", exact=True).wait_for(timeout=60_000)
        finally:
            browser.close()
