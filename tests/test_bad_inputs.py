"""Every bad input of ../shared/docs/bad-inputs.md (cases 1-25) and the four of issue 17
(26-29), each through the command line and through the Python API (tables: tests/bad_cases_*.py).

Command line: the exit code, the message (a regex), the input files byte-identical afterwards,
the output absent or holding its previous content, no temporary file left anywhere under the
test's folder. API: the quantwise.errors class raised, or, for inputs that must work (NaN in
calibration data, tied weights, ...), the property itself. `python tests/test_bad_inputs.py`
writes docs/bad-inputs.md from the same table with the messages the command line prints.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bad_cases_data  # noqa: F401  (registers its cases)
import bad_cases_files  # noqa: F401
import bad_cases_paths
from bad_case import REGISTRY, Base, Case, Entry, build_base

HERE = Path(__file__).parent
REGISTRY.sort(key=lambda e: (e.number, e.variant))
NUMBERS = sorted({e.number for e in REGISTRY})


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    return build_base(tmp_path_factory.mktemp("base"))


def _snapshot(paths) -> dict[str, str]:
    """sha256 of every file (and the target of every link) under `paths`."""
    seen = {}
    for path in paths:
        items = [path] if not path.is_dir() or path.is_symlink() else sorted(path.rglob("*"))
        for item in items:
            if item.is_symlink():
                seen[str(item)] = "-> " + os.readlink(item)
            elif item.is_file():
                seen[str(item)] = hashlib.sha256(item.read_bytes()).hexdigest()
            elif not item.exists():
                seen[str(item)] = "absent"
    return seen


def _hidden(root: Path) -> set[str]:
    """Temporary files and staging folders: quantwise names them ".NAME.*"."""
    return {str(p) for p in root.rglob(".*")}


def run_cli(case: Case) -> tuple[int, str, str]:
    if case.interrupt_after:
        return _run_interrupted(case)
    from quantwise.cli import main

    out, err = io.StringIO(), io.StringIO()
    patch = case.patch() if case.patch else contextlib.nullcontext()
    with patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(case.argv)
        except SystemExit as exc:  # argparse's usage errors
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def _run_interrupted(case: Case) -> tuple[int, str, str]:
    """A real process, sent SIGINT (Ctrl-C) once its log shows `interrupt_after`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    # SIGINT back to its default in the child: a suite started in the background of a
    # non-interactive shell (`pytest &`) inherits it ignored, Python then installs no
    # KeyboardInterrupt handler, and the run ignores Ctrl-C and exits 0 (seen once)
    proc = subprocess.Popen([sys.executable, "-m", "quantwise", *case.argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        lines.append(line)
        if case.interrupt_after in line or time.monotonic() > deadline:
            time.sleep(0.3)  # inside calibration
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, "".join(lines) + err


def _build(entry: Entry, base: Base, tmp_path: Path) -> Case:
    work = tmp_path / "work"
    work.mkdir()
    return entry.build(base, work)


@pytest.mark.parametrize("entry", REGISTRY, ids=[e.id for e in REGISTRY])
def test_command_line(entry: Entry, base: Base, tmp_path: Path) -> None:
    case = _build(entry, base, tmp_path)
    inputs = _snapshot(case.inputs)
    out_before = _snapshot([case.out]) if case.out is not None and case.out.exists() else None
    hidden = _hidden(tmp_path)
    try:
        rc, stdout, stderr = run_cli(case)
    finally:
        bad_cases_paths.unmount_read_only(tmp_path / "work")
    shown = stderr if case.rc else stdout + stderr
    assert rc == case.rc, f"exit {rc}, expected {case.rc}\n{stderr[-3000:]}"
    assert re.search(case.message, shown, re.S), f"{case.message!r} not in:\n{shown[-3000:]}"
    if case.rc:
        assert "Traceback" not in stderr, stderr
        assert len(stderr.strip().splitlines()[-1]) > 20  # one line that says why
    assert _snapshot(case.inputs) == inputs, "an input file changed"
    if case.rc and case.out is not None:
        if out_before is None:
            assert not case.out.exists(), f"{case.out} was created by a failed command"
        else:
            assert _snapshot([case.out]) == out_before, f"{case.out} changed"
    assert _hidden(tmp_path) == hidden, f"temporary files left: {_hidden(tmp_path) - hidden}"
    if case.after is not None:
        case.after()


@pytest.mark.parametrize("entry", REGISTRY, ids=[e.id for e in REGISTRY])
def test_python_api(entry: Entry, base: Base, tmp_path: Path) -> None:
    case = _build(entry, base, tmp_path)
    assert case.api is not None, f"case {entry.id} has no API check"
    inputs = _snapshot(case.inputs)
    hidden = _hidden(tmp_path)
    try:
        if case.error is not None:
            with pytest.raises(case.error, match=re.compile(case.api_message or case.message, re.S)):
                case.api()
        else:
            case.api()
    finally:
        bad_cases_paths.unmount_read_only(tmp_path / "work")
    assert _snapshot(case.inputs) == inputs
    assert _hidden(tmp_path) == hidden, f"temporary files left: {_hidden(tmp_path) - hidden}"


def test_every_case_of_the_list_is_covered() -> None:
    assert NUMBERS == list(range(1, 30))
    doc = (HERE.parent / "docs" / "bad-inputs.md").read_text()
    for entry in REGISTRY:
        assert f"| {entry.id} |" in doc, f"docs/bad-inputs.md lacks case {entry.id}: rerun " \
                                         "python tests/test_bad_inputs.py"


def write_table(path: Path) -> None:
    """docs/bad-inputs.md: each case with what the command line really prints."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = build_base(Path(tmp) / "base")
        for entry in REGISTRY:
            work = Path(tmp) / entry.id
            work.mkdir()
            case = entry.build(base, work)
            try:
                rc, stdout, stderr = run_cli(case)
            finally:
                bad_cases_paths.unmount_read_only(work)
            text = stderr if rc else stdout + stderr
            lines = [ln for ln in text.splitlines() if re.search(case.message, ln)] or text.splitlines()[-1:]
            message = re.sub(re.escape(tmp) + r"/[^/ ]+/", "", lines[-1].strip())
            message = re.sub(r"\s{2,}", " ", message).replace("|", "\\|")
            rows.append(f"| {entry.id} | {entry.given} | {entry.expected} | {rc} | "
                        f"`quantwise {' '.join(_short(a, tmp) for a in case.argv)}` | {message} |")
    header = ["# Bad inputs: what quantwise does with each", "",
              "Every case of the bad-inputs list (1-25) and the four of issue 17 (26-29), as run by "
              "tests/test_bad_inputs.py through the command line and the Python API. The message is "
              "what the command prints (stderr for errors; the matching note for inputs that work); "
              "regenerate with `python tests/test_bad_inputs.py`.", "",
              "| case | input | what quantwise does | exit | command | message |",
              "|---|---|---|---|---|---|"]
    path.write_text("\n".join(header + rows) + "\n")


def _short(arg: str, tmp: str) -> str:
    return re.sub(re.escape(tmp) + r"/[^/ ]+/", "", arg)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    os.environ.setdefault("QUANTWISE_CACHE_DIR", __import__("tempfile").mkdtemp())
    write_table(HERE.parent / "docs" / "bad-inputs.md")
