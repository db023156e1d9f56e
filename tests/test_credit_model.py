"""The PD model on its own: metrics, PSI, vocabulary, calibration, explanations, accuracy."""

from __future__ import annotations

import copy
import datetime as dt
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from finpipe.credit import crossval
from finpipe.credit.config import load_loan_book
from finpipe.credit.features import LABEL, build_credit_features
from finpipe.credit.metrics import (
    PSI_MODERATE,
    PSI_SIGNIFICANT,
    binned_shares,
    credit_metrics,
    psi,
    scoring_report,
)
from finpipe.credit.model import (
    FittedCreditModel,
    FitWindow,
    RowSplit,
    Vocabulary,
    fit_credit_model,
    fit_platt,
    format_value,
)
from finpipe.credit.pipeline import CreditTrainingConfig, split_rows
from finpipe.credit.schema import normalise_credit_frame
from finpipe.credit.synthetic import DRIVER, CreditSyntheticConfig, generate_loan_book
from finpipe.errors import ConfigError
from finpipe.promotion import ComparedOn
from finpipe.tracking import RegisteredModel

BOOK = load_loan_book("synthetic")


def test_true_log_odds_follow_the_documented_pd_function():
    """The module doc's formula, term by term, on three hand-made applications: delinquencies
    capped at 4 and doubled above 50% utilisation, a missing income, months employed capped."""
    from finpipe.credit.synthetic import true_log_odds

    book = pd.DataFrame(
        {
            "utilisation": [0.8, 0.5, 0.55],
            "debt_to_income": [0.45, 0.75, 0.2],
            "delinquencies_2y": [6.0, 1.0, 2.0],
            "age": [45.0, 60.0, 30.0],
            "income": [40_000.0, np.nan, 80_000.0],
            "months_employed": [200.0, 0.0, 60.0],
            "employment_type": ["salaried", "unemployed", "self_employed"],
            "purpose": ["car", "business", "education"],
            "housing": ["own", "rent", "mortgage"],
            "region": ["north", "south", "east"],
            "loan_amount": [1e4, 2e4, 3e4],
        }
    )
    by_hand = [
        -2.9 + 1.5 + 0.0 + 0.45 * 4 * 2 + 0.0 - 0.3 + 0.0 - 0.004 * 120 - 0.1 - 0.2 - 0.2,
        -2.9 + 0.0 + 1.2 * np.tanh(0.9) + 0.45 * 1 * 1 + 0.6 - 0.3 + 0.5 - 0.0 + 1.0 + 0.5 + 0.25,
        -2.9 + 0.0 + 1.2 * np.tanh(-0.75) + 0.45 * 2 * 2 + 0.6 - 0.3 - 0.35 * np.log(2.0)
        - 0.004 * 60 + 0.4 + 0.1 + 0.0,
    ]  # fmt: skip
    log_odds, driver = true_log_odds(book)
    np.testing.assert_allclose(log_odds, by_hand, rtol=1e-12)
    np.testing.assert_allclose(driver, [1.5, 0.0, 0.0])


def test_outcomes_are_drawn_from_the_true_pd_and_open_for_exactly_the_last_open_days():
    config = CreditSyntheticConfig(applications=2000, days=60, open_days=10, seed=1)
    generated = generate_loan_book(config)
    truth = generated.true_pd.set_index("loan_id").loc[generated.applications["loan_id"]]
    np.testing.assert_allclose(truth["true_pd"], 1 / (1 + np.exp(-truth["true_log_odds"])))
    first_open_day = pd.Timestamp(config.start) + pd.Timedelta(days=config.days - config.open_days)
    open_ = generated.applications["application_date"] >= first_open_day
    assert generated.applications["application_date"].eq(first_open_day).any()
    pd.testing.assert_series_equal(
        generated.applications["defaulted"].isna(), open_, check_names=False
    )


def test_credit_metrics_on_a_hand_checked_example():
    metrics = credit_metrics([0, 0, 1, 1, np.nan], [0.1, 0.4, 0.35, 0.8, 0.5])
    assert metrics["auc"] == pytest.approx(0.75)
    assert metrics["gini"] == pytest.approx(0.5)
    assert metrics["ks"] == pytest.approx(0.5)
    assert metrics["brier"] == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    assert metrics["log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.6, 0.35, 0.8])), rel=1e-9)
    assert (metrics["n"], metrics["default_rate"]) == (4, 0.5)
    assert np.isnan(credit_metrics([0, 0], [0.1, 0.2])["auc"])


def test_psi_values():
    assert psi([0.25] * 4, [0.25] * 4) == 0.0
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.4 * np.log(1.8) + 0.4 * np.log(5))
    assert np.isfinite(psi([0.5, 0.5, 0.0], [0.4, 0.4, 0.2]))  # empty bin floored


def test_binned_shares_are_right_closed_with_missing_values_in_a_last_bin_of_their_own():
    values = [1.0, 2.0, 2.0, 3.0, np.nan, 5.0, np.nan, np.inf, 0.5, 2.5]
    shares = binned_shares(values, [2.0, 3.0])  # (-inf, 2], (2, 3], (3, inf), missing
    assert shares == pytest.approx([0.4, 0.2, 0.1, 0.3])
    assert binned_shares([], [2.0]) == [0.0, 0.0, 0.0]


def test_grades_are_the_first_band_whose_max_pd_holds_the_pd_edges_included():
    bands = [("A", 0.02), ("B", 0.05), ("C", 0.1), ("D", 0.2), ("E", 0.4), ("F", 1.0)]
    graded = FittedCreditModel.grade(
        SimpleNamespace(grades=bands), np.array([0.0, 0.001, 0.02, 0.0201, 0.2, 0.5, 1.0])
    )
    assert graded.tolist() == ["A", "A", "A", "B", "D", "F", "F"]


def test_the_pd_is_the_platt_calibrated_sigmoid_of_the_logit():
    logits = np.array([-2.0, 0.0, 1.5])
    model = SimpleNamespace(calibration=(2.0, -1.0), _logits=lambda data: logits)
    expected = 1.0 / (1.0 + np.exp(-(2.0 * logits - 1.0)))
    np.testing.assert_allclose(FittedCreditModel._pd(model, None), expected)


def test_vocabulary_maps_unseen_and_missing_to_the_unknown_bucket():
    train = pd.DataFrame({"purpose": ["car", "car", "home", "boat"]})
    vocabulary = Vocabulary.fit(train, ["purpose"], min_count=2)
    assert vocabulary.categories == (("car",),)  # "home", "boat" too rare
    scored = pd.DataFrame({"purpose": pd.array(["car", " car ", "crypto", None], dtype="string")})
    assert vocabulary.transform(scored)[:, 0].tolist() == [1, 1, 0, 0]
    assert vocabulary.unseen(scored) == {"purpose": {"crypto": 1}}


def test_platt_scaling_recovers_the_true_calibration():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, 40_000)
    labels = rng.random(40_000) < 1 / (1 + np.exp(-(2.0 * logits - 1.0)))
    a, b = fit_platt(logits, labels)
    assert a == pytest.approx(2.0, abs=0.08) and b == pytest.approx(-1.0, abs=0.05)


def test_each_cross_validation_fold_trains_validates_and_tests_on_separate_loans(monkeypatch):
    """Validation loans (early stopping, calibration) are not trained on, nor test loans."""
    loans = pd.DataFrame({"loan_id": range(100), LABEL: [0.0, 1.0] * 50})
    folds = []

    class Scores:
        def __init__(self, train, validation):
            self.train, self.validation = train, validation

        def predict_pd(self, rows):
            folds.append((self.train, self.validation, rows.index.to_numpy()))
            return np.linspace(0.1, 0.9, len(rows))

    def fit(labelled, book, *, train, validation, config):
        return Scores(train, validation)

    monkeypatch.setattr(crossval, "fit_loan_book_model", fit)
    config = CreditTrainingConfig(models=["logistic"])
    scores = crossval.cross_validated_auc(loans, book=BOOK, config=config, folds=5)

    assert len(scores["logistic"]) == len(folds) == 5
    for train, validation, test in folds:
        assert not (train & validation).any()
        assert not (train[test] | validation[test]).any()
        assert train.sum() + validation.sum() + len(test) == 100  # every other loan is used
    assert sorted(np.concatenate([test for _, _, test in folds])) == list(range(100))


def _features(config: CreditSyntheticConfig) -> tuple[pd.DataFrame, object]:
    generated = generate_loan_book(config)
    features = build_credit_features(
        normalise_credit_frame(generated.applications, book=BOOK), BOOK
    )
    return features, generated


def _labelled_book(config: CreditSyntheticConfig, held_out: float):
    """The labelled loans of a synthetic book in date order, split out of time (`held_out` of
    them for validation and as many for test), and the generated book."""
    features, generated = _features(config)
    labelled = features[features[LABEL].notna()].sort_values(["date", "loan_id"])
    labelled = labelled.reset_index(drop=True)
    split = split_rows(
        labelled,
        id_column="loan_id",
        dated=True,
        validation_fraction=held_out,
        test_fraction=held_out,
        embargo_days=0,
        seed=0,
    )
    return labelled, split, generated


def _fit(
    frame: pd.DataFrame, split: RowSplit, config: CreditTrainingConfig, kind: str = "mlp"
) -> FittedCreditModel:
    return fit_credit_model(
        frame,
        id_column="loan_id",
        numeric_columns=BOOK.numeric_columns,
        categorical_columns=BOOK.categorical_columns,
        label=LABEL,
        train=split.train,
        validation=split.validation,
        grades=[(band.grade, band.max_pd) for band in BOOK.grades],
        config=config.classifier_config(kind),
        value_displays={name: column.display for name, column in BOOK.numeric.items()},
    )


@pytest.fixture(scope="module")
def fitted():
    """The network on the demo's synthetic book (30,000 applications, seed 7), out-of-time."""
    labelled, split, generated = _labelled_book(
        CreditSyntheticConfig(applications=30_000, seed=7), 0.15
    )
    return _fit(labelled, split, CreditTrainingConfig()), labelled, split, generated


@pytest.mark.slow
def test_network_test_auc_is_within_002_of_the_oracle(fitted):
    model, labelled, split, generated = fitted
    test = labelled[split.test]
    assert split.kind == "out_of_time"
    assert test["date"].min() > labelled.loc[split.validation, "date"].max()
    metrics = credit_metrics(test[LABEL], model.predict_pd(test))
    oracle = generated.oracle_auc(test["loan_id"])
    assert 0.76 < oracle < 0.82
    assert metrics["auc"] >= oracle - 0.02, (metrics["auc"], oracle)
    # Calibrated: the mean PD on the test rows is close to their default rate.
    assert model.predict_pd(test).mean() == pytest.approx(test[LABEL].mean(), abs=0.015)


@pytest.mark.slow
def test_the_logistic_baselines_category_effects_do_not_depend_on_its_seed():
    """The baseline is a logistic regression: a category's effect on the log-odds (the PD of
    every test loan given that category, against the same loans given the column's first
    category) is learnt from the loans, not left over from the random initial weights."""
    labelled, split, _ = _labelled_book(CreditSyntheticConfig(applications=12_000, seed=2), 0.15)
    test = labelled[split.test]
    effects = []
    for seed in (0, 1, 2):
        model = _fit(labelled, split, CreditTrainingConfig(seed=seed), "logistic")
        a, _ = model.calibration  # calibrated log-odds = a * logit + b
        seed_effects = []
        for column, values in zip(
            model.categorical_columns, model.vocabulary.categories, strict=True
        ):
            base = model.logits(test.assign(**{column: values[0]}))
            for value in values:
                given = model.logits(test.assign(**{column: value}))
                seed_effects.append(a * (given - base).mean())
        effects.append(seed_effects)
    spread = np.ptp(np.array(effects), axis=0)  # per category: largest minus smallest
    assert spread.max() < 0.15, spread.round(3)


def test_scaler_vocabulary_and_fit_read_the_training_loans_only():
    """Scaler, vocabulary, PSI reference and the net itself come from the training rows (and
    early stopping and calibration from the validation rows): distorting every test loan's
    values changes none of them."""
    labelled, split, _ = _labelled_book(CreditSyntheticConfig(applications=3_000, seed=3), 0.2)
    distorted = labelled.copy()
    test = split.test
    for column in BOOK.numeric_columns:
        distorted.loc[test, column] = pd.to_numeric(distorted.loc[test, column]) * 1000 + 7
    for column in BOOK.categorical_columns:
        distorted[column] = distorted[column].astype("string")
        distorted.loc[test, column] = "only_in_test"  # common enough for the vocabulary

    short = CreditTrainingConfig(max_epochs=2)
    fitted, refitted = _fit(labelled, split, short), _fit(distorted, split, short)
    assert test.sum() > 100
    assert refitted.scaler == fitted.scaler
    assert refitted.vocabulary == fitted.vocabulary
    assert "only_in_test" not in str(fitted.vocabulary.categories)
    assert refitted.population == fitted.population
    assert refitted.calibration == fitted.calibration
    assert refitted.reference_dense == fitted.reference_dense  # the embeddings' average too
    # the reasons' reference is the typical applicant with nothing missing
    numeric = len(BOOK.numeric_columns)
    assert fitted.reference_dense[:numeric] == [0.0] * numeric  # numerics at the training mean
    assert fitted.reference_dense[numeric : 2 * numeric] == [0.0] * numeric  # nothing missing
    train_rows = labelled[split.train]
    np.testing.assert_array_equal(refitted.predict_pd(train_rows), fitted.predict_pd(train_rows))


def test_a_scoring_report_says_which_populations_its_psi_compares_and_where_reasons_start():
    """PSI values and reason impacts are relative numbers: the night's report names both
    populations (the champion's training rows, their count and dates; tonight's loans) and the
    reference applicant whose PD the reasons measure from, the one their impacts add up to."""
    labelled, split, _ = _labelled_book(CreditSyntheticConfig(applications=1_500, seed=4), 0.2)
    model = _fit(labelled, split, CreditTrainingConfig(max_epochs=2))
    tonight = labelled[split.test].head(40)
    scored = model.predict(tonight)
    champion = RegisteredModel("finpipe-credit", "3", "run", model)

    report = scoring_report(dt.date(2024, 5, 2), champion, tonight, scored["pd"])

    train_dates = labelled.loc[split.train, "date"]
    assert report["population_stability_compares"] == {
        "expected": {
            "population": "training rows of finpipe-credit v3",
            "rows": int(split.train.sum()),
            "first_date": str(train_dates.min().date()),
            "last_date": str(train_dates.max().date()),
        },
        "actual": {"population": "loans scored on 2024-05-02", "rows": 40},
        "bins": (
            "deciles of the training rows' PD and of each numeric (plus a missing bin); each "
            "category of the training vocabulary (plus the unknown bucket)"
        ),
    }
    baseline = report["reason_codes_measured_from"]
    assert baseline["reference_pd"] == model.reference_pd()
    assert "log-odds" in baseline["impact_unit"]
    log_odds = lambda pd_values: np.log(pd_values / (1.0 - pd_values))  # noqa: E731
    gap = log_odds(scored["pd"].to_numpy()) - log_odds(baseline["reference_pd"])
    np.testing.assert_allclose(model.attributions(tonight).sum(axis=1), gap, atol=5e-3)


def test_an_out_of_time_split_purges_loans_whose_outcome_window_reaches_the_next_set():
    """A loan's label looks `outcome_window_days` ahead: no training loan's window may end
    after validation starts, nor a validation loan's after test starts (embargo on top)."""
    dates = pd.bdate_range("2019-01-01", "2022-12-30")
    loans = [f"L{i}" for i in range(2 * len(dates))]
    frame = pd.DataFrame({"date": np.repeat(dates, 2), "loan_id": loans})

    def split(window: int, **how) -> RowSplit:
        settings = {"validation_fraction": 0.3, "test_fraction": 0.2, "embargo_days": 0, **how}
        return split_rows(
            frame, id_column="loan_id", dated=True, seed=0, outcome_window_days=window, **settings
        )

    plain, purged = split(0), split(365)
    assert plain.kind == purged.kind == "out_of_time" and plain.purged == 0
    first_validation = frame.loc[plain.validation, "date"].min()
    first_test = frame.loc[plain.test, "date"].min()
    year = pd.Timedelta(days=365)
    kept_train, kept_validation = (
        frame.loc[purged.train, "date"],
        frame.loc[purged.validation, "date"],
    )
    assert kept_train.max() == first_validation - year  # the last whose window ends in time
    assert (kept_validation + year <= first_test).all() and len(kept_validation) > 0
    assert np.array_equal(purged.test, plain.test)
    dropped = (plain.train & ~purged.train) | (plain.validation & ~purged.validation)
    assert purged.purged == int(dropped.sum()) > 0
    assert not (purged.train & ~plain.train).any()  # only ever fewer loans
    embargoed, dates_only = split(365, embargo_days=5), split(0, embargo_days=5)
    first_validation = frame.loc[dates_only.validation, "date"].min()  # the embargo's windows
    assert frame.loc[embargoed.validation, "date"].min() == first_validation
    assert frame.loc[embargoed.train, "date"].max() == first_validation - year
    refused = r"every validation loan .*outcome_window_days = 365.*raise embargo_days"
    with pytest.raises(ConfigError, match=refused):
        split(365, validation_fraction=0.15, test_fraction=0.15)  # 7 months < the window


def test_a_loan_keeps_its_set_as_an_undated_book_grows():
    """Without dates, loans are split by a hash of the seed and the id: a later, larger
    snapshot (in another order) keeps each loan in its set, so the champion trained on the
    first is never tested on its own training loans; another seed draws other sets."""
    rng = np.random.default_rng(3)

    def book(n: int) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "date": pd.Timestamp("2024-03-01"),
                "loan_id": pd.array([f"L{i}" for i in range(n)], dtype="string"),
                LABEL: rng.integers(0, 2, n).astype(float),
            }
        )

    def sets(frame: pd.DataFrame, seed: int = 0) -> pd.Series:
        split = split_rows(
            frame,
            id_column="loan_id",
            dated=False,
            validation_fraction=0.15,
            test_fraction=0.15,
            embargo_days=0,
            seed=seed,
        )
        assert split.kind == "by_loan_id"
        role = np.select([split.test, split.validation], ["test", "validation"], "train")
        return pd.Series(role, index=frame["loan_id"].to_numpy())

    before, after = sets(book(1_000)), sets(book(1_200).sample(frac=1.0, random_state=1))
    assert after.reindex(before.index).equals(before)
    assert after.value_counts(normalize=True)["test"] == pytest.approx(0.15, abs=0.03)
    assert not sets(book(1_000), seed=1).equals(before)


def test_reason_codes_show_values_as_text_and_missing_values_as_missing():
    """Reason k is the k-th largest positive attribution; its value is the row's own, as
    text in its column's display (an amount with thousands separators, never 1.23457e+06),
    and "missing" for a missing number, a missing category or a blank one."""
    frame = pd.DataFrame(
        {
            "income": [52000.0, np.nan, 1234567.0],
            "purpose": pd.array(["car", None, " "], dtype="string"),
            "region": pd.Series(["north", None, "south"], dtype=object),
        },
        index=[10, 11, 12],
    )
    attributions = np.array([[0.5, 0.2, -0.1], [0.1, 0.3, 0.2], [0.7, 0.4, 0.0]])
    columns = SimpleNamespace(
        feature_columns=["income", "purpose", "region"], value_displays={"income": "amount"}
    )
    codes = FittedCreditModel.reason_codes(columns, frame, attributions)  # names and displays

    assert list(codes.index) == [10, 11, 12]
    names = codes[["reason_1", "reason_2", "reason_3"]].astype(object).where(codes.notna(), None)
    assert names.values.tolist() == [
        ["income", "purpose", None],
        ["purpose", "region", "income"],
        ["income", "purpose", None],
    ]
    values = codes[["reason_1_value", "reason_2_value", "reason_3_value"]].astype(object)
    assert values.where(values.notna(), None).values.tolist() == [
        ["52,000", "car", None],
        ["missing", "missing", "missing"],
        ["1,234,567", "missing", None],
    ]
    assert codes["reason_1_impact"].tolist() == [0.5, 0.3, 0.7]
    assert codes["reason_3_impact"].isna().tolist() == [True, False, True]


def test_a_fit_window_covers_exactly_what_its_model_trained_or_was_validated_on():
    """Out of time: every loan up to the last training or validation date; by loan id: the
    ids the hash put in training or validation, and none dated after the model."""
    labelled, split, _ = _labelled_book(CreditSyntheticConfig(applications=3000, seed=3), 0.15)
    fit = split.train | split.validation
    window = FitWindow.of(
        labelled, split, dated=True, validation_fraction=0.15, test_fraction=0.15, seed=0
    )
    covered = window.covers(labelled, "loan_id")
    assert covered[fit].all() and not covered[split.test].any()
    assert window.last_date == str(labelled.loc[fit, "date"].max().date())

    early = labelled[labelled["date"] <= labelled["date"].min() + pd.Timedelta(days=5)]
    by_id = split_rows(
        early,
        id_column="loan_id",
        dated=True,
        validation_fraction=0.15,
        test_fraction=0.15,
        embargo_days=0,
        seed=4,
    )
    assert by_id.kind == "by_loan_id"
    window = FitWindow.of(
        early, by_id, dated=True, validation_fraction=0.15, test_fraction=0.15, seed=4
    )
    covered = window.covers(labelled, "loan_id")
    in_early = labelled["loan_id"].isin(early["loan_id"]).to_numpy()
    assert covered[in_early].sum() == (by_id.train | by_id.validation).sum()
    assert not covered[~in_early].any()  # loans after the model's time: never its own


def test_a_fit_window_out_of_time_covers_the_models_embargo_and_purged_loans():
    """A champion split out of time with a 20-date embargo and a 30-day outcome window: the
    loans dated in its embargo and those purged from its validation set were not learnt from,
    but its validation defaults, settled up to its first test date, overlap their outcome
    windows (which is why its own split held them out of its test set). A later night's
    challenger tested on those dates must not judge the champion on them: the window covers
    every loan before the champion's first test date, and none from it on (it covered only up
    to the last training or validation date, leaving the embargo's loans to judge it on)."""
    labelled, _, _ = _labelled_book(CreditSyntheticConfig(applications=3000, seed=3), 0.15)
    split = split_rows(
        labelled,
        id_column="loan_id",
        dated=True,
        validation_fraction=0.15,
        test_fraction=0.15,
        embargo_days=20,
        seed=0,
        outcome_window_days=30,
    )
    assert split.kind == "out_of_time" and split.purged > 0
    dates = labelled["date"]
    first_test = dates[split.test].min()
    gap = (dates > dates[split.train | split.validation].max()) & (dates < first_test)
    assert gap.sum() > 0  # the embargo's and the purged loans: the case the window must cover
    window = FitWindow.of(
        labelled, split, dated=True, validation_fraction=0.15, test_fraction=0.15, seed=0
    )
    covered = window.covers(labelled, "loan_id")
    assert covered.tolist() == (dates < first_test).tolist()


def test_promotion_never_judges_the_champion_on_loans_it_trained_on(monkeypatch):
    """A champion trained with 5% test and 5% validation dates, a challenger split tonight
    with 30% test dates: most of tonight's test loans were the champion's training or
    validation loans. Both models are scored on the same rows, none of them the champion's."""
    from finpipe.credit import pipeline
    from finpipe.credit.contract import credit_contract

    labelled, champion_split, _ = _labelled_book(
        CreditSyntheticConfig(applications=3000, seed=3), 0.05
    )
    monkeypatch.setattr(pipeline, "load_training_frame", lambda storage, book, as_of: labelled)
    tonight = pipeline.split_book_rows(labelled, BOOK, CreditTrainingConfig(test_fraction=0.3))
    test = labelled[tonight.test]
    outcome = pipeline.CreditTrainingOutcome(
        run_id="r",
        as_of=str(labelled["date"].max().date()),
        candidate="mlp",
        challenger_version="2",
        promotion_metric="auc",
        metrics={},
        seconds=0.0,
        split=tonight.kind,
        validation_fraction=0.15,
        test_fraction=0.3,
        embargo_days=0,
        seed=0,
        test_rows=len(test),
        test_start="",
        test_end="",
        train_rows=0,
        first_date="",
        last_date="",
    )
    champion_fit = labelled.loc[champion_split.train | champion_split.validation, "loan_id"]
    asked: dict[str, set[str]] = {}

    def model(version: str, window: FitWindow | None) -> RegisteredModel:
        def predict_pd(rows: pd.DataFrame) -> np.ndarray:
            asked[version] = set(rows["loan_id"])
            return rows["utilisation"].to_numpy()

        return RegisteredModel(
            "m", version, "r", SimpleNamespace(predict_pd=predict_pd, fit_window=window)
        )

    window = FitWindow.of(
        labelled, champion_split, dated=True, validation_fraction=0.05, test_fraction=0.05, seed=0
    )
    champion = model("1", window)
    parts = pipeline.CreditParts(book=BOOK, contract=credit_contract(BOOK), update_features=None)
    score = parts.promotion_scorer(None, outcome, lambda: champion)
    assert np.isfinite(score(model("2", None))) and np.isfinite(score(champion))

    overlap = set(test["loan_id"]) & set(champion_fit)
    assert len(overlap) > 0.5 * len(test)  # the settings change the bug needs
    assert asked["1"] == asked["2"] == set(test["loan_id"]) - set(champion_fit)
    left_out = len(test) - len(asked["1"])  # and the decision's reason says how many
    assert score.compared_on() == ComparedOn(len(asked["1"]), len(test), "test loan")
    assert f"({left_out:,} left out: champion v1 learnt" in score.compared_on().describe("1")


def test_comparison_rows_without_a_champion_window_or_with_nothing_left_say_so(caplog):
    """A champion saved before finpipe recorded fit windows is compared on every test loan,
    with a warning; one that learnt from every test loan leaves none, and the warning says
    the challenger cannot be measured (both then score NaN, which is never promoted)."""
    import logging

    from finpipe.credit.pipeline import comparison_rows

    labelled, split, _ = _labelled_book(CreditSyntheticConfig(applications=600, seed=3), 0.15)
    test = labelled[split.test].reset_index(drop=True)

    def champion(window: FitWindow | None) -> RegisteredModel:
        return RegisteredModel("m", "1", "r", SimpleNamespace(fit_window=window))

    assert comparison_rows(test, None, "loan_id") is test
    with caplog.at_level(logging.WARNING, "finpipe.credit"):
        kept = comparison_rows(test, champion(None), "loan_id")
    assert len(kept) == len(test)
    assert "champion v1 records no training window" in caplog.text
    caplog.clear()
    later = str(labelled["date"].max().date())
    everything = FitWindow("out_of_time", later, 0.15, 0.15, 0)
    with caplog.at_level(logging.WARNING, "finpipe.credit"):
        left = comparison_rows(test, champion(everything), "loan_id")
    assert left.empty
    assert f"{len(test)} of {len(test)} test loans left out" in caplog.text
    assert "the challenger cannot be measured and is not promoted" in caplog.text
    assert np.isnan(credit_metrics(left[LABEL].to_numpy(), np.array([]))["auc"])


@pytest.mark.parametrize(
    ("value", "display", "shown"),
    [
        (1234567.0, "amount", "1,234,567"),
        (34000.4, "amount", "34,000"),
        (12.5, "amount", "12.5"),
        (0.8734, "percent", "87.3%"),
        (0.000012, "percent", "0.0012%"),
        (1.5, "percent", "150%"),
        (0.000012, "number", "0.000012"),
        (34000.0, "number", "34,000"),
        (1234567.0, "number", "1,234,567"),
        (0.4567891, "number", "0.4568"),
        (45.0, "number", "45"),
        (-2.5, "number", "-2.5"),
        (0.0, "number", "0"),
        (1e-9, "number", "0"),
    ],
)
def test_reason_values_read_as_amounts_rates_and_numbers_never_exponents(value, display, shown):
    assert format_value(value, display) == shown


def test_reason_value_displays_come_from_the_loan_book():
    """The synthetic book shows incomes as amounts and utilisation as a percentage."""
    displays = {name: column.display for name, column in BOOK.numeric.items()}
    assert displays["income"] == "amount" and displays["utilisation"] == "percent"
    assert displays["age"] == "number"


@pytest.mark.slow
def test_reason_codes_point_at_the_planted_driver(fitted):
    model, labelled, split, generated = fitted
    test = labelled[split.test].reset_index(drop=True)
    scored = model.predict(test)
    truth = generated.true_pd.set_index("loan_id").loc[test["loan_id"]].reset_index()
    driven = (truth["driver_log_odds"] >= 2.0).to_numpy()  # utilisation >= 0.87
    assert driven.sum() >= 30
    assert (scored.loc[driven, "reason_1"] == DRIVER).mean() >= 0.85
    top_three = scored[["reason_1", "reason_2", "reason_3"]].eq(DRIVER).any(axis=1)
    assert top_three[driven].all()
    low = test["utilisation"].to_numpy() < 0.4
    assert (scored.loc[low, "reason_1"] == DRIVER).mean() < 0.15
    row = scored.loc[np.flatnonzero(driven)[0]]
    utilisation = test.loc[np.flatnonzero(driven)[0], DRIVER]
    assert row["reason_1_value"] == format_value(utilisation, "percent")  # e.g. 91.2%
    impacts = scored[["reason_1_impact", "reason_2_impact", "reason_3_impact"]].to_numpy()
    assert (np.nan_to_num(impacts[:, 0]) >= np.nan_to_num(impacts[:, 1])).all()
    assert (impacts[np.isfinite(impacts)] > 0).all()


@pytest.mark.slow
def test_attributions_add_up_to_the_log_odds_gap_to_the_reference(fitted):
    model, labelled, split, _ = fitted
    rows = labelled[split.test].head(300)
    attributions = model.attributions(rows)
    with torch.no_grad():
        reference = model.net.logit_of_dense(torch.tensor([model.reference_dense])).item()
    gap = model.calibration[0] * (model.logits(rows) - reference)
    np.testing.assert_allclose(attributions.sum(axis=1), gap, atol=5e-3)
    # the reference's PD (logged as reference_pd) is where the reasons measure from
    log_odds = lambda pd_values: np.log(pd_values / (1.0 - pd_values))  # noqa: E731
    from_reference = log_odds(model.predict_pd(rows)) - log_odds(model.reference_pd())
    np.testing.assert_allclose(attributions.sum(axis=1), from_reference, atol=5e-3)


@pytest.mark.slow
def test_attributions_match_integrated_gradients_taken_one_step_at_a_time(fitted):
    model, labelled, split, _ = fitted
    rows = labelled[split.test].head(7)
    data = model.inputs(rows)
    with torch.no_grad():
        dense = model.net.dense(data.numeric, data.missing, data.categories)
    reference = torch.tensor(model.reference_dense, dtype=torch.float32)
    gradient_sum = torch.zeros_like(dense)
    for step in range(model.ig_steps):
        alpha = (step + 0.5) / model.ig_steps
        point = (reference + alpha * (dense - reference)).requires_grad_(True)
        model.net.logit_of_dense(point).sum().backward()
        gradient_sum += point.grad
    per_input = ((dense - reference) * gradient_sum / model.ig_steps).numpy()
    expected = np.column_stack(
        [per_input[:, positions].sum(axis=1) for positions in model.net.feature_slices()]
    )
    # three rows per pass: the last pass is a partial one
    np.testing.assert_allclose(
        model.attributions(rows, rows_per_pass=3), model.calibration[0] * expected, atol=1e-6
    )


@pytest.mark.slow
def test_unseen_categories_are_scored_through_the_unknown_bucket(fitted):
    model, labelled, split, _ = fitted
    rows = labelled[split.test].head(3).copy()
    rows["purpose"] = pd.array(["crypto", "zzz", None], dtype="string")
    rows["region"] = pd.array(["north", "north", "mars"], dtype="string")
    scored = model.predict(rows)
    assert scored["pd"].between(0, 1).all() and scored["grade"].notna().all()
    assert model.unseen_categories(rows) == {
        "purpose": {"crypto": 1, "zzz": 1},
        "region": {"mars": 1},
    }
    same = rows.copy()
    same["purpose"] = pd.array(["other_unseen", "x", None], dtype="string")
    np.testing.assert_allclose(model.predict_pd(same), scored["pd"].to_numpy())


@pytest.mark.slow
def test_psi_flags_a_shifted_population_only(fitted):
    model, *_ = fitted
    same, _ = _features(CreditSyntheticConfig(applications=4000, seed=11))
    shifted, _ = _features(CreditSyntheticConfig(applications=4000, seed=11, shift=1.0))
    stable = model.population_stability(same)
    assert set(stable) == {"score", *BOOK.feature_columns}
    assert max(stable.values()) < PSI_MODERATE
    drift = model.population_stability(shifted)
    assert drift["score"] > PSI_SIGNIFICANT and drift[DRIVER] > PSI_SIGNIFICANT
    assert drift["region"] < PSI_MODERATE and drift["age"] < PSI_MODERATE


@pytest.mark.slow
def test_saved_model_scores_identically(fitted, tmp_path):
    model, labelled, split, _ = fitted
    rows = labelled[split.test].head(50)
    model = copy.copy(model)  # the fixture's, with the fit window a night records
    model.fit_window = FitWindow.of(
        labelled, split, dated=True, validation_fraction=0.15, test_fraction=0.15, seed=0
    )
    model.save(tmp_path / "model")
    loaded = FittedCreditModel.load(tmp_path / "model")
    pd.testing.assert_frame_equal(model.predict(rows), loaded.predict(rows))
    assert loaded.value_displays == model.value_displays
    assert loaded.fit_window == model.fit_window and loaded.fit_window is not None
    assert model.value_displays["loan_amount"] == "amount"
    assert loaded.grades == [(band.grade, band.max_pd) for band in BOOK.grades]
