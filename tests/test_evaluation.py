import math

import pytest

from freshet.models.evaluation import DAY_MS, evaluate


def test_hand_made_log_has_known_hit_rate():
    recs = [
        {"user_id": "u1", "items": ["a", "b", "c"], "window_end": 100},
        {"user_id": "u1", "items": ["x", "y", "z"], "window_end": 200},
        {"user_id": "u2", "items": ["a"], "window_end": 150},
    ]
    events = [
        ("u1", "a", 50),     # no list yet: miss, uncovered
        ("u1", "b", 100),    # list@100 applies (window_end <= t): hit at rank 1
        ("u1", "a", 199),    # still list@100: hit at rank 0
        ("u1", "a", 200),    # list@200 now: miss
        ("u2", "a", 149),    # u2's list comes later: miss
        ("u2", "a", 151),    # hit at rank 0
        ("u3", "a", 500),    # never listed
        ("u1", "z", 900),    # hit at rank 2, but only within @3
    ]
    r = evaluate(events, recs, ks=(2, 3)).overall
    assert r["events"] == 8
    assert r["coverage"] == pytest.approx(5 / 8)
    assert r["HR@2"] == pytest.approx(3 / 8)
    assert r["HR@3"] == pytest.approx(4 / 8)
    assert r["NDCG@2"] == pytest.approx((1 / math.log2(3) + 1 + 1) / 8)
    assert r["NDCG@3"] == pytest.approx((1 / math.log2(3) + 1 + 1 + 1 / math.log2(4)) / 8)


def test_results_are_sliced_by_day():
    recs = [{"user_id": "u", "items": ["a"], "window_end": 0}]
    events = [("u", "a", 10), ("u", "b", DAY_MS + 10), ("u", "a", DAY_MS + 20)]
    r = evaluate(events, recs, ks=(1,))
    assert r.by_day[0]["HR@1"] == 1.0 and r.by_day[1]["HR@1"] == 0.5
    assert set(r.to_json()["by_day"]) == {"0", "1"}


def test_bad_k_is_rejected():
    with pytest.raises(ValueError, match="positive"):
        evaluate([], [], ks=(0,))
