"""Every error the server returns, in OpenAI's shape: `{"error": {message, type, param, code}}`. This is the only
module that builds error bodies; `to_api_error` is the one mapping from an exception to a status and a type."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from engine import EngineDeadError, EngineShutdownError, QueueFullError, RequestFailedError

log = logging.getLogger("autojudge.server")

RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def to_api_error(exc: BaseException) -> APIError:
    """Exceptions from validation and the engine to HTTP; anything unexpected is a 500 without details."""
    match exc:
        case APIError():
            return exc
        case ValidationError() | RequestValidationError():
            return validation_error(exc)
        case QueueFullError():
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
            return APIError(429, str(exc), "rate_limit_error", None, "queue_full", headers)
        case EngineShutdownError() | EngineDeadError():
            return APIError(503, str(exc), "overloaded_error", None, "unavailable")
        case RequestFailedError():
            return APIError(500, str(exc), "internal_error", None, "request_failed")
        case TimeoutError():
            return APIError(504, "the request did not finish within the server's timeout", "timeout_error")
        case ValueError():
            return bad_request(str(exc))
        case HTTPException() if exc.status_code == 404:
            return APIError(404, "not found", "not_found_error", None, "not_found")
        case HTTPException():
            return APIError(exc.status_code, str(exc.detail), "invalid_request_error")
    log.exception("unexpected error", exc_info=exc)
    return APIError(500, "internal server error", "internal_error")


def validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """The first pydantic error as a 400 naming the field (FastAPI's 422 is remapped here)."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    # pydantic adds union members ("str", "list[int]") to the location; the field path is the rest.
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    param = loc[0] if loc else None
    kind = str(first.get("type", ""))
    code = "invalid_json" if kind.startswith("json") else "invalid_type" if kind.endswith("_type") else "invalid_value"
    message = str(first.get("msg", "invalid value"))
    return bad_request(f"{'.'.join(loc)}: {message}" if loc else message, param, code)


def _is_type_tag(part: object) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def install_handlers(app: FastAPI) -> None:
    async def handle(_: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc))

    for kind in (APIError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(kind, handle)
