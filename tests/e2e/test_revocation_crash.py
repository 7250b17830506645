"""kill -9 during bursts of revocations never leaves a revoked serial off the CRL the restarted
server publishes (issue 18: the revocation and its CRL are one transaction)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
from cryptography import x509

from conftest import CA_PASSWORD, build_home
from support import RunningServer, tls_context
from vcc_pki_server.authority import Actor
from vcc_pki_server.home import Home


def revoked_in_store(home: Home) -> set[int]:
    auth = home.authority(None)
    try:
        return {int(serial, 16) for serial, _, _ in auth.store.revoked(unexpired_at=auth.clock())}
    finally:
        auth.store.close()


def test_kill_9_during_revocations_leaves_every_revoked_serial_on_the_crl(tmp_path: Path) -> None:
    home = build_home(tmp_path / "h")
    auth = home.authority(CA_PASSWORD)
    try:
        token = auth.create_admin_token(name="crash", expires_days=None, actor=Actor.operator()).value
        targets = [auth.issue_with_key(f"crash-{i}", common_name=f"crash-{i}", key_type="ec-p256",
                                       actor=Actor.operator())[0].record for i in range(45)]
    finally:
        auth.store.close()
    ctx = tls_context(home.root_cert)
    for round_ in range(3):
        batch = targets[round_ * 15:(round_ + 1) * 15]
        server = RunningServer(home, CA_PASSWORD).start()

        def revoke(service_id: str, serial: str, url: str = server.url) -> None:
            try:
                with httpx.Client(verify=ctx, timeout=10, headers={"Authorization": f"Bearer {token}"}) as c:
                    c.delete(f"{url}/api/v1/certificates/{service_id}/revoke", params={"serial": serial})
            except httpx.HTTPError:
                pass  # the server died under it: the point of the test

        threads = [threading.Thread(target=revoke, args=(r.service_id, r.serial)) for r in batch]
        for t in threads:
            t.start()
        time.sleep(0.05 + 0.1 * round_)  # kill at a different point of the burst each round
        server.stop(signal.SIGKILL)
        for t in threads:
            t.join(15)
        with RunningServer(home, CA_PASSWORD) as restarted, httpx.Client(verify=ctx, timeout=10) as c:
            listed = {e.serial_number for e in x509.load_der_x509_crl(c.get(f"{restarted.url}/api/v1/crl").content)}
        stored = revoked_in_store(home)
        assert stored - listed == set(), f"round {round_}: revoked but not on the CRL: {stored - listed}"
    assert len(stored) > 0  # revocations did happen
