"""The benchmark suite on a tiny panel: it runs, its references agree with finpipe, it reports.

No timing is asserted (shared machines are noisy): only that each stage ran, the two sides of
each race computed the same thing, and the results files have the documented shape.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from finpipe.bench.references import compare_feature_outputs, pandas_market_rules
from finpipe.bench.suite import BenchConfig, check_targets, results_table, run_benchmarks
from finpipe.errors import ConfigError
from finpipe.market.schema import normalise_market_frame
from finpipe.market.synthetic import MarketSyntheticConfig, generate_market_panel, inject_defects
from finpipe.validation import add_market_checks_columns, validate_frame

REQUIRED_KEYS = {"stage", "size_rows", "finpipe_s", "reference_s", "ratio", "peak_rss_mb"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    config = BenchConfig(
        sizes=["S"],
        repetitions=[1],
        base_tickers=12,
        base_days=320,
        # Orchestration and scoring train, register and serve models through Prefect and
        # MLflow (~60 s more on a tiny panel); the nightly-flow tests cover those paths.
        stages=["validation", "features", "training"],
        workdir=root / "work",
        out=root / "results",
    )
    records = run_benchmarks(config, say=lambda message: None)
    return config, records


def test_every_stage_runs_and_is_written_as_documented(smoke_run):
    config, records = smoke_run
    stages = [r["stage"] for r in records]
    assert stages == ["prepare", "validation", "features", "training_mlp", "training_gru"]
    assert not [r for r in records if "error" in r]
    written = json.loads((config.out / "latest.json").read_text())
    assert [r["stage"] for r in written] == stages
    for record in written[1:]:
        assert set(record) >= REQUIRED_KEYS, record["stage"]
        assert record["size_rows"] == records[0]["size_rows"]
        assert record["finpipe_s"] > 0 and record["reference_s"] > 0
        ratio = record["finpipe_s"] / record["reference_s"]
        assert record["ratio"] == pytest.approx(ratio, rel=0.01)  # medians rounded to 4 places
        assert record["peak_rss_mb"] > 50
    markdown = (config.out / "latest.md").read_text()
    assert "| validation | S |" in markdown and "## Targets" in markdown
    assert "## Model quality" in markdown


def test_races_compare_like_with_like(smoke_run):
    _, records = smoke_run
    by_stage = {r["stage"]: r for r in records}
    prepared = by_stage["prepare"]["details"]
    assert by_stage["prepare"]["size_rows"] == prepared["rows"] > 3000
    assert by_stage["validation"]["details"]["same_verdicts"] is True
    assert by_stage["features"]["details"]["agreement"]["equal"] is True
    for model in ("mlp", "gru"):
        details = by_stage[f"training_{model}"]["details"]
        # Same tensors, net, seed and batch order: the bare loop reaches the same losses.
        assert details["finpipe_validation_loss"] == pytest.approx(
            details["bare_validation_loss"], rel=1e-4
        )
        assert details["epochs"] == 1 and details["train_samples"] > 1000


def test_pandas_rules_find_what_the_suite_finds():
    prices = generate_market_panel(MarketSyntheticConfig(tickers=8, days=320, seed=1)).prices
    broken = inject_defects(prices, ["nan", "high_below_low", "duplicate_key"], seed=2)
    batch = add_market_checks_columns(normalise_market_frame(broken))
    as_of = pd.Timestamp("2099-01-01")
    report = validate_frame(
        batch, suite_name="market_ohlcv", batch_name="smoke", parameters={"as_of": as_of}
    )
    ours = {rule.rule: rule.unexpected_count for rule in report.rules}
    theirs = pandas_market_rules(batch, as_of)
    assert theirs == ours
    assert theirs["expect_column_values_to_not_be_null(close)"] == 3
    assert theirs["expect_compound_columns_to_be_unique(date, ticker)"] == 6  # 3 pairs


def test_feature_comparison_notices_a_changed_value(tmp_path):
    day = pd.Timestamp("2024-01-02")
    frame = pd.DataFrame(
        {"date": [day, day], "ticker": ["AAA", "BBB"], "return_1d": np.float32([0.1, np.nan])}
    )
    for name, values in (("ours", [0.1, np.nan]), ("theirs", [0.1002, np.nan])):
        folder = tmp_path / name / "date=2024-01-02"
        folder.mkdir(parents=True)
        frame.assign(return_1d=np.float32(values)).to_parquet(folder / "part-0.parquet")
    result = compare_feature_outputs(tmp_path / "ours", tmp_path / "theirs", [day.date()])
    assert result["equal"] is False
    assert result["max_abs_diff"] == pytest.approx(0.0002, rel=1e-3)
    assert result["worst_column"] == "return_1d"


def test_targets_are_judged_on_the_stated_figures():
    def record(stage, size, rows, ratio, rss):
        return {"stage": stage, "size": size, "size_rows": rows, "ratio": ratio, "peak_rss_mb": rss}

    records = [
        record("features", "S", 100, 1.4, 500.0),
        record("features", "16S", 1600, 0.9, 1900.0),
        record("training_gru", "S", 100, 1.2, 700.0),
        record("orchestration", "16S", 1600, 1.05, 1500.0),
        record("scoring", "S", 100, 1.3, 400.0),
    ]
    checks = {c["target"]: (c["figure"], c["holds"]) for c in check_targets(records)}
    assert checks["feature build at 16S: ratio <= 1.0"] == (0.9, True)
    assert checks["training_gru at S: ratio <= 1.15"] == (1.2, False)
    assert checks["Prefect overhead at 16S: ratio <= 1.10"] == (1.05, True)
    assert checks["scoring at S: ratio <= 1.25"] == (1.3, False)
    assert checks["features peak RSS 16S / S <= 4"] == (3.8, True)
    assert "| features | 16S | 1,600 |" in results_table(
        [{**r, "finpipe_s": 1.0, "reference_s": 1.0} for r in records]
    )


def test_bad_options_are_refused_with_the_choices():
    with pytest.raises(ConfigError, match="choose from"):
        BenchConfig(sizes=["XL"])
    with pytest.raises(ConfigError, match="one per size"):
        BenchConfig(sizes=["S", "4S"], repetitions=[3, 3, 2])
