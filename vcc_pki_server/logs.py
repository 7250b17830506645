"""The server's log output: one line per record on stderr, written in batches.

A busy server logs two INFO lines per certificate (the access line and the issuance line);
at INFO a server spent about 10 % more CPU per certificate than at WARNING. Flushed one by
one, as ``logging.StreamHandler`` does, each line is a ``write`` system call; written in
batches, with the date text made once a second, a certificate costs ~20 µs less (measured
with ``benchmarks/fastpath.py``). Here INFO and DEBUG
lines wait in the stream's buffer for at most ``interval`` seconds (a background thread
flushes them), WARNING and above are written at once together with everything before them,
and the buffer is flushed before a fork, when the handler closes (``logging.shutdown()``,
which runs at exit) and by the handler's ``flush()``. Only a process killed outright (SIGKILL, power loss)
loses its last fraction of a second of INFO lines; every state change is also in the audit
log, which is committed with the change.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
import weakref
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class BatchedStreamHandler(logging.StreamHandler[TextIO]):
    """A ``StreamHandler`` that flushes every ``interval`` seconds rather than every record."""

    def __init__(self, stream: TextIO, *, interval: float = 0.2) -> None:
        super().__init__(stream)
        self.interval = interval
        self._closed = threading.Event()
        self._start_flusher()
        ref = weakref.ref(self)  # the fork hooks must not keep the handler alive

        def before_fork() -> None:
            handler = ref()
            if handler is not None:
                handler.flush()  # else the child would write the parent's buffered lines again

        def in_child() -> None:
            handler = ref()
            if handler is not None and not handler._closed.is_set():
                handler._start_flusher()  # threads do not survive a fork

        os.register_at_fork(before=before_fork, after_in_child=in_child)

    def _start_flusher(self) -> None:
        ref = weakref.ref(self)
        closed, interval = self._closed, self.interval

        def run() -> None:
            while not closed.wait(interval):
                handler = ref()
                if handler is None:
                    return
                handler.flush()
                del handler

        threading.Thread(target=run, name="log-flush", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # Called by Handler.handle() with the handler's lock held, as the flusher's flush().
            self.stream.write(self.format(record) + self.terminator)
            if record.levelno >= logging.WARNING:
                self.stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self._closed.set()
        self.flush()
        super().close()


# Control characters other than newline and tab (a traceback has those) in a log line: text a
# client chose (a health URL, a service name) must not move an operator's terminal cursor.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class Formatter(logging.Formatter):
    """``FORMAT``, with the date and time text made once per second rather than per record, and
    control characters written as escapes."""

    def __init__(self) -> None:
        super().__init__(FORMAT)
        self._second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if _CONTROL.search(text) is None:  # the common case costs one scan
            return text
        return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        cached, text = self._second
        if cached != second:
            text = time.strftime(self.default_time_format, self.converter(second))
            self._second = (second, text)
        return "%s,%03d" % (text, record.msecs)  # as default_msec_format


class JSONFormatter(logging.Formatter):
    """``--log-format json``: one JSON object per line with the text form's fields — ``time``
    (UTC, RFC 3339 with milliseconds), ``level``, ``logger``, ``message`` — and ``exception``
    (the traceback text) when there is one. JSON escapes every control character."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        body = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%03dZ" % record.msecs,
                "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False)


def configure(level: str, stream: TextIO | None = None, *, fmt: str = "text") -> BatchedStreamHandler:
    """Log ``level`` and above to ``stream`` (a buffered copy of stderr by default) in batches,
    as text lines (``fmt="text"``) or JSON objects (``"json"``)."""
    if stream is None:
        # stderr itself is line-buffered (each line one write); this one buffers 64 KiB.
        stream = open(sys.stderr.fileno(), "w", buffering=1 << 16, encoding="utf-8",  # noqa: SIM115
                      errors="backslashreplace", closefd=False)
    handler = BatchedStreamHandler(stream)
    handler.setFormatter(JSONFormatter() if fmt == "json" else Formatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # The format uses none of these: skip collecting them for every record. See
    # "Optimization" in the logging HOWTO.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    return handler
