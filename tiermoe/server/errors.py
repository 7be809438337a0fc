"""Errors as OpenAI error bodies: {"error": {"message", "type", "param", "code"}}, which the `openai` client turns
into its exception classes (BadRequestError, AuthenticationError, ...)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tiermoe.errors import RequestError

log = logging.getLogger("tiermoe.server")

TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
         413: "RequestTooLargeError", 429: "RateLimitError", 431: "RequestHeaderFieldsTooLarge",
         500: "InternalServerError", 503: "ServiceUnavailable"}


class APIError(Exception):
    """An error to answer with `status` and an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "Error"), "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def install_handlers(app: FastAPI) -> None:
    """Every error the app raises leaves as an OpenAI error body; unexpected ones as 500, logged."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.headers)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, e: RequestError) -> JSONResponse:
        return error_response(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
        return error_response(400, f"{where or 'body'}: {message}" + _more(e.errors()), where or None)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return error_response(500, f"internal error: {type(e).__name__}: {e}")


def _more(errors: list) -> str:
    return f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
