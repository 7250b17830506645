"""The docs are run (issue 17): `docs/quickstart.md` and the README's curl tour, block by block,
in order, in an empty folder, against a fresh dev server — as a newcomer would follow them.

What runs: every ```sh block (in one shell session: variables, the folder and background jobs
carry over to the next block) and every ```python block whose first line names a file
(``# inventory.py``: saved under that name, as the doc says to). A ```text block after a
``sh`` block is what that block must print on stdout: each of its lines must be found in the
output, ``...`` standing for any text on the same line.

The only changes to the text: ``make run`` starts ``vcc-pki-server --dev --home pki-data``
(what ``make run`` runs, without the install step, which needs the checkout), and the ports
8443 and 9443 become free ports, so the suite never needs a fixed port.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import httpx
import pytest

from support import env_without_secrets, free_port, tls_context

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent


@attrs.frozen
class Block:
    lang: str
    code: str
    line: int  # where it starts in the file, for messages


def fenced_blocks(markdown: str) -> list[Block]:
    found = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```$", markdown, re.S | re.M):
        found.append(Block(match.group(1), match.group(2), markdown.count("\n", 0, match.start()) + 1))
    return found


def section(markdown: str, title: str) -> str:
    """The text of the ``## title`` section (up to the next ``## ``)."""
    start = markdown.index(f"\n## {title}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start: end if end > 0 else None]


def expected_lines(pattern_text: str) -> list[re.Pattern[str]]:
    return [re.compile(".*".join(re.escape(part) for part in line.strip().split("..."))) for line in
            pattern_text.splitlines() if line.strip()]


class DocSession:
    """One reader's terminal: a folder, a shell state carried between blocks, a dev server."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port, self.service_port = free_port(), free_port()
        self.state = folder.parent / f"{folder.name}.state.sh"
        self.state.write_text(f"cd {folder}\n")
        self.groups: list[subprocess.Popen[bytes]] = []  # the server, each block's shell (and its jobs)
        (folder / ".venv").symlink_to(VENV)  # `source .venv/bin/activate` finds the suite's venv
        self.env = {k: v for k, v in env_without_secrets().items() if k != "VIRTUAL_ENV"}

    def text(self, code: str) -> str:
        return code.replace("8443", str(self.port)).replace("9443", str(self.service_port))

    def start_dev_server(self) -> None:
        log = open(self.folder.parent / f"{self.folder.name}.server.log", "wb")
        proc = subprocess.Popen([str(VENV / "bin" / "vcc-pki-server"), "--dev", "--home", "pki-data",
                                 "--host", "127.0.0.1", "--port", str(self.port)], cwd=self.folder,
                                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.groups.append(proc)
        deadline = time.monotonic() + 60
        root = self.folder / "pki-data" / "ca" / "root_ca.pem"
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if root.exists() and httpx.get(f"https://127.0.0.1:{self.port}/health", verify=tls_context(root),
                                               timeout=1).status_code == 200:
                    return
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.1)
        raise AssertionError("the dev server did not start")

    def run_shell(self, block: Block) -> str:
        code = self.text(block.code)
        if code.strip() == "make run":
            self.start_dev_server()
            return ""
        out, err = (self.folder.parent / f"{self.folder.name}.{kind}" for kind in ("out", "err"))
        script = (f"set -eo pipefail\nsource {self.state}\n{code}\n"
                  f"{{ export -p; echo \"cd '$PWD'\"; }} > {self.state}\n")
        with out.open("wb") as sink, err.open("wb") as errors:  # files, not pipes: background jobs write on
            proc = subprocess.Popen(["bash", "-c", script], env=self.env, stdout=sink, stderr=errors,
                                    start_new_session=True)
            self.groups.append(proc)
            status = proc.wait(timeout=120)
        output = out.read_text(errors="replace")
        assert status == 0, (f"the block at line {block.line} exited {status}:\n{code}\n--- output:\n{output}"
                             f"--- stderr:\n{err.read_text(errors='replace')}")
        return output

    def save_python(self, block: Block) -> None:
        first = block.code.splitlines()[0]
        name = first.removeprefix("#").strip()
        assert re.fullmatch(r"[\w-]+\.py", name), f"the python block at line {block.line} names no file"
        (self.folder / name).write_text(self.text(block.code))

    def follow(self, blocks: list[Block]) -> None:
        output = ""
        for block in blocks:
            if block.lang == "sh":
                output = self.run_shell(block)
            elif block.lang == "python":
                self.save_python(block)
            elif block.lang == "text":
                for pattern in expected_lines(block.code):
                    assert pattern.search(output), \
                        f"line {block.line}: {pattern.pattern!r} is not in the output:\n{output}"

    def close(self) -> None:
        for proc in reversed(self.groups):  # each leads its process group, background jobs included
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)


@pytest.fixture
def reader(tmp_path: Path) -> Iterator[DocSession]:
    folder = tmp_path / "newcomer"
    folder.mkdir()
    session = DocSession(folder)
    yield session
    session.close()


def test_the_quickstart_runs_as_written(reader: DocSession) -> None:
    blocks = fenced_blocks((ROOT / "docs" / "quickstart.md").read_text())
    assert [b.lang for b in blocks].count("python") == 2 and blocks[0].code.strip() == "make run"
    reader.follow(blocks)
    # What the reader was told they now have.
    for service in ("inventory", "billing"):
        folder = reader.folder / "tls" / service
        assert {"cert.pem", "key.pem", "ca_chain.pem", "crl.pem"} <= {p.name for p in folder.iterdir()}
        assert (folder / "key.pem").stat().st_mode & 0o777 == 0o600


@pytest.mark.skipif(shutil.which("jq") is None, reason="the README's curl tour uses jq (apt-get install jq)")
def test_the_readmes_curl_tour_runs_as_written(reader: DocSession) -> None:
    readme = (ROOT / "README.md").read_text()
    setup = [b for b in fenced_blocks(section(readme, "Set-up (a fresh machine with Python 3.11 and make)"))
             if b.lang == "sh"]
    assert "make run" in setup[0].code
    reader.follow([Block("sh", "make run", setup[0].line), *fenced_blocks(section(readme, "Try it with curl"))])
    assert not (reader.folder / "key.pem").exists()  # the tour keeps its files out of the checkout
