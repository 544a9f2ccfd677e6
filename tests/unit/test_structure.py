"""The package structure the rest relies on: no import circle, declarations importable without pyinfra."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYINFRA_FREE = ["roles.registry", "roles.topology", "roles.options", "webstack.inventory", "webstack.docs",
                *sorted(f"roles.{p.parent.name}.settings" for p in (ROOT / "roles").glob("*/settings.py"))]


def test_declarations_import_without_pyinfra_or_jinja2():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in PYINFRA_FREE)
            + "from webstack.docs import render, render_options\nrender(); render_options()\n"
            + "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyinfra', 'jinja2')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert len(PYINFRA_FREE) == 5 + 6


def test_tooling_imports_nothing_from_roles():
    for path in sorted((ROOT / "webstack").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("roles"), f"{path.name}: from {node.module} import"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("roles") for a in node.names), f"{path.name}: import roles"


def test_roles_reach_the_tooling_through_the_entry_point():
    from roles.registry import CATALOG
    from webstack.catalog import discover

    assert discover() is CATALOG
    assert list(CATALOG.roles) == ["base", "backup", "postgres", "app", "lb", "mailprovider"]
    assert sorted(CATALOG.deploys) == sorted(p.stem for p in (ROOT / "deploys").glob("*.py"))
