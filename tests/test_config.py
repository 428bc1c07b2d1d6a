"""Configuration: environment over file, seed names, one clear line and exit 2 when wrong."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from harness import ROOT
from harness.daemon import run_cli
from watcher.errors import ConfigError
from watcher.settings import Settings, load_settings, parse_duration_s, parse_size_bytes

HOUR = 3600.0


def run_watcher(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env, inherit_settings=False)


@pytest.fixture(autouse=True)
def _no_watcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("WATCHER_", "CLAMAV_")) or key == "VIRUS_SCANNING_ENABLED":
            monkeypatch.delenv(key)


def test_defaults_suit_the_container() -> None:
    s = load_settings()
    assert s.uploads_dir == Path("/data/uploads") and s.processed_dir == Path("/data/processed")
    assert s.quarantine_dir == Path("/data/quarantine")
    assert (s.clamav_host, s.clamav_port, s.clamav_socket) == ("127.0.0.1", 3310, None)
    assert s.scanning_enabled is True and s.log_format == "json" and s.log_level == "INFO"


def test_seed_names_without_prefix_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAMAV_HOST", "clamav")
    monkeypatch.setenv("CLAMAV_PORT", "3311")
    monkeypatch.setenv("VIRUS_SCANNING_ENABLED", "false")
    monkeypatch.setenv("CLAMAV_SOCKET", "/run/clamd.sock")
    s = load_settings()
    assert (s.clamav_host, s.clamav_port, s.scanning_enabled) == ("clamav", 3311, False)
    assert s.clamav_socket == Path("/run/clamd.sock")


def test_empty_clamav_socket_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """CLAMAV_SOCKET="" (the external-clamd compose override) means TCP, not a socket named "."."""
    monkeypatch.setenv("CLAMAV_SOCKET", "")
    assert load_settings().clamav_socket is None


def test_toml_file_is_read_and_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "watcher.toml"
    config.write_text(
        'uploads_dir = "/srv/in"\nsettle_s = "5s"\nmax_file_bytes = "2M"\n'
        'ignore_patterns = ["*.part"]\nclamav_port = 4000\n'
    )
    monkeypatch.setenv("WATCHER_CONFIG", str(config))
    monkeypatch.setenv("WATCHER_SETTLE_S", "750ms")
    s = load_settings()
    assert s.uploads_dir == Path("/srv/in") and s.clamav_port == 4000
    assert s.settle_s == 0.75 and s.max_file_bytes == 2 * 1024 * 1024
    assert s.ignore_patterns == ("*.part",)


def test_shipped_example_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHER_CONFIG", str(ROOT / "config" / "watcher.toml"))
    s = load_settings()
    assert s.settle_s == 2.0 and s.max_file_bytes == 100 * 1024 * 1024


def test_missing_named_config_file_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHER_CONFIG", "/nonexistent/watcher.toml")
    with pytest.raises(ConfigError, match="WATCHER_CONFIG"):
        load_settings()


def test_comma_separated_ignore_patterns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHER_IGNORE_PATTERNS", "*.part, *.uploading")
    assert load_settings().ignore_patterns == ("*.part", "*.uploading")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CLAMAV_PORT": "not-a-port"}, "CLAMAV_PORT"),
        ({"WATCHER_SETTLE_S": "soon"}, "WATCHER_SETTLE_S"),
        ({"WATCHER_LOG_FORMAT": "xml"}, "WATCHER_LOG_FORMAT"),
        ({"WATCHER_MAX_FILE_BYTES": "-5"}, "WATCHER_MAX_FILE_BYTES"),
        ({"WATCHER_CONFIG": "/nonexistent.toml"}, "WATCHER_CONFIG"),
    ],
)
def test_invalid_configuration_exits_2_with_one_line_naming_it(
    env: dict[str, str], named: str
) -> None:
    result = run_watcher("run", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_broken_toml_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("uploads_dir = [unclosed\n")
    result = run_watcher("run", env={"WATCHER_CONFIG": str(bad)})
    assert result.returncode == 2 and "invalid configuration" in result.stderr


def test_duration_and_size_parsing() -> None:
    assert parse_duration_s("90m") == 5400 and parse_duration_s("4h") == 14400
    assert parse_duration_s("30d") == 30 * 86400 and parse_duration_s("250ms") == 0.25
    assert parse_duration_s("12") == 12
    assert parse_size_bytes("100M") == 100 * 1024**2 and parse_size_bytes("2GiB") == 2 * 1024**3
    assert parse_size_bytes("512") == 512
    with pytest.raises(ValueError):
        parse_duration_s("4 weeks")


def test_json_ignore_patterns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHER_IGNORE_PATTERNS", '["*.a", "b*"]')
    assert load_settings().ignore_patterns == ("*.a", "b*")


def test_job_settings_defaults_and_durations(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    assert defaults.update_interval == 4 * HOUR and defaults.definitions_max_age == 48 * HOUR
    assert defaults.rescan_window == 24 * HOUR and defaults.quarantine_retention == 30 * 86400
    assert defaults.quarantine_max_bytes is None
    assert defaults.update_argv == ["freshclam", "--config-file=/etc/clamav/freshclam.conf"]
    monkeypatch.setenv("WATCHER_UPDATE_INTERVAL", "90m")
    monkeypatch.setenv("WATCHER_QUARANTINE_MAX_BYTES", "100M")
    monkeypatch.setenv("WATCHER_UPDATE_COMMAND", "freshclam --config-file='/etc/my conf'")
    s = load_settings()
    assert s.update_interval == 5400 and s.quarantine_max_bytes == 100 * 1024 * 1024
    assert s.update_argv == ["freshclam", "--config-file=/etc/my conf"]
    monkeypatch.setenv("WATCHER_UPDATE_COMMAND", "freshclam 'unbalanced")
    with pytest.raises(ConfigError, match="WATCHER_UPDATE_COMMAND"):
        load_settings()


@pytest.mark.parametrize(
    ("inside", "settings"),
    [
        ("processed inside uploads", ("WATCHER_PROCESSED_DIR", "WATCHER_UPLOADS_DIR")),
        ("state inside quarantine", ("WATCHER_STATE_DIR", "WATCHER_QUARANTINE_DIR")),
        (
            "quarantine through a symlink into uploads",
            ("WATCHER_QUARANTINE_DIR", "WATCHER_UPLOADS_DIR"),
        ),
    ],
)
def test_overlapping_directories_refuse_to_start(
    dirs: dict[str, Path], tmp_path: Path, inside: str, settings: tuple[str, str]
) -> None:
    """Issue 11.5: EICAR was quarantined again and again, paths grew processed/processed/..."""
    arena = _made(dirs)
    env = {
        "WATCHER_UPLOADS_DIR": str(arena["uploads"]),
        "WATCHER_PROCESSED_DIR": str(arena["processed"]),
        "WATCHER_QUARANTINE_DIR": str(arena["quarantine"]),
        "WATCHER_STATE_DIR": str(arena["state"]),
        "WATCHER_HTTP_ADDR": "off",
        "VIRUS_SCANNING_ENABLED": "false",
    }
    if inside == "processed inside uploads":
        env["WATCHER_PROCESSED_DIR"] = str(arena["uploads"] / "processed")
    elif inside == "state inside quarantine":
        env["WATCHER_STATE_DIR"] = str(arena["quarantine"] / "state")
    else:
        (tmp_path / "q").symlink_to(arena["uploads"] / "q")
        env["WATCHER_QUARANTINE_DIR"] = str(tmp_path / "q")
    result = run_cli("run", env=env, inherit_settings=False, timeout_s=30)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert all(name in line for name in settings), line
    assert not (arena["uploads"] / ".watcher").exists()  # nothing made, nothing moved


def test_absurd_durations_and_sizes_are_refused_at_start(dirs: dict[str, Path]) -> None:
    """Issue 11.6: WATCHER_SWEEP_INTERVAL_S=99999999999 killed the sweep thread later."""
    arena = _made(dirs)
    for name, value in [
        ("WATCHER_SWEEP_INTERVAL_S", "99999999999"),
        ("WATCHER_MAX_FILE_BYTES", "99999999T"),
        ("WATCHER_SHUTDOWN_GRACE_S", "400d"),
    ]:
        env = {"WATCHER_UPLOADS_DIR": str(arena["uploads"]), name: value}
        result = run_cli("run", env=env, inherit_settings=False, timeout_s=30)
        assert result.returncode == 2, name
        assert name in result.stderr


@pytest.mark.parametrize(
    ("value", "bind"),
    [("127.0.0.1:9090", ("127.0.0.1", 9090)), ("[::1]:80", ("::1", 80)),
     (":9090", ("0.0.0.0", 9090)), ("off", None), ("", None)],
)  # fmt: skip
def test_http_addr_forms(value: str, bind: tuple[str, int] | None) -> None:
    assert Settings(http_addr=value).http_bind == bind


def test_invalid_http_addr_exits_2_naming_the_setting() -> None:
    env = {"WATCHER_HTTP_ADDR": "localhost", "WATCHER_CONFIG": ""}
    result = run_cli("run", env=env, timeout_s=30)
    assert result.returncode == 2 and "WATCHER_HTTP_ADDR" in result.stderr


def _made(dirs: dict[str, Path]) -> dict[str, Path]:
    """The four directories, all made (as a deployment has them)."""
    for path in dirs.values():
        path.mkdir(mode=0o700, exist_ok=True)
    return dirs
