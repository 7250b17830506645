"""The core end to end in-process: register, enrol, renew, revoke, CRL, judged by openssl and pkilint."""

from __future__ import annotations

from pathlib import Path

from support import make_csr, openssl_verify, pem, pkilint_cert, pkilint_crl
from vcc_pki_server.authority import Actor, Authority
from vcc_pki_server.home import Home


def test_enrol_renew_revoke_is_judged_valid_by_openssl_and_pkilint(
    ca_home: Home, authority: Authority, operator: Actor, service_id: str, tmp_path: Path
) -> None:
    _, token = authority.register_service(service_id, san_dns=[service_id, "localhost"],
                                          san_ip=["127.0.0.1"], actor=operator)
    csr, _ = make_csr(service_id)
    first = authority.issue(service_id, csr, actor=authority.authenticate_token(token.value))
    second = authority.renew(service_id, actor=operator, csr_pem=make_csr(service_id)[0])  # a new key
    authority.revoke(service_id, serial=first.record.serial, reason="keyCompromise", actor=operator)
    crl = tmp_path / "crl.der"
    crl.write_bytes(authority.crl().der)
    for name, issued in (("first", first), ("second", second)):
        (tmp_path / f"{name}.pem").write_bytes(pem(issued.certificate))
    revoked = openssl_verify(ca_home.root_cert, ca_home.intermediate_cert, tmp_path / "first.pem", crl=crl)
    assert revoked.returncode == 2 and "certificate revoked" in revoked.stdout + revoked.stderr
    ok = openssl_verify(ca_home.root_cert, ca_home.intermediate_cert, tmp_path / "second.pem", crl=crl)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert pkilint_cert(tmp_path / "second.pem") == []
    assert pkilint_crl(crl) == []
