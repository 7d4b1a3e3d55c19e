"""POST /finetune: 202 + Location for a good zip; each bad upload answers the JSON error shape."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

from tests.service_fixtures import post_finetune, zip_dir


def assert_error(resp: Any, status: int, code: str, mentions: str = "") -> dict:
    """The response is `status` with {"error": {"code", "message", "details"}} and the message says `mentions`."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code, body
    assert mentions in body["error"]["message"], body
    return body["error"]


def test_accepted_job_succeeds_with_a_registered_version(trained: dict[str, Any]) -> None:
    resp, job = trained["response"], trained["job"]
    assert resp.status_code == 202
    assert resp.headers["location"] == f"/jobs/{resp.json()['id']}" and resp.headers["retry-after"]
    assert job["progress"] == 1.0 and job["epoch"] == 2 and job["started_at"] and job["finished_at"]
    assert [h["epoch"] for h in job["history"]] == [1, 2] and all(h["AP50"] is not None for h in job["history"])
    assert job["losses"] and all(isinstance(v, float) for v in job["losses"].values())
    result = job["result"]
    assert result["model"] == "voc" and result["version"] >= 1
    assert set(result["metrics"]["segm"]) >= {"AP", "AP50", "AP75"}
    assert result["metrics"]["evaluated_on"] == "val" and result["num_val_images"] == 1
    assert job["dataset"]["num_images"] == 4 and len(job["dataset"]["sha256"]) == 64
    # where it trained: the job record and the version's metrics say so (the worker of the suite: the CPU)
    training = result["metrics"]["training"]
    assert job["device"]["device"] == "cpu" and training["device"]["device"] == "cpu"
    assert training["precision"] == "fp32" and training["batch_size"] >= 1


def test_not_a_zip(client: Any) -> None:
    assert_error(post_finetune(client, b"this is text"), 400, "not_a_zip", "not a zip")


def test_zip_without_annotations(client: Any, voc_dir: Path) -> None:
    assert_error(post_finetune(client, zip_dir(voc_dir, skip=("annotations.json",))), 400, "no_annotations",
                 "no annotations JSON")


def test_json_that_is_not_coco(client: Any, voc_dir: Path) -> None:
    data = zip_dir(voc_dir, extra={"annotations.json": b'{"images": []}'}, skip=("annotations.json",))
    err = assert_error(post_finetune(client, data), 400, "not_coco", "'annotations'")
    assert err["details"][0]["file"] == "annotations.json"


def test_referenced_images_missing_are_all_listed(client: Any, voc_dir: Path) -> None:
    data = zip_dir(voc_dir, skip=("images/voc_1.jpg", "images/voc_2.jpg"))
    err = assert_error(post_finetune(client, data), 400, "missing_images", "voc_1.jpg")
    assert {d["code"] for d in err["details"]} == {"missing_images"} and len(err["details"]) == 2


def test_unsupported_image_type(client: Any, voc_dir: Path) -> None:
    coco = json.loads((voc_dir / "annotations.json").read_text())
    coco["images"][0]["file_name"] = "voc_0.gif"
    data = zip_dir(voc_dir, extra={"annotations.json": json.dumps(coco).encode(), "images/voc_0.gif": b"GIF89a"},
                   skip=("annotations.json",))
    assert_error(post_finetune(client, data), 400, "unsupported_image", "voc_0.gif")


def test_path_traversal_is_refused(client: Any, voc_zip: bytes) -> None:
    buf = io.BytesIO(voc_zip)
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr("../evil.txt", "x")
    assert_error(post_finetune(client, buf.getvalue()), 400, "unsafe_zip", "'..'")


def test_pretrained_base_runs_uplvp_first(client: Any, voc_zip: bytes, photos_zip: bytes) -> None:
    """base=pretrained: Masks Proposal (offline engine) on the zip's images and the unlabeled zip's,
    pre-training, then fine-tuning."""
    from tests.service_fixtures import TINY, wait_job

    resp = client.post("/finetune", files={"dataset": ("data.zip", voc_zip, "application/zip"),
                                           "unlabeled": ("more.zip", photos_zip, "application/zip")},
                       data={"name": "uplvp", **TINY, "base": "pretrained", "epochs": "1", "pretrain_epochs": "1",
                             "max_masks": "5"})
    assert resp.status_code == 202, resp.text
    seen: list[tuple[str, float]] = []

    def done(job: dict) -> bool:
        seen.append((job["stage"], job["progress"]))
        return job["state"] in ("succeeded", "failed", "cancelled")

    job = wait_job(client, resp.json()["id"], until=done, timeout_s=120)
    assert job["state"] == "succeeded", job
    assert job["params"]["pretrain"] is True and job["base"] is None and job["dataset"]["unlabeled_images"] == 3
    # The pseudo vocabulary is the dataset's category names, so the class head transfers too.
    assert job["result"]["init"]["class_head"] in ("transferred", "reordered") and job["result"]["init"]["loaded"] > 0
    assert "proposing" in [s for s, _ in seen]
    progress = [p for _, p in seen]
    assert progress == sorted(progress)  # never goes backwards across stages
    rec = client.get(f"/models/uplvp/versions/{job['result']['version']}").json()
    assert rec["params"]["pretrain"] is True and rec["params"]["proposal_engine"] == "offline"


def test_unlabeled_images_need_base_pretrained(client: Any, voc_zip: bytes, photos_zip: bytes) -> None:
    resp = client.post("/finetune", files={"dataset": ("data.zip", voc_zip, "application/zip"),
                                           "unlabeled": ("more.zip", photos_zip, "application/zip")},
                       data={"name": "nope"})
    assert_error(resp, 400, "unlabeled_needs_pretrained", "base=pretrained")


def test_unknown_base_model(client: Any, voc_zip: bytes) -> None:
    assert_error(post_finetune(client, voc_zip, base="nosuchmodel:1"), 404, "unknown_model", "nosuchmodel")


def test_invalid_form_fields(client: Any, voc_zip: bytes) -> None:
    err = assert_error(post_finetune(client, voc_zip, epochs="0", width="33"), 400, "invalid_request", "epochs")
    assert {d["field"] for d in err["details"]} == {"epochs", "width"}
    assert_error(post_finetune(client, voc_zip, name="../x"), 400, "invalid_name", "../x")


def test_upload_over_the_cap_is_413(settings: Any, celery_worker: Path, voc_zip: bytes) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    small = settings.model_copy(update={"max_upload_mb": 0.01})
    with TestClient(create_app(small)) as c:
        resp = post_finetune(c, voc_zip)
    assert_error(resp, 413, "upload_too_large", "UPLVP_MAX_UPLOAD_MB")


def test_bad_geometry_is_refused_before_queueing(client: Any, voc_dir: Path) -> None:
    coco = json.loads((voc_dir / "annotations.json").read_text())
    coco["annotations"][0]["segmentation"] = [[1.0, 1.0, 5.0, 5.0]]  # a polygon with 2 points
    coco["annotations"][1]["segmentation"] = [[1.0, 1.0, 9000.0, 5.0, 3.0, 8.0]]  # far outside the image
    coco["annotations"][2]["segmentation"] = {"size": [375, 500], "counts": "zzzz"}  # corrupt RLE
    coco["annotations"][3]["segmentation"] = {"size": [100, 100], "counts": "PQ0"}  # not the image's size
    coco["annotations"][4]["bbox"] = [0, 0, float("nan"), 3]
    data = zip_dir(voc_dir, extra={"annotations.json": json.dumps(coco).encode()}, skip=("annotations.json",))
    err = assert_error(post_finetune(client, data, name="broken"), 400, "invalid_coco", "annotation 1")
    problems = [d["problem"] for d in err["details"]]
    assert len(problems) == 5 and "at least 3" in problems[0] and "outside" in problems[1]
    assert "corrupt" in problems[2] and "size [100, 100]" in problems[3] and "bbox" in problems[4]


def test_what_only_training_finds_fails_the_job_with_the_reason(client: Any, voc_dir: Path) -> None:
    from tests.service_fixtures import wait_job

    coco = json.loads((voc_dir / "annotations.json").read_text())
    for a in coco["annotations"]:
        a["iscrowd"] = 1  # valid COCO, but nothing to train on
    data = zip_dir(voc_dir, extra={"annotations.json": json.dumps(coco).encode()}, skip=("annotations.json",))
    resp = post_finetune(client, data, name="crowds", val_fraction="0")
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["id"])
    assert job["state"] == "failed" and job["error"]["code"] == "invalid_input", job
    assert "non-crowd" in job["error"]["message"] and str(client.app.state.settings.data_dir) not in job["error"]["message"]


def test_time_budget_below_the_minimum_is_refused(client: Any, voc_dir: Path) -> None:
    err = assert_error(post_finetune(client, zip_dir(voc_dir), time_budget_min="0.5"), 400, "time_budget_too_small",
                       "the minimum is 1 minute")
    assert err["message"].startswith("time_budget_min=0.5")


def test_self_training_without_images_to_hold_out_is_refused(client: Any, voc_dir: Path) -> None:
    err = assert_error(post_finetune(client, zip_dir(voc_dir), base="pretrained", proposal_engine="self",
                                     val_fraction="0"), 400, "self_needs_validation", "val_fraction > 0")
    assert err["message"].startswith("proposal_engine=self fine-tunes a teacher")


def test_an_image_size_below_32_is_refused(client: Any, voc_dir: Path) -> None:
    err = assert_error(post_finetune(client, zip_dir(voc_dir), image_size="16"), 400, "image_size_invalid",
                       "or 0 to follow the data")
    assert err["message"].startswith("image_size=16")


def test_the_default_budget_applies_when_neither_epochs_nor_a_budget_is_given(client: Any, voc_dir: Path) -> None:
    from tests.service_fixtures import TINY

    fields = {k: v for k, v in TINY.items() if k != "epochs"}
    resp = client.post("/finetune", files={"dataset": ("data.zip", zip_dir(voc_dir), "application/zip")},
                       data={"name": "budget", **fields})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    try:
        params = client.get(f"/jobs/{job_id}").json()["params"]
        assert params["time_budget_min"] == 15.0 and params["epochs"] == 0  # UPLVP_DEFAULT_TIME_BUDGET_MIN
    finally:
        client.post(f"/jobs/{job_id}/cancel")
    # epochs alone: no budget; both: the budget, epochs as its cap
    resp = post_finetune(client, zip_dir(voc_dir), name="budget", time_budget_min="0")
    job_id = resp.json()["id"]
    assert client.get(f"/jobs/{job_id}").json()["params"]["time_budget_min"] == 0.0
    client.post(f"/jobs/{job_id}/cancel")


def _trained_from(client: Any, data: bytes, name: str) -> dict:
    from tests.service_fixtures import wait_job

    resp = post_finetune(client, data, name=name)
    assert resp.status_code == 202, resp.text
    job = wait_job(client, resp.json()["id"])
    assert job["state"] == "succeeded", job
    return job


def test_roboflow_coco_export_trains_and_is_scored_on_its_test_split(client: Any, voc_dir: Path) -> None:
    """A Roboflow export zip as downloaded: train/ valid/ test/, each with _annotations.coco.json."""
    from tests.export_layouts import DATASET_NAME, roboflow_coco_zip

    job = _trained_from(client, roboflow_coco_zip(voc_dir), "roboflow")
    assert job["dataset"]["format"] == "roboflow" and DATASET_NAME not in job["dataset"]["categories"]
    assert job["dataset"]["test_ann"] == "test/_annotations.coco.json"
    metrics = job["result"]["metrics"]
    assert metrics["evaluated_on"] == "val" and job["result"]["num_val_images"] == 1  # valid/ picked the weights
    assert metrics["test"]["num_images"] == 1 and set(metrics["test"]["segm"]) >= {"AP", "AP50", "AP75"}
    version = client.get(f"/models/roboflow/versions/{job['result']['version']}").json()
    assert version["metrics"]["test"] == metrics["test"]
    assert [c["name"] for c in version["categories"]] == ["bottle", "chair", "diningtable", "person"]


def test_yolo_segmentation_dataset_trains(client: Any, voc_dir: Path) -> None:
    """An Ultralytics YOLO-seg layout (data.yaml + images/ + labels/) is converted on upload and trains."""
    from tests.export_layouts import yolo_seg_zip

    job = _trained_from(client, yolo_seg_zip(voc_dir), "yolo")
    assert job["dataset"]["format"] == "yolo" and job["dataset"]["categories"] == ["bottle", "chair", "diningtable",
                                                                                    "person"]
    assert job["result"]["num_train_images"] == 2 and job["result"]["num_val_images"] == 1
    assert job["result"]["metrics"]["test"]["num_images"] == 1


def test_yolo_label_outside_the_image_is_a_400_naming_file_and_line(client: Any, voc_dir: Path) -> None:
    from tests.export_layouts import yolo_seg_zip

    data = yolo_seg_zip(voc_dir, {"valid/labels/voc_2.txt": b"0 0.1 0.1 0.5 0.1 0.5 0.5\n2 0.1 0.1 1.2 0.1 0.5 0.5\n"})
    err = assert_error(post_finetune(client, data), 400, "invalid_yolo", "valid/labels/voc_2.txt: line 2")
    assert err["details"][0]["file"] == "valid/labels/voc_2.txt"
    outside = yolo_seg_zip(voc_dir, {"data.yaml": b"train: ../../x/images\nnames: [a]\n"})
    assert_error(post_finetune(client, outside), 400, "yolo_path_outside", "outside the zip")
