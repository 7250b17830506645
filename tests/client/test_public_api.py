"""The SDK's public surface, pinned: what ``from vcc_pki_client import *`` gives, and the error codes."""

from __future__ import annotations

import inspect

import vcc_pki_client
from vcc_pki_client.errors import CODE_TO_ERROR, APIError, PKIError
from vcc_pki_server.api.problems import STATUS_BY_CODE

PUBLIC_API = [
    "APIError",
    "AsyncPKIClient",
    "AuthenticationError",
    "CertificateFiles",
    "CertificateInfo",
    "ConfigurationError",
    "ConflictError",
    "InvalidResponseError",
    "IssuedCertificate",
    "NotFoundError",
    "PKIClient",
    "PKIError",
    "Page",
    "PermissionDeniedError",
    "PolicyRefusedError",
    "ReloadingContexts",
    "RenewalError",
    "RenewalPolicy",
    "RequestRejectedError",
    "RetryPolicy",
    "ServerError",
    "ServiceEntry",
    "ServiceHealth",
    "TransportError",
    "TrustError",
    "peer_service_id",
]

# SPEC §7 names these; renaming one breaks every service that uses the SDK.
SPEC_METHODS = [
    "enroll", "request_certificate", "renew", "revoke", "register_service", "get_service_certificate",
    "get_ca_bundle", "get_crl", "is_revoked", "server_ssl_context", "client_ssl_context", "httpx_client",
    "enable_auto_renewal", "disable_auto_renewal", "close",
]


def test_all_is_pinned_and_sorted() -> None:
    assert vcc_pki_client.__all__ == PUBLIC_API
    assert sorted(PUBLIC_API) == PUBLIC_API


def test_every_name_in_all_exists() -> None:
    for name in vcc_pki_client.__all__:
        assert getattr(vcc_pki_client, name) is not None, name


def test_version_is_the_distribution_version() -> None:
    from importlib.metadata import version

    assert vcc_pki_client.__version__ == version("vcc-pki")


def test_every_exception_derives_from_pki_error() -> None:
    for name in PUBLIC_API:
        obj = getattr(vcc_pki_client, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            assert issubclass(obj, PKIError), name
            assert name.endswith("Error"), name


def test_every_server_error_code_has_a_client_class() -> None:
    missing = sorted(set(STATUS_BY_CODE) - set(CODE_TO_ERROR))
    assert not missing, f"server codes without a client class: {missing}"
    for code, status in STATUS_BY_CODE.items():
        cls = CODE_TO_ERROR[code]
        assert issubclass(cls, APIError)
        # 4xx codes map to 4xx classes, 5xx to ServerError: retry decisions depend on it.
        assert issubclass(cls, vcc_pki_client.ServerError) == (status >= 500), code


def test_spec_names_and_constructor_keywords() -> None:
    for name in SPEC_METHODS:
        assert callable(getattr(vcc_pki_client.PKIClient, name)), name
    params = inspect.signature(vcc_pki_client.PKIClient).parameters
    for keyword in ("pki_server_url", "service_id", "cert_file", "key_file", "ca_bundle", "root_fingerprint",
                    "enrolment_token", "enrollment_token", "http_client"):
        assert keyword in params, keyword
    assert "on_renewed" in inspect.signature(vcc_pki_client.PKIClient.enable_auto_renewal).parameters


ASYNC_METHODS = [
    "enroll", "ensure_enrolled", "request_certificate", "renew", "revoke", "register_service", "discover",
    "list_services", "get_service_certificate", "get_ca_bundle", "get_crl", "is_revoked", "renew_now", "refresh_crl",
]
SYNC_METHODS = ["server_ssl_context", "client_ssl_context", "enable_auto_renewal", "disable_auto_renewal"]


def test_async_client_mirrors_the_sync_client() -> None:
    sync, aio = vcc_pki_client.PKIClient, vcc_pki_client.AsyncPKIClient
    assert inspect.signature(aio) == inspect.signature(sync)  # same constructor
    for name in ASYNC_METHODS:
        assert inspect.iscoroutinefunction(getattr(aio, name)), name
        assert inspect.signature(getattr(aio, name)) == inspect.signature(getattr(sync, name)), name
    for name in SYNC_METHODS:
        assert not inspect.iscoroutinefunction(getattr(aio, name)), name
        assert inspect.signature(getattr(aio, name)) == inspect.signature(getattr(sync, name)), name
    for name in ("enrolled", "certificate"):
        assert isinstance(getattr(aio, name), property), name
    assert inspect.iscoroutinefunction(aio.aclose) and inspect.iscoroutinefunction(aio.httpx_async_client) is False


def test_the_server_helpers_do_not_load_the_whole_sdk() -> None:
    """pki-admin and the server use vcc_pki_client.keys/.files: that must not import httpx or
    APScheduler (≈ 80 ms on every pki-admin command), while every public name still resolves."""
    import subprocess
    import sys

    code = ("import sys, vcc_pki_client.keys, vcc_pki_client.files, vcc_pki_server.cli; "
            "print(sorted(m for m in ('httpx', 'apscheduler') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert sorted(vcc_pki_client._HOME) == PUBLIC_API
    assert set(dir(vcc_pki_client)) >= set(PUBLIC_API)
