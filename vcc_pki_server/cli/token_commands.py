"""API tokens: ``pki-admin token create | list | revoke`` (values shown once, never listed)."""

from __future__ import annotations

import argparse

from .. import tokens
from ..authority import Actor
from ..store import opt_text, utc_text
from .access import open_authority
from .output import print_json, print_table, progress, token_json, token_status


def cmd_token_create(args: argparse.Namespace) -> int:
    with open_authority(args, sign=False) as (_, authority):
        token = authority.create_admin_token(name=args.name, expires_days=args.expires_days,
                                             actor=Actor.operator(), scope=args.scope)
        data = token_json(token.record, authority.clock())
    if args.json:
        print_json({**data, "token": token.value})
    else:
        # The token alone on stdout, so `TOKEN=$(pki-admin token create)` works.
        progress(f"{args.scope} token {data['token_id']} created (expires {data['expires_at'] or 'never'}); "
                 "it is shown only this once:")
        print(token.value)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    with open_authority(args, sign=False) as (_, authority):
        records = authority.list_tokens(None if args.kind == "all" else args.kind)
        now = authority.clock()
    if args.json:
        print_json([token_json(r, now) for r in records])
    elif not records:
        print("no tokens")
    else:
        print_table(("TOKEN ID", "KIND", "NAME / SERVICE", "CREATED", "EXPIRES", "STATUS"),
                    [(r.token_id, r.kind, r.name or r.service_id or "-", utc_text(r.created_at),
                      opt_text(r.expires_at) or "never", token_status(r, now)) for r in records])
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    parsed = tokens.parse_token(args.token_id)  # a whole token is accepted too
    token_id = parsed[1] if parsed else args.token_id
    with open_authority(args, sign=False) as (_, authority):
        record = authority.revoke_token(token_id, actor=Actor.operator())
        data = token_json(record, authority.clock())
    if args.json:
        print_json(data)
    else:
        print(f"revoked {record.kind} token {record.token_id}")
    return 0
