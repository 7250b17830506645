"""Tokens: admin tokens and enrolment tokens (their secrets are shown once, only hashes kept)."""

from __future__ import annotations

from datetime import timedelta

from .. import tokens
from ..errors import InvalidRequest, NotPermitted
from ..store import TokenRecord
from .base import Actor, log
from .registry import Registry


class Tokens(Registry):
    """Creating, listing and revoking tokens."""

    def create_admin_token(self, *, name: str | None, expires_days: int | None, actor: Actor,
                           scope: str = "admin") -> tokens.NewToken:
        """An API token: ``scope`` ``admin`` (the whole API) or ``metrics`` (``/metrics`` only)."""
        if scope not in ("admin", "metrics"):
            raise InvalidRequest(f"scope must be admin or metrics, got {scope!r}")
        if expires_days is not None and expires_days < 1:
            raise InvalidRequest(f"--expires-days must be at least 1, got {expires_days}")
        now = self.clock()
        expires = now + timedelta(days=expires_days) if expires_days else None
        token = tokens.new_token(scope, now=now, name=name, expires_at=expires)
        self.store.add_token(token.record, actor=actor.label)
        log.info("%s token created token_id=%s name=%s", scope, token.record.token_id, name)
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
