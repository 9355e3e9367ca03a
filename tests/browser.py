"""Headless Chromium for tests: a screenshot of a local page, and where a colour lands in it."""
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium's connections are refused on a closed network,
# many at a time, and it can hang; the resolver rule fails every host name at once, so a page that
# names a CDN (the negative controls) sends nothing anywhere.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]  # a local server only


def require_chromium() -> None:
    """Skip where Debian's chromium is not installed; in CI (where `make setup` installs it) fail."""
    if CHROMIUM.exists():
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI must have chromium: `make setup` installs it")
    pytest.skip("chromium is not installed (`make setup` installs it)")


def require_npm() -> None:
    """Skip where npm is missing; in CI fail (the offline plots template comes from npm)."""
    if shutil.which("npm"):
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI must have npm: the offline dvc plots template installs vega from the npm registry")
    pytest.skip("npm is not installed")


def screenshot(page: Path | str, size=(1000, 1000), wait_ms: int = 5000, timeout: int = 60) -> np.ndarray:
    """The first `size` pixels of a file or a 127.0.0.1 URL as an [H, W, 3] uint8 array. Up to
    `wait_ms` of virtual time lets scripts that draw after the load event (vega-embed) finish; an
    idle page skips ahead, so a static page is not slowed. (A budget of 0 makes Chromium 156 hang.)"""
    with tempfile.TemporaryDirectory(prefix="chromium-") as tmp:
        out = Path(tmp) / "shot.png"
        target = page if isinstance(page, str) else page.resolve().as_uri()
        cmd = [str(CHROMIUM), *FLAGS, f"--user-data-dir={tmp}/profile", f"--virtual-time-budget={wait_ms}",
               f"--window-size={size[0]},{size[1]}", f"--screenshot={out}", target]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        assert out.exists(), f"chromium wrote no screenshot (exit {run.returncode}):\n{run.stderr[-3000:]}"
        return np.asarray(Image.open(out).convert("RGB"))


def colour_mask(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> np.ndarray:
    """Where the screenshot is within `tol` of `rgb` in every channel."""
    return (np.abs(pixels.astype(int) - np.array(rgb)) <= tol).all(axis=-1)


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, left, height, width) of the True pixels; None if there are none."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
