"""CA rotation in one home (SPEC §13): the CRL of a retired intermediate, what tools nobody
here wrote say of the new certificates and CRLs, bad input, and crashes in the middle."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from conftest import CA_PASSWORD, ROOT_PASSWORD, build_home
from support import BIN, RunningServer, env_without_secrets, make_csr, openssl_verify, pkilint_cert, pkilint_crl
from vcc_pki_server import rotation
from vcc_pki_server.authority import Actor, utc_now
from vcc_pki_server.ca_set import SHARED_NAME
from vcc_pki_server.encoding import cert_pem
from vcc_pki_server.home import Home

NOW_ACTIVE = timedelta(0)  # the new intermediate issues at once (the servers' grace is not the point here)


def pki_admin(home: Home, *args: str, root_password: str = ROOT_PASSWORD) -> subprocess.CompletedProcess[str]:
    env = {**env_without_secrets(), "VCC_PKI_CA_PASSWORD": CA_PASSWORD, "VCC_PKI_ROOT_PASSWORD": root_password}
    return subprocess.run([str(BIN / "pki-admin"), "--home", str(home.root), *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)


def write(path: Path, *certs: x509.Certificate) -> Path:
    path.write_bytes(cert_pem(*certs))
    return path


def issue(home: Home, service_id: str) -> x509.Certificate:
    authority = home.authority(CA_PASSWORD)
    try:
        if authority.store.get_service(service_id) is None:
            authority.register_service(service_id, san_dns=[f"{service_id}.example.com"], actor=Actor.operator())
        csr, _ = make_csr(f"{service_id}.example.com")
        return authority.issue(service_id, csr, actor=Actor.operator()).certificate
    finally:
        authority.store.close()


def test_an_old_certificate_revoked_after_rotation_is_on_its_issuers_crl(tmp_path: Path) -> None:
    home = build_home(tmp_path / "home")
    old_root, old_intermediate = home.root_certificate(), home.intermediate_certificate()
    old_leaf = issue(home, "billing")
    store = home.open_store()
    try:
        rotation.rotate_intermediate(home, store, root_password=ROOT_PASSWORD, password=CA_PASSWORD, key_type=None,
                                     now=utc_now(), activate_after=NOW_ACTIVE)
    finally:
        store.close()
    new_intermediate = home.intermediate_certificate()
    assert new_intermediate.subject != old_intermediate.subject
    new_leaf = issue(home, "billing")
    assert new_leaf.issuer == new_intermediate.subject

    authority = home.authority(CA_PASSWORD)
    try:
        revoked = authority.revoke("billing", serial=format(old_leaf.serial_number, "x"), reason="keyCompromise",
                                   actor=Actor.operator())
        old_ski = authority.cas.issuers[next(s for s, ca in authority.cas.issuers.items()
                                             if ca.certificate == old_intermediate)].ski
        assert revoked.crl is not None and revoked.crl.issuer == old_ski
        old_crl = x509.load_der_x509_crl(authority.crl(issuer=old_ski).der)
        new_crl = x509.load_der_x509_crl(authority.crl().der)
    finally:
        authority.store.close()
    assert old_crl.issuer == old_intermediate.subject
    assert old_crl.get_revoked_certificate_by_serial_number(old_leaf.serial_number) is not None
    assert new_crl.get_revoked_certificate_by_serial_number(old_leaf.serial_number) is None
    cdp = old_leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert str(cdp[0].full_name[0].value).endswith(f"/api/v1/crl/{old_ski}")  # the leaf names its own issuer's CRL

    root = write(tmp_path / "root.pem", old_root)
    chain = write(tmp_path / "old-int.pem", old_intermediate)
    leaf = write(tmp_path / "old-leaf.pem", old_leaf)
    crl_file = tmp_path / "old.crl"
    crl_file.write_bytes(old_crl.public_bytes(serialization.Encoding.PEM))
    result = openssl_verify(root, chain, leaf, crl=crl_file)
    assert result.returncode != 0 and "error 23" in result.stdout + result.stderr, result  # certificate revoked
    assert openssl_verify(root, chain, leaf).returncode == 0  # still a good chain: only the CRL says no
    new = write(tmp_path / "new-leaf.pem", new_leaf)
    new_crl_file = tmp_path / "new.crl"
    new_crl_file.write_bytes(new_crl.public_bytes(serialization.Encoding.PEM))
    assert openssl_verify(root, write(tmp_path / "new-int.pem", new_intermediate), new,
                          crl=new_crl_file).returncode == 0

    assert pkilint_cert(tmp_path / "new-int.pem") == []
    assert pkilint_cert(new) == []
    assert pkilint_crl(crl_file) == [] and pkilint_crl(new_crl_file) == []


def test_a_new_root_its_cross_certificate_and_what_it_issues_pass_the_linters(tmp_path: Path) -> None:
    home = build_home(tmp_path / "home")
    old_root = home.root_certificate()
    store = home.open_store()
    try:
        cas = rotation.rotate_root(home, store, root_password=ROOT_PASSWORD, password=CA_PASSWORD, key_type=None,
                                   intermediate_key_type=None, now=utc_now(), activate_after=NOW_ACTIVE)
    finally:
        store.close()
    new_root = cas.roots[-1]
    assert new_root.cross is not None and home.root_certificate() == new_root.cert
    leaf = issue(home, "ledger")
    authority = home.authority(CA_PASSWORD)
    try:
        crl = x509.load_der_x509_crl(authority.crl().der)
        chain = authority.ca.chain
    finally:
        authority.store.close()
    files = {name: write(tmp_path / f"{name}.pem", cert) for name, cert in
             (("new-root", new_root.cert), ("cross", new_root.cross), ("int", home.intermediate_certificate()),
              ("leaf", leaf), ("old-root", old_root))}
    for name in ("new-root", "cross", "int", "leaf"):
        assert pkilint_cert(files[name]) == [], name
    crl_file = tmp_path / "crl.pem"
    crl_file.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    assert pkilint_crl(crl_file) == []
    # The chain handed out carries the cross-certificate: a verifier that trusts only the old
    # root reaches it through the cross-certificate, one that trusts the new root directly.
    assert chain[-1] == new_root.cross
    untrusted = write(tmp_path / "untrusted.pem", home.intermediate_certificate(), new_root.cross)
    assert openssl_verify(files["old-root"], untrusted, files["leaf"]).returncode == 0
    assert openssl_verify(files["new-root"], files["int"], files["leaf"], crl=crl_file).returncode == 0
    assert openssl_verify(files["old-root"], files["int"], files["leaf"]).returncode != 0  # not without it


def test_rotation_with_a_wrong_root_password_changes_nothing(tmp_path: Path) -> None:
    home = build_home(tmp_path / "home")
    before = {p: p.read_bytes() for p in sorted(home.ca_dir.rglob("*")) if p.is_file()}
    for command in ("rotate-intermediate", "rotate-root"):
        done = pki_admin(home, "ca", command, root_password="not the root password")
        assert done.returncode == 1, done
        assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
        assert "wrong password for the root CA key" in done.stderr
    done = pki_admin(home, "ca", "rotate-intermediate", "--activate-after", "-1")
    assert done.returncode == 1 and "--activate-after must be 0 or more" in done.stderr, done
    after = {p: p.read_bytes() for p in sorted(home.ca_dir.rglob("*")) if p.is_file()}
    assert after == before
    store = home.open_store()
    try:
        assert store.shared_state(SHARED_NAME) is None
    finally:
        store.close()


def test_retire_root_is_refused_while_services_are_only_under_the_old_root(tmp_path: Path) -> None:
    home = build_home(tmp_path / "home")
    issue(home, "laggard")
    done = pki_admin(home, "ca", "retire-root")
    assert done.returncode == 1 and "no root to retire" in done.stderr, done
    done = pki_admin(home, "ca", "rotate-root", "--activate-after", "0")
    assert done.returncode == 0, done.stderr
    status = pki_admin(home, "ca", "status")
    assert "only under the root to retire" in status.stdout, status.stdout
    done = pki_admin(home, "ca", "retire-root")
    # The laggard, and the server's own certificate (renewed by a running server, none here).
    assert done.returncode == 1, done
    assert "refusing to retire the old root: 2 service(s)" in done.stderr, done.stderr
    issue(home, "laggard")  # renewed under the new root: one left
    done = pki_admin(home, "ca", "retire-root")
    assert done.returncode == 1 and ": 1 service(s)" in done.stderr, done.stderr
    done = pki_admin(home, "ca", "retire-root", "--force")
    assert done.returncode == 0, done.stderr
    assert "forced: the current certificates of 1 service(s)" in done.stdout


def test_a_rotation_killed_at_random_points_leaves_a_home_that_serves(tmp_path: Path) -> None:
    """SIGKILL ``ca rotate-intermediate`` / ``rotate-root`` after random delays, again and
    again: each time the home has one current issuer whose certificate and key match and chain
    to the root file; at the end a server starts on it and issues."""
    home = build_home(tmp_path / "home")
    rng = random.Random(13)
    env = {**env_without_secrets(), "VCC_PKI_CA_PASSWORD": CA_PASSWORD, "VCC_PKI_ROOT_PASSWORD": ROOT_PASSWORD}
    outcomes = []
    for attempt in range(12):
        command = "rotate-root" if attempt % 3 == 2 else "rotate-intermediate"
        proc = subprocess.Popen([str(BIN / "pki-admin"), "--home", str(home.root), "ca", command,
                                 "--activate-after", "0"], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.1, 0.4))  # the command takes about 0.35 s here, Python's start included
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        outcomes.append(proc.returncode)
        check_consistent(home)
    assert -signal.SIGKILL in outcomes  # some were cut short
    server = RunningServer(home, CA_PASSWORD).start()
    try:
        leaf = issue(home, "after-crash")
        root = write(tmp_path / "r.pem", home.root_certificate())
        inter = write(tmp_path / "i.pem", home.intermediate_certificate())
        assert openssl_verify(root, inter, write(tmp_path / "l.pem", leaf)).returncode == 0
    finally:
        server.stop()


def check_consistent(home: Home) -> None:
    authority = home.authority(CA_PASSWORD)  # loading the CAs completes a rotation cut short
    try:
        ca = authority.ca
        assert ca.certificate == home.intermediate_certificate()
        assert ca.root == home.root_certificate()
        key = serialization.load_pem_private_key(home.intermediate_key.read_bytes(), CA_PASSWORD.encode())
        assert key.public_key() == ca.certificate.public_key()
        ca.certificate.verify_directly_issued_by(ca.root)
    finally:
        authority.store.close()
