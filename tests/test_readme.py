"""The README's configuration table names every environment variable the service reads."""

from __future__ import annotations

from pathlib import Path

from app.core.config import Settings


def test_every_setting_is_documented() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = sorted(n for n in Settings.env_names() if n != "UPLVP_REDIS_URL" and f"`{n}`" not in readme)
    assert not missing, f"add these to README.md's configuration table: {missing}"
