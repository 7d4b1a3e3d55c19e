"""Models: list, versions, promote (production alias; rollback = promote an older one), delete, download."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from celery import Celery
from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import FileResponse

from app.api.deps import CeleryDep, RegistryDep, SettingsDep
from app.api.enqueue import call_infer
from app.core.errors import ApiError
from app.core.security import WriteAccess, read_access
from app.registry import Conflict, NotFound, Registry
from app.schemas import ErrorResponse, ModelDetail, ModelSummary, ModelVersion
from app.storage import ArtifactError
from worker.celery_app import EXPORT_TASK, send_warm

router = APIRouter(prefix="/models", tags=["models"], dependencies=[Depends(read_access)])
NOT_FOUND = {404: {"model": ErrorResponse}}


def _call(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except NotFound as exc:
        msg = exc.args[0]
        raise ApiError(404, "unknown_version" if "version" in msg else "unknown_model", f"{msg}; see GET /models") from None
    except Conflict as exc:
        raise ApiError(409, "version_in_use", str(exc)) from None


def _summary(registry: Registry, name: str) -> dict[str, Any]:
    versions = _call(registry.versions, name)
    return {"name": name, "versions": versions, "aliases": registry.aliases(name),
            "latest": versions[-1] if versions else None}


@router.get("", response_model=list[ModelSummary], summary="All models with their versions and aliases")
def list_models(registry: RegistryDep) -> list[dict[str, Any]]:
    """Oldest model first."""
    return [_summary(registry, n) for n in registry.model_names()]


@router.get("/{name}", response_model=ModelDetail, responses=NOT_FOUND, summary="One model and all its versions")
def get_model(name: str, registry: RegistryDep) -> dict[str, Any]:
    """Versions ascending, with metrics."""
    s = _summary(registry, name)
    return {**s, "items": [registry.get_version(name, v) for v in s["versions"]]}


@router.get("/{name}/versions/{version}", response_model=ModelVersion, responses=NOT_FOUND,
            summary="A version: metrics, parent, dataset digest, created_at, size")
def get_version(name: str, version: int, registry: RegistryDep) -> dict[str, Any]:
    """One version's record."""
    return _call(registry.get_version, name, version)


@router.post("/{name}/versions/{version}/promote", response_model=ModelVersion, responses=NOT_FOUND,
             summary="Make this version production (to roll back, promote an older one)")
def promote(name: str, version: int, registry: RegistryDep, celery: CeleryDep, _: WriteAccess) -> dict[str, Any]:
    """POST /segment without a version uses it from now on; an infer worker loads it now (its first request
    is then as fast as the next)."""
    rec = _call(registry.promote, name, version)
    send_warm(celery, name, version)
    return rec


@router.delete("/{name}/versions/{version}", status_code=204,
               responses={**NOT_FOUND, 409: {"model": ErrorResponse}},
               summary="Delete a version (refused while it is production or the base of an active job)")
def delete_version(name: str, version: int, registry: RegistryDep, _: WriteAccess) -> Response:
    """The artifact file goes too."""
    _call(registry.delete_version, name, version)
    return Response(status_code=204)


@router.get("/{name}/versions/{version}/reports/{report}.png",
            responses={**NOT_FOUND, 200: {"content": {"image/png": {}}}},
            summary="A picture of this version: learning curves or the evaluation grid")
def report(name: str, version: int, report: Literal["curves", "evaluation"], registry: RegistryDep) -> FileResponse:
    """`curves`: loss per epoch; `evaluation`: validation images, ground truth beside predictions."""
    rec = _call(registry.get_version, name, version)
    if report not in rec["reports"]:
        raise ApiError(404, "unknown_report", f"{name} v{version} has no {report!r} picture (it has: "
                       f"{', '.join(rec['reports']) or 'none'})")
    try:
        path = registry.store.fetch(f"models/{name}/v{version}/{report}.png")
    except ArtifactError as exc:
        raise ApiError(500, "artifact_unavailable", f"{name} v{version}: {exc}") from None
    return FileResponse(path, media_type="image/png")


@router.get("/{name}/versions/{version}/download",
            responses={**NOT_FOUND, 400: {"model": ErrorResponse}, 504: {"model": ErrorResponse},
                       200: {"content": {"application/octet-stream": {}}}},
            summary="The checkpoint (format=pt, loads with `uplvp segment --model`) or its ONNX export (format=onnx)")
def download(name: str, version: int, registry: RegistryDep, settings: SettingsDep, celery: CeleryDep,
             format: Annotated[Literal["pt", "onnx"], Query(description="pt: the checkpoint; onnx: the K-Net graph "
                                                             "for ONNX Runtime (client/onnx_model.py)")] = "pt") -> FileResponse:
    """The file, with its sha256 in X-Checksum-Sha256. format=onnx is exported by an infer worker the first
    time and stored beside the checkpoint; a stored export that no longer matches its sha256 is made again,
    never served."""
    rec = _call(registry.get_version, name, version)
    try:
        if format == "pt":
            entry, path = {"sha256": rec["sha256"]}, registry.fetch_artifact(rec)  # never serve a torn file
        else:
            stored = registry.fetch_export(rec, format)  # None when missing, or torn: then made again
            if stored is None:
                entry = _export(celery, settings.export_timeout_s, name, version, format)
                stored = entry, registry.store.fetch(entry["key"], entry["sha256"])
            entry, path = stored
    except ArtifactError as exc:
        raise ApiError(500, "artifact_unavailable", f"{name} v{version}: {exc}") from None
    return FileResponse(path, media_type="application/octet-stream", filename=f"{name}-v{version}.{format}",
                        headers={"X-Checksum-Sha256": entry["sha256"]})


def _export(celery: Celery, timeout: float, name: str, version: int, fmt: str) -> dict[str, Any]:
    """Ask an infer worker to export the version; its stored file's {key, sha256}, or the worker's error."""
    out = call_infer(celery, EXPORT_TASK, [name, version, fmt], timeout, "export_timeout",
                     f"exported {name} v{version}", "UPLVP_EXPORT_TIMEOUT_S")
    if "error" in out:
        code = out["error"]["code"]
        status = {"export_unsupported": 400, "unknown_version": 404}.get(code, 500)
        raise ApiError(status, code, out["error"]["message"])
    return out["export"]
