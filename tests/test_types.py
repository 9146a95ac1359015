"""The code's types and its declared dependencies.

``mypy --strict`` (configured in pyproject.toml, with its one stated relaxation) passes on
``cachefs/``; every third-party package that ``cachefs/`` imports at run time is declared
in pyproject.toml's dependencies with a version range.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _runtime_imports() -> set[str]:
    """Top-level names of what ``cachefs/`` imports, leaving out ``if TYPE_CHECKING:``."""
    found: set[str] = set()
    for path in (REPO / "cachefs").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_every_third_party_import_is_declared_with_a_range() -> None:
    third_party = {name for name in _runtime_imports()
                   if name not in sys.stdlib_module_names and name != "cachefs"}
    assert third_party, "the reader found no third-party import: it reads nothing"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {}
    # (the extra `kerberos`: krb5 is imported only where it is installed)
    for requirement in project["dependencies"] + project["optional-dependencies"]["kerberos"]:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
        declared[name] = requirement
    distribution = {"spnego": "pyspnego"}  # (else the import name is the distribution's)
    missing = sorted(n for n in third_party if distribution.get(n, n).lower() not in declared)
    assert not missing, f"imported by cachefs/ but not declared in pyproject.toml: {missing}"
    unbounded = sorted(r for r in declared.values() if not (">=" in r and "<" in r.replace("<=", "")))
    assert not unbounded, f"declared without a lower and an upper bound: {unbounded}"


def test_mypy_strict_passes() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "Success" in result.stdout
