"""PKIClient over a mocked transport (respx): what a real server will not do on demand.

Problem documents to exceptions, garbage answers, retries and their limits, the one-time
token's protection against retries, the fingerprint pin, CRL and peer checks, close().
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpcore
import httpx
import pytest
import respx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vcc_pki_client import (
    AuthenticationError,
    ConfigurationError,
    ConflictError,
    InvalidResponseError,
    NotFoundError,
    PermissionDeniedError,
    PKIClient,
    PolicyRefusedError,
    RenewalError,
    RequestRejectedError,
    RetryPolicy,
    ServerError,
    TransportError,
    TrustError,
)
from vcc_pki_client._http import translate_httpx_error
from vcc_pki_client.files import CertificateFiles
from vcc_pki_client.keys import certificates_pem, fingerprint_sha256
from vcc_pki_client.retry import is_transient

if TYPE_CHECKING:
    from conftest import MiniCA

URL = "https://pki.test"
API = f"{URL}/api/v1"
FAST = RetryPolicy(max_attempts=3, backoff_initial=0.001, backoff_max=0.002)
PROBLEM = {"content-type": "application/problem+json"}


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def utc(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sign_csr(ca: MiniCA, csr_pem: str, service_id: str, *, days: int = 30) -> x509.Certificate:
    """What the server does with a CSR, in miniature: a leaf for its public key."""
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    now = datetime.now(timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service_id)]))
        .issuer_name(ca.intermediate.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(service_id)]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.intermediate_key.public_key()),
                       critical=False)
        .sign(ca.intermediate_key, hashes.SHA256())
    )


def issued_body(ca: MiniCA, cert: x509.Certificate, service_id: str = "svc") -> dict[str, Any]:
    return {
        "service_id": service_id,
        "serial_number": format(cert.serial_number, "x"),
        "certificate": pem(cert).decode(),
        "chain": pem(*ca.chain).decode(),
        "not_before": utc(cert.not_valid_before_utc),
        "not_after": utc(cert.not_valid_after_utc),
        "fingerprint_sha256": fingerprint_sha256(cert),
    }


def issuing(ca: MiniCA, status: int = 201) -> Callable[[httpx.Request], httpx.Response]:
    """A respx side effect that signs the request's CSR like the server would."""

    def answer(request: httpx.Request) -> httpx.Response:
        csr = json.loads(request.content)["csr"]
        return httpx.Response(status, json=issued_body(ca, sign_csr(ca, csr, "svc")))

    return answer


def entry(service_id: str = "peer") -> dict[str, Any]:
    return {
        "service_id": service_id, "service_name": "Peer", "endpoints": ["https://peer:9443"],
        "health_check_url": None, "version": None, "owner": None, "metadata": {},
        "san_dns": [service_id], "san_ip": [], "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
        "health": {"status": "unknown", "last_checked": None, "last_error": None, "consecutive_failures": 0},
    }


def problem(status: int, code: str, detail: str = "refused") -> httpx.Response:
    body = {"type": f"https://vcc-pki.invalid/problems/{code}", "title": "T", "status": status,
            "detail": detail, "code": code}
    return httpx.Response(status, json=body, headers=PROBLEM)


CRL_ROUTE = rf"{API}/crl(/[0-9a-f]+)?$"  # the current issuer's CRL, or one issuer's by its SKI


@pytest.fixture
def router(mini_ca: MiniCA) -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as mock:
        # The SDK reads the CA's bundle (trust, and whose CRLs to check) at each renewal.
        mock.get(f"{API}/ca/bundle").mock(return_value=httpx.Response(
            200, content=certificates_pem([mini_ca.intermediate, mini_ca.root])))
        # After installing a certificate the SDK fetches the CRL into crl.pem; tests about
        # the CRL mock this route themselves (the same pattern replaces this answer).
        mock.get(url__regex=CRL_ROUTE).mock(return_value=httpx.Response(
            404, json={"type": "about:blank", "title": "Not Found", "status": 404, "detail": "no CRL here",
                       "code": "not_found"}, headers={"content-type": "application/problem+json"}))
        yield mock


@pytest.fixture
def bundle(mini_ca: MiniCA, tmp_path: Path) -> Path:
    return mini_ca.write_root(tmp_path)


@pytest.fixture
def make_client(bundle: Path, tmp_path: Path) -> Iterator[Callable[..., PKIClient]]:
    made: list[PKIClient] = []

    def make(**kw: Any) -> PKIClient:
        kw.setdefault("ca_bundle", bundle)
        kw.setdefault("retry_policy", FAST)
        client = PKIClient(URL, "svc", **kw)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def enrolled(make_client: Callable[..., PKIClient], mini_ca: MiniCA, tmp_path: Path) -> PKIClient:
    """A client whose certificate files exist (issued by the mini CA, valid 30 days)."""
    cert, key = mini_ca.issue("svc")
    files = CertificateFiles(tmp_path / "svc" / "cert.pem", tmp_path / "svc" / "key.pem",
                             tmp_path / "svc" / "ca_chain.pem")
    files.write(cert, key, mini_ca.chain)
    return make_client(cert_file=files.cert_file, key_file=files.key_file)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The back-off waits the client asked for (not actually waited)."""
    waited: list[float] = []
    monkeypatch.setattr("vcc_pki_client._http.time.sleep", waited.append)
    return waited


def snapshot(client: PKIClient) -> tuple[bytes, bytes]:
    assert client.files is not None
    return client.files.cert_file.read_bytes(), client.files.key_file.read_bytes()


# -- problem documents --------------------------------------------------------------------------
@pytest.mark.parametrize(("status", "code", "cls"), [
    (400, "malformed_request", RequestRejectedError),
    (401, "invalid_token", AuthenticationError),
    (401, "not_authenticated", AuthenticationError),
    (403, "policy_refused", PolicyRefusedError),
    (403, "not_permitted", PermissionDeniedError),
    (404, "unknown_service", NotFoundError),
    (409, "conflict", ConflictError),
    (422, "invalid_field", RequestRejectedError),
    (500, "internal_error", ServerError),
    (503, "unavailable", ServerError),
])
def test_problem_document_maps_to_its_exception(router: respx.MockRouter, make_client: Callable[..., PKIClient],
                                                status: int, code: str, cls: type[Exception]) -> None:
    router.get(f"{API}/services/peer").mock(return_value=problem(status, code, f"detail of {code}"))
    with pytest.raises(cls) as caught:
        make_client().discover("peer")
    assert type(caught.value) is cls
    assert (caught.value.status, caught.value.code, caught.value.detail) == (status, code, f"detail of {code}")  # type: ignore[attr-defined]


def test_policy_refusal_is_a_permission_error_with_the_servers_reason(
        router: respx.MockRouter, make_client: Callable[..., PKIClient], tmp_path: Path) -> None:
    router.post(f"{API}/certificates/request").mock(
        return_value=problem(403, "policy_refused", "SAN 'x.internal' is not in the allow-list of service 'svc'"))
    client = make_client(cert_file=tmp_path / "t" / "cert.pem", key_file=tmp_path / "t" / "key.pem")
    with pytest.raises(PermissionDeniedError, match="x.internal"):
        client.enroll("vcc_enr_token", san_dns=["x.internal"])
    assert not (tmp_path / "t" / "cert.pem").exists()


@pytest.mark.parametrize(("status", "body", "content_type"), [
    (200, b"<html>proxy</html>", "text/html"),
    (200, b"{not json", "application/json"),
    (200, b"[1, 2]", "application/json"),
    (200, b'{"service_id": "peer"}', "application/json"),  # JSON, but not a registry entry
])
def test_garbage_answers_are_invalid_response_errors(router: respx.MockRouter,
                                                     make_client: Callable[..., PKIClient],
                                                     status: int, body: bytes, content_type: str) -> None:
    router.get(f"{API}/services/peer").mock(
        return_value=httpx.Response(status, content=body, headers={"content-type": content_type}))
    with pytest.raises(InvalidResponseError):
        make_client().discover("peer")


def test_error_page_that_is_not_a_problem_document_keeps_its_status(
        router: respx.MockRouter, make_client: Callable[..., PKIClient]) -> None:
    router.get(f"{API}/services/peer").mock(
        return_value=httpx.Response(404, content=b"<h1>no such page</h1>", headers={"content-type": "text/html"}))
    with pytest.raises(NotFoundError, match="no such page"):
        make_client().discover("peer")


def test_peer_certificate_that_is_not_pem_is_an_invalid_response(
        router: respx.MockRouter, make_client: Callable[..., PKIClient]) -> None:
    router.get(f"{API}/certificates/peer/download").mock(return_value=httpx.Response(200, content=b"garbage"))
    with pytest.raises(InvalidResponseError):
        make_client().get_service_certificate("peer")


# -- retries ------------------------------------------------------------------------------------
def test_idempotent_call_is_retried_with_backoff_on_5xx(router: respx.MockRouter,
                                                        make_client: Callable[..., PKIClient],
                                                        sleeps: list[float]) -> None:
    route = router.get(f"{API}/services/peer").mock(side_effect=[
        problem(503, "unavailable"), httpx.Response(502, content=b"bad gateway"), httpx.Response(200, json=entry())])
    assert make_client().discover("peer").service_name == "Peer"
    assert route.call_count == 3
    assert len(sleeps) == 2 and all(0 <= s <= FAST.backoff_max for s in sleeps)


def test_idempotent_call_is_retried_on_connection_errors(router: respx.MockRouter,
                                                         make_client: Callable[..., PKIClient],
                                                         sleeps: list[float]) -> None:
    route = router.get(f"{API}/services/peer").mock(side_effect=[
        httpx.ConnectError("connection refused"), httpx.ReadTimeout("timed out"), httpx.Response(200, json=entry())])
    assert make_client().discover("peer").service_id == "peer"
    assert route.call_count == 3


def test_retries_give_up_after_max_attempts(router: respx.MockRouter, make_client: Callable[..., PKIClient],
                                           sleeps: list[float]) -> None:
    route = router.get(f"{API}/services/peer").mock(return_value=problem(500, "internal_error"))
    with pytest.raises(ServerError):
        make_client().discover("peer")
    assert route.call_count == FAST.max_attempts
    assert len(sleeps) == FAST.max_attempts - 1


def test_transport_failure_is_translated_once_and_chained(router: respx.MockRouter,
                                                          make_client: Callable[..., PKIClient],
                                                          sleeps: list[float]) -> None:
    router.get(f"{API}/services/peer").mock(side_effect=httpx.ConnectError("connection refused"))
    with pytest.raises(TransportError, match="connection refused") as caught:
        make_client().discover("peer")
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


def test_server_certificate_that_does_not_verify_is_a_trust_error() -> None:
    # As httpx raises it: ConnectError from httpcore.ConnectError from the ssl module's error.
    # (respx cannot replay such a chain; tests/e2e/test_sdk.py meets the real thing.)
    verify_failure = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify_failure.verify_message = "unable to get local issuer certificate"
    inner = httpcore.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED]")
    inner.__context__ = verify_failure
    outer = httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED]")
    outer.__cause__ = inner
    err = translate_httpx_error(outer, "GET", f"{API}/ca/chain")
    assert isinstance(err, TrustError) and not is_transient(err)
    assert "unable to get local issuer certificate" in str(err)
    assert type(translate_httpx_error(httpx.ConnectError("refused"), "GET", URL)) is TransportError


@pytest.mark.parametrize(("status", "code"), [(400, "malformed_request"), (401, "not_authenticated"),
                                              (403, "not_permitted"), (404, "unknown_service"),
                                              (409, "conflict"), (422, "invalid_field")])
def test_4xx_is_never_retried(router: respx.MockRouter, enrolled: PKIClient, sleeps: list[float],
                              status: int, code: str) -> None:
    route = router.post(f"{API}/certificates/svc/renew").mock(return_value=problem(status, code))
    before = snapshot(enrolled)
    with pytest.raises(RequestRejectedError if status in (400, 409, 422) else Exception):
        enrolled.renew()
    assert route.call_count == 1 and sleeps == []
    assert snapshot(enrolled) == before


def test_enrolment_is_not_retried_after_a_read_timeout(router: respx.MockRouter,
                                                       make_client: Callable[..., PKIClient],
                                                       tmp_path: Path, sleeps: list[float]) -> None:
    # The request may have reached the server and spent the one-time token: asking again
    # could only get a 401 and hide what happened.
    route = router.post(f"{API}/certificates/request").mock(side_effect=httpx.ReadTimeout("timed out"))
    client = make_client(cert_file=tmp_path / "t" / "cert.pem", key_file=tmp_path / "t" / "key.pem")
    with pytest.raises(TransportError):
        client.enroll("vcc_enr_token")
    assert route.call_count == 1
    assert not client.enrolled


def test_enrolment_is_not_retried_after_a_5xx(router: respx.MockRouter, make_client: Callable[..., PKIClient],
                                              tmp_path: Path, sleeps: list[float]) -> None:
    route = router.post(f"{API}/certificates/request").mock(return_value=problem(500, "internal_error"))
    client = make_client(cert_file=tmp_path / "t" / "cert.pem", key_file=tmp_path / "t" / "key.pem")
    with pytest.raises(ServerError):
        client.enroll("vcc_enr_token")
    assert route.call_count == 1


def test_enrolment_is_retried_while_the_connection_is_refused(router: respx.MockRouter,
                                                              make_client: Callable[..., PKIClient],
                                                              mini_ca: MiniCA, tmp_path: Path,
                                                              sleeps: list[float]) -> None:
    answers = issuing(mini_ca)
    calls: list[httpx.Request] = []

    def side_effect(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("connection refused")
        return answers(request)

    router.post(f"{API}/certificates/request").mock(side_effect=side_effect)
    client = make_client(cert_file=tmp_path / "t" / "cert.pem", key_file=tmp_path / "t" / "key.pem")
    issued = client.enroll("vcc_enr_token")
    assert len(calls) == 2
    assert calls[1].headers["authorization"] == "Bearer vcc_enr_token"
    assert client.certificate == issued.certificate
    assert os.stat(tmp_path / "t" / "key.pem").st_mode & 0o777 == 0o600
    assert (tmp_path / "t" / "ca_chain.pem").read_bytes() == pem(*mini_ca.chain)


def test_renew_is_retried_after_a_read_timeout(router: respx.MockRouter, enrolled: PKIClient, mini_ca: MiniCA,
                                               sleeps: list[float]) -> None:
    answers = issuing(mini_ca)
    route = router.post(f"{API}/certificates/svc/renew").mock(
        side_effect=[httpx.ReadTimeout("timed out"), answers])
    old = enrolled.certificate
    issued = enrolled.renew()
    assert route.call_count == 2
    assert issued.certificate.serial_number != old.serial_number
    assert enrolled.certificate == issued.certificate


def test_renew_without_rekey_sends_no_csr_and_keeps_the_key(router: respx.MockRouter, enrolled: PKIClient,
                                                           mini_ca: MiniCA) -> None:
    assert enrolled.files is not None
    _, key = enrolled.files.load()
    cert, _ = mini_ca.issue("svc", key=key)

    def answer(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content or b"{}") == {}
        return httpx.Response(201, json=issued_body(mini_ca, cert))

    router.post(f"{API}/certificates/svc/renew").mock(side_effect=answer)
    key_before = enrolled.files.key_file.read_bytes()
    enrolled.renew(rekey=False)
    assert enrolled.files.key_file.read_bytes() == key_before
    assert enrolled.certificate == cert


def test_renewal_answer_for_another_key_is_refused_and_changes_nothing(router: respx.MockRouter,
                                                                       enrolled: PKIClient,
                                                                       mini_ca: MiniCA) -> None:
    stranger, _ = mini_ca.issue("svc")
    router.post(f"{API}/certificates/svc/renew").mock(
        return_value=httpx.Response(201, json=issued_body(mini_ca, stranger)))
    before = snapshot(enrolled)
    with pytest.raises(InvalidResponseError, match="key"):
        enrolled.renew()
    assert snapshot(enrolled) == before


def test_issued_certificate_from_a_foreign_ca_is_refused(router: respx.MockRouter, enrolled: PKIClient,
                                                         other_ca: MiniCA, sleeps: list[float]) -> None:
    router.post(f"{API}/certificates/svc/renew").mock(side_effect=issuing(other_ca))
    before = snapshot(enrolled)
    with pytest.raises(TrustError):
        enrolled.renew()
    assert snapshot(enrolled) == before


# -- renewal checks -----------------------------------------------------------------------------
def test_renew_now_renews_only_inside_the_window(router: respx.MockRouter, enrolled: PKIClient,
                                                 mini_ca: MiniCA) -> None:
    route = router.post(f"{API}/certificates/svc/renew").mock(side_effect=issuing(mini_ca))
    seen: list[x509.Certificate] = []
    enrolled.enable_auto_renewal(renew_before_days=1, check_interval=3600, on_renewed=seen.append)
    enrolled.disable_auto_renewal()  # the checks below run here, not in the scheduler
    old = enrolled.certificate
    assert enrolled.renew_now() is None
    issued = enrolled.renew_now(now=old.not_valid_after_utc - timedelta(hours=1))
    assert issued is not None and route.call_count == 1
    assert seen == [issued.certificate]


def test_renew_now_reports_a_permanent_failure_as_renewal_error(router: respx.MockRouter, enrolled: PKIClient,
                                                                sleeps: list[float]) -> None:
    route = router.post(f"{API}/certificates/svc/renew").mock(return_value=problem(403, "not_permitted"))
    before = snapshot(enrolled)
    with pytest.raises(RenewalError) as caught:
        enrolled.renew_now(now=datetime.now(timezone.utc) + timedelta(days=29))
    assert isinstance(caught.value.last_error, PermissionDeniedError)
    assert route.call_count == 1
    assert snapshot(enrolled) == before


def test_renew_now_retries_transient_failures_then_gives_up(router: respx.MockRouter, enrolled: PKIClient,
                                                            sleeps: list[float]) -> None:
    route = router.post(f"{API}/certificates/svc/renew").mock(side_effect=httpx.ConnectError("refused"))
    before = snapshot(enrolled)
    with pytest.raises(RenewalError) as caught:
        enrolled.renew_now(now=datetime.now(timezone.utc) + timedelta(days=29))
    assert isinstance(caught.value.last_error, TransportError)
    assert route.call_count == FAST.max_attempts
    assert snapshot(enrolled) == before


def test_auto_renewal_needs_a_certificate(make_client: Callable[..., PKIClient], tmp_path: Path) -> None:
    client = make_client(cert_file=tmp_path / "t" / "cert.pem", key_file=tmp_path / "t" / "key.pem")
    with pytest.raises(ConfigurationError, match="enroll"):
        client.enable_auto_renewal()


# -- trust --------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["plain", "colons", "prefixed"])
def test_pinned_root_is_fetched_once_checked_and_stored(router: respx.MockRouter, mini_ca: MiniCA,
                                                        tmp_path: Path, form: str) -> None:
    digest = fingerprint_sha256(mini_ca.root)
    pin = {"plain": digest, "colons": ":".join(digest[i:i + 2] for i in range(0, 64, 2)).upper(),
           "prefixed": f"sha256:{digest}"}[form]
    root_route = router.get(f"{API}/ca/root").mock(return_value=httpx.Response(
        200, content=mini_ca.root.public_bytes(serialization.Encoding.DER),
        headers={"content-type": "application/pkix-cert"}))
    router.get(f"{API}/ca/chain").mock(return_value=httpx.Response(200, content=pem(*mini_ca.chain)))
    files = {"cert_file": tmp_path / "t" / "cert.pem", "key_file": tmp_path / "t" / "key.pem"}
    with PKIClient(URL, "svc", root_fingerprint=pin, **files) as client:  # type: ignore[arg-type]
        assert client.get_ca_bundle() == mini_ca.chain
    assert x509.load_pem_x509_certificate((tmp_path / "t" / "ca_root.pem").read_bytes()) == mini_ca.root
    with PKIClient(URL, "svc", root_fingerprint=pin, **files) as again:  # type: ignore[arg-type]
        assert again.get_ca_bundle() == mini_ca.chain
    assert root_route.call_count == 1  # the stored root matched the pin: no second unverified fetch


def test_fingerprint_pin_mismatch_is_a_trust_error(router: respx.MockRouter, mini_ca: MiniCA, other_ca: MiniCA,
                                                   tmp_path: Path) -> None:
    router.get(f"{API}/ca/root").mock(return_value=httpx.Response(
        200, content=other_ca.root.public_bytes(serialization.Encoding.DER)))
    chain = router.get(f"{API}/ca/chain").mock(return_value=httpx.Response(200, content=pem(*other_ca.chain)))
    with PKIClient(URL, "svc", root_fingerprint=fingerprint_sha256(mini_ca.root),
                   cert_file=tmp_path / "t" / "cert.pem", key_file=tmp_path / "t" / "key.pem") as client:
        with pytest.raises(TrustError, match="not the pinned"):
            client.get_ca_bundle()
        with pytest.raises(TrustError):
            client.enroll("vcc_enr_token")
    assert chain.call_count == 0
    assert not (tmp_path / "t" / "ca_root.pem").exists()


@pytest.mark.parametrize("bad", ["", "sha256:", "abc", "zz" * 32, "sha1:" + "ab" * 32])
def test_malformed_fingerprint_is_a_configuration_error(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        PKIClient(URL, "svc", root_fingerprint=bad)


def test_ca_chain_that_does_not_lead_to_the_trusted_root_is_refused(router: respx.MockRouter,
                                                                    make_client: Callable[..., PKIClient],
                                                                    other_ca: MiniCA) -> None:
    router.get(f"{API}/ca/chain").mock(return_value=httpx.Response(200, content=pem(*other_ca.chain)))
    with pytest.raises(TrustError, match="trusted root"):
        make_client().get_ca_bundle()


def test_peer_certificate_is_chain_checked(router: respx.MockRouter, make_client: Callable[..., PKIClient],
                                           mini_ca: MiniCA, other_ca: MiniCA) -> None:
    good, _ = mini_ca.issue("peer")
    forged, _ = other_ca.issue("peer")
    route = router.get(f"{API}/certificates/peer/download")
    route.mock(return_value=httpx.Response(200, content=pem(good, *mini_ca.chain)))
    client = make_client()
    assert client.get_service_certificate("peer") == good
    assert route.calls.last.request.url.params["chain"] == "true"
    route.mock(return_value=httpx.Response(200, content=pem(forged, *other_ca.chain)))
    with pytest.raises(TrustError, match="peer"):
        client.get_service_certificate("peer")


# -- CRL ----------------------------------------------------------------------------------------
def make_crl(ca: MiniCA, revoked: list[int], *, signer: Any = None) -> bytes:
    now = datetime.now(timezone.utc)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.intermediate.subject)
               .last_update(now).next_update(now + timedelta(days=7)))
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    return builder.sign(signer or ca.intermediate_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_is_revoked_reads_a_checked_crl_and_caches_it(router: respx.MockRouter,
                                                      make_client: Callable[..., PKIClient],
                                                      mini_ca: MiniCA) -> None:
    peer, _ = mini_ca.issue("peer")
    other, _ = mini_ca.issue("other")
    router.get(f"{API}/ca/chain").mock(return_value=httpx.Response(200, content=pem(*mini_ca.chain)))
    crl = router.get(url__regex=CRL_ROUTE).mock(return_value=httpx.Response(
        200, content=make_crl(mini_ca, [peer.serial_number]), headers={"content-type": "application/pkix-crl"}))
    client = make_client()
    assert client.is_revoked(peer) is True
    assert client.is_revoked(other) is False
    assert client.is_revoked(format(peer.serial_number, "x")) is True
    assert crl.call_count == 1  # cached
    client.is_revoked(other, refresh=True)
    assert crl.call_count == 2


def test_crl_max_age_zero_fetches_every_time(router: respx.MockRouter, make_client: Callable[..., PKIClient],
                                             mini_ca: MiniCA) -> None:
    peer, _ = mini_ca.issue("peer")
    router.get(f"{API}/ca/chain").mock(return_value=httpx.Response(200, content=pem(*mini_ca.chain)))
    crl = router.get(url__regex=CRL_ROUTE).mock(side_effect=[
        httpx.Response(200, content=make_crl(mini_ca, [])),
        httpx.Response(200, content=make_crl(mini_ca, [peer.serial_number]))])
    client = make_client(crl_max_age=0)
    assert client.is_revoked(peer) is False
    assert client.is_revoked(peer) is True
    assert crl.call_count == 2


def test_crl_with_a_bad_signature_is_a_trust_error(router: respx.MockRouter,
                                                   make_client: Callable[..., PKIClient],
                                                   mini_ca: MiniCA, other_ca: MiniCA) -> None:
    router.get(f"{API}/ca/chain").mock(return_value=httpx.Response(200, content=pem(*mini_ca.chain)))
    router.get(url__regex=CRL_ROUTE).mock(return_value=httpx.Response(
        200, content=make_crl(mini_ca, [], signer=other_ca.intermediate_key)))
    with pytest.raises(TrustError, match="signature"):
        make_client().get_crl()


def test_foreign_certificate_cannot_be_judged_by_our_crl(router: respx.MockRouter,
                                                         make_client: Callable[..., PKIClient],
                                                         mini_ca: MiniCA, other_ca: MiniCA) -> None:
    router.get(f"{API}/ca/chain").mock(return_value=httpx.Response(200, content=pem(*mini_ca.chain)))
    router.get(url__regex=CRL_ROUTE).mock(return_value=httpx.Response(200, content=make_crl(mini_ca, [])))
    foreign, _ = other_ca.issue("peer")
    with pytest.raises(TrustError):
        make_client().is_revoked(foreign)


# -- lifecycle ----------------------------------------------------------------------------------
def test_close_is_idempotent_and_leaves_a_lent_client_open(router: respx.MockRouter, bundle: Path) -> None:
    router.get(f"{API}/services/peer").mock(return_value=httpx.Response(200, json=entry()))
    with httpx.Client() as lent:
        client = PKIClient(URL, "svc", ca_bundle=bundle, http_client=lent)
        assert client.discover("peer").service_id == "peer"
        client.close()
        client.close()
        assert not lent.is_closed
        with pytest.raises(ConfigurationError, match="closed"):
            client.discover("peer")


def test_close_closes_the_client_it_made(router: respx.MockRouter, bundle: Path) -> None:
    router.get(f"{API}/services/peer").mock(return_value=httpx.Response(200, json=entry()))
    with PKIClient(URL, "svc", ca_bundle=bundle) as client:
        client.discover("peer")
        own = client._session.connection().client
    assert own.is_closed


def test_context_manager_stops_the_scheduler(enrolled: PKIClient) -> None:
    with enrolled:
        enrolled.enable_auto_renewal(renew_before_days=1, check_interval=3600)
        renewer = enrolled._renewer
        assert renewer is not None and renewer._live_scheduler() is not None
    assert renewer._live_scheduler() is None


@pytest.mark.parametrize(("kw", "match"), [
    ({"pki_server_url": "ftp://x"}, "https"),
    ({"pki_server_url": "http://pki.test"}, "https"),
    ({"service_id": "Bad_Id"}, "service id"),
    ({"cert_file": "c.pem"}, "together"),
    ({"key_type": "dsa-1024"}, "key_type"),
])
def test_bad_arguments_are_configuration_errors(kw: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"pki_server_url": URL, "service_id": "svc", **kw}
    with pytest.raises(ConfigurationError, match=match):
        PKIClient(**args)


def test_methods_needing_files_say_so(make_client: Callable[..., PKIClient]) -> None:
    client = make_client()
    with pytest.raises(ConfigurationError, match="cert_file"):
        client.renew()
    with pytest.raises(ConfigurationError, match="token"):
        client.enroll()
    with pytest.raises(ConfigurationError, match="enroll"):
        client.server_ssl_context()
