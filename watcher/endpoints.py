"""A pool of clamd endpoints over TCP: scans spread over the healthy ones, failures taken out.

CLAMAV_HOST may list several endpoints (``clamd-a:3310,clamd-b:3310``) or name a DNS name with
several addresses (a Kubernetes headless Service): every address is an endpoint. The invariants:

- a scan goes only to an endpoint that answered PING and passed the canaries (`vet`, set by
  watcher/canaries.py) since it was last added, down or restarted: a misconfigured clamd gets
  no file because another one is fine;
- an endpoint that refuses a connection is taken out at once and the scan goes to another one
  (nothing was sent: trying elsewhere is safe); one that took a request and gave no answer
  (killed, frozen: `Lost`) is taken out too, and that scan fails as it would with one clamd
  (the file is retried, counted against it: a file that kills every clamd must end);
- a taken-out endpoint is probed again with backoff (`BACKOFF_S` doubling, at most
  `MAX_BACKOFF_S`) and comes back only through PING and the canaries;
- only when no endpoint is usable does a scan raise `ClamdUnavailable`: one failing endpoint
  never makes the daemon mark clamd down while others answer;
- names are resolved again every `resolve_interval_s`: new addresses are vetted before they
  get work, vanished ones get none; a failed resolution keeps the last addresses;
- scans go to the endpoint with the fewest in flight for its MaxThreads, and wait (at most
  `connect_timeout_s`) while every endpoint is full. Over TCP every scan has a connection of
  its own (INSTREAM; no session outlives a scan), so a new clamd pod gets work as soon as
  it has been resolved and vetted.

Background work (probes, re-resolution) runs on short threads started by scans and pings, so
an idle daemon runs none, and nothing runs at import time.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from watcher.clamd_socket import Lost
from watcher.errors import ClamdUnavailable
from watcher.logs import emit

T = TypeVar("T")
HostPort = tuple[str, int]
State = Literal["unchecked", "ready", "down", "untrusted"]
STATES: tuple[State, ...] = ("unchecked", "ready", "down", "untrusted")

BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
DEFAULT_CAPACITY = 4  # scans in flight on an endpoint whose STATS gave no MaxThreads


def parse_hosts(spec: str, default_port: int) -> list[HostPort]:
    """``a:3310,b``, ``[::1]:3310`` → [("a", 3310), ("b", default_port), ("::1", 3310)].

    >>> parse_hosts("clamd-0:3311, clamd-1", 3310)
    [('clamd-0', 3311), ('clamd-1', 3310)]
    """
    entries: list[HostPort] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        host, port = item, default_port
        if item.startswith("["):  # [v6] or [v6]:port
            host, _, rest = item[1:].partition("]")
            if rest:
                port = _port(rest.removeprefix(":"), item)
        elif item.count(":") == 1:
            host, _, text = item.partition(":")
            port = _port(text, item)
        if not host or any(c.isspace() or c in "/[]" for c in host):
            raise ValueError(f"not a host or host:port: {item!r}")
        entries.append((host, port))
    if not entries:
        raise ValueError("no host given")
    return entries


def _port(text: str, item: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"not a port in {item!r}")
    return int(text)


def resolve(entries: list[HostPort]) -> list[HostPort]:
    """Every address each entry's name has (IPv4 and IPv6), in a stable order, de-duplicated."""
    found: dict[HostPort, None] = {}
    for host, port in entries:
        for *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            found[(str(sockaddr[0]), int(sockaddr[1]))] = None
    return list(found)


def shown(address: HostPort) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Endpoint:
    address: HostPort
    state: State = "unchecked"
    capacity: int = DEFAULT_CAPACITY
    in_flight: int = 0
    scans: int = 0  # exchanges completed (a verdict, or clamd's error reply)
    failures: int = 0  # connections refused, answers lost
    down_streak: int = 0  # failed probes in a row: the backoff
    retry_at: float = 0.0
    down_since: float | None = None
    probing: bool = False
    problem: str | None = None  # why it is down or untrusted
    removed: bool = False

    @property
    def name(self) -> str:
        return shown(self.address)


@dataclass(frozen=True)
class EndpointStatus:
    """One endpoint as metrics and /readyz show it."""

    endpoint: str
    state: State
    in_flight: int
    capacity: int
    scans: int
    failures: int
    problem: str | None


# Vetting an endpoint: its clamd's MaxThreads (or None), then the canaries' wrong answer (or
# None); raises ClamdUnavailable when it does not answer.
Vet = Callable[[HostPort], str | None]


@dataclass
class EndpointPool:
    entries: list[HostPort]
    connect_timeout_s: float
    resolve_interval_s: float
    ping: Callable[[HostPort, float], str | None]  # (address, timeout_s): None on PONG
    capacity_of: Callable[[HostPort], int | None]
    resolver: Callable[[list[HostPort]], list[HostPort]] = resolve
    vet: Vet | None = None  # set by the canaries; None: trusted once it answers PING
    _endpoints: dict[HostPort, Endpoint] = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _resolved_at: float | None = None
    _resolving: bool = False
    _turn: int = 0

    # -- scanning ---------------------------------------------------------------------------

    def run(self, exchange: Callable[[HostPort], T]) -> T:
        """`exchange` on a usable endpoint; on another one if the connection is refused."""
        tried: set[HostPort] = set()
        while True:
            endpoint = self._take(tried)
            try:
                result = exchange(endpoint.address)
            except ClamdUnavailable as err:
                tried.add(endpoint.address)
                self._release(endpoint, failed=str(err))
                continue
            except Lost as err:
                self._release(endpoint, failed=str(err))
                raise
            except BaseException:
                self._release(endpoint)
                raise
            self._release(endpoint, scanned=True)
            return result

    def _take(self, tried: set[HostPort]) -> Endpoint:
        self._maintain()
        deadline = time.monotonic() + self.connect_timeout_s
        with self._cond:
            while True:
                usable = [
                    e
                    for e in self._endpoints.values()
                    if e.state == "ready" and e.address not in tried
                ]
                if not usable:
                    raise ClamdUnavailable(self._why_none())
                with_room = [e for e in usable if e.in_flight < e.capacity]
                left_s = deadline - time.monotonic()
                if with_room or left_s <= 0:
                    chosen = self._least_loaded(with_room or usable)
                    chosen.in_flight += 1
                    return chosen
                self._cond.wait(left_s)  # every endpoint is full: wait for a slot

    def _least_loaded(self, endpoints: list[Endpoint]) -> Endpoint:
        """The lowest load for its size; among equals, the next in turn (an even spread)."""
        self._turn += 1
        n = len(endpoints)
        return min(
            enumerate(endpoints),
            key=lambda pair: (pair[1].in_flight / pair[1].capacity, (pair[0] - self._turn) % n),
        )[1]

    def _release(
        self, endpoint: Endpoint, failed: str | None = None, scanned: bool = False
    ) -> None:
        with self._cond:
            endpoint.in_flight -= 1
            endpoint.scans += scanned
            self._cond.notify()
        if failed is not None:
            self.take_out(endpoint.address, failed)

    # -- health -----------------------------------------------------------------------------

    def take_out(
        self, address: HostPort, reason: str, untrusted: bool = False, probed: bool = False
    ) -> None:
        """No more scans there until it answers PING and the canaries again. The backoff
        grows with failed probes, not with the scans that were in flight when it failed."""
        with self._cond:
            endpoint = self._endpoints.get(address)
            if endpoint is None:
                return
            endpoint.failures += not untrusted
            was = endpoint.state
            endpoint.state = "untrusted" if untrusted else "down"
            endpoint.problem = reason
            if probed or was == "ready":
                endpoint.down_streak += 1
                endpoint.retry_at = time.monotonic() + _backoff(endpoint.down_streak)
            if was == "ready" or was == "unchecked":
                endpoint.down_since = time.monotonic()
        if untrusted and was != "untrusted":
            emit("clamd.endpoint_untrusted", endpoint=shown(address), problem=reason)
        elif not untrusted and was == "ready":
            emit("clamd.endpoint_down", endpoint=shown(address), reason=reason)

    def ping_any(self, timeout_s: float) -> None:
        """PING the usable endpoints until one answers; if none is usable, vet the others now
        (the daemon's monitor waits here while clamd is down). Raises ClamdUnavailable."""
        self._maintain()
        for endpoint in self._in_state("ready"):
            problem = self.ping(endpoint.address, timeout_s)
            if problem is None:
                return
            self.take_out(endpoint.address, problem)
        for endpoint in self._in_state("unchecked", "down", "untrusted"):
            if self.admit(endpoint.address):
                return
        raise ClamdUnavailable(self._why_none())

    def admit(self, address: HostPort) -> bool:
        """PING, MaxThreads, canaries: ready if it answers and answers right."""
        problem = self.ping(address, self.connect_timeout_s)
        if problem is not None:
            self.take_out(address, problem, probed=True)
            return False
        try:
            capacity = self.capacity_of(address) or DEFAULT_CAPACITY
            wrong = self.vet(address) if self.vet is not None else None
        except ClamdUnavailable as err:
            self.take_out(address, str(err), probed=True)
            return False
        if wrong is not None:
            self.take_out(address, wrong, untrusted=True, probed=True)
            return False
        with self._cond:
            endpoint = self._endpoints.get(address)
            if endpoint is None:
                return False
            was, since = endpoint.state, endpoint.down_since
            endpoint.state, endpoint.problem, endpoint.capacity = "ready", None, capacity
            endpoint.down_streak, endpoint.down_since = 0, None
            self._cond.notify_all()
        if was != "ready":
            down_s = None if since is None else round(time.monotonic() - since, 3)
            emit("clamd.endpoint_up", endpoint=shown(address), max_threads=capacity, down_s=down_s)
        return True

    def vet_all(self) -> None:
        """Vet every endpoint now (the canaries' periodic check, a reload of definitions)."""
        self._maintain(wait=True)
        for address in list(self._endpoints):
            self.admit(address)

    # -- background: re-resolution and probes -----------------------------------------------

    def _maintain(self, wait: bool = False) -> None:
        """Resolve when due (at once the first time), probe endpoints whose backoff is over."""
        now = time.monotonic()
        with self._cond:
            first = self._resolved_at is None
            due = first or now - (self._resolved_at or now) >= self.resolve_interval_s
            start_resolve = due and not self._resolving
            self._resolving = self._resolving or start_resolve
            to_probe = [
                e
                for e in self._endpoints.values()
                if e.state != "ready" and not e.probing and now >= e.retry_at
            ]
            for endpoint in to_probe:
                endpoint.probing = True
        if start_resolve and (first or wait):
            self._resolve()  # the first time: nothing to scan with until it is done
        elif start_resolve:
            _spawn("clamd-resolve", self._resolve)
        for endpoint in to_probe:
            _spawn("clamd-probe", self._probe, endpoint)

    def _probe(self, endpoint: Endpoint) -> None:
        try:
            if not endpoint.removed:
                self.admit(endpoint.address)
        finally:
            endpoint.probing = False

    def _resolve(self) -> None:
        try:
            try:
                addresses = self.resolver(self.entries)
            except OSError as err:
                hosts = [shown(e) for e in self.entries]
                emit("clamd.resolve_failed", hosts=hosts, reason=str(err))
                return
            with self._cond:
                known = set(self._endpoints)
                added = [a for a in addresses if a not in known]
                gone = [a for a in known if a not in set(addresses)]
                for address in added:
                    self._endpoints[address] = Endpoint(address, probing=True)
                for address in gone:
                    self._endpoints.pop(address).removed = True  # its scans end on their own
            for address in added:
                if self._resolved_at is not None:  # later additions are news; the first set is not
                    emit("clamd.endpoint_added", endpoint=shown(address))
            for address in gone:
                emit("clamd.endpoint_removed", endpoint=shown(address))
            for address in added:
                self._probe(self._endpoints.get(address) or Endpoint(address, removed=True))
        finally:
            with self._cond:
                self._resolving = False
                self._resolved_at = time.monotonic()

    # -- what the operations surface reads --------------------------------------------------

    def status(self) -> list[EndpointStatus]:
        with self._cond:
            return [
                EndpointStatus(
                    e.name, e.state, e.in_flight, e.capacity, e.scans, e.failures, e.problem
                )
                for e in self._endpoints.values()
            ]

    def ready_addresses(self) -> list[HostPort]:
        return [e.address for e in self._in_state("ready")]

    def _in_state(self, *states: State) -> list[Endpoint]:
        with self._cond:
            return [e for e in self._endpoints.values() if e.state in states]

    def _why_none(self) -> str:
        hosts = ",".join(shown(e) for e in self.entries)
        problems = "; ".join(
            f"{e.name} {e.state}: {e.problem}" for e in self._endpoints.values() if e.problem
        )
        if not self._endpoints:
            return f"no clamd address for {hosts}"
        return f"no clamd endpoint of {hosts} is usable" + (f" ({problems})" if problems else "")


def _backoff(streak: int) -> float:
    return float(min(BACKOFF_S * 2 ** min(streak - 1, 16), MAX_BACKOFF_S))


def _spawn(name: str, target: Callable[..., object], *args: object) -> None:
    threading.Thread(target=target, args=args, name=name, daemon=True).start()
