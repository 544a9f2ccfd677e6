"""The README's settings tables are generated from the declarations and must not drift."""

from pathlib import Path

from webstack.docs import BEGIN, END, render

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_settings_tables_match_declarations():
    text = README.read_text()
    block = text[text.index(BEGIN): text.index(END) + len(END)]
    assert block == render(), "README settings tables are stale: run `make docs`"


def test_every_setting_is_documented():
    from roles.registry import ROLES
    from webstack.settings import fields_of

    for role in ROLES.values():
        for name, _tp, _default, doc in fields_of(role.settings):
            assert doc, f"{role.name}__{name} has no description"
            assert f"`{role.name}__{name}`" in render()
