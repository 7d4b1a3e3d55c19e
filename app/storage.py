"""Where model artifacts live. Redis holds their metadata (key, sha256, size); this holds the bytes.

`LocalStore` keeps them under the data dir, which is all a multi-machine deployment needs when
that dir is a shared filesystem (NFS, a mounted volume). Another backend (an S3-compatible
bucket) is a class with the same four methods: `put` uploads, `fetch` downloads to a local
cache once and returns the cached path (workers load checkpoints from local files), `delete`,
`exists`; `build_store` is the one place that maps `UPLVP_ARTIFACT_STORE` to a class.

Writes are atomic (temp file, fsync, rename) and every fetch can be checked against the sha256
recorded at `put`, so a torn or tampered file is never loaded as a model.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol


class ArtifactError(RuntimeError):
    """An artifact that is missing, unreadable or does not match its recorded sha256."""


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


def build_store(kind: str, data_dir: Path) -> ArtifactStore:
    """`UPLVP_ARTIFACT_STORE` -> a store. Only `local` ships; the README says how to add a bucket."""
    if kind == "local":
        return LocalStore(data_dir)
    raise ValueError(f"unknown artifact store {kind!r}; supported: local")
