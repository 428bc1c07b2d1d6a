"""One definitions source for a fleet: a private mirror built by ClamAV's own cvdupdate, served by
`cvd serve`, and the daemons' update jobs (freshclam with PrivateMirror) fetching from it.

All of it on loopback: an "upstream" HTTP server stands in for ClamAV's CDN, and a DNS
responder on 127.0.53.53 answers the one TXT query cvdupdate insists on before any update
(current.cvd.clamav.net). Official databases are CVDs signed by Cisco Talos, which cannot be
made here: the mirror carries a custom database instead, fetched by freshclam from the same
mirror (DatabaseCustomURL) beside its PrivateMirror line, which is what routes the official
ones there in production (docs/scaling.md).
"""

from __future__ import annotations

import http.server
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import dns.message
import dns.rrset
import pytest

from harness.clamd import Clamd
from harness.events import Events, wait_until
from harness.files import quarantined
from harness.net import free_port
from watcher.service import Service
from watcher.settings import Settings

MakeSettings = Callable[..., Settings]
CVD = Path(sys.executable).parent / "cvd"
DNS_ADDRESS = ("127.0.53.53", 53)  # a loopback address of its own: no local resolver there
# What current.cvd.clamav.net's TXT record looks like (version:main:daily:time:...:bytecode).
TXT = '"1.4.6:62:27000:1764460800:1:90:49191:335"'


class RecordingServer:
    """Serves a directory on 127.0.0.1 and records (path, User-Agent) of every GET; or answers
    every request with `status` (e.g. 429) when given one."""

    def __init__(self, root: Path, status: int | None = None) -> None:
        self.root = root
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("User-Agent", "")))
                if status is None:
                    super().do_GET()
                    return
                self.send_response(status)
                self.send_header("Retry-After", "86400")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        root.mkdir(parents=True, exist_ok=True)
        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), partial(Handler, directory=str(root))
        )
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def txt_responder() -> Iterator[None]:
    """Answers every DNS query with the TXT record cvdupdate asks for."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(DNS_ADDRESS)  # port 53: the suite runs as root (`make test`, CI)
    sock.settimeout(0.2)
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            name = query.question[0].name
            response.answer.append(dns.rrset.from_text(name, 60, "IN", "TXT", TXT))
            sock.sendto(response.to_wire(), peer)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join()
    sock.close()


class Mirror:
    """cvdupdate's database directory, built with `cvd update` and served by `cvd serve`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = root / "config.json"
        self.db = root / "database"
        self.port = free_port("127.0.0.1")
        self.serving: subprocess.Popen[bytes] | None = None
        # Loopback only: the proxy (nothing listens there) stops cvdupdate's look for a newer
        # version of itself on PyPI; loopback URLs bypass it.
        self.env = {
            **os.environ,
            "HOME": str(root),
            "HTTPS_PROXY": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9",
            "NO_PROXY": "127.0.0.1",
        }

    def cvd(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CVD), *args, "--config", str(self.config)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def configure(self, databases: dict[str, str]) -> None:
        """Only `databases` (name → upstream URL); the official CVDs are dropped from its list."""
        logs = str(self.root / "logs")
        set_up = self.cvd(
            "config",
            "set",
            "--dbdir",
            str(self.db),
            "--logdir",
            logs,
            "--nameserver",
            DNS_ADDRESS[0],
        )
        assert set_up.returncode == 0, set_up.stderr
        for official in ("main.cvd", "daily.cvd", "bytecode.cvd"):
            assert self.cvd("remove", official).returncode == 0
        for name, url in databases.items():
            added = self.cvd("add", name, url)
            assert added.returncode == 0, added.stderr

    def update(self) -> None:
        updated = self.cvd("update")
        assert updated.returncode == 0, updated.stdout + updated.stderr

    def serve(self) -> None:
        self.serving = subprocess.Popen(
            [str(CVD), "serve", "--config", str(self.config), str(self.port)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, 30, "cvd serve to listen")

    def _answers(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def url(self, name: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.serving is not None:
            self.serving.terminate()
            self.serving.wait(timeout=30)


def freshclam_via_mirror(conf: Path, database_dir: Path, mirror_url: str, custom: str) -> str:
    """A freshclam.conf for a fleet member: the private mirror for the official databases
    (excluded here: none can be signed offline), and the mirror's custom database."""
    conf.write_text(
        f"DatabaseDirectory {database_dir}\nDatabaseOwner root\n"
        f"PrivateMirror {mirror_url}\n"
        "ExcludeDatabase main\nExcludeDatabase daily\nExcludeDatabase bytecode\n"
        f"DatabaseCustomURL {mirror_url}/{custom}\n"
        "ConnectTimeout 5\nReceiveTimeout 10\nMaxAttempts 1\n"
    )
    return f"freshclam --config-file={conf} --stdout"


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[RecordingServer]:
    server = RecordingServer(tmp_path / "upstream")
    yield server
    server.close()


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    built = Mirror(tmp_path / "mirror")
    yield built
    built.stop()


@pytest.mark.usefixtures("txt_responder")
def test_a_fleet_updates_from_one_cvdupdate_mirror_and_only_the_mirror_asks_upstream(
    make_settings: MakeSettings,
    make_clamd: Callable[..., Clamd],
    upstream: RecordingServer,
    mirror: Mirror,
    dirs: dict[str, Path],
    events: Events,
    tmp_path: Path,
) -> None:
    """cvdupdate fetches the new signatures once; three daemons' update jobs take them from the
    mirror, their clamd load them, and each detects what they name."""
    marker = b"WATCHER-FLEET-MARKER-" + secrets.token_hex(8).encode()
    (upstream.root / "watcher-fleet.ndb").write_text(f"Watcher.Fleet.Test:0:*:{marker.hex()}\n")
    mirror.configure({"watcher-fleet.ndb": upstream.url("watcher-fleet.ndb")})
    mirror.update()
    assert (mirror.db / "watcher-fleet.ndb").read_bytes() == (
        upstream.root / "watcher-fleet.ndb"
    ).read_bytes()
    mirror.serve()

    fleet: list[tuple[Service, dict[str, Path]]] = []
    clamds: list[Clamd] = []
    try:
        for n in range(3):
            clamd = make_clamd(f"clamd-{n}")
            clamds.append(clamd)
            names = ("uploads", "processed", "quarantine", "state")
            member = {k: tmp_path / f"member-{n}" / k for k in names}
            member["uploads"].mkdir(parents=True)
            conf = tmp_path / f"freshclam-{n}.conf"
            command = freshclam_via_mirror(conf, clamd.db, mirror.url()[:-1], "watcher-fleet.ndb")
            service = Service(
                make_settings(
                    uploads_dir=member["uploads"],
                    processed_dir=member["processed"],
                    quarantine_dir=member["quarantine"],
                    state_dir=member["state"],
                    clamav_socket=clamd.socket,
                    definitions_dir=clamd.db,
                    update_command=command,
                )
            )
            service.start()
            fleet.append((service, member))
        for service, _ in fleet:
            service.jobs.run_now("update-definitions")
        updated = events.wait_for("definitions.updated", count=3, timeout_s=90)
        expected = {"watcher-fleet.ndb": {"version": "custom database", "sigs": 1}}
        assert all(u["databases"] == expected for u in updated)
        for _, member in fleet:
            (member["uploads"] / "report.bin").write_bytes(b"quarterly\n" + marker)
        infected = events.wait_for("file.infected", count=3, path="report.bin", timeout_s=60)
        assert {r["signature"] for r in infected} == {"Watcher.Fleet.Test.UNOFFICIAL"}
        for _, member in fleet:
            (record,) = quarantined(member["quarantine"])
            assert record["original_path"] == "report.bin" and record["verdict"] == "infected"
    finally:
        for service, _ in fleet:
            service.close()
        for clamd in clamds:
            clamd.stop()

    # Upstream saw cvdupdate only, once for the database; the fleet asked the mirror only.
    fetched = [(path, agent) for path, agent in upstream.requests if path == "/watcher-fleet.ndb"]
    assert len(fetched) == 1 and fetched[0][1].startswith("CVDUPDATE/")
    assert all(agent.startswith("CVDUPDATE/") for _, agent in upstream.requests)


def test_a_refusing_private_mirror_backs_off_without_the_cdns_day_long_cool_down(
    make_settings: MakeSettings, tmp_path: Path, events: Events
) -> None:
    """freshclam treats an HTTP 429 from a PrivateMirror as a failed download, not as the CDN's
    rate limit: the job backs off (interval * 2^(n-1)), it does not wait a day. (The CDN's
    429/403 still mean a day: tests/test_updates.py.)"""
    refusing = RecordingServer(tmp_path / "refusing", status=429)
    try:
        db = tmp_path / "db"
        db.mkdir()
        conf = tmp_path / "freshclam.conf"
        conf.write_text(
            f"DatabaseDirectory {db}\nDatabaseOwner root\nPrivateMirror {refusing.url('')[:-1]}\n"
            "ConnectTimeout 5\nReceiveTimeout 10\nMaxAttempts 1\n"
        )
        settings = make_settings(
            definitions_dir=db,
            update_command=f"freshclam --config-file={conf} --stdout",
            update_interval="2h",
        )
        service = Service(settings)
        service.start()
        try:
            started = datetime.now(UTC)
            service.jobs.run_now("update-definitions")
            (failed,) = events.wait_for("definitions.update_failed", timeout_s=60)
        finally:
            service.close()
        assert failed["cause"] == "download_failed" and failed["failures"] == 1
        assert any(path == "/daily.cvd" and "ClamAV/" in agent for path, agent in refusing.requests)
        state = json.loads((settings.state_dir / "updates.json").read_text())
        assert state["last_cause"] == "download_failed"
        next_at = datetime.fromisoformat(failed["next_attempt_at"])
        assert timedelta(hours=1.9) < next_at - started < timedelta(hours=2.1)
    finally:
        refusing.close()
