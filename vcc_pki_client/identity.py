"""Who a peer is: the service id in its certificate's SPIFFE-style URI SAN (SPEC §10)."""

from __future__ import annotations

import re
import ssl

from cryptography import x509

__all__ = ["PKI_SERVER_ID", "peer_service_id", "require_pki_server"]

#: The service id the CA's own API server has (its certificate names it; no other may).
PKI_SERVER_ID = "pki-server"

_SPIFFE = re.compile(r"spiffe://([a-z0-9.-]+)/svc/([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)")


def peer_service_id(cert: x509.Certificate | bytes, *, trust_domain: str | None = None) -> str | None:
    """The service id a certificate from this CA names: ``billing`` for one carrying the URI
    SAN ``spiffe://<trust-domain>/svc/billing``; None for a certificate without one.

    ``cert`` is a certificate or its DER (what ``ssl_object.getpeercert(binary_form=True)``
    gives). Only ask this of a certificate the TLS handshake verified against this CA (the
    contexts of ``PKIClient`` do): the id is as good as the chain that vouches for it. With
    ``trust_domain``, URIs of other trust domains do not count.

    Example (a Starlette/uvicorn app behind ``server_ssl_context()``)::

        der = request.scope["transport"].get_extra_info("ssl_object").getpeercert(binary_form=True)
        if peer_service_id(der) not in {"billing", "reports"}:
            return PlainTextResponse("forbidden", status_code=403)
    """
    if isinstance(cert, (bytes, bytearray, memoryview)):
        cert = x509.load_der_x509_certificate(bytes(cert))
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        match = _SPIFFE.fullmatch(uri)
        if match and (trust_domain is None or match.group(1) == trust_domain):
            return match.group(2)
    return None


def require_pki_server(der: bytes) -> None:
    """Refuse a server certificate that is not the PKI server's own (``ssl.SSLCertVerificationError``).

    Chaining to this CA is not enough: every service has such a certificate, and one for the
    right host name could pose as the CA (serve forged peer certificates, replay old CRLs)."""
    named = peer_service_id(der)
    if named != PKI_SERVER_ID:
        error = ssl.SSLCertVerificationError(
            f"the server's certificate is not the PKI server's (it names {named or 'no service'}, "
            f"not {PKI_SERVER_ID}): another service of this CA posing as the CA server")
        error.verify_message = str(error.args[0])
        raise error
