"""The on-disk key/certificate pair: atomic replacement, 0600 keys, reads that never mix pairs.

A service keeps its certificate and key in two files (``cert.pem``, ``key.pem``, as written
by ``pki-admin cert issue``), optionally with the CA chain beside them (``ca_chain.pem``) and
then also ``fullchain.pem`` (the certificate and the intermediate, for nginx, Go, Java).
Two files cannot be replaced by one ``rename``, so :class:`CertificateFiles` uses a small
journal: the new certificate waits beside its target as ``cert.pem.next`` while the key is
swapped, and anything reading through this class checks that the key it read belongs to
the certificate it read.

Guarantees (POSIX; ``rename`` within one directory is atomic):

* Readers through :meth:`CertificateFiles.load` / :meth:`CertificateFiles.ssl_load` get a
  key and certificate that belong together, or an error; never a mixed pair. A mismatch
  seen mid-swap is resolved by the staged certificate or by re-reading (bounded, ~1 s).
* Each file is replaced whole (temp file, ``fsync``, ``rename``, directory ``fsync``):
  no reader ever sees a partial file.
* A failed :meth:`~CertificateFiles.write` (an exception at any step) restores the files it
  had already replaced, so the old pair stays in place and loadable. After a crash or power
  loss in the instant between the key's and the certificate's rename, ``key.pem`` is new
  and ``cert.pem`` old, but ``cert.pem.next`` holds the matching certificate (it is made
  durable before the key moves): :meth:`~CertificateFiles.load` returns that consistent
  pair, and :meth:`~CertificateFiles.recover` or the next write completes the swap on disk.
* Writers in several processes or threads are serialised with ``flock`` on a lock file
  beside the certificate (``.cert.pem.lock``); not on Windows, which has no ``fcntl``.

Known limit: a program reading ``cert.pem`` and ``key.pem`` on its own, without this class,
can still pair the old certificate with the new key for the microseconds between the two
renames. Such readers should retry on a key mismatch, as this class does.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .errors import ConfigurationError
from .keys import PrivateKey, certificates_pem, key_matches_certificate, load_private_key_pem, private_key_pem

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["CertificateFiles"]

STAGED_SUFFIX = ".next"
FULLCHAIN_FILE_NAME = "fullchain.pem"
_READ_ATTEMPTS = 12  # about 0.75 s of back-off in all: a swap takes a few milliseconds
_KEY_MODE = 0o600
_PUBLIC_MODE = 0o644
_DIR_MODE = 0o700


@attrs.frozen
class _Snapshot:
    """One consistent read: the certificate file's certificates (leaf first) and the key."""

    certs: list[x509.Certificate]
    cert_pem: bytes
    key: PrivateKey
    key_pem: bytes = attrs.field(repr=False)
    staged: bool = False  # the certificate came from cert.pem.next (an unfinished swap)


def _as_path(value: str | os.PathLike[str]) -> Path:
    return Path(value)


def _as_optional_path(value: str | os.PathLike[str] | None) -> Path | None:
    return None if value is None else Path(value)


@attrs.frozen
class CertificateFiles:
    """A service's certificate, private key and (optional) CA chain files.

    ``cert_file`` holds the service certificate (possibly followed by intermediates),
    ``key_file`` its unencrypted PEM key (0600), ``chain_file`` the CA chain
    (intermediate then root). See the module docstring for the consistency guarantees.

    Example::

        files = CertificateFiles("tls/cert.pem", "tls/key.pem", "tls/ca_chain.pem")
        files.write(issued.certificate, key, issued.chain)
        cert, key = files.load()
    """

    cert_file: Path = attrs.field(converter=_as_path)
    key_file: Path = attrs.field(converter=_as_path)
    chain_file: Path | None = attrs.field(default=None, converter=_as_optional_path)

    def __attrs_post_init__(self) -> None:
        if os.path.abspath(self.cert_file) == os.path.abspath(self.key_file):
            raise ConfigurationError(f"cert_file and key_file must be two files, both are {self.cert_file}")

    # -- reading ---------------------------------------------------------------------

    @property
    def fullchain_file(self) -> Path | None:
        """``fullchain.pem`` beside the certificate (leaf, then intermediate: what nginx,
        Go and Java servers present), written with a ``chain_file``; None without one."""
        return self.cert_file.with_name(FULLCHAIN_FILE_NAME) if self.chain_file is not None else None

    def exists(self) -> bool:
        """True when both the certificate and the key file exist."""
        return self.cert_file.is_file() and self.key_file.is_file()

    def stamp(self) -> tuple[tuple[int, int, int], ...] | None:
        """What identifies the files' current versions (inode, mtime, size of the certificate
        and the key; an atomic replacement changes the inode), or None if one is missing."""
        try:
            return tuple((st.st_ino, st.st_mtime_ns, st.st_size)
                         for st in (os.stat(self.cert_file), os.stat(self.key_file)))
        except OSError:
            return None

    def load(self) -> tuple[x509.Certificate, PrivateKey]:
        """Read the certificate and its private key, checked to belong together.

        Retries (bounded) while a concurrent :meth:`write` is between its renames.
        Raises ConfigurationError when a file is missing or unreadable, is not PEM, or
        the key does not belong to the certificate.
        """
        snap = self._snapshot()
        return snap.certs[0], snap.key

    def load_chain(self) -> list[x509.Certificate]:
        """The CA certificates: any after the leaf in ``cert_file``, then ``chain_file``'s.

        A missing ``chain_file`` gives none from it; duplicates are dropped.
        """
        return _unique(self._snapshot().certs[1:] + self._chain_file_certs())

    def ssl_load(self, *contexts: ssl.SSLContext) -> x509.Certificate:
        """Load the pair into each context (``load_cert_chain``); return the certificate.

        The pair is read once and checked as in :meth:`load`, and the very bytes checked
        are what the contexts load, so a context never gets a mixed pair. The
        intermediates (not self-signed roots) from :meth:`load_chain` are sent along.
        The bytes reach OpenSSL through an anonymous in-memory file (Linux ``memfd``),
        elsewhere through a 0600 file in a private temporary directory, removed at once.
        Raises ConfigurationError as :meth:`load` does.
        """
        snap = self._snapshot()
        chain = [c for c in _unique(snap.certs[1:] + self._chain_file_certs()) if c.issuer != c.subject]
        pem = certificates_pem([snap.certs[0], *chain])
        for ctx in contexts:
            try:
                _load_cert_chain_pem(ctx, pem + snap.key_pem)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigurationError(f"cannot load {self.cert_file} into an SSL context: {exc}") from exc
        return snap.certs[0]

    def _snapshot(self, attempts: int | None = None) -> _Snapshot:
        attempts = attempts or _READ_ATTEMPTS
        delay = 0.005
        problem = ""
        for attempt in range(attempts):
            key_pem = _read(self.key_file)
            try:
                key = load_private_key_pem(key_pem)
            except ValueError as exc:
                problem = f"{self.key_file}: {exc}"
            else:
                try:
                    cert_pem = _read(self.cert_file)
                except ConfigurationError:
                    # No certificate yet, but maybe a first write was cut short.
                    staged = self._staged_snapshot(key, key_pem)
                    if staged is None:
                        raise
                    return staged
                try:
                    certs = x509.load_pem_x509_certificates(cert_pem)
                except ValueError:
                    problem = f"{self.cert_file} holds no PEM certificate"
                else:
                    if key_matches_certificate(key, certs[0]):
                        return _Snapshot(certs, cert_pem, key, key_pem)
                    staged = self._staged_snapshot(key, key_pem)
                    if staged is not None:  # mid-swap, or a swap cut short by a crash
                        return staged
                    problem = f"the key in {self.key_file} does not belong to the certificate in {self.cert_file}"
            # A partial or mismatched read is retried: a writer may be mid-swap (ours
            # takes milliseconds), or a foreign tool may be rewriting a file in place.
            if attempt + 1 < attempts:
                time.sleep(delay)
            delay = min(delay * 2, 0.1)
        raise ConfigurationError(problem)

    def _staged_snapshot(self, key: PrivateKey, key_pem: bytes) -> _Snapshot | None:
        try:
            cert_pem = _staged(self.cert_file).read_bytes()
            certs = x509.load_pem_x509_certificates(cert_pem)
        except (OSError, ValueError):  # gone (renamed just now) or still being written
            return None
        if not key_matches_certificate(key, certs[0]):
            return None
        return _Snapshot(certs, cert_pem, key, key_pem, staged=True)

    def _chain_file_certs(self) -> list[x509.Certificate]:
        if self.chain_file is None or not self.chain_file.exists():
            return []
        data = _read(self.chain_file)
        if not data.strip():
            return []
        try:
            return x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise ConfigurationError(f"{self.chain_file} holds no PEM certificate") from exc

    # -- writing ---------------------------------------------------------------------

    def write(self, cert: x509.Certificate, key: PrivateKey, chain: Sequence[x509.Certificate] = ()) -> None:
        """Replace the pair (and ``chain_file``, if set, with ``chain``) atomically.

        An empty ``chain`` leaves ``chain_file`` as it is (it may be the trust anchor).

        Missing directories are created 0700; the key file is 0600 from its creation, the
        certificate files 0644. Works over a read-only (0400) key file such as
        ``pki-admin cert issue`` writes: a rename needs write access to the directory only.

        Raises ConfigurationError when ``key`` does not belong to ``cert`` (nothing is
        written) or when the files cannot be written (the old files are left in place).
        """
        if not key_matches_certificate(key, cert):
            raise ConfigurationError("refusing to write a private key that does not belong to the certificate")
        plan: list[tuple[Path, bytes, int]] = []
        if self.chain_file is not None and chain:
            plan.append((self.chain_file, certificates_pem(chain), _PUBLIC_MODE))
        # Key before certificate: the certificate is the one left staged in between,
        # so a reader (or recover()) can complete the pair without touching key material.
        plan.append((self.key_file, private_key_pem(key), _KEY_MODE))
        plan.append((self.cert_file, cert.public_bytes(serialization.Encoding.PEM), _PUBLIC_MODE))
        full = self._fullchain_pem(cert, chain)
        if full is not None and self.fullchain_file is not None:
            plan.append((self.fullchain_file, full, _PUBLIC_MODE))
        try:
            for target, _, _ in plan:
                _make_private_dirs(target.parent)
            with self._writer_lock():
                _commit(plan)
        except OSError as exc:
            raise ConfigurationError(f"cannot write {exc.filename or self.cert_file}: {exc.strerror or exc}") from exc

    def recover(self) -> bool:
        """Finish a swap that a crash cut short, and remove stale staged files.

        Returns True when it completed a swap (moved ``cert.pem.next`` into place).
        Safe to call at any time, e.g. at start-up, with or without files on disk.
        Raises ConfigurationError if the directory cannot be written.
        """
        if not self.cert_file.parent.is_dir():
            return False
        try:
            with self._writer_lock():
                completed = False
                if self.key_file.is_file() and _staged(self.cert_file).is_file():
                    with contextlib.suppress(ConfigurationError):
                        # load() prefers the files in place; it returns the staged
                        # certificate only when that one (and not cert.pem) fits the key.
                        # Under the writer lock nobody is mid-swap: one read decides.
                        if self._snapshot(attempts=1).staged:
                            os.replace(_staged(self.cert_file), self.cert_file)
                            _fsync_dir(self.cert_file.parent)
                            completed = True
                for target in (self.key_file, self.cert_file, self.chain_file, self.fullchain_file):
                    if target is not None:
                        _staged(target).unlink(missing_ok=True)
                self._repair_fullchain()
                return completed
        except OSError as exc:
            raise ConfigurationError(f"cannot recover {self.cert_file}: {exc.strerror or exc}") from exc

    def _fullchain_pem(self, cert: x509.Certificate, chain: Sequence[x509.Certificate]) -> bytes | None:
        """The leaf and the intermediates of ``chain`` (roots are the peers' to have), or None
        without a ``chain_file`` or a chain."""
        if self.chain_file is None or not chain:
            return None
        return certificates_pem([cert, *(c for c in chain if c.issuer != c.subject)])

    def _repair_fullchain(self) -> None:
        """After a crash between the renames of ``cert.pem`` and ``fullchain.pem``: make the
        latter lead with the certificate in place again (under the writer lock)."""
        full = self.fullchain_file
        if full is None or not full.is_file() or not self.cert_file.is_file():
            return
        with contextlib.suppress(ValueError, OSError):
            cert = x509.load_pem_x509_certificate(self.cert_file.read_bytes())
            leads = x509.load_pem_x509_certificates(full.read_bytes())
            if leads and leads[0] == cert:
                return
            data = self._fullchain_pem(cert, self._chain_file_certs())
            if data is not None:
                _commit([(full, data, _PUBLIC_MODE)])

    @contextlib.contextmanager
    def _writer_lock(self) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover - Windows: no cross-process lock
            yield
            return
        lock_file = self.cert_file.with_name(f".{self.cert_file.name}.lock")
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), _KEY_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


def _commit(plan: list[tuple[Path, bytes, int]]) -> None:
    """Stage every file, then rename each into place; on failure undo what was renamed."""
    previous = {target: _previous(target) for target, _, _ in plan}  # before any change
    staged: list[Path] = []
    try:
        for target, data, mode in plan:
            stage = _staged(target)
            _write_new(stage, data, mode)
            staged.append(stage)
    except BaseException:
        for stage in staged:
            with contextlib.suppress(OSError):
                stage.unlink()
        raise

    replaced: list[Path] = []
    try:
        for target, _, _ in plan:
            os.replace(_staged(target), target)
            replaced.append(target)
            # Orders the renames on disk: the key's rename is durable before the
            # certificate's, so a crash can only leave "new key + cert.pem.next".
            _fsync_dir(target.parent)
    except BaseException:
        if _restore(replaced, previous):
            for target, _, _ in plan:
                with contextlib.suppress(OSError):
                    _staged(target).unlink()
        raise


def _restore(replaced: list[Path], previous: dict[Path, tuple[bytes, int] | None]) -> bool:
    """Put back the files in ``replaced`` (newest first). True when all were restored."""
    ok = True
    for target in reversed(replaced):
        try:
            old = previous[target]
            if old is None:
                target.unlink(missing_ok=True)
            else:
                _write_new(_staged(target), *old)
                os.replace(_staged(target), target)
            _fsync_dir(target.parent)
        except OSError:
            ok = False
    return ok


def _previous(target: Path) -> tuple[bytes, int] | None:
    try:
        return target.read_bytes(), target.stat().st_mode & 0o777
    except FileNotFoundError:
        return None


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` atomically (a temp file beside it, fsync, rename), with
    ``mode`` from the temp file's creation; missing folders are made 0700. Raises OSError.

    One file at a time; :meth:`CertificateFiles.write` swaps a key and its certificate."""
    _make_private_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        _write_all(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _staged(target: Path) -> Path:
    return target.with_name(target.name + STAGED_SUFFIX)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` afresh with ``mode`` from its creation (no window with a wider mode)."""
    path.unlink(missing_ok=True)  # a stale stage from a crashed write
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)  # the umask may have narrowed it; never widens a key's mode
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and any missing parents with mode 0700 (existing ones untouched)."""
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=_DIR_MODE)
            os.chmod(path, _DIR_MODE)  # mkdir's mode is narrowed by the umask only


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigurationError(f"{path}: no such file") from exc
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _unique(certs: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    seen: set[bytes] = set()
    out: list[x509.Certificate] = []
    for cert in certs:
        der = cert.public_bytes(serialization.Encoding.DER)
        if der not in seen:
            seen.add(der)
            out.append(cert)
    return out


def _load_cert_chain_pem(ctx: ssl.SSLContext, pem: bytes) -> None:
    """``ctx.load_cert_chain`` from bytes (Python's ssl only loads from a path)."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("vcc-pki-pair", os.MFD_CLOEXEC)
        try:
            _write_all(fd, pem)
            # Opening /proc/self/fd/N reopens the memfd from offset 0, as often as
            # OpenSSL likes (it opens the file once for the chain, once for the key).
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="vcc-pki-") as tmp:  # pragma: no cover - non-Linux
        path = Path(tmp) / "pair.pem"
        _write_new(path, pem, _KEY_MODE)
        ctx.load_cert_chain(path)
