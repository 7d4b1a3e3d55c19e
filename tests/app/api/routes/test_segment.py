"""POST /segment: instances as JSON, a PNG overlay, and the input errors."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

from tests.app.api.routes.test_finetune import assert_error


def _photo(voc_dir: Path) -> tuple[str, bytes, str]:
    return ("voc_0.jpg", (voc_dir / "images" / "voc_0.jpg").read_bytes(), "image/jpeg")


def test_json_instances(client: Any, voc_dir: Path, trained: dict[str, Any]) -> None:
    resp = client.post("/segment", files=[("images", _photo(voc_dir)), ("images", _photo(voc_dir))],
                       data={"model": "voc", "score_threshold": "0"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "voc" and body["version"] >= 1 and len(body["images"]) == 2
    img = body["images"][0]
    assert (img["width"], img["height"]) == (500, 375) and img["instances"]
    inst = img["instances"][0]
    assert inst["category_name"] in {"bottle", "chair", "diningtable", "person"} and 0 <= inst["score"] <= 1
    assert len(inst["bbox"]) == 4 and inst["segmentation"]["size"] == [375, 500] and "counts" in inst["segmentation"]
    assert isinstance(inst["polygons"], list)
    # who answered, and where the time went (the upload's check, the worker's own work, the queue around it)
    assert resp.headers["x-model"] == "voc" and resp.headers["x-model-version"] == str(body["version"])
    assert resp.headers["x-backend"] == body["backend"]
    timing = dict(part.split(";dur=") for part in resp.headers["server-timing"].split(", "))
    assert list(timing) == ["check", "worker", "queue"] and all(float(v) >= 0 for v in timing.values())
    assert float(timing["worker"]) > 0


def test_png_overlay(client: Any, voc_dir: Path, trained: dict[str, Any]) -> None:
    v = trained["job"]["result"]["version"]
    resp = client.post("/segment", files=[("images", _photo(voc_dir))],
                       data={"model": "voc", "version": str(v), "format": "png", "score_threshold": "0"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    assert resp.headers["x-model-version"] == str(v)
    assert Image.open(io.BytesIO(resp.content)).size == (500, 375)


def test_input_errors(client: Any, voc_dir: Path, trained: dict[str, Any]) -> None:
    photo = _photo(voc_dir)
    assert_error(client.post("/segment", files=[("images", photo)], data={"model": "ghost"}),
                 404, "unknown_model", "ghost")
    assert_error(client.post("/segment", files=[("images", photo)], data={"model": "voc", "version": "999"}),
                 404, "unknown_version", "999")
    assert_error(client.post("/segment", files=[("images", ("notes.txt", b"hello", "text/plain"))],
                             data={"model": "voc"}), 400, "unsupported_image", "notes.txt")
    assert_error(client.post("/segment", files=[("images", photo), ("images", photo)],
                             data={"model": "voc", "format": "png"}), 400, "png_needs_one_image", "exactly one")
    assert_error(client.post("/segment", data={"model": "voc"}), 400, "invalid_request", "images")


def test_async_returns_a_job_whose_output_holds_the_instances(client: Any, voc_dir: Path,
                                                               trained: dict[str, Any]) -> None:
    from tests.service_fixtures import wait_job

    resp = client.post("/segment", files=[("images", _photo(voc_dir))],
                       data={"model": "voc", "score_threshold": "0", "async": "true"})
    assert resp.status_code == 202, resp.text
    assert resp.headers["location"] == f"/jobs/{resp.json()['id']}"
    job = wait_job(client, resp.json()["id"], timeout_s=60)
    assert job["state"] == "succeeded" and job["kind"] == "segment", job
    out = job["output"]
    assert out["model"] == "voc" and out["images"][0]["file_name"] == "voc_0.jpg" and out["images"][0]["instances"]
    assert_error(client.post("/segment", files=[("images", _photo(voc_dir))],
                             data={"model": "voc", "async": "true", "format": "png"}), 400, "async_json_only", "json")
