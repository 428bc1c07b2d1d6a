"""A real PostgreSQL from Debian's packages (`make test-deps` installs it), private to a test run.

PostgreSQL refuses to run as root: initdb and pg_ctl run as the `postgres` user, on a data
directory in a temporary directory of its own, listening on a unix socket in that directory
only (no TCP port: test runs share the machine). Password authentication (scram-sha-256), so
that a URL carries a password as it does in production. One server per test session; each
test gets a database of its own (`create_database`).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

PG_BIN = Path("/usr/lib/postgresql/15/bin")
USER = "postgres"  # the Debian package's system user: PostgreSQL refuses root
ROLE = "watcher"


def available() -> str | None:
    """None when a server can be started here, else why not."""
    if not (PG_BIN / "initdb").exists():
        return f"PostgreSQL 15 is not installed ({PG_BIN}): run `make test-deps`"
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return f"no {USER} user (Debian's postgresql package creates it)"
    return None


class Postgres:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="watcher-pg-"))  # not under pytest's 0700 tree
        self.data = self.root / "data"
        self.socket_dir = self.root / "run"
        self.password = "pw-" + secrets.token_hex(12)  # a test greps logs for it
        account = pwd.getpwnam(USER)
        self._uid, self._gid = account.pw_uid, account.pw_gid

    def _as_postgres(self, *argv: str, timeout_s: float = 120) -> None:
        done = subprocess.run(
            [str(PG_BIN / argv[0]), *argv[1:]],
            user=self._uid,
            group=self._gid,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} exited {done.returncode}: {done.stderr[-2000:]}")

    def init(self) -> Postgres:
        os.chown(self.root, self._uid, self._gid)
        self.root.chmod(0o700)
        self.socket_dir.mkdir()
        os.chown(self.socket_dir, self._uid, self._gid)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        os.chown(pwfile, self._uid, self._gid)
        self._as_postgres(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            ROLE,
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--no-sync",  # a test server: its durability is not what is tested
        )
        pwfile.unlink()
        conf = (
            "listen_addresses = ''\n"
            f"unix_socket_directories = '{self.socket_dir}'\n"
            "fsync = off\nsynchronous_commit = on\nfull_page_writes = off\n"
            "max_connections = 200\nshared_buffers = 32MB\n"
        )
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(conf)
        return self

    def start(self) -> Postgres:
        log = str(self.root / "log")
        self._as_postgres("pg_ctl", "-D", str(self.data), "-l", log, "-w", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """``immediate``: as a crash (no shutdown checkpoint; sessions cut at once)."""
        self._as_postgres("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, dbname: str = "postgres") -> str:
        """postgresql://watcher:<password>@/<dbname>?host=<socket dir>"""
        return f"postgresql://{ROLE}:{self.password}@/{dbname}?host={self.socket_dir}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url(dbname), autocommit=True)

    def create_database(self) -> str:
        """A fresh database; its URL."""
        name = "t_" + secrets.token_hex(6)
        with self.connect() as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)
