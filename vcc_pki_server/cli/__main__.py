"""``python -m vcc_pki_server.cli``: the same as ``pki-admin``."""

import sys

from . import main

sys.exit(main())
