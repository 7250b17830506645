"""Group commit: certificates from many callers recorded in one transaction, each answered alone.

A backend gives :class:`GroupCommit` a function that writes a batch in one transaction and
marks each item that failed (a spent enrolment token, a duplicate serial) in its ``error``;
if that function raises, the whole batch failed (BEGIN or COMMIT: nothing of it is stored).
Callers get a :class:`concurrent.futures.Future` at once and wait on it, or hang work on it,
as they like: the writer thread settles every future of a batch after its commit. Batches
form by themselves while a commit is in flight; nobody waits for others to arrive.

Plain threads, no event loop: the HTTP layer decides how a coroutine waits for a future.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from . import CertificateRecord, utc_text
from .rows import certificate_rows


class PendingCertificate:
    """One certificate waiting for the writer thread, its rows made by the caller."""

    __slots__ = ("audit", "consume_token", "error", "future", "record", "row", "used_at")

    def __init__(self, record: CertificateRecord, actor: str, consume_token: str | None) -> None:
        self.record = record
        self.row, self.audit = certificate_rows(record, actor)
        self.consume_token = consume_token
        self.used_at = utc_text(record.issued_at)
        self.error: BaseException | None = None
        self.future: Future[None] = Future()
        self.future.set_running_or_notify_cancel()


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

    def submit(self, items: list[PendingCertificate]) -> list[Future[None]]:
        """Queue ``items`` together; each future settles once committed (or refused)."""
        with self._cv:
            if self._closed:
                raise RuntimeError("the store is closed")
            self._pending.extend(items)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name=self._name, daemon=True)
                self._writer.start()
            else:
                self._cv.notify()
        return [item.future for item in items]

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
                if item.error is None:
                    item.future.set_result(None)
                else:
                    item.future.set_exception(item.error)
