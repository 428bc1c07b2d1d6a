"""The exceptions watcher raises. Third-party errors are translated once, at the boundary.

WatcherError
├── ConfigError          invalid or missing configuration (the CLI exits 2)
├── ClamdUnavailable     clamd could not be reached or did not answer in time (transient)
├── StorageError         a delivery to a destination (processed, quarantine) failed: files wait
│   ├── StorageFull      ENOSPC / EDQUOT on a destination (transient: wait for space)
│   └── LeaseLost        our staging lease is not fresh: no delivery until it is (leases.py)
├── QuarantineError      a quarantine entry cannot be restored or deleted (refused, damaged)
│   └── EntryNotFound    no quarantine entry with that id
└── StoreUnavailable     the verdict store cannot take a write now (locked, full, gone): retry
"""

from __future__ import annotations

from pathlib import Path


class WatcherError(Exception):
    """Base of every error watcher raises on purpose."""


class ConfigError(WatcherError):
    """Configuration is invalid; the message names the setting."""


class ClamdUnavailable(WatcherError):
    """clamd did not accept the connection or did not reply in time."""


class StorageError(WatcherError):
    """A filesystem operation on one of our destinations failed; the file stays claimed."""

    def __init__(self, message: str, directory: Path | None = None, errno: int | None = None):
        super().__init__(message)
        self.directory = directory  # the destination that failed (processed, quarantine)
        self.errno = errno


class StorageFull(StorageError):
    """A destination filesystem is full; the file stays where it is until space returns."""


class LeaseLost(StorageError):
    """Our staging lease was not renewed lately (or was taken): another daemon may be adopting
    our claims, so we deliver none until it is renewed."""


class QuarantineError(WatcherError):
    """A quarantine operation was refused or failed; nothing was moved."""


class EntryNotFound(QuarantineError):
    """No quarantine entry with that id."""


class StoreUnavailable(WatcherError):
    """The verdict store cannot take a write now (locked past its timeout, its disk full, its
    connection gone); the same write may succeed later."""
