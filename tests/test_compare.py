"""freshet compare's systems and report (no JVM; the runs themselves are what `freshet compare` does)."""
import pandas as pd

from freshet.conf.settings import load_config
from freshet.ops import compare
from freshet.scripts.cli import build_parser


def test_every_default_system_is_known_and_sets_a_valid_config():
    cfg = load_config(env={})
    df = pd.DataFrame({"ts": range(0, 1000, 10)})
    systems = compare.systems_for(df, cfg)
    defaults = build_parser().parse_args(["compare"]).systems.split(",")
    assert defaults == compare.DEFAULT_SYSTEMS.split(",")
    kinds = {}
    for name in defaults:
        scfg = compare.system_config(cfg, "t", systems[name])     # validated like any config
        kinds[name] = scfg.model.kind
        assert scfg.kafka.output_topic == f"t-recs-{name}"
    assert kinds == {"sequence": "sequence", "bpr": "bpr", "transition": "transition",
                     "recent-popularity": "recent-popularity", "popularity": "popularity", "frozen": cfg.model.kind}
    assert compare.system_config(cfg, "t", systems["frozen"]).model.freeze_after_ms == int(df["ts"].quantile(0.2))


def test_report_table_has_quality_and_speed_columns(tmp_path):
    row = {"HR@10": 0.1, "NDCG@10": 0.05, "HR@20": 0.2, "coverage": 0.97, "lists": 1234, "events_per_s": 5000.0,
           "cpu_s": 12.5, "model_s": 7.1, "peak_rss_mib": 900.0, "by_day": {"0": 0.1, "1": 0.2}}
    report = {"dataset": "ml-100k", "systems": {"sequence": row, "bpr": row}}
    compare.write_report(report, tmp_path, log=lambda *_: None)
    table = (tmp_path / "quality-ml-100k.md").read_text().splitlines()
    assert table[0].startswith("| system | HR@10 | NDCG@10 | HR@20 | coverage | lists | events/s | CPU s | model s")
    assert table[2] == "| sequence | 0.1000 | 0.0500 | 0.2000 | 97.0% | 1,234 | 5,000 | 12.5 | 7.1 | 900.0 |"
