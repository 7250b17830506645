"""The CA's use cases (SPEC §4): registration, one-time enrolment, tokens, renew/revoke rights, audit."""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from conftest import CA_PASSWORD, ROOT_PASSWORD
from support import make_csr
from vcc_pki_server.authority import Actor, Authority, Issued
from vcc_pki_server.ca import LeafTemplate
from vcc_pki_server.errors import (
    Conflict,
    InvalidCSR,
    InvalidRequest,
    NotAuthenticated,
    NotFound,
    NotPermitted,
    PolicyRefused,
    UnknownService,
)
from vcc_pki_server.home import Home
from vcc_pki_server.store import CertificateRecord
from vcc_pki_server.store.sqlite import SQLiteStore

ClockedAuthority = Callable[[datetime], Authority]


def spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def dns_name(service_id: str) -> str:
    return f"{service_id}.svc.internal"


@pytest.fixture
def at_time(ca_home: Home) -> Iterator[ClockedAuthority]:
    """Authorities over the session CA whose clock is stopped at a chosen moment."""
    stores: list[SQLiteStore] = []

    def make(moment: datetime) -> Authority:
        store = ca_home.open_store()
        stores.append(store)
        return Authority(store, ca_home.load_ca(CA_PASSWORD), clock=lambda: moment)

    yield make
    for store in stores:
        store.close()


def register(authority: Authority, service_id: str, operator: Actor) -> str:
    """Register ``service_id`` with a DNS and an IP name; return its enrolment token."""
    _, token = authority.register_service(service_id, service_name="Test", san_dns=[dns_name(service_id)],
                                          san_ip=["10.9.8.7"], actor=operator)
    return token.value


def enrol(authority: Authority, service_id: str, operator: Actor) -> Issued:
    token = register(authority, service_id, operator)
    csr, _ = make_csr(dns_name(service_id))
    return authority.issue(service_id, csr, actor=authority.authenticate_token(token))


def now() -> datetime:
    return datetime.now(timezone.utc)


# --- registry --------------------------------------------------------------------------------

def test_registering_an_existing_service_is_a_conflict(authority: Authority, operator: Actor,
                                                       service_id: str) -> None:
    register(authority, service_id, operator)
    before = len(authority.store.audit_log(service_id=service_id))
    with pytest.raises(Conflict, match=service_id):
        authority.register_service(service_id, san_dns=["other.example"], actor=operator)
    assert authority.service(service_id).san_dns == (dns_name(service_id),)
    assert len(authority.store.audit_log(service_id=service_id)) == before


def test_registration_without_sans_allows_the_service_id(authority: Authority, operator: Actor,
                                                         service_id: str) -> None:
    record, _ = authority.register_service(service_id, actor=operator)
    assert record.san_dns == (service_id,) and record.san_ip == ()


def test_only_an_admin_registers_services(authority: Authority, operator: Actor, service_id: str) -> None:
    issued = enrol(authority, service_id, operator)
    actor = authority.authenticate_certificate(der(issued.certificate))
    with pytest.raises(NotPermitted):
        authority.register_service("svc-not-allowed", actor=actor)
    assert authority.store.get_service("svc-not-allowed") is None


def test_unknown_service_is_reported_by_name(authority: Authority, operator: Actor) -> None:
    csr, _ = make_csr("nobody.svc.internal")
    with pytest.raises(UnknownService, match="svc-does-not-exist") as info:
        authority.issue("svc-does-not-exist", csr, actor=operator)
    assert info.value.code == "unknown_service"
    with pytest.raises(UnknownService):
        authority.service("svc-does-not-exist")
    with pytest.raises(UnknownService):
        authority.renew("svc-does-not-exist", actor=operator)
    with pytest.raises(UnknownService):
        authority.new_enrolment_token("svc-does-not-exist", actor=operator)


# --- enrolment tokens ------------------------------------------------------------------------

def test_enrolment_token_works_exactly_once(authority: Authority, operator: Actor, service_id: str) -> None:
    token = register(authority, service_id, operator)
    actor = authority.authenticate_token(token)
    assert actor.kind == "enrolment" and actor.service_id == service_id
    csr, _ = make_csr(dns_name(service_id))
    issued = authority.issue(service_id, csr, actor=actor)
    assert issued.record.service_id == service_id
    with pytest.raises(NotAuthenticated) as info:
        authority.authenticate_token(token)
    assert info.value.code == "invalid_token"
    # An actor authenticated before the token was spent cannot use it a second time either.
    with pytest.raises(NotAuthenticated):
        authority.issue(service_id, csr, actor=actor)
    assert len(authority.certificates(service_id)) == 1


def test_refused_request_does_not_consume_the_enrolment_token(authority: Authority, operator: Actor,
                                                              service_id: str) -> None:
    token = register(authority, service_id, operator)
    bad_csr, _ = make_csr(dns_name(service_id), dns=["evil.example"])
    with pytest.raises(PolicyRefused, match="evil.example"):
        authority.issue(service_id, bad_csr, actor=authority.authenticate_token(token))
    with pytest.raises(InvalidRequest):
        authority.issue(service_id, make_csr(dns_name(service_id))[0],
                        actor=authority.authenticate_token(token), validity=timedelta(days=9999))
    assert authority.certificates(service_id) == []
    good_csr, _ = make_csr(dns_name(service_id))
    issued = authority.issue(service_id, good_csr, actor=authority.authenticate_token(token))
    assert issued.record.san_dns == (dns_name(service_id),)


def test_enrolment_token_of_one_service_cannot_enrol_another(authority: Authority, operator: Actor,
                                                             service_id: str) -> None:
    token_a = register(authority, service_id, operator)
    other = f"{service_id}-b"
    register(authority, other, operator)
    csr, _ = make_csr(dns_name(other))
    with pytest.raises(NotPermitted, match=other):
        authority.issue(other, csr, actor=authority.authenticate_token(token_a))
    assert authority.certificates(other) == []
    authority.authenticate_token(token_a)  # still unused


def test_concurrent_uses_of_one_enrolment_token_yield_exactly_one_certificate(
    authority: Authority, operator: Actor, service_id: str
) -> None:
    token = register(authority, service_id, operator)
    csrs = [make_csr(dns_name(service_id))[0] for _ in range(8)]
    barrier = threading.Barrier(8)
    results: list[object] = []
    lock = threading.Lock()

    def attempt(csr: bytes) -> None:
        barrier.wait()
        try:
            outcome: object = authority.issue(service_id, csr, actor=authority.authenticate_token(token))
        except NotAuthenticated as exc:
            outcome = exc
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=attempt, args=(csr,)) for csr in csrs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 8
    assert sum(isinstance(r, Issued) for r in results) == 1
    assert sum(isinstance(r, NotAuthenticated) for r in results) == 7
    assert len(authority.certificates(service_id)) == 1


def test_expired_enrolment_token_is_rejected(authority: Authority, at_time: ClockedAuthority,
                                             operator: Actor, service_id: str) -> None:
    token = register(authority, service_id, operator)
    created = now()
    assert at_time(created + timedelta(hours=23)).authenticate_token(token).service_id == service_id
    with pytest.raises(NotAuthenticated, match="expired"):
        at_time(created + timedelta(hours=24, minutes=1)).authenticate_token(token)


def test_fresh_enrolment_token_replaces_a_spent_one(authority: Authority, operator: Actor,
                                                    service_id: str) -> None:
    enrol(authority, service_id, operator)
    token = authority.new_enrolment_token(service_id, actor=operator)
    actor = authority.authenticate_token(token.value)
    assert actor.service_id == service_id
    authority.issue(service_id, make_csr(dns_name(service_id))[0], actor=actor)
    assert len(authority.certificates(service_id)) == 2


@pytest.mark.parametrize("value", ["", "garbage", "vcc_enr_short_secret",
                                   "vcc_adm_" + "0" * 12 + "_" + "0" * 64,
                                   "vcc_enr_" + "0" * 12 + "_" + "0" * 64])
def test_malformed_or_unknown_tokens_authenticate_nobody(authority: Authority, value: str) -> None:
    with pytest.raises(NotAuthenticated) as info:
        authority.authenticate_token(value)
    assert info.value.code == "invalid_token"


def test_token_with_a_wrong_secret_authenticates_nobody(authority: Authority, operator: Actor,
                                                        service_id: str) -> None:
    token = register(authority, service_id, operator)
    forged = token[:-4] + ("0000" if not token.endswith("0000") else "1111")
    with pytest.raises(NotAuthenticated):
        authority.authenticate_token(forged)
    authority.authenticate_token(token)


# --- admin tokens ----------------------------------------------------------------------------

def test_admin_token_authenticates_an_admin_until_revoked(authority: Authority, operator: Actor) -> None:
    token = authority.create_admin_token(name="ci", expires_days=None, actor=operator)
    assert token.value.startswith("vcc_adm_")
    actor = authority.authenticate_token(token.value)
    assert actor.is_admin and actor.kind == "admin" and actor.token_id == token.record.token_id
    listed = {t.token_id: t for t in authority.list_tokens("admin")}
    assert listed[token.record.token_id].name == "ci"
    assert listed[token.record.token_id].expires_at is None
    assert token.value not in repr(listed[token.record.token_id])
    revoked = authority.revoke_token(token.record.token_id, actor=operator)
    assert revoked.revoked_at is not None
    with pytest.raises(NotAuthenticated, match="revoked"):
        authority.authenticate_token(token.value)
    with pytest.raises(Conflict):
        authority.revoke_token(token.record.token_id, actor=operator)
    with pytest.raises(NotFound):
        authority.revoke_token("000000000000", actor=operator)


def test_admin_token_with_expiry_stops_working_after_it(authority: Authority, at_time: ClockedAuthority,
                                                        operator: Actor) -> None:
    created = now()
    token = authority.create_admin_token(name="short", expires_days=1, actor=operator)
    assert token.record.expires_at is not None
    assert abs(token.record.expires_at - (created + timedelta(days=1))) < timedelta(minutes=1)
    assert at_time(created + timedelta(hours=23)).authenticate_token(token.value).is_admin
    with pytest.raises(NotAuthenticated, match="expired"):
        at_time(created + timedelta(days=1, minutes=1)).authenticate_token(token.value)


@pytest.mark.parametrize("days", [0, -3])
def test_admin_token_expiry_must_be_at_least_a_day(authority: Authority, operator: Actor, days: int) -> None:
    with pytest.raises(InvalidRequest):
        authority.create_admin_token(name="bad", expires_days=days, actor=operator)


def test_admin_token_admin_may_act_on_any_service(authority: Authority, operator: Actor,
                                                  service_id: str) -> None:
    enrol(authority, service_id, operator)
    admin = authority.authenticate_token(
        authority.create_admin_token(name="ops", expires_days=None, actor=operator).value)
    renewed = authority.renew(service_id, actor=admin)
    revoked = authority.revoke(service_id, serial=renewed.record.serial, reason="superseded", actor=admin).record
    assert revoked.revocation_reason == "superseded"


def test_enrolment_token_is_not_an_admin_token(authority: Authority, operator: Actor,
                                               service_id: str) -> None:
    token = register(authority, service_id, operator)
    actor = authority.authenticate_token(token)
    assert not actor.is_admin
    with pytest.raises(NotPermitted):
        authority.new_enrolment_token(service_id, actor=actor)
    with pytest.raises(NotPermitted):
        authority.update_service(service_id, {"san_dns": ["evil.example"]}, actor=actor)


def test_enrolment_token_buys_the_first_certificate_and_nothing_else(authority: Authority, operator: Actor,
                                                                    service_id: str) -> None:
    first = enrol(authority, service_id, operator)
    token = authority.new_enrolment_token(service_id, actor=operator).value
    actor = authority.authenticate_token(token)
    with pytest.raises(NotPermitted):
        authority.renew(service_id, actor=actor)
    with pytest.raises(NotPermitted):
        authority.revoke(service_id, serial=first.record.serial, actor=actor)
    with pytest.raises(NotPermitted):
        authority.update_service(service_id, {"version": "9"}, actor=actor)
    assert authority.current(service_id).serial == first.record.serial
    assert len(authority.certificates(service_id)) == 1
    authority.authenticate_token(token)  # refused requests leave it unspent


# --- services acting on their own certificates -------------------------------------------------

def test_service_may_renew_and_revoke_only_its_own_certificates(authority: Authority, operator: Actor,
                                                               service_id: str) -> None:
    mine = enrol(authority, service_id, operator)
    other_id = f"{service_id}-b"
    theirs = enrol(authority, other_id, operator)
    me = authority.authenticate_certificate(der(mine.certificate))
    assert me.kind == "service" and me.service_id == service_id and not me.is_admin
    with pytest.raises(NotPermitted):
        authority.renew(other_id, actor=me)
    with pytest.raises(NotPermitted):
        authority.revoke(other_id, actor=me)
    with pytest.raises(NotPermitted):
        authority.revoke(other_id, serial=theirs.record.serial, actor=me)
    with pytest.raises(NotPermitted):
        authority.issue(other_id, make_csr(dns_name(other_id))[0], actor=me)
    with pytest.raises(NotPermitted):
        authority.update_service(other_id, {"version": "2"}, actor=me)
    # ...nor a serial of another service under its own id.
    with pytest.raises(NotFound):
        authority.revoke(service_id, serial=theirs.record.serial, actor=me)
    assert authority.current(other_id).serial == theirs.record.serial
    renewed = authority.renew(service_id, actor=me)
    revoked = authority.revoke(service_id, serial=renewed.record.serial, reason="superseded", actor=me).record
    assert revoked.serial == renewed.record.serial


def test_service_may_update_its_descriptive_fields_but_not_its_allow_list(
    authority: Authority, operator: Actor, service_id: str
) -> None:
    issued = enrol(authority, service_id, operator)
    me = authority.authenticate_certificate(der(issued.certificate))
    updated = authority.update_service(service_id, {"version": "2.1", "endpoints": ["https://a:1"]}, actor=me)
    assert updated.version == "2.1" and updated.endpoints == ("https://a:1",)
    with pytest.raises(PolicyRefused, match="evil.example"):
        authority.update_service(service_id, {"san_dns": ["evil.example"]}, actor=me)
    assert authority.service(service_id).san_dns == (dns_name(service_id),)
    # Repeating or narrowing its own allow-list is allowed; widening is not.
    narrowed = authority.update_service(service_id, {"san_ip": []}, actor=me)
    assert narrowed.san_dns == (dns_name(service_id),) and narrowed.san_ip == ()
    with pytest.raises(PolicyRefused, match="10.1.2.3"):
        authority.update_service(service_id, {"san_ip": ["10.1.2.3"]}, actor=me)
    with pytest.raises(NotPermitted, match="lifetimes"):
        authority.update_service(service_id, {"default_validity_seconds": 600}, actor=me)


def test_renew_keeps_the_public_key_and_changes_the_serial(authority: Authority, operator: Actor,
                                                           service_id: str) -> None:
    first = enrol(authority, service_id, operator)
    me = authority.authenticate_certificate(der(first.certificate))
    renewed = authority.renew(service_id, actor=me)
    assert spki(renewed.certificate) == spki(first.certificate)
    assert renewed.record.serial != first.record.serial
    assert renewed.certificate.not_valid_after_utc >= first.certificate.not_valid_after_utc
    assert renewed.record.san_dns == first.record.san_dns
    assert renewed.record.san_ip == first.record.san_ip
    assert renewed.certificate.subject == first.certificate.subject


def test_rekey_with_a_csr_changes_the_key(authority: Authority, operator: Actor, service_id: str) -> None:
    first = enrol(authority, service_id, operator)
    csr, key = make_csr(dns_name(service_id))
    rekeyed = authority.renew(service_id, actor=authority.authenticate_certificate(der(first.certificate)),
                              csr_pem=csr)
    assert spki(rekeyed.certificate) != spki(first.certificate)
    assert rekeyed.certificate.public_key() == key.public_key()
    assert rekeyed.record.serial != first.record.serial


def test_rekey_outside_the_allow_list_is_refused(authority: Authority, operator: Actor,
                                                 service_id: str) -> None:
    enrol(authority, service_id, operator)
    csr, _ = make_csr(dns_name(service_id), dns=["evil.example"])
    with pytest.raises(PolicyRefused, match="evil.example"):
        authority.renew(service_id, actor=operator, csr_pem=csr)
    assert len(authority.certificates(service_id)) == 1


def test_renewal_does_not_revoke_the_previous_certificate(authority: Authority, operator: Actor,
                                                          service_id: str) -> None:
    first = enrol(authority, service_id, operator)
    second = authority.renew(service_id, actor=operator)
    moment = now()
    statuses = {r.serial: r.status(moment) for r in authority.certificates(service_id)}
    assert statuses == {first.record.serial: "valid", second.record.serial: "valid"}
    assert authority.authenticate_certificate(der(first.certificate)).service_id == service_id
    assert authority.current(service_id).serial == second.record.serial


def test_current_is_the_newest_valid_certificate(authority: Authority, at_time: ClockedAuthority,
                                                 operator: Actor, service_id: str) -> None:
    first = enrol(authority, service_id, operator)
    second = authority.renew(service_id, actor=operator, validity=timedelta(days=2))
    assert authority.current(service_id).serial == second.record.serial
    # Once the short-lived newer one has expired, the older one is current again.
    assert at_time(now() + timedelta(days=3)).current(service_id).serial == first.record.serial
    authority.revoke(service_id, serial=second.record.serial, reason="superseded", actor=operator)
    assert authority.current(service_id).serial == first.record.serial
    authority.revoke(service_id, serial=first.record.serial, reason="keyCompromise", actor=operator)
    with pytest.raises(NotFound) as info:
        authority.current(service_id)
    assert info.value.code == "unknown_certificate"


# --- revocation ------------------------------------------------------------------------------

def test_revoke_publishes_a_crl_listing_the_serial(authority: Authority, operator: Actor,
                                                   service_id: str) -> None:
    issued = enrol(authority, service_id, operator)
    before = authority.store.latest_crl_number()
    record = authority.revoke(service_id, reason="keyCompromise", actor=operator).record
    assert record.serial == issued.record.serial and record.revocation_reason == "keyCompromise"
    assert authority.store.latest_crl_number() > before
    crl = x509.load_der_x509_crl(authority.crl().der)
    assert crl.get_revoked_certificate_by_serial_number(issued.certificate.serial_number) is not None


def test_revoking_an_already_revoked_certificate_is_a_conflict_that_changes_nothing(
    authority: Authority, operator: Actor, service_id: str
) -> None:
    issued = enrol(authority, service_id, operator)
    authority.revoke(service_id, serial=issued.record.serial, reason="keyCompromise", actor=operator)
    audit_before = len(authority.store.audit_log(limit=100_000))
    crl_before = authority.store.latest_crl_number()
    with pytest.raises(Conflict) as info:
        authority.revoke(service_id, serial=issued.record.serial, reason="superseded", actor=operator)
    assert info.value.code == "already_revoked"
    assert len(authority.store.audit_log(limit=100_000)) == audit_before
    assert authority.store.latest_crl_number() == crl_before
    stored = authority.store.get_certificate(issued.record.serial)
    assert stored is not None and stored.revocation_reason == "keyCompromise"


def test_revoke_accepts_serials_in_upper_case_and_refuses_unknown_reasons(
    authority: Authority, operator: Actor, service_id: str
) -> None:
    issued = enrol(authority, service_id, operator)
    with pytest.raises(InvalidRequest, match="badReason"):
        authority.revoke(service_id, serial=issued.record.serial, reason="badReason", actor=operator)
    record = authority.revoke(service_id, serial=issued.record.serial.upper(), reason="cessationOfOperation",
                              actor=operator).record
    assert record.serial == issued.record.serial



def test_the_stored_record_says_what_the_certificate_itself_says(authority: Authority, operator: Actor,
                                                                 service_id: str) -> None:
    # The record is made from what was signed (names, subject) without parsing the new
    # certificate back; parsed back, it must be the same record.
    token = register(authority, service_id, operator)
    csr, _ = make_csr(dns_name(service_id), ips=["10.9.8.7"])
    issued = authority.issue(service_id, csr, actor=authority.authenticate_token(token))
    stored = authority.store.get_certificate(issued.record.serial)
    parsed = CertificateRecord.from_cert(service_id, issued.certificate, issued_at=issued.record.issued_at)
    assert issued.record == parsed
    assert stored is not None  # stored times are to the second
    assert attrs.evolve(stored, row_id=None, issued_at=parsed.issued_at) == parsed
    assert parsed.subject == f"CN={dns_name(service_id)}" and parsed.san_ip == ("10.9.8.7",)

# --- certificate authentication --------------------------------------------------------------

def test_authenticate_certificate_rejects_revoked(authority: Authority, operator: Actor,
                                                  service_id: str) -> None:
    issued = enrol(authority, service_id, operator)
    assert authority.authenticate_certificate(der(issued.certificate)).service_id == service_id
    authority.revoke(service_id, reason="keyCompromise", actor=operator)
    with pytest.raises(NotAuthenticated, match="revoked"):
        authority.authenticate_certificate(der(issued.certificate))


def test_authenticate_certificate_rejects_expired(authority: Authority, at_time: ClockedAuthority,
                                                  operator: Actor, service_id: str) -> None:
    token = register(authority, service_id, operator)
    csr, _ = make_csr(dns_name(service_id))
    issued = authority.issue(service_id, csr, actor=authority.authenticate_token(token), validity=timedelta(days=1))
    assert at_time(now() + timedelta(hours=23)).authenticate_certificate(der(issued.certificate))
    with pytest.raises(NotAuthenticated, match="expired"):
        at_time(now() + timedelta(days=1, minutes=1)).authenticate_certificate(der(issued.certificate))


def test_authenticate_certificate_rejects_certificates_it_did_not_issue(ca_home: Home,
                                                                        authority: Authority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stranger")])
    moment = now()
    stranger = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(moment)
                .not_valid_after(moment + timedelta(days=1)).sign(key, hashes.SHA256()))
    for data in (der(stranger), der(ca_home.intermediate_certificate()), b"", b"not a certificate"):
        with pytest.raises(NotAuthenticated):
            authority.authenticate_certificate(data)



def test_authenticate_certificate_rejects_a_certificate_that_only_shares_a_stored_serial(
        authority: Authority, operator: Actor, service_id: str) -> None:
    # Found by serial, then compared whole: a certificate of this CA's key that the store does
    # not hold (here: the stored one's serial on another key) authenticates nobody.
    issued = enrol(authority, service_id, operator)
    other_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    twin = authority.ca.sign_leaf(other_key, LeafTemplate(
        common_name=dns_name(service_id), san_dns=(dns_name(service_id),), san_ip=(),
        not_before=now() - timedelta(minutes=1), not_after=now() + timedelta(days=1),
        serial_number=issued.certificate.serial_number))
    assert twin.serial_number == issued.certificate.serial_number
    with pytest.raises(NotAuthenticated, match="not known"):
        authority.authenticate_certificate(der(twin))
    assert authority.authenticate_certificate(der(issued.certificate)).service_id == service_id


def test_a_leaf_template_given_lists_signs_the_same_names(authority: Authority) -> None:
    # sign_leaf remembers encoded SAN extensions by the template's names, which must be hashable.
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    moment = now()
    template = LeafTemplate(common_name="a.internal", san_dns=["a.internal", "b.internal"],
                            san_ip=[ipaddress.ip_address("10.1.2.3")],
                            not_before=moment, not_after=moment + timedelta(days=1))
    assert template.san_dns == ("a.internal", "b.internal")
    cert = authority.ca.sign_leaf(key, template)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.internal", "b.internal"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]

# --- audit -----------------------------------------------------------------------------------

def test_each_action_writes_an_audit_row(authority: Authority, operator: Actor, service_id: str) -> None:
    token = register(authority, service_id, operator)
    csr, _ = make_csr(dns_name(service_id))
    issued = authority.issue(service_id, csr, actor=authority.authenticate_token(token))
    authority.revoke(service_id, reason="superseded", actor=operator)
    crl = authority.store.latest_crl()
    assert crl is not None
    rows = list(reversed(authority.store.audit_log(service_id=service_id)))
    assert [r.action for r in rows] == ["service.register", "token.create.enrolment",
                                        "certificate.issue", "certificate.revoke"]
    by_action = {r.action: r for r in rows}
    assert by_action["service.register"].actor == "cli"
    assert by_action["certificate.issue"].serial == issued.record.serial
    assert by_action["certificate.issue"].actor.startswith("enrolment:")
    assert by_action["certificate.revoke"].serial == issued.record.serial
    assert by_action["certificate.revoke"].details == {"reason": "superseded"}
    crl_rows = [r for r in authority.store.audit_log(limit=50) if r.action == "crl.generate"]
    assert any(r.details.get("number") == crl.number for r in crl_rows)


def test_audit_log_and_logs_never_contain_token_values_or_passwords(
    authority: Authority, operator: Actor, service_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = register(authority, service_id, operator)
    authority.issue(service_id, make_csr(dns_name(service_id))[0], actor=authority.authenticate_token(token))
    extra = authority.new_enrolment_token(service_id, actor=operator).value
    admin = authority.create_admin_token(name="audit-check", expires_days=None, actor=operator)
    authority.revoke_token(admin.record.token_id, actor=operator)
    secrets = [token, extra, admin.value, CA_PASSWORD, ROOT_PASSWORD]
    secrets += [value.rsplit("_", 1)[1] for value in (token, extra, admin.value)]
    rows = authority.store.audit_log(limit=100_000)
    assert any(r.action == "token.revoke.admin" for r in rows)
    for row in rows:
        text = row.actor + json.dumps(row.details)
        for secret in secrets:
            assert secret not in text, row
    for secret in secrets:
        assert secret not in caplog.text


def test_a_crl_missing_a_revocation_is_published_again(tmp_path: Path) -> None:
    """A revocation stored without its CRL (an older version that crashed between the two) is
    put on a new CRL at start, and a retried revocation (409) does the same."""
    from conftest import CA_PASSWORD, build_home

    home = build_home(tmp_path / "h")
    auth = home.authority(CA_PASSWORD)
    try:
        operator = Actor.operator()
        issued = enrol(auth, "late", operator)
        auth.store.revoke_certificates(issued.record.serial, reason="keyCompromise", at=now(), actor="old")
        [crl] = auth.republish_if_behind(actor=operator)
        assert int(issued.record.serial, 16) in {e.serial_number for e in x509.load_der_x509_crl(crl.der)}
        assert auth.republish_if_behind(actor=operator) == []  # complete now
        other = enrol(auth, "later", operator)
        auth.store.revoke_certificates(other.record.serial, reason="superseded", at=now(), actor="old")
        with pytest.raises(Conflict):
            auth.revoke("later", serial=other.record.serial, actor=operator)  # the retry
        latest = auth.store.latest_crl()
        assert latest is not None
        assert int(other.record.serial, 16) in {e.serial_number for e in x509.load_der_x509_crl(latest.der)}
    finally:
        auth.store.close()


def test_an_enrolment_token_is_locked_after_ten_refused_requests(authority: Authority, operator: Actor,
                                                                  service_id: str) -> None:
    """Issue 18: a refused CSR costs the CA a check; a token buys at most ten of them."""
    token = register(authority, service_id, operator)
    weak = rsa.generate_private_key(3, 2048)  # exponent 3: refused by the key policy
    bad_csr, _ = make_csr(dns_name(service_id), key=weak)
    for _ in range(10):
        with pytest.raises(InvalidCSR, match="exponent 3"):
            authority.issue(service_id, bad_csr, actor=authority.authenticate_token(token))
    with pytest.raises(NotAuthenticated):
        authority.authenticate_token(token)  # locked: a good CSR now gets nowhere either
    assert any(e.action == "token.lock" for e in authority.store.audit_log(limit=20))


def test_key_policy_comes_before_the_signature_and_sha1_is_named(tmp_path: Path) -> None:
    import subprocess

    from vcc_pki_server.policy import load_csr_key

    csr, _ = make_csr("x.example", key=rsa.generate_private_key(3, 2048))
    der = bytearray(x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF  # break the signature too: the key is what is named
    with pytest.raises(InvalidCSR, match="exponent 3"):
        load_csr_key(bytes(der))
    # cryptography will not sign with SHA-1; openssl does (a legacy client would).
    key = tmp_path / "k.pem"
    key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    sha1 = subprocess.run(["openssl", "req", "-new", "-sha1", "-key", str(key), "-subj", "/CN=x.example"],
                          capture_output=True, check=True).stdout
    with pytest.raises(InvalidCSR, match="SHA1: sign it with SHA-256"):
        load_csr_key(sha1)
