"""Model sanity gates, scoring refusals and storage errors: fail clearly, write nothing partial."""

from __future__ import annotations

import errno
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from finpipe import lifecycle
from finpipe import storage as storage_module
from finpipe.errors import ModelRejected, StorageError
from finpipe.promotion import check_predictions_sane, decide_promotion, newer_champion
from finpipe.storage import Storage
from finpipe.tracking import RegisteredModel


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([0.1, float("nan"), 0.3], "NaN/inf"),
        ([0.1, float("inf"), 0.3], "NaN/inf"),
        ([], "empty"),
        ([0.2, 0.2, 0.2, 0.2], "constant"),
        ([0.1 + 0.2, 0.3, 0.3, 0.3], "constant"),  # equal but for rounding (std 5e-17)
    ],
)
def test_insane_predictions_are_rejected(values, message):
    with pytest.raises(ModelRejected, match=message):
        check_predictions_sane(values, "mlp")


def test_sane_predictions_pass():
    check_predictions_sane(np.array([0.1, -0.2, 0.05]), "mlp")


def test_nan_challenger_never_beats_a_champion():
    decision = decide_promotion(
        metric="ic",
        challenger_version="3",
        challenger_score=float("nan"),
        champion_version="2",
        champion_score=-0.5,
    )
    assert decision.promoted is False
    assert "NaN" in decision.reason


def test_first_model_is_promoted_and_ties_keep_the_champion():
    first = decide_promotion(
        metric="ic",
        challenger_version="1",
        challenger_score=0.01,
        champion_version=None,
        champion_score=None,
    )
    tie = decide_promotion(
        metric="ic",
        challenger_version="2",
        challenger_score=0.05,
        champion_version="1",
        champion_score=0.05,
    )
    assert (first.promoted, tie.promoted) == (True, False)


@pytest.mark.parametrize("champion", [None, "2"])
@pytest.mark.parametrize("score", [float("nan"), float("-inf")])
def test_a_challenger_that_cannot_be_measured_is_never_promoted(champion, score):
    decision = decide_promotion(
        metric="ic",
        challenger_version="3",
        challenger_score=score,
        champion_version=champion,
        champion_score=None if champion is None else 0.02,
    )
    assert decision.promoted is False
    assert "cannot be measured" in decision.reason
    assert ("champion v2 kept" if champion else "there is no champion") in decision.reason


@pytest.mark.parametrize("score", [float("nan"), float("-inf")])
def test_a_champion_that_cannot_be_measured_gives_way(score):
    decision = decide_promotion(
        metric="ic",
        challenger_version="3",
        challenger_score=-0.01,
        champion_version="2",
        champion_score=score,
    )
    assert decision.promoted is True
    assert decision.reason.startswith("champion v2 ic=")
    assert "cannot be measured on the test window; challenger v3" in decision.reason


def test_only_a_champion_trained_as_of_a_later_date_refuses_the_comparison():
    """A champion trained as of the challenger's own date (a retrain of the same night, with
    other settings) is compared on the test window; only a later one may have learnt from it."""
    assert newer_champion("ic", "2", "2024-03-08", "1", "2024-03-08") is None
    assert newer_champion("ic", "2", "2024-03-08", "1", "2024-03-07") is None
    assert newer_champion("ic", "2", None, "1", "2024-03-09") is None  # predates the tag
    refused = newer_champion("ic", "2", "2024-03-08", "1", "2024-03-09")
    assert refused is not None and not refused.promoted
    assert refused.champion_version == "1" and refused.challenger_version == "2"
    assert "trained as of 2024-03-09, after challenger v2's 2024-03-08" in refused.reason


def test_only_a_champion_that_cannot_read_the_window_loses_its_seat(monkeypatch):
    """The champion's failure to score scores -inf; the challenger's (it was trained on these
    features) and running out of memory are errors, not verdicts on a model."""
    monkeypatch.setattr(
        lifecycle.promotion, "promote_challenger", lambda *args, evaluate, **kwargs: evaluate
    )

    def scorer(storage, outcome, champion):
        return lambda model: model.model()

    def fails(error: BaseException):
        def predict():
            raise error

        return predict

    parts = SimpleNamespace(name="toy", promotion_scorer=scorer)
    outcome = SimpleNamespace(challenger_version="2", promotion_metric="ic", run_id=None)
    evaluate = lifecycle.promote(parts, SimpleNamespace(url="store"), None, outcome)
    assert evaluate(RegisteredModel("m", "1", "r", fails(KeyError("momentum")))) == -np.inf
    assert evaluate(RegisteredModel("m", "2", "r", lambda: 0.03)) == 0.03
    with pytest.raises(KeyError, match="momentum"):
        evaluate(RegisteredModel("m", "2", "r", fails(KeyError("momentum"))))
    with pytest.raises(MemoryError):
        evaluate(RegisteredModel("m", "1", "r", fails(MemoryError())))


def _frame() -> pd.DataFrame:
    return pd.DataFrame({"date": pd.Timestamp("2024-01-02"), "ticker": ["A", "B"], "x": [1.0, 2.0]})


def test_disk_full_while_writing_leaves_no_partial_partition(tmp_path, monkeypatch):
    storage = Storage(tmp_path)
    storage.write_partition("features", "market", "2024-01-02", _frame())
    before = storage.partition_file("features", "market", "2024-01-02").read_bytes()

    def half_written(table, sink, **kwargs):  # sink: the open temporary file
        sink.write(b"PAR1 half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage_module.pq, "write_table", half_written)
    with pytest.raises(
        StorageError, match=r"market/2024-01-02/part-0.parquet.*No space left on device"
    ):
        storage.write_partition("features", "market", "2024-01-02", _frame().head(1))
    folder = storage.partition_dir("features", "market", "2024-01-02")
    assert [p.name for p in folder.iterdir()] == ["part-0.parquet"]
    assert storage.partition_file("features", "market", "2024-01-02").read_bytes() == before


def test_permission_denied_names_the_path(tmp_path, monkeypatch):
    storage = Storage(tmp_path)

    def refuse(source, target):
        raise PermissionError(errno.EACCES, "Permission denied", str(target))

    monkeypatch.setattr(storage_module.os, "replace", refuse)
    with pytest.raises(
        StorageError, match=r"predictions/market/2024-01-02/part-0.parquet.*Permission denied"
    ):
        storage.write_partition("predictions", "market", "2024-01-02", _frame())
    assert storage.partition_dates("predictions", "market") == []
    assert list(storage.partition_dir("predictions", "market", "2024-01-02").iterdir()) == []
