"""The headless-browser harness (tests/browser.py) on small pages written here: it must see JS
errors, requests, empty plots and sideways overflow, or the report's browser tests prove nothing."""

import pytest

import browser

# the shape of a matplotlib SVG: a glyph path in <defs>, drawn by <use>, plus a line and text
PLOT_SVG = """<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink"
  viewBox="0 0 200 100" style="width:100%;max-width:600px">
  <defs><path id="m" d="M 0 0 L 3 0 L 3 3 z"/></defs>
  <rect width="200" height="100" fill="#fff"/>
  <path d="M 10 90 L 60 40 L 110 60 L 190 10" stroke="#1f77b4" fill="none"/>
  <use xlink:href="#m" x="60" y="40"/><text x="5" y="12">accuracy</text>
</svg>"""


def _page(tmp_path, name, body, head=""):
    path = tmp_path / f"{name}.html"
    path.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{name}</title>{head}</head><body>{body}</body></html>"
    )
    return path


@pytest.fixture(scope="module")
def chromium(request):
    """One browser for the module; prints where the screenshots are kept."""
    browser.require_browser()
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # shown even under output capture
        print(f"\nbrowser screenshots: {browser.artifacts_dir()}")
    yield
    browser.close()


def test_clean_page_with_an_inline_svg_plot(chromium, tmp_path):
    path = _page(tmp_path, "clean", f"<h1>Report</h1>{PLOT_SVG}")
    r = browser.open_page(path, 1280, 800)
    assert r.problems == []
    assert (r.svg_count, r.svg_nonempty) == (1, 1)
    assert 0 < r.load_ms < 2000 and 0 < r.dom_content_loaded_ms <= r.load_ms
    assert r.screenshot == browser.artifacts_dir() / "clean-1280x800.png"
    assert r.screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r.screenshot.stat().st_size > 1000
    assert not r.overflows_x and r.scroll_width == r.client_width == 1280
    # the same page at a phone width, as a phone lays it out
    phone = browser.open_page(path, 390, 844, tmp_path / "phone.png", mobile=True)
    assert phone.problems == [] and phone.svg_nonempty == 1
    assert not phone.overflows_x and phone.scroll_width == 390
    assert (tmp_path / "phone.png").stat().st_size > 1000


def test_js_errors_and_console_messages_are_reported(chromium, tmp_path):
    path = _page(
        tmp_path,
        "jserror",
        "<script>console.warn('careful'); console.error('bad'); console.log('fine')</script>"
        "<script>undefinedFn()</script>",
    )
    r = browser.open_page(path, 800, 600)
    assert len(r.page_errors) == 1 and "undefinedFn" in r.page_errors[0]
    assert [(m.type, m.text) for m in r.console] == [("warning", "careful"), ("error", "bad")]
    assert r.console[0].location.startswith(r.url)
    assert len(r.problems) == 3


def test_any_request_is_reported_and_blocked(chromium, tmp_path):
    (tmp_path / "plot.js").write_text("document.title = 'plot.js ran';")
    path = _page(
        tmp_path,
        "external",
        "<img src='http://quantwise-test.invalid/x.png'>"
        "<img src='data:image/gif;base64,R0lGODlhAQABAAAAACw='>"  # inline: not a request
        "<script src='plot.js'></script>"
        "<link rel='stylesheet' href='style.css'>",
    )
    r = browser.open_page(path, 800, 600)
    assert sorted(r.requests) == sorted(
        ["http://quantwise-test.invalid/x.png", (tmp_path / "plot.js").as_uri(),
         (tmp_path / "style.css").as_uri()]
    )
    assert any(p.startswith("request: ") for p in r.problems)
    assert r.console_errors  # Chromium's own "Failed to load resource" lines


def test_empty_svgs_and_canvases_are_counted(chromium, tmp_path):
    path = _page(
        tmp_path,
        "empty",
        "<svg></svg>"
        "<svg width='100' height='100'><defs><rect id='r' width='9' height='9'/></defs></svg>"
        "<svg width='100' height='100'><rect width='0' height='0'/></svg>"
        f"<div style='display:none'>{PLOT_SVG}</div>"  # drawn nowhere: counts as empty
        "<canvas id='c' width='50' height='50'></canvas><canvas width='0' height='0'></canvas>"
        "<canvas width='20' height='20'></canvas>"
        "<script>document.getElementById('c').getContext('2d').fillRect(0, 0, 10, 10)</script>",
    )
    r = browser.open_page(path, 800, 600)
    assert r.problems == []
    assert (r.svg_count, r.svg_nonempty) == (4, 0)
    assert r.canvas_count == 3 and r.canvas_nonempty == 2
    assert [c.painted for c in r.canvases] == [True, False, False]


def test_horizontal_overflow_at_phone_width(chromium, tmp_path):
    wide = "<p>text</p><div id='wide' class='a b' style='width:1200px'>x</div>"
    path = _page(tmp_path, "wide", wide)
    r = browser.open_page(path, 390, 844)
    assert r.overflows_x and r.scroll_width >= 1200 and r.client_width == 390
    assert r.overflowing[0].startswith("div#wide.a.b (right edge")
    assert not browser.open_page(path, 1280, 800).overflows_x
    # a phone lays a page without a viewport meta tag out at 980 px: too wide for 390 px too
    bare = tmp_path / "bare.html"
    bare.write_text("<html><body><p>no viewport meta</p></body></html>")
    assert browser.open_page(bare, 390, 844, mobile=True).overflows_x


def test_missing_file_raises(chromium, tmp_path):
    with pytest.raises(FileNotFoundError):
        browser.open_page(tmp_path / "nope.html", 800, 600)


# require_browser itself: runs with or without a browser here


def test_require_browser_skips_where_chromium_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(browser, "CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        browser.require_browser()


def test_require_browser_fails_under_ci(monkeypatch, tmp_path):
    monkeypatch.setattr(browser, "CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="headless Chromium not available"):
        browser.require_browser()
