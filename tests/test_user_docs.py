"""The user docs (README.md, docs/*.md) stand on the repository alone: a clone has no
`../shared/`, so nothing may point outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_docs_link_nothing_outside_the_repository(page: Path) -> None:
    text = page.read_text()
    for outside in ("../shared", "shared/DESIGN", "shared/ANCHORS", "seeds/", "/work/"):
        assert outside not in text, f"{page.name} points outside the repository: {outside}"
    for target in re.findall(r"\]\(([^)#\s]+)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path = (page.parent / target).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"{page.name}: {target}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_docs_pages_named_exist(page: Path) -> None:
    for name in set(re.findall(r"docs/([A-Z]+\.md)", page.read_text())):
        assert (ROOT / "docs" / name).exists(), f"{page.name} names docs/{name}"
