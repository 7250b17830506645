"""What the SDK accepts from the CA's bundle when the CA rotates (SPEC §13): a new root only
through a cross-certificate signed by a root it already trusts."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509

from vcc_pki_client import TrustError
from vcc_pki_client.trust import judge_bundle
from vcc_pki_server.ca import create_cross_certificate, create_intermediate, create_root, generate_key

NOW = datetime.now(timezone.utc)


def root(name: str) -> tuple[x509.Certificate, object]:
    key = generate_key("ec-p256")
    return create_root(key, now=NOW - timedelta(hours=1), common_name=name), key


def test_a_new_root_is_trusted_through_its_cross_certificate_and_the_retired_one_dropped() -> None:
    old, old_key = root("Old Root")
    new, new_key = root("New Root")
    cross = create_cross_certificate(new, old, old_key, now=NOW - timedelta(minutes=5))  # type: ignore[arg-type]
    old_int = create_intermediate(old, old_key, generate_key("ec-p256"), now=NOW, common_name="Int 1")  # type: ignore[arg-type]
    new_int = create_intermediate(new, new_key, generate_key("ec-p256"), now=NOW, common_name="Int 2")  # type: ignore[arg-type]

    overlap = judge_bundle([new_int, old_int, old, new, cross], [old], now=NOW)
    assert overlap.roots == (old, new) and overlap.added == (new,) and overlap.dropped == ()
    assert overlap.intermediates == (new_int, old_int) and overlap.crosses == (cross,)

    retired = judge_bundle([new_int, new], [old, new], now=NOW)
    assert retired.roots == (new,) and retired.dropped == (old,) and retired.intermediates == (new_int,)


def test_a_new_root_without_a_valid_cross_certificate_is_not_trusted() -> None:
    old, _ = root("Old Root")
    new, _ = root("New Root")
    stranger, stranger_key = root("Stranger")
    forged = create_cross_certificate(new, stranger, stranger_key, now=NOW)  # type: ignore[arg-type]
    # Claims to be from the old root (its name) but is signed by another key.
    lookalike = create_cross_certificate(new, old, stranger_key, now=NOW)  # type: ignore[arg-type]
    for bundle in ([old, new], [old, new, forged], [old, new, lookalike]):
        judged = judge_bundle(bundle, [old], now=NOW)
        assert judged.roots == (old,) and judged.added == ()
    # A cross-certificate past its notAfter (it ends with the older of the two roots).
    short_key = generate_key("ec-p256")
    short = create_root(short_key, now=NOW - timedelta(days=3), days=1, common_name="Short Root")
    expired = create_cross_certificate(new, short, short_key, now=NOW - timedelta(days=3))
    assert expired.not_valid_after_utc < NOW
    assert judge_bundle([short, new, expired], [short], now=NOW - timedelta(days=2, hours=12)).added == (new,)
    assert judge_bundle([short, new, expired, old], [short, old], now=NOW).added == ()
    # A server listing only roots this client cannot trust changes nothing: an error.
    with pytest.raises(TrustError):
        judge_bundle([new], [old], now=NOW)
