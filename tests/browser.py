"""Load a local HTML file in headless Chromium and report what a person's browser would see.

For tests of self-contained pages (the per-job HTML report, issue 18)::

    from browser import open_page, require_browser

    def test_report_page(tmp_path):
        require_browser()
        r = open_page(tmp_path / "report.html", 1280, 800)
        assert not r.problems, r.problems        # console errors/warnings, JS errors, requests
        assert r.svg_count and r.svg_nonempty == r.svg_count
        assert r.load_ms < 2000
        assert not open_page(tmp_path / "report.html", 390, 844).overflows_x

Driver: the Python ``playwright`` package, launching Debian's ``/usr/bin/chromium``
(``executable_path``) rather than a Playwright-downloaded build (``playwright install`` needs a
download this network refuses). Chosen over selenium + chromedriver because one launch serves
every page (a fresh context each), and it gives console messages, uncaught exceptions and request
interception as events without CDP plumbing. The launch flags keep Chromium off the network
(no QUIC, background fetches, updates or sync; every host name resolves to nothing), and every
request other than the page itself is aborted before it is sent: a self-contained page makes none,
so each one is recorded as a failure and no traffic leaves the machine.

Screenshots: ``open_page(..., screenshot=PATH)`` writes PATH; without it they go to
``artifacts_dir()``: ``$QUANTWISE_TEST_ARTIFACTS`` when set (CI can keep that folder), otherwise
a fresh ``quantwise-browser-*`` folder under the system temp dir, one per test process.

``require_browser()`` skips a test where Chromium or playwright is missing, but fails under CI
(``CI`` set, as .ci/run is run), so CI cannot pass by skipping the browser tests.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--no-sandbox",  # runs as root in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # no DNS look-up even from prefetch or preconnect
]
MISSING = "headless Chromium not available: apt-get install chromium (CI installs it)"


@dataclass
class ConsoleMessage:
    type: str  # "error" or "warning"
    text: str
    location: str  # "url:line", "" when the browser gave none


@dataclass
class SvgInfo:
    width: float  # CSS pixels, as laid out
    height: float
    drawn: bool  # has a drawn descendant (shape, text, image, use) with a non-zero box


@dataclass
class CanvasInfo:
    width: int  # the bitmap's size (width/height attributes)
    height: int
    css_width: float  # as laid out
    css_height: float
    painted: bool | None  # bitmap differs from a blank one; None when unreadable (tainted)

    @property
    def nonzero(self) -> bool:
        return self.width > 0 and self.height > 0 and self.css_width > 0 and self.css_height > 0


@dataclass
class PageResult:
    url: str
    viewport: tuple[int, int]
    console: list[ConsoleMessage] = field(default_factory=list)  # errors and warnings only
    page_errors: list[str] = field(default_factory=list)  # uncaught JS exceptions
    requests: list[str] = field(default_factory=list)  # URLs other than the page, data:, blob:
    svgs: list[SvgInfo] = field(default_factory=list)  # outermost <svg> elements only
    canvases: list[CanvasInfo] = field(default_factory=list)
    load_ms: float = 0.0  # navigation start to the end of the load event
    dom_content_loaded_ms: float = 0.0
    scroll_width: int = 0  # the document's full width
    client_width: int = 0  # the layout viewport's width (less any classic scrollbar)
    overflowing: list[str] = field(default_factory=list)  # first elements past the right edge
    screenshot: Path | None = None

    @property
    def viewport_width(self) -> int:
        return self.viewport[0]

    @property
    def overflows_x(self) -> bool:
        """True when the page scrolls sideways; the viewport width bounds it too, so that a
        mobile page without a viewport meta tag (laid out at 980 px) counts as overflowing."""
        return self.scroll_width > min(self.client_width, self.viewport_width)

    @property
    def svg_count(self) -> int:
        return len(self.svgs)

    @property
    def svg_nonempty(self) -> int:
        return sum(s.drawn and s.width > 0 and s.height > 0 for s in self.svgs)

    @property
    def canvas_count(self) -> int:
        return len(self.canvases)

    @property
    def canvas_nonempty(self) -> int:
        return sum(c.nonzero for c in self.canvases)

    @property
    def console_errors(self) -> list[ConsoleMessage]:
        return [m for m in self.console if m.type == "error"]

    @property
    def problems(self) -> list[str]:
        """Everything a self-contained page must not do, one readable line each."""
        return (
            [f"console {m.type}: {m.text} ({m.location})" for m in self.console]
            + [f"page error: {e}" for e in self.page_errors]
            + [f"request: {u}" for u in self.requests]
        )


# Measures the page in one round trip. Shapes inside defs/clipPath/... are templates, not drawn;
# a horizontal line has zero height, so a box counts when either side is non-zero.
_MEASURE_JS = """() => {
  const nav = performance.getEntriesByType('navigation')[0];
  const drawnSel = 'path,rect,circle,ellipse,line,polyline,polygon,text,image,use,foreignObject';
  const hidden = 'defs,clipPath,mask,symbol,marker,pattern,linearGradient,radialGradient,filter';
  const box = e => e.getBoundingClientRect();
  const svgs = [...document.querySelectorAll('svg')]
    .filter(s => !s.parentElement || !s.parentElement.closest('svg'))
    .map(s => {
      const b = box(s);
      const drawn = [...s.querySelectorAll(drawnSel)].some(e => {
        if (e.closest(hidden)) return false;
        const r = box(e);
        return r.width > 0 || r.height > 0;
      });
      return {width: b.width, height: b.height, drawn};
    });
  const canvases = [...document.querySelectorAll('canvas')].map(c => {
    const b = box(c);
    let painted = null;
    try {
      if (c.width > 0 && c.height > 0) {
        const blank = document.createElement('canvas');
        blank.width = c.width; blank.height = c.height;
        painted = c.toDataURL() !== blank.toDataURL();
      } else painted = false;
    } catch (e) { painted = null; }
    return {width: c.width, height: c.height, css_width: b.width, css_height: b.height, painted};
  });
  const de = document.documentElement;
  const clientWidth = de.clientWidth;
  const scrollWidth = Math.max(de.scrollWidth, document.body ? document.body.scrollWidth : 0);
  const overflowing = [];  // only looked for when the page does overflow; SVG internals skipped
  const all = scrollWidth > clientWidth && document.body ? document.body.querySelectorAll('*') : [];
  for (const e of all) {
    if (overflowing.length >= 5) break;
    if (e.parentElement && e.parentElement.closest('svg')) continue;
    if (overflowing.some(o => o.el.contains(e))) continue;
    const r = box(e);
    if (r.right > clientWidth + 0.5) {
      const cls = typeof e.className === 'string' ? e.className.trim() : '';
      const name = e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') +
        (cls ? '.' + cls.split(/\\s+/).join('.') : '');
      overflowing.push({el: e, text: `${name} (right edge ${Math.round(r.right)} px)`});
    }
  }
  return {
    load_ms: nav ? nav.loadEventEnd - nav.startTime : 0,
    dcl_ms: nav ? nav.domContentLoadedEventEnd - nav.startTime : 0,
    svgs, canvases,
    scroll_width: scrollWidth,
    client_width: clientWidth,
    overflowing: overflowing.map(o => o.text),
  };
}"""


def _truthy(value: str | None) -> bool:
    return bool(value) and value.strip().lower() not in ("0", "false", "no", "")


def _missing_reason() -> str | None:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"{MISSING} [{CHROMIUM} missing]"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return f"{MISSING} [Python package playwright missing: pip install -e '.[test]']"
    return None


def require_browser() -> None:
    """Skip the calling test when the browser or its driver is missing; fail instead under CI.
    Also starts the shared browser, so a Chromium that is installed but cannot start fails."""
    import pytest

    reason = _missing_reason()
    if reason is not None:
        if _truthy(os.environ.get("CI")):
            pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip", pytrace=False)
        pytest.skip(reason)
    try:
        _shared()
    except Exception as exc:  # an installed browser that won't start is a real failure
        pytest.fail(f"headless Chromium at {CHROMIUM} did not start: {exc}", pytrace=False)


_artifacts: Path | None = None


def artifacts_dir() -> Path:
    """Where screenshots go: $QUANTWISE_TEST_ARTIFACTS, or one temp folder per process."""
    global _artifacts
    if _artifacts is None:
        env = os.environ.get("QUANTWISE_TEST_ARTIFACTS")
        if env:
            _artifacts = Path(env)
            _artifacts.mkdir(parents=True, exist_ok=True)
        else:
            _artifacts = Path(tempfile.mkdtemp(prefix="quantwise-browser-"))
    return _artifacts


class Browser:
    """One headless Chromium; each open_page gets a fresh context (no shared cache or storage)."""

    def __init__(self) -> None:
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        try:
            self._browser = self._pw.chromium.launch(
                executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True
            )
        except Exception:
            self._pw.stop()
            raise
        self.version = self._browser.version

    def close(self) -> None:
        try:
            self._browser.close()
        finally:
            self._pw.stop()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_page(
        self,
        path: Path,
        width: int,
        height: int,
        screenshot: Path | None = None,
        *,
        full_page: bool = True,
        mobile: bool = False,
        timeout_ms: int = 15_000,
    ) -> PageResult:
        path = Path(path).resolve()
        if not path.is_file():
            raise FileNotFoundError(path)
        url = path.as_uri()
        if screenshot is None:
            screenshot = artifacts_dir() / f"{path.stem}-{width}x{height}.png"
        result = PageResult(url=url, viewport=(width, height), screenshot=Path(screenshot))
        context = self._browser.new_context(
            viewport={"width": width, "height": height},
            device_scale_factor=1,
            is_mobile=mobile,  # honours <meta name=viewport>, as a phone does
            has_touch=mobile,
            service_workers="block",
        )
        try:
            page = context.new_page()
            page.set_default_timeout(timeout_ms)

            def on_route(route) -> None:
                req_url = route.request.url
                if req_url.split("#")[0] == url and route.request.is_navigation_request():
                    route.continue_()
                else:
                    result.requests.append(req_url)
                    route.abort()

            def on_console(msg) -> None:
                if msg.type in ("error", "warning"):
                    loc = msg.location or {}
                    where = f"{loc['url']}:{loc.get('lineNumber', '')}" if loc.get("url") else ""
                    result.console.append(ConsoleMessage(msg.type, msg.text, where))

            page.route("**/*", on_route)  # data: and blob: URLs never reach a route
            page.on("console", on_console)
            page.on("pageerror", lambda e: result.page_errors.append(f"{e.name}: {e.message}"))
            page.goto(url, wait_until="load")
            # loadEventEnd is set only after the load handlers return; then two animation frames
            # let plots drawn on load (canvas, requestAnimationFrame) reach the screen
            page.wait_for_function(
                "() => { const n = performance.getEntriesByType('navigation')[0];"
                " return !n || n.loadEventEnd > 0; }"
            )
            page.evaluate(
                "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"
            )
            m = page.evaluate(_MEASURE_JS)
            result.load_ms = float(m["load_ms"])
            result.dom_content_loaded_ms = float(m["dcl_ms"])
            result.svgs = [SvgInfo(**s) for s in m["svgs"]]
            result.canvases = [CanvasInfo(**c) for c in m["canvases"]]
            result.scroll_width = int(m["scroll_width"])
            result.client_width = int(m["client_width"])
            result.overflowing = list(m["overflowing"])
            result.screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(result.screenshot), full_page=full_page)
        finally:
            context.close()
        return result


_browser: Browser | None = None


def _shared() -> Browser:
    global _browser
    if _browser is None:
        _browser = Browser()
        atexit.register(close)
    return _browser


def close() -> None:
    """Close the shared browser (a module fixture's teardown; also run at exit)."""
    global _browser
    if _browser is not None:
        b, _browser = _browser, None
        b.close()


def open_page(
    path: Path,
    width: int,
    height: int,
    screenshot: Path | None = None,
    *,
    full_page: bool = True,
    mobile: bool = False,
    timeout_ms: int = 15_000,
) -> PageResult:
    """Load a local HTML file (file://) at a width x height viewport in the shared browser and
    measure it; see PageResult. screenshot: the PNG to write (default: in artifacts_dir())."""
    return _shared().open_page(
        path, width, height, screenshot, full_page=full_page, mobile=mobile, timeout_ms=timeout_ms
    )

