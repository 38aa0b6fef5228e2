"""A real TensorBoard server and a headless Chromium looking at it, for the dashboard tests and
``tools/screenshots.py`` (which imports this file by path: one copy of the browser plumbing).

Everything is offline: the server listens on 127.0.0.1 and a free port and reads a local log
directory; Chromium starts with networking extras off and a fresh profile, and selenium talks to
the system ``chromedriver`` directly, so selenium-manager never tries to download a driver.

TensorBoard's Time Series tab is Angular (plain DOM); Custom Scalars, Images and HParams are Polymer
dashboards inside shadow roots, which ``DEEP_QUERY_JS`` walks.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

T = TypeVar("T")

TIMEOUT_S = 60.0
WINDOW = (1400, 1000)
INSTALL_HINT = "run `make browser`, or `apt-get install chromium chromium-driver` (Debian/Ubuntu)"
CHROME_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


# --------------------------------------------------------------------------- waiting


class StopWaiting(RuntimeError):
    """Raised by a ``wait_until`` condition that can never hold (e.g. the server process died)."""


def wait_until(
    condition: Callable[[], T | None],
    what: str,
    *,
    timeout: float = TIMEOUT_S,
    interval: float = 0.5,
) -> T:
    """Poll ``condition()`` until it returns a truthy value and return that value.

    Exceptions raised by ``condition`` count as "not yet" (the page or the server is still loading),
    except ``StopWaiting``, which propagates; after ``timeout`` seconds an ``AssertionError`` says
    ``what`` was awaited, with the last value or exception seen.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = condition()
            if value:
                return value
            last = value
        except StopWaiting:
            raise
        except Exception as exc:  # not ready yet; keep the last error for the message
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")
        time.sleep(interval)


# --------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class TensorBoard:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def get_json(self, path: str, body: Any = None) -> Any:
        """GET ``path`` (or POST ``body`` as JSON) from the server directly, without the browser."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read().decode())

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@contextmanager
def tensorboard_server(
    logdir: Path, *, log_path: Path | None = None, timeout: float = TIMEOUT_S
) -> Iterator[TensorBoard]:
    """Start ``tensorboard --logdir logdir`` on 127.0.0.1 and a free port; stop it on exit.

    Yields once ``/data/runs`` answers 200. The pure-Python loader (``--load_fast false``) needs no
    separate data-server binary; ``--reload_interval 1`` picks up files written while it runs.
    """
    port = free_port()
    own_log = log_path is None
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="tensorboard-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorboard.main",
                "--logdir",
                str(logdir),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--load_fast",
                "false",
                "--reload_interval",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    server = TensorBoard(f"http://127.0.0.1:{port}", proc, log_path)

    def ready() -> bool:
        if proc.poll() is not None:
            raise StopWaiting(f"tensorboard exited with {proc.returncode}:\n{server.log_tail()}")
        with urllib.request.urlopen(server.url + "/data/runs", timeout=5) as response:
            return response.status == 200

    try:
        try:
            wait_until(ready, f"tensorboard on {server.url} to answer /data/runs", timeout=timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\ntensorboard log:\n{server.log_tail()}") from None
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        if own_log:
            log_path.unlink(missing_ok=True)


def wait_for_runs(server: TensorBoard, runs: list[str], *, timeout: float = TIMEOUT_S) -> dict:
    """Wait until the server's scalar index lists every run in ``runs``; return the tags payload."""

    def loaded() -> dict | None:
        tags = server.get_json("/data/plugin/scalars/tags")
        return tags if all(run in tags for run in runs) else None

    return wait_until(loaded, f"tensorboard to load the runs {runs}", timeout=timeout)


# --------------------------------------------------------------------------- browser


def browser_paths() -> tuple[str, str]:
    """The Chromium binary and chromedriver (``$CHROMIUM`` / ``$CHROMEDRIVER`` override the PATH)."""
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    return chromium or "/usr/bin/chromium", driver or "/usr/bin/chromedriver"


def missing_browser() -> str | None:
    """Why the headless browser cannot start (a sentence with the fix), or ``None`` when it can."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: `pip install -e '.[dev]'` (or `make install`)"
    for name, path in zip(("chromium", "chromedriver"), browser_paths(), strict=True):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{name} not found at {path}: {INSTALL_HINT}"
    return None


@contextmanager
def chrome_driver(*, window: tuple[int, int] = WINDOW) -> Iterator[Any]:
    """A headless Chromium driven by selenium with a throw-away profile; quit on exit."""
    reason = missing_browser()
    if reason is not None:
        raise RuntimeError(f"cannot start the headless browser: {reason}")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager: never reach the network
    chromium, chromedriver = browser_paths()
    profile = tempfile.mkdtemp(prefix="lin-probe-chromium-")
    options = Options()
    options.binary_location = chromium
    for arg in (*CHROME_ARGS, f"--window-size={window[0]},{window[1]}", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = None
    try:
        try:
            driver = webdriver.Chrome(service=Service(chromedriver), options=options)
        except Exception as exc:
            raise RuntimeError(
                f"cannot start headless {chromium} with {chromedriver} ({exc.__class__.__name__}: "
                f"{str(exc).strip()[:500]}); {INSTALL_HINT}, with matching versions"
            ) from exc
        driver.set_script_timeout(30)
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# --------------------------------------------------------------------------- in-page helpers

# ``deepQueryAll(selector, root)``: every element matching ``selector`` in ``root`` (default: the
# document) and in every shadow root below it, in document order.
DEEP_QUERY_JS = """
function deepQueryAll(selector, root) {
  const found = [];
  const visit = (node) => {
    if (!node) return;
    if (node.querySelectorAll) {
      for (const el of node.querySelectorAll(selector)) found.push(el);
      for (const el of node.querySelectorAll('*')) if (el.shadowRoot) visit(el.shadowRoot);
    }
  };
  visit(root || document);
  if (root && root.shadowRoot) visit(root.shadowRoot);
  return found;
}
"""


def deep_query_all(driver: Any, selector: str, root: Any = None) -> list[Any]:
    """Elements matching ``selector`` anywhere in the page, shadow roots included."""
    return driver.execute_script(
        DEEP_QUERY_JS + "return deepQueryAll(arguments[0], arguments[1]);", selector, root
    )


def run_js(driver: Any, body: str, *args: Any) -> Any:
    """Run ``body`` (a JS function body using ``arguments`` and ``deepQueryAll``) in the page."""
    return driver.execute_script(DEEP_QUERY_JS + body, *args)


def fetch_json(driver: Any, path: str, body: Any = None) -> Any:
    """GET ``path`` (or POST ``body``) with ``fetch`` from inside the page, i.e. through the real
    server and the browser, and return the decoded JSON. The page must be on the server's origin."""
    return driver.execute_async_script(
        """
        const [path, body, done] = arguments;
        const init = body === null ? {} : {
          method: 'POST', body: JSON.stringify(body), headers: {'Content-Type': 'application/json'},
        };
        fetch(path, init)
          .then((r) => r.ok ? r.json() : Promise.reject(new Error(r.status + ' ' + r.statusText)))
          .then((data) => done({ok: true, data}), (err) => done({ok: false, error: String(err)}));
        """,
        path,
        body,
    )


def browser_json(driver: Any, path: str, body: Any = None) -> Any:
    """``fetch_json``'s payload, or an ``AssertionError`` naming the failed request."""
    reply = fetch_json(driver, path, body)
    if not reply["ok"]:
        raise AssertionError(f"the browser's fetch of {path} failed: {reply['error']}")
    return reply["data"]


def open_dashboard(driver: Any, server: TensorBoard, tab: str, *, query: str = "") -> None:
    """Load ``<server>/?<query>#<tab>`` (e.g. ``timeseries``, ``custom_scalars``, ``images``, ``hparams``)."""
    driver.get(f"{server.url}/{'?' + query if query else ''}#{tab}")
    wait_until(
        lambda: driver.execute_script("return document.readyState") == "complete",
        f"the {tab} page to load",
    )


def save_screenshot(driver: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    return path


# --------------------------------------------------------------------------- what each tab shows
# Readers of the rendered page, shared by the tests (which assert on them) and tools/screenshots.py
# (which waits on them before a screenshot).

TIMESERIES_CARDS_JS = """
const [titles] = arguments;
const out = {};
for (const card of document.querySelectorAll('scalar-card')) {
  const title = card.querySelector('tb-truncated-path')?.getAttribute('title');
  if (!titles.includes(title)) continue;
  const canvas = card.querySelector('line-chart canvas');
  const box = canvas ? canvas.getBoundingClientRect() : null;
  out[title] = {
    chart: Boolean(box && box.width > 0 && box.height > 0),
    legend: [...card.querySelectorAll('scalar-card-data-table tb-data-table-content-row')]
      .map((row) => row.innerText.trim().split(/\\s+/)[0]),
  };
}
return out;
"""

RUN_COLOURS_JS = """
const out = {};
for (const row of document.querySelectorAll('runs-selector tb-data-table-content-row')) {
  const swatch = row.querySelector('.run-color-swatch');
  const id = row.getAttribute('data-id') || '';  // "<experiment id>/<run name>"
  if (swatch) out[id.slice(id.indexOf('/') + 1)] = getComputedStyle(swatch).backgroundColor;
}
return out;
"""

CUSTOM_CARDS_JS = """
const [titles] = arguments;
const out = {};
for (const card of deepQueryAll('tf-custom-scalar-multi-line-chart-card')) {
  if (titles !== null && !titles.includes(card.title)) continue;
  const lines = deepQueryAll('path.line', card).filter((p) => (p.getAttribute('d') || '').length > 20);
  const entries = [...card.shadowRoot.querySelectorAll('.match-list-entry')].map((e) => ({
    name: e.textContent.replace('\\u25fc', '').trim(), colour: e.style.color,
  }));
  out[card.title] = {lines: lines.length, entries};
}
return out;
"""

IMAGES_JS = """
return deepQueryAll('tf-image-loader').map((loader) => {
  const img = deepQueryAll('img', loader)[0];
  return {tag: loader.tag, run: loader.run, loaded: Boolean(img && img.complete && img.naturalWidth > 0),
          width: img ? img.naturalWidth : 0};
});
"""

HPARAMS_TABLE_JS = """
const grid = deepQueryAll('vaadin-grid')[0];
if (!grid || !grid.shadowRoot) return null;
const text = (cell) => {
  const slot = cell.querySelector('slot');
  if (!slot) return '';
  return slot.assignedNodes({flatten: true}).map((n) => n.textContent).join(' ').replace(/\\s+/g, ' ').trim();
};
const rows = (part) => [...grid.shadowRoot.querySelectorAll(part + ' tr')]
  .filter((tr) => !tr.hidden && getComputedStyle(tr).display !== 'none')
  .map((tr) => [...tr.querySelectorAll('th, td')].map(text));
return {header: rows('#header')[0] || [], body: rows('#items').filter((r) => r.some((c) => c))};
"""

HPARAMS_DEFAULT_COLUMNS = 5  # tf-hparams-query-pane ticks only the first 5 hparams and 5 metrics


def open_timeseries(driver: Any, server: TensorBoard, tags: list[str], *, query: str = "") -> None:
    """The Time Series tab with its tag filter (the regex box, set through the URL) on ``tags``."""
    pattern = "^(" + "|".join(re.escape(t) for t in tags) + ")$"
    url_query = "tagFilter=" + quote(pattern, safe="") + (f"&{query}" if query else "")
    open_dashboard(driver, server, "timeseries", query=url_query)


def timeseries_cards(driver: Any, titles: list[str]) -> dict:
    """``{title: {"chart": has a sized canvas, "legend": [run names]}}`` of the Time Series cards."""
    return run_js(driver, TIMESERIES_CARDS_JS, titles)


def wait_for_timeseries_cards(driver: Any, titles: list[str], missed: str = "") -> dict:
    """Wait until every card in ``titles`` has a sized chart canvas and a legend; return them."""

    def ready() -> dict | None:
        cards = timeseries_cards(driver, titles)
        return cards if all(t in cards and cards[t]["chart"] and cards[t]["legend"] for t in titles) else None

    suffix = f" ({missed})" if missed else ""
    return wait_until(ready, f"the Time Series cards {titles} to draw a chart{suffix}")


def timeseries_canvas(driver: Any, title: str) -> Any:
    """The chart canvas of the Time Series card ``title`` (a WebElement)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('scalar-card')].find((c) => "
        "c.querySelector('tb-truncated-path')?.getAttribute('title') === arguments[0])"
        "?.querySelector('line-chart canvas')",
        title,
    )


def run_colours(driver: Any) -> dict[str, str]:
    """Run name -> the CSS colour of its swatch in the Time Series runs table."""
    return run_js(driver, RUN_COLOURS_JS)


def custom_scalar_cards(driver: Any, titles: list[str] | None = None) -> dict:
    """``{title: {"lines": drawn line paths, "entries": [{"name", "colour"}]}}`` of Custom Scalars."""
    return run_js(driver, CUSTOM_CARDS_JS, titles)


def image_loaders(driver: Any) -> list[dict]:
    """The Images tab's image cards: ``{"tag", "run", "loaded", "width"}`` each."""
    return run_js(driver, IMAGES_JS)


def hparams_table(driver: Any) -> dict | None:
    """The HParams table view as text: ``{"header": [...], "body": [[...], ...]}`` (None before it exists)."""
    return run_js(driver, HPARAMS_TABLE_JS)


def rgb(css: str) -> tuple[int, int, int]:
    """``"rgb(1, 2, 3)"`` -> ``(1, 2, 3)``."""
    r, g, b = (int(v) for v in re.findall(r"\d+", css)[:3])
    return r, g, b


def pixels_near(png: bytes, colour: tuple[int, int, int], *, tol: int = 12) -> int:
    """How many pixels of a PNG are within ``tol`` (per channel) of ``colour``."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    colours = image.getcolors(image.width * image.height) or []
    return sum(n for n, c in colours if all(abs(a - b) <= tol for a, b in zip(c, colour, strict=True)))
