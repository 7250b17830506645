"""Opening a CA home for a command: the home, its passwords, its authority, CA audit entries."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

from .. import passwords
from ..authority import Authority
from ..errors import CAError
from ..home import Home


def existing_home(args: argparse.Namespace) -> Home:
    home = Home.resolve(args.home)
    if not home.root.is_dir():
        raise CAError(f"no CA home at {home.root}: run `pki-admin init`, or pass --home / set $VCC_PKI_HOME")
    return home


def ca_password(args: argparse.Namespace, *, home: Home | None = None, confirm: bool = False) -> str:
    """The intermediate key's password; for an existing key (``home`` given) a dev home's kept one
    is found too. ``confirm``: a new key, asked twice."""
    return passwords.resolve(passwords.CA, file=getattr(args, "password_file", None),
                             value=getattr(args, "password", None), confirm=confirm,
                             kept=home.secrets_dir / passwords.CA.kept if home else None)


def root_password(args: argparse.Namespace, *, home: Home | None = None, confirm: bool = False) -> str:
    """The root key's password, as :func:`ca_password`."""
    return passwords.resolve(passwords.ROOT, file=getattr(args, "root_password_file", None),
                             value=getattr(args, "root_password", None), confirm=confirm,
                             kept=home.secrets_dir / passwords.ROOT.kept if home else None)


@contextmanager
def open_authority(args: argparse.Namespace, *, sign: bool) -> Iterator[tuple[Home, Authority]]:
    """The home's authority; with ``sign`` the intermediate key is unlocked (password asked)."""
    home = existing_home(args)
    password = None
    if sign:
        if not home.has_intermediate():
            raise CAError(f"{home.root} has no intermediate CA: run `pki-admin init` "
                          "or `pki-admin ca create-intermediate`")
        password = ca_password(args, home=home)
    authority = home.authority(password)
    try:
        yield home, authority
    finally:
        authority.store.close()
