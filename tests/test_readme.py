"""The README documents every setting exactly as the schema declares it."""

from __future__ import annotations

from pathlib import Path

from dreambooth.settings_doc import BEGIN, END, options_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_settings_table_matches_the_schema():
    text = README.read_text(encoding="utf-8")
    start, end = text.index(BEGIN), text.index(END) + len(END)
    assert text[start:end] == options_markdown(), "regenerate with: python -m dreambooth.settings_doc --write"


def test_readme_starts_with_the_two_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    block = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert block[0].startswith("python bootstrap.py demo") and block[1].startswith("python bootstrap.py test")
    assert "python bootstrap.py test" in (README.parent / ".ci" / "run").read_text()
