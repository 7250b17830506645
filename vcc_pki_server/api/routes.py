"""The HTTP API's handlers: parse, authorise, call the authority, render. No certificate logic here."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .. import render
from ..authority import Actor, Authority
from ..encoding import cert_pem, ski_hex
from ..errors import CAUnavailable, InvalidRequest, NotFound, NotPermitted
from ..metrics import CONTENT_TYPE
from ..policy import check_service_id
from ..store import CRLRecord, Store, opt_text
from .issuance import ISSUE_PATH, request_certificate
from .openapi import openapi_document, openapi_html
from .requests import (
    as_actor,
    authenticate_scope,
    field,
    query_bool,
    query_int,
    query_time,
    read_json,
    requested_lifetime,
    store_calls,
)

PEM = "application/x-pem-file"
T = TypeVar("T")
log = logging.getLogger("vcc_pki_server.api")


def _authority(request: Request) -> Authority:
    return request.app.state.authority  # type: ignore[no-any-return]


def _service_id(request: Request) -> str:
    return check_service_id(request.path_params["service_id"])


def _page(records: list[T], limit: int, render_one: Callable[[T], dict[str, Any]],
          cursor_of: Callable[[T], Any]) -> JSONResponse:
    """A page of at most ``limit`` of ``records`` (asked for ``limit + 1``: one more means
    there is a next page, so a last page says ``next_cursor: null``)."""
    page = records[:limit]
    more = len(records) > limit and bool(page)
    return JSONResponse({"items": [render_one(r) for r in page],
                         "next_cursor": str(cursor_of(page[-1])) if more else None})


def _listing(request: Request) -> tuple[int, int | None, str | None]:
    """A listing's ``limit`` (1–1000, default 100), integer ``cursor`` (a row id) and checked
    ``service_id`` filter."""
    limit = query_int(request, "limit", default=100, low=1, high=1000) or 100
    # Bounded: an SQLite INTEGER is 64-bit, and now + 10**7 days is past datetime's year 9999.
    cursor = query_int(request, "cursor", low=0, high=2**63 - 1)
    service_id = request.query_params.get("service_id")
    if service_id is not None:
        check_service_id(service_id)
    return limit, cursor, service_id


async def audit_log(request: Request) -> Response:
    """``GET /api/v1/audit`` (admin): newest first, ``since``, ``service_id``, ``limit``, ``cursor``."""
    authority = _authority(request)
    limit, before, service_id = _listing(request)
    since = query_time(request, "since")
    entries = await as_actor(request, lambda actor: authority.audit_entries(
        actor=actor, limit=limit + 1, service_id=service_id, since=since, before=before))
    return _page(entries, limit, lambda e: render.audit(*e), lambda e: e[0])


# -- certificates ---------------------------------------------------------------------------
async def list_certificates(request: Request) -> Response:
    authority = _authority(request)
    limit, cursor, service_id = _listing(request)
    status = request.query_params.get("status")
    expiring = query_int(request, "expiring_within_days", low=0, high=36500)

    def work(actor: Actor) -> list[Any]:
        return authority.list_certificates(service_id=service_id, status=status,
                                           expiring_within_days=expiring, limit=limit + 1, after=cursor)

    records = await as_actor(request, work)
    now = authority.clock()
    return _page(records, limit, lambda r: render.certificate(r, now), lambda r: r.row_id)


async def get_certificate(request: Request) -> Response:
    service_id = _service_id(request)
    authority = _authority(request)
    record = await as_actor(request, lambda actor: authority.current(service_id))
    return JSONResponse(render.certificate(record, authority.clock()))


async def download_certificate(request: Request) -> Response:
    service_id = _service_id(request)
    authority = _authority(request)
    chain = query_bool(request, "chain") or False
    record = await as_actor(request, lambda actor: authority.current(service_id))
    body = record.pem.encode()
    if chain:
        body += authority.ca.chain_pem
    return Response(body, media_type=PEM,
                    headers={"Content-Disposition": f'attachment; filename="{service_id}.pem"'})


async def renew_certificate(request: Request) -> Response:
    service_id = _service_id(request)
    body = await read_json(request, optional=True)
    csr = field(body, "csr", str, required=False)
    validity = requested_lifetime(body)
    authority = _authority(request)
    issued = await as_actor(request, lambda actor: authority.renew(
        service_id, actor=actor, csr_pem=csr, validity=validity))
    request.app.metrics.certificate_issued("renew" if csr is None else "rekey")
    return JSONResponse(render.issued(issued), status_code=201)


async def revoke_certificate(request: Request) -> Response:
    service_id = _service_id(request)
    reason = request.query_params.get("reason") or "unspecified"
    serial = request.query_params.get("serial") or None
    if serial is not None and not all(c in "0123456789abcdefABCDEF" for c in serial):
        raise InvalidRequest(f"serial must be hexadecimal, got {serial!r}")
    every = query_bool(request, "all") or False
    authority = _authority(request)
    revoked = await as_actor(request, lambda actor: authority.revoke(
        service_id, reason=reason, serial=serial, all_certificates=every, actor=actor))
    return JSONResponse(render.revoked(revoked, authority.clock()))


async def decommission_service(request: Request) -> Response:
    service_id = _service_id(request)
    authority = _authority(request)
    serials = await as_actor(request, lambda actor: authority.decommission(service_id, actor=actor))
    return JSONResponse({"service_id": service_id, "status": "decommissioned", "revoked_serials": serials})


# -- services -------------------------------------------------------------------------------
_REGISTRY_FIELDS = ("service_name", "endpoints", "health_check_url", "version", "owner", "metadata")


def _str_list(body: dict[str, Any], name: str) -> list[str]:
    """``body[name]`` as a list of strings (absent: empty); anything else is 422, not iterated."""
    value = field(body, name, list, required=False) or []
    if not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"field '{name}' must be a list of strings")
    return value


async def list_services(request: Request) -> Response:
    authority = _authority(request)
    limit = query_int(request, "limit", default=100, low=1, high=1000) or 100
    healthy = query_bool(request, "healthy")
    cursor = request.query_params.get("cursor") or None
    records = await as_actor(request, lambda actor: authority.list_services(
        healthy=healthy, limit=limit + 1, after=cursor))
    now = authority.clock()
    return _page(records, limit, lambda r: render.service(r, now=now), lambda r: r.service_id)


async def register_service(request: Request) -> Response:
    body = await read_json(request)
    service_id = check_service_id(field(body, "service_id", str))
    known = {"service_id", "san_dns", "san_ip", "default_validity_seconds", "max_validity_seconds",
             *_REGISTRY_FIELDS}
    unknown = set(body) - known
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    authority = _authority(request)

    field(body, "service_name", str, required=False)
    fields = {k: body[k] for k in known if k in body and k != "service_id"}
    for name in ("san_dns", "san_ip"):
        if name in fields:
            fields[name] = _str_list(body, name)

    def work(actor: Actor) -> tuple[int, dict[str, Any]]:
        record, token = authority.register(service_id, fields, actor=actor)
        out = render.service(record)
        if token is None:
            return 200, out
        out["enrolment_token"] = token.value
        out["enrolment_token_expires_at"] = opt_text(token.record.expires_at)
        return 201, out

    status, out = await as_actor(request, work)
    return JSONResponse(out, status_code=status)


async def get_service(request: Request) -> Response:
    service_id = _service_id(request)
    authority = _authority(request)

    def work(actor: Actor) -> dict[str, Any]:
        record = authority.service(service_id)
        return render.service(record, certificates=authority.certificates(service_id),
                              now=authority.clock())

    return JSONResponse(await as_actor(request, work))


async def update_service(request: Request) -> Response:
    service_id = _service_id(request)
    body = await read_json(request)
    authority = _authority(request)
    record = await as_actor(request, lambda actor: authority.update_service(service_id, body, actor=actor))
    return JSONResponse(render.service(record, now=authority.clock()))


async def new_enrolment_token(request: Request) -> Response:
    service_id = _service_id(request)
    authority = _authority(request)
    token = await as_actor(request, lambda actor: authority.new_enrolment_token(service_id, actor=actor))
    return JSONResponse({"service_id": service_id, "enrolment_token": token.value,
                         "expires_at": opt_text(token.record.expires_at)}, status_code=201)


# -- public ---------------------------------------------------------------------------------
def _cert_response(request: Request, *certs: x509.Certificate) -> Response:
    fmt = request.query_params.get("format", "pem").lower()
    if fmt == "der":
        if len(certs) != 1:
            raise InvalidRequest("format=der is available for single certificates; the chain is PEM")
        return Response(certs[0].public_bytes(serialization.Encoding.DER), media_type="application/pkix-cert")
    if fmt != "pem":
        raise InvalidRequest(f"format must be pem or der, got {fmt!r}")
    return Response(cert_pem(*certs), media_type=PEM)


async def ca_root(request: Request) -> Response:
    return _cert_response(request, _authority(request).ca.root)


async def ca_intermediate(request: Request) -> Response:
    return _cert_response(request, _authority(request).ca.certificate)


async def ca_chain(request: Request) -> Response:
    """``/api/v1/ca/chain``: the current intermediate, then its root."""
    ca = _authority(request).ca
    return _cert_response(request, ca.certificate, ca.root)


async def ca_intermediate_by_ski(request: Request) -> Response:
    """``/api/v1/ca/intermediate/{ski}``: the intermediate a leaf's AIA names (SPEC §13)."""
    ski = request.path_params["ski"].lower()
    ca = _authority(request).cas.issuers.get(ski)
    if ca is None:
        raise NotFound(f"no unexpired intermediate CA of this server has the subject key identifier {ski!r}")
    return _cert_response(request, ca.certificate)


async def ca_bundle(request: Request) -> Response:
    """``/api/v1/ca/bundle``: every unexpired intermediate (the current one first), the trusted
    roots, and while a root rotates the cross-certificate between them (PEM)."""
    return Response(cert_pem(*_authority(request).cas.bundle), media_type=PEM)


async def ca_roots(request: Request) -> Response:
    """``/api/v1/ca/roots``: the roots services trust (PEM; two while a root rotates)."""
    return Response(cert_pem(*_authority(request).cas.roots), media_type=PEM)


async def crl(request: Request) -> Response:
    """``/api/v1/crl``: the current intermediate's CRL."""
    return await _crl_of(request, _authority(request).ca.ski)


async def _crl_of(request: Request, issuer: str) -> Response:
    fmt = request.query_params.get("format", "der").lower()
    if fmt not in ("der", "pem"):
        raise InvalidRequest(f"format must be der or pem, got {fmt!r}")
    authority = _authority(request)
    record = await _newest_crl(request, authority, issuer)
    headers = {"Cache-Control": "no-cache"}
    if fmt == "pem":
        pem = authority.cached_crl_pem(record) or await run_in_threadpool(authority.crl_pem, record)
        return Response(pem, media_type=PEM, headers=headers)
    return Response(record.der, media_type="application/pkix-crl", headers=headers)


class RootCRL:
    """The root's CRL as ``pki-admin`` last wrote it (a file in the home), read again when the
    file changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._kept: tuple[tuple[int, int], x509.CertificateRevocationList] | None = None

    def current(self) -> x509.CertificateRevocationList | None:
        """The CRL, or None without one (a home made before SPEC §10, or no path given)."""
        if self.path is None:
            return None
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        stamp = (stat.st_mtime_ns, stat.st_size)
        kept = self._kept
        if kept is None or kept[0] != stamp:
            kept = self._kept = (stamp, x509.load_pem_x509_crl(self.path.read_bytes()))
        return kept[1]


async def crl_of_issuer(request: Request) -> Response:
    """``/api/v1/crl/{issuer_ski_hex}``: the CRL of that CA (the intermediate's is ``/crl``'s)."""
    ski = request.path_params["ski"].lower()
    authority = _authority(request)
    if ski in authority.cas.issuers:
        return await _crl_of(request, ski)
    fmt = request.query_params.get("format", "der").lower()
    if fmt not in ("der", "pem"):
        raise InvalidRequest(f"format must be der or pem, got {fmt!r}")
    root = next((r for r in authority.cas.roots if ski_hex(r) == ski), None)
    if root is None:
        raise NotFound(f"no CA of this server has the subject key identifier {ski!r}")
    root_crl: RootCRL = request.app.state.root_crl
    found = await run_in_threadpool(root_crl.current)
    if found is None or found.issuer != root.subject:
        raise NotFound("this root's CRL has not been made: run `pki-admin ca root-crl`")
    encoding = serialization.Encoding.PEM if fmt == "pem" else serialization.Encoding.DER
    return Response(found.public_bytes(encoding), media_type=PEM if fmt == "pem" else "application/pkix-crl",
                    headers={"Cache-Control": "no-cache"})


async def _newest_crl(request: Request, authority: Authority, issuer: str) -> CRLRecord:
    """The newest CRL in the store, asked after this request arrived: behind a load balancer
    (or with several workers) no replica then serves a CRL older than one another already
    served. The one held is served when its number is the newest (the usual case: one small
    query, no CRL read). A store that does not answer within the probe's timeout: the CRL
    held, if any (the newest this replica knows), else 503."""
    probe: StoreProbe = request.app.state.probe
    held = authority.held_crl(issuer)
    try:
        newest = await probe.crl_number(issuer)
    except Exception as exc:
        if held is None:
            raise CAUnavailable("the CRL cannot be read: the database does not answer") from exc
        log.warning("serving CRL number %d: the database did not say whether a newer one exists (%s)",
                    held.number, type(exc).__name__)
        return held
    if held is not None and held.number >= newest:
        return held
    return await store_calls(request).run(functools.partial(authority.crl, issuer=issuer, at_least=newest))


async def liveness(request: Request) -> Response:
    """Liveness: this process answers HTTP (nothing else is asked, the database least of all):
    restart it when this fails, take it out of a load balancer when ``/health`` does."""
    return JSONResponse({"status": "alive"})


async def health(request: Request) -> Response:
    """Readiness: 200 when the store answers within :attr:`StoreProbe.timeout`, else 503. Anyone
    may ask: the answer says what is wrong, not where (the log has the database and the cause)."""
    probe: StoreProbe = request.app.state.probe
    try:
        number = await probe.crl_number(_authority(request).ca.ski)
    except TimeoutError:
        return JSONResponse({"status": "unavailable", "database": "unavailable", "ca": "loaded",
                             "detail": f"the database did not answer within {probe.timeout:g} s"},
                            status_code=503)
    except Exception as exc:  # readiness: a broken store makes the server not ready
        log.warning("health: the store failed: %s", exc)
        return JSONResponse({"status": "unavailable", "database": "unavailable", "ca": "loaded",
                             "detail": "the database refused the question; the server log has the cause"},
                            status_code=503)
    if _authority(request).store.write_failure is not None:  # reads work on a full disk; writes do not
        return JSONResponse({"status": "unavailable", "database": "failing writes", "ca": "loaded",
                             "detail": "writes to the database fail; the server log has the cause"},
                            status_code=503)
    return JSONResponse({"status": "ok", "database": "ok", "ca": "loaded", "crl_number": number})


class StoreProbe:
    """Asks the store one cheap question (an issuer's latest CRL number) in a thread of its
    own, so that a database that hangs neither blocks the event loop nor takes the worker
    threads other requests need. At most one question is in flight: while it hangs, every
    health check waits on it for at most ``timeout`` seconds, and none queues another."""

    def __init__(self, store: Store, *, timeout: float = 0.5) -> None:
        self.store = store
        self.timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="health-probe")
        # The question in flight: its answer, when it was asked (monotonic), whose CRL.
        self._asking: tuple[Future[int], float, str] | None = None

    async def crl_number(self, issuer: str) -> int:
        """The newest CRL number of ``issuer`` in the store, from a question asked after this
        call began (an answer to an older question could predate a CRL another replica served
        since). TimeoutError after ``timeout`` seconds; the store's own errors as raised."""
        arrived = time.monotonic()
        deadline = arrived + self.timeout
        while True:
            asking = self._asking
            if asking is None or (asking[0].done() and (asking[1] < arrived or asking[2] != issuer)):
                asking = self._asking = (self._executor.submit(self.store.latest_crl_number, issuer),
                                         time.monotonic(), issuer)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            number = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(asking[0])), remaining)
            if asking[1] >= arrived and asking[2] == issuer:
                return number

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus's text format, for an admin token or a metrics token
    (``pki-admin token create --scope metrics``); without credentials 401."""
    authority = _authority(request)

    def work() -> bytes:
        actor = authenticate_scope(authority, request.headers.get("authorization"), request.scope, metrics=True)
        if not (actor.is_admin or actor.kind == "metrics"):
            raise NotPermitted(f"{actor.label} may not read /metrics: use an admin or a metrics token")
        return request.app.metrics.exposition()  # type: ignore[no-any-return]

    return Response(await store_calls(request).run(work), media_type=CONTENT_TYPE)


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document(ROUTES))


async def api_docs(request: Request) -> Response:
    return HTMLResponse(openapi_html(openapi_document(ROUTES)))


API = "/api/v1"
ROUTES: list[BaseRoute] = [
    Route(ISSUE_PATH, request_certificate, methods=["POST"], name="request_certificate"),
    Route(f"{API}/certificates/", list_certificates, methods=["GET"]),
    Route(f"{API}/certificates/{{service_id}}", get_certificate, methods=["GET"]),
    Route(f"{API}/certificates/{{service_id}}/download", download_certificate, methods=["GET"]),
    Route(f"{API}/certificates/{{service_id}}/renew", renew_certificate, methods=["POST"]),
    Route(f"{API}/certificates/{{service_id}}/revoke", revoke_certificate, methods=["DELETE"]),
    Route(f"{API}/services/", list_services, methods=["GET"]),
    Route(f"{API}/services/register", register_service, methods=["POST"]),
    Route(f"{API}/services/{{service_id}}", get_service, methods=["GET"]),
    Route(f"{API}/services/{{service_id}}", update_service, methods=["PATCH"]),
    Route(f"{API}/services/{{service_id}}", decommission_service, methods=["DELETE"]),
    Route(f"{API}/services/{{service_id}}/enrolment-token", new_enrolment_token, methods=["POST"]),
    Route(f"{API}/ca/root", ca_root, methods=["GET"]),
    Route(f"{API}/ca/intermediate", ca_intermediate, methods=["GET"]),
    Route(f"{API}/ca/chain", ca_chain, methods=["GET"]),
    Route(f"{API}/ca/intermediate/{{ski}}", ca_intermediate_by_ski, methods=["GET"]),
    Route(f"{API}/ca/bundle", ca_bundle, methods=["GET"]),
    Route(f"{API}/ca/roots", ca_roots, methods=["GET"]),
    Route(f"{API}/crl", crl, methods=["GET"]),
    Route(f"{API}/audit", audit_log, methods=["GET"]),
    Route(f"{API}/crl/{{ski}}", crl_of_issuer, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/health/live", liveness, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/docs", api_docs, methods=["GET"]),
]
