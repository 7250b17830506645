"""Every file in examples/ runs against the real server and prints what it promises.

The test is parametrised over the folder listing: a new example without an entry in
``EXPECTED`` fails here until someone says what its output must show.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes

from support import RunningServer, env_without_secrets
from vcc_pki_server.home import Home

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HEX = r"[0-9a-f]+"

# Per example: regular expressions that must each match a whole line of its standard output.
EXPECTED: dict[str, list[str]] = {
    "quickstart.py": [
        rf"enrolled quickstart-{HEX}: certificate {HEX} valid until .* UTC",
        r"files: .*/cert\.pem, key\.pem \(mode 600\), ca_chain\.pem",
        rf"registered quickstart-{HEX}: Quickstart service, endpoints https://127\.0\.0\.1:9443",
        rf"peer pki-server: certificate {HEX}, subject CN=localhost, revoked: False",
        r"quickstart: OK",
    ],
    "two_services_mtls.py": [
        rf"enrolled orders-{HEX}: certificate {HEX}",
        rf"enrolled stock-{HEX}: certificate {HEX}",
        rf"discovered stock-{HEX} at https://127\.0\.0\.1:\d+",
        rf"orders-{HEX} -> stock-{HEX}: hello from stock-{HEX}",
        rf"stock-{HEX} -> orders-{HEX}: hello from orders-{HEX}",
        r"call without a client certificate: refused",
        rf"healthy in the registry: orders-{HEX}, stock-{HEX}",  # the session server probes every second
        r"two_services_mtls: OK",
    ],
    "testing_kit.py": [r"2 passed in .*"],  # pytest on the file, with the kit's own server
    "auto_renewal.py": [
        rf"enrolled renewing-{HEX}: certificate {HEX} valid until .* UTC \(8 hours\)",
        rf"renewed in the background: {HEX} -> {HEX}, valid until .* UTC \(the same 8-hour lifetime: True\)",
        r"files swapped: cert\.pem and key\.pem hold the new pair: True",
        rf"server context made before the renewal now presents: {HEX} \(the new certificate: True\)",
        r"check in the foreground: nothing due",
        r"auto_renewal: OK",
    ],
}


def example_files() -> list[str]:
    return sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))  # _settings.py: shared


def run_example(name: str, env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=60, check=False)


@pytest.fixture
def example_env(pki_server: RunningServer, ca_home: Home, admin_token: str, tmp_path: Path) -> dict[str, str]:
    digest = ca_home.root_certificate().fingerprint(hashes.SHA256()).hex()
    return {**env_without_secrets(), "VCC_PKI_URL": pki_server.url, "VCC_PKI_ADMIN_TOKEN": admin_token,
            "VCC_PKI_ROOT_FINGERPRINT": f"sha256:{digest}", "VCC_PKI_WORKDIR": str(tmp_path / "work")}


def assert_lines(stdout: str, patterns: list[str]) -> None:
    lines = stdout.splitlines()
    for pattern in patterns:
        assert any(re.fullmatch(pattern, line) for line in lines), f"no line matches {pattern!r} in:\n{stdout}"


def test_the_examples_folder_is_what_this_test_knows() -> None:
    assert example_files(), f"no examples in {EXAMPLES}"


@pytest.mark.parametrize("name", example_files())
def test_example_runs_against_the_server(name: str, example_env: dict[str, str], tmp_path: Path) -> None:
    assert name in EXPECTED, f"examples/{name} has no expected output in tests/e2e/test_examples.py"
    proc = run_example(name, example_env, tmp_path)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert_lines(proc.stdout, EXPECTED[name])
    assert "Traceback" not in proc.stderr, proc.stderr


def test_quickstart_enrols_with_an_enrolment_token_and_a_ca_bundle(example_env: dict[str, str], ca_home: Home,
                                                                   register: object, tmp_path: Path) -> None:
    service_id = f"qs-{uuid.uuid4().hex[:8]}"
    token = register(service_id, san_dns=[service_id])  # type: ignore[operator]
    env = {k: v for k, v in example_env.items() if k not in ("VCC_PKI_ADMIN_TOKEN", "VCC_PKI_ROOT_FINGERPRINT")}
    env.update({"VCC_PKI_ENROLMENT_TOKEN": token, "VCC_PKI_CA_BUNDLE": str(ca_home.root_cert)})
    proc = run_example("quickstart.py", env, tmp_path, "--service-id", service_id)
    assert proc.returncode == 0, proc.stderr
    assert_lines(proc.stdout, [rf"enrolled {service_id}: certificate {HEX} valid until .* UTC", "quickstart: OK"])
    # A second run uses the certificate on disk: the spent token is not needed again.
    again = run_example("quickstart.py", env, tmp_path, "--service-id", service_id)
    assert again.returncode == 0, again.stderr
    assert_lines(again.stdout, [rf"already enrolled {service_id}: certificate {HEX} valid until .* UTC"])
    # Elsewhere (no files) the spent token fails cleanly, with the server's reason and no traceback.
    elsewhere = run_example("quickstart.py", {**env, "VCC_PKI_WORKDIR": str(tmp_path / "other")}, tmp_path,
                            "--service-id", service_id)
    assert elsewhere.returncode == 1
    assert "AuthenticationError" in elsewhere.stderr and "Traceback" not in elsewhere.stderr


def test_examples_refuse_to_run_without_credentials(tmp_path: Path) -> None:
    env = dict(env_without_secrets().items())
    for name in ("quickstart.py", "two_services_mtls.py", "auto_renewal.py"):
        proc = run_example(name, env, tmp_path)
        assert proc.returncode == 2, (name, proc.stderr)
        assert "token" in proc.stderr


def test_examples_need_only_the_port_next_to_a_dev_home(pki_server: RunningServer, ca_home: Home,
                                                        admin_token: str, tmp_path: Path) -> None:
    """Issue 17: in the folder where `make run` made ./pki-data, `--port` is all an example needs
    (the root CA and the admin token come from the dev home)."""
    dev_home = tmp_path / "pki-data"
    (dev_home / "ca").mkdir(parents=True)
    (dev_home / "secrets").mkdir()
    (dev_home / "ca" / "root_ca.pem").write_bytes(ca_home.root_cert.read_bytes())
    (dev_home / "secrets" / "admin_token").write_text(admin_token + "\n")
    port = pki_server.url.rsplit(":", 1)[1]
    proc = run_example("two_services_mtls.py", env_without_secrets(), tmp_path, "--port", port)
    assert proc.returncode == 0, proc.stderr
    assert_lines(proc.stdout, EXPECTED["two_services_mtls.py"])
