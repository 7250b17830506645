"""vcc-pki-server: the API over HTTPS (uvicorn, client certificates optional, mTLS identity per request)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

from vcc_pki_client import __version__
from vcc_pki_client.identity import PKI_SERVER_ID, peer_service_id

from . import logs, metrics, passwords, server_cert
from .app import Lifecycle, create_app
from .authority import Actor, utc_now
from .bootstrap import initialize
from .encoding import cert_pem, issuer_key_id
from .errors import CAError
from .home import Home, write_file
from .limits import EdgeLimits, EdgeLimitsMixin, EdgeServer
from .mtls import uvicorn_config

log = logging.getLogger("vcc_pki_server.server")

DESCRIPTION = """\
Serve the VCC PKI HTTP API over TLS. Client certificates are optional at the handshake and
checked on every request; admins use bearer tokens (`pki-admin token create`).

The intermediate CA's password comes from --password-file, else $VCC_PKI_CA_PASSWORD, else
<home>/secrets/ca_password (written by --dev), else a prompt.
"""

EPILOG = """\
examples:
  vcc-pki-server --dev                      # new home in ./pki-data with a dev CA, prints an admin token
  vcc-pki-server --home /srv/pki --password-file /run/secrets/ca --port 8443 --workers 2
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vcc-pki-server", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--home", help="CA home (default: $VCC_PKI_HOME or ./pki-data)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8443, help="port to listen on (default 8443)")
    parser.add_argument("--password-file", help="file holding the intermediate CA key's password")
    parser.add_argument("--workers", type=int, default=1, help="worker processes sharing the socket (default 1)")
    parser.add_argument("--health-interval", type=float, default=None,
                        help="seconds between health probes of registered services (default: config, 30)")
    parser.add_argument("--dev", action="store_true",
                        help="on an empty home, create a dev CA with random passwords kept in <home>/secrets/")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="text lines, or one JSON object per line (time, level, logger, message)")
    limits = parser.add_argument_group("limits per worker (see docs/operations.md, Limits and hardening)")
    limits.add_argument("--max-header-bytes", type=int, default=65536, metavar="N",
                        help="a request header over N bytes is refused with 431 (default 65536)")
    limits.add_argument("--max-headers", type=int, default=100, metavar="N",
                        help="a request with over N header fields is refused with 431 (default 100)")
    limits.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="a connection must send a complete request header within this time, from its "
                             "start or a request's first byte; else it is closed (default 10)")
    limits.add_argument("--max-connections-per-client", type=int, default=256, metavar="N",
                        help="connections one client address may hold open (default 256)")
    limits.add_argument("--max-connections", type=int, default=0, metavar="N",
                        help="connections in all (default: the open-file limit less 64)")
    parser.add_argument("--cert-check-interval", type=float, default=60.0, metavar="SECONDS",
                        help="how often each worker looks at the server's own certificate: renews it when a "
                             "third of its lifetime is left, reloads it when another worker did (default 60)")
    parser.add_argument("--ca-check-interval", type=float, default=5.0, metavar="SECONDS",
                        help="how often each worker looks for a CA rotation (`pki-admin ca rotate-*`) made by "
                             "any host; keep it below --activate-after of the rotations (default 5)")
    limits.add_argument("--database-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="a request that needs the database is answered 503 when the database has not "
                             "answered within this time (a hung host); while a query overran it, such "
                             "requests are refused at once (default 10)")
    args = parser.parse_args(argv)
    if not 0 < args.database_timeout <= 3600:
        parser.error("--database-timeout must be between 0 and 3600 seconds")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.health_interval is not None and not 0 < args.health_interval <= 86400:
        parser.error("--health-interval must be between 0 and 86400 seconds")
    for name in ("max_header_bytes", "max_headers", "max_connections_per_client"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if (args.max_connections < 0 or not 0 < args.header_timeout < 3600 or not args.cert_check_interval > 0
            or not args.ca_check_interval > 0):
        parser.error("--max-connections must be >= 0, --header-timeout between 0 and 3600 s, "
                     "--cert-check-interval and --ca-check-interval positive")
    return args


_JSON_LOGS = False  # --log-format json: what the server says on stderr goes through the log too


def say(message: str, *, error: bool = False) -> None:
    """A line for the operator on stderr: ``vcc-pki-server: ...``, or a JSON log record."""
    if _JSON_LOGS:
        log.log(logging.ERROR if error else logging.INFO, message)
        for handler in logging.getLogger().handlers:  # said now, not with the next batch
            handler.flush()
    else:
        print(f"vcc-pki-server: {'error: ' if error else ''}{message}", file=sys.stderr)


def dev_init(home: Home) -> str:
    """Create a dev CA in an empty home; return the intermediate password. Prints an admin token once."""
    root_password, ca_password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    say(f"creating a dev CA in {home.root} (EC P-384 root, EC P-256 intermediate)")
    # A dev CA serves services on this machine: their health URLs are on localhost.
    initialize(home, attrs.evolve(home.config(), health_allow_loopback=True),
               root_password=root_password, ca_password=ca_password,
               root_key_type="ec-p384", intermediate_key_type="ec-p256",
               report=say)
    write_file(home.secrets_dir / passwords.ROOT.kept, root_password.encode(), 0o600)
    write_file(home.secrets_dir / passwords.CA.kept, ca_password.encode(), 0o600)
    authority = home.authority(None)
    try:
        token = authority.create_admin_token(name="dev", expires_days=None, actor=Actor.operator())
    finally:
        authority.store.close()
    # The token goes to a 0600 file; on a terminal it is shown once too. When stderr is not a
    # terminal it is a log (systemd, docker, a file): no secret goes there.
    token_file = home.secrets_dir / "admin_token"
    write_file(token_file, f"{token.value}\n".encode(), 0o600)
    if sys.stderr.isatty():
        print(f"vcc-pki-server: admin token (shown once, also in {token_file}): {token.value}", file=sys.stderr)
        # (a terminal only: never through the log, in either format)
    else:
        say(f"admin token written to {token_file} (0600; not printed: stderr is not a terminal)")
    say(f"root CA: {home.root_cert}  (curl --cacert it)")
    return ca_password


def renew_server_certificate_if_due(home: Home, password: str) -> bool:
    """At start-up: the server's own certificate made (new key) when the home has none (a home
    made step by step with `ca init-root` and `ca create-intermediate`); then the cluster's copy
    followed, and renewed when a third of its lifetime is left (as the running workers do) or
    when it lacks the SPEC §10 identity the SDK requires (one made before it); and a first CRL
    if there is none. True if a certificate was made or renewed."""
    authority = home.authority(password)
    try:
        made = not home.server_cert.exists()
        if made:
            issued = home.issue_server_certificate(authority, home.config())
            log.info("server certificate made serial=%s not_after=%s", issued.record.serial,
                     issued.certificate.not_valid_after_utc.isoformat())
        with server_cert.renewal_lock(home):
            renewed, _ = server_cert.sync(home, authority, password, utc_now(),
                                          renew=lambda cert: peer_service_id(cert) != PKI_SERVER_ID
                                          or issuer_key_id(cert) != authority.ca.ski)
            server_cert.sync_root_crl(home, authority.store, utc_now())
        if authority.store.latest_crl(authority.ca.ski) is None:
            authority.generate_crl(actor=Actor.operator())
    finally:
        authority.store.close()
    return made or renewed


def warn_about_modes(home: Home) -> None:
    """WARNING lines for a home others may write to, and key files others may read."""
    mode = home.root.stat().st_mode
    if mode & 0o002:
        log.warning("home %s is world-writable (mode %o): anyone on this host can replace the CA's files; "
                    "chmod 700 it", home.root, mode & 0o777)
    for key in (home.root_key, home.intermediate_key, home.server_key):
        if key.exists() and key.stat().st_mode & 0o077:
            log.warning("key file %s is readable or writable by others (mode %o); chmod 400 it", key,
                        key.stat().st_mode & 0o777)


def resolve_password(args: argparse.Namespace, home: Home) -> str:
    """The intermediate's password as pki-admin finds it (a --dev home's kept secret before a prompt)."""
    return passwords.resolve(passwords.CA, file=args.password_file, kept=home.secrets_dir / passwords.CA.kept,
                             program="vcc-pki-server", notify=say)


def _background(home: Home, args: argparse.Namespace, authority: object,
                own: server_cert.ServerCertificate) -> list[Lifecycle]:
    """Jobs that run inside each worker beside the API (health probes when available, with the
    server's own certificate and trust as they follow renewals and rotations)."""
    try:
        from .health import lifecycle
    except ImportError:
        return []
    return [lifecycle(authority, home, interval=args.health_interval,  # type: ignore[arg-type]
                      ssl_context=own.contexts.client_context())]


def run_worker(sock: socket.socket, home: Home, password: str, args: argparse.Namespace) -> None:
    """One server process: its own store connection, app and event loop, on the shared socket."""
    authority = home.authority(password)
    own = server_cert.ServerCertificate(home, authority, password, interval=args.cert_check_interval,
                                        ca_interval=args.ca_check_interval)
    EdgeLimitsMixin.limits = EdgeLimits(max_header_bytes=args.max_header_bytes, max_headers=args.max_headers,
                                        header_timeout=args.header_timeout,
                                        max_connections_per_client=args.max_connections_per_client,
                                        max_connections=args.max_connections)
    ctx = own.ssl_context()
    app = create_app(authority, background=[*_background(home, args, authority, own), (own.start, own.stop)],
                     root_crl=home.root_crl_file, database_timeout=args.database_timeout)
    # uvicorn re-raises the signal that stopped it once it is done; with these no-op handlers
    # that ends in a clean exit 0 instead of death by SIGTERM or a KeyboardInterrupt traceback.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    # No proxy headers: this server terminates TLS itself (mTLS needs the client's certificate),
    # so no proxy sits in front to vouch for X-Forwarded-For; trusting it from 127.0.0.1, as
    # uvicorn does by default, would let any local process choose the client the log shows.
    config = uvicorn_config(app, host=args.host, port=args.port, ssl_context=ctx, log_config=None,
                            access_log=False, proxy_headers=False, timeout_graceful_shutdown=5,
                            backlog=2048)
    # What exists now (modules, the app, the CA) lives as long as the process: keep the cyclic
    # collector from walking it again and again under load. Requests make few cycles, so young
    # objects are collected less often (every 10,000 new containers rather than 700).
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    try:
        EdgeServer(config).run(sockets=[sock])
    finally:
        authority.store.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    global _JSON_LOGS
    logs.configure(args.log_level, fmt=args.log_format)
    _JSON_LOGS = args.log_format == "json"
    home = Home.resolve(args.home)
    try:
        if args.dev and not home.has_root():
            password = dev_init(home)
        else:
            if not home.has_intermediate():
                raise CAError(f"{home.root} has no CA: run `pki-admin init` (or `pki-admin ca init-root` "
                              "and `pki-admin ca create-intermediate`), or start with --dev")
            password = resolve_password(args, home)
        warn_about_modes(home)
        home.load_ca(password)  # fail early, in the parent, on a wrong password
        home.open_store().close()  # ... and on an unreachable database; migrations run once, here
        renew_server_certificate_if_due(home, password)
        authority = home.authority(password)
        try:  # a revocation stored by a crashed older version without its CRL is published now
            authority.republish_if_behind(actor=Actor.system("crl"))
        finally:
            authority.store.close()
        write_file(home.ca_dir / "ca_chain.pem",
                   cert_pem(home.root_certificate(), home.intermediate_certificate()), 0o644)
    except (CAError, OSError, ValueError) as exc:  # one line, never a traceback
        say(str(exc), error=True)
        return 1
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: accepted sockets inherit it, and asyncio sets TCP_NODELAY only
    # on sockets whose proto says TCP. Without it every response waits ~40 ms (Nagle +
    # delayed ACK) between uvicorn's header and body writes.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        say(f"cannot listen on {args.host}:{args.port}: {exc}", error=True)
        return 1
    sock.listen(2048)
    sock.set_inheritable(True)
    log.info("serving https://%s:%d home=%s workers=%d", args.host, args.port, home.root, args.workers)
    # /metrics counts for the whole server, whichever worker answers (vcc_pki_server.metrics).
    counts = Path(tempfile.mkdtemp(prefix="vcc-pki-metrics-"))
    try:
        metrics.share_between_processes(counts)
        if args.workers == 1:
            run_worker(sock, home, password, args)
            return 0
        return supervise(sock, home, password, args)
    finally:
        shutil.rmtree(counts, ignore_errors=True)


def supervise(sock: socket.socket, home: Home, password: str, args: argparse.Namespace) -> int:
    """Fork ``--workers`` processes on one listening socket; forward SIGTERM/SIGINT; replace a
    worker that dies while the server is not stopping (at most one a second); wait for all."""
    children: set[int] = set()
    stopping = False
    stop_signals = {signal.SIGTERM, signal.SIGINT}

    def spawn() -> None:
        # Signals wait while forking: forward() must see every child, and a child must not run
        # the supervisor's forward() before it has its own handlers.
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        try:
            pid = os.fork()
            if pid == 0:  # child: a fresh store connection and event loop, made after the fork
                for signum in stop_signals:
                    signal.signal(signum, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
                try:
                    run_worker(sock, home, password, args)
                finally:
                    logging.shutdown()  # os._exit skips it: write out what is buffered
                    os._exit(0)
            children.add(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)

    for _ in range(args.workers):
        spawn()

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    last_spawn = 0.0
    while children:
        try:
            child, code = os.wait()
        except ChildProcessError:
            break
        children.discard(child)
        metrics.process_ended(child)
        # A worker still starting up when asked to stop dies of the SIGTERM we sent: a clean stop.
        stopped_by_us = stopping and os.WIFSIGNALED(code) and os.WTERMSIG(code) == signal.SIGTERM
        if not stopping:  # died while serving (killed, crashed): logged and replaced
            log.error("worker %d ended with status %d while serving; starting a new one", child, code)
            time.sleep(max(0.0, last_spawn + 1.0 - time.monotonic()))  # no tight loop of crashes
            last_spawn = time.monotonic()
            if not stopping:
                spawn()
        elif code and not stopped_by_us:
            log.error("worker %d ended with status %d", child, code)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
