"""A smoke test of the benchmark harness (`python -m benchmarks`), kept small on purpose.

One real run from the command line on a tiny market panel (a fresh process per measurement,
the Polars feature race, the results files), and the pieces whose mistakes would mislead
silently: the references' verdicts equal GX's, the feature comparison can say "different", the
targets read the stated figures. No timing is asserted (shared machines are noisy).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

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

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = {"stage", "size_rows", "finpipe_s", "reference_s", "ratio", "peak_rss_mb"}

# A record written before there were several domains: it reads as market's.
OLD_MARKET_RECORD = {
    "stage": "validation", "size": "S", "size_rows": 100, "ratio": 2.0, "peak_rss_mb": 500.0,
    "finpipe_s": 1.0, "reference_s": 0.5,
}  # fmt: skip


def _benchmarks(*options: str) -> subprocess.CompletedProcess:
    """Run `python -m benchmarks` from the repository root, as `make bench` does."""
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_run_from_the_command_line_races_the_feature_build_and_writes_results(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    kept = {**OLD_MARKET_RECORD, "base": {"tickers": 12, "days": 320}}  # another stage's record
    (out / "latest.json").write_text(json.dumps([kept]))
    done = _benchmarks(
        "--sizes", "S", "--repetitions", "1", "--stages", "features", "--base-tickers", "12",
        "--base-days", "320", "--workdir", str(tmp_path / "work"), "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| features | S |" in done.stdout and f"results: {out / 'latest.json'}" in done.stdout

    written = json.loads((out / "latest.json").read_text())
    # The validation record of an earlier run is kept; this run adds prepare and features.
    assert [r["stage"] for r in written] == ["prepare", "validation", "features"]
    assert written[1] == kept
    prepare, features = written[0], written[2]
    assert "error" not in features, features.get("error")
    assert prepare["details"]["rows"] == features["size_rows"] > 3000
    assert set(features) >= REQUIRED_KEYS
    assert features["finpipe_s"] > 0 and features["reference_s"] > 0
    # Seconds are rounded to 4 places: a 5 ms timing carries 1% of rounding.
    assert features["ratio"] == pytest.approx(
        features["finpipe_s"] / features["reference_s"], rel=0.05
    )
    assert features["peak_rss_mb"] > 50  # read from the stage's own process
    # Polars and finpipe built the same features from the same validated store.
    agreement = features["details"]["agreement"]
    assert agreement["equal"] is True and agreement["rows"] > 1000

    # Each new record says when, with which command and at which commit it was measured.
    command = (
        "python -m benchmarks --domain market --sizes S --repetitions 1 --stages features "
        "--base-tickers 12 --base-days 320"
    )
    assert prepare["provenance"] == features["provenance"]
    assert re.fullmatch(
        rf"Measured 20\d\d-\d\d-\d\d \d\d:\d\d UTC with `{command}` at commit [0-9a-f]{{7,}}.*\.",
        features["provenance"],
    )
    assert features["base"] == prepare["base"] == {"tickers": 12, "days": 320}
    markdown = (out / "latest.md").read_text()
    assert f"- {features['provenance']} Records: market S prepare, market S features." in (markdown)
    assert "- 1 records measured before each record carried its provenance" in markdown
    assert "S = 12 tickers x 320 days" in markdown
    assert "| features | S |" in markdown and "## Targets" in markdown


def test_bad_options_are_one_line_and_exit_status_2(tmp_path):
    done = _benchmarks("--sizes", "XL", "--workdir", str(tmp_path / "work"))
    assert done.returncode == 2
    assert done.stderr.strip() == "error: unknown size(s) ['XL']; choose from ['S', '4S', '16S']"
    out = tmp_path / "results"
    for options, said in (
        (["--sizes", ""], "error: nothing to measure: no sizes given"),
        (["--repetitions", "x"], "error: --repetitions 'x': give whole numbers, one count or"),
    ):
        done = _benchmarks(*options, "--workdir", str(tmp_path / "work"), "--out", str(out))
        assert done.returncode == 2 and done.stderr.startswith(said), done.stderr
    assert not (tmp_path / "work").exists() and not out.exists()
    stages = subprocess.run(
        [sys.executable, "-m", "benchmarks.stages", "--help"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert stages.returncode == 0 and "python -m benchmarks --help" in stages.stdout
    with pytest.raises(ConfigError, match="one per size"):
        BenchConfig(sizes=["S", "4S"], repetitions=[3, 3, 2])
    with pytest.raises(ConfigError, match="unknown domain"):
        BenchConfig(domains=["bonds"])


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


def test_every_finpipe_name_the_stages_import_exists():
    # The smoke run covers the feature race only; the other stages call into the domains'
    # pipelines from their own processes, so a renamed or moved function would first show in a
    # long `make bench`. Every `from finpipe... import name` of every benchmark module resolves.
    missing = []
    for module_file in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(module_file.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith(
                ("finpipe", "benchmarks")
            ):
                continue
            module = importlib.import_module(node.module)
            missing += [
                f"{module_file.name}: {node.module}.{alias.name}"
                for alias in node.names
                if not hasattr(module, alias.name)
                and not (  # a submodule of a package (`from finpipe import storage`)
                    hasattr(module, "__path__")
                    and importlib.util.find_spec(f"{node.module}.{alias.name}")
                )
            ]
    assert not missing


def test_pandas_rules_find_what_the_market_suite_finds():
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


def test_pandas_rules_find_what_the_credit_and_customers_suites_find():
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


def test_feature_comparison_notices_a_changed_value(tmp_path):
    day = pd.Timestamp("2024-01-02")
    frame = pd.DataFrame(
        {"date": [day, day], "ticker": ["AAA", "BBB"], "return_1d": np.float32([0.1, np.nan])}
    )
    # finpipe's layer (a bare-day folder) against the Polars reference's own folders.
    for folder, values in (
        (tmp_path / "ours" / "2024-01-02", [0.1, np.nan]),
        (tmp_path / "theirs" / "date=2024-01-02", [0.1002, np.nan]),
    ):
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


def test_domain_records_are_grouped_and_old_records_read_as_market(tmp_path):
    from benchmarks.suite import write_results

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

    config = BenchConfig(domains=["credit"], sizes=["S"], out=tmp_path, workdir=tmp_path / "work")
    kept = [r for r in records if not (r.get("domain") == "credit" and r["size"] == "S")]
    write_results(kept, config, tmp_path, 1.0)
    markdown = (tmp_path / "latest.md").read_text()
    assert (
        markdown.index("## market") < markdown.index("## credit") < markdown.index("## customers")
    )
    assert "| credit: Prefect overhead at 16S: ratio <= 1.10 | 1.05 | yes |" in markdown


@pytest.mark.skipif(
    importlib.util.find_spec("qlib") is None, reason="pyqlib not installed (the bench extra)"
)
def test_the_qlib_peer_stage_fits_both_sides_on_the_same_windows(tmp_path):
    """`python -m benchmarks.qlib_peer` at a tiny size: finpipe's and Qlib's models fitted on
    one panel, each scored on the same test dates, the tables and the provenance written."""
    from benchmarks.qlib_peer import PeerPanel, qlib_segments, qlib_table, training_panel
    from finpipe.market.model import MarketTrainingConfig

    done = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.qlib_peer", "--tickers", "60", "--days", "320",
            "--seeds", "1", "--set", "max_epochs=1", "--set", "hidden=8",
            "--qlib-dnn-steps", "40", "--qlib-gru-epochs", "1", "--lgbm-rounds", "10",
            "--out", str(tmp_path), "--name", "peer", "--workdir", str(tmp_path / "qlib"),
        ],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        tmp_path / "qlib" / "artifacts"
    ).is_dir()  # Qlib's records: its work folder, no ./mlruns
    written = json.loads((tmp_path / "peer.json").read_text())
    records = written["records"]
    assert [(r["side"], r["model"]) for r in records] == [
        ("finpipe", "mlp"), ("finpipe", "gru"), ("finpipe", "lgbm"), ("finpipe", "ensemble"),
        ("qlib", "dnn"), ("qlib", "gru"), ("qlib", "lgbm"),
    ]  # fmt: skip
    for record in records:
        assert "error" not in record, record
        assert -1 < record["ic"] < 1 and -1 < record["rank_ic"] < 1 and record["fit_s"] > 0
    assert records[0]["epochs"] == 1  # the --set reached finpipe's config
    markdown = (tmp_path / "peer.md").read_text()
    assert "python -m benchmarks.qlib_peer --tickers 60" in written["provenance"]
    assert written["provenance"] in markdown and "at commit " in markdown
    assert "| mlp | mlp | dnn | 1 |" in markdown and "| gru | gru | gru | 1 |" in markdown
    assert "| gbdt | lgbm | lgbm | 1 |" in markdown
    assert "Best by mean test IC: finpipe " in markdown
    assert all(r["fit_cpu_s"] > 0 for r in records) and "| CPU ratio |" in markdown

    # --update: the trees again, the other models' records kept with their provenance
    again = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.qlib_peer", "--tickers", "60", "--days", "320",
            "--seeds", "1", "--finpipe", "lgbm", "--qlib", "lgbm", "--lgbm-rounds", "10",
            "--out", str(tmp_path), "--name", "peer", "--update",
            "--workdir", str(tmp_path / "qlib2"),
        ],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    merged = json.loads((tmp_path / "peer.json").read_text())
    assert [(r["side"], r["model"]) for r in merged["records"]] == [
        ("finpipe", "mlp"), ("finpipe", "gru"), ("finpipe", "ensemble"), ("qlib", "dnn"),
        ("qlib", "gru"), ("finpipe", "lgbm"), ("qlib", "lgbm"),
    ]  # fmt: skip
    assert "--update" in merged["provenance"] and "--update" not in written["provenance"]
    assert {r["provenance"] for r in merged["records"][:5]} == {written["provenance"]}
    assert {r["provenance"] for r in merged["records"][5:]} == {merged["provenance"]}
    merged_markdown = (tmp_path / "peer.md").read_text()
    assert f"- finpipe lgbm, qlib lgbm: {merged['provenance']}" in merged_markdown

    # Qlib's segments are finpipe's windows: the embargo dates fall in none of them.
    prices = generate_market_panel(MarketSyntheticConfig(tickers=8, days=320, seed=1)).prices
    panel: PeerPanel = training_panel(prices, MarketTrainingConfig(), "tiny")
    split, table = panel.split, qlib_table(panel)
    dates = pd.DatetimeIndex(table.index.get_level_values("datetime").unique())
    within = dates[(dates >= split.train_dates[0]) & (dates <= split.test_dates[-1])]
    covered = [within[(within >= start) & (within <= end)] for start, end in
               qlib_segments(split).values()]  # fmt: skip
    assert [len(c) for c in covered] == [
        len(split.train_dates), len(split.validation_dates), len(split.test_dates)
    ]  # fmt: skip
    uncovered = within.difference(covered[0].union(covered[1]).union(covered[2]))
    assert len(uncovered) == 2 * split.embargo == 10
    assert list(table.columns.get_level_values(0).unique()) == ["feature", "label"]
    label = panel.frame.set_index(["date", "ticker"])[panel.label].sort_index()
    assert np.array_equal(table[("label", "LABEL0")].to_numpy(), label.to_numpy(), equal_nan=True)


@pytest.mark.unit
def test_results_of_runs_made_in_parallel_merge_with_their_own_provenance(tmp_path):
    """`--add FILE`: one process fitted finpipe's GRU, another Qlib's; merged into the file
    that holds the other models, each record keeps the line it was measured under."""
    from benchmarks.qlib_peer import write_results

    def record(side: str, model: str, seed: int, ic: float) -> dict:
        return {"panel": f"p{seed}", "seed": seed, "side": side, "model": model,
                "model_class": "gru" if model == "gru" else "mlp", "ic": ic, "rank_ic": ic,
                "icir": 1.0, "rank_icir": 1.0, "fit_s": 2.0, "fit_cpu_s": 1.0}  # fmt: skip

    def results(name: str, line: str, records: list[dict]) -> Path:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"provenance": line, "about": "synthetic", "records": records}))
        return path

    results("peer", "Measured first.", [record("finpipe", "mlp", 0, 0.12)])
    ours = results("ours", "Measured by us.", [record("finpipe", "gru", 0, 0.15)])
    seed_1 = results("seed_1", "Measured by us too.", [record("finpipe", "gru", 1, 0.15)])
    qlib = [record("qlib", "gru", s, 0.14) for s in (0, 1)]
    theirs = results("theirs", "Measured by Qlib.", qlib)
    added = [ours, seed_1, theirs]  # finpipe's seeds fitted in two processes
    write_results([], tmp_path, "peer", "merge", "synthetic", update=True, added=added)

    merged = json.loads((tmp_path / "peer.json").read_text())["records"]
    assert [(r["side"], r["model"], r["seed"], r["provenance"]) for r in merged] == [
        ("finpipe", "mlp", 0, "Measured first."),
        ("qlib", "gru", 0, "Measured by Qlib."), ("qlib", "gru", 1, "Measured by Qlib."),
        ("finpipe", "gru", 1, "Measured by us too."), ("finpipe", "gru", 0, "Measured by us."),
    ]  # fmt: skip
    markdown = (tmp_path / "peer.md").read_text()
    for line in ("- qlib gru: Measured by Qlib.", "- finpipe gru: Measured by us."):
        assert line in markdown
    assert "- finpipe gru: Measured by us too." in markdown
    assert "| gru | gru | gru | 2 | 0.0100 ± 0.0000 |" in markdown
    # A merge-only run of one other run's records shows that run's line, not its own.
    write_results([], tmp_path, "alone", "merge", "synthetic", added=[theirs])
    assert (tmp_path / "alone.md").read_text().splitlines()[2] == "Measured by Qlib."


@pytest.mark.unit
def test_set_reads_dict_settings_as_json_and_the_rest_as_text():
    import typer

    from benchmarks.qlib_peer import _overrides

    pairs = _overrides(['seed_average={"gru": 3}', "learning_rate= 2e-4", "hidden="])
    assert pairs == {"seed_average": {"gru": 3}, "learning_rate": "2e-4", "hidden": ""}
    with pytest.raises(typer.BadParameter, match="seed_average"):
        _overrides(["seed_average={gru: 3}"])


@pytest.mark.unit
def test_a_model_with_no_ic_is_never_the_best_of_its_side():
    """On the 5-ticker sample Qlib's LightGBM predicts a constant (IC NaN): the best line names
    Qlib's best model with an IC, not the NaN one."""
    from benchmarks.qlib_peer import best_line

    def record(side: str, model: str, seed: int, ic: float) -> dict:
        return {"panel": "sample", "seed": seed, "side": side, "model": model, "ic": ic}

    records = [record("finpipe", "gru", s, 0.07) for s in (0, 1)]
    records += [record("qlib", "gru", s, 0.09) for s in (0, 1)]
    records += [record("qlib", "lgbm", s, float("nan")) for s in (0, 1)]

    assert best_line(records).startswith("Best by mean test IC: finpipe gru, Qlib gru; paired")
    assert "-0.0200" in best_line(records)


def test_process_cpu_counts_a_child_in_its_own_session_and_groups_by_kind():
    """benchmarks.process_cpu (the suite's CPU accounting, README "Tests") finds a busy
    process that left the command's session, and blanks numbers and temporary paths."""
    from benchmarks.process_cpu import Process, by_kind, measure

    busy = "import time\nend = time.process_time() + 1.0\nwhile time.process_time() < end: pass"
    own_session = (
        "import subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-c', {busy!r}], start_new_session=True).wait()"
    )
    code, wall, processes = measure([sys.executable, "-c", own_session])
    assert code == 0 and wall >= 0.9
    burner = [p for p in processes if "process_time" in p.command and "Popen" not in p.command]
    assert len(burner) == 1 and burner[0].cpu_seconds >= 0.7, processes
    rows = by_kind(
        [
            Process(1, 0, 0, "/x/.venv/bin/python -m finpipe.cli serve --port 4312", 2.0),
            Process(2, 0, 0, "/x/.venv/bin/python -m finpipe.cli serve --port 5120", 1.0),
            Process(3, 0, 0, "weed server -dir=/tmp/abc/s3", 0.5),
        ]
    )
    assert rows == [
        ("python -m finpipe.cli serve --port N", 2, 3.0),
        ("weed server -dir=TMP", 1, 0.5),
    ]


def _pair(ours: float, theirs: float, details: dict | None = None) -> tuple[dict, dict]:
    return (
        {"seconds": ours, "rows": 100, "peak_rss_mb": 10.0, "details": details or {}},
        {"seconds": theirs, "rows": 100, "peak_rss_mb": 9.0, "details": {}},
    )


@pytest.mark.unit
def test_a_ratio_is_the_median_of_the_pairs_ratios():
    from benchmarks.suite import _record

    record = _record("features", "S", 100, [_pair(2.0, 1.0), _pair(3.0, 1.0), _pair(1.0, 2.0)],
                     repetitions=3)  # fmt: skip
    assert record["ratio"] == 2.0  # median of 2, 3 and 0.5; not 6 / 4 = 1.5
    assert (record["finpipe_s"], record["reference_s"]) == (2.0, 1.0)


@pytest.mark.unit
def test_a_race_whose_sides_did_different_work_holds_no_target():
    """The training loops must reach the same validation losses, the validation sides the same
    verdicts: a ratio of two different runs is not finpipe's overhead."""
    from benchmarks.suite import _verdicts, same_work

    def training(ours: list[float], theirs: list[float]) -> dict:
        details = {"finpipe_validation_loss": ours, "bare_validation_loss": theirs}
        return {"stage": "training_gru", "size": "S", "size_rows": 100, "ratio": 1.0,
                "peak_rss_mb": 1.0, "finpipe_s": 1.0, "reference_s": 1.0,
                "details": details}  # fmt: skip

    same = training([0.986571, 0.98], [0.986571, 0.98])
    rate_apart = training([0.981692, 0.97], [0.985687, 0.98])  # the bare loop at another rate
    rounding = training([0.987669], [0.987668])  # float noise in the sixth decimal
    assert [same_work(r) for r in (same, rate_apart, rounding)] == [True, False, True]
    checks = check_targets([same, {**rate_apart, "size": "4S"}])
    assert [(c["target"], c["holds"]) for c in checks if "ratio" in c["target"]] == [
        ("training_gru at S: ratio <= 1.15", True),
        ("training_gru at 4S: ratio <= 1.15 (sides did different work: see details)", False),
    ]
    assert "| 1.00 | NO |" in results_table([{**rate_apart, "size": "4S"}])

    def validation(unexpected: dict) -> dict:
        return {"unexpected": unexpected, "success": {}, "suite_without_docs_s": 0.5}

    agree = [_pair(2.0, 1.0, validation({"close_positive": 3}))]
    agree[0][1]["details"] = validation({"close_positive": 3})
    assert _verdicts(agree)["same_verdicts"] is True
    differ = [_pair(2.0, 1.0, validation({"close_positive": 3}))]
    differ[0][1]["details"] = validation({"close_positive": 2})
    verdicts = _verdicts(differ)
    assert verdicts["same_verdicts"] is False
    assert verdicts["differing_rules"] == {"close_positive [unexpected]": (3, 2)}
    record = {"stage": "validation", "size": "S", "size_rows": 100, "ratio": 2.0,
              "peak_rss_mb": 1.0, "details": verdicts}  # fmt: skip
    assert [c["holds"] for c in check_targets([record])] == [False]


@pytest.mark.unit
def test_gx_floor_ratio_is_batches_times_the_floor_over_the_references_seconds():
    from benchmarks.suite import _gx_floor

    def pair(reference_s: float, floor_s: float) -> tuple[dict, dict]:
        floor = {"with_docs_s": floor_s, "without_docs_s": floor_s / 2, "one_row_passed": True}
        return _pair(9.0, reference_s, {"gx_batch_floor": floor, "batches": 10})

    floor = _gx_floor([pair(2.0, 0.1), pair(4.0, 0.1), pair(1.0, 0.3)])
    # Pair by pair: 10 x 0.1 / 2 = 0.5, 10 x 0.1 / 4 = 0.25, 10 x 0.3 / 1 = 3: median 0.5.
    assert floor["gx_floor_ratio"] == 0.5
    assert (floor["batches"], floor["gx_batch_floor_s"]) == (10, 0.1)


@pytest.mark.unit
def test_the_team_stack_medians_are_medians_for_any_number_of_pairs():
    from benchmarks.team_stack import _median

    assert _median([1.10, 1.15, 1.20, 1.03]) == 1.12
    assert _median([1, 2, 3, 4]) == 2.5
    assert _median([1.0] * 6) == 1.0
    assert _median([1.3, 1.1, 1.2]) == 1.2


@pytest.mark.unit
def test_a_run_at_another_shape_is_refused_beside_records_of_the_default_one(tmp_path):
    """A quick look at 50 x 400 must not land beside 500 x 2,520 records in one table (its
    memory growth would compare 16S of one shape with S of the other)."""
    out = tmp_path / "results"
    out.mkdir()
    (out / "latest.json").write_text(json.dumps([OLD_MARKET_RECORD]))  # the default shape
    config = BenchConfig(sizes=["4S"], stages=["features"], base_tickers=50, base_days=400,
                         workdir=tmp_path / "work", out=out)  # fmt: skip
    with pytest.raises(ConfigError, match=r"S = 500 tickers x 2,520 days; this run's S is 50"):
        run_benchmarks(config, say=lambda message: None)
    assert not (tmp_path / "work").exists()
    assert json.loads((out / "latest.json").read_text()) == [OLD_MARKET_RECORD]
    with pytest.raises(ConfigError, match="nothing to measure: no stages"):
        BenchConfig(stages=[])
