"""The Python client and `uplvp client ...` against the real stack (Redis, worker), plus the dataset
converters users expect: a folder + one COCO JSON, a labelme zip, and `uplvp demo-data`."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import client.cli as client_cli
from app.labelme import labelme_to_coco
from client import Client, ServiceError
from models.cli import main as uplvp
from tests.service_fixtures import TINY


@pytest.fixture()
def api(client: Any) -> Client:
    """A Client whose HTTP goes through the test app (same stack as a real server behind it)."""
    c = Client("http://testserver")
    c.http = client
    return c


def test_finetune_a_folder_with_its_coco_json_elsewhere_then_segment_and_export(api: Client, voc_dir: Path,
                                                                                tmp_path: Path) -> None:
    shutil.copytree(voc_dir / "images", tmp_path / "photos")
    seen: list[float] = []
    from client import zip_folder

    data = zip_folder(tmp_path / "photos", voc_dir / "annotations.json")
    job = api.finetune(data, "client-voc", wait=True, on_progress=lambda j: seen.append(j["progress"]),
                       **{k: v for k, v in TINY.items()})
    assert job["state"] == "succeeded" and seen[-1] == 1.0 and seen == sorted(seen)
    res = api.segment([tmp_path / "photos" / "voc_0.jpg"], "client-voc", score_threshold=0.0)
    assert res["images"][0]["instances"]
    png = api.segment([tmp_path / "photos" / "voc_0.jpg"], "client-voc", format="png", out=tmp_path / "o.png")
    assert Image.open(io.BytesIO(png)).size == (500, 375) and (tmp_path / "o.png").is_file()
    coco = api.export(tmp_path / "photos", "client-voc", score_threshold=0.0)
    assert len(coco["images"]) == 4 and coco["annotations"] and coco["categories"]
    from pycocotools.coco import COCO

    (tmp_path / "preds.json").write_text(json.dumps(coco))
    assert len(COCO(str(tmp_path / "preds.json")).getAnnIds()) == len(coco["annotations"])
    assert any(m["name"] == "client-voc" for m in api.models())
    assert api.jobs(name="client-voc")["total"] == 1
    with pytest.raises(ServiceError) as err:
        api.segment([tmp_path / "photos" / "voc_0.jpg"], "no-such-model")
    assert err.value.status == 404 and err.value.code == "unknown_model"


def test_cli_commands(api: Client, voc_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(client_cli, "Client", lambda url=None, key=None: api)
    zip_path = tmp_path / "demo.zip"
    assert uplvp(["demo-data", "--out", str(zip_path), "--copies", "4"]) == 0
    names = zipfile.ZipFile(zip_path).namelist()
    assert "annotations.json" in names and sum(n.startswith("images/") for n in names) == 4
    args = ["finetune", str(zip_path), "--name", "cli-demo", "--epochs", "2", "--image-size", "96", "--wait"]
    monkeypatch.setattr(Client, "finetune", _tiny(Client.finetune))
    assert uplvp(["client", *args]) == 0
    assert "cli-demo v1: mask AP" in capsys.readouterr().out
    photo = voc_dir / "images" / "voc_0.jpg"
    assert uplvp(["client", "segment", str(photo), "--model", "cli-demo", "--out", str(tmp_path / "o.png")]) == 0
    assert Image.open(tmp_path / "o.png").size == (500, 375)
    assert uplvp(["client", "jobs", "--name", "cli-demo"]) == 0 and "cli-demo" in capsys.readouterr().out
    assert uplvp(["client", "models"]) == 0 and "cli-demo" in capsys.readouterr().out
    out = tmp_path / "preds.json"
    assert uplvp(["client", "export", str(voc_dir / "images"), "--model", "cli-demo", "--score-threshold", "0",
                  "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["images"]) == 4
    assert uplvp(["client", "segment", str(photo), "--model", "ghost"]) == 2
    assert "ghost" in capsys.readouterr().err


def _tiny(finetune: Any) -> Any:
    """Client.finetune with the tiny model's advanced fields added (the CLI does not expose them)."""
    def wrapped(self: Client, dataset: Any, name: str, unlabeled: Any = None, **fields: Any) -> Any:
        extra = {k: v for k, v in TINY.items() if k in ("width", "kernels", "stages", "backbone", "batch_size", "lr",
                                                         "warmup_iters")}
        return finetune(self, dataset, name, unlabeled, **{**extra, **{k: v for k, v in fields.items() if v is not None}})
    return wrapped


def test_labelme_zip_is_accepted(client: Any, voc_dir: Path) -> None:
    coco = json.loads((voc_dir / "annotations.json").read_text())
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for im in coco["images"]:
            shapes = []
            for a in coco["annotations"]:
                if a["image_id"] == im["id"]:
                    x, y, w, h = a["bbox"]
                    shapes.append({"label": cats[a["category_id"]], "shape_type": "rectangle",
                                   "points": [[x, y], [x + w, y + h]], "group_id": None})
            stem = Path(im["file_name"]).stem
            zf.writestr(f"labelme/{stem}.json", json.dumps({"imagePath": f"../images/{Path(im['file_name']).name}",
                                                            "imageWidth": im["width"], "imageHeight": im["height"],
                                                            "shapes": shapes}))
            zf.write(voc_dir / "images" / Path(im["file_name"]).name, f"images/{Path(im['file_name']).name}")
    resp = client.post("/finetune", files={"dataset": ("lm.zip", buf.getvalue(), "application/zip")},
                       data={"name": "labelme", **TINY, "epochs": "1"})
    assert resp.status_code == 202, resp.text
    job = client.get(f"/jobs/{resp.json()['id']}").json()
    assert sorted(job["dataset"]["categories"]) == sorted(set(cats.values()))
    assert job["dataset"]["num_annotations"] == len(coco["annotations"])


def test_labelme_conversion_rules(tmp_path: Path) -> None:
    files = {tmp_path / "a.json": {"imagePath": "a.jpg", "imageWidth": 10, "imageHeight": 8, "shapes": [
        {"label": "cat", "points": [[1, 1], [5, 1], [5, 5]], "group_id": 1},
        {"label": "cat", "points": [[6, 6], [8, 6], [8, 7]], "group_id": 1},  # same instance
        {"label": "dog", "shape_type": "rectangle", "points": [[0, 0], [2, 3]]},
        {"label": "nose", "shape_type": "point", "points": [[1, 1]]}]}}
    coco, problems = labelme_to_coco(files, tmp_path)
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog"]
    assert len(coco["annotations"]) == 2 and len(coco["annotations"][0]["segmentation"]) == 2
    assert coco["annotations"][1]["segmentation"] == [[0, 0, 2, 0, 2, 3, 0, 3]]
    assert len(problems) == 1 and "point" in problems[0]["problem"]
