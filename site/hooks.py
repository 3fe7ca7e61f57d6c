"""MkDocs hook: the site's home page is the README, so the two never drift apart.

``docs/index.md`` holds only a marker; this hook replaces it with ``README.md``, its links to
``docs/<page>`` rewritten relative to the site (``<page>``) and ``CHANGELOG.md`` to the
changelog page. ``mkdocs build --strict`` then checks every README link like any other page's.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_as_home() -> str:
    text = README.read_text(encoding="utf-8")
    text = re.sub(r"\]\(docs/([^)]*)\)", r"](\1)", text)
    text = text.replace("](docs/)", "](index.md)")
    return text.replace("](CHANGELOG.md)", "](changelog.md)")


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if page.file.src_uri == "index.md":
        return readme_as_home()
    return markdown
