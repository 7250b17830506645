"""Issuance: signing certificates from CSRs (or for keys made here) and recording them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from datetime import timedelta
from typing import Any

from cryptography import x509

from ..ca import LeafPublicKey, LeafTemplate, generate_key, leaf_subject_text
from ..errors import CAUnavailable, Conflict, InvalidCSR, InvalidRequest, NotAuthenticated, NotFound, PolicyRefused
from ..policy import MIN_LIFETIME, Lifetimes, check_public_key, check_service_id, is_ip, load_csr_key
from ..store import CertificateQuery, CertificateRecord, ServiceRecord, current_certificate, utc_text
from .base import Actor, Issued, log
from .tokens import Tokens


class Issuance(Tokens):
    """Certificates: the current one, listings, issuing, renewing."""

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

    def _record(self, service_id: str, public_key: LeafPublicKey, template: LeafTemplate, actor: Actor) -> Issued:
        return self._recorded(self._signed(service_id, public_key, template), actor)

    def _signed(self, service_id: str, public_key: LeafPublicKey, template: LeafTemplate) -> Issued:
        """Sign with the current CA (taken once: a rotation meanwhile changes nothing here) and
        make the record of the certificate (from ``template``, the SANs it was given)."""
        ca = self.ca
        cert = ca.sign_leaf(public_key, template)
        record = CertificateRecord.from_cert(service_id, cert, issued_at=self.clock(),
                                             sans=(template.san_dns, template.san_ip),
                                             subject=leaf_subject_text(template.common_name), issuer=ca.ski)
        return Issued(cert, record, ca.chain)

    def sign_request(self, service_id: str, csr_pem: str | bytes, *, actor: Actor,
                     validity: timedelta | None = None) -> Issued:
        """Check who asks, the CSR and the policy; sign. Nothing is recorded yet: that is
        :meth:`record_issued`, and a certificate is handed out only once recorded."""
        self._require(actor, service_id, "request a certificate", enrolment=True)
        service = self.service(service_id)
        try:
            csr, public_key = load_csr_key(csr_pem)
            template = self.policy.template(service.service_id, service.san_dns, service.san_ip, csr,
                                            now=self.clock(), validity=validity, lifetimes=lifetimes(service))
        except (InvalidCSR, InvalidRequest, PolicyRefused) as refused:
            if actor.kind == "enrolment" and actor.token_id is not None:
                limit = self.settings.enrolment_refusals
                if self.store.note_token_refusal(actor.token_id, limit=limit, at=self.clock(), actor=actor.label):
                    log.warning("enrolment token %s of service %s locked after %d refused requests",
                                actor.token_id, service_id, limit)
            raise refused
        return self._signed(service_id, public_key, template)

    def record_issued(self, batch: Sequence[tuple[Issued, Actor]],
                      done: Callable[[list[Issued | BaseException]], None]) -> None:
        """Queue signed certificates for the store's group commit, all at once (so that they
        share a transaction); ``done`` gets, once all are recorded or refused, each one's
        outcome: the :class:`Issued`, or the error to answer with.

        An enrolment actor's token is spent in the same transaction: a refused request leaves
        it usable, and two concurrent uses cannot both get a certificate (the second is 401).
        """
        def settle(errors: list[BaseException | None]) -> None:
            outcomes: list[Issued | BaseException] = []
            logging_on = log.isEnabledFor(logging.INFO)  # utc_text() is work even when dropped
            for (issued, actor), error in zip(batch, errors, strict=True):
                if error is None:
                    outcomes.append(issued)
                    if logging_on:
                        record = issued.record
                        log.info("certificate issued service_id=%s serial=%s not_after=%s actor=%s",
                                 record.service_id, record.serial, utc_text(record.not_after),
                                 actor.label)
                elif isinstance(error, Conflict) and error.code == "invalid_token":
                    outcomes.append(NotAuthenticated("enrolment token was already used",
                                                     code="invalid_token"))
                else:
                    outcomes.append(error)
            done(outcomes)

        self.store.submit_certificates(
            [(issued.record, actor.label, actor.token_id if actor.kind == "enrolment" else None)
             for issued, actor in batch], settle)

    def _recorded(self, issued: Issued, actor: Actor) -> Issued:
        """:meth:`record_issued` for one certificate, waiting until it is recorded."""
        answer: Future[list[Issued | BaseException]] = Future()
        self.record_issued([(issued, actor)], answer.set_result)
        outcome = answer.result()[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def issue(self, service_id: str, csr_pem: str | bytes, *, actor: Actor,
              validity: timedelta | None = None) -> Issued:
        """Issue a certificate from a CSR for ``service_id`` (:meth:`sign_request`, then
        :meth:`record_issued`); returns once it is recorded."""
        issued = self.sign_request(service_id, csr_pem, actor=actor, validity=validity)
        return self._recorded(issued, actor)

    def issue_with_key(self, service_id: str, *, common_name: str | None, san_dns: Iterable[str] = (),
                       san_ip: Iterable[str] = (), key_type: str = "rsa-2048",
                       validity: timedelta | None = None, actor: Actor,
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
        if not self.has_ca:
            raise CAUnavailable("the CA key is not loaded")
        existing = self.store.get_service(service_id)
        not_before, not_after = self.policy.validity(
            validity, self.clock(), service=lifetimes(existing) if existing else Lifetimes())
        key = generate_key(key_type)
        if existing is None:
            self.register_without_token(service_id, service_name=service_name, san_dns=names, san_ip=ips,
                                        actor=actor)
        service = self.service(service_id)
        cn, dns, ip_list = self.policy.grant_names(service_id, service.san_dns, service.san_ip,
                                                   cn=common_name, dns=names, ips=ips)
        template = LeafTemplate(common_name=cn, san_dns=dns, san_ip=ip_list, uri=self.policy.spiffe_id(service_id),
                                not_before=not_before, not_after=not_after)
        return self._record(service_id, key.public_key(), template, actor), key

    def renew(self, service_id: str, *, actor: Actor, csr_pem: str | bytes | None = None,
              validity: timedelta | None = None) -> Issued:
        """A new certificate (new serial, new validity) for the service's current one.

        Without a CSR the public key stays (renewal); with one it changes (rekey). The names
        are those of the current certificate, checked again against the allow-list. Without
        ``validity`` the new certificate gets the lifetime of the one renewed (capped by
        the policy). The previous certificate is not revoked.
        """
        self._require(actor, service_id, "renew certificates")
        service = self.service(service_id)
        current = self.current(service_id)
        now = self.clock()
        limits = lifetimes(service)
        if validity is None:  # keep the lifetime of the certificate renewed
            kept = max(current.not_after - current.issued_at, MIN_LIFETIME)  # notBefore is backdated
            _, not_after = self.policy.validity(kept, now, service=limits, cap=True)
            validity = not_after - now
        if csr_pem is not None:
            csr, public_key = load_csr_key(csr_pem)
            template = self.policy.template(service_id, service.san_dns, service.san_ip, csr, now=now,
                                            validity=validity, lifetimes=limits)
        else:
            old = current.certificate()
            cn_attrs = old.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
            cn, dns, ips = self.policy.grant_names(
                service_id, service.san_dns, service.san_ip,
                cn=str(cn_attrs[0].value) if cn_attrs else None,
                dns=current.san_dns, ips=current.san_ip)
            not_before, not_after = self.policy.validity(validity, now, service=limits)
            template = LeafTemplate(common_name=cn, san_dns=dns, san_ip=ips, uri=self.policy.spiffe_id(service_id),
                                    not_before=not_before,
                                    not_after=not_after)
            public_key = check_public_key(old.public_key())
        return self._record(service_id, public_key, template, actor)


def lifetimes(service: ServiceRecord) -> Lifetimes:
    """The lifetime settings an admin gave ``service`` (none: the server's policy)."""
    def seconds(value: int | None) -> timedelta | None:
        return None if value is None else timedelta(seconds=value)

    return Lifetimes(default=seconds(service.default_validity_seconds),
                     maximum=seconds(service.max_validity_seconds))
