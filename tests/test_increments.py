import pytest

from freshet.models.increments import Increment, WindowBuffer


def test_increment_keeps_heaviest_items_and_counts_every_event():
    [inc] = Increment.window_from_quads(60_000, '[["u", "a", 1.0, 1], ["u", "b", 7.0, 3], ["u", "c", 2.0, 2]]',
                                        max_items=2)
    assert inc.items == ("b", "c") and inc.weights == (7.0, 2.0) and inc.counts == (3, 2)
    assert inc.events == 6 and inc.dropped_items == 1


def test_window_of_a_shard_splits_into_users_and_caps_heavy_windows():
    import json
    quads = [["bot", "i0", 5.0, 5]] + [["bot", f"i{j}", 1.0, 1] for j in range(1, 100_000)] + [["u", "a", 2.0, 1]]
    bot, u = Increment.window_from_quads(120_000, json.dumps(quads), max_items=3, max_events=1_000)
    assert (bot.user_id, bot.window_end, bot.events, bot.dropped_items) == ("bot", 120_000, 100_004, 99_997)
    assert bot.items == ("i0", "i1", "i10") and bot.counts == (5, 1, 1)
    scale = 1_000 / 100_004     # the window weighs as 1,000 events
    assert bot.weights == pytest.approx((5 * scale, scale, scale))
    assert (u.items, u.weights, u.events) == (("a",), (2.0,), 1)


def test_increment_rejects_misaligned_arrays():
    with pytest.raises(ValueError, match="differ in length"):
        Increment.from_arrays("u", 1, ["a"], [1.0, 2.0], [1], max_items=5)


def test_window_buffer_closes_windows_in_order_and_keeps_open_ones():
    buf = WindowBuffer()
    for user, end in [("u1", 3000), ("u2", 1000), ("u3", 1000), ("u4", 2000)]:
        buf.add(Increment(user, end, ("i",), (1.0,), (1,), 1))
    assert buf.close(watermark=998) == []
    closed = buf.close(watermark=1999)
    assert [(end, [i.user_id for i in incs]) for end, incs in closed] == [(1000, ["u2", "u3"]), (2000, ["u4"])]
    assert len(buf) == 1


def test_a_window_gives_the_same_increments_whatever_order_its_rows_arrived_in():
    """The JVM aggregates in arrival order, which depends on how partitions interleaved; micro-batches are
    chunks of the increments, so their order must not depend on it (else a replay learns a different model)."""
    import json
    import random
    quads = [[f"u{j % 37}", f"i{j % 11}", float(j % 5 + 1), 1] for j in range(400)]
    quads = list({(q[0], q[1]): q for q in quads}.values())     # one row per (user, item), as the JVM sums them
    first = Increment.window_from_quads(60_000, json.dumps(quads), max_items=50)
    for seed in range(5):
        random.Random(seed).shuffle(quads)
        assert Increment.window_from_quads(60_000, json.dumps(quads), max_items=50) == first
    assert [inc.user_id for inc in first] == sorted(inc.user_id for inc in first)
