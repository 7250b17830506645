"""Certificate revocation lists: ``pki-admin crl generate | list``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..authority import Actor
from ..errors import InvalidRequest
from ..home import write_file
from ..store import utc_text
from .access import open_authority
from .output import crl_json, print_json, print_table


def cmd_crl_generate(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else None
    if (out is not None and not (out.parent.is_dir() and os.access(out.parent, os.W_OK))) or (
            out is not None and out.is_dir()):
        # Checked before publishing: a failed command must not have changed the CA's state.
        raise InvalidRequest(f"cannot write the CRL to {out}: no such writable folder, or it is a folder")
    with open_authority(args, sign=True) as (_, authority):
        crl = authority.generate_crl(actor=Actor.operator())
    if out is not None:
        if out.suffix.lower() == ".pem":
            body = x509.load_der_x509_crl(crl.der).public_bytes(serialization.Encoding.PEM)
        else:
            body = crl.der
        write_file(out, body, 0o644)
    if args.json:
        print_json({**crl_json(crl), "file": args.out})
    else:
        print(f"published CRL number {crl.number} with {crl.entries} revoked certificate(s), "
              f"next update {utc_text(crl.next_update)}" + (f"; written to {args.out}" if args.out else ""))
    return 0


def cmd_crl_list(args: argparse.Namespace) -> int:
    with open_authority(args, sign=False) as (_, authority):
        crls = authority.store.list_crls(limit=args.limit)
    if args.json:
        print_json([crl_json(c) for c in crls])
    elif not crls:
        print("no CRLs yet: run `pki-admin crl generate`")
    else:
        print_table(("NUMBER", "THIS UPDATE", "NEXT UPDATE", "ENTRIES"),
                    [(str(c.number), utc_text(c.this_update), utc_text(c.next_update), str(c.entries))
                     for c in crls])
    return 0
