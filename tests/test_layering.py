"""Imports point downward only (ARCHITECTURE.md): an upward arrow fails here, not in review."""

import ast
from pathlib import Path

import quantwise

LEVELS = {
    "_version": 0, "errors": 0, "spec": 0, "fileio": 0,
    "numerics": 1, "metrics": 1, "models": 1, "data": 1, "formats": 1,
    "calibrators": 2, "config": 2,
    "kernels": 3, "modules": 3, "state": 3, "methods": 3,
    "workflow": 4, "int8graph": 4, "encoder": 4, "fold": 3,
    "io": 5, "report": 5, "summary": 5, "evaluate": 5, "sensitivity": 5, "plan": 5, "planresult": 5, "export": 5, "qat": 5,
    "job": 6, "cli": 6, "qatjob": 6, "stream": 6, "runtime": 6, "__init__": 7, "__main__": 7,
}
ROOT = Path(quantwise.__file__).parent


def _top(path: Path) -> str:
    rel = path.relative_to(ROOT).parts
    return rel[0].removesuffix(".py")


def test_every_module_has_a_level():
    missing = {_top(p) for p in ROOT.rglob("*.py")} - set(LEVELS)
    assert not missing, f"add these to LEVELS and ARCHITECTURE.md: {missing}"


def test_imports_point_downward():
    upward = []
    for path in ROOT.rglob("*.py"):
        here = _top(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module == "quantwise":
                names = [f"quantwise.{a.name}" for a in node.names]  # from quantwise import metrics
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("quantwise"):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("quantwise")]
            for name in names:
                parts = name.split(".")
                if len(parts) < 2:
                    if here != "__init__":
                        upward.append(f"{path.name} imports the package root")
                    continue
                there = parts[1]
                if there != here and LEVELS[there] > LEVELS[here]:
                    upward.append(f"{path.relative_to(ROOT)} (L{LEVELS[here]}) -> {name} (L{LEVELS[there]})")
    assert not upward, "\n".join(upward)
