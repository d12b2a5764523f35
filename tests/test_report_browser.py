"""Open a generated report in headless Chromium and check that it renders cleanly.

The browser is driven through the Chrome DevTools protocol over ``--remote-debugging-pipe`` (file
descriptors 3 and 4, NUL-separated JSON), standard library only. The protocol reports console calls,
uncaught exceptions, browser log entries (e.g. a resource that failed to load) and every network
request natively, so nothing is injected into the report.

Skipped when no Chromium is installed, unless the environment variable ``CI`` is set: then a missing
browser is a failure. Debian/Ubuntu: ``apt-get install -y chromium``. Set ``DGDLENS_CHROMIUM`` to use
another binary, and ``DGDLENS_SCREENSHOT_DIR`` to keep the full-page screenshot for a look by eye.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from dgdlens.report import build_report

pytestmark = pytest.mark.browser

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def _find_chromium() -> str | None:
    explicit = os.environ.get("DGDLENS_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return next((path for name in _CANDIDATES if (path := shutil.which(name))), None)


CHROMIUM = _find_chromium()
if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("headless Chromium not found (install the Debian package 'chromium' or set DGDLENS_CHROMIUM); "
                "this test is required when CI is set", allow_module_level=True)


class DevToolsPipe:
    """Minimal Chrome DevTools protocol client over ``--remote-debugging-pipe``."""

    def __init__(self, executable: str, profile_dir: str, *, timeout: float = 60.0):
        self.timeout = timeout
        cmd_read, cmd_write = os.pipe()  # we write commands, the browser reads them on fd 3
        res_read, res_write = os.pipe()  # the browser writes results on fd 4, we read them
        # Park the child's ends on high descriptors so that dup2 onto 3 and 4 cannot clobber either.
        child_in = fcntl.fcntl(cmd_read, fcntl.F_DUPFD_CLOEXEC, 20)
        child_out = fcntl.fcntl(res_write, fcntl.F_DUPFD_CLOEXEC, 20)
        os.close(cmd_read)
        os.close(res_write)

        def wire_pipes() -> None:  # runs in the child between fork and exec
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        args = [
            executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-extensions", "--disable-dev-shm-usage", "--mute-audio",
            "--hide-scrollbars", f"--user-data-dir={profile_dir}", "--remote-debugging-pipe", "about:blank",
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=wire_pipes, close_fds=False)
        os.close(child_in)
        os.close(child_out)
        self._out = os.fdopen(cmd_write, "wb", buffering=0)
        self._in = os.fdopen(res_read, "rb", buffering=0)
        self._messages: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        self._next_id = 0
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self) -> None:
        buffer = b""
        while chunk := self._in.read(1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for message in messages:
                self._messages.put(json.loads(message))
        self._messages.put(None)

    def _next_message(self, deadline: float) -> dict:
        try:
            message = self._messages.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError("no answer from Chromium in time") from None
        if message is None:
            raise RuntimeError(f"Chromium closed the DevTools pipe (exit code {self.proc.poll()})")
        return message

    def send(self, method: str, params: dict | None = None, *, session: str | None = None) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._out.write(json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._next_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method} failed: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, event: str) -> dict:
        for seen in self.events:
            if seen.get("method") == event:
                return seen
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._next_message(deadline)
            self.events.append(message)
            if message.get("method") == event:
                return message

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        for stream in (self._out, self._in):
            try:
                stream.close()
            except OSError:
                pass


_PAGE_FACTS = """JSON.stringify({
  title: document.title,
  textLength: document.body.innerText.length,
  sections: Array.from(document.querySelectorAll('section h2')).map(h => h.textContent),
  bodyHeight: document.body.scrollHeight,
  images: Array.from(document.images).map(i => ({
    complete: i.complete, naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,
    shownWidth: i.getBoundingClientRect().width, alt: i.alt,
    declaredWidth: Number(i.dataset.width), declaredHeight: Number(i.dataset.height)})),
  scripts: document.scripts.length,
  stylesheetLinks: document.querySelectorAll('link[rel=stylesheet]').length
})"""


def inspect_page(html_path: Path, screenshot_path: Path | None = None) -> dict:
    """Load a local HTML file; return page facts, console/log problems, requested URLs (and a screenshot)."""
    with tempfile.TemporaryDirectory(prefix="dgdlens-chromium-") as profile:
        browser = DevToolsPipe(CHROMIUM, profile)
        try:
            targets = browser.send("Target.getTargets")["targetInfos"]
            page = next(t for t in targets if t["type"] == "page")
            session = browser.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})[
                "sessionId"]
            for domain in ("Runtime", "Log", "Network", "Page"):
                browser.send(f"{domain}.enable", session=session)
            browser.send("Emulation.setDeviceMetricsOverride",
                         {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}, session=session)
            browser.send("Page.navigate", {"url": html_path.resolve().as_uri()}, session=session)
            browser.wait_for("Page.loadEventFired")
            facts = json.loads(browser.send("Runtime.evaluate", {"expression": _PAGE_FACTS, "returnByValue": True},
                                            session=session)["result"]["value"])
            if screenshot_path is not None:
                shot = browser.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                                    session=session)
                screenshot_path.write_bytes(base64.b64decode(shot["data"]))
            # A last round trip flushes events the page may still have queued after the load event.
            browser.send("Runtime.evaluate", {"expression": "0"}, session=session)
        finally:
            browser.close()
    events = [e for e in browser.events if e.get("sessionId") == session]
    problems = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
            problems.append(f"console.{params['type']}: " + " ".join(str(a.get("value", a.get("description")))
                                                                   for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            problems.append("exception: " + params["exceptionDetails"].get("text", "")
                            + str(params["exceptionDetails"].get("exception", {}).get("description", "")))
        elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            problems.append(f"log {params['entry']['level']}: {params['entry']['text']} {params['entry'].get('url', '')}")
        elif method == "Network.loadingFailed":
            problems.append(f"failed to load: {params.get('errorText')}")
    requests = [e["params"]["request"]["url"] for e in events if e.get("method") == "Network.requestWillBeSent"]
    return {"facts": facts, "problems": problems, "requests": requests}


def _synthetic_inputs(seed: int = 0) -> dict:
    """Small inputs touching every section of the report (precomputed UMAP keeps the test fast)."""
    rng = np.random.default_rng(seed)
    n_cells, n_types, n_features = 240, 4, 40
    types = rng.integers(0, n_types, n_cells)
    centres = rng.normal(0.0, 6.0, (n_types, 2))
    umap = centres[types] + rng.normal(size=(n_cells, 2))
    labels = pd.Series(np.array(["B cell", "T cell <CD4>", "NK & ILC", "Monocyte"], dtype=object)[types],
                       name="cell type")
    clusters = np.where(rng.random(n_cells) < 0.85, types, rng.integers(0, n_types + 2, n_cells))
    epochs = np.arange(1, 41)
    history = pd.DataFrame({"epoch": epochs, "train_loss": 4000 / epochs + 600,
                            "val_loss": 4000 / epochs + 650 + 0.5 * np.clip(epochs - 30, 0, None) ** 2,
                            "train_recon": 3000 / epochs + 500, "val_recon": 3000 / epochs + 540})
    dense = np.where(types[:, None] == (np.arange(n_features) % n_types)[None, :],
                     rng.gamma(2.0, 1.0, (n_cells, n_features)) * (rng.random((n_cells, n_features)) < 0.6), 0.0)
    dense[:, -5:] = 0.0  # five dead features
    rows = [{"feature": f, "term": f"process {t} of feature {f}", "direction": "up" if t == 0 else "down",
             "overlap": 5 + t, "set_size": 40 + t, "pval": 10.0 ** -(8 - f / 5 - t), "padj": 10.0 ** -(7 - f / 5 - t),
             "odds_ratio": 12.0 - t, "genes": [f"GENE{g}" for g in range(20)]}
            for f in range(20) for t in range(3)]
    features = pd.DataFrame(rows)
    genes = [f"GENE{g}" for g in range(120)]
    steering = {"feature": 0, "mode": "clamp", "value": 4.0, "n_cells": n_cells,
                "lfc": pd.Series(rng.normal(size=len(genes)), index=genes),
                "enrichment": features[features["feature"] == 1].drop(columns="feature")}
    return dict(history=history, umap=umap, clusters=clusters, labels=labels,
                sae_metrics={"fvu": 0.05, "mse": 0.01, "cosine": 0.97}, activations=sp.csr_matrix(dense),
                features=features, steering=steering, summary={"cells": n_cells, "genes": 120},
                params={"epochs": 40}, attribution="Gene sets: synthetic, for testing.", notes="Synthetic data.")


def test_report_renders_in_headless_chromium(tmp_path):
    if CHROMIUM is None:
        pytest.fail("CI is set but no Chromium was found: install it (apt-get install -y chromium) "
                    "or point DGDLENS_CHROMIUM at a Chrome/Chromium binary.")
    path = build_report(tmp_path / "report.html", title="Browser check", **_synthetic_inputs())
    n_img_tags = path.read_text(encoding="utf-8").count("<img ")
    screenshot = tmp_path / "report.png"
    result = inspect_page(path, screenshot)
    facts = result["facts"]

    assert result["problems"] == [], result["problems"]
    # Only the report itself and its embedded data: URIs are fetched, nothing from a network.
    assert all(u.startswith(("file:", "data:")) for u in result["requests"]), result["requests"]
    assert facts["title"] == "Browser check"
    assert facts["scripts"] == 0 and facts["stylesheetLinks"] == 0
    assert facts["sections"] == ["Training", "Latent space", "Mixture components and labels",
                                 "Sparse autoencoder quality", "Annotated features", "Feature activity on the map",
                                 "Steering a feature"]
    assert facts["textLength"] > 3000
    images = facts["images"]
    assert len(images) == n_img_tags == 6
    for image in images:
        assert image["complete"] and image["naturalWidth"] > 0 and image["naturalHeight"] > 0, image
        assert (image["naturalWidth"], image["naturalHeight"]) == (image["declaredWidth"], image["declaredHeight"])
        assert 0 < image["shownWidth"] <= 1120, image  # scaled to fit the page column
    assert screenshot.stat().st_size > 10_000
    keep = os.environ.get("DGDLENS_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(keep) / "report.png")


def test_checker_catches_broken_images_and_console_errors(tmp_path):
    """Negative control: the inspection must see a broken image and console errors when they exist."""
    if CHROMIUM is None:
        pytest.fail("CI is set but no Chromium was found.")
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head><title>broken</title></head><body><p>text</p>"
        '<img src="data:image/png;base64,AAAA" alt="corrupt">'
        '<img src="missing-file.png" alt="missing">'
        "<script>console.error('deliberate'); undefinedFunction();</script></body></html>",
        encoding="utf-8",
    )
    result = inspect_page(page)
    problems = " | ".join(result["problems"])
    assert "console.error: deliberate" in problems
    assert "undefinedFunction" in problems
    assert "failed to load" in problems or "log error" in problems
    widths = [img["naturalWidth"] for img in result["facts"]["images"]]
    assert widths == [0, 0]
