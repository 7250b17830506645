"""The authority's shared ground: who asks (:class:`Actor`), what it holds (store, CA, policy,
settings, clock) and the one rule every use case applies first (:meth:`AuthorityBase._require`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import attrs
from cryptography import x509

from ..ca import CAs, CertificateAuthority
from ..errors import CAUnavailable, NotPermitted
from ..policy import Policy
from ..store import CertificateRecord, Store

log = logging.getLogger("vcc_pki_server.authority")
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


@attrs.frozen(kw_only=True)
class Actor:
    """Who asks. ``kind``: operator (local CLI), admin (API token), service (mTLS), enrolment,
    metrics (a token that opens ``/metrics`` only)."""

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
    # Refused requests an enrolment token may make before it is locked: each costs the CA a
    # CSR check, and a token holder must not be able to buy unlimited CPU with it.
    enrolment_refusals: int = 10


class AuthorityBase:
    """What every part of :class:`~vcc_pki_server.authority.Authority` stands on."""

    def __init__(self, store: Store, ca: CAs | CertificateAuthority | None, *, policy: Policy | None = None,
                 settings: Settings | None = None, clock: Clock = utc_now) -> None:
        self.store = store
        self._cas = CAs.single(ca) if isinstance(ca, CertificateAuthority) else ca
        self.policy = policy or Policy()
        self.settings = settings or Settings()
        self.clock = clock
        #: Called with a service's id, in the calling thread, when its ``health_check_url`` was
        #: just set or changed (the health checker probes it then, not at its next round).
        self.health_url_watchers: list[Callable[[str], None]] = []

    @property
    def ca(self) -> CertificateAuthority:
        """The current intermediate: it signs every new certificate."""
        return self.cas.current

    @property
    def cas(self) -> CAs:
        """Every CA this authority works with (SPEC §13)."""
        cas = self._cas
        if cas is None:
            raise CAUnavailable("the CA key is not loaded")
        return cas

    @property
    def has_ca(self) -> bool:
        return self._cas is not None

    def set_cas(self, cas: CAs) -> None:
        """Sign with ``cas`` from now on (a rotation): one reference swapped, so a certificate
        being signed meanwhile is wholly of the old current CA or of the new one."""
        self._cas = cas

    @staticmethod
    def _require(actor: Actor, service_id: str, what: str, *, enrolment: bool = False) -> None:
        if actor.is_admin:
            return
        if actor.kind == "enrolment" and not enrolment:
            # SPEC §4: an enrolment token buys the first certificate, once, and nothing else.
            raise NotPermitted(f"an enrolment token may only request the first certificate, not {what}")
        if actor.service_id != service_id:
            raise NotPermitted(f"{actor.label} may not {what} for service '{service_id}'")
