"""The README is short, its links lead somewhere, and its Python runs as written (from any directory)."""
from __future__ import annotations

import re

from tests.helpers import REPO

README = REPO / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_is_short_and_its_links_exist():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert "docs/training.md" in links
    missing = [link for link in links if not (REPO / link).exists()]
    assert not missing, missing


def test_readme_python_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as a user of the installed package: the built-in models are found by name
    (code,) = blocks("python")
    exec(compile(code, "README.md", "exec"), {})
    assert len(list((tmp_path / "outputs" / "python").glob("*.png"))) == 4
