"""The server's batched log output (vcc_pki_server.logs): nothing lost, nothing twice, in order."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vcc_pki_server import logs


@pytest.fixture
def handler(tmp_path: Path) -> Iterator[tuple[logging.Logger, Path, logs.BatchedStreamHandler]]:
    path = tmp_path / "server.log"
    stream = open(path, "w", buffering=1 << 16, encoding="utf-8")  # block-buffered, as configure()'s
    h = logs.BatchedStreamHandler(stream, interval=0.2)
    h.setFormatter(logs.Formatter())
    logger = logging.getLogger(f"test-logs-{id(h)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(h)
    yield logger, path, h
    logger.removeHandler(h)
    h.close()
    stream.close()


def wait_for(path: Path, count: int, timeout: float = 3.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(lines := path.read_text().splitlines()) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return lines


def test_info_lines_are_held_then_written_together_in_order(tmp_path: Path) -> None:
    path = tmp_path / "held.log"
    stream = open(path, "w", buffering=1 << 16, encoding="utf-8")
    h = logs.BatchedStreamHandler(stream, interval=60)  # no periodic flush during this test
    h.setFormatter(logs.Formatter())
    try:
        for i in range(100):
            h.handle(logging.makeLogRecord({"msg": "line %d", "args": (i,), "levelno": logging.INFO,
                                            "levelname": "INFO"}))
        assert path.read_text() == ""  # in the buffer: not one write per line
        h.flush()
        assert [line.rsplit(" ", 1)[1] for line in path.read_text().splitlines()] == [str(i) for i in range(100)]
    finally:
        h.close()
        stream.close()


def test_the_flusher_writes_held_lines_within_its_interval(
        handler: tuple[logging.Logger, Path, logs.BatchedStreamHandler]) -> None:
    logger, path, _ = handler  # interval 0.2 s
    logger.info("soon")
    assert [line.split(" ", 3)[3] for line in wait_for(path, 1)] == [f"{logger.name} soon"]


def test_a_warning_is_written_at_once_with_everything_before_it(
    handler: tuple[logging.Logger, Path, logs.BatchedStreamHandler],
) -> None:
    logger, path, _ = handler
    logger.info("before")
    logger.warning("trouble")
    assert [line.split(" ", 3)[2:] for line in path.read_text().splitlines()] == [
        ["INFO", f"{logger.name} before"], ["WARNING", f"{logger.name} trouble"]]


def test_close_writes_what_is_held(tmp_path: Path) -> None:
    path = tmp_path / "closing.log"
    stream = open(path, "w", buffering=1 << 16, encoding="utf-8")
    h = logs.BatchedStreamHandler(stream, interval=60)
    h.setFormatter(logs.Formatter())
    h.handle(logging.makeLogRecord({"msg": "last words", "levelno": logging.INFO, "levelname": "INFO"}))
    assert path.read_text() == ""
    h.close()  # as logging.shutdown() does at exit
    assert path.read_text().endswith("last words\n")
    stream.close()


def test_a_forked_child_neither_repeats_the_parents_lines_nor_loses_its_own(
        handler: tuple[logging.Logger, Path, logs.BatchedStreamHandler]) -> None:
    logger, path, _ = handler
    logger.info("parent before fork")  # buffered in the parent when it forks
    pid = os.fork()
    if pid == 0:  # the child: its flusher thread must run again after the fork
        try:
            logger.info("child")
            deadline = time.monotonic() + 5  # exit (without flushing) once it is written
            while "child" not in path.read_text() and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    lines = wait_for(path, 2)
    messages = sorted(line.split(" ", 4)[4] for line in lines)
    assert messages == ["child", "parent before fork"]


def test_the_format_is_the_standard_one() -> None:
    record = logging.makeLogRecord({"name": "vcc_pki_server.access", "msg": "client=%s", "args": ("1.2.3.4",),
                                    "levelno": logging.INFO, "levelname": "INFO", "created": 1_790_000_000.25,
                                    "msecs": 250.0})
    standard = logging.Formatter(logs.FORMAT)
    ours = logs.Formatter()
    assert ours.format(record) == standard.format(record)
    later = logging.makeLogRecord({**record.__dict__, "created": 1_790_000_001.5, "msecs": 500.0})
    assert ours.format(later) == standard.format(later)  # a new second: a new date text


def test_control_characters_from_clients_are_escaped_in_log_lines() -> None:
    """Issue 18: a health URL or service name with terminal escapes is logged escaped."""
    record = logging.LogRecord("vcc_pki_server.health", logging.WARNING, __file__, 1,
                               "health service_id=%s error=%s", ("svc", "host \x1b[2J\x1b]0;owned\x07 bad"), None)
    line = logs.Formatter().format(record)
    assert "\x1b" not in line and "\x07" not in line
    assert "host \\x1b[2J\\x1b]0;owned\\x07 bad" in line
    plain = logging.LogRecord("x", logging.INFO, __file__, 1, "tab\tstays", (), None)
    assert logs.Formatter().format(plain).endswith("tab\tstays")
