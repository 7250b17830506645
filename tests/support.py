"""Test helpers: external judges (openssl, pkilint), CSRs, free ports. Imported as ``support``."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

BIN = Path(sys.executable).parent
# SPEC §3: the one pkilint finding we accept, on single-label names such as `localhost`.
ACCEPTED_FINDINGS = {"pkix.invalid_domain_name_syntax"}


def openssl_verify(root: Path, intermediate: Path, leaf: Path, *, crl: Path | None = None,
                   purpose: str | None = None) -> subprocess.CompletedProcess[str]:
    """``openssl verify`` of ``leaf`` against root + intermediate (and ``-crl_check`` with ``crl``)."""
    cmd = ["openssl", "verify", "-x509_strict", "-CAfile", str(root), "-untrusted", str(intermediate)]
    if crl is not None:
        cmd += ["-crl_check", "-CRLfile", str(crl)]
    if purpose:
        cmd += ["-purpose", purpose]
    return subprocess.run([*cmd, str(leaf)], capture_output=True, text=True, check=False)


def _pkilint(program: str, args: Sequence[str], path: Path) -> list[str]:
    exe = BIN / program
    proc = subprocess.run([str(exe), "lint", *args, "-s", "ERROR", "-f", "JSON", str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0 and not proc.stdout.strip():
        raise AssertionError(f"{program} failed: {proc.stderr}")
    findings: list[str] = []
    data: Any = json.loads(proc.stdout or "{}")
    for result in data.get("results", []):
        for finding in result.get("finding_descriptions", []):
            if finding["code"] not in ACCEPTED_FINDINGS:
                findings.append(f"{finding['severity']} {finding['code']}: {finding.get('message')}")
    return findings


def pkilint_cert(path: Path) -> list[str]:
    """ERROR/FATAL findings of pkilint's RFC 5280 certificate linter, minus the accepted one."""
    return _pkilint("lint_pkix_cert", [], path)


def pkilint_crl(path: Path) -> list[str]:
    return _pkilint("lint_crl", ["-t", "CRL", "-p", "PKIX"], path)


def make_csr(common_name: str | None = None, *, dns: Sequence[str] = (), ips: Sequence[str] = (),
             key: Any = None) -> tuple[bytes, Any]:
    """A PEM CSR (EC P-256 unless ``key`` is given) and its key."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    names = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    csr = builder.sign(key, None if _is_ed(key) else hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM), key


def _is_ed(key: Any) -> bool:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return isinstance(key, ed25519.Ed25519PrivateKey)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def env_without_secrets() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("VCC_PKI_")}
