"""The benchmark suite on a tiny panel: it runs, its references agree with finpipe, it reports.

No timing is asserted (shared machines are noisy): only that each stage ran, the two sides of
each race computed the same thing, and the results files have the documented shape.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from benchmarks.references import compare_feature_outputs, pandas_market_rules
from benchmarks.suite import BenchConfig, check_targets, results_table, run_benchmarks
from finpipe.errors import ConfigError
from finpipe.market.quality import add_market_checks_columns
from finpipe.market.schema import normalise_market_frame
from finpipe.market.synthetic import MarketSyntheticConfig, generate_market_panel, inject_defects
from finpipe.validation import validate_frame

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
        # Seconds are rounded to 4 places: a 5 ms timing carries 1% of rounding.
        assert record["ratio"] == pytest.approx(ratio, rel=0.05)
        assert record["peak_rss_mb"] > 50
    markdown = (config.out / "latest.md").read_text()
    assert "| validation | S |" in markdown and "## Targets" in markdown
    assert "## Model quality" in markdown


def test_a_reused_folder_reports_the_memory_of_the_run_that_prepared_it(smoke_run, tmp_path):
    config, records = smoke_run
    first = records[0]
    assert first["peak_rss_mb"] == first["details"]["prepare_peak_rss_mb"]
    again = dataclasses.replace(config, stages=["features"], out=tmp_path)
    rerun = run_benchmarks(again, say=lambda message: None)
    prepare = next(r for r in rerun if r["stage"] == "prepare")
    assert prepare["details"] == first["details"]  # the same folder, not prepared again
    assert prepare["peak_rss_mb"] == first["peak_rss_mb"]

    # A folder prepared before its memory was recorded: unknown, not the reusing run's figure.
    facts_file = config.workdir / "S" / "prepared.json"
    facts = json.loads(facts_file.read_text())
    facts.pop("prepare_peak_rss_mb")
    facts_file.write_text(json.dumps(facts))
    older = run_benchmarks(again, say=lambda message: None)
    assert next(r for r in older if r["stage"] == "prepare")["peak_rss_mb"] is None


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


def _assert_gx_floor_is_reported(record: dict, markdown: str) -> None:
    """The validation record carries GX's per-batch floor and latest.md tabulates it."""
    details = record["details"]
    assert details["batches"] >= 1 and details["gx_floor_one_row_passed"] is True
    floor = details["gx_batch_floor_s"]
    assert 0 < details["gx_batch_floor_without_docs_s"] <= floor
    # One pair: the floor ratio is batches x floor / the reference's seconds.
    assert details["gx_floor_ratio"] == pytest.approx(
        details["batches"] * floor / record["reference_s"], rel=0.05
    )
    assert "## Validation: GX's fixed cost per batch" in markdown
    assert f"| {record.get('domain', 'market')} | S | {details['batches']} | {floor:.3f} / " in (
        markdown
    )


def test_validation_reports_gx_fixed_cost_per_batch(smoke_run):
    config, records = smoke_run
    validation = next(r for r in records if r["stage"] == "validation")
    assert validation["details"]["batches"] == 2  # 320 days: one file per 252 dates
    _assert_gx_floor_is_reported(validation, (config.out / "latest.md").read_text())


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


# -- credit and customers ----------------------------------------------------------------------


# A record written before there were several domains: it reads as market's and a run of
# another domain keeps it.
OLD_MARKET_RECORD = {
    "stage": "validation", "size": "S", "size_rows": 100, "ratio": 2.0, "peak_rss_mb": 500.0,
    "finpipe_s": 1.0, "reference_s": 0.5,
}  # fmt: skip


# Small sizes per domain: a few seconds of each stage on 2 cores.
DOMAIN_SMOKE_SIZES = {
    "credit": {"base_applications": 3000, "credit_train_epochs": 2},
    "customers": {"base_customers": 300, "customers_train_epochs": 3},
}


def _domain_smoke_run(tmp_path_factory, domain: str):
    root = tmp_path_factory.mktemp(f"bench-{domain}")
    (root / "results").mkdir()
    (root / "results" / "latest.json").write_text(json.dumps([OLD_MARKET_RECORD]))
    config = BenchConfig(
        domains=[domain],
        sizes=["S"],
        repetitions=[1],
        stages=["validation", "features", "training"],  # orchestration/scoring: as for market
        workdir=root / "work",
        out=root / "results",
        **DOMAIN_SMOKE_SIZES[domain],
    )
    records = run_benchmarks(config, say=lambda message: None)
    assert records[0] == OLD_MARKET_RECORD
    return config, records[1:]


@pytest.fixture(scope="module")
def credit_run(tmp_path_factory):
    return _domain_smoke_run(tmp_path_factory, "credit")


@pytest.fixture(scope="module")
def customers_run(tmp_path_factory):
    return _domain_smoke_run(tmp_path_factory, "customers")


@pytest.mark.parametrize(
    ("run", "stages"),
    [
        ("credit_run", ["prepare", "validation", "training_mlp", "training_logistic"]),
        ("customers_run", ["prepare", "validation", "features", "training_autoencoder"]),
    ],
)
def test_domain_stages_run_and_are_written_as_documented(run, stages, request):
    config, records = request.getfixturevalue(run)
    domain = config.domains[0]
    assert [r["stage"] for r in records] == stages  # credit has no feature race
    assert not [r for r in records if "error" in r]
    written = json.loads((config.out / "latest.json").read_text())
    assert written[0] == OLD_MARKET_RECORD  # other domains' records are kept, market first
    written = written[1:]
    assert [(r["domain"], r["stage"]) for r in written] == [(domain, s) for s in stages]
    for record in written[1:]:
        assert set(record) >= REQUIRED_KEYS | {"domain"}, record["stage"]
        assert record["size_rows"] == records[0]["size_rows"]
        assert record["ratio"] == pytest.approx(
            record["finpipe_s"] / record["reference_s"], rel=0.05
        )
    markdown = (config.out / "latest.md").read_text()
    assert markdown.index("## market") < markdown.index(f"## {domain}")
    assert f"| {domain}: validation at S: ratio <= 3.0 |" in markdown
    _assert_gx_floor_is_reported(records[1], markdown)


def test_credit_races_compare_like_with_like(credit_run):
    _, records = credit_run
    by_stage = {r["stage"]: r for r in records}
    prepared = by_stage["prepare"]["details"]
    assert prepared["rows"] == 3000 and prepared["unlabelled_rows"] > 0
    assert by_stage["validation"]["details"]["same_verdicts"] is True
    for model in ("mlp", "logistic"):
        details = by_stage[f"training_{model}"]["details"]
        # Same tensors, net, seed, batch order and category blanking: the same losses.
        assert details["finpipe_validation_loss"] == pytest.approx(
            details["bare_validation_loss"], rel=1e-4
        )
        assert details["epochs"] == 2 and details["train_samples"] > 1500


def test_customers_races_compare_like_with_like(customers_run):
    _, records = customers_run
    by_stage = {r["stage"]: r for r in records}
    assert by_stage["prepare"]["details"]["history_rows"] > 5000
    assert by_stage["validation"]["details"]["same_verdicts"] is True
    agreement = by_stage["features"]["details"]["agreement"]
    assert agreement["equal"] is True and agreement["rows"] > 250
    details = by_stage["training_autoencoder"]["details"]
    assert details["epochs"] == 3
    assert details["finpipe_validation_loss"] == pytest.approx(
        details["bare_validation_loss"], rel=1e-4
    )


def test_pandas_rules_find_what_the_credit_and_customers_suites_find(tmp_path):
    from benchmarks.domain_references import pandas_suite_rules
    from finpipe.credit.config import load_loan_book
    from finpipe.credit.schema import build_credit_suite, normalise_credit_frame
    from finpipe.credit.synthetic import CreditSyntheticConfig, generate_loan_book
    from finpipe.customers.config import load_customers_config
    from finpipe.customers.schema import add_transaction_checks, normalise_transactions
    from finpipe.customers.synthetic import (
        VENDOR_COLUMNS,
        CustomersSyntheticConfig,
        generate_customer_transactions,
    )
    from finpipe.validation import load_suite_spec

    as_of = pd.Timestamp("2030-01-01")
    book = load_loan_book("synthetic")
    raw = generate_loan_book(CreditSyntheticConfig(applications=400, seed=3)).applications
    raw = raw.astype(object)
    raw.loc[[0, 1], "loan_id"] = raw.loc[2, "loan_id"]  # three copies of one id
    raw.loc[5, "utilisation"] = 9.0  # above the configured 1.5
    raw.loc[6, "defaulted"] = "maybe"  # not a label value
    raw.loc[7, "region"] = "atlantis"  # unseen category: report-only
    credit = normalise_credit_frame(raw, book=book, as_of=as_of.date())
    seen = {"region": ["central", "east", "north", "south", "west"]}
    customers_config = load_customers_config("synthetic")
    log = generate_customer_transactions(CustomersSyntheticConfig(customers=30, seed=4))
    vendor = log.transactions[list(VENDOR_COLUMNS)].rename(columns=VENDOR_COLUMNS)
    vendor.loc[3, "Amount"] = -5.0  # a refund the config does not allow
    vendor = pd.concat([vendor, vendor.head(4)], ignore_index=True)  # exact duplicates
    transactions = add_transaction_checks(
        normalise_transactions(vendor, config=customers_config), allow_refunds=False
    )
    cases = [
        (credit, build_credit_suite(book, seen), "credit_synthetic"),
        (transactions, load_suite_spec("customers_transactions"), "customers_transactions"),
    ]
    found = {}
    for batch, spec, name in cases:
        report = validate_frame(
            batch, suite_name=name, suite_spec=spec, batch_name="smoke", parameters={"as_of": as_of}
        )
        ours = {
            r.rule: {"unexpected": r.unexpected_count, "success": r.success} for r in report.rules
        }
        theirs = pandas_suite_rules(batch, spec, as_of)
        assert theirs == ours
        found.update(theirs)
    assert found["expect_column_values_to_be_unique(loan_id)"] == {
        "unexpected": 3,
        "success": False,
    }
    assert found["expect_column_values_to_be_between(utilisation)"]["unexpected"] == 1
    assert found["expect_column_values_to_be_in_set(defaulted)"]["unexpected"] == 1
    assert found["expect_column_values_to_be_in_set(region)"] == {"unexpected": 1, "success": True}
    assert found["expect_column_values_to_be_null(disallowed_refund)"]["unexpected"] == 2
    assert found["expect_column_values_to_be_unique(row_fingerprint)"]["unexpected"] == 8


def test_domain_records_are_grouped_and_old_records_read_as_market(tmp_path):
    def record(domain, stage, size, rows, ratio, rss):
        return {
            **({"domain": domain} if domain else {}),
            "stage": stage, "size": size, "size_rows": rows, "ratio": ratio, "peak_rss_mb": rss,
            "finpipe_s": 1.0, "reference_s": 1.0,
        }  # fmt: skip

    records = [
        record(None, "validation", "S", 100, 2.0, 500.0),  # written before domains existed
        record("credit", "validation", "S", 50, 4.0, 400.0),
        record("credit", "orchestration", "16S", 800, 1.05, 900.0),
        record("customers", "features", "S", 10, 1.2, 300.0),
        record("customers", "features", "16S", 160, 0.8, 1500.0),
    ]
    checks = {c["target"]: (c["domain"], c["figure"], c["holds"]) for c in check_targets(records)}
    assert checks["validation at S: ratio <= 3.0"] == ("market", 2.0, True)
    assert checks["credit: validation at S: ratio <= 3.0"] == ("credit", 4.0, False)
    assert checks["credit: Prefect overhead at 16S: ratio <= 1.10"] == ("credit", 1.05, True)
    assert checks["customers: feature snapshot vs Polars at 16S: ratio <= 1.0"][2] is True
    assert checks["customers: features peak RSS 16S / S <= 4"] == ("customers", 5.0, False)

    out = tmp_path / "results"
    out.mkdir()
    (out / "latest.json").write_text(json.dumps(records))
    config = BenchConfig(domains=["credit"], sizes=["S"], out=out, workdir=tmp_path / "work")
    from benchmarks.suite import write_results

    kept = [r for r in records if not (r.get("domain") == "credit" and r["size"] == "S")]
    write_results(kept, config, out, 1.0)
    markdown = (out / "latest.md").read_text()
    assert (
        markdown.index("## market") < markdown.index("## credit") < markdown.index("## customers")
    )
    assert "| credit: Prefect overhead at 16S: ratio <= 1.10 | 1.05 | yes |" in markdown
    with pytest.raises(ConfigError, match="unknown domain"):
        BenchConfig(domains=["bonds"])


def test_a_run_of_one_stage_replaces_that_stage_and_keeps_the_others(smoke_run, tmp_path):
    config, records = smoke_run
    out = tmp_path / "results"
    out.mkdir()
    earlier = [{**r, "from_earlier_run": True} for r in records]
    (out / "latest.json").write_text(json.dumps(earlier))

    again = run_benchmarks(
        dataclasses.replace(config, stages=["validation"], out=out), say=lambda message: None
    )

    written = json.loads((out / "latest.json").read_text())
    assert [r["stage"] for r in written] == [r["stage"] for r in records]  # still in stage order
    assert [r["stage"] for r in again] == [r["stage"] for r in records]
    kept = [r["stage"] for r in written if r.get("from_earlier_run")]
    assert kept == ["features", "training_mlp", "training_gru"]
    assert "--repetitions 1 --stages validation`" in (out / "latest.md").read_text()


def test_a_domain_header_states_the_epochs_its_own_nightly_records_ran_with(tmp_path):
    from benchmarks.suite import write_results

    def orchestration(domain, epochs):
        return {
            "domain": domain, "stage": "orchestration", "size": "S", "size_rows": 100,
            "ratio": 1.0, "peak_rss_mb": 500.0, "finpipe_s": 1.0, "reference_s": 1.0,
            "details": {"quality": {}, "nightly_max_epochs": epochs},
        }  # fmt: skip

    # This run measured market with max_epochs 1; credit's records are kept from a run with 2.
    config = BenchConfig(domains=["market"], sizes=["S"], nightly_epochs=1, out=tmp_path)
    write_results([orchestration("market", 1), orchestration("credit", 2)], config, tmp_path, 1.0)

    markdown = (tmp_path / "latest.md").read_text()
    assert "nightly runs max_epochs=1." in markdown
    assert "nightly runs max_epochs=2 (mlp and logistic)." in markdown


# -- scoring a champion an earlier run trained ---------------------------------------------------


def test_scoring_alone_without_an_earlier_orchestration_is_refused_before_any_work(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "latest.json").write_text(json.dumps([OLD_MARKET_RECORD]))
    config = BenchConfig(
        sizes=["S"], repetitions=[1], stages=["scoring"], workdir=tmp_path / "work", out=out
    )
    with pytest.raises(ConfigError, match="no champion to score in .*Add orchestration"):
        run_benchmarks(config, say=lambda message: None)
    assert not (tmp_path / "work").exists()  # nothing prepared
    assert json.loads((out / "latest.json").read_text()) == [OLD_MARKET_RECORD]


@pytest.mark.slow
def test_scoring_alone_scores_the_champion_an_earlier_orchestration_left(tmp_path):
    # Also the suite's smoke run of the orchestration and scoring stages (~100 s on 2 cores).
    out = tmp_path / "results"
    config = BenchConfig(
        sizes=["S"],
        repetitions=[1],
        base_tickers=12,
        base_days=320,
        nightly_epochs=1,
        stages=["orchestration"],
        workdir=tmp_path / "work",
        out=out,
    )
    first = {r["stage"]: r for r in run_benchmarks(config, say=lambda message: None)}
    assert list(first) == ["prepare", "orchestration"]
    assert "error" not in first["orchestration"] and first["orchestration"]["ratio"] > 0
    facts = json.loads((tmp_path / "work" / "S" / "orchestrated.json").read_text())
    assert facts["nightly_max_epochs"] == 1 and facts["repetitions"] == 1

    again = run_benchmarks(
        dataclasses.replace(config, stages=["scoring"]), say=lambda message: None
    )
    assert [r["stage"] for r in again] == ["prepare", "orchestration", "scoring"]
    scoring = again[-1]
    assert "error" not in scoring and scoring["ratio"] > 0
    assert scoring["details"]["nights"] == 10
    assert scoring["details"]["champion"] == facts  # the earlier run's champion, not retrained
    assert again[1] == first["orchestration"]  # kept from the first run
    assert json.loads((out / "latest.json").read_text())[-1] == scoring

    # Another shape prepares the folder again, which drops the champion: refused, not scored.
    with pytest.raises(ConfigError, match="no champion to score"):
        run_benchmarks(
            dataclasses.replace(config, stages=["scoring"], base_days=330), say=lambda message: None
        )
    assert json.loads((out / "latest.json").read_text())[-1] == scoring
