"""The on-disk key/certificate pair (vcc_pki_client.files): atomic swaps, modes, recovery."""

from __future__ import annotations

import os
import ssl
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from vcc_pki_client import files as files_module
from vcc_pki_client.errors import ConfigurationError
from vcc_pki_client.files import CertificateFiles
from vcc_pki_client.keys import PrivateKey, key_matches_certificate, private_key_pem

if TYPE_CHECKING:
    from conftest import MiniCA

Pair = tuple[x509.Certificate, PrivateKey]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def files(tmp_path: Path) -> CertificateFiles:
    d = tmp_path / "tls"
    return CertificateFiles(d / "cert.pem", d / "key.pem", d / "ca_chain.pem")


@pytest.fixture
def pair_a(mini_ca: MiniCA) -> Pair:
    return mini_ca.issue("billing")


@pytest.fixture
def pair_b(mini_ca: MiniCA) -> Pair:
    return mini_ca.issue("billing")


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files_module, "_READ_ATTEMPTS", 2)


def staged_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(files_module.STAGED_SUFFIX))


def crash_after_key_rename(monkeypatch: pytest.MonkeyPatch, files: CertificateFiles) -> None:
    """Simulate a process that dies right after the key's rename: the certificate's rename
    fails and no rollback runs."""
    real = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if os.fspath(dst) == os.fspath(files.cert_file):
            raise OSError(5, "Input/output error", os.fspath(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(files_module, "_restore", lambda replaced, previous: False)


def fail_replace_on(monkeypatch: pytest.MonkeyPatch, calls: Callable[[int], bool]) -> list[tuple[str, str]]:
    """Make os.replace (as files.py calls it) raise when ``calls(n)`` is true for the n-th call."""
    real = os.replace
    seen: list[tuple[str, str]] = []

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append((os.fspath(src), os.fspath(dst)))
        if calls(len(seen)):
            raise OSError(28, "No space left on device", os.fspath(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return seen


# -- round trip, modes -----------------------------------------------------------------


def test_write_then_load(files: CertificateFiles, pair_a: Pair, mini_ca: MiniCA) -> None:
    cert, key = pair_a
    assert not files.exists()
    files.write(cert, key, mini_ca.chain)
    assert files.exists()
    loaded_cert, loaded_key = files.load()
    assert loaded_cert == cert
    assert private_key_pem(loaded_key) == private_key_pem(key)
    assert files.load_chain() == mini_ca.chain


def test_modes_key_0600_dirs_0700(tmp_path: Path, pair_a: Pair, mini_ca: MiniCA) -> None:
    deep = tmp_path / "a" / "b"
    files = CertificateFiles(deep / "cert.pem", deep / "key.pem", deep / "ca_chain.pem")
    tmp_mode = mode(tmp_path)
    old = os.umask(0o022)  # the usual umask, so the test sees what users see
    try:
        files.write(*pair_a, mini_ca.chain)
    finally:
        os.umask(old)
    assert mode(files.key_file) == 0o600
    assert mode(files.cert_file) == 0o644
    assert mode(deep) == 0o700 and mode(deep.parent) == 0o700
    assert mode(tmp_path) == tmp_mode  # existing directories are left alone
    assert staged_files(deep) == []


def test_write_over_read_only_key_from_pki_admin(files: CertificateFiles, pair_a: Pair, pair_b: Pair) -> None:
    files.write(*pair_a)
    os.chmod(files.key_file, 0o400)
    os.chmod(files.cert_file, 0o400)
    files.write(*pair_b)
    assert files.load()[0] == pair_b[0]
    assert mode(files.key_file) == 0o600


def test_write_refuses_a_key_that_does_not_belong(files: CertificateFiles, pair_a: Pair, pair_b: Pair) -> None:
    with pytest.raises(ConfigurationError, match="does not belong"):
        files.write(pair_a[0], pair_b[1])
    assert not files.cert_file.parent.exists()


def test_empty_chain_leaves_chain_file_alone(
    files: CertificateFiles, pair_a: Pair, pair_b: Pair, mini_ca: MiniCA
) -> None:
    files.write(*pair_a, mini_ca.chain)
    files.write(*pair_b)
    assert files.load_chain() == mini_ca.chain


def test_same_path_for_cert_and_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="two files"):
        CertificateFiles(tmp_path / "both.pem", tmp_path / "both.pem")


def test_paths_may_be_strings(tmp_path: Path) -> None:
    files = CertificateFiles(str(tmp_path / "c.pem"), str(tmp_path / "k.pem"))
    assert files.cert_file == tmp_path / "c.pem" and files.chain_file is None


# -- reading errors --------------------------------------------------------------------


def test_load_missing_files(files: CertificateFiles) -> None:
    with pytest.raises(ConfigurationError, match="no such file"):
        files.load()


@pytest.mark.usefixtures("fast_retries")
def test_load_refuses_a_mismatched_pair(files: CertificateFiles, pair_a: Pair, pair_b: Pair) -> None:
    files.write(*pair_a)
    files.key_file.write_bytes(private_key_pem(pair_b[1]))
    with pytest.raises(ConfigurationError, match="does not belong"):
        files.load()
    with pytest.raises(ConfigurationError, match="does not belong"):
        files.ssl_load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))


@pytest.mark.usefixtures("fast_retries")
def test_load_refuses_garbage(files: CertificateFiles, pair_a: Pair) -> None:
    files.write(*pair_a)
    files.cert_file.write_text("garbage")
    with pytest.raises(ConfigurationError, match="no PEM certificate"):
        files.load()
    files.write(*pair_a)
    files.key_file.write_text("garbage")
    with pytest.raises(ConfigurationError, match="key.pem"):
        files.load()


# -- concurrency -------------------------------------------------------------------------


def test_readers_never_see_a_mixed_pair_during_200_swaps(
    files: CertificateFiles, pair_a: Pair, pair_b: Pair, mini_ca: MiniCA
) -> None:
    # Measured: some 700-1500 of ~10000 reads per run catch the files mid-swap.
    files.write(*pair_a, mini_ca.chain)
    done = threading.Event()
    failures: list[BaseException] = []
    reads = {"load": 0, "ssl": 0}
    serials = set()

    def read_with_load() -> None:
        try:
            while not done.is_set():
                cert, key = files.load()
                assert key_matches_certificate(key, cert)
                serials.add(cert.serial_number)
                reads["load"] += 1
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    def read_into_ssl_context() -> None:
        try:
            while not done.is_set():
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                files.ssl_load(ctx)  # OpenSSL itself checks that key and certificate match
                reads["ssl"] += 1
        except BaseException as exc:
            failures.append(exc)

    readers = [threading.Thread(target=read_with_load), threading.Thread(target=read_into_ssl_context)]
    for t in readers:
        t.start()
    try:
        for i in range(200):
            files.write(*(pair_b if i % 2 == 0 else pair_a), mini_ca.chain)
    finally:
        done.set()
        for t in readers:
            t.join()
    assert failures == []
    assert reads["load"] > 20 and reads["ssl"] > 20
    assert serials == {pair_a[0].serial_number, pair_b[0].serial_number}
    assert staged_files(files.cert_file.parent) == []


def test_reader_mid_swap_gets_the_new_pair(files: CertificateFiles, pair_a: Pair, pair_b: Pair) -> None:
    """Frozen between the key's rename and the certificate's: the reader completes the pair."""
    files.write(*pair_a)
    seen_mid_swap: list[Pair] = []
    real = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if os.fspath(dst) == os.fspath(files.cert_file):
            seen_mid_swap.append(files.load())  # key.pem is new, cert.pem still old
        real(src, dst)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", replace)
        files.write(*pair_b)
    [(cert, key)] = seen_mid_swap
    assert cert == pair_b[0] and key_matches_certificate(key, cert)


# -- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("failing_call", [1, 2, 3], ids=["chain", "key", "cert"])
def test_failed_rename_leaves_old_pair_intact(
    files: CertificateFiles,
    pair_a: Pair,
    pair_b: Pair,
    mini_ca: MiniCA,
    monkeypatch: pytest.MonkeyPatch,
    failing_call: int,
) -> None:
    files.write(*pair_a, mini_ca.chain)
    os.chmod(files.key_file, 0o400)
    before = {p: p.read_bytes() for p in (files.cert_file, files.key_file, files.chain_file) if p}
    other_chain = [mini_ca.intermediate]
    seen = fail_replace_on(monkeypatch, lambda n: n == failing_call)
    with pytest.raises(ConfigurationError, match="No space left"):
        files.write(*pair_b, other_chain)
    assert [Path(dst).name for _, dst in seen[:failing_call]] == ["ca_chain.pem", "key.pem", "cert.pem"][:failing_call]
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in before} == before
    assert mode(files.key_file) == 0o400  # restored as it was
    assert files.load()[0] == pair_a[0]
    assert staged_files(files.cert_file.parent) == []


def test_failed_staging_changes_nothing(
    files: CertificateFiles, pair_a: Pair, pair_b: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    files.write(*pair_a)
    before = files.cert_file.read_bytes(), files.key_file.read_bytes()
    real = files_module._write_new

    def write_new(path: Path, data: bytes, mode: int) -> None:
        if path.name.startswith("cert.pem"):
            raise OSError(28, "No space left on device", str(path))
        real(path, data, mode)

    monkeypatch.setattr(files_module, "_write_new", write_new)
    with pytest.raises(ConfigurationError):
        files.write(*pair_b)
    assert (files.cert_file.read_bytes(), files.key_file.read_bytes()) == before
    assert staged_files(files.cert_file.parent) == []


def test_interrupt_mid_write_rolls_back(
    files: CertificateFiles, pair_a: Pair, pair_b: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    files.write(*pair_a)
    real = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if (os.fspath(dst) == os.fspath(files.cert_file) and os.fspath(src).endswith(".next")
                and files.key_file.read_bytes() == private_key_pem(pair_b[1])):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        files.write(*pair_b)
    monkeypatch.undo()
    assert files.load()[0] == pair_a[0]


def test_crash_between_renames_is_recoverable(
    files: CertificateFiles, pair_a: Pair, pair_b: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As if the process died after the key's rename: no rollback ran."""
    files.write(*pair_a)
    crash_after_key_rename(monkeypatch, files)
    with pytest.raises(ConfigurationError):
        files.write(*pair_b)
    monkeypatch.undo()
    assert files.key_file.read_bytes() == private_key_pem(pair_b[1])
    assert files.cert_file.read_bytes() == pair_a[0].public_bytes(serialization.Encoding.PEM)
    # Readers get the consistent new pair from the staged certificate ...
    cert, key = files.load()
    assert cert == pair_b[0] and key_matches_certificate(key, cert)
    files.ssl_load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    # ... and recover() completes the swap on disk.
    assert files.recover() is True
    assert files.cert_file.read_bytes() == pair_b[0].public_bytes(serialization.Encoding.PEM)
    assert staged_files(files.cert_file.parent) == []
    assert files.recover() is False


def test_crash_during_first_write_is_recoverable(
    files: CertificateFiles, pair_a: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    crash_after_key_rename(monkeypatch, files)
    with pytest.raises(ConfigurationError):
        files.write(*pair_a)
    monkeypatch.undo()
    assert not files.cert_file.exists()
    assert files.load()[0] == pair_a[0]
    assert files.recover() is True
    assert files.exists() and files.load()[0] == pair_a[0]


def test_recover_cleans_stale_staged_files(files: CertificateFiles, pair_a: Pair, pair_b: Pair) -> None:
    assert files.recover() is False  # nothing there at all
    files.write(*pair_a)
    stale_key = files.key_file.with_name("key.pem.next")
    stale_key.write_bytes(private_key_pem(pair_b[1]))
    files.cert_file.with_name("cert.pem.next").write_bytes(pair_b[0].public_bytes(serialization.Encoding.PEM))
    assert files.load()[0] == pair_a[0]  # the pair in place wins while it is consistent
    assert files.recover() is False
    assert staged_files(files.cert_file.parent) == []


# -- ssl ------------------------------------------------------------------------------------


def test_ssl_load_sends_intermediates_not_the_root(files: CertificateFiles, pair_a: Pair, mini_ca: MiniCA) -> None:
    files.write(*pair_a, mini_ca.chain)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert files.ssl_load(ctx) == pair_a[0]
    two = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert files.ssl_load(ctx, two) == pair_a[0]


def test_a_client_recovers_a_cut_swap_on_first_use_not_in_its_constructor(
    tmp_path: Path, pair_a: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vcc_pki_client import PKIClient

    folder = tmp_path / "svc"
    files = CertificateFiles(folder / "cert.pem", folder / "key.pem")
    crash_after_key_rename(monkeypatch, files)
    with pytest.raises(ConfigurationError):
        files.write(*pair_a)
    monkeypatch.undo()
    before = sorted(p.name for p in folder.iterdir())
    pki = PKIClient("https://pki.invalid:8443", "svc", cert_file=files.cert_file, key_file=files.key_file)
    assert sorted(p.name for p in folder.iterdir()) == before  # the constructor touched nothing
    assert staged_files(folder) != []
    assert pki.certificate == pair_a[0]  # first use: the swap is completed on disk
    assert staged_files(folder) == [] and files.cert_file.exists()
    pki.close()


def test_fullchain_is_the_leaf_then_the_intermediate_and_recover_mends_a_stale_one(
        files: CertificateFiles, pair_a: Pair, pair_b: Pair, mini_ca: MiniCA) -> None:
    """Issue 11: fullchain.pem for servers in other languages (nginx, Go): leaf, intermediate."""
    files.write(pair_a[0], pair_a[1], mini_ca.chain)
    assert files.fullchain_file == files.cert_file.with_name("fullchain.pem")
    intermediates = [c for c in mini_ca.chain if c.issuer != c.subject]
    assert intermediates and x509.load_pem_x509_certificates(files.fullchain_file.read_bytes()) == [
        pair_a[0], *intermediates]
    assert mode(files.fullchain_file) == 0o644
    stale = files.fullchain_file.read_bytes()
    files.write(pair_b[0], pair_b[1], mini_ca.chain)
    files.fullchain_file.write_bytes(stale)  # as if killed between the renames of cert.pem and fullchain.pem
    files.recover()
    assert x509.load_pem_x509_certificates(files.fullchain_file.read_bytes())[0] == pair_b[0]
    assert CertificateFiles(files.cert_file, files.key_file).fullchain_file is None  # no chain file: none
