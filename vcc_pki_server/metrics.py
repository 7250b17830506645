"""Prometheus metrics (SPEC §12): what ``GET /metrics`` answers.

Two sources, one exposition:

- **Counted where it happens**, with prometheus_client: requests by route and status, their
  durations, certificates issued by operation, which roles of the cluster this server leads.
  ``vcc-pki-server`` shares these between its worker processes through prometheus_client's
  multiprocess mode (:func:`share_between_processes`: one memory-mapped file per process in a
  directory made at start), so whichever worker answers a scrape reports the server's totals,
  not its own share. They start at zero when the server starts, as Prometheus counters do.
- **Read at scrape time** from the store and the CA, in one thread hop: the newest CRL, each
  registered service's current certificate and health, revocations by reason (those made with
  ``pki-admin`` too), the CA certificates' expiry. The same answer from every worker and every
  replica, and no bookkeeping on the issuance path.

A process that never calls :func:`share_between_processes` (an app made in a test, or the
testing kit) counts in memory, per :class:`Metrics` object.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from .authority import Authority
from .store import CRLRecord

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPERATIONS = ("enroll", "issue", "renew", "rekey")
HEALTH_VALUES = {"healthy": 1.0, "unhealthy": 0.0}  # anything else (unknown): -1
_MULTIPROCESS = "PROMETHEUS_MULTIPROC_DIR"


def process_ended(pid: int) -> None:
    """A worker ended: its live gauges (the lead) no longer count; its counts still do."""
    directory = os.environ.get(_MULTIPROCESS)
    if directory:
        mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


def share_between_processes(directory: Path) -> None:
    """Count in ``directory`` (made empty, mode 0700) from now on, in this process and in the
    processes forked from it: call once, before any :class:`Metrics` is made and before the
    workers fork. prometheus_client chooses where values live when its first metric is made,
    from the environment; the choice is made again here because it was imported earlier."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):  # a previous run's counts are not this server's
        stale.unlink()
    os.environ[_MULTIPROCESS] = str(directory)
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


class StoreFigures(Collector):
    """The CRL and CA gauges and the revocations (a total kept by the store), read at scrape time."""

    def __init__(self, authority: Authority) -> None:
        self.authority = authority

    def collect(self) -> Iterator[Any]:
        authority = self.authority
        store = authority.store
        # The newest CRL of each issuer (one, or a few while intermediates rotate).
        newest: dict[str, CRLRecord] = {}
        for record in store.list_crls(50):
            newest.setdefault(record.issuer, record)
        number = GaugeMetricFamily("vcc_pki_crl_number", "Number of the newest CRL (0: none yet)")
        entries = GaugeMetricFamily("vcc_pki_crl_entries", "Revoked certificates the CRLs in force list")
        next_update = GaugeMetricFamily("vcc_pki_crl_next_update_timestamp_seconds",
                                        "nextUpdate of the CRL in force that expires first (Unix time)")
        if newest:
            number.add_metric([], max(c.number for c in newest.values()))
            entries.add_metric([], sum(c.entries for c in newest.values()))
            next_update.add_metric([], min(c.next_update for c in newest.values()).timestamp())
        else:
            number.add_metric([], 0)
        yield from (number, entries, next_update)

        revoked = CounterMetricFamily("vcc_pki_revocations", "Certificates revoked, by reason (kept by the store)",
                                      labels=["reason"])
        for reason, count in sorted(store.revocation_counts().items()):
            revoked.add_metric([reason], count)
        yield revoked

        ca = GaugeMetricFamily("vcc_pki_ca_expiry_timestamp_seconds", "notAfter of the CA certificates (Unix time)",
                               labels=["ca"])
        ca.add_metric(["root"], authority.ca.root.not_valid_after_utc.timestamp())
        ca.add_metric(["intermediate"], authority.ca.certificate.not_valid_after_utc.timestamp())  # the current
        yield ca


class Metrics:
    """The metrics of one app: the counters its handlers and edge feed, and :meth:`exposition`."""

    def __init__(self, authority: Authority) -> None:
        self.authority = authority
        directory = os.environ.get(_MULTIPROCESS) if values.ValueClass is not values.MutexValue else None
        self.registry = CollectorRegistry(auto_describe=False)
        # Shared between processes: the counters live in files the collector sums at scrape
        # time (registering them too would report this process's share beside the totals).
        own = None if directory else self.registry
        if directory:
            MultiProcessCollector(self.registry, path=directory)  # type: ignore[no-untyped-call]
        self.registry.register(StoreFigures(authority))
        self.requests = Counter("vcc_pki_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=own)
        self.durations = Histogram("vcc_pki_request_duration_seconds",
                                   "Time from a request's arrival to its answer, by route", ["route"],
                                   registry=own)
        self.issued = Counter("vcc_pki_certificates_issued", "Certificates issued, by operation",
                              ["operation"], registry=own)
        # Which process leads the cluster's background work (Store.lead): 1 in the server whose
        # worker holds the lead; the largest of the server's live workers.
        self.leading = Gauge("vcc_pki_lead", "1 while this server leads the cluster's background work of the role",
                             ["role"], registry=own, multiprocess_mode="livemax")
        authority.store.lead_watcher = lambda role, held: self.leading.labels(role).set(1 if held else 0)
        # Every operation present at 0 from the start: rate() needs a first sample.
        self._issued = {operation: self.issued.labels(operation) for operation in OPERATIONS}
        self._requests: dict[tuple[str, int], Any] = {}
        self._durations: dict[str, Any] = {}

    def request(self, route: str, status: int, seconds: float) -> None:
        """One request answered (the edge calls this for every request)."""
        counter = self._requests.get((route, status))
        if counter is None:
            counter = self._requests[(route, status)] = self.requests.labels(route, str(status))
        timer = self._durations.get(route)
        if timer is None:
            timer = self._durations[route] = self.durations.labels(route)
        counter.inc()
        timer.observe(seconds)

    def certificate_issued(self, operation: str) -> None:
        """One certificate handed out: ``enroll``, ``issue``, ``renew`` or ``rekey``."""
        self._issued[operation].inc()

    def exposition(self) -> bytes:
        """The text format. Blocking (reads the store): call it off the event loop."""
        return generate_latest(self.registry) + fleet_text(self.authority)


# The families with a sample per service, written here rather than by generate_latest, which
# validates and escapes every label of every sample: with 1,000 services that was 20 of a
# scrape's 30 ms (docs/performance.md, "Metrics scrape"). Service ids are lower-case LDH labels
# (policy.check_service_id), so a label value needs no escaping.
_FLEET_FAMILIES = (
    ("vcc_pki_certificate_expiry_timestamp_seconds", "notAfter of each service's current certificate (Unix time)"),
    ("vcc_pki_certificate_not_before_timestamp_seconds",
     "notBefore of each service's current certificate (Unix time)"),
    ("vcc_pki_service_health", "Health of each service: 1 healthy, 0 unhealthy, -1 unknown"),
)


def fleet_text(authority: Authority) -> bytes:
    """Each registered service's current certificate (notAfter, notBefore; none without one)
    and health, in the text format."""
    expiry: list[str] = []
    not_before: list[str] = []
    health: list[str] = []
    for service in authority.store.fleet(authority.clock()):
        label = f'{{service_id="{service.service_id}"}} '
        if service.not_after is not None and service.not_before is not None:
            expiry.append(label + repr(service.not_after.timestamp()))
            not_before.append(label + repr(service.not_before.timestamp()))
        health.append(label + repr(HEALTH_VALUES.get(service.health_status, -1.0)))
    lines: list[str] = []
    for (name, documentation), samples in zip(_FLEET_FAMILIES, (expiry, not_before, health), strict=True):
        lines += (f"# HELP {name} {documentation}", f"# TYPE {name} gauge", *(name + s for s in samples))
    return ("\n".join(lines) + "\n").encode()
