"""RFC 9457 problem documents: the one table from core error codes to HTTP statuses."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

from ..errors import CAError

STATUS_BY_CODE: dict[str, int] = {
    "malformed_request": 400,
    "invalid_csr": 400,
    "not_authenticated": 401,
    "invalid_token": 401,
    "policy_refused": 403,
    "not_permitted": 403,
    "not_found": 404,
    "unknown_service": 404,
    "unknown_certificate": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "already_revoked": 409,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "invalid_field": 422,
    "internal_error": 500,
    "unavailable": 503,
}

TITLES: dict[int, str] = {
    400: "Bad request", 401: "Not authenticated", 403: "Forbidden", 404: "Not found",
    405: "Method not allowed", 409: "Conflict", 413: "Content too large",
    415: "Unsupported media type", 422: "Invalid field", 500: "Internal error", 503: "Unavailable",
}


class Problem(CAError):
    """An HTTP-level refusal (body too large, wrong content type, bad JSON) raised by the api layer."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


UNAVAILABLE_DETAIL = "the CA cannot answer this now (its store is unavailable); the server log has the details"


def problem_response(code: str, detail: str, *, status: int | None = None,
                     headers: dict[str, str] | None = None) -> Response:
    status = status or STATUS_BY_CODE.get(code, 500)
    body: dict[str, Any] = {
        "type": f"https://vcc-pki.invalid/problems/{code.replace('_', '-')}",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "code": code,
    }
    return Response(json.dumps(body), status_code=status, media_type="application/problem+json",
                    headers=headers)


def from_error(err: CAError) -> Response:
    headers = {"WWW-Authenticate": 'Bearer realm="vcc-pki"'} if STATUS_BY_CODE.get(err.code) == 401 else None
    return problem_response(err.code, err.message, headers=headers)
