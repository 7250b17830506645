"""What the SDK trusts: a CA bundle, a pinned root, the chain beside the certificate, or the system store.

:func:`resolve_trust` picks the trust anchors in SPEC §7's order:

1. ``ca_bundle``: a PEM file of CA certificates;
2. ``root_fingerprint``: the root's SHA-256, pinned. The root is fetched once from
   ``/api/v1/ca/root`` *without* verifying the server (the only unverified request the
   SDK makes; nothing secret is sent), and accepted only if its DER hashes to the pin
   (:class:`~vcc_pki_client.errors.TrustError` otherwise). It is kept beside the
   certificate as ``ca_root.pem`` (in memory without a ``cert_file``); a stored root that
   matches the pin is used without asking the server again;
3. ``ca_chain.pem`` beside ``cert_file``, as ``pki-admin cert issue`` writes it;
4. the system store (no anchors): the PKI server must have a publicly trusted
   certificate, and peers are checked against the CA chain that server publishes.

Roots learned at run time (SPEC §13: a new root, accepted only through a cross-certificate
signed by a root already trusted; :func:`judge_bundle`) are kept in ``ca_roots.pem`` beside
the certificate and trusted again after a restart, whatever the source above.

The other helpers judge what the server hands out: :func:`verify_leaf` (a peer or newly
issued certificate chains to the anchors), :func:`check_ca_chain` and :func:`check_crl`.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification

from .errors import ConfigurationError, InvalidResponseError, TrustError
from .files import write_atomically
from .keys import fingerprint_sha256
from .tls import client_ssl_context

__all__ = [
    "CHAIN_FILE_NAME",
    "LEARNED_FILE_NAME",
    "ROOT_FILE_NAME",
    "Bundle",
    "Trust",
    "check_ca_chain",
    "check_crl",
    "der",
    "issued_by",
    "judge_bundle",
    "load_certificates",
    "parse_certificate",
    "resolve_trust",
    "unverified_context",
    "verify_leaf",
]

ROOT_FILE_NAME = "ca_root.pem"
CHAIN_FILE_NAME = "ca_chain.pem"
LEARNED_FILE_NAME = "ca_roots.pem"


@attrs.frozen
class Trust:
    """The CA certificates the SDK trusts, and where they came from.

    ``source`` is ``"ca_bundle"``, ``"root_fingerprint"``, ``"ca_chain"`` or ``"system"``
    (then ``anchors`` is empty and the PKI server is verified against the system store).
    """

    anchors: tuple[x509.Certificate, ...]
    source: str
    path: Path | None = None

    @property
    def system(self) -> bool:
        """True when nothing but the system store is trusted."""
        return not self.anchors

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that verifies the PKI server (no client certificate)."""
        return client_ssl_context(None, ca_certs=self.anchors)


def load_certificates(path: Path, what: str) -> tuple[x509.Certificate, ...]:
    """The PEM certificates in ``path``; ConfigurationError if unreadable or none."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc
    try:
        return tuple(x509.load_pem_x509_certificates(data))
    except ValueError as exc:
        raise ConfigurationError(f"the {what} {path} holds no PEM certificate") from exc


def parse_certificate(data: bytes, what: str) -> x509.Certificate:
    """One certificate from DER or PEM bytes (InvalidResponseError otherwise)."""
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError:
        pass
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise InvalidResponseError(f"{what} is not a certificate") from exc


def unverified_context() -> ssl.SSLContext:
    """The context of the one unverified request: fetching the root to check it against a pin."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the answer is checked against the pinned SHA-256 instead
    return ctx


def resolve_trust(
    *,
    ca_bundle: Path | None,
    pin: str | None,
    cert_file: Path | None,
    fetch_root: Callable[[], bytes],
) -> Trust:
    """Choose the trust anchors (see the module docstring for the order).

    ``pin`` is a normalised fingerprint (64 lowercase hex digits); ``fetch_root`` returns
    the body of ``GET /api/v1/ca/root?format=der``, fetched without verification.
    Raises ConfigurationError for unusable files, TrustError for a pin mismatch.
    """
    trust = _base_trust(ca_bundle=ca_bundle, pin=pin, cert_file=cert_file, fetch_root=fetch_root)
    learned = cert_file.parent / LEARNED_FILE_NAME if cert_file is not None else None
    if trust.system or learned is None or not learned.is_file():
        return trust
    try:
        more = load_certificates(learned, "roots learned from the PKI server")
    except ConfigurationError:
        return trust
    known = {der(c) for c in trust.anchors}
    return attrs.evolve(trust, anchors=(*trust.anchors, *(c for c in more if der(c) not in known)))


def _base_trust(*, ca_bundle: Path | None, pin: str | None, cert_file: Path | None,
                fetch_root: Callable[[], bytes]) -> Trust:
    if ca_bundle is not None:
        return Trust(load_certificates(ca_bundle, "CA bundle"), "ca_bundle", ca_bundle)
    folder = cert_file.parent if cert_file is not None else None
    if pin is not None:
        stored = folder / ROOT_FILE_NAME if folder is not None else None
        if stored is not None and stored.is_file():
            with contextlib.suppress(ConfigurationError):
                for cert in load_certificates(stored, "stored root"):
                    if fingerprint_sha256(cert) == pin:
                        return Trust((cert,), "root_fingerprint", stored)
        root = parse_certificate(fetch_root(), "the root CA served by the PKI server")
        got = fingerprint_sha256(root)
        if got != pin:
            raise TrustError(
                f"the PKI server's root CA has SHA-256 fingerprint {got}, not the pinned {pin}: "
                "wrong server, or someone in between"
            )
        if stored is not None:
            _write_public(stored, root.public_bytes(serialization.Encoding.PEM))
        return Trust((root,), "root_fingerprint", stored)
    if folder is not None and (folder / CHAIN_FILE_NAME).is_file():
        chain = folder / CHAIN_FILE_NAME
        return Trust(load_certificates(chain, "CA chain"), "ca_chain", chain)
    return Trust((), "system")


@attrs.frozen
class Bundle:
    """``/api/v1/ca/bundle`` as judged against the anchors: the roots to trust now, the
    intermediates (the current one first) that chain to them, and what changed."""

    roots: tuple[x509.Certificate, ...]
    intermediates: tuple[x509.Certificate, ...]
    crosses: tuple[x509.Certificate, ...]
    added: tuple[x509.Certificate, ...]  # roots trusted now that were not
    dropped: tuple[x509.Certificate, ...]  # roots no longer trusted (retired by the CA)


def judge_bundle(certs: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate], *,
                 now: datetime) -> Bundle:
    """Which of the server's CA certificates to trust (SPEC §13). A root already trusted stays
    while the server lists it; a new root is accepted only through a cross-certificate in the
    bundle: the new root's name and key, signed by a trusted root, valid ``now``. Roots the
    server no longer lists are dropped. Intermediates are kept when signed by a root trusted
    after this. TrustError (nothing changes) when none of the server's roots can be trusted."""
    roots = [c for c in certs if c.issuer == c.subject]
    root_names = {r.subject for r in roots}
    crosses = [c for c in certs if c.issuer != c.subject and c.subject in root_names]
    trusted = {der(a) for a in anchors}
    keep = [r for r in roots if der(r) in trusted]
    for root in roots:
        if der(root) in trusted:
            continue
        for cross in crosses:
            if cross.subject != root.subject or cross.public_key() != root.public_key():
                continue
            if not cross.not_valid_before_utc <= now < cross.not_valid_after_utc:
                continue
            if any(issued_by(cross, anchor) for anchor in anchors):
                keep.append(root)
                break
    if not keep:
        raise TrustError("none of the roots the PKI server lists is one this client trusts, or is certified by one")
    kept = {der(r) for r in keep}
    intermediates = tuple(c for c in intermediates_of(certs) if any(issued_by(c, r) for r in keep))
    return Bundle(tuple(keep), intermediates,
                  tuple(c for c in crosses if any(issued_by(c, r) for r in keep)),
                  tuple(r for r in keep if der(r) not in trusted),
                  tuple(a for a in anchors if a.issuer == a.subject and der(a) not in kept))


def intermediates_of(certs: Sequence[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """The intermediates of a bundle: neither roots (self-signed) nor cross-certificates (a
    root's name, signed by another root)."""
    root_names = {c.subject for c in certs if c.issuer == c.subject}
    return tuple(c for c in certs if c.issuer != c.subject and c.subject not in root_names)


def issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """Whether ``parent`` signed ``child`` (names match and the signature verifies)."""
    if child.issuer != parent.subject:
        return False
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def verify_leaf(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    *,
    what: str,
    now: datetime | None = None,
) -> None:
    """Check that ``leaf`` chains to ``anchors`` (through ``intermediates``) and is valid now.

    RFC 5280 path validation by cryptography's verifier, for a client certificate (our
    leaves carry serverAuth and clientAuth). Raises TrustError naming ``what``.
    """
    if not anchors:
        raise TrustError(f"{what}: no CA to verify it against")
    store = verification.Store(list(anchors))
    verifier = (
        verification.PolicyBuilder()
        .store(store)
        .time(now or datetime.now(timezone.utc))
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, list(intermediates))
    except verification.VerificationError as exc:
        raise TrustError(f"{what} does not chain to the trusted CA: {exc}") from exc


def check_ca_chain(chain: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """Check a CA chain (intermediate first, root last) and return it.

    Each certificate must be signed by the next, the last by itself, and (unless
    ``anchors`` is empty: system trust) one of them must be a trusted anchor.
    Raises TrustError.
    """
    if not chain:
        raise TrustError("the PKI server sent an empty CA chain")
    for child, parent in zip(chain, [*chain[1:], chain[-1]], strict=True):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise TrustError(f"CA chain: {child.subject.rfc4514_string()} is not issued by "
                             f"{parent.subject.rfc4514_string()}") from exc
    if anchors:
        trusted = {der(c) for c in anchors}
        if not any(der(c) in trusted for c in chain):
            raise TrustError("the PKI server's CA chain does not lead to the trusted root")
    return list(chain)


def check_crl(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> x509.CertificateRevocationList:
    """Check that ``crl`` is issued and signed by ``issuer`` (the intermediate). Raises TrustError."""
    if crl.issuer != issuer.subject:
        raise TrustError(f"the CRL is issued by {crl.issuer.rfc4514_string()}, "
                         f"not by {issuer.subject.rfc4514_string()}")
    try:
        valid = crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise TrustError(f"the CRL's signature cannot be checked: {exc}") from exc
    if not valid:
        raise TrustError("the CRL's signature does not verify against the intermediate CA")
    return crl


def der(cert: x509.Certificate) -> bytes:
    """A certificate's DER: how certificates are compared and kept."""
    return cert.public_bytes(serialization.Encoding.DER)


def _write_public(path: Path, data: bytes) -> None:
    """Write a public file atomically, 0644."""
    try:
        write_atomically(path, data, 0o644)
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc.strerror or exc}") from exc
