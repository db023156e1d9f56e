"""The decisions the train and score flows take, as pure functions (the night's and the
backfill's are in test_backfill.py): which date a run works on, which training config."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from finpipe.calendars import calendar_named
from finpipe.errors import ConfigError
from finpipe.market.model import MarketTrainingConfig
from finpipe.planning import run_day, training_config

VALIDATED = [dt.date(2024, 7, 1), dt.date(2024, 7, 2), dt.date(2024, 7, 3)]
NYSE = calendar_named("XNYS")


def test_a_run_works_on_its_date_or_the_latest_validated_one():
    assert run_day("market", None, VALIDATED, NYSE) == dt.date(2024, 7, 3)
    assert run_day("market", None, list(reversed(VALIDATED)), NYSE) == dt.date(2024, 7, 3)
    assert run_day("market", "2024-07-02", VALIDATED, NYSE) == dt.date(2024, 7, 2)


@pytest.mark.parametrize(
    ("as_of", "validated", "message"),
    [
        (None, [], "no validated credit data on or before today"),
        (dt.date(2024, 7, 5), [], "no validated credit data on or before 2024-07-05"),
        # A typo for 2024: a champion tagged as of 2034 would keep every challenger out.
        (dt.date(2034, 7, 5), VALIDATED, "no validated credit data for 2034-07-05"),
        (
            dt.date(2024, 7, 4),
            VALIDATED,
            "2024-07-04 is not a session of the XNYS calendar (a weekend or holiday): the "
            "session before it is 2024-07-03",
        ),
    ],
)
def test_a_run_without_validated_data_for_its_day_says_so(as_of, validated, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_day("credit", as_of, validated, NYSE)


def test_a_runs_training_overrides_give_the_domains_config():
    config = training_config("market", {"max_epochs": 3, "models": ["mlp"]})
    assert isinstance(config, MarketTrainingConfig)
    assert (config.max_epochs, config.models) == (3, ["mlp"])
    assert training_config("market", {}) == MarketTrainingConfig()


def test_a_bad_training_override_is_a_config_error_naming_it():
    with pytest.raises(ConfigError) as raised:
        training_config("market", {"max_epochs": 0, "models": ["foo"]})
    assert str(raised.value) == (  # one line: each field, its value and what it takes
        "invalid training parameters: models='foo': should be 'mlp', 'gru', 'tcn', 'lgbm' or "
        "'ensemble'; max_epochs=0: should be greater than or equal to 1"
    )
    with pytest.raises(ConfigError, match="unknown domain 'bonds'"):
        training_config("bonds", {})


@pytest.mark.parametrize(
    ("domain", "override"),
    [
        ("market", "max_epoch"),  # a typo
        ("credit", "history_dates"),  # a market parameter
        ("customers", "history_start"),
    ],
)
def test_a_training_override_the_domain_does_not_have_is_refused_not_dropped(domain, override):
    with pytest.raises(ConfigError, match=f"{domain} has no training parameter '{override}'"):
        training_config(domain, {override: 3})
