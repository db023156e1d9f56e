"""`finpipe status`: where each domain stands, read from a store built in the test and from a
real MLflow registry."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import finpipe
from finpipe.calendars import BusinessDays
from finpipe.cli import app
from finpipe.date_runs import completion_key, partition_fingerprint
from finpipe.errors import ConfigError
from finpipe.status import (
    BackfillCap,
    domain_status,
    needs_attention,
    registry_lines,
    status_lines,
)
from finpipe.storage import Storage
from finpipe.tracking import RegistryStatus, VersionStatus

_SOURCE = str(Path(finpipe.__file__).resolve().parents[1])
DAYS = pd.bdate_range("2024-01-01", "2024-01-12").date  # Mon 1 Jan .. Fri 12 Jan: 10 sessions
NO_DELIVERY = dt.date(2024, 1, 10)


def _rows(day: dt.date, close: float = 100.0) -> pd.DataFrame:
    return pd.DataFrame({"date": [day, day], "ticker": ["AAA", "BBB"], "close": [close, close]})


def _record(storage: Storage, day: dt.date, status: str, steps: list[str], **fields) -> None:
    inputs = partition_fingerprint(storage, "market", day)
    record = {"status": status, "steps": steps, "holder": f"nightly-market-{day}", **fields}
    if status == "completed":
        record["inputs"] = inputs
        if "score" in steps:
            record["scored_inputs"] = inputs
    record["finished_at"] = f"{day}T23:00:00+00:00"
    storage.write_json(completion_key(storage, "market", day), record)


@pytest.fixture
def store(tmp_path) -> Storage:
    """A market store of ten sessions: two weeks delivered (but 10 Jan), scored through 5 Jan
    and on 11 Jan; 8 Jan failed, 9 Jan never run, 12 Jan run without the score step; then 3
    Jan corrected and 4 Jan retracted whole after they were scored. Four delivered files: two
    quarantined, the first of them delivered again under its name and validated."""
    storage = Storage(tmp_path / "home")
    for day in DAYS:
        if day == NO_DELIVERY:
            continue
        storage.write_partition("validated", "market", day, _rows(day))
        storage.write_partition("features", "market", day, _rows(day))
    for day in [*DAYS[:5], dt.date(2024, 1, 11)]:
        storage.write_partition("predictions", "market", day, _rows(day))
        _record(storage, day, "completed", ["validate", "features", "score"], model_version="2")
    _record(storage, dt.date(2024, 1, 8), "failed", ["score"], error="no champion to score with")
    _record(storage, dt.date(2024, 1, 12), "completed", ["validate", "features"])
    storage.write_partition("validated", "market", dt.date(2024, 1, 3), _rows(DAYS[2], 101.0))
    storage.delete_partition("validated", "market", dt.date(2024, 1, 4))
    files = [("market_0", "validated"), ("market_1", "quarantined"), ("market_1", "validated")]
    for number, (name, status) in enumerate([*files, ("market_2", "quarantined")]):
        record = {
            "sha256": f"{number:064x}",
            "batch_id": f"b{number}",
            "source": f"/drop/{name}.csv",
            "status": status,
            "landed_at": f"2024-01-0{number + 1}T06:00:00+00:00",
        }
        if status == "quarantined":
            record["quarantined_at"] = f"2024-01-0{number + 1}T06:00:01.123456+00:00"
            storage.write_json(
                storage.quarantine_key("market", f"b{number}") + "/report.json",
                {
                    "rules": [
                        {"rule": "close_positive", "success": False, "severity": "error"},
                        {"rule": "volume_typical", "success": False, "severity": "warning"},
                        {"rule": "ticker_not_null", "success": True, "severity": "error"},
                    ]
                },
            )
        storage.write_batch_record("market", record)
    return storage


def test_the_status_names_every_date_that_needs_work_and_the_command_that_does_it(store):
    status = domain_status(store, "market", BusinessDays(), today=dt.date(2024, 1, 17))

    assert status.files == {"validated": 2, "quarantined": 2}
    assert [(q.file, q.rules) for q in status.quarantined] == [("market_2.csv", "close_positive")]
    assert status.redelivered == 1
    assert status.layers["validated"].days == 8  # 10 sessions, less 10 Jan and retracted 4 Jan
    assert status.layers["predictions"].first == dt.date(2024, 1, 1)
    assert status.layers["predictions"].last == dt.date(2024, 1, 11)
    assert status.newest_scored is not None and status.newest_scored.date == dt.date(2024, 1, 11)
    assert [d.date for d in status.failed] == [dt.date(2024, 1, 8)]
    # 8 Jan failed and 9 Jan never ran; 12 Jan ran without scoring; 10 Jan has no rows
    assert status.unscored == [dt.date(2024, 1, 8), dt.date(2024, 1, 9), dt.date(2024, 1, 12)]
    assert status.no_data == [NO_DELIVERY]
    assert status.stale == [dt.date(2024, 1, 3), dt.date(2024, 1, 4)]
    assert status.gone == [dt.date(2024, 1, 4)]
    # Mon 15 and Tue 16 Jan came and went without a delivery; Wed 17's is not due yet
    assert status.awaiting == [dt.date(2024, 1, 15), dt.date(2024, 1, 16)]
    assert domain_status(store, "market", BusinessDays()).awaiting == []  # no today, no wait

    text = "\n".join(status_lines(status))
    assert "4 delivered files: 2 validated, 2 quarantined (1 of them since delivered again" in text
    assert "quarantined  market_2.csv at 2024-01-04T06:00:01+00:00\n" in text
    assert "rules: close_positive\n" in text  # the warning and the rule that held left out
    assert f"report: {store.location('quarantine/market/b3/report.json')}" in text
    assert "market_1.csv" not in text
    assert "last scored  2024-01-11 by model v2" in text
    assert "awaiting     2 sessions since, 2024-01-15 .. 2024-01-16: no delivery validated" in text
    assert "2024-01-08: no champion to score with" in text
    assert (
        "re-run: finpipe run backfill --domain market --start 2024-01-08 --end 2024-01-08" in text
    )
    assert (
        "score them: finpipe run backfill --domain market --start 2024-01-08 --end 2024-01-12"
        in (text)
    )
    # through the newest predictions: later features read the corrected 3 Jan in their lookback
    assert "re-score: finpipe run backfill --domain market --start 2024-01-03 --end 2024-01-11" in (
        text
    )
    assert "1 date: 2024-01-04: retracted whole" in text
    assert "every session since scoring began" not in text


def test_the_command_reads_a_store_without_importing_a_domains_models(store):
    """The morning check starts in seconds: whether a domain's scoring reads earlier dates,
    and credit's contract, come without PyTorch, LightGBM and scikit-learn (seconds to import)."""
    for day in DAYS:  # credit scores history: its stale check reads the corrections too
        for layer in ("validated", "features", "predictions"):
            store.write_partition(layer, "credit", day, _rows(day))
    script = (
        "import sys\nfrom finpipe.cli import app\ntry:\n    app(['status'])\n"
        "except SystemExit:\n    pass\n"
        "print('imported:', sorted({'torch', 'lightgbm', 'sklearn'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        # The tree under test, whichever copy an editable install points at.
        env={"FINPIPE_HOME": str(store.root), "PATH": "", "PYTHONPATH": _SOURCE},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "re-score: finpipe run backfill --domain market --start 2024-01-03" in result.stdout
    assert "credit" in result.stdout and "2024-01-12" in result.stdout
    assert result.stdout.rstrip().endswith("imported: []")


def test_what_needs_attention_is_what_needs_work_and_not_holidays_or_retracted_days(store):
    status = domain_status(store, "market", BusinessDays(), today=dt.date(2024, 1, 17))
    assert needs_attention(status) == [
        "1 quarantined file waiting for a fixed delivery",  # the other was delivered again
        "2 sessions awaiting a delivery",
        "1 date failed",
        "3 sessions not scored",
        "1 date scored from data changed since",  # 4 Jan, retracted whole, cannot be
        "1 date retracted whole that later dates' features still read",  # until a rebuild
    ]
    assert (
        needs_attention(domain_status(store, "market", BusinessDays()))
        == needs_attention(status)[:1] + needs_attention(status)[2:]
    )  # no today: no session is awaited


def test_the_check_exits_1_naming_what_needs_work_and_0_when_nothing_does(store, home, monkeypatch):
    import json

    import finpipe.schedule

    monkeypatch.setattr(finpipe.schedule, "today_in", lambda _: dt.date(2024, 1, 15))
    result = CliRunner().invoke(app, ["status", "--check"], terminal_width=200)
    assert result.exit_code == 1, result.output
    assert "last scored  2024-01-11" in result.stdout  # the report is printed all the same
    assert result.stderr.strip() == (
        "needs attention: market: 1 quarantined file waiting for a fixed delivery, 1 date "
        "failed, 3 sessions not scored, 1 date scored from data changed since, 1 date retracted "
        "whole that later dates' features still read"
    )
    shown = json.loads(CliRunner().invoke(app, ["status", "market", "--json"]).stdout)
    assert shown[0]["attention"][1] == "1 date failed"

    monkeypatch.setenv("FINPIPE_HOME", str(store.root.parent / "clean"))
    clean = Storage(store.root.parent / "clean")
    for day in DAYS[:3]:
        clean.write_partition("validated", "market", day, _rows(day))
        clean.write_partition("features", "market", day, _rows(day))
        clean.write_partition("predictions", "market", day, _rows(day))
        _record(clean, day, "completed", ["validate", "features", "score"], model_version="1")
    monkeypatch.setattr(finpipe.schedule, "today_in", lambda _: dt.date(2024, 1, 4))
    result = CliRunner().invoke(app, ["status", "--check"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "every session since scoring began is scored and current" in result.stdout
    assert result.stderr == ""


def test_each_named_backfill_holds_no_more_sessions_than_the_cap(store):
    """A range over FINPIPE_BACKFILL_MAX_DATES is refused by the command line, so the status
    names backfills each within it, in order, that together cover the range."""
    from finpipe.planning import check_backfill_request

    status = domain_status(store, "market", BusinessDays())
    lines = status_lines(status, BackfillCap(BusinessDays(), max_dates=3))
    at = next(i for i, line in enumerate(lines) if "re-score:" in line)
    commands = [line.split("re-score:")[-1].strip() for line in lines[at : at + 3]]
    ranges = [command.split("--start ")[1].split(" --end ") for command in commands]
    assert ranges == [
        ["2024-01-03", "2024-01-07"],
        ["2024-01-08", "2024-01-10"],
        ["2024-01-11", "2024-01-11"],
    ]
    assert lines[at + 3] == (
        "               (3 backfills in order: one holds at most 3 sessions, "
        "FINPIPE_BACKFILL_MAX_DATES)"
    )
    for start, end in ranges:
        check_backfill_request(
            "market", start, end, ["score"], today=dt.date(2024, 2, 1), max_dates=3,
            calendar=BusinessDays(),
        )  # fmt: skip
    within = "\n".join(status_lines(status, BackfillCap(BusinessDays(), max_dates=7)))
    assert "--start 2024-01-03 --end 2024-01-11\n" in within and "backfills in order" not in within


def test_a_date_retracted_whole_names_a_backfill_until_the_later_features_are_rebuilt(tmp_path):
    storage = Storage(tmp_path / "home")
    for day in DAYS[:5]:
        for layer in ("validated", "features", "predictions"):
            storage.write_partition(layer, "market", day, _rows(day))
        _record(storage, day, "completed", ["validate", "features", "score"], model_version="1")
    storage.delete_partition("validated", "market", DAYS[2])  # a retraction, before a rebuild
    status = domain_status(storage, "market", BusinessDays())
    assert (status.stale, status.gone, status.unrebuilt) == ([DAYS[2]], [DAYS[2]], [DAYS[2]])
    text = "\n".join(status_lines(status))  # the later dates' features still read it
    assert f"re-score: finpipe run backfill --domain market --start {DAYS[2]} --end {DAYS[4]}" in (
        text
    )
    assert needs_attention(status) == [
        "1 date retracted whole that later dates' features still read"
    ]

    storage.delete_partition("features", "market", DAYS[2])  # as the next run's rebuild does
    status = domain_status(storage, "market", BusinessDays())
    assert (status.stale, status.gone, status.unrebuilt) == ([DAYS[2]], [DAYS[2]], [])
    text = "\n".join(status_lines(status))
    assert "retracted whole, so nothing can score them again" in text
    assert "re-score" not in text and needs_attention(status) == []


def test_a_dismissed_quarantined_file_is_no_longer_waited_for_and_says_why(store, home):
    """A fix sent under another name leaves the rejected file's name unvalidated for ever: the
    user dismisses it, with a reason its record keeps."""
    from finpipe.ingest import dismiss_quarantined
    from finpipe.vintages import batch_history

    runner = CliRunner()
    result = runner.invoke(app, ["dismiss", "market", "b3", "--reason", "sent as v2.csv"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "b3 (market_2.csv) dismissed: sent as v2.csv"
    status = domain_status(store, "market", BusinessDays())
    assert (status.waiting, status.quarantined, status.dismissed) == (0, [], 1)
    assert "quarantined file" not in " ".join(needs_attention(status))
    assert (
        "2 quarantined (1 of them since delivered again and validated, 1 dismissed)"
        in status_lines(status)[0]
    )
    history = batch_history(store, "market").set_index("batch")["status"]
    assert history["b3"] == "quarantined, dismissed" and history["b0"] == "validated"
    [record] = [r for r in store.batch_records("market") if r["batch_id"] == "b3"]
    assert record["dismissed_reason"] == "sent as v2.csv" and record["dismissed_at"]

    for batch, said in [
        ("b0", "b0 is validated of market: only a quarantined batch is dismissed; the "),
        ("b9", "b9 is no batch of market: only a quarantined batch is dismissed; the "),
    ]:
        with pytest.raises(ConfigError, match=said):
            dismiss_quarantined(store, "market", batch, "why")
    with pytest.raises(ConfigError, match="say why the batch is dismissed"):
        dismiss_quarantined(store, "market", "b1", " ")


def test_a_store_with_nothing_to_do_says_so_and_one_with_nothing_delivered_too(tmp_path):
    storage = Storage(tmp_path / "home")
    empty = "\n".join(status_lines(domain_status(storage, "market", BusinessDays())))
    assert "none delivered yet" in empty and "no date scored yet" in empty
    credit = "\n".join(status_lines(domain_status(storage, "credit", BusinessDays())))
    # `finpipe run nightly` alone runs market: the hint for credit has to say credit.
    assert "no date scored yet: finpipe run nightly --domain credit)" in credit
    assert "every session" not in empty  # nothing was scored: nothing is current either

    for day in DAYS[:3]:
        storage.write_partition("validated", "market", day, _rows(day))
        storage.write_partition("features", "market", day, _rows(day))
        storage.write_partition("predictions", "market", day, _rows(day))
        _record(storage, day, "completed", ["validate", "features", "score"], model_version="1")
    status = domain_status(storage, "market", BusinessDays())
    assert (status.failed, status.unscored, status.no_data, status.stale) == ([], [], [], [])
    assert "every session since scoring began is scored and current" in "\n".join(
        status_lines(status)
    )
    later = DAYS[4]  # 4 Jan has no delivery: the sessions with data are all scored
    storage.write_partition("validated", "market", later, _rows(later))
    storage.write_partition("features", "market", later, _rows(later))
    storage.write_partition("predictions", "market", later, _rows(later))
    _record(storage, later, "completed", ["validate", "features", "score"], model_version="1")
    text = "\n".join(status_lines(domain_status(storage, "market", BusinessDays())))
    assert "no data      1 date: 2024-01-04" in text
    assert "every session with validated data since scoring began is scored and current" in text


def test_a_quarantined_file_whose_report_is_gone_is_said_so(tmp_path):
    storage = Storage(tmp_path / "home")
    for number, batch in enumerate(["b0", None]):  # a record without a batch id, too
        record = {"sha256": f"{number:064x}", "source": f"/drop/m{number}.csv"}
        record |= {"status": "quarantined", "landed_at": f"2024-01-0{number + 1}T06:00:00"}
        storage.write_batch_record("market", record | ({"batch_id": batch} if batch else {}))
    status = domain_status(storage, "market", BusinessDays())
    assert [(q.file, q.rules, q.report) for q in status.quarantined] == [
        ("m0.csv", "unknown: its report is missing", "missing"),
        ("m1.csv", "unknown: its report is missing", "missing"),
    ]


def test_quarantined_files_beyond_the_newest_three_are_counted_not_dropped(tmp_path):
    storage = Storage(tmp_path / "home")
    for number in range(5):
        storage.write_batch_record(
            "market",
            {
                "sha256": f"{number:064x}",
                "batch_id": f"b{number}",
                "source": f"/drop/market_{number}.csv",
                "status": "quarantined",
                "landed_at": f"2024-01-0{number + 1}T06:00:00+00:00",
                "quarantined_at": f"2024-01-0{number + 1}T06:00:01+00:00",
            },
        )
    status = domain_status(storage, "market", BusinessDays())
    assert status.waiting == 5
    assert [found.file for found in status.quarantined] == [f"market_{n}.csv" for n in (2, 3, 4)]
    text = "\n".join(status_lines(status))
    assert (
        "quarantined  and 2 earlier files (finpipe batches market lists them; each report is "
        "in quarantine/market/<batch>/)"
    ) in text
    assert needs_attention(status) == ["5 quarantined files waiting for a fixed delivery"]


def test_a_long_list_names_its_newest_dates():
    from finpipe.status import _named

    days = list(DAYS[:5])
    assert _named(days) == "5 dates: ..., 2024-01-03, 2024-01-04, 2024-01-05"
    assert _named(days[:1]) == "1 date: 2024-01-01"


def _version(number: str, **fields) -> VersionStatus:
    values = {"as_of": "2024-01-05", "registered_at": "2024-01-05T23:00:00+00:00"}
    values |= {"promotion": None, "reason": None, "refused": None} | fields
    return VersionStatus(version=number, **values)


@pytest.mark.parametrize(
    ("champion", "challenger", "said", "unsaid"),
    [
        (None, None, ["none yet in finpipe-market", "finpipe run nightly --domain market"], []),
        (
            _version("2", promotion="promoted", reason="challenger v2 ic=0.05 beats v1 ic=0.03"),
            _version("2", promotion="promoted", reason="challenger v2 ic=0.05 beats v1 ic=0.03"),
            ["champion     v2, trained as of 2024-01-05", "v2 ic=0.05 beats v1"],
            ["challenger   v"],
        ),
        (
            _version("2"),
            _version("3", promotion="kept", reason="challenger v3 ic=0.01 does not beat v2"),
            ["challenger   v3", "challenger v3 ic=0.01 does not beat v2"],
            [],
        ),
        (
            _version("2"),
            _version("3", refused="validation IC 0.001 below the floor 0.01"),
            ["refused by the quality floor (validation IC 0.001 below the floor 0.01)"],
            [],
        ),
        (_version("2"), _version("3"), ["not compared yet"], []),
    ],
)
def test_the_registry_lines_say_which_model_scores_and_what_became_of_the_last_challenger(
    champion, challenger, said, unsaid
):
    text = "\n".join(
        registry_lines("market", RegistryStatus("finpipe-market", champion, challenger))
    )
    for words in said:
        assert words in text
    for words in unsaid:
        assert words not in text


def test_the_command_reads_the_registry_and_says_why_the_champion_was_promoted(home, monkeypatch):
    """A real MLflow store: two versions, the second promoted by `apply_promotion`, whose
    reason the registry keeps on the version and the command prints."""
    import mlflow
    from mlflow import MlflowClient

    from finpipe.promotion import PromotionDecision, apply_promotion
    from finpipe.tracking import set_alias, tag_version

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # the command sets them; monkeypatch undoes it
    mlflow.set_tracking_uri(home.tracking_uri)
    client, model = MlflowClient(), home.model_name("market")
    client.create_registered_model(model)
    experiment = client.create_experiment("status")  # not the process's active one
    for version in ("1", "2"):
        run = client.create_run(experiment).info.run_id
        client.create_model_version(model, f"runs:/{run}/model", run)
        tag_version(home, "market", version, "as_of", f"2024-01-0{version}")
        set_alias(home, "market", "challenger", version)
    decision = PromotionDecision(True, "ic", "2", 0.05, "1", 0.03, "challenger v2 beats v1")
    apply_promotion(home, "market", decision)

    result = CliRunner().invoke(app, ["status", "market"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "champion     v2, trained as of 2024-01-02" in result.output
    assert "challenger v2 beats v1" in result.output
    assert "none delivered yet" in result.output

    import json

    result = CliRunner().invoke(app, ["status", "market", "--json"])
    (shown,) = json.loads(result.output)
    assert shown["registry"]["champion"]["reason"] == "challenger v2 beats v1"
    assert shown["registry"]["champion"]["promotion"] == "promoted"


def test_a_tracking_server_that_does_not_answer_leaves_the_store_part_said(home, monkeypatch):
    import socket

    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    monkeypatch.setenv("FINPIPE_MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(app, ["status", "credit"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "none delivered yet" in result.output
    assert f"champion     unknown: MLflow tracking server http://127.0.0.1:{port}" in result.output


def test_a_registry_that_refuses_the_request_is_not_said_to_have_no_champion(home, monkeypatch):
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the name http.server calls)
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error_code": "PERMISSION_DENIED", "message": "no"}')

        def log_message(self, *_):
            pass

    home.home.mkdir(parents=True, exist_ok=True)  # the store is there: only MLflow refuses
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("FINPIPE_MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_port}")
        for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
            monkeypatch.delenv(name, raising=False)
        result = CliRunner().invoke(app, ["status", "market"], terminal_width=200)
        checked = CliRunner().invoke(app, ["status", "market", "--check"], terminal_width=200)
    finally:
        server.shutdown()
    assert result.exit_code == 0, result.output
    assert "champion     unknown: MLflow at http://127.0.0.1:" in result.output
    assert "none yet" not in result.output
    assert checked.exit_code == 1, checked.output
    assert checked.stderr.strip() == (
        "needs attention: market: champion unknown: the MLflow registry could not be read"
    )


def test_the_status_of_a_home_that_does_not_exist_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FINPIPE_HOME", str(tmp_path / "typo"))
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    result = CliRunner().invoke(app, ["status", "market"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"store {tmp_path / 'typo'} (no such folder: is FINPIPE_HOME right?)" in result.output
    assert "champion     none yet" in result.output
    checked = CliRunner().invoke(app, ["status", "market", "--check"], terminal_width=200)
    assert checked.exit_code == 1  # a cron job's mistyped home is no all-clear
    assert checked.stderr.strip() == f"needs attention: store: {tmp_path / 'typo'} does not exist"
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_domain_is_refused_with_the_known_ones(home):
    result = CliRunner().invoke(app, ["status", "nosuch"])
    assert "known domains: market, credit, customers" in str(result.exception)


def _segments(day: dt.date, version: str, names: dict[int, tuple[str, int]]) -> pd.DataFrame:
    total = sum(customers for _, customers in names.values())
    return pd.DataFrame(
        {
            "date": pd.Timestamp(day),
            "segment": list(names),
            "segment_name": [name for name, _ in names.values()],
            "customers": [customers for _, customers in names.values()],
            "share": [customers / total for _, customers in names.values()],
            "model_version": version,
        }
    )


def test_the_status_of_a_segmenting_domain_names_its_newest_segments(tmp_path):
    """`finpipe status customers` listed validated, features and predictions but not the
    segments layer a CRM user reads the names from: its span, the newest night's segments
    (id, name, customers, share, largest first), and a warning with the re-score command
    when its newest night is not the predictions' newest."""
    storage = Storage(tmp_path / "home")
    three = {
        0: ("lapsed, one-off, low spend", 1626),
        1: ("lapsed, occasional, mid spend", 432),
        2: ("recent, frequent, high spend", 299),
    }
    for day in DAYS[:2]:
        for layer in ("validated", "features", "predictions"):
            storage.write_partition(layer, "customers", day, _rows(day))
        storage.write_partition("segments", "customers", day, _segments(day, "2", three))
    status = domain_status(storage, "customers", BusinessDays())
    text = "\n".join(status_lines(status))
    assert "  segments     2024-01-01 .. 2024-01-02, 2 days\n" in text
    assert "               2024-01-02: 3 segments by model v2, largest first\n" in text
    assert "                 0  lapsed, one-off, low spend (1,626, 69%)\n" in text
    assert "                 2  recent, frequent, high spend (299, 13%)" in text
    assert "out of step" not in text and not needs_attention(status)

    # A scoring night stopped after its segments were published, before its predictions.
    storage.write_partition("segments", "customers", DAYS[2], _segments(DAYS[2], "3", three))
    status = domain_status(storage, "customers", BusinessDays())
    text = "\n".join(status_lines(status))
    assert (
        "  out of step  newest segments 2024-01-03, newest predictions 2024-01-02: "
        "2024-01-03 has no predictions\n"
        "               re-score: finpipe run backfill --domain customers --start 2024-01-03 "
        "--end 2024-01-03"
    ) in text
    assert needs_attention(status) == ["1 segments layer out of step with the predictions"]
    # A domain without the layer shows none.
    assert "segments" not in "\n".join(
        status_lines(domain_status(storage, "market", BusinessDays()))
    )


def test_segments_missing_from_a_completed_night_are_re_scored_with_force(tmp_path):
    """Predictions of a night scored before the segments layer existed, newer than a night
    re-scored since (which published its segments): the newest night is completed from
    unchanged data, so a plain backfill skips it and leaves it without segments; the command
    redoes it with `--force`."""
    storage = Storage(tmp_path / "home")
    for day in DAYS[:2]:
        for layer in ("validated", "features", "predictions"):
            storage.write_partition(layer, "customers", day, _rows(day))
    storage.write_partition(
        "segments", "customers", DAYS[0], _segments(DAYS[0], "2", {0: ("recent", 3)})
    )
    text = "\n".join(status_lines(domain_status(storage, "customers", BusinessDays())))
    assert (
        "  out of step  newest segments 2024-01-01, newest predictions 2024-01-02: "
        "2024-01-02 has no segments table\n"
        "               re-score: finpipe run backfill --domain customers --start 2024-01-02 "
        "--end 2024-01-02 --force"
    ) in text
