"""mTLS contexts that follow renewals (vcc_pki_client.tls), judged by real handshakes."""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from vcc_pki_client import files as files_module
from vcc_pki_client.errors import ConfigurationError
from vcc_pki_client.files import CertificateFiles
from vcc_pki_client.keys import private_key_pem
from vcc_pki_client.tls import ReloadingContexts, client_ssl_context, server_ssl_context

if TYPE_CHECKING:
    from conftest import MiniCA


@attrs.frozen
class Handshake:
    server_saw: int | None  # serial of the client certificate the server verified
    client_saw: int  # serial of the server certificate the client verified


def serial(der: bytes | None) -> int | None:
    return None if der is None else x509.load_der_x509_certificate(der).serial_number


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str = "localhost") -> Handshake:
    """One real TLS connection over loopback; raises what either side raised."""
    seen: list[int | None] = []
    failures: list[BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    seen.append(serial(tls.getpeercert(binary_form=True)))
                    tls.sendall(b"ok")
            except BaseException as exc:  # reported by the caller
                failures.append(exc)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=5) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                    client_saw = serial(tls.getpeercert(binary_form=True))
                    # TLS 1.3: a refused client certificate shows up at the first read.
                    assert tls.recv(2) == b"ok"
        finally:
            thread.join()
    if failures:
        raise failures[0]
    assert client_saw is not None
    return Handshake(seen[0], client_saw)


@pytest.fixture
def ca_file(mini_ca: MiniCA, tmp_path: Path) -> Path:
    return mini_ca.write_root(tmp_path)


def service_files(tmp_path: Path, mini_ca: MiniCA, service_id: str, key_kind: str = "ec-p256") -> CertificateFiles:
    d = tmp_path / service_id
    files = CertificateFiles(d / "cert.pem", d / "key.pem", d / "ca_chain.pem")
    files.write(*mini_ca.issue(service_id, key_kind=key_kind), mini_ca.chain)
    return files


@pytest.fixture
def server_files(tmp_path: Path, mini_ca: MiniCA) -> CertificateFiles:
    return service_files(tmp_path, mini_ca, "inventory")


@pytest.fixture
def client_files(tmp_path: Path, mini_ca: MiniCA) -> CertificateFiles:
    return service_files(tmp_path, mini_ca, "billing")


def current_serial(files: CertificateFiles) -> int:
    return files.load()[0].serial_number


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"], ids=["sni", "no-sni"])
def test_mutual_tls_handshake(
    server_files: CertificateFiles, client_files: CertificateFiles, ca_file: Path, server_hostname: str
) -> None:
    # The client trusts only the root: the handshake also proves both sides send the intermediate.
    server = ReloadingContexts(server_files, ca_file).server_context()
    client = ReloadingContexts(client_files, ca_file).client_context()
    seen = handshake(server, client, server_hostname)
    assert seen == Handshake(current_serial(client_files), current_serial(server_files))


def test_renewed_certificates_are_presented_after_reload(
    server_files: CertificateFiles, client_files: CertificateFiles, ca_file: Path, mini_ca: MiniCA
) -> None:
    server_side = ReloadingContexts(server_files, ca_file)
    client_side = ReloadingContexts(client_files, ca_file)
    server, client = server_side.server_context(), client_side.client_context()
    first = handshake(server, client)

    server_files.write(*mini_ca.issue("inventory"), mini_ca.chain)
    client_files.write(*mini_ca.issue("billing"), mini_ca.chain)
    assert handshake(server, client) == first  # nothing changes before reload()

    assert server_side.reload().serial_number == current_serial(server_files)
    assert client_side.reload().serial_number == current_serial(client_files)
    second = handshake(server, client)
    assert second == Handshake(current_serial(client_files), current_serial(server_files))
    assert second.server_saw != first.server_saw and second.client_saw != first.client_saw
    assert server_side.certificate == server_files.load()[0]


def test_server_rekey_to_another_key_type_drops_the_old_certificate(
    server_files: CertificateFiles, client_files: CertificateFiles, ca_file: Path, mini_ca: MiniCA
) -> None:
    server_side = ReloadingContexts(server_files, ca_file)
    server = server_side.server_context()
    client = client_ssl_context(client_files, ca_file)
    old = handshake(server, client).client_saw

    server_files.write(*mini_ca.issue("inventory", key_kind="rsa-2048"), mini_ca.chain)
    server_side.reload()
    new = handshake(server, client).client_saw
    assert new == current_serial(server_files) != old


def test_client_without_certificate_is_refused_when_required(
    server_files: CertificateFiles, ca_file: Path
) -> None:
    server = ReloadingContexts(server_files, ca_file).server_context()
    anonymous = client_ssl_context(None, ca_file)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        handshake(server, anonymous)


def test_client_without_certificate_passes_when_optional(server_files: CertificateFiles, ca_file: Path) -> None:
    server = ReloadingContexts(server_files, ca_file).server_context(require_client_cert=False)
    assert server.verify_mode == ssl.CERT_OPTIONAL
    seen = handshake(server, client_ssl_context(None, ca_file))
    assert seen.server_saw is None and seen.client_saw == current_serial(server_files)


def test_client_refuses_a_server_from_another_ca(
    server_files: CertificateFiles, client_files: CertificateFiles, other_ca: MiniCA, tmp_path: Path
) -> None:
    other_root = other_ca.write_root(tmp_path)
    server = server_ssl_context(server_files, other_root, require_client_cert=False)
    client = client_ssl_context(client_files, other_root)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, client)


def test_one_off_contexts_work(server_files: CertificateFiles, client_files: CertificateFiles, mini_ca: MiniCA) -> None:
    server = server_ssl_context(server_files, ca_certs=[mini_ca.root])
    client = client_ssl_context(client_files, ca_certs=[mini_ca.root])
    assert handshake(server, client) == Handshake(current_serial(client_files), current_serial(server_files))


def test_server_context_settings(server_files: CertificateFiles, ca_file: Path) -> None:
    ctx = ReloadingContexts(server_files, ca_file).server_context(alpn_protocols=["http/1.1"])
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.num_tickets == 0 and ctx.options & ssl.OP_NO_TICKET
    client = ReloadingContexts(server_files, ca_file).client_context()
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2


def test_trust_is_required_and_checked(server_files: CertificateFiles, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="needs a CA"):
        server_ssl_context(server_files)
    with pytest.raises(ConfigurationError, match="CA bundle"):
        client_ssl_context(server_files, tmp_path / "missing.pem")
    (tmp_path / "garbage.pem").write_text("garbage")
    with pytest.raises(ConfigurationError, match="CA bundle"):
        ReloadingContexts(server_files, tmp_path / "garbage.pem").server_context()


def test_failed_reload_keeps_serving_the_old_pair(
    server_files: CertificateFiles,
    client_files: CertificateFiles,
    ca_file: Path,
    mini_ca: MiniCA,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(files_module, "_READ_ATTEMPTS", 2)
    server_side = ReloadingContexts(server_files, ca_file)
    server = server_side.server_context()
    client = client_ssl_context(client_files, ca_file)
    old = current_serial(server_files)
    other_cert, _ = mini_ca.issue("inventory")
    server_files.cert_file.write_bytes(other_cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigurationError, match="does not belong"):
        server_side.reload()
    assert handshake(server, client).client_saw == old


def test_contexts_are_remembered_weakly(server_files: CertificateFiles, ca_file: Path) -> None:
    contexts = ReloadingContexts(server_files, ca_file)
    contexts.server_context()
    contexts.client_context()
    gc.collect()
    assert len(contexts._servers) == 0 and len(contexts._clients) == 0
    kept = contexts.client_context()
    assert contexts.reload() == server_files.load()[0]
    assert len(contexts._clients) == 1 and kept is not None


def test_private_key_never_lands_in_a_named_file(server_files: CertificateFiles, ca_file: Path, tmp_path: Path) -> None:
    before = set(tmp_path.rglob("*"))
    ReloadingContexts(server_files, ca_file).server_context()
    assert set(tmp_path.rglob("*")) == before
    assert private_key_pem(server_files.load()[1]) == server_files.key_file.read_bytes()


def test_asyncio_server_follows_reload(
    server_files: CertificateFiles, client_files: CertificateFiles, ca_file: Path, mini_ca: MiniCA
) -> None:
    """asyncio (and so uvicorn) handshakes through ssl.SSLObject rather than SSLSocket."""
    server_side = ReloadingContexts(server_files, ca_file)
    server_ctx = server_side.server_context()
    client_ctx = client_ssl_context(client_files, ca_file)

    async def exchange() -> tuple[int | None, int | None]:
        seen: list[int | None] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(serial(writer.get_extra_info("ssl_object").getpeercert(binary_form=True)))
            writer.write(b"ok")
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost")
            presented = serial(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
            assert await reader.read(2) == b"ok"
            writer.close()
            await writer.wait_closed()
        return seen[0], presented

    assert asyncio.run(exchange()) == (current_serial(client_files), current_serial(server_files))
    server_files.write(*mini_ca.issue("inventory"), mini_ca.chain)
    server_side.reload()
    assert asyncio.run(exchange())[1] == current_serial(server_files)
