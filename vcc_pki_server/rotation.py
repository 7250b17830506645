"""CA rotation (SPEC §13): a new intermediate, a new root with its cross-certificate, retiring
the old root. Each is one compare-and-set of the cluster's CA record (:mod:`.ca_set`): before
it nothing changed, after it every server follows, and the home's files are then rewritten
from the record (by this command, or, if it died first, by the next process that loads the CAs
with the CA password: the server, or a pki-admin command that signs). Keys are made and
passwords checked before; a crash before the commit leaves at most unused key files in
``ca/authorities``.

A new intermediate is published at once (``/ca/bundle``, its CRL) and issues from
``activate_after`` later (8 s by default; servers look every 5 s, so they issue from it within
15 s): services refreshing their trust more often than that know it, and hold its CRL, before
any peer presents a certificate of it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .ca import (
    CAPrivateKey,
    create_cross_certificate,
    create_intermediate,
    create_root,
    generate_key,
    generation_name,
)
from .ca_set import SHARED_NAME, CASet, IntermediateEntry, RootEntry
from .encoding import ski_hex
from .errors import CAError, Conflict
from .home import Home, key_pem, write_file
from .store import Store

Report = Callable[[str], None]
ACTIVATE_AFTER = timedelta(seconds=8)


def key_type_of(key: CAPrivateKey) -> str:
    """The ``--key-type`` name of ``key`` (a rotation keeps the kind unless told otherwise)."""
    if isinstance(key, rsa.RSAPrivateKey):
        return f"rsa-{key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"ec-p{key.curve.key_size}"
    raise CAError(f"unsupported CA key {type(key).__name__}")


def _base_name(cert: x509.Certificate) -> str:
    cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return str(cn[0].value) if cn else "VCC CA"


def _commit(home: Home, store: Store, before: CASet, after: CASet, now: datetime, action: str) -> CASet:
    """Store ``after`` in place of ``before`` (compare-and-set), then rewrite the home's files."""
    if not before.version:  # the first rotation: the rows from before are the old intermediate's
        store.assign_issuer(before.current.ski)
    if not store.put_shared_state(SHARED_NAME, after.to_json(), replaces=before.version, at=now, actor=action):
        raise Conflict("another rotation was stored meanwhile; nothing changed here: run `pki-admin ca status` "
                       "and try again")
    stored = attrs.evolve(after, version=before.version + 1)
    home.adopt_ca_set(stored.settled(now))
    return stored


def _new_intermediate(cas: CASet, root: x509.Certificate, root_key: CAPrivateKey, password: str, key_type: str,
                      now: datetime, days: int, activate_after: timedelta) -> IntermediateEntry:
    name = generation_name(_base_name(cas.intermediates[0].cert), len(cas.intermediates) + 1)
    key = generate_key(key_type)
    cert = create_intermediate(root, root_key, key, now=now, days=days, common_name=name)
    return IntermediateEntry(cert, key_pem(key, password), "next", now + activate_after)


def _settled(home: Home, store: Store, now: datetime) -> CASet:
    """The record as it stands now; refused while a rotation has not taken effect yet."""
    cas = home.ca_set(store).settled(now)
    pending = cas.pending
    if pending is not None and pending.activate_at is not None:
        raise Conflict(f"the previous rotation takes effect at {pending.activate_at.isoformat()}; "
                       "try again after it")
    return cas


def rotate_intermediate(home: Home, store: Store, *, root_password: str, password: str, key_type: str | None,
                        now: datetime, days: int = 1825, activate_after: timedelta = ACTIVATE_AFTER,
                        report: Report = lambda m: None) -> CASet:
    """A new intermediate under the current root issues from ``activate_after`` on; the one
    before is then retired (it keeps signing the CRL of its certificates). Raises
    CAUnavailable for a wrong password."""
    cas = _settled(home, store, now)
    current = cas.authorities(password, lambda cert: ("", ""), now).current  # checks the CA password
    root = cas.root_of(cas.current.cert).cert
    root_key = home.load_root_key(root, root_password)
    kind = key_type or key_type_of(current.key)
    report(f"generating the new intermediate's key ({kind})...")
    entry = _new_intermediate(cas, root, root_key, password, kind, now, days, activate_after)
    after = CASet(cas.roots, (*cas.intermediates, entry))
    report("storing the rotation...")
    return _commit(home, store, cas, after, now, "ca.rotate-intermediate")


def rotate_root(home: Home, store: Store, *, root_password: str, password: str, key_type: str | None,
                intermediate_key_type: str | None, now: datetime, days: int = 3650,
                activate_after: timedelta = ACTIVATE_AFTER, report: Report = lambda m: None) -> CASet:
    """A new root (its key encrypted with the same root password), a cross-certificate of it
    signed by the current root, and a new intermediate under it that issues from
    ``activate_after`` on. Both roots are trusted until :func:`retire_root`."""
    cas = _settled(home, store, now)
    current = cas.authorities(password, lambda cert: ("", ""), now).current
    old = cas.root_of(cas.current.cert)
    old_key = home.load_root_key(old.cert, root_password)
    kind = key_type or key_type_of(old_key)
    report(f"generating the new root's key ({kind})...")
    new_key = generate_key(kind)
    name = generation_name(_base_name(cas.roots[0].cert), len(cas.roots) + 1)
    new_root = create_root(new_key, now=now, days=days, common_name=name)
    cross = create_cross_certificate(new_root, old.cert, old_key, now=now)
    # Both root keys among the authorities before the record names the new root: the files
    # written from it after a crash then find them.
    home.authorities_dir.mkdir(mode=0o700, exist_ok=True)
    for cert, key in ((old.cert, old_key), (new_root, new_key)):
        path = home.authorities_dir / f"{ski_hex(cert)}_key.pem"
        if not path.exists():
            write_file(path, key_pem(key, root_password), 0o400)
    ikind = intermediate_key_type or key_type_of(current.key)
    report(f"generating the new intermediate's key ({ikind})...")
    entry = _new_intermediate(cas, new_root, new_key, password, ikind, now, 1825, activate_after)
    after = CASet((*cas.roots, RootEntry(new_root, "active", cross)), (*cas.intermediates, entry))
    report("storing the rotation...")
    return _commit(home, store, cas, after, now, "ca.rotate-root")


def only_anchored_by_retiring(cas: CASet, counts: dict[str, int]) -> int:
    """How many services have their current certificate only under a root :func:`retire_root`
    would retire (what it leaves without a trusted root); ``counts``: ``Store.issuer_counts``."""
    retiring = {r.cert.subject for r in cas.active_roots[1:]}
    return sum(counts.get(i.ski, 0) for i in cas.intermediates if i.cert.issuer in retiring)


def retire_root(home: Home, store: Store, *, force: bool, now: datetime) -> tuple[CASet, int]:
    """End a root rotation's overlap: every root but the current intermediate's is retired (it
    leaves /ca/roots and /ca/bundle). Refused while unexpired certificates chain only to such a
    root, unless ``force``. Returns the new record and how many services were left behind."""
    cas = _settled(home, store, now)
    retiring = cas.active_roots[1:]
    if not retiring:
        raise CAError("only one root is trusted: there is no root to retire (run `pki-admin ca rotate-root` first)")
    left = only_anchored_by_retiring(cas, store.issuer_counts(now))
    if left and not force:
        raise Conflict(f"refusing to retire the old root: {left} service(s) still have their current certificate "
                       "only under it; let them renew (`pki-admin ca status`) or pass --force")
    gone = {r.ski for r in retiring}
    after = CASet(tuple(attrs.evolve(r, state="retired") if r.ski in gone else r for r in cas.roots),
                  cas.intermediates)
    return _commit(home, store, cas, after, now, "ca.retire-root"), left


def describe(cas: CASet, now: datetime) -> list[tuple[str, str, x509.Certificate]]:
    """(role, state, certificate) of every CA, roots first; an intermediate past its notAfter,
    or under a retired root, is shown as such."""
    rows: list[tuple[str, str, x509.Certificate]] = [("root", r.state, r.cert) for r in cas.roots]
    retired_roots = {r.cert.subject for r in cas.roots if r.state == "retired"}
    for entry in cas.settled(now).intermediates:
        state = entry.state
        if state == "next" and entry.activate_at is not None:
            state = f"next (current from {entry.activate_at.isoformat(timespec='seconds')})"
        if entry.cert.not_valid_after_utc <= now:
            state = "expired"
        elif state == "retired" and entry.cert.issuer in retired_roots:
            state = "retired (root retired)"
        rows.append(("intermediate", state, entry.cert))
    return rows
