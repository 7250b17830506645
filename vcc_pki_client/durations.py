"""Durations on command lines (``vcc-pki --validity 24h``, ``pki-admin --validity 8h``): a small
module of its own, so that ``pki-admin`` can use it without loading the SDK's HTTP client."""

from __future__ import annotations

import argparse
from datetime import timedelta

__all__ = ["duration"]


def duration(text: str) -> timedelta:
    """``15m``, ``8h``, ``30d``, ``90s``: a number and a unit."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = text[:-1], text[-1:].lower()
    if unit not in units or not number.isdigit() or int(number) == 0:
        raise argparse.ArgumentTypeError(f"expected a duration like 15m, 8h or 30d, got {text!r}")
    return timedelta(seconds=int(number) * units[unit])
