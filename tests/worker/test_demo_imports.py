"""The demo talks to the admin API, not the ORM (issue 10 part 8): ``worker/demo.py`` imports nothing
from ``service.db`` or ``service.repositories``, at module level or inside a function (failed before:
it read subjects and samples and created its key through repositories)."""

from __future__ import annotations

import ast
from pathlib import Path

import worker.demo

FORBIDDEN = ("service.db", "service.repositories")


def imported_modules(source: str) -> set[str]:
    """Every module an ``import`` or ``from … import`` statement anywhere in ``source`` names (with
    ``from a import b``: both ``a`` and ``a.b``, since ``b`` may be a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_imported_modules_sees_function_level_imports() -> None:
    source = "def f():\n    from service import repositories\n    import service.db.session\n"
    found = imported_modules(source)
    assert {"service.repositories", "service.db.session"} <= found


def test_the_demo_imports_no_orm() -> None:
    source = Path(worker.demo.__file__).read_text()
    bad = sorted(m for m in imported_modules(source) if m.startswith(FORBIDDEN))
    assert bad == [], f"worker/demo.py imports {bad}: use the admin API over HTTP"
