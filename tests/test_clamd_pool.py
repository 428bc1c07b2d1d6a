"""A pool of clamd over TCP (CLAMAV_HOST="a:port,b:port,..."): real clamd processes, each on a
loopback address of its own (127.0.0.1, 127.0.0.2, 127.0.0.3) as if on three hosts."""

from __future__ import annotations

import io
import json
import time
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness import EICAR
from harness.clamd import Clamd
from harness.events import Events, wait_until
from harness.files import files_under, quarantined, staged
from watcher.clamav import ClamdScanner
from watcher.endpoints import parse_hosts
from watcher.service import Service
from watcher.settings import Settings

MakeSettings = Callable[..., Settings]


@pytest.fixture
def clamds(make_clamd: Callable[..., Clamd]) -> Callable[..., list[Clamd]]:
    """Start clamd on 127.0.0.N (N = 1, 2, ...), each with its own database and config."""

    def start(count: int, alert_exceeds_max: tuple[bool, ...] = ()) -> list[Clamd]:
        started = []
        for n in range(count):
            alert = alert_exceeds_max[n] if n < len(alert_exceeds_max) else True
            name, host = f"clamd-{n + 1}", f"127.0.0.{n + 1}"
            started.append(make_clamd(name, tcp_host=host, alert_exceeds_max=alert))
        return started

    return start


def pool_settings(make_settings: MakeSettings, servers: list[Clamd], **overrides: Any) -> Settings:
    return make_settings(
        clamav_socket=None,
        clamav_host=",".join(s.endpoint for s in servers),
        connect_timeout_s=1,
        scan_timeout_s=3,  # a frozen clamd costs its in-flight scans this long
        retry_max_backoff_s=1,
        **overrides,
    )


def scans_by_endpoint(service: Service) -> dict[str, int]:
    return {e.endpoint: e.scans for e in service.daemon.clamd_endpoints()}


def write_batch(uploads: Path, start: int, count: int) -> dict[str, bytes]:
    """Files named n-<i>.bin; every 7th is EICAR, the others distinct clean bytes."""
    written = {}
    for i in range(start, start + count):
        body = EICAR if i % 7 == 3 else f"upload {i}\n".encode() * (1 + i % 5)
        path = uploads / f"n-{i}.bin"
        path.write_bytes(body)
        written[path.name] = body
    return written


def delivered(dirs: dict[str, Path]) -> int:
    complete = [r for r in quarantined(dirs["quarantine"]) if r["bytes"] is not None]
    return len(files_under(dirs["processed"])) + len(complete)


def settled(uploads: Path) -> bool:
    """Nothing left in uploads, nothing claimed and not yet delivered."""
    return not files_under(uploads) and not staged(uploads)


def get(service: Service, path: str) -> tuple[int, bytes]:
    assert service.ops.server is not None
    host, port = service.ops.server.address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def nudge_until(uploads: Path, events: Events, name: str, count: int = 1, **fields: Any) -> None:
    """Upload a small file every 0.2 s until the event is logged: the pool re-resolves and
    probes when scans (or probes from /readyz and /metrics) come, never in an idle daemon."""
    for n in range(150):
        if len(events.named(name, **fields)) >= count:
            return
        (uploads / f"nudge-{name}-{n}.txt").write_bytes(b"nudge\n")
        time.sleep(0.2)
    raise AssertionError(f"no {name} {fields}")


def test_scans_spread_over_every_endpoint_and_one_stopped_one_frozen_lose_nothing(
    make_settings: MakeSettings,
    clamds: Callable[..., list[Clamd]],
    dirs: dict[str, Path],
    events: Events,
) -> None:
    """Three clamd share the stream; one is stopped and one frozen mid-stream: every file ends
    once, with its bytes, clean ones in processed and EICAR in quarantine; the daemon never
    marks clamd down, and the two are taken out, each logged once."""
    first, stopped, frozen = clamds(3)
    service = Service(pool_settings(make_settings, [first, stopped, frozen]))
    service.start()
    try:
        expected = write_batch(dirs["uploads"], 0, 45)
        wait_until(lambda: delivered(dirs) == 45, 60, "the first batch")
        spread = scans_by_endpoint(service)
        assert sorted(spread) == sorted([first.endpoint, stopped.endpoint, frozen.endpoint])
        assert all(n >= 5 for n in spread.values()), spread

        expected |= write_batch(dirs["uploads"], 45, 20)
        stopped.stop()
        frozen.freeze()
        expected |= write_batch(dirs["uploads"], 65, 40)
        # A delivered claim leaves staging once its record is committed (watcher/recording.py).
        wait_until(
            lambda: delivered(dirs) == 105 and staged(dirs["uploads"]) == [],
            90,
            "every file delivered and its claim dropped",
        )

        clean = {k: v for k, v in expected.items() if v != EICAR}
        assert files_under(dirs["processed"]) == clean
        records = quarantined(dirs["quarantine"])
        assert sorted(r["original_path"] for r in records) == sorted(
            k for k, v in expected.items() if v == EICAR
        )
        assert {r["verdict"] for r in records} == {"infected"}
        assert all(r["bytes"] == EICAR for r in records)
        assert files_under(dirs["uploads"]) == {} and staged(dirs["uploads"]) == []
        assert len(events.named("file.clean")) == len(clean)  # each scanned and clean, once

        downs = {r["endpoint"] for r in events.named("clamd.endpoint_down")}
        assert downs == {stopped.endpoint, frozen.endpoint}
        assert len(events.named("clamd.endpoint_down")) == 2
        assert events.named("clamd.down") == []
        status, body = get(service, "/readyz")
        assert status == 200, body
        endpoints = json.loads(body)["clamd_endpoints"]
        assert endpoints[first.endpoint] == "ready"
        assert endpoints[stopped.endpoint].startswith("down: ")
        assert endpoints[frozen.endpoint].startswith("down: ")
        _, metrics = get(service, "/metrics")
        assert (
            f'watcher_clamd_endpoint_state{{endpoint="{stopped.endpoint}",state="down"}} 1.0'
            in metrics.decode()
        )

        frozen.thaw()  # back in, through PING and the canaries, and it gets files again
        nudge_until(dirs["uploads"], events, "clamd.endpoint_up", 2, endpoint=frozen.endpoint)
        before = scans_by_endpoint(service)[frozen.endpoint]
        write_batch(dirs["uploads"], 200, 30)
        wait_until(lambda: settled(dirs["uploads"]), 60, "the last batch")
        assert scans_by_endpoint(service)[frozen.endpoint] > before
    finally:
        frozen.thaw()
        service.close()


def nest(levels: int) -> bytes:
    """EICAR at the bottom of `levels` nested zips."""
    data, name = EICAR, "eicar.com"
    for level in range(levels):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr(name, data)
        data, name = buffer.getvalue(), f"level-{level}.zip"
    return data


def test_an_endpoint_that_answers_a_canary_wrongly_gets_no_file_while_the_others_scan(
    make_settings: MakeSettings,
    clamds: Callable[..., list[Clamd]],
    dirs: dict[str, Path],
    events: Events,
) -> None:
    """Without AlertExceedsMax, clamd answers OK for what is past its limits: that endpoint is
    untrusted (one answering right never vouches for another) and scans nothing."""
    good, careless, other = clamds(3, alert_exceeds_max=(True, False, True))
    service = Service(pool_settings(make_settings, [good, careless, other]))
    service.start()
    try:
        (untrusted,) = events.named("clamd.endpoint_untrusted")
        assert untrusted["endpoint"] == careless.endpoint
        assert "canary nest" in untrusted["problem"]
        assert events.named("clamd.untrusted") == []  # the daemon scans with the other two

        expected = write_batch(dirs["uploads"], 0, 30)
        deep = nest(20)
        for i in range(4):
            (dirs["uploads"] / f"deep-{i}.zip").write_bytes(deep)
        wait_until(lambda: delivered(dirs) == 34, 60, "every file delivered")

        scans = scans_by_endpoint(service)
        assert scans[careless.endpoint] == 0
        assert scans[good.endpoint] > 0 and scans[other.endpoint] > 0
        records = quarantined(dirs["quarantine"])
        deep_records = [r for r in records if r["original_path"].startswith("deep-")]
        assert len(deep_records) == 4  # never clean, as the careless clamd would have said
        assert files_under(dirs["processed"]) == {k: v for k, v in expected.items() if v != EICAR}
        status, body = get(service, "/readyz")
        assert status == 200
        assert json.loads(body)["clamd_endpoints"][careless.endpoint].startswith("untrusted: ")
    finally:
        service.close()


def test_a_pool_of_only_untrusted_endpoints_takes_no_file(
    make_settings: MakeSettings,
    clamds: Callable[..., list[Clamd]],
    dirs: dict[str, Path],
    events: Events,
) -> None:
    """Every endpoint answered wrongly: the daemon distrusts clamd, files wait, not ready."""
    servers = clamds(2, alert_exceeds_max=(False, False))
    service = Service(pool_settings(make_settings, servers))
    service.start()
    try:
        (distrust,) = events.wait_for("clamd.untrusted")
        assert "every clamd endpoint answered a canary wrongly" in distrust["problem"]
        (dirs["uploads"] / "waits.txt").write_bytes(b"not yet\n")
        status, body = get(service, "/readyz")
        assert status == 503 and "clamd_canaries" in json.loads(body)["failing"]
        assert files_under(dirs["uploads"]) == {"waits.txt": b"not yet\n"}
        assert files_under(dirs["processed"]) == {}
        assert sum(scans_by_endpoint(service).values()) == 0
    finally:
        service.close()


def test_clamd_is_down_only_when_no_endpoint_answers_and_files_flow_when_one_returns(
    make_settings: MakeSettings,
    clamds: Callable[..., list[Clamd]],
    dirs: dict[str, Path],
    events: Events,
) -> None:
    one, two = clamds(2)
    service = Service(pool_settings(make_settings, [one, two]))
    service.start()
    try:
        one.stop()
        (dirs["uploads"] / "a.txt").write_bytes(b"first\n")
        events.wait_for("file.clean", path="a.txt")
        assert events.named("clamd.down") == []
        two.stop()
        (dirs["uploads"] / "b.txt").write_bytes(b"second\n")
        events.wait_for("clamd.down")
        assert "b.txt" not in files_under(dirs["processed"])
        one.start()
        events.wait_for("clamd.up", timeout_s=30)
        events.wait_for("file.clean", path="b.txt", timeout_s=30)
        assert files_under(dirs["processed"]) == {"a.txt": b"first\n", "b.txt": b"second\n"}
        assert len(events.named("clamd.down")) == 1
    finally:
        service.close()


def test_a_new_address_found_on_re_resolve_is_vetted_then_gets_files_and_a_gone_one_none(
    make_settings: MakeSettings,
    clamds: Callable[..., list[Clamd]],
    dirs: dict[str, Path],
    events: Events,
) -> None:
    """A headless Service's name gains a pod, then loses one. DNS is the one faked seam: the
    resolver returns what a name would resolve to; the clamd behind each address is real."""
    old, new = clamds(2)
    assert old.tcp is not None and new.tcp is not None
    answers = [[old.tcp]]
    settings = pool_settings(make_settings, [old], clamd_resolve_interval_s=0.2)
    scanner = ClamdScanner(
        host="clamd.scanner.svc.cluster.local",
        port=3310,
        scan_timeout_s=settings.scan_timeout_s,
        connect_timeout_s=settings.connect_timeout_s,
        resolve_interval_s=settings.clamd_resolve_interval_s,
    )
    assert scanner.pool is not None
    scanner.pool.resolver = lambda entries: list(answers[-1])
    service = Service(settings, scanner)
    service.start()
    try:
        write_batch(dirs["uploads"], 0, 10)
        wait_until(lambda: delivered(dirs) == 10, 30, "files scanned by the first pod")
        assert scans_by_endpoint(service) == {old.endpoint: 10}

        answers.append([old.tcp, new.tcp])
        nudge_until(dirs["uploads"], events, "clamd.endpoint_up", endpoint=new.endpoint)
        assert events.named("clamd.endpoint_added", endpoint=new.endpoint)
        write_batch(dirs["uploads"], 100, 30)
        wait_until(lambda: settled(dirs["uploads"]), 30, "files scanned by both pods")
        assert scans_by_endpoint(service)[new.endpoint] > 0

        answers.append([new.tcp])
        nudge_until(dirs["uploads"], events, "clamd.endpoint_removed", endpoint=old.endpoint)
        wait_until(lambda: settled(dirs["uploads"]), 30, "the nudges")
        assert list(scans_by_endpoint(service)) == [new.endpoint]  # the old one is not listed
        before = scans_by_endpoint(service)[new.endpoint]
        write_batch(dirs["uploads"], 200, 10)
        wait_until(lambda: settled(dirs["uploads"]), 30, "files for the remaining pod")
        assert scans_by_endpoint(service) == {new.endpoint: before + 10}
    finally:
        service.close()


def test_clamav_host_forms() -> None:
    assert parse_hosts("clamd", 3310) == [("clamd", 3310)]
    assert parse_hosts("a:1, b ,[::1]:3311,[fe80::1]", 3310) == [
        ("a", 1),
        ("b", 3310),
        ("::1", 3311),
        ("fe80::1", 3310),
    ]
    for bad in ("", ",", "a:0", "a:70000", "a:x", "/run/clamd.sock", "a b:1"):
        with pytest.raises(ValueError):
            parse_hosts(bad, 3310)


def test_the_unix_socket_never_goes_through_the_pool(clamd_server: Clamd) -> None:
    """A single local clamd keeps its FILDES path (and its session pool) as it was."""
    assert clamd_server.scanner.pool is None
    assert clamd_server.scanner.endpoints() == []
