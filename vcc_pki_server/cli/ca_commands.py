"""The CA's own commands: ``pki-admin ca init-root | create-intermediate | root-crl | info | status |
rotate-intermediate | rotate-root | retire-root`` and ``init``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .. import rotation
from ..authority import Actor, utc_now
from ..bootstrap import initialize, key_type_label, record_key_creation, refuse_existing_ca
from ..ca_set import CASet
from ..config import Config
from ..encoding import ski_hex
from ..errors import CAError, CAUnavailable, InvalidRequest
from ..home import Home
from ..policy import check_trust_domain, normalize_sans
from ..store import current_certificate, utc_text
from .access import ca_password, existing_home, open_authority, root_password
from .output import (
    JSON,
    PROG,
    ca_certificate_json,
    crl_json,
    print_fields,
    print_json,
    print_table,
    progress,
    sans_text,
)

ROOT_KEY_TYPES = ("rsa-4096", "ec-p384")
INTERMEDIATE_KEY_TYPES = ("rsa-2048", "ec-p256", "rsa-3072")


# -- ca ---------------------------------------------------------------------------------------
def cmd_ca_init_root(args: argparse.Namespace) -> int:
    home = Home.resolve(args.home)
    if home.has_root():
        raise CAError(f"{home.root} already has a root CA ({home.root_cert.name}); refusing to overwrite it")
    password = root_password(args, confirm=True)
    progress(f"generating {key_type_label(args.key_type)} root key...")
    cert = home.create_root(password, key_type=args.key_type)
    if not home.config_file.exists():
        home.save_config(Config())
    record_key_creation(home, "ca.init-root", cert, args.key_type)
    return show_ca_certificate(args, "root CA", cert, home.root_cert)


def cmd_ca_create_intermediate(args: argparse.Namespace) -> int:
    home = existing_home(args)
    if home.has_intermediate():
        raise CAError(f"{home.root} already has an intermediate CA; refusing to overwrite it")
    if not home.has_root():
        raise CAError(f"{home.root} has no root CA: run `pki-admin ca init-root` first")
    root_pw = root_password(args, home=home)
    check_root_password(home, root_pw)  # before the new password is asked for, twice
    ca_pw = ca_password(args, confirm=True)
    progress(f"generating {key_type_label(args.key_type)} intermediate key...")
    cert = home.create_intermediate(root_pw, ca_pw, key_type=args.key_type)
    record_key_creation(home, "ca.create-intermediate", cert, args.key_type)
    authority = home.authority(ca_pw)
    try:
        progress("publishing the first CRL...")
        authority.generate_crl(actor=Actor.operator())
    finally:
        authority.store.close()
    return show_ca_certificate(args, "intermediate CA", cert, home.intermediate_cert)


def cmd_ca_root_crl(args: argparse.Namespace) -> int:
    home = existing_home(args)
    if not home.has_root():
        raise CAError(f"{home.root} has no root CA: run `pki-admin ca init-root` first")
    crl = home.write_root_crl(root_password(args, home=home))
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    next_update = crl.next_update_utc
    data: JSON = {"number": number, "entries": len(crl), "path": str(home.root_crl_file),
                  "next_update": utc_text(next_update) if next_update else None}
    if args.json:
        print_json(data)
    else:
        print(f"wrote the root's CRL number {number} ({len(crl)} revoked intermediate(s)) to "
              f"{home.root_crl_file}; next update {data['next_update']}")
    return 0


def check_root_password(home: Home, password: str) -> None:
    try:
        serialization.load_pem_private_key(home.root_key.read_bytes(), password.encode())
    except (ValueError, TypeError):
        raise CAUnavailable(f"wrong password for the root CA key ({home.root_key.name})") from None


def show_ca_certificate(args: argparse.Namespace, what: str, cert: x509.Certificate, path: Path) -> int:
    data = ca_certificate_json(cert, path)
    if args.json:
        print_json(data)
    else:
        print(f"created the {what} in {path.parent}")
        print_fields([(k, str(v)) for k, v in data.items()])
    return 0


def cmd_ca_info(args: argparse.Namespace) -> int:
    home = existing_home(args)
    if not home.has_root():
        raise CAError(f"{home.root} has no CA: run `pki-admin init`")
    config = home.config()
    data: JSON = {
        "home": str(home.root.absolute()),
        "root": ca_certificate_json(home.root_certificate(), home.root_cert),
        "intermediate": (ca_certificate_json(home.intermediate_certificate(), home.intermediate_cert)
                         if home.has_intermediate() else None),
        "public_url": config.public_url,
        "crl_url": config.crl_url(home.intermediate_certificate()) if home.has_intermediate() else None,
        "issuer_url": config.issuer_url(home.intermediate_certificate()) if home.has_intermediate() else None,
    }
    if args.json:
        print_json(data)
        return 0
    print_fields([("home", data["home"]), ("public URL", config.public_url),
                  ("CRL URL", data["crl_url"] or "-")])
    for what in ("root", "intermediate"):
        print(f"\n{what} CA")
        if data[what] is None:
            print("  (none: run `pki-admin ca create-intermediate`)")
            continue
        print_fields([(f"  {k}", str(v)) for k, v in data[what].items()])
    return 0


def cmd_ca_status(args: argparse.Namespace) -> int:
    """Each CA and its state, and where the fleet's current certificates stand: how many
    services renewed under the current intermediate (the figure to wait on before retiring
    the old root), how many still carry the URLs of before SPEC §13 (renew them before a
    rotation)."""
    with open_authority(args, sign=False) as (home, authority):
        cas = home.ca_set(authority.store)
        now = authority.clock()
        per_issuer = authority.store.issuer_counts(now)
        anchored = rotation.only_anchored_by_retiring(cas, per_issuer)
        current_ski = cas.current.ski
        counts = {"services": 0, "with_certificate": sum(per_issuer.values()),
                  "under_current": per_issuer.get(current_ski, 0), "legacy_urls": 0,
                  "only_under_retiring_root": anchored}
        legacy: list[str] = []
        after: str | None = None
        while True:
            page = authority.list_services(limit=500, after=after)
            if not page:
                break
            after = page[-1].service_id
            for service in page:
                counts["services"] += 1
                record = current_certificate(authority.store.certificates_for(service.service_id), now)
                if record is None:
                    continue
                cert = record.certificate()
                urls = [n.value for dp in cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
                        for n in dp.full_name or []]
                if any(u.endswith("/api/v1/crl") for u in urls):  # §3's URL, not the issuer's own
                    counts["legacy_urls"] += 1
                    legacy.append(service.service_id)

    def ca(role: str, state: str, cert: x509.Certificate) -> JSON:
        ski = ski_hex(cert)
        return {"role": role, "state": state, "subject": cert.subject.rfc4514_string(),
                "subject_key_identifier": ski, "not_after": utc_text(cert.not_valid_after_utc),
                "days_left": (cert.not_valid_after_utc - now).days,
                "services": per_issuer.get(ski, 0) if role == "intermediate" else None}

    data: JSON = {"cas": [ca(*row) for row in rotation.describe(cas, now)], **counts, "legacy_url_services": legacy}
    if args.json:
        print_json(data)
        return 0
    print_table(("ROLE", "STATE", "SUBJECT", "SUBJECT KEY IDENTIFIER", "NOT AFTER", "DAYS LEFT", "SERVICES"),
                [(c["role"], c["state"], c["subject"], c["subject_key_identifier"], c["not_after"],
                  str(c["days_left"]), "-" if c["services"] is None else str(c["services"]))
                 for c in data["cas"]])
    print()
    print_fields([
        ("services", str(counts["services"])),
        ("with a current certificate", str(counts["with_certificate"])),
        ("renewed under the current intermediate", str(counts["under_current"])),
        ("with the URLs of before SPEC §13", f"{counts['legacy_urls']}"
         + (f" ({', '.join(legacy[:10])}{', ...' if len(legacy) > 10 else ''}): let them renew" if legacy else "")),
        *([("only under the root to retire", f"{anchored} service(s): wait for them to renew before "
                                             "`ca retire-root`")]
          if len(cas.active_roots) > 1 else []),
    ])
    return 0


def _rotated(args: argparse.Namespace, home: Home, what: str, cas: CASet) -> int:
    entry = cas.pending
    assert entry is not None and entry.activate_at is not None
    path = home.authorities_dir / f"{entry.ski}.pem"
    data: JSON = {"rotated": what, "next_intermediate": ca_certificate_json(entry.cert, path),
                  "issues_from": utc_text(entry.activate_at),
                  "roots": [ski_hex(r.cert) for r in cas.roots if r.state == "active"], "record_version": cas.version}
    if args.json:
        print_json(data)
        return 0
    print(f"rotated the {what}: {entry.cert.subject.rfc4514_string()} (subject key identifier {entry.ski}) is "
          f"published now and issues every new certificate from {data['issues_from']}")
    print("running servers follow within 5 s of that and renew their own certificate under it; the previous "
          "intermediate keeps signing its CRL until it expires")
    if what == "root":
        print("both roots are trusted now; once `pki-admin ca status` shows no service left only under the old "
              "root, run `pki-admin ca retire-root`")
    return 0


def cmd_ca_rotate_intermediate(args: argparse.Namespace) -> int:
    return _rotate(args, "intermediate", rotation.rotate_intermediate)


def cmd_ca_rotate_root(args: argparse.Namespace) -> int:
    return _rotate(args, "root", rotation.rotate_root, intermediate_key_type=args.intermediate_key_type)


def _rotate(args: argparse.Namespace, what: str, rotate: Callable[..., CASet], **extra: Any) -> int:
    if not args.activate_after >= 0:
        raise InvalidRequest(f"--activate-after must be 0 or more seconds, got {args.activate_after:g}")
    home = existing_home(args)
    root_pw = root_password(args, home=home)
    ca_pw = ca_password(args, home=home)
    store = home.open_store()
    try:
        cas = rotate(home, store, root_password=root_pw, password=ca_pw, key_type=args.key_type, now=utc_now(),
                     activate_after=timedelta(seconds=args.activate_after), report=progress, **extra)
    finally:
        store.close()
    return _rotated(args, home, what, cas)


def cmd_ca_retire_root(args: argparse.Namespace) -> int:
    home = existing_home(args)
    store = home.open_store()
    try:
        cas, left = rotation.retire_root(home, store, force=args.force, now=utc_now())
    finally:
        store.close()
    data: JSON = {"roots": [ski_hex(r.cert) for r in cas.active_roots], "abandoned_services": left}
    if args.json:
        print_json(data)
    else:
        print(f"retired the old root: only {cas.active_roots[0].cert.subject.rfc4514_string()} is trusted now")
        if left:
            print(f"forced: the current certificates of {left} service(s) no longer chain to a trusted root")
    return 0


# -- init -------------------------------------------------------------------------------------
def check_public_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment:
        raise InvalidRequest(f"invalid --public-url {url!r}: use https://HOST[:PORT][/PATH]")
    if "." not in parts.hostname and ":" not in parts.hostname:
        progress(f"{PROG}: warning: single-label host {parts.hostname!r} in the public URL: "
                 "pkilint flags such URIs in CRL distribution points; prefer an IP or a FQDN")
    return url.rstrip("/")


def cmd_init(args: argparse.Namespace) -> int:
    home = Home.resolve(args.home)
    refuse_existing_ca(home)
    config = home.config()
    dns, ips = normalize_sans(["localhost", *args.server_san_dns], ["127.0.0.1", *args.server_san_ip])
    config = attrs.evolve(config, server_san_dns=dns, server_san_ip=tuple(str(i) for i in ips))
    if args.public_url is not None:
        config = attrs.evolve(config, public_url=check_public_url(args.public_url))
    if args.trust_domain is not None:
        config = attrs.evolve(config, trust_domain=check_trust_domain(args.trust_domain))
    root_pw = root_password(args, confirm=True)
    ca_pw = ca_password(args, confirm=True)
    done = initialize(home, config, root_password=root_pw, ca_password=ca_pw,
                      root_key_type=args.root_key_type,
                      intermediate_key_type=args.intermediate_key_type, report=progress)
    server = done.server.record
    data: JSON = {
        "home": str(home.root.absolute()), "public_url": config.public_url,
        "root": ca_certificate_json(done.root, home.root_cert),
        "intermediate": ca_certificate_json(done.intermediate, home.intermediate_cert),
        "server_certificate": {"serial_number": server.serial, "san_dns": list(server.san_dns),
                               "san_ip": list(server.san_ip), "not_after": utc_text(server.not_after),
                               "path": str(home.server_cert)},
        "crl": crl_json(done.crl),
    }
    if args.json:
        print_json(data)
        return 0
    print(f"initialised the CA home {data['home']}")
    print_fields([
        ("root CA", f"{data['root']['key']}, sha256 {data['root']['fingerprint_sha256']}, "
                    f"until {data['root']['not_after']}"),
        ("intermediate CA", f"{data['intermediate']['key']}, until {data['intermediate']['not_after']}"),
        ("server cert", f"{home.server_cert} for {sans_text(server)}"),
        ("CRL", f"number {done.crl.number}, served at {config.crl_url(home.intermediate_certificate())}"),
    ])
    print("\nnext: pki-admin token create --name ops   (an admin token for the API)\n"
          "      vcc-pki-server --home DIR --password-file FILE")
    return 0
