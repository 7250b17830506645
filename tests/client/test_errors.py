"""The exception tree and the problem-document mapping (vcc_pki_client.errors)."""

from __future__ import annotations

import json
import pickle

import pytest

from vcc_pki_client.errors import (
    CODE_TO_ERROR,
    APIError,
    AuthenticationError,
    ConfigurationError,
    ConflictError,
    InvalidResponseError,
    NotFoundError,
    PermissionDeniedError,
    PKIError,
    PolicyRefusedError,
    RenewalError,
    RequestRejectedError,
    ServerError,
    TransportError,
    TrustError,
    error_class_for_status,
    error_from_problem,
)
from vcc_pki_client.retry import is_transient

# Every code the server emits, with its status (SPEC §5, vcc_pki_server's api table).
SERVER_CODES = {
    "invalid_csr": 400,
    "malformed_request": 400,
    "invalid_field": 422,
    "policy_refused": 403,
    "not_permitted": 403,
    "not_authenticated": 401,
    "invalid_token": 401,
    "unknown_service": 404,
    "not_found": 404,
    "unknown_certificate": 404,
    "conflict": 409,
    "already_revoked": 409,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "method_not_allowed": 405,
    "internal_error": 500,
    "unavailable": 503,
}

PROBLEM = "application/problem+json"


def problem(status: int, **members: object) -> bytes:
    return json.dumps({"type": "about:blank", "status": status, **members}).encode()


def test_every_server_code_has_a_client_class() -> None:
    assert set(SERVER_CODES) == set(CODE_TO_ERROR)


@pytest.mark.parametrize(("code", "status"), sorted(SERVER_CODES.items()))
def test_code_class_agrees_with_its_status(code: str, status: int) -> None:
    cls = CODE_TO_ERROR[code]
    assert issubclass(cls, error_class_for_status(status)) or issubclass(error_class_for_status(status), cls)
    err = error_from_problem(status, problem(status, code=code, title="T", detail="d"), PROBLEM)
    assert type(err) is cls
    assert (err.status, err.code, err.detail, err.title) == (status, code, "d", "T")


def test_tree_shape() -> None:
    for cls in (ConfigurationError, TransportError, InvalidResponseError, APIError, RenewalError, TrustError):
        assert issubclass(cls, PKIError)
    # Not transient: an answer that breaks the API's promise is not worth asking for again.
    assert not issubclass(InvalidResponseError, TransportError)
    assert not is_transient(InvalidResponseError("not JSON"))
    assert issubclass(PolicyRefusedError, PermissionDeniedError)
    assert issubclass(ConflictError, RequestRejectedError)
    for cls in (AuthenticationError, PermissionDeniedError, NotFoundError, RequestRejectedError, ServerError):
        assert issubclass(cls, APIError)


def test_policy_refusal_reads_as_the_server_wrote_it() -> None:
    detail = "SAN 'x.internal' is not in the allow-list of service 'billing'"
    body = problem(403, title="Policy refused", code="policy_refused", detail=detail)
    err = error_from_problem(403, body, "application/problem+json; charset=utf-8")
    assert isinstance(err, PolicyRefusedError)
    assert err.problem_type == "about:blank"
    assert str(err) == f"Policy refused (403, policy_refused): {detail}"


def test_code_wins_over_status() -> None:
    err = error_from_problem(400, problem(400, code="policy_refused"), PROBLEM)
    assert isinstance(err, PolicyRefusedError)
    assert err.status == 400  # the HTTP status is what is reported


def test_unknown_code_falls_back_to_status() -> None:
    err = error_from_problem(404, problem(404, code="gone_fishing", detail="x"), PROBLEM)
    assert type(err) is NotFoundError
    assert err.code == "gone_fishing"


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, RequestRejectedError),
        (401, AuthenticationError),
        (403, PermissionDeniedError),
        (404, NotFoundError),
        (405, RequestRejectedError),
        (409, ConflictError),
        (413, RequestRejectedError),
        (415, RequestRejectedError),
        (422, RequestRejectedError),
        (429, APIError),
        (500, ServerError),
        (502, ServerError),
        (503, ServerError),
    ],
)
def test_status_without_problem_document(status: int, cls: type[APIError]) -> None:
    err = error_from_problem(status, b"", None)
    assert type(err) is cls
    assert err.status == status
    assert err.code is None


def test_html_error_page_becomes_truncated_detail() -> None:
    body = b"<html><body>" + b"Bad gateway " * 100 + b"</body></html>"
    err = error_from_problem(502, body, "text/html")
    assert type(err) is ServerError
    assert err.detail.startswith("<html><body>Bad gateway")
    assert len(err.detail) == 200 and err.detail.endswith("...")
    assert err.title == "Bad Gateway"


def test_empty_5xx_says_server_unavailable() -> None:
    err = error_from_problem(503, None, None)
    assert err.detail == "server unavailable"
    assert "Service Unavailable (503)" in str(err)


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (b"{not json", PROBLEM),
        (b"[1, 2]", "application/json"),
        (b"\xff\xfe garbage", PROBLEM),
        (b'"just a string"', None),
    ],
)
def test_bodies_that_are_not_problem_documents(body: bytes, ctype: str | None) -> None:
    err = error_from_problem(401, body, ctype)
    assert type(err) is AuthenticationError
    assert err.code is None
    assert err.detail  # the text, so the user sees something


def test_ill_typed_members_are_ignored() -> None:
    body = json.dumps({"code": 7, "detail": ["x"], "title": None, "status": "403"}).encode()
    err = error_from_problem(403, body, PROBLEM)
    assert type(err) is PermissionDeniedError
    assert (err.code, err.detail, err.title) == (None, "", "Forbidden")


def test_json_without_content_type_is_still_read() -> None:
    err = error_from_problem(409, problem(409, code="already_revoked", detail="serial ab"), None)
    assert type(err) is ConflictError
    assert err.detail == "serial ab"


def test_api_errors_pickle() -> None:
    err = error_from_problem(403, problem(403, code="policy_refused", title="Policy refused", detail="d"), PROBLEM)
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is PolicyRefusedError
    assert (copy.status, copy.code, copy.detail, copy.title, str(copy)) == (
        err.status,
        err.code,
        err.detail,
        err.title,
        str(err),
    )


def test_renewal_error_keeps_last_error() -> None:
    cause = ServerError(503, "down")
    err = RenewalError("renewal of billing gave up after 5 attempts", last_error=cause)
    assert err.last_error is cause
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) and isinstance(copy.last_error, ServerError)


def test_an_api_error_names_the_call_that_failed() -> None:
    err = error_from_problem(404, b'{"code": "unknown_service", "detail": "no such service"}',
                             "application/problem+json", method="GET",
                             url="https://pki.test:8443/api/v1/services/x")
    assert (err.method, err.url) == ("GET", "https://pki.test:8443/api/v1/services/x")
    assert str(err).startswith("GET https://pki.test:8443/api/v1/services/x: ")
    assert "no such service" in str(err)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.method, copy.url, str(copy)) == (err.method, err.url, str(err))
