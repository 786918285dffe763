"""The HTML report of a quantization job (issue 18): `collect` per-layer statistics, build the
JSON `document`, `render` it to one self-contained page, `write_report` atomically.

    doc = document(result=job_report.to_dict(), stats=layer_stats(model, qmodel, calib))
    write_report(doc, "report.html")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantwise.errors import OutputPathError
from quantwise.fileio import atomic_write_text, record_output
from quantwise.report.document import SCHEMA, document, job_info, read_document


def write_report(doc: dict[str, Any], path: str | Path) -> Path:
    """Render `doc` and write it to `path` atomically (a temporary file, then a rename)."""
    from quantwise.report.html import render

    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"report path {path} is a folder: pass a file name such as report.html")
    page = render(doc)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, page)
        record_output(path)
    except OSError as exc:
        raise OutputPathError(f"cannot write the report {path} ({exc.strerror or exc})") from exc
    return path


__all__ = ["SCHEMA", "document", "job_info", "read_document", "write_report"]
