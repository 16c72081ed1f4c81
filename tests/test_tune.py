"""freshet tune with the model alone, including the simulated parallel model (replicas and their sync)."""
import numpy as np
import pandas as pd

from freshet.conf.settings import Config
from freshet.ops.tune import parse_grid, tune


def small_log(n=600, users=12, items=30, seed=3):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"user_id": [f"u{x}" for x in rng.integers(users, size=n)],
                         "item_id": [f"i{x}" for x in rng.integers(items, size=n)],
                         "behavior": "rate", "value": rng.integers(1, 6, size=n).astype(float),
                         "ts": np.sort(rng.integers(0, 60_000 * 400, size=n))})


def test_tune_simulates_replicas_with_and_without_sync():
    cfg = Config().replace(model={"kind": "bpr", "dim": 8, "initial_capacity": 8, "negatives": 4, "xla": False})
    rows = tune(cfg, small_log(), parse_grid(["replicas=1,2", "sync_every_events=0,50"]), None, log=lambda _: None)
    by = {(r["replicas"], r["sync_every_events"]): r for r in rows}
    assert all(0 <= r["HR@10"] <= 1 for r in rows)
    assert by[(2, 50)]["sync_bytes"] > 0                    # the replicas exchanged their changes
    assert "sync_bytes" not in by[(2, 0)] and "sync_bytes" not in by[(1, 50)]
    assert by[(1, 0)]["HR@10"] == by[(1, 50)]["HR@10"]  # one replica has no one to sync with
