"""Configuration: environment first, then an optional TOML file named by WATCHER_CONFIG.

Built once by the CLI (`load_settings`) and passed down; nothing here runs at import time.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from watcher.endpoints import parse_hosts
from watcher.errors import ConfigError
from watcher.verdict import VERDICT_WORDS

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration_s(value: Any) -> Any:
    """Accept seconds or a short duration: "90", "90s", "15m", "4h", "30d"."""
    if isinstance(value, int | float | timedelta):
        return value.total_seconds() if isinstance(value, timedelta) else value
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"not a duration: {value!r} (use seconds or e.g. 90s, 15m, 4h, 30d)")
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return value


_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size_bytes(value: Any) -> Any:
    """Accept bytes or a size: "100M", "2GiB", "512k"."""
    if isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ValueError(f"not a size: {value!r} (use bytes or e.g. 100M, 2G)")
        unit = (match.group(2) or "B").upper()[0]
        return int(match.group(1)) * 1024 ** "BKMGT".index(unit)
    return value


# Every duration and size has an upper bound: an absurd value is an error at start, not an
# OverflowError in a thread's wait later (which would silently stop that thread).
HOUR, DAY, YEAR = 3600.0, 86400.0, 365 * 86400.0
Seconds = Annotated[float, BeforeValidator(parse_duration_s), Field(gt=0, le=DAY)]
LongSeconds = Annotated[float, BeforeValidator(parse_duration_s), Field(gt=0, le=10 * YEAR)]
Bytes = Annotated[int, BeforeValidator(parse_size_bytes), Field(gt=0, le=2**50)]

DEFAULT_IGNORE = (".*", "*.part", "*.tmp", "*.crdownload", "*~")


class Settings(BaseSettings):
    """Every setting of the daemon. Field names with the WATCHER_ prefix are the env names."""

    model_config = SettingsConfigDict(
        env_prefix="WATCHER_", frozen=True, extra="forbid", populate_by_name=True
    )

    uploads_dir: Path = Path("/data/uploads")
    processed_dir: Path = Path("/data/processed")
    quarantine_dir: Path = Path("/data/quarantine")
    state_dir: Path = Path("/var/lib/watcher")

    # The seed's names, kept without the prefix (aliases ignore env_prefix).
    clamav_socket: Path | None = Field(
        None, validation_alias=AliasChoices("CLAMAV_SOCKET", "clamav_socket")
    )
    clamav_host: str = Field(
        "127.0.0.1", validation_alias=AliasChoices("CLAMAV_HOST", "clamav_host")
    )
    clamav_port: int = Field(
        3310, ge=1, le=65535, validation_alias=AliasChoices("CLAMAV_PORT", "clamav_port")
    )
    scanning_enabled: bool = Field(
        True, validation_alias=AliasChoices("VIRUS_SCANNING_ENABLED", "scanning_enabled")
    )
    # CLAMAV_HOST may name several endpoints, or a name with several addresses (a pool, see
    # watcher/endpoints.py): names are resolved again this often.
    clamd_resolve_interval_s: Seconds = Field(10.0, le=HOUR)

    log_format: Literal["json", "text"] = "json"
    log_level: Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    workers: int = Field(0, ge=0, le=256)  # 0: as many as clamd has threads
    processes: int = Field(0, ge=0, le=64)  # scan processes; 0: one per four cores
    queue_size: int = Field(4096, ge=16, le=1_000_000)
    observer: Literal["inotify", "polling"] = "inotify"
    poll_interval_s: Seconds = 2.0
    settle_s: Seconds = 2.0
    sweep_interval_s: Seconds = 60.0
    ignore_patterns: Annotated[tuple[str, ...], NoDecode] = DEFAULT_IGNORE
    max_file_bytes: Bytes = 100 * 1024 * 1024
    unscannable_policy: Literal["quarantine", "hold"] = "quarantine"
    scan_timeout_s: Seconds = 120.0
    connect_timeout_s: Seconds = 5.0
    max_scan_attempts: int = Field(5, ge=1, le=100)
    retry_max_backoff_s: Seconds = 30.0
    shutdown_grace_s: Seconds = Field(30.0, le=HOUR)
    # Entries more than this many levels below uploads (a file at the top is level 1) are
    # rejected once; nothing deeper is watched or swept.
    max_depth: int = Field(64, ge=1, le=1000)

    # Archives clamd cannot read (watcher/archives.py). Limits match clamd's defaults
    # (MaxFileSize, MaxScanSize, MaxFiles, MaxRecursion): keep them equal to your clamd.conf.
    archive_inspection: bool = True  # False reopens clamd's blind spots: for measuring only
    accept_encrypted: bool = False  # True: encrypted ZIP/7z members are delivered unread
    archive_max_member_bytes: Bytes = 100 * 1024 * 1024
    archive_max_scan_bytes: Bytes = 400 * 1024 * 1024
    archive_max_files: int = Field(10_000, ge=1, le=1_000_000)
    archive_max_depth: int = Field(17, ge=2, le=64)
    archive_max_ratio: int = Field(250, ge=10, le=100_000)
    canary_interval_s: Seconds = 300.0  # clamd's canaries again, besides at start and reloads

    # Operations surface: HTTP (health, readiness, metrics, verdicts), heartbeat, probes.
    http_addr: str = "127.0.0.1:9090"  # "host:port", "[::1]:port"; "" or "off" disables HTTP
    http_max_wait_s: Seconds = Field(60.0, le=HOUR)  # bound of GET /v1/files/<path>?wait=S
    http_max_connections: int = Field(128, ge=8, le=65536)  # client sockets open at once
    http_max_waiters: int = Field(64, ge=1, le=65536)  # requests held on ?wait at once
    http_header_timeout_s: Seconds = Field(5.0, le=300)  # to send a head; to read an answer
    verdict_memory: int = Field(10_000, ge=1, le=10_000_000)  # final verdicts kept
    heartbeat_interval_s: Seconds = 5.0  # the daemon touches <state_dir>/heartbeat.json
    probe_timeout_s: Seconds = 0.5  # clamd PING by /readyz, /metrics and `watcher healthcheck`

    @field_validator("clamav_socket", mode="before")
    @classmethod
    def _empty_socket_is_none(cls, value: Any) -> Any:
        # CLAMAV_SOCKET="" switches the socket off (TCP instead): an env var cannot be unset by
        # a compose override, only emptied (docker-compose.external-clamd.yml does).
        return None if value == "" else value

    @field_validator("clamav_host")
    @classmethod
    def _check_clamav_host(cls, value: str) -> str:
        parse_hosts(value, 3310)  # "a:3310,b", "[::1]:3310": a ValueError naming CLAMAV_HOST
        return value

    @field_validator("http_addr")
    @classmethod
    def _check_http_addr(cls, value: str) -> str:
        parse_http_addr(value)
        return value

    @property
    def http_bind(self) -> tuple[str, int] | None:
        """(host, port) to listen on, or None when HTTP is switched off."""
        return parse_http_addr(self.http_addr)

    @field_validator("ignore_patterns", mode="before")
    @classmethod
    def _split_patterns(cls, value: Any) -> Any:
        return _split(value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("WATCHER_CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    @property
    def staging_root(self) -> Path:
        """Private claim area: on the uploads filesystem so a claim is a rename."""
        return self.uploads_dir / ".watcher"

    # Scheduled jobs (docs/jobs.md). Durations accept "90m", "4h", "30d"; sizes "100M", "2G".
    update_interval: LongSeconds = Field(4 * 3600.0, le=30 * DAY)  # mirrors rate-limit: >= 1h
    update_command: str = "freshclam --config-file=/etc/clamav/freshclam.conf"  # "": no updates
    update_timeout: Seconds = 900.0
    definitions_dir: Path = Path("/var/lib/clamav")  # clamd's DatabaseDirectory
    definitions_max_age: LongSeconds = Field(48 * 3600.0, le=YEAR)
    rescan_window: LongSeconds = Field(24 * 3600.0, le=30 * DAY)
    quarantine_retention: LongSeconds = 30 * 86400.0
    quarantine_max_bytes: Bytes | None = None  # None: no size cap, only the retention

    # The verdict store (watcher/store/), webhooks and notifications (watcher/push/).
    verdict_store: Literal["sqlite", "off"] = "sqlite"  # <state_dir>/verdicts.sqlite3
    verdict_retention: LongSeconds = 90 * 86400.0
    verdict_max_records: int = Field(10_000_000, ge=1000, le=1_000_000_000)
    # A PostgreSQL verdict store shared by replicas (watcher/store/postgres.py) instead of
    # SQLite: postgresql://user:password@host:port/db?sslmode=... A secret (its password).
    database_url: SecretStr | None = None
    database_url_file: Path | None = None
    database_timeout_s: Seconds = Field(10.0, le=300)  # connect, and each statement
    webhook_url: Annotated[tuple[str, ...], NoDecode] = ()  # one or more http(s) URLs
    webhook_secret: SecretStr | None = None
    webhook_secret_file: Path | None = None
    webhook_verdicts: Annotated[tuple[str, ...], NoDecode] = VERDICT_WORDS
    webhook_max_attempts: int = Field(20, ge=1, le=1000)  # then a dead letter
    webhook_max_backoff_s: Seconds = 3600.0  # retries wait 1 s, 2 s, 4 s ... up to this
    webhook_timeout_s: Seconds = Field(10.0, le=300)
    notify_urls: Annotated[tuple[str, ...], NoDecode] = ()  # Apprise URLs
    notify_batch_s: Seconds = 60.0  # events gathered into one message; at most one per this

    @field_validator("webhook_url", "webhook_verdicts", "notify_urls", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("webhook_url")
    @classmethod
    def _check_webhook_urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            parsed = urlsplit(url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ValueError(f"not an http(s) URL: {url!r}")
        return value

    @field_validator("webhook_verdicts")
    @classmethod
    def _check_verdicts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = set(value) - set(VERDICT_WORDS)
        if unknown:
            raise ValueError(f"unknown verdicts {sorted(unknown)}: use {', '.join(VERDICT_WORDS)}")
        return value

    @field_validator("database_url", "database_url_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value  # an env var emptied by an override: SQLite

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_database_url(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _check_database(self) -> Settings:
        if self.database_url is not None and self.database_url_file is not None:
            raise ValueError("set WATCHER_DATABASE_URL or WATCHER_DATABASE_URL_FILE, not both")
        if self.verdict_store == "off" and self.database_url_set:
            raise ValueError("WATCHER_DATABASE_URL is the verdict store: not with it off")
        return self

    @property
    def database_url_set(self) -> bool:
        return self.database_url is not None or self.database_url_file is not None

    def database_conninfo(self) -> str | None:
        """The PostgreSQL URL (read from its file at each start), or None: SQLite."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        if self.database_url_file is None:
            return None
        try:
            url = self.database_url_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"WATCHER_DATABASE_URL_FILE: cannot read it: {err}") from err
        try:
            check_database_url(url)
        except ValueError as err:
            raise ConfigError(f"WATCHER_DATABASE_URL_FILE: {err}") from err
        return url

    def dump_for_child(self) -> str:
        """The settings as JSON for a scan process, secrets included (a plain dump shows
        them as ``**********``); it reaches the child through its environment only."""
        data = json.loads(self.model_dump_json())
        for name in ("database_url", "webhook_secret"):
            value = getattr(self, name)
            data[name] = None if value is None else value.get_secret_value()
        return json.dumps(data)

    @model_validator(mode="after")
    def _check_webhooks(self) -> Settings:
        if self.webhook_url and self.verdict_store == "off":
            raise ValueError("WATCHER_WEBHOOK_URL needs the verdict store (its outbox)")
        if self.webhook_url and self.webhook_secret is None and self.webhook_secret_file is None:
            raise ValueError(
                "WATCHER_WEBHOOK_URL needs WATCHER_WEBHOOK_SECRET or WATCHER_WEBHOOK_SECRET_FILE"
            )
        return self

    def webhook_key(self) -> bytes:
        """The webhook signing secret (read from its file at each start)."""
        if self.webhook_secret is not None:
            return self.webhook_secret.get_secret_value().encode()
        if self.webhook_secret_file is None:
            raise ConfigError("no webhook secret")
        try:
            secret = self.webhook_secret_file.read_bytes().strip()
        except OSError as err:
            raise ConfigError(f"WATCHER_WEBHOOK_SECRET_FILE: {err.strerror}") from err
        if not secret:
            raise ConfigError("WATCHER_WEBHOOK_SECRET_FILE: the file is empty")
        return secret

    @field_validator("update_command")
    @classmethod
    def _split_command(cls, value: str) -> str:
        shlex.split(value)  # unbalanced quotes: a ValueError naming WATCHER_UPDATE_COMMAND
        return value

    @property
    def update_argv(self) -> list[str]:
        """The update command split shell-style; it is never run through a shell."""
        return shlex.split(self.update_command)


def _split(value: Any) -> Any:
    """A list from the environment: a JSON list, or comma-separated. From TOML: a list."""
    if isinstance(value, str):
        if value.lstrip().startswith("["):
            return json.loads(value)
        return tuple(p.strip() for p in value.split(",") if p.strip())
    return value


def check_database_url(url: str) -> None:
    """A postgresql:// URL; the message never quotes it (it holds a password)."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in ("postgresql", "postgres"):
        raise ValueError("not a postgresql:// URL (the value is not shown: it may hold a password)")


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning every problem into one ConfigError naming the setting."""
    config_file = os.environ.get("WATCHER_CONFIG")
    if config_file and not Path(config_file).is_file():
        raise ConfigError(f"WATCHER_CONFIG: file not found: {config_file}")
    try:
        return Settings(**overrides)
    except ValidationError as err:
        problems = []
        for error in err.errors():
            name = ".".join(str(p) for p in error["loc"]) or "settings"
            problems.append(f"{_env_name(name)}: {error['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from err
    except ValueError as err:  # TOML syntax errors arrive as plain ValueErrors
        raise ConfigError(f"invalid configuration: {err}") from err


def check_disjoint(settings: Settings) -> None:
    """The four directories must not contain one another (once symlinks are resolved): a
    quarantine inside uploads would be scanned again, processed inside it delivered again."""
    named = {
        "WATCHER_UPLOADS_DIR": settings.uploads_dir,
        "WATCHER_PROCESSED_DIR": settings.processed_dir,
        "WATCHER_QUARANTINE_DIR": settings.quarantine_dir,
        "WATCHER_STATE_DIR": settings.state_dir,
    }
    real = {name: os.path.realpath(path) for name, path in named.items()}
    names = list(real)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if _within(real[a], real[b]) or _within(real[b], real[a]):
                raise ConfigError(
                    f"{a} ({named[a]}) and {b} ({named[b]}) overlap: the uploads, processed, "
                    "quarantine and state directories must not contain one another"
                )


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _env_name(field: str) -> str:
    aliases = {
        "clamav_socket": "CLAMAV_SOCKET",
        "clamav_host": "CLAMAV_HOST",
        "clamav_port": "CLAMAV_PORT",
        "scanning_enabled": "VIRUS_SCANNING_ENABLED",
    }
    return aliases.get(field, field if field.isupper() else f"WATCHER_{field.upper()}")


def parse_http_addr(value: str) -> tuple[str, int] | None:
    """``127.0.0.1:9090`` -> ("127.0.0.1", 9090); ``[::1]:9090``; ``:9090`` is every address."""
    if value.strip().lower() in ("", "off"):
        return None
    host, sep, port = value.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"not host:port: {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - explicit ":port" asks for it
