"""pki-admin: the operator's command line over a CA home (SPEC §6), one small ``cmd_*`` per command.

Every command works on ``<home>`` directly, so it runs beside a live server. Commands that sign
(issue, renew, revoke, CRL, CA creation) need the CA password (see :mod:`.passwords`); the
others (lists, info, registration, tokens) never ask for it. Results go to stdout (a table, or
JSON with ``--json``), progress and warnings to stderr. Exit 0 on success, 1 with one line
``pki-admin: error: ...`` on failure, 2 on usage errors.

Usage::

    pki-admin --home /srv/pki init --public-url https://pki.internal:8443
    pki-admin cert issue --service-id billing --cn billing --san-dns billing.internal
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from . import passwords, tokens
from .authority import Actor, Authority, Issued, utc_now
from .ca import KEY_TYPES, REASONS
from .errors import CAError, CAUnavailable, InvalidRequest, NotFound
from .home import Config, Home, write_file
from .policy import normalize_sans
from .store import AuditEntry, CertificateRecord, CRLRecord, ServiceRecord, TokenRecord, utc_text

PROG = "pki-admin"
ROOT_KEY_TYPES = ("rsa-4096", "ec-p384")
INTERMEDIATE_KEY_TYPES = ("rsa-2048", "ec-p256", "rsa-3072")
Command = Callable[[argparse.Namespace], int]
JSON = dict[str, Any]


# -- small output helpers -------------------------------------------------------------------
def progress(message: str) -> None:
    """A progress or warning line on stderr (stdout stays clean for scripts)."""
    print(message, file=sys.stderr, flush=True)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    for line in (headers, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def print_fields(pairs: Sequence[tuple[str, str]]) -> None:
    width = max(len(key) for key, _ in pairs)
    for key, value in pairs:
        print(f"{key.ljust(width)}  {value}")


def opt_time(moment: datetime | None) -> str | None:
    return utc_text(moment) if moment is not None else None


def key_label(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "EC P-256", "secp384r1": "EC P-384",
                "secp521r1": "EC P-521"}.get(key.curve.name, f"EC {key.curve.name}")
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(key).__name__


def key_type_label(key_type: str) -> str:
    """``rsa-4096`` -> ``RSA-4096``, ``ec-p384`` -> ``EC P-384``."""
    kind, _, size = key_type.partition("-")
    return f"RSA-{size}" if kind == "rsa" else f"EC {size.upper()[0]}-{size[1:]}"


# -- JSON shapes (SPEC §5 formats: RFC 3339 'Z' times, lowercase hex serials) ---------------
def certificate_json(record: CertificateRecord, now: datetime) -> JSON:
    return {
        "service_id": record.service_id, "serial_number": record.serial, "subject": record.subject,
        "san_dns": list(record.san_dns), "san_ip": list(record.san_ip),
        "not_before": utc_text(record.not_before), "not_after": utc_text(record.not_after),
        "status": record.status(now), "fingerprint_sha256": record.fingerprint,
        "issued_at": utc_text(record.issued_at), "revoked_at": opt_time(record.revoked_at),
        "revocation_reason": record.revocation_reason,
    }


def ca_certificate_json(cert: x509.Certificate, path: Path) -> JSON:
    return {
        "subject": cert.subject.rfc4514_string(), "serial_number": format(cert.serial_number, "x"),
        "key": key_label(cert.public_key()), "not_before": utc_text(cert.not_valid_before_utc),
        "not_after": utc_text(cert.not_valid_after_utc),
        "fingerprint_sha256": cert.fingerprint(hashes.SHA256()).hex(), "path": str(path),
    }


def service_json(record: ServiceRecord, current: CertificateRecord | None) -> JSON:
    health = record.health
    return {
        "service_id": record.service_id, "service_name": record.service_name,
        "endpoints": list(record.endpoints), "health_check_url": record.health_check_url,
        "version": record.version, "owner": record.owner, "metadata": record.metadata,
        "san_dns": list(record.san_dns), "san_ip": list(record.san_ip),
        "created_at": utc_text(record.created_at), "updated_at": utc_text(record.updated_at),
        "health": {"status": health.status, "last_checked": opt_time(health.last_checked),
                   "last_error": health.last_error,
                   "consecutive_failures": health.consecutive_failures},
        "current_certificate": None if current is None else {
            "serial_number": current.serial, "not_after": utc_text(current.not_after)},
    }


def token_status(record: TokenRecord, now: datetime) -> str:
    if record.revoked_at is not None:
        return "revoked"
    if record.used_at is not None:
        return "used"
    if record.expires_at is not None and record.expires_at <= now:
        return "expired"
    return "active"


def token_json(record: TokenRecord, now: datetime) -> JSON:
    """A token's record without its secret or the secret's hash."""
    return {
        "token_id": record.token_id, "kind": record.kind, "name": record.name,
        "service_id": record.service_id, "created_at": utc_text(record.created_at),
        "expires_at": opt_time(record.expires_at), "used_at": opt_time(record.used_at),
        "revoked_at": opt_time(record.revoked_at), "status": token_status(record, now),
    }


def crl_json(record: CRLRecord) -> JSON:
    return {"number": record.number, "this_update": utc_text(record.this_update),
            "next_update": utc_text(record.next_update), "entries": record.entries}


# -- homes, passwords, authorities ----------------------------------------------------------
def existing_home(args: argparse.Namespace) -> Home:
    home = Home.resolve(args.home)
    if not home.root.is_dir():
        raise CAError(f"no CA home at {home.root}: run `pki-admin init`, or pass --home / set $VCC_PKI_HOME")
    return home


def ca_password(args: argparse.Namespace, *, confirm: bool = False) -> str:
    return passwords.resolve(passwords.CA, file=getattr(args, "password_file", None),
                             value=getattr(args, "password", None), confirm=confirm)


def root_password(args: argparse.Namespace, *, confirm: bool = False) -> str:
    return passwords.resolve(passwords.ROOT, file=getattr(args, "root_password_file", None),
                             value=getattr(args, "root_password", None), confirm=confirm)


@contextmanager
def open_authority(args: argparse.Namespace, *, sign: bool) -> Iterator[tuple[Home, Authority]]:
    """The home's authority; with ``sign`` the intermediate key is unlocked (password asked)."""
    home = existing_home(args)
    password = None
    if sign:
        if not home.has_intermediate():
            raise CAError(f"{home.root} has no intermediate CA: run `pki-admin init` "
                          "or `pki-admin ca create-intermediate`")
        password = ca_password(args)
    authority = home.authority(password)
    try:
        yield home, authority
    finally:
        authority.store.close()


def audit(home: Home, action: str, cert: x509.Certificate, key_type: str) -> None:
    """Record the creation of a CA key pair (the store records everything else itself)."""
    store = home.open_store()
    try:
        store.audit(AuditEntry(at=utc_now(), actor=Actor.operator().label, action=action,
                               serial=format(cert.serial_number, "x"),
                               details={"key_type": key_type,
                                        "fingerprint_sha256": cert.fingerprint(hashes.SHA256()).hex()}))
    finally:
        store.close()


# -- ca ---------------------------------------------------------------------------------------
def cmd_ca_init_root(args: argparse.Namespace) -> int:
    home = Home.resolve(args.home)
    if home.has_root():
        raise CAError(f"{home.root} already has a root CA ({home.root_cert.name}); refusing to overwrite it")
    password = root_password(args, confirm=True)
    progress(f"generating {key_type_label(args.key_type)} root key...")
    cert = home.create_root(password, key_type=args.key_type)
    if not home.config_file.exists():
        home.save_config(Config())
    audit(home, "ca.init-root", cert, args.key_type)
    return show_ca_certificate(args, "root CA", cert, home.root_cert)


def cmd_ca_create_intermediate(args: argparse.Namespace) -> int:
    home = existing_home(args)
    if home.has_intermediate():
        raise CAError(f"{home.root} already has an intermediate CA; refusing to overwrite it")
    if not home.has_root():
        raise CAError(f"{home.root} has no root CA: run `pki-admin ca init-root` first")
    root_pw = root_password(args)
    check_root_password(home, root_pw)  # before the new password is asked for, twice
    ca_pw = ca_password(args, confirm=True)
    progress(f"generating {key_type_label(args.key_type)} intermediate key...")
    cert = home.create_intermediate(root_pw, ca_pw, key_type=args.key_type)
    audit(home, "ca.create-intermediate", cert, args.key_type)
    authority = home.authority(ca_pw)
    try:
        progress("publishing the first CRL...")
        authority.generate_crl(actor=Actor.operator())
    finally:
        authority.store.close()
    return show_ca_certificate(args, "intermediate CA", cert, home.intermediate_cert)


def check_root_password(home: Home, password: str) -> None:
    try:
        serialization.load_pem_private_key(home.root_key.read_bytes(), password.encode())
    except (ValueError, TypeError):
        raise CAUnavailable(f"wrong password for the root CA key ({home.root_key.name})") from None


def show_ca_certificate(args: argparse.Namespace, what: str, cert: x509.Certificate, path: Path) -> int:
    data = ca_certificate_json(cert, path)
    if args.json:
        print_json(data)
    else:
        print(f"created the {what} in {path.parent}")
        print_fields([(k, str(v)) for k, v in data.items()])
    return 0


def cmd_ca_info(args: argparse.Namespace) -> int:
    home = existing_home(args)
    if not home.has_root():
        raise CAError(f"{home.root} has no CA: run `pki-admin init`")
    config = home.config()
    data: JSON = {
        "home": str(home.root.absolute()),
        "root": ca_certificate_json(home.root_certificate(), home.root_cert),
        "intermediate": (ca_certificate_json(home.intermediate_certificate(), home.intermediate_cert)
                         if home.has_intermediate() else None),
        "public_url": config.public_url, "crl_url": config.crl_url, "issuer_url": config.issuer_url,
    }
    if args.json:
        print_json(data)
        return 0
    print_fields([("home", data["home"]), ("public URL", config.public_url),
                  ("CRL URL", config.crl_url)])
    for what in ("root", "intermediate"):
        print(f"\n{what} CA")
        if data[what] is None:
            print("  (none: run `pki-admin ca create-intermediate`)")
            continue
        print_fields([(f"  {k}", str(v)) for k, v in data[what].items()])
    return 0


# -- cert -------------------------------------------------------------------------------------
def cmd_cert_issue(args: argparse.Namespace) -> int:
    with open_authority(args, sign=True) as (home, authority):
        issued, key = authority.issue_with_key(
            args.service_id, common_name=args.cn, san_dns=args.san_dns, san_ip=args.san_ip,
            key_type=args.key_type, validity_days=args.validity_days, actor=Actor.operator(),
            service_name=args.name)
        folder = home.write_service_files(args.service_id, issued, key)
        data = certificate_json(issued.record, authority.clock())
    files = {"cert": str(folder / "cert.pem"), "key": str(folder / "key.pem"),
             "chain": str(folder / "ca_chain.pem")}
    if args.json:
        print_json({**data, "files": files})
    else:
        print(f"issued certificate {data['serial_number']} for '{args.service_id}', "
              f"valid until {data['not_after']}")
        print_fields([("subject", data["subject"]), ("SANs", sans_text(issued.record)),
                      ("certificate", files["cert"]), ("key (0400)", files["key"]),
                      ("CA chain", files["chain"])])
    return 0


def sans_text(record: CertificateRecord | ServiceRecord) -> str:
    return ", ".join([*record.san_dns, *record.san_ip]) or "-"


def all_certificates(authority: Authority, args: argparse.Namespace) -> list[CertificateRecord]:
    records: list[CertificateRecord] = []
    after: int | None = None
    while True:
        page = authority.list_certificates(service_id=args.service_id, status=args.status,
                                           expiring_within_days=args.expiring_within_days,
                                           limit=1000, after=after)
        records += page
        if len(page) < 1000:
            return records
        after = page[-1].row_id


def cmd_cert_list(args: argparse.Namespace) -> int:
    if args.expiring_within_days is not None and args.expiring_within_days < 0:
        raise InvalidRequest("--expiring-within-days must not be negative")
    with open_authority(args, sign=False) as (_, authority):
        if args.service_id is not None:
            authority.service(args.service_id)
        records = all_certificates(authority, args)
        now = authority.clock()
    if args.json:
        print_json([certificate_json(r, now) for r in records])
    elif not records:
        print("no certificates")
    else:
        print_table(("SERIAL", "SERVICE", "STATUS", "NOT AFTER", "SANS"),
                    [(r.serial, r.service_id, r.status(now), utc_text(r.not_after), sans_text(r))
                     for r in records])
    return 0


def cmd_cert_info(args: argparse.Namespace) -> int:
    with open_authority(args, sign=False) as (home, authority):
        records = authority.certificates(args.service_id)
        now = authority.clock()
    if not records:
        raise NotFound(f"service '{args.service_id}' has no certificates", code="unknown_certificate")
    # The current certificate (newest valid one), else the newest whatever its status.
    record = next((r for r in records if r.status(now) == "valid"), records[0])
    cert = record.certificate()
    data = {**certificate_json(record, now), "key": key_label(cert.public_key()),
            "issuer": cert.issuer.rfc4514_string()}
    folder = home.services_dir / args.service_id
    data["files"] = str(folder) if folder.is_dir() else None
    if args.json:
        print_json(data)
    else:
        print_fields([(k.replace("_", " "), ", ".join(v) if isinstance(v, list) else str(v or "-"))
                      for k, v in data.items()])
    return 0


def rewrite_service_files(home: Home, service_id: str, issued: Issued) -> Path | None:
    """Put a renewed certificate into ``service_certificates/<id>/`` when its key.pem matches."""
    folder = home.services_dir / service_id
    if not folder.is_dir():
        return None
    key_file = folder / "key.pem"
    if key_file.exists():
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        key = serialization.load_pem_private_key(key_file.read_bytes(), None)
        mine = key.public_key().public_bytes(serialization.Encoding.DER, spki)
        theirs = issued.certificate.public_key().public_bytes(serialization.Encoding.DER, spki)
        if mine != theirs:
            progress(f"{PROG}: warning: {key_file} does not belong to the renewed certificate; "
                     f"files in {folder} left unchanged")
            return None
    pem = issued.certificate.public_bytes(serialization.Encoding.PEM)
    write_file(folder / "cert.pem", pem, 0o644)
    write_file(folder / "ca_chain.pem",
               b"".join(c.public_bytes(serialization.Encoding.PEM) for c in issued.chain), 0o644)
    return folder


def cmd_cert_renew(args: argparse.Namespace) -> int:
    with open_authority(args, sign=True) as (home, authority):
        issued = authority.renew(args.service_id, actor=Actor.operator(),
                                 validity_days=args.validity_days)
        folder = rewrite_service_files(home, args.service_id, issued)
        data = certificate_json(issued.record, authority.clock())
    if args.json:
        print_json({**data, "files": str(folder) if folder else None})
    else:
        print(f"renewed '{args.service_id}' (same key): new certificate {data['serial_number']}, "
              f"valid until {data['not_after']}; the previous one stays valid")
        if folder:
            print(f"updated {folder / 'cert.pem'} and {folder / 'ca_chain.pem'}")
    return 0


def cmd_cert_revoke(args: argparse.Namespace) -> int:
    if args.reason not in REASONS:  # checked before the password is asked for
        raise InvalidRequest(f"unknown revocation reason {args.reason!r}; use one of {', '.join(REASONS)}")
    serial = args.serial.replace(":", "").lower() if args.serial else None
    with open_authority(args, sign=True) as (_, authority):
        record = authority.revoke(args.service_id, reason=args.reason, serial=serial,
                                  actor=Actor.operator())
        crl = authority.store.latest_crl()
        data = certificate_json(record, authority.clock())
    data["crl_number"] = crl.number if crl else None
    if args.json:
        print_json(data)
    else:
        print(f"revoked certificate {record.serial} of '{record.service_id}' ({args.reason}); "
              f"published CRL number {data['crl_number']}")
    return 0


# -- service ----------------------------------------------------------------------------------
def current_certificate(authority: Authority, service_id: str, now: datetime) -> CertificateRecord | None:
    return next((r for r in authority.store.certificates_for(service_id) if r.status(now) == "valid"), None)


def cmd_service_register(args: argparse.Namespace) -> int:
    fields: JSON = {name: getattr(args, name) for name in ("health_check_url", "owner", "version")
                    if getattr(args, name) is not None}
    if args.endpoint:
        fields["endpoints"] = list(args.endpoint)
    with open_authority(args, sign=False) as (_, authority):
        record, token = authority.register_service(
            args.service_id, service_name=args.name, san_dns=args.san_dns, san_ip=args.san_ip,
            actor=Actor.operator(), **fields)
    expires = opt_time(token.record.expires_at)
    if args.json:
        print_json({**service_json(record, None), "enrolment_token": token.value,
                    "enrolment_token_id": token.record.token_id,
                    "enrolment_token_expires_at": expires})
    else:
        print(f"registered service '{record.service_id}' ({record.service_name}); "
              f"SAN allow-list: {sans_text(record)}")
        print(f"enrolment token (shown only once, single use, expires {expires}):")
        print(token.value)
    return 0


def all_services(authority: Authority, healthy: bool | None) -> list[ServiceRecord]:
    services: list[ServiceRecord] = []
    while True:
        page = authority.list_services(healthy=healthy, limit=1000,
                                       after=services[-1].service_id if services else None)
        services += page
        if len(page) < 1000:
            return services


def cmd_service_list(args: argparse.Namespace) -> int:
    with open_authority(args, sign=False) as (_, authority):
        now = authority.clock()
        entries = [(s, current_certificate(authority, s.service_id, now))
                   for s in all_services(authority, True if args.healthy else None)]
    if args.json:
        print_json([service_json(s, c) for s, c in entries])
    elif not entries:
        print("no services")
    else:
        print_table(("SERVICE ID", "NAME", "HEALTH", "LAST CHECKED", "CERT SERIAL", "CERT EXPIRES"),
                    [(s.service_id, s.service_name, s.health.status,
                      opt_time(s.health.last_checked) or "-", c.serial if c else "-",
                      utc_text(c.not_after) if c else "-") for s, c in entries])
    return 0


def cmd_service_info(args: argparse.Namespace) -> int:
    with open_authority(args, sign=False) as (_, authority):
        record = authority.service(args.service_id)
        history = authority.certificates(args.service_id)
        now = authority.clock()
    current = next((r for r in history if r.status(now) == "valid"), None)
    data = {**service_json(record, current),
            "certificates": [certificate_json(r, now) for r in history]}
    if args.json:
        print_json(data)
        return 0
    health = record.health
    print_fields([
        ("service id", record.service_id), ("name", record.service_name),
        ("SAN allow-list", sans_text(record)), ("endpoints", ", ".join(record.endpoints) or "-"),
        ("health check", record.health_check_url or "-"), ("owner", record.owner or "-"),
        ("version", record.version or "-"),
        ("health", f"{health.status} (checked {opt_time(health.last_checked) or 'never'}"
                   f"{', ' + health.last_error if health.last_error else ''})"),
        ("registered", utc_text(record.created_at)),
    ])
    print("\ncertificates")
    if not history:
        print("  (none)")
    else:
        print_table(("  SERIAL", "STATUS", "NOT AFTER", "REVOCATION"),
                    [(f"  {r.serial}", r.status(now), utc_text(r.not_after),
                      r.revocation_reason or "-") for r in history])
    return 0


# -- crl --------------------------------------------------------------------------------------
def cmd_crl_generate(args: argparse.Namespace) -> int:
    with open_authority(args, sign=True) as (_, authority):
        crl = authority.generate_crl(actor=Actor.operator())
    if args.out:
        out = Path(args.out)
        if out.suffix.lower() == ".pem":
            body = x509.load_der_x509_crl(crl.der).public_bytes(serialization.Encoding.PEM)
        else:
            body = crl.der
        out.write_bytes(body)
    if args.json:
        print_json({**crl_json(crl), "file": args.out})
    else:
        print(f"published CRL number {crl.number} with {crl.entries} revoked certificate(s), "
              f"next update {utc_text(crl.next_update)}" + (f"; written to {args.out}" if args.out else ""))
    return 0


def cmd_crl_list(args: argparse.Namespace) -> int:
    with open_authority(args, sign=False) as (_, authority):
        crls = authority.store.list_crls(limit=args.limit)
    if args.json:
        print_json([crl_json(c) for c in crls])
    elif not crls:
        print("no CRLs yet: run `pki-admin crl generate`")
    else:
        print_table(("NUMBER", "THIS UPDATE", "NEXT UPDATE", "ENTRIES"),
                    [(str(c.number), utc_text(c.this_update), utc_text(c.next_update), str(c.entries))
                     for c in crls])
    return 0


# -- token ------------------------------------------------------------------------------------
def cmd_token_create(args: argparse.Namespace) -> int:
    with open_authority(args, sign=False) as (_, authority):
        token = authority.create_admin_token(name=args.name, expires_days=args.expires_days,
                                             actor=Actor.operator())
        data = token_json(token.record, authority.clock())
    if args.json:
        print_json({**data, "token": token.value})
    else:
        # The token alone on stdout, so `TOKEN=$(pki-admin token create)` works.
        progress(f"admin token {data['token_id']} created (expires {data['expires_at'] or 'never'}); "
                 "it is shown only this once:")
        print(token.value)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    with open_authority(args, sign=False) as (_, authority):
        records = authority.list_tokens(None if args.kind == "all" else args.kind)
        now = authority.clock()
    if args.json:
        print_json([token_json(r, now) for r in records])
    elif not records:
        print("no tokens")
    else:
        print_table(("TOKEN ID", "KIND", "NAME / SERVICE", "CREATED", "EXPIRES", "STATUS"),
                    [(r.token_id, r.kind, r.name or r.service_id or "-", utc_text(r.created_at),
                      opt_time(r.expires_at) or "never", token_status(r, now)) for r in records])
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    parsed = tokens.parse_token(args.token_id)  # a whole token is accepted too
    token_id = parsed[1] if parsed else args.token_id
    with open_authority(args, sign=False) as (_, authority):
        record = authority.revoke_token(token_id, actor=Actor.operator())
        data = token_json(record, authority.clock())
    if args.json:
        print_json(data)
    else:
        print(f"revoked {record.kind} token {record.token_id}")
    return 0


# -- init -------------------------------------------------------------------------------------
@attrs.frozen
class Initialised:
    root: x509.Certificate
    intermediate: x509.Certificate
    server: Issued
    crl: CRLRecord


def initialize(home: Home, config: Config, *, root_password: str, ca_password: str,
               root_key_type: str = "rsa-4096", intermediate_key_type: str = "rsa-2048",
               report: Callable[[str], None] = progress) -> Initialised:
    """Create a complete CA home (config, root, intermediate, server certificate, first CRL).

    Everything is built in a staging folder beside ``home`` and moved into place at the end,
    so a failure (or Ctrl-C) leaves the home as it was. Raises :class:`CAError` if the home
    already has a CA.
    """
    refuse_existing_ca(home)
    parent = home.root.absolute().parent
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{home.root.name}.init-", dir=parent))
    try:
        stage = Home(staging)
        stage.ensure()
        stage.save_config(config)
        report(f"generating {key_type_label(root_key_type)} root key...")
        root = stage.create_root(root_password, key_type=root_key_type)
        audit(stage, "ca.init-root", root, root_key_type)
        report(f"generating {key_type_label(intermediate_key_type)} intermediate key...")
        intermediate = stage.create_intermediate(root_password, ca_password, key_type=intermediate_key_type)
        audit(stage, "ca.create-intermediate", intermediate, intermediate_key_type)
        authority = stage.authority(ca_password)
        try:
            report("issuing the server certificate...")
            server = stage.issue_server_certificate(authority, config)
            report("publishing the first CRL...")
            crl = authority.generate_crl(actor=Actor.operator())
        finally:
            authority.store.close()
        move_into_place(staging, home)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Initialised(root, intermediate, server, crl)


def refuse_existing_ca(home: Home) -> None:
    if home.has_root() or home.has_intermediate():
        raise CAError(f"{home.root} already has a CA; refusing to touch it")
    for path in (home.db, home.server_dir, home.services_dir):
        if path.exists():
            raise CAError(f"{home.root} already holds {path.name} (from an earlier run?); "
                          "use an empty folder as --home")


def move_into_place(staging: Path, home: Home) -> None:
    """Move a staged home into ``home``: one rename if it does not exist yet, else entry by entry
    with ``ca/`` last (a home without ``ca/`` counts as uninitialised)."""
    target = home.root
    if not target.exists():
        os.rename(staging, target)
        return
    refuse_existing_ca(home)
    names = sorted((p.name for p in staging.iterdir()), key=lambda n: n == "ca")
    moved: list[str] = []
    try:
        for name in names:
            os.replace(staging / name, target / name)
            moved.append(name)
    except OSError:
        for name in reversed(moved):
            if name != "config.toml":
                os.rename(target / name, staging / name)
        raise
    os.chmod(target, 0o700)
    staging.rmdir()


def check_public_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment:
        raise InvalidRequest(f"invalid --public-url {url!r}: use https://HOST[:PORT][/PATH]")
    if "." not in parts.hostname and ":" not in parts.hostname:
        progress(f"{PROG}: warning: single-label host {parts.hostname!r} in the public URL: "
                 "pkilint flags such URIs in CRL distribution points; prefer an IP or a FQDN")
    return url.rstrip("/")


def cmd_init(args: argparse.Namespace) -> int:
    home = Home.resolve(args.home)
    refuse_existing_ca(home)
    config = home.config()
    dns, ips = normalize_sans(["localhost", *args.server_san_dns], ["127.0.0.1", *args.server_san_ip])
    config = attrs.evolve(config, server_san_dns=dns, server_san_ip=tuple(str(i) for i in ips))
    if args.public_url is not None:
        config = attrs.evolve(config, public_url=check_public_url(args.public_url))
    root_pw = root_password(args, confirm=True)
    ca_pw = ca_password(args, confirm=True)
    done = initialize(home, config, root_password=root_pw, ca_password=ca_pw,
                      root_key_type=args.root_key_type,
                      intermediate_key_type=args.intermediate_key_type)
    server = done.server.record
    data: JSON = {
        "home": str(home.root.absolute()), "public_url": config.public_url,
        "root": ca_certificate_json(done.root, home.root_cert),
        "intermediate": ca_certificate_json(done.intermediate, home.intermediate_cert),
        "server_certificate": {"serial_number": server.serial, "san_dns": list(server.san_dns),
                               "san_ip": list(server.san_ip), "not_after": utc_text(server.not_after),
                               "path": str(home.server_cert)},
        "crl": crl_json(done.crl),
    }
    if args.json:
        print_json(data)
        return 0
    print(f"initialised the CA home {data['home']}")
    print_fields([
        ("root CA", f"{data['root']['key']}, sha256 {data['root']['fingerprint_sha256']}, "
                    f"until {data['root']['not_after']}"),
        ("intermediate CA", f"{data['intermediate']['key']}, until {data['intermediate']['not_after']}"),
        ("server cert", f"{home.server_cert} for {sans_text(server)}"),
        ("CRL", f"number {done.crl.number}, served at {config.crl_url}"),
    ])
    print("\nnext: pki-admin token create --name ops   (an admin token for the API)\n"
          "      vcc-pki-server --home DIR --password-file FILE")
    return 0


# -- the parser -------------------------------------------------------------------------------
EPILOG = """\
examples:
  # a new CA home in one go (asks for the root and the intermediate password)
  pki-admin --home /srv/pki init --public-url https://10.0.0.5:8443 --server-san-dns pki.internal

  # the prototype's step-by-step flow, passwords from files
  pki-admin ca init-root --root-password-file root.pw
  pki-admin ca create-intermediate --root-password-file root.pw --password-file ca.pw
  pki-admin cert issue --service-id veritas-backend --cn veritas-backend \\
      --san-dns veritas-backend localhost --san-ip 127.0.0.1 --password-file ca.pw
  pki-admin cert list --json
  pki-admin cert revoke --service-id veritas-backend --reason keyCompromise --password-file ca.pw

  # a service that enrols itself with the SDK
  pki-admin service register --service-id billing --name Billing --san-dns billing.internal

passwords: the root key's from --root-password-file, else $VCC_PKI_ROOT_PASSWORD, else a
prompt; the intermediate key's from --password-file, else $VCC_PKI_CA_PASSWORD, else a
prompt. --password / --root-password work but are unsafe (visible in process lists).
The home is --home, else $VCC_PKI_HOME, else ./pki-data.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str, **kwargs: Any) -> None:
        super().__init__(prog, max_help_position=34, **kwargs)


def global_options(*, suppress: bool) -> argparse.ArgumentParser:
    """``--home`` and ``--json``; on subcommands with SUPPRESS defaults, so that a value given
    before the subcommand is not reset by the subparser's default."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("global options")
    group.add_argument("--home", metavar="DIR", default=argparse.SUPPRESS if suppress else None,
                       help="the CA home (default: $VCC_PKI_HOME, else ./pki-data)")
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
                       help="machine-readable JSON on stdout")
    return parser


def password_options(*, root: bool, ca: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    if root:
        group = parser.add_argument_group("root CA password")
        group.add_argument("--root-password-file", metavar="FILE",
                           help="file holding the root key's password "
                                "(else $VCC_PKI_ROOT_PASSWORD, else a prompt)")
        group.add_argument("--root-password", metavar="PASSWORD",
                           help="UNSAFE: visible in process lists and shell history")
    if ca:
        group = parser.add_argument_group("intermediate CA password")
        group.add_argument("--password-file", "--ca-password-file", dest="password_file", metavar="FILE",
                           help="file holding the intermediate key's password (else $VCC_PKI_CA_PASSWORD, "
                                "else a prompt)")
        group.add_argument("--password", "--ca-password", dest="password", metavar="PASSWORD",
                           help="UNSAFE: visible in process lists and shell history")
    return parser


def san_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument(f"--{prefix}san-dns", nargs="+", action="extend", default=[], metavar="NAME",
                        help="DNS names (one or more; the option may repeat)")
    parser.add_argument(f"--{prefix}san-ip", nargs="+", action="extend", default=[], metavar="IP",
                        help="IPv4/IPv6 addresses (one or more; the option may repeat)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter, epilog=EPILOG, parents=[global_options(suppress=False)],
        description="Administer the VCC private CA: CA keys, certificates, services, CRLs, API tokens.")
    common = global_options(suppress=True)
    ca_pw = password_options(root=False, ca=True)
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def group(name: str, help_text: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        sub = top.add_parser(name, parents=[common], formatter_class=_Formatter, help=help_text,
                             description=textwrap.fill(help_text, 88), epilog=EPILOG)
        return sub.add_subparsers(dest="action", required=True, metavar="ACTION")

    def command(actions: argparse._SubParsersAction[argparse.ArgumentParser], name: str, func: Command,
                help_text: str, *parents: argparse.ArgumentParser, epilog: str | None = None
                ) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, parents=[common, *parents], formatter_class=_Formatter,
                                 help=help_text, description=textwrap.fill(help_text, 88),
                                 epilog=epilog)
        sub.set_defaults(func=func)
        return sub

    # ca
    ca = group("ca", "the root and intermediate CA")
    p = command(ca, "init-root", cmd_ca_init_root, "create the root CA (key encrypted, 0400)",
                password_options(root=True, ca=False),
                epilog="example:\n  pki-admin ca init-root --key-type ec-p384 --root-password-file root.pw")
    p.add_argument("--key-type", choices=ROOT_KEY_TYPES, default="rsa-4096", help="default: %(default)s")
    p = command(ca, "create-intermediate", cmd_ca_create_intermediate,
                "create the issuing intermediate CA, signed by the root",
                password_options(root=True, ca=True),
                epilog="example:\n  pki-admin ca create-intermediate --root-password-file root.pw "
                       "--password-file ca.pw")
    p.add_argument("--key-type", choices=INTERMEDIATE_KEY_TYPES, default="rsa-2048",
                   help="default: %(default)s")
    command(ca, "info", cmd_ca_info, "show the CA certificates and URLs (no password needed)")

    # cert
    cert = group("cert", "service certificates")
    p = command(cert, "issue", cmd_cert_issue,
                "issue a certificate with a key generated here; writes "
                "service_certificates/<id>/{cert,key,ca_chain}.pem (key 0400). An unknown service is "
                "registered with the given names as its SAN allow-list", ca_pw,
                epilog="example:\n  pki-admin cert issue --service-id veritas-backend "
                       "--cn veritas-backend \\\n"
                       "      --san-dns veritas-backend localhost --san-ip 127.0.0.1 --password-file ca.pw")
    p.add_argument("--service-id", required=True, metavar="ID")
    p.add_argument("--cn", required=True, metavar="CN", help="common name (also put into the SANs)")
    san_options(p)
    p.add_argument("--key-type", choices=KEY_TYPES, default="rsa-2048", help="default: %(default)s")
    p.add_argument("--validity-days", type=int, metavar="DAYS", help="default and maximum from config.toml")
    p.add_argument("--name", help="service name when the service is new (default: the id)")
    p = command(cert, "list", cmd_cert_list, "list certificates")
    p.add_argument("--service-id", metavar="ID")
    p.add_argument("--status", choices=("valid", "revoked", "expired"))
    p.add_argument("--expiring-within-days", type=int, metavar="DAYS",
                   help="only valid certificates that expire within DAYS")
    p = command(cert, "info", cmd_cert_info, "show a service's current certificate")
    p.add_argument("--service-id", required=True, metavar="ID")
    p = command(cert, "renew", cmd_cert_renew,
                "renew a service's current certificate with the same key (new serial and validity); "
                "updates service_certificates/<id>/ if it holds the matching key", ca_pw)
    p.add_argument("--service-id", required=True, metavar="ID")
    p.add_argument("--validity-days", type=int, metavar="DAYS")
    p = command(cert, "revoke", cmd_cert_revoke,
                "revoke a certificate (the current one unless --serial) and publish a new CRL", ca_pw,
                epilog="reasons: " + ", ".join(REASONS))
    p.add_argument("--service-id", required=True, metavar="ID")
    p.add_argument("--reason", required=True, metavar="REASON", help="an RFC 5280 reason, e.g. keyCompromise")
    p.add_argument("--serial", metavar="HEX", help="a specific certificate of the service")

    # service
    service = group("service", "the service registry")
    p = command(service, "register", cmd_service_register,
                "register a service and print its one-time enrolment token",
                epilog="example:\n  pki-admin service register --service-id billing --name Billing \\\n"
                       "      --san-dns billing billing.internal --endpoint https://billing:9443")
    p.add_argument("--service-id", required=True, metavar="ID")
    p.add_argument("--name", required=True, help="a human-readable name")
    san_options(p)
    p.add_argument("--endpoint", nargs="+", action="extend", default=[], metavar="URL")
    p.add_argument("--health-check-url", metavar="URL")
    p.add_argument("--owner")
    p.add_argument("--version")
    p = command(service, "list", cmd_service_list, "list services with health and certificate expiry")
    p.add_argument("--healthy", action="store_true", help="only services whose last probe succeeded")
    p = command(service, "info", cmd_service_info, "show a registry entry and its certificate history")
    p.add_argument("--service-id", required=True, metavar="ID")

    # crl
    crl = group("crl", "certificate revocation lists")
    p = command(crl, "generate", cmd_crl_generate, "sign and publish a new CRL", ca_pw)
    p.add_argument("--out", metavar="FILE", help="also write it to FILE (PEM if FILE ends in .pem, else DER)")
    p = command(crl, "list", cmd_crl_list, "list the newest CRLs")
    p.add_argument("--limit", type=int, default=20, help="default: %(default)s")

    # token
    token = group("token", "admin API tokens")
    p = command(token, "create", cmd_token_create, "create an admin token; it is printed only once")
    p.add_argument("--name", help="what the token is for")
    p.add_argument("--expires-days", type=int, metavar="DAYS", help="default: until revoked")
    p = command(token, "list", cmd_token_list, "list tokens (never their values)")
    p.add_argument("--kind", choices=("admin", "enrolment", "all"), default="admin",
                   help="default: %(default)s")
    p = command(token, "revoke", cmd_token_revoke, "revoke a token")
    p.add_argument("token_id", metavar="TOKEN_ID")

    # init
    p = top.add_parser("init", parents=[common, password_options(root=True, ca=True)],
                       formatter_class=_Formatter,
                       help="one-shot setup of a new home: root, intermediate, server certificate, CRL",
                       description=textwrap.fill(
                           "Create a new CA home: config.toml, root CA, intermediate CA, the API "
                           "server's certificate (always for localhost and 127.0.0.1) and the first "
                           "CRL. Refuses a home that already has a CA; a failure leaves the home as "
                           "it was.", 88),
                       epilog="example:\n  pki-admin --home /srv/pki init --public-url https://10.0.0.5:8443 "
                              "\\\n      --server-san-dns pki.internal --server-san-ip 10.0.0.5")
    p.set_defaults(func=cmd_init)
    p.add_argument("--public-url", metavar="URL",
                   help="base URL of the API server for CRL and AIA URLs (default: https://127.0.0.1:8443)")
    san_options(p, prefix="server-")
    p.add_argument("--root-key-type", choices=ROOT_KEY_TYPES, default="rsa-4096", help="default: %(default)s")
    p.add_argument("--intermediate-key-type", choices=INTERMEDIATE_KEY_TYPES, default="rsa-2048",
                   help="default: %(default)s")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pki-admin`` with ``argv`` (default: the process arguments); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    func: Command = args.func
    try:
        return func(args)
    except CAError as exc:
        message = exc.message
    except BrokenPipeError:  # `pki-admin cert list | head`: the reader left, stay quiet
        _silence_stdout()
        return 1
    except (OSError, ValueError, sqlite3.Error) as exc:
        message = str(exc) or type(exc).__name__
    except KeyboardInterrupt:
        message = "interrupted"
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real stdout (tests capture it)
        pass


if __name__ == "__main__":
    sys.exit(main())
