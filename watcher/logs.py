"""Logging, configured once by the CLI: one flat JSON object (or one text line) per event.

Everywhere else: ``emit("file.clean", path=rel, dest=...)``: the event's level and message come
from its entry in watcher/events.py; data goes in fields, never into a message, so an uploaded
name is never a format string.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

from loguru import logger

from watcher.events import CATALOG

# Fields loguru's record already carries that we never copy into the flat line.
_RESERVED = {"time", "level", "event", "message"}
# One encoder: json.dumps with any option builds a new one per call (several per file).
_encode_json = json.JSONEncoder(default=str).encode


def _flat_json(record: Any) -> str:
    at = record["time"]
    if at.utcoffset():
        at = at.astimezone(UTC)
    line: dict[str, Any] = {
        "time": at.isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "event": record["extra"].get("event", "log"),
        "message": record["message"],
    }
    for key, value in record["extra"].items():
        if key not in _RESERVED:
            line[key] = value
    if record["exception"] is not None:
        line["exception"] = "".join(traceback.format_exception(*record["exception"])).rstrip()
    return _encode_json(line)


def _text(record: Any) -> str:
    fields = " ".join(
        f"{k}={json.dumps(v, default=str)}"
        for k, v in record["extra"].items()
        if k not in _RESERVED
    )
    return (
        f"{record['time'].astimezone(UTC):%Y-%m-%dT%H:%M:%S.%fZ} {record['level'].name:<7} "
        f"{record['extra'].get('event', 'log')} {record['message']} {fields}"
    ).rstrip()


class _Sink:
    """Writes one line per record; formatting is ours, so loguru never parses our data."""

    def __init__(self, stream: TextIO, fmt: str) -> None:
        self._stream = stream
        self._render = _flat_json if fmt == "json" else _text
        self.lock = threading.Lock()  # loguru's own lock does not cover `_Direct`'s lines

    def write(self, message: Any) -> None:
        line = self._render(message.record) + "\n"
        with self.lock:
            self._stream.write(line)
            self._stream.flush()


class _Direct:
    """The JSON line of an event without an exception, written straight to the stream that
    loguru's sink writes to: the same object, field for field, as `_flat_json` renders from
    loguru's record, without loguru's record (a frame lookup, a dict of a dozen entries, its
    handler's locks) on every file. Only once `configure_logging` chose JSON: sinks added to
    loguru otherwise (the tests') see every event."""

    def __init__(self, sink: _Sink, min_level: str) -> None:
        self._sink = sink
        self._min_level_no = logger.level(min_level).no
        self._wanted: dict[str, bool] = {}  # by level name

    def wanted(self, level: str) -> bool:
        wanted = self._wanted.get(level)
        if wanted is None:
            wanted = self._wanted[level] = logger.level(level).no >= self._min_level_no
        return wanted

    def write(self, name: str, level: str, message: str, fields: dict[str, Any]) -> None:
        line: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "level": level,
            "event": name,
            "message": message,
        }
        for key, value in fields.items():
            if key not in _RESERVED:
                line[key] = value
        text = _encode_json(line) + "\n"
        with self._sink.lock:
            self._sink._stream.write(text)
            try:
                self._sink._stream.flush()
            except Exception as err:  # the line is written (buffered): never twice
                raise _Written from err


class _Written(Exception):
    """A direct line reached the stream, but flushing it failed."""


_direct: _Direct | None = None


class _InterceptHandler(logging.Handler):
    """Routes stdlib logging (watchdog, apscheduler) into the same sink."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        name = f"lib.{record.name}"
        logger.bind(event=name).opt(exception=record.exc_info).log(level, record.getMessage())
        for observer in _observers:
            observer(name, record.levelname)


def configure_logging(fmt: str = "json", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Replace loguru's default handler with ours; diagnose=False keeps data out of tracebacks."""
    global _direct
    logger.remove()
    # format="{message}": the sink renders the record itself; loguru's default format would
    # render a timestamp (and more) on every call only to be thrown away.
    sink = _Sink(stream or sys.stdout, fmt)
    logger.add(sink.write, level=level, format="{message}", diagnose=False, backtrace=False)
    _direct = _Direct(sink, level) if fmt == "json" else None
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.WARNING, force=True)


# Who else hears of each event (at INFO and above): metrics count them by name and level.
# Called in the emitting thread, after the line is written; must be cheap and never raise.
_observers: list[Callable[[str, str], None]] = []
_watchers: dict[str, list[Callable[[str, dict[str, Any]], None]]] = {}  # by event name


def observe_events(observer: Callable[[str, str], None]) -> Callable[[], None]:
    """Call `observer(event, level)` for every event from now on; returns the way to stop."""
    _observers.append(observer)
    return lambda: _observers.remove(observer)


def watch_events(
    names: Iterable[str], watcher: Callable[[str, dict[str, Any]], None]
) -> Callable[[], None]:
    """Call `watcher(event, fields)` for each of these events from now on (on the emitting
    thread: it must be quick); returns the way to stop."""
    wanted = list(names)
    for name in wanted:
        _watchers.setdefault(name, []).append(watcher)

    def stop() -> None:
        for name in wanted:
            _watchers[name].remove(watcher)

    return stop


def notify_observers(name: str, level: str, count: int = 1) -> None:
    """Events logged elsewhere (another scan process): counted as if logged here."""
    for observer in _observers:
        for _ in range(count):
            observer(name, level)


def emit(name: str, /, *, exception: BaseException | bool | None = None, **fields: Any) -> None:
    """Log the event `name` with its fields; watcher/events.py gives its level and message.

    ``exception``: an exception, or True for the one being handled, logged with its traceback.
    Data goes in `fields`, never in a message: an uploaded name is never a format string.
    """
    spec = CATALOG[name]
    direct = _direct
    if direct is not None and (exception is None or exception is False):
        if direct.wanted(spec.level):
            try:
                direct.write(name, spec.level, spec.message, fields)
            except _Written as err:  # reported on stderr, as loguru reports a failing sink
                with contextlib.suppress(Exception):  # emit never raises (nor did loguru)
                    print(f"watcher: writing the log failed: {err.__cause__!r}", file=sys.stderr)
            except Exception:  # nothing written (e.g. a closed stdout): loguru's way, as before
                _log(name, spec.level, spec.message, None, fields)
    else:
        _log(name, spec.level, spec.message, exception, fields)
    if spec.level != "DEBUG":
        for observer in _observers:
            observer(name, spec.level)
    for watcher in _watchers.get(name, ()):
        watcher(name, fields)


def _log(
    name: str,
    level: str,
    message: str,
    exception: BaseException | bool | None,
    fields: dict[str, Any],
) -> None:
    bound = logger.bind(event=name, **fields)
    if exception is not None and exception is not False:
        bound = bound.opt(exception=exception)
    bound.log(level, message)


class LogBudget:
    """At most `per_s` lines a second per event name; the rest are counted, and each second
    that had some is summed up in one `summary_event` line. For events a stranger can cause
    at will (a request, a connection), so that they cannot flood the log.

    Not thread-safe: one owner thread (the HTTP server's loop) calls it.
    """

    def __init__(self, summary_event: str, per_s: int = 10) -> None:
        self.summary_event = summary_event
        self.per_s = per_s
        self._window_start = 0.0
        self._lines: Counter[str] = Counter()
        self._suppressed: Counter[str] = Counter()

    def log(self, name: str, now: float, **fields: Any) -> None:
        """`emit(name, **fields)` if within budget."""
        self.flush(now)
        self._lines[name] += 1
        if self._lines[name] > self.per_s:
            self._suppressed[name] += 1
            return
        emit(name, **fields)

    def flush(self, now: float) -> None:
        """Close the current second if it is over (call it now and then)."""
        if now - self._window_start < 1.0:
            return
        for name, count in self._suppressed.items():
            emit(self.summary_event, suppressed_event=name, count=count)
        self._window_start = now
        self._lines.clear()
        self._suppressed.clear()
