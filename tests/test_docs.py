"""Every Python snippet in README.md and docs/ runs (a snippet that does not run is a bug)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from choreo.events import UPCASTERS

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def snippets(path: Path) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))


@pytest.mark.parametrize("path", [p for p in DOCS if snippets(p)], ids=lambda p: p.name)
def test_snippets_run(path: Path) -> None:
    # Aggregates are found again by their topic (module + name), so run as a real module.
    module = types.ModuleType(f"docs_{path.stem.lower()}")
    sys.modules[module.__name__] = module
    upcasters = dict(UPCASTERS)  # the registry is global: a page's upcasters stay on its page
    try:
        exec(compile(snippets(path), str(path), "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
        UPCASTERS.clear()
        UPCASTERS.update(upcasters)
