"""VCC PKI client SDK: enrol a service, keep its certificate fresh, and speak mutual TLS with its peers.

Example::

    from vcc_pki_client import PKIClient

    with PKIClient("https://pki.internal:8443", service_id="billing",
                   cert_file="tls/cert.pem", key_file="tls/key.pem",
                   root_fingerprint="sha256:9f2c...") as pki:
        pki.enroll(token)
        pki.enable_auto_renewal(renew_before_days=30)
        with pki.httpx_client() as http:
            http.get("https://inventory:9443/items")

Asyncio services use :class:`AsyncPKIClient` (same surface, ``await``-able network calls).

Everything the SDK raises on purpose derives from :class:`PKIError` (see
:mod:`vcc_pki_client.errors`).
"""

from __future__ import annotations

import importlib
from importlib import metadata as _metadata
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .aio import AsyncPKIClient
    from .client import PKIClient
    from .errors import (
        APIError,
        AuthenticationError,
        ConfigurationError,
        ConflictError,
        InvalidResponseError,
        NotFoundError,
        PermissionDeniedError,
        PKIError,
        PolicyRefusedError,
        RenewalError,
        RequestRejectedError,
        ServerError,
        TransportError,
        TrustError,
    )
    from .files import CertificateFiles
    from .identity import peer_service_id
    from .renewal import RenewalPolicy
    from .retry import RetryPolicy
    from .tls import ReloadingContexts
    from .wire import CertificateInfo, IssuedCertificate, Page, ServiceEntry, ServiceHealth

# Where each public name lives. Imported on first use (PEP 562), so that importing one module
# of the package (the server uses ``vcc_pki_client.keys`` and ``.files`` helpers) does not load
# httpx and APScheduler with the rest of the SDK.
_HOME = {
    "AsyncPKIClient": "aio", "PKIClient": "client", "CertificateFiles": "files", "RenewalPolicy": "renewal",
    "RetryPolicy": "retry", "ReloadingContexts": "tls", "peer_service_id": "identity",
    **dict.fromkeys(("CertificateInfo", "IssuedCertificate", "Page", "ServiceEntry", "ServiceHealth"), "wire"),
    **dict.fromkeys(("APIError", "AuthenticationError", "ConfigurationError", "ConflictError",
                     "InvalidResponseError", "NotFoundError", "PermissionDeniedError", "PKIError",
                     "PolicyRefusedError", "RenewalError", "RequestRejectedError", "ServerError",
                     "TransportError", "TrustError"), "errors"),
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])


try:
    __version__ = _metadata.version("vcc-pki")
except _metadata.PackageNotFoundError:  # pragma: no cover - a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
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
