"""Run the benchmarks: ``python -m benchmarks.run [issuance|revocation|listing ...] [--quick]``.

Without names, all three run in turn (``make bench``). Each prints its table and writes a JSON
result file to benchmarks/results/. ``--quick`` is a smoke run (small counts, one run each);
other options go to the named benchmark (e.g. ``issuance --keys ec-p256 --workers 2``).
"""

from __future__ import annotations

import sys
import time

from . import issuance, listing, revocation

BENCHMARKS = {"issuance": issuance.main, "revocation": revocation.main, "listing": listing.main}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    names = []
    while args and args[0] in BENCHMARKS:
        names.append(args.pop(0))
    if not names:
        names = list(BENCHMARKS)
        extra = [a for a in args if a == "--quick"]
        if len(extra) != len(args):
            print("options other than --quick need a benchmark name", file=sys.stderr)
            return 2
    for name in names:
        start = time.monotonic()
        print(f"=== {name} ===", flush=True)
        BENCHMARKS[name](args)
        print(f"=== {name}: {time.monotonic() - start:.0f} s ===\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
