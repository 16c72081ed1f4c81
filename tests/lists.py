"""Checks on the lists a job wrote, with failure messages a CI log can hold (a set of 32,000 (user, window)
pairs compared with ``==`` prints both sets in full when pytest runs under CI)."""
from __future__ import annotations

from collections import Counter


def _sample(pairs, n: int = 5) -> str:
    pairs = sorted(pairs, key=lambda p: (p[1], str(p[0])))
    more = f" and {len(pairs) - n} more" if len(pairs) > n else ""
    span = f" (window_end {pairs[0][1]}..{pairs[-1][1]}, {len({p[0] for p in pairs})} users)" if pairs else ""
    return f"{pairs[:n]}{more}{span}"


def assert_one_list_per_user_window(keys: list[tuple], expected: set[tuple]) -> None:
    """``keys``: the (user_id, window_end) of each list written, in order. No pair twice, and exactly the
    ``expected`` ones."""
    copies = [k for k, n in Counter(keys).items() if n > 1]
    assert not copies, f"{len(copies)} duplicate (user_id, window_end) for a read_committed reader: {_sample(copies)}"
    got = set(keys)
    missing, unexpected = expected - got, got - expected
    assert not missing and not unexpected, (
        f"{len(got)} (user, window) lists of {len(expected)} expected: missing {len(missing)} {_sample(missing)}; "
        f"unexpected {len(unexpected)} {_sample(unexpected)}")
