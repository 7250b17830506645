"""CertificateAuthority: build and sign root, intermediate, leaf certificates and CRLs. Crypto only, no I/O."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .encoding import cert_pem

CAPrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
LeafPublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey

KEY_TYPES = ("rsa-2048", "rsa-3072", "rsa-4096", "ec-p256", "ec-p384")

# RFC 5280 reason names (CRLReason) as used on the CLI and in the API.
REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aACompromise": x509.ReasonFlags.aa_compromise,
}


# One shared CRL entry extension per reason (RFC 5280 §5.3.1).
_REASON_EXTENSIONS: dict[str, x509.Extension[x509.ExtensionType]] = {
    name: x509.Extension(x509.CRLReason.oid, False, x509.CRLReason(flag)) for name, flag in REASONS.items()
}


def _naive_utc(moment: datetime) -> datetime:
    """``moment`` as the naive UTC time the x509 builders store (aware times are converted)."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    if moment.year < 1950:
        raise ValueError("times before 1950 cannot be encoded")
    return moment


def _raw_extension(value: x509.ExtensionType, critical: bool) -> x509.Extension[x509.ExtensionType]:
    """``value`` encoded once: the builder copies an UnrecognizedExtension's bytes as they are,
    where a typed one is walked attribute by attribute on every signature. The certificate's
    bytes are the same either way."""
    return x509.Extension(value.oid, critical, x509.UnrecognizedExtension(value.oid, value.public_bytes()))


@functools.lru_cache(maxsize=1024)
def _san_extension(dns: tuple[str, ...], ips: tuple[IPAddress, ...],
                   uri: str | None) -> x509.Extension[x509.ExtensionType]:
    """A leaf's subjectAltName, encoded once per set of names (a service's few sets repeat)."""
    names: list[x509.GeneralName] = [*map(x509.DNSName, dns), *map(x509.IPAddress, ips)]
    if uri is not None:
        names.append(x509.UniformResourceIdentifier(uri))
    return _raw_extension(x509.SubjectAlternativeName(names), False)


@functools.lru_cache(maxsize=1024)
def _subject(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@functools.lru_cache(maxsize=1024)
def leaf_subject_text(common_name: str) -> str:
    """The RFC 4514 text of the subject :meth:`CertificateAuthority.sign_leaf` gives a leaf."""
    return _subject(common_name).rfc4514_string()


def _ski_extension(public_key: LeafPublicKey) -> x509.Extension[x509.ExtensionType]:
    """subjectKeyIdentifier (RFC 5280 §4.2.1.2 method 1: SHA-1 of the key's BIT STRING), as
    its DER: an OCTET STRING of the 20-byte digest."""
    digest = x509.SubjectKeyIdentifier.from_public_key(public_key).digest
    return x509.Extension(_SKI_OID, False, x509.UnrecognizedExtension(_SKI_OID, b"\x04\x14" + digest))


_SKI_OID = x509.SubjectKeyIdentifier.oid


def generate_key(key_type: str) -> CAPrivateKey:
    """A new private key of ``key_type`` (one of :data:`KEY_TYPES`)."""
    if key_type.startswith("rsa-"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    raise ValueError(f"unsupported key type '{key_type}' (choose one of {', '.join(KEY_TYPES)})")


def signature_hash(key: CAPrivateKey) -> hashes.SHA256 | hashes.SHA384:
    """SHA-384 for P-384 (and larger) EC issuers, SHA-256 otherwise (SPEC §3)."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _ca_builder(
    subject: x509.Name, issuer: x509.Name, public_key: LeafPublicKey, not_before: datetime,
    not_after: datetime, pathlen: int | None,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=pathlen), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def ca_name(common_name: str, organization: str = "VCC") -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def create_root(key: CAPrivateKey, *, now: datetime, days: int = 3650,
                common_name: str = "VCC Root CA") -> x509.Certificate:
    """A self-signed root: CA:TRUE (no path length), keyCertSign + cRLSign, SKI."""
    name = ca_name(common_name)
    builder = _ca_builder(name, name, key.public_key(), now, now + timedelta(days=days), None)
    return builder.sign(key, signature_hash(key))


def create_cross_certificate(new_root: x509.Certificate, old_root: x509.Certificate, old_root_key: CAPrivateKey,
                             *, now: datetime) -> x509.Certificate:
    """``new_root``'s name and key certified by ``old_root`` (SPEC §13): a chain through it
    leads a verifier that trusts only the old root to the new one. A CA without a path length,
    as the new root is; valid while both roots are."""
    not_after = min(new_root.not_valid_after_utc, old_root.not_valid_after_utc)
    builder = _ca_builder(new_root.subject, old_root.subject, new_root.public_key(),  # type: ignore[arg-type]
                          now, not_after, None)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(old_root_key.public_key()), critical=False)
    return builder.sign(old_root_key, signature_hash(old_root_key))


def generation_name(base: str, generation: int) -> str:
    """The common name of a CA's ``generation``-th certificate: ``base`` for the first, then
    ``base G2``, ``G3``... (distinct names: verifiers match CRLs and issuers by name)."""
    return base if generation <= 1 else f"{base} G{generation}"


def create_intermediate(root: x509.Certificate, root_key: CAPrivateKey, key: CAPrivateKey, *,
                        now: datetime, days: int = 1825,
                        common_name: str = "VCC Intermediate CA") -> x509.Certificate:
    """An intermediate under ``root``: pathlen 0, SKI + AKI, never valid beyond the root."""
    not_after = min(now + timedelta(days=days), root.not_valid_after_utc)
    builder = _ca_builder(ca_name(common_name), root.subject, key.public_key(), now, not_after, 0)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False
    )
    return builder.sign(root_key, signature_hash(root_key))


def _dns_tuple(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(names)


def _ip_tuple(ips: Iterable[IPAddress]) -> tuple[IPAddress, ...]:
    return tuple(ips)


@attrs.frozen(kw_only=True)
class LeafTemplate:
    """What a service certificate says; filled in by the policy, never copied from a CSR."""

    common_name: str
    # Tuples (lists are made tuples): sign_leaf remembers encoded SAN extensions by these.
    san_dns: tuple[str, ...] = attrs.field(converter=_dns_tuple)
    san_ip: tuple[IPAddress, ...] = attrs.field(converter=_ip_tuple)
    not_before: datetime
    not_after: datetime
    serial_number: int = attrs.field(factory=x509.random_serial_number)
    # The service's identity as a URI SAN (SPEC §10: spiffe://<trust-domain>/svc/<service_id>).
    uri: str | None = None


@attrs.frozen
class CertificateAuthority:
    """The issuing intermediate (with its key) plus the root above it.

    ``crl_url`` and ``issuer_url`` go into every leaf as the CRL distribution point and the
    AIA caIssuers URI. ``cross``: while a root rotates (SPEC §13), the new root certified by the
    old one, sent after the root in every chain so that peers trusting only the old root
    still find a path.
    """

    root: x509.Certificate
    certificate: x509.Certificate
    key: CAPrivateKey = attrs.field(repr=False)
    crl_url: str
    issuer_url: str
    cross: x509.Certificate | None = None
    _aki: x509.AuthorityKeyIdentifier = attrs.field(init=False, repr=False)
    _hash: hashes.SHA256 | hashes.SHA384 = attrs.field(init=False, repr=False)
    _chain_pem: bytes = attrs.field(init=False, repr=False)
    # The extensions every leaf shares (before and after its SAN + SKI), made once; the
    # key-usage one differs for RSA keys (keyEncipherment).
    _leaf_head: dict[bool, tuple[x509.Extension[x509.ExtensionType], ...]] = attrs.field(
        init=False, repr=False)
    _leaf_tail: tuple[x509.Extension[x509.ExtensionType], ...] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        object.__setattr__(self, "_aki",
                           x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski))
        object.__setattr__(self, "_hash", signature_hash(self.key))
        object.__setattr__(self, "_chain_pem", cert_pem(*self.chain))

        ext = _raw_extension

        def head(is_rsa: bool) -> tuple[x509.Extension[x509.ExtensionType], ...]:
            return (
                ext(x509.BasicConstraints(ca=False, path_length=None), True),
                ext(x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=is_rsa,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False), True),
                ext(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                           ExtendedKeyUsageOID.CLIENT_AUTH]), False),
            )

        object.__setattr__(self, "_leaf_head", {True: head(True), False: head(False)})
        object.__setattr__(self, "_leaf_tail", (
            ext(self._aki, False),
            ext(x509.CRLDistributionPoints([x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(self.crl_url)],
                relative_name=None, reasons=None, crl_issuer=None)]), False),
            ext(x509.AuthorityInformationAccess([x509.AccessDescription(
                x509.oid.AuthorityInformationAccessOID.CA_ISSUERS,
                x509.UniformResourceIdentifier(self.issuer_url))]), False),
        ))

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """Intermediate then root, the order TLS peers expect after the leaf (then the
        cross-certificate while a root rotates)."""
        return (self.certificate, self.root) if self.cross is None else (self.certificate, self.root, self.cross)

    @property
    def ski(self) -> str:
        """The intermediate's subject key identifier, hex: its name in URLs and the store."""
        return self._aki.key_identifier.hex()  # type: ignore[union-attr]

    @property
    def chain_pem(self) -> bytes:
        """:attr:`chain` as PEM (made once: the certificates never change)."""
        return self._chain_pem

    def sign_leaf(self, public_key: LeafPublicKey, template: LeafTemplate) -> x509.Certificate:
        """Sign a service certificate for ``public_key`` as described by ``template`` (SPEC §3)."""
        is_rsa = isinstance(public_key, rsa.RSAPublicKey)
        not_after = min(template.not_after, self.certificate.not_valid_after_utc)
        # Backdating for clock skew never reaches before the issuer itself was valid.
        not_before = max(template.not_before, self.certificate.not_valid_before_utc)
        # Extensions, in this order: basicConstraints, keyUsage, extKeyUsage, subjectAltName,
        # subjectKeyIdentifier, authorityKeyIdentifier, cRLDistributionPoints, authorityInfoAccess.
        # Handed to the builder as one list: add_extension() one by one costs more than signing.
        extensions = [
            *self._leaf_head[is_rsa],
            _san_extension(template.san_dns, template.san_ip, template.uri),
            _ski_extension(public_key),
            *self._leaf_tail,
        ]
        builder = (
            x509.CertificateBuilder(extensions=extensions)
            .subject_name(_subject(template.common_name))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(template.serial_number)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
        )
        return builder.sign(self.key, self._hash)

    def build_crl(self, revoked: Sequence[tuple[int, datetime, str | None]], *, number: int,
                  this_update: datetime, next_update: datetime) -> x509.CertificateRevocationList:
        """The intermediate's CRL: :func:`build_crl` signed with its key."""
        return build_crl(self.certificate, self.key, revoked, number=number, this_update=this_update,
                         next_update=next_update)


def build_crl(issuer: x509.Certificate, key: CAPrivateKey, revoked: Sequence[tuple[int, datetime, str | None]],
              *, number: int, this_update: datetime, next_update: datetime) -> x509.CertificateRevocationList:
    """A v2 CRL of ``(serial, revoked_at, reason)`` entries with CRL number and AKI, signed by
    ``issuer`` (the intermediate for leaves, the root for intermediates).

    The entry list is handed to the builder at once: ``add_revoked_certificate()`` copies the
    list on every call, which makes 100k entries take seconds instead of a fraction of one.
    """
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    # Each entry is made with one constructor call (the fluent setters copy the builder at
    # every step); dates repeat (second precision) and reasons are few, so both are shared.
    dates: dict[datetime, datetime] = {}
    entries = []
    for serial, revoked_at, reason in revoked:
        if not 0 < serial < (1 << 159):
            raise ValueError(f"serial number {serial:x} out of range")
        when = dates.get(revoked_at)
        if when is None:
            when = dates[revoked_at] = _naive_utc(revoked_at)
        # RFC 5280 §5.3.1: omit the reason code rather than use unspecified.
        extensions: list[x509.Extension[x509.ExtensionType]] = (
            [_REASON_EXTENSIONS[reason]] if reason and reason != "unspecified" else [])
        entries.append(x509.RevokedCertificateBuilder(serial, when, extensions).build())
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=issuer.subject,
        last_update=this_update,
        next_update=next_update,
        extensions=[
            x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(number)),
            x509.Extension(aki.oid, False, aki),
        ],
        revoked_certificates=entries,
    )
    return builder.sign(key, signature_hash(key))


@attrs.frozen
class CAs:
    """Every CA a server works with (SPEC §13): the ``current`` intermediate signs new
    certificates; ``issuers`` (SKI → CA, the current one included) are the unexpired
    intermediates, each still signing the CRL of its own certificates; ``roots`` the trusted
    roots (the current one first); ``crosses`` the cross-certificates between trusted roots."""

    current: CertificateAuthority
    issuers: dict[str, CertificateAuthority]
    roots: tuple[x509.Certificate, ...]
    crosses: tuple[x509.Certificate, ...] = ()
    version: int = 0  # of the cluster's record it was built from (0: the home's files)
    activates_at: datetime | None = None  # when a rotation's next intermediate becomes the current one

    @classmethod
    def single(cls, ca: CertificateAuthority) -> CAs:
        return cls(ca, {ca.ski: ca}, (ca.root,))

    @property
    def bundle(self) -> tuple[x509.Certificate, ...]:
        """``/ca/bundle``: the intermediates (current first), the roots, the cross-certificates."""
        others = [ca.certificate for ski, ca in self.issuers.items() if ski != self.current.ski]
        return (self.current.certificate, *others, *self.roots, *self.crosses)

    @property
    def trusted(self) -> tuple[x509.Certificate, ...]:
        """What client certificates are verified against: the roots and the intermediates."""
        return (*self.roots, *(ca.certificate for ca in self.issuers.values()))
