"""pki-admin, run in-process through ``main()`` (and twice as the installed console script)."""

from __future__ import annotations

import io
import json
import re
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from support import BIN, env_without_secrets, make_csr, openssl_verify, pkilint_cert, pkilint_crl
from vcc_pki_server import cli, passwords
from vcc_pki_server.authority import Actor, Authority
from vcc_pki_server.errors import NotAuthenticated
from vcc_pki_server.home import Home
from vcc_pki_server.store import CertificateQuery

ROOT_PW = "root secret with spaces"
CA_PW = "intermediate-secret-42"
EC_KEYS = ("--root-key-type", "ec-p384", "--intermediate-key-type", "ec-p256")
QUICK_START_SANS = ("--san-dns", "veritas-backend", "localhost", "--san-ip", "127.0.0.1", "192.168.178.94")


class Result(NamedTuple):
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


Run = Callable[..., Result]


@pytest.fixture(autouse=True)
def no_password_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their password source; nothing leaks in from the caller's environment."""
    for name in ("VCC_PKI_HOME", "VCC_PKI_ROOT_PASSWORD", "VCC_PKI_CA_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    def call(*argv: str) -> Result:
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return call


@pytest.fixture
def env_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VCC_PKI_ROOT_PASSWORD", ROOT_PW)
    monkeypatch.setenv("VCC_PKI_CA_PASSWORD", CA_PW)


def password_files(folder: Path) -> tuple[Path, Path]:
    """Password files as editors write them: with a trailing newline."""
    root, ca = folder / "root.pw", folder / "ca.pw"
    root.write_text(ROOT_PW + "\n")
    ca.write_text(CA_PW + "\r\n")
    return root, ca


@pytest.fixture
def home(tmp_path: Path, run: Run, env_passwords: None) -> Path:
    """A freshly initialised EC home; passwords in the environment."""
    path = tmp_path / "home"
    assert run("--home", str(path), "init", *EC_KEYS).code == 0
    return path


def authority(path: Path) -> Authority:
    return Home(path).authority(None)


def snapshot(path: Path) -> dict[str, Any]:
    """What a failed command must leave unchanged: store rows and the file tree."""
    auth = authority(path)
    try:
        store = auth.store
        state: dict[str, Any] = {
            "audit": len(store.audit_log(limit=100_000)),
            "certs": [(r.serial, r.revoked_at) for r in
                      store.list_certificates(CertificateQuery(now=auth.clock(), limit=100_000))],
            "services": list(store.list_services(limit=1000)),
            "tokens": store.list_tokens(),
            "crl": store.latest_crl_number(),
        }
    finally:
        auth.store.close()
    state["files"] = sorted(str(p.relative_to(path)) for p in path.rglob("*"))
    return state


def files_with_stamps(path: Path) -> dict[str, tuple[bytes, int, int]]:
    return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode)
            for p in path.rglob("*") if p.is_file()}


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.code == 1, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("pki-admin: error: "), result.err
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in lines[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- the prototype's Quick Start ---------------------------------------------------------------
def test_quick_start_flow_is_judged_valid_by_openssl_and_pkilint(tmp_path: Path, run: Run) -> None:
    h = tmp_path / "pki-data"
    root_pw, ca_pw = password_files(tmp_path)
    g = ("--home", str(h))
    r = run(*g, "ca", "init-root", "--key-type", "ec-p384", "--root-password-file", str(root_pw))
    assert r.code == 0, r.err
    assert "generating EC P-384 root key" in r.err
    r = run(*g, "ca", "create-intermediate", "--key-type", "rsa-2048", "--root-password-file",
            str(root_pw), "--password-file", str(ca_pw), "--json")
    assert r.code == 0, r.err
    assert r.json()["key"] == "RSA-2048"

    pw = ("--password-file", str(ca_pw))
    r = run(*g, "--json", "cert", "issue", "--service-id", "veritas-backend", "--cn", "veritas-backend",
            *QUICK_START_SANS, *pw)
    assert r.code == 0, r.err
    issued = r.json()
    serial = issued["serial_number"]
    assert re.fullmatch(r"[0-9a-f]{16,40}", serial)
    assert issued["san_dns"] == ["veritas-backend", "localhost"]
    assert issued["san_ip"] == ["127.0.0.1", "192.168.178.94"]
    assert issued["status"] == "valid" and issued["not_after"].endswith("Z")

    folder = h / "service_certificates" / "veritas-backend"
    assert mode(folder / "key.pem") == 0o400
    assert mode(folder) == mode(h / "service_certificates") == mode(h / "ca") == mode(h) == 0o700
    assert mode(h / "ca" / "root_ca_key.pem") == mode(h / "ca" / "intermediate_ca_key.pem") == 0o400
    chain = x509.load_pem_x509_certificates((folder / "ca_chain.pem").read_bytes())
    assert [c.subject.rfc4514_string() for c in chain] == ["CN=VCC Intermediate CA,O=VCC",
                                                           "CN=VCC Root CA,O=VCC"]
    ca_dir = h / "ca"
    ok = openssl_verify(ca_dir / "root_ca.pem", ca_dir / "intermediate_ca.pem", folder / "cert.pem")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert pkilint_cert(folder / "cert.pem") == []
    first_cert = tmp_path / "first.pem"
    first_cert.write_bytes((folder / "cert.pem").read_bytes())

    listed = run(*g, "cert", "list", "--json", "--service-id", "veritas-backend").json()
    assert [c["serial_number"] for c in listed] == [serial]
    info = run(*g, "cert", "info", "--service-id", "veritas-backend", "--json").json()
    assert info["serial_number"] == serial and info["key"] == "RSA-2048"

    r = run(*g, "cert", "renew", "--service-id", "veritas-backend", *pw, "--json")
    assert r.code == 0, r.err
    renewed = r.json()
    assert renewed["serial_number"] != serial and renewed["san_dns"] == issued["san_dns"]
    new_cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
    assert format(new_cert.serial_number, "x") == renewed["serial_number"]
    key = serialization.load_pem_private_key((folder / "key.pem").read_bytes(), None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert (key.public_key().public_bytes(serialization.Encoding.DER, spki)
            == new_cert.public_key().public_bytes(serialization.Encoding.DER, spki))

    r = run(*g, "cert", "revoke", "--service-id", "veritas-backend", "--reason", "keyCompromise", *pw,
            "--json")
    assert r.code == 0, r.err
    revoked = r.json()
    assert revoked["serial_number"] == renewed["serial_number"]
    assert revoked["status"] == "revoked" and revoked["revocation_reason"] == "keyCompromise"

    auth = authority(h)
    stored = auth.store.latest_crl()
    auth.store.close()
    assert stored is not None and stored.number == revoked["crl_number"]
    crl_file = tmp_path / "store-crl.der"
    crl_file.write_bytes(stored.der)
    bad = openssl_verify(ca_dir / "root_ca.pem", ca_dir / "intermediate_ca.pem", folder / "cert.pem",
                         crl=crl_file)
    assert bad.returncode == 2 and "certificate revoked" in bad.stdout + bad.stderr
    # `cert renew` kept the key: keyCompromise revoked the first certificate of that key too.
    assert revoked["revoked_serials"] == [renewed["serial_number"], serial]
    also = openssl_verify(ca_dir / "root_ca.pem", ca_dir / "intermediate_ca.pem", first_cert, crl=crl_file)
    assert also.returncode == 2 and "certificate revoked" in also.stdout + also.stderr

    r = run(*g, "crl", "generate", "--out", str(tmp_path / "crl.pem"), *pw, "--json")
    assert r.code == 0, r.err
    assert r.json()["entries"] == 2 and r.json()["number"] == revoked["crl_number"] + 1
    assert pkilint_crl(tmp_path / "crl.pem") == []
    bad = openssl_verify(ca_dir / "root_ca.pem", ca_dir / "intermediate_ca.pem", folder / "cert.pem",
                         crl=tmp_path / "crl.pem")
    assert "certificate revoked" in bad.stdout + bad.stderr
    crls = run(*g, "crl", "list", "--json").json()
    assert [c["number"] for c in crls] == sorted((c["number"] for c in crls), reverse=True)

    statuses = {c["serial_number"]: c["status"] for c in run(*g, "cert", "list", "--json").json()}
    assert statuses == {serial: "revoked", renewed["serial_number"]: "revoked"}
    assert {c["serial_number"] for c in run(*g, "cert", "list", "--status", "revoked", "--json").json()} \
        == {renewed["serial_number"], serial}
    assert run(*g, "cert", "list", "--expiring-within-days", "30", "--json").json() == []
    human = run(*g, "cert", "list")
    assert serial in human.out and "SERIAL" in human.out and "revoked" in human.out


# -- init ----------------------------------------------------------------------------------------
def test_init_twice_fails_the_second_time_and_changes_nothing(home: Path, run: Run) -> None:
    before = files_with_stamps(home)
    assert {"config.toml", "pki.db", "ca/root_ca_key.pem", "server/key.pem", "server/cert.pem"} <= set(before)
    assert_one_line_error(run("--home", str(home), "init", *EC_KEYS), "already has a CA")
    assert_one_line_error(run("--home", str(home), "ca", "init-root"), "already has a root CA")
    assert files_with_stamps(home) == before
    assert [p.name for p in home.parent.iterdir() if p.name.startswith(".")] == []


def test_init_default_keys_names_server_and_public_url(tmp_path: Path, run: Run, env_passwords: None) -> None:
    h = tmp_path / "h"
    r = run("init", "--home", str(h), "--json", "--public-url", "https://10.1.2.3:8443/",
            "--server-san-dns", "pki.internal", "pki2.internal", "--server-san-dns", "pki3.internal",
            "--server-san-ip", "10.1.2.3")
    assert r.code == 0, r.err
    out = r.json()
    assert (out["root"]["key"], out["intermediate"]["key"]) == ("RSA-4096", "RSA-2048")
    assert "generating RSA-4096 root key..." in r.err
    assert out["server_certificate"]["san_dns"] == ["localhost", "pki.internal", "pki2.internal",
                                                    "pki3.internal"]
    assert out["server_certificate"]["san_ip"] == ["127.0.0.1", "10.1.2.3"]
    assert 'public_url = "https://10.1.2.3:8443"' in (h / "config.toml").read_text()
    server = x509.load_pem_x509_certificates((h / "server" / "cert.pem").read_bytes())
    assert mode(h / "server" / "key.pem") == 0o400
    dp = server[0].extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    intermediate = x509.load_pem_x509_certificate((h / "ca" / "intermediate_ca.pem").read_bytes())
    ski = intermediate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
    assert [n.value for n in dp[0].full_name or []] == [f"https://10.1.2.3:8443/api/v1/crl/{ski}"]
    assert out["crl"]["number"] == 1


def test_init_failing_midway_leaves_no_half_written_home(
    tmp_path: Path, run: Run, env_passwords: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Home, "issue_server_certificate", broken)
    existing = tmp_path / "existing"
    existing.mkdir()
    for target in (tmp_path / "new", existing):
        result = run("--home", str(target), "init", *EC_KEYS)
        assert result.code == 1 and "Traceback" not in result.err
        assert result.err.splitlines()[-1] == "pki-admin: error: disk full"  # after the progress lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert list(existing.iterdir()) == []


def test_init_into_an_existing_empty_folder(tmp_path: Path, run: Run, env_passwords: None) -> None:
    h = tmp_path / "empty"
    h.mkdir(mode=0o755)
    assert run("--home", str(h), "init", *EC_KEYS).code == 0
    assert mode(h) == 0o700 and (h / "ca" / "intermediate_ca.pem").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# -- bad input: exit 1, one line, nothing changed -----------------------------------------------
@pytest.fixture(scope="module")
def shared_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One home with veritas-backend issued twice, the newer certificate revoked."""
    base = tmp_path_factory.mktemp("bad-input")
    root_pw, ca_pw = password_files(base)
    wrong = base / "wrong.pw"
    wrong.write_text("not the password\n")
    h = base / "home"
    pw = ("--password-file", str(ca_pw))
    g = ("--home", str(h))
    assert cli.main([*g, "init", *EC_KEYS, "--root-password-file", str(root_pw), *pw]) == 0
    assert cli.main([*g, "cert", "issue", "--service-id", "veritas-backend", "--cn", "veritas-backend",
                     "--key-type", "ec-p256", *QUICK_START_SANS, *pw]) == 0
    assert cli.main([*g, "cert", "renew", "--service-id", "veritas-backend", *pw]) == 0
    assert cli.main([*g, "cert", "revoke", "--service-id", "veritas-backend", "--reason", "superseded",
                     *pw]) == 0
    auth = authority(h)
    revoked = auth.store.list_certificates(CertificateQuery(now=auth.clock(), status="revoked"))
    auth.store.close()
    yield {"home": str(h), "ca": str(ca_pw), "wrong": str(wrong), "revoked": revoked[0].serial}


ISSUE = ("cert", "issue", "--password-file", "{ca}", "--cn")
BAD_INPUT = {
    "wrong CA password (issue)": ("cert", "issue", "--service-id", "new-svc", "--cn", "new-svc",
                                  "--password-file", "{wrong}"),
    "wrong CA password (revoke)": ("cert", "revoke", "--service-id", "veritas-backend", "--reason",
                                   "keyCompromise", "--password-file", "{wrong}"),
    "wrong CA password (crl)": ("crl", "generate", "--password-file", "{wrong}"),
    "unknown service (info)": ("cert", "info", "--service-id", "nope"),
    "unknown service (renew)": ("cert", "renew", "--service-id", "nope", "--password-file", "{ca}"),
    "unknown service (revoke)": ("cert", "revoke", "--service-id", "nope", "--reason", "superseded",
                                 "--password-file", "{ca}"),
    "unknown service (service info)": ("service", "info", "--service-id", "nope"),
    "existing service id": ("service", "register", "--service-id", "veritas-backend", "--name", "Again"),
    "path traversal id (issue)": (*ISSUE, "x", "--service-id", "../../etc"),
    "path traversal id (register)": ("service", "register", "--service-id", "../../etc", "--name", "x"),
    "already revoked": ("cert", "revoke", "--service-id", "veritas-backend", "--serial", "{revoked}",
                        "--reason", "keyCompromise", "--password-file", "{ca}"),
    "bad_name SAN": (*ISSUE, "new-svc", "--service-id", "new-svc", "--san-dns", "bad_name"),
    "wildcard SAN": (*ISSUE, "new-svc", "--service-id", "new-svc", "--san-dns", "*.example.com"),
    "bad IP SAN": (*ISSUE, "new-svc", "--service-id", "new-svc", "--san-ip", "999.1.1.1"),
    "bad SAN (register)": ("service", "register", "--service-id", "new-svc", "--name", "x",
                           "--san-dns", "bad_name"),
    "SAN outside the allow-list": (*ISSUE, "veritas-backend", "--service-id", "veritas-backend",
                                   "--san-dns", "evil.example.com"),
    "validity beyond the maximum": (*ISSUE, "new-svc", "--service-id", "new-svc", "--validity-days", "4000"),
    "unknown revocation reason": ("cert", "revoke", "--service-id", "veritas-backend", "--reason", "stolen",
                                  "--password-file", "{ca}"),
    "unknown token": ("token", "revoke", "0123456789ab"),
    "missing password file": ("crl", "generate", "--password-file", "{ca}.missing"),
}


@pytest.mark.parametrize("argv", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_exits_1_with_one_line_and_changes_nothing(
    shared_home: dict[str, str], run: Run, argv: tuple[str, ...]
) -> None:
    h = Path(shared_home["home"])
    before = snapshot(h)
    result = run("--home", str(h), *(a.format(**shared_home) for a in argv))
    assert_one_line_error(result)
    assert result.out == ""
    assert snapshot(h) == before
    assert not (h.parent.parent / "etc").exists()


def test_errors_name_the_problem(shared_home: dict[str, str], run: Run) -> None:
    g = ("--home", shared_home["home"])
    assert_one_line_error(run(*g, "crl", "generate", "--password-file", shared_home["wrong"]),
                          "wrong password for the intermediate CA key")
    assert_one_line_error(run(*g, "cert", "info", "--service-id", "nope"), "unknown service 'nope'")
    assert_one_line_error(run(*g, "cert", "issue", "--service-id", "x", "--cn", "x", "--san-dns", "*.a.b",
                              "--password-file", shared_home["ca"]), "wildcard")
    assert_one_line_error(run(*g, "cert", "revoke", "--service-id", "veritas-backend", "--reason", "stolen"),
                          "unknown revocation reason 'stolen'", "keyCompromise")
    assert_one_line_error(run(*g, "cert", "revoke", "--service-id", "veritas-backend", "--serial",
                              shared_home["revoked"], "--reason", "superseded",
                              "--password-file", shared_home["ca"]), "already revoked")
    assert_one_line_error(run("--home", str(Path(shared_home["home"]) / "missing"), "cert", "list"),
                          "no CA home")


def test_missing_password_without_a_terminal_is_one_line(
    shared_home: dict[str, str], run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    h = Path(shared_home["home"])
    before = snapshot(h)
    result = run("--home", str(h), "cert", "issue", "--service-id", "new-svc", "--cn", "new-svc")
    assert_one_line_error(result, "--password-file", "$VCC_PKI_CA_PASSWORD", "no terminal")
    assert snapshot(h) == before
    assert_one_line_error(run("--home", str(tmp_path / "fresh"), "init"), "$VCC_PKI_ROOT_PASSWORD")
    assert not (tmp_path / "fresh").exists()


def test_usage_errors_exit_2(run: Run, tmp_path: Path) -> None:
    for argv in (["cert", "issue"], ["bogus"], ["cert", "list", "--status", "weird"], [],
                 ["ca", "init-root", "--key-type", "dsa-1024"], ["cert"]):
        result = run("--home", str(tmp_path), *argv)
        assert result.code == 2, argv
        assert "usage: pki-admin" in result.err and "Traceback" not in result.err
    assert run("--help").code == 0


# -- options -------------------------------------------------------------------------------------
def test_global_options_work_before_and_after_the_subcommand(
    home: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    forms = [
        ("--home", str(home), "--json", "cert", "list"),
        ("cert", "list", "--home", str(home), "--json"),
        ("--json", "cert", "--home", str(home), "list"),
        ("--home", "/nonexistent", "cert", "list", "--home", str(home), "--json"),
    ]
    outputs = [run(*form) for form in forms]
    assert all(r.code == 0 for r in outputs), [r.err for r in outputs]
    assert len({r.out for r in outputs}) == 1
    assert [c["service_id"] for c in outputs[0].json()] == ["pki-server"]
    monkeypatch.setenv("VCC_PKI_HOME", str(home))
    assert run("ca", "info", "--json").json()["home"] == str(home)


def test_san_options_take_several_values_and_repeat(home: Path, run: Run) -> None:
    args = cli.build_parser().parse_args(["cert", "issue", "--service-id", "a", "--cn", "a",
                                          "--san-dns", "a", "b", "--san-dns", "c", "--san-ip", "10.0.0.1"])
    assert args.san_dns == ["a", "b", "c"] and args.san_ip == ["10.0.0.1"]
    r = run("--home", str(home), "cert", "issue", "--service-id", "abc", "--cn", "a", "--key-type", "ec-p256",
            "--san-dns", "a", "b", "--san-dns", "c", "--json")
    assert r.code == 0, r.err
    assert r.json()["san_dns"] == ["a", "b", "c"]


# -- tokens and registration ---------------------------------------------------------------------
def test_token_create_prints_once_list_hides_it_revoke_works(home: Path, run: Run) -> None:
    g = ("--home", str(home))
    r = run(*g, "token", "create", "--name", "ops")
    assert r.code == 0
    value = r.out.strip()
    assert re.fullmatch(r"vcc_adm_[0-9a-f]{12}_[0-9a-f]{64}", value) and value not in r.err
    as_json = run(*g, "token", "create", "--name", "ci", "--expires-days", "30", "--json").json()
    assert as_json["token"].startswith("vcc_adm_") and as_json["expires_at"].endswith("Z")
    auth = authority(home)
    try:
        assert auth.authenticate_token(value).kind == "admin"
        listed = run(*g, "token", "list", "--json")
        assert value not in listed.out and as_json["token"] not in listed.out
        assert value.rsplit("_", 1)[1] not in listed.out and "secret" not in listed.out
        items = listed.json()
        assert {t["name"] for t in items} == {"ops", "ci"}
        assert all(t["kind"] == "admin" and t["status"] == "active" for t in items)
        token_id = value.split("_")[2]
        human = run(*g, "token", "list")
        assert token_id in human.out and value not in human.out

        assert run(*g, "token", "revoke", token_id).code == 0
        with pytest.raises(NotAuthenticated):
            auth.authenticate_token(value)
        statuses = {t["token_id"]: t["status"] for t in run(*g, "token", "list", "--json").json()}
        assert statuses[token_id] == "revoked"
        assert_one_line_error(run(*g, "token", "revoke", token_id), "already revoked")
    finally:
        auth.store.close()


def test_service_register_prints_an_enrolment_token_the_authority_accepts(home: Path, run: Run) -> None:
    g = ("--home", str(home))
    r = run(*g, "service", "register", "--service-id", "billing", "--name", "Billing",
            "--san-dns", "billing", "billing.internal", "--san-ip", "10.0.0.7",
            "--endpoint", "https://billing:9443", "--health-check-url", "https://billing:9443/health",
            "--owner", "team-a", "--version", "1.2")
    assert r.code == 0, r.err
    tokens = re.findall(r"vcc_enr_\S+", r.out)
    assert len(tokens) == 1
    auth = authority(home)
    try:
        actor = auth.authenticate_token(tokens[0])
    finally:
        auth.store.close()
    assert (actor.kind, actor.service_id) == ("enrolment", "billing")
    info = run(*g, "service", "info", "--service-id", "billing", "--json").json()
    assert info["san_dns"] == ["billing", "billing.internal"] and info["san_ip"] == ["10.0.0.7"]
    assert info["endpoints"] == ["https://billing:9443"] and info["owner"] == "team-a"
    assert info["health"]["status"] == "unknown" and info["certificates"] == []
    assert "enrolment_token" not in info
    listed = {s["service_id"]: s for s in run(*g, "service", "list", "--json").json()}
    assert listed["billing"]["current_certificate"] is None
    assert listed["pki-server"]["current_certificate"]["not_after"].endswith("Z")
    human = run(*g, "service", "list")
    assert "HEALTH" in human.out and "CERT EXPIRES" in human.out and "unknown" in human.out
    registered = run(*g, "service", "register", "--service-id", "inventory", "--name", "Inv", "--json").json()
    assert registered["enrolment_token"].startswith("vcc_enr_") and registered["san_dns"] == ["inventory"]


def test_service_info_shows_certificate_history(home: Path, run: Run) -> None:
    g = ("--home", str(home))
    first = run(*g, "cert", "issue", "--service-id", "svc", "--cn", "svc", "--key-type", "ec-p256",
                "--json").json()
    second = run(*g, "cert", "renew", "--service-id", "svc", "--json").json()
    assert run(*g, "cert", "revoke", "--service-id", "svc", "--serial", first["serial_number"],
               "--reason", "superseded").code == 0
    info = run(*g, "service", "info", "--service-id", "svc", "--json").json()
    history = [(c["serial_number"], c["status"]) for c in info["certificates"]]
    assert history == [(second["serial_number"], "valid"), (first["serial_number"], "revoked")]
    assert info["current_certificate"]["serial_number"] == second["serial_number"]
    human = run(*g, "service", "info", "--service-id", "svc").out
    assert first["serial_number"] in human and "superseded" in human and "NOT AFTER" in human


def test_renew_leaves_files_alone_when_the_key_on_disk_is_not_the_certificates(home: Path, run: Run) -> None:
    g = ("--home", str(home))
    assert run(*g, "cert", "issue", "--service-id", "svc", "--cn", "svc", "--key-type", "ec-p256").code == 0
    folder = home / "service_certificates" / "svc"
    before = files_with_stamps(folder)
    auth = Home(home).authority(CA_PW)
    try:  # the service rekeys through the API: the CA now holds a cert for another key
        csr, _ = make_csr("svc", dns=["svc"])
        auth.renew("svc", actor=Actor.operator(), csr_pem=csr)
    finally:
        auth.store.close()
    r = run(*g, "cert", "renew", "--service-id", "svc")
    assert r.code == 0 and "does not belong to the renewed certificate" in r.err
    assert files_with_stamps(folder) == before


# -- passwords -------------------------------------------------------------------------------------
def test_password_file_strips_one_trailing_newline(tmp_path: Path) -> None:
    cases = {"pw\n": "pw", "pw\r\n": "pw", "pw\n\n": "pw\n", "pw": "pw", " pw \n": " pw "}
    for content, expected in cases.items():
        (tmp_path / "f").write_bytes(content.encode())
        assert passwords.read_password_file(str(tmp_path / "f")) == expected
    (tmp_path / "f").write_text("\n")
    with pytest.raises(passwords.PasswordError, match="empty"):
        passwords.read_password_file(str(tmp_path / "f"))


def test_password_sources_in_order_and_unsafe_flag_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "f").write_text("from-file\n")
    env = {"VCC_PKI_CA_PASSWORD": "from-env"}
    never: Callable[[], bool] = lambda: False  # noqa: E731
    assert passwords.resolve(passwords.CA, file=str(tmp_path / "f"), value="flag", environ=env) == "from-file"
    assert passwords.resolve(passwords.CA, file=None, value=None, environ=env) == "from-env"
    assert capsys.readouterr().err == ""
    assert passwords.resolve(passwords.CA, file=None, value="from-flag", environ=env) == "from-flag"
    assert "--password is unsafe" in capsys.readouterr().err
    with pytest.raises(passwords.PasswordError, match="no terminal"):
        passwords.resolve(passwords.ROOT, file=None, environ={}, is_terminal=never)
    asked: list[str] = []

    def ask(prompt: str) -> str:
        asked.append(prompt)
        return "typed"

    always: Callable[[], bool] = lambda: True  # noqa: E731
    assert passwords.resolve(passwords.CA, file=None, environ={}, ask=ask, is_terminal=always) == "typed"
    assert len(asked) == 1
    assert passwords.resolve(passwords.CA, file=None, environ={}, ask=ask, is_terminal=always,
                             confirm=True) == "typed"
    assert len(asked) == 3


def test_prompt_asks_twice_for_a_new_key_and_refuses_a_mismatch(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = iter(["first", "second", "same", "same"])
    monkeypatch.setattr(passwords, "stdin_is_terminal", lambda: True)
    monkeypatch.setattr("getpass.getpass", lambda prompt, stream=None: next(answers))
    h = tmp_path / "h"
    assert_one_line_error(run("--home", str(h), "ca", "init-root", "--key-type", "ec-p384"), "do not match")
    assert not Home(h).has_root()
    r = run("--home", str(h), "ca", "init-root", "--key-type", "ec-p384")
    assert r.code == 0, r.err
    key = serialization.load_pem_private_key((h / "ca" / "root_ca_key.pem").read_bytes(), b"same")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert "same" not in r.out + r.err


def test_unsafe_password_flags_work_with_a_warning(tmp_path: Path, run: Run) -> None:
    g = ("--home", str(tmp_path / "h"))
    r = run(*g, "ca", "init-root", "--key-type", "ec-p384", "--root-password", "root-pw-xyz")
    assert r.code == 0 and "--root-password is unsafe" in r.err
    intermediate = (*g, "ca", "create-intermediate", "--key-type", "ec-p256")
    r = run(*intermediate, "--root-password", "wrong", "--ca-password", "ca-pw-xyz")
    assert r.code == 1 and "wrong password for the root CA key" in r.err
    assert not Home(tmp_path / "h").has_intermediate()
    r = run(*intermediate, "--root-password", "root-pw-xyz", "--password", "ca-pw-xyz")
    assert r.code == 0, r.err
    assert "root-pw-xyz" not in r.out + r.err and "ca-pw-xyz" not in r.out
    info = run(*g, "ca", "info", "--json").json()
    assert info["intermediate"]["key"] == "EC P-256" and info["root"]["key"] == "EC P-384"


# -- audit -------------------------------------------------------------------------------------------
def test_audit_log_records_each_action_and_no_secret(home: Path, run: Run) -> None:
    g = ("--home", str(home))
    outputs = [
        run(*g, "cert", "issue", "--service-id", "svc", "--cn", "svc", "--key-type", "ec-p256"),
        run(*g, "cert", "renew", "--service-id", "svc"),
        run(*g, "cert", "revoke", "--service-id", "svc", "--reason", "keyCompromise"),
        run(*g, "crl", "generate"),
        run(*g, "service", "register", "--service-id", "other", "--name", "Other"),
        run(*g, "token", "create", "--name", "ops"),
    ]
    assert all(r.code == 0 for r in outputs), [r.err for r in outputs]
    admin_token = outputs[-1].out.strip()
    assert run(*g, "token", "revoke", admin_token.split("_")[2]).code == 0
    enrolment_token = re.findall(r"vcc_enr_\S+", outputs[4].out)[0]

    auth = authority(home)
    entries = auth.store.audit_log(limit=1000)
    auth.store.close()
    actions = {e.action for e in entries}
    assert {"ca.init-root", "ca.create-intermediate", "service.register", "certificate.issue",
            "certificate.revoke", "crl.generate", "token.create.admin", "token.revoke.admin",
            "token.create.enrolment"} <= actions
    assert {e.actor for e in entries if e.action.startswith("certificate.")} == {"cli"}
    secrets = [ROOT_PW, CA_PW, admin_token, enrolment_token, admin_token.rsplit("_", 1)[1]]
    text = repr(entries)
    database = b"".join(p.read_bytes() for p in home.glob("pki.db*"))
    for secret in secrets:
        assert secret not in text
        assert secret.encode() not in database
    for r in outputs:
        assert ROOT_PW not in r.out + r.err and CA_PW not in r.out + r.err


# -- the console script ------------------------------------------------------------------------------
def test_console_script_exit_codes_and_no_traceback(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "pki-admin"
    env = {**env_without_secrets(), "VCC_PKI_HOME": str(tmp_path / "h"),
           "VCC_PKI_ROOT_PASSWORD": ROOT_PW, "VCC_PKI_CA_PASSWORD": CA_PW}

    def sh(*argv: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(exe), *argv], capture_output=True, text=True, check=False,
                              env=extra or env, stdin=subprocess.DEVNULL, timeout=60)

    ok = sh("init", *EC_KEYS, "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["root"]["key"] == "EC P-384"
    unknown = sh("cert", "info", "--service-id", "nope")
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.strip() == "pki-admin: error: unknown service 'nope'"
    no_pw = {k: v for k, v in env.items() if k != "VCC_PKI_CA_PASSWORD"}
    locked = sh("cert", "issue", "--service-id", "svc", "--cn", "svc", extra=no_pw)
    assert locked.returncode == 1 and len(locked.stderr.strip().splitlines()) == 1
    assert "Traceback" not in locked.stderr
    assert not (tmp_path / "h" / "service_certificates" / "svc").exists()
    usage = sh("cert", "issue", "--service-id")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr



def test_cert_issue_leaves_no_enrolment_token_and_service_token_makes_one(home: Path, run: Run) -> None:
    """SPEC §10: a service `cert issue` registers gets its certificate without a live enrolment
    token; `service token` prints a fresh one when one is wanted."""
    g = ("--home", str(home))
    assert run(*g, "cert", "issue", "--service-id", "legacy", "--cn", "legacy", "--key-type", "ec-p256").code == 0
    auth = authority(home)
    try:
        assert [t for t in auth.store.list_tokens("enrolment") if t.service_id in ("legacy", "pki-server")] == []
        r = run(*g, "service", "token", "--service-id", "legacy", "--json")
        assert r.code == 0, r.err
        value = r.json()["enrolment_token"]
        assert auth.authenticate_token(value).service_id == "legacy"
        human = run(*g, "service", "token", "--service-id", "legacy")
        assert human.code == 0 and "shown only once" in human.out
        missing = run(*g, "service", "token", "--service-id", "nope")
        assert missing.code == 1 and missing.err.count("\n") == 1 and "unknown service" in missing.err
    finally:
        auth.store.close()


def test_step_by_step_ca_commands_take_the_prototype_password_flags(tmp_path: Path, run: Run) -> None:
    g = ("--home", str(tmp_path / "steps"))
    assert run(*g, "ca", "init-root", "--key-type", "ec-p384", "--password", ROOT_PW).code == 0
    r = run(*g, "ca", "create-intermediate", "--key-type", "ec-p256", "--root-password", ROOT_PW,
            "--password", CA_PW)
    assert r.code == 0, r.err
    assert Home(tmp_path / "steps").load_ca(CA_PW) is not None


@pytest.mark.parametrize(("toml", "said"), [
    ('[policy]\nmax_validity_days = "x"\n', "max_validity_days must be a number from 1 to 36500, got 'x'"),
    ("[policy]\nmax_validity_days = -1\n", "max_validity_days must be a number"),
    ("[policy]\ncrl_validity_days = 0\n", "crl_validity_days must be a number from 1"),
    ("policy = 3\n", "[policy] must be a table"),
    ("[health]\ninterval_seconds = -1\n", "health_interval_seconds must be a number"),
    ("[policy]\nmax_validity_days = 100000000000000000000000\n", "max_validity_days must be a number"),
    ("public_url = [\n", "not valid TOML"),
])
def test_bad_config_values_are_one_line_errors_at_start(home: Path, run: Run, toml: str, said: str) -> None:
    """Issue 18: config.toml is checked when read, not at the first request that uses it."""
    (home / "config.toml").write_text(toml)
    r = run("--home", str(home), "service", "list")
    assert r.code == 1 and r.err.count("\n") == 1 and said in r.err, r.err
    proc = subprocess.run([str(BIN / "vcc-pki-server"), "--home", str(home), "--port", "1"],
                          env={**env_without_secrets(), "VCC_PKI_CA_PASSWORD": CA_PW}, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1 and said in proc.stderr and "Traceback" not in proc.stderr


def test_crl_generate_to_a_bad_path_publishes_nothing(home: Path, run: Run, tmp_path: Path) -> None:
    g = ("--home", str(home))
    before = [c["number"] for c in run(*g, "crl", "list", "--json").json()]
    r = run(*g, "crl", "generate", "--out", str(tmp_path / "no" / "such" / "crl.pem"))
    assert r.code == 1 and r.err.count("\n") == 1 and "cannot write the CRL" in r.err
    assert [c["number"] for c in run(*g, "crl", "list", "--json").json()] == before


def test_registry_fields_with_terminal_escapes_are_printed_escaped(home: Path, run: Run) -> None:
    g = ("--home", str(home))
    assert run(*g, "service", "register", "--service-id", "esc", "--name", "evil\x1b[2J\x1b]0;pwned\x07").code == 0
    out = run(*g, "service", "list").out + run(*g, "service", "info", "--service-id", "esc").out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b[2J" in out


@pytest.mark.parametrize("argv", [
    ("token", "create", "--expires-days", "99999999999"),
    ("cert", "list", "--expiring-within-days", "99999999999"),
    ("crl", "list", "--limit", "99999999999999999999"),
    ("cert", "issue", "--service-id", "huge", "--cn", "huge", "--validity-days", "99999999999"),
])
def test_huge_numbers_are_one_line_errors_and_change_nothing(home: Path, run: Run, argv: tuple[str, ...]) -> None:
    before = snapshot(home)
    r = run("--home", str(home), *argv)
    assert r.code == 1 and r.err.count("\n") == 1 and "Traceback" not in r.err, r.err
    assert snapshot(home) == before


def test_a_dev_homes_kept_passwords_are_found_and_named(home: Path, run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17: `vcc-pki-server --dev` keeps the passwords in <home>/secrets/; pki-admin finds
    them there (after a file or the environment) and says so, as the server does."""
    monkeypatch.delenv("VCC_PKI_ROOT_PASSWORD")
    monkeypatch.delenv("VCC_PKI_CA_PASSWORD")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # no prompt to fall back on
    assert run("--home", str(home), "service", "register", "--service-id", "billing", "--name", "B").code == 0
    (home / "secrets").mkdir(mode=0o700)
    (home / "secrets" / "ca_password").write_text(CA_PW)
    (home / "secrets" / "root_password").write_text(ROOT_PW)
    issued = run("--home", str(home), "cert", "issue", "--service-id", "billing", "--cn", "billing")
    assert issued.code == 0, issued.err
    assert f"using the intermediate CA password kept in {home / 'secrets' / 'ca_password'}" in issued.err
    root_crl = run("--home", str(home), "ca", "root-crl")
    assert root_crl.code == 0 and "using the root CA password kept in" in root_crl.err
    monkeypatch.setenv("VCC_PKI_CA_PASSWORD", "wrong")  # the environment comes first
    assert run("--home", str(home), "crl", "generate").code == 1


def test_audit_reads_the_log_newest_first_with_filters(home: Path, run: Run) -> None:
    """Issue 12: `pki-admin audit [--since] [--service-id] [--limit] [--json]`."""
    assert run("--home", str(home), "service", "register", "--service-id", "billing", "--name", "B").code == 0
    assert run("--home", str(home), "service", "token", "--service-id", "billing").code == 0
    listed = run("--home", str(home), "audit", "--service-id", "billing", "--json")
    assert listed.code == 0, listed.err
    entries = json.loads(listed.out)
    actions = [e["action"] for e in entries]
    assert actions[0] == "token.create.enrolment" and actions[-1] == "service.register"  # newest first
    assert all(e["actor"] == "cli" and e["service_id"] == "billing" for e in entries)
    table = run("--home", str(home), "audit", "--limit", "1")
    assert table.code == 0 and table.out.splitlines()[0].split()[:3] == ["AT", "ACTOR", "ACTION"]
    assert len(table.out.splitlines()) == 2
    assert json.loads(run("--home", str(home), "audit", "--since", "2999-01-01T00:00:00Z", "--json").out) == []
    assert len(json.loads(run("--home", str(home), "audit", "--since", "1h", "--json").out)) >= 2
    bad = run("--home", str(home), "audit", "--since", "yesterday")
    assert bad.code == 2 and "expected a time" in bad.err


# -- ca status ---------------------------------------------------------------------------------
def test_ca_status_counts_services_under_the_current_intermediate_and_with_old_urls(home: Path, run: Run) -> None:
    """SPEC §13: the figure an operator waits on before rotating (services renewed under the
    current intermediate) and the leaves that still carry the URLs of before per-issuer URLs."""
    g = ("--home", str(home))
    for sid in ("fresh", "renewed"):
        assert run(*g, "cert", "issue", "--service-id", sid, "--cn", sid, "--key-type", "ec-p256").code == 0
    assert run(*g, "service", "register", "--service-id", "waiting", "--name", "Waiting").code == 0
    # "old" got its certificate from a server before SPEC §13: the CDP of the time.
    h = Home(home)
    auth = h.authority(CA_PW)
    try:
        config = h.config()
        legacy_ca = attrs.evolve(auth.ca, crl_url=f"{config.public_url}/api/v1/crl",
                                  issuer_url=f"{config.public_url}/api/v1/ca/intermediate?format=der")
        old = Authority(auth.store, legacy_ca)
        old.issue_with_key("old", common_name="old", key_type="ec-p256", actor=Actor.operator())
    finally:
        auth.store.close()

    data = run(*g, "ca", "status", "--json").json()
    intermediate = x509.load_pem_x509_certificate(h.intermediate_cert.read_bytes())
    ski = intermediate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
    assert [(c["role"], c["state"]) for c in data["cas"]] == [("root", "active"), ("intermediate", "current")]
    assert data["cas"][1]["subject_key_identifier"] == ski
    # The CA server's own service (made by init) counts too.
    assert (data["services"], data["with_certificate"], data["under_current"]) == (5, 4, 4)
    assert (data["legacy_urls"], data["legacy_url_services"]) == (1, ["old"])
    text = run(*g, "ca", "status")
    assert text.code == 0 and "renewed under the current intermediate" in text.out and "old" in text.out
