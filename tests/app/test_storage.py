"""The artifact store: atomic puts with sha256, verified fetches, keys that cannot leave the store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.storage import ArtifactError, LocalStore, build_store, file_sha256


def test_put_fetch_verify_delete(tmp_path: Path) -> None:
    src = tmp_path / "ckpt.pt"
    src.write_bytes(b"weights" * 1000)
    store = LocalStore(tmp_path / "store")
    got = store.put(src, "models/m/v1/model.pt")
    assert got.sha256 == file_sha256(src) and got.size_bytes == 7000 and store.exists(got.key)
    assert store.fetch(got.key, got.sha256).read_bytes() == src.read_bytes()
    assert not list((tmp_path / "store/models/m/v1").glob(".*tmp"))  # no temp file left behind
    store.path(got.key).write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="does not match its recorded sha256"):
        store.fetch(got.key, got.sha256)
    store.delete(got.key)
    assert not store.exists(got.key) and not (tmp_path / "store/models/m/v1").exists()
    with pytest.raises(ArtifactError, match="missing"):
        store.fetch(got.key)


@pytest.mark.parametrize("key", ["../escape.pt", "/etc/passwd", "a/../../b", "", "a\\b"])
def test_keys_stay_inside_the_store(tmp_path: Path, key: str) -> None:
    with pytest.raises(ArtifactError, match="invalid artifact key"):
        LocalStore(tmp_path).path(key)


def test_unknown_store_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="supported: local"):
        build_store("s3", tmp_path)


def test_a_corrupt_artifact_is_never_served(client: Any, trained: dict[str, Any]) -> None:
    """The download checks the recorded sha256; a tampered checkpoint answers 500 with the reason."""
    registry = client.app.state.registry
    rec = registry.get_version("voc", trained["job"]["result"]["version"])
    ok = client.get(f"/models/voc/versions/{rec['version']}/download")
    assert ok.status_code == 200 and ok.headers["x-checksum-sha256"] == rec["sha256"]
    path = registry.store.path(rec["artifact"])
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-10])  # torn write
        resp = client.get(f"/models/voc/versions/{rec['version']}/download")
        assert resp.status_code == 500 and resp.json()["error"]["code"] == "artifact_unavailable"
        assert "sha256" in resp.json()["error"]["message"]
    finally:
        path.write_bytes(original)
