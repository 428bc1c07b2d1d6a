"""Operator notifications through Apprise to a real local target (json:// to a loopback
receiver): a burst is one batched message, and nothing is sent more often than the batch."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from harness import EICAR
from harness.events import Events
from harness.receiver import Receiver
from watcher.service import Service

Start = Callable[..., Service]


def apprise_url(receiver: Receiver) -> str:
    return f"json://127.0.0.1:{receiver.port}/notify"


def test_a_burst_of_infected_files_is_one_batched_notification(
    start_daemon: Start, dirs: dict[str, Path], events: Events, tmp_path: Path
) -> None:
    receiver = Receiver().start()
    try:
        service = start_daemon(notify_urls=apprise_url(receiver), notify_batch_s=8)
        burst = tmp_path / "burst"
        burst.mkdir()
        for n in range(30):
            (burst / f"bad-{n:02}.com").write_bytes(EICAR + b"%d" % n)
        for path in sorted(burst.iterdir()):
            path.rename(dirs["uploads"] / path.name)
        events.wait_for("file.infected", count=30, timeout_s=30)
        (sent,) = events.wait_for("notify.sent", timeout_s=30)
        assert sent["events"] == 30 and sent["counts"] == {"file.infected": 30}
        (post,) = receiver.wait_for(1)
        message = post.json()
        assert message["type"] == "failure" and message["title"] == "watcher: 30 infected"
        assert "30 x infected files quarantined" in message["message"]
        examples = [line for line in message["message"].splitlines() if line.startswith("  - ")]
        assert len(examples) == 10 and all(e.startswith("  - bad-") for e in examples)
        assert all(e.endswith(")") and ".com (" in e for e in examples)  # with the signature
        assert "... and 20 more" in message["message"]
        time.sleep(1.0)
        assert len(receiver.posts) == 1
        assert service.push.notifier is not None and service.push.notifier.sent == 1
    finally:
        receiver.stop()


def test_events_after_a_message_wait_for_the_batch_interval(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    """A second infected file right after a message: sent one batch interval later."""
    receiver = Receiver().start()
    try:
        start_daemon(notify_urls=apprise_url(receiver), notify_batch_s=3)
        (dirs["uploads"] / "one.com").write_bytes(EICAR + b"1")
        (first,) = receiver.wait_for(1, timeout_s=20)
        (dirs["uploads"] / "two.com").write_bytes(EICAR + b"2")
        events.wait_for("file.infected", path="two.com")
        _, second = receiver.wait_for(2, timeout_s=20)
        assert second.at - first.at >= 2.9
        assert "two.com" in second.json()["message"] and "one.com" not in second.json()["message"]
    finally:
        receiver.stop()


def test_clamd_down_and_unscannable_files_are_notified_too(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    receiver = Receiver().start()
    try:
        start_daemon(notify_urls=apprise_url(receiver), notify_batch_s=2, max_file_bytes=10)
        (dirs["uploads"] / "big.bin").write_bytes(b"more than ten bytes")
        events.wait_for("file.unscannable", path="big.bin")
        (post,) = receiver.wait_for(1, timeout_s=20)
        message = post.json()
        assert message["title"] == "watcher: 1 unscannable" and message["type"] == "warning"
        assert "big.bin (larger than WATCHER_MAX_FILE_BYTES (10))" in message["message"]
    finally:
        receiver.stop()


def test_a_target_that_refuses_is_logged_and_scanning_goes_on(
    start_daemon: Start, dirs: dict[str, Path], events: Events
) -> None:
    receiver = Receiver(status=500).start()
    try:
        start_daemon(notify_urls=apprise_url(receiver), notify_batch_s=1)
        (dirs["uploads"] / "bad.com").write_bytes(EICAR)
        (failed,) = events.wait_for("notify.failed", timeout_s=20)
        assert failed["events"] == 1
        (dirs["uploads"] / "ok.txt").write_bytes(b"fine")
        events.wait_for("file.clean", path="ok.txt")
    finally:
        receiver.stop()
