"""Models: version records, promote and rollback, delete rules, download."""

from __future__ import annotations

import hashlib
from typing import Any

from tests.app.api.routes.test_finetune import assert_error
from tests.service_fixtures import post_finetune, wait_job


def test_version_record(client: Any, trained: dict[str, Any]) -> None:
    v = trained["job"]["result"]["version"]
    rec = client.get(f"/models/voc/versions/{v}").json()
    assert rec["name"] == "voc" and rec["version"] == v and rec["job_id"] == trained["job"]["id"]
    assert rec["dataset_sha256"] == trained["job"]["dataset"]["sha256"] and rec["parent"] is None
    assert rec["size_bytes"] > 0 and rec["created_at"] and "AP" in rec["metrics"]["segm"]
    assert rec["metrics"]["training"]["device"]["device"] == "cpu"  # the version says which device trained it
    assert [c["name"] for c in rec["categories"]] == ["bottle", "chair", "diningtable", "person"]
    assert any(m["name"] == "voc" for m in client.get("/models").json())


def test_promote_rollback_delete_and_download(client: Any, voc_zip: bytes, trained: dict[str, Any]) -> None:
    v1 = trained["job"]["result"]["version"]
    # v2 starts from v1 (base "<version>" = a version of the same model).
    resp = post_finetune(client, voc_zip, base=str(v1), epochs="1")
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["id"])
    assert job["state"] == "succeeded" and job["base"] == f"voc:{v1}", job
    v2 = job["result"]["version"]
    assert client.get(f"/models/voc/versions/{v2}").json()["parent"] == {"name": "voc", "version": v1}

    assert client.post(f"/models/voc/versions/{v2}/promote").json()["aliases"] == ["production"]
    assert client.get("/models/voc").json()["aliases"] == {"production": v2}
    assert client.post(f"/models/voc/versions/{v1}/promote").status_code == 200  # rollback
    detail = client.get("/models/voc").json()
    assert detail["aliases"] == {"production": v1} and detail["latest"] >= v2

    assert_error(client.delete(f"/models/voc/versions/{v1}"), 409, "version_in_use", "production")
    dl = client.get(f"/models/voc/versions/{v2}/download")
    assert dl.status_code == 200 and hashlib.sha256(dl.content).hexdigest() == dl.headers["x-checksum-sha256"]
    assert client.delete(f"/models/voc/versions/{v2}").status_code == 204
    assert_error(client.get(f"/models/voc/versions/{v2}"), 404, "unknown_version", f"no version {v2}")


def test_unknown_model_and_version(client: Any, trained: dict[str, Any]) -> None:
    assert_error(client.get("/models/ghost"), 404, "unknown_model", "'ghost'")
    assert_error(client.get("/models/voc/versions/999"), 404, "unknown_version", "999")
    assert_error(client.post("/models/voc/versions/999/promote"), 404, "unknown_version", "999")
    assert_error(client.get("/models/ghost/versions/1/download"), 404, "unknown_model", "ghost")


def test_report_pictures(client: Any, trained: dict[str, Any]) -> None:
    """Each fine-tuned version has its learning curve and evaluation grid as PNGs."""
    import io

    from PIL import Image

    v = trained["job"]["result"]["version"]
    assert client.get(f"/models/voc/versions/{v}").json()["reports"] == ["curves", "evaluation"]
    for report in ("curves", "evaluation"):
        resp = client.get(f"/models/voc/versions/{v}/reports/{report}.png")
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
        assert min(Image.open(io.BytesIO(resp.content)).size) > 100
    assert_error(client.get(f"/models/voc/versions/{v}/reports/secrets.png"), 400, "invalid_request", "report")


def test_download_onnx_exports_once_and_runs_without_torch(client: Any, trained: dict[str, Any], tmp_path) -> None:
    """format=onnx: an infer worker exports the version the first time; the file is stored beside the
    checkpoint and served again from there; it runs under ONNX Runtime with client/onnx_model.py."""
    from client.onnx_model import OnnxSegmenter

    registry = client.app.state.registry
    v = trained["job"]["result"]["version"]
    first = client.get(f"/models/voc/versions/{v}/download", params={"format": "onnx"})
    assert first.status_code == 200, first.text
    assert hashlib.sha256(first.content).hexdigest() == first.headers["x-checksum-sha256"]
    assert first.headers["content-disposition"].endswith(f'voc-v{v}.onnx"')
    entry = registry.get_version("voc", v)["exports"]["onnx"]
    assert entry["sha256"] == first.headers["x-checksum-sha256"] and entry["key"] == f"models/voc/v{v}/model.onnx"
    stored = registry.store.path(entry["key"])
    mtime = stored.stat().st_mtime_ns
    again = client.get(f"/models/voc/versions/{v}/download", params={"format": "onnx"})
    assert again.content == first.content and stored.stat().st_mtime_ns == mtime  # served, not exported again
    (tmp_path / "m.onnx").write_bytes(first.content)
    seg = OnnxSegmenter(tmp_path / "m.onnx")
    assert [c["name"] for c in seg.categories] == ["bottle", "chair", "diningtable", "person"]


def test_a_corrupt_stored_export_is_made_again_never_served(client: Any, trained: dict[str, Any]) -> None:
    registry = client.app.state.registry
    v = trained["job"]["result"]["version"]
    assert client.get(f"/models/voc/versions/{v}/download", params={"format": "onnx"}).status_code == 200
    entry = registry.get_version("voc", v)["exports"]["onnx"]
    path = registry.store.path(entry["key"])
    path.write_bytes(path.read_bytes()[:-100])  # a torn file
    resp = client.get(f"/models/voc/versions/{v}/download", params={"format": "onnx"})
    assert resp.status_code == 200 and hashlib.sha256(resp.content).hexdigest() == resp.headers["x-checksum-sha256"]
    assert registry.get_version("voc", v)["exports"]["onnx"]["sha256"] == resp.headers["x-checksum-sha256"]
    assert path.read_bytes() == resp.content


def test_onnx_of_a_maskrcnn_version_is_a_400_naming_the_formats(client: Any, tmp_path) -> None:
    from models.config import ModelConfig, TrainConfig
    from models.engine.checkpoint import save_checkpoint
    from models.nets.build import build_model

    cfg = ModelConfig(arch="maskrcnn", num_classes=1, backbone_weights="none")
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model(cfg, 96, 128), cfg, TrainConfig(short_side=96,
                           max_long_side=128), [{"id": 1, "name": "thing"}], [])
    rec = client.app.state.registry.register_version("cnn", ckpt, {}, [{"id": 1, "name": "thing"}], {}, None, "0" * 64,
                                                     "job-cnn")
    try:
        assert client.get(f"/models/cnn/versions/{rec['version']}/download").status_code == 200  # the .pt is fine
        resp = client.get(f"/models/cnn/versions/{rec['version']}/download", params={"format": "onnx"})
        assert_error(resp, 400, "export_unsupported", "formats on offer: pt")
        assert_error(client.get(f"/models/cnn/versions/{rec['version']}/download", params={"format": "tflite"}),
                     400, "invalid_request", "onnx")
    finally:
        client.app.state.registry.delete_version("cnn", rec["version"])
