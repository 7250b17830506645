"""The audit log: ``pki-admin audit``."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone

from vcc_pki_client.durations import duration

from .. import render
from ..authority import Actor
from ..policy import check_service_id
from ..store import utc_text
from .access import open_authority
from .output import print_json, print_table


def since(text: str) -> datetime:
    """``--since``: an RFC 3339 time (``2026-12-01T00:00:00Z``) or a duration back from now (``24h``)."""
    try:
        return datetime.now(timezone.utc) - duration(text)
    except argparse.ArgumentTypeError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a time like 2026-12-01T00:00:00Z or a duration like 24h, "
                                         f"got {text!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def cmd_audit(args: argparse.Namespace) -> int:
    if args.service_id is not None:
        check_service_id(args.service_id)
    with open_authority(args, sign=False) as (_, authority):
        entries = authority.audit_entries(actor=Actor.operator(), limit=args.limit, service_id=args.service_id,
                                          since=args.since)
    if args.json:
        print_json([render.audit(entry_id, entry) for entry_id, entry in entries])
        return 0
    print_table(["AT", "ACTOR", "ACTION", "SERVICE", "SERIAL", "DETAILS"],
                [[utc_text(e.at), e.actor, e.action, e.service_id or "-", e.serial or "-",
                  json.dumps(e.details, sort_keys=True) if e.details else "-"] for _, e in entries])
    return 0

