"""Where model artifacts live. Redis holds their metadata (key, sha256, size); this holds the bytes.

`LocalStore` keeps them under the data dir, which is all a multi-machine deployment needs when
that dir is a shared filesystem (NFS, a mounted volume). `S3Store` keeps them in a bucket of any
S3-compatible object store (AWS S3, SeaweedFS, MinIO, Ceph) through boto3: workers on other hosts
then need no shared filesystem. Both have the same methods: `put` uploads, `fetch` returns a local
file (S3Store downloads into a local cache once and verifies it), `delete`, `exists`, and `check`
(the store answers: what readiness and a starting worker ask); `build_store` is the one place that
maps `UPLVP_ARTIFACTS` (`local` or `s3://bucket/prefix`) to a class.

Writes are atomic (LocalStore: temp file, fsync, rename; S3Store: an object, multipart or not, is
visible only once its upload completed) and every fetch can be checked against the sha256
recorded at `put`, so a torn or tampered file is never loaded as a model. An S3 request that fails
on the network is retried a bounded number of times (botocore's standard retries), then raises
StoreUnavailable, an OSError: a job fails as `storage_error` and the versions already stored stay.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol


class ArtifactError(RuntimeError):
    """An artifact that is missing, unreadable or does not match its recorded sha256."""


class StoreUnavailable(OSError):
    """The store cannot be reached or refuses us (endpoint down after retries, missing bucket, bad
    credentials); the message says which and what to check."""


class NoSuchBucket(StoreUnavailable):
    """The endpoint answers, but the bucket does not exist (S3Store.create_bucket makes it)."""


@dataclass(frozen=True)
class StoredArtifact:
    """What `put` recorded: the key (a relative posix path), the content's sha256 and its size."""

    key: str
    sha256: str
    size_bytes: int


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_key(key: str) -> str:
    """A store key is a relative posix path without '..' (ids from requests never reach here raw)."""
    p = PurePosixPath(key)
    if not key or p.is_absolute() or ".." in p.parts or "\\" in key:
        raise ArtifactError(f"invalid artifact key {key!r}")
    return key


class ArtifactStore(Protocol):
    """The interface every artifact backend implements."""

    def put(self, src: Path, key: str) -> StoredArtifact: ...

    def fetch(self, key: str, sha256: str | None = None) -> Path: ...

    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool: ...

    def check(self) -> None: ...


class LocalStore:
    """Artifacts as files under `root` (the data dir; share it between machines)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """The file of `key` (inside root, whatever the key)."""
        return self.root / check_key(key)

    def put(self, src: Path, key: str) -> StoredArtifact:
        """Copy `src` to `key` atomically (temp file in the same dir, fsync, rename), hashing on the way."""
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        h, size = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                while chunk := inp.read(1 << 20):
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return StoredArtifact(key=key, sha256=h.hexdigest(), size_bytes=size)

    def fetch(self, key: str, sha256: str | None = None) -> Path:
        """The local file of `key`; with `sha256`, ArtifactError unless the content matches it."""
        path = self.path(key)
        if not path.is_file():
            raise ArtifactError(f"artifact {key} is missing from the store")
        if sha256 is not None and file_sha256(path) != sha256:
            raise ArtifactError(f"artifact {key} does not match its recorded sha256 (corrupt or replaced)")
        return path

    def delete(self, key: str) -> None:
        """Remove the file and its folder if that empties it."""
        path = self.path(key)
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()
        except OSError:
            pass

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def check(self) -> None:
        """StoreUnavailable unless the root is a writable folder."""
        if not os.access(self.root if self.root.exists() else self.root.parent, os.W_OK):
            raise StoreUnavailable(f"the artifact folder {self.root} is not writable")


S3_MULTIPART_BYTES = 8 * 1024 * 1024  # files from this size go up in parts of this size (boto3's TransferConfig)
S3_ATTEMPTS = 4  # requests per S3 call: the first and 3 retries with botocore's backoff (standard mode)


class S3Store:
    """Artifacts as objects under `prefix` in `bucket` of an S3-compatible endpoint.

    Credentials come from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) or
    any other source boto3 reads. Each object carries its sha256 in its metadata; fetched objects land
    in `cache_dir` (verified before they are moved into place), so a worker downloads a model once.
    """

    def __init__(self, bucket: str, prefix: str, cache_dir: str | Path, endpoint_url: str | None = None,
                 attempts: int = S3_ATTEMPTS, client: object | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.cache_dir = Path(cache_dir)
        self.endpoint_url = endpoint_url
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        # a session of its own: credentials are read now, not cached process-wide by boto3's default session
        self.client = client or boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            config=Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=5,
                          read_timeout=60, s3={"addressing_style": "path"}))

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def object_key(self, key: str) -> str:
        """The bucket key of a store key (under the prefix)."""
        key = check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _unavailable(self, what: str, exc: Exception) -> StoreUnavailable:
        return StoreUnavailable(f"the artifact store {self.url} ({self.endpoint_url or 'AWS'}) could not {what}: {exc}")

    def put(self, src: Path, key: str) -> StoredArtifact:
        """Upload `src` (multipart from S3_MULTIPART_BYTES) with its sha256 in the object's metadata."""
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        sha, size = file_sha256(src), Path(src).stat().st_size
        config = TransferConfig(multipart_threshold=S3_MULTIPART_BYTES, multipart_chunksize=S3_MULTIPART_BYTES)
        try:
            self.client.upload_file(str(src), self.bucket, self.object_key(key),
                                    ExtraArgs={"Metadata": {"sha256": sha}}, Config=config)
        except (BotoCoreError, ClientError) as exc:
            raise self._unavailable(f"store {key}", exc) from None
        return StoredArtifact(key=key, sha256=sha, size_bytes=size)

    def fetch(self, key: str, sha256: str | None = None) -> Path:
        """The cached local file of `key`, downloaded when missing or when its content is not `sha256` (without
        `sha256`: not the sha256 in the object's metadata, since a key such as a job's checkpoint is rewritten);
        ArtifactError when the object is missing or does not match `sha256`."""
        from botocore.exceptions import BotoCoreError, ClientError

        local = self.cache_dir / check_key(key)
        if local.is_file() and file_sha256(local) == (sha256 or self._stored_sha256(key)):
            return local
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".tmp")
        os.close(fd)
        try:
            try:
                self.client.download_file(self.bucket, self.object_key(key), tmp)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    raise ArtifactError(f"artifact {key} is missing from the store") from None
                raise self._unavailable(f"read {key}", exc) from None
            except BotoCoreError as exc:
                raise self._unavailable(f"read {key}", exc) from None
            if sha256 is not None and file_sha256(tmp) != sha256:
                raise ArtifactError(f"artifact {key} does not match its recorded sha256 (corrupt or replaced)")
            os.replace(tmp, local)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return local

    def _head(self, key: str) -> dict[str, Any] | None:
        """The object's HEAD (None when there is no such object)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._unavailable(f"look up {key}", exc) from None
        except BotoCoreError as exc:
            raise self._unavailable(f"look up {key}", exc) from None

    def _stored_sha256(self, key: str) -> str | None:
        """The sha256 `put` wrote into the object's metadata (None: no such object, or written by something else)."""
        head = self._head(key)
        return head.get("Metadata", {}).get("sha256") if head is not None else None

    def delete(self, key: str) -> None:
        """Remove the object and its cached copy (a missing object is not an error)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))
        except (BotoCoreError, ClientError) as exc:
            raise self._unavailable(f"delete {key}", exc) from None
        (self.cache_dir / check_key(key)).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def check(self) -> None:
        """StoreUnavailable naming the cause: no bucket, a refused credential, or no answer from the endpoint."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise StoreUnavailable(f"no S3 credentials for {self.url}: set AWS_ACCESS_KEY_ID and "
                                   "AWS_SECRET_ACCESS_KEY") from None
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code"))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise NoSuchBucket(f"the bucket {self.bucket!r} does not exist at {self.endpoint_url or 'AWS'}: "
                                   "create it, or fix UPLVP_ARTIFACTS") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StoreUnavailable(f"the S3 credentials were refused for bucket {self.bucket!r} ({code}): check "
                                       "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from None
            raise self._unavailable("be reached", exc) from None
        except BotoCoreError as exc:
            raise self._unavailable("be reached (check UPLVP_S3_ENDPOINT_URL)", exc) from None

    def create_bucket(self) -> bool:
        """Create the bucket where it does not exist yet (a fresh object store's first start); True if it was
        created. StoreUnavailable naming the cause when the endpoint or the credentials fail."""
        try:
            self.check()
            return False
        except NoSuchBucket:
            pass
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except Exception as exc:  # noqa: BLE001 - botocore's errors, named for the user
            if "BucketAlready" in str(exc):  # created by another process at the same moment
                return False
            raise self._unavailable(f"create the bucket {self.bucket!r}", exc) from None
        return True


STORE_SCHEMES = ("local", "s3://bucket/prefix")


def parse_artifacts(value: str) -> tuple[str, str, str]:
    """`UPLVP_ARTIFACTS` -> ("local", "", "") or ("s3", bucket, prefix); ValueError naming the supported forms."""
    value = value.strip()
    if value == "local":
        return "local", "", ""
    if value.startswith("s3://"):
        bucket, _, prefix = value[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"UPLVP_ARTIFACTS={value!r} names no bucket: use s3://bucket or s3://bucket/prefix")
        return "s3", bucket, prefix.strip("/")
    raise ValueError(f"unknown artifact store {value!r}; supported: {', '.join(STORE_SCHEMES)}")


def build_store(artifacts: str, data_dir: Path, endpoint_url: str | None = None) -> ArtifactStore:
    """`UPLVP_ARTIFACTS` -> a store: `local` (files under the data dir) or `s3://bucket/prefix` (objects in that
    bucket at `endpoint_url`, cached under data_dir/cache)."""
    kind, bucket, prefix = parse_artifacts(artifacts)
    if kind == "local":
        return LocalStore(data_dir)
    return S3Store(bucket, prefix, Path(data_dir) / "cache", endpoint_url=endpoint_url)


def main(argv: list[str] | None = None) -> int:
    """`python -m app.storage create-bucket`: create the bucket of an s3:// UPLVP_ARTIFACTS where it is missing
    (compose's `s3-init`; the API and the workers refuse to start without it). Exit 0 when it exists after."""
    import argparse

    from app.core.config import Settings

    p = argparse.ArgumentParser(prog="python -m app.storage", description=main.__doc__)
    p.add_argument("command", choices=["create-bucket"])
    p.parse_args(argv)
    settings = Settings()
    store = build_store(settings.artifacts, settings.data_dir, settings.s3_endpoint_url)
    if not isinstance(store, S3Store):
        print(f"UPLVP_ARTIFACTS={settings.artifacts!r} is not an s3:// store: nothing to create")
        return 0
    try:
        created = store.create_bucket()
    except StoreUnavailable as exc:
        print(f"error: {exc}")
        return 2
    print(f"bucket {store.bucket!r} at {store.endpoint_url or 'AWS'}: {'created' if created else 'exists'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
