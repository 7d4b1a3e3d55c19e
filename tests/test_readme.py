"""The README's configuration table names every environment variable the service reads."""

from __future__ import annotations

from pathlib import Path

from app.core.config import Settings


def test_every_setting_is_documented() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = sorted(n for n in Settings.env_names() if n != "UPLVP_REDIS_URL" and f"`{n}`" not in readme)
    assert not missing, f"add these to README.md's configuration table: {missing}"


def test_module_table_matches_the_tree() -> None:
    """Every module of models/ is in the README's engine table, and the table names no module that is gone."""
    import re

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## The engine (`models/`)"):readme.index("Outside `models/`:")]
    listed = {cell for row in re.findall(r"^\| (.+?) \|", section, re.M) for cell in re.findall(r"`([^`]+)`", row)}
    modules = {str(p.relative_to(root / "models")) for p in (root / "models").rglob("*.py")
               if p.name != "__init__.py" and "proposals" not in p.parts}
    packages = {str(p.parent.relative_to(root / "models")) + "/" for p in (root / "models").rglob("__init__.py")
                if p.parent != root / "models"}
    assert modules - listed == set(), f"add to README.md's module table: {sorted(modules - listed)}"
    named = {c for c in listed if c.endswith(".py") or c.endswith("/")}
    gone = {c for c in named if c not in modules | packages}
    assert not gone, f"README.md's module table names modules that do not exist: {sorted(gone)}"
    proposals = {p.name for p in (root / "models/uplvp/proposals").glob("*.py") if p.name != "__init__.py"}
    assert all(f"`{name}`" in section for name in proposals)


def test_models_imports_nothing_from_the_service_layers() -> None:
    """models/ is pure ML: no module in it imports app/, worker/ or client/ at import time."""
    import ast

    root = Path(__file__).resolve().parents[1]
    for path in (root / "models").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: cli.py routes to app/client inside functions
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if n.split(".")[0] in ("app", "worker", "client")]
            assert not bad, f"{path.relative_to(root)} imports {bad} at import time"
