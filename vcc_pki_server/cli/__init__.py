"""pki-admin: the operator's command line over a CA home (SPEC §6), one small ``cmd_*`` per command.

Every command works on ``<home>`` directly, so it runs beside a live server. Commands that sign
(issue, renew, revoke, CRL, CA creation) need the CA password (see
:mod:`vcc_pki_server.passwords`); the others (lists, info, registration, tokens) never ask for
it. Results go to stdout (a table, or JSON with ``--json``), progress and warnings to stderr.
Exit 0 on success, 1 with one line ``pki-admin: error: ...`` on failure, 2 on usage errors.

The modules: :mod:`.parser` builds the argparse tree; one ``*_commands`` module per subcommand
group (``ca`` and ``init``, ``cert``, ``service``, ``crl``, ``token``); :mod:`.access` opens a
home and its authority; :mod:`.output` prints tables, JSON, progress and the one-line error.

Usage::

    pki-admin --home /srv/pki init --public-url https://pki.internal:8443
    pki-admin cert issue --service-id billing --cn billing --san-dns billing.internal
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from ..bootstrap import Initialised, initialize
from ..errors import CAError
from .output import print_error, silence_stdout
from .parser import Command, build_parser

__all__ = ["Initialised", "build_parser", "initialize", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pki-admin`` with ``argv`` (default: the process arguments); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    func: Command = args.func
    try:
        return func(args)
    except CAError as exc:
        message = exc.message
    except BrokenPipeError:  # `pki-admin cert list | head`: the reader left, stay quiet
        silence_stdout()
        return 1
    except OverflowError as exc:  # a number past what dates or the store can hold
        message = f"a number given is out of range ({exc})"
    except (OSError, ValueError, sqlite3.Error) as exc:
        message = str(exc) or type(exc).__name__
    except KeyboardInterrupt:
        message = "interrupted"
    print_error(message)
    return 1
