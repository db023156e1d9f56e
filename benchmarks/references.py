"""The references finpipe races: what a user would write without finpipe, on the same data.

- `pandas_market_rules`: the market suite's rules written directly in pandas/numpy;
- `polars_market_features`: the market features in Polars (lazy scan, `.over("ticker")`
  windows, a partitioned Parquet sink), the fastest dataframe tool a user would reach for;
- `bare_training_loop`: a plain PyTorch loop over the same tensors, net, batch size, epochs;
- `bare_scoring`: pyarrow read, the same net's forward pass, pyarrow write.

Each reference computes what finpipe computes (the benchmark checks that the outputs agree),
without finpipe's guarantees: no atomic publish, no provenance, no reports.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from finpipe.market.features import (
    CROSS_SECTIONAL_RANKED,
    MACD_FAST_SPAN,
    MACD_SIGNAL_SPAN,
    MACD_SLOW_SPAN,
    MOVING_AVERAGE_WINDOWS,
    RETURN_WINDOWS,
    RSI_WINDOW,
    VOLATILITY_WINDOW,
    VOLUME_WINDOW,
    _ewma_weights,
    market_feature_columns,
)

# -- validation ------------------------------------------------------------------------------


def pandas_market_rules(batch: pd.DataFrame, as_of: pd.Timestamp) -> dict[str, int]:
    """Return rule id -> unexpected row count for the market suite, checked in plain pandas.

    Each rule of `expectations/market_ohlcv.json` is evaluated with a line of pandas/numpy
    (bounds read from the suite, so the two cannot drift apart); ids match
    `finpipe.validation.rule_id`, so counts compare with the GX report rule by rule. Rules on
    absent optional columns are skipped, as GX's are.
    """
    from finpipe.validation import expectation_columns, load_suite_spec, rule_id

    present = set(batch.columns)
    counts: dict[str, int] = {}
    for entry in load_suite_spec("market_ohlcv")["expectations"]:
        kind, kwargs, columns = entry["type"], entry["kwargs"], expectation_columns(entry)
        if kind != "expect_column_to_exist" and not set(columns) <= present:
            continue
        counts[rule_id(entry)] = _unexpected(batch, kind, kwargs, as_of)
    return counts


def _unexpected(batch: pd.DataFrame, kind: str, kwargs: dict, as_of: pd.Timestamp) -> int:
    if kind == "expect_column_to_exist":
        return int(kwargs["column"] not in batch.columns)
    if kind == "expect_table_row_count_to_be_between":
        return int(not kwargs["min_value"] <= len(batch) <= kwargs["max_value"])
    if kind == "expect_compound_columns_to_be_unique":
        return int(batch.duplicated(kwargs["column_list"], keep=False).sum())
    if kind == "expect_column_pair_values_a_to_be_greater_than_b":
        a = batch[kwargs["column_A"]].to_numpy(np.float64)
        b = batch[kwargs["column_B"]].to_numpy(np.float64)
        return int(np.count_nonzero(a < b if kwargs.get("or_equal") else a <= b))  # NaN: ignored
    column = batch[kwargs["column"]]
    if kind == "expect_column_values_to_not_be_null":
        return int(column.isna().sum())
    if kind == "expect_column_values_to_be_of_type":
        wanted = kwargs["type_"]
        if wanted == "str":
            return int(not pd.api.types.is_string_dtype(column))
        return int(str(column.dtype) != wanted)
    if kind == "expect_column_values_to_be_between":
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        low = as_of if isinstance(low, dict) else low  # {"$PARAMETER": "as_of"}
        high = as_of if isinstance(high, dict) else high
        values = column.to_numpy() if column.dtype.kind == "M" else column.to_numpy(np.float64)
        bad = np.zeros(len(values), dtype=bool)
        if low is not None:
            low = np.datetime64(low, "ns") if column.dtype.kind == "M" else low
            bad |= values <= low if kwargs.get("strict_min") else values < low
        if high is not None:
            high = np.datetime64(high, "ns") if column.dtype.kind == "M" else high
            bad |= values >= high if kwargs.get("strict_max") else values > high
        return int(np.count_nonzero(bad))  # NaN / NaT compare False: left to the not-null rules
    raise ValueError(f"the pandas reference has no rule for {kind}")


# -- features --------------------------------------------------------------------------------


def polars_market_features(validated_dir: Path, out_dir: Path) -> int:
    """Build the market features from every validated partition with Polars; return the rows.

    Same definitions as `finpipe.market.features` (price = adj_close when delivered; EMAs as
    truncated, renormalised windows of 2 x span rows; ranks per date); output one Parquet file
    per date under `out_dir/date=.../`, date and ticker included, float32 features.
    """
    import polars as pl

    from finpipe.storage import PARTITION_FILE

    # finpipe's layers: one bare-day folder per date, the day in the file's `date` column.
    scan = pl.scan_parquet(str(Path(validated_dir) / "*" / PARTITION_FILE), hive_partitioning=False)
    schema = scan.collect_schema()
    price = pl.col("adj_close" if "adj_close" in schema else "close")
    available = set(schema.names())

    def reversed_weights(span: int) -> list[float]:
        return _ewma_weights(span)[::-1].tolist()  # polars weights run oldest first

    change = price - price.shift(1)
    log_return = (price / price.shift(1)).log()
    fast = price.rolling_sum(2 * MACD_FAST_SPAN, weights=reversed_weights(MACD_FAST_SPAN))
    slow = price.rolling_sum(2 * MACD_SLOW_SPAN, weights=reversed_weights(MACD_SLOW_SPAN))
    macd = fast / slow - 1.0
    gains = change.clip(lower_bound=0.0).rolling_sum(RSI_WINDOW)
    losses = (-change).clip(lower_bound=0.0).rolling_sum(RSI_WINDOW)
    per_ticker = {
        **{f"return_{k}d": price / price.shift(k) - 1.0 for k in RETURN_WINDOWS},
        "volatility_20d": log_return.rolling_std(VOLATILITY_WINDOW),
        "rsi_14": pl.when(gains + losses == 0.0)
        .then(50.0)
        .otherwise(100.0 * gains / (gains + losses)),
        "macd": macd,
        # Polars' weighted windows refuse nulls: carry the warm-up rows as NaN, then back.
        "macd_signal": macd.fill_null(float("nan"))
        .rolling_sum(2 * MACD_SIGNAL_SPAN, weights=reversed_weights(MACD_SIGNAL_SPAN))
        .fill_nan(None),
        **{f"ma_ratio_{k}": price / price.rolling_mean(k) - 1.0 for k in MOVING_AVERAGE_WINDOWS},
    }
    if "volume" in available:
        log_volume = pl.col("volume").log1p()
        spread = log_volume.rolling_std(VOLUME_WINDOW)
        z = (log_volume - log_volume.rolling_mean(VOLUME_WINDOW)) / spread
        per_ticker["volume_z_20d"] = pl.when(spread < 1e-9).then(0.0).otherwise(z)
    same_day = {}
    if {"high", "low"} <= available:
        same_day["range_hl"] = (pl.col("high") - pl.col("low")) / pl.col("close")
    if "open" in available:
        same_day["return_oc"] = pl.col("close") / pl.col("open") - 1.0

    frame = scan.sort("ticker", "date").with_columns(
        *(expr.over("ticker").alias(name) for name, expr in per_ticker.items()),
        *(expr.alias(name) for name, expr in same_day.items()),
    )
    ranks = []
    for name in CROSS_SECTIONAL_RANKED:
        value = pl.col(name)
        count = value.count().over("date")
        pct = (value.rank("average").over("date") - 1.0) / (count - 1.0)
        ranks.append(
            pl.when((count == 1) & value.is_not_null())
            .then(0.5)
            .otherwise(pct)
            .alias(f"{name}_cs_rank")
        )
    names = market_feature_columns(available)
    result = (
        frame.with_columns(*ranks)
        .select("date", "ticker", *(pl.col(n).cast(pl.Float32) for n in names))
        .sort("date", "ticker")
    )
    table = result.collect()
    table.write_parquet(out_dir, partition_by="date", mkdir=True)
    return table.height


def compare_feature_outputs(
    finpipe_dir: Path, polars_dir: Path, days: list[dt.date], rtol: float = 1e-4, atol: float = 1e-5
) -> dict:
    """Return how finpipe's and the Polars reference's features agree on `days`.

    Keys: `equal` (every value within rtol/atol, NaN where NaN), `rows`, `max_abs_diff`,
    `worst_column`. Missing values (NaN or null) must be missing on both sides.
    """
    import polars as pl

    from finpipe.storage import PARTITION_FILE

    files = [str(Path(finpipe_dir) / d.isoformat() / PARTITION_FILE) for d in days]
    # Both sides' days as calendar days, whichever of date or datetime a writer stored.
    ours = pl.read_parquet(files).with_columns(pl.col("date").cast(pl.Date)).to_pandas()
    theirs = (
        pl.scan_parquet(str(Path(polars_dir) / "**" / "*.parquet"), hive_partitioning=False)
        .with_columns(pl.col("date").cast(pl.Date))
        .filter(pl.col("date").is_in(list(days)))
        .collect()
        .to_pandas()
    )
    keys = ["date", "ticker"]
    ours = ours.sort_values(keys).reset_index(drop=True)
    theirs = theirs.sort_values(keys).reset_index(drop=True)
    if (
        len(ours) != len(theirs)
        or not (
            ours["ticker"].astype(str).to_numpy() == theirs["ticker"].astype(str).to_numpy()
        ).all()
    ):
        return {"equal": False, "rows": [len(ours), len(theirs)], "reason": "different rows"}
    return compare_columns(ours, theirs, ours.columns.drop(keys), rtol, atol)


def compare_columns(
    ours: pd.DataFrame, theirs: pd.DataFrame, columns, rtol: float, atol: float
) -> dict:
    """Return how `columns` of two row-aligned frames agree: `equal`, `rows`, `max_abs_diff`,
    `worst_column`. Missing values (NaN or null) must be missing on both sides."""
    worst, worst_column, equal = 0.0, None, True
    for column in columns:
        a = ours[column].to_numpy(np.float64, na_value=np.nan)
        b = theirs[column].to_numpy(np.float64, na_value=np.nan)
        if not np.array_equal(np.isnan(a), np.isnan(b)):
            return {"equal": False, "rows": len(ours), "reason": f"{column}: NaN pattern differs"}
        both = ~np.isnan(a)
        diff = np.abs(a[both] - b[both])
        if diff.size and diff.max() > worst:
            worst, worst_column = float(diff.max()), column
        equal &= bool(np.allclose(a[both], b[both], rtol=rtol, atol=atol))
    return {"equal": equal, "rows": len(ours), "max_abs_diff": worst, "worst_column": worst_column}


# -- training ----------------------------------------------------------------------------------


def bare_training_loop(
    model: nn.Module,
    features: torch.Tensor,
    train_rows: torch.Tensor,
    train_targets: torch.Tensor,
    validation_rows: torch.Tensor,
    validation_targets: torch.Tensor,
    *,
    lookback: int,
    batch_size: int,
    epochs: int,
    learning_rate: float,
    weight_decay: float,
    seed: int,
) -> list[float]:
    """Train `model` in place the way a plain PyTorch script would; return validation losses.

    Inputs are `features[rows]` (MLP) or windows `features[rows - lookback + 1 .. rows]`; per
    epoch: shuffle, forward, MSE, backward, AdamW step, then the validation MSE.
    """
    torch.manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    offsets = torch.arange(1 - lookback, 1) if lookback else None

    def inputs(rows: torch.Tensor) -> torch.Tensor:
        return features[rows[:, None] + offsets] if lookback else features[rows]

    losses = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train_rows), generator=shuffle)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            loss = F.mse_loss(model(inputs(train_rows[index])), train_targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(validation_rows), 4 * batch_size):
                rows = validation_rows[start : start + 4 * batch_size]
                target = validation_targets[start : start + 4 * batch_size]
                total += float(F.mse_loss(model(inputs(rows)), target, reduction="sum"))
        losses.append(total / len(validation_rows))
    return losses


# -- scoring -----------------------------------------------------------------------------------


@dataclass
class BareModel:
    """A saved net as a plain script holds it: its metadata and the module in eval mode."""

    meta: dict
    config: object  # finpipe.training.TrainConfig
    net: nn.Module


def load_bare_model(model_dir: Path) -> BareModel:
    """Read `model.json` (scaler, features, config) and `weights.pt` as a script would."""
    from finpipe.nets import build_net
    from finpipe.training import TrainConfig

    meta = json.loads((Path(model_dir) / "model.json").read_text())
    config = TrainConfig.from_params(meta["config"])
    net = build_net(config, len(meta["feature_columns"]))
    net.load_state_dict(torch.load(Path(model_dir) / "weights.pt", weights_only=True))
    net.eval()
    return BareModel(meta=meta, config=config, net=net)


def bare_scoring(
    model: BareModel, feature_files: list[Path], as_of: dt.date, out_file: Path
) -> pa.Table:
    """Score `as_of` with a loaded net: pyarrow read, forward, pyarrow write.

    Windows each ticker's rows over `feature_files` and writes ticker + prediction for `as_of`.
    """
    meta, config, net = model.meta, model.config, model.net
    columns = meta["feature_columns"]
    table = pa.concat_tables(
        pq.read_table(f, columns=["date", "ticker", *columns]) for f in feature_files
    )
    table = table.take(pc.sort_indices(table, [("ticker", "ascending"), ("date", "ascending")]))
    scaler = meta["scaler"]
    x = np.column_stack([table[c].to_numpy(zero_copy_only=False) for c in scaler["columns"]])
    x = standardise(x, scaler)
    ticker = table["ticker"].to_numpy(zero_copy_only=False)
    today = table["date"].to_numpy(zero_copy_only=False) == np.datetime64(as_of, "ns")
    rows = np.flatnonzero(today)
    lookback = config.lookback if config.is_sequence else 0
    with torch.no_grad():
        if lookback:
            # Window of each as-of row: its ticker's previous rows, zero-padded at the start.
            offsets = np.arange(1 - lookback, 1)
            index = rows[:, None] + offsets
            first = np.searchsorted(ticker, ticker[rows], side="left")
            inside = index >= first[:, None]
            windows = np.where(inside[..., None], x[np.maximum(index, 0)], 0.0).astype(np.float32)
            scores = net(torch.from_numpy(windows)).numpy()
        else:
            scores = net(torch.from_numpy(x[rows])).numpy()
    prediction = scores.astype(np.float64) * meta["target_std"] + meta["target_mean"]
    out = pa.table({"ticker": table["ticker"].take(pa.array(rows)), "prediction": prediction})
    out_file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(out, out_file)
    return out


def standardise(x: np.ndarray, scaler: dict) -> np.ndarray:
    """Return `x` scaled with a saved scaler's mean and std, as float32, missing values at 0
    and everything clipped to [-5, 5] (as finpipe's `FeatureScaler.transform` does)."""
    x = (x.astype(np.float32) - np.float32(scaler["mean"])) / np.float32(scaler["std"])
    return np.clip(np.nan_to_num(x, nan=0.0, posinf=5.0, neginf=-5.0), -5.0, 5.0).astype(np.float32)
