"""`watcher scan`, `--version`, `--help`: clamscan's exit codes on a real clamd."""

from __future__ import annotations

import subprocess
from pathlib import Path

from harness import EICAR, TESTFILES
from harness.clamd import Clamd
from harness.daemon import run_cli
from watcher import __version__


def watcher(*args: str, clamd: Clamd | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env={"CLAMAV_SOCKET": str(clamd.socket)} if clamd else {})


def test_scan_all_clean_exits_0(tmp_path: Path, clamd_server: Clamd) -> None:
    (tmp_path / "a.txt").write_bytes(b"fine")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_bytes(b"also fine")
    result = watcher("scan", str(tmp_path), clamd=clamd_server)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == [
        f"{tmp_path}/a.txt: OK",
        f"{tmp_path}/sub/b.txt: OK",
    ]
    assert (tmp_path / "a.txt").exists()  # scan moves nothing


def test_scan_something_infected_exits_1(tmp_path: Path, clamd_server: Clamd) -> None:
    (tmp_path / "ok.txt").write_bytes(b"fine")
    (tmp_path / "bad.com").write_bytes(EICAR)
    result = watcher(
        "scan",
        str(tmp_path / "ok.txt"),
        str(tmp_path / "bad.com"),
        str(TESTFILES / "clam.zip"),
        clamd=clamd_server,
    )
    assert result.returncode == 1
    found = [line for line in result.stdout.splitlines() if line.endswith(" FOUND")]
    assert len(found) == 2


def test_scan_errors_exit_2_and_never_say_ok(tmp_path: Path, clamd_server: Clamd) -> None:
    (tmp_path / "bad.com").write_bytes(EICAR)
    (tmp_path / "link").symlink_to(tmp_path / "bad.com")
    result = watcher("scan", str(tmp_path / "link"), str(tmp_path / "missing"), clamd=clamd_server)
    assert result.returncode == 2
    assert all(line.endswith("ERROR") for line in result.stdout.splitlines())


def test_scan_with_clamd_unreachable_exits_2(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"fine")
    env_socket = tmp_path / "nothing.sock"
    result = run_cli("scan", str(tmp_path / "a.txt"), env={"CLAMAV_SOCKET": str(env_socket)})
    assert result.returncode == 2 and "ERROR" in result.stdout and ": OK" not in result.stdout


def test_version_and_help() -> None:
    assert watcher("--version").stdout.strip() == f"watcher {__version__}"
    help_text = watcher("--help").stdout
    assert "run" in help_text and "scan" in help_text
