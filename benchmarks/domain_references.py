"""The references finpipe's credit and customers steps race: what a user would write without
finpipe, on the same data (the market's are in `benchmarks.references`).

- `pandas_suite_rules`: any credit or customers suite's rules checked in plain pandas/numpy;
- `bare_classifier_loop`: the credit PD net trained by a plain PyTorch loop;
- `bare_credit_scoring`: with the net `load_credit_net` read once, pyarrow read, the same net's
  PD, grade and integrated-gradient reason codes, pyarrow write;
- `polars_customer_features`: the customers RFM snapshot in Polars;
- `bare_segment_scoring`: with the encoder `load_segment_net` read once, pyarrow read, the
  same encoder, nearest centroid, pyarrow write.

Each computes what finpipe computes (the benchmark checks that the outputs agree), without
finpipe's guarantees: no atomic publish, no provenance, no reports.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.references import compare_columns, standardise

# The nets' classes are imported with this module, before any clock starts: finpipe's side has
# its domain modules imported too, so neither side's timing holds module imports.
from finpipe.credit.model import TabularNet
from finpipe.customers.model import SegmentAutoencoder

# -- validation ------------------------------------------------------------------------------


def pandas_suite_rules(batch: pd.DataFrame, spec: dict, as_of: pd.Timestamp) -> dict[str, dict]:
    """Return rule id -> {"unexpected": rows, "success": verdict} for a suite, in plain pandas.

    Covers the rule types of the credit and customers suites. Column-map rules ignore missing
    values and honour `mostly` as GX does (share of the non-missing values that must pass);
    table and aggregate rules (row count, type, mean) report 0 unexpected rows and a verdict.
    Rules on absent columns are skipped, as GX's are.
    """
    from finpipe.validation import expectation_columns, rule_id

    present = set(batch.columns)
    verdicts: dict[str, dict] = {}
    for entry in spec["expectations"]:
        kind, kwargs = entry["type"], entry["kwargs"]
        if kind != "expect_column_to_exist" and not set(expectation_columns(entry)) <= present:
            continue
        unexpected, success = _rule(batch, kind, kwargs, as_of)
        verdicts[rule_id(entry)] = {"unexpected": int(unexpected), "success": bool(success)}
    return verdicts


def _rule(batch: pd.DataFrame, kind: str, kwargs: dict, as_of: pd.Timestamp) -> tuple[int, bool]:
    if kind == "expect_column_to_exist":
        return 0, kwargs["column"] in batch.columns
    if kind == "expect_table_row_count_to_be_between":
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        return 0, (low is None or len(batch) >= low) and (high is None or len(batch) <= high)
    column = batch[kwargs["column"]]
    if kind == "expect_column_values_to_be_of_type":
        wanted = kwargs["type_"]
        ok = (
            pd.api.types.is_string_dtype(column) if wanted == "str" else str(column.dtype) == wanted
        )
        return 0, ok
    if kind == "expect_column_mean_to_be_between":
        mean = column.astype("float64").mean()
        return 0, kwargs["min_value"] <= mean <= kwargs["max_value"]
    if kind == "expect_column_values_to_not_be_null":
        missing = int(column.isna().sum())
        return missing, missing == 0
    if kind == "expect_column_values_to_be_null":
        present = int(column.notna().sum())
        return present, present == 0
    values = column.dropna()
    if kind == "expect_column_values_to_be_unique":
        bad = int(values.duplicated(keep=False).sum())  # every copy of a repeated value counts
    elif kind == "expect_column_values_to_be_in_set":
        bad = int((~values.astype(str).isin([str(v) for v in kwargs["value_set"]])).sum())
    elif kind == "expect_column_values_to_match_regex":
        pattern = re.compile(kwargs["regex"])
        bad = int((~values.astype(str).map(lambda v: bool(pattern.search(v)))).sum())
    elif kind == "expect_column_values_to_be_between":
        bad = _outside(values, kwargs, as_of)
    else:
        raise ValueError(f"the pandas reference has no rule for {kind}")
    mostly = kwargs.get("mostly", 1.0)
    return bad, bad == 0 or (len(values) > 0 and (len(values) - bad) / len(values) >= mostly)


def _outside(values: pd.Series, kwargs: dict, as_of: pd.Timestamp) -> int:
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    low = as_of if isinstance(low, dict) else low  # {"$PARAMETER": "as_of"}
    high = as_of if isinstance(high, dict) else high
    dated = values.dtype.kind == "M"
    array = values.to_numpy() if dated else values.to_numpy(np.float64)
    bad = np.zeros(len(array), dtype=bool)
    if low is not None:
        low = np.datetime64(low, "ns") if dated else low
        bad |= array <= low if kwargs.get("strict_min") else array < low
    if high is not None:
        high = np.datetime64(high, "ns") if dated else high
        bad |= array >= high if kwargs.get("strict_max") else array > high
    return int(np.count_nonzero(bad))


# -- credit training -------------------------------------------------------------------------


def bare_classifier_loop(
    net: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    validation: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    batch_size: int,
    epochs: int,
    learning_rate: float,
    weight_decay: float,
    unknown_rate: float,
    seed: int,
) -> list[float]:
    """Train the PD net in place the way a plain PyTorch script would; return validation losses.

    `train` and `validation` are (numeric, missing, categories, labels). Per epoch: shuffle,
    blank `unknown_rate` of the categories to the unknown index, forward, class-weighted BCE,
    backward, AdamW step; then the validation loss with the same weighting.
    """
    numeric, missing, categories, labels = train
    positives = float(labels.sum())
    pos_weight = torch.tensor((len(labels) - positives) / positives)
    torch.manual_seed(seed)  # dropout masks
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=weight_decay)
    losses = []
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            blank = torch.rand(categories[index].shape, generator=generator) < unknown_rate
            logit = net(numeric[index], missing[index], categories[index].masked_fill(blank, 0))
            loss = F.binary_cross_entropy_with_logits(logit, labels[index], pos_weight=pos_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        net.eval()
        total = 0.0
        with torch.no_grad():
            for start in range(0, len(validation[3]), 8192):
                part = [t[start : start + 8192] for t in validation]
                total += float(
                    F.binary_cross_entropy_with_logits(
                        net(*part[:3]), part[3], pos_weight=pos_weight, reduction="sum"
                    )
                )
        losses.append(total / len(validation[3]))
    return losses


# -- scoring ---------------------------------------------------------------------------------


@dataclass
class SavedNet:
    """A saved net as a plain script holds it: its `model.json` and the module in eval mode."""

    meta: dict
    net: nn.Module


def load_saved_net(model_dir: Path, build: Callable[[dict], nn.Module]) -> SavedNet:
    """Read `model.json`, build the module from it and load `weights.pt`, as a script would."""
    meta = json.loads((Path(model_dir) / "model.json").read_text())
    net = build(meta)
    net.load_state_dict(torch.load(Path(model_dir) / "weights.pt", weights_only=True))
    net.eval()
    return SavedNet(meta=meta, net=net)


def load_credit_net(model_dir: Path) -> SavedNet:
    """Return the credit PD net saved in `model_dir` with its metadata."""
    return load_saved_net(model_dir, lambda meta: TabularNet(**meta["architecture"]))


def load_segment_net(model_dir: Path) -> SavedNet:
    """Return the customers segment autoencoder saved in `model_dir` with its metadata."""

    def build(meta: dict) -> nn.Module:
        sizes = {k: int(v) for k, v in meta["architecture"].items()}
        return SegmentAutoencoder(len(meta["feature_columns"]), **sizes)

    return load_saved_net(model_dir, build)


# -- credit scoring --------------------------------------------------------------------------


def bare_credit_scoring(model: SavedNet, feature_files: list[Path], out_file: Path) -> pa.Table:
    """Score the applications without an outcome in `feature_files` with a loaded PD net.

    Writes id, PD (Platt-calibrated logit), grade and the three largest positive
    integrated-gradient attributions (feature and log-odds impact) per application. Returns the
    written table.
    """
    meta, net = model.meta, model.net
    numeric_columns, categorical_columns = meta["numeric_columns"], meta["categorical_columns"]
    wanted = ["date", meta["id_column"], *numeric_columns, *categorical_columns]
    table = ds.dataset([str(f) for f in feature_files], format="parquet").to_table(
        columns=wanted, filter=pc.field("default_flag").is_null(nan_is_null=True)
    )
    raw = np.column_stack(
        [table[c].to_numpy(zero_copy_only=False).astype(np.float32) for c in numeric_columns]
    )
    scaled = standardise(raw, meta["scaler"])
    missing = np.isnan(raw).astype(np.float32)
    codes = np.column_stack(
        [
            pd.Index(values).get_indexer(table[c].to_numpy(zero_copy_only=False)) + 1
            for c, values in zip(categorical_columns, meta["vocabulary"]["categories"], strict=True)
        ]
    ).astype(np.int64)
    inputs = (torch.from_numpy(scaled), torch.from_numpy(missing), torch.from_numpy(codes))
    a, b = meta["calibration"]
    with torch.no_grad():
        logits = torch.cat(
            [net(*(t[s : s + 8192] for t in inputs)) for s in range(0, len(codes), 8192)]
        ).numpy()
    pd_values = 1.0 / (1.0 + np.exp(-np.clip(a * logits.astype(np.float64) + b, -35, 35)))
    bounds = np.asarray([bound for _, bound in meta["grades"]])
    grades = np.asarray([grade for grade, _ in meta["grades"]], dtype=object)
    grade = grades[np.minimum(np.searchsorted(bounds, np.clip(pd_values, 0, 1)), len(grades) - 1)]
    attributions = _integrated_gradients(net, inputs, meta["reference_dense"], meta["ig_steps"]) * a
    features = np.asarray([*numeric_columns, *categorical_columns], dtype=object)
    order = np.argsort(-attributions, axis=1, kind="stable")[:, :3]
    top = np.take_along_axis(attributions, order, axis=1)
    columns = {
        "id": table[meta["id_column"]],
        "pd": pa.array(pd_values),
        "grade": pa.array(grade.tolist(), pa.string()),
    }
    for k in range(3):
        positive = top[:, k] > 0
        columns[f"reason_{k + 1}"] = pa.array(np.where(positive, features[order[:, k]], None))
        columns[f"reason_{k + 1}_impact"] = pa.array(np.where(positive, top[:, k], np.nan))
    out = pa.table(columns)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(out, out_file)
    return out


def _integrated_gradients(net, inputs, reference: list[float], steps: int) -> np.ndarray:
    """Return [N, features] attributions of the logit from `reference` (midpoint rule)."""
    reference_t = torch.tensor(reference, dtype=torch.float32)
    slices = net.feature_slices()
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    out = np.zeros((len(inputs[0]), len(slices)))
    for start in range(0, len(inputs[0]), 1024):
        with torch.no_grad():
            dense = net.dense(*(t[start : start + 1024] for t in inputs))
        delta = dense - reference_t
        gradients = torch.zeros_like(dense)
        for alpha in alphas:
            point = (reference_t + alpha * delta).requires_grad_(True)
            (gradient,) = torch.autograd.grad(net.logit_of_dense(point).sum(), point)
            gradients += gradient
        per_input = (delta * gradients / steps).numpy()
        for j, positions in enumerate(slices):
            out[start : start + len(dense), j] = per_input[:, positions].sum(axis=1)
    return out


# -- customers features ----------------------------------------------------------------------


def polars_customer_features(
    validated_dir: Path, as_of: pd.Timestamp, active_days: int, out_file: Path
) -> int:
    """Build the snapshot at `as_of` from every validated partition with Polars; return its rows.

    Same definitions as `finpipe.customers.features` (stated there): one row per customer whose
    last purchase is at most `active_days` before `as_of`, sorted by customer_id.
    """
    import polars as pl

    from finpipe.customers.features import BASE_FEATURES, TREND_DAYS, mix_feature_name
    from finpipe.storage import PARTITION_FILE

    t = pl.lit(as_of.to_datetime64()).cast(pl.Datetime("ns"))
    # finpipe's layers: one bare-day folder per date, the day stored as a calendar date.
    scan = (
        pl.scan_parquet(str(Path(validated_dir) / "*" / PARTITION_FILE), hive_partitioning=False)
        .with_columns(pl.col("date").cast(pl.Datetime("ns")))
        .filter(pl.col("date") <= t)
    )
    names = scan.collect_schema().names()
    mixes = [c for c in ("category", "channel") if c in names]
    values = (
        scan.select(pl.col(c).fill_null("unknown").unique().implode() for c in mixes).collect()
        if mixes
        else None
    )
    age = (t - pl.col("date")).dt.total_days()
    recent = age < TREND_DAYS
    previous = (age >= TREND_DAYS) & (age < 2 * TREND_DAYS)
    gaps = pl.col("date").unique().sort().diff().dt.total_days().cast(pl.Float64)
    shares = [
        (pl.col(c).fill_null("unknown") == v).mean().alias(mix_feature_name(c, v))
        for c in mixes
        for v in sorted(values[c][0].to_list(), key=lambda v: mix_feature_name(c, v))
    ]
    frame = (
        scan.group_by("customer_id")
        .agg(
            (t - pl.col("date").max()).dt.total_days().cast(pl.Float64).alias("recency_days"),
            (t - pl.col("date").min()).dt.total_days().cast(pl.Float64).alias("tenure_days"),
            pl.len().cast(pl.Float64).alias("frequency"),
            pl.col("date").n_unique().cast(pl.Float64).alias("purchase_days"),
            pl.col("amount").sum().alias("monetary_total"),
            gaps.mean().alias("interpurchase_mean_days"),
            gaps.std(ddof=1).alias("interpurchase_std_days"),
            pl.col("amount").filter(recent).sum().alias("spend_90d"),
            recent.sum().cast(pl.Float64).alias("frequency_90d"),
            pl.col("amount").filter(previous).sum().alias("spend_before"),
            *shares,
        )
        .filter(pl.col("recency_days") <= active_days)
        .with_columns(
            (pl.col("monetary_total") / pl.col("frequency")).alias("monetary_mean"),
            pl.when(pl.col("spend_90d").abs() + pl.col("spend_before").abs() > 0)
            .then(
                (pl.col("spend_90d") - pl.col("spend_before"))
                / (pl.col("spend_90d").abs() + pl.col("spend_before").abs())
            )
            .otherwise(0.0)
            .alias("spend_trend"),
        )
        .select("customer_id", *BASE_FEATURES, *(s.meta.output_name() for s in shares))
        .sort("customer_id")
        .collect()
    )
    out_file.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(out_file)
    return frame.height


def compare_snapshots(
    finpipe_file: Path, reference_file: Path, rtol: float = 1e-6, atol: float = 1e-9
) -> dict:
    """Return how two snapshots agree: `equal`, `rows`, `max_abs_diff`, `worst_column`.

    Same customers in the same order, same feature columns; missing values (NaN or null) must
    be missing on both sides, the rest within rtol/atol.
    """
    ours = pd.read_parquet(finpipe_file).drop(columns=["date"], errors="ignore")
    theirs = pd.read_parquet(reference_file)
    if sorted(ours.columns) != sorted(theirs.columns):
        differ = sorted(set(ours.columns) ^ set(theirs.columns))
        return {"equal": False, "rows": len(ours), "reason": f"columns differ: {differ}"}
    same_ids = (
        len(ours) == len(theirs)
        and (
            ours["customer_id"].astype(str).to_numpy()
            == theirs["customer_id"].astype(str).to_numpy()
        ).all()
    )
    if not same_ids:
        return {"equal": False, "rows": [len(ours), len(theirs)], "reason": "different customers"}
    return compare_columns(ours, theirs, ours.columns.drop("customer_id"), rtol, atol)


# -- customers scoring -----------------------------------------------------------------------


def bare_segment_scoring(model: SavedNet, snapshot_file: Path, out_file: Path) -> pa.Table:
    """Segment a snapshot with a loaded encoder: pyarrow read, log + scale, encoder, nearest
    centroid, pyarrow write of customer_id, segment, distance_to_centroid."""
    meta, net = model.meta, model.net
    columns = meta["feature_columns"]
    table = pq.read_table(snapshot_file)
    present = set(table.column_names)
    x = np.column_stack(
        [
            table[c].to_numpy(zero_copy_only=False).astype(np.float64)
            if c in present
            else np.zeros(table.num_rows)  # a mix column nobody active used: share 0
            for c in columns
        ]
    )
    logged = [columns.index(c) for c in meta["log_columns"]]
    x[:, logged] = np.sign(x[:, logged]) * np.log1p(np.abs(x[:, logged]))
    inputs = torch.from_numpy(standardise(x, meta["scaler"]))
    with torch.no_grad():
        embedding = torch.cat(
            [net.encode(inputs[s : s + 8192]) for s in range(0, len(inputs), 8192)]
        ).numpy()
    centroids = np.asarray(meta["centroids"])
    distances = np.linalg.norm(embedding.astype(np.float64)[:, None] - centroids[None], axis=2)
    cluster = distances.argmin(axis=1)
    out = pa.table(
        {
            "customer_id": table["customer_id"],
            "segment": pa.array(np.asarray(meta["segment_ids"], dtype=np.int64)[cluster]),
            "distance_to_centroid": pa.array(distances[np.arange(len(cluster)), cluster]),
        }
    )
    out_file.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(out, out_file)
    return out
