"""Every hostile upload of tests/hostile_corpus.py is refused with a 4xx and the error shape, before
a job is queued, and nothing is left behind: no job, no upload, no file outside the data dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.hostile_corpus import build, png_bomb


@pytest.fixture(scope="module")
def corpus(voc_dir: Path) -> list[tuple[str, str, bytes, str]]:
    return build(voc_dir)


def _snapshot(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "redis" not in p.parts}


def test_every_hostile_upload_is_refused_and_leaves_nothing(client: Any, corpus: list, tmp_path: Path) -> None:
    data_dir: Path = client.app.state.settings.data_dir
    before, jobs_before = _snapshot(data_dir), client.get("/jobs").json()["total"]
    outside_before = {p.name for p in data_dir.parent.iterdir()}
    failures = []
    for name, field, payload, code in corpus:
        resp = client.post("/finetune", files={field: ("upload.zip", payload, "application/zip")},
                           data={"name": "hostile"})
        body = resp.json()
        if not (400 <= resp.status_code < 500 and body.get("error", {}).get("code") == code):
            failures.append((name, resp.status_code, body))
    assert not failures, failures
    assert client.get("/jobs").json()["total"] == jobs_before  # nothing was queued
    assert _snapshot(data_dir) <= before  # no upload, job folder or extracted file left
    assert {p.name for p in data_dir.parent.iterdir()} == outside_before  # nothing written beside the data dir
    assert not list(Path("/tmp").glob("evil.txt"))


def test_hostile_images_on_segment_and_pretrain(client: Any, trained: dict[str, Any], voc_dir: Path) -> None:
    jpeg = (voc_dir / "images" / "voc_0.jpg").read_bytes()
    for name, data in (("bomb.png", png_bomb()), ("cut.jpg", jpeg[: len(jpeg) // 2])):
        resp = client.post("/segment", files={"images": (name, data, "image/png")}, data={"model": "voc"})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "unsupported_image", resp.text
        assert name in resp.json()["error"]["message"]
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ok.jpg", jpeg)
        zf.writestr("bomb.png", png_bomb())
    resp = client.post("/pretrain", files={"images_zip": ("p.zip", buf.getvalue(), "application/zip")},
                       data={"name": "hostile-pre", "vocabulary": "cat"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "unsupported_image"
    assert "bomb.png" in resp.json()["error"]["message"] and "pixels" in resp.json()["error"]["message"]
