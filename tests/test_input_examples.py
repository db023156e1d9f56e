"""Input examples that describe no one: made-up rows with the training rows' columns and dtypes."""

from __future__ import annotations

import numpy as np
import pandas as pd

from finpipe.input_examples import stand_in_example


def _applicants(rows: int = 101) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    return pd.DataFrame(
        {
            "loan_id": pd.array([f"L{i:05d}" for i in range(rows)], dtype="string"),
            "age": rng.integers(18, 90, rows).astype("int64"),
            "income": rng.lognormal(10.5, 0.6, rows),
            "utilisation": rng.uniform(0, 1, rows).astype("float32"),
            "months_employed": pd.array(
                [None if i % 10 == 0 else i for i in range(rows)], dtype="Int64"
            ),
            "region": pd.array(["north"] * 60 + ["south"] * (rows - 60), dtype="string"),
            "missing_always": np.full(rows, np.nan),
        }
    )


FEATURES = ["age", "income", "utilisation", "months_employed", "region", "missing_always"]


def test_the_example_keeps_columns_and_dtypes_but_holds_no_real_id_or_row():
    book = _applicants()
    example = stand_in_example(book, "loan_id", FEATURES)
    assert list(example.columns) == ["loan_id", *FEATURES]
    assert example.dtypes.to_dict() == book[["loan_id", *FEATURES]].dtypes.to_dict()
    assert example["loan_id"].tolist() == [f"example-{n}" for n in range(1, 6)]
    assert not set(example["loan_id"]) & set(book["loan_id"])
    # No made-up row is an applicant of the book.
    real = set(map(tuple, book[FEATURES[:4]].astype("float64").to_numpy()))
    assert not set(map(tuple, example[FEATURES[:4]].astype("float64").to_numpy())) & real


def test_numeric_features_are_rounded_spread_quantiles_and_the_others_the_commonest_value():
    book = _applicants()
    example = stand_in_example(book, "loan_id", FEATURES)
    levels = [0.1, 0.3, 0.5, 0.7, 0.9]
    income = book["income"].quantile(levels)
    assert example["income"].tolist() == [float(f"{q:.2g}") for q in income]
    assert example["months_employed"].tolist() == [
        int(float(f"{q:.2g}")) for q in book["months_employed"].astype("float64").quantile(levels)
    ]
    assert example["income"].is_monotonic_increasing
    assert (example["region"] == "north").all()
    assert example["missing_always"].isna().all()


def test_a_numeric_id_column_gets_negative_ids_no_book_uses():
    book = _applicants().assign(loan_id=np.arange(101, dtype="int64"))
    example = stand_in_example(book, "loan_id", ["age"], rows=3)
    assert example["loan_id"].tolist() == [-1, -2, -3] and example["loan_id"].dtype == "int64"
    assert len(example) == 3


def test_an_integer_feature_with_small_values_keeps_whole_numbers_in_its_own_dtype():
    """Two significant figures of a quantile of 0..9 can be 1.4, which a nullable Int64
    column refuses ("cannot safely cast non-equivalent float64 to int64"): a user's book with
    such a column failed its night after the fit. Integer columns take whole numbers."""
    frame = pd.DataFrame(
        {
            "loan_id": [f"L{i}" for i in range(10)],
            "dependants": pd.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], dtype="Int64"),
            "years": np.arange(10, dtype=np.int64),
        }
    )
    example = stand_in_example(frame, "loan_id", ["dependants", "years"])
    assert str(example["dependants"].dtype) == "Int64" and example["years"].dtype == np.int64
    assert example["dependants"].tolist() == example["years"].tolist() == [1, 3, 4, 6, 8]
