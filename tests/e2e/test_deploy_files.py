"""deploy/Dockerfile and deploy/compose/compose.yaml (issue 12). No container runtime here (and no
registry to pull base images from), so the images are not built; what they run is run: the
image's server command line, its health check, and the compose file's `pki-admin init`, each
taken from the file itself so that a renamed flag fails here rather than in a user's cluster."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from cryptography import x509

from conftest import CA_PASSWORD, ROOT_PASSWORD
from support import BIN, RunningServer, env_without_secrets
from vcc_pki_server.server import parse_args

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DOCKERFILE = (DEPLOY / "Dockerfile").read_text()
COMPOSE = (DEPLOY / "compose" / "compose.yaml").read_text()


def instruction(name: str) -> str:
    """The text of the Dockerfile's (last) ``name`` instruction, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line for line in joined.splitlines() if line.startswith(name + " ")][-1][len(name) + 1:]


def test_the_images_command_line_is_the_servers() -> None:
    entrypoint = json.loads(instruction("ENTRYPOINT"))
    cmd = json.loads(instruction("CMD"))
    assert entrypoint == ["vcc-pki-server"]
    args = parse_args(cmd)
    assert (args.host, args.port, args.log_format) == ("0.0.0.0", 8443, "json")
    assert args.password_file == "/run/secrets/ca_password"
    assert "USER vcc-pki" in DOCKERFILE and "VOLUME /srv/pki" in DOCKERFILE


def test_the_images_health_check_passes_against_a_server(pki_server: RunningServer) -> None:
    check = json.loads(re.sub(r"^.*CMD ", "", instruction("HEALTHCHECK")))
    assert check[:2] == ["python", "-c"]
    code = check[2].replace("/srv/pki/ca/root_ca.pem", str(pki_server.home.root_cert))
    code = code.replace("localhost:8443", f"localhost:{pki_server.port}")
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0
    stopped = code.replace(f"localhost:{pki_server.port}", "localhost:9")  # nothing listens there
    assert subprocess.run([sys.executable, "-c", stopped], capture_output=True, timeout=30).returncode != 0


def test_the_compose_init_makes_a_home_for_every_name_of_the_cluster(tmp_path: Path) -> None:
    script = re.search(r"su -s /bin/sh vcc-pki -c '(.*?)'", COMPOSE, re.S)
    assert script is not None
    command = script.group(1).replace("\\\n", " ")
    command = re.sub(r"\$\{VCC_PKI_PUBLIC_NAME:-localhost\}", "pki.example.internal", command)
    (tmp_path / "root_password").write_text(ROOT_PASSWORD)
    (tmp_path / "ca_password").write_text(CA_PASSWORD)
    argv = [part.replace("/run/secrets/", f"{tmp_path}/") for part in shlex.split(command)]
    assert argv[:2] == ["pki-admin", "init"]
    home = tmp_path / "home"
    done = subprocess.run([str(BIN / "pki-admin"), "--home", str(home), *argv[1:]], capture_output=True,
                          text=True, env=env_without_secrets(), timeout=120)
    assert done.returncode == 0, done.stderr
    cert = x509.load_pem_x509_certificate((home / "server" / "cert.pem").read_bytes())
    names = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                .get_values_for_type(x509.DNSName))
    # Every name the replicas are reached by in compose.yaml: HAProxy's checks (pki-N, with
    # the root) and clients through HAProxy (the public name).
    servers = set(re.findall(r"server replica\d (pki-\d):8443", (DEPLOY / "haproxy" / "haproxy.cfg").read_text()))
    assert servers == {"pki-1", "pki-2", "pki-3"}
    assert servers | {"localhost", "pki.example.internal"} <= names
