"""The root's CRL (SPEC §10): made with the CA, renewed by `pki-admin ca root-crl`, served per
issuer at /api/v1/crl/{ski}, so that verifiers checking the whole chain (nginx's ssl_crl,
`openssl verify -crl_check_all`) work."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from conftest import ROOT_PASSWORD
from support import pkilint_crl
from vcc_pki_server import cli
from vcc_pki_server.home import Home

API = "/api/v1"


def ski(cert: x509.Certificate) -> str:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()


def verify_all(home: Home, leaf: Path, crls: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "verify", "-x509_strict", "-crl_check_all", "-CAfile", str(home.root_cert),
                           "-untrusted", str(home.intermediate_cert), "-CRLfile", str(crls), str(leaf)],
                          capture_output=True, text=True, check=False)


def test_the_root_crl_is_served_per_issuer_and_checks_the_whole_chain(
        ca_home: Home, anon: httpx.Client, admin: httpx.Client, enrolled: Any, tmp_path: Path,
        problem: Any) -> None:
    root, intermediate = ca_home.root_certificate(), ca_home.intermediate_certificate()
    r = anon.get(f"{API}/crl/{ski(root)}")
    assert r.status_code == 200 and r.headers["content-type"] == "application/pkix-crl"
    root_crl = x509.load_der_x509_crl(r.content)
    assert root_crl.issuer == root.subject and root_crl.is_signature_valid(root.public_key())  # type: ignore[arg-type]
    assert root_crl.next_update_utc is not None and (root_crl.next_update_utc - root_crl.last_update_utc).days == 365
    pem = anon.get(f"{API}/crl/{ski(root).upper()}", params={"format": "pem"})
    assert x509.load_pem_x509_crl(pem.content) == root_crl
    assert anon.get(f"{API}/crl/{ski(intermediate)}").content == anon.get(f"{API}/crl").content
    problem(anon.get(f"{API}/crl/{'ab' * 20}"), 404, "not_found")
    (tmp_path / "root-crl.pem").write_bytes(pem.content)
    assert pkilint_crl(tmp_path / "root-crl.pem") == []

    good, bad = enrolled(), enrolled()
    assert admin.delete(f"{API}/certificates/{bad.service_id}/revoke").status_code == 200
    intermediate_crl = x509.load_der_x509_crl(anon.get(f"{API}/crl").content)
    crls = tmp_path / "crls.pem"  # what nginx's ssl_crl wants: every CRL of the chain
    crls.write_bytes(intermediate_crl.public_bytes(serialization.Encoding.PEM) + pem.content)
    ok = verify_all(ca_home, good.cert, crls)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    revoked = verify_all(ca_home, bad.cert, crls)
    assert revoked.returncode == 2 and "certificate revoked" in revoked.stdout + revoked.stderr
    # Without the root's CRL, -crl_check_all cannot check the intermediate: the chain fails.
    only = tmp_path / "only-intermediate.pem"
    only.write_bytes(intermediate_crl.public_bytes(serialization.Encoding.PEM))
    missing = verify_all(ca_home, good.cert, only)
    assert missing.returncode == 2 and "unable to get certificate CRL" in missing.stdout + missing.stderr


def test_ca_root_crl_renews_it_and_the_running_server_serves_the_new_one(
        ca_home: Home, anon: httpx.Client, tmp_path: Path) -> None:
    root = ca_home.root_certificate()
    before = x509.load_der_x509_crl(anon.get(f"{API}/crl/{ski(root)}").content)
    password = tmp_path / "root.pw"
    password.write_text(ROOT_PASSWORD + "\n")
    assert cli.main(["--home", str(ca_home.root), "ca", "root-crl", "--root-password-file", str(password)]) == 0
    after = x509.load_der_x509_crl(anon.get(f"{API}/crl/{ski(root)}").content)
    number = x509.CRLNumber
    assert (after.extensions.get_extension_for_class(number).value.crl_number
            == before.extensions.get_extension_for_class(number).value.crl_number + 1)
    wrong = tmp_path / "wrong.pw"
    wrong.write_text("not the root password\n")
    assert cli.main(["--home", str(ca_home.root), "ca", "root-crl", "--root-password-file", str(wrong)]) == 1
    assert x509.load_der_x509_crl(anon.get(f"{API}/crl/{ski(root)}").content) == after  # nothing changed
