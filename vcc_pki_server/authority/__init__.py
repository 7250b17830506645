"""Authority: the CA's use cases (register, enrol, issue, renew, revoke, CRL, tokens). Owns the clock.

Callers (the CLI, the HTTP API, the health checker) pass an :class:`Actor`; the authority
decides what that actor may do, so both front ends share one set of rules (SPEC §4).

Split by reason to change, each part a module that builds on the one before:
:mod:`.base` (actors, settings, the shared state), :mod:`.identity` (authentication),
:mod:`.registry` (services), :mod:`.tokens`, :mod:`.issuance`, :mod:`.crl` (revocation and
the CRL). :class:`Authority` is all of them.
"""

from __future__ import annotations

from .base import Actor, Clock, Issued, Settings, utc_now
from .crl import Revocation

__all__ = ["Actor", "Authority", "Clock", "Issued", "Settings", "utc_now"]


class Authority(Revocation):
    """The CA's use cases over a :class:`~vcc_pki_server.store.Store`.

    ``ca`` may be None for work that needs no CA key (listing, registering, tokens); signing
    then raises :class:`~vcc_pki_server.errors.CAUnavailable`.
    """
