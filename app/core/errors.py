"""The one error shape of the API: ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    """An error the client can act on: HTTP status, stable code, a message saying what to fix."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details
        self.headers = headers


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    """The JSON body of every 4xx/5xx answer."""
    return {"error": {"code": code, "message": message, "details": details}}


def install_error_handlers(app: FastAPI) -> None:
    """Turn ApiError, request validation errors and Starlette's HTTP errors into the error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.details), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [{"field": ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path", "form")),
                     "problem": e.get("msg", "")} for e in exc.errors()]
        summary = "; ".join(f"{p['field']}: {p['problem']}" for p in problems[:5])
        return JSONResponse(error_body("invalid_request", f"invalid request: {summary}", problems), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "upload_too_large"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 413:
            message = f"request body too large ({message}); the cap is UPLVP_MAX_UPLOAD_MB"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette names only the first matching route's methods; list them all
            methods = {m for r in request.app.router.routes if isinstance(r, APIRoute)
                       and r.path_regex.match(request.url.path) for m in r.methods}
            headers["Allow"] = ", ".join(sorted(methods))
            message = f"{request.method} is not allowed here; use {headers['Allow']}"
        return JSONResponse(error_body(code, message), status_code=exc.status_code, headers=headers)
