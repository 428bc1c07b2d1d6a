"""The package as a library: importing any of its modules does nothing (no thread, no file, no
log sink, no signal handler, no output). The doctests of watcher/ are collected on that promise
(pyproject: --doctest-modules imports every module)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness import ROOT

# In a fresh interpreter: what importing each module (all but __main__) changes.
PROBE = """
import importlib, logging, os, pathlib, signal, sys, threading
from loguru import logger
signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE)
def state():
    return (
        sorted(t.name for t in threading.enumerate()),
        [signal.getsignal(s) for s in signals],
        sorted(logger._core.handlers),
        list(logging.root.handlers), logging.root.level,
        sorted(os.listdir(".")),
    )
root = pathlib.Path(sys.argv[1])  # found on disk: finding them by import would import them
names = sorted(
    ".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
    for p in root.rglob("*.py") if p.name != "__main__.py"
)
before = state()
for name in names:
    importlib.import_module(name)
    if state() != before:
        print("changed by importing", name, state(), before)
        sys.exit(1)
print(len(names), "modules")
"""


def test_importing_any_module_starts_nothing_and_writes_nothing(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT / "watcher")],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    *printed, summary = result.stdout.splitlines()
    assert printed == [] and result.stderr == ""
    assert int(summary.split()[0]) >= 30
    assert list(tmp_path.iterdir()) == []
