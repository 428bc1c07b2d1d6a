"""`make run`, then the newcomer's second step: with only WATCHER_CONFIG=var/watcher.toml set,
`watcher scan`, `watcher healthcheck` and `watcher quarantine list` agree with the daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from harness import EICAR, ROOT
from harness.daemon import run_cli
from harness.events import Events, record_of
from watcher.settings import load_settings


def is_setting(name: str) -> bool:
    return name.startswith(("WATCHER_", "CLAMAV_")) or name == "VIRUS_SCANNING_ENABLED"


def start_make_run(var: Path) -> tuple[subprocess.Popen[bytes], Events]:
    """scripts/run-local.sh (what `make run` runs) under `var`, its daemon's events parsed."""
    env = {k: v for k, v in os.environ.items() if not is_setting(k)}
    env |= {
        "VAR_DIR": str(var),
        "FRESHCLAM_ON_START": "false",  # never the real mirrors from a test: test signatures
        # The environment wins over var/watcher.toml: no fixed port, no update job in a test.
        "WATCHER_HTTP_ADDR": "127.0.0.1:0",
        "WATCHER_UPDATE_COMMAND": "",
    }
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "run-local.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, as a terminal gives it: Ctrl-C is SIGINT
    )
    events = Events()
    threading.Thread(target=read_events, args=(proc, events), daemon=True).start()
    return proc, events


def read_events(proc: subprocess.Popen[bytes], events: Events) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        events.add(record_of(line))


def pid_alive(pid: int) -> bool:
    """Running: neither gone nor a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.clamd  # run-local.sh starts a clamd of its own
def test_after_make_run_one_exported_config_makes_every_command_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    var = tmp_path / "var"
    proc, events = start_make_run(var)
    try:
        events.wait_for("watcher.ready", timeout_s=60)
        config = var / "watcher.toml"
        for name in list(os.environ):
            if is_setting(name):
                monkeypatch.delenv(name)
        monkeypatch.setenv("WATCHER_CONFIG", str(config))
        settings = load_settings()
        assert settings.clamav_socket == var / "run" / "clamd.sock"
        assert settings.uploads_dir == var / "uploads"
        assert settings.state_dir == var / "state"

        (var / "uploads" / "eicar.com").write_bytes(EICAR)
        (var / "uploads" / "hello.txt").write_bytes(b"hello\n")
        events.wait_for("file.clean", path="hello.txt")
        events.wait_for("file.infected", path="eicar.com")
        only_config = {"WATCHER_CONFIG": str(config)}

        scan = run_cli("scan", str(var / "processed"), env=only_config, inherit_settings=False)
        assert (scan.returncode, scan.stdout) == (0, f"{var / 'processed' / 'hello.txt'}: OK\n")
        sample = tmp_path / "sample.com"
        sample.write_bytes(EICAR)
        scan = run_cli("scan", str(sample), env=only_config, inherit_settings=False)
        assert scan.returncode == 1 and scan.stdout.endswith(" FOUND\n"), scan.stdout

        health = run_cli("healthcheck", env=only_config, inherit_settings=False)
        assert health.returncode == 0, health.stdout
        assert health.stdout.startswith("ok: daemon pid")

        listed = run_cli("quarantine", "list", "--json", env=only_config, inherit_settings=False)
        assert listed.returncode == 0, listed.stderr
        (entry,) = json.loads(listed.stdout)
        assert entry["original_path"] == "eicar.com" and entry["state"] == "quarantined"
        assert (var / "quarantine" / entry["id"]).read_bytes() == EICAR
        assert not events.named("raw")

        clamd_pid = int((var / "run" / "clamd.pid").read_text())
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C stops the daemon, then clamd
        proc.wait(timeout=60)
        events.wait_for("watcher.stopped")
        assert not pid_alive(clamd_pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
