"""The CA endpoints of SPEC §13 that stay right across CA rotations: a leaf's CDP and AIA name
its own issuer (by subject key identifier), ``/ca/bundle`` and ``/ca/roots``."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
from cryptography import x509

if TYPE_CHECKING:
    from tests.e2e.conftest import Enrol

API = "/api/v1"


def _path(url: str) -> str:
    """The path and query of a URL in a certificate (its host is the home's public URL)."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def test_a_leafs_cdp_and_aia_lead_to_its_issuers_crl_and_certificate(enrolled: Enrol, anon: httpx.Client) -> None:
    leaf = x509.load_pem_x509_certificate(enrolled().cert.read_bytes())
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki is not None
    [cdp] = [n.value for dp in leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
             for n in dp.full_name or []]
    [aia] = [d.access_location.value for d in leaf.extensions.get_extension_for_class(
        x509.AuthorityInformationAccess).value if d.access_method == x509.oid.AuthorityInformationAccessOID.CA_ISSUERS]
    assert _path(cdp) == f"{API}/crl/{aki.hex()}"
    assert _path(aia) == f"{API}/ca/intermediate/{aki.hex()}?format=der"

    r = anon.get(_path(aia))
    assert r.status_code == 200 and r.headers["content-type"] == "application/pkix-cert"
    issuer = x509.load_der_x509_certificate(r.content)
    leaf.verify_directly_issued_by(issuer)
    r = anon.get(_path(cdp))
    assert r.status_code == 200 and r.headers["content-type"] == "application/pkix-crl"
    crl = x509.load_der_x509_crl(r.content)
    assert crl.issuer == issuer.subject and crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    assert anon.get(f"{API}/ca/intermediate/{'00' * 20}").status_code == 404


def test_the_bundle_holds_the_intermediate_and_the_roots(anon: httpx.Client) -> None:
    intermediate = x509.load_pem_x509_certificate(anon.get(f"{API}/ca/intermediate").content)
    root = x509.load_pem_x509_certificate(anon.get(f"{API}/ca/root").content)
    bundle = x509.load_pem_x509_certificates(anon.get(f"{API}/ca/bundle").content)
    assert bundle == [intermediate, root]
    assert x509.load_pem_x509_certificates(anon.get(f"{API}/ca/roots").content) == [root]
