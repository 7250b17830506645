"""``vcc-pki``: the renewal agent, for services in any language and for cron or systemd (SPEC §11).

It is the SDK on the command line (one renewal policy, one atomic file swap): ``enroll`` once,
then ``renew`` (from cron, or ``--daemon`` under systemd) and ``crl`` keep the files of
``--dir`` (default ``./tls``) current for nginx, Go, Java or curl:

    cert.pem        the certificate (leaf)            0644
    key.pem         its private key, made here        0600
    fullchain.pem   leaf, then intermediate           0644  (what a server presents)
    ca_chain.pem    intermediate, then root           0644  (what peers are checked against)
    crl.pem         the intermediate's and the root's CRLs  0644  (nginx ssl_crl checks the chain)
    vcc-pki.toml    CA URL, service id, pinned root   0644  (later commands need only --dir)

Exit codes: 0 done (or nothing due), 1 failed (files untouched), 2 usage (or no enrolment yet).
A hook (``--exec`` shell command, or ``--signal SIG --pid-file F``) runs after each change;
a failing hook is logged, never fatal.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import tomllib
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509

from . import __version__
from .client import PKIClient
from .durations import duration
from .errors import ConfigurationError, PKIError
from .files import write_atomically
from .keys import KEY_KINDS
from .renewal import RenewalPolicy, next_renewal_at
from .revocation import CRL_FILE_NAME

log = logging.getLogger("vcc_pki_client.agent")

PROG = "vcc-pki"
SETTINGS = "vcc-pki.toml"
REASONS = ("unspecified", "keyCompromise", "affiliationChanged", "superseded", "cessationOfOperation")

EXAMPLES = """\
examples:
  vcc-pki enroll --service-id web --token vcc_enr_... --ca-url https://pki.internal:8443 \\
      --fingerprint sha256:9f2c... --dir /etc/nginx/tls
  vcc-pki renew --dir /etc/nginx/tls --exec "nginx -s reload"          # from cron: renews when due
  vcc-pki renew --dir /etc/nginx/tls --daemon --signal HUP --pid-file /run/nginx.pid
  vcc-pki crl --dir /etc/nginx/tls --daemon --exec "nginx -s reload"   # keeps crl.pem fresh
  vcc-pki status --dir /etc/nginx/tls --json
"""


class UsageError(Exception):
    """Exit 2: the command cannot run as given (e.g. no enrolment in --dir yet)."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", type=Path, default=Path("tls"), help="where the files are (default ./tls)")
    common.add_argument("--json", action="store_true", help="one JSON object on stdout")
    common.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        help="default: info for --daemon; error otherwise (one line per run, for cron)")
    hooks = argparse.ArgumentParser(add_help=False)
    group = hooks.add_argument_group("after each change")
    group.add_argument("--exec", dest="exec_cmd", metavar="CMD", help="run this shell command")
    group.add_argument("--signal", metavar="SIG", help="send this signal (HUP, USR1...) to the process of --pid-file")
    group.add_argument("--pid-file", type=Path, metavar="FILE", help="the process to signal")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("enroll", parents=[common], help="get the first certificate with a one-time token",
                       description="Make a key here, send its CSR with the one-time enrolment token, and "
                                   "write the files and vcc-pki.toml into --dir.")
    p.add_argument("--service-id", required=True)
    p.add_argument("--token", required=True, help="the enrolment token (`pki-admin service token`)")
    p.add_argument("--ca-url", required=True, help="the PKI server, https://host:port")
    trust = p.add_mutually_exclusive_group(required=True)
    trust.add_argument("--fingerprint", help="the root CA's SHA-256 (`pki-admin ca info`), pinned")
    trust.add_argument("--ca-bundle", type=Path, help="or a PEM file with the root CA")
    p.add_argument("--key-type", default="ec-p256", choices=KEY_KINDS)
    p.add_argument("--validity", type=duration, help="lifetime to ask for: 24h, 30d (default: the CA's)")

    p = sub.add_parser("renew", parents=[common, hooks], help="renew when due (or --force); --daemon keeps at it",
                       description="Renew the certificate when due — when a third of its lifetime is left, "
                                   "or --renew-before its end — with a new key; the old files stay until "
                                   "the new ones are complete.")
    p.add_argument("--force", action="store_true", help="renew now, due or not")
    p.add_argument("--daemon", action="store_true", help="keep running and renew whenever due")
    p.add_argument("--renew-before", type=duration, metavar="DURATION", help="renew this long before the end")

    sub.add_parser("status", parents=[common], help="the certificate on disk: validity, renewal due, CRL",
                   description="Read the files in --dir (no network): exit 0 if the certificate is "
                               "valid now, 1 if it is missing, expired or does not match its key.")

    p = sub.add_parser("revoke", parents=[common], help="revoke the current certificate at the CA")
    p.add_argument("--reason", default="unspecified", choices=REASONS)

    p = sub.add_parser("crl", parents=[common, hooks], help="refresh crl.pem (--daemon: keep it fresh)",
                       description="Fetch the intermediate's and the root's CRLs (each checked against "
                                   "its CA) into crl.pem, for servers that check client certificates "
                                   "against it (nginx ssl_crl).")
    p.add_argument("--daemon", action="store_true", help="keep refreshing")
    p.add_argument("--interval", type=duration, default=timedelta(minutes=1), help="between refreshes (1m)")
    args = parser.parse_args(argv)
    if getattr(args, "signal", None) and not getattr(args, "pid_file", None):
        parser.error("--signal needs --pid-file")
    return args


# -- settings and the client ------------------------------------------------------------------
def load_settings(folder: Path) -> dict[str, Any]:
    path = folder / SETTINGS
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no {path}: run `vcc-pki enroll --dir {folder} ...` first") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    if not isinstance(data.get("ca_url"), str) or not isinstance(data.get("service_id"), str):
        raise UsageError(f"{path} lacks ca_url or service_id: run `vcc-pki enroll` again")
    return data


def save_settings(folder: Path, settings: dict[str, str]) -> None:
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]  # TOML basic strings
    write_atomically(folder / SETTINGS, ("# written by vcc-pki enroll\n" + "\n".join(lines) + "\n").encode(), 0o644)


def client(folder: Path, settings: dict[str, Any]) -> PKIClient:
    bundle = settings.get("ca_bundle")
    return PKIClient(settings["ca_url"], settings["service_id"], cert_file=folder / "cert.pem",
                     key_file=folder / "key.pem", root_fingerprint=settings.get("root_fingerprint"),
                     ca_bundle=Path(bundle) if bundle else None, key_type=settings.get("key_type", "ec-p256"))


def utc(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def say(args: argparse.Namespace, text: str, data: dict[str, Any]) -> None:
    print(json.dumps(data, sort_keys=True) if args.json else text, flush=True)


def run_hook(args: argparse.Namespace) -> None:
    """The --exec command or --signal; a failure is logged, never fatal."""
    if args.exec_cmd:
        try:
            done = subprocess.run(args.exec_cmd, shell=True, check=False, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.error("hook %r failed: %s", args.exec_cmd, exc)
        else:
            if done.returncode != 0:
                log.error("hook %r exited %d", args.exec_cmd, done.returncode)
    if args.signal:
        name = args.signal.upper()
        try:
            signum = signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
            pid = int(args.pid_file.read_text().split()[0])
            os.kill(pid, signum)
        except (KeyError, ValueError, IndexError, OSError) as exc:
            log.error("hook: cannot send %s to the process in %s: %s", args.signal, args.pid_file, exc)


# -- commands -----------------------------------------------------------------------------------
def cmd_enroll(args: argparse.Namespace) -> int:
    folder: Path = args.dir
    settings = {"ca_url": args.ca_url.rstrip("/"), "service_id": args.service_id, "key_type": args.key_type}
    if args.fingerprint:
        settings["root_fingerprint"] = args.fingerprint
    else:
        settings["ca_bundle"] = str(args.ca_bundle.resolve())
    with client(folder, settings) as pki:
        issued = pki.enroll(args.token, validity=args.validity)
        pki.refresh_crl()  # crl.pem: the intermediate's and the root's
    save_settings(folder, settings)
    say(args, f"enrolled {args.service_id}: certificate {issued.serial_number} valid until "
              f"{utc(issued.not_after)}; files in {folder}",
        {"service_id": args.service_id, "serial_number": issued.serial_number, "not_after": utc(issued.not_after),
         "dir": str(folder)})
    return 0


def _due(cert: x509.Certificate, before: timedelta | None) -> datetime:
    return next_renewal_at(cert.not_valid_before_utc, cert.not_valid_after_utc, RenewalPolicy(renew_before=before))


def cmd_renew(args: argparse.Namespace) -> int:
    folder: Path = args.dir
    with client(folder, load_settings(folder)) as pki:
        if args.daemon:
            return _renew_daemon(args, pki)
        cert = pki.certificate
        due = _due(cert, args.renew_before)
        if not args.force and datetime.now(timezone.utc) < due:
            say(args, f"not due: certificate {cert.serial_number:x} valid until {utc(cert.not_valid_after_utc)}; "
                      f"renewal due at {utc(due)}",
                {"renewed": False, "serial_number": f"{cert.serial_number:x}",
                 "not_after": utc(cert.not_valid_after_utc), "due_at": utc(due)})
            return 0
        issued = pki.renew()
    say(args, f"renewed: certificate {issued.serial_number} valid until {utc(issued.not_after)}",
        {"renewed": True, "serial_number": issued.serial_number, "not_after": utc(issued.not_after)})
    run_hook(args)
    return 0


def _renew_daemon(args: argparse.Namespace, pki: PKIClient) -> int:
    """The SDK's background renewal, with the hook after each renewal, until SIGTERM or SIGINT."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    def renewed(cert: x509.Certificate) -> None:
        say(args, f"renewed: certificate {cert.serial_number:x} valid until {utc(cert.not_valid_after_utc)}",
            {"renewed": True, "serial_number": f"{cert.serial_number:x}", "not_after": utc(cert.not_valid_after_utc)})
        run_hook(args)

    before = args.renew_before.total_seconds() / 86400 if args.renew_before else None
    if args.force:
        pki.renew()
        renewed(pki.certificate)
    pki.enable_auto_renewal(renew_before_days=before, on_renewed=renewed,
                            on_error=lambda exc: log.error("renewal failed, will retry: %s", exc))
    cert = pki.certificate
    log.info("renewing %s in the background; certificate %x due at %s", pki.service_id, cert.serial_number,
             utc(_due(cert, args.renew_before)))
    stop.wait()
    pki.disable_auto_renewal()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    folder: Path = args.dir
    settings = load_settings(folder)
    pki = client(folder, settings)
    try:
        cert = pki.certificate  # checked against the key
    except ConfigurationError as exc:
        say(args, f"unusable: {exc}", {"service_id": settings["service_id"], "valid": False, "error": str(exc)})
        return 1
    finally:
        pki.close()
    now = datetime.now(timezone.utc)
    valid = cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    crl_file = folder / CRL_FILE_NAME
    crl_number = None
    revoked = None
    if crl_file.is_file():
        try:
            crl = x509.load_pem_x509_crl(crl_file.read_bytes())
            crl_number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            revoked = crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
        except (ValueError, x509.ExtensionNotFound):
            pass
    data = {"service_id": settings["service_id"], "serial_number": f"{cert.serial_number:x}", "valid": valid,
            "not_before": utc(cert.not_valid_before_utc), "not_after": utc(cert.not_valid_after_utc),
            "renewal_due_at": utc(_due(cert, None)), "crl_number": crl_number, "revoked_in_crl_pem": revoked}
    left = cert.not_valid_after_utc - now
    text = (f"{settings['service_id']}: certificate {cert.serial_number:x} "
            f"{'valid' if valid else 'NOT valid'} until {utc(cert.not_valid_after_utc)} "
            f"({max(left, timedelta(0)).total_seconds() / 3600:.1f} h left); renewal due at "
            f"{utc(_due(cert, None))}; crl.pem number {crl_number if crl_number is not None else '-'}"
            + ("; REVOKED" if revoked else ""))
    say(args, text, data)
    return 0 if valid and not revoked else 1


def cmd_revoke(args: argparse.Namespace) -> int:
    folder: Path = args.dir
    with client(folder, load_settings(folder)) as pki:
        serials = pki.revoke(args.reason).revoked_serials
    say(args, f"revoked ({args.reason}): {', '.join(serials)}", {"revoked_serials": list(serials),
                                                                 "reason": args.reason})
    return 0


def cmd_crl(args: argparse.Namespace) -> int:
    folder: Path = args.dir
    path = folder / CRL_FILE_NAME
    with client(folder, load_settings(folder)) as pki:
        while True:
            before = path.read_bytes() if path.is_file() else None
            crl = pki.refresh_crl()
            if crl is None:
                raise PKIError("the CA's CRL could not be fetched (see the warning above)")
            changed = path.is_file() and path.read_bytes() != before
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            if changed or not args.daemon:
                say(args, f"crl.pem: CRL number {number} ({len(crl)} revoked){'' if changed else ', unchanged'}",
                    {"crl_number": number, "revoked": len(crl), "changed": changed, "path": str(path)})
            if changed:
                run_hook(args)
            if not args.daemon:
                return 0
            _sleep_or_stop(args.interval.total_seconds())


_STOP = threading.Event()


def _sleep_or_stop(seconds: float) -> None:
    if _STOP.wait(seconds):
        raise SystemExit(0)


COMMANDS = {"enroll": cmd_enroll, "renew": cmd_renew, "status": cmd_status, "revoke": cmd_revoke, "crl": cmd_crl}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.log_level = args.log_level or ("info" if getattr(args, "daemon", False) else "error")
    logging.basicConfig(level=args.log_level.upper(), format=f"{PROG}: %(levelname)s %(message)s", stream=sys.stderr)
    if args.log_level != "debug":  # one line per request is httpx's INFO: noise for an agent's log
        logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.command == "crl" and args.daemon:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: _STOP.set())
    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except PKIError as exc:
        print(f"{PROG}: {args.command} failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
