"""The ``pki-admin`` argument parser: subcommands, help texts, global and password options."""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable
from typing import Any

from vcc_pki_client import __version__
from vcc_pki_client.durations import duration

from ..ca import KEY_TYPES, REASONS
from .audit_commands import cmd_audit, since
from .backup_commands import cmd_backup, cmd_restore
from .ca_commands import (
    INTERMEDIATE_KEY_TYPES,
    ROOT_KEY_TYPES,
    cmd_ca_create_intermediate,
    cmd_ca_info,
    cmd_ca_init_root,
    cmd_ca_retire_root,
    cmd_ca_root_crl,
    cmd_ca_rotate_intermediate,
    cmd_ca_rotate_root,
    cmd_ca_status,
    cmd_init,
)
from .cert_commands import cmd_cert_info, cmd_cert_issue, cmd_cert_list, cmd_cert_renew, cmd_cert_revoke
from .crl_commands import cmd_crl_generate, cmd_crl_list
from .output import PROG
from .service_commands import (
    cmd_service_delete,
    cmd_service_info,
    cmd_service_list,
    cmd_service_register,
    cmd_service_token,
)
from .token_commands import cmd_token_create, cmd_token_list, cmd_token_revoke

Command = Callable[[argparse.Namespace], int]


EPILOG = """\
examples:
  pki-admin --home /srv/pki init --public-url https://10.0.0.5:8443 --server-san-dns pki.internal
  pki-admin service register --service-id billing --name Billing --san-dns billing localhost
  pki-admin service token --service-id billing       # a new enrolment token for it
  pki-admin cert revoke --service-id billing --reason keyCompromise
  pki-admin COMMAND --help                           # each command's options and an example

passwords: the root key's from --root-password-file, else $VCC_PKI_ROOT_PASSWORD, else (a dev
home made by `vcc-pki-server --dev`) <home>/secrets/root_password, else a prompt; the
intermediate key's from --password-file, else $VCC_PKI_CA_PASSWORD, else
<home>/secrets/ca_password, else a prompt. --password / --root-password work but are unsafe
(visible in process lists). The home is --home, else $VCC_PKI_HOME, else ./pki-data.
"""

GROUP_EPILOGS = {
    "ca": "examples:\n  pki-admin ca info\n  pki-admin ca init-root --key-type ec-p384 --root-password-file root.pw\n"
          "  pki-admin ca create-intermediate --root-password-file root.pw --password-file ca.pw\n"
          "  pki-admin ca status\n"
          "  pki-admin ca rotate-intermediate --root-password-file root.pw --password-file ca.pw\n"
          "  pki-admin ca rotate-root --root-password-file root.pw --password-file ca.pw   # then, later:\n"
          "  pki-admin ca retire-root",
    "cert": "examples:\n  pki-admin cert list --expiring-within-days 30\n"
            "  pki-admin cert issue --service-id backend --cn backend --san-dns backend --password-file ca.pw\n"
            "  pki-admin cert revoke --service-id backend --reason keyCompromise",
    "service": "examples:\n  pki-admin service register --service-id billing --name Billing --san-dns billing\n"
               "  pki-admin service token --service-id billing\n  pki-admin service list --healthy",
    "crl": "examples:\n  pki-admin crl generate --out crl.pem\n  pki-admin crl list --limit 5",
    "token": "examples:\n  pki-admin token create --name ci --expires-days 90\n"
             "  pki-admin token create --name prometheus --scope metrics\n  pki-admin token list --kind all",
}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str, **kwargs: Any) -> None:
        super().__init__(prog, max_help_position=34, **kwargs)


def global_options(*, suppress: bool) -> argparse.ArgumentParser:
    """``--home`` and ``--json``; on subcommands with SUPPRESS defaults, so that a value given
    before the subcommand is not reset by the subparser's default."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("global options")
    group.add_argument("--home", metavar="DIR", default=argparse.SUPPRESS if suppress else None,
                       help="the CA home (default: $VCC_PKI_HOME, else ./pki-data)")
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
                       help="machine-readable JSON on stdout")
    return parser


def password_options(*, root: bool, ca: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    if root:
        # Where the root's password is the only one (`ca init-root`), the prototype's
        # --password/--password-file name it too.
        alias = () if ca else ("--password-file",)
        group = parser.add_argument_group("root CA password")
        group.add_argument("--root-password-file", *alias, dest="root_password_file", metavar="FILE",
                           help="file holding the root key's password "
                                "(else $VCC_PKI_ROOT_PASSWORD, else a prompt)")
        group.add_argument("--root-password", *(() if ca else ("--password",)), dest="root_password",
                           metavar="PASSWORD", help="UNSAFE: visible in process lists and shell history")
    if ca:
        group = parser.add_argument_group("intermediate CA password")
        group.add_argument("--password-file", "--ca-password-file", dest="password_file", metavar="FILE",
                           help="file holding the intermediate key's password (else $VCC_PKI_CA_PASSWORD, "
                                "else a prompt)")
        group.add_argument("--password", "--ca-password", dest="password", metavar="PASSWORD",
                           help="UNSAFE: visible in process lists and shell history")
    return parser


def activate_after(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--activate-after", type=float, default=8.0, metavar="SECONDS",
                        help="the new intermediate is published at once and issues this much later, so that "
                             "services learn it (and fetch its CRL) before peers present its certificates; "
                             "default: %(default)g (servers then issue from it within 15 s)")


def san_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument(f"--{prefix}san-dns", nargs="+", action="extend", default=[], metavar="NAME",
                        help="DNS names (one or more; the option may repeat)")
    parser.add_argument(f"--{prefix}san-ip", nargs="+", action="extend", default=[], metavar="IP",
                        help="IPv4/IPv6 addresses (one or more; the option may repeat)")


def validity_options(p: argparse.ArgumentParser, default: str) -> None:
    """``--validity 8h`` (and ``--validity-days N``, the older spelling): the certificate's lifetime."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--validity", type=duration, metavar="DURATION",
                       help=f"lifetime of the certificate: 15m, 8h, 30d (at least 5m); {default}")
    group.add_argument("--validity-days", type=int, metavar="DAYS", help="the same in days")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter, epilog=EPILOG, parents=[global_options(suppress=False)],
        description="Administer the VCC private CA: CA keys, certificates, services, CRLs, API tokens.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = global_options(suppress=True)
    ca_pw = password_options(root=False, ca=True)
    top = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def group(name: str, help_text: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        sub = top.add_parser(name, parents=[common], formatter_class=_Formatter, help=help_text,
                             description=textwrap.fill(help_text, 88), epilog=GROUP_EPILOGS[name])
        return sub.add_subparsers(dest="action", required=True, metavar="ACTION")

    def command(actions: argparse._SubParsersAction[argparse.ArgumentParser], name: str, func: Command,
                help_text: str, *parents: argparse.ArgumentParser, epilog: str | None = None
                ) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, parents=[common, *parents], formatter_class=_Formatter,
                                 help=help_text, description=textwrap.fill(help_text, 88),
                                 epilog=epilog)
        sub.set_defaults(func=func)
        return sub

    # ca
    ca = group("ca", "the root and intermediate CA")
    p = command(ca, "init-root", cmd_ca_init_root, "create the root CA (key encrypted, 0400)",
                password_options(root=True, ca=False),
                epilog="example:\n  pki-admin ca init-root --key-type ec-p384 --root-password-file root.pw")
    p.add_argument("--key-type", choices=ROOT_KEY_TYPES, default="rsa-4096", help="default: %(default)s")
    p = command(ca, "create-intermediate", cmd_ca_create_intermediate,
                "create the issuing intermediate CA, signed by the root",
                password_options(root=True, ca=True),
                epilog="example:\n  pki-admin ca create-intermediate --root-password-file root.pw "
                       "--password-file ca.pw")
    p.add_argument("--key-type", choices=INTERMEDIATE_KEY_TYPES, default="rsa-2048",
                   help="default: %(default)s")
    command(ca, "root-crl", cmd_ca_root_crl,
            "sign the root's CRL anew (revoked intermediates; valid a year); init and "
            "create-intermediate make the first", password_options(root=True, ca=False),
            epilog="example:\n  pki-admin ca root-crl --root-password-file root.pw")
    command(ca, "info", cmd_ca_info, "show the CA certificates and URLs (no password needed)")
    command(ca, "status", cmd_ca_status,
            "each CA and its state; how many services renewed under the current intermediate, how many "
            "still carry the CRL URLs of before per-issuer URLs, and during a root rotation how many are "
            "only under the old root (no password needed)",
            epilog="example:\n  pki-admin ca status --json")
    p = command(ca, "rotate-intermediate", cmd_ca_rotate_intermediate,
                "a new intermediate under the current root: published at once, it issues every new "
                "certificate from --activate-after seconds later (running servers within 15 s, and they "
                "renew their own certificate under it); the previous one is retired and keeps signing the "
                "CRL of its certificates until it expires",
                password_options(root=True, ca=True),
                epilog="example:\n  pki-admin ca rotate-intermediate --root-password-file root.pw "
                       "--password-file ca.pw\n  pki-admin ca status   # then watch services renew")
    p.add_argument("--key-type", choices=INTERMEDIATE_KEY_TYPES, default=None,
                   help="the new intermediate's key (default: the kind of the current one)")
    activate_after(p)
    p = command(ca, "rotate-root", cmd_ca_rotate_root,
                "a new root (same root password), a cross-certificate of it signed by the current root, and "
                "a new intermediate under it that issues from --activate-after seconds later; both roots are "
                "trusted until "
                "`ca retire-root`. SDK clients learn the new root through the cross-certificate",
                password_options(root=True, ca=True),
                epilog="example:\n  pki-admin ca rotate-root --root-password-file root.pw --password-file ca.pw")
    p.add_argument("--key-type", choices=ROOT_KEY_TYPES, default=None,
                   help="the new root's key (default: the kind of the current root's)")
    p.add_argument("--intermediate-key-type", choices=INTERMEDIATE_KEY_TYPES, default=None,
                   help="the new intermediate's key (default: the kind of the current one)")
    activate_after(p)
    p = command(ca, "retire-root", cmd_ca_retire_root,
                "end a root rotation: the old root leaves /ca/roots and /ca/bundle. Refused, with the count, "
                "while unexpired certificates chain only to it, unless --force")
    p.add_argument("--force", action="store_true",
                   help="retire it even though some unexpired certificates chain only to it")

    # cert
    cert = group("cert", "service certificates")
    p = command(cert, "issue", cmd_cert_issue,
                "issue a certificate with a key generated here; writes "
                "service_certificates/<id>/{cert,key,ca_chain}.pem (key 0400). An unknown service is "
                "registered with the given names as its SAN allow-list", ca_pw,
                epilog="example:\n  pki-admin cert issue --service-id veritas-backend "
                       "--cn veritas-backend \\\n"
                       "      --san-dns veritas-backend localhost --san-ip 127.0.0.1 --password-file ca.pw")
    p.add_argument("--service-id", required=True, metavar="ID")
    p.add_argument("--cn", required=True, metavar="CN", help="common name (also put into the SANs)")
    san_options(p)
    p.add_argument("--key-type", choices=KEY_TYPES, default="rsa-2048", help="default: %(default)s")
    validity_options(p, "default: the service's default_validity_seconds, else config.toml's "
                        "default_validity_days; at most their maximum")
    p.add_argument("--name", help="service name when the service is new (default: the id)")
    p = command(cert, "list", cmd_cert_list, "list certificates")
    p.add_argument("--service-id", metavar="ID")
    p.add_argument("--status", choices=("valid", "revoked", "expired"))
    p.add_argument("--expiring-within-days", type=int, metavar="DAYS",
                   help="only valid certificates that expire within DAYS")
    p = command(cert, "info", cmd_cert_info, "show a service's current certificate")
    p.add_argument("--service-id", required=True, metavar="ID")
    p = command(cert, "renew", cmd_cert_renew,
                "renew a service's current certificate with the same key (new serial and validity); "
                "updates service_certificates/<id>/ if it holds the matching key", ca_pw)
    p.add_argument("--service-id", required=True, metavar="ID")
    validity_options(p, "default: the lifetime of the certificate renewed (capped by the policy)")
    p = command(cert, "revoke", cmd_cert_revoke,
                "revoke a certificate (the current one unless --serial) and publish a new CRL", ca_pw,
                epilog="reasons: " + ", ".join(REASONS))
    p.add_argument("--service-id", required=True, metavar="ID")
    p.add_argument("--reason", required=True, metavar="REASON", help="an RFC 5280 reason, e.g. keyCompromise")
    p.add_argument("--serial", metavar="HEX", help="a specific certificate of the service")
    p.add_argument("--all", action="store_true",
                   help="every unexpired certificate of the service (keyCompromise also revokes every "
                        "certificate with the same key, of any service, with or without --all)")

    # service
    service = group("service", "the service registry")
    p = command(service, "register", cmd_service_register,
                "register a service and print its one-time enrolment token",
                epilog="example:\n  pki-admin service register --service-id billing --name Billing \\\n"
                       "      --san-dns billing billing.internal --endpoint https://billing:9443")
    p.add_argument("--service-id", required=True, metavar="ID")
    p.add_argument("--name", required=True, help="a human-readable name")
    san_options(p)
    p.add_argument("--endpoint", nargs="+", action="extend", default=[], metavar="URL")
    p.add_argument("--health-check-url", metavar="URL")
    p.add_argument("--owner")
    p.add_argument("--version")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the enrolment token (for scripts)")
    p = command(service, "list", cmd_service_list, "list services with health and certificate expiry")
    p.add_argument("--healthy", action="store_true", help="only services whose last probe succeeded")
    p = command(service, "info", cmd_service_info, "show a registry entry and its certificate history")
    p.add_argument("--service-id", required=True, metavar="ID")
    p = command(service, "token", cmd_service_token,
                "print a fresh one-time enrolment token for a registered service (e.g. a second "
                "instance, or after its certificate expired or was revoked)",
                epilog="example:\n  pki-admin service token --service-id billing\n"
                       "  export BILLING_TOKEN=$(pki-admin service token --service-id billing --quiet)")
    p.add_argument("--service-id", required=True, metavar="ID")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the token (for scripts)")
    p = command(service, "delete", cmd_service_delete,
                "decommission a service: revoke its unexpired certificates (cessationOfOperation), spend "
                "its enrolment tokens, drop it from the registry (history stays; the id may be "
                "registered again)", ca_pw)
    p.add_argument("--service-id", required=True, metavar="ID")

    # crl
    crl = group("crl", "certificate revocation lists")
    p = command(crl, "generate", cmd_crl_generate, "sign and publish a new CRL", ca_pw)
    p.add_argument("--out", metavar="FILE", help="also write it to FILE (PEM if FILE ends in .pem, else DER)")
    p = command(crl, "list", cmd_crl_list, "list the newest CRLs")
    p.add_argument("--limit", type=int, default=20, help="default: %(default)s")

    # token
    token = group("token", "API tokens (admin, or metrics: /metrics only)")
    p = command(token, "create", cmd_token_create, "create an API token; it is printed only once")
    p.add_argument("--name", help="what the token is for")
    p.add_argument("--expires-days", type=int, metavar="DAYS", help="default: until revoked")
    p.add_argument("--scope", choices=("admin", "metrics"), default="admin",
                   help="admin: the whole API; metrics: GET /metrics and nothing else, for a "
                        "Prometheus scraper (default: %(default)s)")
    p = command(token, "list", cmd_token_list, "list tokens (never their values)")
    p.add_argument("--kind", choices=("admin", "metrics", "enrolment", "all"), default="admin",
                   help="default: %(default)s")
    p = command(token, "revoke", cmd_token_revoke, "revoke a token")
    p.add_argument("token_id", metavar="TOKEN_ID")

    # backup and restore
    p = top.add_parser("backup", parents=[common], formatter_class=_Formatter,
                       help="archive the home and a consistent copy of the store (while the server runs)",
                       description=textwrap.fill(
                           "Write one .tar.gz (0600): the home's files (keys stay encrypted) and a copy of "
                           "the SQLite store made with SQLite's online backup API, consistent while the "
                           "server writes. secrets/ (a dev home's kept passwords) is left out. With "
                           "PostgreSQL: the home, and pg_dump's output when pg_dump is on PATH.", 88),
                       epilog="examples:\n  pki-admin --home /srv/pki backup --out /backups/pki-$(date +%F).tar.gz")
    p.set_defaults(func=cmd_backup)
    p.add_argument("--out", required=True, metavar="FILE", help="the archive to write (must not exist)")
    p = top.add_parser("restore", parents=[common, ca_pw], formatter_class=_Formatter,
                       help="restore a backup into a new or empty home, and check it",
                       description=textwrap.fill(
                           "Unpack a backup made by `pki-admin backup` into --home (new or empty), after "
                           "checking it in a staging folder: the store's integrity and that the "
                           "intermediate key opens with its password. A failed check restores nothing.", 88),
                       epilog="examples:\n  pki-admin restore /backups/pki-2026-12-04.tar.gz --home /srv/pki "
                              "--password-file ca.pw")
    p.set_defaults(func=cmd_restore)
    p.add_argument("file", metavar="FILE", help="the archive")

    # audit
    p = top.add_parser("audit", parents=[common], formatter_class=_Formatter,
                       help="read the audit log (who did what, when), newest first",
                       description=textwrap.fill(
                           "Read the audit log, newest first: every issuance, renewal, revocation, "
                           "registration, token and CA change, with who did it (cli, admin:<token "
                           "id>, service:<id>, enrolment:<token id>, health-checker).", 88),
                       epilog="examples:\n  pki-admin audit --since 24h\n"
                              "  pki-admin audit --service-id billing --limit 20 --json")
    p.set_defaults(func=cmd_audit)
    p.add_argument("--since", type=since, metavar="TIME",
                   help="entries at or after TIME: 2026-12-01T00:00:00Z, or a duration back from now (24h, 7d)")
    p.add_argument("--service-id", metavar="ID", help="only this service's entries")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="at most N entries (default %(default)s)")

    # init
    p = top.add_parser("init", parents=[common, password_options(root=True, ca=True)],
                       formatter_class=_Formatter,
                       help="one-shot setup of a new home: root, intermediate, server certificate, CRL",
                       description=textwrap.fill(
                           "Create a new CA home: config.toml, root CA, intermediate CA, the API "
                           "server's certificate (always for localhost and 127.0.0.1) and the first "
                           "CRL. Refuses a home that already has a CA; a failure leaves the home as "
                           "it was.", 88),
                       epilog="example:\n  pki-admin --home /srv/pki init --public-url https://10.0.0.5:8443 "
                              "\\\n      --server-san-dns pki.internal --server-san-ip 10.0.0.5")
    p.set_defaults(func=cmd_init)
    p.add_argument("--public-url", metavar="URL",
                   help="base URL of the API server for CRL and AIA URLs (default: https://127.0.0.1:8443)")
    p.add_argument("--trust-domain", metavar="DOMAIN",
                   help="every certificate names its service spiffe://DOMAIN/svc/<service id> "
                        "(default: vcc-pki.internal)")
    san_options(p, prefix="server-")
    p.add_argument("--root-key-type", choices=ROOT_KEY_TYPES, default="rsa-4096", help="default: %(default)s")
    p.add_argument("--intermediate-key-type", choices=INTERMEDIATE_KEY_TYPES, default="rsa-2048",
                   help="default: %(default)s")
    return parser
