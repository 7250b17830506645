"""The CA core's errors: each carries a stable machine-readable ``code``; the API maps codes to HTTP.

::

    CAError                 .code
    ├── InvalidRequest      malformed_request / invalid_field   (bad input that is not a CSR)
    ├── InvalidCSR          invalid_csr
    ├── PolicyRefused       policy_refused
    ├── NotAuthenticated    not_authenticated / invalid_token
    ├── NotPermitted        not_permitted
    ├── NotFound            unknown_service / unknown_certificate / not_found
    ├── Conflict            conflict / already_revoked
    └── CAUnavailable       unavailable (wrong password, missing CA files)
"""

from __future__ import annotations


class CAError(Exception):
    """Base of every error the core raises on purpose; ``str(err)`` is a one-line message for users."""

    code = "ca_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class InvalidRequest(CAError):
    """The request is malformed, or one of its fields is invalid."""

    code = "invalid_field"


class InvalidCSR(CAError):
    """The CSR cannot be parsed, its signature is wrong, or its key is too weak."""

    code = "invalid_csr"


class PolicyRefused(CAError):
    """The request is well formed but asks for something the policy does not allow."""

    code = "policy_refused"


class NotAuthenticated(CAError):
    """No credentials, or credentials that identify nobody."""

    code = "not_authenticated"


class NotPermitted(CAError):
    """The caller is known but may not do this."""

    code = "not_permitted"


class NotFound(CAError):
    """The named service, certificate or token does not exist."""

    code = "not_found"


class UnknownService(NotFound):
    code = "unknown_service"

    def __init__(self, service_id: str) -> None:
        super().__init__(f"unknown service '{service_id}'")
        self.service_id = service_id


class Conflict(CAError):
    """The request conflicts with the current state (an existing id, an already revoked certificate)."""

    code = "conflict"


class CAUnavailable(CAError):
    """The CA cannot sign: missing CA files or a wrong CA password."""

    code = "unavailable"  # the client SDK maps it to ServerError (retryable)
