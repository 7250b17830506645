"""The SDK's HTTP transport to the PKI server: one httpx client, typed errors, retries.

Every foreign error is translated here, once, and chained: httpx's failures become
:class:`~vcc_pki_client.errors.TransportError` (a server certificate that does not verify
becomes :class:`~vcc_pki_client.errors.TrustError`), non-2xx answers go through
:func:`~vcc_pki_client.errors.error_from_problem`, bodies that are not the JSON the API
promises become :class:`~vcc_pki_client.errors.InvalidResponseError`.

Retries (:class:`Retry`) are chosen per call, because repeating a request is not always
harmless: a certificate request with a one-time enrolment token that timed out may have
spent the token on the server, so it is repeated only when it surely never left
(connection refused, connect timeout).
"""

from __future__ import annotations

import enum
import json
import ssl
import time
from collections.abc import Mapping
from typing import Any

import httpx

from .errors import (
    ConfigurationError,
    InvalidResponseError,
    PKIError,
    TransportError,
    TrustError,
    error_from_problem,
)
from .retry import RetryPolicy, is_transient, retry_transient

__all__ = ["API_PREFIX", "Connection", "Retry", "translate_httpx_error"]

API_PREFIX = "/api/v1"

# httpx failures raised before a single byte of the request went out.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class Retry(enum.Enum):
    """Which failures of one call are repeated (with back-off, per the retry policy)."""

    NEVER = "never"
    #: Only failures where the request surely never reached the server (connect errors).
    UNSENT = "unsent"
    #: Every transient failure: no usable answer, 5xx, 429. For idempotent calls and renew.
    TRANSIENT = "transient"


def translate_httpx_error(exc: httpx.HTTPError, method: str, url: str) -> PKIError:
    """The SDK error for an httpx failure (the caller chains it with ``raise ... from exc``).

    A server certificate that fails verification is a :class:`TrustError` (retrying cannot
    help); everything else is a :class:`TransportError`.
    """
    where = f"{method} {url}"
    cause: BaseException | None = exc
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:  # chains can loop through __context__
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLCertVerificationError):
            reason = getattr(cause, "verify_message", None) or str(cause)
            return TrustError(f"{where}: the server's certificate does not verify: {reason}")
        cause = cause.__cause__ or cause.__context__
    kind = type(exc).__name__
    detail = str(exc) or kind
    return TransportError(f"{where}: {kind}: {detail}")


def _sent(exc: BaseException) -> bool:
    """False when ``exc`` (a translated TransportError) failed before the request was sent."""
    return not isinstance(exc.__cause__, _NOT_SENT)


class Connection:
    """Requests to one PKI server over one httpx client (owned or lent by the caller).

    ``base_url`` is the server's root URL (``https://pki.internal:8443``); paths are below
    ``/api/v1`` unless they start with ``//`` (then they are taken from the root, e.g.
    ``//health``). ``retry_policy`` sets the attempts and back-off of retried calls.
    """

    def __init__(
        self,
        base_url: str,
        client: httpx.Client,
        *,
        owns_client: bool,
        retry_policy: RetryPolicy,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.client = client
        self.owns_client = owns_client
        self.retry_policy = retry_policy
        self._retired: list[tuple[float, httpx.Client]] = []  # replaced clients, and when to close them

    def url(self, path: str) -> str:
        """The absolute URL of an API path (``/certificates/x``) or a root path (``//health``)."""
        return self.base_url + (path[1:] if path.startswith("//") else API_PREFIX + path)

    def replace_client(self, client: httpx.Client, *, grace: float = 0.0) -> None:
        """Use ``client`` (owned) from now on. The previous one, if it was ours, is closed now,
        or with ``grace`` (seconds) at the first replacement after that long: requests still
        running on it finish (they are bounded by its timeout), new ones take the new client.
        """
        old, self.client = self.client, client
        if self.owns_client:
            now = time.monotonic()
            self._retired.append((now + grace, old))
            due = [c for at, c in self._retired if at <= now]
            self._retired = [(at, c) for at, c in self._retired if at > now]
            for each in due:
                each.close()
        self.owns_client = True

    def close(self) -> None:
        """Close the httpx client if it is ours (a lent one stays open), and any replaced one
        still kept. Idempotent."""
        retired, self._retired = self._retired, []
        for _, old in retired:
            old.close()
        if self.owns_client:
            self.client.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        token: str | None = None,
        retry: Retry = Retry.TRANSIENT,
    ) -> httpx.Response:
        """Send one call; return its 2xx response or raise the SDK error for it.

        ``token`` is sent as ``Authorization: Bearer``; otherwise the client certificate
        (if the httpx client has one) is the credential.
        """
        url = self.url(path)
        headers = {"Authorization": f"Bearer {token}"} if token else None

        def once() -> httpx.Response:
            try:
                response = self.client.request(method, url, json=body, params=params, headers=headers)
            except httpx.InvalidURL as exc:
                raise ConfigurationError(f"invalid PKI server URL {url!r}: {exc}") from exc
            except httpx.HTTPError as exc:
                raise translate_httpx_error(exc, method, url) from exc
            if not response.is_success:
                raise error_from_problem(response.status_code, response.content,
                                         response.headers.get("content-type"), method=method, url=url)
            return response

        if retry is Retry.NEVER:
            return once()
        if retry is Retry.UNSENT:
            return retry_transient(
                once, self.retry_policy, sleep=time.sleep,
                is_transient=lambda exc: isinstance(exc, TransportError) and not _sent(exc),
            )
        return retry_transient(once, self.retry_policy, sleep=time.sleep, is_transient=is_transient)

    def json(self, method: str, path: str, **kw: Any) -> Any:
        """:meth:`request`, then the body parsed as JSON (InvalidResponseError if it is not)."""
        response = self.request(method, path, **kw)
        try:
            return json.loads(response.content)
        except ValueError as exc:  # includes UnicodeDecodeError
            raise InvalidResponseError(
                f"{method} {self.url(path)}: the answer is not JSON "
                f"(content type {response.headers.get('content-type', 'none')!r})"
            ) from exc
