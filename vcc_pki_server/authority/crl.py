"""Revocation and the CRLs: revoking certificates, and signing, caching and refreshing the CRL
of each issuing CA (SPEC §13: every unexpired intermediate signs the CRL of its certificates)."""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from vcc_pki_client.identity import PKI_SERVER_ID

from ..ca import REASONS
from ..encoding import pem_text
from ..errors import CAUnavailable, Conflict, InvalidRequest, NotFound, NotPermitted
from ..policy import check_service_id
from ..store import BuildCRL, CRLRecord, Publisher, Revoked, utc_text
from .base import Actor, log
from .issuance import Issuance


class Revocation(Issuance):
    """Revoking, and the CRL every revocation is published in (cached in memory briefly)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Per issuer (SKI): the CRL held and when it was last read, and its PEM once made.
        self._crl_cache: dict[str, tuple[float, CRLRecord]] = {}
        self._crl_lock = threading.Lock()
        self._crl_pem: dict[str, tuple[int, bytes]] = {}

    def revoke(self, service_id: str, *, reason: str = "unspecified", serial: str | None = None,
               all_certificates: bool = False, actor: Actor) -> Revoked:
        """Revoke ``serial`` (or the service's current certificate) and publish a new CRL.

        With ``all_certificates`` every unexpired certificate of the service goes too; with
        ``reason="keyCompromise"`` every unexpired certificate with the same public key, of any
        service (they carry keyCompromise too). One transaction: all of them or none.
        """
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
        now = self.clock()
        try:
            revoked = self.store.revoke_certificates(target.serial, reason=reason, at=now, actor=actor.label,
                                                     service_wide=all_certificates,
                                                     same_key=reason == "keyCompromise",
                                                     publish=self._publisher(now))
        except Conflict as exc:
            if exc.code == "already_revoked":  # a retry: make sure the CRL says so too
                self.republish_if_behind(actor=actor)
            raise
        log.info("certificate revoked service_id=%s serial=%s reason=%s actor=%s%s", service_id,
                 target.serial, reason, actor.label,
                 f" also={','.join(revoked.serials[1:])}" if len(revoked.serials) > 1 else "")
        for crl in revoked.crls:
            self._published(crl)
        return revoked

    def decommission(self, service_id: str, *, actor: Actor) -> list[str]:
        """Take a service out (SPEC §10): its unexpired certificates revoked
        (cessationOfOperation), its enrolment tokens spent, gone from the registry; a new CRL.
        Returns the serials revoked. Admins only."""
        if not actor.is_admin:
            raise NotPermitted("only an admin decommissions a service")
        if service_id == PKI_SERVER_ID:
            raise NotPermitted("the CA server's own service cannot be decommissioned")
        now = self.clock()
        serials, crls = self.store.decommission_service(check_service_id(service_id), at=now, actor=actor.label,
                                                        publish=self._publisher(now))
        log.info("service decommissioned service_id=%s revoked=%d actor=%s", service_id, len(serials), actor.label)
        for crl in crls:
            self._published(crl)
        return serials

    def generate_crl(self, *, actor: Actor, issuer: str | None = None) -> CRLRecord:
        """Sign and store a new CRL of every revoked certificate of ``issuer`` (an SKI; by
        default the current intermediate)."""
        now = self.clock()
        publish = self._publisher(now)
        if publish is None:
            raise CAUnavailable("the CA key is not loaded")
        issuer = issuer or self.ca.ski
        return self._published(self.store.new_crl(publish(issuer), issuer=issuer, at=now, actor=actor.label))

    def republish_if_behind(self, *, actor: Actor) -> list[CRLRecord]:
        """A new CRL of each issuer whose newest one lacks an unexpired revocation the store
        holds (one recorded by a version that published the CRL in a second step, and crashed
        between); none when they are complete or the CA key is not loaded."""
        if not self.has_ca:
            return []
        published = []
        for issuer in self.cas.issuers:
            stored = self.store.latest_crl(issuer)
            listed: set[int] = set()
            if stored is not None and stored.der:
                listed = {entry.serial_number for entry in x509.load_der_x509_crl(stored.der)}
            now = self.clock()
            missing = [s for s, _, _ in self.store.revoked(unexpired_at=now, issuer=issuer)
                       if int(s, 16) not in listed]
            if stored is not None and not missing:
                continue
            log.warning("the CRL of issuer %s lacks %d revoked certificate(s); publishing a new one",
                        issuer, len(missing))
            published.append(self.generate_crl(actor=actor, issuer=issuer))
        return published

    def _publisher(self, now: datetime) -> Publisher | None:
        """How each issuer signs the CRL published at ``now`` (None without the CA keys)."""
        if not self.has_ca:
            return None
        issuers = self.cas.issuers
        next_update = now + self.settings.crl_validity

        def publisher(issuer: str) -> BuildCRL:
            ca = issuers.get(issuer)
            if ca is None:
                raise CAUnavailable(f"this server holds no unexpired CA with subject key identifier {issuer!r}")

            def build(number: int, revoked: list[tuple[str, datetime, str]]) -> CRLRecord:
                crl = ca.build_crl([(int(s, 16), at, reason) for s, at, reason in revoked],
                                   number=number, this_update=now, next_update=next_update)
                return CRLRecord(number=number, this_update=now, next_update=next_update, issuer=issuer,
                                 der=crl.public_bytes(serialization.Encoding.DER), entries=len(revoked))

            return build

        return publisher

    def _published(self, crl: CRLRecord) -> CRLRecord:
        with self._crl_lock:
            self._crl_cache[crl.issuer] = (time.monotonic(), crl)
        log.info("CRL generated number=%d entries=%d next_update=%s issuer=%s", crl.number, crl.entries,
                 utc_text(crl.next_update), crl.issuer)
        return crl

    def held_crl(self, issuer: str | None = None) -> CRLRecord | None:
        """The CRL of ``issuer`` (default: the current intermediate) this process holds (the
        newest it published or read), without asking the store (an event loop may call it);
        None before any."""
        cached = self._crl_cache.get(issuer or self.ca.ski)
        return cached[1] if cached is not None else None

    def cached_crl_pem(self, crl: CRLRecord) -> bytes | None:
        """:meth:`crl_pem` if it is already made, else None."""
        cached = self._crl_pem.get(crl.issuer)
        return cached[1] if cached is not None and cached[0] == crl.number else None

    def crl_pem(self, crl: CRLRecord) -> bytes:
        """``crl`` as PEM, made once per CRL number (a 100k-entry CRL is 5 MB)."""
        cached = self.cached_crl_pem(crl)
        if cached is not None:
            return cached
        pem = pem_text(crl.der, "X509 CRL").encode("ascii")
        self._crl_pem[crl.issuer] = (crl.number, pem)
        return pem

    def crl(self, *, issuer: str | None = None, at_least: int | None = None) -> CRLRecord:
        """The newest stored CRL of ``issuer`` (default: the current intermediate); one is made
        if none exists. The one held is trusted for ``crl_cache_ttl`` seconds, or, with
        ``at_least`` (a number the store was just seen to hold), while its number is that high."""
        issuer = issuer or self.ca.ski
        with self._crl_lock:
            cached = self._crl_cache.get(issuer)
        if cached is not None and (cached[1].number >= at_least if at_least is not None else
                                   time.monotonic() - cached[0] < self.settings.crl_cache_ttl):
            return cached[1]
        if cached is not None and self.store.latest_crl_number(issuer) == cached[1].number:
            with self._crl_lock:
                self._crl_cache[issuer] = (time.monotonic(), cached[1])
            return cached[1]
        crl = self.store.latest_crl(issuer)
        if crl is None:
            return self.generate_crl(actor=Actor.system("crl"), issuer=issuer)
        with self._crl_lock:
            self._crl_cache[issuer] = (time.monotonic(), crl)
        return crl

    def refresh_crl_if_due(self) -> list[CRLRecord]:
        """Regenerate each issuer's CRL once half its lifetime has passed, well before nextUpdate."""
        made = []
        for issuer in self.cas.issuers:
            crl = self.store.latest_crl(issuer)
            now = self.clock()
            if crl is None or now >= crl.this_update + (crl.next_update - crl.this_update) / 2:
                made.append(self.generate_crl(actor=Actor.system("crl-refresh"), issuer=issuer))
        return made
