"""The domain seam as a developer adding a domain meets it: an installed package's domain is
known to every finpipe process (entry points), a domain's own package may hold its model
classes, its name may hold '_', a contract of another domain is refused, a misspelt selection
metric is named, an error of the code or the data is not retried, a scorer's unreadable rows
are not published, and promotions of one domain take turns."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
import threading
import time
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
from finpipe.flows.summaries import artifact_key
from finpipe.tasks.steps import retry_if_transient
from prefect.states import Failed

from finpipe import domains, lifecycle
from finpipe.credit.features import update_credit_features
from finpipe.credit.pipeline import CreditParts, active_loan_book, credit_contract
from finpipe.errors import ConfigError, ScoringError, StoreUnavailable
from finpipe.promotion import best_on_validation
from finpipe.scoring import publish_predictions
from finpipe.storage import Storage
from finpipe.tracking import RegisteredModel

# A package that installs a second loan book as the domain `loans`, the way a team's own
# package would: its module binds the parts, its dist-info names it in `finpipe.domains`.
PLUGIN = """
import dataclasses
from functools import partial

from finpipe import lifecycle
from finpipe.credit.features import update_credit_features
from finpipe.credit.pipeline import CreditParts, active_loan_book, credit_contract

book = active_loan_book()
contract = dataclasses.replace(credit_contract(book), domain="loans")
LOANS = lifecycle.bind(
    CreditParts(name="loans", book=book, contract=contract,
                update_features=partial(update_credit_features, book=book))
)
"""


def _install(site: Path, package: str, entry_points: str, code: str) -> None:
    """Write `package` and a dist-info naming `entry_points` into `site`, as pip would."""
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text(textwrap.dedent(code))
    info = site / f"{package}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[finpipe.domains]\n{entry_points}\n")


def _run(site: Path, tmp_path: Path, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *command],
        capture_output=True,
        text=True,
        env={"FINPIPE_HOME": str(tmp_path / "home"), "PATH": "", "PYTHONPATH": str(site)},
        timeout=180,
        check=False,
    )


def test_an_installed_domain_is_known_to_the_command_line_and_the_run_forms(tmp_path):
    site = tmp_path / "site"
    _install(site, "loans_plugin", "loans = loans_plugin:LOANS", PLUGIN)
    # A deployment's flow run imports the flows alone: the form's drop-down has the domain;
    # then the command line, in the same fresh process.
    script = (
        "import sys; from finpipe.flows.nightly import nightly; "
        "from prefect.utilities.callables import parameter_schema; "
        "print(parameter_schema(nightly).properties['domain']['enum'], flush=True); "
        "from finpipe.cli import main; sys.argv = ['finpipe', 'batches', 'loans']; main()"
    )
    (tmp_path / "home").mkdir()  # `batches` reads a store; it creates none
    done = _run(site, tmp_path, "-c", script)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "['market', 'credit', 'customers', 'loans']"
    assert done.stdout.splitlines()[1] == "no delivered file of loans yet"
    assert "unknown domain" not in done.stderr


@pytest.fixture
def installed_plugins(monkeypatch):
    """Let a test install domain packages into this process: the registry's plugin state is
    put back as it was afterwards."""
    monkeypatch.setattr(domains, "_plugins", "unloaded")
    monkeypatch.setattr(domains, "_BROKEN", {})
    registered = dict(domains._REGISTERED)
    yield monkeypatch
    domains._REGISTERED.clear()
    domains._REGISTERED.update(registered)


def test_a_plugin_that_fails_to_load_leaves_the_others_and_says_why(tmp_path, installed_plugins):
    site = tmp_path / "site"
    _install(site, "broken_plugin", "broken = broken_plugin", "raise ImportError('no torch')")
    _install(site, "silent_plugin", "silent = silent_plugin", "NOTHING = None")
    installed_plugins.syspath_prepend(str(site))

    assert domains.domain_names() == ["market", "credit", "customers"]
    with pytest.raises(ConfigError, match="'broken' is installed but failed to load: ImportError"):
        domains.get_domain("broken")
    with pytest.raises(ConfigError, match="silent_plugin registered no domain named 'silent'"):
        domains.get_domain("silent")
    assert domains.get_domain("market").name == "market"


def test_a_domains_own_package_may_hold_its_model_classes():
    credit = domains.get_domain("credit")
    domains.register_domain(
        dataclasses.replace(credit, name="fx_rates", code_module="fxdom.pipeline")
    )
    try:
        assert domains.trusted_model_module("fxdom.model")  # beside its parts
        assert domains.trusted_model_module("fxdom.nets.gru")
        assert domains.trusted_model_module("finpipe.market.model")
        assert not domains.trusted_model_module("fxdomain.model")
        assert domains.trusted_model_module("fxdom.pipeline")
        assert not domains.trusted_model_module("os")
        # finpipe's own means its package: not any package whose name begins with it
        assert not domains.trusted_model_module("finpipe_evil.model")
        assert not domains.trusted_model_module("finpipextra")
    finally:
        domains.unregister_domain("fx_rates")
    assert not domains.trusted_model_module("fxdom.model")


def test_a_domain_whose_name_is_not_a_safe_path_component_is_refused():
    credit = domains.get_domain("credit")
    for name in ("../evil", "a/b", ""):
        with pytest.raises(ConfigError):
            domains.register_domain(dataclasses.replace(credit, name=name))
        assert name not in domains.domain_names()  # nor in the run forms' drop-down


def test_artifact_keys_take_a_domain_name_with_an_underscore():
    # Prefect refuses '_' in artifact keys; check_name allows it in a domain's name.
    assert artifact_key("nightly", "fx_rates", "summary") == "nightly-fx-rates-summary"
    assert artifact_key("backfill", "market") == "backfill-market"


def test_a_contract_of_another_domain_is_refused_when_the_domain_is_bound():
    book = active_loan_book()
    parts = CreditParts(
        name="loans",
        book=book,
        contract=credit_contract(book),  # still credit's: batches would be filed under credit
        update_features=lambda *args, **kwargs: update_credit_features(*args, **kwargs),
    )
    with pytest.raises(ConfigError, match="'loans' has the raw contract of domain 'credit'"):
        lifecycle.bind(parts)


def test_a_misspelt_selection_metric_names_the_metrics_there_are():
    windows = {"mlp": {"validation": {"auc": 0.7, "log_loss": 0.5}}, "logistic": {
        "validation": {"auc": 0.6, "log_loss": 0.6}}}  # fmt: skip
    assert best_on_validation(windows, "auc") == "mlp"
    with pytest.raises(ConfigError, match=r"'AUC' is not among .* mlp: auc, log_loss$"):
        best_on_validation(windows, "AUC")


def test_a_candidate_whose_validation_metric_is_nan_is_chosen_last():
    nan = float("nan")
    windows = {"gru": {"validation": {"ic": nan}}, "mlp": {"validation": {"ic": 0.04}}}
    assert best_on_validation(windows, "ic") == "mlp"  # NaN first: max would keep it
    windows["lgbm"] = {"validation": {"ic": -0.2}}
    assert best_on_validation(windows, "ic") == "mlp"
    windows = {"gru": {"validation": {"ic": 0.01}}, "mlp": {"validation": {"ic": nan}}}
    assert best_on_validation(windows, "ic") == "gru"
    windows = {"gru": {"validation": {"ic": nan}}, "mlp": {"validation": {"ic": None}}}
    assert best_on_validation(windows, "ic") in windows  # none measurable: no error here


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        (KeyError("AUC"), False),  # a domain's bug: every candidate would be fitted again
        (TypeError("unsupported operand"), False),
        (ZeroDivisionError("division by zero"), False),
        # pyarrow's ArrowInvalid and requests' JSONDecodeError are ValueErrors, and a
        # truncated reply from a store or a proxy raises them: retried.
        (ValueError("truncated reply"), True),
        (ConfigError("bad setting"), False),
        (StoreUnavailable("the object store did not answer"), True),
        (ConnectionError("reset by peer"), True),
        (OSError("HTTP 503"), True),
        (RuntimeError("database is locked"), True),
    ],
)
def test_only_faults_of_a_server_or_the_network_are_retried(error, retried):
    assert retry_if_transient(None, None, Failed(data=error)) is retried


@pytest.mark.parametrize(
    ("rows", "said"),
    [
        (pd.DataFrame({"pair": [None, None]}), "returned no id column"),
        (pd.DataFrame({"id": ["a", None], "pd": [0.1, 0.2]}), "returned rows without their id"),
        (
            pd.DataFrame({"id": ["a", "b", "a"], "pd": [0.1, 0.2, 0.3]}),
            r"returned 2 rows that share their keys \(id=a, ...\)",
        ),
        (pd.DataFrame({"id": ["a", "b"]}), r"returned its keys \(id\) only"),
        (  # a date column is not a prediction: scoring replaces it with the date scored
            pd.DataFrame({"date": pd.Timestamp("2024-03-11"), "id": ["a", "b"]}),
            r"returned its keys \(id\) only",
        ),
        (  # it would be published twice under one name, or lost
            pd.DataFrame({"id": ["a", "b"], "pd": [0.1, 0.2], "run_id": ["x", "y"]}),
            "returned a column named run_id, which scoring adds",
        ),
        (pd.DataFrame(), "returned no id column"),  # nothing to score still names its keys
        (pd.DataFrame({"id": ["a", "b"], "pd": [None, None]}), "returned no value in pd"),
    ],
)
def test_a_scorer_that_returns_unreadable_rows_publishes_nothing(tmp_path, rows, said):
    storage = Storage(tmp_path / "home")
    model = RegisteredModel(name="finpipe-fx", version="1", run_id="r1", model=None)
    with pytest.raises(ScoringError, match=f"the fx scorer {said}"):
        publish_predictions(storage, "fx", "2024-03-11", rows, model, sort_by=["id"])
    assert storage.partition_dates("predictions", "fx") == []
    good = pd.DataFrame({"id": ["b", "a"], "pd": [0.2, None]})
    assert publish_predictions(storage, "fx", "2024-03-11", good, model, sort_by=["id"]).rows == 2


def test_predictions_are_published_sorted_by_their_keys_whatever_the_scorers_order(tmp_path):
    storage = Storage(tmp_path / "home")
    model = RegisteredModel(name="finpipe-fx", version="1", run_id="r1", model=None)
    rows = pd.DataFrame(
        {
            "day": ["2024-03-08", "2024-03-07", "2024-03-08"],
            "id": list("cba"),
            "pd": [0.3, 0.2, 0.1],
        }
    )
    publish_predictions(storage, "fx", "2024-03-11", rows, model, sort_by=["day", "id"])
    published = storage.read_partition("predictions", "fx", "2024-03-11")
    assert published[["day", "id"]].values.tolist() == [
        ["2024-03-07", "b"],
        ["2024-03-08", "a"],
        ["2024-03-08", "c"],
    ]
    assert published["pd"].tolist() == [0.2, 0.1, 0.3]  # each row's own value
    empty = pd.DataFrame({"id": pd.Series([], dtype="string"), "pd": pd.Series([], dtype=float)})
    assert publish_predictions(storage, "fx", "2024-03-12", empty, model, sort_by=["id"]).rows == 0
    assert len(storage.read_partition("predictions", "fx", "2024-03-12")) == 0  # done, empty


def _registry_stub(monkeypatch, as_of: dict[str, str]) -> dict:
    """Stand in for the model registry the promotion reads and writes: versions trained as of
    `as_of`'s dates, v1 champion; return it ({"champion": version, "tags": {version: the
    `promotion` tag}})."""
    from finpipe import promotion

    registry: dict = {"champion": "1", "tags": {}}
    monkeypatch.setattr(promotion, "current_alias_version", lambda *a: registry["champion"])
    monkeypatch.setattr(promotion, "version_tags", lambda s, d, v: {promotion.AS_OF_TAG: as_of[v]})
    monkeypatch.setattr(
        promotion,
        "load_model_version",
        lambda s, d, version: RegisteredModel("m", version, "r", None),
    )

    def tag(settings, domain, decision):
        registry["tags"][decision.challenger_version] = "promoted" if decision.promoted else "kept"

    def apply(settings, domain, decision):
        if decision.promoted:
            registry["champion"] = decision.challenger_version
        tag(settings, domain, decision)

    monkeypatch.setattr(promotion, "apply_promotion", apply)
    monkeypatch.setattr(promotion, "_tag_version", tag)
    return registry


def test_a_promotion_tried_again_after_its_alias_moved_stays_promoted(tmp_path, monkeypatch):
    """The promote task retries a server's fault. One while the decision was logged, after
    `champion` moved to the challenger, must not compare the challenger with itself, tie,
    and tag the champion `kept`."""
    from finpipe import promotion
    from finpipe.settings import load_settings

    registry = _registry_stub(monkeypatch, {"1": "2024-03-07", "2": "2024-03-08"})
    logged = []

    def log_decision(decision, run_id, figures):
        logged.append(decision)
        if len(logged) == 1:
            raise ConnectionError("the tracking server reset the connection")

    monkeypatch.setattr(promotion, "_log_decision", log_decision)
    scores = {"1": 0.01, "2": 0.05}
    promote = dict(
        challenger_version="2",
        metric="ic",
        evaluate=lambda m: scores[m.version],
        lock_root=tmp_path,
    )
    with pytest.raises(ConnectionError):
        promotion.promote_challenger(load_settings(), "market", **promote)
    assert registry["champion"] == "2"  # the alias moved before the fault
    again = promotion.promote_challenger(load_settings(), "market", **promote)
    assert again.promoted and again.challenger_score == 0.05, again.reason
    assert "champion already" in again.reason
    assert (registry["champion"], registry["tags"]) == ("2", {"2": "promoted"})


def test_the_decision_says_what_a_domains_scorer_judged_both_models_on(tmp_path, monkeypatch):
    """A scorer that left rows out (a `JudgedScore`) has the decision's reason, its record and
    the run's metrics say how many; a plain `ModelScore` (a domain written before) still works,
    compared "on the same test window"."""
    from types import SimpleNamespace

    from finpipe import promotion
    from finpipe.settings import load_settings

    registry = _registry_stub(monkeypatch, {"1": "2024-03-07", "2": "2024-03-08"})
    logged = []
    monkeypatch.setattr(promotion, "_log_decision", lambda *args: logged.append(args))
    scores = {"1": 0.01, "2": 0.05}
    outcome = SimpleNamespace(challenger_version="2", promotion_metric="ic", run_id="r")

    def promote(score: lifecycle.ModelScore) -> promotion.PromotionDecision:
        parts = SimpleNamespace(name="toy", promotion_scorer=lambda *args: score)
        return lifecycle.promote(parts, Storage(tmp_path), load_settings(), outcome)

    judged = lifecycle.JudgedScore(
        lambda model: scores[model.version], lambda: promotion.ComparedOn(3, 5, "test week")
    )
    decision = promote(judged)
    assert decision.reason == (
        "challenger v2 ic=0.0500 beats champion v1 ic=0.0100 on the same 3 of 5 test weeks "
        "(2 left out: champion v1 learnt from them)"
    )
    assert decision.to_dict()["compared_on"] == {"kept": 3, "total": 5, "unit": "test week"}
    figures = logged[0][2]
    assert (figures["promotion_compared"], figures["promotion_left_out"]) == (3.0, 2.0)
    registry["champion"] = "1"  # the same night again, scored by a plain `ModelScore`
    plain = promote(lambda model: scores[model.version])
    assert plain.reason.endswith("beats champion v1 ic=0.0100 on the same test window")
    assert plain.compared_on is None and "promotion_left_out" not in logged[1][2]


def test_two_promotions_at_once_keep_the_newer_champion(tmp_path, monkeypatch):
    """Two nights' challengers promoted at once (serve back after a pause starts its late
    nights together): the first moves the alias, the second compares itself with that
    champion. Without the champion lock both beat v1 and the older v2 won the last move."""
    from finpipe import promotion
    from finpipe.locks import LockTimeout, champion_lock
    from finpipe.settings import load_settings

    as_of = {"1": "2022-04-04", "2": "2022-04-05", "3": "2022-04-08"}
    registry = _registry_stub(monkeypatch, as_of)
    monkeypatch.setattr(promotion, "_log_decision", lambda *a: None)
    started = threading.Event()

    def promote(version: str, pause: float) -> None:
        def evaluate(model: RegisteredModel) -> float:
            started.set()
            time.sleep(pause)  # scoring the test window: the race's window
            return 1.0 if model.version == version else 0.0

        promotion.promote_challenger(
            load_settings(), "market", challenger_version=version, metric="ic",
            evaluate=evaluate, lock_root=tmp_path,
        )  # fmt: skip

    older = threading.Thread(target=promote, args=("2", 1.0))
    older.start()
    started.wait(10)
    promote("3", 0.0)  # waits for v2's promotion, then compares v3 with its champion
    older.join()
    assert registry["champion"] == "3"
    # The other way round: v3 first, then v2 is refused as older than the champion.
    registry["champion"] = "1"
    started.clear()
    newer = threading.Thread(target=promote, args=("3", 1.0))
    newer.start()
    started.wait(10)
    promote("2", 0.0)
    newer.join()
    assert registry["champion"] == "3"
    with champion_lock(tmp_path, "market", timeout=0):  # released: free again
        said = []  # held by another run: a promotion waits as long as the setting says
        with pytest.raises(LockTimeout):
            promotion.promote_challenger(
                load_settings(), "market", challenger_version="2", metric="ic",
                evaluate=lambda model: 1.0, lock_root=tmp_path, lock_timeout=0.5,
                on_wait=said.append,
            )  # fmt: skip
        assert len(said) == 1 and "champion" in said[0]


def test_each_epoch_goes_to_mlflow_and_the_log_says_one_every_so_often(monkeypatch):
    """A GRU fit on a 500-ticker night ran for minutes without a line: its epochs went to
    MLflow only. Then every epoch was said, and the demo's log was 927 epoch lines of 1,182
    (185 of one autoencoder fit of 4 s)."""
    logged, said = [], []
    monkeypatch.setattr(lifecycle.tracking, "log_epoch", logged.append)
    now = [0.0]
    on_epoch = lifecycle.epoch_logger("gru", said.append, every=10, clock=lambda: now[0])
    rows = [{"epoch": e, "train_loss": 0.98765, "validation_loss": 1.01234} for e in range(1, 31)]
    for row in rows:  # short epochs, 1 s each: the first, then one at least 10 s later
        on_epoch(row)
        now[0] += 1
    assert logged == rows
    assert said == [
        f"gru epoch {e}: train loss 0.9877, validation loss 1.0123" for e in (1, 11, 21)
    ]
    said.clear()
    slow = lifecycle.epoch_logger("gru", said.append, every=10, clock=lambda: now[0])
    for row in rows[:3]:  # epochs longer than the interval: each one is said
        slow(row)
        now[0] += 12
    assert [line.split(":")[0] for line in said] == ["gru epoch 1", "gru epoch 2", "gru epoch 3"]


@pytest.mark.parametrize("failing", ["log_metrics", "log_figure"])
def test_a_records_figures_are_closed_when_its_logging_fails(monkeypatch, failing):
    """pyplot keeps every figure until it is closed: a tracking server gone mid-run left a
    candidate's figures open for the life of the process (`finpipe serve` runs night after
    night in one), and the suite warned of more than 20 open in one worker."""
    import matplotlib.pyplot as plt

    from finpipe import plots

    def down(*args, **kwargs):
        raise ConnectionError("tracking server gone")

    monkeypatch.setattr(lifecycle.tracking, "log_params", lambda params: None)
    monkeypatch.setattr(lifecycle.tracking, "log_metrics", lambda metrics: None)
    target = lifecycle.tracking if failing == "log_metrics" else lifecycle.tracking.mlflow
    monkeypatch.setattr(target, failing, down)
    open_before = set(plt.get_fignums())
    figures = {f"plots/{i}.png": plots.subplots()[0] for i in range(3)}
    record = lifecycle.RunRecord(params={"a": 1}, metrics={"m": 1.0}, figures=figures)
    candidate = lifecycle.Candidate(
        model=None,  # type: ignore[arg-type]  # not reached: the logging fails first
        loader="",
        input_example=pd.DataFrame(),
        windows={"validation": {"ic": 0.1}, "test": {"ic": 0.0}},
        record=record,
    )
    with pytest.raises(ConnectionError):
        lifecycle._write_candidate(candidate, "market", "mlp", pd.Timestamp("2024-01-02").date())
    assert set(plt.get_fignums()) == open_before


def test_a_feature_step_that_drops_the_date_is_stopped_at_once(tmp_path):
    """Its partitions had no date: `pd.read_parquet` of the layer returned 510 undated rows,
    and training failed later with KeyError: 'date'."""
    import datetime as dt

    from finpipe.features import FeatureUpdate

    storage = Storage(tmp_path)
    update = FeatureUpdate()
    storage.write_partition("features", "fx", "2024-03-11", pd.DataFrame({"pair": ["EURUSD"]}))
    update.add(dt.date(2024, 3, 11), 1)
    with pytest.raises(ConfigError, match="wrote features/fx/2024-03-11 without a 'date' column"):
        lifecycle.check_feature_rows(storage, "fx", update)
    dated = pd.DataFrame({"date": [pd.Timestamp("2024-03-12")], "pair": ["EURUSD"]})
    storage.write_partition("features", "fx", "2024-03-12", dated)
    update.add(dt.date(2024, 3, 12), 1)
    lifecycle.check_feature_rows(storage, "fx", update)
    lifecycle.check_feature_rows(storage, "fx", FeatureUpdate())  # nothing written


def test_a_second_thread_waits_for_installed_domains_to_load(tmp_path, installed_plugins):
    """A Dask worker's threads start tasks at once: the one that did not load the packages
    was told "unknown domain" while the other was still importing them."""
    site = tmp_path / "site"
    _install(
        site, "slow_plugin", "loans = slow_plugin:LOANS", "import time\ntime.sleep(1)\n" + PLUGIN
    )
    installed_plugins.syspath_prepend(str(site))
    found: dict[str, object] = {}

    def ask(name: str) -> None:
        try:
            found[name] = domains.get_domain("loans").name
        except ConfigError as error:
            found[name] = str(error)

    first = threading.Thread(target=ask, args=("first",))
    first.start()
    time.sleep(0.3)  # the first thread is importing the package
    ask("second")
    first.join()
    assert found == {"first": "loans", "second": "loans"}


def _described(contract) -> dict:
    """A contract's fields, with each bound function as what it calls and with what."""

    def plain(value):
        if isinstance(value, partial):
            return (value.func, tuple(value.args), {k: plain(v) for k, v in value.keywords.items()})
        if getattr(value, "__closure__", None):  # a lambda: its code and what it closes over
            return (value.__code__, tuple(plain(cell.cell_contents) for cell in value.__closure__))
        return value

    return {
        field.name: plain(getattr(contract, field.name)) for field in dataclasses.fields(contract)
    }


@pytest.mark.parametrize(
    ("domain", "setting"),
    [
        ("market", {}),
        ("credit", {}),
        ("credit", {"FINPIPE_CREDIT_CONFIG": "germancredit"}),
        ("customers", {}),
        ("customers", {"FINPIPE_CUSTOMERS_CONFIG": "cdnow"}),
    ],
)
def test_a_built_in_domains_light_contract_is_the_one_its_runs_ingest_with(
    monkeypatch, domain, setting
):
    """`finpipe ingest` reads the contract without the domain's models; it is the same one,
    following the same settings."""
    for name, value in setting.items():
        monkeypatch.setenv(name, value)
    light, bound = domains.domain_contract(domain), domains.get_domain(domain).contract
    assert _described(light) == _described(bound)
    assert light.suite == bound.suite and light.key_columns == bound.key_columns


@pytest.mark.parametrize("domain", ["market", "credit", "customers"])
def test_a_built_in_domains_light_history_flag_is_its_own(domain):
    """`finpipe status` and a backfill's plan read whether scoring reads history without the
    domain's models; it must be what the domain itself says."""
    assert domains.domain_scores_history(domain) is domains.get_domain(domain).scores_history


def test_a_registered_domains_contract_is_its_own(monkeypatch):
    registered = dataclasses.replace(domains.get_domain("market"), name="fx_contracts")
    monkeypatch.setitem(domains._REGISTERED, "fx_contracts", registered)
    assert domains.domain_contract("fx_contracts") is registered.contract
    history = dataclasses.replace(registered, name="fx_history", scores_history=True)
    monkeypatch.setitem(domains._REGISTERED, "fx_history", history)
    assert domains.domain_scores_history("fx_history") is True
    assert domains.domain_scores_history("fx_contracts") is False
    with pytest.raises(ConfigError, match="unknown domain 'fx_nope'; known domains: market, "):
        domains.domain_contract("fx_nope")


def test_rows_the_champion_never_learnt_are_counted_in_the_domains_own_unit(caplog):
    """The shared promotion filter leaves out the rows a champion learnt from, counts them in
    whatever unit the domain names (here weeks of a toy domain, three rows a week) and warns
    through the domain's own logger; nothing recorded keeps every row, with a warning."""
    import logging

    import numpy as np

    rows = pd.DataFrame({"week": [1, 1, 1, 2, 2, 2, 3, 3, 3], "y": range(9)})
    toy = logging.getLogger("toy_domain")

    def champion(through: int | None) -> RegisteredModel:
        return RegisteredModel("toy", "4", "r", through)

    def learnt(champion: RegisteredModel) -> lifecycle.LearntRows | None:
        if champion.model is None:
            return None
        return lifecycle.LearntRows(
            (rows["week"] <= champion.model).to_numpy(), f"it saw weeks up to {champion.model}"
        )

    def kept(through: int | None) -> pd.DataFrame:
        return lifecycle.rows_the_champion_never_learnt(
            rows,
            champion(through),
            learnt,
            unit="test week",
            units=lambda frame: frame["week"].nunique(),
            logger=toy,
        )

    assert (
        lifecycle.rows_the_champion_never_learnt(
            rows, None, learnt, unit="test week", units=len, logger=toy
        )
        is rows
    )
    with caplog.at_level(logging.WARNING, "toy_domain"):
        assert kept(2)["week"].tolist() == [3, 3, 3]
    assert "2 of 3 test weeks left out for both models: champion v4" in caplog.text
    assert "(it saw weeks up to 2)" in caplog.text
    assert "cannot be measured" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, "toy_domain"):
        assert kept(3).empty
    assert "3 of 3 test weeks left out" in caplog.text
    assert "the challenger cannot be measured and is not promoted" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, "toy_domain"):
        assert kept(None) is rows
    assert "compared on all 3 test weeks, some of which it may have trained on" in caplog.text
    assert np.all(kept(0)["week"].to_numpy() == rows["week"].to_numpy())
