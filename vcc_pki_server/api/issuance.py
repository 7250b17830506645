"""``POST /api/v1/certificates/request``: the one handler of certificate requests.

Certificate requests are nearly all of a busy server's traffic. The handler is a plain ASGI
callable (registered in the route table, reached by the edge's direct dispatch): on the event
loop it only reads and parses the body; who asks, the policy check and the signature happen in
the :class:`Issuer`'s thread, and the store records the certificate in its group commit. No
store call (token, service and certificate reads included) runs on the event loop, so a
database that stops answering stalls certificate requests, not the server.

Hops are batched both ways: the issuer's thread takes every request waiting when it wakes,
signs them and hands them to the store's group commit together; once the batch is recorded
its answers reach each event loop through one mailbox, woken once per batch rather than once per request
(``loop.call_soon_threadsafe`` writes to the loop's self-pipe each time; thread hand-overs
under the GIL cost more than the work they move, measured in docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import threading
from collections import deque
from datetime import timedelta
from typing import Any

from starlette.types import Receive, Scope, Send

from .. import render
from ..authority import Actor, Authority, Issued
from ..errors import CAUnavailable
from ..policy import check_service_id
from .requests import adopt_actor, authenticate_scope, field, parse_json_body, read_body, requested_lifetime

ISSUE_PATH = "/api/v1/certificates/request"

# What JSONResponse renders (starlette.responses.JSONResponse.render), with one encoder.
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))
_JSON_TYPE = (b"content-type", b"application/json")


def issue_arguments(body: dict[str, Any]) -> tuple[str, str, timedelta | None]:
    """``(service_id, csr, lifetime)`` of a certificate request's body, checked."""
    service_id = check_service_id(field(body, "service_id", str))
    csr = field(body, "csr", str)
    return service_id, csr or "", requested_lifetime(body)


class RequestCertificate:
    """Parse, then hand the request to the issuer; 201 with the certificate and its chain.

    Errors are raised for the edge to answer (problem documents, access log). A class so that
    Starlette's ``Route`` takes it for the ASGI callable it is."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        length = content_type = authorization = None
        for name, value in scope["headers"]:  # the first of each, as Request.headers.get
            if name == b"content-length":
                if length is None:
                    length = value.decode("latin-1")
            elif name == b"content-type":
                if content_type is None:
                    content_type = value.decode("latin-1")
            elif name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
        raw = await read_body(receive, length)
        service_id, csr, validity = issue_arguments(parse_json_body(raw, content_type))
        issuer: Issuer = scope["app"].state.issuer
        issued = await issuer.issue(authorization, scope, service_id, csr, validity)
        operation = "enroll" if scope["state"].get("enrolment") else "issue"
        scope["app"].metrics.certificate_issued(operation)
        body = _JSON.encode(render.issued(issued)).encode("utf-8")
        await send({"type": "http.response.start", "status": 201,
                    "headers": [(b"content-length", str(len(body)).encode("latin-1")), _JSON_TYPE]})
        await send({"type": "http.response.body", "body": body})


request_certificate = RequestCertificate()


class _Mailbox:
    """Answers for one event loop, posted from any thread, delivered in batches."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Future[Issued], Issued | BaseException]] = []

    def post(self, answers: list[tuple[asyncio.Future[Issued], Issued | BaseException]]) -> None:
        with self._lock:
            first = not self._items
            self._items += answers
        if first:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for waiter, outcome in items:
            if waiter.done():  # the request was cancelled (client gone, shutdown)
                continue
            if isinstance(outcome, BaseException):
                waiter.set_exception(outcome)
            else:
                waiter.set_result(outcome)


_Job = tuple[_Mailbox, "asyncio.Future[Issued]", "str | None", Scope, str, str, "timedelta | None"]


class Issuer:
    """One thread per process that authenticates, checks and signs certificate requests."""

    def __init__(self, authority: Authority, *, timeout: float = 10.0) -> None:
        self.authority = authority
        self.timeout = timeout  # the database deadline: a request not answered by then is 503
        self._jobs: deque[_Job] = deque()
        self._cv = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._mailboxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}
        self._closed = False

    async def issue(self, authorization: str | None, scope: Scope, service_id: str, csr: str,
                    validity: timedelta | None) -> Issued:
        """The certificate, once recorded; raises what :meth:`Authority.issue` raises."""
        loop = asyncio.get_running_loop()
        mailbox = self._mailboxes.get(loop)
        if mailbox is None:
            mailbox = self._mailboxes.setdefault(loop, _Mailbox(loop))
        waiter: asyncio.Future[Issued] = loop.create_future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the issuer is closed")
            self._jobs.append((mailbox, waiter, authorization, scope, service_id, csr, validity))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="issuer", daemon=True)
                self._thread.start()
            else:
                self._cv.notify()
        # The database deadline. A request not yet taken is then skipped by the thread; one
        # taken may still be recorded (outcome unknown to the client, as with any timeout).
        deadline = loop.call_later(self.timeout, self._expire, waiter)
        try:
            return await waiter
        finally:
            deadline.cancel()

    def _expire(self, waiter: asyncio.Future[Issued]) -> None:
        if not waiter.done():
            waiter.set_exception(CAUnavailable(f"the database did not answer within {self.timeout:g} s"))

    def close(self) -> None:
        """Finish the requests taken, then stop the thread. Idempotent."""
        with self._cv:
            self._closed = True
            thread = self._thread
            self._cv.notify_all()
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        authority = self.authority
        while True:
            with self._cv:
                while not self._jobs and not self._closed:
                    self._cv.wait()
                if not self._jobs:
                    return
                jobs = list(self._jobs)
                self._jobs.clear()
            # Sign the whole batch and hand it to the store's group commit at once (one
            # transaction); its answers go back together once all are recorded, while this
            # thread signs the next batch.
            refused: list[_Answer] = []
            signed: list[tuple[Issued, Actor]] = []
            waiting: list[tuple[_Mailbox, asyncio.Future[Issued]]] = []
            # A bearer token is looked up once per batch: the requests of one batch arrived
            # together, and each store read here hands the GIL back to the event loop's thread.
            # Enrolment tokens are not kept (each spends its token; the store says which wins).
            tokens: dict[str, Actor] = {}
            for mailbox, waiter, authorization, scope, service_id, csr, validity in jobs:
                if waiter.done():  # answered already: past the deadline, or the client went away
                    continue
                try:
                    known = tokens.get(authorization) if authorization else None
                    if known is not None:
                        actor = known
                        adopt_actor(scope, actor)
                    else:
                        actor = authenticate_scope(authority, authorization, scope)
                        if authorization and actor.kind == "admin":
                            tokens[authorization] = actor
                    signed.append((authority.sign_request(service_id, csr, actor=actor,
                                                          validity=validity), actor))
                except BaseException as exc:
                    refused.append((mailbox, waiter, exc))
                else:
                    waiting.append((mailbox, waiter))
            if refused:
                _post(refused)
            if signed:
                answer = functools.partial(_answer_recorded, waiting)
                try:
                    authority.record_issued(signed, answer)
                except BaseException as exc:  # the store is closed
                    answer([exc] * len(waiting))


_Answer = tuple[_Mailbox, "asyncio.Future[Issued]", "Issued | BaseException"]


def _answer_recorded(waiting: list[tuple[_Mailbox, asyncio.Future[Issued]]],
                     outcomes: list[Issued | BaseException]) -> None:
    """Post a batch's answers once its certificates are recorded (the store's writer thread)."""
    _post([(mailbox, waiter, outcome)
           for (mailbox, waiter), outcome in zip(waiting, outcomes, strict=True)])


def _post(answers: list[_Answer]) -> None:
    by_loop: dict[_Mailbox, list[tuple[asyncio.Future[Issued], Issued | BaseException]]] = {}
    for mailbox, waiter, outcome in answers:
        by_loop.setdefault(mailbox, []).append((waiter, outcome))
    for mailbox, batch in by_loop.items():
        mailbox.post(batch)

