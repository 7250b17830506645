"""Admin, metrics and enrolment tokens: generate, hash, parse and verify in constant time.

A token reads ``vcc_<kind>_<id>_<secret>``: the id finds the record, the secret (32 random
bytes) is compared by SHA-256 hash. A salted slow hash buys nothing for 256-bit random secrets.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime

import attrs

from .store import TokenRecord

PREFIXES = {"admin": "vcc_adm_", "enrolment": "vcc_enr_", "metrics": "vcc_met_"}


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@attrs.frozen
class NewToken:
    """A freshly made token: ``value`` is shown once, ``record`` is what the store keeps."""

    value: str = attrs.field(repr=False)
    record: TokenRecord


def new_token(kind: str, *, now: datetime, name: str | None = None, service_id: str | None = None,
              expires_at: datetime | None = None) -> NewToken:
    token_id = secrets.token_hex(6)
    secret = secrets.token_hex(32)
    record = TokenRecord(token_id=token_id, kind=kind, secret_hash=hash_secret(secret), name=name,
                         service_id=service_id, created_at=now, expires_at=expires_at)
    return NewToken(f"{PREFIXES[kind]}{token_id}_{secret}", record)


def parse_token(value: str) -> tuple[str, str, str] | None:
    """``(kind, token_id, secret)`` of a well-formed token string, else None."""
    for kind, prefix in PREFIXES.items():
        if value.startswith(prefix):
            token_id, _, secret = value[len(prefix):].partition("_")
            if len(token_id) == 12 and len(secret) == 64:
                return kind, token_id, secret
    return None


def secret_matches(record: TokenRecord, secret: str) -> bool:
    return hmac.compare_digest(record.secret_hash, hash_secret(secret))
