"""Service certificates: ``pki-admin cert issue | list | info | renew | revoke``."""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from .. import render
from ..authority import Actor, Authority, Issued
from ..ca import REASONS
from ..encoding import cert_pem
from ..errors import InvalidRequest, NotFound
from ..home import Home, write_file
from ..store import CertificateRecord, current_certificate, utc_text
from .access import open_authority
from .output import PROG, certificate_json, key_label, print_fields, print_json, print_table, progress, sans_text


def lifetime(args: argparse.Namespace) -> timedelta | None:
    """``--validity`` or ``--validity-days`` (None: the policy's default)."""
    if args.validity_days is not None:
        if args.validity_days < 1:
            raise InvalidRequest(f"--validity-days must be a positive integer, got {args.validity_days}")
        return timedelta(days=args.validity_days)
    validity: timedelta | None = args.validity
    return validity


def cmd_cert_issue(args: argparse.Namespace) -> int:
    with open_authority(args, sign=True) as (home, authority):
        issued, key = authority.issue_with_key(
            args.service_id, common_name=args.cn, san_dns=args.san_dns, san_ip=args.san_ip,
            key_type=args.key_type, validity=lifetime(args), actor=Actor.operator(),
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
    record = current_certificate(records, now) or records[0]
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
               cert_pem(*issued.chain), 0o644)
    return folder


def cmd_cert_renew(args: argparse.Namespace) -> int:
    with open_authority(args, sign=True) as (home, authority):
        issued = authority.renew(args.service_id, actor=Actor.operator(), validity=lifetime(args))
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
        revoked = authority.revoke(args.service_id, reason=args.reason, serial=serial,
                                   all_certificates=args.all, actor=Actor.operator())
        data = render.revoked(revoked, authority.clock())
    data["crl_number"] = revoked.crl.number if revoked.crl else None
    if args.json:
        print_json(data)
    else:
        record, others = revoked.record, revoked.serials[1:]
        print(f"revoked certificate {record.serial} of '{record.service_id}' ({args.reason}); "
              f"published CRL number {data['crl_number']}")
        if others:
            why = "of the service or with the same key" if args.all else "with the same key"
            print(f"also revoked {len(others)} other certificate(s) {why}: {', '.join(others)}")
    return 0
