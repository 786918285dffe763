"""The report's one JSON document (schema "quantwise-report/1"): the job, its result as the
command's --json prints it, the sensitivity ranking, per-layer statistics. The HTML is rendered
from this document alone (it is also embedded in the page), so `quantwise report saved.json`
renders a saved run again."""

from __future__ import annotations

import datetime
import json
import platform
import re
import shlex
from pathlib import Path
from typing import Any

from quantwise._version import __version__
from quantwise.errors import DataLoadError

SCHEMA = "quantwise-report/1"


def job_info(command: list[str] | None = None) -> dict[str, Any]:
    """Machine, CPU ISA, versions, date and the command, as the report's header shows them."""
    import torch

    from quantwise.kernels.probe import cpu_isa, cpu_model

    versions = {"quantwise": __version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("onnxruntime", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["quantwise", *command]) if command else None,
            "machine": {"cpu": cpu_model(), "isa": cpu_isa(), "arch": platform.machine(),
                        "threads": torch.get_num_threads()},
            "versions": versions}


def document(result: dict[str, Any] | None = None, sensitivity: dict[str, Any] | None = None,
             stats: dict[str, Any] | None = None, command: list[str] | None = None,
             job: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"schema": SCHEMA, "job": job or job_info(command), "result": result,
            "sensitivity": sensitivity, "layer_stats": stats}


def read_document(path: str | Path) -> dict[str, Any]:
    """A report document (a .json file, or the one a report page embeds), or a saved
    `quantize --json` / `analyze --json` output wrapped as one."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".html", ".htm"):  # a report page: the document it embeds
            found = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S)
            if found is None:
                raise DataLoadError(f"{path}: not a quantwise report page (no embedded report data)")
            text = found.group(1).replace("<\\/", "</")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DataLoadError(f"{path}: not a readable JSON file ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise DataLoadError(f"{path}: a report needs a JSON object, got {type(data).__name__}")
    if "schema" in data:
        if data["schema"] != SCHEMA:
            raise DataLoadError(f"{path}: schema {data['schema']!r}; this quantwise reads {SCHEMA!r}")
        for key in ("job", "result", "sensitivity", "layer_stats"):
            if data.get(key) is not None and not isinstance(data[key], dict):
                raise DataLoadError(f"{path}: \"{key}\" must be an object or null")
        return data
    job = {"date": None, "command": None, "machine": {}, "versions": {}}
    if "after" in data and "layers" in data:
        return document(result=data, job=job)
    if "rows" in data and "config" in data:
        return document(sensitivity=data, job=job)
    raise DataLoadError(f"{path}: neither a report document ({SCHEMA}) nor the --json output of "
                        "quantwise quantize / analyze")
