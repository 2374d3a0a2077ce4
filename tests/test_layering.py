"""The packages' layering (docs/design.md, "Layering"), checked on the import graph of the source.

Every import counts, the ones inside functions too (the command line imports lazily), so the rule cannot
break silently: `features` imports none of the other packages, `fin` only `features`, `serving` only
`features` and `fin` (and of `fin` not the training side), and nothing imports `jobs`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("features", "fin", "serving", "jobs")
MAY_IMPORT = {
    "features": {"features"},
    "fin": {"features", "fin"},
    "serving": {"features", "fin", "serving"},
    "jobs": {"features", "fin", "serving", "jobs"},
}
# serving depends on the model's inputs and artifacts, never on how models are trained or evaluated
SERVING_MAY_NOT = ("fin.loader", "fin.train", "fin.evaluate", "fin.sharding")
# the model's inputs are built on the server's hot path: no dataframe library there
NO_POLARS = ("fin/inputs.py", "serving/scoring.py", "serving/batching.py", "serving/server.py")


def _modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py")
                  if "pb" not in p.relative_to(ROOT).parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file; relative imports are resolved against its package."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            # `from fin import signal_report` imports the module fin.signal_report
            out += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
            out.append((node.lineno, module))
    return out


def _violations(path: Path) -> list[str]:
    rel = path.relative_to(ROOT)
    layer = rel.parts[0]
    found = []
    for line, module in _imports(path):
        top = module.split(".")[0]
        if top in PACKAGES and top not in MAY_IMPORT[layer]:
            found.append(f"{rel}:{line} imports {module} ({layer} may import {', '.join(sorted(MAY_IMPORT[layer]))})")
        if layer == "serving" and module.startswith(SERVING_MAY_NOT):
            found.append(f"{rel}:{line} imports {module} (serving reads fin.inputs, not the training side)")
        if rel.as_posix() in NO_POLARS and top == "polars":
            found.append(f"{rel}:{line} imports polars")
    return found


def test_every_package_imports_only_the_layers_below_it():
    violations = [v for path in _modules() for v in _violations(path)]
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize("source, expected", [
    ("features/x.py", "from fin.metrics import auc\n"),
    ("features/x.py", "def f():\n    import jobs.cli\n"),
    ("fin/x.py", "from serving import scoring\n"),
    ("serving/x.py", "from fin.loader import ExampleStream\n"),
    ("serving/x.py", "from fin import train\n"),
    ("fin/inputs.py", "import polars as pl\n"),
])
def test_the_check_catches_an_import_against_the_layering(tmp_path, monkeypatch, source, expected):
    path = tmp_path / source
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(expected)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _violations(path)


def test_the_check_lets_the_allowed_imports_pass(tmp_path, monkeypatch):
    path = tmp_path / "serving" / "x.py"
    path.parent.mkdir(parents=True)
    path.write_text("from features.dataset import Dataset\nfrom fin.inputs import Batch\nfrom . import online\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _violations(path) == []
