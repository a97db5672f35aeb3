"""The append-only promotion ledger: durable appends, filtered reads, torn lines."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

from driftloop.ledger import Ledger, LedgerEntry
from driftloop.rollout import (
    ArmRef,
    RolloutPolicy,
    advance,
    promote,
    start_rollout,
)
from driftloop.settings import get_settings

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def entry(action: str, champion: str | None = None, model: str = "fraud", **kw) -> LedgerEntry:
    return LedgerEntry(
        timestamp=kw.pop("timestamp", T0),
        model_name=model,
        action=action,
        champion_tag=champion,
        champion_arm=None if champion is None else champion.replace(":", "-"),
        **kw,
    )


def test_append_and_read_back_in_order(tmp_path):
    ledger = Ledger(tmp_path / "ledger" / "promotions.jsonl")
    assert ledger.entries() == []
    ledger.append(entry("baseline", "svc:v1", incident_id=None))
    ledger.append(entry("started", "svc:v1", incident_id="inc-1", weights={"a": 95, "b": 5}))
    ledger.append(entry("started", "other:v1", model="churn", incident_id="inc-2"))
    all_entries = ledger.entries()
    assert [e.action for e in all_entries] == ["baseline", "started", "started"]
    assert [e.action for e in ledger.entries(model_name="fraud")] == ["baseline", "started"]
    assert [e.model_name for e in ledger.entries(incident_id="inc-2")] == ["churn"]
    assert ledger.entries(model_name="fraud", incident_id="inc-1")[0].weights == {"a": 95, "b": 5}
    # one JSON object per line, nothing else
    lines = ledger.path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["model_name"] for line in lines)


def test_torn_last_line_is_skipped_and_the_next_append_is_readable(tmp_path):
    ledger = Ledger(tmp_path / "promotions.jsonl")
    ledger.append(entry("baseline", "svc:v1"))
    whole = entry("promoted", "svc:v2").model_dump_json()
    with ledger.path.open("a") as fh:  # a crash in the middle of a write
        fh.write(whole[: len(whole) // 2])
    assert [e.action for e in ledger.entries()] == ["baseline"]
    assert ledger.skipped == 1
    ledger.append(entry("rolled_back", "svc:v1"))
    assert [e.action for e in ledger.entries()] == ["baseline", "rolled_back"]
    assert ledger.skipped == 1


def test_last_known_good(tmp_path):
    ledger = Ledger(tmp_path / "promotions.jsonl")
    assert ledger.last_known_good("fraud") is None
    ledger.append(entry("baseline", "svc:v1"))
    ledger.append(entry("promoted", "svc:v2"))  # not yet certified: guard still running
    assert ledger.last_known_good("fraud").champion_tag == "svc:v1"
    ledger.append(entry("completed", "svc:v2"))
    assert ledger.last_known_good("fraud").champion_tag == "svc:v2"
    # what to roll back to when the current champion (v2) turns bad later
    assert ledger.last_known_good("fraud", exclude_tag="svc:v2").champion_tag == "svc:v1"
    ledger.append(entry("promoted", "svc:v3"))
    ledger.append(entry("rolled_back", "svc:v2"))
    assert ledger.last_known_good("fraud").champion_tag == "svc:v2"
    assert ledger.last_known_good("churn") is None


def test_entries_from_rollout_transitions(tmp_path):
    ledger = Ledger.for_settings(get_settings(state_dir=tmp_path / "state"))
    assert ledger.path == (tmp_path / "state" / "ledger" / "promotions.jsonl").resolve()
    policy = RolloutPolicy(post_promotion_guard_seconds=0)
    champion = ArmRef(name="svc-v1", bento_tag="svc:v1")
    canary = ArmRef(name="svc-v2", bento_tag="svc:v2")
    state, _ = start_rollout(
        policy, model_name="fraud", champion=champion, canary=canary, now=T0, incident_id="inc-9"
    )
    state, _ = advance(state, None, T0)
    ledger.append_transition(state)
    state, _ = promote(state, T0 + timedelta(minutes=5), reason="approved")
    for transition in state.history[1:]:  # promoted, then completed (no guard window)
        ledger.append_transition(state, transition)
    got = ledger.entries(incident_id="inc-9")
    assert [(e.action, e.actor) for e in got] == [
        ("started", "system"),
        ("promoted", "human"),
        ("completed", "human"),
    ]
    assert got[0].weights == {"svc-v1": 95, "svc-v2": 5}
    assert got[1].reason == "approved" and got[1].champion_tag == "svc:v2"
    assert ledger.last_known_good("fraud").champion_tag == "svc:v2"


def test_concurrent_appends_lose_nothing(tmp_path):
    ledger = Ledger(tmp_path / "promotions.jsonl")

    def writer(n: int) -> None:
        for i in range(50):
            Ledger(ledger.path).append(entry("stepped", f"svc:v{n}", reason=f"{n}-{i}"))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = ledger.entries()
    assert len(got) == 200 and ledger.skipped == 0
    assert len({e.reason for e in got}) == 200
