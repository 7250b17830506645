"""What pki-admin prints: tables, fields, JSON shapes, progress lines and the one-line error."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from vcc_pki_client.keys import fingerprint_sha256

from .. import render
from ..encoding import ski_hex
from ..store import CertificateRecord, CRLRecord, ServiceRecord, TokenRecord, opt_text, utc_text

PROG = "pki-admin"
JSON = dict[str, Any]


# -- small output helpers -------------------------------------------------------------------
def progress(message: str) -> None:
    """A progress or warning line on stderr (stdout stays clean for scripts)."""
    print(message, file=sys.stderr, flush=True)


def print_error(message: str) -> None:
    """The one line ``pki-admin: error: ...`` on stderr, whitespace in ``message`` collapsed."""
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that a reader that left (``| head``) causes no second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real stdout (tests capture it)
        pass


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def printable(text: str) -> str:
    """``text`` with control characters shown as escapes: registry fields are set by services,
    and a terminal must not run the escape codes one put there."""
    return "".join(ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    for line in (headers, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)).rstrip())


def print_fields(pairs: Sequence[tuple[str, str]]) -> None:
    width = max(len(key) for key, _ in pairs)
    for key, value in pairs:
        print(f"{key.ljust(width)}  {printable(value)}")


def key_label(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "EC P-256", "secp384r1": "EC P-384",
                "secp521r1": "EC P-521"}.get(key.curve.name, f"EC {key.curve.name}")
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(key).__name__


def sans_text(record: CertificateRecord | ServiceRecord) -> str:
    return ", ".join([*record.san_dns, *record.san_ip]) or "-"


# -- JSON shapes (SPEC §5 formats: RFC 3339 'Z' times, lowercase hex serials) ---------------
def certificate_json(record: CertificateRecord, now: datetime) -> JSON:
    return render.certificate(record, now)


def ca_certificate_json(cert: x509.Certificate, path: Path) -> JSON:
    return {
        "subject": cert.subject.rfc4514_string(), "serial_number": format(cert.serial_number, "x"),
        "key": key_label(cert.public_key()), "not_before": utc_text(cert.not_valid_before_utc),
        "not_after": utc_text(cert.not_valid_after_utc),
        "fingerprint_sha256": fingerprint_sha256(cert), "path": str(path),
        # Its CRL's path on the server: /api/v1/crl/<subject_key_identifier>
        "subject_key_identifier": ski_hex(cert),
    }


def service_json(record: ServiceRecord, current: CertificateRecord | None) -> JSON:
    """The API's shape of a service, and its current certificate's serial and expiry."""
    return {**render.service(record), "current_certificate": None if current is None else {
        "serial_number": current.serial, "not_after": utc_text(current.not_after)}}


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
        "expires_at": opt_text(record.expires_at), "used_at": opt_text(record.used_at),
        "revoked_at": opt_text(record.revoked_at), "status": token_status(record, now),
    }


def crl_json(record: CRLRecord) -> JSON:
    return {"number": record.number, "this_update": utc_text(record.this_update),
            "next_update": utc_text(record.next_update), "entries": record.entries}
