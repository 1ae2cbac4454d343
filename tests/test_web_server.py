"""The daemon's side of the status page: WEB_ADDRESS, and the web server wired to a loop
with no servers (a store in memory, the server on a free port)."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from structlog.testing import capture_logs

import config
from service.loop import Loop
from service.web import StatusWeb
from statemachine.errors import BadConfig
from statemachine.log import MemoryLog
from statemachine.store import Store

# --- WEB_ADDRESS ------------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1:8787", "[::1]:8787", "localhost:0", ""])
def test_web_address_takes_host_and_port_or_nothing(address: str) -> None:
    assert config.load_settings(overrides={"WEB_ADDRESS": address}).web_address == address


@pytest.mark.parametrize("address", ["8787", "127.0.0.1", "::1:8787", "host:99999",
                                     "http://127.0.0.1:8787", "a b:80", 8787])
def test_a_bad_web_address_names_the_setting(address: object) -> None:
    with pytest.raises(BadConfig, match="WEB_ADDRESS"):
        config.load_settings(overrides={"WEB_ADDRESS": address})


# --- the server's wiring ------------------------------------------------------------------


@pytest.fixture
def loop_for(tmp_path: Path) -> Iterator:
    def make(address: str) -> tuple[Loop, StatusWeb]:
        settings = config.load_settings(overrides={"STATE_DIR": tmp_path,
                                                   "WEB_ADDRESS": address})
        web = StatusWeb(settings)
        store = Store(web.metered(MemoryLog()))
        web.watch(store)
        loop = Loop(settings, store, {}, {}, status_path=tmp_path / "status.json")
        return loop, web
    yield make


def test_the_page_answers_503_until_the_loop_publishes_then_serves_it(loop_for) -> None:
    loop, web = loop_for("127.0.0.1:0")
    with web.serving(loop):
        assert web.url is not None
        assert requests.get(web.url + "api/status", timeout=5).status_code == 503
        assert requests.get(web.url, timeout=5).text.startswith("<!DOCTYPE html>")
        loop.write_status(1.0, force=True)
        served = requests.get(web.url + "api/status", timeout=5)
        assert served.content == (Path(loop.settings.state_dir) / "status.json").read_bytes()
        assert "comfy_dual_jobs" in requests.get(web.url + "metrics", timeout=5).text


def test_a_taken_port_is_a_warning_and_the_daemon_goes_on(loop_for) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        loop, web = loop_for(f"127.0.0.1:{port}")
        with capture_logs() as logs, web.serving(loop):
            loop.write_status(1.0, force=True)
    assert web.url is None and loop.on_status == []
    assert any(e["log_level"] == "warning" and "going on without it" in e["event"]
               for e in logs)
    assert (Path(loop.settings.state_dir) / "status.json").exists()


def test_a_non_loopback_address_is_served_with_a_warning(loop_for) -> None:
    loop, web = loop_for("0.0.0.0:0")
    with capture_logs() as logs, web.serving(loop):
        assert web.url is not None
    assert any(e["log_level"] == "warning" and "non-loopback" in e["event"] for e in logs)


def test_no_web_address_means_no_metrics_no_server(loop_for) -> None:
    loop, web = loop_for("")
    log = MemoryLog()
    assert web.metered(log) is log and web.metrics is None
    with web.serving(loop):
        assert web.url is None and loop.on_status == []


def test_a_failing_publish_is_logged_once_and_the_loop_goes_on(loop_for) -> None:
    loop, web = loop_for("127.0.0.1:0")
    with web.serving(loop), capture_logs() as logs:
        (publish,) = loop.on_status
        publisher = publish.__self__
        publisher.rejected.refresh = lambda: 1 / 0
        loop.write_status(1.0, force=True)
        loop.write_status(2.0, force=True)
        assert publisher.board is None
        del publisher.rejected.refresh
        loop.write_status(3.0, force=True)
        assert publisher.board is not None
    assert [e["log_level"] for e in logs if "status page" in e["event"]] == ["error"]


def test_a_refused_request_closes_its_connection_unread_body_and_all(loop_for) -> None:
    loop, web = loop_for("127.0.0.1:0")
    with web.serving(loop):
        assert web.url is not None
        host, port = web.url.removeprefix("http://").rstrip("/").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        conn.request("POST", "/api/status", body=b"GET /metrics HTTP/1.1\r\n\r\n")
        answer = conn.getresponse()
        answer.read()
        assert answer.status == 405 and answer.getheader("Connection") == "close"
        conn.close()


@pytest.mark.parametrize(("host", "served"), [
    ("127.0.0.1:8787", True), ("localhost:8787", True), ("[::1]:8787", True),
    ("127.0.0.2", True), ("attacker.example:8787", False), ("", False),
    ("127.0.0.1.nip.io:8787", False)])
def test_bound_to_loopback_it_answers_only_to_loopback_names(loop_for, host: str,
                                                               served: bool) -> None:
    loop, web = loop_for("127.0.0.1:0")
    with web.serving(loop):
        assert web.url is not None
        answer = requests.get(web.url + "metrics", headers={"Host": host}, timeout=5)
    assert answer.status_code == (200 if served else 421)
