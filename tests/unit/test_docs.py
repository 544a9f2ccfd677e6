"""The README's settings tables are generated from the declarations and must not drift."""

import dataclasses
from pathlib import Path

from webstack.docs import BEGIN, END, render, update_readme

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_settings_tables_match_declarations():
    text = README.read_text()
    block = text[text.index(BEGIN): text.index(END) + len(END)]
    assert block == render(), "README settings tables are stale: run `make docs`"


def test_every_setting_is_documented_in_the_readme():
    from roles.registry import ROLES
    from webstack.settings import fields_of

    text = README.read_text()
    for role in ROLES.values():
        for name, _tp, _default, doc in fields_of(role.settings):
            assert doc, f"{role.name}__{name} has no description"
            assert f"| `{role.name}__{name}` |" in text, f"{role.name}__{name} is missing from README.md"


def test_drift_check_catches_a_changed_default(tmp_path, monkeypatch):
    """`webstack docs --check` (make lint) against a README copy: passes as committed, fails once a
    declared default changes, and `webstack docs` brings the table up to date again."""
    from roles.postgres.settings import PostgresSettings

    copy = tmp_path / "README.md"
    copy.write_text(README.read_text())
    assert update_readme(copy, check=True) == 0
    field = next(f for f in dataclasses.fields(PostgresSettings) if f.name == "backup_retention_full")
    monkeypatch.setattr(field, "default", field.default + 1)
    assert update_readme(copy, check=True) == 1
    assert copy.read_text() == README.read_text()  # --check writes nothing
    assert update_readme(copy) == 0
    assert f"| `postgres__backup_retention_full` | int | `{field.default}` |" in copy.read_text()
    assert update_readme(copy, check=True) == 0
