"""Authority: the CA's use cases (register, enrol, issue, renew, revoke, CRL, tokens). Owns the clock.

Callers (the CLI, the HTTP API, the health checker) pass an :class:`Actor`; the authority
decides what that actor may do, so both front ends share one set of rules (SPEC §4).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import tokens
from .ca import REASONS, CertificateAuthority, LeafTemplate, generate_key, leaf_subject_text
from .encoding import pem_text
from .errors import CAUnavailable, Conflict, InvalidRequest, NotAuthenticated, NotFound, NotPermitted, UnknownService
from .policy import Policy, check_public_key, check_service_id, is_ip, load_csr_key, normalize_sans
from .store import (
    CertificateQuery,
    CertificateRecord,
    CRLRecord,
    Health,
    ServiceRecord,
    Store,
    TokenRecord,
    current_certificate,
    utc_text,
)

log = logging.getLogger("vcc_pki_server.authority")
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@attrs.frozen(kw_only=True)
class Actor:
    """Who asks. ``kind``: operator (local CLI), admin (API token), service (mTLS), enrolment."""

    kind: str
    label: str
    service_id: str | None = None
    token_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.kind in ("operator", "admin", "system")

    @classmethod
    def operator(cls) -> Actor:
        return cls(kind="operator", label="cli")

    @classmethod
    def system(cls, what: str) -> Actor:
        return cls(kind="system", label=what)


@attrs.frozen
class Issued:
    """A certificate handed out, already recorded in the store."""

    certificate: x509.Certificate
    record: CertificateRecord
    chain: tuple[x509.Certificate, ...]


@attrs.frozen(kw_only=True)
class Settings:
    """Authority settings from ``config.toml`` (``[policy]``)."""

    crl_validity: timedelta = timedelta(days=7)
    enrolment_token_ttl: timedelta = timedelta(hours=24)
    crl_cache_ttl: float = 2.0  # seconds a server trusts its cached CRL before asking the store


_SERVICE_FIELDS = ("service_name", "endpoints", "health_check_url", "version", "owner", "metadata")
_ADMIN_FIELDS = ("san_dns", "san_ip")


class Authority:
    """The CA's use cases over a :class:`~vcc_pki_server.store.Store`.

    ``ca`` may be None for work that needs no CA key (listing, registering, tokens); signing
    then raises :class:`CAUnavailable`.
    """

    def __init__(self, store: Store, ca: CertificateAuthority | None, *, policy: Policy | None = None,
                 settings: Settings | None = None, clock: Clock = utc_now) -> None:
        self.store = store
        self._ca = ca
        self.policy = policy or Policy()
        self.settings = settings or Settings()
        self.clock = clock
        self._crl_cache: tuple[float, CRLRecord] | None = None
        self._crl_lock = threading.Lock()
        self._crl_pem: tuple[int, bytes] | None = None

    @property
    def ca(self) -> CertificateAuthority:
        if self._ca is None:
            raise CAUnavailable("the CA key is not loaded")
        return self._ca

    # -- authentication ---------------------------------------------------------------------
    def authenticate_certificate(self, der: bytes) -> Actor:
        """The service a client certificate belongs to. The handshake already checked the chain;
        here it must be ours (the store's certificate of that serial, same fingerprint), unrevoked
        and in its validity window — checked on every request, since resumed TLS sessions skip
        the handshake's checks."""
        try:
            serial = format(x509.load_der_x509_certificate(der).serial_number, "x")
        except ValueError:
            raise NotAuthenticated("client certificate cannot be parsed") from None
        record = self.store.get_certificate(serial)
        if record is None or record.fingerprint != hashlib.sha256(der).hexdigest():
            raise NotAuthenticated("client certificate is not known to this CA")
        status = record.status(self.clock())
        if status != "valid":
            raise NotAuthenticated(f"client certificate {record.serial} is {status}")
        return Actor(kind="service", label=f"service:{record.service_id}", service_id=record.service_id)

    def authenticate_token(self, value: str) -> Actor:
        """The admin or enrolment actor of a bearer token; expired, revoked, spent or unknown
        tokens authenticate nobody."""
        parsed = tokens.parse_token(value)
        if parsed is None:
            raise NotAuthenticated("malformed bearer token", code="invalid_token")
        kind, token_id, secret = parsed
        record = self.store.get_token(token_id)
        if record is None or record.kind != kind or not tokens.secret_matches(record, secret):
            raise NotAuthenticated("unknown bearer token", code="invalid_token")
        now = self.clock()
        if record.revoked_at is not None:
            raise NotAuthenticated(f"token {token_id} is revoked", code="invalid_token")
        if record.expires_at is not None and record.expires_at <= now:
            raise NotAuthenticated(f"token {token_id} has expired", code="invalid_token")
        if record.used_at is not None:
            raise NotAuthenticated(f"enrolment token {token_id} was already used", code="invalid_token")
        if kind == "admin":
            return Actor(kind="admin", label=f"admin:{token_id}", token_id=token_id)
        return Actor(kind="enrolment", label=f"enrolment:{token_id}", service_id=record.service_id,
                     token_id=token_id)

    @staticmethod
    def _require(actor: Actor, service_id: str, what: str, *, enrolment: bool = False) -> None:
        if actor.is_admin:
            return
        if actor.kind == "enrolment" and not enrolment:
            # SPEC §4: an enrolment token buys the first certificate, once, and nothing else.
            raise NotPermitted(f"an enrolment token may only request the first certificate, not {what}")
        if actor.service_id != service_id:
            raise NotPermitted(f"{actor.label} may not {what} for service '{service_id}'")

    # -- tokens -----------------------------------------------------------------------------
    def create_admin_token(self, *, name: str | None, expires_days: int | None, actor: Actor) -> tokens.NewToken:
        if expires_days is not None and expires_days < 1:
            raise InvalidRequest(f"--expires-days must be at least 1, got {expires_days}")
        now = self.clock()
        expires = now + timedelta(days=expires_days) if expires_days else None
        token = tokens.new_token("admin", now=now, name=name, expires_at=expires)
        self.store.add_token(token.record, actor=actor.label)
        log.info("admin token created token_id=%s name=%s", token.record.token_id, name)
        return token

    def new_enrolment_token(self, service_id: str, *, actor: Actor) -> tokens.NewToken:
        if not actor.is_admin:
            raise NotPermitted("only an admin creates enrolment tokens")
        self.service(service_id)
        now = self.clock()
        token = tokens.new_token("enrolment", now=now, service_id=service_id,
                                 expires_at=now + self.settings.enrolment_token_ttl)
        self.store.add_token(token.record, actor=actor.label)
        return token

    def list_tokens(self, kind: str | None = None) -> list[TokenRecord]:
        return self.store.list_tokens(kind)

    def revoke_token(self, token_id: str, *, actor: Actor) -> TokenRecord:
        return self.store.revoke_token(token_id, at=self.clock(), actor=actor.label)

    # -- registry ---------------------------------------------------------------------------
    def service(self, service_id: str) -> ServiceRecord:
        record = self.store.get_service(check_service_id(service_id))
        if record is None:
            raise UnknownService(service_id)
        return record

    def register_service(self, service_id: str, *, service_name: str | None = None,
                         san_dns: Iterable[str] = (), san_ip: Iterable[str] = (),
                         actor: Actor, **fields: Any) -> tuple[ServiceRecord, tokens.NewToken]:
        """Register a new service and make its one-time enrolment token.

        With no SANs, the allow-list is the service id itself (a single-label DNS name).
        """
        if not actor.is_admin:
            raise NotPermitted("only an admin registers new services")
        check_service_id(service_id)
        dns, ips = normalize_sans(san_dns, san_ip)
        if not dns and not ips:
            dns = (service_id,)
        now = self.clock()
        values = _check_fields(fields)
        record = ServiceRecord(service_id=service_id, service_name=service_name or service_id,
                               san_dns=dns, san_ip=tuple(str(i) for i in ips),
                               created_at=now, updated_at=now, **values)
        token = tokens.new_token("enrolment", now=now, service_id=service_id,
                                 expires_at=now + self.settings.enrolment_token_ttl)
        self.store.add_service(record, actor=actor.label, token=token.record)
        log.info("service registered service_id=%s san_dns=%s san_ip=%s", service_id,
                 ",".join(dns), ",".join(record.san_ip))
        return record, token

    def update_service(self, service_id: str, changes: dict[str, Any], *, actor: Actor) -> ServiceRecord:
        """Change a registry entry: a service its own descriptive fields, an admin anything."""
        self._require(actor, service_id, "update the registry entry")
        current = self.service(service_id)
        unknown = set(changes) - set(_SERVICE_FIELDS) - set(_ADMIN_FIELDS)
        if unknown:
            raise InvalidRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
        if not actor.is_admin and set(changes) & set(_ADMIN_FIELDS):
            raise NotPermitted("only an admin changes a SAN allow-list")
        values: dict[str, Any] = _check_fields({k: v for k, v in changes.items() if k in _SERVICE_FIELDS})
        if "service_name" in changes:
            values["service_name"] = changes["service_name"]
        if "san_dns" in changes or "san_ip" in changes:
            dns, ips = normalize_sans(_str_list(changes.get("san_dns", current.san_dns), "san_dns"),
                                      _str_list(changes.get("san_ip", current.san_ip), "san_ip"))
            values["san_dns"], values["san_ip"] = dns, tuple(str(i) for i in ips)
        updated = attrs.evolve(current, updated_at=self.clock(), **values)
        self.store.update_service(updated, actor=actor.label)
        return updated

    def list_services(self, *, healthy: bool | None = None, limit: int = 100,
                      after: str | None = None) -> list[ServiceRecord]:
        return self.store.list_services(healthy=healthy, limit=limit, after=after)

    def record_health(self, service_id: str, ok: bool, error: str | None) -> Health:
        """Store a probe result; a change between healthy and unhealthy goes to the audit log."""
        current = self.service(service_id).health
        now = self.clock()
        if ok:
            health = Health(status="healthy", last_checked=now, last_error=None, consecutive_failures=0)
        else:
            health = Health(status="unhealthy", last_checked=now, last_error=error,
                            consecutive_failures=current.consecutive_failures + 1)
        event = None
        if health.status != current.status:
            event = "service.healthy" if ok else "service.unhealthy"
        self.store.record_health(service_id, health, event=event)
        return health

    # -- certificates -----------------------------------------------------------------------
    def current(self, service_id: str) -> CertificateRecord:
        """The service's current certificate: the newest one that is valid now."""
        self.service(service_id)
        record = current_certificate(self.store.certificates_for(service_id), self.clock())
        if record is not None:
            return record
        raise NotFound(f"service '{service_id}' has no valid certificate", code="unknown_certificate")

    def certificates(self, service_id: str) -> list[CertificateRecord]:
        self.service(service_id)
        return self.store.certificates_for(service_id)

    def list_certificates(self, *, service_id: str | None = None, status: str | None = None,
                          expiring_within_days: int | None = None, limit: int = 100,
                          after: int | None = None) -> list[CertificateRecord]:
        if status not in (None, "valid", "revoked", "expired"):
            raise InvalidRequest(f"status must be valid, revoked or expired, got {status!r}")
        now = self.clock()
        expiring = now + timedelta(days=expiring_within_days) if expiring_within_days is not None else None
        return self.store.list_certificates(CertificateQuery(
            service_id=service_id, status=status, expiring_before=expiring, now=now, limit=limit,
            after=after))

    def _record(self, service_id: str, cert: x509.Certificate, actor: Actor, *,
                template: LeafTemplate | None = None) -> Issued:
        return self.record_issued([(self._issued(service_id, cert, template), actor)])[0].result()

    def _issued(self, service_id: str, cert: x509.Certificate,
                template: LeafTemplate | None = None) -> Issued:
        """The record of a certificate just signed (from ``template``, the SANs it was given)."""
        if template is None:
            record = CertificateRecord.from_cert(service_id, cert, issued_at=self.clock())
        else:
            record = CertificateRecord.from_cert(service_id, cert, issued_at=self.clock(),
                                                 sans=(template.san_dns, template.san_ip),
                                                 subject=leaf_subject_text(template.common_name))
        return Issued(cert, record, self.ca.chain)

    @contextlib.contextmanager
    def _recording(self, issued: Issued, actor: Actor) -> Iterator[None]:
        """Around the store's write: a spent enrolment token is 401; log once recorded."""
        try:
            yield
        except Conflict as exc:
            if exc.code == "invalid_token":
                raise NotAuthenticated("enrolment token was already used", code="invalid_token") from None
            raise
        if log.isEnabledFor(logging.INFO):  # utc_text() is work even when the line is dropped
            record = issued.record
            log.info("certificate issued service_id=%s serial=%s not_after=%s actor=%s",
                     record.service_id, record.serial, utc_text(record.not_after), actor.label)

    def sign_request(self, service_id: str, csr_pem: str | bytes, *, actor: Actor,
                     validity_days: object = None) -> Issued:
        """Check who asks, the CSR and the policy; sign. Nothing is recorded yet: that is
        :meth:`record_issued`, and a certificate is handed out only once recorded."""
        self._require(actor, service_id, "request a certificate", enrolment=True)
        service = self.service(service_id)
        csr, public_key = load_csr_key(csr_pem)
        template = self.policy.template(service.service_id, service.san_dns, service.san_ip, csr,
                                        now=self.clock(), validity_days=validity_days)
        cert = self.ca.sign_leaf(public_key, template)
        return self._issued(service_id, cert, template)

    def record_issued(self, batch: Sequence[tuple[Issued, Actor]]) -> list[Future[Issued]]:
        """Queue signed certificates for the store's group commit, all at once (so that they
        share a transaction); each future settles once its certificate is recorded or refused.

        An enrolment actor's token is spent in the same transaction: a refused request leaves
        it usable, and two concurrent uses cannot both get a certificate (the second is 401).
        """
        stored = self.store.submit_certificates(
            [(issued.record, actor.label, actor.token_id if actor.kind == "enrolment" else None)
             for issued, actor in batch])
        results: list[Future[Issued]] = []
        for (issued, actor), done in zip(batch, stored, strict=True):
            result: Future[Issued] = Future()
            result.set_running_or_notify_cancel()
            done.add_done_callback(functools.partial(self._settle, issued, actor, result))
            results.append(result)
        return results

    def _settle(self, issued: Issued, actor: Actor, result: Future[Issued], done: Future[None]) -> None:
        try:
            with self._recording(issued, actor):
                done.result()
        except BaseException as exc:
            result.set_exception(exc)
        else:
            result.set_result(issued)

    def issue(self, service_id: str, csr_pem: str | bytes, *, actor: Actor,
              validity_days: object = None) -> Issued:
        """Issue a certificate from a CSR for ``service_id`` (:meth:`sign_request`, then
        :meth:`record_issued`); returns once it is recorded."""
        issued = self.sign_request(service_id, csr_pem, actor=actor, validity_days=validity_days)
        return self.record_issued([(issued, actor)])[0].result()

    def issue_with_key(self, service_id: str, *, common_name: str | None, san_dns: Iterable[str] = (),
                       san_ip: Iterable[str] = (), key_type: str = "rsa-2048",
                       validity_days: object = None, actor: Actor,
                       service_name: str | None = None) -> tuple[Issued, Any]:
        """Local admin issuance with a key generated here (the prototype's ``cert issue``).

        An unknown service is registered first with the given names as its allow-list.
        """
        check_service_id(service_id)
        names, ips = list(san_dns), list(san_ip)
        if common_name and common_name not in names and common_name not in ips:
            (ips if is_ip(common_name) else names).insert(0, common_name)  # the CN is one of the SANs
        # Check what can fail before registering: a refused request must not leave a new
        # service behind without its certificate.
        if self._ca is None:
            raise CAUnavailable("the CA key is not loaded")
        not_before, not_after = self.policy.validity(validity_days, self.clock())
        key = generate_key(key_type)
        if self.store.get_service(service_id) is None:
            self.register_service(service_id, service_name=service_name, san_dns=names, san_ip=ips,
                                  actor=actor)
        service = self.service(service_id)
        cn, dns, ip_list = self.policy.grant_names(service_id, service.san_dns, service.san_ip,
                                                   cn=common_name, dns=names, ips=ips)
        template = LeafTemplate(common_name=cn, san_dns=dns, san_ip=ip_list,
                                not_before=not_before, not_after=not_after)
        cert = self.ca.sign_leaf(key.public_key(), template)
        return self._record(service_id, cert, actor, template=template), key

    def renew(self, service_id: str, *, actor: Actor, csr_pem: str | bytes | None = None,
              validity_days: object = None) -> Issued:
        """A new certificate (new serial, new validity) for the service's current one.

        Without a CSR the public key stays (renewal); with one it changes (rekey). The names
        are those of the current certificate, checked again against the allow-list. The
        previous certificate is not revoked.
        """
        self._require(actor, service_id, "renew certificates")
        service = self.service(service_id)
        current = self.current(service_id)
        now = self.clock()
        if csr_pem is not None:
            csr, public_key = load_csr_key(csr_pem)
            template = self.policy.template(service_id, service.san_dns, service.san_ip, csr, now=now,
                                            validity_days=validity_days)
        else:
            old = current.certificate()
            cn_attrs = old.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
            cn, dns, ips = self.policy.grant_names(
                service_id, service.san_dns, service.san_ip,
                cn=str(cn_attrs[0].value) if cn_attrs else None,
                dns=current.san_dns, ips=current.san_ip)
            not_before, not_after = self.policy.validity(validity_days, now)
            template = LeafTemplate(common_name=cn, san_dns=dns, san_ip=ips, not_before=not_before,
                                    not_after=not_after)
            public_key = check_public_key(old.public_key())
        return self._record(service_id, self.ca.sign_leaf(public_key, template), actor,
                            template=template)

    def revoke(self, service_id: str, *, reason: str = "unspecified", serial: str | None = None,
               actor: Actor) -> CertificateRecord:
        """Revoke ``serial`` (or the service's current certificate) and publish a new CRL."""
        self._require(actor, service_id, "revoke certificates")
        if reason not in REASONS:
            raise InvalidRequest(f"unknown revocation reason {reason!r}; use one of {', '.join(REASONS)}")
        if serial is None:
            target = self.current(service_id)
        else:
            self.service(service_id)
            record = self.store.get_certificate(serial.lower().lstrip("0") or "0")
            if record is None or record.service_id != service_id:
                raise NotFound(f"service '{service_id}' has no certificate with serial {serial}",
                               code="unknown_certificate")
            target = record
        revoked = self.store.revoke_certificate(target.serial, reason=reason, at=self.clock(),
                                                actor=actor.label)
        log.info("certificate revoked service_id=%s serial=%s reason=%s actor=%s", service_id,
                 revoked.serial, reason, actor.label)
        if self._ca is not None:
            self.generate_crl(actor=actor)
        return revoked

    # -- CRL --------------------------------------------------------------------------------
    def generate_crl(self, *, actor: Actor) -> CRLRecord:
        """Sign and store a new CRL of every revoked certificate."""
        ca = self.ca
        now = self.clock()
        next_update = now + self.settings.crl_validity

        def build(number: int, revoked: list[tuple[str, datetime, str]]) -> CRLRecord:
            crl = ca.build_crl([(int(s, 16), at, reason) for s, at, reason in revoked],
                               number=number, this_update=now, next_update=next_update)
            return CRLRecord(number=number, this_update=now, next_update=next_update,
                             der=crl.public_bytes(serialization.Encoding.DER), entries=len(revoked))

        crl = self.store.new_crl(build, actor=actor.label)
        with self._crl_lock:
            self._crl_cache = (time.monotonic(), crl)
        log.info("CRL generated number=%d entries=%d next_update=%s", crl.number, crl.entries,
                 utc_text(crl.next_update))
        return crl

    def cached_crl(self) -> CRLRecord | None:
        """The cached CRL while it is younger than ``crl_cache_ttl`` (no store access, so an
        event loop may call it), else None: then call :meth:`crl`."""
        cached = self._crl_cache
        if cached is not None and time.monotonic() - cached[0] < self.settings.crl_cache_ttl:
            return cached[1]
        return None

    def cached_crl_pem(self, crl: CRLRecord) -> bytes | None:
        """:meth:`crl_pem` if it is already made, else None."""
        cached = self._crl_pem
        return cached[1] if cached is not None and cached[0] == crl.number else None

    def crl_pem(self, crl: CRLRecord) -> bytes:
        """``crl`` as PEM, made once per CRL number (a 100k-entry CRL is 5 MB)."""
        cached = self.cached_crl_pem(crl)
        if cached is not None:
            return cached
        pem = pem_text(crl.der, "X509 CRL").encode("ascii")
        self._crl_pem = (crl.number, pem)
        return pem

    def crl(self) -> CRLRecord:
        """The newest stored CRL, cached for ``crl_cache_ttl`` seconds; one is made if none exists."""
        with self._crl_lock:
            cached = self._crl_cache
        if cached is not None and time.monotonic() - cached[0] < self.settings.crl_cache_ttl:
            return cached[1]
        if cached is not None and self.store.latest_crl_number() == cached[1].number:
            with self._crl_lock:
                self._crl_cache = (time.monotonic(), cached[1])
            return cached[1]
        crl = self.store.latest_crl()
        if crl is None:
            return self.generate_crl(actor=Actor.system("crl"))
        with self._crl_lock:
            self._crl_cache = (time.monotonic(), crl)
        return crl

    def refresh_crl_if_due(self) -> CRLRecord | None:
        """Regenerate the CRL once half its lifetime has passed, well before nextUpdate."""
        crl = self.store.latest_crl()
        now = self.clock()
        if crl is None or now >= crl.this_update + (crl.next_update - crl.this_update) / 2:
            return self.generate_crl(actor=Actor.system("crl-refresh"))
        return None


def _str_list(value: object, name: str) -> list[str]:
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidRequest(f"{name} must be a list of strings")


def _check_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Type-check the descriptive registry fields; unknown ones are refused."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if name == "endpoints":
            out[name] = tuple(_str_list(value, name))
        elif name == "metadata":
            if not isinstance(value, dict):
                raise InvalidRequest("metadata must be an object")
            out[name] = value
        elif name in ("health_check_url", "version", "owner", "service_name"):
            if value is not None and not isinstance(value, str):
                raise InvalidRequest(f"{name} must be a string")
            if name != "service_name":
                out[name] = value
        else:
            raise InvalidRequest(f"unknown field {name!r}")
    return out
