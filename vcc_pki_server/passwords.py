"""CA key passwords for ``pki-admin`` and ``vcc-pki-server``: from a file, the environment or a prompt.

SPEC §2. The root key's password comes from ``--root-password-file``, else
``$VCC_PKI_ROOT_PASSWORD``, else a prompt; the intermediate's from ``--password-file``, else
``$VCC_PKI_CA_PASSWORD``, else a prompt. In a dev home (``vcc-pki-server --dev``) the
passwords are kept in ``<home>/secrets/``: an existing key's is read from there before a
prompt, and the command says so on stderr. The prototype's ``--password`` / ``--root-password``
flags still work, with a warning: a password on the command line is visible in ``ps`` output
and in shell history. Passwords are never echoed, logged or put into error messages.

Usage::

    password = resolve(CA, file=args.password_file, value=args.password)
    root = resolve(ROOT, file=None, value=None, confirm=True)   # a new key: asked twice
    password = resolve(CA, file=None, kept=home.secrets_dir / CA.kept)  # a dev home's secret
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs

from .errors import CAError


class PasswordError(CAError):
    """No usable password: unreadable or empty file, nobody to ask, or the two entries differ."""

    code = "password_unavailable"


@attrs.frozen
class PasswordSource:
    """Where one key's password may come from, in the order they are tried."""

    what: str
    file_option: str
    flag: str
    env: str
    kept: str  # the file name in a dev home's secrets/


ROOT = PasswordSource("root CA", "--root-password-file", "--root-password", "VCC_PKI_ROOT_PASSWORD",
                      "root_password")
CA = PasswordSource("intermediate CA", "--password-file", "--password", "VCC_PKI_CA_PASSWORD", "ca_password")

Prompt = Callable[[str], str]


def read_password_file(path: str, what: str = "CA") -> str:
    """The password in ``path``; one trailing newline (``\\n`` or ``\\r\\n``) is not part of it."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise PasswordError(f"cannot read the {what} password file {path}: {exc.strerror or exc}") from None
    for ending in (b"\r\n", b"\n"):
        if data.endswith(ending):
            data = data[: -len(ending)]
            break
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PasswordError(f"the {what} password file {path} is not UTF-8 text") from None
    if not text:
        raise PasswordError(f"the {what} password file {path} is empty")
    return text


def stdin_is_terminal() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):  # closed or replaced stdin
        return False


def _prompt(source: PasswordSource, *, confirm: bool, ask: Prompt) -> str:
    label = f"{'new ' if confirm else ''}{source.what} password: "
    try:
        first = ask(label)
        if not first:
            raise PasswordError(f"empty {source.what} password")
        if confirm and ask(f"repeat the {source.what} password: ") != first:
            raise PasswordError(f"the two {source.what} passwords do not match")
    except (EOFError, KeyboardInterrupt):
        raise PasswordError(f"no {source.what} password entered") from None
    return first


def _ask(label: str) -> str:
    return getpass.getpass(label, stream=sys.stderr)


def resolve(source: PasswordSource, *, file: str | None, value: str | None = None,
            confirm: bool = False, environ: Mapping[str, str] | None = None,
            ask: Prompt | None = None, is_terminal: Callable[[], bool] | None = None,
            kept: Path | None = None, program: str = "pki-admin",
            notify: Callable[[str], None] | None = None) -> str:
    """The password for ``source``: file, then the unsafe flag, then the environment, then the
    ``kept`` file of a dev home (if it exists; said on stderr), then a prompt.

    ``confirm`` (when a new key is created) makes the prompt ask twice. Raises
    :class:`PasswordError` with a one-line message when no password is available, e.g. with
    nothing configured and no terminal to prompt on.
    """
    environ = os.environ if environ is None else environ
    if file is not None:
        return read_password_file(file, source.what)
    if value is not None:
        print(f"pki-admin: warning: {source.flag} is unsafe (visible in process lists and shell "
              f"history); use {source.file_option} or ${source.env}", file=sys.stderr)
        if not value:
            raise PasswordError(f"empty {source.what} password")
        return value
    from_env = environ.get(source.env)
    if from_env is not None:
        if not from_env:
            raise PasswordError(f"${source.env} is set but empty")
        return from_env
    if kept is not None and kept.exists():
        message = f"using the {source.what} password kept in {kept} (a dev home)"
        if notify is not None:
            notify(message)
        else:
            print(f"{program}: {message}", file=sys.stderr)
        return read_password_file(str(kept), source.what)
    if not (is_terminal or stdin_is_terminal)():
        raise PasswordError(f"no {source.what} password: use {source.file_option} FILE or set "
                            f"${source.env} (no terminal to prompt on)")
    return _prompt(source, confirm=confirm, ask=ask or _ask)
