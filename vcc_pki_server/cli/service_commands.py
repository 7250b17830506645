"""The service registry: ``pki-admin service register | list | info | delete``."""

from __future__ import annotations

import argparse

from ..authority import Actor, Authority
from ..store import ServiceRecord, current_certificate, opt_text, utc_text
from .access import open_authority
from .output import JSON, certificate_json, print_fields, print_json, print_table, sans_text, service_json


def cmd_service_register(args: argparse.Namespace) -> int:
    fields: JSON = {name: getattr(args, name) for name in ("health_check_url", "owner", "version")
                    if getattr(args, name) is not None}
    if args.endpoint:
        fields["endpoints"] = list(args.endpoint)
    with open_authority(args, sign=False) as (_, authority):
        record, token = authority.register_service(
            args.service_id, service_name=args.name, san_dns=args.san_dns, san_ip=args.san_ip,
            actor=Actor.operator(), **fields)
    expires = opt_text(token.record.expires_at)
    if args.quiet:
        print(token.value)
    elif args.json:
        print_json({**service_json(record, None), "enrolment_token": token.value,
                    "enrolment_token_id": token.record.token_id,
                    "enrolment_token_expires_at": expires})
    else:
        print(f"registered service '{record.service_id}' ({record.service_name}); "
              f"SAN allow-list: {sans_text(record)}")
        print(f"enrolment token (shown only once, single use, expires {expires}):")
        print(token.value)
    return 0


def cmd_service_token(args: argparse.Namespace) -> int:
    with open_authority(args, sign=False) as (_, authority):
        token = authority.new_enrolment_token(args.service_id, actor=Actor.operator())
    expires = opt_text(token.record.expires_at)
    if args.quiet:
        print(token.value)
    elif args.json:
        print_json({"service_id": args.service_id, "enrolment_token": token.value,
                    "enrolment_token_id": token.record.token_id, "enrolment_token_expires_at": expires})
    else:
        print(f"enrolment token for '{args.service_id}' (shown only once, single use, expires {expires}):")
        print(token.value)
    return 0


def all_services(authority: Authority, healthy: bool | None) -> list[ServiceRecord]:
    services: list[ServiceRecord] = []
    while True:
        page = authority.list_services(healthy=healthy, limit=1000,
                                       after=services[-1].service_id if services else None)
        services += page
        if len(page) < 1000:
            return services


def cmd_service_list(args: argparse.Namespace) -> int:
    with open_authority(args, sign=False) as (_, authority):
        now = authority.clock()
        entries = [(s, current_certificate(authority.store.certificates_for(s.service_id), now))
                   for s in all_services(authority, True if args.healthy else None)]
    if args.json:
        print_json([service_json(s, c) for s, c in entries])
    elif not entries:
        print("no services")
    else:
        print_table(("SERVICE ID", "NAME", "HEALTH", "LAST CHECKED", "CERT SERIAL", "CERT EXPIRES"),
                    [(s.service_id, s.service_name, s.health.status,
                      opt_text(s.health.last_checked) or "-", c.serial if c else "-",
                      utc_text(c.not_after) if c else "-") for s, c in entries])
    return 0


def cmd_service_info(args: argparse.Namespace) -> int:
    with open_authority(args, sign=False) as (_, authority):
        record = authority.service(args.service_id)
        history = authority.certificates(args.service_id)
        now = authority.clock()
    current = current_certificate(history, now)
    data = {**service_json(record, current),
            "certificates": [certificate_json(r, now) for r in history]}
    if args.json:
        print_json(data)
        return 0
    health = record.health
    print_fields([
        ("service id", record.service_id), ("name", record.service_name),
        ("SAN allow-list", sans_text(record)), ("endpoints", ", ".join(record.endpoints) or "-"),
        ("health check", record.health_check_url or "-"), ("owner", record.owner or "-"),
        ("version", record.version or "-"),
        ("health", f"{health.status} (checked {opt_text(health.last_checked) or 'never'}"
                   f"{', ' + health.last_error if health.last_error else ''})"),
        ("registered", utc_text(record.created_at)),
    ])
    print("\ncertificates")
    if not history:
        print("  (none)")
    else:
        print_table(("  SERIAL", "STATUS", "NOT AFTER", "REVOCATION"),
                    [(f"  {r.serial}", r.status(now), utc_text(r.not_after),
                      r.revocation_reason or "-") for r in history])
    return 0


def cmd_service_delete(args: argparse.Namespace) -> int:
    with open_authority(args, sign=True) as (_, authority):
        serials = authority.decommission(args.service_id, actor=Actor.operator())
        crl_number = authority.store.latest_crl_number(authority.ca.ski) or None
    if args.json:
        print_json({"service_id": args.service_id, "status": "decommissioned", "revoked_serials": serials,
                    "crl_number": crl_number})
    else:
        print(f"decommissioned service '{args.service_id}': {len(serials)} certificate(s) revoked "
              f"(cessationOfOperation), enrolment tokens spent, removed from the registry")
        if serials:
            print(f"revoked: {', '.join(serials)}; published CRL number {crl_number or '-'}")
    return 0
