"""The JVM fast path against the Python validator, and the per-window limits, through the real job.

The job runs with ``model.kind = echo`` (the no-op scorer lists a user's own window items, heaviest
first, with their summed weights as scores), so what the model received is visible in the output.
"""
from __future__ import annotations

import json
import os
import re

import pytest
from hypothesis import event as target, given, settings, strategies as st

from freshet.conf.settings import EventsConfig, load_config
from freshet.jobs import tables
from freshet.models.events import Event, EventValidator
from freshet.ops import kafka_io

T0 = 1_700_000_040_000
WINDOW = 60_000
BEHAVIORS = ["view", "click", "cart", "fav", "buy", "rate"]
CFG = load_config(env={})


def canonical(user, item, behavior, ts, value=None) -> bytes:
    """What ``freshet replay`` writes: the canonical encoding."""
    e = {"user_id": user, "item_id": item, "behavior": behavior, "ts": ts}
    if value is not None:
        e["value"] = value
    return json.dumps(e).encode()


def non_canonical(user, item, behavior, ts, value=None) -> bytes:
    """The same event with another key order and an event id: only the Python validator accepts it."""
    e = {"behavior": behavior, "ts": ts, "item_id": item, "user_id": user, "event_id": f"{user}-{item}-{ts}"}
    if value is not None:
        e["value"] = value
    return json.dumps(e, separators=(",", ":")).encode()


# ---- unit: whatever the canonical pattern accepts, the validator accepts with the same fields -------------
def python_pattern(cfg) -> re.Pattern:
    return re.compile(tables.canonical_event_pattern(cfg).replace("\\t", "\t").replace("\\n", "\n").replace("\\r", "\r"))


ids = st.one_of(st.text(st.characters(min_codepoint=0, max_codepoint=0x2FF), min_size=0, max_size=12),
                st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=80),
                st.text(st.sampled_from(["\ufffd", "é", "a", "\U0001F600", "\x7f", "\u2028"]), min_size=1, max_size=70),
                st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=8))


@settings(max_examples=400, deadline=None)
@given(user=st.one_of(ids, st.integers(-5, 10**6)), item=ids, behavior=st.sampled_from(BEHAVIORS + ["teleport"]),
       ts=st.one_of(st.integers(-10, 2 * 10**12), st.floats(allow_nan=False, allow_infinity=False)),
       value=st.one_of(st.none(), st.floats(allow_nan=False), st.integers(-9, 9)),
       ascii_only=st.booleans())
def test_canonical_pattern_accepts_only_what_the_validator_accepts(user, item, behavior, ts, value, ascii_only):
    cfg = CFG
    raw = json.dumps({"user_id": user, "item_id": item, "behavior": behavior, "ts": ts,
                      **({} if value is None else {"value": value})}, ensure_ascii=ascii_only).encode()
    match = python_pattern(cfg).fullmatch(raw.decode())
    target("matched" if match else "not matched")
    event = EventValidator(cfg.events).parse(raw, now_ms=4 * 10**12)   # the ts horizon is checked in SQL
    if match:
        assert isinstance(event, Event), (raw, event)
        assert (event.user_id, event.item_id, event.behavior, event.ts) == (
            match.group(1), match.group(2), match.group(3), int(match.group(4)))
        assert event.value == (None if match.group(5) is None else float(match.group(5)))
    # (the validator accepts more: escapes, integer ids, event ids ...; those records take the Python path)


def test_canonical_pattern_matches_what_replay_writes(cfg):
    from freshet.ops.replay import encode
    import pandas as pd
    df = pd.DataFrame({"user_id": ["196", "u 7"], "item_id": ["242", "Life Is Beautiful (La Vita è bella) (1997)"], "behavior": ["rate", "view"],
                       "ts": [881250949000, 5], "value": [3.0, float("nan")]})
    pattern = python_pattern(cfg)
    assert all(pattern.fullmatch(value.decode()) for _, value, _ in encode(df))


# ---- integration: fast path == Python path; a 100,000-event user in one window ---------------------------
@pytest.mark.integration
def test_fast_path_equals_python_path_and_a_100k_event_window_stays_bounded(topics_cfg):
    from freshet.ops.bench import ProcessTreeMonitor
    from freshet.ops.runner import run_job
    cfg = topics_cfg.replace(model={"kind": "echo"},
                             window={"max_items_per_increment": 50, "max_events_per_user_window": 1000})
    validator = EventValidator(EventsConfig())
    prod = kafka_io.producer(cfg)
    report = kafka_io.DeliveryReport()
    expected: dict[tuple[str, int], dict[str, float]] = {}

    def send(user, item, behavior, ts, value, encode):
        prod.produce(cfg.kafka.input_topic, key=user, value=encode(user, item, behavior, ts, value),
                     timestamp=ts, on_delivery=report)

    # Two users with the same events, one canonical (JVM path), one not (Python path); every behaviour,
    # ratings below rate_min_value (weight 0) included.
    for w in range(3):
        for j in range(24):
            item, behavior = f"i{(j * 5 + w) % 13}", BEHAVIORS[j % 6]
            value = [4.0, -1.0, None][j % 3] if behavior == "rate" else None
            ts = T0 + w * WINDOW + j * 2000
            send("fast", item, behavior, ts, value, canonical)
            send("slow", item, behavior, ts, value, non_canonical)
            for user in ("fast", "slow"):
                end = ts - ts % WINDOW + WINDOW
                items = expected.setdefault((user, end), {})
                items[item] = items.get(item, 0.0) + validator.weight(behavior, value)
    # A bot: 100,000 events in one window over 20,000 distinct items (item j % 20000 gets 5 views).
    bot_window = T0 - T0 % WINDOW + 4 * WINDOW
    for j in range(100_000):
        send("bot", f"b{j % 20_000}", "view", bot_window + j % 50_000, None, canonical)
        if j % 20_000 == 0:
            prod.poll(0)
    # Canonical in shape but not valid UTF-8 (Java would decode the byte to U+FFFD): never the fast path.
    broken = canonical("fast", "i\u00e9", "view", T0 + 5 * WINDOW).replace("\\u00e9".encode(), b"\xe9")
    prod.produce(cfg.kafka.input_topic, key="fast", value=broken, on_delivery=report)
    # one more event, later, so the watermark passes the last windows
    send("fast", "i0", "view", T0 + 6 * WINDOW, None, canonical)
    kafka_io.flush_or_fail(prod, report)

    monitor = ProcessTreeMonitor(os.getpid())
    monitor.start()
    try:
        run_job(cfg, bounded=True)
    finally:
        monitor.stop()
    recs = kafka_io.read_json(cfg, cfg.kafka.output_topic)
    dead = kafka_io.read_json(cfg, cfg.kafka.dlq_topic)
    assert [d["reason"].split(":")[0] for d in dead] == ["not_utf8"]
    by_key = {(r["user_id"], r["window_end"]): r for r in recs}
    assert len(by_key) == len(recs), "one list per (user, window)"

    # Fast path and Python path: the same windows, items and weights.
    for user, end in sorted(expected):
        if user != "fast":
            continue
        fast, slow = by_key[("fast", end)], by_key[("slow", end)]
        assert (fast["items"], fast["scores"]) == (slow["items"], slow["scores"])
        want = sorted(expected[("fast", end)].items(), key=lambda kv: (-kv[1], kv[0]))[:cfg.model.k]
        assert fast["items"] == [i for i, _ in want]
        assert fast["scores"] == pytest.approx([s for _, s in want])

    # The bot: one list, its window weighed as 1,000 events (each item: 5 views x 1000 / 100000).
    bot = [r for r in recs if r["user_id"] == "bot"]
    assert len(bot) == 1
    assert len(bot[0]["items"]) == cfg.model.k
    assert bot[0]["scores"] == pytest.approx([5 * 1000 / 100_000] * cfg.model.k)
    print(f"\npeak RSS of the test process and the Flink runtime it started: {monitor.peak_rss / 2**30:.2f} GiB")
    assert monitor.peak_rss < 4 * 2 ** 30, "a 100,000-event window must not blow up memory"
