"""watcher: an upload-scanning sidecar for ClamAV's clamd."""

__version__ = "0.1.0"
