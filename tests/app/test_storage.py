"""The artifact stores: one contract for LocalStore and S3Store (against a real SeaweedFS), atomic puts with
sha256, verified fetches, keys that cannot leave the store, bounded retries, clear start-up errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.storage import S3_ATTEMPTS, ArtifactError, LocalStore, S3Store, StoreUnavailable, build_store, file_sha256
from tests.service_fixtures import SeaweedS3, free_port


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Each store under test, empty: a folder, or a prefix of its own in the SeaweedFS bucket."""
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    server: SeaweedS3 = request.getfixturevalue("s3_server")
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    return S3Store(server.BUCKET, f"t/{tmp_path.name}", tmp_path / "cache", endpoint_url=server.endpoint)


def _tamper(store: Any, key: str, data: bytes) -> None:
    """Replace a stored artifact's bytes behind the store's back (a torn write, a replaced object)."""
    if isinstance(store, LocalStore):
        store.path(key).write_bytes(data)
        return
    store.client.put_object(Bucket=store.bucket, Key=store.object_key(key), Body=data)
    (store.cache_dir / key).unlink(missing_ok=True)  # a fresh worker: nothing cached yet


def test_put_fetch_verify_delete(store: Any, tmp_path: Path) -> None:
    src = tmp_path / "ckpt.pt"
    src.write_bytes(b"weights" * 1000)
    got = store.put(src, "models/m/v1/model.pt")
    assert got.sha256 == file_sha256(src) and got.size_bytes == 7000 and store.exists(got.key)
    fetched = store.fetch(got.key, got.sha256)
    assert fetched.read_bytes() == src.read_bytes() and not list(fetched.parent.glob(".*tmp"))  # no temp file left
    _tamper(store, got.key, b"tampered")
    with pytest.raises(ArtifactError, match="does not match its recorded sha256"):
        store.fetch(got.key, got.sha256)
    store.delete(got.key)
    assert not store.exists(got.key)
    with pytest.raises(ArtifactError, match="missing"):
        store.fetch(got.key)
    store.check()  # reachable and writable


@pytest.mark.parametrize("key", ["../escape.pt", "/etc/passwd", "a/../../b", "", "a\\b"])
def test_keys_stay_inside_the_store(store: Any, tmp_path: Path, key: str) -> None:
    src = tmp_path / "x"
    src.write_bytes(b"x")
    with pytest.raises(ArtifactError, match="invalid artifact key"):
        store.put(src, key)
    with pytest.raises(ArtifactError, match="invalid artifact key"):
        store.fetch(key)


def test_unknown_store_scheme_is_refused_at_start(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from app.core.config import Settings

    with pytest.raises(ValueError, match=r"supported: local, s3://bucket/prefix"):
        build_store("ftp://host/x", tmp_path)
    with pytest.raises(ValidationError, match="supported: local, s3://bucket/prefix"):
        Settings(artifacts="gs://bucket")
    with pytest.raises(ValidationError, match="names no bucket"):
        Settings(artifacts="s3://")
    assert isinstance(build_store("local", tmp_path), LocalStore)
    s3 = build_store("s3://models/prod/", tmp_path, "http://127.0.0.1:1")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix, s3.url) == ("models", "prod", "s3://models/prod")
    assert s3.object_key("models/m/v1/model.pt") == "prod/models/m/v1/model.pt"


def test_large_files_go_up_in_parts(s3_server: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    store = S3Store(s3_server.BUCKET, "big", tmp_path / "cache", endpoint_url=s3_server.endpoint)
    src = tmp_path / "big.pt"
    src.write_bytes(bytes(range(256)) * (9 * 4096 + 7))  # 9 MiB and a bit: two parts of 8 MiB
    got = store.put(src, "models/big/v1/model.pt")
    head = store.client.head_object(Bucket=store.bucket, Key=store.object_key(got.key))
    assert head["ETag"].strip('"').endswith("-2")  # a multipart object's ETag counts its parts
    assert head["Metadata"]["sha256"] == got.sha256 == file_sha256(src)
    assert store.fetch(got.key, got.sha256).read_bytes() == src.read_bytes()


def test_endpoint_down_retries_then_storage_error(s3_server: SeaweedS3, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A put to an endpoint that does not answer is retried a bounded number of times, then raises StoreUnavailable (an
    OSError: the job fails as storage_error), and what the store already held is untouched."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    src = tmp_path / "v1.pt"
    src.write_bytes(b"version one")
    good = S3Store(s3_server.BUCKET, "down", tmp_path / "cache", endpoint_url=s3_server.endpoint)
    v1 = good.put(src, "models/m/v1/model.pt")
    down = S3Store(s3_server.BUCKET, "down", tmp_path / "cache2", endpoint_url=f"http://127.0.0.1:{free_port()}")
    sent: list[str] = []
    down.client.meta.events.register("before-send.s3.*", lambda **kw: sent.append(kw["request"].url))
    src.write_bytes(b"version two")
    with pytest.raises(StoreUnavailable, match="could not store models/m/v2/model.pt") as info:
        down.put(src, "models/m/v2/model.pt")
    # retried, and bounded: botocore's S3_ATTEMPTS (here 5 requests: s3transfer's upload adds one of its own)
    assert isinstance(info.value, OSError) and S3_ATTEMPTS <= len(sent) <= 2 * S3_ATTEMPTS
    with pytest.raises(StoreUnavailable, match="could not be reached"):
        down.check()
    assert good.fetch(v1.key, v1.sha256).read_bytes() == b"version one" and not good.exists("models/m/v2/model.pt")


def test_missing_bucket_and_wrong_credentials_are_named(s3_server: SeaweedS3, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    with pytest.raises(StoreUnavailable, match="bucket 'no-such-bucket' does not exist"):
        S3Store("no-such-bucket", "", tmp_path, endpoint_url=s3_server.endpoint).check()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StoreUnavailable, match="credentials were refused"):
        S3Store(s3_server.BUCKET, "", tmp_path, endpoint_url=s3_server.endpoint).check()


def test_create_bucket_command(s3_server: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m app.storage create-bucket` (compose's s3-init): makes a missing bucket once, then finds it;
    a refused credential is an exit 2 naming it, not a traceback."""
    from app.storage import main

    bucket = f"init-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("UPLVP_ARTIFACTS", f"s3://{bucket}/artifacts")
    monkeypatch.setenv("UPLVP_DATA_DIR", str(tmp_path))
    with pytest.raises(StoreUnavailable, match="does not exist"):
        S3Store(bucket, "", tmp_path, endpoint_url=s3_server.endpoint).check()
    assert main(["create-bucket"]) == 0 and "created" in capsys.readouterr().out
    S3Store(bucket, "", tmp_path, endpoint_url=s3_server.endpoint).check()  # the API's start-up check passes
    assert main(["create-bucket"]) == 0 and "exists" in capsys.readouterr().out
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    assert main(["create-bucket"]) == 2 and "credentials were refused" in capsys.readouterr().out


def test_the_registry_keeps_versions_in_the_bucket(s3_server: SeaweedS3, settings: Any, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """register_version puts the checkpoint in the bucket, a worker with an empty cache fetches it verified,
    and deleting the version deletes its object."""
    from app.registry import Registry, connect

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    reg = Registry(connect(settings.redis_url), tmp_path / "a", S3Store(s3_server.BUCKET, "reg", tmp_path / "ca",
                                                                        endpoint_url=s3_server.endpoint))
    other_host = Registry(connect(settings.redis_url), tmp_path / "b",
                          S3Store(s3_server.BUCKET, "reg", tmp_path / "cb", endpoint_url=s3_server.endpoint))
    src = tmp_path / "model.pt"
    src.write_bytes(b"a checkpoint")
    name = f"s3-{tmp_path.name[-12:]}".lower().replace("_", "-")
    rec = reg.register_version(name, src, {"segm": {"AP": 1.0}}, [{"id": 1, "name": "a"}], {}, None, "0" * 64,
                               f"job-{name}")
    assert other_host.fetch_artifact(other_host.get_version(name, rec["version"])).read_bytes() == b"a checkpoint"
    key = reg.store.object_key(rec["artifact"])
    assert reg.store.client.head_object(Bucket=s3_server.BUCKET, Key=key)["Metadata"]["sha256"] == rec["sha256"]
    reg.delete_version(name, rec["version"])
    assert not reg.store.exists(rec["artifact"])


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
