"""The verdict store's contract (watcher/store/__init__.py), held by each backend alike: SQLite
and PostgreSQL run the same tests (`make_store` is parametrized over both)."""

from __future__ import annotations

from collections.abc import Callable

from watcher.store import VerdictRecord, VerdictStore

MakeStore = Callable[..., VerdictStore]


def rec(n: int, at: float, **fields: object) -> VerdictRecord:
    values: dict[str, object] = {
        "id": f"id-{n}",
        "path": f"dir/f{n}.txt",
        "verdict": "clean",
        "decided_at": at,
        **fields,
    }
    return VerdictRecord(**values)  # type: ignore[arg-type]


def test_records_replace_by_id_and_answer_by_path_and_by_content(make_store: MakeStore) -> None:
    store = make_store()
    store.record([rec(1, 10.0, sha256="aa"), rec(2, 20.0, path="dir/f1.txt", sha256="aa")])
    store.record([rec(1, 10.0, sha256="aa", verdict="infected", signature="Eicar")])
    newest = store.by_path("dir/f1.txt")
    assert newest is not None and newest.id == "id-2"  # the newest record of the path
    assert [r.id for r in store.by_sha256("aa")] == ["id-2", "id-1"]
    assert [r.verdict for r in store.by_sha256("aa")] == ["clean", "infected"]
    assert store.by_sha256("aa", limit=1)[0].id == "id-2"
    assert store.by_path("nothing") is None and store.by_sha256("bb") == []
    full = rec(3, 30.0, sha256="cc", size=2**40, signature="S", reason="r", cause="c",
               definitions="ClamAV 1.4", claimed_at=29.5, location="processed/dir/f3.txt",
               late_at=31.0)  # fmt: skip
    store.record([full])
    assert store.by_path("dir/f3.txt") == full  # every field as written


def test_records_outlive_the_store_being_closed_and_opened_again(make_store: MakeStore) -> None:
    store = make_store()
    store.record([rec(1, 1.0)], [("v-id-1", "t1", '{"id": "v-id-1"}')])
    store.close()
    again = make_store()
    assert again.by_path("dir/f1.txt") == rec(1, 1.0)
    assert [e.key for e in again.due("t1", 10.0**10, 10)] == ["v-id-1"]


def test_an_event_is_enqueued_once_per_key_and_target(make_store: MakeStore) -> None:
    store = make_store()
    store.record([rec(1, 1.0)], [("v-1", "t1", "a"), ("v-1", "t2", "a")])
    store.record([rec(1, 1.0)], [("v-1", "t1", "again"), ("v-2", "t1", "b")])  # a retry
    due = store.due("t1", 10.0**10, 10)
    assert [(e.key, e.body, e.attempts) for e in due] == [("v-1", "a", 0), ("v-2", "b", 0)]
    assert [e.key for e in store.due("t2", 10.0**10, 10)] == ["v-1"]
    assert store.outbox_counts() == (3, 0)


def test_the_outbox_retries_delivers_and_keeps_dead_letters(make_store: MakeStore) -> None:
    store = make_store()
    store.record([], [(f"v-{n}", "t", str(n)) for n in range(4)])
    first, second, third, fourth = store.due("t", 10.0**10, 10)
    assert store.due("t", 10.0**10, 2) == [first, second]  # oldest first
    store.delivered([first.id, second.id])
    now = 10.0**10
    store.failed(third.id, now + 60, "HTTP 500")
    store.dead(fourth.id, now, "HTTP 410")
    assert store.due("t", now, 10) == []  # one waits for its backoff, one is dead
    (retried,) = store.due("t", now + 61, 10)
    assert retried.key == "v-2" and retried.attempts == 1
    assert store.next_due_at("t") == now + 60 and store.next_due_at("other") is None
    assert store.outbox_counts() == (1, 1)


def test_a_late_detection_updates_the_delivered_record(make_store: MakeStore) -> None:
    store = make_store()
    delivered = rec(1, 10.0, sha256="aa", location="processed/dir/f1.txt", size=5)
    store.record([delivered])
    late = rec(9, 50.0, sha256="aa", verdict="infected", signature="Late.Sig",
               definitions="new", location="quarantine/q9", late_at=50.0)  # fmt: skip
    merged = store.mark_late("dir/f1.txt", "processed/dir/f1.txt", "aa", late)
    assert merged.id == "id-1" and merged.size == 5 and merged.decided_at == 10.0
    assert (merged.verdict, merged.signature, merged.location) == (
        "infected",
        "Late.Sig",
        "quarantine/q9",
    )
    assert store.by_path("dir/f1.txt") == merged
    unknown = store.mark_late("gone.txt", "processed/gone.txt", None, rec(7, 60.0))
    assert unknown == rec(7, 60.0) and store.by_path("dir/f7.txt") == rec(7, 60.0)


def test_one_sender_at_a_time_and_the_next_takes_over_when_it_lets_go(
    make_store: MakeStore,
) -> None:
    """Two daemons on one store: the first to ask sends, the other waits; it takes over
    when the first stops (closes its store)."""
    first, second = make_store(), make_store()
    assert first.lock_sender() is True
    assert second.lock_sender() is False
    assert first.lock_sender() is True  # asked again each round: still the sender
    first.close()
    assert second.lock_sender() is True
    assert second.problem() is None
