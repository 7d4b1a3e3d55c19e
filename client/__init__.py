"""Python client of the uplvp service (httpx only: no torch, usable from any small script).

    from client import Client
    c = Client("http://127.0.0.1:8000", api_key=None)
    job = c.finetune("data.zip", name="shapes", epochs=30, wait=True, on_progress=print)
    result = c.segment(["photo.jpg"], model="shapes")            # instances per image
    c.segment(["photo.jpg"], model="shapes", format="png", out="overlay.png")
    coco = c.export("photos/", model="shapes")                    # predictions as COCO JSON

Errors come back as `ServiceError` carrying the service's `code`, `message` and `details`.
"""

from __future__ import annotations

import io
import os
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
TERMINAL = ("succeeded", "failed", "cancelled")


class ServiceError(RuntimeError):
    """An error answer of the service: HTTP status, its stable `code`, the message saying what to fix."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details


def zip_folder(folder: str | Path, annotations: str | Path | None = None) -> bytes:
    """A dataset folder (images in any sub-folders) + optionally a COCO JSON kept elsewhere, as zip bytes."""
    folder = Path(folder)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
        if annotations is not None:
            zf.write(annotations, "annotations.json")
    return buf.getvalue()


class Client:
    """One service: its base URL and (optionally) an API key. Defaults: $UPLVP_URL, $UPLVP_API_KEY."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 300.0) -> None:
        self.url = (url or os.environ.get("UPLVP_URL") or "http://127.0.0.1:8000").rstrip("/")
        key = api_key if api_key is not None else os.environ.get("UPLVP_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise ServiceError(0, "unreachable", f"no uplvp service answers at {self.url}; start one with "
                               "`make run` or set --url / UPLVP_URL") from None
        if resp.status_code >= 400:
            try:
                err = resp.json()["error"]
            except (ValueError, KeyError, TypeError):
                err = {"code": "http_error", "message": resp.text[:500], "details": None}
            raise ServiceError(resp.status_code, err["code"], err["message"], err.get("details"))
        return resp

    # ------------------------------------------------------------------ jobs

    def finetune(self, dataset: str | Path | bytes, name: str, unlabeled: str | Path | bytes | None = None,
                 wait: bool = False, on_progress: Callable[[dict[str, Any]], None] | None = None,
                 **fields: Any) -> dict[str, Any]:
        """Upload a dataset (a zip path, zip bytes, or a folder holding a COCO JSON and its images,
        or a labelme folder) and queue a fine-tune; `fields` are the form fields (epochs, base, ...).
        Returns the job (the finished one with `wait`)."""
        files = {"dataset": ("dataset.zip", _zip_bytes(dataset), "application/zip")}
        if unlabeled is not None:
            files["unlabeled"] = ("unlabeled.zip", _zip_bytes(unlabeled), "application/zip")
        job = self._call("POST", "/finetune", files=files, data={"name": name, **_form(fields)}).json()
        return self.wait(job["id"], on_progress) if wait else self.job(job["id"])

    def pretrain(self, images: str | Path | bytes, vocabulary: str, name: str, wait: bool = False,
                 on_progress: Callable[[dict[str, Any]], None] | None = None, **fields: Any) -> dict[str, Any]:
        """UPLVP pre-training on a folder or zip of unlabeled images; the result is a base for finetune."""
        files = {"images_zip": ("images.zip", _zip_bytes(images), "application/zip")}
        job = self._call("POST", "/pretrain", files=files,
                         data={"name": name, "vocabulary": vocabulary, **_form(fields)}).json()
        return self.wait(job["id"], on_progress) if wait else self.job(job["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/jobs/{job_id}").json()

    def jobs(self, state: str | None = None, name: str | None = None, offset: int = 0,
             limit: int = 50) -> dict[str, Any]:
        params = {k: v for k, v in {"state": state, "name": name, "offset": offset, "limit": limit}.items()
                  if v is not None}
        return self._call("GET", "/jobs", params=params).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/jobs/{job_id}/cancel").json()

    def wait(self, job_id: str, on_progress: Callable[[dict[str, Any]], None] | None = None,
             poll_s: float = 1.0, timeout_s: float | None = None) -> dict[str, Any]:
        """Poll until the job is succeeded, failed or cancelled; `on_progress(job)` after every poll."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if on_progress:
                on_progress(job)
            if job["state"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout_s} s")
            time.sleep(poll_s)

    # ------------------------------------------------------------------ models

    def models(self) -> list[dict[str, Any]]:
        return self._call("GET", "/models").json()

    def model(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/models/{name}").json()

    def promote(self, name: str, version: int) -> dict[str, Any]:
        return self._call("POST", f"/models/{name}/versions/{version}/promote").json()

    def download(self, name: str, version: int, out: str | Path, format: str = "pt") -> Path:
        """A version's checkpoint (format pt) or its ONNX export (format onnx, see client/onnx_model.py) to `out`."""
        resp = self._call("GET", f"/models/{name}/versions/{version}/download", params={"format": format})
        Path(out).write_bytes(resp.content)
        return Path(out)

    # ------------------------------------------------------------------ segmentation

    def segment(self, images: Iterable[str | Path], model: str, version: int | None = None,
                score_threshold: float = 0.3, format: str = "json", out: str | Path | None = None) -> Any:
        """Instances per image (format json) or a PNG overlay (format png, one image; written to `out`)."""
        paths = [Path(p) for p in images]
        files = [("images", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]
        data = {"model": model, "score_threshold": str(score_threshold), "format": format}
        if version is not None:
            data["version"] = str(version)
        resp = self._call("POST", "/segment", files=files, data=data)
        if format == "png":
            if out is not None:
                Path(out).write_bytes(resp.content)
            return resp.content
        return resp.json()

    def export(self, folder: str | Path, model: str, version: int | None = None, score_threshold: float = 0.3,
               batch: int = 8) -> dict[str, Any]:
        """Predictions on every image under `folder` as a COCO instances JSON (RLE segmentations, scores)."""
        folder = Path(folder)
        paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise ServiceError(0, "no_images", f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
        images, annotations, categories, used = [], [], {}, None
        for start in range(0, len(paths), batch):
            chunk = paths[start: start + batch]
            res = self.segment(chunk, model, version, score_threshold)
            used = (res["model"], res["version"])
            for p, img in zip(chunk, res["images"]):
                image_id = len(images) + 1
                images.append({"id": image_id, "file_name": p.relative_to(folder).as_posix(),
                               "width": img["width"], "height": img["height"]})
                for inst in img["instances"]:
                    categories[inst["category_id"]] = inst["category_name"]
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                        "category_id": inst["category_id"], "segmentation": inst["segmentation"],
                                        "bbox": inst["bbox"], "area": inst["area"], "score": inst["score"],
                                        "iscrowd": 0})
        return {"info": {"description": f"predictions of {used[0]} v{used[1]}" if used else ""},
                "images": images, "annotations": annotations,
                "categories": [{"id": i, "name": n} for i, n in sorted(categories.items())]}


def _zip_bytes(src: str | Path | bytes) -> bytes:
    if isinstance(src, bytes):
        return src
    path = Path(src)
    if path.is_dir():
        return zip_folder(path)
    if not path.is_file():
        raise ServiceError(0, "not_found", f"{path}: no such file or folder")
    return path.read_bytes()


def _form(fields: dict[str, Any]) -> dict[str, str]:
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items() if v is not None}
