"""POST /pretrain: UPLVP pre-training on unlabeled photos -> a `pretrained` version that fine-tunes build on."""

from __future__ import annotations

import io
import zipfile
from typing import Any

from tests.app.api.routes.test_finetune import assert_error
from tests.service_fixtures import TINY, post_finetune, wait_job

TINY_PRETRAIN = {k: v for k, v in TINY.items() if k != "val_fraction"}


def post_pretrain(client: Any, data: bytes, vocabulary: str = "cat,person,cup", name: str = "photos-pre",
                  **fields: str) -> Any:
    return client.post("/pretrain", files={"images_zip": ("photos.zip", data, "application/zip")},
                       data={"name": name, "vocabulary": vocabulary, **TINY_PRETRAIN, "epochs": "1",
                             "max_masks": "5", **fields})


def test_pretrain_registers_a_pretrained_version_that_finetune_uses(client: Any, photos_zip: bytes,
                                                                    voc_zip: bytes) -> None:
    resp = post_pretrain(client, photos_zip)
    assert resp.status_code == 202, resp.text
    assert resp.headers["location"] == f"/jobs/{resp.json()['id']}"
    stages: list[str] = []
    job = wait_job(client, resp.json()["id"], timeout_s=180,
                   until=lambda j: stages.append(j["stage"]) or j["state"] in ("succeeded", "failed", "cancelled"))
    assert job["state"] == "succeeded", job
    assert job["kind"] == "pretrain" and job["dataset"]["num_images"] == 3 and "proposing" in stages
    pre = job["result"]["metrics"]["pretrain"]
    assert pre["epochs"] == 1 and pre["pseudo_masks"] > 0 and pre["images"] == 3 and pre["engine"] == "offline"
    version = client.get(f"/models/photos-pre/versions/{job['result']['version']}").json()
    assert version["kind"] == "pretrained" and [c["name"] for c in version["categories"]] == ["cat", "person", "cup"]

    # A fine-tune from it: the backbone/kernels load, the class head does not fit VOC's categories and says so.
    resp = post_finetune(client, voc_zip, name="voc-from-pre", base="photos-pre", epochs="1")
    assert resp.status_code == 202, resp.text
    ft = wait_job(client, resp.json()["id"], timeout_s=120)
    assert ft["state"] == "succeeded", ft
    assert ft["base"] == f"photos-pre:{version['version']}"
    assert ft["result"]["init"]["loaded"] > 0 and ft["result"]["init"]["class_head"].startswith("re-initialised")
    child = client.get(f"/models/voc-from-pre/versions/{ft['result']['version']}").json()
    assert child["parent"] == {"name": "photos-pre", "version": version["version"]} and child["kind"] == "finetuned"


def test_bad_vocabulary(client: Any, photos_zip: bytes) -> None:
    err = assert_error(post_pretrain(client, photos_zip, vocabulary="cat,,dog,Cat"), 400, "invalid_vocabulary",
                       "empty")
    assert any("twice" in d for d in err["details"])
    assert_error(post_pretrain(client, photos_zip, vocabulary=" "), 400, "invalid_vocabulary", "empty")


def test_the_self_engine_needs_labels_and_is_refused_here(client: Any, photos_zip: bytes) -> None:
    assert_error(post_pretrain(client, photos_zip, proposal_engine="self"), 400, "self_needs_labels",
                 "POST /finetune with base=pretrained")


def test_zip_without_images(client: Any) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("readme.txt", "no photos here")
    assert_error(post_pretrain(client, buf.getvalue()), 400, "no_images", "no images")
    assert_error(post_pretrain(client, b"plain text"), 400, "not_a_zip", "'images_zip'")


def test_a_corrupt_photo_is_named(client: Any, photos_zip: bytes) -> None:
    buf = io.BytesIO(photos_zip)
    with zipfile.ZipFile(buf, "a") as zf:
        zf.writestr("b/broken.png", b"\x89PNG not really")
    err = assert_error(post_pretrain(client, buf.getvalue()), 400, "unsupported_image", "b/broken.png")
    assert [d["file"] for d in err["details"]] == ["b/broken.png"]
