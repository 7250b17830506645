"""The SDK's exception tree, and the mapping from the server's problem documents to it.

Every exception the SDK raises on purpose derives from :class:`PKIError`::

    PKIError
    ├── ConfigurationError          bad arguments, unusable files, unknown key kind
    ├── TransportError              no usable answer: refused, timeout, TLS failure (retried)
    ├── InvalidResponseError        an answer that is not what the API promises (not retried)
    ├── APIError                    the server answered with a problem document
    │   │                           .status .code .detail .title .problem_type .method .url
    │   ├── AuthenticationError     401  not_authenticated, invalid_token
    │   ├── PermissionDeniedError   403  not_permitted
    │   │   └── PolicyRefusedError  403  policy_refused (SAN outside the allow-list, ...)
    │   ├── NotFoundError           404  unknown_service, unknown_certificate, not_found
    │   ├── RequestRejectedError    400/405/409/413/415/422  the request itself was refused
    │   │   └── ConflictError       409  conflict, already_revoked
    │   └── ServerError             5xx  the server failed or is unavailable (retryable)
    ├── RenewalError                renewal gave up; .last_error is the final cause
    └── TrustError                  root fingerprint pin mismatch, chain check failure

The server's errors are RFC 9457 problem documents (``application/problem+json``) with
one extension member, ``code``. :func:`error_from_problem` maps ``code`` first and the
HTTP status second, so a code the client does not know still gets the right family.
"""

from __future__ import annotations

import http
import json
from typing import Any

__all__ = [
    "CODE_TO_ERROR",
    "APIError",
    "AuthenticationError",
    "ConfigurationError",
    "ConflictError",
    "InvalidResponseError",
    "NotFoundError",
    "PKIError",
    "PermissionDeniedError",
    "PolicyRefusedError",
    "RenewalError",
    "RequestRejectedError",
    "ServerError",
    "TransportError",
    "TrustError",
    "error_class_for_status",
    "error_from_problem",
]

#: How much of a non-JSON error body is kept as ``detail``.
DETAIL_LIMIT = 200


class PKIError(Exception):
    """Base class of every error the SDK raises on purpose."""


class ConfigurationError(PKIError):
    """The SDK was set up wrong, or its environment does not allow what it needs.

    Bad arguments (an unknown key kind, a malformed root fingerprint), certificate or key
    files that are missing, unreadable, unwritable or do not belong together.
    """


class TransportError(PKIError):
    """No usable answer from the server: connection refused, timeout, TLS failure.

    Transient by nature; :func:`vcc_pki_client.retry.retry_transient` retries it.
    """


class InvalidResponseError(PKIError):
    """The server answered, but not with what the API promises (not JSON, missing members, a
    certificate for someone else). Not transient: asking again gets the same answer."""


class APIError(PKIError):
    """The server refused the request with an HTTP error and (usually) a problem document.

    Attributes:
        status: the HTTP status of the response (authoritative over the body's ``status``).
        code: the problem document's machine-readable ``code`` member, or None.
        detail: human-readable explanation (the body's ``detail``, or truncated body text).
        title: short summary (the body's ``title``, or the HTTP reason phrase).
        problem_type: the body's ``type`` URI (``about:blank`` when absent).
        method, url: the call that failed (``GET``, ``https://pki:8443/api/v1/...``), or None.
    """

    def __init__(
        self,
        status: int,
        detail: str = "",
        *,
        code: str | None = None,
        title: str | None = None,
        problem_type: str = "about:blank",
        method: str | None = None,
        url: str | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title if title is not None else _reason(status)
        self.problem_type = problem_type
        self.method = method
        self.url = url
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"{self.status}, {self.code}" if self.code else str(self.status)
        text = f"{self.title} ({where})"
        if self.detail:
            text = f"{text}: {self.detail}"
        return f"{self.method} {self.url}: {text}" if self.method and self.url else text

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments defeat Exception's default pickling (cls(*args)).
        return (_rebuild_api_error, (type(self), self.__dict__.copy()))


def _rebuild_api_error(cls: type[APIError], state: dict[str, Any]) -> APIError:
    return cls(
        state["status"],
        state["detail"],
        code=state["code"],
        title=state["title"],
        problem_type=state["problem_type"],
        method=state.get("method"),
        url=state.get("url"),
    )


class AuthenticationError(APIError):
    """401: no credentials, or invalid ones (unknown/expired/spent token, bad client cert)."""


class PermissionDeniedError(APIError):
    """403: the caller is known but may not do this."""


class PolicyRefusedError(PermissionDeniedError):
    """403 ``policy_refused``: the CA's policy refused the request (e.g. a SAN outside the allow-list)."""


class NotFoundError(APIError):
    """404: unknown service, certificate or path."""


class RequestRejectedError(APIError):
    """400/405/409/413/415/422: the request itself was refused (malformed, invalid CSR, ...)."""


class ConflictError(RequestRejectedError):
    """409: the request conflicts with the current state (existing id, already revoked)."""


class ServerError(APIError):
    """5xx: the server failed or is unavailable. Transient: worth retrying later."""


class RenewalError(PKIError):
    """Renewal gave up; ``last_error`` holds the final cause (also chained as ``__cause__``)."""

    def __init__(self, message: str, *, last_error: BaseException | None = None) -> None:
        super().__init__(message)
        self.last_error = last_error

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_renewal_error, (str(self), self.last_error))


def _rebuild_renewal_error(message: str, last_error: BaseException | None) -> RenewalError:
    return RenewalError(message, last_error=last_error)


class TrustError(PKIError):
    """The server or a peer could not be trusted: root fingerprint pin mismatch, a chain
    that does not verify against the trusted root."""


#: Every ``code`` the server emits, mapped to the class the client raises for it.
CODE_TO_ERROR: dict[str, type[APIError]] = {
    "malformed_request": RequestRejectedError,  # 400
    "invalid_csr": RequestRejectedError,  # 400
    "not_authenticated": AuthenticationError,  # 401
    "invalid_token": AuthenticationError,  # 401
    "not_permitted": PermissionDeniedError,  # 403
    "policy_refused": PolicyRefusedError,  # 403
    "not_found": NotFoundError,  # 404
    "unknown_service": NotFoundError,  # 404
    "unknown_certificate": NotFoundError,  # 404
    "method_not_allowed": RequestRejectedError,  # 405
    "conflict": ConflictError,  # 409
    "already_revoked": ConflictError,  # 409
    "body_too_large": RequestRejectedError,  # 413
    "unsupported_media_type": RequestRejectedError,  # 415
    "invalid_field": RequestRejectedError,  # 422
    "internal_error": ServerError,  # 500
    "unavailable": ServerError,  # 503
}

_STATUS_TO_ERROR: dict[int, type[APIError]] = {
    400: RequestRejectedError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    405: RequestRejectedError,
    409: ConflictError,
    413: RequestRejectedError,
    415: RequestRejectedError,
    422: RequestRejectedError,
}


def error_class_for_status(status: int) -> type[APIError]:
    """The class for an HTTP error status when the body names no known ``code``."""
    if status >= 500:
        return ServerError
    return _STATUS_TO_ERROR.get(status, APIError)


def error_from_problem(status: int, body: bytes | None, content_type: str | None, *,
                       method: str | None = None, url: str | None = None) -> APIError:
    """Build the exception for an HTTP error response.

    Takes the response's status, body and ``Content-Type``, and the call (``method``,
    ``url``) that got it, which the message names. A JSON object body is read as
    an RFC 9457 problem document (``type``, ``title``, ``status``, ``detail``, ``code``;
    ill-typed members are ignored); the class comes from ``code`` if the client knows it,
    else from ``status``. Any other body keeps the class by status, with its text
    (whitespace collapsed, truncated to 200 characters) as ``detail``. Never raises.

    >>> err = error_from_problem(403, b'{"code": "policy_refused", "detail": "no"}',
    ...                          "application/problem+json")
    >>> type(err).__name__, err.status, err.code
    ('PolicyRefusedError', 403, 'policy_refused')
    """
    problem = _parse_problem(body, content_type)
    if problem is None:
        text = " ".join((body or b"").decode("utf-8", "replace").split())
        if len(text) > DETAIL_LIMIT:
            text = text[: DETAIL_LIMIT - 3] + "..."
        if not text and status >= 500:
            text = "server unavailable"
        return error_class_for_status(status)(status, text, method=method, url=url)

    code = _member(problem, "code")
    cls = CODE_TO_ERROR.get(code) if code else None
    if cls is None:
        cls = error_class_for_status(status)
    return cls(
        status,
        _member(problem, "detail") or "",
        code=code,
        title=_member(problem, "title"),
        problem_type=_member(problem, "type") or "about:blank",
        method=method,
        url=url,
    )


def _parse_problem(body: bytes | None, content_type: str | None) -> dict[str, Any] | None:
    if not body:
        return None
    media = (content_type or "").split(";", 1)[0].strip().lower()
    # application/problem+json, application/json, or no type at all; an HTML error page
    # from a proxy stays text.
    if media and not media.endswith("json"):
        return None
    try:
        data = json.loads(body)
    except ValueError:  # includes UnicodeDecodeError
        return None
    return data if isinstance(data, dict) else None


def _member(problem: dict[str, Any], name: str) -> str | None:
    value = problem.get(name)
    return value if isinstance(value, str) and value else None


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "HTTP error"
