"""Which names, keys and lifetimes a service may get. Pure rules over cryptography types."""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from datetime import datetime, timedelta

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from .ca import IPAddress, LeafPublicKey, LeafTemplate
from .errors import InvalidCSR, InvalidRequest, PolicyRefused

SERVICE_ID = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# A whole name of such labels, dot-separated: one match instead of one per label.
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")
_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)  # SPEC §3: leaf EC keys are P-256 or P-384


def check_service_id(service_id: object) -> str:
    """Return ``service_id`` if it is a valid id (lower-case LDH label, 1–63 chars), else raise."""
    if not isinstance(service_id, str) or not SERVICE_ID.fullmatch(service_id):
        raise InvalidRequest(
            f"invalid service id {service_id!r}: use 1-63 lower-case letters, digits and '-', "
            "not starting or ending with '-'"
        )
    return service_id


def normalize_dns_name(name: str) -> str:
    """An LDH DNS name in lower-case A-labels; U-labels are converted, anything else refused."""
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"invalid DNS name {name!r}")
    try:
        ascii_name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        raise InvalidRequest(f"invalid DNS name {name!r}") from None
    ascii_name = ascii_name.lower().rstrip(".")
    if "*" in ascii_name:
        raise InvalidRequest(f"wildcard DNS names are not issued: {name!r}")
    if len(ascii_name) > 253 or not _NAME.fullmatch(ascii_name):
        raise InvalidRequest(f"invalid DNS name {name!r}: labels of 1-63 letters, digits and '-'")
    if ascii_name.rpartition(".")[2].isdigit():
        raise InvalidRequest(f"invalid DNS name {name!r}: looks like an IP address, use an IP SAN")
    return ascii_name


def normalize_ip(value: str | IPAddress) -> IPAddress:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise InvalidRequest(f"invalid IP address {value!r}") from None


def normalize_sans(dns: Iterable[str], ips: Iterable[str | IPAddress]) -> tuple[tuple[str, ...], tuple[IPAddress, ...]]:
    """Validated, de-duplicated SAN lists in their first-seen order."""
    d = tuple(dict.fromkeys(normalize_dns_name(n) for n in dns))
    i = tuple(dict.fromkeys(normalize_ip(a) for a in ips))
    return d, i


@functools.lru_cache(maxsize=1024)
def _allow_list(
    dns: tuple[str, ...], ips: tuple[str | IPAddress, ...]
) -> tuple[tuple[str, ...], tuple[IPAddress, ...]]:
    """:func:`normalize_sans` of a service's allow-list, remembered: the same few lists are
    checked on every issuance."""
    return normalize_sans(dns, ips)


_ALLOWED_CSR_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


def check_public_key(key: object) -> LeafPublicKey:
    """Refuse keys outside the profile: RSA < 2048 bits or e != 65537, curves other than P-256/P-384."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise InvalidCSR(f"RSA key of {key.key_size} bits is too weak: at least 2048 bits")
        if key.key_size > 8192:
            raise InvalidCSR(f"RSA key of {key.key_size} bits refused: at most 8192 bits")
        if key.public_numbers().e != 65537:
            raise InvalidCSR(f"RSA public exponent {key.public_numbers().e} refused: use 65537")
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, _ALLOWED_CURVES):
            raise InvalidCSR(f"elliptic curve {key.curve.name} refused: use P-256 or P-384")
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise InvalidCSR(f"unsupported key type {type(key).__name__}")


def load_csr_key(data: str | bytes) -> tuple[x509.CertificateSigningRequest, LeafPublicKey]:
    """Parse a PEM (or DER) CSR and check its self-signature and key (InvalidCSR otherwise);
    the CSR and its checked public key (each ``public_key()`` call decodes it anew)."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        csr = (x509.load_pem_x509_csr(raw) if raw.lstrip().startswith(b"-----")
               else x509.load_der_x509_csr(raw))
    except ValueError as exc:
        raise InvalidCSR(f"CSR cannot be parsed: {exc}") from None
    # The key policy first: it is cheap, and a refused key (RSA with a huge exponent or
    # modulus) must not cost a signature check first.
    try:
        key = check_public_key(csr.public_key())
    except InvalidCSR:
        raise
    except Exception as exc:
        raise InvalidCSR(f"CSR public key cannot be read: {exc}") from None
    try:
        algorithm = csr.signature_hash_algorithm if not isinstance(key, ed25519.Ed25519PublicKey) else None
    except Exception:  # an algorithm cryptography does not know: the signature check says so
        algorithm = None
    if algorithm is not None and not isinstance(algorithm, _ALLOWED_CSR_HASHES):
        raise InvalidCSR(f"CSR is signed with {algorithm.name.upper()}: sign it with SHA-256 or stronger")
    try:
        valid = csr.is_signature_valid
    except Exception:  # unsupported signature algorithms raise from the binding
        valid = False
    if not valid:
        raise InvalidCSR("CSR signature is invalid (tampered or not self-signed)")
    return csr, key


def csr_names(csr: x509.CertificateSigningRequest) -> tuple[str | None, list[str], list[IPAddress], list[str]]:
    """The CN and SANs (DNS, IP, URI) a CSR asks for (unvalidated)."""
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else None
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return cn, [], [], []
    except ValueError as exc:
        raise InvalidCSR(f"CSR extensions cannot be parsed: {exc}") from None
    # One pass over the names (get_values_for_type() walks them all on every call).
    dns: list[str] = []
    ips: list[IPAddress] = []
    uris: list[str] = []
    others: list[x509.GeneralName] = []
    network = False
    for name in san:
        if isinstance(name, x509.DNSName):
            dns.append(name.value)
        elif isinstance(name, x509.IPAddress):
            value = name.value
            if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
                ips.append(value)
            else:
                network = True
        elif isinstance(name, x509.UniformResourceIdentifier):
            uris.append(name.value)
        else:
            others.append(name)
    if others:
        raise InvalidCSR(f"CSR asks for unsupported SAN types: {', '.join(type(g).__name__ for g in others)}")
    if network:
        raise InvalidCSR("CSR asks for an IP network, not an address, in its SANs")
    return cn, dns, ips, uris


_IPV4_CHARS = frozenset("0123456789.")


def _ip_or_none(value: str) -> IPAddress | None:
    """``value`` as an IP address, else None; names are told apart without raising (a failed
    ``ip_address()`` raises three exceptions, which costs more than the rest of a name check).
    Only strings with a ``:`` (IPv6) or of digits and dots (IPv4) can parse."""
    if ":" not in value and not ("." in value and _IPV4_CHARS.issuperset(value)):
        return None
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def is_ip(value: str) -> bool:
    """True for an IPv4 or IPv6 address literal."""
    return _ip_or_none(value) is not None


MIN_LIFETIME = timedelta(seconds=300)
DEFAULT_TRUST_DOMAIN = "vcc-pki.internal"
_TRUST_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?")


def check_trust_domain(value: str) -> str:
    """A SPIFFE trust domain: lowercase letters, digits, dots and dashes (InvalidRequest otherwise)."""
    if not isinstance(value, str) or not _TRUST_DOMAIN.fullmatch(value) or ".." in value:
        raise InvalidRequest(f"invalid trust domain {value!r}: lowercase letters, digits, '.' and '-'")
    return value


def lifetime_text(lifetime: timedelta) -> str:
    """``30 days``, ``8 hours``, ``90 minutes`` or ``301 seconds``: the largest whole unit."""
    seconds = int(lifetime.total_seconds())
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} seconds"


@attrs.frozen(kw_only=True)
class Lifetimes:
    """A service's own lifetime settings (``default_validity_seconds``/``max_validity_seconds``)."""

    default: timedelta | None = None
    maximum: timedelta | None = None


@attrs.frozen(kw_only=True)
class Policy:
    """Issuance limits: default and maximum leaf lifetime, backdating for clock skew."""

    default_validity_days: int = 365
    max_validity_days: int = 365
    backdate: timedelta = timedelta(minutes=5)
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    def spiffe_id(self, service_id: str) -> str:
        """The identity every certificate of ``service_id`` carries as a URI SAN (SPEC §10)."""
        return f"spiffe://{self.trust_domain}/svc/{service_id}"

    def validity(self, requested: timedelta | None, now: datetime, *, service: Lifetimes = Lifetimes(),
                 cap: bool = False) -> tuple[datetime, datetime]:
        """``(not_before, not_after)`` for a requested lifetime (None: the service's default,
        else the server's). Under :data:`MIN_LIFETIME`, or above the maximum (the service's if
        it is lower than the server's), is refused naming the limit; with ``cap`` a lifetime
        above the maximum is cut to it instead (a renewal keeping its old lifetime)."""
        maximum = timedelta(days=self.max_validity_days)
        limit = f"the server's maximum of {lifetime_text(maximum)} (max_validity_days)"
        if service.maximum is not None and service.maximum < maximum:
            maximum = service.maximum
            limit = f"this service's maximum of {lifetime_text(maximum)} (max_validity_seconds)"
        if requested is None:
            lifetime = min(service.default or timedelta(days=self.default_validity_days), maximum)
        elif requested < MIN_LIFETIME:
            raise InvalidRequest(f"a certificate lifetime must be at least {int(MIN_LIFETIME.total_seconds())} "
                                 f"seconds (5 minutes), got {lifetime_text(requested)}")
        elif requested > maximum and not cap:
            raise InvalidRequest(f"a lifetime of {lifetime_text(requested)} exceeds {limit}")
        else:
            lifetime = min(requested, maximum)
        return now - self.backdate, now + lifetime

    def grant_names(
        self, service_id: str, allow_dns: Iterable[str], allow_ip: Iterable[str], *,
        cn: str | None, dns: Iterable[str], ips: Iterable[str | IPAddress],
    ) -> tuple[str, tuple[str, ...], tuple[IPAddress, ...]]:
        """The CN and SANs a service gets: the requested names if all are in its allow-list,
        the whole allow-list if it requested none. The CN is copied into the SANs.

        A requested CN equal to the service id is only a label for who asks (clients put their
        id there), so it is dropped rather than refused when it is not in the allow-list.
        """
        allowed_dns, allowed_ip = _allow_list(tuple(allow_dns), tuple(allow_ip))
        req_dns, req_ip = normalize_sans(dns, ips)
        return self._grant(service_id, allowed_dns, allowed_ip, cn, req_dns, req_ip)

    @staticmethod
    def _grant(service_id: str, allowed_dns: tuple[str, ...], allowed_ip: tuple[IPAddress, ...],
               cn: str | None, req_dns: tuple[str, ...],
               req_ip: tuple[IPAddress, ...]) -> tuple[str, tuple[str, ...], tuple[IPAddress, ...]]:
        """:meth:`grant_names` over normalised names."""
        cn_dns: list[str] = []
        cn_ip: list[IPAddress] = []
        if cn:
            cn_address = _ip_or_none(cn)
            if cn_address is not None:
                cn_ip.append(cn_address)
            else:
                name = normalize_dns_name(cn)
                if name in allowed_dns or name != service_id:
                    cn_dns.append(name)
        if not (req_dns or req_ip):
            req_dns, req_ip = allowed_dns, allowed_ip
        want_dns = tuple(dict.fromkeys(cn_dns + list(req_dns)))
        want_ip = tuple(dict.fromkeys(cn_ip + list(req_ip)))
        for name in want_dns:
            if name not in allowed_dns:
                raise PolicyRefused(f"SAN '{name}' is not in the allow-list of service '{service_id}'")
        for ip in want_ip:
            if ip not in allowed_ip:
                raise PolicyRefused(f"SAN '{ip}' is not in the allow-list of service '{service_id}'")
        if not (want_dns or want_ip):
            raise PolicyRefused(f"service '{service_id}' has an empty SAN allow-list")
        common_name = cn_dns[0] if cn_dns else (str(cn_ip[0]) if cn_ip else
                                                (want_dns[0] if want_dns else str(want_ip[0])))
        return common_name, want_dns, want_ip

    def template(self, service_id: str, allow_dns: Iterable[str], allow_ip: Iterable[str],
                 csr: x509.CertificateSigningRequest, *, now: datetime,
                 validity: timedelta | None = None, lifetimes: Lifetimes = Lifetimes()) -> LeafTemplate:
        """The leaf template for a checked CSR (see :func:`load_csr`)."""
        cn, dns, ips, uris = csr_names(csr)
        identity = self.spiffe_id(service_id)
        for uri in uris:
            if uri != identity:
                raise PolicyRefused(f"URI SAN '{uri}' is not the identity of service '{service_id}' ({identity})")
        try:
            req_dns, req_ip = normalize_sans(dns, ips)
            if cn is not None:
                cn_is_ip = is_ip(cn)
                if not cn_is_ip:
                    normalize_dns_name(cn)
        except InvalidRequest as exc:
            raise InvalidCSR(f"CSR names: {exc}") from None
        allowed_dns, allowed_ip = _allow_list(tuple(allow_dns), tuple(allow_ip))
        common_name, san_dns, san_ip = self._grant(service_id, allowed_dns, allowed_ip, cn,
                                                   req_dns, req_ip)
        not_before, not_after = self.validity(validity, now, service=lifetimes)
        return LeafTemplate(common_name=common_name, san_dns=san_dns, san_ip=san_ip, uri=identity,
                            not_before=not_before, not_after=not_after)
