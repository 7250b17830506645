"""Bad input against the real server: every refusal is a problem document with the documented
status, never a 500, and after the whole barrage the server still serves and logged no traceback."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, rsa
from cryptography.x509.oid import NameOID

from support import RunningServer, make_csr

if TYPE_CHECKING:
    from tests.e2e.conftest import Enrol, Problem, Register

API = "/api/v1"
REQUEST = f"{API}/certificates/request"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def sid(register: Register, service_id: str) -> str:
    """A registered service id (no certificate yet)."""
    register(service_id)
    return service_id


# --- bodies -------------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [b'{"service_id": "x", "csr": ', b"{'service_id': 'x'}", b"\xff\xfe{}",
                                 b"{\"a\": 1} trailing", b"NaN-ish", b"9" * 5000])
def test_malformed_json_is_400(raw: bytes, admin: httpx.Client, problem: Problem) -> None:
    problem(admin.post(REQUEST, content=raw, headers=JSON), 400, "malformed_request")


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"null", b"42", b"true"])
def test_json_that_is_not_an_object_is_400(raw: bytes, admin: httpx.Client, problem: Problem) -> None:
    problem(admin.post(REQUEST, content=raw, headers=JSON), 400, "malformed_request")
    problem(admin.post(f"{API}/services/register", content=raw, headers=JSON), 400, "malformed_request")


def test_deeply_nested_json_is_400_not_a_crash(admin: httpx.Client, problem: Problem) -> None:
    raw = b"[" * 30000 + b"]" * 30000  # under the 64 KiB cap, deeper than the parser's recursion limit
    problem(admin.post(REQUEST, content=raw, headers=JSON), 400, "malformed_request")


def test_empty_body_is_400(admin: httpx.Client, problem: Problem) -> None:
    problem(admin.post(REQUEST, content=b"", headers=JSON), 400, "malformed_request")


def test_missing_fields_are_422(admin: httpx.Client, sid: str, problem: Problem) -> None:
    csr = make_csr(sid)[0].decode()
    for body, name in (({}, "service_id"), ({"service_id": sid}, "csr"), ({"csr": csr}, "service_id"),
                       ({"service_id": None, "csr": csr}, "service_id")):
        assert name in problem(admin.post(REQUEST, json=body), 422, "invalid_field")["detail"]
    assert "service_id" in problem(admin.post(f"{API}/services/register", json={"owner": "x"}),
                                   422, "invalid_field")["detail"]


@pytest.mark.parametrize("change", [
    {"service_id": 5}, {"service_id": ["a"]}, {"csr": 123}, {"csr": ["-----BEGIN"]},
    {"validity_days": "ten"}, {"validity_days": 1.5}, {"validity_days": True}, {"validity_days": 0},
    {"validity_days": -3}, {"validity_days": {"days": 1}},
])
def test_wrong_field_types_in_a_certificate_request_are_422(change: dict[str, Any], admin: httpx.Client,
                                                            sid: str, problem: Problem) -> None:
    body = {"service_id": sid, "csr": make_csr(sid)[0].decode(), **change}
    problem(admin.post(REQUEST, json=body), 422, "invalid_field")


@pytest.mark.parametrize("change", [
    {"service_name": 7}, {"endpoints": "https://x"}, {"endpoints": [1]}, {"metadata": [1]},
    {"version": 2}, {"owner": {"a": 1}}, {"health_check_url": ["u"]},
    {"san_dns": 5}, {"san_dns": "abc"}, {"san_dns": [5]}, {"san_dns": ["bad_name"]}, {"san_dns": ["ok.example\n"]},
    {"san_ip": 5}, {"san_ip": [5]}, {"san_ip": "10.0.0.1"}, {"san_ip": ["10.0.0.300"]},
    {"unknown_field": 1},
])
def test_wrong_field_types_in_a_registration_are_422(change: dict[str, Any], admin: httpx.Client,
                                                     service_id: str, problem: Problem) -> None:
    problem(admin.post(f"{API}/services/register", json={"service_id": service_id, **change}),
            422, "invalid_field")
    problem(admin.get(f"{API}/services/{service_id}"), 404, "unknown_service")  # nothing half-registered


@pytest.mark.parametrize("change", [{"endpoints": "x"}, {"san_dns": "abc"}, {"san_ip": [5]},
                                    {"service_id": "other"}, {"metadata": "m"}])
def test_wrong_field_types_in_a_registry_update_are_422(change: dict[str, Any], admin: httpx.Client,
                                                        sid: str, problem: Problem) -> None:
    problem(admin.patch(f"{API}/services/{sid}", json=change), 422, "invalid_field")


# --- CSRs ---------------------------------------------------------------------------------
def _tampered(csr_pem: bytes) -> str:
    der = bytearray(x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte belongs to the signature
    tampered = x509.load_der_x509_csr(bytes(der))
    assert not tampered.is_signature_valid
    return tampered.public_bytes(serialization.Encoding.PEM).decode()


def test_malformed_tampered_and_weak_csrs_are_400(admin: httpx.Client, sid: str, problem: Problem) -> None:
    good, _ = make_csr(sid)
    weak, _ = make_csr(sid, key=rsa.generate_private_key(65537, 1024))
    bad = {
        "garbage": "not a csr",
        "empty": "",
        "bad pem": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        "truncated": good.decode()[:200],
        "certificate": admin.get(f"{API}/ca/root").text,
        "tampered": _tampered(good),
    }
    for name, csr in bad.items():
        body = problem(admin.post(REQUEST, json={"service_id": sid, "csr": csr}), 400, "invalid_csr")
        assert "Traceback" not in body["detail"], name
    detail = problem(admin.post(REQUEST, json={"service_id": sid, "csr": weak.decode()}), 400, "invalid_csr")["detail"]
    assert "1024" in detail
    assert "signature" in problem(admin.post(REQUEST, json={"service_id": sid, "csr": bad["tampered"]}),
                                  400)["detail"]


def _csr_with(key: Any, service_id: str, sans: list[x509.GeneralName] | None = None) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service_id)]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    algorithm = None if isinstance(key, ed448.Ed448PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(("kind", "named"), [("ed448", "Ed448"), ("secp256k1", "secp256k1"),
                                             ("rsa-e3", "exponent 3"), ("email-san", "RFC822Name")])
def test_csrs_with_refused_keys_or_name_types_are_400(kind: str, named: str, admin: httpx.Client, sid: str,
                                                       problem: Problem) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    csr = {
        "ed448": lambda: _csr_with(ed448.Ed448PrivateKey.generate(), sid),
        "secp256k1": lambda: _csr_with(ec.generate_private_key(ec.SECP256K1()), sid),
        "rsa-e3": lambda: _csr_with(rsa.generate_private_key(3, 2048), sid),
        "email-san": lambda: _csr_with(p256, sid, [x509.RFC822Name(f"ops@{sid}.internal")]),
    }[kind]()
    detail = problem(admin.post(REQUEST, json={"service_id": sid, "csr": csr}), 400, "invalid_csr")["detail"]
    assert named in detail


@pytest.mark.parametrize("uri", ["spiffe://vcc/{sid}", "spiffe://vcc-pki.internal/svc/other",
                                 "https://{sid}.internal/", "spiffe://evil.example/svc/{sid}"])
def test_a_csr_asking_for_another_uri_san_is_403(uri: str, admin: httpx.Client, sid: str, problem: Problem) -> None:
    asked = uri.format(sid=sid)
    csr = _csr_with(ec.generate_private_key(ec.SECP256R1()), sid, [x509.UniformResourceIdentifier(asked)])
    detail = problem(admin.post(REQUEST, json={"service_id": sid, "csr": csr}), 403, "policy_refused")["detail"]
    assert asked in detail and f"spiffe://vcc-pki.internal/svc/{sid}" in detail


def test_a_csr_asking_for_its_own_identity_gets_it(admin: httpx.Client, sid: str) -> None:
    own = f"spiffe://vcc-pki.internal/svc/{sid}"
    csr = _csr_with(ec.generate_private_key(ec.SECP256R1()), sid, [x509.UniformResourceIdentifier(own)])
    r = admin.post(REQUEST, json={"service_id": sid, "csr": csr})
    assert r.status_code == 201, r.text
    cert = x509.load_pem_x509_certificate(r.json()["certificate"].encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [own]


def test_rekey_with_a_bad_csr_is_400(enrolled: Enrol, problem: Problem) -> None:
    svc = enrolled()
    good, _ = make_csr(svc.service_id)
    for csr in ("not a csr", _tampered(good)):
        problem(svc.client.post(f"{API}/certificates/{svc.service_id}/renew", json={"csr": csr}), 400, "invalid_csr")


# --- size and content type ----------------------------------------------------------------
def test_oversized_body_with_content_length_is_413(admin: httpx.Client, sid: str, problem: Problem) -> None:
    body = {"service_id": sid, "csr": "A" * (65 * 1024)}
    r = admin.post(REQUEST, json=body)
    assert "65536" in problem(r, 413, "body_too_large")["detail"]


def test_oversized_chunked_body_without_content_length_is_413(admin: httpx.Client, problem: Problem) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"service_id": "x", "csr": "'
        for _ in range(10):
            yield b"A" * 8192
        yield b'"}'

    request = admin.build_request("POST", REQUEST, content=chunks(), headers=JSON)
    assert "content-length" not in request.headers
    assert request.headers["transfer-encoding"] == "chunked"
    problem(admin.send(request), 413, "body_too_large")


def test_body_just_under_the_cap_is_read(admin: httpx.Client, sid: str, problem: Problem) -> None:
    filler = 64 * 1024 - 200
    r = admin.post(REQUEST, json={"service_id": sid, "csr": "A" * filler})
    problem(r, 400, "invalid_csr")  # read and parsed: the CSR is what is wrong


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "application/xml", None])
def test_wrong_content_type_is_415(content_type: str | None, admin: httpx.Client, sid: str,
                                   problem: Problem) -> None:
    raw = httpx.Request("POST", "/", json={"service_id": sid, "csr": make_csr(sid)[0].decode()}).content
    headers = {"Content-Type": content_type} if content_type else {}
    request = admin.build_request("POST", REQUEST, content=raw, headers=headers)
    if content_type is None:
        request.headers.pop("content-type", None)
    problem(admin.send(request), 415, "unsupported_media_type")


def test_json_content_type_with_charset_is_accepted(admin: httpx.Client, sid: str) -> None:
    raw = httpx.Request("POST", "/", json={"service_id": sid, "csr": make_csr(sid)[0].decode()}).content
    r = admin.post(REQUEST, content=raw, headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 201, r.text


# --- service ids, routes, methods ---------------------------------------------------------
BAD_IDS = ["..%2F..%2Fetc", "..%2f..%2fetc%2fpasswd", "UPPER", "a" * 64, "-lead", "trail-", "under_score",
           "%00", "a.b", "svc%0A"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_invalid_service_ids_in_the_path_are_refused(bad: str, admin: httpx.Client, problem: Problem) -> None:
    for method, template in (("GET", "/certificates/{}"), ("GET", "/certificates/{}/download"),
                             ("POST", "/certificates/{}/renew"), ("DELETE", "/certificates/{}/revoke"),
                             ("GET", "/services/{}"), ("PATCH", "/services/{}"),
                             ("POST", "/services/{}/enrolment-token")):
        kwargs: dict[str, Any] = {"json": {"version": "1"}} if method == "PATCH" else {}
        r = admin.request(method, API + template.format(bad), **kwargs)
        assert r.status_code in (404, 422), (method, template, bad, r.status_code, r.text)
        body = problem(r, r.status_code)
        if r.status_code == 422:
            assert "invalid service id" in body["detail"]


@pytest.mark.parametrize("bad", ["../../etc", "UPPER", "a" * 64, "", " svc", "svc\n", "ünï"])
def test_invalid_service_ids_in_the_body_are_422(bad: str, admin: httpx.Client, problem: Problem) -> None:
    problem(admin.post(f"{API}/services/register", json={"service_id": bad}), 422, "invalid_field")
    problem(admin.post(REQUEST, json={"service_id": bad, "csr": make_csr()[0].decode()}), 422, "invalid_field")


def test_unknown_service_is_404(admin: httpx.Client, problem: Problem, service_id: str) -> None:
    for r in (admin.get(f"{API}/certificates/{service_id}"), admin.get(f"{API}/services/{service_id}"),
              admin.post(f"{API}/certificates/{service_id}/renew"),
              admin.post(REQUEST, json={"service_id": service_id, "csr": make_csr()[0].decode()})):
        problem(r, 404, "unknown_service")


@pytest.mark.parametrize("path", ["/api/v1/nope", "/api/v2/certificates/", "/api/v1/certificates/a/b/c",
                                  "/", "/api/v1", "/api/v1/ca/", "/health/x", "/.env"])
def test_unknown_routes_are_404(path: str, admin: httpx.Client, problem: Problem) -> None:
    problem(admin.get(path), 404, "not_found")


@pytest.mark.parametrize(("method", "path"), [
    ("PUT", "/api/v1/crl"), ("DELETE", "/health"), ("PUT", "/api/v1/certificates/x/renew"),
    ("POST", "/api/v1/ca/root"), ("PUT", "/api/v1/services/x"), ("POST", "/openapi.json"),
    ("GET", "/api/v1/certificates/x/revoke"), ("PUT", "/api/v1/services/register"),
])
def test_unsupported_methods_are_405(method: str, path: str, admin: httpx.Client, problem: Problem) -> None:
    r = admin.request(method, path)
    problem(r, 405, "method_not_allowed")
    assert r.headers["allow"]


# --- query parameters ---------------------------------------------------------------------
@pytest.mark.parametrize("params", [
    {"limit": "0"}, {"limit": "5000"}, {"limit": "-1"}, {"limit": "ten"}, {"cursor": "abc"},
    {"cursor": "-5"}, {"cursor": str(2**63)}, {"cursor": "9" * 40}, {"status": "bogus"},
    {"status": "VALID"}, {"expiring_within_days": "-1"}, {"expiring_within_days": "soon"},
    {"expiring_within_days": "3000000"}, {"expiring_within_days": "9" * 40}, {"service_id": "UPPER"},
])
def test_bad_certificate_list_parameters_are_422(params: dict[str, str], admin: httpx.Client,
                                                 problem: Problem) -> None:
    problem(admin.get(f"{API}/certificates/", params=params), 422, "invalid_field")


@pytest.mark.parametrize("params", [{"limit": "0"}, {"limit": "1001"}, {"healthy": "maybe"}])
def test_bad_service_list_parameters_are_422(params: dict[str, str], admin: httpx.Client,
                                             problem: Problem) -> None:
    problem(admin.get(f"{API}/services/", params=params), 422, "invalid_field")


def test_bad_format_and_chain_parameters_are_422(admin: httpx.Client, enrolled: Enrol,
                                                 problem: Problem) -> None:
    svc = enrolled()
    problem(admin.get(f"{API}/crl", params={"format": "txt"}), 422, "invalid_field")
    problem(admin.get(f"{API}/ca/intermediate", params={"format": "p12"}), 422, "invalid_field")
    problem(admin.get(f"{API}/certificates/{svc.service_id}/download", params={"chain": "perhaps"}),
            422, "invalid_field")


def test_revocation_refuses_unknown_reason_bad_serial_and_double_revocation(
        enrolled: Enrol, admin: httpx.Client, problem: Problem) -> None:
    svc = enrolled()
    revoke = f"{API}/certificates/{svc.service_id}/revoke"
    assert "reason" in problem(admin.delete(revoke, params={"reason": "becauseISaidSo"}),
                               422, "invalid_field")["detail"]
    problem(admin.delete(revoke, params={"serial": "xyz"}), 422, "invalid_field")
    problem(admin.delete(revoke, params={"serial": "abcdef0123"}), 404, "unknown_certificate")
    r = admin.delete(revoke, params={"serial": svc.serial, "reason": "cessationOfOperation"})
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    problem(admin.delete(revoke, params={"serial": svc.serial}), 409, "already_revoked")
    problem(admin.delete(revoke, params={"serial": svc.serial.upper()}), 409, "already_revoked")
    # No valid certificate left to revoke by default, nor to renew.
    problem(admin.delete(revoke), 404, "unknown_certificate")
    problem(admin.post(f"{API}/certificates/{svc.service_id}/renew"), 404, "unknown_certificate")


def test_renew_refuses_malformed_bodies(enrolled: Enrol, problem: Problem) -> None:
    svc = enrolled()
    renew = f"{API}/certificates/{svc.service_id}/renew"
    problem(svc.client.post(renew, content=b"[]", headers=JSON), 400, "malformed_request")
    problem(svc.client.post(renew, content=b"{", headers=JSON), 400, "malformed_request")
    problem(svc.client.post(renew, json={"csr": 5}), 422, "invalid_field")
    problem(svc.client.post(renew, json={"validity_days": 9999}), 422, "invalid_field")
    problem(svc.client.post(renew, content=b'{"csr": null}', headers={"Content-Type": "text/plain"}),
            415, "unsupported_media_type")


def test_control_characters_in_a_path_cannot_forge_log_lines(admin: httpx.Client, pki_server: RunningServer,
                                                             problem: Problem) -> None:
    marker = f"FORGED-{uuid.uuid4().hex}"
    for raw in (f"x%0A2026-01-01 00:00:00,000 INFO vcc_pki_server.access {marker}",
                f"x%0D%0A{marker}", f"x%00{marker}", f"x%1B[2J{marker}"):
        problem(admin.get(f"{API}/certificates/{raw}"), 422, "invalid_field")
    log = pki_server.log_once(lambda text: text.count(marker) >= 4)
    lines = [line for line in log.splitlines() if marker in line]
    assert len(lines) == 4 and all(" vcc_pki_server.access client=" in line for line in lines), lines
    assert not any(c in log for c in "\x00\x1b\r"), "control characters reached the log"



def test_a_forwarded_for_header_does_not_change_the_client_in_the_log(admin: httpx.Client,
                                                                      pki_server: RunningServer) -> None:
    # The server terminates TLS itself: no proxy in front vouches for X-Forwarded-For.
    marker = f"fwd-{uuid.uuid4().hex[:12]}"
    response = admin.get(f"{API}/services/{marker}",
                         headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "http"})
    assert response.status_code == 404
    log = pki_server.log_once(lambda text: marker in text)
    [line] = [line for line in log.splitlines() if marker in line]
    assert " client=127.0.0.1 " in line and "203.0.113.9" not in line, line

# --- afterwards ---------------------------------------------------------------------------
def test_server_survives_the_barrage_without_tracebacks(anon: httpx.Client, pki_server: RunningServer,
                                                        admin_token: str) -> None:
    """Runs last in this module: the barrage above left the server up and its log clean."""
    assert anon.get("/health").json()["status"] == "ok"
    log = pki_server.log()
    assert "Traceback" not in log, log[-5000:]
    assert "internal_error" not in log and "unexpected error" not in log
    assert admin_token not in log  # the access log names actors, never secrets
    secret = admin_token.rsplit("_", 1)[1]
    assert secret not in log


def test_metadata_nested_too_deep_is_422_and_nothing_changes(admin: httpx.Client, problem: Problem) -> None:
    sid = f"deep-{uuid.uuid4().hex[:8]}"
    deep = '{"x":' * 950 + "{}" + "}" * 950  # written by hand: json.dumps would recurse too deep here
    body = f'{{"service_id": "{sid}", "metadata": {deep}}}'
    problem(admin.post(f"{API}/services/register", content=body, headers={"content-type": "application/json"}),
            422, "invalid_field")
    assert admin.get(f"{API}/services/{sid}").status_code == 404
    ok = admin.post(f"{API}/services/register", json={"service_id": sid, "metadata": {"a": {"b": [1, {"c": 2}]}}})
    assert ok.status_code == 201, ok.text
