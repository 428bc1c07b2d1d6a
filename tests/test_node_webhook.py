"""The Node.js example app's webhook receiver (examples/node-app/server.js), told by a real
daemon: it takes the daemon's signed events, and refuses forgeries and replays."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import EICAR, ROOT
from harness.daemon import DaemonProcess
from harness.events import Events, wait_until
from harness.net import free_port
from watcher.push.webhooks import sign

SERVER = ROOT / "examples" / "node-app" / "server.js"
SECRET = "node-example-secret"


class NodeApp:
    def __init__(self, dirs: dict[str, Path]) -> None:
        node = shutil.which("node")
        if node is None:
            pytest.skip("node not installed")
        self.port = free_port()
        self.events = Events()
        env = {
            **os.environ,
            "PORT": str(self.port),
            "UPLOADS_DIR": str(dirs["uploads"]),
            "PROCESSED_DIR": str(dirs["processed"]),
            "WATCHER_URL": "http://127.0.0.1:9",  # the API is not what this test is about
            "WATCHER_WEBHOOK_SECRET": SECRET,
        }
        self.proc = subprocess.Popen(
            [node, str(SERVER)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        threading.Thread(target=self._read, daemon=True).start()
        self.events.wait_for("app.ready", timeout_s=30)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.add(json.loads(line))
            except ValueError:
                self.events.add({"event": "raw", "line": line.decode(errors="replace")})

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks/watcher"

    def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("POST", "/webhooks/watcher", body=body, headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            conn.close()

    def get(self, path: str) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def app(dirs: dict[str, Path]) -> Iterator[NodeApp]:
    dirs["processed"].mkdir(exist_ok=True)
    node_app = NodeApp(dirs)
    yield node_app
    node_app.stop()


def signed(body: bytes, event_id: str, at: int, key: str = SECRET) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "Watcher-Event-Id": event_id,
        "Watcher-Timestamp": str(at),
        "Watcher-Signature": sign(key.encode(), at, body),
    }


def test_the_example_is_told_each_verdict_by_a_real_daemon(
    app: NodeApp, subprocess_env: dict[str, str], dirs: dict[str, Path]
) -> None:
    env = {
        **subprocess_env,
        "WATCHER_WEBHOOK_URL": app.webhook_url,
        "WATCHER_WEBHOOK_SECRET": SECRET,
    }
    daemon = DaemonProcess(env).start()
    try:
        name = "0123456789abcdef-report.txt"  # a name the app itself would store
        (dirs["uploads"] / name).write_bytes(b"quarterly figures")
        (dirs["uploads"] / "bad.com").write_bytes(EICAR)
        told = {e["path"]: e for e in app.events.wait_for("webhook.verdict", count=2)}
        assert told[name]["state"] == "clean" and told["bad.com"]["state"] == "infected"
        verdict = app.get(f"/files/{name}/verdict")["verdict"]
        assert verdict["source"] == "webhook" and verdict["state"] == "clean"
        assert verdict["location"] == f"processed/{name}"
        assert not app.events.named("webhook.refused")
    finally:
        daemon.kill()


def test_the_example_refuses_forged_and_replayed_events(app: NodeApp) -> None:
    body = json.dumps(
        {"id": "v-1", "type": "file.verdict", "file": {"path": "x.txt", "state": "clean"}}
    ).encode()
    now = int(time.time())

    assert app.post(body, signed(body, "v-1", now, key="wrong secret"))[0] == 401
    tampered = body.replace(b"clean", b"dirty")
    assert (
        app.post(tampered, signed(body, "v-1", now) | {"Content-Length": str(len(tampered))})[0]
        == 401
    )
    unsigned = {k: v for k, v in signed(body, "v-1", now).items() if k != "Watcher-Signature"}
    assert app.post(body, unsigned)[0] == 401
    assert app.post(body, signed(body, "v-1", now - 600))[0] == 401  # captured long ago

    status, answer = app.post(body, signed(body, "v-1", now))
    assert status == 200 and answer == {"ok": True}
    status, answer = app.post(body, signed(body, "v-1", now))  # the same request again
    assert status == 200 and answer == {"duplicate": True}
    wait_until(lambda: app.events.named("webhook.duplicate"), 5)
    assert len(app.events.named("webhook.verdict")) == 1  # processed once
    reasons = [e["reason"] for e in app.events.named("webhook.refused")]
    assert reasons == [
        "bad signature",
        "bad signature",
        "bad signature",
        "timestamp outside the window",
    ]
