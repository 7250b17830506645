"""The service registry: services, their SAN allow-lists, descriptive fields and health."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import attrs

from .. import tokens
from ..errors import InvalidRequest, NotPermitted, PolicyRefused, UnknownService
from ..policy import MIN_LIFETIME, check_service_id, normalize_sans
from ..store import AuditEntry, Health, ServiceRecord
from .base import Actor, log
from .identity import Identity

_SERVICE_FIELDS = ("service_name", "endpoints", "health_check_url", "version", "owner", "metadata")
_LIFETIME_FIELDS = ("default_validity_seconds", "max_validity_seconds")
_ADMIN_FIELDS = ("san_dns", "san_ip", *_LIFETIME_FIELDS)



class Registry(Identity):
    """Registering and updating services; recording their health."""

    def service(self, service_id: str) -> ServiceRecord:
        record = self.store.get_service(check_service_id(service_id))
        if record is None:
            raise UnknownService(service_id)
        return record

    def register_service(self, service_id: str, *, service_name: str | None = None,
                         san_dns: Iterable[str] = (), san_ip: Iterable[str] = (),
                         actor: Actor, **fields: Any) -> tuple[ServiceRecord, tokens.NewToken]:
        """Register a new service and make its one-time enrolment token.

        With no SANs, the allow-list is the service id itself (a single-label DNS name).
        """
        record, token = self._register(service_id, service_name, san_dns, san_ip, actor, fields, with_token=True)
        assert token is not None
        return record, token

    def register_without_token(self, service_id: str, *, service_name: str | None = None,
                               san_dns: Iterable[str] = (), san_ip: Iterable[str] = (),
                               actor: Actor) -> ServiceRecord:
        """Register a new service that gets its certificates from the admin, not by enrolling
        (``pki-admin cert issue``, the server's own): no enrolment token is left behind."""
        return self._register(service_id, service_name, san_dns, san_ip, actor, {}, with_token=False)[0]

    def _register(self, service_id: str, service_name: str | None, san_dns: Iterable[str],
                  san_ip: Iterable[str], actor: Actor, fields: dict[str, Any], *,
                  with_token: bool) -> tuple[ServiceRecord, tokens.NewToken | None]:
        if not actor.is_admin:
            raise NotPermitted("only an admin registers new services")
        check_service_id(service_id)
        dns, ips = normalize_sans(san_dns, san_ip)
        if not dns and not ips:
            dns = (service_id,)
        now = self.clock()
        limits = _check_lifetimes({k: fields.pop(k) for k in _LIFETIME_FIELDS if k in fields})
        values = _check_fields(fields)
        record = ServiceRecord(service_id=service_id, service_name=service_name or service_id,
                               san_dns=dns, san_ip=tuple(str(i) for i in ips),
                               created_at=now, updated_at=now, **values,
                               default_validity_seconds=limits["default_validity_seconds"],
                               max_validity_seconds=limits["max_validity_seconds"])
        token = tokens.new_token("enrolment", now=now, service_id=service_id,
                                 expires_at=now + self.settings.enrolment_token_ttl) if with_token else None
        self.store.add_service(record, actor=actor.label, token=token.record if token else None)
        log.info("service registered service_id=%s san_dns=%s san_ip=%s", service_id,
                 ",".join(dns), ",".join(record.san_ip))
        if record.health_check_url:
            self._health_url_set(service_id)
        return record, token

    def register(self, service_id: str, fields: dict[str, Any], *,
                 actor: Actor) -> tuple[ServiceRecord, tokens.NewToken | None]:
        """``POST /services/register``: an admin registers a new service (``fields``: its
        SANs and descriptive fields) and gets its enrolment token; a service registering
        itself again updates its own entry with ``fields`` (no token)."""
        if not actor.is_admin:
            return self.update_service(service_id, fields, actor=actor), None
        descriptive = {k: v for k, v in fields.items()
                       if k in (*_SERVICE_FIELDS, *_LIFETIME_FIELDS) and k != "service_name"}
        return self.register_service(service_id, service_name=fields.get("service_name"),
                                     san_dns=_str_list(fields.get("san_dns", []), "san_dns"),
                                     san_ip=_str_list(fields.get("san_ip", []), "san_ip"),
                                     actor=actor, **descriptive)

    def update_service(self, service_id: str, changes: dict[str, Any], *, actor: Actor) -> ServiceRecord:
        """Change a registry entry: a service its own descriptive fields, an admin anything."""
        self._require(actor, service_id, "update the registry entry")
        current = self.service(service_id)
        unknown = set(changes) - set(_SERVICE_FIELDS) - set(_ADMIN_FIELDS)
        if unknown:
            raise InvalidRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
        if not actor.is_admin:
            if set(changes) & set(_LIFETIME_FIELDS):
                raise NotPermitted("only an admin changes the lifetimes of a service's certificates")
            _only_narrows(current, changes)
        values: dict[str, Any] = _check_fields({k: v for k, v in changes.items() if k in _SERVICE_FIELDS})
        if "service_name" in changes:
            values["service_name"] = changes["service_name"]
        if "san_dns" in changes or "san_ip" in changes:
            dns, ips = normalize_sans(_str_list(changes.get("san_dns", current.san_dns), "san_dns"),
                                      _str_list(changes.get("san_ip", current.san_ip), "san_ip"))
            values["san_dns"], values["san_ip"] = dns, tuple(str(i) for i in ips)
        values.update(_check_lifetimes({k: changes.get(k, getattr(current, k)) for k in _LIFETIME_FIELDS}))
        updated = attrs.evolve(current, updated_at=self.clock(), **values)
        self.store.update_service(updated, actor=actor.label)
        if updated.health_check_url and updated.health_check_url != current.health_check_url:
            self._health_url_set(service_id)
        return updated

    def _health_url_set(self, service_id: str) -> None:
        for watcher in self.health_url_watchers:
            watcher(service_id)

    def audit_entries(self, *, actor: Actor, limit: int = 100, service_id: str | None = None,
                      since: datetime | None = None, before: int | None = None) -> list[tuple[int, AuditEntry]]:
        """The audit log, newest first, with each entry's id (``before``: the previous page's
        last id). Admins only: it names every service, token and operator."""
        if not actor.is_admin:
            raise NotPermitted("only an admin reads the audit log")
        return self.store.audit_page(limit=limit, service_id=service_id, since=since, before=before)

    def list_services(self, *, healthy: bool | None = None, limit: int = 100,
                      after: str | None = None) -> list[ServiceRecord]:
        return self.store.list_services(healthy=healthy, limit=limit, after=after)

    def record_health(self, service_id: str, ok: bool, error: str | None) -> Health:
        """Store a probe result; a change between healthy and unhealthy goes to the audit log."""
        current = self.service(service_id).health
        now = self.clock()
        if ok:
            health = Health(status="healthy", last_checked=now, last_error=None, consecutive_failures=0)
        else:
            health = Health(status="unhealthy", last_checked=now, last_error=error,
                            consecutive_failures=current.consecutive_failures + 1)
        event = None
        if health.status != current.status:
            event = "service.healthy" if ok else "service.unhealthy"
        self.store.record_health(service_id, health, event=event)
        return health



def _str_list(value: object, name: str) -> list[str]:
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidRequest(f"{name} must be a list of strings")


def _check_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Type-check the descriptive registry fields; unknown ones are refused."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if name == "endpoints":
            out[name] = tuple(_str_list(value, name))
        elif name == "metadata":
            if not isinstance(value, dict):
                raise InvalidRequest("metadata must be an object")
            if _depth(value) > MAX_METADATA_DEPTH:
                raise InvalidRequest(f"metadata may nest at most {MAX_METADATA_DEPTH} levels deep")
            out[name] = value
        elif name in ("health_check_url", "version", "owner", "service_name"):
            if value is not None and not isinstance(value, str):
                raise InvalidRequest(f"{name} must be a string")
            if name != "service_name":
                out[name] = value
        else:
            raise InvalidRequest(f"unknown field {name!r}")
    return out


def _check_lifetimes(fields: dict[str, Any]) -> dict[str, int | None]:
    """``default_validity_seconds`` / ``max_validity_seconds``: integers of at least 300 (or
    null: the server's policy), the default not above the maximum."""
    out: dict[str, int | None] = {}
    for name in _LIFETIME_FIELDS:
        value = fields.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < MIN_LIFETIME.total_seconds()):
            raise InvalidRequest(f"{name} must be an integer of at least "
                                 f"{int(MIN_LIFETIME.total_seconds())} (seconds), got {value!r}")
        out[name] = value
    default, maximum = out.get("default_validity_seconds"), out.get("max_validity_seconds")
    if default is not None and maximum is not None and default > maximum:
        raise InvalidRequest(f"default_validity_seconds {default} is above max_validity_seconds {maximum}")
    return out


def _only_narrows(current: ServiceRecord, changes: dict[str, Any]) -> None:
    """A service may repeat or narrow its own SAN allow-list, never widen it (403 naming the SAN)."""
    if "san_dns" not in changes and "san_ip" not in changes:
        return
    dns, ips = normalize_sans(_str_list(changes.get("san_dns", current.san_dns), "san_dns"),
                              _str_list(changes.get("san_ip", current.san_ip), "san_ip"))
    allowed_dns, allowed_ip = normalize_sans(current.san_dns, current.san_ip)
    outside = [n for n in dns if n not in allowed_dns] + [str(i) for i in ips if i not in allowed_ip]
    if outside:
        raise PolicyRefused(f"SAN '{outside[0]}' is not in the allow-list of service '{current.service_id}'; "
                            "only an admin widens it")


MAX_METADATA_DEPTH = 8


def _depth(value: object) -> int:
    """How deep objects and arrays nest in ``value`` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            stack += [(v, level + 1) for v in item.values()]
        elif isinstance(item, list):
            stack += [(v, level + 1) for v in item]
        else:
            continue
        deepest = max(deepest, level + 1)
    return deepest
