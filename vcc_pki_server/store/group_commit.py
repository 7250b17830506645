"""Group commit: certificates from many callers recorded in one transaction, each answered alone.

A backend gives :class:`GroupCommit` a function that writes a batch in one transaction and
marks each item that failed (a spent enrolment token, a duplicate serial) in its ``error``;
if that function raises, the whole batch failed (BEGIN or COMMIT: nothing of it is stored).
A caller submits its certificates together with one callback, which the writer thread calls
once, after the last of them is committed or refused, with the error of each (``None`` when
recorded). One call per submission, not a future per certificate: the issuer hands over a
whole batch and wants one answer for it (a ``concurrent.futures.Future`` costs a condition
variable and a lock round per certificate). Batches form by themselves while a commit is in
flight; nobody waits for others to arrive.

Plain threads, no event loop: the HTTP layer decides how a coroutine waits for the answer.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from . import CertificateRecord, Outcomes, utc_text
from .rows import certificate_rows

log = logging.getLogger("vcc_pki_server.store")


class PendingCertificate:
    """One certificate waiting for the writer thread, its rows made by the caller."""

    __slots__ = ("audit", "consume_token", "error", "record", "row", "submission", "used_at")

    def __init__(self, record: CertificateRecord, actor: str, consume_token: str | None) -> None:
        self.record = record
        self.row, self.audit = certificate_rows(record, actor)
        self.consume_token = consume_token
        self.used_at = utc_text(record.issued_at)
        self.error: BaseException | None = None
        self.submission: _Submission | None = None


class _Submission:
    """Certificates submitted together, answered together (counted by the writer thread only)."""

    __slots__ = ("done", "items", "left")

    def __init__(self, items: list[PendingCertificate], done: Outcomes) -> None:
        self.items = items
        self.done = done
        self.left = len(items)


class GroupCommit:
    """The writer thread of one store object (started on the first certificate)."""

    def __init__(self, commit: Callable[[list[PendingCertificate]], None], *, name: str,
                 max_batch: int = 256) -> None:
        self._commit = commit
        self._name = name
        self.max_batch = max_batch
        self._pending: deque[PendingCertificate] = deque()
        self._cv = threading.Condition(threading.Lock())
        self._writer: threading.Thread | None = None
        self._closed = False

    def submit(self, items: list[PendingCertificate], done: Outcomes) -> None:
        """Queue ``items`` together; ``done`` is called once all are committed (or refused)."""
        if not items:
            done([])
            return
        submission = _Submission(items, done)
        for item in items:
            item.submission = submission
        with self._cv:
            if self._closed:
                raise RuntimeError("the store is closed")
            self._pending.extend(items)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name=self._name, daemon=True)
                self._writer.start()
            else:
                self._cv.notify()

    def close(self) -> None:
        """Commit what is queued, then stop the writer thread. Idempotent."""
        with self._cv:
            self._closed = True
            writer = self._writer
            self._cv.notify_all()
        if writer is not None and writer is not threading.current_thread():
            writer.join()

    def _write_loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if not self._pending:  # closed, and nothing left to commit
                    return
                batch = [self._pending.popleft() for _ in range(min(len(self._pending), self.max_batch))]
            try:
                self._commit(batch)
            except BaseException as exc:  # the whole batch failed; the thread goes on for later callers
                for item in batch:
                    item.error = exc
            for item in batch:
                submission = item.submission
                assert submission is not None
                submission.left -= 1
                if submission.left == 0:
                    try:
                        submission.done([i.error for i in submission.items])
                    except Exception:  # the caller's bug; the writer goes on for everyone else
                        log.exception("a group-commit callback failed")

