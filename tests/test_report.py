"""The HTML report (issue 18): built from its JSON document alone, every number equal to the
document, the same bytes when rendered again, and, in headless Chromium, a page that opens
offline with no console error, every plot drawn, at a laptop and a phone width."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

import browser
from quantwise.cli import main
from quantwise.report import read_document, write_report

@pytest.fixture(scope="module")
def digits_report(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    page = folder / "digits.html"
    assert main(["quantize", "digits", "--out", str(folder / "q"), "--quiet", "--report", str(page)]) == 0
    return page


@pytest.fixture(scope="module")
def minilm_plan_report(tmp_path_factory) -> Path:
    """A real MiniLM plan (int8-dynamic / fp32 per layer) and its report, kept cheap: the job's
    own measurement and metric, on 16 calibration sentences in batches of 8 and one evaluation
    batch (the command's default plan takes minutes here; 64 sentences in batches of 32 made
    this fixture 77-106 s of the suite on an AVX2-only CPU, this 31 s)."""
    from quantwise import plan, quantize, save
    from quantwise.data import load_calibration_data
    from quantwise.job import _measure, _metric_fn
    from quantwise.models import load_model
    from quantwise.report import document
    from quantwise.report.collect import layer_stats

    folder = tmp_path_factory.mktemp("plan")
    model, info = load_model("minilm")
    calib = load_calibration_data("stdlib-text", info, limit=16, batch_size=8)
    evals = (calib[:1], "cosine")
    chosen = plan(model, calib, _metric_fn(model, evals), 0.01, formats=("int8-dynamic", "fp32"),
                  max_evaluations=4, progress=False)
    qmodel = quantize(model, chosen.config, calib, progress=False, source="minilm")
    report = _measure(model, qmodel, info, "plan-size", save(qmodel, folder / "q"), evals)
    report.plan = chosen
    doc = document(result=report.to_dict(), stats=layer_stats(model, qmodel, calib, max_batches=2),
                   command=["quantize", "minilm", "--max-drop", "0.01", "--report", "minilm-plan.html"])
    return write_report(doc, folder / "minilm-plan.html")


def _resolve(doc, path: str):
    value = doc
    for key in path.split("/"):
        value = value[int(key)] if isinstance(value, list) else value[key]
    return value


_UNITS = {"bytes": (" MB", 1e6), "ms": (" ms", 1.0), "x": ("x", 1.0), "db": (" dB", 1.0), "g": ("", 1.0),
          "int": ("", 1.0)}


def check_numbers(page: Path) -> int:
    """Every number the page shows (data-path) is the document's value, shown to its precision."""
    text = page.read_text()
    doc = read_document(page)
    cells = re.findall(r'data-path="([^"]+)" data-value="([^"]+)" data-kind="(\w+)">([^<]*)<', text)
    assert cells
    for path, value, kind, shown in cells:
        want = _resolve(doc, path.replace("&#x27;", "'"))
        assert float(value) == pytest.approx(float(want), rel=0, abs=0), path
        unit, scale = _UNITS[kind]
        number = float(shown.removesuffix(unit).replace(",", "")) * scale
        digits = re.sub(r"e.*", "", shown.removesuffix(unit)).lstrip("-+")
        decimals = len(digits.split(".")[1]) if "." in digits else 0
        step = scale * 10 ** -decimals if "e" not in shown else abs(want) * 1e-4
        assert abs(number - float(want)) <= step * 0.5 + 1e-12 * abs(want) or \
            abs(number - float(want)) <= abs(float(want)) * 5e-4, (path, shown, want)
    return len(cells)


def test_digits_report_numbers_equal_its_json(digits_report):
    assert check_numbers(digits_report) >= 30
    doc = read_document(digits_report)
    assert doc["schema"] == "quantwise-report/1"
    assert doc["job"]["machine"]["isa"] and doc["job"]["command"].startswith("quantwise quantize digits")
    stats = doc["layer_stats"]
    assert set(stats) == {"features.0", "features.3", "classifier.1", "classifier.3"}
    for name, entry in stats.items():
        act = entry["activation"]
        assert sum(act["counts"]) == act["seen"] - act["nonfinite"] > 0, name
        assert set(act["ranges"]) == {"max", "percentile", "entropy", "mse"}
        lo, hi = act["chosen"]  # the calibrated input range covers what max saw, within a code
        assert lo <= act["min"] + 1e-6 and hi >= act["max"] * 0.99, name
        assert entry["sqnr_db"] > 25, name  # a real kernel against its float layer
        assert sum(entry["weight"]["counts"]) > 0


def test_render_again_from_the_page_and_from_the_json(digits_report, tmp_path):
    again = write_report(read_document(digits_report), tmp_path / "again.html")
    assert again.read_bytes() == digits_report.read_bytes()
    saved = tmp_path / "doc.json"
    saved.write_text(json.dumps(read_document(digits_report)))
    assert main(["report", str(saved), "--out", str(tmp_path / "from-json.html")]) == 0
    assert (tmp_path / "from-json.html").read_bytes() == digits_report.read_bytes()


def test_report_command_refuses_to_overwrite_and_bad_sources(digits_report, tmp_path, capsys):
    out = tmp_path / "r.html"
    out.write_text("keep")
    assert main(["report", str(digits_report), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "keep"
    bogus = tmp_path / "x.json"
    bogus.write_text('{"hello": 1}')
    assert main(["report", str(bogus), "--out", str(tmp_path / "y.html")]) == 2
    assert "neither a report document" in capsys.readouterr().err


def test_analyze_report_has_the_sensitivity_bars(tmp_path, capsys):
    page = tmp_path / "analyze.html"
    assert main(["analyze", "--quiet", "--report", str(page)]) == 0
    capsys.readouterr()
    doc = read_document(page)
    assert len(doc["sensitivity"]["rows"]) == 4
    assert "<h2>Sensitivity</h2>" in page.read_text() and check_numbers(page) >= 20


@pytest.fixture(scope="module")
def chromium():
    browser.require_browser()
    yield
    browser.close()


def _check_in_browser(page: Path, shots: Path, stem: str, plots: int) -> None:
    for width, height, mobile in ((1366, 900, False), (390, 844, True)):
        start = time.perf_counter()
        result = browser.open_page(page, width, height, screenshot=shots / f"{stem}-{width}.png", mobile=mobile)
        assert not result.problems, result.problems
        assert result.svg_count >= plots and result.svg_nonempty == result.svg_count
        assert result.load_ms < 2000, result.load_ms
        assert not result.overflows_x, result.overflowing  # wide tables scroll inside their box
        assert result.screenshot.stat().st_size > 10_000
        assert time.perf_counter() - start < 30


def test_digits_report_in_chromium(chromium, digits_report):
    shots = browser.artifacts_dir()
    _check_in_browser(digits_report, shots, "digits", plots=12)
    # the README's picture, as the browser drew it: QUANTWISE_TEST_ARTIFACTS=docs makes docs/ its home
    shot = browser.open_page(digits_report, 1280, 1400, screenshot=shots / "report-digits.png", full_page=False)
    assert shot.screenshot.stat().st_size > 50_000


def test_minilm_plan_report_in_chromium(chromium, minilm_plan_report):
    size = minilm_plan_report.stat().st_size
    assert size < 5 * 2 ** 20, size
    doc = read_document(minilm_plan_report)
    assert doc["result"]["plan"]["front"]
    assert doc["result"]["layers"]["counts"]["quantized"] == len(doc["layer_stats"]) >= 36  # 40 here
    assert check_numbers(minilm_plan_report) > 100
    _check_in_browser(minilm_plan_report, browser.artifacts_dir(), "minilm-plan", plots=3)
