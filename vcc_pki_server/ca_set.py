"""The cluster's record of its CAs (SPEC §13): every root and intermediate, its state, and the
intermediates' keys (encrypted with the CA password, as in their files). No I/O here.

Before the first rotation there is no record: a home's files (``root_ca.pem``,
``intermediate_ca.pem``) are the only CA. Each rotation stores a new record in the store
(``shared_state`` "ca-set", compare-and-set): that one write is the moment the rotation
happens, for every server of the cluster; the home's files are then rewritten from it (and
again by any process that finds them behind, so a rotation cut short by a crash completes at
the next start).

States: a root is ``active`` (trusted) or ``retired``; an intermediate is ``current`` (signs
new certificates; exactly one), ``next`` (made by a rotation: listed in ``/ca/bundle`` and
signing its CRL at once, so that services learn it and fetch its CRL before any peer presents
a certificate of it; current from its ``activate_at``) or ``retired`` (signs only the CRL of
its certificates, until it expires).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .ca import CAPrivateKey, CAs, CertificateAuthority
from .encoding import cert_pem, ski_hex
from .errors import CAError, CAUnavailable

SHARED_NAME = "ca-set"


@attrs.frozen
class RootEntry:
    cert: x509.Certificate
    state: str = "active"  # active | retired
    cross: x509.Certificate | None = None  # this root certified by the root before it

    @property
    def ski(self) -> str:
        return ski_hex(self.cert)


@attrs.frozen
class IntermediateEntry:
    cert: x509.Certificate
    key_pem: bytes = attrs.field(repr=False)  # encrypted with the CA password
    state: str = "current"  # current | next | retired
    activate_at: datetime | None = None  # when a ``next`` one becomes current

    @property
    def ski(self) -> str:
        return ski_hex(self.cert)


@attrs.frozen
class CASet:
    """The roots and intermediates, oldest first; ``version``: of the stored record (0: none)."""

    roots: tuple[RootEntry, ...]
    intermediates: tuple[IntermediateEntry, ...]
    version: int = 0

    @property
    def current(self) -> IntermediateEntry:
        return next(i for i in self.intermediates if i.state == "current")

    @property
    def pending(self) -> IntermediateEntry | None:
        """The ``next`` intermediate of a rotation not yet in effect."""
        return next((i for i in self.intermediates if i.state == "next"), None)

    def settled(self, now: datetime) -> CASet:
        """The record as it stands at ``now``: a ``next`` intermediate whose time has come is
        the current one, and the one before it retired."""
        pending = self.pending
        if pending is None or pending.activate_at is None or now < pending.activate_at:
            return self
        return attrs.evolve(self, intermediates=tuple(
            attrs.evolve(i, state="current", activate_at=None) if i is pending
            else attrs.evolve(i, state="retired") if i.state == "current" else i
            for i in self.intermediates))

    @property
    def active_roots(self) -> tuple[RootEntry, ...]:
        """The trusted roots, the current intermediate's first."""
        mine = self.root_of(self.current.cert)
        return (mine, *(r for r in self.roots if r.state == "active" and r is not mine))

    def root_of(self, cert: x509.Certificate) -> RootEntry:
        for root in self.roots:
            if root.cert.subject == cert.issuer:
                return root
        raise CAError(f"no root of this CA issued {cert.subject.rfc4514_string()}")

    def find(self, ski: str) -> RootEntry | IntermediateEntry | None:
        entries: list[RootEntry | IntermediateEntry] = [*self.roots, *self.intermediates]
        return next((e for e in entries if e.ski == ski), None)

    def to_json(self) -> bytes:
        def pem(cert: x509.Certificate | None) -> str | None:
            return cert_pem(cert).decode("ascii") if cert is not None else None
        return json.dumps({
            "roots": [{"cert": pem(r.cert), "state": r.state, "cross": pem(r.cross)} for r in self.roots],
            "intermediates": [{"cert": pem(i.cert), "key": i.key_pem.decode("ascii"), "state": i.state,
                               "activate_at": i.activate_at.isoformat() if i.activate_at else None}
                              for i in self.intermediates],
        }, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, version: int) -> CASet:
        doc = json.loads(data)
        load = x509.load_pem_x509_certificate
        return cls(
            tuple(RootEntry(load(r["cert"].encode()), r["state"],
                            load(r["cross"].encode()) if r.get("cross") else None) for r in doc["roots"]),
            tuple(IntermediateEntry(load(i["cert"].encode()), i["key"].encode(), i["state"],
                                    datetime.fromisoformat(i["activate_at"]).astimezone(timezone.utc)
                                    if i.get("activate_at") else None)
                  for i in doc["intermediates"]),
            version,
        )

    def authorities(self, password: str, urls: Callable[[x509.Certificate], tuple[str, str]],
                    now: datetime) -> CAs:
        """The CAs a server signs with at ``now`` (see :meth:`settled`): every unexpired
        intermediate's key decrypted with the CA password (CAError naming the one that fails),
        ``urls(intermediate)`` giving its leaves' CRL and issuer URLs."""
        if self.settled(now) is not self:
            return self.settled(now).authorities(password, urls, now)
        roots = self.active_roots
        active = {r.cert.subject for r in roots}
        issuers: dict[str, CertificateAuthority] = {}
        current = self.current
        for entry in self.intermediates:
            if entry is not current and entry.cert.not_valid_after_utc <= now:
                continue  # expired: no certificate of it is valid, no CRL of it is needed
            root = self.root_of(entry.cert)
            if root.state == "retired" and entry is not current:
                continue  # nobody trusts its certificates any more
            # While the root before it is trusted, chains carry the cross-certificate.
            cross = root.cross if root.cross is not None and root.cross.issuer in active else None
            crl_url, issuer_url = urls(entry.cert)
            issuers[entry.ski] = CertificateAuthority(root=root.cert, certificate=entry.cert,
                                                      key=_decrypt(entry, password), crl_url=crl_url,
                                                      issuer_url=issuer_url, cross=cross)
        crosses = tuple(r.cross for r in roots if r.cross is not None and r.cross.issuer in active)
        pending = self.pending
        return CAs(issuers[current.ski], issuers, tuple(r.cert for r in roots), crosses, self.version,
                   pending.activate_at if pending is not None else None)


def _decrypt(entry: IntermediateEntry, password: str) -> CAPrivateKey:
    try:
        key = serialization.load_pem_private_key(entry.key_pem, password.encode())
    except (ValueError, TypeError):
        raise CAUnavailable(f"wrong password for the intermediate CA key ({entry.ski})") from None
    return key  # type: ignore[return-value]
