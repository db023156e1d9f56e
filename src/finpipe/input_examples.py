"""Input examples for logged models that describe no real customer or applicant.

MLflow stores a logged model's input example beside it, in the artifact store, where anyone who
may read models may read it. For the domains whose rows are people (credit's loan applicants,
customers' bank customers) the example is therefore made up from the training rows' columns:
the same columns and dtypes, so the signature and `predict(model.input_example)` still work, but
ids that are no one's and values that are no one's row (`stand_in_example`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

STAND_IN_ROWS = 5
STAND_IN_ID = "example-{}"  # a string id column's values: example-1, example-2, ...


def stand_in_example(
    frame: pd.DataFrame, id_column: str, feature_columns: Sequence[str], rows: int = STAND_IN_ROWS
) -> pd.DataFrame:
    """Return `rows` made-up rows with `frame`'s id and feature columns, in their dtypes.

    Ids are `example-1`, `example-2`, ... (-1, -2, ... for a numeric id column). Row i holds each
    numeric feature's i-th of `rows` evenly spaced quantiles of `frame` (10% to 90% for five
    rows), rounded to two significant figures (and to a whole number in an integer column),
    and each other feature's most frequent value: every value is a statistic of many rows, and
    no row is any one person's (a column with no value at all stays missing). `frame` should
    hold the training rows only.
    """
    numbers = range(1, rows + 1)
    ids = frame[id_column]
    if pd.api.types.is_numeric_dtype(ids) and not pd.api.types.is_bool_dtype(ids):
        id_values = pd.Series([-n for n in numbers])
    else:
        id_values = pd.Series([STAND_IN_ID.format(n) for n in numbers])
    columns = {id_column: id_values.astype(ids.dtype)}
    levels = np.linspace(0.1, 0.9, rows)
    for column in feature_columns:
        values = frame[column]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            quantiles = pd.to_numeric(values, errors="coerce").astype("float64").quantile(levels)
            rounded = pd.Series([float(f"{q:.2g}") for q in quantiles])
            if pd.api.types.is_integer_dtype(values):  # 1.4 would not cast back to Int64
                rounded = rounded.round()
            columns[column] = rounded.astype(values.dtype)
        else:
            common = values.mode(dropna=True)
            value = common.iloc[0] if len(common) else None
            columns[column] = pd.Series([value] * rows).astype(values.dtype)
    return pd.DataFrame(columns)
