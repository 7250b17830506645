"""``<home>/config.toml``: the settings of a CA home, read by the CLI and the server."""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, cast

import attrs
from cryptography import x509

from .authority import Settings
from .encoding import ski_hex
from .errors import CAError
from .policy import DEFAULT_TRUST_DOMAIN, Policy, check_trust_domain

# What each number of config.toml may be (type, lowest, highest); anything else is a one-line error.
_RANGES: dict[str, tuple[type | tuple[type, ...], float, float]] = {
    "default_validity_days": (int, 1, 36500),
    "max_validity_days": (int, 1, 36500),
    "crl_validity_days": (int, 1, 3650),
    "enrolment_token_hours": (int, 1, 24 * 365),
    "health_interval_seconds": ((int, float), 1, 86400),
    "health_timeout_seconds": ((int, float), 0.1, 3600),
    "health_concurrency": (int, 1, 1024),
}


@attrs.frozen(kw_only=True)
class Config:
    """``<home>/config.toml``: written by ``init``, read by the CLI and the server."""

    public_url: str = "https://127.0.0.1:8443"
    server_san_dns: tuple[str, ...] = ("localhost",)
    server_san_ip: tuple[str, ...] = ("127.0.0.1",)
    # SPEC §10: every leaf carries spiffe://<trust_domain>/svc/<service_id>.
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    default_validity_days: int = 365
    max_validity_days: int = 365
    crl_validity_days: int = 7
    enrolment_token_hours: int = 24
    health_interval_seconds: float = 30.0
    health_timeout_seconds: float = 5.0
    health_concurrency: int = 16
    # Probing loopback addresses reaches the CA's own host: only if an admin allows it.
    health_allow_loopback: bool = False
    # SPEC §9: replicas share one PostgreSQL database; None is SQLite in <home>/pki.db.
    # $VCC_PKI_DATABASE_URL overrides it (so a password need not sit in this file).
    database_url: str | None = attrs.field(default=None, repr=False)

    def crl_url(self, issuer: x509.Certificate) -> str:
        """The CRL distribution point of ``issuer``'s leaves (SPEC §13: per issuer, so that it
        stays right across CA rotations)."""
        return f"{self.public_url.rstrip('/')}/api/v1/crl/{ski_hex(issuer)}"

    def issuer_url(self, issuer: x509.Certificate) -> str:
        """The AIA caIssuers URI of ``issuer``'s leaves (per issuer, as :meth:`crl_url`)."""
        return f"{self.public_url.rstrip('/')}/api/v1/ca/intermediate/{ski_hex(issuer)}?format=der"

    @classmethod
    def from_toml(cls, text: str) -> Config:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise CAError(f"config.toml is not valid TOML: {exc}") from None
        flat: dict[str, Any] = {k: v for k, v in data.items() if not isinstance(v, dict)}
        for section in ("policy", "health"):
            table = data.get(section, {})
            if not isinstance(table, dict):
                raise CAError(f"config.toml: [{section}] must be a table of settings, got {table!r}")
            for key, value in table.items():
                flat[key if section == "policy" else f"health_{key}"] = value
        known = {f.name for f in attrs.fields(cls)}
        unknown = set(flat) - known
        if unknown:
            raise CAError(f"config.toml: unknown setting(s) {', '.join(sorted(unknown))}")
        for key in ("server_san_dns", "server_san_ip"):
            if key in flat and isinstance(flat[key], list):
                flat[key] = tuple(flat[key])
        for key, (kind, low, high) in _RANGES.items():
            number: Any = flat.get(key)
            if key in flat and (isinstance(number, bool) or not isinstance(number, kind)
                                or not low <= cast(float, number) <= high):
                raise CAError(f"config.toml: {key} must be a number from {low} to {high}, got {number!r}")
        if "health_allow_loopback" in flat and not isinstance(flat["health_allow_loopback"], bool):
            raise CAError(f"config.toml: [health] allow_loopback must be true or false, "
                          f"got {flat['health_allow_loopback']!r}")
        for key in ("public_url", "database_url"):
            if key in flat and not isinstance(flat[key], str):
                raise CAError(f"config.toml: {key} must be a string, got {flat[key]!r}")
        for key in ("server_san_dns", "server_san_ip"):
            if key in flat and not (isinstance(flat[key], tuple) and all(isinstance(v, str) for v in flat[key])):
                raise CAError(f"config.toml: {key} must be a list of strings")
        if "trust_domain" in flat:
            try:
                check_trust_domain(flat["trust_domain"])
            except CAError as exc:
                raise CAError(f"config.toml: {exc.message}") from None
        return cls(**flat)

    def to_toml(self) -> str:
        def q(v: str) -> str:
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'

        def arr(vs: Sequence[str]) -> str:
            return "[" + ", ".join(q(v) for v in vs) + "]"

        return (
            "# VCC PKI settings, written by `pki-admin init`. Restart the server after a change.\n"
            "# The public URL goes into every certificate's CRL distribution point and AIA.\n"
            f"public_url = {q(self.public_url)}\n"
            f"server_san_dns = {arr(self.server_san_dns)}\n"
            f"server_san_ip = {arr(self.server_san_ip)}\n"
            f"trust_domain = {q(self.trust_domain)}\n"
            + (f"database_url = {q(self.database_url)}\n" if self.database_url else "")
            + "\n"
            "[policy]\n"
            f"default_validity_days = {self.default_validity_days}\n"
            f"max_validity_days = {self.max_validity_days}\n"
            f"crl_validity_days = {self.crl_validity_days}\n"
            f"enrolment_token_hours = {self.enrolment_token_hours}\n\n"
            "[health]\n"
            f"interval_seconds = {self.health_interval_seconds}\n"
            f"timeout_seconds = {self.health_timeout_seconds}\n"
            f"concurrency = {self.health_concurrency}\n"
            f"allow_loopback = {'true' if self.health_allow_loopback else 'false'}\n"
        )

    def policy(self) -> Policy:
        return Policy(default_validity_days=self.default_validity_days,
                      max_validity_days=self.max_validity_days, trust_domain=self.trust_domain)

    def settings(self) -> Settings:
        return Settings(crl_validity=timedelta(days=self.crl_validity_days),
                        enrolment_token_ttl=timedelta(hours=self.enrolment_token_hours))
