"""Installing from a built wheel (issue 17): the wheel `make dist` makes installs into a fresh
venv and gives both console scripts and the SDK; the server's dependencies are an extra.

The wheel is built as `make dist` builds it (an isolated PEP 517 build). The fresh venv gets
only the wheel (no dependencies from an index: the machine may be offline); the libraries it
needs are lent from this suite's venv by a path entry, which — unlike the venv itself — does
not bring this checkout's editable install along.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_built_wheel_installs_and_runs_from_a_fresh_venv(tmp_path: Path) -> None:
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                            str(ROOT)], capture_output=True, text=True, check=False, timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("vcc_pki-*-py3-none-any.whl"))

    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=False)
    python = fresh / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                                "-q", str(wheel)], capture_output=True, text=True, check=False, timeout=300)
    assert installed.returncode == 0, installed.stderr
    # Lent after the install (pip would otherwise find this suite's own vcc-pki there and skip it);
    # a .pth path comes after the venv's site-packages, so the wheel's modules are the ones imported.
    (site / "lent-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    def run(*argv: str) -> str:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=tmp_path, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    version = wheel.name.split("-")[1]
    assert run(str(fresh / "bin" / "vcc-pki-server"), "--version") == f"vcc-pki-server {version}"
    assert run(str(fresh / "bin" / "pki-admin"), "--version") == f"pki-admin {version}"
    where = run(str(python), "-c", "import vcc_pki_client, vcc_pki_server; print(vcc_pki_client.__file__); "
                                   "print(vcc_pki_server.__file__); print(vcc_pki_client.__version__)")
    client_file, server_file, client_version = where.splitlines()
    assert client_file.startswith(str(site)) and server_file.startswith(str(site))  # the wheel's, not the checkout
    assert client_version == version
    # `pip install vcc_pki-*.whl` is the SDK alone: the server's libraries come only with [server].
    requires = run(str(python), "-c", "from importlib.metadata import requires; print('\\n'.join(requires('vcc-pki')))")
    server_only = [line for line in requires.splitlines() if line.startswith(("starlette", "uvicorn"))]
    assert server_only and all('extra == "server"' in line for line in server_only), requires
