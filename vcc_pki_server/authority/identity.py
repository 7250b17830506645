"""Identity: who a request comes from, by its client certificate or its bearer token."""

from __future__ import annotations

from cryptography import x509

from .. import tokens
from ..encoding import der_fingerprint
from ..errors import NotAuthenticated
from .base import Actor, AuthorityBase


class Identity(AuthorityBase):
    """Authentication; every request is checked anew (TLS session resumption skips the handshake)."""

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
        if record is None or record.fingerprint != der_fingerprint(der):
            raise NotAuthenticated("client certificate is not known to this CA")
        status = record.status(self.clock())
        if status != "valid":
            raise NotAuthenticated(f"client certificate {record.serial} is {status}")
        return Actor(kind="service", label=f"service:{record.service_id}", service_id=record.service_id)

    def authenticate_token(self, value: str) -> Actor:
        """The admin, metrics or enrolment actor of a bearer token; expired, revoked, spent or unknown
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
        if kind in ("admin", "metrics"):
            return Actor(kind=kind, label=f"{kind}:{token_id}", token_id=token_id)
        return Actor(kind="enrolment", label=f"enrolment:{token_id}", service_id=record.service_id,
                     token_id=token_id)
