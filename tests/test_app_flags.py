"""`python app.py` flags, run as a user would: a public link never opens without a login, --listen binds
every interface, and a taken port moves the app to the next free one."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from scal_gui.testing import app_server

ENV_WITHOUT_LOGIN = {k: v for k, v in os.environ.items() if k != "SCAL_AUTH"}


def run_app(*args, env=ENV_WITHOUT_LOGIN):
    return subprocess.run([sys.executable, "app.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def test_share_without_a_login_exits_with_a_message():
    result = run_app("--share")
    assert result.returncode == 2
    assert "--share opens a public link" in result.stderr and "--auth USER:PASS" in result.stderr


def test_a_malformed_login_is_refused():
    result = run_app("--share", "--auth", "just-a-name")
    assert result.returncode == 2 and "USER:PASS" in result.stderr


def listening_sockets() -> set[tuple[str, int]]:
    """(address, port) of the IPv4 TCP sockets in LISTEN state, from the kernel's table."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A":
            address, port = local.split(":")
            found.add((socket.inet_ntoa(bytes.fromhex(address)[::-1]), int(port, 16)))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's socket table")
def test_listen_binds_every_interface_and_a_taken_port_moves_on(tmp_path):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with app_server("--listen", "--port", str(port), "--output-dir", str(tmp_path)) as url:
            served_port = int(url.rstrip("/").rsplit(":", 1)[1])
            assert served_port > port
            assert ("0.0.0.0", served_port) in listening_sockets()


class StartedPage:
    """Stands in for the page main() builds and launches: records what it was given, serves nothing."""

    def __init__(self, **built):
        self.built = built
        self.launched = None

    def queue(self, **_):
        return self

    def launch(self, **options):
        self.launched = options


@pytest.mark.parametrize("args, login, warned", [
    (["--listen"], None, True),
    (["--listen", "--auth", "me:secret"], None, False),
    (["--listen"], "me:secret", False),
    ([], None, False)])
def test_listen_without_a_login_starts_with_a_warning(monkeypatch, capsys, args, login, warned):
    import scal_gui.page
    from scal_gui import server
    from scal_gui.testing import free_port

    pages = []
    monkeypatch.setattr(scal_gui.page, "build_page", lambda **built: pages.append(StartedPage(**built)) or pages[-1])
    if login:
        monkeypatch.setenv("SCAL_AUTH", login)
    else:
        monkeypatch.delenv("SCAL_AUTH", raising=False)
    assert server.main([*args, "--port", str(free_port())]) == 0
    [page] = pages
    assert page.launched is not None
    stderr = capsys.readouterr().err
    assert ("anyone on the network can start jobs and read and write files as this user" in stderr) == warned
    assert page.built["warning"] == (server.OPEN_NETWORK_WARNING if warned else None)


def markdown_values(page) -> list[str]:
    return [component["props"].get("value") or "" for component in page.config["components"]
            if component["type"] == "markdown"]


def test_the_page_shows_the_warning_at_the_top_only_when_given():
    from scal_gui.page import build_page
    from scal_gui.server import OPEN_NETWORK_WARNING

    warned = markdown_values(build_page(warning=OPEN_NETWORK_WARNING))
    assert warned[1] == f"**Warning:** {OPEN_NETWORK_WARNING}"
    assert not any("anyone on the network" in value for value in markdown_values(build_page()))
